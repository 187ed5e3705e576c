"""Reliability of every writer's output path and of numbers that parse but cannot be used.

Found by a new user's probe of the CLI (round 9): each case here was a traceback, a hang, a Ctrl-C
report or a deleted user file before its fix. The rules (README, "Bad input"): one line naming the
path or field, exit code 2, nothing half-written, nothing of the user's deleted or overwritten.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from agentsim.metrics import write_results
from agentsim.outputs import check_result_dir, is_result_dir

from test_reliability_cli import QUICK, _frames, _spec, agentsim_cli, one_error_line, snapshot

LONG = "a" * 300   # one path component longer than any common file system's NAME_MAX (255 bytes)


# ----------------------------------------------------------------------------- a replaced result
@pytest.mark.parametrize("case", ["a user file in report_files", "a folder named report.html",
                                  "a symlink as report.md"])
def test_a_result_holding_user_files_beside_a_report_is_not_replaced(tmp_path, case):
    """A result's directory counts as agentsim's only with the report files ``agentsim report``
    writes there (a PNG folder, a report file): rerunning into it used to delete the rest."""
    out = tmp_path / "r"
    write_results(out, *_frames())
    if case == "a user file in report_files":
        (out / "report_files" / "deep").mkdir(parents=True)
        (out / "report_files" / "fig.png").write_bytes(b"png")
        (out / "report_files" / "deep" / "data.csv").write_text("mine")
        needle = "report_files/deep"
    elif case == "a folder named report.html":
        (out / "report.html" / "sub").mkdir(parents=True)
        (out / "report.html" / "sub" / "thesis.tex").write_text("mine")
        needle = "report.html"
    else:
        (tmp_path / "elsewhere.md").write_text("mine")
        (out / "report.md").symlink_to(tmp_path / "elsewhere.md")
        needle = "report.md"
    assert not is_result_dir(out)
    before = snapshot(tmp_path)
    p = agentsim_cli("simulate", *QUICK, "-q", "-o", out)
    assert p.returncode == 2
    one_error_line(p, "--out", needle)
    assert snapshot(tmp_path) == before


def test_a_result_with_its_own_report_is_still_replaced(tmp_path):
    out = tmp_path / "r"
    assert agentsim_cli("simulate", *QUICK, "-q", "-o", out).returncode == 0
    assert agentsim_cli("report", out).returncode == 0
    assert agentsim_cli("report", out, "--format", "md").returncode == 0
    assert {"report.html", "report.md", "report_files"} <= set(os.listdir(out))
    assert is_result_dir(out) and check_result_dir(out) == "replace"
    p = agentsim_cli("simulate", *QUICK, "--seed", "3", "-q", "-o", out)
    assert p.returncode == 0, p.stderr
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3


def test_a_sweep_keeps_a_stale_cell_that_holds_user_files(tmp_path):
    spec = _spec(tmp_path, "[base]\nduration = 2.0\nworkload = { agents = 2 }\n[grid]\nseed = [0]\n")
    out = tmp_path / "sw"
    assert agentsim_cli("sweep", spec, "-o", out, "-j", "1").returncode == 0
    (cell,) = (out / "cells").iterdir()
    (cell / "report_files" / "x").mkdir(parents=True)
    (cell / "report_files" / "x" / "y.csv").write_text("mine")
    p = agentsim_cli("sweep", spec, "-o", out, "-j", "1", "--set", "duration=3.0")   # the cell is stale
    assert p.returncode == 2
    one_error_line(p, "report_files/x")
    assert (cell / "report_files" / "x" / "y.csv").read_text() == "mine"


def test_the_note_of_a_replaced_result_comes_only_once_it_is_replaced(tmp_path):
    """An error found after the path check is one line: no note of a replacement that never came."""
    out = tmp_path / "r"
    assert agentsim_cli("simulate", *QUICK, "-q", "-o", out).returncode == 0
    before = snapshot(tmp_path)
    for args in (["--generator", "nope"], ["--profile", str(tmp_path / "none.json")]):
        p = agentsim_cli("simulate", *QUICK, "-q", "-o", out, *args)
        assert p.returncode == 2
        one_error_line(p)
    assert snapshot(tmp_path) == before
    p = agentsim_cli("simulate", *QUICK, "-q", "-o", out)
    assert p.returncode == 0 and p.stderr.strip() == f"note: replaced the previous agentsim result in {out}"
    src = tmp_path / "t.parquet"
    assert agentsim_cli("trace", "generate", "chat", "-n", "2", "-o", src).returncode == 0
    p = agentsim_cli("trace", "generate", "nope", "-n", "2", "-o", src)
    assert p.returncode == 2
    one_error_line(p)
    p = agentsim_cli("trace", "generate", "chat", "-n", "3", "-o", src)
    assert p.returncode == 0 and p.stderr.strip() == f"note: replaced the previous agentsim trace {src}"


# ----------------------------------------------------------------------------- paths no file can take
def _writers(tmp_path: Path, target) -> list[list]:
    """Every command that writes, each aimed at ``target(suffix)``: (args, label)."""
    run = tmp_path / "run"
    if not run.exists():
        assert agentsim_cli("simulate", *QUICK, "-q", "-o", run).returncode == 0
        assert agentsim_cli("trace", "generate", "chat", "-n", "2", "-o", tmp_path / "t.parquet").returncode == 0
        bench = {"request_rate": "inf", "duration": 1.0, "input_lens": [10, 12], "output_lens": [3, 4],
                 "ttfts": [0.1, 0.1], "latencies": [0.3, 0.4], "start_times": [5.0, 5.0]}
        (tmp_path / "bench.json").write_text(json.dumps(bench))
    src, spec = tmp_path / "t.parquet", _spec(tmp_path, "[grid]\nseed = [0]\n")
    return [
        ["simulate", *QUICK, "-q", "-o", target("")],
        ["sweep", spec, "-o", target("")],
        ["report", run, "-o", target(".html")],
        ["report", run, "--format", "md", "-o", target(".md")],
        ["trace", "import", "native", src, "-o", target(".parquet")],
        ["trace", "export", src, "--to", "mooncake", "-o", target(".jsonl")],
        ["trace", "generate", "chat", "-n", "2", "-o", target(".parquet")],
        ["validate", tmp_path / "bench.json", "-o", target("")],
    ]


@pytest.mark.parametrize("kind", ["read-only file system", "name too long", "name too long for the temporary",
                                  "symlink loop"])
def test_every_writer_refuses_a_path_no_file_can_take_in_one_line(tmp_path, kind):
    """``/proc`` (no file can be made there), a 300-byte name, a loop of symbolic links: each
    writer says so in one line with exit 2, before its work (validate used to replay first)."""
    if kind == "read-only file system":
        if not Path("/proc/self").exists():
            pytest.skip("needs Linux's /proc")

        def target(suffix: str) -> str:
            return f"/proc/agentsim-out{suffix}"
        needle = "/proc/agentsim-out"
    elif kind == "name too long":
        def target(suffix: str) -> str:
            return str(tmp_path / (LONG + suffix))
        needle = "aaaa"
    elif kind == "name too long for the temporary":
        # 245 bytes fit a file system's 255, but not with the .NAME.tmp-PID written beside them:
        # the whole run used to finish before the write failed
        def target(suffix: str) -> str:
            return str(tmp_path / ("b" * (245 - len(suffix)) + suffix))
        needle = "bbbb"
    else:
        (tmp_path / "loopa").symlink_to(tmp_path / "loopb")
        (tmp_path / "loopb").symlink_to(tmp_path / "loopa")

        def target(suffix: str) -> str:
            return str(tmp_path / "loopa" / f"x{suffix}")
        needle = "loopa"
    for args in _writers(tmp_path, target):
        before = snapshot(tmp_path)
        p = agentsim_cli(*args, "--force") if args[0] == "report" else agentsim_cli(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert needle in one_error_line(p), args
        assert snapshot(tmp_path) == before, args


def test_compare_reads_a_long_missing_path_and_a_bad_summary_in_one_line(tmp_path):
    run = tmp_path / "run"
    assert agentsim_cli("simulate", *QUICK, "-q", "-o", run).returncode == 0
    p = agentsim_cli("compare", run, tmp_path / LONG)
    assert p.returncode == 2
    one_error_line(p, "aaaa")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("calls.parquet", "programs.parquet", "engines.parquet", "manifest.json"):
        (bad / f).write_bytes((run / f).read_bytes())
    summary = {k: v for k, v in json.loads((run / "summary.json").read_text()).items() if not k.startswith("p99")}
    for value in ("abc", -1, None):   # a summary missing metrics is completed from its tables
        (bad / "summary.json").write_text(json.dumps({**summary, "duration_s": value}))
        p = agentsim_cli("compare", run, bad)
        if value is None:
            assert p.returncode == 0, p.stderr
            continue
        assert p.returncode == 2
        one_error_line(p, "duration_s")
    (bad / "summary.json").write_text(json.dumps(summary))
    (bad / "engines.parquet").write_text("not parquet")
    p = agentsim_cli("compare", run, bad)
    assert p.returncode == 2
    one_error_line(p, "engines.parquet")


# ----------------------------------------------------------------------------- inputs
def test_a_truncated_compressed_trace_is_a_read_error_not_an_interrupt(tmp_path):
    """EOFError from a cut gzip stream used to reach the CLI framework, which reports it as Ctrl-C
    ("aborted", exit 130)."""
    lines = "".join(json.dumps({"timestamp": 1000 * i, "input_length": 100, "output_length": 10,
                                "hash_ids": [i]}) + "\n" for i in range(2000))
    whole = gzip.compress(lines.encode())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    for args in (["trace", "import", "mooncake", cut, "-o", tmp_path / "o.parquet"],
                 ["trace", "import", "mooncake", cut, "-o", tmp_path / "o.parquet", "--skip-bad"],
                 ["trace", "inspect", cut, "-f", "mooncake"],
                 ["simulate", *QUICK, "-q", "--trace", cut, "-o", tmp_path / "run"]):
        p = agentsim_cli(*args)
        assert p.returncode == 2, (args, p.stderr)
        one_error_line(p, "cut.jsonl.gz", "cannot read")
    assert sorted(os.listdir(tmp_path)) == ["cut.jsonl.gz"]


@pytest.mark.parametrize("line, needle", [
    ({"timestamp": 0, "input_length": 100, "output_length": 10 ** 23, "hash_ids": [0]}, "output_tokens"),
    ({"timestamp": 0, "input_length": 100, "output_length": 5, "hash_ids": [-(10 ** 40)]}, "hash_ids"),
])
def test_an_integer_beyond_any_column_is_a_trace_error(tmp_path, line, needle):
    """JSON integers are unbounded; an output length of 10^23 failed in the Parquet writer."""
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps(line) + "\n")
    for args in (["trace", "import", "mooncake", f, "-o", tmp_path / "o.parquet"],
                 ["trace", "inspect", f, "-f", "mooncake"]):
        p = agentsim_cli(*args)
        assert p.returncode == 2, p.stderr
        one_error_line(p, "t.jsonl", needle)
    assert not (tmp_path / "o.parquet").exists()


def test_a_large_integer_in_a_field_no_importer_reads_is_kept(tmp_path):
    """Only the fields a trace's programs are made of are bounded: a uint64 id beside them is fine."""
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"timestamp": 0, "input_length": 100, "output_length": 5, "hash_ids": [0],
                             "request_id": 2 ** 64 - 1}) + "\n")
    p = agentsim_cli("trace", "import", "mooncake", f, "-o", tmp_path / "o.parquet")
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("args, needle", [
    # the engines' time series: a period below the clock's resolution never advances it (a hang,
    # memory growing), and one below a millisecond fills memory with rows
    (["--set", "sim.sample_interval=1e-17"], "sim.sample_interval"),
    (["--set", "sim.sample_interval=1e-6"], "sim.sample_interval"),
    # relative weights whose sum no float holds (a numpy traceback, or always the last tool)
    (["--set", "workload.mix=[{generator='chat', weight=1e308}, {generator='react', weight=1e308}]"],
     "workload.mix"),
    (["--set", "workload.params={tools=[{name='a', weight=1e308}, {name='b', weight=1e308}]}"], "tools"),
])
def test_numbers_that_parse_but_cannot_run_are_refused(tmp_path, args, needle):
    p = agentsim_cli("simulate", *QUICK, "-q", "-o", tmp_path / "run", *args, timeout=60)
    assert p.returncode == 2, p.stderr
    one_error_line(p, needle)
    assert not (tmp_path / "run").exists()


def test_negative_seeds_are_refused_by_every_command_that_takes_one(tmp_path):
    for args in (["trace", "generate", "chat", "-n", "2", "--seed", "-4", "-o", tmp_path / "g.parquet"],
                 ["validate", tmp_path / "none.json", "--seed", "-1", "-o", tmp_path / "v"],
                 ["simulate", *QUICK, "-q", "--seed", "-1", "-o", tmp_path / "run"]):
        p = agentsim_cli(*args)
        assert p.returncode == 2, p.stderr
        one_error_line(p, "seed")
    assert os.listdir(tmp_path) == []


def test_a_grid_listing_a_value_twice_is_refused(tmp_path):
    """``seed = [1, 1]`` ran one cell and wrote two identical rows into results.parquet."""
    spec = _spec(tmp_path, "[base]\nduration = 2.0\n[grid]\nseed = [1, 1]\n")
    p = agentsim_cli("sweep", spec, "-o", tmp_path / "sw")
    assert p.returncode == 2
    one_error_line(p, "grid.seed", "twice")
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("policy, needle", [
    ('{route="autellix-lb", params={route={threshold_tokens=-5}}}', "threshold_tokens"),
    ('{route="prefix-affinity", params={route={cache_threshold=1e308}}}', "cache_threshold"),
    ('{route="prefix-affinity", params={route={max_tree_blocks=-1}}}', "max_tree_blocks"),
    ('{route="weighted-scorer", params={route={kv_weight=-2.0}}}', "kv_weight"),
])
def test_policy_parameters_out_of_range_are_refused(tmp_path, policy, needle):
    p = agentsim_cli("simulate", *QUICK, "-q", "-o", tmp_path / "run", "--set", f"policy={policy}")
    assert p.returncode == 2, p.stderr
    one_error_line(p, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value", [("--sample-interval", "0"), ("--flush-interval", "nan"),
                                         ("--drain-timeout", "-1"), ("--kv-cache-gib", "0")])
def test_live_driver_settings_are_checked_before_anything_starts(tmp_path, flag, value):
    p = agentsim_cli("live", flag, value, "--endpoints", "http://127.0.0.1:9", "-q", "-o", tmp_path / "run")
    assert p.returncode == 2, p.stderr
    one_error_line(p, flag)
    assert os.listdir(tmp_path) == []


def test_a_study_refuses_a_table_it_never_reads(tmp_path):
    (tmp_path / "su.toml").write_text("")
    p = agentsim_cli("study", "scaling", "--quick", "--success", tmp_path / "su.toml", "-o", tmp_path / "st")
    assert p.returncode == 2
    one_error_line(p, "--success", "scaling")
    assert not (tmp_path / "st").exists()


# ----------------------------------------------------------------------------- a second probe (round 9)
JOB = Path(__file__).parent / "data" / "vllm-bench-cpu" / "profile-job"


@pytest.mark.parametrize("args, needle", [
    (["simulate", *QUICK, "-q", "--set", "policy.params.route=7"], "policy.params.route"),
    (["simulate", *QUICK, "-q", "--set", "policy={name='vllm', params={evict='x'}}"], "policy.params.evict"),
    (["live", "--endpoints", "http://[::1", "--duration", "2", "-q"], "--endpoints"),
])
def test_malformed_values_inside_good_syntax_are_one_line(tmp_path, args, needle):
    p = agentsim_cli(*args, "-o", tmp_path / "run")
    assert p.returncode == 2, p.stderr
    one_error_line(p, needle)
    assert os.listdir(tmp_path) == []


def test_a_ray_address_where_nothing_listens_is_refused_at_once(tmp_path):
    """``ray.init`` retries a closed port for minutes, printing only Ray's own warnings: the sweep
    used to hang there with sweep.json and an empty cells/ already written."""
    spec = _spec(tmp_path, "[base]\nduration = 2.0\n[grid]\nseed = [0]\n")
    for args, option in ((["sweep", spec, "-o", tmp_path / "sw", "--ray", "127.0.0.1:1"], "--ray"),
                         (["live", "--address", "127.0.0.1:1", "--duration", "2", "-q", "-o", tmp_path / "lv"],
                          "--address")):
        p = agentsim_cli(*args, timeout=60)
        assert p.returncode == 2, p.stderr
        one_error_line(p, option, "127.0.0.1:1")
    assert sorted(os.listdir(tmp_path)) == ["s.toml"]


def test_a_study_reads_its_success_table_before_any_cell_runs(tmp_path):
    p = agentsim_cli("study", "topology", "--quick", "-o", tmp_path / "st", "--success", tmp_path / "none.toml")
    assert p.returncode == 2
    one_error_line(p, "none.toml")
    assert not (tmp_path / "st").exists()


def test_a_quick_and_a_full_study_never_share_a_directory(tmp_path):
    out = tmp_path / "st"
    assert agentsim_cli("study", "scaling", "--quick", "-o", out).returncode == 0
    doc = json.loads((out / "study.json").read_text())
    (out / "study.json").write_text(json.dumps({**doc, "quick": False}))   # as a full run leaves it
    before = snapshot(tmp_path)
    p = agentsim_cli("study", "scaling", "--quick", "-o", out)
    assert p.returncode == 2
    one_error_line(p, "full run", "scaling")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ['{"mean_ttft_ms": "broken"}', "{}", "[1, 2]"])
def test_a_cell_whose_summary_is_damaged_is_recomputed_not_reused(tmp_path, damage):
    """A damaged summary.json used to count as finished work: a traceback (ArrowTypeError) or a row of NaNs."""
    spec = _spec(tmp_path, "[base]\nduration = 2.0\nworkload = { agents = 2 }\n[grid]\nseed = [0]\n")
    out = tmp_path / "sw"
    first = agentsim_cli("sweep", spec, "-o", out, "-j", "1", "--json")
    assert first.returncode == 0
    (cell,) = (out / "cells").iterdir()
    (cell / "summary.json").write_text(damage)
    p = agentsim_cli("sweep", spec, "-o", out, "-j", "1", "--json")
    assert p.returncode == 0, p.stderr
    assert "stale: 1 of 1" in p.stderr and "Traceback" not in p.stderr
    assert json.loads(p.stdout) == json.loads(first.stdout)


def _job(tmp_path: Path, name: str = "job") -> Path:
    import shutil

    return Path(shutil.copytree(JOB, tmp_path / name))


def test_calibrate_fit_replaces_a_profile_only_with_force(tmp_path):
    job = _job(tmp_path)
    prof = tmp_path / "p.json"
    assert agentsim_cli("calibrate", "fit", job, "--out", prof).returncode == 0
    prof.write_text(prof.read_text().replace('"provenance"', '"hand_tuned": true, "provenance"'))
    before = snapshot(tmp_path)
    p = agentsim_cli("calibrate", "fit", job, "--out", prof)
    assert p.returncode == 2
    one_error_line(p, "--force")
    assert snapshot(tmp_path) == before
    assert agentsim_cli("calibrate", "fit", job, "--out", prof, "--force").returncode == 0
    assert "hand_tuned" not in prof.read_text()


@pytest.mark.parametrize("damage", ["a point without kind", "a sample that is a number", "job.json a list",
                                    "no points yet"])
def test_calibrate_fit_and_check_name_a_damaged_job_in_one_line(tmp_path, damage):
    job = _job(tmp_path)
    prof = tmp_path / "p.json"
    assert agentsim_cli("calibrate", "fit", job, "--out", prof).returncode == 0
    lines = (job / "points.jsonl").read_text().splitlines()
    point = json.loads(lines[0])
    if damage == "a point without kind":
        point.pop("kind")
    elif damage == "a sample that is a number":
        point["samples"][0] = 5
    if damage == "job.json a list":
        (job / "job.json").write_text("[1, 2]")
    elif damage == "no points yet":   # a job interrupted before its first point
        (job / "points.jsonl").write_text("")
    else:
        (job / "points.jsonl").write_text("\n".join([json.dumps(point)] + lines[1:]) + "\n")
    for args in (["calibrate", "fit", job, "--out", tmp_path / "q.json"], ["calibrate", "check", prof, job]):
        p = agentsim_cli(*args)
        assert p.returncode == 2, (args, p.stderr)
        one_error_line(p, str(job))
    assert not (tmp_path / "q.json").exists()


@pytest.mark.parametrize("flag, value", [("--clock", "foo"), ("--max-median-error", "nan"),
                                         ("--max-median-error", "-1")])
def test_calibrate_check_options_are_checked(tmp_path, flag, value):
    job = _job(tmp_path)
    assert agentsim_cli("calibrate", "fit", job, "--out", tmp_path / "p.json").returncode == 0
    p = agentsim_cli("calibrate", "check", tmp_path / "p.json", job, flag, value)
    assert p.returncode == 2
    one_error_line(p, flag)


def test_policy_report_keeps_a_figure_it_did_not_write(tmp_path):
    import subprocess
    import sys

    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "kvflow.png").write_text("mine")
    p = subprocess.run([sys.executable, "-m", "agentsim.experiments.policy_report", "kvflow", "--out",
                        str(tmp_path / "runs"), "--figures", str(figs)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    one_error_line(p, "kvflow.png")
    assert (figs / "kvflow.png").read_text() == "mine" and not (tmp_path / "runs").exists()
    p = subprocess.run([sys.executable, "-m", "agentsim.experiments.policy_report", "topology", "--success",
                        str(tmp_path / "none.toml"), "--figures", str(tmp_path / "f2")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""   # the error went to stdout before
    one_error_line(p, "none.toml")


def test_a_fitted_profile_is_strict_json_even_without_held_out_points(tmp_path):
    """With no held-out point the held-out error has no value: it was written as a bare NaN, which
    is not JSON (``jq`` and other languages' parsers refuse it)."""
    job = _job(tmp_path)
    lines = [json.loads(x) for x in (job / "points.jsonl").read_text().splitlines()]
    (job / "points.jsonl").write_text("".join(json.dumps({**r, "holdout": False}) + "\n" for r in lines))
    prof = tmp_path / "p.json"
    assert agentsim_cli("calibrate", "fit", job, "--out", prof).returncode == 0

    def refuse(name: str):
        raise AssertionError(f"{name} in {prof}")
    json.loads(prof.read_text(), parse_constant=refuse)
    p = agentsim_cli("calibrate", "show", prof)
    assert p.returncode == 0 and "n/a" in p.stdout


def test_a_profile_with_a_negative_model_size_is_refused(tmp_path):
    job = _job(tmp_path)
    prof = tmp_path / "p.json"
    assert agentsim_cli("calibrate", "fit", job, "--out", prof).returncode == 0
    d = json.loads(prof.read_text())
    d["model"]["num_layers"] = -3
    prof.write_text(json.dumps(d))
    for args in (["calibrate", "show", prof], ["simulate", *QUICK, "-q", "--profile", prof, "-o", tmp_path / "r"]):
        p = agentsim_cli(*args)
        assert p.returncode == 2, p.stderr
        one_error_line(p, "num_layers")


def test_a_bench_run_where_every_request_failed_is_refused(tmp_path):
    bench = {"request_rate": "inf", "duration": 1.0, "input_lens": [10, 12], "output_lens": [3, 4],
             "ttfts": [0.1, 0.1], "latencies": [0.3, 0.4], "start_times": [5.0, 5.0], "errors": ["boom", "boom"]}
    f = tmp_path / "b.json"
    f.write_text(json.dumps(bench))
    for args in (["validate", f, "-o", tmp_path / "v"], ["calibrate", "bench", f, "-o", tmp_path / "p.json"]):
        p = agentsim_cli(*args)
        assert p.returncode == 2, (args, p.stderr)
        one_error_line(p, "every one of the 2 requests failed")
    f.write_text(json.dumps({**bench, "errors": ["", ""], "latencies": [-1.0, 0.4]}))
    p = agentsim_cli("validate", f, "-o", tmp_path / "v")
    assert p.returncode == 2
    one_error_line(p, "latencies[0]")
    assert sorted(os.listdir(tmp_path)) == ["b.json"]

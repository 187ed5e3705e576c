"""`agentsim study`: every simulator study's --quick run end to end through the CLI (one shared run per
study), the study directory rules, resumability, progress and the failed-cell summary, and the sweep
features the studies use (linked grid keys, [quick] grids, keep_going)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from agentsim.cli import run_cli
from agentsim.experiments.studies import STUDIES

#: study -> {table: (columns that must be there, number of rows of the quick grid)}
EXPECTED = {
    "scaling": {"scaling": (["variant", "router", "nodes", "gpus", "agents", "output_throughput",
                             "p95_program_latency_s", "scaling_efficiency"], 16)},
    "capacity": {"capacity": (["mix", "policy", "max_agents_ttft", "min_agents_throughput", "capacity_agents"], 4),
                 "capacity_cells": (["mix", "policy", "agents", "p95_ttft_ms", "output_throughput"], 8)},
    "scaling-laws": {"scaling_laws_cells": (["nodes", "tp", "gpus", "agents", "agents_per_gpu",
                                             "throughput_per_gpu", "p95_program_latency_s"], 9),
                     "scaling_laws_fits": (["metric", "tp", "law", "a", "b", "r2", "median_rel_error", "breaks"], 8)},
    "joint": {"joint": (["gpu", "policy", "tasks", "busy_gpu_hours", "success_rate", "usd_per_gpu_hour",
                         "successful_tasks_per_gpu_hour", "successful_tasks_per_usd"], 4)},
    "autellix": {"autellix": (["policy", "workload.rate", "mean_program_token_latency_ms"], 4)},
    "scalesim": {"scalesim": (["policy", "mean_program_latency_s"], 2)},
    "kvflow": {"kvflow": (["policy", "prefix_hit_rate"], 2)},
    "toolgap": {"toolgap": (["policy", "cluster.engine.num_gpu_blocks_override", "mean_program_latency_s"], 4)},
    "topology": {"topology": (["policy", "mean_program_latency_s"], 2)},
    "disagg": {"layouts": (["workload", "layout", "rate", "request_goodput", "slo_attainment",
                            "mean_kv_transfer_time_ms"], 8),
               "capacity": (["workload", "layout", "max_rate_at_90pct_slo"], 4),
               "fetch": (["prefix_fetch", "rate", "mean_ttft_ms", "prefix_hit_rate"], 2)},
}


def cli(*args) -> tuple[int, str]:
    """Run the CLI in this process; (exit status, stderr)."""
    import io
    from contextlib import redirect_stderr

    buf = io.StringIO()
    with redirect_stderr(buf):
        from agentsim import commands

        old = commands.err.file
        commands.err.file = buf
        try:
            code = run_cli([str(a) for a in args])
        finally:
            commands.err.file = old
    return code, buf.getvalue()


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Each study's --quick run, once: name -> (exit status, stderr, out dir)."""
    root = tmp_path_factory.mktemp("studies")
    runs = {}
    for name in EXPECTED:
        out = root / name
        code, err = cli("study", name, "--quick", "-o", out)
        runs[name] = (code, err, out)
    return runs


def test_help_lists_every_study_by_name(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert run_cli(["study", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("scaling", "capacity", "scaling-laws", "joint", "autellix", "scalesim", "kvflow", "toolgap",
                 "topology", *STUDIES):
        assert f" {name} " in out, name
    assert STUDIES["capacity"].help.split()[0] in out


def test_unknown_study_is_one_line_exit_2(tmp_path):
    code, err = cli("study", "nope", "-o", tmp_path / "x")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0] and "scaling" in lines[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_quick_study_end_to_end(quick_runs, name):
    code, err, out = quick_runs[name]
    assert code == 0, err
    doc = json.loads((out / "study.json").read_text())
    assert doc["kind"] == "agentsim-study" and doc["study"] == name and doc["quick"] is True
    assert doc["command"].startswith(f"agentsim study {name} --quick -o ")
    assert doc["failed"] == [] and doc["findings"] and doc["cells_dir"] == "cells"
    assert doc["versions"]["agentsim"] and doc["created_utc"].endswith("Z") and doc["wall_s"] >= 0
    assert set(doc["tables"]) == set(EXPECTED[name])
    for key, (cols, nrows) in EXPECTED[name].items():
        t = pd.read_csv(out / doc["tables"][key])
        assert [c for c in cols if c not in t.columns] == [], key
        assert len(t) == nrows, key
    assert doc["figures"]
    for f in doc["figures"]:
        png = (out / f).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # every cell's run result is under cells/<sweep>/cells/<id>/ with its manifest (provenance for reports)
    manifests = list((out / "cells").glob("*/cells/*/manifest.json"))
    assert manifests and all("cell_key" in json.loads(m.read_text()) for m in manifests)
    assert "0 failed" in err and "ETA" in err  # progress lines (stderr is not a terminal here)


def test_scaling_numbers_follow_from_the_cells(quick_runs):
    out = quick_runs["scaling"][2]
    t = pd.read_csv(out / "scaling.csv")
    for (_, _), g in t.groupby(["variant", "router"]):
        one = g[g["nodes"] == 1].iloc[0]
        for r in g.itertuples():
            assert r.scaling_efficiency == pytest.approx(r.output_throughput / (r.nodes * one.output_throughput))
    assert set(t["router"]) == {"vllm", "least-loaded", "prefix-affinity", "autellix-lb"}
    scaled = t[t["variant"] == "agents scaled with GPUs"]
    assert (scaled["agents"] == 4 * scaled["gpus"]).all()
    fixed = t[t["variant"] == "fixed total agents"]
    assert fixed["agents"].nunique() == 1


def test_joint_combines_success_and_prices(quick_runs, tmp_path):
    out = quick_runs["joint"][2]
    t = pd.read_csv(out / "joint.csv")
    assert list(t["successful_tasks_per_gpu_hour"]) == pytest.approx(
        list(t["success_rate"] * t["tasks"] / t["busy_gpu_hours"]))
    assert list(t["successful_tasks_per_usd"]) == pytest.approx(
        list(t["successful_tasks_per_gpu_hour"] / t["usd_per_gpu_hour"]))
    assert any("EXAMPLE DATA" in f for f in json.loads((out / "study.json").read_text())["findings"])
    bad = tmp_path / "prices.toml"
    bad.write_text("[usd_per_gpu_hour]\na100-80gb = -1\n")
    code, err = cli("study", "joint", "--quick", "-o", tmp_path / "j", "--prices", bad)
    assert code == 2 and "usd_per_gpu_hour.a100-80gb" in err and len(err.strip().splitlines()) == 1


def test_rerun_reuses_every_cell(quick_runs):
    out = quick_runs["scaling"][2]
    cells = sorted(out.glob("cells/*/cells/*/summary.json"))
    before = {p: p.stat().st_mtime_ns for p in cells}
    code, err = cli("study", "scaling", "--quick", "-o", out)
    assert code == 0 and "all cells reused" in err and "[16/16]" in err
    assert {p: p.stat().st_mtime_ns for p in cells} == before


def test_study_dir_holding_other_files_is_refused(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    code, err = cli("study", "scaling", "--quick", "-o", d)
    assert code == 2 and "notes.txt" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]


def test_another_studys_dir_is_refused(quick_runs):
    code, err = cli("study", "capacity", "--quick", "-o", quick_runs["joint"][2])
    assert code == 2 and "'joint'" in err


def test_failed_cells_are_summarised_and_exit_1(tmp_path, monkeypatch):
    """A cell whose run raises does not stop the study: the others finish, study.json lists it, exit 1."""
    from agentsim.experiments.studies import Study, StudyResult, register
    from agentsim.experiments.studies.base import run_specs
    from agentsim.experiments.sweep import load_spec
    from agentsim.sim import runner

    spec = tmp_path / "s.toml"
    spec.write_text(textwrap.dedent("""
        [base]
        duration = 5.0
        [base.workload]
        agents = 2
        [grid]
        seed = [0, 1, 2]
    """))
    real = runner.run

    def run(cfg, *a, **k):
        if cfg.seed == 1:
            raise RuntimeError("engine exploded")
        return real(cfg, *a, **k)

    monkeypatch.setattr(runner, "run", run)

    def study(out, opts):
        tables, failed = run_specs(out, opts, [("s", load_spec(spec))])
        return StudyResult("test-failing", tables={"s": tables["s"].drop(columns=["_cell", "_values", "_config"])},
                           findings=[f"{len(tables['s'])} cells"], failed=failed)

    register(Study("test-failing", "a study whose second cell fails", study))
    try:
        code, err = cli("study", "test-failing", "-o", tmp_path / "out")
    finally:
        STUDIES.pop("test-failing")
    assert code == 1
    doc = json.loads((tmp_path / "out" / "study.json").read_text())
    assert len(doc["failed"]) == 1 and "engine exploded" in doc["failed"][0] and '"seed": 1' in doc["failed"][0]
    assert len(pd.read_csv(tmp_path / "out" / "s.csv")) == 2
    assert "1 failed" in err and "1 cell(s) failed" in err and "failed: s/" in err


def test_linked_grid_keys_and_quick_grid(tmp_path):
    from agentsim.experiments.sweep import load_spec

    p = tmp_path / "s.toml"
    p.write_text(textwrap.dedent("""
        [base]
        duration = 5.0
        [grid]
        "cluster.num_nodes,workload.agents" = [[1, 4], [2, 8], [3, 12]]
        seed = [0, 1]
        [quick]
        base = { duration = 2.0 }
        grid = { "cluster.num_nodes,workload.agents" = [[1, 4]] }
    """))
    full = load_spec(p)
    assert len(full.cells()) == 6 and full.grid_keys == ["cluster.num_nodes", "workload.agents", "seed"]
    assert all(c["workload.agents"] == 4 * c["cluster.num_nodes"] for c in full.cells())
    quick = load_spec(p, quick=True)
    assert len(quick.cells()) == 2 and quick.base["duration"] == 2.0
    p.write_text('[grid]\n"cluster.num_nodes,workload.agents" = [[1, 4], [2]]\n')
    with pytest.raises(Exception, match="linked key"):
        load_spec(p)


@pytest.mark.slow
def test_study_cells_run_as_ray_tasks(quick_runs, tmp_path, monkeypatch):
    """`agentsim study joint --quick --ray ADDRESS` on a real 2-node Ray cluster (loopback) gives the local table."""
    import subprocess
    import sys

    pytest.importorskip("ray", reason="ray is part of the test install ('.[test,cpu]')")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # as tests/test_cli.py's sweep --ray test
    from ray.cluster_utils import Cluster

    common = dict(num_cpus=1, object_store_memory=80 * 2**20, node_ip_address="127.0.0.1")
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=dict(common, include_dashboard=False))
    try:
        cluster.add_node(**common)
        cluster.wait_for_nodes()
        address = cluster.address
        p = subprocess.run([sys.executable, "-m", "agentsim", "study", "joint", "--quick", "-o", str(tmp_path / "r"),
                            "--ray", address], capture_output=True, text=True, timeout=300)
    finally:
        cluster.shutdown()
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "r" / "study.json").read_text())["command"].endswith(f"--ray {address}")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "r" / "joint.csv"),
                                  pd.read_csv(quick_runs["joint"][2] / "joint.csv"))

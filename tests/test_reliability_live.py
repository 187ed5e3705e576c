"""What the live path reports, and what it leaves behind (issue 12, part C) — no vLLM, no Ray.

The live driver runs here against an in-process fake engine (an :class:`EngineClient` that
"generates" after a short sleep), so the driver's own accounting is tested exactly: throughput
over the measured makespan (never the configured duration), the options that really ran in the
manifest, ``--no-drain`` ending at ``duration`` as a simulation does, progress lines, temp-file
clean-up, one tiny model for every documented CPU path, and ``compare``'s definitions, units and
warnings.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time

import pytest

from agentsim import metrics as M
from agentsim.config import load_config
from agentsim.live.driver import EngineClient, LiveDriver, LiveOptions
from agentsim.policies.registry import make_bundle
from agentsim.traces.source import ProgramSource


class FakeEngine(EngineClient):
    """Serves a call in ``0.002 s`` per output token; reports vLLM-like stats (node clock = monotonic)."""

    def __init__(self, engine_id: int = 0, per_token: float = 0.002) -> None:
        self.engine_id, self.node_id = engine_id, 0
        self.info = {"num_blocks": 4096, "block_size": 16, "max_model_len": 8192, "vocab_size": 32000}
        self.per_token = per_token
        self.tokens = {"prefill_tokens": 0, "decode_tokens": 0, "busy_time": 0.0}

    async def generate(self, request_id, token_ids, max_tokens, priority, extra_args, run_epoch):
        t0 = time.monotonic()
        await asyncio.sleep(self.per_token * max_tokens)
        t1 = time.monotonic()
        self.tokens["prefill_tokens"] += len(token_ids)
        self.tokens["decode_tokens"] += max_tokens
        self.tokens["busy_time"] += t1 - t0
        return {"scheduled_at": t0, "first_token_at": t0 + self.per_token, "last_token_at": t1,
                "token_ids": list(range(4, 4 + max_tokens)), "num_cached_tokens": 0, "num_preemptions": 0}

    async def poll(self) -> dict:
        return {"stats": {"t": time.monotonic(), "num_running": 0, "num_waiting": 0, "kv_usage": 0.0, **self.tokens},
                "events": []}

    async def clock(self) -> float:
        return time.monotonic()


def _cfg(**over):
    base = {"duration": 3.0, "workload.generator": "react", "workload.agents": 2, "workload.num_programs": 3,
            "workload.params": {"calls_mean": 2.0, "max_calls": 3, "output_tokens_mean": 8, "prompt_tokens_mean": 200,
                                "tools": [{"name": "t", "dist": "constant", "median": 0.05}]},
            "cluster.gpus_per_node": 1}
    base.update(over)
    return load_config(None, base)


def _drive(cfg, tmp_path, progress=None, **opt):
    options = LiveOptions(duration=cfg.duration, flush_interval=0, sample_interval=0.2, **opt)
    d = LiveDriver([FakeEngine()], make_bundle(cfg.policy), block_size=16, options=options, out_dir=tmp_path / "run",
                   seed=cfg.seed, manifest={"live_options": {"duration": 60.0}}, kv_events=False,
                   progress=progress, progress_interval=0.5)
    return d.run(ProgramSource(cfg.workload, cfg.seed))


def test_live_throughput_divides_by_the_measured_makespan(tmp_path):
    """A drained run whose programs all end before `duration` reports tokens / its real length
    (the old driver divided by max(makespan, duration): -96 % against the same sim run)."""
    cfg = _cfg(duration=30.0)
    res = _drive(cfg, tmp_path)
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert res.manifest["complete"] is True and s["num_programs"] == 3
    assert s["duration_s"] < 10.0  # the programs took about a second, not the configured 30 s
    assert s["duration_s"] == pytest.approx(res.manifest["wall_time_s"], abs=0.25)
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration_s"])
    assert s["request_throughput"] == pytest.approx(s["num_calls"] / s["duration_s"])
    # the same definition in the simulator: a drained run lasts until its last program ends
    from agentsim.sim.runner import run

    sim = run(_cfg(duration=30.0, **{"sim.drain": True}))
    assert sim.summary["duration_s"] == pytest.approx(sim.programs["end_at"].max())
    assert sim.summary["output_throughput"] == pytest.approx(
        sim.summary["total_output_tokens"] / sim.summary["duration_s"])


def test_manifest_records_the_options_that_ran(tmp_path):
    """`live_options.duration` is what the driver used (here 3), not the caller's stale 60."""
    res = _drive(_cfg(duration=3.0), tmp_path)
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["live_options"]["duration"] == 3.0 == res.manifest["live_options"]["duration"]
    assert m["live_options"]["drain"] is True


def test_no_drain_ends_the_run_at_duration_like_simulate(tmp_path):
    """Without drain, a live run lasts `duration` (programs cut then are unfinished), as sim.drain = false."""
    cfg = _cfg(duration=1.5, **{"workload.num_programs": None, "workload.agents": 2})
    res = _drive(cfg, tmp_path, drain=False)
    s = res.summary
    assert 1.5 <= s["duration_s"] < 2.5
    # and a run whose programs end early still lasts `duration` (the simulator's sim.drain = false)
    res2 = _drive(_cfg(duration=2.0), tmp_path, drain=False)
    assert res2.summary["num_programs"] == 3 and res2.summary["duration_s"] >= 2.0
    sim = __import__("agentsim.sim.runner", fromlist=["run"]).run(_cfg(duration=2.0))
    assert sim.summary["duration_s"] == 2.0


def test_driver_reports_progress(tmp_path):
    lines: list[str] = []
    params = {"calls_mean": 2.0, "max_calls": 3, "output_tokens_mean": 8, "prompt_tokens_mean": 200,
              "tools": [{"name": "t", "dist": "constant", "median": 0.4}]}
    _drive(_cfg(duration=30.0, **{"workload.num_programs": 4, "workload.params": params}), tmp_path,
           progress=lines.append)
    assert lines and all(" s (" in ln and "program(s) done" in ln for ln in lines)


def test_engine_temp_files_are_removed_by_pid(tmp_path):
    from agentsim.live.cluster import remove_engine_temp_files

    mine = [tmp_path / "agentsim-kv-4242-0.sock", tmp_path / "agentsim-sched-4242-1.jsonl"]
    other = [tmp_path / "agentsim-kv-5151-0.sock", tmp_path / "agentsim-kv-42420-0.sock", tmp_path / "notes.txt"]
    for p in mine + other:
        p.write_text("x")
    gone = remove_engine_temp_files([4242], tmpdir=str(tmp_path))
    assert sorted(gone) == sorted(map(str, mine))
    assert all(p.exists() for p in other) and not any(p.exists() for p in mine)


def test_one_tiny_model_for_live_and_calibration(tmp_path):
    """`--model DIR` with a tiny-model directory loads exactly as `--model tiny` (dummy, float32),
    and the model `live` makes is the one `python -m agentsim.live.tiny_model DIR` writes."""
    from agentsim.live.runner import LiveSettings, resolve_model
    from agentsim.live.tiny_model import TINY_MODEL_SHAPE

    p = subprocess.run([sys.executable, "-m", "agentsim.live.tiny_model", str(tmp_path / "tiny-llama")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    by_dir = LiveSettings(model=str(tmp_path / "tiny-llama"))
    by_name = LiveSettings(model="tiny", model_cache=str(tmp_path / "cache"))
    assert (by_dir.resolved_load_format, by_dir.resolved_dtype) == ("dummy", "float32")
    assert (by_name.resolved_load_format, by_name.resolved_dtype) == ("dummy", "float32")
    made = json.loads((tmp_path / "cache" / "tiny-llama" / "config.json").read_text()) \
        if (tmp_path / "cache" / "tiny-llama").exists() else json.loads(
            (__import__("pathlib").Path(resolve_model(by_name)) / "config.json").read_text())
    written = json.loads((tmp_path / "tiny-llama" / "config.json").read_text())
    assert made == written and written["hidden_size"] == TINY_MODEL_SHAPE["hidden_size"]
    # any other model keeps vLLM's own defaults; an explicit flag always wins
    assert LiveSettings(model=str(tmp_path)).resolved_load_format == "auto"
    assert LiveSettings(model=str(tmp_path / "tiny-llama"), dtype="bfloat16").resolved_dtype == "bfloat16"
    # the module refuses to write into a directory holding anything else (exit 2, nothing written)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    p = subprocess.run([sys.executable, "-m", "agentsim.live.tiny_model", str(tmp_path / "busy")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "busy" in p.stderr and os.listdir(tmp_path / "busy") == ["notes.txt"]


# ----------------------------------------------------------------------------- summary and compare
def test_summary_keys_carry_units_and_match_the_declared_list(tmp_path):
    cfg = _cfg(duration=30.0, **{"sim.drain": True})
    from agentsim.sim.runner import run

    r = run(cfg)
    declared = {k for k, _, _ in M.SUMMARY_KEYS} - {"request_goodput"}
    assert set(r.summary) == declared
    calls = r.calls[r.calls["status"] == "finished"]
    assert r.summary["mean_ttft_ms"] == pytest.approx(calls["ttft"].mean() * 1e3)
    assert r.summary["median_e2el_ms"] == pytest.approx(calls["e2e"].median() * 1e3)
    assert r.summary["mean_program_latency_s"] == pytest.approx(r.programs["latency"].mean())


def test_old_summary_keys_are_upgraded_with_their_units():
    old = {"ttft_p50": 0.25, "output_tok_s": 10.0, "program_latency_mean": 3.0, "preemptions": 2.0,
           "program_token_latency_mean": 0.02, "duration_s": 5.0}
    new = M.upgrade_summary(old)
    assert new == {"median_ttft_ms": 250.0, "output_throughput": 10.0, "mean_program_latency_s": 3.0,
                   "num_preemptions": 2.0, "mean_program_token_latency_ms": 20.0, "duration_s": 5.0}


def _sim_result(path, **over):
    from agentsim.sim.runner import run

    r = run(_cfg(duration=30.0, **{"sim.drain": True, **over}))
    M.write_results(path, r.calls, r.programs, r.engines, r.summary, r.manifest)
    return r


def test_compare_prints_means_units_and_warns_on_mismatched_runs(tmp_path):
    from agentsim.live.compare import compare_runs, mismatches, load_run

    _sim_result(tmp_path / "a")
    _sim_result(tmp_path / "b", **{"workload.agents": 1})
    df = compare_runs(tmp_path / "a", tmp_path / "b").set_index("metric")
    for k in ("mean_ttft_ms", "mean_tpot_ms", "mean_e2el_ms", "mean_program_latency_s"):
        assert k in df.index and df.loc[k, "unit"] in ("ms", "s")
    assert set(df["unit"]) <= {"ms", "s", "ms/token", "tok/s", "programs/s", "calls/s", "%", "n"}
    warn = mismatches(load_run(tmp_path / "a"), load_run(tmp_path / "b"))
    assert len(warn) == 1 and "workload" in warn[0] and "agents: 2 vs 1" in warn[0]
    assert mismatches(load_run(tmp_path / "a"), load_run(tmp_path / "a")) == []
    # the CLI, piped: warnings on stderr, and no row cut at 80 columns
    p = subprocess.run([sys.executable, "-m", "agentsim", "compare", str(tmp_path / "a"), str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": ""})
    assert p.returncode == 0, p.stderr
    assert "warning: the runs differ in workload" in p.stderr
    assert "TTFT mean" in p.stdout and "…" not in p.stdout
    assert max(len(ln) for ln in p.stdout.splitlines()) > 80


def test_compare_of_identical_token_totals_shows_equal_throughput(tmp_path):
    """Same tokens over the same measured makespan -> 0 % difference (the -96 % of the issue)."""
    from agentsim.live.compare import compare_runs

    r = _sim_result(tmp_path / "a")
    # the same run as a live driver would record it: same tables, summarised by the shared function
    s = M.summarize(r.calls, r.programs, r.engines, float(r.programs["end_at"].max()))
    M.write_results(tmp_path / "b", r.calls, r.programs, r.engines, s, {**r.manifest, "backend": "live"})
    df = compare_runs(tmp_path / "a", tmp_path / "b").set_index("metric")
    for k in ("output_throughput", "total_token_throughput", "program_throughput", "request_throughput"):
        assert df.loc[k, "rel_diff"] == pytest.approx(0.0, abs=1e-12)


def test_simulate_title_names_the_profile_that_ran(tmp_path):
    """`--profile FILE` for other hardware: the header says that profile's GPU and model."""
    from agentsim.calibration.profile import shipped_profiles

    doc = json.loads(shipped_profiles()["a100-80gb_llama-3-8b_tp1"].read_text())
    doc["name"] = "cpu-test_tiny-llama_tp1"
    doc["gpu"]["name"] = "cpu-test"
    doc["model"]["name"] = "tiny-llama"
    prof = tmp_path / "cpu.json"
    prof.write_text(json.dumps(doc))
    p = subprocess.run([sys.executable, "-m", "agentsim", "simulate", "--profile", str(prof), "--duration", "5",
                        "--agents", "2", "-o", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "COLUMNS": ""})
    assert p.returncode == 0, p.stderr
    head = p.stdout.split("┏")[0]
    assert "cpu-test" in head and "tiny-llama" in head and "a100" not in head, head
    assert max(len(ln) for ln in p.stdout.splitlines()) > 80 or "…" not in p.stdout
    assert not math.isnan(json.loads((tmp_path / "run" / "summary.json").read_text())["output_throughput"])


def test_compare_takes_the_sim_model_from_its_profile(tmp_path):
    """A sim run with `--profile` for model X and a live run serving X are the same model (no warning)."""
    from agentsim.calibration.profile import shipped_profiles
    from agentsim.live.compare import _what_ran

    doc = json.loads(shipped_profiles()["a100-80gb_llama-3-8b_tp1"].read_text())
    doc["name"], doc["model"]["name"] = "cpu_tiny-llama_tp1", "tiny-llama"
    (tmp_path / "tiny.json").write_text(json.dumps(doc))
    cfg = {"cluster": {"model": "llama-3-8b", "gpu": "a100-80gb", "tp": 1}}
    sim = {"manifest": {"config": cfg, "profile": {"name": "cpu_tiny-llama_tp1", "source": str(tmp_path / "tiny.json")}}}
    live = {"manifest": {"config": cfg, "live_model": str(tmp_path / "models" / "tiny-llama")}}
    assert _what_ran(sim)["model"] == _what_ran(live)["model"] == "tiny-llama"
    # a manifest that records the profile's model is read as is (the profile file need not exist)
    recorded = {"manifest": {"config": cfg, "profile": {"name": "x", "source": str(tmp_path / "gone.json"),
                                                         "model": "tiny-llama"}}}
    assert _what_ran(recorded)["model"] == "tiny-llama"
    # an old manifest whose profile file is gone falls back to the config's model
    gone = {"manifest": {"config": cfg, "profile": {"name": "x", "source": str(tmp_path / "gone.json")}}}
    assert _what_ran(gone)["model"] == "llama-3-8b"

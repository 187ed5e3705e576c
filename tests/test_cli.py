"""The command line end to end: default simulate, bad input, sweep (resumable), policies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from agentsim.metrics import CALL_COLUMNS, ENGINE_COLUMNS, PROGRAM_COLUMNS, check_schema


def agentsim(*args, cwd=None, timeout=600):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "agentsim", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def test_default_simulate_end_to_end(tmp_path):
    """The README's main job: embedded defaults (1 node x 4 A100, 8B TP1, 200 ReAct agents, 10 min)."""
    out = tmp_path / "run"
    p = agentsim("simulate", "-o", out)
    assert p.returncode == 0, p.stderr
    for word in ("TTFT", "TPOT", "program latency", "prefix-cache hit rate", "preemptions", "throughput"):
        assert word in p.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["workload"]["agents"] == 200 and manifest["config"]["duration"] == 600
    assert manifest["seed"] == 0 and manifest["versions"]["simpy"] and manifest["profile"]["name"]
    calls = pd.read_parquet(out / "calls.parquet")
    check_schema(calls, CALL_COLUMNS, "calls")
    check_schema(pd.read_parquet(out / "programs.parquet"), PROGRAM_COLUMNS, "programs")
    engines = pd.read_parquet(out / "engines.parquet")
    check_schema(engines, ENGINE_COLUMNS, "engines")
    assert sorted(engines["engine_id"].unique()) == [0, 1, 2, 3]
    assert calls["program_kind"].eq("react").all() and (calls["status"] == "finished").mean() > 0.95
    summary = json.loads((out / "summary.json").read_text())
    assert summary["output_throughput"] > 0 and 0 < summary["prefix_hit_rate"] < 1


BAD = [
    (["--policy", "nope"], "policy"),
    (["--model", "gpt-9"], "cluster.model"),
    (["--gpu", "tpu-v9"], "cluster.gpu"),
    (["--tp", "3", "--gpus-per-node", "2"], "cluster.tp"),
    (["--agents", "0"], "workload.agents"),
]


@pytest.mark.parametrize("args,field", BAD)
def test_bad_flags_one_line_exit_2_no_output(tmp_path, args, field):
    out = tmp_path / "run"
    p = agentsim("simulate", "--duration", "5", "-o", out, *args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in p.stderr
    assert not out.exists() and not list(tmp_path.glob(".run*"))


@pytest.mark.parametrize("toml,field", [
    ("duration = [", "malformed TOML"),
    ("[cluster]\nengines_per_node = 0\n", "cluster.engines_per_node"),
    ("[cluster]\nbogus = 1\n", "cluster.bogus"),
    ("[cluster.engine]\nnum_gpu_blocks_override = 4\n", "cluster.engine"),   # a call longer than the KV cache
    ("[cluster.engine]\nmax_model_len = 64\n", "max_model_len"),            # a call longer than the context
    ('[workload]\ngenerator = "react"\nparams = { calls_mean = "x" }\n', "workload.params"),
])
def test_bad_config_one_line_exit_2_no_output(tmp_path, toml, field):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"duration = 20.0\n{toml}" if not toml.startswith("duration") else toml)
    out = tmp_path / "run"
    p = agentsim("simulate", "-c", cfg, "-o", out)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], p.stderr
    assert not out.exists() and not list(tmp_path.glob(".run*"))


def test_flags_override_config(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('duration = 5.0\nseed = 4\n[workload]\nagents = 3\n[cluster]\nnum_nodes = 2\ngpus_per_node = 1\n')
    out = tmp_path / "run"
    p = agentsim("simulate", "-c", cfg, "--agents", "5", "-o", out, "-q")
    assert p.returncode == 0, p.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["workload"]["agents"] == 5 and m["seed"] == 4 and m["config"]["cluster"]["num_nodes"] == 2
    assert pd.read_parquet(out / "calls.parquet")["node_id"].nunique() == 2


def test_sweep_runs_grid_in_parallel_and_resumes(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(textwrap.dedent(f"""
        [sweep]
        out = "{tmp_path / 'sw'}"
        [base]
        duration = 20.0
        [base.workload]
        agents = 8
        [grid]
        policy = ["vllm", "least-loaded"]
        seed = [0, 1]
    """))
    p = agentsim("sweep", spec, "-j", "2")
    assert p.returncode == 0, p.stderr
    table = pd.read_parquet(tmp_path / "sw" / "results.parquet")
    assert len(table) == 4 and set(table["policy"]) == {"vllm", "least-loaded"}
    assert table["output_throughput"].gt(0).all()
    cells = sorted((tmp_path / "sw" / "cells").iterdir())
    assert len(cells) == 4
    # an interrupted sweep: one cell lost; the rerun redoes only that one
    import shutil

    mtimes = {c.name: (c / "summary.json").stat().st_mtime_ns for c in cells}
    shutil.rmtree(cells[0])
    p = agentsim("sweep", spec, "-j", "1")
    assert p.returncode == 0, p.stderr
    assert "resuming: 3 of 4" in p.stderr
    for c in cells[1:]:
        assert (c / "summary.json").stat().st_mtime_ns == mtimes[c.name]
    again = pd.read_parquet(tmp_path / "sw" / "results.parquet")
    pd.testing.assert_frame_equal(table, again)


def test_sweep_bad_grid_key(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('[grid]\n"cluster.nodez" = [1, 2]\n')
    p = agentsim("sweep", spec, "-o", tmp_path / "sw")
    assert p.returncode == 2 and "cluster.nodez" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "sw").exists()


def test_policies_lists_components_with_defaults():
    p = agentsim("policies")
    assert p.returncode == 0
    for name in ("round-robin", "least-loaded", "fcfs", "lru", "fixed", "vllm"):
        assert name in p.stdout
    assert "metric='calls'" in p.stdout


@pytest.mark.slow
def test_sweep_cells_run_as_ray_tasks_on_a_local_cluster(tmp_path):
    """`agentsim sweep --ray ADDRESS` on a real 2-node Ray cluster (loopback) gives the local results."""
    pytest.importorskip("ray", reason="ray is part of the test install ('.[test,cpu]')")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray.cluster_utils import Cluster

    common = dict(num_cpus=1, object_store_memory=80 * 2**20, node_ip_address="127.0.0.1")
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=dict(common, include_dashboard=False))
    try:
        cluster.add_node(**common)
        cluster.wait_for_nodes()
        spec = tmp_path / "s.toml"
        spec.write_text(textwrap.dedent("""
            [base]
            duration = 15.0
            [base.workload]
            agents = 6
            [grid]
            policy = ["vllm", "least-loaded"]
        """))
        p = agentsim("sweep", spec, "-o", tmp_path / "ray", "--ray", cluster.address, timeout=300)
        assert p.returncode == 0, p.stderr
        q = agentsim("sweep", spec, "-o", tmp_path / "local", "-j", "1")
        assert q.returncode == 0, q.stderr
    finally:
        cluster.shutdown()
    via_ray = pd.read_parquet(tmp_path / "ray" / "results.parquet")
    local = pd.read_parquet(tmp_path / "local" / "results.parquet")
    assert len(via_ray) == 2
    pd.testing.assert_frame_equal(via_ray, local)  # same seeds, same results, wherever the cells ran

"""The live driver on real components: vLLM's CPU backend with a tiny random Llama, in engine actors
on a 2-node local Ray cluster bound to loopback.

One module-scoped cluster holds three engines: engines 0 and 1 (one per node) for ReAct runs under
two policy bundles, and engine 2 (node 1) with one sequence slot, a small KV cache and the
agentsim scheduler hosting a dynamic order policy, for checking that vLLM really applies policies.
The engine-death test kills engine 1 and therefore runs last. Everything is shut down by handle.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from collections import defaultdict

import numpy as np
import pandas as pd
import psutil
import pytest

from agentsim import metrics as M
from agentsim.config import load_config
from agentsim.live.cluster import RayCluster
from agentsim.live.driver import LiveDriver, LiveOptions, RayEngineClient
from agentsim.live.engine import EngineSpec
from agentsim.live.tiny_model import make_tiny_llama
from agentsim.policies.base import PolicyBundle
from agentsim.policies.baseline import LRU, FixedTopology, RoundRobin
from agentsim.policies.registry import make_bundle
from agentsim.traces.source import ProgramSource
from agentsim.workload import Context, Program, ProgramContext

pytestmark = pytest.mark.slow

BS = 32
POLICY_MODULE = "agentsim_live_test_policies"
POLICY_SOURCE = textwrap.dedent('''
    """A dynamic order policy for the live tests (registered in the driver and in the engine core)."""
    from agentsim.policies.registry import register


    @register("order", "test-longest-first")
    class LongestFirst:
        """Most prompt tokens first; re-ranked every step (dynamic)."""

        dynamic = True
        preemptive = False

        def key(self, call, now):
            return (-call.num_prompt_tokens, call.arrival_at)
''')

REACT = {"calls_mean": 3.0, "max_calls": 5, "output_tokens_mean": 40.0,
         "tools": [{"name": "api", "dist": "constant", "median": 0.15}]}


def react_cfg(policy: str, agents: int = 4, num_programs: int = 8, seed: int = 3, **params):
    return load_config(None, {
        "seed": seed, "duration": 60.0, "policy": policy,
        "cluster.num_nodes": 2, "cluster.gpus_per_node": 1, "cluster.engine.block_size": BS,
        "workload.agents": agents, "workload.num_programs": num_programs, "workload.params": {**REACT, **params},
    })


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("policies")
    (d / f"{POLICY_MODULE}.py").write_text(POLICY_SOURCE)
    sys.path.insert(0, str(d))
    __import__(POLICY_MODULE)
    yield d
    sys.path.remove(str(d))


@pytest.fixture(scope="module")
def live(tmp_path_factory, policy_dir):
    model = str(make_tiny_llama(tmp_path_factory.mktemp("model") / "tiny", max_position_embeddings=16384))
    cluster = RayCluster.local(2, object_store_mb=80)
    pids: list[int] = []
    try:
        common = dict(model=model, run_tag="pytest", block_size=BS, kv_cache_gib=1.0)
        specs = [
            EngineSpec(engine_id=0, node_id=0, max_model_len=4096, max_num_seqs=8, **common),
            EngineSpec(engine_id=1, node_id=1, max_model_len=4096, max_num_seqs=8, **common),
            EngineSpec(engine_id=2, node_id=1, max_model_len=2048, max_num_seqs=1, num_gpu_blocks_override=96,
                       scheduler={"policy": {"name": "vllm", "order": "test-longest-first"},
                                  "force_free_queue": True, "imports": [POLICY_MODULE]},
                       env={"PYTHONPATH": str(policy_dir)}, **common),
        ]
        handles = cluster.start_engines([s.to_dict() for s in specs])
        pids = [p for h in handles for p in h.pids]
        yield cluster, handles
    finally:
        cluster.shutdown()
    still = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not still, f"engine processes outlived the cluster: {still}"


def _read_back(out):
    r = M.read_results(out)
    M.check_schema(r["calls"], M.CALL_COLUMNS, "calls")
    M.check_schema(r["programs"], M.PROGRAM_COLUMNS, "programs")
    M.check_schema(r["engines"], M.ENGINE_COLUMNS, "engines")
    return r


def _calls_per_program(calls: pd.DataFrame) -> dict:
    out = defaultdict(list)
    for r in calls.sort_values(["program_id", "arrival_at"]).itertuples():
        out[r.program_id].append((r.num_prompt_tokens, r.num_output_tokens))
    return dict(out)


def test_react_under_vllm_bundle(live, tmp_path):
    cluster, handles = live
    cfg = react_cfg("vllm")
    driver = LiveDriver([RayEngineClient(h) for h in handles[:2]], make_bundle(cfg.policy), block_size=BS,
                        options=LiveOptions(duration=cfg.duration, flush_interval=1.0), out_dir=tmp_path / "run",
                        seed=cfg.seed, max_num_seqs=8)
    res = driver.run(ProgramSource(cfg.workload, cfg.seed))
    r = _read_back(tmp_path / "run")
    calls, progs = r["calls"], r["programs"]
    assert r["manifest"]["complete"] is True and r["manifest"]["backend"] == "live"
    assert len(progs) == 8 and (progs["status"] == "finished").all()
    assert (calls["status"] == "finished").all() and len(calls) == progs["num_calls"].sum()
    # outputs were forced to the requested length
    assert (calls["num_generated_tokens"] == calls["num_output_tokens"]).all()
    # round-robin alternates over the two engines
    counts = calls["engine_id"].value_counts()
    assert set(counts.index) == {0, 1} and abs(counts[0] - counts[1]) <= 1
    # engine-side timestamps, mapped to the run clock, are ordered (allowing clock-offset error)
    eps = 0.005
    assert (calls["scheduled_at"] >= calls["arrival_at"] - eps).all()
    assert (calls["first_token_at"] >= calls["scheduled_at"] - eps).all()
    assert (calls["finish_at"] >= calls["first_token_at"]).all()
    assert (calls["ttft"] <= calls["e2e"]).all() and r["summary"]["prefix_hit_rate"] > 0.3
    assert len(r["engines"]) >= 2 and set(r["engines"]["engine_id"]) == {0, 1}
    # the same programs as the simulator generates for this config, call for call
    from agentsim.sim.runner import run as simulate

    sim = simulate(cfg)
    assert _calls_per_program(calls) == _calls_per_program(sim.calls)
    assert res.summary["num_programs"] == sim.summary["num_programs"] == 8
    # one throughput definition for sim and live: count / measured makespan (a drained run ends
    # with its last program, not at the configured duration)
    s = r["summary"]
    assert s["duration_s"] == pytest.approx(r["manifest"]["wall_time_s"], abs=0.5) and s["duration_s"] < cfg.duration
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration_s"])


def test_react_under_least_loaded_sees_kv_events(live, tmp_path):
    cluster, handles = live
    cfg = react_cfg("least-loaded", seed=4)
    driver = LiveDriver([RayEngineClient(h) for h in handles[:2]], make_bundle(cfg.policy), block_size=BS,
                        options=LiveOptions(duration=cfg.duration, flush_interval=0), out_dir=tmp_path / "run",
                        seed=cfg.seed, max_num_seqs=8)
    res = driver.run(ProgramSource(cfg.workload, cfg.seed))
    r = _read_back(tmp_path / "run")
    calls = r["calls"]
    assert (r["programs"]["status"] == "finished").all() and len(r["programs"]) == 8
    assert r["manifest"]["policy"] == "least-loaded"
    # KV events reached the driver and the routing view reflects them: the shared tool-schema system
    # prompt is cached on every engine that served a call (1 GiB of KV: nothing was evicted)
    from agentsim.traces.generators import make_generator

    gen = make_generator("react", cfg.workload.params)
    sys_tokens = int(round(gen.initial_prompt_tokens * gen.system_share))
    sys_hashes = Context.of(ProgramContext.shared(gen.system_prompt, sys_tokens)).block_hashes(BS)
    assert len(sys_hashes) >= 5
    for v in res.views:
        if v.engine_id in set(calls["engine_id"]):
            assert v.num_events > 0 and len(v.cached) > 0
            assert v.num_cached_prefix_blocks(sys_hashes) == len(sys_hashes)
    # the next call's prompt carries the tokens vLLM generated: on the same engine it hits the cache
    # past the previous prompt, up to the last full block of prompt + output (the final token's KV is never computed)
    pairs = 0
    for _, g in calls.sort_values("arrival_at").groupby("program_id"):
        rows = list(g.itertuples())
        for a, b in zip(rows, rows[1:]):
            if a.engine_id == b.engine_id:
                pairs += 1
                assert b.num_cached_tokens >= (a.num_prompt_tokens + a.num_generated_tokens - 1) // BS * BS
                assert b.num_cached_tokens > a.num_prompt_tokens // BS * BS
    assert pairs >= 1


def _single_call_program(pid: int, arrival: float, prompt_tokens: int, output_tokens: int) -> Program:
    def body(pc: ProgramContext):
        yield pc.llm(Context.of(pc.segment(prompt_tokens)), output_tokens)

    return Program(pid, pid, "single", arrival, body, seed=0)


def test_priority_policy_is_applied_by_vllm_and_logged_by_the_engine_scheduler(live):
    cluster, handles = live
    eng = handles[2]
    order = __import__(POLICY_MODULE).LongestFirst()
    bundle = PolicyBundle("longest-first", RoundRobin(), order, LRU(), FixedTopology())
    lengths = [300, 900, 150, 600, 450, 750]
    progs = [_single_call_program(0, 0.0, 64, 200)]  # occupies the engine's only sequence slot
    progs += [_single_call_program(i + 1, 0.15, n, 8) for i, n in enumerate(lengths)]
    driver = LiveDriver([RayEngineClient(eng)], bundle, block_size=BS, options=LiveOptions(duration=30, flush_interval=0),
                        max_num_seqs=1)
    res = driver.run(progs)
    calls = res.calls[res.calls["program_id"] > 0]
    assert (calls["status"] == "finished").all() and len(calls) == 6
    # vLLM's own per-request timings: served strictly by the policy's order, not by arrival
    served = calls.sort_values("scheduled_at")["num_prompt_tokens"].tolist()
    assert served == sorted(lengths, reverse=True)
    assert (calls["queue_time"] > 0.05).all()  # they really waited for the slot
    # the engine-side scheduler hosted the same policy object type and logged its decisions
    import ray

    recs = ray.get(eng.actor.scheduler_records.remote())
    init = [x for x in recs if x["ev"] == "init"]
    assert init and init[0]["dynamic"] is True and init[0]["free_queue"] == "LRU"
    assert any(x["ev"] == "rerank" for x in recs)
    admitted = [cid for x in recs if x["ev"] == "admit" for cid in x["call_ids"]]
    expected = calls.sort_values("scheduled_at")["call_id"].tolist()
    assert [c for c in admitted if c in set(expected)][-6:] == expected
    # 96 blocks cannot keep every prompt: the policy's free queue chose victims, vLLM reported them
    assert any(x["ev"] == "evict" for x in recs)
    assert res.views[0].num_removed > 0


def test_partial_results_are_marked_incomplete(live, tmp_path):
    cluster, handles = live
    cfg = react_cfg("vllm", agents=4, num_programs=40, seed=5,
                    tools=[{"name": "slow", "dist": "constant", "median": 1.0}])
    out = tmp_path / "run"
    driver = LiveDriver([RayEngineClient(h) for h in handles[:2]], make_bundle(cfg.policy), block_size=BS,
                        options=LiveOptions(duration=60, flush_interval=0.5), out_dir=out, seed=cfg.seed, max_num_seqs=8)

    async def interrupt():
        task = asyncio.create_task(driver.arun(ProgramSource(cfg.workload, cfg.seed)))
        await asyncio.sleep(2.5)
        mid = json.loads((out / "manifest.json").read_text())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return mid

    mid = asyncio.run(interrupt())
    assert mid["complete"] is False and mid["status"] == "running"
    r = _read_back(out)
    assert r["manifest"]["complete"] is False and r["manifest"]["status"] == "interrupted"
    assert r["summary"]["incomplete"] == 1.0
    assert (r["programs"]["status"] == "unfinished").any()
    assert set(r["programs"]["status"]) <= {"finished", "unfinished"}
    assert not list(tmp_path.glob(".run.tmp-*"))  # no half-written directory left behind


def test_engine_death_retries_calls_elsewhere(live, tmp_path):
    """Runs last in this module: it kills engine 1."""
    cluster, handles = live
    cfg = react_cfg("vllm", agents=6, num_programs=12, seed=6, output_tokens_mean=80.0)
    victim = handles[1]
    driver = LiveDriver([RayEngineClient(h) for h in handles[:2]], make_bundle(cfg.policy), block_size=BS,
                        options=LiveOptions(duration=60, flush_interval=1.0, kill_engines=((1, 0.8),)),
                        out_dir=tmp_path / "run", seed=cfg.seed, max_num_seqs=8,
                        on_kill=lambda eid: cluster.kill_engine(victim))
    driver.run(ProgramSource(cfg.workload, cfg.seed))
    r = _read_back(tmp_path / "run")
    calls, progs, man = r["calls"], r["programs"], r["manifest"]
    assert len(progs) == 12 and (progs["status"] == "finished").all()
    assert man["complete"] is True and [f["engine_id"] for f in man["engine_failures"]] == [1]
    assert man["engine_kills"][0]["inflight"] >= 1
    retried = calls[calls["num_retries"] > 0]
    assert len(retried) >= 1 and r["summary"]["num_retries"] == retried["num_retries"].sum()
    assert (retried["engine_id"] == 0).all() and (retried["status"] == "finished").all()
    # after the death every call went to the surviving engine
    died_at = man["engine_failures"][0]["at"]
    assert (calls.loc[calls["arrival_at"] > died_at + 0.01, "engine_id"] == 0).all()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in victim.pids)
    assert np.isfinite(r["summary"]["p99_program_latency_s"])

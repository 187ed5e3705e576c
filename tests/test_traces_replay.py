"""Replay: ``load_programs`` contract, exact DAG execution, and trace replays in the simulator."""

from __future__ import annotations

import gzip
import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import simpy

from agentsim.config import load_config
from agentsim.errors import ConfigError
from agentsim.traces.importers import get_importer, load_trace
from agentsim.traces.replay import TRACE_SEG_BASE, load_programs
from agentsim.traces.stats import inspect_programs
from agentsim.workload import CallResult, LLMCall, Parallel, ProgramContext, Segment, ToolCall

DATA = Path(__file__).resolve().parents[1] / "traces" / "data"
MOONCAKE = DATA / "mooncake" / "conversation_first600s.jsonl.gz"
TAU2 = DATA / "tau2-bench" / "gpt-4.1_airline_1trial.json.gz"
TRACELAB_ROUNDS = DATA / "tracelab" / "sanitized_round_trace.jsonl"


def _native(tmp_path: Path, programs: list[dict]) -> Path:
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in programs))
    return p


def _llm(out_id: int, n_out: int, parents: list[int], segs=((1, 64),)) -> dict:
    return {"kind": "llm", "segments": [list(s) for s in segs], "output_tokens": n_out, "output_seg_id": out_id,
            "parents": parents}


def _tool(name: str, t: float, parents: list[int]) -> dict:
    return {"kind": "tool", "tool_name": name, "tool_time": t, "parents": parents}


# --------------------------------------------------------------------------- load_programs contract
def test_programs_sorted_renumbered_limited_and_scaled(tmp_path):
    path = _native(tmp_path, [
        {"arrival_at": 5.0, "key": "c", "steps": [_llm(1, 3, [])]},
        {"arrival_at": 1.0, "key": "a", "steps": [_llm(2, 3, [])]},
        {"arrival_at": 5.0, "key": "d", "steps": [_llm(3, 3, [])]},
        {"arrival_at": 2.0, "key": "b", "steps": [_llm(4, 3, [])]},
    ])
    progs = load_programs(path, time_scale=2.0)
    assert [p.program_id for p in progs] == [0, 1, 2, 3]
    assert [p.meta["trace_key"] for p in progs] == ["a", "b", "c", "d"]  # ties keep file order
    assert [p.arrival_at for p in progs] == [0.0, 2.0, 8.0, 8.0]  # relative to the first program
    assert all(callable(p.body) for p in progs)
    assert [p.meta["trace_key"] for p in load_programs(path, limit=2)] == ["a", "b"]
    with pytest.raises(ConfigError, match="workload.time_scale"):
        load_programs(path, time_scale=0)
    with pytest.raises(ConfigError, match="workload.limit"):
        load_programs(path, limit=0)


def test_negative_offsets_are_shifted(tmp_path):
    path = _native(tmp_path, [{"arrival_at": -3.0, "steps": [_llm(1, 3, [])]},
                              {"arrival_at": 1.0, "steps": [_llm(2, 3, [])]}])
    assert [p.arrival_at for p in load_programs(path)] == [0.0, 4.0]


# --------------------------------------------------------------------------- exact DAG execution
def _run(body, seed=0):
    """Run a program body on a tiny SimPy driver: an LLM call takes output_tokens seconds."""
    env = simpy.Environment()
    log = []

    def drive(gen):
        value = None
        while True:
            try:
                req = gen.send(value)
            except StopIteration as stop:
                return stop.value
            if isinstance(req, LLMCall):
                start = env.now
                yield env.timeout(req.num_output_tokens)
                log.append(("llm", req.output_seg_id & ~TRACE_SEG_BASE, start, env.now, req))
                value = CallResult(0, Segment(req.output_seg_id, req.num_output_tokens), start, start, env.now, 0)
            elif isinstance(req, ToolCall):
                start = env.now
                yield env.timeout(req.duration)
                log.append(("tool", req.name, start, env.now, req))
                value = None
            else:
                assert isinstance(req, Parallel)
                procs = [env.process(drive(b if inspect.isgenerator(b) else iter([b]))) for b in req.branches]
                yield env.all_of(procs)
                value = [p.value for p in procs]

    pc = ProgramContext(0, 0, "x", np.random.default_rng(seed))
    env.process(drive(body(pc)))
    env.run()
    return log, env.now


def test_dag_runs_exactly_without_false_dependencies(tmp_path):
    # Steps: 0 root LLM -> tools 1, 2 in parallel; 3 waits for 1 only; 4 waits for 2 and 3 (a join that
    # is not series-parallel: level-by-level execution would make 3 wait for 2 as well).
    steps = [
        _llm(10, 1, []),            # 0: 0..1
        _tool("fast", 1.0, [0]),    # 1: 1..2
        _tool("slow", 5.0, [0]),    # 2: 1..6
        _llm(13, 2, [1]),           # 3: 2..4 (must not wait for the slow tool)
        _llm(14, 1, [2, 3]),        # 4: 6..7
        _tool("fast", 3.0, [3]),    # 5: 4..7
    ]
    path = _native(tmp_path, [{"arrival_at": 0.0, "steps": steps}, {"arrival_at": 0.0, "steps": [_llm(1, 1, [])]}])
    (prog, _) = load_programs(path)
    log, end = _run(prog.body)
    times = {(k, x): (s, e) for k, x, s, e, _ in log if k == "llm"}
    assert times[("llm", 10)] == (0, 1)
    assert times[("llm", 13)] == (2, 4)
    assert times[("llm", 14)] == (6, 7)
    assert sorted((x, s, e) for k, x, s, e, _ in log if k == "tool") == [("fast", 1, 2.0), ("fast", 4, 7.0),
                                                                           ("slow", 1, 6.0)]
    assert end == 7 and len(log) == 6
    # hints: the root call says which tool follows, with that tool name's mean over the trace
    root = next(r for k, x, _, _, r in log if k == "llm" and x == 10)
    assert root.hints.tool_after == "fast" and root.hints.tool_time_estimate == pytest.approx(2.0)
    assert root.hints.next_invocation_distance == 5.0
    tool = next(r for k, x, _, _, r in log if k == "tool" and x == "slow")
    assert tool.estimate == 5.0


def test_replayed_prompts_carry_the_trace_content():
    trace = load_trace(TRACELAB_ROUNDS)
    progs = load_programs(TRACELAB_ROUNDS)
    by_key = {p.key: p for p in trace.programs}
    for prog in progs:
        rec = by_key[prog.meta["trace_key"]]
        log, end = _run(prog.body)
        calls = [r for k, _, _, _, r in log if k == "llm"]
        want = [s for s in rec.steps if s.kind == "llm"]
        assert len(calls) == len(want)
        for c, s in zip(calls, want):
            segs = c.context.all_segments()
            assert [x.seg_id for x in segs] == [TRACE_SEG_BASE | i for i in s.seg_ids]
            assert [x.num_tokens for x in segs] == list(s.seg_tokens) and c.num_output_tokens == s.output_tokens
        # parallel tools: the session lasts the LLM time plus, per round, its longest tool (and think time)
        tools = sum(max((x.tool_time for x in rec.steps if x.kind == "tool" and x.tool_name != "human"
                         and x.parents == (s.step_id,)), default=0) for s in want)
        humans = sum(x.tool_time for x in rec.steps if x.tool_name == "human")
        assert end == pytest.approx(sum(s.output_tokens for s in want) + tools + humans)


# --------------------------------------------------------------------------- replay in the simulator
def _sim(path, **over):
    from agentsim.sim.runner import run

    trace = load_trace(path)
    total = sum(s.input_tokens + s.output_tokens for p in trace.programs for s in p.steps if s.kind == "llm")
    cfg = {
        "cluster.num_nodes": 1, "cluster.gpus_per_node": 1,
        "workload.arrival": "trace", "workload.trace": str(path),
        "cluster.engine.max_model_len": 131072,
        # room for every token of every call even with no sharing at all: nothing is ever evicted
        "cluster.engine.num_gpu_blocks_override": math.ceil(total / 16) + trace.num_steps,
        "sim.drain": True,
    }
    cfg.update(over)
    return run(load_config(None, cfg))


def test_mooncake_replay_hit_rate_matches_trace_reuse():
    """One engine, a KV cache that holds everything: the simulated prefix-cache hit rate is the
    trace's prefix reuse, less two costs the trace's count does not see.

    - Block granularity: vLLM caches whole 16-token blocks and always computes a prompt's last
      token, so a call can be served at most min(16 floor(h / 16), 16 floor((n - 1) / 16)) of its
      h reusable tokens (computed here independently from the hash_ids).
    - Concurrency: blocks hit only once computed, so a call scheduled in the same engine step as
      the call that first computes a shared prefix recomputes it. In this trace sharing is mostly
      between turns minutes apart, so this costs only requests of the same 3 s bucket that share
      their first block (the second request of the trace, 512 tokens).

    Tolerance: the simulated rate is at most the block-aligned bound and within 0.001 (absolute)
    of the trace's reuse (0.2889).
    """
    seen: set[int] = set()
    served = aligned = total = 0
    with gzip.open(MOONCAKE, "rt") as f:
        for line in f:
            r = json.loads(line)
            k = 0
            for h in r["hash_ids"]:
                if h not in seen:
                    break
                k += 1
            n = r["input_length"]
            hit = min(512 * k, n)
            served += hit
            aligned += min(16 * (hit // 16), 16 * ((n - 1) // 16))
            total += n
            seen.update(r["hash_ids"])
    reuse = served / total
    res = _sim(MOONCAKE, duration=700.0)
    s = res.summary
    assert s["num_calls"] == 1750 and s["num_preemptions"] == 0
    sim_hit = s["prefix_hit_rate"]
    assert sim_hit <= aligned / total + 1e-12
    assert abs(sim_hit - reuse) < 0.001, (sim_hit, reuse)
    # the per-call view: calls are exactly the trace's requests
    calls = res.calls.sort_values("program_id")
    assert calls["num_prompt_tokens"].sum() == total


def test_tau2_replay_runs_every_step():
    """The two-LLM agent programs replay in full; the hit rate is close to the unbounded-cache reuse
    (the tail of each prompt that does not fill a 16-token block is recomputed by the next turn;
    concurrent sessions starting together share the system prompts only once computed)."""
    trace = load_trace(TAU2)
    imp = get_importer(TAU2)
    reuse = inspect_programs(imp.programs())["prefix_reuse"]
    res = _sim(TAU2, duration=200.0)
    progs = res.programs
    assert len(progs) == 20 and progs["num_calls"].sum() == 342 and progs["num_tool_calls"].sum() == 148
    want = sorted(sum(s.kind == "llm" for s in p.steps) for p in trace.programs)
    assert sorted(progs["num_calls"]) == want
    assert res.calls["num_prompt_tokens"].sum() == sum(s.input_tokens for p in trace.programs for s in p.steps)
    assert reuse - 0.005 < res.summary["prefix_hit_rate"] <= reuse

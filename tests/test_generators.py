"""Generators: over many seeded samples, calls per program and token lengths match their parameters.

Programs are recorded without a backend (:mod:`agentsim.traces.record`), which steps a body and
answers every request at once. Sample means are compared with ``assert_mean``: within 3 % of the
parameter, or 4 standard errors when the sample cannot resolve 3 % (the test then also requires
4 standard errors to stay under 6 %, so every check resolves "a few percent").
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import pytest

from agentsim.errors import ConfigError
from agentsim.traces.generators import make_generator
from agentsim.traces.record import generate_programs, record_body
from agentsim.traces.shapes import (TEAM_TOPOLOGIES, Team, capped_geometric_pmf, geometric_mean_for)
from agentsim.traces.source import program_rng
from agentsim.workload import ProgramContext


def assert_mean(values, target: float, rel: float = 0.03) -> float:
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0
    assert 4 * se <= 0.06 * abs(target), f"sample too small: 4 SE = {4 * se:.3g} for target {target}"
    tol = max(rel * abs(target), 4 * se)
    assert abs(mean - target) <= tol, f"mean {mean:.4g} vs {target:.4g} (tolerance {tol:.3g})"
    return mean


def record(name: str, n: int, params: dict | None = None, seed: int = 1):
    _, progs = generate_programs(name, params, n, seed=seed)
    return list(progs)


def llm_steps(p):
    return [s for s in p.steps if s.kind == "llm"]


def capped_geometric_mean(mean: float, cap: int) -> float:
    return float(capped_geometric_pmf(mean, cap) @ np.arange(1, cap + 1))


def new_tokens(p):
    """Per LLM call after the first of the same agent: prompt tokens beyond the previous prompt + output."""
    last, out = {}, []
    for s in llm_steps(p):
        prev = last.get(s.agent_id)
        if prev is not None:
            out.append(s.input_tokens - prev.input_tokens - prev.output_tokens)
        last[s.agent_id] = s
    return out


# --------------------------------------------------------------------------- the lead's three shapes
def test_react_bfcl_means():
    progs = record("react", 12000)
    g = make_generator("react")
    assert capped_geometric_mean(g.calls_mean, g.max_calls) == pytest.approx(10.75, rel=0.002)
    assert_mean([len(llm_steps(p)) for p in progs], 10.75)
    calls = [s for p in progs for s in llm_steps(p)]
    assert_mean([s.input_tokens for s in calls], 735)
    assert_mean([s.output_tokens for s in calls], 34)
    # every call but the last is followed by one tool
    assert all(sum(s.kind == "tool" for s in p.steps) == len(llm_steps(p)) - 1 for p in progs)


def test_chat_sharegpt_means():
    progs = record("chat", 12000)
    assert_mean([len(llm_steps(p)) for p in progs], 6.66)
    calls = [s for p in progs for s in llm_steps(p)]
    assert_mean([s.output_tokens for s in calls], 277)
    # new user tokens per turn: the first prompt after the 64-token system prompt, then the growth
    user = [llm_steps(p)[0].input_tokens - 64 for p in progs] + [x for p in progs for x in new_tokens(p)]
    assert_mean(user, 256)
    think = [s.tool_time for p in progs for s in p.steps if s.kind == "tool"]
    assert np.median(think) == pytest.approx(20.0, rel=0.05)


def test_fanout_structure_and_means():
    progs = record("fanout", 3000)
    assert all(len(llm_steps(p)) == 6 for p in progs)
    plan = [p.steps[0].output_tokens for p in progs]
    workers = [s.output_tokens for p in progs for s in p.steps[1:5]]
    reduce = [p.steps[5] for p in progs]
    assert_mean(plan, 128)
    assert_mean(workers, 256)
    assert_mean([s.output_tokens for s in reduce], 256)
    assert all(s.parents == (1, 2, 3, 4) for s in reduce)


# --------------------------------------------------------------------------- LATS
def test_lats_means_and_parallel_expansion():
    g = make_generator("lats")
    pmf = capped_geometric_pmf(g.iterations_mean, g.max_iterations)
    assert 2 * g.width * float(pmf @ np.arange(1, g.max_iterations + 1)) == pytest.approx(159.7, rel=1e-6)
    # the iteration count the body draws, over a large sample
    from agentsim.traces.generators import sample_calls

    rng = np.random.default_rng(0)
    iters = [sample_calls(rng, g.iterations_mean, g.max_iterations) for _ in range(200_000)]
    assert_mean(np.multiply(iters, 2 * g.width), 159.7, rel=0.01)
    progs = record("lats", 800)
    for p in progs:
        n = len(llm_steps(p))
        assert n % (2 * g.width) == 0 and sum(s.kind == "tool" for s in p.steps) == n // 2
    for p in progs[:100]:
        # every iteration: width threads of action -> tool -> value, all started together
        roots = Counter(s.parents for s in p.steps if s.kind == "llm" and '"expand"' in s.hints)
        assert set(roots.values()) == {g.width}
    calls = [s for p in progs for s in llm_steps(p)]
    assert_mean([s.input_tokens for s in calls], 467)
    assert_mean([s.output_tokens for s in calls], 73)


# --------------------------------------------------------------------------- map-reduce, KVFlow
def test_mapreduce_calls_and_lengths():
    progs = record("mapreduce", 2000)
    assert all(len(llm_steps(p)) == 9 for p in progs)
    maps = [s for p in progs for s in p.steps if '"map"' in s.hints]
    reduces = [s for p in progs for s in p.steps if '"reduce"' in s.hints]
    assert len(maps) == 8 * len(progs) and len(reduces) == len(progs)
    assert_mean([s.input_tokens for s in maps], 128 + 1024)
    assert_mean([s.output_tokens for s in maps], 128)
    assert_mean([s.output_tokens for s in reduces], 256)
    assert all(s.seg_ids[1:] == tuple(m.output_seg_id for m in p.steps[:8]) for p in progs for s in p.steps[8:])
    tree = record("mapreduce", 50, {"fan_in": 3})
    assert make_generator("mapreduce", {"fan_in": 3}).reduce_calls() == 4  # 8 -> 3 -> 1
    assert all(len(llm_steps(p)) == 12 for p in tree)


def test_kvflow_workflow_is_exact():
    progs = record("kvflow", 20)
    for p in progs:
        calls = llm_steps(p)
        assert len(calls) == 10 and {s.input_tokens for s in calls} == {8224} and {s.output_tokens for s in calls} == {32}
        assert [s.parents for s in calls] == [()] + [(i,) for i in range(9)]
        assert len({s.agent_id for s in calls}) == 10
        assert all('"fixed_prefix_tokens": 8192' in s.hints and '"next_invocation_steps": 10' in s.hints for s in calls)
    # the fixed prompts belong to the client (the closed-loop agent slot): same slot, same content
    from agentsim.traces.generators import make_generator as mk

    g = mk("kvflow")

    def fixed_ids(pid, agent):
        pc = ProgramContext(pid, agent, "kvflow", program_rng(0, pid))
        return [s.seg_ids[0] for s in record_body(g.body, pc)]

    assert fixed_ids(1, 7) == fixed_ids(2, 7) != fixed_ids(3, 8)
    cyc = record("kvflow", 3, {"cycles": 3, "num_agents": 4, "fixed_tokens": 512, "dynamic_tokens": 256,
                               "output_tokens": 256})
    assert all(len(llm_steps(p)) == 12 for p in cyc)


# --------------------------------------------------------------------------- ScaleSim society
def test_society_sparse_activation_and_exact_distances():
    progs = record("society", 30)
    g = make_generator("society")
    assert_mean([len(llm_steps(p)) for p in progs], g.num_agents * g.num_steps * g.active_rate)
    calls = [s for p in progs for s in llm_steps(p)]
    assert_mean([s.output_tokens for s in calls], 64)
    import json

    for p in progs[:10]:
        by_agent = defaultdict(list)
        for s in llm_steps(p):
            h = json.loads(s.hints)
            by_agent[s.agent_id].append((int(h["stage"][4:]), h.get("next_invocation_steps")))
        assert len(by_agent) <= g.num_agents
        for seq in by_agent.values():
            for (t, d), (t2, _) in zip(seq, seq[1:]):
                assert d == t2 - t  # the hinted distance is exactly when the agent runs next
            assert seq[-1][1] is None
        # world ticks between steps
        assert sum(s.tool_name == "world" for s in p.steps) == g.num_steps - 1
    # observations: the growth of an agent's prompt beyond its last prompt + output (before compaction)
    obs = [x for p in progs for x in new_tokens(p) if x > 0]
    assert_mean(obs, 128)


# --------------------------------------------------------------------------- SWE-agent
def test_swe_agent_loop_means():
    progs = record("swe", 4000)
    g = make_generator("swe")
    assert capped_geometric_mean(g.draw_mean, g.max_calls) == pytest.approx(30.0, rel=1e-6)
    assert_mean([len(llm_steps(p)) for p in progs], 30.0, rel=0.04)
    calls = [s for p in progs for s in llm_steps(p)]
    assert_mean([s.output_tokens for s in calls], 250)
    assert_mean([llm_steps(p)[0].input_tokens - 4000 for p in progs], 1000)
    assert_mean([x for p in progs for x in new_tokens(p)], 700)
    assert max(s.input_tokens for s in calls) <= g.max_context_tokens
    assert_mean([s.input_tokens for s in calls], np.mean([s.input_tokens for s in calls]))  # finite, sane
    assert np.mean([s.input_tokens for s in calls]) > 20_000  # a long, growing context


# --------------------------------------------------------------------------- teams
def _team_programs(topology: str, n: int, gen: Team | None = None):
    gen = gen or make_generator("team")
    out = []
    for pid in range(n):
        pc = ProgramContext(pid, pid, "team", program_rng(0, pid))
        task = gen.task(pc.rng)
        steps = record_body(lambda pc, task=task: gen.team_body(pc, task, topology), pc)
        out.append((task, steps))
    return gen, out


@pytest.mark.parametrize("topology", TEAM_TOPOLOGIES)
def test_team_topologies_call_counts_and_lengths(topology):
    gen, runs = _team_programs(topology, 1500)
    for task, steps in runs:
        assert sum(s.kind == "llm" for s in steps) == gen.expected_calls(task, topology)
    import json

    stage = lambda s: json.loads(s.hints)["stage"]  # noqa: E731
    nodes = [s for _, steps in runs for s in steps if stage(s) == "node"]
    synth = [s for _, steps in runs for s in steps if stage(s) != "node"]
    if topology != "debate":
        assert len(nodes) == sum(t.num_nodes for t, _ in runs)
        assert_mean([s.output_tokens for s in nodes], 256)
        assert_mean([s.seg_tokens[-1] for s in nodes], 256)  # the node's own instruction ends its prompt
    if synth:
        assert_mean([s.output_tokens for s in synth], 256)
    # each node sees exactly its DAG predecessors' outputs (hybrid, hierarchical), or none (parallel)
    from agentsim.workload import stable_id

    if topology in ("hybrid", "hierarchical", "parallel"):
        for pid, (task, steps) in enumerate(runs[:200]):
            node = {stable_id("agent", pid, f"node{v}"): v for v in range(task.num_nodes)}
            step_of = {node[s.agent_id]: s for s in steps if stage(s) == "node"}
            outputs = {s.output_seg_id: v for v, s in step_of.items()}
            for v, s in step_of.items():
                seen = {outputs[x] for x in s.seg_ids if x in outputs}
                want = {u for u, w in task.edges if w == v} if topology != "parallel" else set()
                assert seen == want


def test_team_tasks_cover_every_adaptorch_branch():
    gen = make_generator("team")
    rng = np.random.default_rng(7)
    branch = Counter()
    for _ in range(4000):
        t = gen.task(rng)
        omega, n = t.width(), t.num_nodes
        if not t.edges:
            branch["parallel(no edges)"] += 1
        elif omega == 1:
            branch["sequential"] += 1
        elif t.coupling > 0.6 and n > 5:
            branch["hierarchical"] += 1
        elif omega / n > 0.5 and t.coupling <= 0.6:
            branch["parallel(wide)"] += 1
        else:
            branch["hybrid"] += 1
        assert t.depth() == len(Team.levels(t)) and len(t.node_prompt_tokens) == n
    assert set(branch) == {"parallel(no edges)", "sequential", "hierarchical", "parallel(wide)", "hybrid"}
    assert min(branch.values()) >= 0.03 * 4000, branch


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", ["lats", "mapreduce", "society", "fanout", "team"])
def test_content_does_not_depend_on_branch_order(name):
    params = {"society": {"num_steps": 5}, "fanout": {"worker_calls": 3}}.get(name)
    gen = make_generator(name, params)
    body = gen.body

    def content(reverse: bool):
        out = []
        for pid in range(5):
            pc = ProgramContext(pid, pid, name, program_rng(3, pid))
            steps = record_body(body, pc, reverse_branches=reverse)
            out.append(sorted((s.kind, s.agent_id, s.seg_ids, s.seg_tokens, s.output_tokens, s.output_seg_id,
                               s.tool_name, s.tool_time) for s in steps))
        return out

    assert content(False) == content(True)


def test_same_seed_same_programs():
    a = record("team", 20, seed=4)
    b = record("team", 20, seed=4)
    c = record("team", 20, seed=5)
    assert a == b and a != c


@pytest.mark.parametrize("name,params,match", [
    ("lats", {"calls_mean": 5}, "calls_mean must be between"),
    ("lats", {"prompt_tokens_mean": 50}, "prompt_tokens_mean is too small"),
    ("team", {"default_topology": "star"}, "default_topology"),
    ("society", {"active_rate": 0}, "active_rate"),
    ("kvflow", {"fixed_scope": "user"}, "fixed_scope"),
    ("mapreduce", {"fan_in": 1}, "fan_in"),
])
def test_bad_parameters_name_the_field(name, params, match):
    with pytest.raises(ConfigError, match=match):
        make_generator(name, params)


def test_geometric_solver():
    for target, cap in ((15.97, 100), (3.0, 10), (1.0, 5)):
        assert capped_geometric_mean(geometric_mean_for(target, cap), cap) == pytest.approx(target, rel=1e-6)


# --------------------------------------------------------------------------- the simulator runs the same programs
SIM_PARAMS = {"society": {"num_agents": 20, "num_steps": 10}}


@pytest.mark.parametrize("name", ["lats", "mapreduce", "kvflow", "society", "swe", "team", "react", "chat", "fanout"])
def test_simulator_runs_exactly_the_recorded_programs(name):
    """Same generator, params and seed: every simulated program makes the recorded calls and tools."""
    from agentsim.config import load_config
    from agentsim.sim.runner import run

    params = SIM_PARAMS.get(name, {})
    cfg = load_config(None, {
        "cluster.num_nodes": 1, "cluster.gpus_per_node": 1, "workload.generator": name, "workload.params": params,
        "workload.arrival": "poisson", "workload.rate": 0.5, "workload.num_programs": 6, "duration": 60.0,
        "sim.drain": True, "seed": 11, "cluster.engine.max_model_len": 131072})
    sim = run(cfg).programs.set_index("program_id").sort_index()
    _, progs = generate_programs(name, params, 6, rate=0.5, seed=11)
    progs = list(progs)
    assert len(sim) == 6
    for p in progs:
        row = sim.loc[p.program_id]
        llm = llm_steps(p)
        assert row.arrival_at == pytest.approx(p.arrival_at)
        assert (row.num_calls, row.num_tool_calls, row.num_prompt_tokens, row.num_output_tokens) == (
            len(llm), len(p.steps) - len(llm), sum(s.input_tokens for s in llm), sum(s.output_tokens for s in llm))

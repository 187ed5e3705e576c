"""Behaviour that defines each policy, on small hand-checked scenarios run on the real engine model.

Most scenarios use a constant 10 ms step (``conftest.constant_profile``): a call with P <= budget
prompt tokens and O output tokens then runs exactly O steps (one prefill step that samples the first
token, O - 1 decode steps), so every time below can be worked out by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import pytest

from agentsim.calibration.roofline import roofline_profile
from agentsim.config import load_config
from agentsim.policies.base import CallView
from agentsim.sim.runner import Simulation
from agentsim.traces.generators import register_generator
from agentsim.workload import CallHints, Context, Parallel, ToolCall

from conftest import constant_profile

STEP = 0.01


# --------------------------------------------------------------------------- scripted programs
@register_generator("test-script")
@dataclass(frozen=True)
class Script:
    """Program i runs ``programs[i % len(programs)]``, a list of steps:

    - ``["tool", seconds]`` (named ``"t"``, or ``["tool", seconds, name]``);
    - ``["llm", new_tokens, output_tokens]``: the context grows by the previous output and
      ``new_tokens`` fresh private tokens; hints name the following tool and its exact duration;
    - ``["par", [steps...], [steps...], ...]``: branches on the current context, in parallel.
    ``shared_tokens``: every program's context starts with this shared system prompt.
    """

    programs: tuple = ()
    shared_tokens: int = 0

    def body(self, pc):
        steps = self.programs[pc.program_id % len(self.programs)]
        ctx = Context.of(pc.shared("test-script-system", self.shared_tokens)) if self.shared_tokens else None
        ctx = yield from self._run(pc, steps, ctx, 0)

    def _run(self, pc, steps, ctx, thread):
        prev = None
        for i, st in enumerate(steps):
            kind = st[0]
            if kind == "tool":
                yield ToolCall(st[2] if len(st) > 2 else "t", float(st[1]), estimate=float(st[1]))
            elif kind == "llm":
                new = pc.segment(int(st[1]))
                if ctx is None:
                    ctx = Context.of(new)
                else:
                    ctx = ctx.extend(*(s for s in (prev, new) if s is not None))
                nxt = steps[i + 1] if i + 1 < len(steps) else None
                hints = CallHints()
                if nxt is not None and nxt[0] == "tool":
                    hints = CallHints(tool_after=nxt[2] if len(nxt) > 2 else "t", tool_time_estimate=float(nxt[1]),
                                      next_invocation_distance=float(nxt[1]))
                result = yield pc.llm(ctx, int(st[2]), thread_id=thread, hints=hints)
                prev = result.output
            elif kind == "par":
                base = ctx.extend(prev) if prev is not None else ctx
                branches = [self._run(pc, b, base, pc.new_thread()) for b in st[1:]]
                outs = yield Parallel(branches)
                ctx, prev = base, None
                for o in outs:
                    if o is not None:
                        ctx = ctx.extend(o)
            else:
                raise ValueError(st)
        return prev


def scripted(programs, policy, *, blocks=None, max_num_seqs=256, engines=1, shared_tokens=0, step=STEP,
             profile=None, **over):
    """A Simulation of ``programs`` (one closed-loop agent each, program i started at t=0)."""
    eng = {"max_num_seqs": max_num_seqs}
    if blocks is not None:
        eng["num_gpu_blocks_override"] = blocks
    cfg = load_config(None, {
        "cluster.num_nodes": 1, "cluster.gpus_per_node": engines, "cluster.engine": eng,
        "workload.generator": "test-script", "workload.arrival": "closed", "workload.agents": len(programs),
        "workload.num_programs": len(programs),
        "workload.params": {"programs": programs, "shared_tokens": shared_tokens},
        "policy": policy, "sim.drain": True, "duration": 1000.0, **over})
    return Simulation(cfg, profile=profile or constant_profile(step))


def calls_of(result, program_id):
    c = result.calls
    return c[c["program_id"] == program_id].sort_values("call_id").reset_index(drop=True)


# --------------------------------------------------------------------------- program priority
def plas_race(policy):
    """A has run nine calls (0.9 s of service) and is back with its tenth call at 1.25 s; C has held
    the engine since 1.0 s with one long call; B's first call arrives at 1.5 s."""
    a = [["llm", 16, 10]] * 9 + [["tool", 0.35], ["llm", 16, 10]]
    c = [["tool", 1.0], ["llm", 16, 100]]
    b = [["tool", 1.5], ["llm", 16, 10]]
    sim = scripted([a, c, b], policy, max_num_seqs=1)
    levels = {}
    order = sim.bundle.order
    if hasattr(order, "calls"):
        sim._hooks["on_call_arrive"].append(lambda call, now: levels.__setitem__(call.call_id, order.calls[call.call_id].level))
    return sim.run(), levels


def test_plas_runs_a_new_programs_first_call_ahead_of_a_long_programs_tenth_call():
    params = {"order": {"q1": 0.2}}   # queues [0, .2) [.2, .6) [.6, 1.4) ...
    r, levels = plas_race({"name": "autellix-plas", "params": params})
    a10 = calls_of(r, 0).iloc[9]
    b1 = calls_of(r, 2).iloc[0]
    c1 = calls_of(r, 1).iloc[0]
    assert a10["arrival_at"] == pytest.approx(1.25) and b1["arrival_at"] == pytest.approx(1.5)
    # A's nine calls gave its program 0.9 s of service: its tenth call enters queue 2 (0.6 <= 0.9 < 1.4)
    assert levels[int(a10["call_id"])] == 2 and levels[int(b1["call_id"])] == 0
    assert b1["scheduled_at"] < a10["scheduled_at"]
    # B's level-0 call preempted C (demoted to queue 1 after its first 0.2 s), which then ran before A
    assert b1["scheduled_at"] == pytest.approx(1.5, abs=STEP + 1e-9)
    assert c1["num_preemptions"] == 1 and c1["finish_at"] <= a10["scheduled_at"]
    # FCFS serves A's tenth call (it arrived first) before B's, after C ran to its end
    f, _ = plas_race("vllm")
    fa10, fb1, fc1 = calls_of(f, 0).iloc[9], calls_of(f, 2).iloc[0], calls_of(f, 1).iloc[0]
    assert fc1["finish_at"] <= fa10["scheduled_at"] < fb1["scheduled_at"]


def starvation(beta):
    low = [["llm", 16, 30], ["tool", 0.05], ["llm", 16, 10]]   # 0.3 s of service, back at 0.35 s
    stream = [[["tool", 0.305 + 0.1 * j], ["llm", 16, 10]] for j in range(20)]  # busy 0.305 .. 2.305
    sim = scripted([low] + stream, {"name": "autellix-plas", "params": {"order": {"q1": 0.1, "beta": beta}}},
                   max_num_seqs=1)
    return sim.run(), sim.bundle.order


def test_anti_starvation_promotes_a_call_once_wait_over_service_reaches_beta():
    r, order = starvation(beta=2.0)
    low2 = calls_of(r, 0).iloc[1]
    assert low2["arrival_at"] == pytest.approx(0.35)
    # program service 0.3 s (queue 2 of [0,.1) [.1,.3) [.3,.7)), no earlier wait: promoted when its
    # wait reaches 2 x 0.3 = 0.6 s, i.e. at 0.95 s; it then preempts the running stream call at the
    # next step boundary (0.305 + k x 10 ms)
    assert order.num_promotions >= 1
    assert 0.95 - 1e-9 <= low2["scheduled_at"] <= 0.96 + 1e-9
    never, _ = starvation(beta=None)
    # without it, the call only slips into the engine in the instant between two stream calls
    # at the very end of the stream (a same-instant arrival joins one step later)
    assert calls_of(never, 0).iloc[1]["scheduled_at"] > 2.0


def waves(policy):
    """A plan call (10 steps), a wave of 4 parallel calls (10 steps each), a second wave of 4."""
    wave = [[["llm", 16, 10]] for _ in range(4)]
    prog = [["llm", 16, 10], ["par", *wave], ["par", *wave]]
    sim = scripted([prog], {"name": "autellix-plas", "order": policy, "params": {"order": {"q1": 0.05}}},
                   max_num_seqs=1)
    base = {}
    order = sim.bundle.order
    sim._hooks["on_call_arrive"].append(
        lambda call, now: base.__setitem__(call.call_id, (order.calls[call.call_id].base_service,
                                                          order.calls[call.call_id].level)))
    r = sim.run()
    return r, base


def test_atlas_gives_one_programs_parallel_calls_one_priority():
    r, base = waves("atlas")
    ids = calls_of(r, 0)["call_id"].tolist()
    plan, w1, w2 = ids[0], ids[1:5], ids[5:9]
    s = 10 * STEP
    # every call of a wave inherits the program's one scalar: wave 1 the plan's 0.1 s, wave 2 the
    # critical path plan + one wave-1 call (0.2 s), not the sum of the wave's service
    assert len({base[c] for c in w1}) == 1 and base[w1[0]][0] == pytest.approx(s)
    assert len({base[c] for c in w2}) == 1 and base[w2[0]][0] == pytest.approx(2 * s)
    # PLAS adds up all the program's service: wave 2 enters at plan + 4 wave-1 calls
    rp, bp = waves("plas")
    idp = calls_of(rp, 0)["call_id"].tolist()
    assert bp[idp[5]][0] == pytest.approx(5 * s) and bp[idp[5]][1] > base[w2[0]][1]


def test_sjf_oracle_runs_the_program_with_less_remaining_work_first():
    # both programs' first calls wait behind a blocker; the short program (1 call) arrives last
    blocker = [["llm", 16, 50]]
    long_prog = [["tool", 0.1], ["llm", 16, 10], ["llm", 16, 10], ["llm", 16, 10], ["llm", 16, 10]]
    short_prog = [["tool", 0.2], ["llm", 16, 10]]
    sjf = {"name": "sjf-oracle", "params": {"order": {"preemptive": False}}}  # admission order only
    sim = scripted([blocker, long_prog, short_prog], sjf, max_num_seqs=1)
    r = sim.run()
    assert calls_of(r, 2).iloc[0]["scheduled_at"] < calls_of(r, 1).iloc[0]["scheduled_at"]
    f = scripted([blocker, long_prog, short_prog], "vllm", max_num_seqs=1).run()
    assert calls_of(f, 2).iloc[0]["scheduled_at"] > calls_of(f, 1).iloc[0]["scheduled_at"]


def test_program_plan_lists_the_calls_a_program_makes():
    from agentsim.policies.oracle import plan_body
    from agentsim.traces.generators import make_generator
    from agentsim.traces.source import program_rng
    from agentsim.workload import ProgramContext

    for name in ("react", "lats", "mapreduce", "chat"):
        gen = make_generator(name)
        plan = plan_body(gen.body(ProgramContext(7, 7, name, program_rng(0, 7))))
        cfg = load_config(None, {"workload.generator": name, "workload.num_programs": 1, "workload.arrival": "closed",
                                 "workload.agents": 1, "sim.drain": True, "cluster.gpus_per_node": 1})
        # program 0 of a run with the same seed as program 0 planned here
        plan0 = plan_body(gen.body(ProgramContext(0, 0, name, program_rng(0, 0))))
        r = Simulation(cfg, profile=constant_profile(STEP)).run()
        assert len(plan0.calls) == len(r.calls)
        assert sorted(c.num_prompt_tokens for c in plan0.calls) == sorted(r.calls["num_prompt_tokens"].tolist())
        assert sum(c.num_output_tokens for c in plan0.calls) == r.calls["num_output_tokens"].sum()
        assert len(plan.calls) >= 1


def test_kairos_learns_that_a_kind_runs_long():
    from agentsim.policies.priority import ShortestRemainingWorkflow

    pol = ShortestRemainingWorkflow(prompt_weight=0.0)

    class C:
        def __init__(self, cid, pid, kind, out):
            self.call_id, self.program_id, self.program_kind = cid, pid, kind
            self.num_prompt_tokens, self.num_output_tokens = 100, out

    cid = 0
    for pid, (kind, outs) in enumerate([("long", [10] * 5), ("short", [10])]):
        pol.on_program_start(pid, pid, kind, 0.0)
        for o in outs:
            pol.key(C(cid, pid, kind, o), 0.0)
            cid += 1
        pol.on_program_end(pid, 1.0)
    pol.on_program_start(10, 10, "long", 2.0)
    pol.on_program_start(11, 11, "short", 2.0)
    # a new 'long' program's first call expects 50 tokens of work left, a 'short' one 10
    assert pol.key(C(100, 10, "long", 10), 2.0) == 50
    assert pol.key(C(101, 11, "short", 10), 2.0) == 10


# --------------------------------------------------------------------------- fast-forward equality
LL = "least-loaded"  # a route that reads no KV state, so fast-forward windows really run


@pytest.mark.parametrize("policy", [
    "autellix-plas", "autellix-atlas", "mlfq", "sjf-oracle", "kairos", "hexgen", "prefix-affinity", "llm-d",
    {"name": "continuum", "route": LL}, {"name": "continuum-static", "route": LL}, {"name": "tokencake", "route": LL},
    {"name": "hicache", "route": LL}, "scalesim", "kvflow"], ids=str)
def test_policies_keep_fast_forward_identical_to_step_by_step(policy):
    # drain: the run ends when the last program does (no step is cut off by the run's end)
    base = {"duration": 60.0, "seed": 5, "policy": policy, "cluster.gpus_per_node": 2, "sim.drain": True,
            "cluster.engine": {"num_gpu_blocks_override": 900}, "workload.agents": 24,
            "workload.mix": [{"generator": "react"},
                             {"generator": "chat", "params": {"think_time_median": 2.0, "max_calls": 8}},
                             {"generator": "fanout"}]}
    on = Simulation(load_config(None, {**base, "sim.fast_forward": True})).run()
    off = Simulation(load_config(None, {**base, "sim.fast_forward": False})).run()
    assert on.stats["num_steps"] == off.stats["num_steps"]
    for name in ("calls", "programs", "engines"):
        pd.testing.assert_frame_equal(getattr(on, name), getattr(off, name), check_exact=True)
    assert on.summary["num_preemptions"] > 0 or "continuum" in str(policy)
    if isinstance(policy, dict):
        assert on.stats["num_ff_windows"] > 0   # the KV mechanisms ran alongside real windows


# --------------------------------------------------------------------------- invocation distance
class EvictionSpy:
    """Wraps an engine's free-block queue: records every eviction of a cached block and which
    agents still had cached free blocks right after it."""

    def __init__(self, inner):
        self.inner = inner
        self.events = []
        self.free: dict[int, int] = {}   # agent -> cached free blocks in the queue

    def __len__(self):
        return len(self.inner)

    def append(self, block, now):
        self.inner.append(block, now)
        if block.block_hash is not None:
            self.free[block.agent_id] = self.free.get(block.agent_id, 0) + 1

    def remove(self, block):
        self.inner.remove(block)
        if block.block_hash is not None:
            self.free[block.agent_id] -= 1

    def pop(self, now):
        b = self.inner.pop(now)
        if b.block_hash is not None:
            self.free[b.agent_id] -= 1
            self.events.append((now, b.agent_id, {a for a, n in self.free.items() if n > 0}))
        return b

    def __getattr__(self, name):
        return getattr(self.inner, name)


def tool_loop(d, e):
    return [["llm", 160, 16], ["tool", d], ["llm", 16, 16], ["tool", e], ["llm", 16, 16]]


AGENTS = [tool_loop(0.9, 0.4), tool_loop(0.3, 1.2), tool_loop(0.6, 0.2), tool_loop(1.5, 0.7),
          tool_loop(0.45, 0.95), tool_loop(1.1, 0.25)]


def next_use(calls, agent, t):
    """When the agent next needs its KV after ``t``: now if a call of it is in flight, else its
    next call's arrival (inf if none)."""
    mine = calls[calls["agent_id"] == agent]
    if ((mine["arrival_at"] <= t) & (mine["finish_at"] > t)).any():
        return t
    later = mine.loc[mine["arrival_at"] > t, "arrival_at"]
    return later.min() if len(later) else math.inf


def evictions(evict, params):
    sim = scripted(AGENTS, {"name": "vllm", "evict": evict, "params": {"evict": params}}, blocks=40, max_num_seqs=3)
    pool = sim.engines[0].pool
    pool.free_queue = spy = EvictionSpy(pool.free_queue)
    r = sim.run()
    return r, spy.events


def wrong_evictions(calls, events):
    bad = 0
    for t, victim, kept in events:
        v = next_use(calls, victim, t)
        bad += any(next_use(calls, k, t) > v for k in kept)
    return bad


def test_invocation_distance_never_evicts_a_block_needed_sooner_than_one_it_keeps():
    # exact (oracle) distances, no bucketing: 1 ms units, a hold level for every unit
    exact = {"cpu_tier": False, "unit": 0.001, "hold_levels": 1_000_000}
    r, events = evictions("invocation-distance", exact)
    assert (r.calls["status"] == "finished").all() and len(events) > 20
    assert wrong_evictions(r.calls, events) == 0
    # LRU on the same script does evict blocks that are needed sooner than ones it keeps
    lr, lru_events = evictions("lru", {})
    assert wrong_evictions(lr.calls, lru_events) > 0
    # and the agent whose next call is farthest away is the one that loses its blocks first:
    # its next use is the latest among all agents that had free blocks
    for t, victim, kept in events:
        assert next_use(r.calls, victim, t) >= max(next_use(r.calls, a, t) for a in kept | {victim})


def test_invocation_distance_levels_and_buckets():
    from agentsim.policies.distance import InvocationDistance

    pol = InvocationDistance(hold_levels=4, unit=1.0, cpu_tier=False)

    class C:
        def __init__(self, cid, agent, d):
            self.call_id, self.agent_id, self.hints = cid, agent, CallHints(next_invocation_distance=d)

    for i, d in enumerate([0.5, 1.5, 2.5, 3.2, 9.0, None]):
        c = C(i, i, d)
        pol.on_call_arrive(c, 0.0)
        pol.on_call_finish(c, 0.0)
    # D = ceil(gap / unit) - 1: due within 1 s -> 0; hold priority min(H + 1, D); unknown -> H + 1
    assert [pol.level(a, 0.0) for a in range(6)] == [0, 1, 2, 3, 5, 5]
    assert [pol.level(a, 1.0) for a in range(6)] == [0, 0, 1, 2, 5, 5]
    assert pol.prefetch_candidates(0.0) == [0, 1, 2]          # D <= look-ahead 2, nearest first
    assert pol.prefetch_due_at(3, 0.0) == pytest.approx(0.2)  # 3.2 s away enters D <= 2 at 0.2 s


def prefetching(prefetch):
    params = {"unit": 0.05, "look_ahead": 2, "prefetch": prefetch, "pcie_GBps": 2.0}
    sim = scripted(AGENTS, {"name": "vllm", "evict": "invocation-distance", "params": {"evict": params}},
                   blocks=40, max_num_seqs=3, profile=roofline_profile())
    r = sim.run()
    return r, sim.engines[0].tiers


def test_invocation_distance_prefetches_agents_within_look_ahead():
    r, tiers = prefetching(True)
    pre = [e for e in tiers.log if e[0] == "prefetch"]
    assert pre, "no prefetch happened"
    for _, t, agent, (n, level, done) in pre:
        assert level <= 2 and n > 0
        # the agent was not running, and its next call came after the prefetch started
        assert next_use(r.calls, agent, t) > t
    # loading ahead means fewer calls wait at arrival for their KV to load
    r0, tiers0 = prefetching(False)
    assert tiers.stats["held_calls"] < tiers0.stats["held_calls"]
    assert not [e for e in tiers0.log if e[0] == "prefetch"]


# --------------------------------------------------------------------------- KVFlow
def kvflow(evict, **params):
    cfg = load_config(None, {
        "cluster.num_nodes": 1, "cluster.gpus_per_node": 1, "workload.generator": "kvflow",
        "workload.params": {"num_agents": 10, "fixed_tokens": 1024, "dynamic_tokens": 32, "output_tokens": 32},
        "workload.arrival": "closed", "workload.agents": 1, "workload.num_programs": 4,
        # room for five agents' fixed prompts (64 blocks each) and a running call
        "cluster.engine": {"num_gpu_blocks_override": 5 * 64 + 8},
        "policy": {"name": "vllm", "evict": evict, "params": {"evict": params}}, "sim.drain": True})
    sim = Simulation(cfg)
    return sim.run(), sim


def test_kvflow_keeps_the_next_agents_fixed_prompts_where_lru_thrashes():
    later = lambda r: r.calls[r.calls["call_id"] >= 10]   # after the first pass of the workflow
    lru, _ = kvflow("lru")
    # a cyclic walk over 10 agents with room for 5: LRU always evicts the agent needed next
    assert (later(lru)["num_cached_tokens"] == 0).all()
    ste, _ = kvflow("steps-to-execution", cpu_tier=False)
    # steps-to-execution evicts the agent that just ran (10 steps away) and keeps the next four
    hits = later(ste)["num_cached_tokens"] >= 1024
    assert hits.mean() >= 0.35
    learned, _ = kvflow("steps-to-execution", cpu_tier=False, graph="learned")
    assert (later(learned)["num_cached_tokens"] >= 1024).mean() >= 0.35
    # with the CPU tier the next agent's prompt is prefetched while the current one runs
    cpu, sim = kvflow("steps-to-execution")
    assert (later(cpu)["num_cached_tokens"] >= 1024).mean() >= 0.9
    assert sim.engines[0].tiers.stats["prefetched_blocks"] > 0
    assert later(cpu)["e2e"].mean() < later(ste)["e2e"].mean() < later(lru)["e2e"].mean()


def test_kvflow_dynamic_suffix_blocks_go_first():
    from agentsim.policies.base import BlockView
    from agentsim.policies.distance import StepsToExecution

    pol = StepsToExecution(cpu_tier=False)
    q = pol.new_free_queue(0)
    q.block_size = 16

    class C:
        def __init__(self, cid, agent):
            self.call_id, self.agent_id, self.program_id = cid, agent, 0
            self.hints = CallHints(fixed_prefix_tokens=32, next_invocation_steps=3, stage=f"agent{agent}")

    for a in (1, 2):
        c = C(a, a)
        pol.on_call_arrive(c, 0.0)
        pol.on_call_finish(c, 0.0)
    blocks = [BlockView(10 * a + p, block_hash=1000 + 10 * a + p, agent_id=a, position=p) for a in (1, 2) for p in range(4)]
    for b in blocks:
        q.append(b, 0.0)
    order = [(b.agent_id, b.position) for b in (q.pop(0.0) for _ in range(8))]
    # positions >= 2 are both agents' dynamic suffixes: first, least recently freed first; then the
    # fixed prefixes, the agent with more steps to go first: agent 1 ran at step 0 and agent 2 at
    # step 1 of the workflow, each comes back 3 steps later; two steps have passed, so agent 1 is
    # 0 + 3 - 2 = 1 step away and agent 2 is 1 + 3 - 2 = 2
    assert order[:4] == [(1, 2), (1, 3), (2, 2), (2, 3)]
    assert order[4:] == [(2, 0), (2, 1), (1, 0), (1, 1)]
    assert (pol.level(1, 0.0), pol.level(2, 0.0)) == (1, 2)


def test_calls_whose_kv_is_loading_are_skipped():
    # A's prompt is evicted to the CPU tier by B's long context; at 2.0 s A comes back and must load
    # 1,024 tokens over a slow link, while C, arriving later, is served at once
    a = [["llm", 1024, 16], ["tool", 2.0], ["llm", 16, 16]]
    b = [["tool", 0.3], ["llm", 1600, 16]]
    c = [["tool", 2.3], ["llm", 64, 16]]   # A is back at ~2.27 s (its first call takes ~0.27 s)
    policy = {"name": "hicache", "route": "least-loaded", "params": {"evict": {"pcie_GBps": 0.5}}}
    sim = scripted([a, b, c], policy, blocks=110, profile=roofline_profile())
    r = sim.run()
    a2, c1 = calls_of(r, 0).iloc[1], calls_of(r, 2).iloc[0]
    assert c1["arrival_at"] > a2["arrival_at"] and c1["scheduled_at"] < a2["scheduled_at"]
    hold = [e for e in sim.engines[0].tiers.log if e[0] == "hold"]
    assert len(hold) == 1 and hold[0][2] == a2["call_id"]
    n_loaded, done = hold[0][3]
    # 2 MiB blocks at 0.5 GB/s: the load ends n x 4.19 ms later, and A is scheduled right after
    assert done - a2["arrival_at"] == pytest.approx(n_loaded * 16 * 131072 / 0.5e9, rel=0.05)
    assert done <= a2["scheduled_at"] < done + 0.05
    assert a2["num_cached_tokens"] >= 1024


# --------------------------------------------------------------------------- Continuum / Tokencake
def test_best_ttl_and_cold_start_rules():
    from agentsim.policies.retention import ContinuumTTL, _Durations, best_ttl

    # P(τ)·B − τ at τ = 1, 2, 3, 10 with B = 8: 2 − 1, 4 − 2, 6 − 3, 8 − 10 -> τ* = 3
    assert best_ttl([1, 2, 3, 10], 8.0) == 3.0
    assert best_ttl([1, 2, 3, 10], 4.0) == 0.0          # no τ beats not pinning (value 0)
    pol = ContinuumTTL(k=3, eta=1.0, t_default=2.0)
    pol.prefill_time = lambda n: 8.0                    # PrefillReload = 8 s, T = 0: benefit 8 s
    assert pol.calc_ttl("a", 100) == 2.0                # no samples yet: T_default
    for tool, d in [("a", 1), ("a", 2), ("a", 3), ("a", 10), ("b", 0.5)]:
        pol.by_tool.setdefault(tool, _Durations(100)).add(d)
        pol.all.add(d)
    assert pol.calc_ttl("a", 100) == 3.0                # 4 > k samples of a: a's own CDF
    # b has too few samples: the global CDF [0.5, 1, 2, 3, 10] -> 1.1, 2.2, 2.8, 3.4, -2 -> τ* = 3
    assert pol.calc_ttl("b", 100) == 3.0
    fixed = ContinuumTTL(ttl="fixed", t_default=2.0)
    fixed.by_tool["a"] = pol.by_tool["a"]              # mean 4 s > 2 s: the public code does not pin
    fixed.by_tool["b"] = pol.by_tool["b"]              # mean 0.5 s: pin for 2 s
    assert (fixed.calc_ttl("a", 1), fixed.calc_ttl("b", 1)) == (0.0, 2.0)


def continuum_run(policy, tool=1.0):
    p = [["llm", 256, 16], ["tool", tool], ["llm", 16, 16]]
    q1 = [["tool", 0.3], ["llm", 300, 20]]
    q2 = [["tool", 0.6], ["llm", 300, 20]]
    sim = scripted([p, q1, q2], policy, blocks=40)
    r = sim.run()
    return r, (sim.engines[0].tiers.log if sim.engines[0].tiers else [])


def test_continuum_pins_across_the_tool_call_and_releases_on_admission():
    r, log = continuum_run("continuum")
    p2 = calls_of(r, 0).iloc[1]
    # P's first call ends at 0.16 s with 271 computed tokens: 16 full blocks pinned for T_default = 2 s
    # (cold start: fewer than k = 100 tool samples); Q2's 20 blocks then come from Q1's, not P's
    assert log[0] == ("pin", pytest.approx(0.16), 0, (16, pytest.approx(2.16)))
    assert p2["num_cached_tokens"] == 256
    # admitted at 1.16 s (the tool took 1 s < TTL): the pin ends at the next step boundary
    unpins = [e for e in log if e[0] == "unpin"]
    assert unpins == [("unpin", pytest.approx(1.17), 0, "admitted")]
    lru, _ = continuum_run("vllm")
    assert calls_of(lru, 0).iloc[1]["num_cached_tokens"] == 0   # LRU evicted P's context for Q2


def test_continuum_pin_expires_when_the_tool_outlasts_the_ttl():
    r, log = continuum_run("continuum", tool=3.0)
    unpins = [e for e in log if e[0] == "unpin"]
    # TTL 2 s from 0.16 s; no request of P waiting then: released at 2.16 s exactly (a timer)
    assert unpins == [("unpin", pytest.approx(2.16), 0, "expired")]


def test_continuum_releases_the_latest_program_first_under_pressure():
    filler = [["llm", 16, 4]]                              # agent 0's first program; P_late follows it
    p_early = [["llm", 96, 16], ["tool", 1.0], ["llm", 16, 16]]
    q = [["tool", 0.4], ["llm", 480, 16]]                 # needs 30 blocks at admission
    p_late = [["llm", 96, 16], ["tool", 1.0], ["llm", 16, 16]]
    sim = scripted([filler, p_early, q, p_late], "continuum", blocks=40, **{"workload.agents": 3,
                                                                              "workload.num_programs": 4})
    r = sim.run()
    log = sim.engines[0].tiers.log
    assert calls_of(r, 3).iloc[0]["arrival_at"] == pytest.approx(0.04)   # P_late's program started later
    pins = [e for e in log if e[0] == "pin"]
    assert {e[2] for e in pins} == {1, 3} and all(e[3][0] == 6 for e in pins)
    # 40 blocks, 12 pinned: Q's 30 do not fit; the deadlock guard releases P_late (latest arrival) only
    pressure = [e for e in log if e[0] == "unpin" and e[3] == "pressure"]
    assert [e[2] for e in pressure] == [3]
    assert calls_of(r, 2).iloc[0]["scheduled_at"] == pytest.approx(0.4, abs=1e-9)
    assert calls_of(r, 1).iloc[1]["num_cached_tokens"] == 96   # P_early kept its KV


def test_tokencake_offloads_under_pressure_and_uploads_before_the_tool_returns():
    # A's call ends at 0.16 s and it starts a 2 s tool; B (arrived at 0.1 s) waits for room: with KV
    # usage above 0.3 and a call waiting, Tokencake moves A's KV to the host and B runs at once
    a = [["llm", 256, 16], ["tool", 2.0, "slow"], ["llm", 16, 16]]
    b = [["tool", 0.1], ["llm", 560, 16]]
    c = [["tool", 0.05], ["llm", 16, 200]]
    policy = {"name": "tokencake", "route": "least-loaded", "params": {"evict": {"pressure": 0.3}}}
    sim = scripted([a, b, c], policy, blocks=48)
    r = sim.run()
    log = sim.engines[0].tiers.log
    off = [e for e in log if e[0] == "offload"]
    assert len(off) == 1 and off[0][2] == 0
    n, copied_at, upload_at = off[0][3]
    # predicted tool time 2 s (the program's estimate; no "slow" tool seen yet), transfer n x 84 us
    xfer = n * 16 * 131072 / 25e9
    assert upload_at == pytest.approx(0.16 + 2.0 - xfer, abs=1e-6)
    assert calls_of(r, 1).iloc[0]["scheduled_at"] == pytest.approx(0.16)
    assert ("unpin", pytest.approx(0.16), 0, "offloaded") in log
    # B's 35 blocks pushed some of A's out; they come back over PCIe before A's tool returns
    ups = [e for e in log if e[0] == "upload"]
    assert len(ups) == 1 and ups[0][1] == pytest.approx(upload_at, abs=STEP + 1e-9)
    a2 = calls_of(r, 0).iloc[1]
    assert a2["num_cached_tokens"] == 256 and ups[0][3][1] <= a2["arrival_at"] + 1e-9


# --------------------------------------------------------------------------- topology
def dag(n, edges, coupling=0.3):
    from agentsim.traces.generators import TaskDAG

    return TaskDAG(num_nodes=n, edges=edges, coupling=coupling)


def test_adaptorch_rule_picks_each_topology():
    from agentsim.policies.topology import AdaptOrch, dag_features

    pol = AdaptOrch()
    cases = {
        "parallel (no edges)": (dag(4, []), "parallel"),
        "sequential (a chain: width 1)": (dag(4, [(0, 1), (1, 2), (2, 3)]), "sequential"),
        "hierarchical (6 > 5 nodes, coupling 0.8 > 0.6)": (dag(6, [(0, 2), (1, 3), (2, 4), (3, 5)], 0.8), "hierarchical"),
        "parallel (width 3 of 4 = 0.75 > 0.5, coupling 0.3)": (dag(4, [(0, 1)]), "parallel"),
        "hybrid (width 2 of 5 = 0.4)": (dag(5, [(0, 1), (0, 2), (1, 3), (2, 4)]), "hybrid"),
        "hybrid (coupled but small: 4 nodes)": (dag(4, [(0, 1), (0, 2), (1, 3)], 0.9), "hybrid"),
    }
    for name, (task, want) in cases.items():
        assert pol.shape(task, 0.0) == want, name
    f = dag_features(cases["hybrid (width 2 of 5 = 0.4)"][0])
    assert (f.width, f.depth, f.num_edges) == (2, 3, 4)
    # with depth_test="depth", θ_δ = 5 is compared with δ (3 here), not |V|
    assert AdaptOrch(depth_test="depth").shape(cases["hierarchical (6 > 5 nodes, coupling 0.8 > 0.6)"][0], 0) == "hybrid"


def test_adaptorch_runs_the_chosen_topology_and_charges_the_decomposer():
    from agentsim.policies.topology import dag_features
    from agentsim.traces.generators import make_generator
    from agentsim.traces.source import program_rng

    cfg = load_config(None, {"cluster.gpus_per_node": 1, "workload.generator": "team", "workload.arrival": "closed",
                             "workload.agents": 4, "workload.num_programs": 12, "policy": "adaptorch",
                             "sim.drain": True})
    sim = Simulation(cfg, profile=constant_profile(STEP))
    r = sim.run()
    team = make_generator("team")
    decisions = sim.bundle.shape.decisions
    assert len(decisions) == 12 and len({d[2] for d in decisions}) >= 2
    # each program: the topology's own calls plus one decomposer call (stage "decompose")
    for pid in range(12):
        task = team.task(program_rng(0, pid))
        topo = sim.bundle.shape.choose(dag_features(task))
        assert (r.calls["program_id"] == pid).sum() == team.expected_calls(task, topo) + 1
    fixed = Simulation(load_config(None, {"cluster.gpus_per_node": 1, "workload.generator": "team",
                                          "workload.arrival": "closed", "workload.agents": 4,
                                          "workload.num_programs": 12, "policy": "topology-sequential",
                                          "sim.drain": True}), profile=constant_profile(STEP)).run()
    for pid in range(12):
        task = team.task(program_rng(0, pid))
        assert (fixed.calls["program_id"] == pid).sum() == team.expected_calls(task, "sequential")


# --------------------------------------------------------------------------- routing
def affinity(fillers):
    # P: a 256-token system prompt shared with the fillers + private text; back after a 1 s tool
    p = [["llm", 64, 8], ["tool", 1.0], ["llm", 16, 8]]
    filler = [["tool", 0.3], ["llm", 16, 400]]            # long decodes keep them in the engine
    policy = {"name": "prefix-affinity", "params": {"route": {"balance_abs_threshold": 3}}}
    sim = scripted([p] + [filler] * fillers, policy, engines=2, shared_tokens=256)
    return sim.run()


def test_prefix_affinity_follows_the_prefix_unless_imbalanced():
    r = affinity(3)
    p = calls_of(r, 0)
    # the fillers share P's system prompt: they follow it to P's engine (3 vs 0 calls: |3-0| <= 3,
    # balanced), and so does P's follow-up call
    on_p = r.calls[(r.calls["program_id"] > 0)]["engine_id"]
    assert (on_p == p.iloc[0]["engine_id"]).all()
    assert p.iloc[1]["engine_id"] == p.iloc[0]["engine_id"]
    # a fourth filler makes P's engine hold 4 calls vs 0: 4 - 0 > 3 and 4 > 1.5 x 0 -> least-loaded
    r4 = affinity(4)
    p4 = calls_of(r4, 0)
    assert p4.iloc[1]["engine_id"] != p4.iloc[0]["engine_id"]
    # round-robin ignores the prefix altogether
    rr = scripted([[["llm", 64, 8], ["tool", 1.0], ["llm", 16, 8]]], "vllm", engines=2, shared_tokens=256).run()
    assert calls_of(rr, 0)["engine_id"].tolist() == [0, 1]


def test_autellix_lb_keeps_long_calls_on_the_programs_engine():
    p = [["llm", 3000, 8], ["tool", 0.5], ["llm", 16, 8]]   # the follow-up prompt is 3,024 tokens
    filler = [["tool", 0.3], ["llm", 16, 300]]
    runs = {pol: scripted([p, filler, filler, filler], pol, engines=2).run() for pol in ("autellix-plas", "least-loaded")}
    a = calls_of(runs["autellix-plas"], 0)
    assert a.iloc[1]["engine_id"] == a.iloc[0]["engine_id"]            # its engine, though busier
    f = runs["autellix-plas"].calls
    busy = f[(f["program_id"] > 0)]["engine_id"].value_counts()
    assert busy[a.iloc[0]["engine_id"]] == 2                            # 2 fillers vs 1 on the other
    ll = calls_of(runs["least-loaded"], 0)
    assert ll.iloc[1]["engine_id"] != ll.iloc[0]["engine_id"]


def test_weighted_scorer_and_hexgen_formulas():
    from agentsim.policies.routing import HexGenDispatch, WeightedScorer

    @dataclass
    class View:       # an EngineView snapshot
        engine_id: int
        num_waiting: int
        kv_usage: float
        cached: int
        block_size: int = 16
        num_running: int = 0
        num_outstanding_tokens: int = 0

        def num_cached_prefix_blocks(self, hashes):
            return min(self.cached, len(hashes))

    class Call:
        call_id, program_id, num_prompt_tokens, num_output_tokens = 1, 1, 160, 10

        def prompt_block_hashes(self, bs):
            return list(range(10))

    views = [View(0, 4, 0.9, 10), View(1, 0, 0.2, 0), View(2, 2, 0.5, 5)]
    # 2·queue + 2·(1 − kv) + 3·prefix: 2·0 + 0.2 + 3 = 3.2; 2 + 1.6 + 0 = 3.6; 1 + 1 + 1.5 = 3.5
    assert WeightedScorer().scores(Call(), views) == pytest.approx([3.2, 3.6, 3.5])
    assert WeightedScorer().route(Call(), views, 0.0) == 1
    assert WeightedScorer(prefix_weight=10).route(Call(), views, 0.0) == 0
    h = HexGenDispatch(alpha=0.0)
    picks = [h.route(Call(), views, 0.0) for _ in range(6)]
    assert picks == [0, 1, 2, 0, 1, 2]          # alpha = 0: pure work balance (ties: lowest index)
    fast = HexGenDispatch(alpha=0.9, speeds=[1.0, 3.0, 1.0])
    assert [fast.route(Call(), views, 0.0) for _ in range(3)] == [1, 1, 1]  # speed dominates


def test_scalesim_steps_distance_follows_the_simulation_clock():
    from agentsim.policies.distance import InvocationDistance

    pol = InvocationDistance(source="steps", hold_levels=4, look_ahead=2, cpu_tier=False)

    class C:
        def __init__(self, cid, agent, steps):
            self.call_id, self.agent_id, self.program_id = cid, agent, 7
            self.hints = CallHints(next_invocation_steps=steps)

    for a, d in enumerate([1, 2, 3, 6, None]):      # all called at step 0
        c = C(a, a, d)
        pol.on_call_arrive(c, 0.0)
        pol.on_call_finish(c, 0.0)
    # D = steps until the call - 1 (due at the next step: D = 0), capped at hold_levels + 1
    assert [pol.level(a, 0.0) for a in range(5)] == [0, 1, 2, 5, 5]
    assert pol.prefetch_candidates(0.0) == [0, 1, 2]
    pol.on_tool_end(7, -1, "world", 5.0)             # the simulation moves one step
    pol.on_tool_end(7, -1, "think", 5.0)             # other tools do not
    assert [pol.level(a, 5.0) for a in range(5)] == [0, 0, 1, 4, 5]
    assert pol.prefetch_candidates(5.0) == [0, 1, 2]


def test_every_registered_bundle_builds_and_bad_parameters_name_their_field():
    from agentsim.errors import ConfigError
    from agentsim.policies.registry import bundles, make_bundle

    names = [b.name for b in bundles()]
    for required in ("autellix-plas", "autellix-atlas", "mlfq", "sjf-oracle", "kairos", "scalesim", "kvflow",
                     "hicache", "continuum", "continuum-static", "tokencake", "prefix-affinity", "llm-d", "hexgen",
                     "adaptorch", "topology-debate"):
        assert required in names
    for name in names:
        make_bundle(name)
    with pytest.raises(ConfigError) as e:
        make_bundle({"name": "autellix-plas", "params": {"order": {"beta": -1}}})
    assert e.value.where == "policy.params.order" and "beta" in e.value.message
    with pytest.raises(ConfigError) as e:
        make_bundle({"name": "scalesim", "params": {"evict": {"hold_level": 3}}})
    assert e.value.where == "policy.params.evict.hold_level"
    with pytest.raises(ConfigError) as e:
        make_bundle({"name": "vllm", "evict": "steps-to-execution", "params": {"evict": {"graph": "psychic"}}})
    assert e.value.where == "policy.params.evict"


def test_policy_config_errors_exit_2_with_one_line(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "bad.toml"
    cfg.write_text('duration = 5.0\n[policy]\nname = "continuum"\n[policy.params.evict]\nttl = "forever"\n')
    r = subprocess.run([sys.executable, "-m", "agentsim", "simulate", "--config", str(cfg), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: policy.params.evict: continuum: ttl must be one of optimal, fixed, got 'forever'"]
    assert not (tmp_path / "out").exists()


def test_policy_report_sustainable_rate_and_success_table(tmp_path):
    import numpy as np

    from agentsim.errors import ConfigError
    from agentsim.experiments.policy_report import load_success, sustainable_rate

    rates = np.array([1.0, 2.0, 3.0])
    # crosses 0.2 between 2 (0.1) and 3 (0.4): log-linear -> 2 + ln(2)/ln(4) = 2.5
    assert sustainable_rate(rates, np.array([0.05, 0.1, 0.4]), 0.2) == (pytest.approx(2.5), False)
    assert sustainable_rate(rates, np.array([0.05, 0.1, 0.15]), 0.2) == (3.0, True)   # a lower bound
    assert math.isnan(sustainable_rate(rates, np.array([0.3, 0.4, 0.5]), 0.2)[0])
    good = tmp_path / "ok.toml"
    good.write_text("[success_rate]\nadaptorch = 0.5\n")
    assert load_success(str(good)) == {"adaptorch": 0.5}
    bad = tmp_path / "bad.toml"
    bad.write_text("[success_rate]\nadaptorch = 1.5\n")
    with pytest.raises(ConfigError) as e:
        load_success(str(bad))
    assert e.value.where.endswith("success_rate.adaptorch")

"""Distance-based eviction and prefetch (ScaleSim invocation distance, KVFlow steps-to-execution) and the
CPU tier's held calls."""

from __future__ import annotations

import math

import pytest

from agentsim.calibration.roofline import roofline_profile
from agentsim.config import load_config
from agentsim.sim.runner import Simulation
from agentsim.workload import CallHints

from policy_scripts import calls_of, scripted


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

    # the bulk forms the block pool uses when a queue has them: one block at a time through the spy
    def append_blocks(self, blocks, now):
        for b in blocks:
            self.append(b, now)

    def pop_blocks(self, n, now):
        return [self.pop(now) for _ in range(n)]

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


@pytest.mark.parametrize("graph", ["hints", "learned", {"agent1": ["agent0"], "agent2": ["agent1"], "agent0": ["agent2"]}])
def test_kvflow_prefetch_candidates_equal_a_scan_of_every_agent_after_each_event(graph):
    """Every engine asks for the prefetch candidates after each event, so the policy answers from a
    memo per table version (and, with hints, looks only at hinted agents): after any sequence of
    call, tool and program events the answer equals a scan of every agent ever seen, and the list it
    hands out can be changed without touching the memo."""
    import random

    from agentsim.policies.distance import StepsToExecution

    pol = StepsToExecution(graph=graph, look_ahead=2, cpu_tier=False)
    t = pol.table

    def scan() -> list[int]:
        out = sorted((s, a) for a in t.agent_client if a not in t.active
                     for s in [t.steps(a, 0.0)] if s is not None and s <= pol.look_ahead)
        return [a for _, a in out]

    class C:
        def __init__(self, cid, prog, agent, steps):
            self.call_id, self.program_id, self.agent_id = cid, prog, agent
            self.hints = CallHints(next_invocation_steps=steps, stage=f"agent{agent % 3}")

    rng = random.Random(5)
    inflight: list = []
    seen_nonempty = False
    for i in range(400):
        r = rng.random()
        if r < 0.45:
            prog = rng.randrange(4)
            c = C(i, prog, 3 * prog + rng.randrange(3), rng.choice([None, 1, 2, 3, 5]))
            pol.on_program_start(prog, prog, "kvflow", 0.0)
            pol.on_call_arrive(c, 0.0)
            inflight.append(c)
        elif inflight:
            pol.on_call_finish(inflight.pop(rng.randrange(len(inflight))), 0.0)
        got = pol.prefetch_candidates(0.0)
        assert got == scan()
        seen_nonempty |= bool(got)
        got.append(-1)   # the caller's copy
        assert pol.prefetch_candidates(0.0) == scan()
    assert seen_nonempty


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


def test_scalesim_prefetch_budget_admits_what_fits_and_stops_at_the_first_that_does_not():
    from agentsim.policies.distance import InvocationDistance, PrefetchBudget

    pol = InvocationDistance(hold_levels=4, unit=1.0)
    pol.on_distance_update({1: 0.5, 2: 2.5, 3: 0.5}, 0.0)   # levels: agent 1 -> 0, 2 -> 2, 3 -> 0
    # 2 never-used blocks; 3 evictable blocks at level 5, 4 at level 2, 6 at level 0
    plan = PrefetchBudget(pol, 2, [(5.0, 3), (2.0, 4), (0.0, 6)], 0.0)
    assert plan.admit(1, 4) == 0.0             # room 2 + 3 + 4: takes the 2 fresh, then 2 of level 5
    assert (plan.fresh, plan.hist) == (0, [(5.0, 1), (2.0, 4), (0.0, 6)])
    assert plan.admit(2, 2) is None and plan.stopped   # level 2 may only displace level 5 (1 block)
    fresh = PrefetchBudget(pol, 0, [(5.0, 1), (2.0, 4)], 0.0)
    assert fresh.admit(3, 5) == 0.0 and fresh.hist == [] and not fresh.stopped


@pytest.mark.parametrize("policy,over", [
    ("scalesim", {"workload.generator": "society", "workload.agents": 1, "workload.num_programs": 1,
                  "workload.params": {"num_agents": 60, "num_steps": 5}}),
    ("kvflow", {"workload.generator": "kvflow", "workload.agents": 4, "workload.num_programs": 8,
                "cluster.engine.max_model_len": 16384, "workload.params": {"fixed_tokens": 1024}}),
    ("scalesim", {"workload.generator": "society", "workload.agents": 1, "workload.num_programs": 2,
                  "cluster.gpus_per_node": 2, "cluster.engine.num_gpu_blocks_override": 260,
                  "workload.params": {"num_agents": 80, "num_steps": 5}}),
    ("kvflow", {"workload.generator": "kvflow", "workload.agents": 8, "workload.num_programs": 16,
                "cluster.gpus_per_node": 2, "cluster.engine.max_model_len": 16384,
                "cluster.engine.num_gpu_blocks_override": 400, "workload.params": {"fixed_tokens": 1024}}),
])
def test_prefetch_with_and_without_the_cached_prefix_memo_is_the_same_run(policy, over):
    """The CPU tier resumes a candidate's cached-prefix scan where it stopped (shortened when one of
    its blocks is evicted); with the memo turned off (every scan from block 0) the run is the same:
    calls, engine samples and every tier action, with prefetches and evictions happening."""
    import pandas as pd

    class NoMemo(dict):
        def __setitem__(self, key, value):
            pass

    def run(memo: bool):
        sim = Simulation(load_config(None, {
            "cluster.num_nodes": 1, "cluster.gpus_per_node": 1, "workload.arrival": "closed", "policy": policy,
            "sim.drain": True, "duration": 1e5, "cluster.engine.num_gpu_blocks_override": 300, "seed": 3, **over}))
        if not memo:
            for et in sim.mechanisms.engines:
                et._cached_upto = NoMemo()
        r = sim.run()
        return r, sim.mechanisms.engines[0], sim.engines[0].pool.num_evictions

    (a, ta, ev), (b, tb, _) = run(True), run(False)
    pd.testing.assert_frame_equal(a.calls, b.calls, check_exact=True)
    pd.testing.assert_frame_equal(a.engines, b.engines, check_exact=True)
    assert ta.log == tb.log and ta.stats == tb.stats
    assert ta.stats["prefetched_blocks"] > 0 and ev > 0 and len(ta._cached_upto) > 0


@pytest.mark.parametrize("policy,over", [
    ("scalesim", {"workload.generator": "society", "workload.agents": 1, "workload.num_programs": 2,
                  "workload.params": {"num_agents": 80, "num_steps": 5}}),
    ("scalesim", {"workload.generator": "society", "workload.agents": 1, "workload.num_programs": 2,
                  "cluster.gpus_per_node": 2, "workload.params": {"num_agents": 80, "num_steps": 5}}),
    ("kvflow", {"workload.generator": "kvflow", "workload.agents": 4, "workload.num_programs": 8,
                "cluster.engine.max_model_len": 16384, "workload.params": {"fixed_tokens": 1024}}),
])
def test_the_remembered_cached_prefixes_stay_cached_and_follow_evictions(policy, over):
    """The tier remembers each prefetch candidate's cached prefix and, when a hash of it is evicted,
    shortens it to that hash's depth: before and after every prefetch decision, every block of every
    remembered prefix is cached (a prefix may since have grown: the next look scans on from it), and
    a shortened prefix ends at a block no longer cached. Small caches: evictions at most boundaries.
    (That the scans then find what a scan from block 0 finds is the run equality above.)"""
    sim = Simulation(load_config(None, {
        "cluster.num_nodes": 1, "cluster.gpus_per_node": 1, "workload.arrival": "closed", "policy": policy,
        "sim.drain": True, "duration": 1e5, "cluster.engine.num_gpu_blocks_override": 260, "seed": 4, **over}))
    seen = {"checks": 0, "shortened": 0}

    def still_cached(et) -> None:
        cached = et.pool.cached
        for agent, (chain, k) in et._cached_upto.items():
            assert all(h in cached for h in chain[1][:k]), (agent, k)
            seen["checks"] += 1

    def checked(et):
        prefetch, evicted = et._prefetch, et._evicted

        def _prefetch(now):
            still_cached(et)
            prefetch(now)
            still_cached(et)

        def _evicted(h, now):
            before = {a: m[1] for a, m in et._cached_upto.items()}
            evicted(h, now)
            for a, m in et._cached_upto.items():
                if a in before and m[1] < before[a]:
                    seen["shortened"] += 1
                    assert m[0][1][m[1]] == h   # shortened to the evicted block's depth

        et._prefetch = _prefetch
        et.pool.on_evict(_evicted)

    for et in sim.mechanisms.engines:
        checked(et)
    sim.run()
    tiers = sim.mechanisms.engines
    assert sum(et.stats["prefetched_blocks"] for et in tiers) > 0
    assert seen["checks"] > 1000 and seen["shortened"] > 0, seen


def test_blocks_loaded_for_a_held_call_sit_at_their_hashes_depths():
    """A call held for a host load whose first missing blocks are already on their way (another
    load's) gets the blocks after those: each loaded block's position is its hash's depth in the
    call's chain (KVFlow's suffix rule and the tier's memo read it). The tier once placed them at the
    end of the cached prefix instead (this run failed at its first such load)."""
    sim = Simulation(load_config(None, {
        "cluster.num_nodes": 1, "cluster.gpus_per_node": 1, "workload.arrival": "closed", "policy": "scalesim",
        "sim.drain": True, "duration": 1e5, "cluster.engine.num_gpu_blocks_override": 260, "seed": 4,
        "workload.generator": "society", "workload.agents": 1, "workload.num_programs": 2,
        "workload.params": {"num_agents": 80, "num_steps": 5}}))
    seen = {"blocks": 0, "after_inflight": 0}
    for et in sim.mechanisms.engines:
        complete, plan = et._complete, et._plan

        def _plan(hashes, limit, now, plan=plan):
            out = plan(hashes, limit, now)
            k, to_load, wait, first = out
            seen["after_inflight"] += bool(to_load) and first > k
            return out

        def _complete(ld, complete=complete):
            if ld.kind == "call":
                for b, h in zip(ld.blocks, ld.hashes):
                    assert ld.call.full_hashes[b.position] == h, (b.position, ld.call.call_id)
                    seen["blocks"] += 1
            return complete(ld)

        et._complete, et._plan = _complete, _plan
    sim.run()
    assert seen["blocks"] > 1000 and seen["after_inflight"] > 0, seen


@pytest.mark.parametrize("source", ["oracle", "ewma"])
def test_invocation_distance_candidates_equal_a_scan_of_every_agents_next_call(source):
    """The time table keeps its next-call times sorted (``by_time``), so the prefetch candidates are
    a prefix of it: after random arrivals, finishes and pushed distances they equal a scan of every
    agent (due within the horizon, not running, by time then agent id)."""
    import random

    from agentsim.policies.distance import InvocationDistance

    pol = InvocationDistance(source=source, look_ahead=1, unit=0.5, cpu_tier=False)
    t = pol.table
    rng = random.Random(9)

    class C:
        def __init__(self, cid, agent, d):
            self.call_id, self.agent_id, self.program_id = cid, agent, agent
            self.hints = CallHints(next_invocation_distance=d)

    inflight: list = []
    now = 0.0
    nonempty = 0
    for i in range(600):
        now += rng.choice([0.0, 0.1, 0.7])
        r = rng.random()
        if r < 0.4:
            c = C(i, rng.randrange(12), rng.choice([None, 0.0, 0.3, 1.0, 1.0, 5.0, math.inf]))
            pol.on_call_arrive(c, now)
            inflight.append(c)
        elif r < 0.85 and inflight:
            pol.on_call_finish(inflight.pop(rng.randrange(len(inflight))), now)
        else:
            pol.on_distance_update({str(rng.randrange(12)): rng.choice([None, 0.2, 2.0])}, now)
        assert t.by_time == sorted((v, a) for a, v in t.next_at.items())
        horizon = now + (pol.look_ahead + 1) * pol.unit
        want = [a for _, a in sorted((v, a) for a, v in t.next_at.items() if v <= horizon and a not in t.active)]
        got = pol.prefetch_candidates(now)
        assert got == want
        # one engine's agents: the same order, restricted to them
        sub = set(rng.sample(range(12), rng.randint(0, 12)))
        assert pol.prefetch_candidates_among(now, sub) == [a for a in got if a in sub]
        nonempty += bool(got)
    assert nonempty > 50


@pytest.mark.parametrize("over,engines_prefetching", [
    # steps source: a society's agents, one engine
    ({"workload.generator": "society", "workload.agents": 1, "workload.num_programs": 1,
      "workload.params": {"num_agents": 60, "num_steps": 4},
      "policy": {"name": "scalesim", "params": {"evict": {"source": "steps"}}}}, 1),
    # time source: ReAct agents spread over the four engines
    ({"workload.generator": "react", "workload.agents": 40, "workload.num_programs": 120,
      "policy": {"name": "scalesim", "params": {"evict": {"source": "oracle"}}}}, 4),
])
def test_each_engine_asking_for_its_own_prefetch_candidates_is_the_same_run(over, engines_prefetching, monkeypatch):
    """With ``prefetch_candidates_among`` each engine's CPU tier asks the policy for its own agents'
    candidates (here always, whatever share of the agents the engine holds); with it turned off the
    tier filters the cluster's list. Same run: calls, samples and every tier action, with prefetches
    happening."""
    import pandas as pd

    import agentsim.sim.tiers as tiers

    monkeypatch.setattr(tiers, "AMONG_SHARE", 1.0)

    def run(among: bool):
        sim = Simulation(load_config(None, {
            "cluster.num_nodes": 1, "cluster.gpus_per_node": 4, "workload.arrival": "closed",
            "policy": "scalesim", "sim.drain": True, "duration": 1e5, "cluster.engine.num_gpu_blocks_override": 300,
            "seed": 5, **over}))
        if among:
            pol = sim.bundle.evict
            ask = pol.prefetch_candidates_among

            def checked(now, agents):
                # at every ask: the cluster's candidates, in order, restricted to the engine's agents
                got = ask(now, agents)
                assert got == [a for a in pol.prefetch_candidates(now) if a in agents]
                asked.append(len(got))
                return got

            for et in sim.mechanisms.engines:
                et._candidates_among = checked
        else:
            for et in sim.mechanisms.engines:
                et._candidates_among = None
        r = sim.run()
        return r, sim.mechanisms

    asked: list[int] = []
    (a, ma), (b, mb) = run(True), run(False)
    assert len(asked) > 20 and sum(asked) > 20
    pd.testing.assert_frame_equal(a.calls, b.calls, check_exact=True)
    pd.testing.assert_frame_equal(a.engines, b.engines, check_exact=True)
    for ta, tb in zip(ma.engines, mb.engines):
        assert ta.log == tb.log and ta.stats == tb.stats
    assert sum(t.stats["prefetched_blocks"] > 0 for t in ma.engines) == engines_prefetching
    # the index of agents by engine holds each agent on the engine of its last chain
    assert {a: e for e, agents in ma.agents_on.items() for a in agents} == {a: c[0] for a, c in ma.last_chain.items()}


def test_every_change_of_a_distance_table_that_moves_a_level_bumps_its_version():
    """The leveled free queue rebuilds its order only when (now, version) changes, so every mutation
    of a distance table that can move an agent's level must bump the version. ScaleSim's step table
    forgets a program's clock when the program ends: its agents' step counts change."""
    from agentsim.policies.distance import InvocationDistance

    pol = InvocationDistance(source="steps", cpu_tier=False)

    class C:
        call_id, program_id, agent_id = 1, 7, 3
        hints = CallHints(next_invocation_steps=3)

    pol.on_call_arrive(C, 0.0)
    pol.on_call_finish(C, 0.0)
    for _ in range(2):
        pol.on_tool_end(7, 3, "world", 0.0)
    before = (pol.version, pol.steps(3, 0.0))
    pol.on_program_end(7, 0.0)
    after = (pol.version, pol.steps(3, 0.0))
    assert before[1] == 0 and after[1] == 2       # 3 steps from step 0, 2 done; clock gone: 3 - 0 - 1
    assert after[0] > before[0]
    pol.on_program_end(7, 0.0)                    # nothing left to forget: no change, no bump
    assert pol.version == after[0]


@pytest.mark.parametrize("source", ["oracle", "ewma", "none", "steps"])
def test_levels_of_many_agents_equal_each_agents_level(source):
    """A leveled queue asks for all its groups' levels at once (``levels``): the same floats as
    ``level`` of each agent, at times on and off the unit boundaries, for agents running, due, far
    and unknown."""
    import random

    from agentsim.policies.distance import InvocationDistance

    rng = random.Random(3)
    seen: set[float] = set()
    for unit in (0.5, 1.0, 2.5):
        pol = InvocationDistance(source=source, unit=unit, hold_levels=rng.choice([0, 2, 4]), cpu_tier=False)
        t = pol.table
        agents = list(range(60))
        for a in agents:
            if source == "steps":
                t.agent_program[a] = a % 3
                if rng.random() < 0.8:
                    t.next_step[a] = rng.randrange(0, 12)
            elif rng.random() < 0.8:
                # on unit boundaries, just off them, and far
                t._set(a, rng.choice([k * unit for k in range(8)]) + rng.choice([0.0, 1e-12, -1e-12, 0.3 * unit]))
            if rng.random() < 0.2:
                t._started(a)
        if source == "steps":
            t.clock.update({0: 2, 1: 0, 2: 5})
        for now in (0.0, unit, 1.5 * unit, 3 * unit - 1e-12, 10 * unit):
            ids = rng.sample(agents, 40) + [999]   # 999: never seen
            assert pol.levels(ids, now) == [pol.level(a, now) for a in ids]
            seen.update(pol.levels(ids, now))
    assert len(seen) >= 3, seen


@pytest.mark.parametrize("graph", ["hints", "learned"])
def test_kvflow_levels_of_many_agents_equal_each_agents_level(graph):
    """KVFlow's queue asks for all its groups' levels at once: the ``hints`` graph's are computed in
    numpy from arrays the step table keeps (``levels_array``), the others one by one. Both equal
    ``level`` agent by agent: running, hinted near and far, past their hinted step, unhinted, unknown."""
    import random

    from types import SimpleNamespace

    from agentsim.policies.distance import UNKNOWN_STEPS, StepsToExecution

    rng = random.Random(5)
    pol = StepsToExecution(graph=graph, cpu_tier=False)
    agents = list(range(30))
    seen: set[float] = set()
    for k in range(400):
        a = rng.choice(agents)
        call = SimpleNamespace(agent_id=a, program_id=a % 4, hints=CallHints(
            stage=f"agent{a % 5}", next_invocation_steps=rng.choice([None, 1, 3, 7])))
        if a in pol.table.active and rng.random() < 0.7:
            pol.on_call_finish(call, 0.0)
        else:
            pol.on_call_arrive(call, 0.0)
        ids = rng.sample(agents, 20) + [999]    # 999: never seen
        want = [pol.level(x, 0.0) for x in ids]
        assert pol.levels(ids, 0.0) == want
        seen.update(want)
    assert (pol.levels_array(agents, 0.0) is None) == (graph != "hints")
    assert 0.0 in seen and UNKNOWN_STEPS in seen and len(seen) >= 4, seen


def test_kvflow_step_arrays_grow_for_clients_first_seen_at_a_finish_and_stay_exact():
    """A call whose program ended while it ran finishes under a client never seen at an arrival (the
    program id): the client arrays grow there. A hinted step past 2^53 is not rounded: the queue
    then asks ``level`` one agent at a time."""
    from types import SimpleNamespace

    from agentsim.policies.distance import StepsToExecution

    pol = StepsToExecution(graph="hints", cpu_tier=False)
    t = pol.table

    def call(agent, program, steps=3):
        return SimpleNamespace(agent_id=agent, program_id=program,
                               hints=CallHints(stage="s", next_invocation_steps=steps))

    for a in range(62):
        pol.on_program_start(a, a, "kvflow", 0.0)
        pol.on_call_arrive(call(a, a), 0.0)
    for pid in range(62, 200):                    # each ends before its call finishes
        pol.on_program_start(pid, 1000 + pid, "kvflow", 0.0)
        pol.on_call_arrive(call(1000 + pid, pid), 0.0)
        pol.on_program_end(pid, 0.0)
        pol.on_call_finish(call(1000 + pid, pid), 0.0)
    ids = list(range(62)) + [1000 + p for p in range(62, 200)] + [5]
    assert pol.levels(ids, 0.0) == [pol.level(a, 0.0) for a in ids]
    assert pol.levels_array(ids, 0.0) is not None
    pol.on_call_arrive(call(7, 7, steps=2 ** 53 + 1), 0.0)
    pol.on_call_finish(call(7, 7), 0.0)
    assert pol.levels_array(ids, 0.0) is None      # float64 would round 2^53 + 1
    assert pol.levels(ids, 0.0) == [pol.level(a, 0.0) for a in ids]

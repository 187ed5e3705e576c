"""Route policies (prefix affinity, Autellix's balancer, llm-d's weighted scorer, HexGen dispatch)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from policy_scripts import calls_of, scripted


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


# --------------------------------------------------------------------------- fast reads, same answers
def test_argmin_argmax_pick_the_lowest_index_like_a_keyed_scan():
    """``values.index(min(values))`` is the old ``min(range(n), key=(value, index))``: ties, signed
    zeros and NaN (which no comparison picks) give the same index."""
    import math
    import random

    from agentsim.policies.routing import _argmax, _argmin

    rng = random.Random(2)
    pool = [0.0, -0.0, 1.0, 2.0, 2.0, -3.5, math.nan, math.inf, 7]
    for _ in range(2000):
        v = [rng.choice(pool) for _ in range(rng.randint(1, 8))]
        assert _argmin(v) == min(range(len(v)), key=lambda i: (v[i], i)), v
        assert _argmax(v) == min(range(len(v)), key=lambda i: (-v[i], i)), v


def test_engine_longest_prefix_equals_the_argmax_of_every_engines_count():
    """The early-exit prefix search (an engine lacking block ``n`` of the best so far is skipped)
    picks the engine and count a full scan of every engine picks, also when caches have holes."""
    import random

    from agentsim.policies.base import engine_cached_prefix, engine_longest_prefix
    from agentsim.policies.routing import _argmax

    class E:
        def __init__(self, cached):
            self.cached = cached

        def num_cached_prefix_blocks(self, hashes):
            n = 0
            for h in hashes:
                if h not in self.cached:
                    break
                n += 1
            return n

    rng = random.Random(4)
    for _ in range(3000):
        hashes = list(range(rng.randint(0, 12)))
        engines = [E({h for h in hashes if rng.random() < rng.choice([0.3, 0.8, 1.0])}) for _ in range(rng.randint(1, 9))]
        counts = [e.num_cached_prefix_blocks(hashes) for e in engines]
        assert engine_longest_prefix(engines, hashes) == (_argmax(counts), max(counts))

        class Caches(list):   # a backend's sequence with the vectorised form
            def prefix_caches(self):
                return [e.cached for e in self]

        both = Caches(engines)
        assert engine_longest_prefix(both, hashes) == (_argmax(counts), max(counts))
        assert engine_cached_prefix(both, hashes) == counts


@pytest.mark.parametrize("policy", ["prefix-affinity", "llm-d", "least-loaded", "autellix-plas"])
def test_the_simulators_engine_list_reads_equal_per_engine_reads(policy):
    """At every routing decision of a run with evictions and queues, the engine list's vectorised
    reads (with llm-d, the cluster's prefix index) equal the per-engine ``EngineView`` reads, and
    the prefix-affinity search equals a scan of every engine."""
    from agentsim.config import load_config
    from agentsim.policies.base import engine_cached_prefix, engine_kv_usage, engine_loads, engine_waiting
    from agentsim.policies.base import engine_longest_prefix
    from agentsim.policies.routing import _argmax
    from agentsim.sim.runner import Simulation

    sim = Simulation(load_config(None, {
        "cluster.num_nodes": 2, "cluster.gpus_per_node": 2, "workload.arrival": "closed", "workload.agents": 40,
        "workload.generator": "react", "duration": 20.0, "policy": policy,
        "cluster.engine.num_gpu_blocks_override": 300, "cluster.engine.max_num_seqs": 6}))
    route = sim._route
    seen = {"calls": 0, "waiting": 0}

    engines_seen = []

    def checked(call, engines, now):
        engines_seen[:] = [engines]
        plain = list(engines)
        assert engine_loads(engines) == [e.num_running + e.num_waiting for e in plain]
        assert engine_waiting(engines) == engine_waiting(plain) == [e.num_waiting for e in plain]
        assert engine_kv_usage(engines) == [e.kv_usage for e in plain]
        hashes = call.prompt_block_hashes(engines[0].block_size)
        counts = [e.num_cached_prefix_blocks(hashes) for e in plain]
        assert engine_cached_prefix(engines, hashes) == engine_cached_prefix(plain, hashes) == counts
        assert engine_longest_prefix(engines, hashes) == engine_longest_prefix(plain, hashes) == (_argmax(counts), max(counts))
        index = engines._index
        if index is not None:
            # the cluster's prefix index (built at llm-d's first ask) holds what the pools hold
            owners = {}
            for i, e in enumerate(plain):
                for h in e.pool.cached:
                    owners[h] = owners.get(h, 0) | 1 << i
            assert index.owners == owners
        if policy == "llm-d":
            # the scorer's list form against its per-engine formula
            qs = [e.num_waiting for e in plain]
            lo, hi = min(qs), max(qs)
            want = [2.0 * (1.0 if hi == lo else (hi - q) / (hi - lo)) + 2.0 * (1.0 - e.kv_usage)
                    + 3.0 * (n / len(hashes) if hashes else 0.0) for e, q, n in zip(plain, qs, counts)]
            assert sim.bundle.route.scores(call, engines) == want
        seen["calls"] += 1
        seen["waiting"] += sum(engine_waiting(plain)) > 0
        return route(call, engines, now)

    sim._route = checked
    sim.run()
    assert seen["calls"] > 100 and seen["waiting"] > 10
    assert engines_seen and engines_seen[0]._index is not None   # this test's reads built it


@pytest.mark.parametrize("policy", ["prefix-affinity", "llm-d", "vllm"])
def test_only_the_prefix_scorer_indexes_the_clusters_prefix_caches(policy):
    """llm-d's scorer counts every engine's prefix and builds the cluster index; prefix-affinity's
    search (one lookup per engine) is cheaper without it, and round robin reads no cache: neither
    pays for keeping one."""
    from agentsim.config import load_config
    from agentsim.sim.runner import Simulation

    sim = Simulation(load_config(None, {"cluster.gpus_per_node": 2, "workload.agents": 8, "duration": 10.0,
                                        "policy": policy}))
    sim.run()
    assert (sim.engines._index is not None) == (policy == "llm-d")


@pytest.mark.parametrize("over", [
    {"policy": "kvflow"},                                           # the CPU tier holds calls, releases them
    {"policy": "least-loaded", "cluster.disagg": {"roles": ["prefill", "decode", "mixed", "decode"]}},
    {"policy": "least-loaded", "cluster.disagg": {"prefix_fetch": "always"}},
    {"policy": "autellix-plas", "cluster.engine.max_num_seqs": 3},   # preemption for the waiting head
    # V0 re-queues preempted calls after planning
    {"policy": "least-loaded", "cluster.engine.scheduler": "v0", "workload.agents": 60,
     "cluster.engine.num_gpu_blocks_override": 220},
])
def test_an_engines_call_count_equals_its_queues_at_every_step(over):
    """``num_calls`` (what ``loads()`` hands least-loaded routers) is kept by +1 at every way into
    the inbox and -1 at finish; it equals ``running + waiting + inbox`` after every step, at every
    routing decision and at the end, also while tiers hold calls, P/D moves them and preemption
    sends them back."""
    from agentsim.config import load_config
    from agentsim.sim.runner import Simulation

    sim = Simulation(load_config(None, {
        "cluster.num_nodes": 1, "cluster.gpus_per_node": 4, "workload.arrival": "closed", "workload.agents": 30,
        "workload.generator": "react", "duration": 20.0, "cluster.engine.num_gpu_blocks_override": 260,
        "seed": 2, **over}))
    checks = {"steps": 0, "routes": 0, "held": 0}

    def same(e):
        assert e.num_calls == len(e.running) + len(e.waiting) + len(e.inbox), e.engine_id

    def on_step(e):
        same(e)
        checks["steps"] += 1
        checks["held"] += bool(e.tiers is not None and e.tiers.held)

    for e in sim.engines:
        e.on_step = on_step
    route = sim._route

    def checked(call, engines, now):
        for e in sim.engines:
            same(e)
        checks["routes"] += 1
        return route(call, engines, now)

    sim._route = checked
    sim.run()
    for e in sim.engines:
        same(e)
    assert checks["steps"] > 200
    assert checks["routes"] > 100 or "cluster.disagg" in over   # P/D routes through its own proxy
    if over["policy"] == "kvflow" or "cluster.disagg" in over:
        assert checks["held"] > 100          # calls were taken aside (loading KV) and released
    else:
        assert sum(e.num_preemptions for e in sim.engines) > 10

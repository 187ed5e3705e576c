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

"""Retention policies (Continuum TTL pins, Tokencake offload) on hand-checked scenarios run on the real engine model."""

from __future__ import annotations

import math

import pytest

from policy_scripts import STEP, calls_of, scripted


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


def test_continuum_unpin_rule():
    from agentsim.policies.retention import ContinuumTTL, TokencakeOffload, pin_end_reason

    assert pin_end_reason(5.0, None, 4.0) is None              # before expiry, no next call yet
    assert pin_end_reason(5.0, None, 5.0) == "expired"         # at expiry, nothing waiting
    assert pin_end_reason(5.0, "waiting", 6.0) is None         # the next call waits: keep it for that call
    assert pin_end_reason(5.0, "loading", 6.0) is None
    assert pin_end_reason(5.0, "running", 1.0) == "admitted"   # admitted before expiry
    assert pin_end_reason(5.0, "finished", 6.0) == "admitted"
    assert pin_end_reason(math.inf, None, 1e9) is None          # Tokencake: until released
    for pol in (ContinuumTTL(), TokencakeOffload()):
        assert pol.unpin_reason(5.0, "running", 1.0) == "admitted"


def test_duration_window_array_stays_equal_to_its_sorted_values():
    """The τ* search reads the window as a float64 array kept in step with the sorted list (inserts,
    ties and the oldest value leaving a full window)."""
    import random

    import numpy as np

    from agentsim.policies.retention import _Durations, best_ttl

    rng = random.Random(1)
    d = _Durations(50)
    for _ in range(500):
        d.add(rng.choice([rng.random() * 5, 1.0, 0.0, 3]))
        assert d.array.dtype == np.float64 and d.array.tolist() == d.values and len(d) <= 50
        assert best_ttl(d.array, 4.0) == best_ttl(list(d.values), 4.0)

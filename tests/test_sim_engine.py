"""Behaviour of the simulated vLLM engine: prefix caching, queueing theory, fast-forward, determinism."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from agentsim.config import load_config
from agentsim.sim.runner import Simulation, run
from agentsim.traces.generators import register_generator
from agentsim.workload import Context

from conftest import ROOFLINE, constant_profile


@register_generator("test-prefix")
@dataclass(frozen=True)
class SharedPrefix:
    """One call: a shared system prompt then a private part (0 = identical prompts)."""

    shared_tokens: int = 160
    private_tokens: int = 40
    output_tokens: int = 1

    def body(self, pc):
        ctx = Context.of(pc.shared("test-system", self.shared_tokens))
        if self.private_tokens:
            ctx = ctx.extend(pc.segment(self.private_tokens))
        yield pc.llm(ctx, self.output_tokens)


def _one_engine(**over):
    base = {"cluster.num_nodes": 1, "cluster.gpus_per_node": 1, "cluster.profile": ROOFLINE,
            "workload.arrival": "closed", "workload.agents": 1, "sim.drain": True}
    base.update(over)
    return load_config(None, base)


@pytest.mark.parametrize("shared,private,expected_hit_tokens", [
    (160, 40, 160),   # 10 whole shared blocks hit, the private tail never does
    (170, 40, 160),   # a partial shared block cannot hit (blocks are hashed whole)
    (160, 0, 144),    # a fully cached prompt still recomputes its last token: 9 blocks hit
])
def test_prefix_cache_hit_rate_matches_hand_count(shared, private, expected_hit_tokens):
    n = 10
    cfg = _one_engine(**{"workload.generator": "test-prefix", "workload.num_programs": n,
                         "workload.params": {"shared_tokens": shared, "private_tokens": private}})
    r = run(cfg)
    calls = r.calls
    assert (calls["status"] == "finished").all() and len(calls) == n
    prompt = shared + private
    # the first call finds an empty cache; each later one hits exactly the hand-counted blocks
    assert calls["num_cached_tokens"].tolist() == [0] + [expected_hit_tokens] * (n - 1)
    assert r.summary["prefix_hit_rate"] == pytest.approx((n - 1) * expected_hit_tokens / (n * prompt))
    assert (calls["num_cached_tokens"] + calls["num_computed_prompt_tokens"] == prompt).all()


def test_prefix_caching_off_never_hits():
    cfg = _one_engine(**{"workload.generator": "test-prefix", "workload.num_programs": 5,
                         "cluster.engine": {"enable_prefix_caching": False}})
    assert run(cfg).calls["num_cached_tokens"].sum() == 0


@pytest.mark.parametrize("rho,num_calls", [(0.5, 60_000), (0.8, 200_000)])
def test_md1_mean_wait(rho, num_calls):
    """max_num_seqs=1 and a constant step: single-step calls form an M/D/1 queue.

    Tolerance 5%: across seeds the mean wait of a 120k-call run at rho=0.8 scatters by about
    +-3% (waits are strongly autocorrelated near saturation), so 200k calls and 5% is a check
    that a wrong queue discipline or a lost step boundary (>= 10% off) cannot pass.
    """
    service = 0.01
    lam = rho / service
    cfg = load_config(None, {
        "cluster.num_nodes": 1, "cluster.gpus_per_node": 1, "cluster.engine": {"max_num_seqs": 1},
        "workload.arrival": "poisson", "workload.rate": lam, "workload.generator": "react",
        "workload.params": {"calls_mean": 1, "output_tokens_mean": 1, "length_sigma": 0.0,
                            "prompt_tokens_mean": 100},  # one call: no observation
        "duration": num_calls / lam, "seed": 0,
    })
    r = Simulation(cfg, profile=constant_profile(service)).run()
    done = r.calls[r.calls["status"] == "finished"]
    assert len(done) > 0.95 * num_calls
    # every call is exactly one step: TTFT = wait + service
    np.testing.assert_allclose(done["ttft"] - done["queue_time"], service, rtol=1e-6)
    expected = rho * service / (2 * (1 - rho))  # Pollaczek-Khinchine for deterministic service
    assert done["queue_time"].mean() == pytest.approx(expected, rel=0.05)


def _frames(cfg):
    r = run(cfg)
    return r


@pytest.mark.parametrize("over", [
    # memory pressure with preemption, a mix of shapes, least-loaded routing
    {"cluster.gpus_per_node": 2, "cluster.engine": {"num_gpu_blocks_override": 400},
     "workload.agents": 24, "policy": "least-loaded",
     "workload.mix": [{"generator": "react"}, {"generator": "chat", "params": {"think_time_median": 2.0}},
                      {"generator": "fanout"}]},
    # open-loop arrivals, roomy cache, no chunked prefill
    {"cluster.gpus_per_node": 1, "workload.arrival": "poisson", "workload.rate": 2.0,
     "cluster.engine": {"enable_chunked_prefill": False, "max_num_batched_tokens": 8192}},
    # vLLM V0 (prefill-first steps) under memory pressure
    {"cluster.gpus_per_node": 2, "cluster.engine": {"num_gpu_blocks_override": 400, "vllm_version": "0.6"},
     "workload.agents": 24, "policy": "least-loaded",
     "workload.mix": [{"generator": "react"}, {"generator": "chat", "params": {"think_time_median": 2.0}},
                      {"generator": "fanout"}]},
])
def test_fast_forward_identical_to_step_by_step(over):
    base = {"cluster.profile": ROOFLINE, "duration": 90.0, "seed": 3, **over}
    on = run(load_config(None, {**base, "sim.fast_forward": True}))
    off = run(load_config(None, {**base, "sim.fast_forward": False}))
    assert on.stats["num_ff_windows"] > 0 and off.stats["num_ff_windows"] == 0
    assert on.stats["num_steps"] == off.stats["num_steps"]
    for name in ("calls", "programs", "engines"):
        pd.testing.assert_frame_equal(getattr(on, name), getattr(off, name), check_exact=True)
    assert on.summary == off.summary
    if "num_gpu_blocks_override" in str(over):
        assert on.summary["num_preemptions"] > 0  # the scenario really exercises preemption


def test_same_seed_identical_parquet_and_different_seeds_differ(tmp_path):
    from agentsim.metrics import write_results

    def go(seed, name):
        cfg = load_config(None, {"cluster.profile": ROOFLINE, "duration": 30.0, "workload.agents": 20, "seed": seed})
        r = run(cfg)
        write_results(tmp_path / name, r.calls, r.programs, r.engines, r.summary, r.manifest)
        return (tmp_path / name / "calls.parquet").read_bytes(), (tmp_path / name / "programs.parquet").read_bytes()

    a, b, c = go(1, "a"), go(1, "b"), go(2, "c")
    assert a == b
    assert a[0] != c[0]


def test_drained_run_ends_with_its_last_program():
    """With drain, a huge duration only bounds arrivals: the run (and its time series) ends when work does."""
    cfg = _one_engine(**{"workload.generator": "test-prefix", "workload.num_programs": 3, "duration": 1e9})
    r = run(cfg)
    assert (r.programs["status"] == "finished").all()
    end = r.programs["end_at"].max()
    assert r.summary["duration_s"] == end
    assert len(r.engines) <= int(end / cfg.sim.sample_interval) + 1

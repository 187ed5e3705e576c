"""The optimized engine (lazy O(1) decode steps, calendar events, fast-forward windows) gives the same
calls, programs and engine tables as the plain step-by-step reference loop
(:meth:`agentsim.sim.engine.Engine.use_reference_loop`): every policy bundle, a few seeds, small
clusters, and engine settings that force preemption, cut batches at the token budget or the
sequence limit, and disable prefix caching. Exact equality: both loops add the same floats in the
same order (step times from the same batch features, summed step by step)."""

from __future__ import annotations

import pandas as pd
import pytest

from agentsim.config import load_config
from agentsim.policies.registry import bundles
from agentsim.sim.runner import Simulation

BASE = {"cluster.num_nodes": 1, "cluster.gpus_per_node": 2, "workload.arrival": "closed",
        "workload.agents": 24, "workload.generator": "react", "duration": 30.0}


def _run(over: dict, reference: bool):
    sim = Simulation(load_config(None, {**BASE, **over}))
    if reference:
        for e in sim.engines:
            e.use_reference_loop()
    r = sim.run()
    return r, sim


def _assert_same(over: dict) -> tuple:
    fast, sim_fast = _run(over, reference=False)
    ref, _ = _run(over, reference=True)
    for name in ("calls", "programs", "engines"):
        pd.testing.assert_frame_equal(getattr(fast, name), getattr(ref, name), check_exact=True, obj=name)
    assert fast.stats["num_steps"] == ref.stats["num_steps"]
    assert len(fast.calls) > 50  # the run did real work
    return fast, ref, sim_fast


@pytest.mark.parametrize("i,policy", list(enumerate(b.name for b in bundles())))
def test_every_bundle_matches_reference_loop(i, policy):
    _assert_same({"policy": policy, "seed": 1 + i % 3})


@pytest.mark.parametrize("over", [
    # a small KV cache: preemption by recompute, evictions, decodes growing into new blocks
    {"cluster.engine.num_gpu_blocks_override": 200, "seed": 3},
    {"cluster.engine.num_gpu_blocks_override": 200, "policy": "scalesim", "seed": 4},
    {"cluster.engine.num_gpu_blocks_override": 250, "policy": "mlfq", "seed": 5},
    # the token budget cuts the running pass (partial prefills), prefix caching off
    {"cluster.engine.enable_prefix_caching": False, "cluster.engine.max_num_batched_tokens": 256, "seed": 6},
    # the sequence limit: strict-priority preemption of running calls for the waiting head
    {"cluster.engine.max_num_seqs": 4, "policy": "sjf-oracle", "cluster.engine.num_gpu_blocks_override": 250,
     "seed": 7},
    {"cluster.engine.max_num_seqs": 4, "policy": "autellix-plas", "seed": 8},
    # other block sizes, no chunked prefill, short windows, fine samples
    {"cluster.engine.block_size": 32, "cluster.engine.num_gpu_blocks_override": 120,
     "cluster.engine.max_num_batched_tokens": 1024, "seed": 9},
    {"cluster.engine.enable_chunked_prefill": False, "sim.max_ff_steps": 5, "sim.sample_interval": 0.1, "seed": 10},
    # V0 engines run call by call in both modes (fast-forward only): still identical
    {"cluster.engine.vllm_version": "0.6", "cluster.engine.num_gpu_blocks_override": 250, "seed": 11},
])
def test_engine_settings_match_reference_loop(over):
    fast, _, _ = _assert_same(over)
    if over.get("cluster.engine.num_gpu_blocks_override", 10**9) <= 250:
        assert fast.calls["num_preemptions"].sum() > 0  # the case exercises preemption


def test_optimized_loop_takes_its_fast_path():
    """The equality above is not vacuous: the default engine plans most steps without the
    call-by-call pass and advances decodes lazily."""
    fast, ref, sim = _assert_same({"seed": 12})
    e = sim.engines[0]
    assert e._lazy_on and e._D == e.num_steps  # every step counted by the lazy calendar
    assert fast.stats["num_ff_windows"] > 0 and ref.stats["num_ff_windows"] == 0

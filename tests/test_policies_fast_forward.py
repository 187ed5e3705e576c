"""Every policy bundle gives the same results with and without fast-forward windows."""

from __future__ import annotations

import pandas as pd
import pytest

from agentsim.config import load_config
from agentsim.sim.runner import Simulation


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

"""Invariants of the engine model under random workloads and engine limits (hypothesis)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from agentsim.config import load_config
from agentsim.sim.runner import Simulation
from agentsim.traces.generators import register_generator
from agentsim.workload import Context, Parallel, ToolCall

from conftest import ROOFLINE


@register_generator("test-random")
@dataclass(frozen=True)
class RandomProgram:
    """Random calls, tools and parallel groups over a shared prefix (lengths up to ``max_tokens``)."""

    max_calls: int = 4
    max_tokens: int = 200
    max_output: int = 20
    p_parallel: float = 0.3

    def body(self, pc):
        rng = pc.rng
        ctx = Context.of(pc.shared("rand-sys", int(rng.integers(1, self.max_tokens // 2))),
                         pc.segment(int(rng.integers(1, self.max_tokens // 2))))
        for _ in range(int(rng.integers(1, self.max_calls + 1))):
            if rng.random() < self.p_parallel:
                branches = [pc.llm(ctx.extend(pc.segment(int(rng.integers(1, 30)))),
                                   int(rng.integers(1, self.max_output + 1))) for _ in range(int(rng.integers(2, 4)))]
                results = yield Parallel(branches)
                ctx = ctx.extend(*(r.output for r in results))
            else:
                r = yield pc.llm(ctx, int(rng.integers(1, self.max_output + 1)))
                ctx = ctx.extend(r.output)
            if ctx.num_tokens > self.max_tokens * 2:
                break
            yield ToolCall("t", float(rng.exponential(0.05)))
            ctx = ctx.extend(pc.segment(int(rng.integers(1, 20))))


limits = st.fixed_dictionaries({
    "block_size": st.sampled_from([1, 4, 16]),
    "max_num_seqs": st.integers(1, 8),
    "max_num_batched_tokens": st.integers(8, 600),
    "enable_chunked_prefill": st.booleans(),
    "spare_blocks": st.integers(0, 200),
    # vLLM V1, V0, V0 multi-step
    "scheduler": st.sampled_from([("v1", 1), ("v0", 1), ("v0", 4)]),
})


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lim=limits, seed=st.integers(0, 10_000), programs=st.integers(1, 25), rate=st.floats(0.5, 50),
       engines=st.integers(1, 3), ff=st.booleans(), policy=st.sampled_from(["vllm", "least-loaded"]))
def test_engine_invariants(lim, seed, programs, rate, engines, ff, policy):
    max_len = 1200
    bs = lim["block_size"]
    scheduler, steps = lim["scheduler"]
    # without chunked prefill (or with multi-step, which never chunks) a prompt fits one step's budget
    budget = lim["max_num_batched_tokens"] if lim["enable_chunked_prefill"] and steps == 1 else max_len
    # small caches force eviction and preemption; the largest call must still fit
    num_blocks = -(-max_len // bs) + lim["spare_blocks"]
    cfg = load_config(None, {
        "seed": seed, "duration": 1e6, "policy": policy, "cluster.profile": ROOFLINE,
        "cluster.gpus_per_node": engines,
        "cluster.engine": {"block_size": bs, "max_num_seqs": lim["max_num_seqs"], "max_num_batched_tokens": budget,
                           "enable_chunked_prefill": lim["enable_chunked_prefill"], "max_model_len": max_len,
                           "num_gpu_blocks_override": num_blocks, "scheduler": scheduler,
                           "num_scheduler_steps": steps},
        "workload.arrival": "poisson", "workload.rate": rate, "workload.num_programs": programs,
        "workload.generator": "test-random", "sim.drain": True, "sim.fast_forward": ff,
    })
    checks = {"steps": 0}

    def on_step(engine):
        checks["steps"] += 1
        pool = engine.pool
        pool.check()  # ref counts >= 0, free + used = total, cache map consistent
        assert pool.num_used <= pool.num_blocks
        running = {id(c) for c in engine.running}
        waiting = {id(w[-1] if isinstance(w, tuple) else w) for w in engine.waiting}
        assert not running & waiting, "a call is both running and waiting"
        for c in engine.running:
            assert len(c.blocks) * bs >= c.num_computed

    r = Simulation(cfg, on_step=on_step).run()
    calls, progs = r.calls, r.programs
    assert checks["steps"] > 0
    assert len(progs) == programs and (progs["status"] == "finished").all(), "every program completes"
    assert (calls["status"] == "finished").all()
    assert (calls["num_generated_tokens"] == calls["num_output_tokens"]).all()
    assert progs["num_output_tokens"].sum() == calls["num_output_tokens"].sum()
    assert (calls["arrival_at"] <= calls["scheduled_at"]).all()
    assert (calls["scheduled_at"] < calls["first_token_at"]).all()
    assert (calls["first_token_at"] <= calls["finish_at"]).all()
    clean = calls[calls["num_preemptions"] == 0]
    assert (clean["num_cached_tokens"] + clean["num_computed_prompt_tokens"] == clean["num_prompt_tokens"]).all()
    assert (calls["num_cached_tokens"] + calls["num_computed_prompt_tokens"] >= calls["num_prompt_tokens"]).all()
    assert np.all(r.engines["kv_usage"].between(0, 1))

"""Version-true scheduling in the engine model: vLLM V0 prefill-first steps, V0 multi-step chunks,
V1's null block, and the version presets (issues 12 and 14).

Step times come from ``conftest.constant_profile`` (every step exactly ``STEP`` seconds), so each
timeline below is counted by hand; the block arithmetic is written out in each test.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pytest

from agentsim.config import EngineLimits, load_config
from agentsim.errors import ConfigError
from agentsim.policies.baseline import LRUFreeQueue
from agentsim.sim.kv import BlockPool, call_fits
from agentsim.sim.runner import Simulation, run
from agentsim.traces.generators import register_generator
from agentsim.workload import Context, ToolCall

from conftest import ROOFLINE, constant_profile

STEP = 0.01

# agent id -> (arrival delay s, prompt tokens, output tokens); each agent runs one program
SCENARIOS: dict[str, list[tuple[float, int, int]]] = {
    # A decodes; B arrives during A's 3rd step, C during the 5th
    "three": [(0.0, 16, 5), (0.025, 16, 2), (0.045, 16, 3)],
    # multi-step: A runs alone, B arrives in the middle of A's first chunk
    "multistep": [(0.0, 16, 10), (0.02, 16, 3)],
    # null block: two private 32-token prompts, two output tokens each
    "two32": [(0.0, 32, 2), (0.0, 32, 2)],
    # a call that needs ceil(63 / 16) = 4 blocks
    "sixty": [(0.0, 60, 4)],
    # two decoding calls leave 62 of 64 budget tokens; B's 63-token prompt arrives at 2.5
    "budget": [(0.0, 16, 10), (0.0, 16, 10), (0.025, 63, 1)],
    # V0 watermark: 60 + 39 or 60 + 40 prompt blocks of 16 tokens, one output token each
    "blocks60+39": [(0.0, 60 * 16, 1), (0.0, 39 * 16, 1)],
    "blocks60+40": [(0.0, 60 * 16, 1), (0.0, 40 * 16, 1)],
}


@register_generator("test-sem-scenario")
@dataclass(frozen=True)
class Scenario:
    """Agent ``i`` waits ``delay`` then makes one call of private prompt tokens (``SCENARIOS``)."""

    name: str = "three"

    def body(self, pc):
        delay, prompt, output = SCENARIOS[self.name][pc.agent_id]
        if delay:
            yield ToolCall("wait", delay)
        yield pc.llm(Context.of(pc.segment(prompt)), output)


def _cfg(scenario: str, engine: dict, **over):
    n = len(SCENARIOS[scenario])
    base = {"cluster.num_nodes": 1, "cluster.gpus_per_node": 1, "cluster.profile": ROOFLINE,
            "workload.arrival": "closed", "workload.agents": n, "workload.num_programs": n,
            "workload.generator": "test-sem-scenario", "workload.params": {"name": scenario},
            "sim.drain": True, "duration": 1e6, "cluster.engine": engine}
    base.update(over)
    return load_config(None, base)


def _run(scenario: str, engine: dict, on_step=None, **over):
    sim = Simulation(_cfg(scenario, engine, **over), profile=constant_profile(STEP), on_step=on_step)
    r = sim.run()
    assert (r.calls["status"] == "finished").all()
    return r, r.calls.sort_values("agent_id").reset_index(drop=True)


def _times(col) -> list[float]:
    return [round(x / STEP, 9) for x in col]  # in steps, exact up to float rounding


# ---------------------------------------------------------------------------- V0 prefill-first
def test_v0_prefill_steps_stall_every_running_decode():
    """V0 without chunked prefill (``_schedule_default``): a step with a prompt is prefill-only.

    Hand count, one step = 1 unit: A prefills in step 1 (first token at 1) and decodes in 2, 3.
    B arrives at 2.5: step 4 is B's prefill alone (A stalls), B's first token at 4. Step 5 decodes
    A and B (B's 2nd and last token at 5). C arrives at 4.5: step 6 is C's prefill alone (A
    stalls again), C's first token at 6. Step 7: A's 5th token (A done at 7), C's 2nd; step 8: C
    done. A needed 5 tokens but took 7 steps: two stalls.
    """
    r, c = _run("three", {"scheduler": "v0"})
    assert _times(c["first_token_at"]) == [1, 4, 6]
    assert _times(c["finish_at"]) == [7, 5, 8]
    assert r.stats["num_steps"] == 8
    # V1 on the same arrivals mixes each prompt into the decodes' step: A never stalls
    r1, c1 = _run("three", {"scheduler": "v1", "enable_chunked_prefill": False})
    assert _times(c1["first_token_at"]) == [1, 4, 6]
    assert _times(c1["finish_at"]) == [5, 5, 8]
    assert r1.stats["num_steps"] == 8


def test_v0_chunked_prefill_mixes_decodes_first():
    """V0 with chunked prefill (``_schedule_chunked_prefill``): running decodes are scheduled first
    and a new prompt shares their step, so nothing stalls (same timeline as V1 here)."""
    _, c = _run("three", {"scheduler": "v0", "enable_chunked_prefill": True})
    assert _times(c["first_token_at"]) == [1, 4, 6]
    assert _times(c["finish_at"]) == [5, 5, 8]


def test_v1_without_chunked_prefill_never_chunks_a_prompt():
    """V1 with ``enable_chunked_prefill = false`` admits a prompt only whole (``schedule()``: "If
    chunked_prefill is disabled, we can stop the scheduling here"). Budget 64: A1 and A2 decode
    (2 tokens), B's 63-token prompt does not fit the 62 left and waits until both finish at 10;
    its prefill is step 11. With chunked prefill B takes 62 tokens in step 4 and its last in step 5."""
    eng = {"max_model_len": 64, "max_num_batched_tokens": 64}
    _, c = _run("budget", dict(eng, enable_chunked_prefill=False))
    assert _times(c["finish_at"]) == [10, 10, 11]
    _, c = _run("budget", dict(eng, enable_chunked_prefill=True))
    assert _times(c["finish_at"]) == [10, 10, 5]


# ---------------------------------------------------------------------------- V0 multi-step
def test_multi_step_delivers_tokens_in_chunks_of_k():
    """``num_scheduler_steps = 4``: decodes run in chunks of 4 steps, tokens reach the client at a
    chunk's end, and a prompt is admitted only between chunks (its prefill is one step).

    Hand count: A's prefill is step 1 (token 1 at 1); chunk [1, 5] brings A to 5 tokens at 5. B
    arrived at 2 and is admitted at 5: step 6 is its prefill (A stalls), B's token 1 at 6. Chunk
    [6, 10]: A reaches 9, B its 3rd and last token (decoded twice more in vain): B done at 10.
    Chunk [10, 14]: A's 10th token is computed in the chunk's first step, delivered at 14.
    """
    seen: list[tuple[float, int, int]] = []

    def on_step(engine):
        for call in engine.running:
            seen.append((round(engine.env.now / STEP, 9), call.agent_id, call.num_generated))

    r, c = _run("multistep", {"scheduler": "v0", "num_scheduler_steps": 4}, on_step=on_step)
    assert _times(c["first_token_at"]) == [1, 6]
    assert _times(c["finish_at"]) == [14, 10]
    assert r.stats["num_steps"] == 1 + 4 + 1 + 4 + 4
    a = [(t, g) for t, agent, g in seen if agent == 0]
    assert a == [(1, 1), (5, 5), (6, 5), (10, 9)]  # A's count moves only at chunk ends (by 4)
    assert [(t, g) for t, agent, g in seen if agent == 1] == [(6, 1)]
    # one step per schedule: B arrives exactly at A's step boundary 2 and is seen at the next (3):
    # its prefill is step 4 (A stalls), its tokens at 4, 5, 6; A's 10 tokens end at 10 + 1 stall
    r1, c1 = _run("multistep", {"scheduler": "v0"})
    assert _times(c1["first_token_at"]) == [1, 4]
    assert _times(c1["finish_at"]) == [11, 6]


def test_multi_step_charges_scheduling_once_per_chunk():
    """Steps 2..K of a multi-step chunk are not scheduled again (``vllm/engine/llm_engine.py``
    skips ``schedule()`` while a chunk is in flight), so the per-scheduled-sequence host cost is paid
    on the chunk's first step only; the per-sampled-token cost every step (a token is sampled each
    step). Hand count with const 10 ms, 1 ms per scheduled sequence, 0.5 ms per sampled token, one
    call (16 + 9 tokens), K = 4: prefill step 11.5 ms (token 1); chunk 1: 11.5 + 3 x 10.5 ms (tokens
    2-5); chunk 2: the same (tokens 6-9) -> 9 tokens at 11.5 + 2 x 43 = 97.5 ms.
    """
    import dataclasses

    from agentsim.calibration.profile import StepTimeCoefficients

    base = constant_profile(STEP)
    prof = dataclasses.replace(base, coefficients=StepTimeCoefficients(
        const=0.010, per_prefill_token=0.0, per_prefill_attn_pair=0.0, per_decode_seq=0.0,
        per_decode_ctx_token=0.0, per_scheduled_seq=0.001, per_sampled_token=0.0005))
    SCENARIOS["one9"] = [(0.0, 16, 9)]
    try:
        cfg = _cfg("one9", {"scheduler": "v0", "num_scheduler_steps": 4})
        r = Simulation(cfg, profile=prof).run()
    finally:
        del SCENARIOS["one9"]
    c = r.calls.iloc[0]
    assert c["first_token_at"] == pytest.approx(0.0115)
    assert c["finish_at"] == pytest.approx(0.0115 + 2 * (0.0115 + 3 * 0.0105))
    # without multi-step every decode step is scheduled: 8 x 11.5 ms after the prefill
    SCENARIOS["one9"] = [(0.0, 16, 9)]
    try:
        r1 = Simulation(_cfg("one9", {"scheduler": "v0"}), profile=prof).run()
    finally:
        del SCENARIOS["one9"]
    assert r1.calls.iloc[0]["finish_at"] == pytest.approx(9 * 0.0115)


def test_multi_step_needs_v0():
    with pytest.raises(ConfigError, match="num_scheduler_steps"):
        EngineLimits(num_scheduler_steps=4)
    assert EngineLimits(vllm_version="0.6", num_scheduler_steps=4).scheduler == "v0"


# ---------------------------------------------------------------------------- null block (issue 12)
def test_null_block_two_calls_preempt_once():
    """num_gpu_blocks_override = 6, blocks of 16: V1 keeps the null block, 5 are usable.

    Both 32-token prompts take 2 blocks (4 used). Their first decode step needs a 3rd block each
    (33 tokens): the first gets the last free block, the second must preempt -- one preemption.
    With 7 blocks (6 usable) both fit; V0 has no null block, so 6 blocks suffice there.
    """
    r, _ = _run("two32", {"num_gpu_blocks_override": 6, "block_size": 16})
    assert r.summary["num_preemptions"] == 1
    r, _ = _run("two32", {"num_gpu_blocks_override": 7, "block_size": 16})
    assert r.summary["num_preemptions"] == 0
    r, _ = _run("two32", {"num_gpu_blocks_override": 6, "block_size": 16, "scheduler": "v0"})
    assert r.summary["num_preemptions"] == 0


def test_call_that_never_fits_is_rejected():
    """60 + 4 tokens: KV for 63 of them (never for the last sampled token) = ceil(63/16) = 4 blocks.
    N = 4 leaves 3 usable blocks in V1: vLLM could never run it; N = 5 can."""
    assert not call_fits(64, 16, 4) and call_fits(64, 16, 5)
    assert call_fits(65 - 1, 16, 5) and not call_fits(66, 16, 5)  # 65 KV tokens need 5 blocks
    with pytest.raises(ConfigError, match="needs 4 KV blocks of 16 tokens; an engine can give one call 3 of its 4"):
        _run("sixty", {"num_gpu_blocks_override": 4, "block_size": 16})
    _, c = _run("sixty", {"num_gpu_blocks_override": 5, "block_size": 16})
    assert c["num_generated_tokens"].tolist() == [4]


def test_single_block_v1_engine_is_refused():
    with pytest.raises(ConfigError, match="null block"):
        Simulation(_cfg("sixty", {"num_gpu_blocks_override": 1}), profile=constant_profile(STEP))


def test_live_engine_needs_room_beside_the_null_block_and_v1():
    """vLLM refuses to start when one max_model_len request does not fit the blocks left after the
    null block (``get_kv_cache_configs``): 1024 tokens in blocks of 32 need 32 blocks, so an override
    of 32 is refused and 33 starts. V0 settings are simulator-only."""
    from agentsim.live.runner import LiveSettings, engine_specs

    def specs(**eng):
        cfg = load_config(None, {"cluster.gpus_per_node": 1, "cluster.engine": dict(block_size=32, max_model_len=1024, **eng)})
        return engine_specs(cfg, LiveSettings(local_nodes=1), "m", "t", None)

    with pytest.raises(ConfigError, match="null block"):
        specs(num_gpu_blocks_override=32)
    assert specs(num_gpu_blocks_override=33)[0]["num_gpu_blocks_override"] == 33
    with pytest.raises(ConfigError, match="simulator-only"):
        specs(vllm_version="0.6")


def test_kv_usage_counts_usable_blocks():
    """2 used blocks of num_gpu_blocks = 5: vLLM reports 2 / (5 - 1) = 0.50."""
    pool = BlockPool(5, LRUFreeQueue())
    blocks = pool.allocate(2, 0.0, 0, 0, 0)
    assert pool.usage == 0.5 and pool.num_free == 2
    assert [b.block_id for b in blocks] == [1, 2]  # block 0 is the null block
    sim = Simulation(_cfg("sixty", {"num_gpu_blocks_override": 5}), profile=constant_profile(STEP))
    engine = sim.engines[0]
    engine.pool.allocate(2, 0.0, 0, 0, 0)
    assert engine.kv_usage == 0.5 and engine.num_free_blocks == 2 and engine.num_total_blocks == 4
    v0 = Simulation(_cfg("sixty", {"num_gpu_blocks_override": 5, "scheduler": "v0"}), profile=constant_profile(STEP))
    v0.engines[0].pool.allocate(2, 0.0, 0, 0, 0)
    assert v0.engines[0].kv_usage == 0.4  # V0's block manager reserves no block


# ---------------------------------------------------------------------------- presets and budgets
def test_version_presets_and_budget_defaults():
    """V0 defaults (``vllm/config.py`` SchedulerConfig, v0.6): max(max_model_len, 2048) tokens per
    step without chunked prefill, 512 with it; prefix caching off. V1 stays the default."""
    assert (EngineLimits().scheduler, EngineLimits().max_num_batched_tokens) == ("v1", 8192)
    e = EngineLimits(vllm_version="0.6", max_model_len=1024)
    assert (e.scheduler, e.enable_chunked_prefill, e.enable_prefix_caching) == ("v0", False, False)
    assert e.max_num_batched_tokens == 2048
    assert EngineLimits(vllm_version="0.6", max_model_len=16384).max_num_batched_tokens == 16384
    assert EngineLimits(scheduler="v0", enable_chunked_prefill=True, max_model_len=4096).max_num_batched_tokens == 512
    # multi-step with chunked prefill does not chunk prompts: the budget holds a whole one
    assert EngineLimits(scheduler="v0", enable_chunked_prefill=True, num_scheduler_steps=8,
                        max_model_len=4096).max_num_batched_tokens == 4096
    # unset max_model_len: the profile's model decides (Llama-3-8B: 8192)
    sim = Simulation(_cfg("three", {"vllm_version": "0.6"}), profile=constant_profile(STEP))
    assert sim.engines[0].limits.max_num_batched_tokens == 8192
    # explicit values win over the preset
    e = EngineLimits(vllm_version="0.6", enable_prefix_caching=True, max_num_batched_tokens=4096)
    assert (e.enable_prefix_caching, e.max_num_batched_tokens) == (True, 4096)
    with pytest.raises(ConfigError, match="vllm_version"):
        load_config(None, {"cluster.engine": {"vllm_version": "0.5"}})
    with pytest.raises(ConfigError, match="cluster.engine.scheduler"):
        load_config(None, {"cluster.engine": {"scheduler": "v2"}})


def test_v0_watermark_holds_back_admission():
    """V0 admits a prompt only if ``int(0.01 * num_gpu_blocks)`` blocks stay free afterwards
    (``BlockSpaceManager.can_allocate``). 100 blocks of 16 tokens: watermark 1, no null block.
    A's prompt takes 60 blocks (40 free). B of 39 blocks leaves 1 free: admitted with A, both done
    in step 1. B of 40 blocks would leave 0: it waits for A (step 1) and runs in step 2. V1 (99
    usable blocks, no watermark) admits the 39-block B; a 40-block B waits there too (39 free)."""
    from agentsim.sim.kv import v0_watermark_blocks

    assert [v0_watermark_blocks(n) for n in (99, 100, 199, 200)] == [0, 1, 1, 2]
    v0 = {"scheduler": "v0", "num_gpu_blocks_override": 100, "block_size": 16}
    _, c = _run("blocks60+39", v0)
    assert _times(c["finish_at"]) == [1, 1]
    _, c = _run("blocks60+40", v0)
    assert _times(c["finish_at"]) == [1, 2]
    v1 = {"scheduler": "v1", "num_gpu_blocks_override": 100, "block_size": 16}
    assert _times(_run("blocks60+39", v1)[1]["finish_at"]) == [1, 1]
    assert _times(_run("blocks60+40", v1)[1]["finish_at"]) == [1, 2]


# ---------------------------------------------------------------------------- fast-forward
@pytest.mark.parametrize("engine", [
    {"scheduler": "v0", "num_gpu_blocks_override": 400},
    {"scheduler": "v0", "enable_chunked_prefill": True, "num_gpu_blocks_override": 400},
    {"scheduler": "v0", "num_scheduler_steps": 8, "num_gpu_blocks_override": 400},
    {"scheduler": "v0", "enable_chunked_prefill": True, "num_scheduler_steps": 4, "enable_prefix_caching": True},
])
def test_fast_forward_identical_to_step_by_step_v0(engine):
    base = {"cluster.profile": ROOFLINE, "duration": 60.0, "seed": 5, "cluster.gpus_per_node": 1,
            "workload.agents": 24, "cluster.engine": engine,
            "workload.mix": [{"generator": "react"}, {"generator": "chat", "params": {"think_time_median": 2.0}}]}
    on = run(load_config(None, {**base, "sim.fast_forward": True}))
    off = run(load_config(None, {**base, "sim.fast_forward": False}))
    assert off.stats["num_ff_windows"] == 0
    if engine.get("num_scheduler_steps", 1) == 1:
        assert on.stats["num_ff_windows"] > 0
    assert on.stats["num_steps"] == off.stats["num_steps"]
    for name in ("calls", "programs", "engines"):
        pd.testing.assert_frame_equal(getattr(on, name), getattr(off, name), check_exact=True)
    assert on.summary == off.summary
    if "num_gpu_blocks_override" in engine:
        assert on.summary["num_preemptions"] > 0  # the scenario really exercises preemption

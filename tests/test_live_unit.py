"""Live-driver pieces that need no engine: token mapping, priorities, views, compare, HTTP helpers.

These import neither Ray nor vLLM (except the block-hash test, which uses vLLM's own hash
function in this process and needs no engine).
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from agentsim import metrics as M
from agentsim.errors import ConfigError
from agentsim.live.compare import compare_runs, load_run
from agentsim.live.driver import PRIORITY_SCALE, call_extra_args, priority_for
from agentsim.live.http import flatten_extra_args, parse_prometheus, unflatten_extra_args
from agentsim.live.tokens import CHUNK, TokenMapper
from agentsim.live.views import LiveCall, LiveEngineView
from agentsim.policies.baseline import FCFS, LeastLoaded
from agentsim.workload import CallHints, Context, Segment


def test_importing_live_needs_neither_vllm_nor_ray():
    code = ("import sys; import agentsim.live, agentsim.live.cli, agentsim.live.driver, agentsim.live.runner, "
            "agentsim.live.compare, agentsim.live.cluster, agentsim.live.engine, agentsim.live.http, "
            "agentsim.live.tokens, agentsim.live.views, agentsim.live.compat, agentsim.live.tiny_model; "
            "bad = [m for m in ('vllm', 'ray', 'torch') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ----------------------------------------------------------------------------- tokens
def test_segment_tokens_are_deterministic_prefixes_and_in_range():
    a, b = TokenMapper(4, 260), TokenMapper(4, 260)
    long = a.segment_tokens(12345, 3 * CHUNK + 17)
    assert len(long) == 3 * CHUNK + 17
    assert long.min() >= 4 and long.max() < 260
    # a shorter use is exactly a prefix, in another mapper (process) too
    for n in (1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 5):
        assert np.array_equal(b.segment_tokens(12345, n), long[:n])
    # different segments differ
    assert not np.array_equal(a.segment_tokens(12346, 64), long[:64])


def test_prompt_concatenates_segments_and_reuses_registered_outputs():
    tm = TokenMapper(4, 1000)
    sys_seg, user, out_seg = Segment(1 << 61, 40), Segment((7 << 20) | 1, 30), Segment((7 << 20) | 2, 5)
    ctx = Context.of(sys_seg, user)
    p1 = tm.prompt(ctx)
    assert len(p1) == 70 and p1[:40] == tm.segment_tokens(sys_seg.seg_id, 40).tolist()
    generated = [900, 901, 902, 903, 904, 905]
    tm.register_output(7, out_seg.seg_id, generated)
    p2 = tm.prompt(ctx.extend(out_seg))
    assert p2[:70] == p1 and p2[70:] == generated[:5]
    tm.drop_program(7)
    assert tm.num_outputs == 0
    assert tm.prompt(ctx.extend(out_seg))[70:] != generated[:5]


def test_token_range_must_not_be_empty():
    with pytest.raises(ValueError):
        TokenMapper(10, 10)


def test_vllm_block_hasher_chains_like_vllm():
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils

    from agentsim.live.tokens import VllmBlockHasher, engine_probe_hash

    h = VllmBlockHasher(4, "sha256")
    assert h.probe() == engine_probe_hash(4, "sha256")
    ctx = Context.of(Segment(11, 6), Segment(12, 5))  # 11 tokens: 2 full blocks of 4
    toks = list(range(100, 111))
    ash = ctx.block_hashes(4)
    got = h.map_context(ash, toks)
    kv_cache_utils.init_none_hash(sha256)
    b0 = kv_cache_utils.hash_block_tokens(sha256, None, toks[0:4])
    b1 = kv_cache_utils.hash_block_tokens(sha256, b0, toks[4:8])
    assert got == [bytes(b0), bytes(b1)]
    assert h.lookup(ash[1]) == bytes(b1) and len(h) == 2
    hi = VllmBlockHasher(4, "sha256", int_hashes=True)  # as vLLM publishes with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES
    assert hi.map_context(ash, toks) == [int.from_bytes(bytes(b), "big") & (2**64 - 1) for b in (b0, b1)]


# ----------------------------------------------------------------------------- priorities
def _call(arrival: float, prompt: int = 10) -> LiveCall:
    return LiveCall(1, 2, 3, 0, "react", arrival, 0.0, Context.of(Segment(5, prompt)), 4, CallHints(), (), 9)


def test_fcfs_priority_keeps_arrival_order():
    ps = [priority_for(FCFS(), _call(t), t) for t in (0.0001, 0.0019, 0.5, 12.25)]
    assert ps == sorted(ps) and ps[-1] == math.floor(12.25 * PRIORITY_SCALE)


def test_priority_from_tuple_keys():
    class Levels:
        dynamic = False
        preemptive = False

        def key(self, call, now):
            return (2, call.arrival_at)

    assert priority_for(Levels(), _call(1.0), 1.0) == 2000


def test_extra_args_are_primitive_and_round_trip_over_http():
    call = _call(1.5)
    call.hints = CallHints(tool_after="web_search", next_invocation_distance=2.5)
    xa = call_extra_args(call, 1.5, 1.5)
    assert json.loads(json.dumps(xa)) == xa
    meta = xa["agentsim"]
    assert meta["hints"] == {"tool_after": "web_search", "next_invocation_distance": 2.5}
    flat = flatten_extra_args(xa)
    assert all(not isinstance(v, dict) for v in flat.values())
    back = unflatten_extra_args(flat)
    assert back["hints"] == meta["hints"] and back["program_id"] == meta["program_id"]


# ----------------------------------------------------------------------------- views
def test_engine_view_counts_and_kv_events():
    from agentsim.policies.base import CallView, EngineView

    class Hasher:
        def __init__(self):
            self.m = {1: b"a", 2: b"b", 3: b"c"}

        def lookup(self, h):
            return self.m.get(h)

    v = LiveEngineView(0, 1, 32, 100, max_num_seqs=2, hasher=Hasher())
    assert isinstance(v, EngineView) and isinstance(_call(0.0), CallView)
    calls = [_call(0.0, 50) for _ in range(3)]
    for i, c in enumerate(calls):
        c.call_id = i
        v.add(c)
    assert (v.num_running, v.num_waiting, v.num_outstanding_tokens) == (2, 1, 3 * (50 + 4))
    v.remove(calls[0])
    assert (v.num_running, v.num_waiting) == (2, 0)
    v.apply_events([("S", [b"a", b"b"]), ("S", [b"c"]), ("R", [b"b"])])
    assert v.num_cached_prefix_blocks([1, 2, 3]) == 1
    v.apply_events([("S", [b"b"])])
    assert v.num_cached_prefix_blocks([1, 2, 3]) == 3
    v.apply_events([("C", [])])
    assert v.num_cached_prefix_blocks([1, 2, 3]) == 0
    v.reported = {"kv_usage": 0.25}
    assert v.num_free_blocks == 75
    assert LeastLoaded().route(calls[1], [v, LiveEngineView(1, 1, 32, 100, 2)], 0.0) == 1


def test_call_row_matches_schema_and_definitions():
    c = _call(1.0, 100)
    c.status, c.scheduled_at, c.first_token_at, c.finish_at, c.num_generated = "finished", 1.1, 1.2, 1.5, 4
    c.num_cached_tokens = 64
    df = pd.DataFrame([c.row()], columns=[n for n, _ in M.CALL_COLUMNS])
    row = df.iloc[0]
    assert row.ttft == pytest.approx(0.2) and row.e2e == pytest.approx(0.5) and row.tpot == pytest.approx(0.1)
    assert row.queue_time == pytest.approx(0.1) and row.num_computed_prompt_tokens == 36


# ----------------------------------------------------------------------------- compare
def _fake_run(path, ttft_scale: float, policy: str, complete: bool = True):
    rng = np.random.default_rng(0)
    calls = M.ColumnStore(M.CALL_COLUMNS)
    for i in range(20):
        ttft = float(rng.uniform(0.01, 0.05)) * ttft_scale
        calls.append((i, i // 4, i // 4, 0, "react", i % 2, 0, float(i), float(i) + 0.001, float(i) + ttft,
                      float(i) + ttft + 0.1, 0.001, ttft, 0.01, ttft + 0.1, 100, 50, 50, 11, 11, 0, 0, 0.1, "finished",
                      0, 0.0))
    progs = M.ColumnStore(M.PROGRAM_COLUMNS)
    for p in range(5):
        progs.append((p, p, "react", float(p), float(p) + 2, 2.0, 4, 3, 400, 44, 0.5, 1.5, 2.0, 2.0 / 44, "finished",
                      0.0))
    c, p, e = calls.to_frame(), progs.to_frame(), M.empty_frame(M.ENGINE_COLUMNS)
    s = M.summarize(c, p, e, 20.0)
    M.write_results(path, c, p, e, s, {"backend": "sim", "policy": policy, "seed": 0, "complete": complete})
    return s


def test_compare_reports_relative_differences(tmp_path):
    sa = _fake_run(tmp_path / "a", 1.0, "vllm")
    sb = _fake_run(tmp_path / "b", 2.0, "least-loaded", complete=False)
    df = compare_runs(tmp_path / "a", tmp_path / "b").set_index("metric")
    assert df.loc["median_ttft_ms", "a"] == pytest.approx(sa["median_ttft_ms"])
    assert df.loc["median_ttft_ms", "rel_diff"] == pytest.approx(1.0)
    assert df.loc["mean_ttft_ms", "rel_diff"] == pytest.approx(1.0)  # means are compared too
    assert df.loc["median_tpot_ms", "rel_diff"] == pytest.approx(0.0)
    assert df.loc["prefix_hit_rate", "b"] == pytest.approx(0.5)
    assert math.isnan(df.loc["num_preemptions", "rel_diff"])  # 0 -> 0 has no relative difference
    assert df.loc["num_retries", "a"] == 0  # recomputed from calls.parquet when the summary lacks it
    from agentsim.live.compare import describe

    assert "INCOMPLETE" in describe(load_run(tmp_path / "b")) and "least-loaded" in describe(load_run(tmp_path / "b"))


def test_compare_rejects_non_result_dirs_and_unknown_metrics(tmp_path):
    _fake_run(tmp_path / "a", 1.0, "vllm")
    with pytest.raises(ConfigError, match="no summary.json"):
        compare_runs(tmp_path, tmp_path / "a")
    with pytest.raises(ConfigError, match="no such result directory"):
        load_run(tmp_path / "missing")
    with pytest.raises(ConfigError, match="unknown metric"):
        compare_runs(tmp_path / "a", tmp_path / "a", ["p42_ttft_ms"])


# ----------------------------------------------------------------------------- misc
def test_prometheus_parsing_sums_label_sets():
    text = ('# HELP x\nvllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
            'vllm:num_requests_running{engine="1",model_name="m"} 2.0\nvllm:kv_cache_usage_perc{engine="0"} 0.5\n'
            'other_metric 7\n')
    m = parse_prometheus(text)
    assert m == {"vllm:num_requests_running": 5.0, "vllm:kv_cache_usage_perc": 0.5}


def test_vllm_version_pin():
    from agentsim.live.compat import check_ray, check_vllm

    assert check_vllm("0.32.0") == "0.32.0" and check_vllm("0.32.3+cpu") == "0.32.3+cpu"
    with pytest.raises(ConfigError, match="outside the supported range"):
        check_vllm("0.33.0")
    with pytest.raises(ConfigError, match="outside the supported range"):
        check_vllm("0.31.9")
    with pytest.raises(ConfigError, match="too old"):
        check_ray("2.30.0")


def test_tiny_model_is_made_offline_and_idempotent(tmp_path):
    from agentsim.live.tiny_model import make_tiny_llama

    p = make_tiny_llama(tmp_path / "m", head_dim=32)
    cfg = json.loads((p / "config.json").read_text())
    assert cfg["vocab_size"] == 260 and cfg["head_dim"] == 32 and cfg["architectures"] == ["LlamaForCausalLM"]
    mtime = (p / "config.json").stat().st_mtime_ns
    assert make_tiny_llama(tmp_path / "m", head_dim=32) == p and (p / "config.json").stat().st_mtime_ns == mtime
    tok = json.loads((p / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) == 260
    with pytest.raises(ValueError, match="head_dim"):
        make_tiny_llama(tmp_path / "bad", head_dim=48)


def test_runner_rejects_cpu_unfriendly_block_size_and_tiny_kv():
    from agentsim.config import load_config
    from agentsim.live.runner import LiveSettings, check_cpu_limits, engine_specs

    with pytest.raises(ConfigError, match="cluster.engine.block_size"):
        check_cpu_limits(load_config(None, {"cluster.engine.block_size": 16}))
    cfg = load_config(None, {"cluster.engine.block_size": 32, "cluster.engine.num_gpu_blocks_override": 8,
                             "cluster.engine.max_model_len": 1024})
    with pytest.raises(ConfigError, match="num_gpu_blocks_override"):
        engine_specs(cfg, LiveSettings(local_nodes=1), "m", "t", None)
    with pytest.raises(ConfigError, match="only one of"):
        LiveSettings(local_nodes=2, address="auto")
    cfg = load_config(None, {"cluster.num_nodes": 2, "cluster.gpus_per_node": 2, "cluster.engine.block_size": 32})
    specs = engine_specs(cfg, LiveSettings(local_nodes=2), "m", "t", None)
    assert [(s["engine_id"], s["node_id"]) for s in specs] == [(0, 0), (1, 0), (2, 1), (3, 1)]

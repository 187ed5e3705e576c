"""``trace inspect``: statistics checked against independent counts over the source files."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from agentsim.traces.canonical import ProgramRecord, Step
from agentsim.traces.importers import get_importer
from agentsim.traces.stats import PrefixCache, inspect_programs

DATA = Path(__file__).resolve().parents[1] / "traces" / "data"
MOONCAKE = DATA / "mooncake" / "conversation_first600s.jsonl.gz"
TRACELAB_CSV = DATA / "tracelab" / "replay_examples_multi_session_large.csv"
TRACELAB_ROUNDS = DATA / "tracelab" / "sanitized_round_trace.jsonl"


def inspect_file(path, **opts) -> dict:
    imp = get_importer(path, **opts)
    return inspect_programs(imp.programs(), imp.meta)


def test_mooncake_prefix_reuse_equals_an_independent_count():
    # The test's own loop: k = leading run of already-seen hash_ids; an unbounded cache serves
    # min(512 k, input_length) tokens (a partial last block counts only up to the prompt's end).
    seen: set[int] = set()
    served = total = 0
    rows = []
    with gzip.open(MOONCAKE, "rt") as f:
        for line in f:
            r = json.loads(line)
            rows.append(r)
            k = 0
            for h in r["hash_ids"]:
                if h not in seen:
                    break
                k += 1
            served += min(512 * k, r["input_length"])
            total += r["input_length"]
            seen.update(r["hash_ids"])
    st = inspect_file(MOONCAKE)
    assert st["prefix_reusable_tokens"] == served and st["prompt_tokens_total"] == total
    assert st["prefix_reuse"] == served / total
    assert round(st["prefix_reuse"], 3) == 0.289  # research/traces.md §2.1
    # the other headline numbers, against numpy over the raw rows
    n_in = np.array([r["input_length"] for r in rows])
    n_out = np.array([r["output_length"] for r in rows])
    assert st["num_programs"] == st["num_llm_calls"] == 1750 and st["num_tool_calls"] == 0
    assert st["duration_s"] == 597.0 and st["arrival_rate_programs_s"] == 1750 / 597.0
    assert st["input_tokens"]["p50"] == np.percentile(n_in, 50) and st["input_tokens"]["max"] == 123_192
    assert st["output_tokens"]["p99"] == np.percentile(n_out, 99) and st["output_tokens"]["mean"] == n_out.mean()
    assert st["calls_per_program"]["max"] == 1


def test_reuse_is_the_same_with_sessions_and_spread():
    base = inspect_file(MOONCAKE)["prefix_reusable_tokens"]
    assert inspect_file(MOONCAKE, sessions=True)["prefix_reusable_tokens"] == base
    assert inspect_file(MOONCAKE, spread=True)["prefix_reusable_tokens"] == base


def test_tracelab_csv_reuse_is_the_planned_hit():
    rows = list(csv.DictReader(TRACELAB_CSV.open()))
    prefix = sum(int(r["prefix_len"]) for r in rows)
    new = sum(int(r["input_len"]) for r in rows)
    st = inspect_file(TRACELAB_CSV)
    # the prefixes are cumulative-consistent, so an unbounded cache serves exactly prefix_len
    assert st["prefix_reusable_tokens"] == prefix and st["prompt_tokens_total"] == prefix + new
    assert round(st["prefix_reuse"], 3) == 0.817
    assert st["num_programs"] == 48 and st["num_llm_calls"] == 303
    assert st["calls_per_program"]["min"] == 3 and st["calls_per_program"]["max"] == 9


def test_tool_time_share_needs_recorded_llm_times():
    st = inspect_file(TRACELAB_ROUNDS)
    rows = [json.loads(x) for x in TRACELAB_ROUNDS.read_text().splitlines()]
    tool = sum(s["tool_wall_latency_ms"] for r in rows for s in r["tools"]) / 1000
    humans = st["tools"]["human"]
    assert st["tool_time_total_s"] == pytest.approx(tool + humans["count"] * humans["mean_s"])
    assert 0 < st["tool_time_share"] < 1
    assert inspect_file(TRACELAB_CSV)["tool_time_share"] is None  # no recorded LLM durations


def _llm(i, ids, toks, out=1, out_id=-1):
    return Step(i, "llm", 0, (i - 1,) if i else (), tuple(ids), tuple(toks), out, out_id)


def test_prefix_cache_is_token_accurate():
    c = PrefixCache()
    assert c.match((1, 2), (512, 100)) == 0
    c.insert((1, 2), (512, 100))
    assert c.match((1, 2), (512, 100)) == 612          # the same prompt
    assert c.match((1, 2), (512, 60)) == 572           # a shorter use of the last piece is a prefix of it
    assert c.match((1, 2, 3), (512, 100, 9)) == 612    # extends a cached prompt
    assert c.match((1, 2, 3), (512, 200, 9)) == 612    # a longer piece matches only as far as seen
    assert c.match((1, 3), (512, 100)) == 512          # diverges after the first piece
    assert c.match((2, 1), (100, 512)) == 0            # content ids only match at the same prefix
    # outputs are cached with their prompt (vLLM caches generated blocks)
    p = ProgramRecord(0, 0.0, "x", "k", [_llm(0, (5,), (40,), 10, 6), _llm(1, (5, 6, 7), (40, 10, 3))])
    st = inspect_programs([p])
    assert st["prefix_reusable_tokens"] == 50 and st["prompt_tokens_total"] == 93

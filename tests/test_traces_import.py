"""Importers: each format's semantics checked against the source file, and bad input handling."""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from agentsim.errors import ConfigError, TraceError
from agentsim.traces.importers import get_importer, import_trace, load_trace, sniff_format

DATA = Path(__file__).resolve().parents[1] / "traces" / "data"
MOONCAKE = DATA / "mooncake" / "conversation_first600s.jsonl.gz"
AZURE = DATA / "azure-llm-2023" / "conv_first600s.csv.gz"
TAU2 = DATA / "tau2-bench" / "gpt-4.1_airline_1trial.json.gz"
TRACELAB_ROUNDS = DATA / "tracelab" / "sanitized_round_trace.jsonl"
TRACELAB_CSV = DATA / "tracelab" / "replay_examples_multi_session_large.csv"


def _lines(path: Path) -> list[str]:
    with gzip.open(path, "rt") as f:
        return f.read().splitlines()


def mooncake_rows() -> list[dict]:
    return [json.loads(x) for x in _lines(MOONCAKE)]


# --------------------------------------------------------------------------- format detection, gzip
def test_sniff_format():
    assert sniff_format(MOONCAKE) == "mooncake"
    assert sniff_format(AZURE) == "azure"
    assert sniff_format(TAU2) == "tau2"
    assert sniff_format(TRACELAB_ROUNDS) == "tracelab"
    assert sniff_format(TRACELAB_CSV) == "tracelab"


def test_gzip_and_plain_give_the_same_trace(tmp_path):
    plain = tmp_path / "m.jsonl"
    with gzip.open(MOONCAKE, "rb") as f:
        plain.write_bytes(f.read())
    a, b = load_trace(MOONCAKE), load_trace(plain)
    assert a.programs == b.programs


# --------------------------------------------------------------------------- mooncake
def test_mooncake_requests_map_to_512_token_pieces():
    rows = mooncake_rows()
    trace = load_trace(MOONCAKE)
    assert len(trace.programs) == len(rows) == 1750
    for r, p in zip(rows, trace.programs):
        (s,) = p.steps
        assert p.arrival_at == r["timestamp"] / 1000
        assert list(s.seg_ids) == r["hash_ids"]
        assert s.input_tokens == r["input_length"] and s.output_tokens == r["output_length"]
        assert all(n == 512 for n in s.seg_tokens[:-1]) and 1 <= s.seg_tokens[-1] <= 512


def test_mooncake_spread_keeps_order_and_buckets():
    rows = mooncake_rows()
    spread = load_trace(MOONCAKE, spread=True).programs
    ts = sorted({r["timestamp"] for r in rows})
    nxt = {t: u for t, u in zip(ts, ts[1:])}
    arrivals = [p.arrival_at for p in spread]
    assert arrivals == sorted(arrivals)
    per_bucket = Counter(r["timestamp"] for r in rows)
    for r, p in zip(rows, spread):
        t = r["timestamp"]
        hi = nxt.get(t, t + (ts[-1] - ts[-2]))
        assert t / 1000 <= p.arrival_at < hi / 1000
    # a bucket of k requests is spread at width/k steps: the first stays, the rest are distinct
    assert len(set(arrivals)) == len(arrivals)
    assert max(per_bucket.values()) > 1


def test_mooncake_sessions_rebuild_prefix_chains():
    rows = mooncake_rows()
    # the test's own chain rebuild: parent = latest earlier holder of the last reused block, >= 2 blocks
    holder, parent = {}, []
    for i, r in enumerate(rows):
        k = 0
        for h in r["hash_ids"]:
            if h not in holder:
                break
            k += 1
        parent.append(holder[r["hash_ids"][k - 1]] if k >= 2 else -1)
        for h in r["hash_ids"]:
            holder[h] = i
    with_parent = sum(p >= 0 for p in parent)
    trace = load_trace(MOONCAKE, sessions=True)
    assert with_parent == 477  # research/traces.md §2.1
    assert len(trace.programs) == len(rows) - with_parent == 1273
    assert sum(len([s for s in p.steps if s.kind == "llm"]) for p in trace.programs) == len(rows)
    assert max(len([s for s in p.steps if s.kind == "llm"]) for p in trace.programs) == 13
    humans = [s for p in trace.programs for s in p.steps if s.kind == "tool"]
    assert len(humans) == with_parent and {s.tool_name for s in humans} == {"human"}
    # each think step lasts the gap between the parent's and the child's timestamps
    gaps = sorted(rows[i]["timestamp"] - rows[parent[i]]["timestamp"] for i in range(len(rows)) if parent[i] >= 0)
    assert sorted(round(s.tool_time * 1000) for s in humans) == gaps


# --------------------------------------------------------------------------- azure
def test_azure_rows_keep_exact_offsets():
    lines = _lines(AZURE)
    trace = load_trace(AZURE)
    assert len(trace.programs) == len(lines) - 1 == 2867
    from agentsim.traces.azure import parse_timestamp_ns

    t0, _ = parse_timestamp_ns(lines[1].split(",")[0])
    for line, p in zip(lines[1:], trace.programs):
        ts, ctx, gen = line.split(",")
        ns, digits = parse_timestamp_ns(ts)
        assert digits == 7 and round(p.arrival_at * 1e9) == ns - t0
        assert p.steps[0].input_tokens == int(ctx) and p.steps[0].output_tokens == int(gen)
    assert len({p.steps[0].seg_ids for p in trace.programs}) == len(trace.programs)  # no sharing claimed


# --------------------------------------------------------------------------- tau2
def test_tau2_reproduces_calls_and_tokens():
    with gzip.open(TAU2, "rt") as f:
        doc = json.load(f)
    calls = [m["usage"] for s in doc["simulations"] for m in s["messages"] if m.get("usage")]
    tools = [m for s in doc["simulations"] for m in s["messages"] if m["role"] == "tool"]
    agent = [m for s in doc["simulations"] for m in s["messages"] if m.get("usage") and m["role"] == "assistant"]
    trace = load_trace(TAU2)
    llm = [s for p in trace.programs for s in p.steps if s.kind == "llm"]
    assert len(trace.programs) == len(doc["simulations"]) == 20
    assert len(llm) == len(calls) == 342 and len(agent) == 206
    assert sum(s.input_tokens for s in llm) == sum(u["prompt_tokens"] for u in calls)
    assert sum(s.output_tokens for s in llm) == sum(u["completion_tokens"] for u in calls)
    assert sum(s.agent_id % 2 == 0 for s in llm) == 206
    assert sum(s.kind == "tool" for p in trace.programs for s in p.steps) == len(tools) == 148
    # per simulation, in message order, the same token counts
    for sim, p in zip(doc["simulations"], trace.programs):
        want = [(m["usage"]["prompt_tokens"], m["usage"]["completion_tokens"]) for m in sim["messages"] if m.get("usage")]
        assert [(s.input_tokens, s.output_tokens) for s in p.steps if s.kind == "llm"] == want
        assert p.key == sim["id"]


def test_tau2_prompts_grow_by_turns():
    trace = load_trace(TAU2)
    fractions = []
    for p in trace.programs:
        last: dict[int, object] = {}
        for s in p.steps:
            if s.kind != "llm":
                continue
            prev = last.get(s.agent_id)
            if prev is not None:
                hist_ids = prev.seg_ids + (prev.output_seg_id,)
                hist_tok = prev.seg_tokens + (prev.output_tokens,)
                k = len(hist_ids)
                assert s.seg_ids[:k] == hist_ids and s.seg_tokens[:k] == hist_tok  # prompt = history + new turn
                if s.agent_id % 2 == 0:
                    fractions.append(sum(hist_tok) / s.input_tokens)
            last[s.agent_id] = s
    assert len(fractions) == 186
    assert abs(sum(fractions) / len(fractions) - 0.958) < 0.001  # research/traces.md §2.3


# --------------------------------------------------------------------------- tracelab
def test_tracelab_rounds_tools_and_joins():
    rows = [json.loads(x) for x in TRACELAB_ROUNDS.read_text().splitlines()]
    trace = load_trace(TRACELAB_ROUNDS)
    assert len(trace.programs) == 2
    llm = [s for p in trace.programs for s in p.steps if s.kind == "llm"]
    assert sorted((s.input_tokens, s.output_tokens) for s in llm) == sorted(
        (r["input_tokens_total"], r["output_tokens"]) for r in rows)
    tools = [s for p in trace.programs for s in p.steps if s.kind == "tool" and s.tool_name != "human"]
    assert sorted(s.tool_time for s in tools) == sorted(t["tool_wall_latency_ms"] / 1000 for r in rows for t in r["tools"])
    # a round's tools run in parallel after its LLM step; the next round waits for all of them
    codex = next(p for p in trace.programs if p.key.startswith("codex"))
    first = codex.steps[0]
    kids = [s for s in codex.steps if s.parents == (first.step_id,)]
    assert len(kids) == 3 and all(s.kind == "tool" for s in kids)
    nxt = next(s for s in codex.steps if s.kind == "llm" and s.step_id > first.step_id)
    assert nxt.parents == tuple(k.step_id for k in kids)
    # cached mode: the shared prefix is the trace's prefix_tokens (capped by the previous history)
    round1 = next(r for r in rows if r["session_id"] == codex.key and r["round_index"] == 1)
    assert nxt.seg_ids[:2] == first.seg_ids and sum(nxt.seg_tokens[:-1]) == round1["prefix_tokens"]


def test_tracelab_csv_prompts_follow_prefix_len():
    import csv

    rows = list(csv.DictReader(TRACELAB_CSV.open()))
    trace = load_trace(TRACELAB_CSV)
    assert len(trace.programs) == 48
    by_session = {p.key: [s for s in p.steps if s.kind == "llm"] for p in trace.programs}
    for r in rows:
        s = by_session[r["session_id"]][int(r["round_idx"])]
        assert s.input_tokens == int(r["prefix_len"]) + int(r["input_len"])
        assert s.output_tokens == int(r["output_len"])
    waits = [s.tool_time for p in trace.programs for s in p.steps if s.kind == "tool"]
    assert sorted(waits) == sorted(int(r["tool_wait_after_ms"]) / 1000 for r in rows if int(r["tool_wait_after_ms"]) > 0)
    t0 = min(int(r["arrival_time"]) for r in rows)  # arrivals are relative to the first session
    assert {p.arrival_at for p in trace.programs} == {(int(r["arrival_time"]) - t0) / 1000 for r in rows}


# --------------------------------------------------------------------------- bad input
def _with_bad_line(tmp_path: Path, src: Path, line_no: int, bad: str, name: str) -> Path:
    lines = _lines(src) if src.suffix == ".gz" else src.read_text().splitlines()
    lines.insert(line_no - 1, bad)
    out = tmp_path / name
    out.write_text("\n".join(lines) + "\n")
    return out


BAD = [
    ("mooncake", MOONCAKE, 7, '{"timestamp": 0, "input_length": 1000, "output_length": 5, "hash_ids": [0]}',
     "hash_ids: has 1 ids but input_length 1000 needs ceil(1000/512) = 2", "m.jsonl"),
    ("mooncake", MOONCAKE, 3, '{"timestamp": 0, "input_length": 10', "malformed JSON", "m.jsonl"),
    ("mooncake", MOONCAKE, 5, '{"timestamp": -3, "input_length": 10, "output_length": 5, "hash_ids": [0]}',
     "timestamp: must be a number of ms >= 0", "m.jsonl"),
    ("azure", AZURE, 4, "2023-11-16 18:15:51.2224670,abc,55", "ContextTokens: must be an integer >= 1", "a.csv"),
    ("azure", AZURE, 9, "2023-11-16 25:15,1,1", "TIMESTAMP", "a.csv"),
    ("tracelab", TRACELAB_CSV, 6, "0,117,9,0,-5,10,0", "input_len: must be >= 0", "t.csv"),
    ("tracelab", TRACELAB_ROUNDS, 2, '{"session_id": "s", "round_index": 0, "input_tokens_total": 0}',
     "input_tokens_total: must be an integer >= 1", "t.jsonl"),
    ("native", None, 2, '{"steps": [{"kind": "llm", "segments": [[1, 10]], "output_tokens": 0}]}',
     "output_tokens must be an integer >= 1", "n.jsonl"),
]


@pytest.mark.parametrize("fmt,src,line,bad,match,name", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_line_fails_before_writing(tmp_path, fmt, src, line, bad, match, name):
    if src is None:
        src = tmp_path / "good.jsonl"
        src.write_text('{"steps": [{"kind": "llm", "segments": [[1, 10]], "output_tokens": 3}]}\n' * 3)
    path = _with_bad_line(tmp_path, src, line, bad, name)
    out = tmp_path / "out" / "t.parquet"
    with pytest.raises(TraceError) as e:
        import_trace(path, out, fmt)
    assert e.value.where == f"{path}:{line}" and match in e.value.message
    assert not out.exists() and (not out.parent.exists() or not list(out.parent.iterdir()))
    res = import_trace(path, out, fmt, skip_bad=True)
    assert res.num_skipped == 1 and f"{path}:{line}: " in res.skipped[0]
    assert out.exists() and [p.name for p in out.parent.iterdir()] == ["t.parquet"]


def test_tau2_bad_record_names_its_line(tmp_path):
    with gzip.open(TAU2, "rt") as f:
        text = f.read()
    doc = json.loads(text)
    doc["simulations"][3]["messages"][4]["usage"]["prompt_tokens"] = -1
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc, indent=2))
    lines = path.read_text().splitlines()
    with pytest.raises(TraceError) as e:
        import_trace(path, tmp_path / "o.parquet")
    line = int(e.value.where.rsplit(":", 1)[1])
    assert '"prompt_tokens": -1' in lines[line - 1]
    assert "simulations[3].messages[4].usage.prompt_tokens: must be an integer >= 1" in e.value.message
    assert not (tmp_path / "o.parquet").exists()
    res = import_trace(path, tmp_path / "o.parquet", skip_bad=True)
    assert res.num_skipped == 1 and res.num_programs == 19
    # malformed JSON: the decoder's line
    path.write_text(path.read_text().replace('"role": "tool"', '"role" "tool"', 1))
    bad_line = next(i for i, x in enumerate(path.read_text().splitlines(), 1) if '"role" "tool"' in x)
    with pytest.raises(TraceError) as e:
        import_trace(path, tmp_path / "p.parquet")
    assert e.value.where == f"{path}:{bad_line}" and not (tmp_path / "p.parquet").exists()


def test_importers_stream(tmp_path):
    """Programs come out before the end of the file is read (a bad last line fails after them)."""
    path = _with_bad_line(tmp_path, MOONCAKE, 1751, "not json", "m.jsonl")
    got = []
    with pytest.raises(TraceError, match=":1751"):
        for p in get_importer(path, "mooncake").programs():
            got.append(p.program_id)
    assert got == list(range(1750))


def test_unknown_format_and_options(tmp_path):
    with pytest.raises(ConfigError, match="unknown trace format 'csv'"):
        get_importer(AZURE, "csv")
    with pytest.raises(ConfigError, match="spread: not an option of the azure importer"):
        get_importer(AZURE, "azure", spread=True)
    with pytest.raises(ConfigError, match="prefix"):
        list(get_importer(TRACELAB_ROUNDS, "tracelab", prefix="sometimes").programs())
    with pytest.raises(TraceError, match="no such file"):
        get_importer(tmp_path / "missing.jsonl", "mooncake").programs().__next__()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TraceError, match="no programs"):
        import_trace(empty, tmp_path / "e.parquet", "mooncake")
    assert not (tmp_path / "e.parquet").exists()


def test_native_jsonl_defaults(tmp_path):
    src = tmp_path / "n.jsonl"
    src.write_text(
        '{"arrival_at": 2, "kind": "react", "steps": ['
        '{"kind": "llm", "segments": [[7, 100]], "output_tokens": 10, "output_seg_id": 8},'
        '{"kind": "tool", "tool_name": "search", "tool_time": 1.5},'
        '{"kind": "llm", "segments": [[7, 100], [8, 10], [9, 20]], "output_tokens": 5}]}\n'
        '{"arrival_at": 1, "steps": [{"segments": [[7, 50]], "output_tokens": 1, "hints": {"stage": "x"}}]}\n')
    t = load_trace(src)
    a, b = t.programs
    assert (a.program_id, a.kind, a.key, a.arrival_at) == (0, "react", "line 1", 2.0)
    assert [s.parents for s in a.steps] == [(), (0,), (1,)] and a.steps[2].input_tokens == 130
    assert (b.program_id, b.kind, b.steps[0].agent_id, b.steps[0].hints) == (1, "native", 1, '{"stage": "x"}')
    assert math.isclose(a.steps[1].tool_time, 1.5)


def test_failure_after_row_groups_were_written_leaves_nothing(tmp_path):
    """The writer flushes row groups as it goes (16,384 steps each); a late bad line removes them."""
    lines = _lines(MOONCAKE) * 11 + ["{not json"]
    src = tmp_path / "big.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.parquet"
    with pytest.raises(TraceError) as e:
        import_trace(src, out, "mooncake")
    assert e.value.where == f"{src}:{len(lines)}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]
    res = import_trace(src, out, "mooncake", skip_bad=True)
    assert res.num_programs == 1750 * 11 and res.num_skipped == 1
    import pyarrow.parquet as pq

    assert pq.ParquetFile(out).num_row_groups >= 2

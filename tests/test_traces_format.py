"""Canonical trace format: exact round trips, schema version, validation, and exports to source formats."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agentsim.errors import TraceError
from agentsim.traces.canonical import (META_KEY, SCHEMA, SCHEMA_VERSION, ProgramRecord, Step, Trace, iter_programs,
                                       read_meta, read_tables, write_trace)
from agentsim.traces.export import export
from agentsim.traces.importers import load_trace
from agentsim.traces.record import generate_programs

DATA = Path(__file__).resolve().parents[1] / "traces" / "data"
MOONCAKE = DATA / "mooncake" / "conversation_first600s.jsonl.gz"
AZURE = DATA / "azure-llm-2023" / "conv_first600s.csv.gz"
TAU2 = DATA / "tau2-bench" / "gpt-4.1_airline_1trial.json.gz"
TRACELAB_ROUNDS = DATA / "tracelab" / "sanitized_round_trace.jsonl"
TRACELAB_CSV = DATA / "tracelab" / "replay_examples_multi_session_large.csv"

IMPORTS = [
    ("mooncake", MOONCAKE, {}),
    ("mooncake-spread", MOONCAKE, {"spread": True}),
    ("mooncake-sessions", MOONCAKE, {"sessions": True}),
    ("azure", AZURE, {}),
    ("tau2", TAU2, {}),
    ("tracelab-rounds", TRACELAB_ROUNDS, {}),
    ("tracelab-rounds-append", TRACELAB_ROUNDS, {"prefix": "append"}),
    ("tracelab-csv", TRACELAB_CSV, {}),
]


@pytest.mark.parametrize("name,src,opts", IMPORTS, ids=[i[0] for i in IMPORTS])
def test_round_trip_parquet_is_exact(tmp_path, name, src, opts):
    """canonical -> Parquet -> canonical gives back the very same records and metadata."""
    trace = load_trace(src, **opts)
    assert trace.programs and trace.meta["schema_version"] == SCHEMA_VERSION
    path = trace.write(tmp_path / "t.parquet")
    back = Trace.read(path)
    assert back.meta == trace.meta
    assert back.programs == trace.programs
    # the step table round-trips too (native JSONL -> Parquet again is byte-level identical data)
    jl = export(back.meta, back.programs, tmp_path / "t.jsonl", "native")
    again = load_trace(jl, "native")
    assert again.meta == trace.meta and again.programs == trace.programs
    again.write(tmp_path / "t2.parquet")
    assert pq.read_table(tmp_path / "t2.parquet").equals(pq.read_table(path))


def test_round_trip_generator_recording(tmp_path):
    meta, progs = generate_programs("lats", None, 3, rate=2.0, seed=5)
    progs = list(progs)
    write_trace(tmp_path / "g.parquet", meta, progs)
    back = Trace.read(tmp_path / "g.parquet")
    assert back.programs == progs and back.meta == meta
    # hints survive (recorded from CallHints)
    assert any(json.loads(s.hints).get("tool_after") == "wiki_search" for p in back.programs for s in p.steps if s.hints)


def test_tables_view(tmp_path):
    trace = load_trace(TAU2)
    trace.write(tmp_path / "t.parquet")
    programs, steps = read_tables(tmp_path / "t.parquet")
    assert len(programs) == 20 and len(steps) == trace.num_steps
    assert programs["num_steps"].sum() == len(steps)
    llm = steps[steps["kind"] == "llm"]
    assert (llm["input_tokens"] == llm["seg_tokens"].map(sum)).all()
    assert steps["recorded_time"].notna().all()


@pytest.mark.parametrize("src,fmt", [(MOONCAKE, "mooncake"), (AZURE, "azure")])
def test_export_back_to_source_is_byte_exact(tmp_path, src, fmt):
    trace = load_trace(src)
    trace.write(tmp_path / "t.parquet")
    back = Trace.read(tmp_path / "t.parquet")
    out = export(back.meta, back.programs, tmp_path / "out", fmt)
    with gzip.open(src, "rb") as f:
        assert out.read_bytes() == f.read()


def test_export_refuses_multi_step_programs(tmp_path):
    trace = load_trace(TAU2)
    with pytest.raises(TraceError, match="one LLM call per request"):
        export(trace.meta, trace.programs, tmp_path / "x.jsonl", "mooncake")
    assert not (tmp_path / "x.jsonl").exists() and not list(tmp_path.iterdir())


def _prog(**kw) -> ProgramRecord:
    steps = kw.pop("steps", [Step(0, "llm", 0, (), (1, 2), (512, 40), 10)])
    return ProgramRecord(kw.pop("program_id", 0), kw.pop("arrival_at", 0.0), "x", "k", steps)


@pytest.mark.parametrize("steps,match", [
    ([Step(0, "llm", 0, (), (1,), (10,), 0)], "output_tokens must be"),
    ([Step(0, "llm", 0, (), (), (), 5)], "seg_ids and seg_tokens"),
    ([Step(0, "llm", 0, (), (1,), (0,), 5)], "seg_tokens must be integers >= 1"),
    ([Step(0, "llm", 0, (), (1,), (5,), 5), Step(1, "tool", 0, (1,), tool_name="t", tool_time=1.0)], "parents"),
    ([Step(0, "tool", 0, (), tool_name="t", tool_time=-1.0)], "tool_time"),
    ([Step(0, "tool", 0, ())], "tool_name"),
    ([Step(1, "llm", 0, (), (1,), (5,), 5)], "out of order"),
    ([Step(0, "llm", 0, (), (1 << 62,), (5,), 5)], "seg_ids"),
])
def test_invalid_programs_are_rejected_before_writing(tmp_path, steps, match):
    out = tmp_path / "bad.parquet"
    meta = {"format": "agentsim-trace", "schema_version": 1}
    with pytest.raises(TraceError, match=match):
        write_trace(out, meta, [_prog(program_id=0), _prog(program_id=1, steps=steps)])
    assert not out.exists() and not list(tmp_path.iterdir())


def test_reader_checks_schema_version_and_contiguity(tmp_path):
    good = tmp_path / "good.parquet"
    write_trace(good, {"format": "agentsim-trace", "schema_version": SCHEMA_VERSION, "source_format": "x"},
                [_prog(program_id=0), _prog(program_id=1)])
    assert read_meta(good)["source_format"] == "x"
    table = pq.read_table(good)
    # a future schema version is refused with the file named
    newer = table.replace_schema_metadata({META_KEY: json.dumps({"format": "agentsim-trace", "schema_version": 99}).encode()})
    pq.write_table(newer, tmp_path / "newer.parquet")
    with pytest.raises(TraceError, match="schema_version 99 is not supported"):
        list(iter_programs(tmp_path / "newer.parquet"))
    # a plain Parquet file is not a trace
    pq.write_table(pa.table({"a": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(TraceError, match="not an agentsim-trace file"):
        read_meta(tmp_path / "plain.parquet")
    # a program whose rows are split is refused, naming the row
    split = pa.concat_tables([table, table.slice(0, 1)]).replace_schema_metadata(table.schema.metadata)
    pq.write_table(split, tmp_path / "split.parquet")
    with pytest.raises(TraceError, match=r"row 3.*program 0 appears twice"):
        list(iter_programs(tmp_path / "split.parquet"))
    # input_tokens must agree with the pieces
    cols = {n: table.column(n) for n in SCHEMA.names}
    cols["input_tokens"] = pa.array([999, 999], pa.int64())
    pq.write_table(pa.table(cols, schema=table.schema), tmp_path / "sum.parquet")
    with pytest.raises(TraceError, match=r"row 1: input_tokens 999 != sum of seg_tokens 552"):
        list(iter_programs(tmp_path / "sum.parquet"))

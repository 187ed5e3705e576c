"""The canonical trace format: programs and their steps in one Parquet file, with a schema version.

A trace is a list of *programs* (one agent task each: a session, a conversation, a workflow run);
a program is a DAG of *steps*, each an LLM call or a tool (or human) wait::

    program  program_id, program_key (the source's session id / line), program_kind, arrival_at (s,
             relative to the trace's first program for sources with a wall clock), arrival_text
             (the source's own text of that arrival, e.g. an Azure TIMESTAMP or a Mooncake
             ``timestamp``, so exports write it back unchanged; "" if none)
    step     step_id (0..k-1, parents first), kind "llm" | "tool", agent_id, thread_id,
             parents (step ids this step waits for),
             prompt: seg_ids + seg_tokens (the prompt's content as (content id, tokens) pieces)
                     and input_tokens (= their sum),
             output_tokens, output_seg_id (content id of the output, -1 if nothing reuses it),
             tool_name, tool_time (s), recorded_at / recorded_time (when the step started,
             relative to the program's arrival, and how long it took in the source; null if
             unknown), hints (JSON of :class:`~agentsim.workload.CallHints` fields, "" if none).

Prompt content follows the shared workload model: a content id names a token stream, two pieces
with the same id hold the same tokens, and a shorter piece is a prefix of a longer one. A Mooncake
``hash_id`` (a 512-token block that encodes its whole prefix) is one piece of 512 tokens (the
last of a request may be shorter). Content ids are per trace file.

On disk, one row per step with the program columns repeated (Parquet's dictionary and run-length
encoding make the repetition nearly free); the steps of a program are contiguous and in step
order. The file's key-value metadata ``agentsim.trace`` holds a JSON object with the format name,
``schema_version`` and the import provenance. :func:`iter_programs` reads it back into exactly the
records that were written; :func:`read_tables` gives the programs and steps tables as DataFrames.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from agentsim.errors import TraceError

FORMAT_NAME = "agentsim-trace"
SCHEMA_VERSION = 1
META_KEY = b"agentsim.trace"
MAX_SEG_ID = (1 << 62) - 1  # content ids live in [0, 2^62): replay maps them into their own id space
STEP_KINDS = ("llm", "tool")

SCHEMA = pa.schema([
    ("program_id", pa.int64()),
    ("program_key", pa.string()),
    ("program_kind", pa.string()),
    ("arrival_at", pa.float64()),
    ("step_id", pa.int32()),
    ("kind", pa.string()),
    ("agent_id", pa.int64()),
    ("thread_id", pa.int32()),
    ("parents", pa.list_(pa.int32())),
    ("seg_ids", pa.list_(pa.int64())),
    ("seg_tokens", pa.list_(pa.int32())),
    ("input_tokens", pa.int64()),
    ("output_tokens", pa.int64()),
    ("output_seg_id", pa.int64()),
    ("tool_name", pa.string()),
    ("tool_time", pa.float64()),
    ("recorded_at", pa.float64()),
    ("recorded_time", pa.float64()),
    ("hints", pa.string()),
    ("arrival_text", pa.string()),
])
COLUMNS = tuple(SCHEMA.names)
OPTIONAL_COLUMNS = ("arrival_text",)  # absent from files written before it existed (read as "")
PROGRAM_COLUMNS = ("program_id", "program_key", "program_kind", "arrival_at")


@dataclass(slots=True)
class Step:
    """One step of a program: an LLM call (``kind="llm"``) or a tool/human wait (``"tool"``)."""

    step_id: int
    kind: str
    agent_id: int
    parents: tuple[int, ...] = ()
    seg_ids: tuple[int, ...] = ()
    seg_tokens: tuple[int, ...] = ()
    output_tokens: int = 0
    output_seg_id: int = -1
    tool_name: str = ""
    tool_time: float = 0.0
    thread_id: int = 0
    recorded_at: float | None = None
    recorded_time: float | None = None
    hints: str = ""

    @property
    def input_tokens(self) -> int:
        return sum(self.seg_tokens)

    @property
    def is_llm(self) -> bool:
        return self.kind == "llm"


@dataclass(slots=True)
class ProgramRecord:
    """One program of a trace: when it arrives and its steps (a DAG, parents first)."""

    program_id: int
    arrival_at: float
    kind: str
    key: str
    steps: list[Step] = field(default_factory=list)
    arrival_text: str = ""   # the source's text of the arrival time ("" if none): exports reuse it

    @property
    def agent_id(self) -> int:
        return self.steps[0].agent_id if self.steps else self.program_id


def llm_step(step_id: int, agent_id: int, pieces: Iterable[tuple[int, int]], output_tokens: int,
             parents: Iterable[int] = (), **kw: Any) -> Step:
    """An LLM step from (content id, tokens) pieces; pieces with 0 tokens are dropped."""
    pieces = [(int(s), int(n)) for s, n in pieces if n > 0]
    return Step(step_id, "llm", int(agent_id), tuple(parents), tuple(s for s, _ in pieces),
                tuple(n for _, n in pieces), int(output_tokens), **kw)


def tool_step(step_id: int, agent_id: int, name: str, duration: float, parents: Iterable[int] = (),
              **kw: Any) -> Step:
    return Step(step_id, "tool", int(agent_id), tuple(parents), tool_name=name, tool_time=float(duration), **kw)


# --------------------------------------------------------------------------- validation
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


#: The largest magnitude of a trace's counts and ids: JSON integers are unbounded, and a larger one
#: is no token count and fits no int64 column (it failed in the Parquet writer with a traceback).
MAX_TRACE_INT = 2 ** 62


def _short(x: Any) -> str:
    t = repr(x)
    return t if len(t) <= 24 else f"{t[:20]}... ({len(t)} characters)"


def check_program(prog: ProgramRecord, where: str) -> None:
    """Raise :class:`TraceError` at ``where`` unless ``prog`` is a well-formed program."""
    if not _is_int(prog.program_id) or prog.program_id < 0:
        raise TraceError(where, f"program_id must be an integer >= 0, got {prog.program_id!r}")
    if not isinstance(prog.arrival_at, (int, float)) or not math.isfinite(prog.arrival_at):
        raise TraceError(where, f"arrival_at must be a finite number, got {prog.arrival_at!r}")
    if not isinstance(prog.arrival_text, str):
        raise TraceError(where, f"arrival_text must be a string, got {prog.arrival_text!r}")
    if not prog.steps:
        raise TraceError(where, f"program {prog.program_id} has no steps")
    for i, s in enumerate(prog.steps):
        sw = f"program {prog.program_id} step {i}"
        if s.step_id != i:
            raise TraceError(where, f"{sw}: step_id {s.step_id} out of order (steps are numbered 0..k-1)")
        if s.kind not in STEP_KINDS:
            raise TraceError(where, f"{sw}: kind must be 'llm' or 'tool', got {s.kind!r}")
        if not _is_int(s.agent_id) or abs(s.agent_id) > MAX_TRACE_INT:
            raise TraceError(where, f"{sw}: agent_id must be an integer of at most 2^62 in magnitude, "
                                    f"got {_short(s.agent_id)}")
        if len(set(s.parents)) != len(s.parents) or any(not _is_int(p) or not 0 <= p < i for p in s.parents):
            raise TraceError(where, f"{sw}: parents {list(s.parents)} must be distinct earlier step ids")
        if s.kind == "llm":
            if not s.seg_ids or len(s.seg_ids) != len(s.seg_tokens):
                raise TraceError(where, f"{sw}: an LLM step needs seg_ids and seg_tokens of the same non-zero length")
            if any(not _is_int(x) or not 0 <= x <= MAX_SEG_ID for x in s.seg_ids):
                raise TraceError(where, f"{sw}: seg_ids must be integers in [0, 2^62)")
            if any(not _is_int(n) or not 1 <= n <= MAX_TRACE_INT for n in s.seg_tokens):
                raise TraceError(where, f"{sw}: seg_tokens must be integers >= 1 (and at most 2^62)")
            if not _is_int(s.output_tokens) or not 1 <= s.output_tokens <= MAX_TRACE_INT:
                raise TraceError(where, f"{sw}: output_tokens must be an integer >= 1 (and at most 2^62), "
                                        f"got {_short(s.output_tokens)}")
            if not _is_int(s.output_seg_id) or not -1 <= s.output_seg_id <= MAX_SEG_ID:
                raise TraceError(where, f"{sw}: output_seg_id must be -1 or in [0, 2^62)")
            if s.tool_name or s.tool_time:
                raise TraceError(where, f"{sw}: an LLM step has no tool_name or tool_time")
        else:
            if s.seg_ids or s.seg_tokens or s.output_tokens or s.output_seg_id != -1:
                raise TraceError(where, f"{sw}: a tool step has no prompt, output or output_seg_id")
            if not s.tool_name:
                raise TraceError(where, f"{sw}: a tool step needs a tool_name")
            if not isinstance(s.tool_time, (int, float)) or not (math.isfinite(s.tool_time) and s.tool_time >= 0):
                raise TraceError(where, f"{sw}: tool_time must be a finite number >= 0, got {s.tool_time!r}")
        for name in ("recorded_at", "recorded_time"):
            v = getattr(s, name)
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise TraceError(where, f"{sw}: {name} must be a finite number or null, got {v!r}")


# --------------------------------------------------------------------------- metadata
def make_meta(source_format: str, source: str | Path | None = None, **extra: Any) -> dict:
    meta = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "source_format": source_format,
            "source": Path(source).name if source is not None else None}
    meta.update(extra)
    return meta


def _check_meta(meta: dict, where: str) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise TraceError(where, f"not an {FORMAT_NAME} file (no '{META_KEY.decode()}' metadata)")
    v = meta.get("schema_version")
    if v != SCHEMA_VERSION:
        raise TraceError(where, f"schema_version {v!r} is not supported (this build reads {SCHEMA_VERSION})")
    return meta


# --------------------------------------------------------------------------- writing
class TraceWriter:
    """Streams programs into a canonical Parquet file, atomically.

    Rows go to a temporary file beside ``path`` in row groups of about ``batch_rows`` steps; only
    :meth:`close` renames it into place, so a failed import leaves nothing behind. Use as a
    context manager: an exception aborts (deletes the temporary file).
    """

    def __init__(self, path: str | Path, meta: dict, batch_rows: int = 16384) -> None:
        self.path = Path(path)
        self.meta = meta
        self.batch_rows = batch_rows
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._writer: pq.ParquetWriter | None = None
        self._cols: dict[str, list] = {c: [] for c in COLUMNS}
        self._nrows = 0
        self.num_programs = 0
        self.num_steps = 0

    def add(self, prog: ProgramRecord) -> None:
        """Buffer one (validated) program; raises TraceError for a malformed one."""
        check_program(prog, f"{self.path}: program {prog.program_id}")
        c = self._cols
        for s in prog.steps:
            c["program_id"].append(prog.program_id)
            c["program_key"].append(prog.key)
            c["program_kind"].append(prog.kind)
            c["arrival_at"].append(float(prog.arrival_at))
            c["step_id"].append(s.step_id)
            c["kind"].append(s.kind)
            c["agent_id"].append(s.agent_id)
            c["thread_id"].append(s.thread_id)
            c["parents"].append(s.parents)
            c["seg_ids"].append(s.seg_ids)
            c["seg_tokens"].append(s.seg_tokens)
            c["input_tokens"].append(sum(s.seg_tokens))
            c["output_tokens"].append(s.output_tokens)
            c["output_seg_id"].append(s.output_seg_id)
            c["tool_name"].append(s.tool_name)
            c["tool_time"].append(float(s.tool_time))
            c["recorded_at"].append(s.recorded_at)
            c["recorded_time"].append(s.recorded_time)
            c["hints"].append(s.hints)
            c["arrival_text"].append(prog.arrival_text)
        self._nrows += len(prog.steps)
        self.num_programs += 1
        self.num_steps += len(prog.steps)
        if self._nrows >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._nrows:
            return
        table = pa.Table.from_pydict(self._cols, schema=self._schema())
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.tmp, table.schema, compression="zstd")
        self._writer.write_table(table)
        self._cols = {c: [] for c in COLUMNS}
        self._nrows = 0

    def _schema(self) -> pa.Schema:
        return SCHEMA.with_metadata({META_KEY: json.dumps(self.meta, sort_keys=True).encode()})

    def close(self) -> Path:
        """Write the last row group and move the file into place."""
        if self.num_programs == 0:
            self.abort()
            raise TraceError(str(self.path), "no programs to write")
        self._flush()
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - the file is deleted anyway
                pass
            self._writer = None
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_trace(path: str | Path, meta: dict, programs: Iterable[ProgramRecord]) -> Path:
    with TraceWriter(path, meta) as w:
        for p in programs:
            w.add(p)
        return w.close()


# --------------------------------------------------------------------------- reading
def _open(path: str | Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise TraceError(str(path), "no such file") from None
    except (OSError, pa.ArrowException) as e:
        raise TraceError(str(path), f"not a readable Parquet file ({e})") from None


def read_meta(path: str | Path) -> dict:
    pf = _open(path)
    raw = (pf.schema_arrow.metadata or {}).get(META_KEY)
    if raw is None:
        raise TraceError(str(path), f"not an {FORMAT_NAME} file (no '{META_KEY.decode()}' metadata)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise TraceError(str(path), "malformed trace metadata") from None
    return _check_meta(meta, str(path))


def iter_programs(path: str | Path, batch_rows: int = 16384) -> Iterator[ProgramRecord]:
    """The programs of a canonical trace file, validated, in file order (streams by row group)."""
    path = Path(path)
    read_meta(path)
    pf = _open(path)
    names = pf.schema_arrow.names
    missing = [c for c in COLUMNS if c not in names and c not in OPTIONAL_COLUMNS]
    if missing:
        raise TraceError(str(path), f"missing columns {missing}")
    columns = [c for c in COLUMNS if c in names]
    current: ProgramRecord | None = None
    first_row = 0
    seen: set[int] = set()
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        d = batch.to_pydict()
        texts = d.get("arrival_text") or [""] * batch.num_rows
        for i in range(batch.num_rows):
            pid = d["program_id"][i]
            if current is None or pid != current.program_id:
                if current is not None:
                    check_program(current, f"{path}:row {first_row + 1}")
                    yield current
                if pid in seen:
                    raise TraceError(f"{path}:row {row + 1}", f"program {pid} appears twice (its steps must be contiguous)")
                seen.add(pid)
                current = ProgramRecord(pid, d["arrival_at"][i], d["program_kind"][i], d["program_key"][i], [],
                                        texts[i] or "")
                first_row = row
            parents = d["parents"][i]
            seg_ids = d["seg_ids"][i]
            seg_tokens = d["seg_tokens"][i]
            if parents is None or seg_ids is None or seg_tokens is None:
                raise TraceError(f"{path}:row {row + 1}", "list columns may not be null")
            step = Step(d["step_id"][i], d["kind"][i], d["agent_id"][i], tuple(parents), tuple(seg_ids),
                        tuple(seg_tokens), d["output_tokens"][i], d["output_seg_id"][i], d["tool_name"][i] or "",
                        d["tool_time"][i], d["thread_id"][i], d["recorded_at"][i], d["recorded_time"][i],
                        d["hints"][i] or "")
            if d["input_tokens"][i] != step.input_tokens:
                raise TraceError(f"{path}:row {row + 1}",
                                 f"input_tokens {d['input_tokens'][i]} != sum of seg_tokens {step.input_tokens}")
            if (current.arrival_at, current.kind, current.key, current.arrival_text) != (
                    d["arrival_at"][i], d["program_kind"][i], d["program_key"][i], texts[i] or ""):
                raise TraceError(f"{path}:row {row + 1}", f"program {pid}: program columns differ between its steps")
            current.steps.append(step)
            row += 1
    if current is not None:
        check_program(current, f"{path}:row {first_row + 1}")
        yield current


def read_tables(path: str | Path):
    """(programs, steps) DataFrames of a canonical trace file (the whole file in memory)."""
    import pandas as pd

    read_meta(path)
    steps = pq.read_table(path).to_pandas()
    if "arrival_text" not in steps:
        steps["arrival_text"] = ""
    programs = steps.groupby("program_id", sort=False).agg(
        program_key=("program_key", "first"), program_kind=("program_kind", "first"),
        arrival_at=("arrival_at", "first"), agent_id=("agent_id", "first"), num_steps=("step_id", "size"),
        arrival_text=("arrival_text", "first"),
    ).reset_index()
    steps = steps.drop(columns=["program_key", "program_kind", "arrival_at", "arrival_text"])
    return programs, pd.DataFrame(steps)


@dataclass
class Trace:
    """A whole trace in memory: metadata plus program records."""

    meta: dict
    programs: list[ProgramRecord]

    @property
    def num_steps(self) -> int:
        return sum(len(p.steps) for p in self.programs)

    def write(self, path: str | Path) -> Path:
        return write_trace(path, self.meta, self.programs)

    @staticmethod
    def read(path: str | Path) -> Trace:
        return Trace(read_meta(path), list(iter_programs(path)))


def truncate_pieces(pieces: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The first ``n`` tokens of a prompt given as (content id, tokens) pieces."""
    out = []
    for sid, k in pieces:
        if n <= 0:
            break
        out.append((sid, min(k, n)))
        n -= k
    return out

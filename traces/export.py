"""Export canonical traces: to agentsim's JSONL, and back to the Mooncake and Azure formats.

``native`` writes every field (exact). ``mooncake`` and ``azure`` need one-call programs; Mooncake
also needs 512-token pieces (all but the last full). Arrivals are written back on the source's
clock (its first timestamp, kept in the metadata, plus the offset); a program that still holds
its source's timestamp text (``arrival_text``, when the text still gives its ``arrival_at``) gets
that text unchanged, so a Mooncake file in its published layout (``json.dumps`` spacing, keys in
the order timestamp, input_length, output_length, hash_ids) and an Azure CSV export back byte for
byte, whatever digits each timestamp had. Other arrivals are formatted: Mooncake ms as an integer
when whole, Azure with the first row's number of fractional digits. Output is written to a
temporary name and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Callable, Iterable, TextIO

from agentsim.errors import ConfigError, TraceError
from agentsim.traces.canonical import SCHEMA_VERSION, ProgramRecord

EXPORT_FORMATS = ("native", "mooncake", "azure")


def _atomic_text(path: Path, write: Callable[[TextIO], None]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _primed(programs: Iterable[ProgramRecord]) -> Iterable[ProgramRecord]:
    """``programs`` with the first one already read: an importer completes its ``meta`` (the
    source's first timestamp, its digits ...) while producing the first program, so an export
    streaming straight from a raw file must not read the metadata before that."""
    it = iter(programs)
    first = next(it, None)
    return iter(()) if first is None else itertools.chain([first], it)


def export_native(meta: dict, programs: Iterable[ProgramRecord], out: str | Path) -> Path:
    programs = _primed(programs)
    def write(f: TextIO) -> None:
        m = {k: v for k, v in meta.items() if k not in ("format", "schema_version")}
        f.write(json.dumps({"agentsim_trace": SCHEMA_VERSION, "meta": m}, sort_keys=True) + "\n")
        for p in programs:
            steps = [{
                "step_id": s.step_id, "kind": s.kind, "agent_id": s.agent_id, "thread_id": s.thread_id,
                "parents": list(s.parents), "segments": [[a, b] for a, b in zip(s.seg_ids, s.seg_tokens)],
                "output_tokens": s.output_tokens, "output_seg_id": s.output_seg_id, "tool_name": s.tool_name,
                "tool_time": s.tool_time, "recorded_at": s.recorded_at, "recorded_time": s.recorded_time,
                "hints": s.hints,
            } for s in p.steps]
            rec = {"program_id": p.program_id, "arrival_at": p.arrival_at, "kind": p.kind, "key": p.key,
                   "steps": steps}
            if p.arrival_text:
                rec["arrival_text"] = p.arrival_text
            f.write(json.dumps(rec) + "\n")

    return _atomic_text(Path(out), write)


def _single_call(p: ProgramRecord, fmt: str):
    if len(p.steps) != 1 or p.steps[0].kind != "llm":
        raise TraceError(f"program {p.program_id}", f"{fmt} holds one LLM call per request; this program has "
                                                    f"{len(p.steps)} steps (export to native instead)")
    return p.steps[0]


def export_mooncake(meta: dict, programs: Iterable[ProgramRecord], out: str | Path, block_size: int | None = None) -> Path:
    programs = _primed(programs)
    bs = block_size or (meta.get("options") or {}).get("block_size") or 512
    t0 = meta.get("t0_ms", 0)   # traces imported before arrivals were relative hold absolute ms

    def write(f: TextIO) -> None:
        for p in programs:
            s = _single_call(p, "mooncake")
            if any(n != bs for n in s.seg_tokens[:-1]) or s.seg_tokens[-1] > bs:
                raise TraceError(f"program {p.program_id}", f"prompt pieces are not {bs}-token blocks")
            text = p.arrival_text if _mooncake_text_fits(p, t0) else None
            if text is None:
                ts = t0 + p.arrival_at * 1000.0
                text = json.dumps(int(round(ts)) if abs(ts - round(ts)) < 1e-6 else ts)
            f.write(f'{{"timestamp": {text}, "input_length": {s.input_tokens}, '
                    f'"output_length": {s.output_tokens}, "hash_ids": {json.dumps(list(s.seg_ids))}}}\n')

    return _atomic_text(Path(out), write)


def export_azure(meta: dict, programs: Iterable[ProgramRecord], out: str | Path) -> Path:
    from agentsim.traces.azure import format_timestamp_ns

    programs = _primed(programs)
    t0 = meta.get("t0_ns")
    digits = meta.get("timestamp_digits", 7)
    nl = meta.get("line_terminator", "\r\n")
    if t0 is None:
        t0 = 1_700_000_000 * 1_000_000_000  # 2023-11-14 22:13:20 UTC: any origin will do
        digits = 7

    def write(f: TextIO) -> None:
        f.write(meta.get("header", "TIMESTAMP,ContextTokens,GeneratedTokens") + nl)
        for p in programs:
            s = _single_call(p, "azure")
            ts = p.arrival_text if _azure_text_fits(p, t0) else None
            if ts is None:
                ts = format_timestamp_ns(t0 + int(round(p.arrival_at * 1e9)), digits)
            f.write(f"{ts},{s.input_tokens},{s.output_tokens}{nl}")

    return _atomic_text(Path(out), write)


def _mooncake_text_fits(p: ProgramRecord, t0: float) -> bool:
    """Whether ``p.arrival_text`` is a Mooncake timestamp that still gives ``p.arrival_at``."""
    if not p.arrival_text:
        return False
    try:
        ts = json.loads(p.arrival_text)
    except ValueError:
        return False
    return isinstance(ts, (int, float)) and not isinstance(ts, bool) and (ts - t0) / 1000.0 == p.arrival_at


def _azure_text_fits(p: ProgramRecord, t0_ns: int) -> bool:
    """Whether ``p.arrival_text`` is an Azure TIMESTAMP that still gives ``p.arrival_at``."""
    from agentsim.traces.azure import parse_timestamp_ns

    if not p.arrival_text:
        return False
    try:
        ns, _ = parse_timestamp_ns(p.arrival_text)
    except ValueError:
        return False
    return (ns - t0_ns) / 1e9 == p.arrival_at


def export(meta: dict, programs: Iterable[ProgramRecord], out: str | Path, fmt: str) -> Path:
    if fmt == "native":
        return export_native(meta, programs, out)
    if fmt == "mooncake":
        return export_mooncake(meta, programs, out)
    if fmt == "azure":
        return export_azure(meta, programs, out)
    raise ConfigError("to", f"cannot export to {fmt!r} (known: {', '.join(EXPORT_FORMATS)})")

"""agentsim's own trace formats: canonical Parquet, and its line-per-program JSONL twin.

The JSONL form is meant to be written by hand or by other tools. An optional first line holds the
metadata, ``{"agentsim_trace": 1, "meta": {...}}``; every other line is one program::

    {"program_id": 0, "arrival_at": 1.5, "kind": "react", "key": "session-a", "steps": [
      {"kind": "llm", "segments": [[7, 512], [8, 40]], "output_tokens": 34, "output_seg_id": 9},
      {"kind": "tool", "tool_name": "web_search", "tool_time": 1.2},
      {"kind": "llm", "segments": [[7, 512], [8, 40], [9, 34], [10, 20]], "output_tokens": 30}]}

Defaults: ``program_id`` = line order, ``agent_id`` = the program id, ``kind`` = "native",
``key`` = "line N", ``parents`` = the previous step (``[]`` for a root), ``step_id`` = position,
``output_seg_id`` = -1, ``thread_id`` = 0, ``recorded_*`` = null, ``hints`` = "", ``arrival_text`` =
"" (the source's text of the arrival time, kept for exports). ``segments`` are
(content id, tokens) pairs: equal ids are equal tokens, a shorter piece is a prefix of a longer
one. :func:`agentsim.traces.export.export_native` writes every field, so Parquet -> JSONL ->
Parquet is exact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from agentsim.errors import TraceError
from agentsim.traces.canonical import (FORMAT_NAME, SCHEMA_VERSION, ProgramRecord, Step, iter_programs,
                                       read_meta)
from agentsim.traces.importers import Importer, register_importer

_STEP_KEYS = {"step_id", "kind", "agent_id", "thread_id", "parents", "segments", "output_tokens", "output_seg_id",
              "tool_name", "tool_time", "recorded_at", "recorded_time", "hints"}
_PROGRAM_KEYS = {"program_id", "arrival_at", "kind", "key", "steps", "arrival_text"}


@register_importer
class NativeImporter(Importer):
    name = "native"

    def __init__(self, path: str | Path, skip_bad: bool = False, **options: Any) -> None:
        super().__init__(path, skip_bad=skip_bad, **options)
        self.is_parquet = self.path.name.lower().endswith(".parquet")
        if self.is_parquet:
            self.meta = read_meta(self.path)

    def programs(self) -> Iterator[ProgramRecord]:
        if self.is_parquet:
            # canonical files keep their program ids (iter_programs validates them)
            yield from iter_programs(self.path)
            return
        yield from self._jsonl()

    def _jsonl(self) -> Iterator[ProgramRecord]:
        seen: set[int] = set()
        n = 0
        for ln, w, obj in self.json_lines():
            if isinstance(obj, dict) and "agentsim_trace" in obj:
                if n:
                    raise TraceError(w, "the metadata line must come first")
                if obj["agentsim_trace"] != SCHEMA_VERSION:
                    raise TraceError(w, f"agentsim_trace version {obj['agentsim_trace']!r} is not supported")
                meta = obj.get("meta")
                if not isinstance(meta, dict):
                    raise TraceError(w, "meta: must be an object")
                self.meta = dict(meta, format=FORMAT_NAME, schema_version=SCHEMA_VERSION)
                continue
            try:
                prog = _program(obj, n, ln)
            except (ValueError, TypeError) as e:
                self.bad(w, str(e))
                continue
            if prog.program_id in seen:
                self.bad(w, f"program_id {prog.program_id} appears twice")
                continue
            try:
                from agentsim.traces.canonical import check_program

                check_program(prog, w)
            except TraceError as e:
                self.bad(w, e.message)
                continue
            seen.add(prog.program_id)
            n += 1
            yield prog


def _num(v: Any, name: str, integer: bool = False, nullable: bool = False) -> Any:
    if v is None and nullable:
        return None
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise ValueError(f"{name}: must be {'an integer' if integer else 'a number'}, got {v!r}")
    return v if integer else float(v)


def _program(obj: Any, n: int, ln: int) -> ProgramRecord:
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    unknown = set(obj) - _PROGRAM_KEYS
    if unknown:
        raise ValueError(f"unknown program fields {sorted(unknown)} (known: {', '.join(sorted(_PROGRAM_KEYS))})")
    pid = _num(obj.get("program_id", n), "program_id", integer=True)
    steps_in = obj.get("steps")
    if not isinstance(steps_in, list) or not steps_in:
        raise ValueError("steps: must be a non-empty list")
    kind = obj.get("kind", "native")
    key = obj.get("key", f"line {ln}")
    if not isinstance(kind, str) or not isinstance(key, str):
        raise ValueError("kind and key must be strings")
    steps = []
    for i, s in enumerate(steps_in):
        if not isinstance(s, dict):
            raise ValueError(f"steps[{i}]: expected an object")
        unknown = set(s) - _STEP_KEYS
        if unknown:
            raise ValueError(f"steps[{i}]: unknown fields {sorted(unknown)} (known: {', '.join(sorted(_STEP_KEYS))})")
        segs = s.get("segments", [])
        if not isinstance(segs, list) or any(not isinstance(p, list) or len(p) != 2 for p in segs):
            raise ValueError(f"steps[{i}].segments: must be a list of [content id, tokens] pairs")
        parents = s.get("parents", [i - 1] if i else [])
        if not isinstance(parents, list):
            raise ValueError(f"steps[{i}].parents: must be a list of step ids")
        hints = s.get("hints", "")
        if isinstance(hints, dict):
            hints = json.dumps(hints, sort_keys=True)
        if not isinstance(hints, str):
            raise ValueError(f"steps[{i}].hints: must be an object or a JSON string")
        name = s.get("tool_name", "")
        if not isinstance(name, str):
            raise ValueError(f"steps[{i}].tool_name: must be a string")
        steps.append(Step(
            step_id=_num(s.get("step_id", i), f"steps[{i}].step_id", integer=True),
            kind=s.get("kind", "llm"),
            agent_id=_num(s.get("agent_id", pid), f"steps[{i}].agent_id", integer=True),
            parents=tuple(_num(p, f"steps[{i}].parents", integer=True) for p in parents),
            seg_ids=tuple(_num(p[0], f"steps[{i}].segments", integer=True) for p in segs),
            seg_tokens=tuple(_num(p[1], f"steps[{i}].segments", integer=True) for p in segs),
            output_tokens=_num(s.get("output_tokens", 0), f"steps[{i}].output_tokens", integer=True),
            output_seg_id=_num(s.get("output_seg_id", -1), f"steps[{i}].output_seg_id", integer=True),
            tool_name=name,
            tool_time=_num(s.get("tool_time", 0.0), f"steps[{i}].tool_time"),
            thread_id=_num(s.get("thread_id", 0), f"steps[{i}].thread_id", integer=True),
            recorded_at=_num(s.get("recorded_at"), f"steps[{i}].recorded_at", nullable=True),
            recorded_time=_num(s.get("recorded_time"), f"steps[{i}].recorded_time", nullable=True),
            hints=hints,
        ))
    text = obj.get("arrival_text", "")
    if not isinstance(text, str):
        raise ValueError(f"arrival_text: must be a string, got {text!r}")
    return ProgramRecord(pid, _num(obj.get("arrival_at", 0.0), "arrival_at"), kind, key, steps, text)

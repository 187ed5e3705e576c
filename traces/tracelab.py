"""TraceLab (SyFI Lab, University of Washington) coding-agent traces: sessions of LLM rounds and tools.

Two input forms, told apart by their first line:

- **round JSONL** (``round_trace.jsonl``, the public release schema): one row per LLM round with
  ``session_id``, ``round_index``, ``input_tokens_total``, ``prefix_tokens`` (served from the
  provider's prompt cache), ``newly_append_tokens``, ``output_tokens``, ISO ``timing_events`` and
  ``tools`` (``tool_wall_latency_ms``, ``emitted_at``, ``result_at``). A session becomes a program:
  per round an LLM step, then its tools as parallel steps (wall latencies), which the next round
  waits for. When a round starts with a user message, a ``human`` step covers the time from the
  end of the previous round to it. Prompt content: round r's prompt is the first
  ``prefix_tokens`` tokens of round r-1's prompt + output followed by new tokens (option
  ``prefix="cached"``, the default: reuse as the trace measured it), or all of round r-1's prompt
  + output that fits followed by new tokens (``prefix="append"``: an append-only history, what an
  unbounded cache could reuse). A round-0 prefix (cached before the session began: the coding
  agent's system prompt and tools) is a prompt shared by all sessions of the same provider.
- **replay CSV** (``session_id,arrival_time,round_idx,prefix_len,input_len,output_len,
  tool_wait_after_ms``; also without ``arrival_time``, or the simulator form with ``id``): round r's
  prompt is the first ``prefix_len`` tokens of round r-1's prompt + output and ``input_len`` new
  tokens; ``tool_wait_after_ms`` becomes a tool step after the round; ``arrival_time`` is in ms
  and a session arrives at its first round's time, relative to the earliest session.

Sessions are gathered in memory (rounds of one session may be interleaved with others').
"""

from __future__ import annotations

import csv
from datetime import datetime
from typing import Any, Iterator

from agentsim.config import Param
from agentsim.errors import TraceError
from agentsim.traces.canonical import ProgramRecord, Step, llm_step, tool_step, truncate_pieces
from agentsim.traces.importers import Importer, open_text, register_importer


def _ts(s: Any) -> float:
    if not isinstance(s, str):
        raise ValueError(f"expected an ISO timestamp, got {s!r}")
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _int(v: Any, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: must be an integer >= {lo}, got {v!r}")
    return v


class _Ids:
    def __init__(self) -> None:
        self.next = 0
        self.named: dict[str, int] = {}

    def fresh(self) -> int:
        self.next += 1
        return self.next - 1

    def shared(self, name: str) -> int:
        if name not in self.named:
            self.named[name] = self.fresh()
        return self.named[name]


@register_importer
class TraceLabImporter(Importer):
    name = "tracelab"
    OPTIONS = {
        "prefix": ("cached", Param(str, choices=("cached", "append"),
                                   help="round JSONL prompt model: the trace's prefix_tokens, or append-only")),
    }

    def _programs(self) -> Iterator[ProgramRecord]:
        with open_text(self.path) as f:
            first = f.readline()
        if first.lstrip().startswith("{"):
            self.meta["form"] = "rounds"
            yield from self._rounds()
        else:
            self.meta["form"] = "replay-csv"
            yield from self._csv()

    # ------------------------------------------------------------------ round JSONL
    def _rounds(self) -> Iterator[ProgramRecord]:
        sessions: dict[str, list[dict]] = {}
        for ln, w, r in self.json_lines():
            try:
                rec = self._round(r)
            except ValueError as e:
                self.bad(w, str(e))
                continue
            rec["line"] = ln
            sessions.setdefault(rec["session"], []).append(rec)
        starts = {s: min(x["t_start"] for x in rs if x["t_start"] is not None) if any(
            x["t_start"] is not None for x in rs) else None for s, rs in sessions.items()}
        known = [t for t in starts.values() if t is not None]
        t_first = min(known) if known else 0.0
        ids = _Ids()
        order = sorted(sessions, key=lambda s: (starts[s] if starts[s] is not None else t_first, sessions[s][0]["line"]))
        for n, s in enumerate(order):
            yield self._session(n, s, sorted(sessions[s], key=lambda x: x["round"]), starts[s] or t_first, t_first, ids)

    def _round(self, r: Any) -> dict:
        if not isinstance(r, dict):
            raise ValueError("expected a JSON object")
        sid = r.get("session_id")
        if not isinstance(sid, str) or not sid:
            raise ValueError(f"session_id: must be a non-empty string, got {sid!r}")
        rnd = _int(r.get("round_index"), "round_index", 0)
        total = _int(r.get("input_tokens_total"), "input_tokens_total", 1)
        prefix = _int(r.get("prefix_tokens") or 0, "prefix_tokens", 0)
        if prefix > total:
            raise ValueError(f"prefix_tokens {prefix} exceeds input_tokens_total {total}")
        out = _int(r.get("output_tokens"), "output_tokens", 1)
        events = r.get("timing_events") or []
        if not isinstance(events, list):
            raise ValueError("timing_events: must be a list")
        times = []
        for k, e in enumerate(events):
            if not isinstance(e, dict):
                raise ValueError(f"timing_events[{k}]: must be an object")
            try:
                times.append(_ts(e.get("timestamp")))
            except ValueError as ex:
                raise ValueError(f"timing_events[{k}].timestamp: {ex}") from None
        tools = []
        for k, t in enumerate(r.get("tools") or []):
            if not isinstance(t, dict):
                raise ValueError(f"tools[{k}]: must be an object")
            lat = t.get("tool_wall_latency_ms")
            emitted = result = None
            try:
                emitted = _ts(t["emitted_at"]) if t.get("emitted_at") else None
                result = _ts(t["result_at"]) if t.get("result_at") else None
            except ValueError as ex:
                raise ValueError(f"tools[{k}]: {ex}") from None
            if lat is not None:
                if isinstance(lat, bool) or not isinstance(lat, (int, float)) or lat < 0:
                    raise ValueError(f"tools[{k}].tool_wall_latency_ms: must be a number >= 0, got {lat!r}")
                dur = lat / 1000.0
            elif emitted is not None and result is not None:
                dur = max(0.0, result - emitted)
            else:
                raise ValueError(f"tools[{k}]: no tool_wall_latency_ms and no emitted_at/result_at")
            tools.append((str(t.get("tool_name") or "tool"), dur, emitted, result))
        tool_end = [x[3] for x in tools if x[3] is not None]
        first_emit = [x[2] for x in tools if x[2] is not None]
        return {
            "session": sid, "round": rnd, "total": total, "prefix": prefix, "out": out,
            "provider": str(r.get("provider") or "unknown"),
            "user_first": r.get("first_input_event_type") == "user_message",
            "t_start": min(times) if times else None,
            "t_llm_end": min(first_emit) if first_emit else (max(times) if times else None),
            "t_end": max(times + tool_end) if times or tool_end else None,
            "tools": tools,
        }

    def _session(self, n: int, key: str, rounds: list[dict], t0: float, t_first: float, ids: _Ids) -> ProgramRecord:
        steps: list[Step] = []
        wait_for: tuple[int, ...] = ()
        hist: list[tuple[int, int]] | None = None
        prev: dict | None = None
        append = self.options["prefix"] == "append"
        for r in rounds:
            if prev is not None and r["user_first"] and r["t_start"] is not None and prev["t_end"] is not None:
                gap = r["t_start"] - prev["t_end"]
                if gap > 0:
                    steps.append(tool_step(len(steps), n, "human", gap, wait_for, recorded_at=prev["t_end"] - t0,
                                           recorded_time=gap))
                    wait_for = (len(steps) - 1,)
            if hist is None:
                base = min(r["prefix"], r["total"])
                pieces = [(ids.shared("base:" + r["provider"]), base), (ids.fresh(), r["total"] - base)]
            else:
                have = sum(k for _, k in hist)
                keep = min(r["total"] if append else r["prefix"], have)
                pieces = truncate_pieces(hist, keep) + [(ids.fresh(), r["total"] - keep)]
            out_id = ids.fresh()
            at = r["t_start"] - t0 if r["t_start"] is not None else None
            took = (r["t_llm_end"] - r["t_start"]) if r["t_start"] is not None and r["t_llm_end"] is not None else None
            llm = len(steps)
            steps.append(llm_step(llm, n, pieces, r["out"], wait_for, output_seg_id=out_id, recorded_at=at,
                                  recorded_time=max(0.0, took) if took is not None else None))
            hist = [p for p in pieces if p[1] > 0] + [(out_id, r["out"])]
            tool_ids = []
            for name, dur, emitted, _ in r["tools"]:
                tool_ids.append(len(steps))
                steps.append(tool_step(len(steps), n, name, dur, (llm,),
                                       recorded_at=emitted - t0 if emitted is not None else None, recorded_time=dur))
            wait_for = tuple(tool_ids) if tool_ids else (llm,)
            prev = r
        return ProgramRecord(n, t0 - t_first, "tracelab", key, steps)

    # ------------------------------------------------------------------ replay CSV
    def _csv(self) -> Iterator[ProgramRecord]:
        sessions: dict[str, list[tuple]] = {}
        with open_text(self.path) as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if "id" in header and "session_id" not in header:
                header[header.index("id")] = "session_id"
            need = ("session_id", "round_idx", "prefix_len", "input_len", "output_len", "tool_wait_after_ms")
            missing = [c for c in need if c not in header]
            if missing:
                raise TraceError(self.where(1), f"missing columns {missing} (header: {','.join(header)})")
            ix = {c: header.index(c) for c in need + ("arrival_time",) if c in header}
            for row in reader:
                ln = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                w = self.where(ln)
                if len(row) != len(header):
                    self.bad(w, f"expected {len(header)} fields, got {len(row)}")
                    continue
                try:
                    vals = {}
                    for c in need[1:] + (("arrival_time",) if "arrival_time" in ix else ()):
                        raw = row[ix[c]].strip()
                        try:
                            v = float(raw) if c in ("arrival_time", "tool_wait_after_ms") else int(raw)
                        except ValueError:
                            raise ValueError(f"{c}: must be a number, got {raw!r}") from None
                        lo = 1 if c in ("output_len",) else 0
                        if not v >= lo or v != v:
                            raise ValueError(f"{c}: must be >= {lo}, got {raw!r}")
                        vals[c] = v
                except ValueError as e:
                    self.bad(w, str(e))
                    continue
                if vals["prefix_len"] + vals["input_len"] < 1:
                    self.bad(w, "prefix_len + input_len must be >= 1")
                    continue
                sid = row[ix["session_id"]].strip()
                sessions.setdefault(sid, []).append((vals["round_idx"], vals["prefix_len"], vals["input_len"],
                                                     vals["output_len"], vals["tool_wait_after_ms"] / 1000.0,
                                                     vals.get("arrival_time", 0.0), ln))
        ids = _Ids()
        start = {s: min(r[5] for r in rs) for s, rs in sessions.items()}
        order = sorted(sessions, key=lambda s: (start[s], sessions[s][0][6]))
        t_first = start[order[0]] if order else 0.0   # ms; arrivals are relative to the first session
        for n, s in enumerate(order):
            rounds = sorted(sessions[s])
            steps: list[Step] = []
            hist: list[tuple[int, int]] | None = None
            wait_for: tuple[int, ...] = ()
            for _, prefix, new, out, wait, _, _ in rounds:
                if hist is None:
                    pieces = [(ids.shared("base:csv"), prefix), (ids.fresh(), new)]
                else:
                    keep = min(prefix, sum(k for _, k in hist))
                    pieces = truncate_pieces(hist, keep) + [(ids.fresh(), new + prefix - keep)]
                out_id = ids.fresh()
                steps.append(llm_step(len(steps), n, pieces, out, wait_for, output_seg_id=out_id))
                hist = [p for p in pieces if p[1] > 0] + [(out_id, out)]
                wait_for = (len(steps) - 1,)
                if wait > 0:
                    steps.append(tool_step(len(steps), n, "tool", wait, wait_for))
                    wait_for = (len(steps) - 1,)
            yield ProgramRecord(n, (start[s] - t_first) / 1000.0, "tracelab", s, steps)

"""``agentsim trace inspect``: what a trace holds, computed in one streaming pass.

Prefix reuse is the share of prompt tokens an unbounded prefix cache could serve, counted token
by token: steps are visited in file order (programs in file order, steps in step order); a
prompt is served up to the longest prefix it shares with an earlier prompt or with an earlier
call's prompt + output (vLLM caches generated tokens too). Two pieces match while their content
ids are equal; a shorter use of a piece is a prefix of a longer one, so a partial last block
counts only as far as the prompt goes. On a Mooncake trace this is exactly
``sum(min(512 * k, input_length)) / sum(input_length)`` with k the leading run of already-seen
``hash_ids`` (the paper's "cache ratio").
"""

from __future__ import annotations

import math
from array import array
from typing import Iterable

import numpy as np

from agentsim.traces.canonical import ProgramRecord, Step


class PrefixCache:
    """An unbounded, token-accurate prefix cache over (content id, tokens) pieces.

    ``full`` holds the chained key of every piece boundary seen; ``longest`` maps (key of the
    prefix before a piece, content id) to the longest use of that piece after that prefix, which
    is what a partial match can reach.
    """

    __slots__ = ("full", "longest")

    def __init__(self) -> None:
        self.full: set[int] = set()
        self.longest: dict[tuple[int, int], int] = {}

    def match(self, seg_ids: Iterable[int], seg_tokens: Iterable[int]) -> int:
        """Tokens of this prompt already held (the longest cached prefix)."""
        key = 0
        hit = 0
        for sid, n in zip(seg_ids, seg_tokens):
            nxt = hash((key, sid, n))
            if nxt in self.full:
                hit += n
                key = nxt
                continue
            hit += min(n, self.longest.get((key, sid), 0))
            break
        return hit

    def insert(self, seg_ids: Iterable[int], seg_tokens: Iterable[int]) -> None:
        key = 0
        for sid, n in zip(seg_ids, seg_tokens):
            k = (key, sid)
            if self.longest.get(k, 0) < n:
                self.longest[k] = n
            key = hash((key, sid, n))
            self.full.add(key)


def _pct(x: np.ndarray) -> dict[str, float]:
    if not len(x):
        return {k: math.nan for k in ("mean", "p50", "p90", "p99", "min", "max")}
    return {"mean": float(x.mean()), "p50": float(np.percentile(x, 50)), "p90": float(np.percentile(x, 90)),
            "p99": float(np.percentile(x, 99)), "min": float(x.min()), "max": float(x.max())}


def inspect_programs(programs: Iterable[ProgramRecord], meta: dict | None = None) -> dict:
    """Counts, arrivals, token-length and per-program statistics and prefix reuse of a trace."""
    cache = PrefixCache()
    n_in = array("q")
    n_out = array("q")
    calls_per_prog = array("q")
    tools_per_prog = array("q")
    tool_times = array("d")
    arrivals = array("d")
    agents: set[int] = set()
    kinds: dict[str, int] = {}
    tool_names: dict[str, list[float]] = {}
    reused = 0
    llm_recorded = 0.0
    llm_recorded_n = 0
    tool_recorded = 0.0
    n_steps = 0
    for p in programs:
        arrivals.append(p.arrival_at)
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
        calls = tools = 0
        for s in p.steps:
            n_steps += 1
            agents.add(s.agent_id)
            if s.kind == "llm":
                calls += 1
                n_in.append(s.input_tokens)
                n_out.append(s.output_tokens)
                reused += cache.match(s.seg_ids, s.seg_tokens)
                _insert_call(cache, s)
                if s.recorded_time is not None:
                    llm_recorded += s.recorded_time
                    llm_recorded_n += 1
            else:
                tools += 1
                tool_times.append(s.tool_time)
                tool_recorded += s.tool_time
                agg = tool_names.setdefault(s.tool_name, [0, 0.0])
                agg[0] += 1
                agg[1] += s.tool_time
        calls_per_prog.append(calls)
        tools_per_prog.append(tools)
    arr = np.frombuffer(arrivals, dtype=np.float64) if len(arrivals) else np.array([])
    ins = np.frombuffer(n_in, dtype=np.int64) if len(n_in) else np.array([], dtype=np.int64)
    outs = np.frombuffer(n_out, dtype=np.int64) if len(n_out) else np.array([], dtype=np.int64)
    cpp = np.frombuffer(calls_per_prog, dtype=np.int64) if len(calls_per_prog) else np.array([])
    tpp = np.frombuffer(tools_per_prog, dtype=np.int64) if len(tools_per_prog) else np.array([])
    tts = np.frombuffer(tool_times, dtype=np.float64) if len(tool_times) else np.array([])
    span = float(arr.max() - arr.min()) if len(arr) else 0.0
    prompt_total = int(ins.sum())
    out: dict = {
        "source_format": (meta or {}).get("source_format"),
        "source": (meta or {}).get("source"),
        "num_programs": len(arr),
        "num_steps": n_steps,
        "num_llm_calls": len(ins),
        "num_tool_calls": len(tts),
        "num_agents": len(agents),
        "program_kinds": dict(sorted(kinds.items())),
        "first_arrival_s": float(arr.min()) if len(arr) else math.nan,
        "last_arrival_s": float(arr.max()) if len(arr) else math.nan,
        "duration_s": span,
        "arrival_rate_programs_s": len(arr) / span if span > 0 else math.nan,
        "arrival_rate_calls_s": len(ins) / span if span > 0 else math.nan,
        "input_tokens": _pct(ins.astype(np.float64)),
        "output_tokens": _pct(outs.astype(np.float64)),
        "calls_per_program": _pct(cpp.astype(np.float64)),
        "tool_calls_per_program_mean": float(tpp.mean()) if len(tpp) else math.nan,
        "tool_time_s": _pct(tts),
        "tool_time_total_s": float(tts.sum()) if len(tts) else 0.0,
        "tools": {k: {"count": v[0], "mean_s": v[1] / v[0]} for k, v in sorted(tool_names.items())},
        # share of recorded step time spent in tools (needs the LLM calls' recorded durations)
        "tool_time_share": (tool_recorded / (tool_recorded + llm_recorded)
                            if llm_recorded_n == len(ins) and len(ins) and tool_recorded + llm_recorded > 0 else None),
        "prompt_tokens_total": prompt_total,
        "output_tokens_total": int(outs.sum()),
        "prefix_reusable_tokens": int(reused),
        "prefix_reuse": reused / prompt_total if prompt_total else math.nan,
    }
    return out


def _insert_call(cache: PrefixCache, s: Step) -> None:
    if s.output_seg_id >= 0:
        cache.insert(s.seg_ids + (s.output_seg_id,), s.seg_tokens + (s.output_tokens,))
    else:
        cache.insert(s.seg_ids, s.seg_tokens)


def format_report(st: dict) -> str:
    """A human-readable summary of :func:`inspect_programs`' result."""

    def f(x: float, nd: int = 1) -> str:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "n/a"
        return f"{x:,.{nd}f}"

    def dist(d: dict, nd: int = 0) -> str:
        return (f"mean {f(d['mean'], max(nd, 1))}  p50 {f(d['p50'], nd)}  p90 {f(d['p90'], nd)}  "
                f"p99 {f(d['p99'], nd)}  min {f(d['min'], nd)}  max {f(d['max'], nd)}")

    lines = [
        f"trace            {st['source'] or ''} ({st['source_format']})",
        f"programs         {st['num_programs']:,}  ({', '.join(f'{k} {v:,}' for k, v in st['program_kinds'].items())})",
        f"steps            {st['num_steps']:,}: {st['num_llm_calls']:,} LLM calls, {st['num_tool_calls']:,} tool calls; "
        f"{st['num_agents']:,} agents",
        f"arrivals         {f(st['first_arrival_s'], 3)} .. {f(st['last_arrival_s'], 3)} s (duration {f(st['duration_s'], 3)} s); "
        f"{f(st['arrival_rate_programs_s'], 3)} programs/s, {f(st['arrival_rate_calls_s'], 3)} calls/s",
        f"input tokens     {dist(st['input_tokens'])}",
        f"output tokens    {dist(st['output_tokens'])}",
        f"calls/program    {dist(st['calls_per_program'])}",
        f"tools/program    mean {f(st['tool_calls_per_program_mean'], 2)}",
        f"tool time (s)    {dist(st['tool_time_s'], 3)}; total {f(st['tool_time_total_s'], 1)}",
        f"tool-time share  {f(st['tool_time_share'] * 100, 1) + ' %' if st['tool_time_share'] is not None else 'n/a (no recorded LLM times)'}",
        f"prefix reuse     {f(st['prefix_reuse'] * 100, 2)} % of {st['prompt_tokens_total']:,} prompt tokens "
        f"({st['prefix_reusable_tokens']:,} servable by an unbounded prefix cache)",
    ]
    if st["tools"]:
        top = sorted(st["tools"].items(), key=lambda kv: -kv[1]["count"])[:8]
        lines.append("tools            " + ", ".join(f"{k} x{v['count']} ({f(v['mean_s'], 3)} s)" for k, v in top))
    return "\n".join(lines)

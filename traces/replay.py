"""Replay: turn a trace (any supported format, or canonical Parquet) into runnable programs.

:func:`load_programs` is what ``workload.arrival = "trace"`` (``agentsim simulate --trace``)
calls. Each trace program becomes a :class:`~agentsim.workload.Program` whose body runs its step
DAG exactly: a step starts when all its parents are done (the branch that finishes a step's last
parent runs it; several ready steps run as a :class:`~agentsim.workload.Parallel`). LLM steps send
the trace's prompt content and force its output length; tool steps wait their recorded duration.

Content ids of the trace map to segment ids ``2^62 | id``, a range no generator uses (private
segments are ``program_id << 20 | n`` and shared ones ``2^61 | stable_id``), so trace content is
shared exactly as the trace says and never collides with ids the backend assigns to outputs.

Hints: an LLM step followed by tool steps gets ``tool_after`` (the first tool's name),
``tool_time_estimate`` (that tool name's mean duration over the loaded trace: an informed
predictor) and ``next_invocation_distance`` (the longest of those tool waits: an oracle, as the
generators' ``oracle_hints``); tool calls carry the same per-name mean as ``estimate``. Steps
that recorded their own hints (traces written from generators) keep them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Generator

from agentsim.errors import ConfigError
from agentsim.traces.canonical import ProgramRecord, Step
from agentsim.traces.importers import get_importer
from agentsim.workload import CallHints, Context, Parallel, Program, ProgramContext, Segment, ToolCall

TRACE_SEG_BASE = 1 << 62


def trace_segment(seg_id: int, num_tokens: int) -> Segment:
    return Segment(TRACE_SEG_BASE | seg_id, num_tokens)


class TracePrograms(list):
    """:func:`load_programs`' result: the programs to replay, plus ``num_in_trace`` (how many
    programs the trace holds; more than ``len(self)`` when ``limit`` cut some)."""

    num_in_trace: int = 0


def load_programs(path: str | Path, fmt: str | None = None, time_scale: float = 1.0, limit: int | None = None,
                  seed: int = 0, skip_bad: bool = False, **options: Any) -> TracePrograms:
    """Programs of a trace, sorted by arrival (ties in file order), ids 0..n-1.

    Arrivals are relative to the trace's first program, whatever the source's clock (a Mooncake
    slice starting at 3,600,000 ms, a file of epoch seconds): the first program arrives at 0 s and
    program i at ``(arrival_i - arrival_first) * time_scale`` s, so ``time_scale`` multiplies
    inter-arrival times. ``limit`` keeps the first ``limit`` programs by arrival. Importer options
    (``spread``, ``sessions`` ...) pass through ``options``. Raises ConfigError for a bad
    ``time_scale``/``limit`` and TraceError for a trace without programs.
    """
    if not time_scale > 0:
        raise ConfigError("workload.time_scale", f"must be > 0, got {time_scale}")
    if limit is not None and limit < 1:
        raise ConfigError("workload.limit", f"must be >= 1, got {limit}")
    imp = get_importer(path, fmt, skip_bad=skip_bad, **options)
    records = list(imp.programs())
    if not records:
        from agentsim.errors import TraceError

        raise TraceError(str(path), "no programs in the trace")
    order = sorted(range(len(records)), key=lambda i: (records[i].arrival_at, i))
    if limit is not None:
        order = order[:limit]
    shift = records[order[0]].arrival_at  # the first program's arrival is the replay's time 0
    tool_means = _tool_means(records[i] for i in order)
    programs = TracePrograms()
    programs.num_in_trace = len(records)
    for pid, i in enumerate(order):
        rec = records[i]
        prog = Program(program_id=pid, agent_id=rec.agent_id, kind=rec.kind,
                       arrival_at=(rec.arrival_at - shift) * time_scale, body=make_body(rec, tool_means), seed=seed)
        prog.meta.update(trace_program_id=rec.program_id, trace_key=rec.key, num_steps=len(rec.steps))
        try:
            from agentsim.traces.source import program_rng

            prog.meta["rng"] = program_rng(seed, pid)
        except ImportError:  # pragma: no cover - source.py ships with the package
            pass
        programs.append(prog)
    return programs


def _tool_means(records) -> dict[str, float]:
    agg: dict[str, list[float]] = {}
    for rec in records:
        for s in rec.steps:
            if s.kind == "tool":
                a = agg.setdefault(s.tool_name, [0.0, 0.0])
                a[0] += 1
                a[1] += s.tool_time
    return {k: v[1] / v[0] for k, v in agg.items()}


def make_body(rec: ProgramRecord, tool_means: dict[str, float] | None = None):
    """A program body that runs ``rec``'s step DAG (see the module docstring)."""
    steps = rec.steps
    n = len(steps)
    children: list[list[int]] = [[] for _ in range(n)]
    for s in steps:
        for p in s.parents:
            children[p].append(s.step_id)
    roots = [s.step_id for s in steps if not s.parents]
    segments = [tuple(trace_segment(a, b) for a, b in zip(s.seg_ids, s.seg_tokens)) if s.kind == "llm" else ()
                for s in steps]
    means = tool_means or {}
    hints = [_hints(s, [steps[c] for c in children[s.step_id]], means) for s in steps]

    def body(pc: ProgramContext) -> Generator:
        waiting = [len(s.parents) for s in steps]

        def request(i: int) -> Any:
            s = steps[i]
            if s.kind == "tool":
                return ToolCall(s.tool_name, s.tool_time, estimate=means.get(s.tool_name))
            call = pc.llm(Context.of(*segments[i]), s.output_tokens, agent_id=s.agent_id, thread_id=s.thread_id,
                          hints=hints[i]())
            if s.output_seg_id >= 0:
                call.output_seg_id = TRACE_SEG_BASE | s.output_seg_id
            return call

        def run_from(i: int) -> Generator:
            while True:
                yield request(i)
                ready = []
                for c in children[i]:
                    waiting[c] -= 1
                    if waiting[c] == 0:
                        ready.append(c)
                if len(ready) == 1:
                    i = ready[0]
                    continue
                if ready:
                    yield Parallel([run_from(c) for c in ready])
                return

        if len(roots) == 1:
            yield from run_from(roots[0])
        else:
            yield Parallel([run_from(r) for r in roots])

    return body


def _hints(s: Step, kids: list[Step], means: dict[str, float]):
    """A factory of fresh CallHints for step ``s`` (hints are mutable, so one per call)."""
    if s.hints:
        fields = json.loads(s.hints)
        return lambda: CallHints(**fields)
    tools = [k for k in kids if k.kind == "tool"]
    if not tools:
        return CallHints
    name = tools[0].tool_name
    est = means.get(name)
    dist = max(k.tool_time for k in tools)
    return lambda: CallHints(tool_after=name, tool_time_estimate=est, next_invocation_distance=dist)

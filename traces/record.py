"""Record generator programs as trace programs, without a backend.

:func:`record_body` steps a program body through the one program driver
(:func:`agentsim.programs.drive`) and answers each request at once (an LLM call returns its output
segment, a tool returns ``None``, a :class:`Parallel` runs its branches one after the other), writing down each request as a step with the steps it waited for. The result
is the program's structure and token content: what ``agentsim trace generate`` saves and what
``agentsim trace inspect`` can then summarise. Timings are not recorded (they depend on the
backend), so recorded steps have ``recorded_at = recorded_time = None``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from typing import Any, Iterator

from agentsim.programs import ProgramRun, Strand, answer, run_all_now, walk
from agentsim.programs import program_body as choose_body
from agentsim.traces.canonical import ProgramRecord, Step, make_meta
from agentsim.workload import CallHints, CallResult, LLMCall, Program, ProgramContext, Segment, ToolCall, stable_id


_HINT_FIELDS = tuple(f.name for f in fields(CallHints))


class _Recorder:
    """The recorder's adapter of the program driver (:mod:`agentsim.programs`): each request
    becomes a :class:`Step` at once; a strand's ``data`` is its frontier (the steps its next request
    waits for)."""

    def __init__(self, pc: ProgramContext, reverse_branches: bool = False) -> None:
        self.pc = pc
        self.reverse = reverse_branches
        self.steps: list[Step] = []

    def llm_call(self, req: LLMCall, strand: Strand, thread_id: int):
        sid = len(self.steps)
        if req.output_seg_id is None:
            req.output_seg_id = stable_id("recorded-output", self.pc.program_id, sid) | (1 << 61)
        segs = req.context.all_segments()
        hints = {k: v for k in _HINT_FIELDS if (v := getattr(req.hints, k)) is not None}
        self.steps.append(Step(
            sid, "llm", req.agent_id if req.agent_id is not None else self.pc.agent_id, strand.data,
            tuple(s.seg_id for s in segs), tuple(s.num_tokens for s in segs), req.num_output_tokens,
            req.output_seg_id, thread_id=thread_id, hints=json.dumps(hints, sort_keys=True) if hints else ""))
        strand.data = (sid,)
        return answer(CallResult(sid, Segment(req.output_seg_id, req.num_output_tokens), math.nan, math.nan,
                                 math.nan, -1))

    def tool_call(self, req: ToolCall, strand: Strand):
        sid = len(self.steps)
        self.steps.append(Step(sid, "tool", self.pc.agent_id, strand.data, tool_name=req.name,
                               tool_time=float(req.duration)))
        strand.data = (sid,)
        return answer()

    def all_of(self, branches: list, strand: Strand):
        results = run_all_now(branches, self.reverse)
        ends: list[int] = []
        for b, _ in branches:
            ends.extend(x for x in b.data if x not in ends)
        if ends:
            strand.data = tuple(sorted(ends))
        return answer(results)


def record_body(body, pc: ProgramContext, reverse_branches: bool = False) -> list[Step]:
    """The steps a program body issues (see the module docstring).

    ``reverse_branches`` runs the branches of every Parallel last-first: a program whose content
    does not depend on branch completion order records the same calls either way.
    """
    rec = _Recorder(pc, reverse_branches)
    walk(body(pc), ProgramRun(None, pc), rec, ())
    return rec.steps


def program_body(prog: Program):
    """The body of a program made by :class:`~agentsim.traces.source.ProgramSource` (teams: default
    topology): :func:`agentsim.programs.program_body` without a shape policy."""
    return lambda pc: choose_body(prog, pc)


def generate_programs(generator: str, params: dict | None, num_programs: int, rate: float | None = None,
                      seed: int = 0) -> tuple[dict, Iterator[ProgramRecord]]:
    """(metadata, programs) of ``num_programs`` recorded programs of a registered generator.

    Programs are the ones ``agentsim simulate`` would start with the same generator, params and
    seed (same per-program RNG streams); arrivals are Poisson at ``rate`` programs/s, or all at
    0 when ``rate`` is None.
    """
    from agentsim.config import WorkloadSpec
    from agentsim.traces.source import ProgramSource

    spec = WorkloadSpec(generator=generator, params=dict(params or {}), arrival="poisson", rate=rate or 1.0,
                        num_programs=num_programs)
    src = ProgramSource(spec, seed)
    meta = make_meta("generator", None, generator=generator, params=_jsonable(params or {}), seed=seed,
                     rate=rate, num_programs=num_programs)

    def progs() -> Iterator[ProgramRecord]:
        arrivals = src.poisson_arrivals(math.inf) if rate else None
        for i in range(num_programs):
            prog = next(arrivals) if arrivals is not None else src.make(None, 0.0)
            pc = src.context_for(prog)
            steps = record_body(program_body(prog), pc)
            yield ProgramRecord(prog.program_id, prog.arrival_at, prog.kind, f"{generator}#{prog.program_id}", steps)

    return meta, progs()


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "__dataclass_fields__"):
        return _jsonable(asdict(x))
    return x

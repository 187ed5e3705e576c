"""Oracle information for clairvoyant baselines: a program's whole call plan, by a dry run.

A program body is a deterministic generator of its RNG stream and of the results it is sent (a call's
output segment is fixed when the call is built), so stepping a *copy* of it with stand-in results
lists the calls it will make, without running anything: :func:`plan_body` is an adapter of the one
program driver (:func:`agentsim.programs.drive`). Parallel branches are stepped one after the
other; a branch that draws from the shared RNG while it runs (``fanout`` workers) may then draw in a
different order than in a real run, so the plan of such a program is close, not exact -- every shape
in ``traces/shapes.py`` prepares its branches' requests before yielding them and is planned exactly.

Pure workload logic (no simpy, ray or vllm): every backend calls :func:`plan_program` through
:func:`agentsim.programs.prepare_program` before a program starts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Generator

from agentsim.programs import ProgramRun, Strand, answer, program_body, run_all_now, walk
from agentsim.workload import CallResult, LLMCall, Program, ProgramContext, Segment, ToolCall


@dataclass(frozen=True, slots=True)
class PlannedCall:
    num_prompt_tokens: int
    num_output_tokens: int
    agent_id: int | None
    thread_id: int


@dataclass
class ProgramPlan:
    """The calls a program will make (in the order a sequential walk meets them) and its tool time."""

    calls: list[PlannedCall] = field(default_factory=list)
    tool_time: float = 0.0

    @property
    def num_output_tokens(self) -> int:
        return sum(c.num_output_tokens for c in self.calls)


class _Planner:
    """The oracle's adapter of the program driver (:mod:`agentsim.programs`): every request is
    answered at once, a call with a stand-in result whose output segment is the one the call
    names; Parallel branches run one after the other."""

    def __init__(self, plan: ProgramPlan, max_calls: int) -> None:
        self.plan = plan
        self.max_calls = max_calls

    def llm_call(self, req: LLMCall, strand: Strand, thread_id: int):
        calls = self.plan.calls
        if len(calls) >= self.max_calls:
            raise RuntimeError(f"program plan exceeds {self.max_calls} calls")
        calls.append(PlannedCall(req.context.num_tokens, req.num_output_tokens, req.agent_id, thread_id))
        seg = req.output_seg_id if req.output_seg_id is not None else -len(calls)
        return answer(CallResult(-1, Segment(seg, req.num_output_tokens), 0.0, 0.0, 0.0, -1))

    def tool_call(self, req: ToolCall, strand: Strand):
        return answer()

    def all_of(self, branches: list, strand: Strand):
        return answer(run_all_now(branches))


def plan_body(body: Generator, max_calls: int = 1_000_000) -> ProgramPlan:
    """Step a (fresh, unstarted) program body generator to the end; return its plan.

    Raises ``RuntimeError`` past ``max_calls`` calls and
    :class:`~agentsim.programs.ProgramYieldError` (a ``TypeError``) for a bad yield.
    """
    plan = ProgramPlan()
    run = ProgramRun(None, ProgramContext(-1, -1, "plan", None))
    walk(body, run, _Planner(plan, max_calls))
    plan.tool_time = run.tool_time
    return plan


def plan_program(prog: Program, pc: ProgramContext, max_calls: int = 1_000_000) -> ProgramPlan:
    """The plan of the body a run of ``prog`` takes, without touching the run's RNG stream.

    The body is built by :func:`agentsim.programs.program_body` without a shape policy (a team:
    its task's default topology, no router calls) on a deep copy of ``pc.rng``, then
    :func:`plan_body` walks it. Called by :func:`agentsim.programs.prepare_program` before the
    program starts, in every backend. Raises as :func:`plan_body` does.
    """
    twin = ProgramContext(pc.program_id, pc.agent_id, pc.kind, copy.deepcopy(pc.rng))
    return plan_body(program_body(prog, twin), max_calls)

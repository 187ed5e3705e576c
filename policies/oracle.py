"""Oracle information for clairvoyant baselines: a program's whole call plan, by a dry run.

A program body is a deterministic generator of its RNG stream and of the results it is sent (a call's
output segment is fixed when the call is built), so stepping a *copy* of it with stand-in results
lists the calls it will make, without running anything. Parallel branches are stepped one after the
other; a branch that draws from the shared RNG while it runs (``fanout`` workers) may then draw in a
different order than in a real run, so the plan of such a program is close, not exact -- every shape
in ``traces/shapes.py`` prepares its branches' requests before yielding them and is planned exactly.

Pure workload logic (no simpy, ray or vllm): the simulator and the live driver can both call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generator

from agentsim.workload import CallResult, LLMCall, Parallel, Segment, ToolCall


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


def _walk(gen: Generator, plan: ProgramPlan, max_calls: int) -> Any:
    result = None
    while True:
        try:
            req = gen.send(result)
        except StopIteration as stop:
            return stop.value
        if isinstance(req, LLMCall):
            if len(plan.calls) >= max_calls:
                raise RuntimeError(f"program plan exceeds {max_calls} calls")
            plan.calls.append(PlannedCall(req.context.num_tokens, req.num_output_tokens, req.agent_id, req.thread_id))
            seg = req.output_seg_id if req.output_seg_id is not None else -len(plan.calls)
            result = CallResult(-1, Segment(seg, req.num_output_tokens), 0.0, 0.0, 0.0, -1)
        elif isinstance(req, ToolCall):
            plan.tool_time += req.duration
            result = None
        elif isinstance(req, Parallel):
            out = []
            for b in req.branches:
                if hasattr(b, "send"):
                    out.append(_walk(b, plan, max_calls))
                else:
                    out.append(_walk(_single(b), plan, max_calls))
            result = out
        else:
            raise TypeError(f"program yielded {req!r}")


def _single(request: Any) -> Generator:
    result = yield request
    return result


def plan_body(body: Generator, max_calls: int = 1_000_000) -> ProgramPlan:
    """Step a (fresh, unstarted) program body generator to the end; return its plan."""
    plan = ProgramPlan()
    _walk(body, plan, max_calls)
    return plan

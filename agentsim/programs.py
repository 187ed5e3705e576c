"""The one program driver: the only code that steps a program generator, for every backend.

A program body (:mod:`agentsim.workload`) is a generator that yields requests -- :class:`LLMCall`,
:class:`ToolCall`, :class:`Parallel` -- and receives their results. :func:`drive` steps it: it sends
each result in, normalises :class:`Parallel` branches into *strands*, gives every call its thread
id, adds up the critical path and keeps the program's statistics (:class:`ProgramRun`, whose
:meth:`ProgramRun.row` is the ``programs.parquet`` row). A backend supplies only the three
operations that take time, as a :class:`ProgramOps` adapter:

- ``llm_call(req, strand, thread_id)`` runs one LLM call and returns its :class:`CallResult`;
- ``tool_call(req, strand)`` waits out one tool call (the simulator: ``req.duration`` of simulated
  time; live: a real sleep);
- ``all_of(branches, strand)`` runs ``strand``'s branches ``[(strand, generator), ...]``
  concurrently and returns their return values in branch order.

Each operation returns an iterable that :func:`drive` delegates to with ``yield from``, so the
driver is itself a generator run by the backend's own kernel, as SimPy's ``Process._resume`` is
the one stepper of every SimPy process and ``simpy/rt.py`` reuses it for wall-clock time by
overriding one method:

- ``sim/runner.py`` ``Simulation``: operations yield SimPy events (``call.done``,
  ``env.timeout``); the driver runs inside the program's SimPy process;
- ``live/driver.py`` ``LiveDriver``: operations yield asyncio futures (``coroutine.__await__()``);
  the driver runs inside the program's asyncio task;
- ``policies/oracle.py`` ``plan_body`` and ``traces/record.py`` ``record_body``: operations answer
  at once (:func:`answer`); :func:`walk` runs the driver to its end (:func:`run_now`).

Where the four steppers used to differ, this is the one behaviour (issue 9):

- **Branches**: a :class:`Parallel` branch that is a request (``LLMCall``/``ToolCall``/``Parallel``)
  runs as a one-request strand; any other branch must be a generator (it has ``send``) and runs as
  a sub-program; anything else raises :class:`ProgramYieldError`.
- **Thread ids**: a strand runs on its parent's thread, except that a bare ``LLMCall`` branch runs
  on its own ``thread_id``; a call's thread is its own ``LLMCall.thread_id`` when non-zero, else its
  strand's (the simulator's rule; the live driver used the call's own id only).
- **When counts move**: ``num_calls``/``num_tool_calls`` and the token and time sums count a call
  once its result has reached the program (the simulator's rule; live counted a call before
  dispatch, so a failed call was counted).
- **Token and tool-time counts**: ``num_prompt_tokens`` sums the calls' prompt lengths,
  ``num_output_tokens`` the tokens each call returned (``CallResult.output.num_tokens``: the tokens
  vLLM generated live; the forced length in the simulator, where they are equal);
  ``tool_time`` and the critical path add the tool's declared ``ToolCall.duration`` in every
  backend (live used to add its measured sleep, which oversleeps by the event loop's latency; the
  program's measured ``latency`` still shows that).
- **A bad yield** raises :class:`ProgramYieldError` (a ``TypeError``) naming the program, its kind
  and the value (the simulator stops; the live driver records the program as failed).
- **The critical path** of a strand is the sum of its calls' E2E latencies
  (``finish_at - arrival_at``) and tool durations, a :class:`Parallel` adding its slowest branch
  (Autellix's critical path, arXiv:2502.13965 §4.2).
- **The body**: :func:`program_body` -- the program's own ``body``, else its generator's ``body``,
  or for a team generator ``team_body`` with the topology the shape policy picks (recorded in
  ``prog.meta["topology"]``) or, without a shape policy, the task's default topology; a shape
  policy with a :class:`~agentsim.policies.base.TeamWrapper` (AdaptOrch's decomposer call) wraps
  the team's body.
- **Before a program starts**: :func:`prepare_program` is what every backend calls (the simulator
  and the live driver alike): it hands the program's whole call plan to the bundle's
  :class:`~agentsim.policies.base.ProgramPlanner` s (``sjf-oracle``; the plan is a dry run of a
  copy of the body, :func:`agentsim.policies.oracle.plan_program`) and returns the body
  (:func:`program_body` with the bundle's shape policy and team wrapper). The backend then emits
  ``on_program_start`` and steps the body with :func:`drive`.
- **The context**: :func:`program_context` -- the program's own RNG stream
  (``prog.meta["rng"]``), else the run seed's stream for its program id (live used the program's
  ``seed`` there).

Nothing here imports simpy, ray or vllm.
"""

from __future__ import annotations

from typing import Any, Generator, Iterable, Protocol

from agentsim.metrics import ProgramStatus
from agentsim.workload import CallResult, LLMCall, Parallel, Program, ProgramContext, ToolCall

__all__ = [
    "ProgramYieldError", "ProgramOps", "Strand", "ProgramRun", "program_context", "program_body",
    "prepare_program", "drive",
    "run_now", "answer", "run_all_now", "walk",
]

_REQUESTS = (LLMCall, ToolCall, Parallel)


class ProgramYieldError(TypeError):
    """A program yielded something that is not a request (or a Parallel branch that is neither a
    request nor a generator)."""


class ProgramOps(Protocol):
    """What a backend supplies to :func:`drive`: three operations, each an iterable to ``yield from``."""

    def llm_call(self, req: LLMCall, strand: Strand, thread_id: int) -> Iterable:
        """Run ``req`` as a call of thread ``thread_id``; the iterable returns its :class:`CallResult`."""

    def tool_call(self, req: ToolCall, strand: Strand) -> Iterable:
        """Wait ``req.duration`` seconds (the backend's clock); the iterable returns anything."""

    def all_of(self, branches: list[tuple[Strand, Generator]], strand: Strand) -> Iterable:
        """Run the branch generators (branches of ``strand``) concurrently; the iterable returns their
        return values in branch order."""


class Strand:
    """One sequential thread of a program: the body itself or one :class:`Parallel` branch.

    ``run``: the program's :class:`ProgramRun`; ``thread_id``: the thread its calls default to;
    ``data``: free for the adapter, copied from parent to branch (the recorder keeps the strand's
    dependency frontier there).
    """

    __slots__ = ("run", "thread_id", "data")

    def __init__(self, run: ProgramRun, thread_id: int = 0, data: Any = None) -> None:
        self.run = run
        self.thread_id = thread_id
        self.data = data


class ProgramRun:
    """One program being run: its context, body and statistics (the ``programs.parquet`` row).

    ``prog`` may be None for a bare body walked without a backend (the oracle, the recorder).

    Counts are integers; ``llm_time``, ``tool_time`` and ``critical_path`` are seconds of the
    backend's clock; ``end_at`` is NaN until the backend ends the program; ``status`` is a
    :class:`~agentsim.metrics.ProgramStatus`: ``RUNNING``, then ``FINISHED``, ``FAILED`` or
    ``UNFINISHED``.
    """

    __slots__ = ("prog", "pc", "body", "num_calls", "num_tool_calls", "prompt_tokens", "output_tokens",
                 "llm_time", "tool_time", "critical_path", "status", "end_at", "error", "coordination_overhead")

    def __init__(self, prog: Program | None, pc: ProgramContext, body: Generator | None = None) -> None:
        self.prog = prog
        self.pc = pc
        self.body = body
        self.num_calls = 0
        self.num_tool_calls = 0
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.llm_time = 0.0
        self.tool_time = 0.0
        self.critical_path = float("nan")
        self.status = ProgramStatus.RUNNING
        self.end_at = float("nan")
        self.error: str | None = None
        self.coordination_overhead = 0.0  # router time of its calls (s), set by a backend that models it

    def row(self) -> tuple:
        """This program's row of ``metrics.PROGRAM_COLUMNS`` (:func:`agentsim.metrics.program_row`)."""
        from agentsim.metrics import program_row

        return program_row(self)

    def __repr__(self) -> str:
        return f"ProgramRun({self.prog.program_id}, {self.prog.kind}, {self.status})"


def program_context(prog: Program, seed: int) -> ProgramContext:
    """The :class:`ProgramContext` a program body gets: the program's own RNG stream
    (``prog.meta["rng"]``, set by :class:`~agentsim.traces.source.ProgramSource`), else the run
    ``seed``'s stream for this program id (:func:`~agentsim.traces.source.program_rng`)."""
    rng = prog.meta.get("rng")
    if rng is None:
        from agentsim.traces.source import program_rng

        rng = program_rng(seed, prog.program_id)
    return ProgramContext(prog.program_id, prog.agent_id, prog.kind, rng)


def program_body(prog: Program, pc: ProgramContext, shape: Any = None, now: float = 0.0,
                 team_wrapper: Any = None) -> Generator:
    """The body generator of ``prog`` (see the module docstring, **The body**).

    ``shape``: the bundle's shape policy (``shape(task, now) -> topology``) or None for the task's
    default topology; ``now``: the time the program starts (seconds), passed to the shape policy;
    ``team_wrapper``: ``wrap_team_body(pc, task, topology, body) -> body`` of a shape policy whose
    routing costs LLM calls of its own (``Capabilities.team_wrapper``), applied to team bodies only.
    """
    if prog.body is not None:
        return prog.body(pc)
    spec = prog.meta["generator"]
    if getattr(spec, "is_team", False):
        task = spec.task(pc.rng)
        if shape is None:
            topology = task.default_topology
        else:
            topology = shape.shape(task, now)
            prog.meta["topology"] = topology
        body = spec.team_body(pc, task, topology)
        if team_wrapper is not None:
            body = team_wrapper(pc, task, topology, body)
        return body
    return spec.body(pc)


def prepare_program(prog: Program, pc: ProgramContext, bundle: Any, now: float) -> Generator:
    """What a backend does before it starts ``prog`` (its context ``pc``); returns the body to drive.

    1. The bundle's :class:`~agentsim.policies.base.ProgramPlanner` s (``bundle.caps.planners``)
       get the program's whole call plan, ``on_program_plan(program_id, plan, prog.arrival_at)``:
       a dry run of a copy of the body without the shape policy (a team: its default topology;
       :func:`agentsim.policies.oracle.plan_program`). Only a program made by a generator
       (``prog.meta["generator"]``) is planned; a replayed trace program is not.
    2. The body: :func:`program_body` with the bundle's shape policy at ``now`` (seconds) and its
       team wrapper (``bundle.caps.team_wrapper``: AdaptOrch's charged decomposer call).

    ``bundle``: a :class:`~agentsim.policies.base.PolicyBundle` (its checked ``caps`` and ``shape``).
    Whatever the plan's dry run or the body's construction raises passes through (the simulator
    stops; the live driver records the program as failed).
    """
    caps = bundle.caps
    if caps.planners and prog.meta.get("generator") is not None:
        from agentsim.policies.oracle import plan_program

        plan = plan_program(prog, pc)
        for comp in caps.planners:
            comp.on_program_plan(prog.program_id, plan, prog.arrival_at)
    return program_body(prog, pc, bundle.shape, now, caps.team_wrapper)


def _one(request: Any) -> Generator:
    """A one-request strand (a Parallel branch that is a bare request)."""
    result = yield request
    return result


def _bad(run: ProgramRun, what: str, value: Any) -> ProgramYieldError:
    p = run.prog if run.prog is not None else run.pc
    return ProgramYieldError(f"program {p.program_id} ({p.kind}) {what} {value!r}; "
                             "expected LLMCall, ToolCall or Parallel" + (" or a generator" if "branch" in what else ""))


def drive(gen: Generator, strand: Strand, ops: ProgramOps) -> Generator[Any, Any, tuple[float, Any]]:
    """Step one program (or branch) generator to its end through ``ops``.

    A generator for the backend to run (``yield from`` in a SimPy process, awaited in asyncio,
    :func:`run_now` for adapters that answer at once); it returns ``(critical path seconds, the
    body's return value)`` and updates ``strand.run``'s statistics. Raises
    :class:`ProgramYieldError` for a bad yield; whatever an operation raises passes through.
    """
    run = strand.run
    result = None
    crit = 0.0
    while True:
        try:
            req = gen.send(result)
        except StopIteration as stop:
            return crit, stop.value
        kind = type(req)
        if kind is LLMCall or isinstance(req, LLMCall):
            res: CallResult = yield from ops.llm_call(req, strand, req.thread_id or strand.thread_id)
            e2e = res.finish_at - res.arrival_at
            run.num_calls += 1
            run.prompt_tokens += req.context.num_tokens
            run.output_tokens += res.output.num_tokens
            run.llm_time += e2e
            crit += e2e
            result = res
        elif kind is ToolCall or isinstance(req, ToolCall):
            yield from ops.tool_call(req, strand)
            run.num_tool_calls += 1
            run.tool_time += req.duration
            crit += req.duration
            result = None
        elif isinstance(req, Parallel):
            branches = []
            for b in req.branches:
                if isinstance(b, _REQUESTS):
                    tid = b.thread_id if isinstance(b, LLMCall) else strand.thread_id
                    branches.append((Strand(run, tid, strand.data), _one(b)))
                elif hasattr(b, "send"):
                    branches.append((Strand(run, strand.thread_id, strand.data), b))
                else:
                    raise _bad(run, "yielded a Parallel branch", b)
            subs = [(s, drive(b, s, ops)) for s, b in branches]
            outs = yield from ops.all_of(subs, strand)
            crit += max((o[0] for o in outs), default=0.0)
            result = [o[1] for o in outs]
        else:
            raise _bad(run, "yielded", req)


def run_now(gen: Generator) -> Any:
    """Run a generator whose operations answer at once (never yield) to its end; return its value.

    Raises ``RuntimeError`` if it yields (an operation that would have to wait).
    """
    try:
        value = gen.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError(f"an operation yielded {value!r}; run_now runs only operations that answer at once")


def answer(value: Any = None) -> Generator:
    """An operation's iterable that returns ``value`` at once (for adapters without a clock)."""
    return value
    yield  # noqa: unreachable - makes this a generator


def walk(body: Generator, run: ProgramRun, ops: ProgramOps, data: Any = None) -> Any:
    """Drive ``body`` with an adapter that answers at once; branches run one after the other in
    the order the adapter's ``all_of`` chooses. Returns the body's return value; ``run.critical_path``
    is set."""
    crit, value = run_now(drive(body, Strand(run, 0, data), ops))
    run.critical_path = crit
    return value


def run_all_now(branches: list[tuple[Strand, Generator]], reverse: bool = False) -> list:
    """``all_of`` for adapters that answer at once: each branch in turn (last first with
    ``reverse``), results in branch order."""
    out: list = [None] * len(branches)
    order = range(len(branches))
    for i in (reversed(order) if reverse else order):
        out[i] = run_now(branches[i][1])
    return out

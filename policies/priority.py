"""Program-level priority: Autellix PLAS / ATLAS, FastServe-style MLFQ, an SJF oracle, Kairos-style
shortest remaining workflow, HexGen urgency and Continuum's program-FCFS with pins.

Autellix (research/policies.md §1) schedules *programs*, not calls: a call's priority is its program's
attained service so far (PLAS: the sum of its finished calls' engine time; ATLAS: the longest observed
critical path, one scalar per program). Priorities are discretised into K multilevel queues with
per-queue quanta; a call enters the queue whose range holds its program's service (not always the top
one, unlike MLFQ), is demoted when it used up its quantum, and is promoted back to the top queue once
its program's wait/service ratio reaches ``beta`` (anti-starvation). Batches are formed by strict
priority: FCFS inside a queue, queues in order, no skipping; a better waiting call preempts the worst
running one (the engine model calls :meth:`key` every step because the policy is ``dynamic``).

Units: service and wait are seconds of engine time (``CallView.service_time``), so the default first
quantum ``q1 = 1 s`` is about the median service time of a BFCL-sized call on an A100 engine under
load (agentsim choice; the paper leaves K, quanta and beta open).

None of these reads a clock: ``now`` comes in; per-call state lives in dicts keyed by ``call_id`` and
is dropped when the call finishes.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any

from agentsim.policies.base import CallView
from agentsim.policies.registry import check_range, register, register_bundle

INF = math.inf


# --------------------------------------------------------------------------- shared helpers
def call_work(num_prompt_tokens: int, num_output_tokens: int, prompt_weight: float) -> float:
    """Engine work of one call in decode-token equivalents (prompt tokens are cheaper)."""
    return num_output_tokens + prompt_weight * num_prompt_tokens


@dataclass(slots=True)
class _ProgramEntry:
    """Autellix's process-table entry for one program."""

    service: float = 0.0      # PLAS: sum of finished calls' service; ATLAS: longest critical path
    wait: float = 0.0         # total queueing time of finished calls
    num_active: int = 0


@dataclass(slots=True)
class _CallEntry:
    base_service: float       # the program's service when the call arrived (c.service)
    level: int                # current queue index
    quantum: float            # quantum of the current queue
    quantum_mark: float       # call service_time when the current quantum started
    wait_mark: float          # call wait when its counters were last reset (anti-starvation)
    model_mark: float         # call service_time when its counters were last reset


def current_wait(call: CallView, now: float) -> float:
    """Time the call has spent queued so far.

    ``CallView.wait_time`` is refreshed only at scheduling points in some backends (the simulator
    adds a wait when the call is admitted), so for a call still waiting it lags; the elapsed time
    minus the engine time it received is the same quantity, up to steps it spent running but
    unscheduled (a partial prefill squeezed out of the token budget).
    """
    return max(call.wait_time, now - call.arrival_at - call.service_time)


@register("order", "plas")
class PLAS:
    """Autellix PLAS: program-level attained service in K multilevel queues, anti-starvation, preemptive.

    ``num_queues`` K; quanta ``q1 * growth**i`` (queue i covers attained service
    ``[sum q_<i, sum q_<=i)``); ``beta``: a call whose program's (wait / service) reaches ``beta`` moves to
    the top queue (``None`` disables it); ``starvation_floor``: the service used in that ratio is at least
    this (default q1, so a program that has barely run is not promoted at once); ``preemptive``: strict
    priority (a better waiting call preempts the worst running one when the engine is full).
    """

    dynamic = True
    program_level = True   # False: MLFQ (every call starts in the top queue)

    def __init__(self, num_queues: int = 8, q1: float = 1.0, growth: float = 2.0, beta: float | None = 5.0,
                 starvation_floor: float | None = None, preemptive: bool = True) -> None:
        if num_queues < 1:
            raise ValueError("num_queues must be >= 1")
        if q1 <= 0 or growth < 1:
            raise ValueError("q1 must be > 0 and growth >= 1")
        if beta is not None and beta <= 0:
            raise ValueError("beta must be > 0 (or None to disable anti-starvation)")
        self.num_queues = num_queues
        self.q1 = q1
        self.growth = growth
        self.beta = beta
        self.starvation_floor = q1 if starvation_floor is None else starvation_floor
        self.preemptive = preemptive
        self.quanta = [q1 * growth ** i for i in range(num_queues)]
        self.quanta[-1] = INF  # the last queue never demotes
        # lower bounds of the queues' service ranges: Q_1^lo = 0, Q_{i+1}^lo = Q_i^hi
        self.bounds = [0.0]
        for q in self.quanta[:-1]:
            self.bounds.append(self.bounds[-1] + q)
        self.programs: dict[int, _ProgramEntry] = {}
        self.calls: dict[int, _CallEntry] = {}
        self.num_demotions = 0
        self.num_promotions = 0

    # ------------------------------------------------------------------ levels
    def queue_of(self, service: float) -> int:
        """Index of the queue whose range contains ``service``."""
        return bisect.bisect_right(self.bounds, service) - 1

    def _entry(self, call: CallView, now: float) -> _CallEntry:
        st = self.calls.get(call.call_id)
        if st is None:
            pt = self.programs.get(call.program_id)
            if pt is None:
                pt = self.programs[call.program_id] = _ProgramEntry()
            pt.num_active += 1
            base = pt.service
            level = self.queue_of(base) if self.program_level else 0
            served = call.service_time
            st = _CallEntry(base, level, self.quanta[level], served, current_wait(call, now), served)
            self.calls[call.call_id] = st
        return st

    # ------------------------------------------------------------------ hooks
    def on_call_arrive(self, call: CallView, now: float) -> None:
        self._entry(call, now)

    def on_call_finish(self, call: CallView, now: float) -> None:
        st = self.calls.pop(call.call_id, None)
        pt = self.programs.get(call.program_id)
        if pt is None:
            return
        base = st.base_service if st is not None else pt.service
        self._update_service(pt, base, call.service_time)
        pt.wait += call.wait_time
        pt.num_active = max(0, pt.num_active - 1)

    def _update_service(self, pt: _ProgramEntry, base: float, model_time: float) -> None:
        pt.service += model_time  # PLAS: sum over the program's finished calls

    def on_program_end(self, program_id: int, now: float) -> None:
        self.programs.pop(program_id, None)

    # ------------------------------------------------------------------ the order
    def key(self, call: CallView, now: float) -> tuple[int, float, int]:
        """(queue index, arrival, call id): FCFS inside a queue; demotes and promotes as time passes.

        A pure function of the call's service and wait and the program's record, however often it
        is evaluated (the simulator ranks waiting calls every step, the live scheduler every call),
        so both backends reach the same order at the same instants. (Hot path: the simulator calls
        it for every waiting call at every step.)
        """
        st = self.calls.get(call.call_id)
        if st is None:
            st = self._entry(call, now)
        served = call.service_time
        if served - st.quantum_mark >= st.quantum and st.level < self.num_queues - 1:
            last = self.num_queues - 1
            quanta = self.quanta
            while st.level < last and served - st.quantum_mark >= st.quantum:
                st.quantum_mark += st.quantum
                st.level += 1
                st.quantum = quanta[st.level]
                self.num_demotions += 1
        if st.level > 0 and self.beta is not None:
            pt = self.programs[call.program_id]
            w = now - call.arrival_at - served
            if call.wait_time > w:
                w = call.wait_time
            model = pt.service + served - st.model_mark
            if model < self.starvation_floor:
                model = self.starvation_floor
            if pt.wait + w - st.wait_mark >= self.beta * model:
                st.level = 0
                st.quantum = self.quanta[0]
                st.quantum_mark = served
                st.wait_mark = w
                st.model_mark = served
                self.num_promotions += 1
        return (st.level, call.arrival_at, call.call_id)

    def level_of(self, call_id: int) -> int | None:
        st = self.calls.get(call_id)
        return None if st is None else st.level


@register("order", "atlas")
class ATLAS(PLAS):
    """Autellix ATLAS: like PLAS, but a program's priority is its longest observed critical path.

    One scalar per program: a call inherits it on arrival, and on completion the program's value
    becomes ``max(value, call's inherited value + call's service)`` -- so a program's parallel calls
    share one priority and no dependency tracking is needed.
    """

    def _update_service(self, pt: _ProgramEntry, base: float, model_time: float) -> None:
        pt.service = max(pt.service, base + model_time)


@register("order", "mlfq")
class MLFQ(PLAS):
    """FastServe-style MLFQ: every call enters the top queue and is demoted by its own service.

    Same queues and quanta as PLAS; no anti-starvation by default (``beta=None``).
    """

    program_level = False

    def __init__(self, num_queues: int = 8, q1: float = 1.0, growth: float = 2.0, beta: float | None = None,
                 starvation_floor: float | None = None, preemptive: bool = True) -> None:
        super().__init__(num_queues, q1, growth, beta, starvation_floor, preemptive)


# --------------------------------------------------------------------------- shortest remaining work
@register("order", "sjf-oracle")
class SJFOracle:
    """Clairvoyant shortest-remaining-program-first: knows each program's remaining LLM work.

    The backend hands the policy each program's full call plan when it starts
    (``on_program_plan``: the :class:`~agentsim.policies.base.ProgramPlanner` capability, a
    :class:`agentsim.policies.oracle.ProgramPlan`); a call's key is the work of its program's calls
    from this one on (``output tokens + prompt_weight * prompt tokens``). Static keys; ``preemptive``
    by default (SRPT-like).
    """

    dynamic = False

    def __init__(self, prompt_weight: float = 0.02, preemptive: bool = True) -> None:
        if prompt_weight < 0:
            raise ValueError("prompt_weight must be >= 0")
        self.prompt_weight = prompt_weight
        self.preemptive = preemptive
        self._suffix: dict[int, list[float]] = {}   # program -> remaining work after k arrivals
        self._arrived: dict[int, int] = {}
        self._keys: dict[int, float] = {}

    def on_program_plan(self, program_id: int, plan: Any, now: float) -> None:
        works = [call_work(c.num_prompt_tokens, c.num_output_tokens, self.prompt_weight) for c in plan.calls]
        suffix = [0.0] * (len(works) + 1)
        for i in range(len(works) - 1, -1, -1):
            suffix[i] = suffix[i + 1] + works[i]
        self._suffix[program_id] = suffix

    def on_call_arrive(self, call: CallView, now: float) -> None:
        self.key(call, now)

    def key(self, call: CallView, now: float) -> float:
        k = self._keys.get(call.call_id)
        if k is None:
            n = self._arrived.get(call.program_id, 0)
            self._arrived[call.program_id] = n + 1
            suffix = self._suffix.get(call.program_id)
            if suffix is not None and n < len(suffix) - 1:
                k = suffix[n]
            else:  # no plan (or the plan ran out): this call's own work
                k = call_work(call.num_prompt_tokens, call.num_output_tokens, self.prompt_weight)
            self._keys[call.call_id] = k
        return k

    def on_call_finish(self, call: CallView, now: float) -> None:
        self._keys.pop(call.call_id, None)

    def on_program_end(self, program_id: int, now: float) -> None:
        self._suffix.pop(program_id, None)
        self._arrived.pop(program_id, None)


@register("order", "kairos")
class ShortestRemainingWorkflow:
    """Kairos-style: run first the calls whose workflow has the least expected remaining work, learned online.

    Per program kind (the workflow), the policy remembers the per-call work of the last ``history``
    finished programs; a call that is its program's k-th gets key = mean over remembered programs with
    more than k calls of their work from call k on (non-clairvoyant; cold start: the call's own work).
    ``prompt_weight`` as in ``sjf-oracle``. Static keys, not preemptive.
    """

    dynamic = False
    preemptive = False

    def __init__(self, history: int = 200, prompt_weight: float = 0.02) -> None:
        if history < 1:
            raise ValueError("history must be >= 1")
        self.history = history
        self.prompt_weight = prompt_weight
        self._done: dict[str, list[list[float]]] = {}   # kind -> suffix-work arrays of finished programs
        self._running: dict[int, tuple[str, list[float]]] = {}
        self._keys: dict[int, float] = {}

    def on_program_start(self, program_id: int, agent_id: int, kind: str, now: float) -> None:
        self._running[program_id] = (kind, [])

    def expected_remaining(self, kind: str, k: int) -> float | None:
        hist = self._done.get(kind)
        if not hist:
            return None
        vals = [s[k] for s in hist if len(s) - 1 > k]
        return sum(vals) / len(vals) if vals else None

    def key(self, call: CallView, now: float) -> float:
        k = self._keys.get(call.call_id)
        if k is None:
            kind, works = self._running.setdefault(call.program_id, (call.program_kind, []))
            own = call_work(call.num_prompt_tokens, call.num_output_tokens, self.prompt_weight)
            est = self.expected_remaining(kind, len(works))
            works.append(own)
            k = own if est is None else max(own, est)
            self._keys[call.call_id] = k
        return k

    def on_call_arrive(self, call: CallView, now: float) -> None:
        self.key(call, now)

    def on_call_finish(self, call: CallView, now: float) -> None:
        self._keys.pop(call.call_id, None)

    def on_program_end(self, program_id: int, now: float) -> None:
        entry = self._running.pop(program_id, None)
        if entry is None:
            return
        kind, works = entry
        suffix = [0.0] * (len(works) + 1)
        for i in range(len(works) - 1, -1, -1):
            suffix[i] = suffix[i + 1] + works[i]
        hist = self._done.setdefault(kind, [])
        hist.append(suffix)
        if len(hist) > self.history:
            del hist[0]


@register("order", "hexgen-urgency")
class HexGenUrgency:
    """HexGen-Flow's local queue: the most urgent call first (urgency = estimated time - slack).

    A call's deadline is ``hints.deadline_at`` or, without one, ``program_arrival_at + program_slo``
    (``None``: no deadline, FCFS). Urgency ``t_est - (deadline - now)`` orders calls exactly like
    ``deadline - t_est`` (now is common to all), so keys are static: least slack first.
    ``t_est = decode_time_per_token * output + prefill_time_per_token * prompt`` (defaults: A100,
    Llama-3-8B under load).
    """

    dynamic = False
    preemptive = False

    def __init__(self, program_slo: float | None = None, decode_time_per_token: float = 0.025,
                 prefill_time_per_token: float = 0.0002) -> None:
        if program_slo is not None:
            check_range("program_slo", program_slo, lo=0)
        check_range("decode_time_per_token", decode_time_per_token, lo=0)
        check_range("prefill_time_per_token", prefill_time_per_token, lo=0)
        self.program_slo = program_slo
        self.decode_time_per_token = decode_time_per_token
        self.prefill_time_per_token = prefill_time_per_token

    def estimate(self, call: CallView) -> float:
        return self.decode_time_per_token * call.num_output_tokens + self.prefill_time_per_token * call.num_prompt_tokens

    def deadline(self, call: CallView) -> float:
        d = call.hints.deadline_at
        if d is None and self.program_slo is not None:
            d = call.program_arrival_at + self.program_slo
        return INF if d is None else d

    def key(self, call: CallView, now: float) -> tuple[float, float]:
        return (self.deadline(call) - self.estimate(call), call.arrival_at)


register_bundle("autellix-plas", "Autellix: PLAS multilevel queues + program-locality load balancer",
                route="autellix-lb", order="plas", evict="lru", shape="fixed")
register_bundle("autellix-atlas", "Autellix: ATLAS (critical-path service) + program-locality load balancer",
                route="autellix-lb", order="atlas", evict="lru", shape="fixed")
register_bundle("mlfq", "FastServe-style MLFQ (every call starts in the top queue), least-loaded routing",
                route="least-loaded", order="mlfq", evict="lru", shape="fixed")
register_bundle("sjf-oracle", "Clairvoyant shortest-remaining-program-first (knows each program's calls)",
                route="least-loaded", order="sjf-oracle", evict="lru", shape="fixed")
register_bundle("kairos", "Kairos-style shortest expected remaining workflow (learned per program kind)",
                route="least-loaded", order="kairos", evict="lru", shape="fixed")

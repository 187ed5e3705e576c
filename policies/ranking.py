"""The one ranking, preemption-victim and preempt-for-a-better-call rule every backend uses.

An order policy (:class:`~agentsim.policies.base.OrderPolicy`) only gives a key; what the backends do
with it is decided here, once, and called by the simulator engine (``agentsim.sim.engine.Engine``:
queue order, KV-pressure victim, strict-priority preemption), the live scheduler inside vLLM
(``agentsim.live.scheduler.AgentsimScheduler``: re-rank, preempt for a better waiting call), the
live driver (``agentsim.live.driver.priority_for``: vLLM's integer ``priority``) and the
cross-backend test (``tests/test_policies_live.py``). Anchor: Ciw's ``Node.choose_next_customer``
calls the queueing discipline in exactly one place.

The rule (the simulator's, kept when the three copies were merged; the live scheduler used to break
ties by arrival time and request id, which orders calls the same way whenever call ids follow
arrival order, as they do in both backends):

- **rank**: lower ``(order.key(call, now), call.seq)`` runs first. ``seq`` is the call's arrival
  sequence number (the call id in both backends), the one tie-breaker.
- **victim**: the running call with the highest rank key (the one the policy would run last). With
  FCFS that is the latest arrival, vLLM v1's ``self.running.pop()`` under KV pressure
  (``vllm/v1/core/sched/scheduler.py``); with ``--scheduling-policy priority`` it is vLLM's
  ``max(self.running, key=lambda r: (r.priority, r.arrival_time))``.
- **preempt**: a waiting call preempts a running one only if its rank key is strictly lower
  (strict-priority batch formation, Autellix §4; only for ``preemptive`` policies).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from agentsim.policies.base import CallView, OrderPolicy

#: vLLM ``priority`` units per unit of an order key (keys in seconds: 1 ms resolution)
PRIORITY_SCALE = 1000.0


def rank_key(order: OrderPolicy, call: CallView, now: float) -> tuple:
    """``(order.key(call, now), call.seq)``: lower runs first; ``seq`` (arrival sequence) breaks ties.

    ``call`` is any :class:`~agentsim.policies.base.CallView` with an integer ``seq``; ``now`` in
    seconds of the run clock.
    """
    return (order.key(call, now), call.seq)


def rank(order: OrderPolicy, calls: Iterable[CallView], now: float) -> list:
    """``calls`` sorted by :func:`rank_key` (a new list; the first runs first)."""
    key = order.key
    return sorted(calls, key=lambda c: (key(c, now), c.seq))


def sort_by_rank(order: OrderPolicy, calls: list, now: float) -> None:
    """Sort the list ``calls`` in place by :func:`rank_key` (a dynamic policy's queue, every step)."""
    key = order.key
    calls.sort(key=lambda c: (key(c, now), c.seq))


def pick_victim(order: OrderPolicy, running: Sequence[CallView], now: float) -> Any:
    """The running call to preempt: the one with the highest :func:`rank_key`.

    Raises ValueError if ``running`` is empty.
    """
    key = order.key
    return max(running, key=lambda c: (key(c, now), c.seq))


def should_preempt(order: OrderPolicy, head: CallView, victim: CallView, now: float) -> bool:
    """True if the waiting ``head`` ranks strictly better than the running ``victim``."""
    return rank_key(order, head, now) < rank_key(order, victim, now)


def priority_number(order: OrderPolicy, call: CallView, now: float) -> int:
    """The order key as vLLM's integer request ``priority`` (lower runs first; vLLM breaks ties by
    arrival time, as :func:`rank_key` does by arrival sequence).

    The key (or the first element of a tuple key) is scaled by :data:`PRIORITY_SCALE` and floored,
    which keeps FCFS (key = arrival time in s) exactly FCFS; an infinite key maps to ``±2**62``.
    """
    key = order.key(call, now)
    if isinstance(key, tuple):
        key = key[0] if key else 0
    k = float(key)
    if not math.isfinite(k):
        return 2**62 if k > 0 else -(2**62)
    return int(math.floor(k * PRIORITY_SCALE))

"""KV retention across tool calls: Continuum's TTL pinning and Tokencake's offload with predictive reload.

An agent's KV is freed (cached, evictable) when its call ends, and LRU may evict it while the tool
runs although the agent comes right back. Retention policies keep it:

- ``continuum`` (research/policies.md §6): when a call ends and the program will call a tool, pin the
  program's KV for τ* = argmax_τ P(τ, f)·(T·η + PrefillReload(r)) − τ, where P(·, f) is the empirical
  CDF of tool f's durations (the global CDF while f has at most ``k`` samples, ``t_default`` while there
  are at most ``k`` samples in all), T the mean queueing delay of requests whose KV was not kept, η the
  memoryfulness of the turns-per-program distribution (−Corr(k, N−k)), PrefillReload the time to
  recompute the context. Unpin: at expiry if the program has no request waiting; when the program's
  next request is admitted; when the program ends; and under memory pressure, latest program arrival
  first, until the waiting head fits (the deadlock guard). Its order component ``continuum`` runs
  preempted requests first, then pinned programs, then by program arrival (program FCFS).
- ``tokencake`` (§4): keep the agent's KV while its tool runs; at tool start, if GPU KV usage is above
  ``pressure``, calls are waiting, and the predicted tool time exceeds the transfer time, copy the KV to
  the CPU tier and release it on the GPU; load it back at the predicted return minus the transfer time
  (predictive upload), or at once if the tool returns early.

Both only *decide* (:class:`~agentsim.policies.base.Retention`: ``retain``, ``unpin_reason``,
``unpin_key``; :class:`~agentsim.policies.base.Offloader`: ``should_offload``); pinning, the CPU tier
and the PCIe transfers are the backend's mechanism (``agentsim.sim.tiers`` in the simulator).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any, Callable, Sequence

import numpy as np

from agentsim.policies.base import CallView, TierSettings
from agentsim.policies.registry import check_choice, check_range, register, register_bundle

INF = math.inf


class _Durations:
    """A sliding window of observed durations kept sorted (for an empirical CDF)."""

    __slots__ = ("window", "_fifo", "_sorted", "_array")

    def __init__(self, window: int) -> None:
        self.window = window
        self._fifo: deque[float] = deque()
        self._sorted: list[float] = []
        # the same values as a float64 array, kept in step (a τ* search reads it at every pin
        # decision; converting a 1,000-value list each time cost more than the search)
        self._array = np.empty(0)

    def add(self, d: float) -> None:
        self._fifo.append(d)
        i = bisect.bisect_right(self._sorted, d)
        self._sorted.insert(i, d)
        arr = self._array
        arr = np.concatenate((arr[:i], (d,), arr[i:]))
        if len(self._fifo) > self.window:
            old = self._fifo.popleft()
            j = bisect.bisect_left(self._sorted, old)
            del self._sorted[j]
            arr = np.concatenate((arr[:j], arr[j + 1:]))
        self._array = arr

    def __len__(self) -> int:
        return len(self._sorted)

    @property
    def values(self) -> list[float]:
        return self._sorted

    @property
    def array(self) -> np.ndarray:
        """:attr:`values` as a float64 array (read-only use: it is the window's own)."""
        return self._array

    @property
    def mean(self) -> float:
        return sum(self._sorted) / len(self._sorted) if self._sorted else math.nan


def best_ttl(durations: Sequence[float] | np.ndarray, benefit: float) -> float:
    """τ* = argmax over τ in {0} ∪ durations of P(τ)·benefit − τ (P: empirical CDF of ``durations``)."""
    n = len(durations)
    if n == 0 or benefit <= 0:
        return 0.0
    d = np.asarray(durations, dtype=float)
    vals = np.arange(1, n + 1) / n * benefit - d
    i = int(np.argmax(vals))
    return float(d[i]) if vals[i] > 0 else 0.0


def pin_end_reason(expires_at: float, next_call_status: str | None, now: float) -> str | None:
    """Continuum's unpin rule (also Tokencake's): a pin ends when the program's next call is admitted
    (``"admitted"``: it is running or already finished), or at expiry if that call is not waiting
    (``"expired"``: none has arrived, or it finished); otherwise it is kept (None). Continuum §4.2:
    "unpin at expiry if the program has no request waiting; when its next request is admitted"."""
    if next_call_status in ("running", "finished"):
        return "admitted"
    if expires_at <= now and (next_call_status is None or next_call_status == "finished"):
        return "expired"
    return None


@register("evict", "continuum")
class ContinuumTTL:
    """Continuum: pin a program's KV across a tool call for the utility-optimal TTL τ*.

    ``ttl``: ``optimal`` (τ* from the tool-duration CDF) or ``fixed`` (the public code: pin for
    ``t_default`` if the tool's mean duration is at most ``t_default``); ``k``: samples needed before a
    per-tool (then the global) CDF is trusted (100); ``t_default`` (2 s); ``window``: durations kept per
    tool; ``delay_window``: requests in T's sliding mean; ``eta``: fixed memoryfulness (None: learned from
    finished programs); ``prefill_time_per_token`` / ``prefill_time_per_token2``: PrefillReload(L) =
    a·L + b·L² seconds when the backend gives no profile (defaults: A100, Llama-3-8B).
    Free-block order: LRU. ``cpu_tier``: also keep a CPU copy of evicted blocks (Continuum + LMCache).
    """

    def __init__(self, ttl: str = "optimal", k: int = 100, t_default: float = 2.0, window: int = 1000,
                 delay_window: int = 100, eta: float | None = None, prefill_time_per_token: float = 6.2e-5,
                 prefill_time_per_token2: float = 2.4e-9, cpu_tier: bool = False, cpu_gib: float = 100.0,
                 pcie_GBps: float | None = None) -> None:
        check_choice("ttl", ttl, ("optimal", "fixed"))
        if k < 0 or t_default < 0 or window < 1 or delay_window < 1:
            raise ValueError("k, t_default must be >= 0 and window, delay_window >= 1")
        self.ttl = ttl
        self.k = k
        self.t_default = t_default
        self.window = window
        self.eta_fixed = eta
        self.a = prefill_time_per_token
        self.b = prefill_time_per_token2
        self.tiers = TierSettings(cpu_tier=cpu_tier, cpu_gib=cpu_gib, pcie_GBps=pcie_GBps)
        self.prefill_time: Callable[[int], float] | None = None   # the backend's, see use_prefill_time
        self.by_tool: dict[str, _Durations] = {}
        self.all = _Durations(window)
        self.delays: deque[float] = deque(maxlen=delay_window)
        self.pending: dict[int, tuple[str, float]] = {}   # program -> (tool, when its call ended)
        self.pinned: dict[int, float] = {}                # program -> pin expiry
        self.arrival: dict[int, float] = {}               # program -> program arrival
        self._unkept: set[int] = set()                    # calls that arrived without their KV kept
        self._num_calls: dict[int, int] = {}
        # running sums for eta = -Corr(k, N-k) over finished programs
        self._s = np.zeros(6)
        self.decisions: list[tuple[float, int, str, float]] = []  # (now, program, tool, ttl)

    def new_free_queue(self, engine_id: int):
        from agentsim.policies.baseline import LRUFreeQueue

        return LRUFreeQueue()

    def tier_settings(self) -> TierSettings:
        """A CPU tier only with ``cpu_tier`` (Continuum + LMCache)."""
        return self.tiers

    def use_prefill_time(self, prefill_time: Callable[[int], float]) -> None:
        """PrefillReload(L) from the backend's step-time profile (replaces the a·L + b·L² default)."""
        self.prefill_time = prefill_time

    # ------------------------------------------------------------------ estimates
    @property
    def mean_delay(self) -> float:
        return sum(self.delays) / len(self.delays) if self.delays else 0.0

    @property
    def eta(self) -> float:
        if self.eta_fixed is not None:
            return self.eta_fixed
        n, sx, sy, sxx, syy, sxy = self._s
        if n < 2:
            return 1.0
        vx = sxx / n - (sx / n) ** 2
        vy = syy / n - (sy / n) ** 2
        if vx <= 0 or vy <= 0:
            return 1.0
        corr = (sxy / n - sx * sy / n / n) / math.sqrt(vx * vy)
        return min(1.0, max(0.0, -corr))

    def reload_time(self, num_tokens: int) -> float:
        if self.prefill_time is not None:
            return self.prefill_time(num_tokens)
        return self.a * num_tokens + self.b * num_tokens * num_tokens

    def calc_ttl(self, tool: str, num_tokens: int) -> float:
        if self.ttl == "fixed":
            d = self.by_tool.get(tool)
            mean = d.mean if d is not None and len(d) else 0.0
            return self.t_default if mean <= self.t_default else 0.0
        if len(self.all) <= self.k:
            return self.t_default
        d = self.by_tool.get(tool)
        sample = d.array if d is not None and len(d) > self.k else self.all.array
        benefit = self.mean_delay * self.eta + self.reload_time(num_tokens)
        return best_ttl(sample, benefit)

    # ------------------------------------------------------------------ decisions
    def retain(self, call: CallView, now: float) -> float | None:
        """Seconds to keep ``call``'s KV after it ends (None: free it now). Records the pin."""
        tool = call.hints.tool_after
        if tool is None:
            return None  # the program's last request
        tau = self.calc_ttl(tool, call.num_prompt_tokens + call.num_output_tokens)
        self.decisions.append((now, call.program_id, tool, tau))
        if tau <= 0:
            return None
        self.pinned[call.program_id] = max(self.pinned.get(call.program_id, 0.0), now + tau)
        return tau

    def is_pinned(self, program_id: int) -> bool:
        return program_id in self.pinned

    def on_unpin(self, program_id: int, now: float) -> None:
        """The backend released the program's pin (expiry, admission, pressure or program end)."""
        self.pinned.pop(program_id, None)

    def unpin_key(self, program_id: int) -> float:
        """Release order under memory pressure (smaller first): latest program arrival first."""
        return -self.arrival.get(program_id, 0.0)

    def unpin_reason(self, expires_at: float, next_call_status: str | None, now: float) -> str | None:
        """Continuum's unpin rule (:func:`pin_end_reason`)."""
        return pin_end_reason(expires_at, next_call_status, now)

    # ------------------------------------------------------------------ hooks
    def on_call_arrive(self, call: CallView, now: float) -> None:
        pid = call.program_id
        self.arrival.setdefault(pid, call.program_arrival_at)
        self._num_calls[pid] = self._num_calls.get(pid, 0) + 1
        pend = self.pending.pop(pid, None)
        if pend is not None:
            tool, t_end = pend
            dur = max(0.0, now - t_end)
            d = self.by_tool.get(tool)
            if d is None:
                d = self.by_tool[tool] = _Durations(self.window)
            d.add(dur)
            self.all.add(dur)
            if pid not in self.pinned:
                self._unkept.add(call.call_id)

    def on_call_finish(self, call: CallView, now: float) -> None:
        if call.hints.tool_after is not None:
            self.pending[call.program_id] = (call.hints.tool_after, now)
        if call.call_id in self._unkept:
            self._unkept.discard(call.call_id)
            self.delays.append(call.wait_time)

    def on_program_end(self, program_id: int, now: float) -> None:
        self.pinned.pop(program_id, None)
        self.pending.pop(program_id, None)
        self.arrival.pop(program_id, None)
        n = self._num_calls.pop(program_id, 0)
        if n >= 2:
            k = np.arange(1, n, dtype=float)
            y = n - k
            self._s += (len(k), k.sum(), y.sum(), (k * k).sum(), (y * y).sum(), (k * y).sum())


@register("order", "continuum")
class ContinuumOrder:
    """Continuum's scheduling: preempted requests first, then pinned programs, then program FCFS.

    Reads pins from the bundle's ``continuum`` retention component (bound when the bundle is built).
    """

    dynamic = True
    preemptive = False

    def __init__(self) -> None:
        self.retention: Any = None

    def bind(self, bundle: Any) -> None:
        self.retention = bundle.evict if bundle.caps.retention else None

    def key(self, call: CallView, now: float) -> tuple:
        pinned = self.retention is not None and self.retention.is_pinned(call.program_id)
        return (0 if call.num_preemptions else 1, 0 if pinned else 1, call.program_arrival_at, call.arrival_at)


@register("evict", "tokencake")
class TokencakeOffload:
    """Tokencake: keep KV during tool calls, offload it under pressure, upload it before the tool returns.

    Offload at tool start iff KV usage >= ``pressure``, calls are waiting, and the predicted tool time
    exceeds the transfer time. Tool time prediction: the mean of the program's estimate and the tool's
    EWMA (``alpha``) when both exist, either alone, else ``default_tool_time`` (1 s). Upload starts at
    ``tool start + predicted - transfer``. Free-block order: LRU.
    """

    def __init__(self, pressure: float = 0.6, alpha: float = 0.5, default_tool_time: float = 1.0,
                 cpu_gib: float = 100.0, pcie_GBps: float | None = None) -> None:
        if not 0 <= pressure <= 1:
            raise ValueError("pressure must be in [0, 1]")
        check_range("alpha", alpha, 0.0, 1.0)
        check_range("default_tool_time", default_tool_time, lo=0)
        check_range("cpu_gib", cpu_gib, lo=0)
        if pcie_GBps is not None:
            check_range("pcie_GBps", pcie_GBps, lo=1e-9)
        self.pressure = pressure
        self.alpha = alpha
        self.default_tool_time = default_tool_time
        self.tiers = TierSettings(cpu_tier=True, cpu_gib=cpu_gib, pcie_GBps=pcie_GBps)
        self.ewma: dict[str, float] = {}
        self.tool_start: dict[tuple[int, int], tuple[str, float]] = {}
        self.arrival: dict[int, float] = {}
        self.pinned: set[int] = set()
        self.decisions: list[tuple[float, int, bool, float]] = []  # (now, program, offload, upload_at)

    def new_free_queue(self, engine_id: int):
        from agentsim.policies.baseline import LRUFreeQueue

        return LRUFreeQueue()

    def tier_settings(self) -> TierSettings:
        return self.tiers

    def predict(self, tool: str, estimate: float | None) -> float:
        hist = self.ewma.get(tool)
        if estimate is not None and hist is not None:
            return 0.5 * (estimate + hist)
        if estimate is not None:
            return estimate
        if hist is not None:
            return hist
        return self.default_tool_time

    def retain(self, call: CallView, now: float) -> float | None:
        if call.hints.tool_after is None:
            return None
        self.pinned.add(call.program_id)
        return INF  # until the program's next call is admitted (or pressure releases it)

    def should_offload(self, program_id: int, agent_id: int, tool: str, estimate: float | None, started_at: float,
                       transfer_time: float, kv_usage: float, num_waiting: int, now: float) -> float | None:
        """After the tool started (at ``started_at``): when to start uploading the KV back, or None to
        keep it on the GPU."""
        t_fc = self.predict(tool, estimate)
        ok = kv_usage >= self.pressure and num_waiting > 0 and started_at + t_fc - transfer_time > now
        upload_at = started_at + t_fc - transfer_time
        self.decisions.append((now, program_id, ok, upload_at))
        return upload_at if ok else None

    def is_pinned(self, program_id: int) -> bool:
        return program_id in self.pinned

    def on_unpin(self, program_id: int, now: float) -> None:
        self.pinned.discard(program_id)

    def unpin_key(self, program_id: int) -> float:
        return -self.arrival.get(program_id, 0.0)

    def unpin_reason(self, expires_at: float, next_call_status: str | None, now: float) -> str | None:
        """Continuum's rule (:func:`pin_end_reason`); Tokencake's pins never expire (``retain`` gives inf)."""
        return pin_end_reason(expires_at, next_call_status, now)

    def on_call_arrive(self, call: CallView, now: float) -> None:
        self.arrival.setdefault(call.program_id, call.program_arrival_at)

    def on_tool_start(self, program_id: int, agent_id: int, tool: str, estimate: float | None, now: float) -> None:
        self.tool_start[(program_id, agent_id)] = (tool, now)

    def on_tool_end(self, program_id: int, agent_id: int, tool: str, now: float) -> None:
        st = self.tool_start.pop((program_id, agent_id), None)
        if st is not None:
            d = now - st[1]
            old = self.ewma.get(tool)
            self.ewma[tool] = d if old is None else self.alpha * d + (1 - self.alpha) * old

    def on_program_end(self, program_id: int, now: float) -> None:
        self.pinned.discard(program_id)
        self.arrival.pop(program_id, None)


register_bundle("continuum", "Continuum: TTL pinning across tool calls (τ* from tool-time CDFs) + program-FCFS order",
                route="prefix-affinity", order="continuum", evict="continuum", shape="fixed")
register_bundle("continuum-static", "Continuum ablation: fixed 2 s TTL (public code) + program-FCFS order",
                route="prefix-affinity", order="continuum", evict="continuum", shape="fixed",
                params={"evict": {"ttl": "fixed"}})
register_bundle("tokencake", "Tokencake: keep KV during tool calls, offload under pressure, predictive upload",
                route="prefix-affinity", order="fcfs", evict="tokencake", shape="fixed")

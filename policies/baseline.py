"""vLLM's own behaviour as policies, plus least-loaded routing.

- ``round-robin`` routing (vLLM data-parallel / Ray Serve default spreading),
- ``least-loaded`` routing (fewest calls in the engine, Autellix's "Least-Used"),
- ``fcfs`` ordering (vLLM ``--scheduling-policy fcfs``),
- ``lru`` free-block reuse (vLLM's free-block queue: freed blocks go to the tail, a request's
  blocks in reverse order so its tail is evicted first; allocation takes the head),
- ``fixed`` topology (run the team the way it was written).
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

from agentsim.policies.base import BlockView, CallView, EngineView, engine_loads
from agentsim.policies.registry import check_choice, register, register_bundle


@register("route", "round-robin")
class RoundRobin:
    """Engines in turn, ignoring load and cache contents."""

    def __init__(self) -> None:
        self._next = 0

    def route(self, call: CallView, engines: Sequence[EngineView], now: float) -> int:
        i = self._next % len(engines)
        self._next = i + 1
        return i


@register("route", "least-loaded")
class LeastLoaded:
    """Engine with the fewest calls (running + waiting); ties go to the lowest index.

    ``metric``: ``calls`` (Autellix's Least-Used) or ``tokens`` (outstanding prompt+output tokens).
    """

    METRICS = ("calls", "tokens")

    def __init__(self, metric: str = "calls") -> None:
        check_choice("metric", metric, self.METRICS)
        self.metric = metric

    def route(self, call: CallView, engines: Sequence[EngineView], now: float) -> int:
        if self.metric == "calls":
            loads = engine_loads(engines)
        else:
            loads = [e.num_outstanding_tokens for e in engines]
        return loads.index(min(loads))


@register("order", "fcfs")
class FCFS:
    """First come, first served by arrival at the engine (vLLM's default)."""

    dynamic = False
    preemptive = False

    def key(self, call: CallView, now: float) -> float:
        return call.arrival_at


class LRUFreeQueue:
    """vLLM's free-block queue: evict the least recently freed block first (with the bulk forms of
    :class:`agentsim.policies.base.BulkFreeBlockQueue`, as vLLM's ``append_n``/``popleft_n``).

    A deque with lazy removal: :meth:`remove` (a prefix hit taking a free block back) only marks the
    block, and its old entry is skipped when it reaches the head. ``block.qkey`` counts the block's
    entries in the deque, negated while the block is not in the queue; its live entry is its last.
    """

    __slots__ = ("_q", "_n")

    def __init__(self) -> None:
        self._q: deque[BlockView] = deque()
        self._n = 0   # blocks in the queue (live entries)

    def __len__(self) -> int:
        return self._n

    def append(self, block: BlockView, now: float) -> None:
        k = block.qkey or 0
        block.qkey = (-k if k < 0 else k) + 1
        self._q.append(block)
        self._n += 1

    def append_blocks(self, blocks: list[BlockView], now: float) -> None:
        for b in blocks:
            k = b.qkey or 0
            b.qkey = (-k if k < 0 else k) + 1
        self._q.extend(blocks)
        self._n += len(blocks)
        if len(self._q) > 2 * self._n + 4096:
            self._compact()

    def remove(self, block: BlockView) -> None:
        block.qkey = -block.qkey
        self._n -= 1

    def pop(self, now: float) -> BlockView:
        popleft = self._q.popleft
        while True:
            b = popleft()
            k = b.qkey
            if k == 1:
                b.qkey = 0
                self._n -= 1
                return b
            b.qkey = k - 1 if k > 0 else k + 1   # an old entry: one fewer

    def pop_blocks(self, n: int, now: float) -> list[BlockView]:
        popleft = self._q.popleft
        out = []
        while len(out) < n:
            b = popleft()
            k = b.qkey
            if k == 1:
                b.qkey = 0
                out.append(b)
            else:
                b.qkey = k - 1 if k > 0 else k + 1
        self._n -= n
        return out

    def _compact(self) -> None:
        """Drop the old entries (many prefix hits and few evictions leave many behind)."""
        live = []
        for b in reversed(self._q):   # a block's live entry is its last
            k = b.qkey
            if k is None:
                continue                 # a member already kept (this is one of its old entries)
            if k > 0:
                live.append(b)
                b.qkey = None
            else:
                b.qkey = 0               # not in the queue: no entries left
        for b in live:
            b.qkey = 1
        live.reverse()
        self._q = deque(live)

@register("evict", "lru")
class LRU:
    """Reuse the least recently freed KV block first (vLLM's prefix-cache eviction)."""

    def new_free_queue(self, engine_id: int) -> LRUFreeQueue:
        return LRUFreeQueue()


@register("shape", "fixed")
class FixedTopology:
    """Run every multi-agent task with the topology it was written with (or ``topology``)."""

    def __init__(self, topology: str | None = None) -> None:
        if topology is not None:
            from agentsim.traces.shapes import TEAM_TOPOLOGIES  # the topologies a team can run

            check_choice("topology", topology, TEAM_TOPOLOGIES)
        self.topology = topology

    def shape(self, task, now: float) -> str:
        return self.topology or task.default_topology


register_bundle("vllm", "vLLM today: round-robin, FCFS, LRU, fixed topology",
                route="round-robin", order="fcfs", evict="lru", shape="fixed")
register_bundle("least-loaded", "vLLM with least-loaded routing",
                route="least-loaded", order="fcfs", evict="lru", shape="fixed")

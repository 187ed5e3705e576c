"""vLLM's own behaviour as policies, plus least-loaded routing.

- ``round-robin`` routing (vLLM data-parallel / Ray Serve default spreading),
- ``least-loaded`` routing (fewest calls in the engine, Autellix's "Least-Used"),
- ``fcfs`` ordering (vLLM ``--scheduling-policy fcfs``),
- ``lru`` free-block reuse (vLLM's free-block queue: freed blocks go to the tail, a request's
  blocks in reverse order so its tail is evicted first; allocation takes the head),
- ``fixed`` topology (run the team the way it was written).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from agentsim.policies.base import BlockView, CallView, EngineView
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
            loads = [e.num_running + e.num_waiting for e in engines]
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
    """vLLM's free-block queue: evict the least recently freed block first."""

    __slots__ = ("_q",)

    def __init__(self) -> None:
        self._q: OrderedDict[int, BlockView] = OrderedDict()

    def __len__(self) -> int:
        return len(self._q)

    def append(self, block: BlockView, now: float) -> None:
        self._q[block.block_id] = block

    def remove(self, block: BlockView) -> None:
        del self._q[block.block_id]

    def pop(self, now: float) -> BlockView:
        return self._q.popitem(last=False)[1]


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

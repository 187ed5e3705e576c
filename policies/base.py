"""The four decisions (route, order, evict/retain, shape) and the read-only views they see.

A named policy is a :class:`PolicyBundle` of one object per decision. Each decision is a small
protocol taking a read-only view and ``now`` (seconds, injected by the backend: ``env.now`` in
sim, a monotonic clock in live); nothing here reads the clock, imports simpy, ray or vllm, or
mutates what it is shown. Event hooks (``on_*``) let a policy keep state, e.g. Autellix's
per-program attained service; the bundle forwards each hook to every component that defines it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from agentsim.workload import CallHints


# --------------------------------------------------------------------------- views
@runtime_checkable
class CallView(Protocol):
    """What a policy may read about one LLM call (sim and live call records both provide it)."""

    call_id: int
    program_id: int
    agent_id: int
    thread_id: int
    program_kind: str
    arrival_at: float             # when the call reached the engine's queue
    program_arrival_at: float     # when its program started
    num_prompt_tokens: int
    num_output_tokens: int        # requested (forced) output length
    num_generated: int            # output tokens produced so far
    service_time: float           # engine step time spent on this call so far (s)
    wait_time: float              # time spent queued so far (s); updated at scheduling points
    num_preemptions: int
    hints: CallHints
    parent_call_ids: tuple[int, ...]

    def prompt_block_hashes(self, block_size: int) -> list[int]: ...


@runtime_checkable
class EngineView(Protocol):
    """What a policy may read about one engine."""

    engine_id: int
    node_id: int
    block_size: int
    num_total_blocks: int

    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def kv_usage(self) -> float: ...
    @property
    def num_outstanding_tokens(self) -> int: ...
    def num_cached_prefix_blocks(self, block_hashes: Sequence[int]) -> int: ...


@dataclass(slots=True)
class BlockView:
    """A KV block as the evict/retain policy sees it (also the sim's block record)."""

    block_id: int
    block_hash: int | None = None
    ref_count: int = 0
    last_used_at: float = 0.0
    program_id: int = -1      # last program that used it
    agent_id: int = -1        # last agent that used it
    position: int = 0         # block index within that agent's context
    # free-queue bookkeeping owned by the queue implementation
    qkey: Any = None


# --------------------------------------------------------------------------- decisions
class RoutePolicy(Protocol):
    def route(self, call: CallView, engines: Sequence[EngineView], now: float) -> int:
        """Index into ``engines`` of the engine that gets ``call``."""


class OrderPolicy(Protocol):
    """Orders an engine's queue: lower key runs first; ties by arrival sequence.

    ``dynamic``: keys may change over time without an event (re-ranked every step; fast-forward
    is then only used while the waiting queue is empty). ``preemptive``: a waiting call with a
    better key may preempt the worst running call (strict-priority batch formation); otherwise,
    as in vLLM, running calls are preempted only when the KV cache cannot grow.
    """

    dynamic: bool
    preemptive: bool

    def key(self, call: CallView, now: float) -> Any: ...


class FreeBlockQueue(Protocol):
    """The order in which free (unreferenced) KV blocks are reused; the victim is evicted."""

    def __len__(self) -> int: ...
    def append(self, block: BlockView, now: float) -> None: ...
    def remove(self, block: BlockView) -> None: ...
    def pop(self, now: float) -> BlockView: ...


class EvictPolicy(Protocol):
    def new_free_queue(self, engine_id: int) -> FreeBlockQueue: ...


class ShapePolicy(Protocol):
    def shape(self, task: Any, now: float) -> str:
        """Topology name for a multi-agent task (see agentsim.traces.shapes.TEAM_TOPOLOGIES)."""


class KVFetchPolicy(Protocol):
    """Cross-engine prefix fetch (``cluster.disagg.prefix_fetch``; :mod:`agentsim.policies.kvfetch`).

    ``options``: one :class:`agentsim.policies.kvfetch.FetchOption` per engine whose prefix cache holds
    more of ``call``'s prompt blocks than the target engine's (blocks, bytes, transfer seconds as queued
    now, recompute seconds); returns the index of the option to fetch from, or None to recompute.
    """

    def choose(self, call: CallView, target_engine_id: int, options: Sequence[Any], now: float) -> int | None: ...


HOOKS = (
    "on_program_start",   # (program_id, agent_id, kind, now)
    "on_program_end",     # (program_id, now)
    "on_call_arrive",     # (call, now)
    "on_call_finish",     # (call, now)
    "on_tool_start",      # (program_id, agent_id, tool_name, estimate, now)
    "on_tool_end",        # (program_id, agent_id, tool_name, now)
    "on_distance_update", # ({agent_id: distance}, now)
)


@dataclass
class PolicyBundle:
    """One object per decision, plus the event hooks they define."""

    name: str
    route: Any
    order: Any
    evict: Any
    shape: Any
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._hooks: dict[str, list] = {}
        for hook in HOOKS:
            fns = []
            seen: set[int] = set()
            for comp in (self.route, self.order, self.evict, self.shape):
                fn = getattr(comp, hook, None)
                if fn is not None and id(comp) not in seen:
                    seen.add(id(comp))
                    fns.append(fn)
            self._hooks[hook] = fns
        # components that implement one policy together (Continuum's order reads its retention's
        # pins) find each other here
        bound: set[int] = set()
        for comp in (self.route, self.order, self.evict, self.shape):
            bind = getattr(comp, "bind", None)
            if bind is not None and id(comp) not in bound:
                bound.add(id(comp))
                bind(self)

    def hooks(self, name: str) -> list:
        return self._hooks[name]

    def emit(self, name: str, *args: Any) -> None:
        for fn in self._hooks[name]:
            fn(*args)


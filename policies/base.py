"""The policy contract: every hook a backend calls on a policy, declared in this one file.

A named policy is a :class:`PolicyBundle` of one object per decision -- **route**, **order**,
**evict/retain**, **shape** -- each a small protocol taking a read-only view and ``now`` (seconds,
injected by the backend: ``env.now`` in sim, a monotonic run clock in live). Nothing here reads the
clock, imports simpy, ray or vllm, or mutates what it is shown. A new policy author reads this file
to know every hook (anchor: SimPy's ``BaseResource`` docstring lists its extension points; vLLM's
``KVCacheBlocks``/``SchedulerOutput`` name the boundary values).

Required, one per decision (a bundle missing one is refused when it is built, with one error naming
the component and the hook):

- :class:`RoutePolicy` ``route(call, engines, now) -> int``
- :class:`OrderPolicy` ``key(call, now)``, ``dynamic: bool``, ``preemptive: bool``
  (what the backends do with the key -- queue order, KV-pressure victim, preempt-for-better -- is one
  rule, :mod:`agentsim.policies.ranking`)
- :class:`EvictPolicy` ``new_free_queue(engine_id) -> FreeBlockQueue``
  (a queue that also has ``append_blocks``/``pop_blocks``, :class:`BulkFreeBlockQueue`, is driven many
  blocks per call -- the result must equal repeated ``append``/``pop``; without both, one at a time)
- :class:`ShapePolicy` ``shape(task, now) -> str``

Optional capabilities. A component *claims* one by defining its first-named member; it must then
define all of them (checked once, in :func:`check_bundle`; backends read the resulting
:class:`Capabilities` and never probe a policy again):

- :class:`ReadsKVState` (route) ``reads_kv_state: bool`` -- it reads engines' cached prefixes / KV
  usage, so the simulator runs its engines step by step (no fast-forward window hides evictions).
- :class:`TieredEvict` (evict) ``tier_settings() -> TierSettings`` -- the CPU KV tier it wants.
- :class:`LeveledEvict` (evict) ``level(agent_id, now)``, ``is_suffix(block, block_size)``,
  ``depends_on_clock: bool`` -- its free queues are :class:`LeveledQueue` s ranking blocks by their
  agent's level; ``depends_on_clock``: the order changes with time alone (no fast-forward).
- :class:`Retention` (evict) ``retain(call, now)``, ``is_pinned``, ``on_unpin``, ``unpin_key``,
  ``unpin_reason`` -- keep a finished call's KV (Continuum, Tokencake): the policy decides how long
  and when a pin ends; the backend pins, unpins and frees.
- :class:`Offloader` (evict) ``should_offload(...)`` -- move pinned KV to the host while a tool runs
  and say when to load it back (Tokencake).
- :class:`Prefetcher` (evict) ``prefetch_candidates(now)``, ``prefetch_due_at(agent_id, now)``,
  ``plan_prefetch(...)``, ``prefetch_on_events: bool`` -- load agents' KV back from the host ahead of
  their calls (ScaleSim, KVFlow); the policy picks the agents and what fits, the backend loads.
- :class:`NeedsReloadCost` (any) ``use_prefill_time(fn)`` -- the backend hands it
  ``fn(num_tokens) -> seconds`` to recompute a context (Continuum's PrefillReload).
- :class:`ProgramPlanner` (any) ``on_program_plan(program_id, plan, now)`` -- a clairvoyant policy is
  given each program's whole call plan when it starts (``agentsim.policies.oracle``).
- :class:`TeamWrapper` (shape) ``wrap_team_body(pc, task, topology, body)`` -- prefix a team's program
  with the router's own LLM calls (AdaptOrch's decomposer).
- :class:`Binds` (any) ``bind(bundle)`` -- components of one policy find each other (Continuum's
  order reads its retention's pins).
- event hooks ``on_*`` (:data:`HOOKS`, any component): the bundle forwards each to every component
  that defines it, e.g. Autellix's per-program attained service.

Where each rule lives: the ranking/victim/preempt rule in :mod:`agentsim.policies.ranking`; the
decisions in the policy modules (``baseline``, ``priority``, ``retention``, ``distance``,
``routing``, ``topology``); their execution in ``agentsim.sim.engine`` / ``agentsim.sim.tiers``
(simulator) and ``agentsim.live.scheduler`` / ``agentsim.live.driver`` (vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import takewhile
from typing import Any, Callable, Collection, Container, Protocol, Sequence, runtime_checkable

from agentsim.errors import ConfigError
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
    seq: int                      # arrival sequence number: the ranking tie-breaker (the call id)

    def prompt_block_hashes(self, block_size: int) -> list[int]: ...


@runtime_checkable
class EngineView(Protocol):
    """What a policy may read about one engine.

    A route policy reads every engine at every call; over 80 engines, two property reads each cost
    more than the rest of the call's simulation. :func:`engine_loads`, :func:`engine_waiting`,
    :func:`engine_kv_usage`, :func:`engine_cached_prefix` and :func:`engine_longest_prefix` read one
    field of all engines at once: through the backend's sequence when it offers the vectorised form
    (:class:`EngineReads`; the simulator's engine list does), else engine by engine with the
    view's own ``num_cached_prefix_blocks``. Same values either way.
    """

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


class EngineReads(Protocol):
    """Optional: a backend's sequence of :class:`EngineView` s that reads one field of all of them at
    once (values in sequence order, equal to the per-engine reads)."""

    def loads(self) -> list[int]:
        """``num_running + num_waiting`` of each engine (calls in it)."""

    def waiting(self) -> list[int]:
        """``num_waiting`` of each engine."""

    def kv_usages(self) -> list[float]:
        """``kv_usage`` of each engine."""

    def prefix_caches(self) -> list[Container[int]]:
        """Each engine's prefix cache as a read-only container of block hashes (membership tests:
        ``h in caches[i]``), as of now."""

    def cached_prefix(self, block_hashes: Sequence[int]) -> list[int]:
        """Optional: ``num_cached_prefix_blocks(block_hashes)`` of each engine (else read through
        :meth:`prefix_caches`)."""


def engine_loads(engines: Sequence[EngineView]) -> list[int]:
    """Calls in each engine, ``num_running + num_waiting``, in ``engines`` order (:class:`EngineReads`)."""
    reads = getattr(engines, "loads", None)
    return reads() if reads is not None else [e.num_running + e.num_waiting for e in engines]


def engine_waiting(engines: Sequence[EngineView]) -> list[int]:
    """``num_waiting`` of each engine, in ``engines`` order (:class:`EngineReads`)."""
    reads = getattr(engines, "waiting", None)
    return reads() if reads is not None else [e.num_waiting for e in engines]


def engine_kv_usage(engines: Sequence[EngineView]) -> list[float]:
    """``kv_usage`` of each engine, in ``engines`` order (:class:`EngineReads`)."""
    reads = getattr(engines, "kv_usages", None)
    return reads() if reads is not None else [e.kv_usage for e in engines]


def engine_cached_prefix(engines: Sequence[EngineView], block_hashes: Sequence[int]) -> list[int]:
    """``num_cached_prefix_blocks(block_hashes)`` of each engine, in ``engines`` order (:class:`EngineReads`)."""
    counts = getattr(engines, "cached_prefix", None)
    if counts is not None:
        return counts(block_hashes)
    reads = getattr(engines, "prefix_caches", None)
    if reads is not None:
        # each cache scanned in C up to its first miss
        return [len(list(takewhile(c.__contains__, block_hashes))) for c in reads()]
    return [e.num_cached_prefix_blocks(block_hashes) for e in engines]


def engine_longest_prefix(engines: Sequence[EngineView], block_hashes: Sequence[int]) -> tuple[int, int]:
    """``(i, n)``: the engine with the most of ``block_hashes`` cached as a prefix (the lowest index
    on ties) and that many blocks: the argmax of :func:`engine_cached_prefix`, found without
    scanning every engine (one that lacks block ``n`` of the best so far cannot beat it: one lookup)."""
    total = len(block_hashes)
    best_i, best_n = 0, -1
    reads = getattr(engines, "prefix_caches", None)
    if reads is not None:
        for i, c in enumerate(reads()):
            if best_n >= 0:
                if best_n >= total:
                    break
                if block_hashes[best_n] not in c:
                    continue
            n = len(list(takewhile(c.__contains__, block_hashes)))
            if n > best_n:
                best_i, best_n = i, n
        return best_i, max(best_n, 0)
    for i, e in enumerate(engines):
        if best_n >= 0:
            if best_n >= total:
                break
            if not e.num_cached_prefix_blocks(block_hashes[best_n:best_n + 1]):
                continue
        n = e.num_cached_prefix_blocks(block_hashes)
        if n > best_n:
            best_i, best_n = i, n
    return best_i, max(best_n, 0)


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


# --------------------------------------------------------------------------- boundary values
@dataclass(frozen=True, slots=True)
class TierSettings:
    """The CPU KV tier an evict policy asks the backend for (a value it returns, not inherited state).

    ``cpu_tier``: write evicted cached blocks back to host memory (HiCache) and load a call's blocks
    from there instead of recomputing them; ``cpu_gib``: host memory for KV per engine (GiB);
    ``pcie_GBps``: host<->GPU bandwidth per direction (GB/s; ``None``: the profile's PCIe link);
    ``prefetch``: load the blocks of the agents the policy names ahead of their calls (needs a
    :class:`Prefetcher`); ``write_back``: evicted blocks are copied to the host (off: the tier only
    holds what the policy offloads).
    """

    cpu_tier: bool = False
    cpu_gib: float = 100.0
    pcie_GBps: float | None = None
    prefetch: bool = False
    write_back: bool = True


NO_TIER = TierSettings()


# --------------------------------------------------------------------------- decisions (required)
class RoutePolicy(Protocol):
    def route(self, call: CallView, engines: Sequence[EngineView], now: float) -> int:
        """Index into ``engines`` of the engine that gets ``call``."""


class OrderPolicy(Protocol):
    """Orders an engine's queue: lower key runs first; ties by arrival sequence
    (:func:`agentsim.policies.ranking.rank_key`, the one rule every backend uses).

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


@runtime_checkable
class BulkFreeBlockQueue(FreeBlockQueue, Protocol):
    """A free queue that also takes and hands out many blocks in one call (optional; the block pool
    uses these when the queue has them, else repeated :meth:`append`/:meth:`pop`). Results must be
    exactly those of the repeated calls: ``append_blocks(bs, now)`` is ``append(b, now)`` for each
    ``b`` of ``bs`` in order, ``pop_blocks(n, now)`` is ``[pop(now) for _ in range(n)]`` (the pool
    changes the popped blocks only after the last pop). vLLM: ``FreeKVCacheBlockQueue.append_n`` /
    ``popleft_n`` (``vllm/v1/core/kv_cache_utils.py``)."""

    def append_blocks(self, blocks: list[BlockView], now: float) -> None: ...
    def pop_blocks(self, n: int, now: float) -> list[BlockView]: ...


class EvictPolicy(Protocol):
    def new_free_queue(self, engine_id: int) -> FreeBlockQueue: ...


class ShapePolicy(Protocol):
    def shape(self, task: Any, now: float) -> str:
        """Topology name for a multi-agent task (see agentsim.traces.shapes.TEAM_TOPOLOGIES)."""


# --------------------------------------------------------------------------- capabilities (optional)
class ReadsKVState(Protocol):
    """A route policy that reads engines' cached prefixes or KV usage (``reads_kv_state`` True): the
    simulator then runs its engines step by step, so what it reads is never stale inside a
    fast-forward window (whose evictions are applied at the window's end)."""

    reads_kv_state: bool


class TieredEvict(Protocol):
    """An evict policy that wants a CPU KV tier (executed by ``agentsim.sim.tiers``)."""

    def tier_settings(self) -> TierSettings: ...


class LeveledQueue(FreeBlockQueue, Protocol):
    """A free queue ranking blocks by their agent's level (farthest evicted first)."""

    block_size: int   # set by the backend to the engine's block size

    def evictable_by_level(self, now: float) -> list[tuple[float, int]]:
        """[(level, number of evictable blocks)], farthest level first (what an allocation evicts)."""


class LeveledEvict(Protocol):
    """An evict policy whose free queues are :class:`LeveledQueue` s (ScaleSim, KVFlow:
    ``agentsim.policies.distance.LeveledFreeQueue``)."""

    depends_on_clock: bool   # levels change with time alone: the simulator runs step by step

    def level(self, agent_id: int, now: float) -> float: ...
    def is_suffix(self, block: BlockView, block_size: int) -> bool: ...


class Retention(Protocol):
    """Keep a finished call's KV referenced (pinned) across its program's tool call.

    The policy decides; the backend (``agentsim.sim.tiers``) pins the blocks, calls
    :meth:`unpin_reason` at every step boundary, frees the blocks and calls :meth:`on_unpin`.
    """

    def retain(self, call: CallView, now: float) -> float | None:
        """Seconds to keep ``call``'s KV after it ends (``inf``: until released; None: free it now)."""

    def is_pinned(self, program_id: int) -> bool: ...

    def on_unpin(self, program_id: int, now: float) -> None:
        """The backend released the program's last pin (expiry, admission, pressure, program end)."""

    def unpin_key(self, program_id: int) -> Any:
        """Release order under memory pressure (smaller first)."""

    def unpin_reason(self, expires_at: float, next_call_status: str | None, now: float) -> str | None:
        """Whether a pin ends now: ``"admitted"``, ``"expired"`` or None (keep it).

        ``expires_at``: the pin's expiry (s); ``next_call_status``: the status of the program's next
        call on this engine (``waiting``, ``loading``, ``running``, ``preempted``, ``finished``), None
        while it has not arrived.
        """


class Offloader(Protocol):
    """Move pinned KV to the host while a tool runs, and load it back before the tool returns."""

    def should_offload(self, program_id: int, agent_id: int, tool: str, estimate: float | None, started_at: float,
                       transfer_time: float, kv_usage: float, num_waiting: int, now: float) -> float | None:
        """When to start loading the KV back (s, run clock), or None to keep it on the GPU."""


class PrefetchPlan(Protocol):
    """One engine's prefetch budget at one step boundary (see :meth:`Prefetcher.plan_prefetch`)."""

    stopped: bool   # the policy wants no further candidate examined

    def admit(self, agent_id: int, num_blocks: int) -> float | None:
        """Load ``num_blocks`` of ``agent_id`` now? Returns the agent's level if yes (and books the
        room it takes), None if not (then ``stopped`` says whether to look at the next candidate)."""


class Prefetcher(Protocol):
    """Load agents' KV back from the CPU tier ahead of their calls (ScaleSim, KVFlow)."""

    prefetch_on_events: bool   # candidates change on call/tool events (else with time: prefetch_due_at)

    def prefetch_candidates(self, now: float) -> list[int]:
        """Agents to load, in the order to try them. Every engine with a CPU tier asks at each of its
        step boundaries after an event: keep it cheap (the in-tree policies answer from a memo per
        distance-table version). The backend does not modify the list."""

    def prefetch_due_at(self, agent_id: int, now: float) -> float | None:
        """When ``agent_id`` becomes a candidate (s), None if unknown or event-driven."""

    def prefetch_candidates_among(self, now: float, agents: Collection[int]) -> list[int]:
        """Optional: the candidates among ``agents`` (those whose last call's context is on the
        asking engine), in :meth:`prefetch_candidates` order: ``[a for a in prefetch_candidates(now)
        if a in agents]``. Offer it when that costs less than ordering every agent: an engine holding
        at most half of the agents then asks for its own only. Ignored in a subclass that overrides
        :meth:`prefetch_candidates` without overriding this too."""

    def plan_prefetch(self, free_queue: Any, num_fresh_blocks: int, now: float) -> PrefetchPlan:
        """A budget over the engine's never-used blocks and its free queue's evictable blocks. Asked
        for only when a candidate has blocks to load, once per engine and step boundary."""


class NeedsReloadCost(Protocol):
    """A policy that weighs the time to recompute a context (Continuum's PrefillReload)."""

    def use_prefill_time(self, prefill_time: Callable[[int], float]) -> None:
        """The backend's ``prefill_time(num_tokens) -> seconds`` (from its step-time profile)."""


class ProgramPlanner(Protocol):
    """A clairvoyant policy: given each program's whole call plan when the program starts."""

    def on_program_plan(self, program_id: int, plan: Any, now: float) -> None:
        """``plan``: :class:`agentsim.policies.oracle.ProgramPlan`."""


class TeamWrapper(Protocol):
    """A shape policy whose routing costs LLM calls of its own (AdaptOrch's decomposer)."""

    def wrap_team_body(self, pc: Any, task: Any, topology: str, body: Any) -> Any:
        """The team's program generator with the policy's own calls in front."""


class Binds(Protocol):
    """Components of one policy that read each other (called once, when the bundle is built)."""

    def bind(self, bundle: "PolicyBundle") -> None: ...


HOOKS = (
    "on_program_start",   # (program_id, agent_id, kind, now)
    "on_program_end",     # (program_id, now)
    "on_call_arrive",     # (call, now)
    "on_call_finish",     # (call, now)
    "on_tool_start",      # (program_id, agent_id, tool_name, estimate, now)
    "on_tool_end",        # (program_id, agent_id, tool_name, now)
    "on_distance_update", # ({agent_id: distance}, now)
)

# decision -> (protocol, required members)
REQUIRED = {
    "route": (RoutePolicy, ("route",)),
    "order": (OrderPolicy, ("key", "dynamic", "preemptive")),
    "evict": (EvictPolicy, ("new_free_queue",)),
    "shape": (ShapePolicy, ("shape",)),
}

# capability -> (protocol, decisions that may claim it, members: the first one claims it)
CAPABILITIES = {
    "reads_kv_state": (ReadsKVState, ("route",), ("reads_kv_state",)),
    "tiered": (TieredEvict, ("evict",), ("tier_settings",)),
    "leveled": (LeveledEvict, ("evict",), ("level", "is_suffix", "depends_on_clock")),
    "retention": (Retention, ("evict",), ("retain", "is_pinned", "on_unpin", "unpin_key", "unpin_reason")),
    "offload": (Offloader, ("evict",), ("should_offload",)),
    "prefetch": (Prefetcher, ("evict",), ("prefetch_candidates", "prefetch_due_at", "plan_prefetch",
                                          "prefetch_on_events")),
    "prefetch_among": (Prefetcher, ("evict",), ("prefetch_candidates_among",)),
    "reload_cost": (NeedsReloadCost, ("route", "order", "evict", "shape"), ("use_prefill_time",)),
    "program_plan": (ProgramPlanner, ("route", "order", "evict", "shape"), ("on_program_plan",)),
    "team_wrapper": (TeamWrapper, ("shape",), ("wrap_team_body",)),
    "bind": (Binds, ("route", "order", "evict", "shape"), ("bind",)),
}


class PolicyContractError(ConfigError):
    """A bundle component lacks a hook its decision or a capability it claims requires."""


@dataclass(frozen=True)
class Capabilities:
    """What a bundle's components declared, checked once by :func:`check_bundle`; backends read this.

    ``tiers``: the evict policy's :class:`TierSettings` (``NO_TIER`` if it wants none); ``retention``,
    ``offload``, ``prefetch`` (a :class:`Prefetcher` whose tier has ``prefetch`` on; ``prefetch_among``:
    it also offers ``prefetch_candidates_among``), ``leveled``:
    the evict policy implements that protocol; ``clock_dependent_eviction``: its free-queue order
    changes with time alone; ``planners``: components given each program's plan; ``team_wrapper``:
    the shape policy's ``wrap_team_body`` or None; ``reload_cost``: components given PrefillReload.
    """

    dynamic: bool
    preemptive: bool
    reads_kv_state: bool = False
    tiers: TierSettings = NO_TIER
    leveled: bool = False
    clock_dependent_eviction: bool = False
    retention: bool = False
    offload: bool = False
    prefetch: bool = False
    prefetch_on_events: bool = False
    prefetch_among: bool = False
    reload_cost: tuple = ()
    planners: tuple = ()
    team_wrapper: Callable | None = None

    @property
    def kv_mechanisms(self) -> bool:
        """The backend needs its KV mechanisms (CPU tier or pins) for this bundle."""
        return self.tiers.cpu_tier or self.retention


def _components(bundle: "PolicyBundle") -> list[tuple[str, Any]]:
    """(decision, component) once per distinct object, in decision order."""
    out, seen = [], set()
    for d in ("route", "order", "evict", "shape"):
        c = getattr(bundle, d)
        if id(c) not in seen:
            seen.add(id(c))
            out.append((d, c))
    return out


def _defined_with(obj: Any, name: str, base_name: str) -> bool:
    """Whether ``name`` of ``obj`` is defined in the class that defines ``base_name``, or in a
    subclass of it (not inherited from above an override of ``base_name``)."""
    def owner(n: str) -> type | None:
        return next((k for k in type(obj).__mro__ if n in k.__dict__), None)

    mine, base = owner(name), owner(base_name)
    return mine is None or base is None or issubclass(mine, base)


def check_bundle(bundle: "PolicyBundle") -> Capabilities:
    """Check every component against :data:`REQUIRED` and every capability it claims against
    :data:`CAPABILITIES`; return what the backends need to know.

    Raises :class:`PolicyContractError` (``where`` = ``policy.<decision>``) naming the component and
    the first missing member.
    """
    claimed: dict[str, list] = {}
    for d in ("route", "order", "evict", "shape"):
        comp = getattr(bundle, d)
        proto, members = REQUIRED[d]
        for m in members:
            if not hasattr(comp, m):
                raise PolicyContractError(f"policy.{d}", f"{type(comp).__name__} lacks {m!r}, required of every "
                                          f"{d} policy ({proto.__name__} in agentsim/policies/base.py)")
    for d, comp in _components(bundle):
        for cap, (proto, decisions, members) in CAPABILITIES.items():
            if not hasattr(comp, members[0]):
                continue
            for m in members[1:]:
                if not hasattr(comp, m):
                    raise PolicyContractError(f"policy.{d}", f"{type(comp).__name__} defines {members[0]!r} but lacks "
                                              f"{m!r} ({proto.__name__} in agentsim/policies/base.py)")
            claimed.setdefault(cap, []).append((d, comp))
    order, evict, route = bundle.order, bundle.evict, bundle.route

    def on_evict(cap: str) -> bool:
        return any(c is evict for _, c in claimed.get(cap, ()))

    tiers = evict.tier_settings() if on_evict("tiered") else NO_TIER
    if not isinstance(tiers, TierSettings):
        raise PolicyContractError("policy.evict", f"{type(evict).__name__}.tier_settings() must return a TierSettings, "
                                  f"got {tiers!r}")
    prefetch = on_evict("prefetch") and tiers.cpu_tier and tiers.prefetch
    # a subclass that overrides prefetch_candidates but inherits prefetch_candidates_among would be
    # asked the parent's answer: the per-engine ask only where both come from the same class or the
    # among form was written after the full one (in a subclass of its class)
    among = on_evict("prefetch_among") and _defined_with(evict, "prefetch_candidates_among", "prefetch_candidates")
    team = [c for _, c in claimed.get("team_wrapper", ()) if c is bundle.shape]
    return Capabilities(
        dynamic=bool(order.dynamic), preemptive=bool(order.preemptive),
        reads_kv_state=any(c is route and bool(c.reads_kv_state) for _, c in claimed.get("reads_kv_state", ())),
        tiers=tiers, leveled=on_evict("leveled"),
        clock_dependent_eviction=on_evict("leveled") and bool(evict.depends_on_clock),
        retention=on_evict("retention"), offload=on_evict("offload"), prefetch=prefetch,
        prefetch_on_events=prefetch and bool(evict.prefetch_on_events),
        prefetch_among=prefetch and among,
        reload_cost=tuple(c for _, c in claimed.get("reload_cost", ())),
        planners=tuple(c for _, c in claimed.get("program_plan", ())),
        team_wrapper=team[0].wrap_team_body if team else None,
    )


@dataclass
class PolicyBundle:
    """One object per decision, the event hooks they define, and their checked :class:`Capabilities`.

    Building one checks the contract (:func:`check_bundle`, raises :class:`PolicyContractError`),
    collects each ``on_*`` hook once per distinct component, then calls ``bind(bundle)`` on the
    components that define it.
    """

    name: str
    route: Any
    order: Any
    evict: Any
    shape: Any
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.caps: Capabilities = check_bundle(self)
        comps = [c for _, c in _components(self)]
        self._hooks: dict[str, list] = {hook: [getattr(c, hook) for c in comps if hasattr(c, hook)] for hook in HOOKS}
        for c in comps:
            if hasattr(c, "bind"):
                c.bind(self)

    def hooks(self, name: str) -> list:
        """The callables ``emit(name, ...)`` calls, in order (a backend may hold on to this list)."""
        return self._hooks[name]

    def subscribe(self, name: str, fn: Callable) -> None:
        """Call ``fn`` on event ``name`` (one of :data:`HOOKS`, same arguments) after the policies'
        own hooks: how a backend's mechanisms, a study or a test observe events without reaching
        into a backend. Raises ValueError for an unknown event name."""
        if name not in self._hooks:
            raise ValueError(f"unknown event {name!r} (known: {', '.join(HOOKS)})")
        self._hooks[name].append(fn)

    def component_hooks(self, decision: str) -> dict[str, Callable]:
        """The event hooks (:data:`HOOKS`) that the component of ``decision`` (``route``, ``order``,
        ``evict``, ``shape``) defines, name -> callable, in :data:`HOOKS` order: what a backend
        subscribes (:meth:`subscribe`) when it runs a second instance of one component (the
        simulator's P/D proxy picks prefill and decode engines with two route policies). Raises
        ValueError for an unknown decision."""
        if decision not in REQUIRED:
            raise ValueError(f"unknown decision {decision!r} (known: {', '.join(REQUIRED)})")
        comp = getattr(self, decision)
        return {hook: getattr(comp, hook) for hook in HOOKS if hasattr(comp, hook)}

    def emit(self, name: str, *args: Any) -> None:
        for fn in self._hooks[name]:
            fn(*args)

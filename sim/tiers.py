"""KV mechanisms the retention and eviction policies need: a CPU tier over a PCIe link, pinning,
prefetch, and holding calls whose KV is still loading.

The policies (``agentsim.policies.distance`` / ``retention``) only decide; this module carries their
decisions out on a simulated engine, as the live scheduler adapter would on vLLM:

- **CPU tier** (HiCache-like): a cached block evicted from the GPU is written back to host memory
  (``write_back``) over the device-to-host direction of the PCIe link; host memory is LRU with a
  capacity of ``cpu_gib``. A call whose prompt continues, past its GPU prefix hit, with blocks held on
  the host (or already being loaded) is *held* out of the engine's queue while those blocks load over
  the host-to-device direction -- KVFlow's "skip requests whose KV is still loading": the engine keeps
  scheduling the other calls -- and joins the queue when the load completes.
- **Prefetch**: the blocks of the agents the policy names (``prefetch_candidates``) are loaded back
  ahead of their calls, only into free blocks the policy ranks as farther than the agent (ScaleSim's
  "denied unless available + evictable can hold it"), nearest agent first, stopping at the first that
  does not fit.
- **Pins** (Continuum TTL, Tokencake preservation): when a call ends, ``retain(call)`` may keep its
  cached blocks referenced for a TTL; a pin ends at expiry if the program has no call waiting, when
  the program's next call is admitted, when the program ends, or under memory pressure (latest program
  arrival first, until the engine's waiting head fits: Continuum's deadlock guard).
- **Offload** (Tokencake): when a call ends and its tool starts, the policy may move the program's
  pinned KV to the host (released on the GPU at once, readable until reused) and have it loaded back
  at the time it gives.

Every change to the block pool happens at an engine step boundary (``pre_schedule``) or while the
engine plans (``reclaim``), never in the middle of a step; anything due at another time (a TTL expiry,
a finished transfer, an agent entering the prefetch window) calls ``engine.notify()``, so
fast-forward windows end exactly where step-by-step mode would see the change.

Simplifications (documented in the README's Policies section): a write-back does not delay the GPU block's reuse
(a staging buffer is assumed); loaded blocks count as computed prefix; preempted calls recompute as
in vLLM v1 (no swap).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from itertools import islice, takewhile
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from agentsim.metrics import CallStatus

_NONE = MappingProxyType({})   # an empty mapping for lookups that miss

GiB = float(1 << 30)
# an engine whose agents are at most this share of all agents asks the policy for their prefetch
# candidates (Prefetcher.prefetch_candidates_among); one holding more filters the cluster's list
AMONG_SHARE = 0.5


class PCIeLink:
    """One engine's host link: two independent FIFO directions (full duplex) of ``GBps`` each."""

    __slots__ = ("bytes_per_s", "busy_until", "bytes_moved")

    def __init__(self, GBps: float) -> None:
        if GBps <= 0:
            raise ValueError("PCIe bandwidth must be > 0")
        self.bytes_per_s = GBps * 1e9
        self.busy_until = {"d2h": 0.0, "h2d": 0.0}
        self.bytes_moved = {"d2h": 0, "h2d": 0}

    def transfer(self, direction: str, nbytes: int, now: float, not_before: float = 0.0) -> float:
        """Queue ``nbytes`` in ``direction``; return when the transfer completes."""
        start = max(now, not_before, self.busy_until[direction])
        done = start + nbytes / self.bytes_per_s
        self.busy_until[direction] = done
        self.bytes_moved[direction] += nbytes
        return done

    def time_for(self, nbytes: int) -> float:
        return nbytes / self.bytes_per_s


class CpuTier:
    """Host copies of KV blocks: block hash -> time the copy is complete; LRU beyond ``capacity_blocks``."""

    __slots__ = ("capacity", "ready_at", "num_stored", "num_dropped")

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self.ready_at: OrderedDict[int, float] = OrderedDict()
        self.num_stored = 0
        self.num_dropped = 0

    def __contains__(self, h: int) -> bool:
        return h in self.ready_at

    def store(self, h: int, ready_at: float) -> None:
        old = self.ready_at.get(h)
        if old is not None:
            self.ready_at.move_to_end(h)
            if ready_at < old:
                self.ready_at[h] = ready_at
            return
        self.ready_at[h] = ready_at
        self.num_stored += 1
        if len(self.ready_at) > self.capacity:
            self.ready_at.popitem(last=False)
            self.num_dropped += 1

    def touch(self, h: int) -> None:
        if h in self.ready_at:
            self.ready_at.move_to_end(h)


@dataclass
class _Pin:
    program_id: int
    agent_id: int
    thread_id: int
    blocks: list
    expires_at: float
    program_arrival_at: float
    hashes: list = field(default_factory=list)
    next_call: Any = None        # the program's next call once it arrived (admission clears the pin)


@dataclass
class _Load:
    kind: str                    # "call" (a held call), "prefetch", "upload" (Tokencake)
    blocks: list
    hashes: list
    done_at: float
    agent_id: int
    program_id: int
    call: Any = None
    protect: list = field(default_factory=list)   # GPU prefix blocks referenced while loading
    finished: bool = False       # the transfer is done
    completed: bool = False      # ... and applied at a step boundary


class EngineHooks(Protocol):
    """What the simulator engine calls on its KV mechanisms (``engine.tiers``), the only places it does.

    The decisions are the policies' (``agentsim.policies.base``: :class:`Retention`, :class:`Offloader`,
    :class:`Prefetcher`, :class:`TieredEvict`); an implementation only executes them: transfers,
    pins, timers. :class:`EngineTiers` implements it, and ``agentsim.sim.disagg.KVPort`` wraps it.
    """

    def intercept(self, call: Any) -> bool:
        """At arrival: True if the mechanism takes ``call`` aside (it will hand it to the engine later)."""

    def pre_schedule(self, now: float) -> None:
        """At a step boundary, before the engine plans: the only time the block pool changes here."""

    def reclaim(self, call: Any, num_blocks: int, now: float) -> bool:
        """The engine needs ``num_blocks`` more free blocks for ``call``: free what it may; True if any."""

    def finalize(self, until: float) -> None:
        """Run end: give back calls still held."""


class EngineTiers:
    """The KV mechanisms of one simulated engine (see the module docstring); an :class:`EngineHooks`."""

    def __init__(self, owner: "Mechanisms", engine: Any) -> None:
        self.owner = owner
        self.engine = engine
        self.env = engine.env
        self.pool = engine.pool
        self.bs = engine.block_size
        self.policy = owner.evict
        caps = owner.caps
        prof = engine.profile
        self.block_bytes = prof.kv_bytes_per_token * self.bs
        tiers = caps.tiers   # the evict policy's TierSettings, read once when its bundle was built
        self.link = PCIeLink(tiers.pcie_GBps or prof.links.pcie_GBps)
        self.cpu: CpuTier | None = None
        if tiers.cpu_tier:
            self.cpu = CpuTier(max(1, int(tiers.cpu_gib * GiB // self.block_bytes)))
        self.write_back = self.cpu is not None and tiers.write_back
        self.prefetch_on = self.cpu is not None and caps.prefetch
        self.offload = caps.offload
        self.free_queue = self.pool.free_queue   # the evict policy's queue for this engine
        if caps.leveled:
            self.free_queue.block_size = self.bs
        if self.prefetch_on:
            self.pool.on_evict(self._evicted)   # write-back (if on) and the prefetch memo's upkeep
        elif self.write_back:
            self.pool.on_evict(self.written_back)
        self.pins: dict[tuple[int, int], _Pin] = {}
        self.pin_of_program: dict[int, set] = {}
        self.inflight: dict[int, float] = {}          # hash -> when its load completes
        self.loads: list[_Load] = []                  # started, not yet released
        self.held: list = []                          # calls waiting for a plan at the next boundary
        self.bypass: set[int] = set()                 # call ids released by the tier (not intercepted again)
        self.pending_pins: list = []                  # finished calls to pin at the next boundary
        self.pending_ends: list = []                  # programs that ended: unpin at the boundary
        self.uploads: list = []                       # heap of (upload_at, seq, pin key snapshot)
        self._seq = 0
        self._due: list = []                          # heap of (time, seq, what, info) due at a boundary
        self.prefetch_dirty = False                   # candidates may have changed for this engine
        self.prefetch_times: list = []                # heap of times an agent enters the window
        # prefetch: each candidate's cached prefix, kept exact as blocks are evicted (see _evicted)
        self._cached_upto: dict[int, list] = {}       # agent -> [its chain, cached prefix in blocks]
        self._watch: dict[int, int | set] = {}  # hash -> the agent (or agents) whose remembered prefix holds it
        # the policy's candidates among given agents (optional Prefetcher method), else filtered here
        self._candidates_among = self.policy.prefetch_candidates_among if caps.prefetch_among else None
        # what the mechanism did, for tests and studies: (event, time, program or agent, detail)
        self.log: list[tuple] = []
        self.stats = {"loaded_blocks": 0, "prefetched_blocks": 0, "written_back_blocks": 0, "held_calls": 0,
                      "pins": 0, "pin_expired": 0, "pin_admitted": 0, "pin_pressure": 0, "offloads": 0,
                      "uploads": 0}
        engine.tiers = self

    # ------------------------------------------------------------------ timers
    def _at(self, t: float) -> None:
        """Wake the engine at ``t`` (ends a fast-forward window there)."""
        now = self.env.now
        if t <= now:
            self.engine.notify()
            return
        ev = self.env.timeout(t - now)
        ev.callbacks.append(lambda _e: self.engine.notify())

    # ------------------------------------------------------------------ write-back
    def written_back(self, h: int, now: float) -> None:
        # Write-through, like vLLM's offloading connector: the host copy was made while the block
        # was computed (overlapped with compute), so it is ready when the GPU block is reused.
        # (ready "since ever": the instant of the GPU eviction itself differs between a
        # fast-forward window, which allocates its steps' blocks at its end, and step mode)
        self.cpu.store(h, 0.0)
        self.link.bytes_moved["d2h"] += self.block_bytes
        self.stats["written_back_blocks"] += 1

    def _evicted(self, h: int, now: float) -> None:
        """The pool hands out the block cached under ``h``: write it back (if on), and shorten the
        remembered cached prefix of every prefetch candidate whose chain holds ``h`` to ``h``'s
        depth. (A hash leaves the prefix cache only this way, so the prefixes remembered stay
        cached: ``_prefetch`` scans on from them instead of from the chain's first block.)"""
        if self.write_back:
            self.written_back(h, now)
        w = self._watch.pop(h, None)
        if w is None:
            return
        block = self.pool.cached.get(h)
        p = -1 if block is None else block.position   # its depth in every chain that holds it
        upto = self._cached_upto
        for a in (w if type(w) is set else (w,)):
            m = upto.get(a)
            if m is None:
                continue
            hashes = m[0][1]
            if 0 <= p < len(hashes) and hashes[p] == h:
                if p < m[1]:
                    m[1] = p
            else:
                # not where the block says (a hash collision, or a block placed otherwise): forget
                # the prefix, the next look scans the chain from its start
                del upto[a]

    # ------------------------------------------------------------------ held calls
    def _plan(self, hashes: list, limit: int, now: float) -> tuple[int, list, float, int]:
        """(GPU prefix blocks, host-held hashes to load after it, latest in-flight completion, the
        depth of the first hash to load: after the prefix and the blocks already on their way)."""
        k = self.pool.num_cached_prefix(hashes, limit)
        i = k
        to_load = []
        wait = -math.inf
        cpu = self.cpu
        while i < limit:
            h = hashes[i]
            t = self.inflight.get(h)
            if t is not None and not to_load:
                wait = max(wait, t)
            elif cpu is not None and h in cpu and t is None:
                to_load.append(h)
            else:
                break
            i += 1
        return k, to_load, wait, i - len(to_load)

    def intercept(self, call: Any) -> bool:
        """At arrival: take ``call`` aside until the next step boundary, where the tier decides
        (with the block pool as it is there, in fast-forward and step-by-step mode alike) whether
        part of its prompt loads from the host; if not, it joins the inbox as it arrived."""
        if call.call_id in self.bypass:
            self.bypass.discard(call.call_id)
            return False
        for et in self.owner.pinning(call.program_id):
            if et is not self:
                et.engine.notify()  # the program moved on: that engine drops its pin at its next boundary
        if self.cpu is None:
            return False
        call.status = CallStatus.LOADING
        self.held.append(call)
        self.engine.notify()
        return True

    def _release_call(self, call: Any, at_boundary: bool = False) -> None:
        if at_boundary:
            # straight into the inbox with its arrival time: the engine drains it right after
            # this hook exactly as if it had never been taken aside
            e = self.engine
            call.status = CallStatus.WAITING
            e.num_outstanding_tokens += call.num_prompt_tokens + call.num_output_tokens
            e.join_inbox(call)
        else:
            self.bypass.add(call.call_id)
            self.engine.add_call(call)

    def _start_call_load(self, call: Any, now: float) -> None:
        limit = (call.num_prompt_tokens - 1) // self.bs
        hashes = call.full_hashes
        k, to_load, wait, first = self._plan(hashes, limit, now) if limit > 0 else (0, [], -math.inf, 0)
        if not to_load and wait == -math.inf:
            self._release_call(call, at_boundary=True)
            return
        self.stats["held_calls"] += 1
        cached = self.pool.cached
        protect = [cached[hashes[j]] for j in range(k)]
        if protect:
            self.pool.touch(protect, now, call.program_id, call.agent_id)
        free = self.pool.num_free
        if len(to_load) > free:
            to_load = to_load[:free]
        # the loaded blocks sit at their hashes' depths (after any still in flight for another load)
        blocks, done = self._load(to_load, first, now, call.program_id, call.agent_id)
        done = max(done, wait)
        self.log.append(("hold", now, call.call_id, (len(to_load), done)))
        ld = _Load("call", blocks, to_load, done, call.agent_id, call.program_id, call, protect)
        self.loads.append(ld)
        self._finish_at(ld)

    # ------------------------------------------------------------------ loads
    def _load(self, hashes: list, first_position: int, now: float, program_id: int, agent_id: int) -> tuple[list, float]:
        if not hashes:
            return [], now
        # read (and refresh) the host copies before allocating: the allocation's own evictions are
        # written back and could push them out of a full host tier
        ready = max(self.cpu.ready_at[h] for h in hashes)
        for h in hashes:
            self.cpu.touch(h)
        blocks = self.pool.allocate(len(hashes), now, program_id, agent_id, first_position)
        done = self.link.transfer("h2d", len(hashes) * self.block_bytes, now, not_before=ready)
        for h in hashes:
            self.inflight[h] = done
        self.stats["loaded_blocks"] += len(hashes)
        return blocks, done

    def _finish_at(self, ld: _Load) -> None:
        ev = self.env.timeout(max(0.0, ld.done_at - self.env.now))
        ev.callbacks.append(lambda _e, ld=ld: self._loaded(ld))

    def _loaded(self, ld: _Load) -> None:
        """A transfer completed: it takes effect at the engine's next step boundary."""
        ld.finished = True
        self.engine.notify()

    def _complete(self, ld: _Load) -> None:
        """At a boundary: loaded blocks become prefix-cache entries; a held call joins the queue."""
        for b, h in zip(ld.blocks, ld.hashes):
            if self.inflight.get(h) == ld.done_at:
                del self.inflight[h]
            self.pool.cache(b, h)
        if ld.kind == "call":
            self._release_call(ld.call, at_boundary=True)

    # ------------------------------------------------------------------ pins
    def pin_later(self, call: Any) -> None:
        self.pending_pins.append(call)

    def _pin(self, call: Any, ttl: float, now: float) -> None:
        key = (call.program_id, call.thread_id)
        old = self.pins.get(key)
        if old is not None:
            self._unpin(key, now, "replaced")
        n_full = (call.num_prompt_tokens + call.num_output_tokens - 1) // self.bs
        cached = self.pool.cached
        blocks = []
        for h in call.full_hashes[:n_full]:
            b = cached.get(h)
            if b is None:
                break
            blocks.append(b)
        if not blocks:
            self.policy.on_unpin(call.program_id, now)
            return
        self.pool.touch(blocks, now, call.program_id, call.agent_id)
        pin = _Pin(call.program_id, call.agent_id, call.thread_id, blocks, now + ttl, call.program_arrival_at,
                   [b.block_hash for b in blocks])
        self.pins[key] = pin
        self.log.append(("pin", now, call.program_id, (len(blocks), pin.expires_at)))
        keys = self.pin_of_program.get(call.program_id)
        if keys is None:
            keys = self.pin_of_program[call.program_id] = set()
            self.owner.pinned_on.setdefault(call.program_id, {})[self.engine.engine_id] = self
        keys.add(key)
        self.stats["pins"] += 1
        if math.isfinite(pin.expires_at):
            self._at(pin.expires_at)

    def _unpin(self, key: tuple, now: float, why: str) -> int:
        pin = self.pins.pop(key, None)
        if pin is None:
            return 0
        before = self.pool.num_used
        self.log.append(("unpin", now, pin.program_id, why))
        if pin.blocks:
            self.pool.free(pin.blocks, now)
        keys = self.pin_of_program.get(pin.program_id)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.pin_of_program[pin.program_id]
                self.owner.unpinned(pin.program_id, self.engine.engine_id)
                self.policy.on_unpin(pin.program_id, now)
        if why in ("expired", "admitted", "pressure"):
            self.stats[f"pin_{why}"] += 1
        return before - self.pool.num_used

    def note_arrival(self, call: Any) -> None:
        keys = self.pin_of_program.get(call.program_id)
        if keys:
            for key in keys:
                pin = self.pins[key]
                if pin.next_call is None and (pin.thread_id == call.thread_id or len(keys) == 1):
                    pin.next_call = call

    def unpin_program(self, program_id: int, now: float) -> None:
        for key in list(self.pin_of_program.get(program_id, ())):
            self._unpin(key, now, "program-end")

    # ------------------------------------------------------------------ offload (Tokencake)
    def _maybe_offload(self, call: Any, now: float) -> None:
        """Tokencake's decision when the call ends and its tool starts (before the engine plans)."""
        key = (call.program_id, call.thread_id)
        pin = self.pins.get(key)
        tool = call.hints.tool_after
        if pin is None or tool is None or self.cpu is None:
            return
        nbytes = len(pin.blocks) * self.block_bytes
        upload_at = self.policy.should_offload(call.program_id, call.agent_id, tool, call.hints.tool_time_estimate,
                                               now, self.link.time_for(nbytes), self.engine.kv_usage,
                                               self.engine.num_waiting, now)
        if upload_at is None:
            return
        # copy to host (from a staging buffer: the GPU blocks are released at once and stay
        # readable until reused), load back at upload_at
        done = self.link.transfer("d2h", nbytes, now)
        for h in pin.hashes:
            self.cpu.store(h, done)
        self.stats["offloads"] += 1
        self.log.append(("offload", now, call.program_id, (len(pin.blocks), done, upload_at)))
        info = (key, list(pin.hashes), pin.program_id, pin.agent_id)
        self._unpin(key, now, "offloaded")
        self._seq += 1
        heapq.heappush(self._due, (max(upload_at, done), self._seq, "upload", info))
        self._at(max(upload_at, done))

    def _upload(self, info: tuple, now: float) -> None:
        key, hashes, pid, aid = info
        if pid not in self.owner.live_programs or key in self.pins:
            return
        if self.owner.returned.get(key[0], _NONE).get(key[1], True):
            return  # the tool returned early: the call's own load took care of it
        k = self.pool.num_cached_prefix(hashes, len(hashes))
        to_load = []
        for h in hashes[k:]:
            if h in self.cpu and h not in self.inflight:
                to_load.append(h)
            else:
                break
        to_load = to_load[:max(0, self.pool.num_free - 1)]
        if not to_load:
            return
        blocks, done = self._load(to_load, k, now, pid, aid)
        ld = _Load("upload", blocks, to_load, done, aid, pid)
        self.loads.append(ld)
        self._finish_at(ld)
        self.stats["uploads"] += 1
        self.log.append(("upload", now, pid, (len(to_load), done)))

    # ------------------------------------------------------------------ prefetch (ScaleSim / KVFlow)
    def prefetch_at(self, t: float) -> None:
        """Re-examine the prefetch candidates at ``t`` (an agent enters the look-ahead window)."""
        heapq.heappush(self.prefetch_times, t)
        self._at(t)

    def _prefetch(self, now: float) -> None:
        # Only on events that also wake this engine (its own call ends, its timers, step-graph
        # changes), so fast-forward and step-by-step modes decide at the same boundaries.
        self.prefetch_dirty = False
        pol = self.policy
        pool = self.pool
        cached = pool.cached
        cached_upto = self._cached_upto
        plan = None   # the policy's budget, made when the first candidate has blocks to load
        # the policy names agents cluster-wide: keep, in its order, those whose KV was last on this engine
        eid = self.engine.engine_id
        among = self._candidates_among
        agents = self.owner.agents_on.get(eid) if among is not None else None
        last_chain = self.owner.last_chain
        if among is not None and (not agents or len(agents) <= AMONG_SHARE * len(last_chain)):
            # the policy orders only this engine's agents (the others' chains are elsewhere); an
            # engine holding most agents filters the cluster's list instead (no cheaper to ask)
            mine = [(a, last_chain[a]) for a in among(now, agents)] if agents else []
        else:
            cands = pol.prefetch_candidates(now)
            mine = [(a, c) for a, c in zip(cands, map(last_chain.get, cands)) if c and c[0] == eid]
        watch = self._watch
        host = self.cpu.ready_at
        inflight = self.inflight
        for agent, chain in mine:
            hashes = chain[1]
            # How much of the agent's chain is cached. A hash leaves the prefix cache only when its
            # block is evicted, and _evicted shortens the remembered prefix when that hash is in it,
            # so the prefix remembered is still cached: scan on from there (candidates come back at
            # every boundary; most evictions are of other agents' blocks)
            memo = cached_upto.get(agent)
            if memo is not None and memo[0] is chain:
                k0 = memo[1]
                if k0 == len(hashes):
                    continue   # all of it cached: nothing to load
            elif memo is not None:
                # a new chain (the agent's next call ended): it extends the last one, whose
                # remembered prefix it shares when its hash at that depth is the same (hashes chain
                # every block before them, as vLLM's prefix cache assumes)
                k0 = memo[1]
                if k0 > len(hashes) or (k0 and hashes[k0 - 1] != memo[0][1][k0 - 1]):
                    k0 = 0
                memo[0] = chain
                memo[1] = k0
            else:
                k0 = 0
                memo = cached_upto[agent] = [chain, 0]
            k = k0 + len(list(takewhile(cached.__contains__, islice(hashes, k0, None))))
            if k > k0:
                memo[1] = k
                # the agent watches the hashes its prefix now holds (one position per hash: it
                # chains every block before it)
                for h in islice(hashes, k0, k):
                    w = watch.get(h)
                    if w is None:
                        watch[h] = agent
                    elif type(w) is set:
                        w.add(agent)
                    elif w != agent:
                        watch[h] = {w, agent}
            if k == len(hashes) or hashes[k] not in host or hashes[k] in inflight:
                continue   # nothing to load: the next block is neither cached nor on the host (or on its way)
            to_load = []
            for h in islice(hashes, k, None):
                if h in host and h not in inflight:
                    to_load.append(h)
                else:
                    break
            if plan is None:
                plan = pol.plan_prefetch(self.free_queue, self.pool.num_never_used, now)
            level = plan.admit(agent, len(to_load))
            if level is None:
                if plan.stopped:
                    break
                continue
            blocks, done = self._load(to_load, k, now, -1, agent)
            self.log.append(("prefetch", now, agent, (len(to_load), level, done)))
            ld = _Load("prefetch", blocks, to_load, done, agent, -1)
            self.loads.append(ld)
            self._finish_at(ld)
            self.stats["prefetched_blocks"] += len(to_load)

    # ------------------------------------------------------------------ engine hooks
    def pre_schedule(self, now: float) -> None:
        """At a step boundary: apply pins, due releases and uploads, start loads, release finished ones."""
        pol = self.policy
        if self.pending_ends:
            ends, self.pending_ends = self.pending_ends, []
            for pid in ends:
                self.unpin_program(pid, now)
        if self.pending_pins:
            calls, self.pending_pins = self.pending_pins, []
            offload = self.offload
            for call in calls:
                ttl = pol.retain(call, now)
                if ttl is not None and ttl > 0:
                    self._pin(call, ttl, now)
                    if offload:
                        self._maybe_offload(call, now)
        if self.pins:
            for key in list(self.pins):
                pin = self.pins.get(key)
                if pin is None:
                    continue
                nc = pin.next_call
                if nc is not None and nc.engine is not None and nc.engine is not self.engine:
                    self._unpin(key, now, "moved")     # routed to another engine: the pin is no use
                    continue
                why = pol.unpin_reason(pin.expires_at, None if nc is None else nc.status, now)   # the policy's rule
                if why is not None:
                    self._unpin(key, now, why)
        while self._due and self._due[0][0] <= now:
            _, _, what, info = heapq.heappop(self._due)
            self._upload(info, now)
        if self.loads:
            keep = []
            for ld in self.loads:
                # by time, not by whether the completion event already ran: an engine step
                # ending at the same instant may be processed before or after it
                if ld.done_at <= now and not ld.completed:
                    ld.completed = True
                    self._complete(ld)
                    if ld.kind == "call":
                        keep.append(ld)   # its blocks stay referenced until the call is admitted
                        continue
                if not ld.completed:
                    keep.append(ld)
                elif ld.kind == "call":
                    c = ld.call
                    if c.status in (CallStatus.RUNNING, CallStatus.FINISHED, CallStatus.PREEMPTED):
                        self.pool.free(ld.blocks + ld.protect, now)
                    else:
                        keep.append(ld)
                else:
                    self.pool.free(ld.blocks, now)
            self.loads = keep
        if self.held:
            calls, self.held = self.held, []
            for call in calls:
                self._start_call_load(call, now)
        pt = self.prefetch_times
        while pt and pt[0] <= now:
            heapq.heappop(pt)
            self.prefetch_dirty = True
        if self.prefetch_dirty and self.prefetch_on:
            self._prefetch(now)

    def reclaim(self, call: Any, num_blocks: int, now: float) -> bool:
        """The engine needs ``num_blocks`` more free blocks for ``call``: release pins (latest program
        arrival first, never ``call``'s own program), then blocks kept for loaded calls still waiting."""
        freed = 0
        if self.pins:
            pol = self.policy
            order = sorted((k for k in self.pins if k[0] != call.program_id),
                           key=lambda k: (pol.unpin_key(k[0]), k))
            for key in order:
                if freed >= num_blocks:
                    break
                freed += self._unpin(key, now, "pressure")
        if freed < num_blocks and self.loads:
            keep = []
            for ld in self.loads:
                if freed < num_blocks and ld.completed and ld.call is not call:
                    before = self.pool.num_used
                    self.pool.free(ld.blocks + ld.protect, now)
                    freed += before - self.pool.num_used
                else:
                    keep.append(ld)
            self.loads = keep
        return freed > 0

    def finalize(self, until: float) -> None:
        """Run end: calls still held by the tier are unfinished calls of this engine."""
        for call in self.held:
            self.engine.join_inbox(call)
        self.held = []
        for ld in self.loads:
            if ld.kind == "call" and not ld.completed:
                self.engine.join_inbox(ld.call)


class Mechanisms:
    """All engines' KV mechanisms (CPU tier, pins, prefetch, offload) and the events they follow.

    Only mechanisms: what happens before a program starts (an oracle's plan, a shape policy's own
    LLM calls) is the program driver's, :func:`agentsim.programs.prepare_program`, in every backend.
    """

    def __init__(self, sim: Any) -> None:
        self.sim = sim
        bundle = sim.bundle
        self.evict = bundle.evict
        self.caps = caps = bundle.caps   # checked once when the bundle was built (policies/base.py)
        self.engines: list[EngineTiers] = []
        self.last_chain: dict[int, tuple[int, list]] = {}   # agent -> (engine, hashes of its last context)
        self.agents_on: dict[int, set[int]] = {}            # engine -> agents whose last context is there
        self.live_programs: set[int] = set()
        # program -> {thread -> whether its last call's tool returned (its next call arrived)}
        self.returned: dict[int, dict[int, bool]] = {}
        # program -> {engine id -> the engine's tier}: the engines holding a pin of the program (the
        # hooks look at these, not at every engine)
        self.pinned_on: dict[int, dict[int, EngineTiers]] = {}
        if caps.kv_mechanisms:
            for e in sim.engines:
                self.engines.append(EngineTiers(self, e))
            if caps.reload_cost:
                prefill = _prefill_time(sim)
                for comp in caps.reload_cost:
                    comp.use_prefill_time(prefill)
            # after the policies' own hooks (the bundle calls subscribers last)
            bundle.subscribe("on_call_arrive", self._on_call_arrive)
            bundle.subscribe("on_call_finish", self._on_call_finish)
            bundle.subscribe("on_program_start", self._on_program_start)
            bundle.subscribe("on_program_end", self._on_program_end)
            if caps.prefetch_on_events:
                bundle.subscribe("on_tool_end", self._on_tool_end)
        # the engines that prefetch, with their wake-ups, in engine order: a step-clock or workflow
        # event marks them all (prefetch_on is fixed when the tier is built)
        self._prefetching = [(et, et.engine.notify) for et in self.engines if et.prefetch_on]

    @property
    def active(self) -> bool:
        return bool(self.engines)

    def pinning(self, program_id: int) -> list[EngineTiers]:
        """The engines holding a pin of ``program_id``, in engine order."""
        on = self.pinned_on.get(program_id)
        if not on:
            return []
        return [on[i] for i in sorted(on)] if len(on) > 1 else list(on.values())

    def unpinned(self, program_id: int, engine_id: int) -> None:
        """Engine ``engine_id`` holds no pin of ``program_id`` any more."""
        on = self.pinned_on.get(program_id)
        if on is not None:
            on.pop(engine_id, None)
            if not on:
                del self.pinned_on[program_id]

    # ------------------------------------------------------------------ hooks (after the policy's)
    def _on_call_arrive(self, call: Any, now: float) -> None:
        for et in self.pinning(call.program_id):
            et.note_arrival(call)
        threads = self.returned.get(call.program_id)
        if threads is None:
            self.returned[call.program_id] = {call.thread_id: True}
        else:
            threads[call.thread_id] = True

    def _on_call_finish(self, call: Any, now: float) -> None:
        e = call.engine
        bs = e.block_size
        n_full = (call.num_prompt_tokens + call.num_output_tokens - 1) // bs
        agent, eid = call.agent_id, e.engine_id
        prev = self.last_chain.get(agent)
        self.last_chain[agent] = (eid, call.full_hashes[:n_full])
        if prev is None or prev[0] != eid:
            if prev is not None:
                self.agents_on[prev[0]].discard(agent)
            self.agents_on.setdefault(eid, set()).add(agent)
        et = e.tiers
        if et is None:
            return
        if self.caps.retention:
            self.returned.setdefault(call.program_id, {})[call.thread_id] = False
            et.pin_later(call)
        if et.prefetch_on:
            et.prefetch_dirty = True   # this engine plans next: no notify needed
            t = self.evict.prefetch_due_at(call.agent_id, now)
            if t is not None and t > now:
                et.prefetch_at(t)
            if self.caps.prefetch_on_events:
                # steps-to-execution: one call ending moves every agent of its workflow a step closer
                # (every other engine: et prefetches, so all do)
                for et2, notify in self._prefetching:
                    if et2 is not et:
                        et2.prefetch_dirty = True
                        notify()

    def _on_tool_end(self, program_id: int, agent_id: int, tool: str, now: float) -> None:
        # a step clock may have advanced: distances of many agents changed at once
        for et, notify in self._prefetching:
            et.prefetch_dirty = True
            notify()

    def _on_program_start(self, program_id: int, agent_id: int, kind: str, now: float) -> None:
        self.live_programs.add(program_id)

    def _on_program_end(self, program_id: int, now: float) -> None:
        self.live_programs.discard(program_id)
        for et in self.pinning(program_id):
            et.pending_ends.append(program_id)
            et.engine.notify()
        self.returned.pop(program_id, None)


def _prefill_time(sim: Any):
    """PrefillReload(L): seconds to recompute L context tokens in budget-sized chunks (the profile)."""
    step_seconds = sim.profile.step_seconds
    budget = sim.limits.max_num_batched_tokens  # resolved: a V0 default depends on max_model_len

    def prefill(num_tokens: int) -> float:
        # Each chunk is one scheduled sequence; only the chunk that ends the prompt samples.
        t, k = 0.0, 0
        while k < num_tokens:
            n = min(budget, num_tokens - k)
            t += step_seconds(n, n * k + n * (n + 1) // 2, 0, 0, 1, 1 if k + n >= num_tokens else 0)
            k += n
        return t

    return prefill


def attach_mechanisms(sim: Any) -> Mechanisms | None:
    """Give a :class:`~agentsim.sim.runner.Simulation` the mechanisms its bundle needs (None if none).

    A route policy that reads engines' KV state (``Capabilities.reads_kv_state``: cached prefixes, KV
    usage) would see it stale inside a fast-forward window (the window's evictions are applied at its
    end), and an eviction order that changes with time alone (``clock_dependent_eviction``) would
    pick other victims there than step by step (a window allocates its steps' blocks at its end), so
    with either the engines run step by step.
    """
    caps = sim.bundle.caps
    if caps.reads_kv_state or caps.clock_dependent_eviction:
        for e in sim.engines:
            e.fast_forward = False
    m = Mechanisms(sim)
    return m if m.active else None

"""KV movement between engines: prefill/decode disaggregation, cross-engine prefix fetch, router cost.

Active when the cluster has a ``prefill`` or ``decode`` engine (``cluster.disagg.roles`` /
``node_roles``), a prefix-fetch policy other than ``off``, or a router cost (``cluster.router``);
otherwise the runner takes its ordinary path and nothing here runs.

**Disaggregated call** (vLLM's P/D design: ``vllm/distributed/kv_transfer/kv_connector/v1/base.py``,
the NIXL connector and the proxy ``examples/online_serving/disaggregated_serving/``):

1. The router picks the pair: the route policy is asked twice, once over the prefill-capable engines
   (role ``prefill`` or ``mixed``) and once over the decode-capable ones (``decode`` or ``mixed``); each
   engine view carries its ``role``. If both picks are the same mixed engine the call runs co-located.
2. The prefill engine runs the request with ``max_tokens = 1`` (a :class:`PrefillLeg`: same prompt,
   one output token); its queueing, prefix hits, chunking and preemption are the engine's own.
3. When the leg finishes, the prefill engine keeps the prompt's full blocks referenced until the
   decode side has read them (vLLM's ``request_finished`` returning ``delay_free_blocks``).
4. The decode engine, at its next step boundary, looks up its own prefix cache, allocates blocks for
   the rest of the prompt's full blocks and pulls them over the links (:mod:`agentsim.sim.network`);
   meanwhile the call waits outside the queue (vLLM's ``WAITING_FOR_REMOTE_KVS``) and other calls run.
   If the decode engine has too few free blocks the pull waits (FIFO) for a later boundary.
   ``transfer = "whole"`` starts sending then; ``"layerwise"`` counts the link time from the prefill's
   first scheduling (each layer's KV leaves as it is computed, P2pNccl/LMCache/Mooncake layer-wise
   push), but the data cannot arrive before the prefill ended plus one layer's share.
5. When the blocks arrive (at the decode engine's next boundary) they become prefix-cache entries and
   the call joins the decode engine's queue; at admission they are prefix hits, so only the tokens
   past the last full block are recomputed (vLLM recomputes the last token; this model, whole blocks
   only, recomputes at most ``block_size`` tokens), and the decode engine samples the first token.

**TTFT as the client sees it.** vLLM's proxy (``toy_proxy_server.py``, ``disagg_proxy_server.py``)
awaits the prefill response (its one token is discarded) and then streams the decode engine's
response, so the client's first token is the *decode engine's* first token: TTFT = prefill queue +
prefill + transfer + decode queue + the decode engine's first step. That is what the calls table
records (``first_token_at`` on the decode engine). ``kv_transfer_time`` is the time from the end of
the prefill to the KV being usable on the decode engine (waiting for blocks, link queueing,
bandwidth, latency; 0 when nothing moved); ``kv_transfer_bytes`` the bytes moved.

**Cross-engine prefix fetch.** A call routed to an engine whose prefix cache holds fewer of its
prompt blocks than another engine's may have them fetched (:mod:`agentsim.policies.kvfetch` decides,
on the transfer time over the links vs the prefill time of those tokens); the call then waits outside
the queue as in step 4 and the fetched blocks count as prefix-cache hits. The source's blocks are read
as they are when the fetch starts and are not pinned (an eviction during the transfer, ms, does not
abort it). Engines run step by step when fetch is on (the policy reads every engine's cache).

**Router cost.** Each routing decision costs ``decision_cost + rtt`` seconds before the call reaches an
engine; the sum per program is the programs table's ``coordination_overhead`` (s).

Every change to a block pool happens at that engine's step boundary (``pre_schedule``) or inside its
own step (the prefill leg's hold), like :mod:`agentsim.sim.tiers`, so fast-forward windows stay exact.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from agentsim.errors import ConfigError
from agentsim.metrics import CallStatus
from agentsim.policies.kvfetch import FetchOption, make_fetch_policy
from agentsim.sim.engine import SimCall, delay_to
from agentsim.sim.network import Network, Transfer, network_for
from agentsim.workload import Segment


class PrefillLeg(SimCall):
    """The prefill half of a disaggregated call: the parent's prompt with ``max_tokens = 1``."""

    __slots__ = ("parent", "decode_engine")

    def __init__(self, parent: SimCall, decode_engine: Any) -> None:
        super().__init__(parent.call_id, parent.program_id, parent.agent_id, parent.thread_id, parent.program_kind,
                         parent.arrival_at, parent.program_arrival_at, parent.context, 1, parent.output_seg_id,
                         parent.hints, parent.parent_call_ids, None)
        self.parent = parent
        self.decode_engine = decode_engine


class _Job:
    """KV to pull into an engine for ``call`` from engine ``src`` (a P/D hand-off or a fetch)."""

    __slots__ = ("kind", "call", "src", "n_avail", "src_hold", "ready_at", "pipelined_from", "not_before",
                 "blocks", "protect", "hashes", "transfer", "done_at", "completed")

    def __init__(self, kind: str, call: SimCall, src: Any, n_avail: int, src_hold: list, ready_at: float,
                 pipelined_from: float | None = None, not_before: float | None = None) -> None:
        self.kind = kind                    # "pd" or "fetch"
        self.call = call
        self.src = src
        self.n_avail = n_avail              # leading prompt blocks the source holds
        self.src_hold = src_hold            # source blocks referenced until the transfer is done
        self.ready_at = ready_at            # when the KV was ready to move (prefill end / routing)
        self.pipelined_from = pipelined_from
        self.not_before = not_before
        self.blocks: list = []
        self.protect: list = []
        self.hashes: list = []
        self.transfer: Transfer | None = None
        self.done_at = math.inf
        self.completed = False


class KVPort:
    """One engine's side of KV movement; installed as ``engine.tiers`` (wrapping the CPU-tier mechanisms
    of :mod:`agentsim.sim.tiers` if the bundle has them, which keep working unchanged)."""

    def __init__(self, owner: "Disagg", engine: Any) -> None:
        self.owner = owner
        self.engine = engine
        self.inner = engine.tiers
        self.pool = engine.pool
        self.bs = engine.block_size
        self.pending: list[_Job] = []       # waiting for free blocks here, FIFO
        self.loading: list[_Job] = []       # blocks allocated, data on the links
        self.release: list[list] = []       # source holds to drop at the next boundary
        self.held: list[SimCall] = []       # loaded calls queued here with their blocks held (kv_hold)
        engine.tiers = self

    def __getattr__(self, name: str) -> Any:  # the CPU tier's own interface (pin_later, prefetch_on ...)
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    # ------------------------------------------------------------------ engine hooks
    def intercept(self, call: SimCall) -> bool:
        return self.inner.intercept(call) if self.inner is not None else False

    def reclaim(self, call: SimCall, num_blocks: int, now: float) -> bool:
        """The engine needs ``num_blocks`` more free blocks for ``call``: the CPU tier's reclaim first, then
        the holds of loaded calls still waiting (latest loaded first, never ``call``'s own): their blocks stay
        cached (hit-able) but become evictable, so a queue of loaded calls can never deadlock the engine."""
        if self.inner is not None and self.inner.reclaim(call, num_blocks, now):
            return True
        before = self.pool.num_used
        keep = []
        for c in reversed(self.held):
            if c.kv_hold is None:
                continue
            if c is not call and before - self.pool.num_used < num_blocks and c.status == CallStatus.WAITING:
                self.pool.free(c.kv_hold, now)
                c.kv_hold = None
                self.owner.num_holds_reclaimed += 1
            else:
                keep.append(c)
        self.held = keep[::-1]
        return self.pool.num_used < before

    def pre_schedule(self, now: float) -> None:
        """At a step boundary: drop source holds, complete arrived pulls, start pending ones."""
        if self.inner is not None:
            self.inner.pre_schedule(now)
        if self.release:
            holds, self.release = self.release, []
            for blocks in holds:
                self.pool.free(blocks, now)
        if self.loading:
            keep = []
            for job in self.loading:
                if job.done_at <= now:
                    self._complete(job, now)
                else:
                    keep.append(job)
            self.loading = keep
        while self.pending:
            if not self._start(self.pending[0], now):
                break
            self.pending.pop(0)

    def finalize(self, until: float) -> None:
        """Run end: calls still waiting for their KV are unfinished calls of this engine."""
        if self.inner is not None:
            self.inner.finalize(until)
        for job in self.pending + self.loading:
            self.engine.join_inbox(job.call)
        self.pending = []
        self.loading = []

    # ------------------------------------------------------------------ pulls
    def receive(self, job: _Job) -> None:
        """Queue a pull; it starts at this engine's next step boundary (or a later one, for room)."""
        job.call.engine = self.engine
        job.call.status = CallStatus.LOADING
        self.pending.append(job)
        self.engine.notify()

    def _start(self, job: _Job, now: float) -> bool:
        call = job.call
        bs = self.bs
        limit = (call.num_prompt_tokens - 1) // bs
        hashes = call.full_hashes
        k = self.pool.num_cached_prefix(hashes, limit)
        upto = min(limit, job.n_avail)
        to_move = hashes[k:upto] if upto > k else []
        cached = self.pool.cached
        protect = [cached[hashes[j]] for j in range(k)] if to_move else []
        evictable = sum(1 for b in protect if b.ref_count == 0)  # free now, held by the pull
        if len(to_move) + evictable > self.pool.num_free:
            return False  # no room yet: FIFO, retried at the next boundary
        owner = self.owner
        if not to_move:
            self._release_src(job)
            self._to_queue(call, now, now)
            owner.num_jobs_empty += 1
            return True
        if protect:
            self.pool.touch(protect, now, call.program_id, call.agent_id)
        blocks = self.pool.allocate(len(to_move), now, call.program_id, call.agent_id, k)
        nbytes = len(to_move) * owner.block_bytes
        t = owner.network.transfer(job.src.engine_id, self.engine.engine_id, nbytes, now,
                                   earliest=job.pipelined_from, not_before=job.not_before)
        job.blocks, job.protect, job.hashes, job.transfer, job.done_at = blocks, protect, list(to_move), t, t.done
        call.kv_transfer_bytes += nbytes
        self.loading.append(job)
        owner.inflight[id(job)] = job
        ev = self.engine.env.timeout(delay_to(now, t.done))  # exactly at t.done: the boundary test is <=
        ev.callbacks.append(lambda _e: self.engine.notify())
        return True

    def _complete(self, job: _Job, now: float) -> None:
        owner = self.owner
        owner.inflight.pop(id(job), None)
        owner.network.received(job.transfer)
        for b, h in zip(job.blocks, job.hashes):
            self.pool.cache(b, h)
        job.completed = True
        self._release_src(job)
        call = job.call
        call.kv_transfer_time += job.done_at - job.ready_at
        call.kv_hold = job.blocks + job.protect
        if len(self.held) > 64:
            self.held = [c for c in self.held if c.kv_hold is not None]
        self.held.append(call)
        self._to_queue(call, job.done_at, now)

    def _release_src(self, job: _Job) -> None:
        if job.src_hold:
            port = job.src.tiers
            port.release.append(job.src_hold)
            job.src_hold = []
            port.engine.notify()

    def _to_queue(self, call: SimCall, enqueued_at: float, now: float) -> None:
        # straight into the inbox, as the CPU tier releases a loaded call: the engine drains it
        # right after this hook (or at the next boundary if it arrived exactly now)
        e = self.engine
        call.status = CallStatus.WAITING
        call.enqueued_at = min(enqueued_at, now)
        e.num_outstanding_tokens += call.num_prompt_tokens + call.num_output_tokens
        e.join_inbox(call)


class Disagg:
    """The cluster-wide side: roles, the pair routing, prefill-leg hand-off, fetch decisions, router cost."""

    def __init__(self, sim: Any) -> None:
        cfg = sim.cfg
        cl = cfg.cluster
        self.sim = sim
        self.env = sim.env
        self.engines = sim.engines
        roles = cl.engine_roles
        for e, r in zip(self.engines, roles):
            e.role = r
        self.pd = any(r != "mixed" for r in roles)
        self.prefill_engines = [e for e in self.engines if e.role in ("prefill", "mixed")]
        self.decode_engines = [e for e in self.engines if e.role in ("decode", "mixed")]
        d = cl.disagg
        self.fetch = make_fetch_policy(d.prefix_fetch, d.fetch_margin)
        self.fetch_on = d.prefix_fetch != "off"
        lim = sim.limits
        if (self.pd or self.fetch_on) and not lim.enable_prefix_caching:
            raise ConfigError("cluster.engine.enable_prefix_caching",
                              "KV moved between engines is used as prefix-cache hits: P/D roles and prefix fetch "
                              "need enable_prefix_caching = true (vLLM V1's default)")
        if (self.pd or self.fetch_on) and lim.scheduler != "v1":
            raise ConfigError("cluster.engine.scheduler", "vLLM's KV connectors (P/D, fetch) exist for the V1 "
                              "engine only; set scheduler = \"v1\"")
        if sim.frontends is not None and (self.pd or self.fetch_on):
            raise ConfigError("cluster.disagg", f"profile {sim.profile.name} has frontend (API server) costs; the "
                              "P/D and fetch model has no proxy frontend yet: use a profile without them")
        self.transfer_mode = d.transfer
        self.router_cost = cl.router.decision_cost + cl.router.rtt
        self.block_bytes = sim.profile.kv_bytes_per_token * lim.block_size
        self.num_layers = max(1, int(getattr(sim.profile.model, "num_layers", 1) or 1))
        self.network: Network = network_for(self.engines, sim.profile, cl)
        self.ports = [KVPort(self, e) for e in self.engines]
        for e in self.engines:
            e.on_finish = self._wrap_finish(e.on_finish)
            if self.fetch_on:
                e.fast_forward = False  # the fetch policy reads every engine's cache as of now
        self._route = sim.bundle.route.route
        self._route_p = self._route
        if self.pd:
            # the proxy picks prefiller and decoder separately (vLLM's toy proxy: a round robin over
            # each list): a second instance of the route policy, with its own state and hooks
            from agentsim.policies.registry import make_bundle

            # its event hooks, as the bundle declares them, follow the run's events after the policies'
            other = make_bundle(cfg.policy)
            self._route_p = other.route.route
            for name, fn in other.component_hooks("route").items():
                sim.bundle.subscribe(name, fn)
        self.coordination: dict[int, float] = defaultdict(float)
        self.inflight: dict[int, _Job] = {}
        self.num_disaggregated = 0
        self.num_colocated = 0
        self.num_fetches = 0
        self.num_fetch_decisions = 0
        self.num_jobs_empty = 0
        self.num_holds_reclaimed = 0
        self._prefill_time = _prefill_time(sim)

    # ------------------------------------------------------------------ serving one call
    def serve(self, call: SimCall):
        """A process body run in the program's process: route (paying the router cost), then run the call
        co-located or disaggregated; returns the engine that produced the output."""
        env = self.env
        if self.router_cost > 0:
            yield env.timeout(self.router_cost)
            self.coordination[call.program_id] += self.router_cost
        now = env.now
        if self.pd:
            p = self.prefill_engines[self._route_p(call, self.prefill_engines, now)]
            dec = self.decode_engines[self._route(call, self.decode_engines, now)]
        else:
            p = dec = self.engines[self._route(call, self.engines, now)]
        if p is dec:
            self.num_colocated += 1
            if self.sim.frontends is not None:
                # router cost only (P/D and fetch refuse frontend profiles): the engine's API server first
                fe = self.sim.frontends[dec.engine_id]
                call.frontend = fe
                yield from fe.intake(call)
            if not self._maybe_fetch(call, dec, env.now):
                dec.add_call(call)
        else:
            self.num_disaggregated += 1
            leg = PrefillLeg(call, dec)
            if not self._maybe_fetch(leg, p, now):
                p.add_call(leg)
        yield call.done
        return dec

    def _wrap_finish(self, on_finish):
        def finish(c: SimCall) -> None:
            if type(c) is PrefillLeg:
                self._leg_done(c)
            else:
                on_finish(c)
        return finish

    def _leg_done(self, leg: PrefillLeg) -> None:
        """The prefill engine has finished the leg (inside its step): hold the prompt's blocks for the pull."""
        p = leg.engine
        call = leg.parent
        pool = p.pool
        bs = p.block_size
        limit = (call.num_prompt_tokens - 1) // bs
        hashes = leg.full_hashes
        cached = pool.cached
        hold = []
        for k in range(min(limit, len(hashes))):
            b = cached.get(hashes[k])
            if b is None:
                break
            hold.append(b)
        now = self.env.now
        if hold:
            pool.touch(hold, now, call.program_id, call.agent_id)
        # the client-facing call inherits the prefill side's accounting
        call.num_cached_tokens = max(leg.num_cached_tokens, 0)
        call.scheduled_at = leg.scheduled_at
        call.num_computed_prompt_tokens += leg.num_computed_prompt_tokens
        call._service += leg.service_time
        call.num_preemptions += leg.num_preemptions
        call.wait_time += leg.wait_time
        call.kv_transfer_bytes += leg.kv_transfer_bytes
        call.kv_transfer_time += leg.kv_transfer_time
        _ensure_hashes(call, leg.decode_engine.block_size)
        layerwise = self.transfer_mode == "layerwise"
        n = len(hold)
        not_before = now + n * self.block_bytes / self.network.bandwidth(p.engine_id, leg.decode_engine.engine_id) \
            / self.num_layers if layerwise else None
        job = _Job("pd", call, p, n, hold, now, pipelined_from=leg.scheduled_at if layerwise else None,
                   not_before=not_before)
        leg.decode_engine.tiers.receive(job)

    # ------------------------------------------------------------------ prefix fetch
    def fetch_options(self, call: SimCall, target: Any, now: float) -> tuple[list[FetchOption], list[Any], int]:
        """The sources that hold more of ``call``'s prompt blocks than ``target``: options, their engines,
        and ``target``'s own prefix hit in blocks."""
        bs = target.block_size
        _ensure_hashes(call, bs)
        limit = (call.num_prompt_tokens - 1) // bs
        hashes = call.full_hashes
        k0 = target.pool.num_cached_prefix(hashes, limit)
        opts, srcs = [], []
        for e in self.engines:
            if e is target:
                continue
            k = e.pool.num_cached_prefix(hashes, limit)
            if k > k0:
                nbytes = (k - k0) * self.block_bytes
                opts.append(FetchOption(e.engine_id, k - k0, nbytes,
                                        self.network.estimate(e.engine_id, target.engine_id, nbytes, now),
                                        self._prefill_time(k0 * bs, (k - k0) * bs)))
                srcs.append(e)
        return opts, srcs, k0

    def _maybe_fetch(self, call: SimCall, target: Any, now: float) -> bool:
        if not self.fetch_on:
            return False
        opts, srcs, k0 = self.fetch_options(call, target, now)
        if not opts:
            return False
        self.num_fetch_decisions += 1
        i = self.fetch.choose(call, target.engine_id, opts, now)
        if i is None:
            return False
        self.num_fetches += 1
        target.tiers.receive(_Job("fetch", call, srcs[i], k0 + opts[i].num_blocks, [], now))
        return True

    # ------------------------------------------------------------------ outputs
    def link_rows(self, interval: float, until: float) -> list[tuple]:
        return self.network.utilization(interval, until)

    def stats(self) -> dict:
        net = self.network
        return {"num_disaggregated_calls": self.num_disaggregated, "num_colocated_calls": self.num_colocated,
                "num_prefix_fetches": self.num_fetches, "num_fetch_decisions": self.num_fetch_decisions,
                "kv_bytes_sent": net.bytes_sent, "kv_bytes_received": net.bytes_received,
                "kv_transfers_in_flight": len(self.inflight)}


def _ensure_hashes(call: SimCall, block_size: int) -> None:
    """``call.full_hashes`` (prompt + output blocks), as ``Engine.add_call`` computes them."""
    if not call.full_hashes:
        full = call.context.extend(Segment(call.output_seg_id, call.num_output_tokens))
        call.full_hashes = full.block_hashes(block_size)


def _prefill_time(sim: Any):
    """Seconds to prefill ``n`` tokens after ``k`` computed ones, in token-budget chunks (the profile)."""
    step_seconds = sim.profile.step_seconds
    budget = sim.limits.max_num_batched_tokens

    def prefill(k: int, n: int) -> float:
        t, done = 0.0, 0
        while done < n:
            m = min(budget, n - done)
            ctx = k + done
            t += step_seconds(m, m * ctx + m * (m + 1) // 2, 0, 0, 1, 0)
            done += m
        return t

    return prefill


def make_disagg(sim: Any) -> Disagg | None:
    """The run's :class:`Disagg`, or None when nothing moves KV and routing is free (the ordinary path)."""
    cl = sim.cfg.cluster
    if (all(r == "mixed" for r in cl.engine_roles) and cl.disagg.prefix_fetch == "off"
            and cl.router.decision_cost == 0 and cl.router.rtt == 0):
        return None
    return Disagg(sim)

"""One simulated vLLM engine: the scheduler loop, paged KV with prefix caching, step timing.

Two schedulers, chosen by ``EngineLimits.scheduler``: vLLM's V1 engine (the default since vLLM 0.8,
``vllm/v1/core/sched/scheduler.py``) and the V0 engine of vLLM <= 0.7 (``vllm/core/scheduler.py``,
simulator-only: the live driver runs vLLM 0.32, which has only V1).

Each step reads as plan -> execute -> update, like ``EngineCore.step()``:

plan, V1 (``_schedule``), after vLLM v1 ``Scheduler.schedule()``:
  1. running calls first, in order, each for its remaining tokens (a decode: 1; a partial prefill:
     the rest of the prompt, capped by the token budget). When the KV cache cannot grow, preempt by
     recompute: the order policy picks the victim (FCFS: the last running call), its blocks are
     freed and it goes back to the waiting queue; if the victim is the call itself, stop.
  2. only if nothing was preempted: admit waiting calls in the order policy's order while the
     token budget lasts and ``len(running) < max_num_seqs``; a call's prompt is looked up in the
     prefix cache (whole computed blocks, at most ``num_tokens - 1`` tokens, as vLLM recomputes
     the last one); the first call that does not fit stops admission (no skipping). Without
     chunked prefill a prompt is admitted only whole (decodes still share its step: V1 mixes
     them, it only refuses to chunk).
plan, V0 (``_schedule_v0``), after ``Scheduler._schedule_default`` (chunked prefill off):
  1. admit waiting calls in order while their whole prompt fits the token budget, ``max_num_seqs``
     and the KV cache above V0's watermark (``BlockSpaceManager.can_allocate``: all the prompt's
     blocks, cache hits not credited, ``int(0.01 * num_gpu_blocks)`` kept free);
  2. only if no prompt was admitted: every running call decodes; when the KV cache cannot grow,
     preempt by recompute the last running call not yet scheduled in this pass (V0's
     ``running_queue.pop()``), or the call itself if none is left. A step with prompts is thus
     prefill-only and every running decode stalls for it.
  With chunked prefill (``_schedule_chunked_prefill``): running calls first (decodes, then
  partial prefills, capped by the budget), then new prompts, chunked to the remaining budget, each
  allocating its whole prompt's blocks on admission. Preempted calls go to the waiting queue's
  front after the step is planned.
  Multi-step (``num_scheduler_steps = K``, ``vllm/engine/llm_engine.py`` ``step()``,
  ``vllm/worker/multi_step_model_runner.py``): a decode batch (with chunked prefill: any batch)
  runs K steps without re-scheduling, each decode reserving its K - 1 lookahead slots up front;
  tokens reach the client when the K-th step's outputs are processed
  (``vllm/engine/output_processor/multi_step.py``), so ``first_token_at`` and ``finish_at`` are
  chunk ends, a call reaching its last token mid-chunk keeps its slot to the chunk's end, and new
  prompts are admitted only between chunks. Without chunked prefill a prompt step is one step.
execute: the step time is ``Profile.step_seconds`` of the batch (prefill tokens and attention
  pairs, decode sequences and their context tokens, prefill sequences, sampled sequences).
update: computed tokens advance; newly full blocks enter the prefix cache; a call whose known
  tokens are all computed samples one token; a call with all its output tokens finishes and
  frees its blocks.

Fast-forward: when the next step is decode-only for every running call and nothing else can
join (the waiting queue is empty or blocked, no preemption), the engine computes the following
steps in a tight loop -- until the first call finishes or the KV cache would run out -- and
yields once for the whole window. An arrival during the window interrupts it: the engine finishes
the step in progress and re-plans, exactly as the step-by-step loop would (a test holds the two
modes to identical results). A multi-step chunk is one event in both modes (nothing can join it).

KV capacity: the engine is given vLLM's ``num_gpu_blocks``; the V1 pool keeps one as the null
block (:mod:`agentsim.sim.kv`), so ``num_total_blocks`` (usable) is one less and ``kv_usage`` is
used / (num_gpu_blocks - 1), as vLLM reports it.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right
from types import MappingProxyType
from typing import Any, Callable

import simpy

from agentsim.calibration.profile import Profile
from agentsim.config import EngineLimits
from agentsim.metrics import CallStatus
from agentsim.policies.base import BlockView, FreeBlockQueue
from agentsim.policies.ranking import pick_victim, rank_key, should_preempt, sort_by_rank
from agentsim.sim.kv import BlockPool, PrefixIndex, num_reserved_blocks, v0_watermark_blocks
from agentsim.sim.kv_manager import KVCacheManager
from agentsim.workload import CallHints, Context, Segment


def delay_to(now: float, t: float) -> float:
    """A delay ``d`` with ``now + d == t`` exactly in floating point (SimPy adds delays to now)."""
    d = t - now
    if d < 0:
        d = 0.0
    while now + d < t:
        d = math.nextafter(d, math.inf)
    while now + d > t and d > 0:
        d = math.nextafter(d, 0.0)
    return d



_SAMPLED, _FINISHED = 1, 2


def _advance_prefill(call: "SimCall", n: int, t1: float, bs: int, kv: Any) -> int:
    """Apply ``n`` computed prompt tokens of ``call`` in a step ending at ``t1`` (both loops share it).

    Full computed blocks enter the prefix cache through ``kv`` (None: prefix caching off). Returns 0 when
    the prompt is not complete yet, ``_SAMPLED`` when the step sampled a token (the first one stamps
    ``first_token_at``), ``_FINISHED`` when that token was the call's last (vLLM v1
    ``Scheduler.update_from_output``: a request whose computed tokens reach its prompt samples).
    """
    before = call.num_computed
    nc = before + n
    call.num_computed = nc
    ng = call.num_generated
    if ng == 0:
        call.num_computed_prompt_tokens += n  # prompt tokens computed, not taken from cache
    if kv is not None and nc // bs > before // bs:
        kv.cache_full_blocks(call, before, nc)  # full computed blocks enter the prefix cache
    if nc != call.num_prompt_tokens + ng:
        return 0
    ng += 1
    call.num_generated = ng
    if ng == 1:
        call.first_token_at = t1
    return _FINISHED if ng >= call.num_output_tokens else _SAMPLED

class SimCall:
    """A call inside the simulator; satisfies :class:`agentsim.policies.base.CallView`."""

    __slots__ = (
        "call_id", "program_id", "agent_id", "thread_id", "program_kind", "arrival_at",
        "program_arrival_at", "num_prompt_tokens", "num_output_tokens", "num_generated",
        "_service", "wait_time", "num_preemptions", "hints", "parent_call_ids", "context",
        "output_seg_id", "full_hashes", "engine", "blocks", "num_computed", "num_cached_tokens",
        "num_computed_prompt_tokens", "scheduled_at", "first_token_at", "finish_at", "enqueued_at",
        "seq", "done", "status", "num_retries", "_service_mark", "_skipped", "key",
        "kv_transfer_bytes", "kv_transfer_time", "kv_hold", "_d0", "_nc0", "_ng0", "_rseq",
    )

    def __init__(self, call_id: int, program_id: int, agent_id: int, thread_id: int, program_kind: str,
                 arrival_at: float, program_arrival_at: float, context: Context, num_output_tokens: int,
                 output_seg_id: int, hints: CallHints, parent_call_ids: tuple, done: simpy.Event | None) -> None:
        self.call_id = call_id
        self.program_id = program_id
        self.agent_id = agent_id
        self.thread_id = thread_id
        self.program_kind = program_kind
        self.arrival_at = arrival_at
        self.program_arrival_at = program_arrival_at
        self.context = context
        self.num_prompt_tokens = context.num_tokens
        self.num_output_tokens = num_output_tokens
        self.output_seg_id = output_seg_id
        self.hints = hints
        self.parent_call_ids = parent_call_ids
        self.done = done
        self.num_generated = 0
        self._service = 0.0
        self._service_mark = -1.0
        self._skipped = 0.0
        self.wait_time = 0.0
        self.num_preemptions = 0
        self.full_hashes: list[int] = []
        self.engine: Engine | None = None
        self.blocks: list[BlockView] = []
        self.num_computed = 0
        self.num_cached_tokens = -1
        self.num_computed_prompt_tokens = 0
        self.scheduled_at = math.nan
        self.first_token_at = math.nan
        self.finish_at = math.nan
        self.enqueued_at = arrival_at
        self.seq = call_id
        self.status = CallStatus.NEW
        self.num_retries = 0
        self.key = None
        # KV moved to this call's engine over the links (agentsim.sim.disagg): bytes, seconds, and
        # the loaded blocks the transfer keeps referenced until the call is admitted
        self.kv_transfer_bytes = 0
        self.kv_transfer_time = 0.0
        self.kv_hold = None
        # lazy decode progress (Engine, V1): while ``_d0 >= 0`` the call decodes one token in every
        # engine step from step ``_d0`` on, and its tokens are ``_nc0``/``_ng0`` + (steps since ``_d0``)
        self._d0 = -1
        self._nc0 = 0
        self._ng0 = 0
        self._rseq = 0  # its position in the running queue's order (V1 only appends)

    @property
    def service_time(self) -> float:
        """Engine step time spent on this call so far (steps it was scheduled in)."""
        if self._service_mark >= 0 and self.engine is not None:
            return self._service + (self.engine.busy_cum - self._service_mark) - self._skipped
        return self._service

    def prompt_block_hashes(self, block_size: int) -> list[int]:
        return self.context.block_hashes(block_size)

    @property
    def num_tokens(self) -> int:
        """Tokens known so far: prompt plus sampled output."""
        return self.num_prompt_tokens + self.num_generated

    def __repr__(self) -> str:
        return f"SimCall({self.call_id}, prog={self.program_id}, {self.status})"


def _rseq_of(call: SimCall) -> int:
    return call._rseq


class Engine:
    """A vLLM engine on ``tp`` GPUs of one node; satisfies :class:`EngineView`."""

    def __init__(self, env: simpy.Environment, engine_id: int, node_id: int, profile: Profile,
                 limits: EngineLimits, order, free_queue: FreeBlockQueue, num_blocks: int,
                 on_finish: Callable[[SimCall], None],
                 fast_forward: bool = True, sample_interval: float = 1.0, max_ff_steps: int = 1_000_000,
                 record_sample: Callable[[tuple], None] | None = None, on_step: Callable | None = None) -> None:
        self.env = env
        self.engine_id = engine_id
        self.node_id = node_id
        self.profile = profile
        self.max_model_len = limits.max_model_len or profile.model.max_model_len
        limits = limits.resolved(self.max_model_len)  # the version's default token budget
        self.limits = limits
        self.block_size = limits.block_size
        self.scheduler = limits.scheduler
        self._v0 = limits.scheduler == "v0"
        self.num_scheduler_steps = limits.num_scheduler_steps
        # V0 admits a prompt only while this many blocks stay free (BlockSpaceManager.can_allocate)
        self.watermark_blocks = v0_watermark_blocks(num_blocks) if self._v0 else 0
        self.order = order
        # declared by every order policy (agentsim.policies.base.OrderPolicy, checked when its bundle is built)
        self._dynamic = bool(order.dynamic)
        self._preemptive = bool(order.preemptive)
        # KV mechanisms of retention/eviction policies (agentsim.sim.tiers.EngineTiers), if any
        self.tiers = None
        self.pool = BlockPool(num_blocks, free_queue, num_reserved=num_reserved_blocks(limits.scheduler))
        self.num_gpu_blocks = num_blocks
        self.num_total_blocks = self.pool.num_blocks  # usable by requests (V1: without the null block)
        self.prefix_caching = limits.enable_prefix_caching
        # the scheduler asks the KV cache manager (vLLM v1's layering: manager -> pool -> free queue)
        self.kv = KVCacheManager(self.pool, self.block_size, self.prefix_caching)
        self.running: list[SimCall] = []
        self.waiting: list = []          # heap of (rank_key, call), or plain list if dynamic
        self.inbox: list[SimCall] = []   # arrived, not yet seen by the scheduler
        self.on_finish = on_finish
        self.on_step = on_step
        self.fast_forward = fast_forward
        self.max_ff_steps = max_ff_steps
        self._ff_active = False
        self._pending = None
        self._pending_chunk = None
        self._wake: simpy.Event | None = None
        self._step_seconds = profile.step_seconds
        # O(1) decode steps (V1): running decodes progress lazily (SimCall._d0), the batch's decode
        # features are running sums, and per-call work happens only at events from two calendars
        # keyed by engine step: a call fills a KV block (cache it; it needs a new block next step)
        # and a call samples its last token. See _running_fast / _apply_fast.
        self._lazy_on = not self._v0 and self.num_scheduler_steps == 1
        self._D = 0                       # engine steps applied so far (the step being planned)
        self._nlazy = 0                   # running calls decoding lazily
        self._S = 0                       # sum over them of (_nc0 - _d0): decode context = S + nlazy * (D + 1)
        self._fill: dict[int, list] = {}  # step -> lazy calls whose KV block fills at its end
        self._fin: dict[int, list] = {}   # step -> lazy calls that sample their last token in it
        self._fin_heap: list[int] = []    # the keys of _fin (earliest first)
        self._due: list[SimCall] = []     # lazy calls that need a new block in the next step
        self._nonlazy: list[SimCall] = [] # running calls not decoding lazily (prefills), running order
        self._num_admitted = 0            # next SimCall._rseq
        self.num_outstanding_tokens = 0
        # calls in the engine: len(running) + len(waiting) + len(inbox) whenever a policy reads it
        # (+1 on joining the inbox, -1 when finished; a preempted call goes back to waiting)
        self.num_calls = 0
        # accounting
        self.busy_cum = 0.0
        self.num_steps = 0
        self.num_ff_windows = 0
        self.num_preemptions = 0
        self.sample_interval = sample_interval
        self._record_sample = record_sample
        self._next_sample_at = sample_interval
        self._bucket_busy = 0.0
        self._bucket_prefill = 0
        self._bucket_decode = 0
        self._last_t = 0.0
        self.proc = env.process(self._loop())

    # ------------------------------------------------------------------ EngineView
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.inbox)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_used

    @property
    def kv_usage(self) -> float:
        return self.pool.num_used / self.pool.num_blocks

    def num_cached_prefix_blocks(self, block_hashes) -> int:
        return self.pool.num_cached_prefix(block_hashes, len(block_hashes))

    # ------------------------------------------------------------------ arrivals
    def add_call(self, call: SimCall) -> None:
        """Queue a call; it joins at the next step boundary after ``now`` (or wakes an idle engine)."""
        call.engine = self
        call.status = CallStatus.WAITING
        call.enqueued_at = self.env.now
        if not call.full_hashes:
            full = call.context.extend(Segment(call.output_seg_id, call.num_output_tokens))
            call.full_hashes = full.block_hashes(self.block_size)
        if self.tiers is not None and self.tiers.intercept(call):
            return  # its KV is loading from the CPU tier; the tier adds it back when loaded
        self.num_outstanding_tokens += call.num_prompt_tokens + call.num_output_tokens
        self.join_inbox(call)
        self.notify()

    def join_inbox(self, call: SimCall) -> None:
        """``call`` joins the inbox (the scheduler sees it at the next boundary); every way into the
        engine goes through here, so ``num_calls`` counts it."""
        self.inbox.append(call)
        self.num_calls += 1

    def notify(self) -> None:
        """Something outside the batch changed (an arrival, a KV block unpinned or loaded ...):
        wake an idle engine, or end a fast-forward window after the step in progress."""
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()
        elif self._ff_active:
            self._ff_active = False
            self.proc.interrupt()

    def _drain_inbox(self, now: float, at_boundary: bool) -> None:
        # At a step boundary, calls that arrived at exactly this instant are seen at the next
        # one: in step-by-step mode the engine plans before same-instant arrivals run.
        if not self.inbox:
            return
        keep = []
        for call in self.inbox:
            if at_boundary and call.enqueued_at >= now:
                keep.append(call)
            else:
                self._enqueue(call, now, front=False)
        self.inbox = keep

    def _enqueue(self, call: SimCall, now: float, front: bool) -> None:
        call.enqueued_at = now if front else call.enqueued_at
        if self._dynamic:
            self.waiting.append(call)
            return
        heapq.heappush(self.waiting, (rank_key(self.order, call, now), call))

    # ------------------------------------------------------------------ the loop
    def _loop(self):
        env = self.env
        at_boundary = False
        while True:
            now = env.now
            if self.tiers is not None:
                self.tiers.pre_schedule(now)  # pins, transfers, prefetch: only at step boundaries
            self._drain_inbox(now, at_boundary)
            if not self.running and not self.waiting:
                if self.inbox:
                    # only same-instant arrivals: they join one step later, like step mode
                    at_boundary = False
                    yield env.timeout(0)
                    continue
                self._wake = env.event()
                yield self._wake
                self._wake = None
                self._account_idle(now, env.now)
                at_boundary = False
                continue
            if self._v0:
                decodes, prefills, preempted, feats = self._schedule_v0(now)
            else:
                decodes, prefills, preempted, feats = self._schedule(now)
            if (not decodes if decodes is not None else not self._nlazy) and not prefills:
                if preempted:
                    continue  # a preemption emptied the batch but made room: plan again now
                # Nothing fits although the engine is empty: impossible calls were rejected on
                # routing, so this only happens transiently; wait for the next arrival.
                self._wake = env.event()
                yield self._wake
                self._wake = None
                self._account_idle(now, env.now)
                at_boundary = False
                continue
            n_prefill, pairs, n_decode, dctx, n_sampled = feats
            dt = self._step_seconds(n_prefill, pairs, n_decode, dctx, len(prefills), n_sampled)
            if self.num_scheduler_steps > 1 and (not prefills or self.limits.enable_chunked_prefill):
                yield from self._multi_step(decodes, prefills, now, dt, n_prefill)
            elif decodes is None:
                # planned by _running_fast: O(events) update, or a window to the next event
                if (self.fast_forward and not prefills and not self.inbox
                        and (not self.waiting or not self._dynamic)):
                    yield from self._fast_forward_lazy(now, dt)
                else:
                    yield env.timeout(delay_to(now, now + dt))
                    self._apply_fast(prefills, now, env.now, dt, n_prefill, n_decode)
            elif (self.fast_forward and not preempted and n_prefill == 0 and not self.inbox and not self._lazy_on
                    and len(decodes) == len(self.running) and (not self.waiting or not self._dynamic)):
                yield from self._fast_forward(decodes, now, dt)
            else:
                yield env.timeout(delay_to(now, now + dt))
                self._apply(decodes, prefills, now, env.now, dt, n_prefill, n_decode)
                if self._lazy_on:
                    self._D += 1
                    self._relazify_all()
            at_boundary = True

    def use_reference_loop(self) -> None:
        """Plan and apply every step call by call, with no lazy decodes and no fast-forward: the
        plain step-by-step loop the optimized engine must match exactly (tests compare the two).
        Call it before the run starts."""
        self._lazy_on = False
        self.fast_forward = False

    # ------------------------------------------------------------------ lazy decodes (V1)
    def _lazify(self, call: SimCall, d0: int) -> None:
        """From step ``d0`` on, ``call`` (whose known tokens are all computed but the last sampled
        one) decodes one token a step without being touched: its calendar entries are the step
        that fills its current KV block and the step that samples its last token."""
        nc = call.num_computed
        ng = call.num_generated
        call._d0 = d0
        call._nc0 = nc
        call._ng0 = ng
        self._nlazy += 1
        self._S += nc - d0
        bs = self.block_size
        fin = d0 + call.num_output_tokens - ng - 1
        lst = self._fin.get(fin)
        if lst is None:
            self._fin[fin] = [call]
            heapq.heappush(self._fin_heap, fin)
        else:
            lst.append(call)
        fill = d0 + (nc // bs + 1) * bs - nc - 1
        if fill <= fin:
            lst = self._fill.get(fill)
            if lst is None:
                self._fill[fill] = [call]
            else:
                lst.append(call)
        if len(call.blocks) * bs == nc:
            self._due.append(call)  # its next token starts a block: allocated in step d0's plan

    def _unlazy(self, call: SimCall) -> None:
        """Write ``call``'s lazy progress (as of the start of step ``self._D``) into its fields."""
        k = self._D - call._d0
        call.num_computed = call._nc0 + k
        call.num_generated = call._ng0 + k
        self._nlazy -= 1
        self._S -= call._nc0 - call._d0
        call._d0 = -1

    def _unlazy_all(self) -> None:
        """Materialize every lazy call and empty the calendars (before a step planned call by call)."""
        if self._nlazy:
            D = self._D
            for c in self.running:
                d0 = c._d0
                if d0 >= 0:
                    k = D - d0
                    c.num_computed = c._nc0 + k
                    c.num_generated = c._ng0 + k
                    c._d0 = -1
            self._nlazy = 0
            self._S = 0
            self._fill.clear()
            self._fin.clear()
            self._fin_heap.clear()
            self._due.clear()
        self._nonlazy = list(self.running)

    def _relazify_all(self) -> None:
        """After a step planned call by call: every running decode goes back to lazy progress."""
        D = self._D
        nonlazy = []
        for c in self.running:
            if c._d0 < 0:
                ng = c.num_generated
                if ng > 0 and c.num_computed == c.num_prompt_tokens + ng - 1:
                    self._lazify(c, D)
                else:
                    nonlazy.append(c)
        self._nonlazy = nonlazy

    def _sync_views(self) -> None:
        """Write every lazy call's current progress into its fields (for readers outside the
        engine: ``on_step`` callbacks, the end of a run); the calls stay lazy."""
        if self._nlazy:
            D = self._D
            for c in self.running:
                d0 = c._d0
                if d0 >= 0:
                    c.num_computed = c._nc0 + D - d0
                    c.num_generated = c._ng0 + D - d0

    def _explicit_decodes(self) -> list:
        """The lazy calls as this step's decode list (running order), materialized: the rest of
        the step is planned and applied call by call."""
        decodes = [c for c in self.running if c._d0 >= 0]
        self._unlazy_all()
        return decodes

    def _running_fast(self, now: float):
        """V1's running pass (``_schedule`` step 1) in O(events) when it cannot cut or preempt: every
        running call fits the token budget whole and the KV cache can grow for all of them. Then
        every lazy call decodes one token, the calls whose block filled last step (``_due``) get one
        new block, and the partial prefills (``_nonlazy``) get the rest of their prompt -- blocks
        handed out in running order, as the call-by-call pass does. Returns None when the plain
        pass is needed, else (prefills, budget left, prefill tokens, attention pairs, sampled)."""
        bs = self.block_size
        pool = self.pool
        budget = self.limits.max_num_batched_tokens
        due = self._due
        total = self._nlazy
        need_total = len(due)
        plan = []
        for c in self._nonlazy:
            nc = c.num_computed
            ng = c.num_generated
            n = c.num_prompt_tokens + ng - nc
            if n == 1 and ng > 0:
                return None  # a decode that is not lazy: plan this step call by call
            need = (nc + n + bs - 1) // bs - len(c.blocks)
            total += n
            if need > 0:
                need_total += need
            plan.append((c, n, need))
        if total > budget or need_total > pool.num_blocks - pool.num_used:
            return None
        allocate = pool.allocate
        if due:
            if plan:
                order = [(c._rseq, c, 1) for c in due] + [(c._rseq, c, need) for c, _, need in plan]
                order.sort(key=lambda x: x[0])
                for _, c, need in order:
                    if need > 0:
                        c.blocks.extend(allocate(need, now, c.program_id, c.agent_id, len(c.blocks)))
            else:
                if len(due) > 1:
                    due.sort(key=_rseq_of)
                self.kv.allocate_decode_blocks(due, now)
            self._due = []
        elif plan:
            for c, _, need in plan:
                if need > 0:
                    c.blocks.extend(allocate(need, now, c.program_id, c.agent_id, len(c.blocks)))
        prefills = []
        n_prefill = pairs = 0
        for c, n, _ in plan:
            nc = c.num_computed
            n_prefill += n
            pairs += n * nc + n * (n + 1) // 2
            prefills.append((c, n))
        return prefills, budget - total, n_prefill, pairs, len(plan)

    def _apply_fast(self, prefills: list, t0: float, t1: float, dt: float, n_prefill: int, n_decode: int) -> None:
        """:meth:`_apply` for a step planned by :meth:`_running_fast`: the lazy decodes advance by
        the step counter alone; only this step's calendar entries and the prefills are touched."""
        self.busy_cum += dt
        self.num_steps += 1
        D = self._D
        self._D = D1 = D + 1
        bs = self.block_size
        fin = self._fin.pop(D, None)
        if fin is not None:
            heapq.heappop(self._fin_heap)
        fills = self._fill.pop(D, None)
        if fills is not None:
            self._fills_done(fills, D)
        finished = []
        if fin is not None:
            if len(fin) > 1:
                fin.sort(key=_rseq_of)
            finished = fin
        if prefills:
            caching = self.prefix_caching
            kv = self.kv
            more = []
            for call, n in prefills:
                sampled = _advance_prefill(call, n, t1, bs, kv if caching else None)
                if sampled == _FINISHED:
                    more.append(call)
                elif sampled:
                    self._lazify(call, D1)
            if more:
                finished = finished + more if finished else more
            self._nonlazy = [c for c in self._nonlazy if c._d0 < 0 and c not in more]
        self._account_step(t0, t1, n_prefill, n_decode)
        for call in finished:
            self._finish(call, t1)
        if self.on_step is not None:
            self._sync_views()
            self.on_step(self)

    def _fills_done(self, fills: list, D: int) -> None:
        """Step ``D`` filled a KV block of each of ``fills``: cache it under its hash (a duplicate
        stays uncached, as in vLLM), and the call needs a new block next step unless it finished."""
        bs = self.block_size
        if len(fills) > 1:
            fills.sort(key=_rseq_of)
        caching = self.prefix_caching
        cached = self.pool.cached
        due = self._due
        fill_cal = self._fill
        D1 = D + 1
        for c in fills:
            d0 = c._d0
            if caching:
                k = (c._nc0 + D1 - d0) // bs - 1
                hashes = c.full_hashes
                if k < len(hashes):
                    b = c.blocks[k]
                    h = hashes[k]
                    if b.block_hash is None and h not in cached:
                        b.block_hash = h
                        cached[h] = b
            last = d0 + c.num_output_tokens - c._ng0 - 1  # the step sampling its last token
            if D < last:
                due.append(c)
                nxt = D + bs
                if nxt <= last:
                    lst = fill_cal.get(nxt)
                    if lst is None:
                        fill_cal[nxt] = [c]
                    else:
                        lst.append(c)

    def _wait_window(self, now: float, times: list):
        """Wait out a fast-forward window whose steps end at ``times``; an interrupt (a new arrival)
        cuts it after the step in progress. Returns how many steps ran (both engine loops)."""
        env = self.env
        try:
            yield env.timeout(delay_to(now, times[-1]))
        except simpy.Interrupt:
            m = bisect_right(times, env.now)
            if m < len(times):
                yield env.timeout(delay_to(env.now, times[m]))
                m += 1
            return m
        return len(times)

    def _window_steps(self, now: float, dt1: float, k: int, free: int, ctx: int, nb: int, cnt: list,
                      offset: int) -> tuple[list, list, list]:
        """The decode-only steps of a fast-forward window after its first (ending ``now + dt1``), up to
        step ``k``: step ``j`` needs ``cnt[(j + offset) % block_size]`` new blocks and the window stops
        at the first step they do not fit ``free``; each step adds ``nb`` context tokens to ``ctx``
        (both engine loops share this). Returns ``(end times, step durations, new blocks per step)``."""
        bs = self.block_size
        step_seconds = self._step_seconds
        t = now + dt1
        times = [t]
        dts = [dt1]
        needs = [0]
        for j in range(2, k + 1):
            need = cnt[(j + offset) % bs]
            if need > free:
                break
            free -= need
            ctx += nb
            dt = step_seconds(0, 0, nb, ctx, 0, nb)
            t = t + dt
            times.append(t)
            dts.append(dt)
            needs.append(need)
        return times, dts, needs

    def _fast_forward_lazy(self, now: float, dt1: float):
        """:meth:`_fast_forward` over the lazy decodes: the window ends at the first step in which a
        call samples its last token (the earliest key of the finish calendar) or whose new blocks
        do not fit; a step's new blocks are the previous step's block fills."""
        env = self.env
        D = self._D
        nb = self._nlazy
        k = self._fin_heap[0] - D + 1
        if k > self.max_ff_steps:
            k = self.max_ff_steps
        ctx = self._S + nb * (D + 1)
        free = self.pool.num_blocks - self.pool.num_used
        # each lazy call's next block fill is in steps D .. D + bs - 1 and then every bs steps (no
        # call finishes before the window's last step): new blocks of window step j (engine step
        # D + j - 1) are the fills of step D + j - 2
        bs = self.block_size
        fill = self._fill
        cnt = []
        for r in range(bs):
            f = fill.get(D + r)
            cnt.append(len(f) if f is not None else 0)
        times, dts, needs = self._window_steps(now, dt1, k, free, ctx, nb, cnt, -2)
        if len(times) > 1:
            self.num_ff_windows += 1
        self._ff_active = True
        self._pending = (None, now, times, dts, needs)
        m = yield from self._wait_window(now, times)
        self._ff_active = False
        self._pending = None
        self._apply_window_lazy(now, times, dts, needs, m)

    def _apply_window_lazy(self, t0: float, times: list, dts: list, needs: list, m: int) -> None:
        """Apply the first ``m`` steps of a lazy fast-forward window: per step its accounting, the
        blocks its plan hands out and the block fills at its end (as step by step)."""
        pool = self.pool
        nb = self._nlazy
        prev = t0
        used = pool.num_used
        for j in range(m):
            self.busy_cum += dts[j]
            self.num_steps += 1
            used += needs[j]
            self._account_step(prev, times[j], 0, nb, used)
            prev = times[j]
        D = self._D
        allocate_decode_blocks = self.kv.allocate_decode_blocks
        fill = self._fill
        for j in range(m):
            if j:
                due = self._due
                if due:
                    if len(due) > 1:
                        due.sort(key=_rseq_of)
                    allocate_decode_blocks(due, times[j - 1])
                    self._due = []
            f = fill.pop(D + j, None)
            if f is not None:
                self._fills_done(f, D + j)
        last = D + m - 1
        self._D = D + m
        t_end = times[m - 1]
        fin = self._fin.pop(last, None)
        if fin is not None:
            heapq.heappop(self._fin_heap)
            if len(fin) > 1:
                fin.sort(key=_rseq_of)
            for call in fin:
                self._finish(call, t_end)
        if self.on_step is not None:
            self._sync_views()
            self.on_step(self)

    # ------------------------------------------------------------------ plan
    def _schedule(self, now: float) -> tuple[list, bool, tuple]:
        """vLLM v1 scheduling for one step.

        Returns the decoding calls (one token each), the prefilling ones as [(call, num_new_tokens)]
        (both in scheduling order), whether it preempted, and the batch features (prefill tokens,
        prefill attention pairs, decode sequences, decode context tokens, sequences sampling a token).
        """
        budget = self.limits.max_num_batched_tokens
        chunked = self.limits.enable_chunked_prefill
        bs = self.block_size
        pool = self.pool
        running = self.running
        decodes: list = []
        prefills: list = []
        preempted = False
        free = pool.num_blocks - pool.num_used
        n_prefill = pairs = n_decode = dctx = n_sampled = 0
        i = 0
        fast = self._running_fast(now) if self._lazy_on else None
        if fast is not None:
            # every running call gets its tokens and its blocks: no call-by-call pass (decodes None:
            # they are the lazy calls)
            decodes = None
            prefills, budget, n_prefill, pairs, n_sampled = fast
            n_decode = self._nlazy
            dctx = self._S + n_decode * (self._D + 1)
            i = len(running)
        elif self._lazy_on:
            self._unlazy_all()
        while i < len(running) and budget > 0:
            call = running[i]
            nc = call.num_computed
            n = call.num_prompt_tokens + call.num_generated - nc
            is_decode = n == 1 and call.num_generated > 0
            if is_decode:
                n_decode += 1
                dctx += nc + 1
            else:
                if n > budget:
                    n = budget
                else:
                    n_sampled += 1  # the prompt completes: it samples its next token
                n_prefill += n
                pairs += n * nc + n * (n + 1) // 2
            need = (nc + n + bs - 1) // bs - len(call.blocks)
            if need > free and self.tiers is not None and self.tiers.reclaim(call, need - free, now):
                free = pool.num_blocks - pool.num_used  # pinned KV released before preempting
            if need > free:
                # KV cache full: preempt by recompute until the call fits (vLLM v1)
                self_preempted = False
                while need > pool.num_blocks - pool.num_used:
                    victim = self._pick_victim(now)
                    if victim in decodes:
                        decodes.remove(victim)
                        budget += 1
                    else:
                        for j, (c2, n2) in enumerate(prefills):
                            if c2 is victim:
                                budget += n2
                                del prefills[j]
                                break
                    vi = running.index(victim)
                    self._preempt(victim, now)
                    preempted = True
                    if victim is call:
                        self_preempted = True
                        break
                    if vi < i:
                        i -= 1
                if self_preempted:
                    break  # as vLLM: the call could not be scheduled, stop the running pass
                free = pool.num_blocks - pool.num_used
            if need > 0:
                call.blocks.extend(pool.allocate(need, now, call.program_id, call.agent_id, len(call.blocks)))
                free -= need
            if is_decode:
                decodes.append(call)
            else:
                prefills.append((call, n))
            budget -= n
            i += 1
        if preempted:
            return decodes, prefills, True, self._features(decodes, prefills)
        max_seqs = self.limits.max_num_seqs
        if self._dynamic and self.waiting:
            sort_by_rank(self.order, self.waiting, now)
        while self.waiting and budget > 0:
            if len(running) >= max_seqs:
                if self._preemptive and decodes is None:
                    decodes = self._explicit_decodes()
                if self._preemptive and self._try_preempt_for_head(now, decodes, prefills):
                    preempted = True
                break
            call = self.waiting[0] if self._dynamic else self.waiting[0][1]
            if call.num_computed == 0 and not call.blocks:
                hit_blocks = self._lookup(call)
            else:
                hit_blocks = []
            num_hit_tokens = len(hit_blocks) * bs
            total = call.num_prompt_tokens + call.num_generated
            n = total - num_hit_tokens
            if not chunked and n > budget:
                break
            sampled = n <= budget
            if n > budget:
                n = budget
            if self.kv.allocate_slots(call, n, now, hit_blocks) is None:
                # the KV cache cannot hold it (free hits count as taken)
                need = -(-(num_hit_tokens + n) // bs) - len(hit_blocks)
                evictable = sum(1 for b in hit_blocks if b.ref_count == 0)
                if self.tiers is not None and self.tiers.reclaim(
                        call, need + evictable - (pool.num_blocks - pool.num_used), now):
                    continue  # pinned KV released (Continuum's deadlock guard): look at the head again
                if self._preemptive and decodes is None:
                    decodes = self._explicit_decodes()
                if self._preemptive and self._try_preempt_for_head(now, decodes, prefills):
                    preempted = True
                break
            self._admit(call, num_hit_tokens, n, now, prefills)
            budget -= n
            n_prefill += n
            n_sampled += sampled
            pairs += n * num_hit_tokens + n * (n + 1) // 2
        if preempted:
            return decodes, prefills, True, self._features(decodes, prefills)
        return decodes, prefills, False, (n_prefill, pairs, n_decode, dctx, n_decode + n_sampled)

    # ------------------------------------------------------------------ plan (V0)
    def _schedule_v0(self, now: float) -> tuple[list, list, bool, tuple]:
        """vLLM V0 scheduling for one step (simulator-only); returns what :meth:`_schedule` returns.

        Without chunked prefill, ``Scheduler._schedule_default`` (``vllm/core/scheduler.py``):
        prompts first, decodes only if no prompt was admitted. With it,
        ``_schedule_chunked_prefill``: running calls (decodes first), then new prompts. See the
        module docstring for the rules; block counts follow ``vllm/core/block_manager.py``. The
        order policy ranks the waiting queue and may pick preemption victims among the calls not
        yet scheduled; strict-priority preemption of running calls (``preemptive`` orders) is
        V1-only here (V0's default FCFS policy has none).
        """
        chunked = self.limits.enable_chunked_prefill
        decodes: list = []
        prefills: list = []
        preempted: list = []
        budget = self.limits.max_num_batched_tokens
        if chunked:
            budget = self._v0_running(now, decodes, prefills, preempted, budget, True)
            num_running_prefills = len(prefills)
            self._v0_admit(now, prefills, budget, True)  # even after a preemption, as V0 does
            # V0 rebuilds its running queue: calls left out, decodes, running prefills (those
            # finishing this step first), new prompts; the next step serves it in this order
            scheduled = {id(c) for c in decodes}
            scheduled.update(id(c) for c, _ in prefills)
            rest = [c for c in self.running if id(c) not in scheduled]
            part = sorted(prefills[:num_running_prefills],
                          key=lambda cn: cn[0].num_computed + cn[1] < cn[0].num_prompt_tokens + cn[0].num_generated)
            self.running[:] = (rest + decodes + [c for c, _ in part]
                               + [c for c, _ in prefills[num_running_prefills:]])
        else:
            self._v0_admit(now, prefills, budget, False)
            if not prefills:
                self._v0_running(now, decodes, prefills, preempted, budget, False)
        # preempted calls join the waiting queue's front only now (after this step's admission)
        for call in preempted:
            self._enqueue(call, now, front=True)
        return decodes, prefills, bool(preempted), self._features(decodes, prefills)

    def _v0_running(self, now: float, decodes: list, prefills: list, preempted: list, budget: int,
                    chunked: bool) -> int:
        """V0 ``_schedule_running``: each running call in order gets its tokens (a decode: one,
        plus ``num_scheduler_steps - 1`` lookahead slots reserved); returns the budget left."""
        bs = self.block_size
        pool = self.pool
        running = self.running
        lookahead = self.num_scheduler_steps - 1
        i = 0
        while i < len(running):
            call = running[i]
            nc = call.num_computed
            total = call.num_prompt_tokens + call.num_generated
            n = total - nc
            is_decode = n == 1 and call.num_generated > 0
            if chunked:
                if not is_decode and n > budget:
                    if lookahead:
                        n = 0  # multi-step with chunked prefill does not chunk prompts
                    else:
                        n = budget
                if n == 0 or budget == 0:
                    break  # no budget left: stop (V0: num_running_tokens == 0)
            # V0 allocated a prompt's blocks on admission: only decodes grow
            need = (-(-(nc + 1 + lookahead) // bs) - len(call.blocks)) if is_decode else 0
            free = pool.num_blocks - pool.num_used
            if need > free and self.tiers is not None and self.tiers.reclaim(call, need - free, now):
                free = pool.num_blocks - pool.num_used
            stop = False
            while need > pool.num_blocks - pool.num_used:
                # preempt the last running call not yet scheduled in this pass, else the call itself
                later = running[i + 1:]
                if later:
                    victim = later[-1]  # V0: the running queue's last (its own order, not the policy's rank)
                else:
                    victim = call
                self._preempt(victim, now, enqueue=False)
                preempted.append(victim)
                if victim is call:
                    stop = True
                    break
            if stop:
                break
            if need > 0:
                call.blocks.extend(pool.allocate(need, now, call.program_id, call.agent_id, len(call.blocks)))
            if is_decode:
                decodes.append(call)
            else:
                prefills.append((call, n))
            budget -= n
            i += 1
        return budget

    def _v0_admit(self, now: float, prefills: list, budget: int, chunked: bool) -> None:
        """V0 ``_schedule_prefills``: admit waiting calls in order while the token budget,
        ``max_num_seqs`` and the KV watermark allow; the first that does not fit stops admission."""
        bs = self.block_size
        pool = self.pool
        running = self.running
        max_seqs = self.limits.max_num_seqs
        k = self.num_scheduler_steps
        # with chunked prefill a multi-step prompt reserves K lookahead slots (V0's
        # _get_num_lookahead_slots(is_prefill=True, enable_chunking=True))
        lookahead = k if (chunked and k > 1) else 0
        if self._dynamic and self.waiting:
            sort_by_rank(self.order, self.waiting, now)
        while self.waiting and budget > 0:
            if len(running) >= max_seqs:
                break
            call = self.waiting[0] if self._dynamic else self.waiting[0][1]
            hit_blocks = self._lookup(call) if call.num_computed == 0 and not call.blocks else []
            num_hit_tokens = len(hit_blocks) * bs
            total = call.num_prompt_tokens + call.num_generated
            n = total - num_hit_tokens
            if n > budget:
                if not chunked or lookahead:
                    break
                n = budget
            # can_allocate: every block of the prompt (+ lookahead), hits not credited, watermark kept
            required = -(-(total + lookahead) // bs)
            free = pool.num_blocks - pool.num_used
            if free - required < self.watermark_blocks:
                short = required + self.watermark_blocks - free
                if self.tiers is not None and self.tiers.reclaim(call, short, now):
                    continue  # pinned KV released: look at the head again
                break
            # can_allocate passed, so the manager has the blocks: every block of the prompt (+ lookahead)
            self.kv.allocate_slots(call, total + lookahead - num_hit_tokens, now, hit_blocks)
            self._admit(call, num_hit_tokens, n, now, prefills)
            budget -= n

    def _admit(self, call: SimCall, num_hit_tokens: int, n: int, now: float, prefills: list) -> None:
        """Move the waiting queue's head into the running batch (V0 and V1 alike) once
        :meth:`KVCacheManager.allocate_slots` gave it its blocks (its ``num_hit_tokens`` prefix hits
        and new ones), and schedule ``n`` of its tokens this step."""
        if self._dynamic:
            self.waiting.pop(0)
        else:
            heapq.heappop(self.waiting)
        call.num_computed = num_hit_tokens
        if call.num_cached_tokens < 0:
            call.num_cached_tokens = num_hit_tokens
            call.scheduled_at = now
        call.wait_time += now - call.enqueued_at
        call.status = CallStatus.RUNNING
        call._service_mark = self.busy_cum
        self.running.append(call)
        self._num_admitted += 1
        call._rseq = self._num_admitted
        if self._lazy_on:
            self._nonlazy.append(call)
        prefills.append((call, n))

    def _lookup(self, call: SimCall) -> list[BlockView]:
        # whole blocks only, and never the last known token (vLLM recomputes it for logits)
        return self.kv.get_computed_blocks(call)

    def _pick_victim(self, now: float) -> SimCall:
        return pick_victim(self.order, self.running, now)

    def _try_preempt_for_head(self, now: float, decodes: list, prefills: list) -> bool:
        """Strict priority: preempt the worst running call if the waiting head ranks better
        (and take it out of this step's batch)."""
        if not self.running:
            return False
        head = self.waiting[0] if self._dynamic else self.waiting[0][1]
        victim = self._pick_victim(now)
        if should_preempt(self.order, head, victim, now):
            if victim in decodes:
                decodes.remove(victim)
            else:
                prefills[:] = [(c, n) for c, n in prefills if c is not victim]
            self._preempt(victim, now)
            return True
        return False

    def _preempt(self, call: SimCall, now: float, enqueue: bool = True) -> None:
        """Preempt by recompute: free the call's blocks and send it back to the waiting queue's
        front (``enqueue=False``: the caller queues it later, as V0 does after planning)."""
        self.running.remove(call)
        self.kv.free(call, now)
        call.num_computed = 0
        call._service += (self.busy_cum - call._service_mark) - call._skipped
        call._service_mark = -1.0
        call._skipped = 0.0
        call.num_preemptions += 1
        self.num_preemptions += 1
        call.status = CallStatus.PREEMPTED
        if enqueue:
            self._enqueue(call, now, front=True)

    # ------------------------------------------------------------------ execute
    def _features(self, decodes: list, prefills: list) -> tuple[int, int, int, int, int]:
        """Batch features from scratch: prefill tokens, prefill attention pairs, decode sequences,
        decode context tokens, sequences that sample a token (decodes + prompts completed)."""
        n_prefill = 0
        pairs = 0
        dctx = 0
        n_sampled = len(decodes)
        for call in decodes:
            dctx += call.num_computed + 1
        for call, n in prefills:
            k = call.num_computed
            n_prefill += n
            pairs += n * k + n * (n + 1) // 2
            if k + n == call.num_prompt_tokens + call.num_generated:
                n_sampled += 1
        return n_prefill, pairs, len(decodes), dctx, n_sampled

    # ------------------------------------------------------------------ update
    def _apply(self, decodes: list, prefills: list, t0: float, t1: float, dt: float,
               n_prefill: int, n_decode: int) -> None:
        self.busy_cum += dt
        self.num_steps += 1
        if len(decodes) + len(prefills) != len(self.running):
            # budget ran out in the running pass: the calls left out get no service this step
            in_batch = {id(c) for c in decodes}
            in_batch.update(id(c) for c, _ in prefills)
            for c in self.running:
                if id(c) not in in_batch:
                    c._skipped += dt
        bs = self.block_size
        caching = self.prefix_caching
        cached = self.pool.cached
        kv = self.kv
        finished = []
        for call in decodes:
            # one token: computed into KV, and one new token sampled
            nc = call.num_computed + 1
            call.num_computed = nc
            ng = call.num_generated + 1
            call.num_generated = ng
            if caching and nc % bs == 0:
                k = nc // bs - 1
                if k < len(call.full_hashes):
                    b = call.blocks[k]
                    h = call.full_hashes[k]
                    if b.block_hash is None and h not in cached:
                        b.block_hash = h
                        cached[h] = b
            if ng >= call.num_output_tokens:
                finished.append(call)
        for call, n in prefills:
            if _advance_prefill(call, n, t1, bs, kv if caching else None) == _FINISHED:
                finished.append(call)
        self._account_step(t0, t1, n_prefill, n_decode)
        for call in finished:
            self._finish(call, t1)
        if self.on_step is not None:
            self.on_step(self)

    def _finish(self, call: SimCall, now: float) -> None:
        if call._d0 >= 0:
            self._unlazy(call)
        self.running.remove(call)
        self.num_calls -= 1
        self.kv.free(call, now)
        call._service += (self.busy_cum - call._service_mark) - call._skipped
        call._service_mark = -1.0
        call.finish_at = now
        call.status = CallStatus.FINISHED
        self.num_outstanding_tokens -= call.num_prompt_tokens + call.num_output_tokens
        self.on_finish(call)

    # ------------------------------------------------------------------ fast-forward
    def _fast_forward(self, calls: list, now: float, dt1: float):
        """Run decode-only steps as one event; see the module docstring."""
        env = self.env
        bs = self.block_size
        nb = len(calls)
        k = min(c.num_output_tokens - c.num_generated for c in calls)
        k = min(k, self.max_ff_steps)
        cnt = [0] * bs
        ctx = 0
        for c in calls:
            cnt[(1 - c.num_computed) % bs] += 1
            ctx += c.num_computed + 1
        free = self.pool.num_blocks - self.pool.num_used
        times, dts, needs = self._window_steps(now, dt1, k, free, ctx, nb, cnt, 0)
        m = len(times)
        if m > 1:
            self.num_ff_windows += 1
        self._ff_active = True
        self._pending = (calls, now, times, dts, needs)
        m = yield from self._wait_window(now, times)
        self._ff_active = False
        self._pending = None
        self._apply_window(calls, now, times, dts, needs, m)

    def _apply_window(self, calls: list, t0: float, times: list, dts: list, needs: list, m: int) -> None:
        """Apply the first ``m`` steps of a fast-forward window (same results as step by step)."""
        bs = self.block_size
        pool = self.pool
        nb = len(calls)
        # per-step accounting (cheap; keeps time series and busy time identical to step mode)
        prev = t0
        used = pool.num_used
        for j in range(m):
            self.busy_cum += dts[j]
            self.num_steps += 1
            used += needs[j]
            self._account_step(prev, times[j], 0, nb, used)
            prev = times[j]
        t_end = times[m - 1]
        finished = []
        for call in calls:
            before = call.num_computed
            after = before + m
            call.num_computed = after
            need = -(-after // bs) - len(call.blocks)
            if need > 0:
                call.blocks.extend(pool.allocate(need, t_end, call.program_id, call.agent_id, len(call.blocks)))
            if self.prefix_caching:
                hashes = call.full_hashes
                for k in range(before // bs, min(after // bs, len(hashes))):
                    pool.cache(call.blocks[k], hashes[k])
            call.num_generated += m
            if call.num_generated >= call.num_output_tokens:
                finished.append(call)
        for call in finished:
            self._finish(call, t_end)
        if self.on_step is not None:
            self.on_step(self)

    # ------------------------------------------------------------------ multi-step (V0)
    def _multi_step(self, decodes: list, prefills: list, now: float, dt1: float, n_prefill: int):
        """Run one V0 multi-step chunk: the planned batch, then ``K - 1`` decode steps of the same
        calls, as one event; tokens are delivered at the chunk's end (see the module docstring).

        Step ``j >= 2`` decodes every call of the batch (one that reached its last token keeps
        decoding until the chunk ends, as in vLLM 0.6), with context lengths growing by one a step.
        """
        env = self.env
        k = self.num_scheduler_steps
        calls = decodes + [c for c, _ in prefills]
        nb = len(calls)
        # context of step 2: a decode has computed one more token, a prompt its whole chunk
        ctx = 0
        for c in decodes:
            ctx += c.num_computed + 2
        for c, n in prefills:
            ctx += c.num_computed + n + 1
        step_seconds = self._step_seconds
        t = now + dt1
        times = [t]
        dts = [dt1]
        for _ in range(1, k):
            # steps 2..K are not scheduled again: no per-scheduled-sequence host cost
            dt = step_seconds(0, 0, nb, ctx, 0, nb, 0)
            t = t + dt
            times.append(t)
            dts.append(dt)
            ctx += nb
        self._pending_chunk = (now, times, dts, n_prefill, len(decodes), nb)
        # nothing joins a chunk: arrivals wait in the inbox for its end, in both modes
        yield env.timeout(delay_to(now, times[-1]))
        self._pending_chunk = None
        self._apply_chunk(decodes, prefills, now, times, dts, n_prefill)

    def _apply_chunk(self, decodes: list, prefills: list, t0: float, times: list, dts: list,
                     n_prefill: int) -> None:
        k = len(times)
        bs = self.block_size
        pool = self.pool
        nb = len(decodes) + len(prefills)
        t_end = times[-1]
        prev = t0
        for j in range(k):
            self.busy_cum += dts[j]
            self.num_steps += 1
            self._account_step(prev, times[j], n_prefill if j == 0 else 0, len(decodes) if j == 0 else nb)
            prev = times[j]
        if nb != len(self.running):
            in_batch = {id(c) for c in decodes}
            in_batch.update(id(c) for c, _ in prefills)
            busy = t_end - t0
            for c in self.running:
                if id(c) not in in_batch:
                    c._skipped += busy
        finished = []
        batch = [(c, 1) for c in decodes] + prefills
        for call, n in batch:
            before = call.num_computed
            ng = call.num_generated
            if ng == 0:
                call.num_computed_prompt_tokens += n  # prompt tokens computed, not taken from cache
            if before + n < call.num_prompt_tokens + ng:
                # defensive: multi-step never chunks a prompt, so every prompt completes in step 1
                call.num_computed = before + n
                after = before + n
            else:
                # the first step completes the known tokens and samples one; each later step one more
                num_new = min(k, call.num_output_tokens - ng)
                after = before + n + k - 1
                call.num_computed = after
                if ng == 0:
                    call.first_token_at = t_end
                call.num_generated = ng + num_new
                if call.num_generated >= call.num_output_tokens:
                    finished.append(call)
            if self.prefix_caching:
                hashes = call.full_hashes
                for b in range(before // bs, min(after // bs, len(hashes), len(call.blocks))):
                    pool.cache(call.blocks[b], hashes[b])
        for call in finished:
            self._finish(call, t_end)
        if self.on_step is not None:
            self.on_step(self)

    # ------------------------------------------------------------------ accounting
    def _account_step(self, t0: float, t1: float, n_prefill: int, n_decode: int, used: int = -1) -> None:
        if self._record_sample is None:
            return
        if used < 0:
            used = self.pool.num_used
        # split the step's busy time at sample boundaries; tokens count where the step ends
        while t1 >= self._next_sample_at:
            edge = self._next_sample_at
            if t0 < edge:
                self._bucket_busy += edge - t0
                t0 = edge
            self._emit(edge, used, t1)
        self._bucket_busy += t1 - t0
        self._bucket_prefill += n_prefill
        self._bucket_decode += n_decode

    def _account_idle(self, t0: float, t1: float, used: int = -1) -> None:
        if self._record_sample is None:
            return
        if used < 0:
            used = self.pool.num_used
        while t1 >= self._next_sample_at:
            self._emit(self._next_sample_at, used, self._next_sample_at)

    def _emit(self, edge: float, used: int, seen_at: float) -> None:
        # queue length as of ``seen_at`` (the end of the step crossing the edge): a fast-forward
        # window applies its steps later, when arrivals that interrupted it are already queued
        iv = self.sample_interval
        num_waiting = len(self.waiting)
        for c in self.inbox:
            if c.enqueued_at < seen_at:
                num_waiting += 1
        self._record_sample((
            self.engine_id, self.node_id, edge, len(self.running), num_waiting,
            used / self.pool.num_blocks, self._bucket_prefill, self._bucket_decode,
            min(1.0, self._bucket_busy / iv), math.nan,
        ))
        self._bucket_busy = 0.0
        self._bucket_prefill = 0
        self._bucket_decode = 0
        self._next_sample_at = edge + iv

    def finalize(self, until: float) -> None:
        """At the end of a run: apply the window steps completed before ``until``, flush samples.

        In step-by-step mode a step ending exactly at ``until`` is not processed (SimPy stops
        first), so only steps ending strictly before it count here too.
        """
        in_progress = 0
        if self._pending is not None:
            calls, t0, times, dts, needs = self._pending
            self._pending = None
            m = bisect_left(times, until)
            if m:
                if calls is None:
                    self._apply_window_lazy(t0, times, dts, needs, m)
                else:
                    self._apply_window(calls, t0, times, dts, needs, m)
            if m < len(times):
                # the step in progress at ``until`` took its blocks when it was planned (before
                # ``until``): step by step, the last sample counts them
                in_progress = needs[m]
        if self._pending_chunk is not None:
            # a multi-step chunk still running at ``until`` delivered nothing yet; its finished
            # steps still count as busy time
            t0, times, dts, n_prefill, n_decode, nb = self._pending_chunk
            self._pending_chunk = None
            prev = t0
            for j in range(bisect_left(times, until)):
                self.busy_cum += dts[j]
                self.num_steps += 1
                self._account_step(prev, times[j], n_prefill if j == 0 else 0, n_decode if j == 0 else nb)
                prev = times[j]
        if self.tiers is not None:
            self.tiers.finalize(until)  # calls held while their KV loads are unfinished calls too
        self._account_idle(until, until, self.pool.num_used + in_progress)
        self._sync_views()  # the runner records the calls still running


class EngineList(list):
    """The cluster's engines in engine-id order, with the vectorised reads of
    :class:`agentsim.policies.base.EngineReads` (what route policies read of every engine at every
    call): one pass over the engines' own lists instead of two property calls per engine; cached
    prefixes from a cluster-wide :class:`agentsim.sim.kv.PrefixIndex`, built at the first ask."""

    _caches: list | None = None
    _index: PrefixIndex | None = None

    def loads(self) -> list[int]:
        return [e.num_calls for e in self]

    def waiting(self) -> list[int]:
        return [e.num_calls - len(e.running) for e in self]

    def kv_usages(self) -> list[float]:
        return [e.pool.num_used / e.pool.num_blocks for e in self]

    def prefix_caches(self) -> list:
        # read-only views of the engines' hash -> block maps (the maps live as long as the pools)
        caches = self._caches
        if caches is None or len(caches) != len(self):
            caches = self._caches = [MappingProxyType(e.pool.cached) for e in self]
        return caches

    def _prefix_index(self) -> PrefixIndex:
        index = self._index
        if index is None or index.replaced or len(index.maps) != len(self):
            # first ask, or another index took the pools over, or the cluster grew
            index = self._index = PrefixIndex([e.pool for e in self])
            self._caches = None  # the pools' maps were replaced
        return index

    def cached_prefix(self, block_hashes) -> list[int]:
        return self._prefix_index().cached_prefix(block_hashes)

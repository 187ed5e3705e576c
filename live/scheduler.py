"""The agentsim scheduler inside vLLM: the same order/evict policy objects, hosted in the engine core.

vLLM loads :class:`AgentsimScheduler` with ``scheduler_cls="agentsim.live.scheduler.AgentsimScheduler"``
(a subclass of vLLM 0.32's ``Scheduler``; the CPU platform turns async scheduling off, so the
synchronous scheduler is the one to extend). It builds the run's :class:`PolicyBundle` from
``additional_config["agentsim"]["policy"]`` and reads each request's agentsim call (program,
agent, hints, arrival) from ``SamplingParams.extra_args["agentsim"]``.

- **order**: the driver already passes the policy's key as vLLM's ``priority``. For a *dynamic*
  policy the scheduler re-ranks every step: each waiting and running request gets
  ``priority = its position in agentsim.policies.ranking.rank`` and the waiting heap is rebuilt, so
  vLLM admits and (under KV pressure) preempts by the policy's current order. A *preemptive* policy
  may also preempt the worst running call for a better waiting one (strict priority). Ranking,
  victim and preempt decisions are :mod:`agentsim.policies.ranking`'s, the simulator's rule.
- **evict / retain**: unless the evict policy is vLLM's own LRU, the block pool's free queue is
  replaced by :class:`PolicyFreeQueue`, which keeps vLLM's rule that blocks without a cached hash
  are reused first and hands the cached ones to the policy's
  :class:`~agentsim.policies.base.FreeBlockQueue` as :class:`~agentsim.policies.base.BlockView` s
  tagged with the program/agent that freed them.
- Every decision is appended as one JSON line to ``additional_config["agentsim"]["log"]``
  (admissions with their priority, re-ranks, preemptions, finishes, evictions), which the engine
  actor returns on request: the engine-side record of what the policy did. In-process observers
  (tests, studies) :meth:`AgentsimScheduler.subscribe` to the ranking decisions with the calls they
  were made on.

``now`` is the run clock: the driver sends the run's t=0 on this node's monotonic clock with every
request (``extra_args["agentsim_epoch"]``). This module imports vLLM at import time: it is only
ever imported inside the engine-core process.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any, Iterator

from vllm.v1.core.sched.scheduler import Scheduler

from agentsim.policies.base import BlockView
from agentsim.policies.ranking import pick_victim, rank, rank_key, should_preempt
from agentsim.workload import CallHints

_HINT_FIELDS = set(CallHints.__slots__) if hasattr(CallHints, "__slots__") else set()


class EngineCall:
    """A :class:`~agentsim.policies.base.CallView` of one vLLM request, inside the engine."""

    __slots__ = ("request", "call_id", "program_id", "agent_id", "thread_id", "program_kind", "arrival_at",
                 "program_arrival_at", "num_prompt_tokens", "num_output_tokens", "service_time", "wait_time",
                 "hints", "parent_call_ids", "seq", "_seen_running_at")

    def __init__(self, request: Any, meta: dict, now: float) -> None:
        self.request = request
        self.call_id = int(meta.get("call_id", -1))
        self.program_id = int(meta.get("program_id", -1))
        self.agent_id = int(meta.get("agent_id", -1))
        self.thread_id = int(meta.get("thread_id", 0))
        self.program_kind = str(meta.get("kind", ""))
        self.arrival_at = float(meta.get("arrival_at", now))
        self.program_arrival_at = float(meta.get("program_arrival_at", self.arrival_at))
        self.num_prompt_tokens = int(request.num_prompt_tokens)
        self.num_output_tokens = int(meta.get("num_output_tokens", request.max_tokens))
        self.service_time = 0.0
        self.wait_time = 0.0
        hints = {k: v for k, v in (meta.get("hints") or {}).items() if not _HINT_FIELDS or k in _HINT_FIELDS}
        self.hints = CallHints(**hints)
        self.parent_call_ids = tuple(meta.get("parent_call_ids") or ())
        self.seq = self.call_id   # the ranking tie-breaker, as the simulator's SimCall.seq
        self._seen_running_at: float | None = None

    @property
    def num_generated(self) -> int:
        return int(self.request.num_output_tokens)

    @property
    def num_preemptions(self) -> int:
        return int(self.request.num_preemptions)

    def prompt_block_hashes(self, block_size: int) -> list[int]:
        # vLLM's own chained block hashes (same sharing structure as agentsim's), as 62-bit ints
        return [_int_hash(h) for h in self.request.block_hashes]


def _int_hash(h: Any) -> int:
    """A block hash (bytes, possibly with a group id suffix) as a stable 62-bit int."""
    raw = bytes(getattr(h, "block_hash", h))
    return int.from_bytes(raw[:8], "little") >> 2


class PolicyFreeQueue:
    """vLLM's ``FreeKVCacheBlockQueue`` interface, ordered by an agentsim evict policy.

    Blocks without a cached hash (never reusable) stay in a reuse-first list as in vLLM; cached
    blocks go to the policy's queue, which picks the victim when the pool needs a block.
    """

    def __init__(self, old: Any, policy_queue: Any, sched: "AgentsimScheduler") -> None:
        self._first: OrderedDict[int, Any] = OrderedDict((b.block_id, b) for b in old.get_all_free_blocks())
        self._policy = policy_queue
        self._views: dict[int, tuple[Any, BlockView]] = {}
        self._sched = sched
        self.num_free_blocks = len(self._first)

    # -- how vLLM's block pool uses the queue --------------------------------
    def popleft(self) -> Any:
        if self._first:
            _, block = self._first.popitem(last=False)
        else:
            if not self._views:
                raise ValueError("No free blocks available")
            view = self._policy.pop(self._sched.now())
            block, _ = self._views.pop(view.block_id)
            self._sched.log("evict", block=view.block_id, program_id=view.program_id, agent_id=view.agent_id,
                            last_used_at=round(view.last_used_at, 6))
        self.num_free_blocks -= 1
        return block

    def popleft_n(self, n: int) -> list[Any]:
        return [self.popleft() for _ in range(n)]

    def remove(self, block: Any) -> None:
        if self._first.pop(block.block_id, None) is None:
            _, view = self._views.pop(block.block_id)
            self._policy.remove(view)
        self.num_free_blocks -= 1

    def append(self, block: Any) -> None:
        if block.block_hash is None:
            self._first[block.block_id] = block
        else:
            now = self._sched.now()
            call = self._sched.freeing
            pos = self._sched.freeing_positions.get(block.block_id, 0)
            view = BlockView(block.block_id, block_hash=_int_hash(block.block_hash), ref_count=0, last_used_at=now,
                program_id=call.program_id if call else -1, agent_id=call.agent_id if call else -1, position=pos)
            self._views[block.block_id] = (block, view)
            self._policy.append(view, now)
        self.num_free_blocks += 1

    def append_n(self, blocks: list[Any]) -> None:
        for b in blocks:
            self.append(b)

    def prepend_n(self, blocks: list[Any]) -> None:
        for b in reversed(blocks):
            self._first[b.block_id] = b
            self._first.move_to_end(b.block_id, last=False)
        self.num_free_blocks += len(blocks)

    def get_all_free_blocks(self) -> list[Any]:
        return list(self._first.values()) + [b for b, _ in self._views.values()]

    def iter_blocks_after(self, cursor: Any | None) -> Iterator[Any]:
        blocks = self.get_all_free_blocks()
        start = 0 if cursor is None else next((i + 1 for i, b in enumerate(blocks) if b is cursor), len(blocks))
        yield from blocks[start:]


class AgentsimScheduler(Scheduler):
    """vLLM's scheduler with agentsim's order and evict policy objects plugged in."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from agentsim.policies.baseline import LRU
        from agentsim.policies.registry import make_bundle

        cfg = dict((self.vllm_config.additional_config or {}).get("agentsim") or {})
        import importlib

        for mod in cfg.get("imports") or ():  # modules that register extra policies
            importlib.import_module(mod)
        self.engine_id = int(cfg.get("engine_id", 0))
        self.bundle = make_bundle(cfg.get("policy"))
        self.order = self.bundle.order
        self.dynamic = self.bundle.caps.dynamic
        self.preemptive = self.bundle.caps.preemptive
        self._log = open(cfg["log"], "a", buffering=1) if cfg.get("log") else None
        self._subscribers: list = []
        self._epoch: float | None = None
        self.calls: dict[str, EngineCall] = {}
        self.freeing: EngineCall | None = None
        self.freeing_positions: dict[int, int] = {}
        self.free_queue_policy = None
        if self.cache_config.enable_prefix_caching and (
                not isinstance(self.bundle.evict, LRU) or cfg.get("force_free_queue")):
            pool = self.kv_cache_manager.block_pool
            self.free_queue_policy = type(self.bundle.evict).__name__
            pool.free_block_queue = PolicyFreeQueue(pool.free_block_queue,
                                                    self.bundle.evict.new_free_queue(self.engine_id), self)
        self.log("init", policy=self.bundle.name, dynamic=self.dynamic, preemptive=self.preemptive,
                 free_queue=self.free_queue_policy)

    # ------------------------------------------------------------------ helpers
    def now(self) -> float:
        return time.monotonic() - self._epoch if self._epoch is not None else 0.0

    def log(self, event: str, **fields: Any) -> None:
        if self._log is not None:
            self._log.write(json.dumps({"t": round(self.now(), 6), "ev": event, **fields}) + "\n")

    def subscribe(self, fn: Any) -> None:
        """Call ``fn(event, now, data)`` on every ranking decision, with the :class:`EngineCall` s it
        was made on: ``"rank"`` (``data["calls"]``: waiting and running calls in rank order, each
        request's new ``priority`` its index; every re-rank of a dynamic policy), ``"preempt"``
        (``data["running"]``: the running calls considered, ``data["victim"]``, ``data["for_call"]``)."""
        self._subscribers.append(fn)

    def _decided(self, event: str, now: float, **data: Any) -> None:
        for fn in self._subscribers:
            fn(event, now, data)

    # ------------------------------------------------------------------ vLLM hooks
    def add_request(self, request: Any) -> None:
        sp = request.sampling_params
        xa = (sp.extra_args or {}) if sp is not None else {}
        epoch = xa.get("agentsim_epoch")
        if epoch is not None:
            self._epoch = float(epoch)
        now = self.now()
        meta = xa.get("agentsim")
        if meta is None:  # over HTTP the hints arrive flattened in vllm_xargs
            from agentsim.live.http import unflatten_extra_args

            meta = unflatten_extra_args(xa)
        call = EngineCall(request, meta, now)
        self.calls[request.request_id] = call
        if self.dynamic or self.preemptive:
            request.priority = self._rank_of(call, now)
        self.bundle.emit("on_call_arrive", call, now)
        self.log("arrive", req=request.request_id, call_id=call.call_id, program_id=call.program_id,
                 priority=request.priority)
        super().add_request(request)

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        now = self.now()
        for req in self.running:
            c = self.calls.get(req.request_id)
            if c is not None:
                if c._seen_running_at is not None:
                    c.service_time += now - c._seen_running_at
                c._seen_running_at = now
        for req in self.waiting:
            c = self.calls.get(req.request_id)
            if c is not None:
                c.wait_time = now - c.arrival_at
                c._seen_running_at = None
        if self.dynamic and (self.waiting or self.running):
            self._rerank(now)
        if self.preemptive and self.waiting and self.running:
            self._preempt_for_better(now)
        out = super().schedule(*args, **kwargs)
        new = [r.req_id for r in out.scheduled_new_reqs]
        resumed = sorted(getattr(out.scheduled_cached_reqs, "resumed_req_ids", ()) or ())
        if new or resumed:
            self.log("admit", reqs=new, resumed=resumed,
                     priorities=[self.requests[r].priority for r in new if r in self.requests],
                     call_ids=[self.calls[r].call_id for r in new if r in self.calls])
        return out

    def _rank_of(self, call: EngineCall, now: float) -> int:
        """Priority for a new request: its rank among the calls the engine holds (lower first)."""
        mine = rank_key(self.order, call, now)
        return sum(1 for c in self.calls.values() if c is not call and rank_key(self.order, c, now) < mine)

    def _rerank(self, now: float) -> None:
        calls = [self.calls[r.request_id] for r in list(self.waiting) + list(self.running)
                 if r.request_id in self.calls]
        ranked = rank(self.order, calls, now)
        changed = []
        for i, c in enumerate(ranked):
            r = c.request
            if r.priority != i:
                r.priority = i
                changed.append(r.request_id)
        if changed:
            if self.waiting:
                # vLLM's queue orders a request by its priority when it is added: re-add the waiting
                # ones through the queue's public interface so their new priorities take effect
                reqs = list(self.waiting)
                self.waiting.remove_requests(reqs)
                self.waiting.prepend_requests(reqs)
            self.log("rerank", order=[c.call_id for c in ranked], changed=len(changed))
        self._decided("rank", now, calls=ranked)

    def _preempt_for_better(self, now: float) -> None:
        if len(self.running) < self.max_num_running_reqs:
            return  # room to admit: vLLM will schedule the waiting call without a preemption
        waiting = [self.calls[r.request_id] for r in self.waiting if r.request_id in self.calls]
        running = [self.calls[r.request_id] for r in self.running if r.request_id in self.calls]
        if not waiting or not running:
            return
        best = rank(self.order, waiting, now)[0]
        worst = pick_victim(self.order, running, now)
        if should_preempt(self.order, best, worst, now):
            self.running.remove(worst.request)
            self._preempt_request(worst.request, time.monotonic())
            self.log("preempt", victim=worst.request.request_id, victim_call=worst.call_id, for_call=best.call_id)
            self._decided("preempt", now, running=running, victim=worst, for_call=best)

    def _free_request(self, request: Any, delay_free_blocks: bool = False) -> Any:
        call = self.calls.pop(request.request_id, None)
        self.freeing = call
        try:
            ids = self.kv_cache_manager.get_block_ids(request.request_id)
            self.freeing_positions = {bid: i for i, bid in enumerate(ids[0])} if ids else {}
        except (KeyError, AttributeError, IndexError):
            self.freeing_positions = {}
        try:
            return super()._free_request(request, delay_free_blocks)
        finally:
            self.freeing = None
            self.freeing_positions = {}
            if call is not None:
                now = self.now()
                self.bundle.emit("on_call_finish", call, now)
                self.log("finish", req=request.request_id, call_id=call.call_id,
                         num_generated=call.num_generated, num_preemptions=call.num_preemptions)

    def shutdown(self) -> None:
        try:
            super().shutdown()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

"""Routing: Autellix's program-locality balancer, SGLang-style prefix affinity, llm-d's weighted scorer,
HexGen-Flow's heterogeneity-aware dispatch.

Every production router reduces to "prefix overlap vs load" (research/live-hooks.md §9). Cache
contents come from :meth:`EngineView.num_cached_prefix_blocks` -- the engine's real prefix cache in
the simulator, the block index built from vLLM's KV-cache events in live mode -- or, for
``prefix-affinity`` with ``match="routed"``, from the router's own approximate record of what it sent
where (SGLang's approximate radix tree). Loads are calls in the engine (running + waiting) unless
stated. Ties go to the lowest engine index, so every router is deterministic.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from agentsim.policies.base import (
    CallView, EngineView, engine_cached_prefix, engine_kv_usage, engine_loads, engine_longest_prefix, engine_waiting,
)
from agentsim.policies.registry import check_choice, check_range, register, register_bundle


def _argmin(values: list[float]) -> int:
    """Index of the smallest value, the lowest index on ties (``min`` keeps the first it saw)."""
    return values.index(min(values))


def _argmax(values: list[float]) -> int:
    """Index of the largest value, the lowest index on ties."""
    return values.index(max(values))


@register("route", "autellix-lb")
class AutellixLB:
    """Autellix Algorithm 2: short calls to the least-used engine, long ones to their program's engine.

    A call of at most ``threshold_tokens`` prompt tokens goes to the least-used engine; a longer one to
    its program's engine (pinned at the program's first long call), for prefix locality.

    ``metric``: ``calls`` (Autellix's Least-Used: fewest calls in the engine) or ``tokens``.
    """

    METRICS = ("calls", "tokens")

    def __init__(self, threshold_tokens: int = 2048, metric: str = "calls") -> None:
        check_choice("metric", metric, self.METRICS)
        check_range("threshold_tokens", threshold_tokens, lo=0)
        self.threshold_tokens = threshold_tokens
        self.metric = metric
        self.table: dict[int, int] = {}   # program -> engine_id (the process table's engine field)

    def _least_used(self, engines: Sequence[EngineView]) -> int:
        if self.metric == "calls":
            return _argmin(engine_loads(engines))
        return _argmin([e.num_outstanding_tokens for e in engines])

    def route(self, call: CallView, engines: Sequence[EngineView], now: float) -> int:
        if call.num_prompt_tokens <= self.threshold_tokens:
            return self._least_used(engines)
        eid = self.table.get(call.program_id)
        if eid is not None:
            for i, e in enumerate(engines):
                if e.engine_id == eid:
                    return i
        i = self._least_used(engines)
        self.table[call.program_id] = engines[i].engine_id
        return i

    def on_program_end(self, program_id: int, now: float) -> None:
        self.table.pop(program_id, None)


@register("route", "prefix-affinity")
class PrefixAffinity:
    """SGLang cache-aware routing: the engine with the longest cached prefix, unless loads are imbalanced.

    Balanced: the engine with the longest cached prefix if its match rate exceeds ``cache_threshold``,
    else the least-loaded; imbalanced: the least-loaded.

    Imbalanced means both ``max_load - min_load > balance_abs_threshold`` and
    ``max_load > balance_rel_threshold * min_load`` (loads: calls in the engine). ``match``: ``cache``
    (the engine's prefix cache as the view reports it) or ``routed`` (the router's own LRU record of the
    block hashes it routed to each engine, ``max_tree_blocks`` per engine, like SGLang's approximate tree).
    Defaults: sglang_router 0.5.
    """

    MATCHES = ("cache", "routed")

    def __init__(self, cache_threshold: float = 0.3, balance_abs_threshold: int = 64,
                 balance_rel_threshold: float = 1.5, match: str = "cache", max_tree_blocks: int = 1 << 20) -> None:
        check_choice("match", match, self.MATCHES)
        check_range("cache_threshold", cache_threshold, 0.0, 1.0)      # a match rate
        check_range("balance_abs_threshold", balance_abs_threshold, lo=0)
        check_range("balance_rel_threshold", balance_rel_threshold, lo=0)
        check_range("max_tree_blocks", max_tree_blocks, lo=1)
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.match = match
        self.reads_kv_state = match == "cache"   # the backend must show it the cache as of now
        self.max_tree_blocks = max_tree_blocks
        self._trees: dict[int, OrderedDict[int, None]] = {}
        self.num_imbalanced = 0
        self.num_affinity = 0

    def _matched(self, e: EngineView, hashes: list[int]) -> int:
        if self.match == "cache":
            return e.num_cached_prefix_blocks(hashes)
        tree = self._trees.get(e.engine_id)
        if not tree:
            return 0
        n = 0
        for h in hashes:
            if h not in tree:
                break
            n += 1
        return n

    def _insert(self, e: EngineView, hashes: list[int]) -> None:
        if self.match != "routed":
            return
        tree = self._trees.setdefault(e.engine_id, OrderedDict())
        for h in hashes:
            tree[h] = None
            tree.move_to_end(h)
        while len(tree) > self.max_tree_blocks:
            tree.popitem(last=False)

    def route(self, call: CallView, engines: Sequence[EngineView], now: float) -> int:
        loads = engine_loads(engines)
        lo, hi = min(loads), max(loads)
        hashes = call.prompt_block_hashes(engines[0].block_size)
        if hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo:
            self.num_imbalanced += 1
            i = _argmin(loads)
        else:
            if self.match == "cache":
                best, n = engine_longest_prefix(engines, hashes)
            else:
                matched = [self._matched(e, hashes) for e in engines]
                best = _argmax(matched)
                n = matched[best]
            rate = n / len(hashes) if hashes else 0.0
            if rate > self.cache_threshold:
                self.num_affinity += 1
                i = best
            else:
                i = _argmin(loads)
        self._insert(engines[i], hashes)
        return i


@register("route", "weighted-scorer")
class WeightedScorer:
    """llm-d inference scheduler: argmax of ``Σ w·score`` over a queue, a KV-usage and a prefix scorer.

    queue score ``(maxQ - q) / (maxQ - minQ)`` over waiting calls (1 for all if equal), KV score
    ``1 - kv_usage``, prefix score = cached prefix blocks / prompt blocks. Default weights: the Helm
    chart's profile (queue 2, KV 2, prefix 3).
    """

    def __init__(self, queue_weight: float = 2.0, kv_weight: float = 2.0, prefix_weight: float = 3.0) -> None:
        for name, w in (("queue_weight", queue_weight), ("kv_weight", kv_weight), ("prefix_weight", prefix_weight)):
            check_range(name, w, lo=0)
        self.queue_weight = queue_weight
        self.kv_weight = kv_weight
        self.prefix_weight = prefix_weight
        self.reads_kv_state = bool(kv_weight or prefix_weight)

    def scores(self, call: CallView, engines: Sequence[EngineView]) -> list[float]:
        qs = engine_waiting(engines)
        qmin, qmax = min(qs), max(qs)
        hashes = call.prompt_block_hashes(engines[0].block_size) if self.prefix_weight else []
        if qmax == qmin:
            sq = [1.0] * len(qs)
        else:
            span = qmax - qmin
            sq = [(qmax - q) / span for q in qs]
        if hashes:
            m = len(hashes)
            sp = [n / m for n in engine_cached_prefix(engines, hashes)]
        else:
            sp = [0.0] * len(qs)
        wq, wk, wp = self.queue_weight, self.kv_weight, self.prefix_weight
        return [wq * a + wk * (1.0 - u) + wp * c for a, u, c in zip(sq, engine_kv_usage(engines), sp)]

    def route(self, call: CallView, engines: Sequence[EngineView], now: float) -> int:
        return _argmax(self.scores(call, engines))


@register("route", "hexgen")
class HexGenDispatch:
    """HexGen-Flow global dispatch: engine = argmax ``alpha * speed_ratio - (1 - alpha) * work_ratio``.

    ``speeds``: relative speed of each engine (by engine index; default all 1, a homogeneous cluster),
    normalised by the slowest; work = estimated seconds of work assigned (``decode_time_per_token *
    output + prefill_time_per_token * prompt``), normalised by the mean over engines.
    ``cumulative``: as in the authors' simulator, assigned work is never decremented (total assigned);
    ``False`` subtracts a call's work when it finishes (outstanding work).
    """

    def __init__(self, alpha: float = 0.2, speeds: list | None = None, cumulative: bool = True,
                 decode_time_per_token: float = 0.025, prefill_time_per_token: float = 0.0002) -> None:
        if not 0 <= alpha <= 1:
            raise ValueError("alpha must be in [0, 1]")
        check_range("decode_time_per_token", decode_time_per_token, lo=0)
        check_range("prefill_time_per_token", prefill_time_per_token, lo=0)
        self.alpha = alpha
        self.speeds = list(speeds) if speeds else None
        self.cumulative = cumulative
        self.decode_time_per_token = decode_time_per_token
        self.prefill_time_per_token = prefill_time_per_token
        self.work: dict[int, float] = {}
        self._assigned: dict[int, tuple[int, float]] = {}

    def route(self, call: CallView, engines: Sequence[EngineView], now: float) -> int:
        est = self.decode_time_per_token * call.num_output_tokens + self.prefill_time_per_token * call.num_prompt_tokens
        speeds = self.speeds or [1.0] * len(engines)
        if len(speeds) < len(engines):
            raise ValueError(f"hexgen: {len(engines)} engines but {len(speeds)} speeds")
        w = [self.work.get(e.engine_id, 0.0) for e in engines]
        # baselines: the slowest engine's speed and the mean assigned work (at least this call's),
        # so both ratios are around 1 (normalising by the least-loaded engine's work, which starts
        # at 0, would make the first assignment decide everything)
        base_w = max(sum(w) / len(w), est, 1e-12)
        base_s = min(speeds[: len(engines)])
        prio = [self.alpha * speeds[i] / base_s - (1 - self.alpha) * w[i] / base_w for i in range(len(engines))]
        i = _argmax(prio)
        eid = engines[i].engine_id
        self.work[eid] = self.work.get(eid, 0.0) + est
        if not self.cumulative:
            self._assigned[call.call_id] = (eid, est)
        return i

    def on_call_finish(self, call: CallView, now: float) -> None:
        a = self._assigned.pop(call.call_id, None)
        if a is not None:
            self.work[a[0]] -= a[1]


register_bundle("prefix-affinity", "SGLang-style cache-aware routing (prefix match unless imbalanced), FCFS, LRU",
                route="prefix-affinity", order="fcfs", evict="lru", shape="fixed")
register_bundle("llm-d", "llm-d weighted scorer routing (queue 2, KV 2, prefix 3), FCFS, LRU",
                route="weighted-scorer", order="fcfs", evict="lru", shape="fixed")
register_bundle("hexgen", "HexGen-Flow: heterogeneity-aware dispatch + urgency (least slack) local queues",
                route="hexgen", order="hexgen-urgency", evict="lru", shape="fixed")

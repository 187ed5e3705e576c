"""Live call records and engine views: what the policy objects read in live mode.

:class:`LiveCall` satisfies :class:`agentsim.policies.base.CallView`; :class:`LiveEngineView`
satisfies :class:`agentsim.policies.base.EngineView`. Both are built and updated only by the
driver (one asyncio thread), so policies see a consistent snapshot during a decision.

The engine view combines what the driver knows exactly (the calls it has outstanding on the
engine and their tokens) with what the engine reports (KV usage from vLLM's scheduler stats, and
the set of cached blocks from vLLM's KV-cache events, keyed by vLLM's block hashes).
"""

from __future__ import annotations

from typing import Sequence

from agentsim.metrics import CallStatus, call_row
from agentsim.workload import CallHints, Context


class LiveCall:
    """One LLM call as the driver tracks it (a :class:`CallView`)."""

    __slots__ = (
        "call_id", "program_id", "agent_id", "thread_id", "program_kind", "arrival_at",
        "program_arrival_at", "num_prompt_tokens", "num_output_tokens", "num_generated", "service_time",
        "wait_time", "num_preemptions", "hints", "parent_call_ids", "context", "engine_id", "node_id",
        "scheduled_at", "first_token_at", "finish_at", "num_cached_tokens", "num_retries", "status",
        "priority", "output_seg_id", "vllm_hashes", "submitted_at", "kv_transfer_bytes", "kv_transfer_time",
    )

    def __init__(self, call_id: int, program_id: int, agent_id: int, thread_id: int, program_kind: str,
                 arrival_at: float, program_arrival_at: float, context: Context, num_output_tokens: int,
                 hints: CallHints, parent_call_ids: tuple[int, ...], output_seg_id: int | None) -> None:
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
        self.num_generated = 0
        self.service_time = 0.0
        self.wait_time = 0.0
        self.num_preemptions = 0
        self.hints = hints
        self.parent_call_ids = parent_call_ids
        self.output_seg_id = output_seg_id
        self.engine_id = -1
        self.node_id = -1
        self.scheduled_at = float("nan")
        self.first_token_at = float("nan")
        self.finish_at = float("nan")
        self.submitted_at = float("nan")
        self.num_cached_tokens = 0
        self.num_retries = 0
        self.status = CallStatus.RUNNING
        self.priority = 0
        self.vllm_hashes: list[bytes] = []
        self.kv_transfer_bytes = 0     # P/D (agentsim.live.pd): KV moved prefill -> decode engine, bytes
        self.kv_transfer_time = 0.0    # ... and its hand-off time, s

    @property
    def seq(self) -> int:
        """Arrival sequence number, the ranking tie-breaker (agentsim.policies.ranking): the call id."""
        return self.call_id

    def prompt_block_hashes(self, block_size: int) -> list[int]:
        return self.context.block_hashes(block_size)

    @property
    def num_computed_prompt_tokens(self) -> int:
        """Prompt tokens the engine computed (not served from its prefix cache); 0 until finished."""
        return self.num_prompt_tokens - self.num_cached_tokens if self.status == CallStatus.FINISHED else 0

    def row(self) -> tuple:
        """A row of ``metrics.CALL_COLUMNS`` (:func:`agentsim.metrics.call_row`; ``kv_transfer_bytes`` /
        ``kv_transfer_time`` are set for P/D calls by :class:`agentsim.live.pd.PDClient` replies, else 0)."""
        return call_row(self, self.engine_id, self.node_id, self.status)


class LiveEngineView:
    """What a route policy may read about one live engine (an :class:`EngineView`)."""

    def __init__(self, engine_id: int, node_id: int, block_size: int, num_total_blocks: int,
                 max_num_seqs: int, hasher=None) -> None:
        self.engine_id = engine_id
        self.node_id = node_id
        self.block_size = block_size
        self.num_total_blocks = num_total_blocks
        self.max_num_seqs = max_num_seqs
        self._hasher = hasher
        self.outstanding: dict[int, LiveCall] = {}
        self._outstanding_tokens = 0
        self.cached: set = set()           # vLLM block hashes currently in the prefix cache
        self.reported: dict = {}           # latest stats snapshot from the engine
        self.alive = True
        self.num_events = 0
        self.num_removed = 0               # blocks vLLM reported evicted (BlockRemoved)

    # --- EngineView -------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return min(len(self.outstanding), self.max_num_seqs)

    @property
    def num_waiting(self) -> int:
        return len(self.outstanding) - self.num_running

    @property
    def kv_usage(self) -> float:
        return float(self.reported.get("kv_usage", 0.0))

    @property
    def num_free_blocks(self) -> int:
        return int(round((1.0 - self.kv_usage) * self.num_total_blocks))

    @property
    def num_outstanding_tokens(self) -> int:
        return self._outstanding_tokens

    def num_cached_prefix_blocks(self, block_hashes: Sequence[int]) -> int:
        """Leading blocks of ``block_hashes`` (agentsim hashes) that the engine's KV events say are cached."""
        if self._hasher is None:
            return 0
        n = 0
        lookup = self._hasher.lookup
        cached = self.cached
        for h in block_hashes:
            v = lookup(h)
            if v is None or v not in cached:
                break
            n += 1
        return n

    # --- driver-side updates ----------------------------------------------------
    def add(self, call: LiveCall) -> None:
        self.outstanding[call.call_id] = call
        self._outstanding_tokens += call.num_prompt_tokens + call.num_output_tokens

    def remove(self, call: LiveCall) -> None:
        if self.outstanding.pop(call.call_id, None) is not None:
            self._outstanding_tokens -= call.num_prompt_tokens + call.num_output_tokens

    def apply_events(self, events: list) -> None:
        """Apply drained KV events: ("S", hashes) stored, ("R", hashes) removed, ("C", []) cleared."""
        cached = self.cached
        for kind, hashes in events:
            self.num_events += 1
            if kind == "S":
                cached.update(hashes)
            elif kind == "R":
                self.num_removed += len(hashes)
                cached.difference_update(hashes)
            else:
                cached.clear()

    def __repr__(self) -> str:
        return (f"LiveEngineView(engine={self.engine_id}, node={self.node_id}, outstanding={len(self.outstanding)}, "
                f"cached_blocks={len(self.cached)}, alive={self.alive})")

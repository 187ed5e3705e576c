"""The KV cache manager between an engine's scheduler and its block pool, as in vLLM v1.

    Engine (plan -> execute -> update)
      -> KVCacheManager  (per-request block lists: get_computed_blocks, allocate_slots,
                          cache_full_blocks, free; ``vllm/v1/core/kv_cache_manager.py``)
        -> BlockPool     (ref counts, hash -> block map, eviction; ``vllm/v1/core/block_pool.py``,
                          :class:`agentsim.sim.kv.BlockPool`)
          -> free-block queue (the evict policy's order; vLLM: ``FreeKVCacheBlockQueue``, LRU)

A request's blocks live on the call (``SimCall.blocks``, vLLM's ``req_to_blocks``); its block hashes
are precomputed per call (``SimCall.full_hashes``: every full block of prompt + output, chained).
"""

from __future__ import annotations

from functools import partial
from itertools import islice, takewhile
from operator import is_not

from agentsim.policies.base import BlockView
from agentsim.sim.kv import BlockPool


_is_block = partial(is_not, None)  # x -> x is not None


class KVCacheManager:
    """One engine's KV cache manager over ``pool`` (blocks of ``block_size`` tokens)."""

    __slots__ = ("pool", "block_size", "enable_caching")

    def __init__(self, pool: BlockPool, block_size: int, enable_caching: bool) -> None:
        self.pool = pool
        self.block_size = block_size
        self.enable_caching = enable_caching

    def get_computed_blocks(self, call) -> list[BlockView]:
        """The longest cached prefix of ``call``'s known tokens, in whole blocks and never its last
        known token (vLLM recomputes it for the logits: ``KVCacheManager.get_computed_blocks``
        looks up at most ``num_tokens - 1`` tokens). Empty without prefix caching. No reference is
        taken: :meth:`allocate_slots` does that."""
        if not self.enable_caching:
            return []
        limit = (call.num_prompt_tokens + call.num_generated - 1) // self.block_size
        # the cached blocks of the first ``limit`` hashes up to the first miss, scanned in C
        return list(takewhile(_is_block, map(self.pool.cached.get, islice(call.full_hashes, limit))))

    def allocate_slots(self, call, num_new_tokens: int, now: float,
                       new_computed_blocks: list[BlockView] | None = None) -> list[BlockView] | None:
        """Blocks for ``num_new_tokens`` more tokens of ``call``; returns the call's new blocks, or
        None (nothing changed) when the pool has too few free blocks.

        ``new_computed_blocks`` (admission): the prefix hits from :meth:`get_computed_blocks`; the
        call then starts from them (its block list becomes hits + new blocks) and hits that are
        free count against the free blocks, as they leave the free queue (vLLM:
        ``num_evictable_computed_blocks``). Without it the call's own blocks and computed tokens
        are extended. New blocks: ``ceil((computed + num_new_tokens) / block_size)`` minus the
        blocks held (``KVCacheManager.allocate_slots``). Blocks a KV transfer holds for the call
        (``call.kv_hold``, :mod:`agentsim.sim.disagg`) are released once its hits hold them.
        """
        pool = self.pool
        bs = self.block_size
        if new_computed_blocks is not None:
            hits = new_computed_blocks
            need = -(-(len(hits) * bs + num_new_tokens) // bs) - len(hits)
            evictable = 0
            for b in hits:
                if b.ref_count == 0:
                    evictable += 1
            if need + evictable > pool.num_blocks - pool.num_used:
                return None
            if hits:
                pool.touch(hits, now, call.program_id, call.agent_id)
            if call.kv_hold is not None:
                pool.free(call.kv_hold, now)
                call.kv_hold = None
            call.blocks = hits
        else:
            need = -(-(call.num_computed + num_new_tokens) // bs) - len(call.blocks)
            if need > pool.num_blocks - pool.num_used:
                return None
        if need <= 0:
            return []
        new = pool.allocate(need, now, call.program_id, call.agent_id, len(call.blocks))
        call.blocks.extend(new)
        return new

    def allocate_decode_blocks(self, calls: list, now: float) -> None:
        """One new block for each of ``calls`` (decodes whose next token starts a block), in the
        given order; the caller checked that the pool has them (``allocate_slots`` of one token each,
        without its checks)."""
        self.pool.allocate_each(calls, now)

    def cache_full_blocks(self, call, num_computed_before: int, num_computed_after: int) -> None:
        """Register the blocks that became full and computed as ``call`` went from
        ``num_computed_before`` to ``num_computed_after`` tokens, under their chained hashes (a
        duplicate stays uncached, as in vLLM ``BlockPool.cache_full_blocks``)."""
        if not self.enable_caching:
            return
        bs = self.block_size
        hashes = call.full_hashes
        end = num_computed_after // bs
        if end > len(hashes):
            end = len(hashes)
        start = num_computed_before // bs
        if end <= start:
            return
        blocks = call.blocks
        if end > len(blocks):
            end = len(blocks)
        cached = self.pool.cached
        for h, b in zip(hashes[start:end], blocks[start:end]):
            if b.block_hash is None and h not in cached:
                b.block_hash = h
                cached[h] = b

    def free(self, call, now: float) -> None:
        """Release all of ``call``'s blocks (tail first into the free queue, vLLM's order)."""
        self.pool.free(call.blocks, now)
        call.blocks = []

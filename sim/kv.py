"""Paged KV cache with prefix caching, layered like vLLM v1.

    per-call block lists (engine)  ->  BlockPool (ref counts, hash -> block map)  ->  free-block order
                                                                                     (the evict policy)

A block becomes a prefix-cache entry only once it is full and computed (its hash chains the
previous block's hash and its own tokens, see :meth:`agentsim.workload.Context.block_hashes`).
Freed blocks keep their hash and stay hit-able until the free-block queue hands them out again;
which free block goes first is the evict policy's decision (vLLM: LRU).
"""

from __future__ import annotations

from agentsim.policies.base import BlockView, FreeBlockQueue


class BlockPool:
    """``num_blocks`` KV blocks; free ones ordered by the evict policy's queue."""

    __slots__ = ("num_blocks", "blocks", "free_queue", "cached", "num_used", "num_evictions")

    def __init__(self, num_blocks: int, free_queue: FreeBlockQueue, now: float = 0.0) -> None:
        self.num_blocks = num_blocks
        # Blocks are created on first use: never-used blocks sit at the head of vLLM's free queue
        # (it starts in block-id order and freed blocks join the tail), so handing them out
        # before any freed block is the same order, without building 10^6 objects up front.
        self.blocks: list[BlockView] = []
        self.free_queue = free_queue
        self.cached: dict[int, BlockView] = {}
        self.num_used = 0          # blocks with ref_count > 0
        self.num_evictions = 0     # cached blocks handed out again (their hash dropped)

    @property
    def num_free(self) -> int:
        return self.num_blocks - self.num_used

    def num_cached_prefix(self, hashes: list[int], limit: int) -> int:
        """How many of the first ``limit`` hashes are cached, as a prefix."""
        cached = self.cached
        n = 0
        while n < limit and hashes[n] in cached:
            n += 1
        return n

    def touch(self, blocks: list[BlockView], now: float, program_id: int, agent_id: int) -> None:
        """Take a reference on prefix-cache hits (removing free ones from the free queue)."""
        remove = self.free_queue.remove
        for b in blocks:
            if b.ref_count == 0:
                remove(b)
                self.num_used += 1
            b.ref_count += 1
            b.last_used_at = now
            b.program_id = program_id
            b.agent_id = agent_id

    def allocate(self, n: int, now: float, program_id: int, agent_id: int, first_position: int) -> list[BlockView]:
        """Hand out ``n`` free blocks (caller checked ``n <= num_free``), evicting cached ones."""
        blocks = self.blocks
        fresh = self.num_blocks - len(blocks)
        if fresh >= n:
            base = len(blocks)
            out = [BlockView(base + i, None, 1, now, program_id, agent_id, first_position + i) for i in range(n)]
            blocks.extend(out)
        else:
            out = [BlockView(len(blocks) + i) for i in range(fresh)]
            blocks.extend(out)
            pop = self.free_queue.pop
            cached = self.cached
            for _ in range(n - fresh):
                b = pop(now)
                h = b.block_hash
                if h is not None:
                    if cached.get(h) is b:
                        del cached[h]
                    b.block_hash = None
                    self.num_evictions += 1
                out.append(b)
            for i, b in enumerate(out):
                b.ref_count = 1
                b.last_used_at = now
                b.program_id = program_id
                b.agent_id = agent_id
                b.position = first_position + i
        self.num_used += n
        return out

    def free(self, blocks: list[BlockView], now: float) -> None:
        """Drop one reference on each block; tail blocks enter the free queue first (vLLM order)."""
        append = self.free_queue.append
        n = 0
        for b in reversed(blocks):
            rc = b.ref_count - 1
            b.ref_count = rc
            if rc == 0:
                b.last_used_at = now
                append(b, now)
                n += 1
        self.num_used -= n

    def cache(self, block: BlockView, block_hash: int) -> None:
        """Register a full, computed block under its hash (a duplicate stays uncached, as in vLLM)."""
        if block.block_hash is None and block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block

    def check(self) -> None:
        """Raise AssertionError if the pool's invariants do not hold (tests use this)."""
        used = sum(1 for b in self.blocks if b.ref_count > 0)
        assert all(b.ref_count >= 0 for b in self.blocks), "negative ref count"
        assert used == self.num_used, f"num_used {self.num_used} != counted {used}"
        never_used = self.num_blocks - len(self.blocks)
        assert len(self.free_queue) + never_used == self.num_blocks - used, "free + used != total"
        for h, b in self.cached.items():
            assert b.block_hash == h, "cache map points at a block with another hash"

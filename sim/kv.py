"""Paged KV cache with prefix caching, layered like vLLM v1.

    per-call block lists (engine)  ->  BlockPool (ref counts, hash -> block map)  ->  free-block order
                                                                                     (the evict policy)

A block becomes a prefix-cache entry only once it is full and computed (its hash chains the
previous block's hash and its own tokens, see :meth:`agentsim.workload.Context.block_hashes`).
Freed blocks keep their hash and stay hit-able until the free-block queue hands them out again;
which free block goes first is the evict policy's decision (vLLM: LRU).

Capacity, as vLLM counts it: ``num_gpu_blocks`` (``--num-gpu-blocks-override``, or what GPU memory
holds) includes, in the V1 engine, one **null block** that ``BlockPool.__init__`` takes off the free
queue for good (``vllm/v1/core/block_pool.py``: ``self.null_block = self.free_block_queue.popleft()``),
so requests can use ``num_gpu_blocks - 1`` blocks and ``get_usage()`` is used / (num_gpu_blocks - 1).
V0's block manager (``vllm/core/block_manager.py``, simulator-only here) reserves none, but admits
a prompt only while ``watermark_blocks = int(0.01 * num_gpu_blocks)`` blocks stay free.
"""

from __future__ import annotations

from itertools import accumulate, groupby, islice, repeat, takewhile
from operator import and_

from agentsim.policies.base import BlockView, BulkFreeBlockQueue, FreeBlockQueue

V0_WATERMARK = 0.01  # vllm/core/block_manager.py (V0): BlockSpaceManager(watermark=0.01)


def num_reserved_blocks(scheduler: str) -> int:
    """Blocks of ``num_gpu_blocks`` no request can use: 1 in V1 (the null block), 0 in V0."""
    return 1 if scheduler == "v1" else 0


def v0_watermark_blocks(num_gpu_blocks: int) -> int:
    """V0's admission watermark in blocks: ``int(0.01 * num_gpu_blocks)`` (``vllm/core/block_manager.py``)."""
    return int(V0_WATERMARK * num_gpu_blocks)


def num_call_blocks(num_tokens: int, block_size: int, num_lookahead_slots: int = 0) -> int:
    """Blocks one call of ``num_tokens`` (prompt + output) holds at most.

    vLLM never writes KV for the last sampled token (it is returned, not fed back), so a call's KV
    covers ``num_tokens - 1`` positions, plus the lookahead slots V0 multi-step reserves
    (``num_scheduler_steps - 1``, ``vllm/core/scheduler.py`` ``_can_append_slots``).
    """
    return -(-(num_tokens - 1 + num_lookahead_slots) // block_size)


def call_fits(num_tokens: int, block_size: int, num_gpu_blocks: int, scheduler: str = "v1",
              num_scheduler_steps: int = 1, enable_chunked_prefill: bool = False) -> bool:
    """Whether a call of ``num_tokens`` (prompt + output) can ever finish on an engine of
    ``num_gpu_blocks`` KV blocks.

    V1: ``ceil((num_tokens - 1) / block_size) <= num_gpu_blocks - 1`` (the null block). V0: the
    longest recompute (all but the last token, plus the ``K`` lookahead slots a multi-step prompt
    reserves with chunked prefill) must pass the admission watermark, and decoding with the
    multi-step lookahead (``K - 1``) must fit the whole cache.
    """
    if scheduler == "v1":
        return num_call_blocks(num_tokens, block_size) <= num_gpu_blocks - 1
    k = num_scheduler_steps
    prompt_lookahead = k if (enable_chunked_prefill and k > 1) else 0
    return (num_call_blocks(num_tokens, block_size, prompt_lookahead)
            <= num_gpu_blocks - v0_watermark_blocks(num_gpu_blocks)
            and num_call_blocks(num_tokens, block_size, k - 1) <= num_gpu_blocks)


class BlockPool:
    """``num_gpu_blocks`` KV blocks, ``num_reserved`` of them never handed out (V1's null block);
    free ones ordered by the evict policy's queue.

    ``num_blocks`` is what requests can use (``num_gpu_blocks - num_reserved``); block ids start at
    ``num_reserved``, as in vLLM where the null block is block 0.
    """

    __slots__ = ("num_gpu_blocks", "num_reserved", "num_blocks", "blocks", "_free_queue", "cached", "num_used",
                 "num_evictions", "_on_evict", "_append_blocks", "_pop_blocks")

    def __init__(self, num_gpu_blocks: int, free_queue: FreeBlockQueue, now: float = 0.0,
                 num_reserved: int = 1) -> None:
        if not 0 <= num_reserved < num_gpu_blocks:
            raise ValueError(f"a pool of {num_gpu_blocks} blocks cannot reserve {num_reserved}")
        self.num_gpu_blocks = num_gpu_blocks
        self.num_reserved = num_reserved
        self.num_blocks = num_gpu_blocks - num_reserved
        # Blocks are created on first use: never-used blocks sit at the head of vLLM's free queue
        # (it starts in block-id order and freed blocks join the tail), so handing them out
        # before any freed block is the same order, without building 10^6 objects up front.
        self.blocks: list[BlockView] = []
        self.free_queue = free_queue
        self.cached: dict[int, BlockView] = {}
        self.num_used = 0          # blocks with ref_count > 0
        self.num_evictions = 0     # cached blocks handed out again (their hash dropped)
        self._on_evict = None      # see on_evict

    @property
    def free_queue(self) -> FreeBlockQueue:
        """The evict policy's free-block queue (settable: tests wrap it)."""
        return self._free_queue

    @free_queue.setter
    def free_queue(self, queue: FreeBlockQueue) -> None:
        self._free_queue = queue
        # many blocks per call into / out of the queue: its bulk forms when it has them (checked
        # once here, not per call), else its append/pop one block at a time
        if isinstance(queue, BulkFreeBlockQueue):
            self._append_blocks = queue.append_blocks
            self._pop_blocks = queue.pop_blocks
        else:
            append, pop = queue.append, queue.pop

            def append_blocks(blocks: list[BlockView], now: float) -> None:
                for b in blocks:
                    append(b, now)

            self._append_blocks = append_blocks
            self._pop_blocks = lambda n, now: [pop(now) for _ in range(n)]

    def on_evict(self, fn) -> None:
        """Call ``fn(block_hash, now)`` whenever a cached block is handed out again (its hash dropped),
        before it is reused: a CPU tier's write-back (``agentsim.sim.tiers``). One listener."""
        self._on_evict = fn

    @property
    def num_never_used(self) -> int:
        """Blocks never handed out yet (they go before any freed block, as at the head of vLLM's queue)."""
        return self.num_blocks - len(self.blocks)

    @property
    def num_free(self) -> int:
        return self.num_blocks - self.num_used

    @property
    def usage(self) -> float:
        """KV cache usage in [0, 1]: used / usable blocks (vLLM V1 ``BlockPool.get_usage``)."""
        return self.num_used / self.num_blocks

    def num_cached_prefix(self, hashes: list[int], limit: int) -> int:
        """How many of the first ``limit`` hashes are cached, as a prefix."""
        # the scan runs in C (takewhile over the map's membership test): routers and prefetch
        # planners ask this for every candidate at every decision
        if limit < len(hashes):
            return len(list(takewhile(self.cached.__contains__, islice(hashes, limit))))
        return len(list(takewhile(self.cached.__contains__, hashes)))

    def touch(self, blocks: list[BlockView], now: float, program_id: int, agent_id: int) -> None:
        """Take a reference on prefix-cache hits (removing free ones from the free queue)."""
        remove = self.free_queue.remove
        n = 0
        for b in blocks:
            rc = b.ref_count
            if rc == 0:
                remove(b)
                n += 1
            b.ref_count = rc + 1
            b.last_used_at = now
            b.program_id = program_id
            b.agent_id = agent_id
        self.num_used += n

    def allocate(self, n: int, now: float, program_id: int, agent_id: int, first_position: int) -> list[BlockView]:
        """Hand out ``n`` free blocks (caller checked ``n <= num_free``), evicting cached ones."""
        blocks = self.blocks
        fresh = self.num_blocks - len(blocks)
        self.num_used += n
        base = self.num_reserved + len(blocks)
        if fresh >= n:
            out = [BlockView(base + i, None, 1, now, program_id, agent_id, first_position + i) for i in range(n)]
            blocks.extend(out)
            return out
        if fresh > 0:
            out = [BlockView(base + i, None, 1, now, program_id, agent_id, first_position + i) for i in range(fresh)]
            blocks.extend(out)
        else:
            out = []
        reused = self._pop_blocks(n - fresh, now)
        cached = self.cached
        on_evict = self._on_evict
        position = first_position + fresh
        evicted = 0
        for b in reused:
            h = b.block_hash
            if h is not None:
                if on_evict is not None:
                    on_evict(h, now)
                if cached.get(h) is b:
                    del cached[h]
                b.block_hash = None
                evicted += 1
            b.ref_count = 1
            b.last_used_at = now
            b.program_id = program_id
            b.agent_id = agent_id
            b.position = position
            position += 1
        self.num_evictions += evicted
        out += reused
        return out

    def allocate_each(self, owners: list, now: float) -> None:
        """One block for each of ``owners`` (objects with ``blocks``, ``program_id``, ``agent_id``),
        appended to its ``blocks``, handed out in the owners' order: the same blocks as one
        :meth:`allocate` of 1 per owner in turn (caller checked ``len(owners) <= num_free``)."""
        out = self.allocate(len(owners), now, -1, -1, 0)
        for o, b in zip(owners, out):
            blocks = o.blocks
            b.program_id = o.program_id
            b.agent_id = o.agent_id
            b.position = len(blocks)
            blocks.append(b)

    def free(self, blocks: list[BlockView], now: float) -> None:
        """Drop one reference on each block; tail blocks enter the free queue first (vLLM order)."""
        unused = []
        for b in reversed(blocks):
            rc = b.ref_count - 1
            b.ref_count = rc
            if rc == 0:
                b.last_used_at = now
                unused.append(b)
        if unused:
            self.num_used -= len(unused)
            self._append_blocks(unused, now)

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


class _IndexedMap(dict):
    """A pool's hash -> block map that keeps a :class:`PrefixIndex` in step: the engine's bit is
    set in the index while the hash is a key here. Reads (``in``, ``get``, ``[]``) are plain dict
    reads; every method of the map that adds or removes a key updates the index. (``dict``'s own
    methods called unbound on it, e.g. ``dict.update(m, ...)``, would bypass it: nothing does.)"""

    __slots__ = ("_owners", "_bit", "_replaced")

    def __init__(self, items: dict, owners: dict[int, int], bit: int, replaced: list[bool]) -> None:
        super().__init__(items)
        self._owners = owners
        self._bit = bit
        self._replaced = replaced   # its index's flag (a list, not the index: no reference cycle)
        for h in self:
            owners[h] = owners.get(h, 0) | bit

    def _gone(self, h: int) -> None:
        owners = self._owners
        m = owners[h] & ~self._bit
        if m:
            owners[h] = m
        else:
            del owners[h]

    def __setitem__(self, h: int, block: BlockView) -> None:
        if h not in self:
            owners = self._owners
            owners[h] = owners.get(h, 0) | self._bit
        dict.__setitem__(self, h, block)

    def __delitem__(self, h: int) -> None:
        dict.__delitem__(self, h)
        self._gone(h)

    def pop(self, h: int, *default):
        had = h in self
        v = dict.pop(self, h, *default)
        if had:
            self._gone(h)
        return v

    def popitem(self):
        h, v = dict.popitem(self)
        self._gone(h)
        return h, v

    def setdefault(self, h: int, default=None):
        if h not in self:
            self[h] = default
        return dict.__getitem__(self, h)

    def update(self, *args, **kwargs) -> None:
        for h, b in dict(*args, **kwargs).items():
            self[h] = b

    def __ior__(self, other):
        self.update(other)
        return self

    def clear(self) -> None:
        for h in list(self):
            del self[h]

    def __reduce__(self):
        # a copy (pickle, deepcopy) is a plain map: the index belongs to the live cluster
        return dict, (dict(self),)


class PrefixIndex:
    """Which engines of a cluster hold each block hash in their prefix cache: ``owners[hash]`` is a
    bitmask, bit ``i`` for the ``i``-th pool. Made from the pools, it replaces each pool's hash map
    by one that keeps the index in step on every insert and removal (so build it before code keeps
    a pool's ``cached`` across calls). An earlier index of any of the same pools stops being kept and
    says so (``replaced`` becomes True).

    Routers that score every engine by its cached prefix (llm-d's prefix scorer,
    ``policies/routing.py``) then pay per block of the prompt's cached prefix, in C, not per engine:
    the walk down the chain ANDs the owner masks of its hashes, engines dropping out at their first
    miss, until no engine is left (llm-d on case (b): about 1.4×, README speed section, round 6).
    Keeping the index costs every cache insert and eviction a
    Python-level call, so only a router that needs every count should build one: prefix-affinity's
    longest-prefix search (one lookup per engine) ran 8 % slower through it.
    """

    __slots__ = ("owners", "maps", "_replaced", "_all")

    def __init__(self, pools: list[BlockPool]) -> None:
        self.owners: dict[int, int] = {}
        self.maps: list[dict] = []
        self._replaced = [False]
        for i, pool in enumerate(pools):
            old = pool.cached
            if isinstance(old, _IndexedMap):
                old._replaced[0] = True   # that index no longer sees this pool's changes
            pool.cached = _IndexedMap(dict(old), self.owners, 1 << i, self._replaced)
            self.maps.append(pool.cached)
        self._all = (1 << len(pools)) - 1

    @property
    def replaced(self) -> bool:
        """A later index took over one of this index's pools: its counts no longer follow them."""
        return self._replaced[0]

    def cached_prefix(self, block_hashes) -> list[int]:
        """How many of ``block_hashes`` each pool caches as a prefix, in pool order (equal to
        :meth:`BlockPool.num_cached_prefix` of each)."""
        n = len(self.maps)
        counts = [0] * n
        if not n:
            return counts
        # the engines holding the whole prefix so far, after each hash (in C, up to the first
        # hash no engine of the prefix holds); it changes at a few depths, where engines drop out
        alive = self._all
        d = 0
        for mask, run in groupby(takewhile(bool, accumulate(map(self.owners.get, block_hashes, repeat(0)), and_))):
            if d:
                _set_bits(counts, alive & ~mask, d)
            d += len(list(run))
            alive = mask
        if d:
            _set_bits(counts, alive, d)
        return counts


def _set_bits(counts: list[int], mask: int, value: int) -> None:
    """``counts[i] = value`` for every bit ``i`` of ``mask``."""
    if mask.bit_count() <= 8:
        while mask:
            low = mask & -mask
            counts[low.bit_length() - 1] = value
            mask ^= low
    else:
        # many engines at once: one pass over the binary digits, lowest first
        digits = bin(mask)[:1:-1]
        counts[:len(digits)] = [value if b == "1" else c for b, c in zip(digits, counts)]

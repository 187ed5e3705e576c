"""What one KV block's life costs in the block pool, against how many pools share the machine's
caches (issue 10). Not a test.

Each "call" takes ``--blocks`` new blocks from one pool (the oldest free ones, evicting their cached
hashes), caches them under fresh hashes and frees them ``--live`` calls later, pools taken in turn,
as a round-robin router spreads calls over engines. Every pool holds ``--pool-blocks`` blocks, all
handed out once before timing starts (the steady state of a long run). The same code and the same
number of operations run with 1 pool and with many: the difference is where the data lie in
memory, not work. Three columns:

- ``BlockPool``: the simulator's pool (``agentsim.sim.kv``) with vLLM's LRU queue: ``allocate``,
  ``cache`` (``KVCacheManager``'s rule), ``free``; every block an object.
- ``arrays``: a prototype of an LRU pool with block state in per-pool lists indexed by block id
  (reference count, hash, free-queue count; the queue a deque of ids), the same hash map. It keeps
  only what the LRU order needs (``BlockPool`` also writes the fields other evict policies read), so
  it does a little less. Not the simulator's code: it is here to show what that layout would gain.
- ``hash maps``: the prefix-cache maps alone, the same dict operations per block as the pool
  (an insert when a block is cached, a lookup and a delete when it is evicted).
- ``compiled``: what a compiled pool would cost (needs ``pip install numba``; the column says
  "no numba" without it). The ``arrays`` prototype's LRU order in machine integers, compiled with
  numba: per pool, block state in int arrays, the free queue a ring of block ids and the
  prefix-cache map an open-addressing table (linear probing, deletion by backward shift) of 64-bit
  hashes, one compiled call per simulated call, the Python-to-numba crossing (hash list to array,
  dispatch) included. Like ``arrays`` it keeps only what LRU needs, and with no prefix hits here its
  queue never holds a removed block, so it is a lower bound for a compiled pool, not a design.

    python benchmarks/kv_locality.py                      # 1, 8 and 80 pools of 27,000 blocks
    python benchmarks/kv_locality.py --pools 1 80 --calls 40000
"""

from __future__ import annotations

import argparse
import functools
import gc
import random
import statistics
import sys
import time
from collections import deque


class ArrayPool:
    """Prototype: an LRU block pool whose block state is lists indexed by block id."""

    __slots__ = ("num_blocks", "ref", "block_hash", "qkey", "queue", "cached", "num_used")

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref: list[int] = []
        self.block_hash: list = []
        self.qkey: list[int] = []      # entries of the block in the queue, negated while out of it
        self.queue: deque[int] = deque()
        self.cached: dict[int, int] = {}
        self.num_used = 0

    def allocate(self, n: int) -> list[int]:
        ref = self.ref
        base = len(ref)
        fresh = min(self.num_blocks - base, n)
        self.num_used += n
        out = list(range(base, base + fresh))
        if fresh:
            ref.extend([1] * fresh)
            self.block_hash.extend([None] * fresh)
            self.qkey.extend([0] * fresh)
        popleft, qkey, block_hash, cached = self.queue.popleft, self.qkey, self.block_hash, self.cached
        need = n - fresh
        while need:
            b = popleft()
            k = qkey[b]
            if k != 1:
                qkey[b] = k - 1 if k > 0 else k + 1
                continue
            qkey[b] = 0
            h = block_hash[b]
            if h is not None:
                if cached.get(h) == b:
                    del cached[h]
                block_hash[b] = None
            ref[b] = 1
            out.append(b)
            need -= 1
        return out

    def cache(self, b: int, h: int) -> None:
        if self.block_hash[b] is None and h not in self.cached:
            self.block_hash[b] = h
            self.cached[h] = b

    def free(self, blocks: list[int], now: float) -> None:
        ref, qkey = self.ref, self.qkey
        unused = []
        for b in reversed(blocks):
            rc = ref[b] - 1
            ref[b] = rc
            if rc == 0:
                k = qkey[b]
                qkey[b] = 1 - k if k else 1
                unused.append(b)
        self.num_used -= len(unused)
        self.queue.extend(unused)


@functools.lru_cache(maxsize=None)
def _compiled_kernel():
    """The ``compiled`` layout's one-call kernel, or None without numba (compiled on first use)."""
    try:
        from numba import njit
    except ImportError:
        return None
    import numpy as np  # noqa: F401  (numba types the arrays)

    @njit(inline="always")
    def lookup(keys, vals, p, mask, h):
        i = h & mask
        while True:
            k = keys[p, i]
            if k == -1:
                return -1
            if k == h:
                return vals[p, i]
            i = (i + 1) & mask

    @njit(inline="always")
    def delete(keys, vals, p, mask, h):
        i = h & mask
        while keys[p, i] != h:
            if keys[p, i] == -1:
                return
            i = (i + 1) & mask
        j = i
        while True:   # backward shift: move up every later entry of the run whose home is not in (i, j]
            j = (j + 1) & mask
            k = keys[p, j]
            if k == -1:
                break
            home = k & mask
            if (i < j and (home <= i or home > j)) or (i > j and home <= i and home > j):
                keys[p, i] = k
                vals[p, i] = vals[p, j]
                i = j
        keys[p, i] = -1

    @njit
    def one_call(ref, block_hash, ring, counters, keys, vals, p, old, hashes, out):
        # counters[p]: [blocks created, ring head, ring tail]; a pool's blocks ``ref.shape[1]``
        num_blocks = ref.shape[1]
        ring_len = ring.shape[1]
        mask = keys.shape[1] - 1
        c = counters[p]
        for i in range(old.shape[0] - 1, -1, -1):      # free, tail first (vLLM's order)
            b = old[i]
            rc = ref[p, b] - 1
            ref[p, b] = rc
            if rc == 0:
                ring[p, c[2] % ring_len] = b
                c[2] += 1
        n = hashes.shape[0]
        for i in range(n):                               # allocate: never-used first, then LRU
            if c[0] < num_blocks:
                b = c[0]
                c[0] += 1
            else:
                b = ring[p, c[1] % ring_len]
                c[1] += 1
                h = block_hash[p, b]
                if h != -1:
                    if lookup(keys, vals, p, mask, h) == b:
                        delete(keys, vals, p, mask, h)
                    block_hash[p, b] = -1
            ref[p, b] = 1
            out[i] = b
        for i in range(n):                               # cache under the new hashes
            b = out[i]
            h = hashes[i]
            if block_hash[p, b] == -1 and lookup(keys, vals, p, mask, h) == -1:
                block_hash[p, b] = h
                slot = h & mask
                while keys[p, slot] != -1:
                    slot = (slot + 1) & mask
                keys[p, slot] = h
                vals[p, slot] = b

    return one_call


def _pools(layout: str, num_pools: int, pool_blocks: int) -> tuple[list, object]:
    """The pools and a ``one_call(pool, held_blocks_to_free, new_hashes) -> new blocks``."""
    if layout == "BlockPool":
        from agentsim.policies.baseline import LRUFreeQueue
        from agentsim.sim.kv import BlockPool

        pools = [BlockPool(pool_blocks + 1, LRUFreeQueue()) for _ in range(num_pools)]

        def one(pool, old, hashes):
            if old is not None:
                pool.free(old, 0.0)
            out = pool.allocate(len(hashes), 0.0, 0, 0, 0)
            for b, h in zip(out, hashes):
                pool.cache(b, h)
            return out
    elif layout == "arrays":
        pools = [ArrayPool(pool_blocks) for _ in range(num_pools)]

        def one(pool, old, hashes):
            if old is not None:
                pool.free(old, 0.0)
            out = pool.allocate(len(hashes))
            for b, h in zip(out, hashes):
                pool.cache(b, h)
            return out
    elif layout == "compiled":
        import numpy as np

        kernel = _compiled_kernel()
        size = 1 << (2 * pool_blocks - 1).bit_length()      # table at most half full
        state = (np.zeros((num_pools, pool_blocks), np.int32), np.full((num_pools, pool_blocks), -1, np.int64),
                 np.zeros((num_pools, pool_blocks + 1), np.int32), np.zeros((num_pools, 3), np.int64),
                 np.full((num_pools, size), -1, np.int64), np.zeros((num_pools, size), np.int32))
        none = np.zeros(0, np.int32)
        pools = list(range(num_pools))

        def one(pool, old, hashes):
            out = np.empty(len(hashes), np.int32)
            kernel(*state, pool, none if old is None else old, np.array(hashes, np.int64), out)
            return out
    else:   # the hash maps alone: a block's hash enters at cache time and leaves at its eviction
        pools = [({}, deque()) for _ in range(num_pools)]

        def one(pool, old, hashes):
            cached, order = pool
            while len(order) + len(hashes) > pool_blocks:
                h = order.popleft()
                if cached.get(h) is not None:
                    del cached[h]
            for h in hashes:
                if h not in cached:
                    cached[h] = h
            order.extend(hashes)
            return hashes
    return pools, one


def per_block_ns(layout: str, num_pools: int, pool_blocks: int, blocks: int, live: int, calls: int,
                 seed: int) -> float:
    """Median over 5 rounds of CPU nanoseconds per block (allocate + cache + free)."""
    rng = random.Random(seed)
    pools, one = _pools(layout, num_pools, pool_blocks)
    held = [deque() for _ in range(num_pools)]
    # the hashes are drawn before timing: the rounds time the pools, not the RNG
    draws = [[rng.getrandbits(62) for _ in range(blocks)] for _ in range(1024)]

    def step(k: int) -> None:
        i = k % num_pools
        q = held[i]
        old = q.popleft() if len(q) >= live else None
        hashes = [h ^ k for h in draws[k % 1024]]   # fresh each call
        q.append(one(pools[i], old, hashes))

    # fill every pool once (never-used blocks first, as a run starts), then reach the steady state
    warm = num_pools * (pool_blocks // blocks + live + 1)
    for k in range(warm):
        step(k)
    # as in a simulation run (agentsim.sim.runner): no cyclic collection while it runs
    gc.collect()
    gc.freeze()
    gc.disable()
    rounds = []
    try:
        for r in range(5):
            c0 = time.process_time()
            for k in range(warm + r * calls, warm + (r + 1) * calls):
                step(k)
            rounds.append((time.process_time() - c0) / (calls * blocks) * 1e9)
    finally:
        gc.enable()
        gc.unfreeze()
    return statistics.median(rounds)


def _bad(msg: str) -> None:
    print(msg, file=sys.stderr)
    sys.exit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pools", type=int, nargs="+", default=[1, 8, 80], help="numbers of pools (engines) to compare")
    ap.add_argument("--pool-blocks", type=int, default=27_000, help="blocks per pool (case b: 27,668 per A100)")
    ap.add_argument("--blocks", type=int, default=26, help="new blocks per call (case b: ~26 per ReAct call)")
    ap.add_argument("--live", type=int, default=50, help="calls holding blocks per pool at a time")
    ap.add_argument("--calls", type=int, default=20_000, help="calls per timed round (5 rounds)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name in ("pools", "pool_blocks", "blocks", "live", "calls"):
        v = getattr(args, name)
        if any(x < 1 for x in (v if isinstance(v, list) else [v])):
            _bad(f"--{name.replace('_', '-')}: must be >= 1, got {v}")
    if args.blocks * (args.live + 1) > args.pool_blocks:
        _bad(f"--blocks x (--live + 1) = {args.blocks * (args.live + 1):,}: more blocks than a pool has "
             f"(--pool-blocks {args.pool_blocks:,})")
    layouts = ["BlockPool", "arrays", "hash maps", "compiled"]
    if _compiled_kernel() is None:
        print("compiled: no numba here (pip install numba); that column is left out", file=sys.stderr)
        layouts.pop()
    print(f"{args.pool_blocks:,} blocks per pool, {args.blocks} blocks per call, {args.live} calls held per pool; "
          "CPU ns per block (allocate + cache + free), median of 5 rounds")
    print("| pools | blocks in all pools | " + " | ".join(layouts) + " |\n|---|---|" + "---|" * len(layouts))
    base: dict[str, float] = {}
    for p in args.pools:
        cells = []
        for layout in layouts:
            ns = per_block_ns(layout, p, args.pool_blocks, args.blocks, args.live, args.calls, args.seed)
            base.setdefault(layout, ns)
            cells.append(f"{ns:.0f} ({ns / base[layout]:.2f}x)")
        print(f"| {p} | {p * args.pool_blocks:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

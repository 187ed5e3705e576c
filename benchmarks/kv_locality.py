"""What one KV block's life costs in the block pool, against how many pools share the machine's
caches (issue 10). Not a test.

Each "call" takes ``--blocks`` new blocks from one pool (``BlockPool.allocate``: the oldest free
ones, evicting their cached hashes), caches them under fresh hashes (``KVCacheManager``'s rule:
``BlockPool.cache``) and frees them ``--live`` calls later (``BlockPool.free``), pools taken in
turn, as a round-robin router spreads calls over engines. Every pool holds ``--pool-blocks``
blocks, all handed out once before timing starts (the steady state of a long run). The same
code and the same number of operations run with 1 pool and with many: the difference is where
the blocks and hash maps lie in memory, not work.

    python benchmarks/kv_locality.py                      # 1, 8 and 80 pools of 27,000 blocks
    python benchmarks/kv_locality.py --pools 1 80 --calls 40000
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import deque


def per_block_ns(num_pools: int, pool_blocks: int, blocks: int, live: int, calls: int, seed: int) -> float:
    """Median over 5 rounds of CPU nanoseconds per block (allocate + cache + free)."""
    from agentsim.policies.baseline import LRUFreeQueue
    from agentsim.sim.kv import BlockPool

    rng = random.Random(seed)
    pools = [BlockPool(pool_blocks + 1, LRUFreeQueue()) for _ in range(num_pools)]
    held = [deque() for _ in range(num_pools)]

    def one_call(i: int, now: float) -> None:
        pool = pools[i]
        q = held[i]
        if len(q) >= live:
            pool.free(q.popleft(), now)
        out = pool.allocate(blocks, now, 0, 0, 0)
        for b in out:
            pool.cache(b, rng.getrandbits(62))
        q.append(out)

    # fill every pool once (never-used blocks first, as a run starts), then reach the steady state
    warm = num_pools * (pool_blocks // blocks + live + 1)
    for k in range(warm):
        one_call(k % num_pools, 0.0)
    rounds = []
    for r in range(5):
        c0 = time.process_time()
        for k in range(calls):
            one_call(k % num_pools, float(r))
        rounds.append((time.process_time() - c0) / (calls * blocks) * 1e9)
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
    print(f"{args.pool_blocks:,} blocks per pool, {args.blocks} blocks per call, {args.live} calls held per pool")
    print("| pools | blocks in all pools | CPU ns per block (allocate + cache + free), median of 5 |\n|---|---|---|")
    base = None
    for p in args.pools:
        ns = per_block_ns(p, args.pool_blocks, args.blocks, args.live, args.calls, args.seed)
        base = base or ns
        print(f"| {p} | {p * args.pool_blocks:,} | {ns:.0f} ({ns / base:.2f}x) |")


if __name__ == "__main__":
    main()

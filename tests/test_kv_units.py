"""Unit tests of the simulator's KV layers, bottom up: the LRU free-block queue, the block pool, the KV
cache manager (``sim/kv.py``, ``sim/kv_manager.py``; vLLM v1 ``block_pool.py``, ``kv_cache_utils.py``
``FreeKVCacheBlockQueue``, ``kv_cache_manager.py``). Every expected value is counted by hand."""

from __future__ import annotations

import random
from collections import OrderedDict
from types import SimpleNamespace

import pytest

from agentsim.policies.base import BlockView
from agentsim.policies.baseline import LRUFreeQueue
from agentsim.sim.kv import BlockPool
from agentsim.sim.kv_manager import KVCacheManager

BS = 4


def _call(prompt: int, hashes: list[int], generated: int = 0, computed: int = 0):
    return SimpleNamespace(num_prompt_tokens=prompt, num_generated=generated, num_computed=computed,
                           full_hashes=hashes, blocks=[], program_id=7, agent_id=3, kv_hold=None)


# ----------------------------------------------------------------------------- free queue
def test_lru_free_queue_pops_least_recently_freed_and_removes_from_the_middle():
    q = LRUFreeQueue()
    b = [BlockView(i) for i in range(4)]
    for x in b:
        q.append(x, 0.0)
    q.remove(b[1])
    assert len(q) == 3
    assert [q.pop(1.0).block_id for _ in range(3)] == [0, 2, 3]
    assert len(q) == 0


def test_lru_free_queue_bulk_forms_and_lazy_removal_match_an_ordered_dict_lru():
    """Random appends (one or bulk), removals from the middle, pops (one or bulk) and compactions:
    the deque with lazy removal hands out exactly what a plain ordered-dict LRU does."""
    rng = random.Random(5)
    for _ in range(30):
        q, ref = LRUFreeQueue(), OrderedDict()
        blocks = [BlockView(i) for i in range(40)]
        for _ in range(1500):
            free = [b for b in blocks if b.block_id in ref]
            used = [b for b in blocks if b.block_id not in ref]
            op = rng.random()
            if op < 0.35 and used:
                bs = rng.sample(used, rng.randint(1, min(5, len(used))))
                if rng.random() < 0.5:
                    q.append_blocks(bs, 0.0)
                else:
                    for b in bs:
                        q.append(b, 0.0)
                ref.update((b.block_id, b) for b in bs)
            elif op < 0.6 and free:
                b = rng.choice(free)
                q.remove(b)
                del ref[b.block_id]
            elif free:
                n = rng.randint(1, min(4, len(free)))
                got = q.pop_blocks(n, 0.0) if rng.random() < 0.5 else [q.pop(0.0) for _ in range(n)]
                assert [b.block_id for b in got] == [ref.popitem(last=False)[0] for _ in range(n)]
            if rng.random() < 0.01:
                q._compact()
            assert len(q) == len(ref)


# ----------------------------------------------------------------------------- block pool
def test_pool_reserves_the_null_block_and_hands_out_never_used_blocks_in_id_order():
    pool = BlockPool(6, LRUFreeQueue())          # block 0 is V1's null block
    assert pool.num_blocks == 5 and pool.num_free == 5 and pool.usage == 0.0
    out = pool.allocate(3, 1.0, program_id=1, agent_id=2, first_position=10)
    assert [b.block_id for b in out] == [1, 2, 3]
    assert [b.position for b in out] == [10, 11, 12] and all(b.ref_count == 1 for b in out)
    assert pool.num_used == 3 and pool.num_free == 2 and pool.usage == pytest.approx(3 / 5)
    assert pool.num_never_used == 2
    pool.check()
    with pytest.raises(ValueError):
        BlockPool(2, LRUFreeQueue(), num_reserved=2)


def test_pool_frees_tail_first_and_reuses_never_used_blocks_before_freed_ones():
    pool = BlockPool(5, LRUFreeQueue())          # 4 usable: ids 1..4
    a = pool.allocate(3, 0.0, 1, 1, 0)           # ids 1, 2, 3
    pool.free(a, 1.0)                            # tail first: queue 3, 2, 1
    assert pool.num_used == 0 and len(pool.free_queue) == 3
    out = pool.allocate(2, 2.0, 2, 2, 0)
    assert [b.block_id for b in out] == [4, 3]  # the never-used block first, then the least recently freed
    pool.check()


def test_pool_evicting_a_cached_block_drops_its_hash_and_tells_the_listener():
    pool = BlockPool(3, LRUFreeQueue())          # 2 usable
    seen = []
    pool.on_evict(lambda h, now: seen.append((h, now)))
    a = pool.allocate(2, 0.0, 1, 1, 0)
    pool.cache(a[0], 111)
    pool.cache(a[1], 111)                        # a duplicate hash stays uncached (vLLM)
    assert a[1].block_hash is None and pool.cached == {111: a[0]}
    pool.free(a, 1.0)                            # queue: a[1], a[0]
    b = pool.allocate(1, 2.0, 2, 2, 0)
    assert b[0] is a[1] and seen == [] and pool.num_evictions == 0   # uncached block: nothing evicted
    c = pool.allocate(1, 3.0, 2, 2, 1)
    assert c[0] is a[0] and seen == [(111, 3.0)] and pool.num_evictions == 1
    assert c[0].block_hash is None and 111 not in pool.cached
    pool.check()


def test_pool_touch_takes_free_hits_off_the_queue_and_counts_them_once():
    pool = BlockPool(4, LRUFreeQueue())
    a = pool.allocate(2, 0.0, 1, 1, 0)
    pool.cache(a[0], 5)
    pool.free(a[1:], 1.0)                        # a[0] still held, a[1] free
    pool.touch([a[0], a[1]], 2.0, program_id=9, agent_id=8)
    assert a[0].ref_count == 2 and a[1].ref_count == 1
    assert pool.num_used == 2 and len(pool.free_queue) == 0
    assert a[1].program_id == 9 and a[1].last_used_at == 2.0
    assert pool.num_cached_prefix([5, 6, 5], 3) == 1 and pool.num_cached_prefix([5], 0) == 0
    pool.check()


# ----------------------------------------------------------------------------- KV cache manager
def test_manager_never_returns_the_block_of_the_last_known_token():
    pool = BlockPool(10, LRUFreeQueue())
    kv = KVCacheManager(pool, BS, enable_caching=True)
    first = _call(8, [1, 2])
    assert kv.allocate_slots(first, 8, 0.0, new_computed_blocks=kv.get_computed_blocks(first)) is not None
    first.num_computed = 8
    kv.cache_full_blocks(first, 0, 8)
    assert set(pool.cached) == {1, 2}
    same = _call(8, [1, 2])                      # 8 tokens = 2 full blocks, but token 8 must be recomputed
    assert [b.block_hash for b in kv.get_computed_blocks(same)] == [1]
    longer = _call(9, [1, 2])
    assert [b.block_hash for b in kv.get_computed_blocks(longer)] == [1, 2]
    assert KVCacheManager(pool, BS, enable_caching=False).get_computed_blocks(longer) == []


def test_manager_allocate_slots_counts_free_hits_against_the_free_blocks():
    pool = BlockPool(5, LRUFreeQueue())          # 4 usable
    kv = KVCacheManager(pool, BS, enable_caching=True)
    a = _call(8, [1, 2])
    kv.allocate_slots(a, 8, 0.0, new_computed_blocks=[])
    a.num_computed = 8
    kv.cache_full_blocks(a, 0, 8)
    kv.free(a, 1.0)
    assert a.blocks == [] and pool.num_used == 0
    b = _call(17, [1, 2, 3, 4])                  # hits: 2 free cached blocks; new tokens 9 -> 3 more blocks
    hits = kv.get_computed_blocks(b)
    assert len(hits) == 2
    assert kv.allocate_slots(b, 9, 2.0, new_computed_blocks=hits) is None   # 3 new + 2 evictable > 4 free
    assert pool.num_used == 0 and b.blocks == []                              # nothing changed
    c = _call(13, [1, 2, 3])                     # 2 hits + 5 new tokens -> 2 new blocks: 4 <= 4
    new = kv.allocate_slots(c, 5, 3.0, new_computed_blocks=kv.get_computed_blocks(c))
    assert len(new) == 2 and len(c.blocks) == 4 and pool.num_used == 4
    c.num_computed = 13
    assert kv.allocate_slots(c, 3, 4.0) == []    # 16 tokens still fit the 4 blocks held
    assert kv.allocate_slots(c, 4, 4.0) is None  # decode growth: 13 + 4 tokens need a 5th block, none free
    pool.check()


def test_manager_caches_only_blocks_that_became_full_and_computed():
    pool = BlockPool(10, LRUFreeQueue())
    kv = KVCacheManager(pool, BS, enable_caching=True)
    c = _call(10, [11, 12])                      # 10 tokens: 2 full blocks + 2 tokens
    kv.allocate_slots(c, 6, 0.0, new_computed_blocks=[])   # a first chunk of 6 tokens
    c.num_computed = 6
    kv.cache_full_blocks(c, 0, 6)
    assert set(pool.cached) == {11}
    kv.allocate_slots(c, 4, 1.0)
    c.num_computed = 10
    kv.cache_full_blocks(c, 6, 10)
    assert set(pool.cached) == {11, 12} and c.blocks[2].block_hash is None
    KVCacheManager(pool, BS, enable_caching=False).cache_full_blocks(c, 0, 10)   # a no-op without caching
    pool.check()


def test_pool_allocate_each_hands_out_what_one_allocate_per_owner_would():
    def run(bulk: bool):
        pool = BlockPool(7, LRUFreeQueue())          # 6 usable
        first = pool.allocate(4, 0.0, 1, 1, 0)
        for k, b in enumerate(first):
            pool.cache(b, 100 + k)
        pool.free(first, 1.0)                        # queue: 4, 3, 2, 1 (all cached)
        owners = [SimpleNamespace(blocks=[object()] * k, program_id=10 + k, agent_id=20 + k) for k in range(4)]
        if bulk:
            pool.allocate_each(owners, 2.0)
        else:
            for o in owners:
                o.blocks = o.blocks + pool.allocate(1, 2.0, o.program_id, o.agent_id, len(o.blocks))
        pool.check()
        return ([(o.blocks[-1].block_id, o.blocks[-1].program_id, o.blocks[-1].agent_id, o.blocks[-1].position)
                 for o in owners], pool.num_evictions, sorted(pool.cached))

    assert run(True) == run(False)
    assert run(True)[0] == [(5, 10, 20, 0), (6, 11, 21, 1), (4, 12, 22, 2), (3, 13, 23, 3)]
    assert run(True)[1:] == (2, [100, 101])


# ----------------------------------------------------------------------------- block hashes
def _reference_block_hashes(segments, block_size: int) -> list[int]:
    """The definition, token by token: a block's pieces are its maximal runs of one segment
    ``(seg_id, start, end)``; its hash chains the previous block's hash and its pieces."""
    tokens = [(s.seg_id, i) for s in segments for i in range(s.num_tokens)]
    out, prev = [], 0
    for b in range(len(tokens) // block_size):
        pieces = []
        for seg_id, i in tokens[b * block_size:(b + 1) * block_size]:
            if pieces and pieces[-1][0] == seg_id and pieces[-1][2] == i:
                pieces[-1] = (seg_id, pieces[-1][1], i + 1)
            else:
                pieces.append((seg_id, i, i + 1))
        prev = hash((prev, tuple(pieces)))
        out.append(prev)
    return out


def test_context_block_hashes_match_the_token_by_token_definition():
    """Random contexts grown turn by turn (empty and block-spanning segments, a segment id used
    twice, block sizes 1-32): the incremental, shared-with-the-parent hashing gives the same chain."""
    from agentsim.workload import Context, Segment

    rng = random.Random(11)
    for _ in range(200):
        bs = rng.choice([1, 2, 3, 4, 16, 32])
        ctx = Context.of(Segment(rng.randint(1, 5), rng.randint(0, 70)))
        for _ in range(rng.randint(1, 6)):
            ctx = ctx.extend(*[Segment(rng.randint(1, 5), rng.randint(0, 70)) for _ in range(rng.randint(1, 3))])
            assert ctx.block_hashes(bs) == _reference_block_hashes(ctx.all_segments(), bs)


# ----------------------------------------------------------------------------- cluster prefix index
def test_prefix_index_counts_what_every_pool_counts_under_random_changes():
    """``PrefixIndex`` (llm-d's prefix scorer reads it) stays equal to the pools' own maps through
    every way of adding and removing a hash, and its per-pool prefix counts equal each pool's
    ``num_cached_prefix``: chains with holes, hashes shared by several pools, empty chains, an index
    built over maps that already hold hashes and rebuilt over the same pools."""
    from agentsim.sim.kv import PrefixIndex

    rng = random.Random(1)
    checks = 0
    for _ in range(200):
        # up to 20 pools: many engines dropping out at one depth take another path than a few
        pools = [BlockPool(50, LRUFreeQueue()) for _ in range(rng.choice([rng.randint(1, 9), rng.randint(10, 20)]))]
        chains = [[rng.randint(0, 30) for _ in range(rng.randint(0, 12))] for _ in range(12)]
        if rng.random() < 0.5:
            # a prefix every pool holds (a shared system prompt): all drop out after it together
            shared = [31, 32, 33]
            for p in pools:
                for h in shared:
                    p.cached[h] = BlockView(0, h)
            chains += [shared + c for c in chains]

        def change():
            m = rng.choice(pools).cached
            op = rng.random() if m else 0.0
            h = rng.randint(0, 30) if op < 0.5 else rng.choice(list(m))
            if op < 0.35:
                m[h] = BlockView(0, h)
            elif op < 0.42:
                m.setdefault(h, None)
            elif op < 0.5:
                m.update({h: None, h + 1: None})
            elif op < 0.8:
                del m[h]
            elif op < 0.9:
                m.pop(h)
            elif op < 0.97:
                m.popitem()
            else:
                m.clear()

        for _ in range(rng.randint(0, 40)):
            change()
        index = PrefixIndex(pools)
        assert not index.replaced
        if rng.random() < 0.2:
            old, index = index, PrefixIndex(pools)   # the cluster re-indexed: the new index takes over
            assert old.replaced and not index.replaced
        for _ in range(30):
            change()
            owners = {}
            for i, p in enumerate(pools):
                for h in p.cached:
                    owners[h] = owners.get(h, 0) | 1 << i
            assert index.owners == owners
            for chain in chains:
                assert index.cached_prefix(chain) == [p.num_cached_prefix(chain, len(chain)) for p in pools]
                checks += 1
    assert checks > 50_000
    assert PrefixIndex([]).cached_prefix([1, 2]) == []
    # a copy of an indexed map is a plain map with the same entries; the index does not follow it
    import copy
    import pickle

    m = pools[0].cached
    for c in (copy.deepcopy(m), pickle.loads(pickle.dumps(m)), copy.copy(m)):
        assert type(c) is dict and c.keys() == m.keys()
        c[10**6] = None
    assert 10**6 not in index.owners


def test_an_engine_list_rebuilds_its_prefix_index_when_another_takes_its_pools():
    """Two engine lists over the same engines: each index build replaces the pools' maps, so the
    other list's index stops following them; the list notices (``replaced``) and rebuilds, and both
    keep counting right."""
    from agentsim.config import load_config
    from agentsim.sim.engine import EngineList
    from agentsim.sim.runner import Simulation

    sim = Simulation(load_config(None, {"cluster.gpus_per_node": 2, "workload.agents": 4, "duration": 1.0}))
    a, b = EngineList(sim.engines), EngineList(sim.engines)
    assert a.cached_prefix([5]) == b.cached_prefix([5]) == [0, 0]
    sim.engines[0].pool.cached[5] = BlockView(0, 5)
    sim.engines[1].pool.cached[7] = BlockView(1, 7)
    assert a.cached_prefix([5]) == [1, 0] and b.cached_prefix([7]) == [0, 1]
    del sim.engines[0].pool.cached[5]
    assert a.cached_prefix([5]) == b.cached_prefix([5]) == [0, 0]

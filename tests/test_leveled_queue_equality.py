"""The leveled free-block queue (ScaleSim, KVFlow eviction) against a plain reference.

``LeveledFreeQueue`` keeps each group's oldest time as blocks come and go and asks the policy for all
its groups' levels at once (``InvocationDistance.levels``: numpy over the distance table); the
reference below is the queue as it was before (every group's first block and level looked up one by
one at each rebuild): small and obviously right. Random appends, removals, pops, clock moves and
distance-table events must give the same block at every pop and the same evictable histogram.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict

import pytest

from agentsim.policies.base import BlockView
from agentsim.policies.distance import (_NOHASH, _SHARED, _SUFFIX, INF, InvocationDistance, LeveledFreeQueue,
                                        StepsToExecution)


class ReferenceLeveledQueue:
    """Free blocks by their holder's level (higher first), then least recently freed: per group, its
    first block's time and its level read at each rebuild."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.block_size = 16
        self.groups: dict[int, OrderedDict] = {}
        self.users: dict[int, dict] = {}
        self.shared_users: dict[int, None] = {}
        self.n = 0
        self.heap: list = []
        self.epoch = None
        self.seq = 0

    def group_of(self, block) -> int:
        if block.block_hash is None:
            return _NOHASH
        if self.policy.is_suffix(block, self.block_size):
            return _SUFFIX
        users = self.users.get(block.block_id)
        a = block.agent_id
        if users is None:
            self.users[block.block_id] = {a: None}
            return a
        users.pop(a, None)
        users[a] = None
        if len(users) == 1:
            return a
        for u in users:
            self.shared_users.pop(u, None)
            self.shared_users[u] = None
        return _SHARED

    def append(self, block, now: float) -> None:
        g = self.group_of(block)
        block.qkey = g
        grp = self.groups.setdefault(g, OrderedDict())
        was_empty = not grp
        grp[block.block_id] = block
        self.n += 1
        if was_empty and self.epoch is not None and g != _NOHASH:
            self.push(g, now)

    def remove(self, block) -> None:
        grp = self.groups[block.qkey]
        del grp[block.block_id]
        self.n -= 1
        if not grp:
            del self.groups[block.qkey]
            if block.qkey == _SHARED:
                self.shared_users = {}

    def level(self, g: int, now: float) -> float:
        if g == _SUFFIX:
            return INF
        if g == _SHARED:
            level = INF
            for a in reversed(self.shared_users):
                lv = self.policy.level(a, now)
                if lv < level:
                    level = lv
                    if level <= self.policy.min_level:
                        break
            return level
        return self.policy.level(g, now)

    def push(self, g: int, now: float) -> None:
        oldest = next(iter(self.groups[g].values())).last_used_at
        self.seq += 1
        heapq.heappush(self.heap, (-self.level(g, now), oldest, self.seq, g))

    def pop(self, now: float):
        nohash = self.groups.get(_NOHASH)
        if nohash:
            _, block = nohash.popitem(last=False)
            self.n -= 1
            if not nohash:
                del self.groups[_NOHASH]
            return block
        if self.epoch != (now, self.policy.version):
            self.heap = []
            for g in self.groups:
                if g != _NOHASH:
                    self.push(g, now)
            self.epoch = (now, self.policy.version)
        while True:
            g = self.heap[0][3]
            grp = self.groups.get(g)
            if grp is None:
                heapq.heappop(self.heap)
                continue
            _, block = grp.popitem(last=False)
            self.n -= 1
            if not grp:
                del self.groups[g]
                heapq.heappop(self.heap)
                if g == _SHARED:
                    self.shared_users = {}
            self.users.pop(block.block_id, None)
            return block

    def evictable_by_level(self, now: float) -> list:
        hist: dict = {}
        for g, grp in self.groups.items():
            lv = INF if g == _NOHASH else self.level(g, now)
            hist[lv] = hist.get(lv, 0) + len(grp)
        return sorted(hist.items(), reverse=True)


class _Call:
    def __init__(self, agent_id: int) -> None:
        self.agent_id = agent_id
        self.program_id = 0
        self.hints = type("H", (), {"next_invocation_distance": None, "next_invocation_steps": None,
                                    "fixed_prefix_tokens": None, "stage": None})()


class _PlainLeveled:
    """A user's LeveledEvict policy: ``level``, ``is_suffix``, ``version``, ``min_level`` and nothing else
    (the queue asks it one agent at a time), here over a time-based distance table."""

    min_level = 0.0

    def __init__(self) -> None:
        self.inner = InvocationDistance(source="oracle", unit=0.5, hold_levels=3, cpu_tier=False)
        self.table = self.inner.table

    @property
    def version(self) -> int:
        return self.inner.version

    def level(self, agent_id: int, now: float) -> float:
        return self.inner.level(agent_id, now)

    def is_suffix(self, block, block_size: int) -> bool:
        return block.position >= 6

    def on_distance_update(self, distances: dict, now: float) -> None:
        self.inner.on_distance_update(distances, now)


class _OwnLevel(InvocationDistance):
    """A subclass with its own level rule: the queue must follow it, not the bulk arithmetic."""

    def level(self, agent_id: int, now: float) -> float:
        return 10.0 - super().level(agent_id, now)


class _OwnSuffix(InvocationDistance):
    """A subclass with a suffix rule of its own."""

    def is_suffix(self, block, block_size: int) -> bool:
        return block.position >= 6


class _OwnSteps(StepsToExecution):
    """A KVFlow subclass with its own level rule: the queue must follow it, not the bulk arithmetic."""

    def level(self, agent_id: int, now: float) -> float:
        return 50.0 - min(super().level(agent_id, now), 40.0)


def _policy(kind: str):
    if kind == "steps-to-execution":
        return StepsToExecution(graph="hints", cpu_tier=False)
    if kind == "own-steps":
        return _OwnSteps(graph="hints", cpu_tier=False)
    if kind == "plain":
        return _PlainLeveled()
    if kind in ("own-level", "own-suffix"):
        return (_OwnLevel if kind == "own-level" else _OwnSuffix)(source="oracle", unit=0.5, hold_levels=3,
                                                                    cpu_tier=False)
    return InvocationDistance(source=kind, unit=0.5, hold_levels=3, cpu_tier=False)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["oracle", "ewma", "steps", "steps-to-execution", "own-steps", "plain",
                                  "own-level", "own-suffix"])
def test_leveled_queue_pops_what_the_reference_pops(kind, seed):
    rng = random.Random(seed)
    pol = _policy(kind)
    fast, ref = LeveledFreeQueue(pol, 0), ReferenceLeveledQueue(pol)
    agents = [0, 1, 2, 3, 5, 8, 13, 10**12 + 7, 2**40]   # ids as small ints and as the big stable ids
    hashes = list(range(1000, 1040))
    twins: dict[int, tuple[BlockView, BlockView]] = {}
    free: set[int] = set()
    now = 0.0
    pops = 0
    seen_groups: set[int] = set()
    for _ in range(3000):
        op = rng.random()
        if op < 0.4 and len(free) < 300:
            # one block, or a call's blocks at once (the pool's append_blocks), one agent's or mixed
            bids = [b for b in rng.sample(range(400), rng.choice([1, 1, 2, 5])) if b not in free]
            agent = rng.choice(agents)
            new = []
            for bid in bids:
                h = None if rng.random() < 0.1 else rng.choice(hashes + [rng.randrange(10**9)])
                a = agent if rng.random() < 0.8 else rng.choice(agents)
                fields = (bid, h, 0, now, 0, a, rng.randrange(8))
                twins[bid] = (BlockView(*fields), BlockView(*fields))
                new.append(bid)
                free.add(bid)
            if len(new) == 1 and rng.random() < 0.5:
                fast.append(twins[new[0]][0], now)
            else:
                fast.append_blocks([twins[b][0] for b in new], now)
            for b in new:
                ref.append(twins[b][1], now)
        elif op < 0.5 and free:
            bid = rng.choice(sorted(free))
            fast.remove(twins[bid][0])
            ref.remove(twins[bid][1])
            free.discard(bid)
        elif op < 0.75 and free:
            k = min(len(free), rng.choice([1, 1, 1, 3]))
            got = [fast.pop(now)] if k == 1 and rng.random() < 0.5 else fast.pop_blocks(k, now)
            want = [ref.pop(now) for _ in range(k)]
            assert [b.block_id for b in got] == [b.block_id for b in want], (pops, got, want)
            free.difference_update(b.block_id for b in got)
            pops += k
        elif op < 0.85:
            now += rng.choice([0.0, 0.1, 0.25, 0.5, 1.0])
        else:
            # distance-table events: calls arrive and end, a step clock moves, distances pushed
            a = rng.choice(agents)
            t = pol.table
            c = _Call(a)
            if kind in ("oracle", "ewma", "plain", "own-level", "own-suffix"):
                if rng.random() < 0.5:
                    t.on_call_arrive(c, now)
                else:
                    c.hints.next_invocation_distance = rng.choice([0.0, 0.2, 0.5, 1.0, 1.7, 3.0])
                    t.on_call_finish(c, now)
                if rng.random() < 0.2:
                    pol.on_distance_update({rng.choice(agents): rng.choice([None, 0.4, 2.5])}, now)
            elif kind == "steps":
                if rng.random() < 0.5:
                    t.on_call_arrive(c, now)
                else:
                    c.hints.next_invocation_steps = rng.randrange(0, 6)
                    t.on_call_finish(c, now)
                if rng.random() < 0.3:
                    t.on_tool_end(0, a, "world", now)
            else:
                # KVFlow: calls of several workflow clients (programs) arrive and end, some left
                # running, some without a hinted next call; programs start and end (the client map)
                c.program_id = rng.randrange(3)
                if rng.random() < 0.15:
                    pol.on_program_start(c.program_id, rng.choice(agents), "kvflow", now)
                elif rng.random() < 0.05:
                    pol.on_program_end(c.program_id, now)
                c.hints.next_invocation_steps = rng.choice([None, 1, 2, 3, 5])
                c.hints.fixed_prefix_tokens = rng.choice([None, 32, 64])   # blocks past it: the suffix group
                if a in t.active and rng.random() < 0.6:
                    pol.on_call_finish(c, now)
                else:
                    pol.on_call_arrive(c, now)
                    if rng.random() < 0.5:
                        pol.on_call_finish(c, now)
        assert len(fast) == ref.n
        seen_groups.update(fast._groups)
        if rng.random() < 0.05:
            assert fast.evictable_by_level(now) == ref.evictable_by_level(now)
    assert pops > 300
    kinds = set(fast._groups) | seen_groups
    assert _SHARED in kinds and _NOHASH in kinds and (kind not in ("steps-to-execution", "own-steps", "plain", "own-suffix")
                                                        or _SUFFIX in kinds)


def test_a_subclass_with_its_own_append_gets_it_for_a_calls_blocks():
    """The pool hands a call's freed blocks to ``append_blocks``: a queue subclass's own ``append`` (or
    group rule) must still see every block, in order."""

    class Counting(LeveledFreeQueue):
        def __init__(self, *a) -> None:
            super().__init__(*a)
            self.seen: list[int] = []

        def append(self, block, now: float) -> None:
            self.seen.append(block.block_id)
            super().append(block, now)

    q = Counting(InvocationDistance(source="oracle", cpu_tier=False), 0)
    q.append_blocks([BlockView(i, 100 + i, 0, 0.0, 0, 1, i) for i in (3, 1, 2)], 0.0)
    assert q.seen == [3, 1, 2] and len(q) == 3

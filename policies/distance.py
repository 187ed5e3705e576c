"""Invocation-distance KV eviction and prefetch: ScaleSim's D_i buckets and KVFlow's steps-to-execution.

Both keep each agent's free (unreferenced, still cached) KV blocks and evict first the blocks of the
agent whose next LLM call is farthest away; both prefetch, from a CPU KV tier, the blocks of agents
about to run. They differ in how the distance is known and bucketed (research/policies.md §2-3):

- ``invocation-distance`` (ScaleSim): D_i = how many time units (``unit`` seconds, ScaleSim's simulation
  timestep) until agent i's next call, from the program's own hints (``source="oracle"``: a call's
  ``hints.next_invocation_distance`` after it ends), from an online estimator (``"ewma"``: each agent's
  observed gap between a call's end and its next call, exponentially averaged), or from pushed
  ``on_distance_update`` events. Hold priority ``min(hold_levels + 1, D)``, an unknown agent
  ``hold_levels + 1``; evict the highest priority first; prefetch agents with ``D <= look_ahead``.
- ``steps-to-execution`` (KVFlow): the agent's distance in *workflow steps* over an agent step graph
  (``graph="hints"``: the call's ``next_invocation_steps``, counted in calls of its workflow client;
  ``"learned"``: successors observed online, OR-branches take min+1; an explicit graph with AND-joins
  taking max+1). Only each agent's fixed prompt (``hints.fixed_prefix_tokens``) is prioritised; the
  dynamic suffix blocks are evicted first; then prefix blocks by descending steps.

A block shared by several agents (a system prompt) is as valuable as its nearest user: its priority is
the min over the agents that used it. Within one priority, blocks go least recently freed first,
an agent's tail before its head (vLLM's order).

The CPU tier, the PCIe transfers and the skipping of calls whose KV is loading are mechanisms of the
backend (``agentsim.sim.tiers`` in the simulator); these classes only decide: ``new_free_queue``
orders eviction, ``prefetch_candidates(now)`` names the agents to load ahead, ``prefetch_due_at(agent, now)``
says when an agent enters that list without any other event.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import OrderedDict
from itertools import repeat
from typing import Any

import numpy as np

from agentsim.policies.base import BlockView, CallView, TierSettings
from agentsim.policies.registry import check_choice, register, register_bundle
from agentsim.workload import stable_id

INF = math.inf
_SHARED = -(1 << 62)      # group key of blocks used by several agents
_SUFFIX = -(1 << 62) + 1  # group key of dynamic-suffix blocks (KVFlow)
_NOHASH = -(1 << 62) + 2  # blocks with no cached content (a partial last block): reused first, as in vLLM
UNKNOWN_STEPS = 1e9       # KVFlow's level of an agent whose steps to execution are unknown: evicted first
_EXACT_INT = 1 << 53      # float64 holds every integer up to this exactly


def _gauss(*parts: object) -> float:
    """A deterministic standard normal draw named by ``parts`` (no global RNG)."""
    u1 = (stable_id("u1", *parts) + 0.5) / float(1 << 62)
    u2 = (stable_id("u2", *parts) + 0.5) / float(1 << 62)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


class _InFlight:
    """Counts each agent's LLM calls in flight (``self.active``: agent -> calls).

    A table that also keeps numpy arrays indexed by agent slot (for the levels of many agents at
    once) names them in ``_ARRAYS`` as (name, fill) pairs, one of them ``active_array`` (the running
    flag); they live in ``arrays`` (read through properties), ``slot`` maps an agent to its slot (0:
    never seen), and the arrays grow together.
    """

    active: dict[int, int]
    slot: dict[int, int]
    arrays: dict[str, np.ndarray]
    _ARRAYS: tuple[tuple[str, Any], ...] = ()

    def _new_arrays(self) -> None:
        self.slot = {}
        self.arrays = {name: np.full(64, fill, dtype=np.asarray(fill).dtype) for name, fill in self._ARRAYS}

    @property
    def active_array(self) -> np.ndarray:
        return self.arrays["active_array"]

    def _slot(self, agent_id: int) -> int:
        """The agent's slot, made on first sight (the arrays may be replaced: read them after)."""
        i = self.slot.get(agent_id)
        if i is None:
            i = self.slot[agent_id] = len(self.slot) + 1
            arrays = self.arrays
            if i >= len(arrays["active_array"]):
                for name, fill in self._ARRAYS:
                    a = arrays[name]
                    arrays[name] = np.concatenate([a, np.full(len(a), fill, dtype=a.dtype)])
        return i

    def _started(self, agent_id: int) -> None:
        self.active[agent_id] = self.active.get(agent_id, 0) + 1
        if self._ARRAYS:
            i = self._slot(agent_id)   # first: it may replace the arrays
            self.active_array[i] = True

    def _ended(self, agent_id: int) -> None:
        n = self.active.get(agent_id, 0) - 1
        if n > 0:
            self.active[agent_id] = n
        else:
            self.active.pop(agent_id, None)
            if self._ARRAYS:
                i = self._slot(agent_id)
                self.active_array[i] = False


# --------------------------------------------------------------------------- distance estimators
class TimeDistances(_InFlight):
    """Per-agent expected time of the next LLM call (ScaleSim's D_i in seconds).

    ``source``: ``oracle`` (the program's hint when a call ends), ``ewma`` (online, ``alpha``-weighted
    average of the agent's observed gaps; agents not yet seen twice are unknown), ``none`` (only pushed
    ``on_distance_update`` events). ``noise_sigma``: multiply each oracle hint by ``exp(sigma * z)``
    with a deterministic z per call (prediction error of a given size; ``seed`` names the draws).
    """

    SOURCES = ("oracle", "ewma", "none")

    def __init__(self, source: str = "oracle", alpha: float = 0.5, noise_sigma: float = 0.0, seed: int = 0) -> None:
        check_choice("source", source, self.SOURCES)
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.source = source
        self.alpha = alpha
        self.noise_sigma = noise_sigma
        self.seed = seed
        self.next_at: dict[int, float] = {}    # agent -> expected time of its next call
        self.by_time: list[tuple[float, int]] = []   # the same entries as (time, agent), sorted
        self.active: dict[int, int] = {}       # agent -> calls in flight
        self.last_finish: dict[int, float] = {}
        self.gap: dict[int, float] = {}        # agent -> EWMA of observed gaps
        self.version = 0
        # next_at and active again as arrays, for levels of many agents at once
        # (InvocationDistance.levels): by agent slot (slot 0: never seen, NaN and not running)
        self._new_arrays()

    _ARRAYS = (("next_at_array", np.nan), ("active_array", False))

    @property
    def next_at_array(self) -> np.ndarray:
        return self.arrays["next_at_array"]

    def on_call_arrive(self, call: CallView, now: float) -> None:
        a = call.agent_id
        self._started(a)
        last = self.last_finish.pop(a, None)
        if last is not None:
            g = max(0.0, now - last)
            old = self.gap.get(a)
            self.gap[a] = g if old is None else self.alpha * g + (1 - self.alpha) * old
        self._drop(a)
        self.version += 1

    def on_call_finish(self, call: CallView, now: float) -> None:
        a = call.agent_id
        self._ended(a)
        self.last_finish[a] = now
        d = None
        if self.source == "oracle":
            d = call.hints.next_invocation_distance
            if d is not None and self.noise_sigma > 0:
                d = d * math.exp(self.noise_sigma * _gauss(self.seed, call.call_id))
        elif self.source == "ewma":
            d = self.gap.get(a)
        if d is None:
            self._drop(a)
        else:
            self._set(a, now + max(0.0, d))
        self.version += 1

    def on_distance_update(self, distances: dict, now: float) -> None:
        for a, d in distances.items():
            if d is None:
                self._drop(int(a))
            else:
                self._set(int(a), now + max(0.0, float(d)))
        self.version += 1

    def _set(self, agent_id: int, t: float) -> None:
        self._drop(agent_id)
        self.next_at[agent_id] = t
        bisect.insort(self.by_time, (t, agent_id))
        i = self._slot(agent_id)
        self.next_at_array[i] = t

    def _drop(self, agent_id: int) -> None:
        t = self.next_at.pop(agent_id, None)
        if t is not None:
            bt = self.by_time
            del bt[bisect.bisect_left(bt, (t, agent_id))]
            self.next_at_array[self.slot[agent_id]] = np.nan

    def due_by(self, horizon: float) -> list[int]:
        """Agents whose next call is expected at or before ``horizon``, by (time, agent id)."""
        bt = self.by_time
        return [a for _, a in bt[:bisect.bisect_right(bt, (horizon, math.inf))]]

    def distance(self, agent_id: int, now: float) -> float | None:
        """Seconds until the agent's next call (0 while it has one in flight); None if unknown."""
        if agent_id in self.active:
            return 0.0
        t = self.next_at.get(agent_id)
        return None if t is None else max(0.0, t - now)


class SimulationSteps(_InFlight):
    """ScaleSim's native D_i: simulation timesteps until the agent's next call.

    Each program (one simulation) has a step clock that advances when a tool named ``step_tool``
    ends (the ``society`` generator's ``world`` step); a call hinting ``next_invocation_steps = d``
    made at step t says its agent runs again at step t + d.
    """

    def __init__(self, step_tool: str = "world") -> None:
        self.step_tool = step_tool
        self.clock: dict[int, int] = {}          # program -> steps completed
        self.next_step: dict[int, int] = {}      # agent -> step of its next call
        self.agent_program: dict[int, int] = {}
        self.active: dict[int, int] = {}
        self.version = 0

    def on_call_arrive(self, call: CallView, now: float) -> None:
        a = call.agent_id
        self._started(a)
        self.agent_program[a] = call.program_id
        self.version += 1

    def on_call_finish(self, call: CallView, now: float) -> None:
        a = call.agent_id
        self._ended(a)
        d = call.hints.next_invocation_steps
        if d is None:
            self.next_step.pop(a, None)
        else:
            self.next_step[a] = self.clock.get(call.program_id, 0) + int(d)
        self.version += 1

    def on_tool_end(self, program_id: int, agent_id: int, tool: str, now: float) -> None:
        if tool == self.step_tool:
            self.clock[program_id] = self.clock.get(program_id, 0) + 1
            self.version += 1

    def on_program_end(self, program_id: int, now: float) -> None:
        if self.clock.pop(program_id, None) is not None:
            self.version += 1   # its agents' step counts change (the clock they are counted on is gone)

    def steps_until(self, agent_id: int) -> int | None:
        """Steps until the agent's next call (0 while it runs); None if unknown."""
        if agent_id in self.active:
            return 0
        nxt = self.next_step.get(agent_id)
        if nxt is None:
            return None
        return max(0, nxt - self.clock.get(self.agent_program.get(agent_id, -1), 0))


class StepDistances(_InFlight):
    """Steps-to-execution over an agent step graph (KVFlow), per workflow client.

    A *client* is the closed-loop agent slot that runs a workflow (the program's ``agent_id``); a step
    is one finished call of that client. ``graph``: ``hints`` (a call's ``next_invocation_steps``:
    the agent runs again that many calls later), ``learned`` (successor edges observed per client
    kind: after a call of stage a, the next call of the client was stage b; steps = BFS distance from
    the client's current stage, OR-branches taking min + 1), or a dict ``{stage: [predecessor stages]}``
    with optional ``"and:"`` prefix on a stage name for an AND-join (max + 1 over predecessors).
    Stages are ``hints.stage`` (``agent<i>`` for the kvflow generator).
    """

    GRAPHS = ("hints", "learned")

    def __init__(self, graph: Any = "hints") -> None:
        self.mode = graph if isinstance(graph, str) else "graph"
        if isinstance(graph, str) and graph not in self.GRAPHS or not isinstance(graph, (str, dict)):
            raise ValueError(f"graph must be one of {', '.join(self.GRAPHS)} or a table {{stage: [predecessors]}}, "
                             f"got {graph!r}")
        self.preds: dict[str, list[str]] = {}
        self.and_join: set[str] = set()
        if self.mode == "graph":
            for k, v in dict(graph).items():
                name = str(k)
                if name.startswith("and:"):
                    name = name[4:]
                    self.and_join.add(name)
                self.preds[name] = [str(p) for p in v]
        self.succ: dict[str, dict[str, int]] = {}   # learned: stage -> {next stage: count}
        self.client_of: dict[int, int] = {}          # program -> client
        self.client_steps: dict[int, int] = {}       # client -> finished calls so far
        self.client_stage: dict[int, str] = {}       # client -> stage of its current/last call
        self.client_running: dict[int, int] = {}
        self.agent_client: dict[int, int] = {}
        self.agent_stage: dict[int, str] = {}
        self.agent_next: dict[int, int] = {}         # hints: agent -> client step of its next call
        self.active: dict[int, int] = {}
        self.version = 0
        self._cache: tuple | None = None
        # the hints' step counts again as arrays, for the steps of many agents at once
        # (StepsToExecution.levels_array): per agent slot (0: never seen) its next call's client step
        # (NaN: none), its client's slot and whether it runs; per client slot (0: none, zero steps)
        # its finished calls
        self._new_arrays()
        self.client_slot: dict[int, int] = {}
        self.client_steps_array = np.zeros(64)
        self.exact = True   # every hinted step fits the arrays exactly (float64 integers up to 2^53)

    _ARRAYS = (("next_array", np.nan), ("client_array", 0), ("active_array", False))

    @property
    def next_array(self) -> np.ndarray:
        return self.arrays["next_array"]

    @property
    def client_array(self) -> np.ndarray:
        return self.arrays["client_array"]

    def _client_slot(self, client: int) -> int:
        i = self.client_slot.get(client)
        if i is None:
            i = self.client_slot[client] = len(self.client_slot) + 1
            n = len(self.client_steps_array)
            if i >= n:
                self.client_steps_array = np.concatenate([self.client_steps_array, np.zeros(n)])
        return i

    def on_program_start(self, program_id: int, agent_id: int, kind: str, now: float) -> None:
        self.client_of[program_id] = agent_id

    def on_program_end(self, program_id: int, now: float) -> None:
        self.client_of.pop(program_id, None)

    def _client(self, call: CallView) -> int:
        return self.client_of.get(call.program_id, call.program_id)

    def on_call_arrive(self, call: CallView, now: float) -> None:
        c = self._client(call)
        a = call.agent_id
        stage = call.hints.stage or f"agent:{a}"
        prev = self.client_stage.get(c)
        if self.mode == "learned" and prev is not None and prev != stage:
            d = self.succ.setdefault(prev, {})
            d[stage] = d.get(stage, 0) + 1
        self.client_stage[c] = stage
        self.agent_client[a] = c
        self.agent_stage[a] = stage
        self._started(a)
        j = self._client_slot(c)
        i = self.slot[a]
        self.client_array[i] = j
        if self.mode == "hints":
            steps = call.hints.next_invocation_steps
            pos = self.client_steps.get(c, 0)
            if steps is None:
                self.agent_next.pop(a, None)
                self.next_array[i] = np.nan
            else:
                self.agent_next[a] = nxt = pos + int(steps)
                if abs(nxt) <= _EXACT_INT:
                    self.next_array[i] = nxt
                else:   # beyond float64's exact integers: levels_array steps aside from now on
                    self.next_array[i] = np.nan
                    self.exact = False
        self.version += 1

    def on_call_finish(self, call: CallView, now: float) -> None:
        a = call.agent_id
        self._ended(a)
        c = self._client(call)
        self.client_steps[c] = n = self.client_steps.get(c, 0) + 1
        j = self._client_slot(c)   # first: it may replace the array (a client first seen here)
        self.client_steps_array[j] = n
        self.version += 1

    # ------------------------------------------------------------------ steps
    def _graph_steps(self, front: str) -> dict[str, float]:
        """Steps to execution of every stage when ``front`` is the stage running (0) or just done."""
        if self.mode == "learned":
            # OR semantics everywhere: BFS over observed successors
            dist = {front: 0}
            frontier = [front]
            while frontier:
                nxt = []
                for s in frontier:
                    for t in self.succ.get(s, ()):
                        if t not in dist:
                            dist[t] = dist[s] + 1
                            nxt.append(t)
                frontier = nxt
            return dist
        # explicit graph: relax S(v) = agg(S(p) + 1) from the front, at most |V| rounds
        steps: dict[str, float] = {front: 0}
        nodes = set(self.preds) | {p for ps in self.preds.values() for p in ps}
        for _ in range(len(nodes) + 1):
            changed = False
            for v in nodes:
                if v == front:
                    continue
                vals = [steps[p] + 1 for p in self.preds.get(v, ()) if p in steps]
                if not vals:
                    continue
                s = max(vals) if v in self.and_join else min(vals)
                if steps.get(v) != s:
                    steps[v] = s
                    changed = True
            if not changed:
                break
        return steps

    def steps(self, agent_id: int, now: float) -> float | None:
        """Steps until the agent's next call (0 while running); None if unknown."""
        if agent_id in self.active:
            return 0.0
        c = self.agent_client.get(agent_id)
        if c is None:
            return None
        if self.mode == "hints":
            nxt = self.agent_next.get(agent_id)
            if nxt is None:
                return None
            return float(max(0, nxt - self.client_steps.get(c, 0)))
        front = self.client_stage.get(c)
        stage = self.agent_stage.get(agent_id)
        if front is None or stage is None:
            return None
        if self._cache is None or self._cache[0] != self.version:
            self._cache = (self.version, {})
        table = self._cache[1].get(front)
        if table is None:
            table = self._cache[1][front] = self._graph_steps(front)
        s = table.get(stage)
        if s is None:
            return None
        if s == 0 and stage == front:
            # its own call just ran: next time round the workflow (the cycle length), or unknown
            cyc = self._cycle_len(front)
            return float(cyc) if cyc else None
        return float(s)

    def _cycle_len(self, stage: str) -> int | None:
        if self.mode == "learned":
            dist = {stage: 0}
            frontier = [stage]
            while frontier:
                nxt = []
                for s in frontier:
                    for t in self.succ.get(s, ()):
                        if t == stage:
                            return dist[s] + 1
                        if t not in dist:
                            dist[t] = dist[s] + 1
                            nxt.append(t)
                frontier = nxt
            return None
        return None


# --------------------------------------------------------------------------- the free-block queue
class LeveledFreeQueue:
    """Free blocks ordered by their holder's eviction level (higher first), then least recently freed.

    Blocks are grouped by the agent that freed them; a block freed by several agents joins the shared
    group, whose level is the min over its users (it is as useful as its nearest user). KVFlow's
    dynamic-suffix blocks form a group evicted before every other. The order of groups is rebuilt
    when the policy's distances change (``version``) or time moves on; between rebuilds pops cost
    O(log groups). A rebuild reads every group's oldest time from a map kept as blocks come and go
    and asks the policy for all the groups' levels in one call (``levels``, if it has one), so its
    Python work is per rebuild, not per group (ScaleSim on 80 engines keeps ~2,000 groups per queue).
    """

    __slots__ = ("policy", "engine_id", "block_size", "_groups", "_oldest", "_users", "_bulk", "_is_suffix",
                 "_shared_users", "_n",
                 "_heap", "_rebuilt", "_pos", "_epoch", "_seq")

    def __init__(self, policy: "_DistanceEvict", engine_id: int) -> None:
        self.policy = policy
        self.engine_id = engine_id
        self.block_size = 16   # the backend sets the engine's block size
        self._groups: dict[int, OrderedDict[int, BlockView]] = {}
        # group -> last_used_at of its first (oldest) block, in the same order as _groups (a group
        # enters and leaves both together), so a rebuild reads every group's in C
        self._oldest: dict[int, float] = {}
        self._users: dict[int, int | dict[int, None]] = {}   # block_id -> agent(s) that freed it (most recent last)
        # the policy's suffix rule, skipped only when it is _DistanceEvict's own (no block is a
        # suffix); a LeveledEvict policy of the user's (level and is_suffix alone) gets the plain forms
        self._bulk = isinstance(policy, _DistanceEvict)
        self._is_suffix = (None if self._bulk and type(policy).is_suffix is _DistanceEvict.is_suffix
                           else policy.is_suffix)
        self._shared_users: dict[int, None] = {}       # union of the shared group's users
        self._n = 0
        self._heap: list = []     # entries pushed since the last rebuild (a heap)
        self._rebuilt: tuple = ([], [], [], 0, [])   # the last rebuild's entries: keys, levels, oldest, first seq, order
        self._pos = 0             # entries of the rebuild taken so far, in its order
        self._epoch: tuple | None = None
        self._seq = 0

    def __len__(self) -> int:
        return self._n

    def _group_of(self, block: BlockView) -> int:
        if block.block_hash is None:
            return _NOHASH
        if self._is_suffix is not None and self._is_suffix(block, self.block_size):
            return _SUFFIX
        # the agents that freed the block, most recent last: one agent's id, or a dict of two or more
        users = self._users.get(block.block_id)
        a = block.agent_id
        if users is None:
            self._users[block.block_id] = a
            return a
        if type(users) is not dict:
            if users == a:
                return a
            users = self._users[block.block_id] = {users: None, a: None}
        else:
            users.pop(a, None)
            users[a] = None
        su = self._shared_users
        for u in users:
            su.pop(u, None)
            su[u] = None
        return _SHARED

    def append(self, block: BlockView, now: float) -> None:
        g = self._group_of(block)
        block.qkey = g
        grp = self._groups.get(g)
        if grp is None:
            grp = self._groups[g] = OrderedDict()
            self._oldest[g] = block.last_used_at
            grp[block.block_id] = block
            self._n += 1
            if self._epoch is not None and g != _NOHASH:
                self._push(g, now)
            return
        grp[block.block_id] = block
        self._n += 1

    def append_blocks(self, blocks: list[BlockView], now: float) -> None:
        """``append(b, now)`` for each of ``blocks`` in order (the pool frees a call's blocks at once),
        the common case of :meth:`_group_of` inline: a cached block freed by the agent that freed it
        last, or by its first agent."""
        cls = type(self)
        if cls.append is not LeveledFreeQueue.append or cls._group_of is not LeveledFreeQueue._group_of:
            for block in blocks:   # a subclass's own rule, block by block
                self.append(block, now)
            return
        groups = self._groups
        users_of = self._users
        group_of = self._group_of
        plain = self._is_suffix is None
        for block in blocks:
            if plain and block.block_hash is not None:
                bid = block.block_id
                a = block.agent_id
                users = users_of.get(bid)
                if users is None:
                    users_of[bid] = g = a
                elif users == a:     # one agent's id (a dict of users never equals an int)
                    g = a
                else:
                    g = group_of(block)
            else:
                g = group_of(block)
            block.qkey = g
            grp = groups.get(g)
            if grp is None:
                grp = groups[g] = OrderedDict()
                self._oldest[g] = block.last_used_at
                grp[block.block_id] = block
                self._n += 1
                if self._epoch is not None and g != _NOHASH:
                    self._push(g, now)
            else:
                grp[block.block_id] = block
                self._n += 1

    def pop_blocks(self, n: int, now: float) -> list[BlockView]:
        """``[pop(now) for _ in range(n)]``."""
        pop = self.pop
        return [pop(now) for _ in range(n)]

    def remove(self, block: BlockView) -> None:
        g = block.qkey
        grp = self._groups[g]
        del grp[block.block_id]
        self._n -= 1
        if not grp:
            del self._groups[g]
            del self._oldest[g]
            if g == _SHARED:
                self._shared_users = {}
        elif not block.last_used_at > self._oldest[g]:
            # it may have been the first block (a first block's time is the group's oldest)
            self._oldest[g] = next(iter(grp.values())).last_used_at

    def _level(self, g: int, now: float) -> float:
        if g == _NOHASH:
            return math.nan  # placeholder; _NOHASH is popped before any level is looked at
        if g == _SUFFIX:
            return INF
        if g == _SHARED:
            return self._shared_level(now)
        return self.policy.level(g, now)

    def _shared_level(self, now: float) -> float:
        level = INF
        floor = self.policy.min_level
        level_of = self.policy.level
        # most recent users first: the likeliest to come back soon (early exit at the floor)
        for a in reversed(self._shared_users):
            lv = level_of(a, now)
            if lv < level:
                level = lv
                if level <= floor:
                    break
        return level

    def _push(self, g: int, now: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (-self._level(g, now), self._oldest[g], self._seq, g))

    def _levels(self, groups: list[int], now: float) -> list[float]:
        """The level of each of ``groups`` (none of them ``_NOHASH``), as :meth:`_level` gives it; the
        agents' levels in one call to the policy (``levels``)."""
        agents = [g for g in groups if g != _SUFFIX and g != _SHARED]
        if self._bulk:
            levels = self.policy.levels
        else:
            level = self.policy.level
            levels = lambda ids, t: [level(a, t) for a in ids]   # noqa: E731
        if len(agents) == len(groups):
            return levels(agents, now)
        it = iter(levels(agents, now))
        return [INF if g == _SUFFIX else self._shared_level(now) if g == _SHARED else next(it) for g in groups]

    def _level_array(self, keys: list[int], now: float) -> np.ndarray:
        """The levels of the groups ``keys`` (no ``_NOHASH``) as :meth:`_level` gives them, float64."""
        lv = self.policy.levels_array(keys, now) if self._bulk else None
        if lv is None:
            return np.array(self._levels(keys, now), dtype=np.float64)
        # the policy was asked for every key; the two groups that are not agents have their own
        groups = self._groups
        if _SUFFIX in groups:
            lv[keys.index(_SUFFIX)] = INF
        if _SHARED in groups:
            lv[keys.index(_SHARED)] = self._shared_level(now)
        return lv

    def _rebuild(self, now: float) -> None:
        # One entry per group, (-level, oldest, seq, group) with seq in the groups' order, as a
        # _push of each in turn would make; they are sorted at once (numpy, a stable sort: seq
        # breaks ties) and taken in that order as pops need them, merged with the entries _push adds
        # until the next rebuild (_heap). The pops are those of one heap holding all the entries:
        # every entry is distinct by its seq.
        keys = list(self._groups)
        olds = list(self._oldest.values())
        if _NOHASH in self._oldest:
            i = keys.index(_NOHASH)
            del keys[i], olds[i]
        n = len(keys)
        levels = self._level_array(keys, now) if n else np.empty(0)
        self._rebuilt = (keys, levels, olds, self._seq + 1,
                         np.lexsort((np.array(olds, dtype=np.float64), -levels)).tolist() if n else [])
        self._pos = 0
        self._seq += n
        self._heap = []
        self._epoch = (now, self.policy.version)

    def _top(self) -> tuple[int, bool]:
        """The group of the smallest entry not yet taken, and whether it is a pushed one (else rebuilt)."""
        heap = self._heap
        keys, levels, olds, seq0, order = self._rebuilt
        if self._pos < len(order):
            i = order[self._pos]
            if not heap or (-float(levels[i]), olds[i], seq0 + i, keys[i]) < heap[0]:
                return keys[i], False
        return heap[0][3], True

    def _take(self, pushed: bool) -> None:
        if pushed:
            heapq.heappop(self._heap)
        else:
            self._pos += 1

    def pop(self, now: float) -> BlockView:
        nohash = self._groups.get(_NOHASH)
        if nohash:
            _, block = nohash.popitem(last=False)
            self._n -= 1
            if not nohash:
                del self._groups[_NOHASH]
                del self._oldest[_NOHASH]
            else:
                self._oldest[_NOHASH] = next(iter(nohash.values())).last_used_at
            return block
        if self._epoch != (now, self.policy.version):
            self._rebuild(now)
        while True:
            g, pushed = self._top()
            grp = self._groups.get(g)
            if grp is None:
                self._take(pushed)
                continue
            _, block = grp.popitem(last=False)
            self._n -= 1
            if not grp:
                del self._groups[g]
                del self._oldest[g]
                self._take(pushed)
                if g == _SHARED:
                    self._shared_users = {}
            else:
                self._oldest[g] = next(iter(grp.values())).last_used_at
            self._users.pop(block.block_id, None)
            return block

    # ------------------------------------------------------------------ queries for the backend
    def evictable_by_level(self, now: float) -> list[tuple[float, int]]:
        """[(level, free blocks at that level)], farthest level first (what prefetch may displace)."""
        groups = self._groups
        keys = list(groups)
        sizes = list(map(len, groups.values()))
        if _NOHASH in groups:
            i = keys.index(_NOHASH)
            del keys[i]
            nohash = sizes.pop(i)
        else:
            nohash = 0
        if keys:
            # blocks per distinct level, farthest first (levels are floats, equal ones add up)
            levels, which = np.unique(self._level_array(keys, now), return_inverse=True)
            counts = np.bincount(which.ravel(), weights=sizes, minlength=len(levels))
            hist = dict(zip(levels.tolist(), (int(c) for c in counts)))
        else:
            hist = {}
        if nohash:
            hist[INF] = hist.get(INF, 0) + nohash
        return sorted(hist.items(), reverse=True)

    def eviction_order(self, now: float) -> list[BlockView]:
        """Every free block in the order they would be evicted (tests and debugging)."""
        def order(g: int) -> tuple:
            first = next(iter(self._groups[g].values())).last_used_at
            return (-INF, first) if g == _NOHASH else (-self._level(g, now), first)

        groups = sorted(self._groups, key=order)
        return [b for g in groups for b in self._groups[g].values()]


class PrefetchBudget:
    """ScaleSim's prefetch admission at one step boundary (``agentsim.policies.base.PrefetchPlan``).

    A load is "denied unless available + evictable can hold it": an agent at level L may take the
    engine's never-used blocks and the free blocks of levels farther than L (ScaleSim
    ``DispatchLoadTasks``); candidates come nearest first and the plan stops at the first that does
    not fit. What an admitted load takes is booked as the allocation will take it: never-used blocks
    first, then the farthest levels.
    """

    __slots__ = ("policy", "fresh", "hist", "now", "stopped")

    def __init__(self, policy: "_DistanceEvict", fresh: int, hist: list[tuple[float, int]], now: float) -> None:
        self.policy = policy
        self.fresh = fresh
        self.hist = hist          # [(level, evictable blocks)], farthest first
        self.now = now
        self.stopped = False

    def admit(self, agent_id: int, num_blocks: int) -> float | None:
        """The agent's level if ``num_blocks`` fit (the room is booked), else None and ``stopped``."""
        level = self.policy.level(agent_id, self.now)
        hist = self.hist
        room = self.fresh + sum(n for lv, n in hist if lv > level)
        if num_blocks > room:
            self.stopped = True   # ScaleSim: stop at the first agent that does not fit
            return None
        take = num_blocks - min(self.fresh, num_blocks)
        self.fresh -= num_blocks - take
        while take > 0 and hist:   # allocation evicts from the farthest levels first
            lv, n = hist[0]
            used = min(n, take)
            take -= used
            if used == n:
                hist.pop(0)
            else:
                hist[0] = (lv, n - used)
        return level


class _DistanceEvict:
    """Shared machinery: one distance table across engines, one leveled queue per engine."""

    min_level = 0.0

    # Levels change with the clock (ScaleSim) or with call events on any engine (both), so the
    # order of one step's evictions depends on exactly when the step's blocks are taken: the
    # simulator runs such queues step by step (a fast-forward window allocates at its end).
    depends_on_clock = True

    tiers: TierSettings = TierSettings()

    def new_free_queue(self, engine_id: int) -> LeveledFreeQueue:
        return LeveledFreeQueue(self, engine_id)

    def tier_settings(self) -> TierSettings:
        """The CPU tier the constructor's ``cpu_tier``/``cpu_gib``/``pcie_GBps``/``prefetch`` ask for."""
        return self.tiers

    def plan_prefetch(self, free_queue: LeveledFreeQueue, num_fresh_blocks: int, now: float) -> PrefetchBudget:
        """ScaleSim's budget (:class:`PrefetchBudget`) over the engine's never-used blocks and its
        queue's evictable blocks by level."""
        return PrefetchBudget(self, num_fresh_blocks, free_queue.evictable_by_level(now), now)

    @property
    def version(self) -> int:
        return self.table.version

    def is_suffix(self, block: BlockView, block_size: int) -> bool:
        return False

    def level(self, agent_id: int, now: float) -> float:
        raise NotImplementedError

    def levels(self, agent_ids: list[int], now: float) -> list[float]:
        """``[level(a, now) for a in agent_ids]`` (a queue asks for all its groups' at once)."""
        level = self.level
        return [level(a, now) for a in agent_ids]

    def levels_array(self, agent_ids: list[int], now: float):
        """``levels`` as a float64 numpy array computed in bulk, or None when the policy has no bulk
        form (the queue then asks :meth:`levels`). The ids may include group keys that are not
        agents; the queue overwrites their levels."""
        return None

    # hooks forwarded to the distance table
    def on_call_arrive(self, call: CallView, now: float) -> None:
        self.table.on_call_arrive(call, now)

    def on_call_finish(self, call: CallView, now: float) -> None:
        self.table.on_call_finish(call, now)


@register("evict", "invocation-distance")
class InvocationDistance(_DistanceEvict):
    """ScaleSim: evict first the agent whose next call is farthest (D_i buckets), prefetch near ones.

    ``source``: ``steps`` (ScaleSim's own D in simulation timesteps from the program's
    ``next_invocation_steps`` hints, see :class:`SimulationSteps`), or a time-based estimate: ``oracle``
    (hinted seconds), ``ewma`` (learned gaps) or ``none`` (see :class:`TimeDistances`); ``hold_levels`` (ScaleSim's
    evict_pri_level, 4): priority ``min(hold_levels + 1, D)``, unknown agents ``hold_levels + 1``;
    ``look_ahead`` (load_ahead_step, 2): prefetch agents with ``D <= look_ahead``; ``unit``: seconds per
    step of D for time-based sources (D = ceil(gap / unit) - 1, so an agent due within one unit has
    D = 0; with ``steps``, D = steps until the call - 1); ``step_tool``: the tool that ends a simulation
    step (``steps`` source); ``cpu_tier``,
    ``cpu_gib``, ``pcie_GBps``, ``prefetch``: the backend's CPU KV tier (on by default).
    """

    def __init__(self, source: str = "oracle", hold_levels: int = 4, look_ahead: int = 2, unit: float = 1.0,
                 alpha: float = 0.5, noise_sigma: float = 0.0, seed: int = 0, step_tool: str = "world",
                 cpu_tier: bool = True, cpu_gib: float = 100.0, pcie_GBps: float | None = None,
                 prefetch: bool = True) -> None:
        # every source this policy accepts: its own step clock, or a time-based TimeDistances source
        check_choice("source", source, ("steps",) + TimeDistances.SOURCES)
        if hold_levels < 0 or look_ahead < 0 or unit <= 0:
            raise ValueError("hold_levels and look_ahead must be >= 0 and unit > 0")
        self.source = source
        if source == "steps":
            self.table = SimulationSteps(step_tool)
            self.prefetch_on_events = True   # D changes on step-clock events, not with time
        else:
            self.table = TimeDistances(source, alpha, noise_sigma, seed)
        self.hold_levels = hold_levels
        self.look_ahead = look_ahead
        self.unit = unit
        self.tiers = TierSettings(cpu_tier=cpu_tier, cpu_gib=cpu_gib, pcie_GBps=pcie_GBps,
                                  prefetch=prefetch and cpu_tier)

    prefetch_on_events = False

    def on_distance_update(self, distances: dict, now: float) -> None:
        if self.source != "steps":
            self.table.on_distance_update(distances, now)

    def on_tool_end(self, program_id: int, agent_id: int, tool: str, now: float) -> None:
        if self.source == "steps":
            self.table.on_tool_end(program_id, agent_id, tool, now)

    def on_program_end(self, program_id: int, now: float) -> None:
        if self.source == "steps":
            self.table.on_program_end(program_id, now)

    def steps(self, agent_id: int, now: float) -> int | None:
        """ScaleSim's D for the agent (None if unknown)."""
        if self.source == "steps":
            n = self.table.steps_until(agent_id)
            return None if n is None else max(0, n - 1)
        d = self.table.distance(agent_id, now)
        if d is None:
            return None
        return max(0, math.ceil(d / self.unit - 1e-9) - 1)

    def level(self, agent_id: int, now: float) -> float:
        d = self.steps(agent_id, now)
        cap = self.hold_levels + 1
        return float(cap) if d is None else float(min(cap, d))

    def levels(self, agent_ids: list[int], now: float) -> list[float]:
        """``[level(a, now) for a in agent_ids]`` (the time-based sources: :meth:`levels_array`)."""
        lv = self.levels_array(agent_ids, now) if agent_ids else None
        return super().levels(agent_ids, now) if lv is None else lv.tolist()

    def _bulk_levels(self) -> bool:
        """Whether :meth:`levels_array` may compute the levels: a time-based source, and ``level``,
        ``steps`` and the table's ``distance`` are this module's own (a subclass that changes any of
        them gets its levels one by one)."""
        cls = type(self)
        return (self.source != "steps" and cls.level is InvocationDistance.level
                and cls.steps is InvocationDistance.steps and type(self.table).distance is TimeDistances.distance)

    def levels_array(self, agent_ids: list[int], now: float) -> np.ndarray | None:
        """``levels(agent_ids, now)`` as a float64 array, the time-based sources' arithmetic in
        numpy (a queue asks for all its groups' levels whenever time has moved); None for the
        ``steps`` source (its levels are read one by one). Ids the table never saw are unknown."""
        if not self._bulk_levels():
            return None
        t = self.table
        ids = np.fromiter(map(t.slot.get, agent_ids, repeat(0)), np.int64, len(agent_ids))
        fcap = float(self.hold_levels + 1)
        at = t.next_at_array[ids]
        if np.isinf(at).any():
            return None   # an infinite distance: level() raises there (math.ceil), as it always did
        running = t.active_array[ids]
        # level(): distance 0 while running, else max(0, at - now); D = max(0, ceil(d/unit - 1e-9) - 1);
        # min(cap, D); cap when unknown. The same IEEE operations, element by element.
        dist = np.where(running, 0.0, np.maximum(0.0, at - now))
        d = np.maximum(0.0, np.ceil(dist / self.unit - 1e-9) - 1.0)
        return np.where(np.isnan(at) & ~running, fcap, np.minimum(fcap, d))

    def prefetch_candidates(self, now: float) -> list[int]:
        """Agents not running whose D <= look_ahead, nearest first (ScaleSim's DispatchLoadTasks)."""
        if self.source == "steps":
            t = self.table
            cands = []
            for a in t.next_step:
                if a in t.active:
                    continue
                d = self.steps(a, now)
                if d is not None and d <= self.look_ahead:
                    cands.append((d, a))
            cands.sort()
            return [a for _, a in cands]
        # the table keeps its entries sorted by time: the agents due within the horizon are a prefix
        active = self.table.active
        return [a for a in self.table.due_by(now + (self.look_ahead + 1) * self.unit) if a not in active]

    def prefetch_candidates_among(self, now: float, agents) -> list[int]:
        """:meth:`prefetch_candidates` restricted to ``agents``, at a cost in their number (an
        engine's own agents, not the cluster's)."""
        t = self.table
        active = t.active
        out = []
        if self.source == "steps":
            next_step = t.next_step
            for a in agents:
                if a in next_step and a not in active:
                    d = self.steps(a, now)
                    if d is not None and d <= self.look_ahead:
                        out.append((d, a))
        else:
            horizon = now + (self.look_ahead + 1) * self.unit
            next_at = t.next_at
            for a in agents:
                at = next_at.get(a)
                if at is not None and at <= horizon and a not in active:
                    out.append((at, a))
        out.sort()
        return [a for _, a in out]

    def prefetch_due_at(self, agent_id: int, now: float) -> float | None:
        """When the agent enters the look-ahead window (None: unknown, or decided by events)."""
        if self.source == "steps":
            return None
        t = self.table.next_at.get(agent_id)
        return None if t is None else t - (self.look_ahead + 1) * self.unit


@register("evict", "steps-to-execution")
class StepsToExecution(_DistanceEvict):
    """KVFlow: dynamic suffixes first, then fixed-prefix blocks of the agent with the most steps to go.

    ``graph``: hints | learned | {stage: [predecessors]} (see :class:`StepDistances`); a block is in
    the agent's fixed prefix if its position is below ``hints.fixed_prefix_tokens // block_size`` (agents
    without the hint keep their whole context as prefix); ``look_ahead`` (1): prefetch agents whose
    steps-to-execution is at most this (the next-step agents); CPU tier on by default.
    """

    def __init__(self, graph: Any = "hints", look_ahead: int = 1, cpu_tier: bool = True, cpu_gib: float = 100.0,
                 pcie_GBps: float | None = None, prefetch: bool = True) -> None:
        self.table = StepDistances(graph)
        self.look_ahead = look_ahead
        self.tiers = TierSettings(cpu_tier=cpu_tier, cpu_gib=cpu_gib, pcie_GBps=pcie_GBps,
                                  prefetch=prefetch and cpu_tier)
        self.fixed_tokens: dict[int, int] = {}
        self._candidates: tuple[int, list[int]] | None = None   # (table version, prefetch candidates)

    def on_program_start(self, program_id: int, agent_id: int, kind: str, now: float) -> None:
        self.table.on_program_start(program_id, agent_id, kind, now)

    def on_program_end(self, program_id: int, now: float) -> None:
        self.table.on_program_end(program_id, now)

    def on_call_arrive(self, call: CallView, now: float) -> None:
        self.table.on_call_arrive(call, now)
        f = call.hints.fixed_prefix_tokens
        if f is not None:
            self.fixed_tokens[call.agent_id] = f

    def is_suffix(self, block: BlockView, block_size: int) -> bool:
        f = self.fixed_tokens.get(block.agent_id)
        return f is not None and block.position >= f // block_size

    def level(self, agent_id: int, now: float) -> float:
        s = self.table.steps(agent_id, now)
        return UNKNOWN_STEPS if s is None else s

    def levels(self, agent_ids: list[int], now: float) -> list[float]:
        """``[level(a, now) for a in agent_ids]`` (the ``hints`` graph: :meth:`levels_array`)."""
        lv = self.levels_array(agent_ids, now) if agent_ids else None
        return super().levels(agent_ids, now) if lv is None else lv.tolist()

    def levels_array(self, agent_ids: list[int], now: float) -> np.ndarray | None:
        """``levels(agent_ids, now)`` as a float64 array, the ``hints`` graph's step counts in numpy
        (a queue asks for all its groups' levels at every step that evicts); None for the other
        graphs, or when ``level`` or the table's ``steps`` are a subclass's own. Ids the table never
        saw are unknown (``UNKNOWN_STEPS``). None too once a hinted step passed 2^53 (float64 would
        round it; ``level`` does integer arithmetic)."""
        t = self.table
        if (t.mode != "hints" or not t.exact or type(self).level is not StepsToExecution.level
                or type(t).steps is not StepDistances.steps):
            return None
        ids = np.fromiter(map(t.slot.get, agent_ids, repeat(0)), np.int64, len(agent_ids))
        # steps(): 0 while running; unknown without a hinted next call; else max(0, next step -
        # the client's finished calls), integers exact in float64
        nxt = t.next_array[ids]
        togo = np.maximum(0.0, nxt - t.client_steps_array[t.client_array[ids]])
        return np.where(t.active_array[ids], 0.0, np.where(np.isnan(nxt), UNKNOWN_STEPS, togo))

    def prefetch_candidates(self, now: float) -> list[int]:
        # steps-to-execution change only on call events (the table's version), not with time, and
        # every engine asks after each event: scan the agents once per version
        memo = self._candidates
        if memo is not None and memo[0] == self.table.version:
            return list(memo[1])
        table = self.table
        # with hints, only agents whose next call is hinted have a step count (steps() is None for
        # the others)
        agents = table.agent_next if table.mode == "hints" else table.agent_client
        out = []
        for a in agents:
            if a in table.active:
                continue
            s = table.steps(a, now)
            if s is not None and s <= self.look_ahead:
                out.append((s, a))
        out.sort()
        cands = [a for _, a in out]
        self._candidates = (self.table.version, cands)
        return list(cands)

    prefetch_on_events = True   # steps change only on call events, for every agent of a workflow

    def prefetch_due_at(self, agent_id: int, now: float) -> float | None:
        return None


@register("evict", "lru-cpu")
class LRUWithCpuTier:
    """LRU plus a CPU KV tier (HiCache-like): evicted blocks go to host memory and load back on a hit.

    vLLM's free-block order; an evicted block is written back to host memory and a later prefix hit
    loads it over PCIe instead of recomputing it.
    """

    def __init__(self, cpu_gib: float = 100.0, pcie_GBps: float | None = None) -> None:
        self.tiers = TierSettings(cpu_tier=True, cpu_gib=cpu_gib, pcie_GBps=pcie_GBps)

    def tier_settings(self) -> TierSettings:
        return self.tiers

    def new_free_queue(self, engine_id: int):
        from agentsim.policies.baseline import LRUFreeQueue

        return LRUFreeQueue()


register_bundle("scalesim", "ScaleSim: invocation-distance eviction + prefetch from a CPU tier, prefix-affinity routing",
                route="prefix-affinity", order="fcfs", evict="invocation-distance", shape="fixed")
register_bundle("kvflow", "KVFlow: steps-to-execution eviction + prefetch from a CPU tier, prefix-affinity routing",
                route="prefix-affinity", order="fcfs", evict="steps-to-execution", shape="fixed")
register_bundle("hicache", "LRU eviction with a CPU KV tier (write-back, load on hit), prefix-affinity routing",
                route="prefix-affinity", order="fcfs", evict="lru-cpu", shape="fixed")


"""More workload shapes from the papers (research/policies.md §11-12), as seeded generators.

- ``lats``: LATS tree search (Autellix's LATS on HotpotQA): parallel expansion threads, each an
  action call, an environment tool and a value call; 159.7 calls/program, 467 in / 73 out.
- ``mapreduce``: map agents over document chunks in parallel, then a (tree) reduce (Parrot).
- ``kvflow``: KVFlow's sequential multi-agent workflow: agents with a long fixed prompt, a short
  dynamic part and a short output (8192 / 32 / 32), optionally cycled (PEER-style).
- ``society``: a ScaleSim-style agent society: N agents, ~20 % active per simulation step, each
  call hinting the agent's exact next-invocation distance.
- ``swe``: a SWE-agent-like coding loop with a long, growing context and heavy-tailed tools.
- ``team``: multi-agent teams over a task DAG, run as sequential / parallel / hierarchical /
  hybrid / debate (the topology the shape policy picks).

Determinism across backends: every random draw, segment and output id of a parallel branch is
made by the parent before the :class:`Parallel` is yielded (the branches only replay prepared
requests), so a program's content never depends on the order in which its branches finish.
Output segments are known in advance (a call's output is ``Segment(call.output_seg_id, n)``),
which lets a branch's later prompts be built before its first call runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Generator

import numpy as np

from agentsim.config import check_params, param
from agentsim.traces.generators import (
    PROMPT_HELP,
    SHARE_HELP,
    TOOLS_HELP,
    TaskDAG,
    TeamGenerator,
    ToolSpec,
    _tools,
    pick_tool,
    register_generator,
    sample_calls,
    sample_len,
)
from agentsim.workload import CallHints, Context, LLMCall, Parallel, ProgramContext, Segment, ToolCall, stable_id

TEAM_TOPOLOGIES = ("sequential", "parallel", "hierarchical", "hybrid", "debate")


# --------------------------------------------------------------------------- helpers
def sub_agent_id(pc: ProgramContext, role: Any) -> int:
    """A stable agent id for one role of a multi-agent program (same slot + role -> same id)."""
    return stable_id("agent", pc.agent_id, role)


def output_of(call: LLMCall) -> Segment:
    """The segment a call will return as its output (fixed when the call is built)."""
    return Segment(call.output_seg_id, call.num_output_tokens)


def run_seq(requests: list, value: Any = None) -> Generator:
    """A branch that issues prepared requests one after the other and returns ``value``."""
    for r in requests:
        yield r
    return value


def capped_geometric_pmf(mean: float, cap: int) -> np.ndarray:
    """P(n) for n = 1..cap of ``min(cap, Geometric(1/mean))``, as drawn by :func:`sample_calls`."""
    if mean <= 1:
        pmf = np.zeros(cap)
        pmf[0] = 1.0
        return pmf
    p = 1.0 / mean
    n = np.arange(1, cap + 1)
    pmf = p * (1 - p) ** (n - 1)
    pmf[-1] = (1 - p) ** (cap - 1)
    return pmf


def geometric_mean_for(target: float, cap: int) -> float:
    """The ``mean`` to pass to :func:`sample_calls` so that the capped draw averages ``target``."""
    if target <= 1:
        return 1.0
    lo, hi = 1.0, 1e9
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if float(capped_geometric_pmf(mid, cap) @ np.arange(1, cap + 1)) < target:
            lo = mid
        else:
            hi = mid
    return hi


# --------------------------------------------------------------------------- LATS
LATS_TOOLS = (ToolSpec("wiki_search", dist="lognormal", median=0.3, sigma=1.0, max_time=30.0),)


@register_generator("lats")
@dataclass(frozen=True)
class LATS:
    """LATS tree search (Autellix's LATS on HotpotQA), with truly parallel expansion threads.

    Each iteration expands the selected node into ``width`` children at once; a child is an
    action call, an environment tool (the Wikipedia API) and a value call that judges it. The
    best child (the value's pick, drawn at random here) is selected next; after ``max_depth``
    levels the episode fails and search restarts from the root, so the selected node's depth is
    ``t mod max_depth`` at iteration t. Prompts are the shared few-shot prompt + the question +
    the selected path (action outputs and observations); a value prompt adds the child's action,
    observation and a short value instruction. Iterations are 1 + geometric, sized so that calls
    per program average ``calls_mean``, and the question is sized so that prompts average
    ``prompt_tokens_mean`` (Autellix: 159.7 calls, 467 in / 73 out per call).
    """

    calls_mean: float = param(159.7, 'mean LLM calls per program', ge=1, unit='calls')
    width: int = param(5, 'width', ge=1)
    max_depth: int = param(4, 'max depth', ge=1)
    max_iterations: int = param(100, 'max iterations', ge=1)
    prompt_tokens_mean: float = param(467.0, 'mean prompt tokens', ge=0, unit='tokens')
    output_tokens_mean: float = param(73.0, 'mean output tokens', ge=0, unit='tokens')
    observation_tokens_mean: float = param(40.0, 'mean observation tokens', ge=0, unit='tokens')
    value_instruction_tokens: int = param(16, 'value instruction tokens', ge=1, unit='tokens')
    system_share: float = param(0.6, SHARE_HELP, ge=0, lt=1)
    length_sigma: float = param(0.3, 'log-space sigma of lengths', ge=0)
    system_prompt: str = param("lats-hotpotqa", PROMPT_HELP, nonempty=True)
    tools: tuple = param(LATS_TOOLS, TOOLS_HELP, type=tuple)
    oracle_hints: bool = param(True, "hint each call's exact next-invocation distance (an oracle)")

    def __post_init__(self) -> None:
        check_params(self)
        object.__setattr__(self, "tools", _tools(self.tools))
        per_iter = 2 * self.width
        target = self.calls_mean / per_iter
        if not 1 <= target <= self.max_iterations:
            raise ValueError(f"calls_mean must be between {per_iter} and {per_iter * self.max_iterations} "
                             f"(2 x width calls per iteration)")
        if self.base_prompt_tokens < 2:
            raise ValueError("prompt_tokens_mean is too small for the path growth (raise it or lower max_depth)")

    @cached_property
    def iterations_mean(self) -> float:
        """The geometric mean passed to ``sample_calls`` for the number of iterations."""
        return geometric_mean_for(self.calls_mean / (2 * self.width), self.max_iterations)

    @cached_property
    def mean_depth(self) -> float:
        """Call-weighted mean depth of the selected node (every iteration has 2 x width calls)."""
        pmf = capped_geometric_pmf(self.iterations_mean, self.max_iterations)
        t = np.arange(self.max_iterations)
        # sum over t < n of (t mod D), for n = 1..cap
        cum = np.cumsum(t % self.max_depth)
        return float(pmf @ cum) / float(pmf @ np.arange(1, self.max_iterations + 1))

    @cached_property
    def base_prompt_tokens(self) -> float:
        step = self.output_tokens_mean + self.observation_tokens_mean
        return (self.prompt_tokens_mean - self.mean_depth * step
                - 0.5 * (step + self.value_instruction_tokens))

    def body(self, pc: ProgramContext) -> Generator:
        rng = pc.rng
        n_iter = sample_calls(rng, self.iterations_mean, self.max_iterations)
        base = int(round(self.base_prompt_tokens))
        sys_tokens = int(round(base * self.system_share))
        root = Context.of(pc.shared(self.system_prompt, sys_tokens), pc.segment(max(1, base - sys_tokens)))
        value_instr = pc.shared(self.system_prompt + "-value", self.value_instruction_tokens)
        path = root
        for t in range(n_iter):
            if t % self.max_depth == 0:
                path = root
            children = yield Parallel([self._child(pc, path, value_instr) for _ in range(self.width)])
            action, obs = children[int(rng.integers(len(children)))]
            path = path.extend(action, obs)

    def _child(self, pc: ProgramContext, ctx: Context, value_instr: Segment) -> Generator:
        rng = pc.rng
        tid = pc.new_thread()
        tool = pick_tool(rng, self.tools)
        duration = tool.sample(rng)
        hints = CallHints(tool_after=tool.name, tool_time_estimate=tool.mean,
                          next_invocation_distance=duration if self.oracle_hints else None, stage="expand")
        act = pc.llm(ctx, sample_len(rng, self.output_tokens_mean, self.length_sigma), thread_id=tid, hints=hints)
        obs = pc.segment(sample_len(rng, self.observation_tokens_mean, self.length_sigma))
        value = pc.llm(ctx.extend(output_of(act), obs, value_instr),
                       sample_len(rng, self.output_tokens_mean, self.length_sigma), thread_id=tid,
                       hints=CallHints(stage="evaluate"))
        return run_seq([act, ToolCall(tool.name, duration, estimate=tool.mean), value], (output_of(act), obs))


# --------------------------------------------------------------------------- map-reduce
@register_generator("mapreduce")
@dataclass(frozen=True)
class MapReduce:
    """Map-reduce over a document (Parrot's summarisation; Autellix Fig. 1).

    ``num_chunks`` map calls run in parallel, each on a shared map instruction + its own chunk;
    then reduce calls combine the map outputs: one call over all of them (``fan_in = 0``) or a
    tree of calls over groups of ``fan_in`` until one output is left. Calls per program:
    ``num_chunks`` + the number of reduce calls (1 for ``fan_in = 0``).
    """

    num_chunks: int = param(8, 'num chunks', ge=1)
    chunk_tokens_mean: float = param(1024.0, 'mean chunk tokens', ge=0, unit='tokens')
    map_instruction_tokens: int = param(128, 'map instruction tokens', ge=1, unit='tokens')
    map_output_tokens_mean: float = param(128.0, 'mean map output tokens', ge=0, unit='tokens')
    fan_in: int = param(0, "reduce group size (0: one reduce over all, else >= 2)", ge=0,
                         unit="outputs")
    reduce_instruction_tokens: int = param(64, 'reduce instruction tokens', ge=1, unit='tokens')
    reduce_output_tokens_mean: float = param(256.0, 'mean reduce output tokens', ge=0, unit='tokens')
    length_sigma: float = param(0.3, 'log-space sigma of lengths', ge=0)
    system_prompt: str = param("mapreduce", PROMPT_HELP, nonempty=True)

    def __post_init__(self) -> None:
        check_params(self)
        if self.fan_in == 1:
            raise ValueError("fan_in must be 0 (one reduce) or >= 2")

    def reduce_calls(self) -> int:
        if self.fan_in == 0:
            return 1
        n, calls = self.num_chunks, 0
        while True:
            groups = -(-n // self.fan_in)
            calls += groups
            if groups == 1:
                return calls
            n = groups

    def body(self, pc: ProgramContext) -> Generator:
        rng = pc.rng
        instr = pc.shared(self.system_prompt + "-map", self.map_instruction_tokens)
        maps = []
        for i in range(self.num_chunks):
            tid = pc.new_thread()
            chunk = pc.segment(sample_len(rng, self.chunk_tokens_mean, self.length_sigma))
            maps.append(pc.llm(Context.of(instr, chunk), sample_len(rng, self.map_output_tokens_mean, self.length_sigma),
                               thread_id=tid, hints=CallHints(stage="map")))
        outs = yield Parallel(maps)
        outs = [r.output for r in outs]
        rinstr = pc.shared(self.system_prompt + "-reduce", self.reduce_instruction_tokens)
        while True:
            k = len(outs) if self.fan_in == 0 else self.fan_in
            groups = [outs[i:i + k] for i in range(0, len(outs), k)]
            calls = [pc.llm(Context.of(rinstr, *g), sample_len(rng, self.reduce_output_tokens_mean, self.length_sigma),
                            hints=CallHints(stage="reduce")) for g in groups]
            res = yield (calls[0] if len(calls) == 1 else Parallel(calls))
            if len(calls) == 1:
                return
            outs = [r.output for r in res]


# --------------------------------------------------------------------------- KVFlow workflow
@register_generator("kvflow")
@dataclass(frozen=True)
class KVFlowWorkflow:
    """KVFlow's sequential multi-agent workflow: each agent's prompt is its long fixed prompt and a
    short dynamic part; one call per agent, in order (``cycles`` > 1 loops PEER-style).

    Defaults: 10 agents, fixed / dynamic / output = 8192 / 32 / 32 tokens. ``fixed_scope`` says who
    shares an agent's fixed prompt: ``client`` (the closed-loop agent slot that reruns the
    workflow, KVFlow's independent workflows), ``global`` (every workflow) or ``program`` (no one).
    Each call hints ``fixed_prefix_tokens`` (KVFlow's fixed-prefix marker), ``stage`` ("agent<i>")
    and ``next_invocation_steps`` = ``num_agents`` (the agent runs again one workflow pass later).
    """

    num_agents: int = param(10, 'num agents', ge=1)
    fixed_tokens: int = param(8192, 'fixed tokens', ge=0, unit='tokens')
    dynamic_tokens: int = param(32, 'dynamic tokens', ge=0, unit='tokens')
    output_tokens: int = param(32, 'output tokens', ge=1, unit='tokens')
    cycles: int = param(1, 'cycles', ge=1)
    length_sigma: float = param(0.0, 'log-space sigma of lengths', ge=0)
    fixed_scope: str = param("client", "who shares an agent's fixed prompt",
                              choices=("client", "global", "program"))
    system_prompt: str = param("kvflow-agent", PROMPT_HELP, nonempty=True)

    def __post_init__(self) -> None:
        check_params(self)
        if self.fixed_tokens + self.dynamic_tokens < 1:
            raise ValueError("fixed_tokens + dynamic_tokens must be >= 1")

    def body(self, pc: ProgramContext) -> Generator:
        rng = pc.rng
        fixed = {}
        for i in range(self.num_agents):
            if self.fixed_scope == "global":
                fixed[i] = pc.shared(f"{self.system_prompt}-{i}", self.fixed_tokens)
            elif self.fixed_scope == "client":
                fixed[i] = pc.shared(f"{self.system_prompt}-{pc.agent_id}-{i}", self.fixed_tokens)
            else:
                fixed[i] = pc.segment(self.fixed_tokens)
        for _ in range(self.cycles):
            for i in range(self.num_agents):
                dyn = pc.segment(sample_len(rng, self.dynamic_tokens, self.length_sigma) if self.dynamic_tokens else 0)
                ctx = Context.of(fixed[i]).extend(dyn) if self.fixed_tokens else Context.of(dyn)
                hints = CallHints(fixed_prefix_tokens=self.fixed_tokens, stage=f"agent{i}",
                                  next_invocation_steps=self.num_agents)
                yield pc.llm(ctx, sample_len(rng, self.output_tokens, self.length_sigma),
                             agent_id=sub_agent_id(pc, i), hints=hints)


# --------------------------------------------------------------------------- ScaleSim society
@register_generator("society")
@dataclass(frozen=True)
class AgentSociety:
    """A ScaleSim-style generative-agent simulation: one program is one simulation run.

    ``num_agents`` agents over ``num_steps`` steps; each agent is active in a step with probability
    ``active_rate`` (sparse activation, ~20 %), and the whole activation schedule is drawn up front,
    so every call hints its agent's exact next-invocation distance (``next_invocation_steps``, and
    ``next_invocation_distance`` = steps x ``step_time``; ScaleSim's D_i). An active agent's prompt
    is the world rules (shared by all simulations), its persona, its history and a new observation;
    the history grows by observation + output per activation and is compacted back to world +
    persona once it exceeds ``max_history_tokens``. The active calls of a step run in parallel;
    then the world advances for ``step_time`` seconds (a ``world`` tool). Calls per program average
    ``num_agents x num_steps x active_rate``.
    """

    num_agents: int = param(100, 'num agents', ge=1)
    num_steps: int = param(30, 'num steps', ge=1)
    active_rate: float = param(0.2, 'probability an agent is active in a step', gt=0, le=1)
    world_tokens: int = param(1024, 'world tokens', ge=1, unit='tokens')
    persona_tokens: int = param(512, 'persona tokens', ge=1, unit='tokens')
    observation_tokens_mean: float = param(128.0, 'mean observation tokens', ge=0, unit='tokens')
    output_tokens_mean: float = param(64.0, 'mean output tokens', ge=0, unit='tokens')
    max_history_tokens: int = param(4096, 'max history tokens', ge=1, unit='tokens')
    step_time: float = param(1.0, 'world time per simulation step', ge=0, unit='s')
    length_sigma: float = param(0.3, 'log-space sigma of lengths', ge=0)
    world_prompt: str = param("society-world", PROMPT_HELP, nonempty=True)

    def __post_init__(self) -> None:
        check_params(self)

    def schedule(self, rng: np.random.Generator) -> np.ndarray:
        """Boolean (steps x agents) activation matrix."""
        return rng.random((self.num_steps, self.num_agents)) < self.active_rate

    def body(self, pc: ProgramContext) -> Generator:
        rng = pc.rng
        active = self.schedule(rng)
        # next_step[t, i]: the first step > t where agent i is active (num_steps if none)
        next_step = np.full((self.num_steps, self.num_agents), self.num_steps, dtype=np.int64)
        for t in range(self.num_steps - 2, -1, -1):
            next_step[t] = np.where(active[t + 1], t + 1, next_step[t + 1])
        world = pc.shared(self.world_prompt, self.world_tokens)
        base = [Context.of(world, pc.segment(self.persona_tokens)) for _ in range(self.num_agents)]
        ctx = list(base)
        hist = [0] * self.num_agents
        for t in range(self.num_steps):
            calls, who = [], []
            for i in np.flatnonzero(active[t]):
                i = int(i)
                d = int(next_step[t, i]) - t if next_step[t, i] < self.num_steps else None
                prompt = ctx[i].extend(pc.segment(sample_len(rng, self.observation_tokens_mean, self.length_sigma)))
                hints = CallHints(next_invocation_steps=d,
                                  next_invocation_distance=d * self.step_time if d is not None else None,
                                  stage=f"step{t}")
                call = pc.llm(prompt, sample_len(rng, self.output_tokens_mean, self.length_sigma),
                              agent_id=sub_agent_id(pc, i), thread_id=i + 1, hints=hints)
                calls.append(call)
                who.append(i)
                grown = prompt.num_tokens - base[i].num_tokens + call.num_output_tokens
                if grown > self.max_history_tokens:
                    ctx[i], hist[i] = base[i], 0
                else:
                    ctx[i], hist[i] = prompt.extend(output_of(call)), grown
            if calls:
                yield calls[0] if len(calls) == 1 else Parallel(calls)
            if t < self.num_steps - 1 and self.step_time > 0:
                yield ToolCall("world", self.step_time, estimate=self.step_time)


# --------------------------------------------------------------------------- SWE-agent loop
SWE_TOOLS = (
    ToolSpec("edit", weight=0.35, dist="lognormal", median=0.2, sigma=0.5),
    ToolSpec("bash", weight=0.35, dist="lognormal", median=1.0, sigma=1.2),
    ToolSpec("search", weight=0.15, dist="lognormal", median=0.5, sigma=1.0),
    ToolSpec("run_tests", weight=0.15, dist="lognormal", median=8.0, sigma=1.0, max_time=600.0),
)


@register_generator("swe")
@dataclass(frozen=True)
class SWEAgent:
    """A SWE-agent-like coding loop: think + act, run the command, append its output, repeat.

    The context starts with a shared system prompt (instructions and tool docs) and the private
    issue, and grows by the model's output and the (heavy-tailed, truncated) observation every
    turn, so late calls carry tens of thousands of tokens; the loop also stops when the next
    turn would overflow ``max_context_tokens`` (SWE-agent's context exit). Tools: edits, shell
    commands, searches and test runs with lognormal durations. Defaults: 30 calls per program,
    250 output tokens, observations of 700 tokens on average.
    """

    calls_mean: float = param(30.0, 'mean LLM calls per program', ge=1, unit='calls')
    max_calls: int = param(100, 'max calls', ge=1)
    system_tokens: int = param(4000, 'system tokens', ge=1, unit='tokens')
    issue_tokens_mean: float = param(1000.0, 'mean issue tokens', ge=0, unit='tokens')
    output_tokens_mean: float = param(250.0, 'mean output tokens', ge=0, unit='tokens')
    observation_tokens_mean: float = param(700.0, 'mean observation tokens', ge=0, unit='tokens')
    observation_sigma: float = param(1.0, 'log-space sigma of observation', ge=0)
    max_observation_tokens: int = param(16000, 'max observation tokens', ge=1, unit='tokens')
    max_context_tokens: int = param(128000, 'max context tokens', ge=1, unit='tokens')
    length_sigma: float = param(0.3, 'log-space sigma of lengths', ge=0)
    system_prompt: str = param("swe-agent", PROMPT_HELP, nonempty=True)
    tools: tuple = param(SWE_TOOLS, TOOLS_HELP, type=tuple)
    oracle_hints: bool = param(True, "hint each call's exact next-invocation distance (an oracle)")

    def __post_init__(self) -> None:
        check_params(self)
        object.__setattr__(self, "tools", _tools(self.tools))
        if not 1 <= self.calls_mean <= self.max_calls:
            raise ValueError("calls_mean must be between 1 and max_calls")

    @cached_property
    def draw_mean(self) -> float:
        """The geometric mean to draw with so that the capped call count averages ``calls_mean``."""
        return geometric_mean_for(self.calls_mean, self.max_calls)

    def body(self, pc: ProgramContext) -> Generator:
        rng = pc.rng
        n = sample_calls(rng, self.draw_mean, self.max_calls)
        ctx = Context.of(pc.shared(self.system_prompt, self.system_tokens),
                         pc.segment(sample_len(rng, self.issue_tokens_mean, self.length_sigma)))
        for i in range(n):
            out_tokens = sample_len(rng, self.output_tokens_mean, self.length_sigma)
            obs_tokens = min(self.max_observation_tokens,
                             sample_len(rng, self.observation_tokens_mean, self.observation_sigma))
            last = i == n - 1 or ctx.num_tokens + out_tokens + obs_tokens + self.output_tokens_mean > self.max_context_tokens
            tool = None if last else pick_tool(rng, self.tools)
            duration = tool.sample(rng) if tool else 0.0
            hints = CallHints(tool_after=tool.name if tool else None, tool_time_estimate=tool.mean if tool else None,
                              next_invocation_distance=duration if tool and self.oracle_hints else None)
            call = pc.llm(ctx, out_tokens, hints=hints)
            yield call
            if last:
                return
            yield ToolCall(tool.name, duration, estimate=tool.mean)
            ctx = ctx.extend(output_of(call), pc.segment(obs_tokens))


# --------------------------------------------------------------------------- multi-agent teams
@register_generator("team")
@dataclass(frozen=True)
class Team(TeamGenerator):
    """Multi-agent teams over a task DAG, run with the topology the shape policy picks.

    ``task(rng)`` draws a layered DAG of ``nodes_min..nodes_max`` sub-tasks: a random number of
    levels, every node below the first wired to one node of the level above plus extra edges
    with ``edge_prob``, and each edge labelled none / weak / strong / critical coupling (AdaptOrch:
    0 / 0.3 / 0.7 / 1.0; the task's coupling is their mean). Each node has an instruction and an
    output length. Every prompt starts with the shared team system prompt and the task
    description. Topologies (LLM calls for n nodes in m levels):

    - ``sequential`` (n): one growing conversation runs the nodes in order;
    - ``parallel`` (n + 1): all nodes at once on the task alone, then a merge call over all outputs;
    - ``hierarchical`` (1 + n + m): a lead plans, workers run level by level (each sees the plan
      and its predecessors' outputs) and the lead reviews every level; its last review answers;
    - ``hybrid`` (n, + 1 merge if the last level has several nodes): levels in sequence, nodes of
      a level in parallel, each seeing its predecessors' outputs;
    - ``debate`` (k (r + 1) + 1): ``debate_agents`` agents answer the whole task, then ``debate_rounds``
      rounds in which each sees everyone's previous answers; a judge decides.
    """

    nodes_min: int = param(3, 'nodes min', ge=1)
    nodes_max: int = param(8, 'nodes max', ge=1)
    edge_prob: float = param(0.3, 'probability of each extra DAG edge', ge=0, le=1)
    coupling_levels: tuple = param((0.0, 0.3, 0.7, 1.0), "edge coupling labels, each in [0, 1]",
                                    type=tuple)
    system_tokens: int = param(256, 'system tokens', ge=1, unit='tokens')
    task_tokens_mean: float = param(512.0, 'mean task tokens', ge=0, unit='tokens')
    node_prompt_tokens_mean: float = param(256.0, 'mean node prompt tokens', ge=0, unit='tokens')
    node_output_tokens_mean: float = param(256.0, 'mean node output tokens', ge=0, unit='tokens')
    synth_output_tokens_mean: float = param(256.0, 'mean synth output tokens', ge=0, unit='tokens')
    instruction_tokens: int = param(32, 'instruction tokens', ge=1, unit='tokens')
    debate_agents: int = param(3, 'debate agents', ge=1)
    debate_rounds: int = param(2, 'debate rounds after the first answers', ge=0, unit='rounds')
    default_topology: str = param("sequential", "topology a fixed-topology policy runs",
                                  choices=TEAM_TOPOLOGIES)
    length_sigma: float = param(0.3, 'log-space sigma of lengths', ge=0)
    system_prompt: str = param("team", PROMPT_HELP, nonempty=True)

    def __post_init__(self) -> None:
        check_params(self)
        levels = self.coupling_levels
        if not levels or any(isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c <= 1
                             for c in levels):
            raise ValueError(f"coupling_levels must be numbers in [0, 1], got {list(levels)!r}")
        object.__setattr__(self, "coupling_levels", tuple(float(c) for c in levels))
        if self.nodes_min > self.nodes_max:
            raise ValueError("need nodes_min <= nodes_max")

    # ------------------------------------------------------------------ the task
    def task(self, rng: np.random.Generator) -> TaskDAG:
        n = int(rng.integers(self.nodes_min, self.nodes_max + 1))
        num_levels = int(rng.integers(1, n + 1))
        level = sorted(list(range(num_levels)) + [int(x) for x in rng.integers(0, num_levels, n - num_levels)])
        by_level: dict[int, list[int]] = {}
        for v, lv in enumerate(level):
            by_level.setdefault(lv, []).append(v)
        edges = set()
        for v, lv in enumerate(level):
            if lv == 0:
                continue
            above = by_level[lv - 1]
            edges.add((above[int(rng.integers(len(above)))], v))
            for u in range(v):
                if level[u] < lv and (u, v) not in edges and rng.random() < self.edge_prob:
                    edges.add((u, v))
        edges_l = sorted(edges)
        labels = [self.coupling_levels[int(rng.integers(len(self.coupling_levels)))] for _ in edges_l]
        return TaskDAG(
            num_nodes=n, edges=edges_l, coupling=float(np.mean(labels)) if labels else 0.0,
            default_topology=self.default_topology,
            node_prompt_tokens=[sample_len(rng, self.node_prompt_tokens_mean, self.length_sigma) for _ in range(n)],
            node_output_tokens=[sample_len(rng, self.node_output_tokens_mean, self.length_sigma) for _ in range(n)],
        )

    @staticmethod
    def levels(task: TaskDAG) -> list[list[int]]:
        """Nodes grouped by longest-path level (the topological stages)."""
        level = [0] * task.num_nodes
        for u, v in sorted(task.edges, key=lambda e: e[1]):
            level[v] = max(level[v], level[u] + 1)
        out: dict[int, list[int]] = {}
        for v, lv in enumerate(level):
            out.setdefault(lv, []).append(v)
        return [out[k] for k in sorted(out)]

    def expected_calls(self, task: TaskDAG, topology: str) -> int:
        n = task.num_nodes
        stages = self.levels(task)
        return {
            "sequential": n,
            "parallel": n + 1,
            "hierarchical": 1 + n + len(stages),
            "hybrid": n + (1 if len(stages[-1]) > 1 else 0),
            "debate": self.debate_agents * (self.debate_rounds + 1) + 1,
        }[topology]

    # ------------------------------------------------------------------ running it
    def body(self, pc: ProgramContext) -> Generator:
        task = self.task(pc.rng)
        return (yield from self.team_body(pc, task, task.default_topology))

    def team_body(self, pc: ProgramContext, task: TaskDAG, topology: str) -> Generator:
        if topology not in TEAM_TOPOLOGIES:
            raise ValueError(f"unknown topology {topology!r} (known: {', '.join(TEAM_TOPOLOGIES)})")
        rng = pc.rng
        base = Context.of(pc.shared(self.system_prompt, self.system_tokens),
                          pc.segment(sample_len(rng, self.task_tokens_mean, self.length_sigma)))
        instr = [pc.segment(k) for k in task.node_prompt_tokens]
        preds: list[list[int]] = [[] for _ in range(task.num_nodes)]
        for u, v in task.edges:
            preds[v].append(u)
        run = getattr(self, "_" + topology)
        return (yield from run(pc, task, base, instr, preds))

    def _call(self, pc: ProgramContext, ctx: Context, n_out: int, role: Any, stage: str, thread: int = 0) -> LLMCall:
        return pc.llm(ctx, n_out, agent_id=sub_agent_id(pc, role), thread_id=thread, hints=CallHints(stage=stage))

    def _synth_len(self, pc: ProgramContext) -> int:
        return sample_len(pc.rng, self.synth_output_tokens_mean, self.length_sigma)

    def _instruction(self, pc: ProgramContext, what: str) -> Segment:
        return pc.shared(f"{self.system_prompt}-{what}", self.instruction_tokens)

    def _sequential(self, pc, task, base, instr, preds) -> Generator:
        ctx = base
        for v in range(task.num_nodes):
            ctx = ctx.extend(instr[v])
            call = self._call(pc, ctx, task.node_output_tokens[v], f"node{v}", "node")
            yield call
            ctx = ctx.extend(output_of(call))

    def _parallel(self, pc, task, base, instr, preds) -> Generator:
        calls = [self._call(pc, base.extend(instr[v]), task.node_output_tokens[v], f"node{v}", "node", v + 1)
                 for v in range(task.num_nodes)]
        yield calls[0] if len(calls) == 1 else Parallel(calls)
        merge = base.extend(*(output_of(c) for c in calls), self._instruction(pc, "merge"))
        yield self._call(pc, merge, self._synth_len(pc), "merge", "merge")

    def _hybrid(self, pc, task, base, instr, preds) -> Generator:
        out: dict[int, Segment] = {}
        stages = self.levels(task)
        for stage in stages:
            calls = [self._call(pc, base.extend(*(out[u] for u in preds[v]), instr[v]), task.node_output_tokens[v],
                                f"node{v}", "node", v + 1) for v in stage]
            yield calls[0] if len(calls) == 1 else Parallel(calls)
            out.update((v, output_of(c)) for v, c in zip(stage, calls))
        if len(stages[-1]) > 1:
            merge = base.extend(*(out[v] for v in stages[-1]), self._instruction(pc, "merge"))
            yield self._call(pc, merge, self._synth_len(pc), "merge", "merge")

    def _hierarchical(self, pc, task, base, instr, preds) -> Generator:
        lead = base.extend(self._instruction(pc, "plan"))
        plan = self._call(pc, lead, self._synth_len(pc), "lead", "plan")
        yield plan
        lead = lead.extend(output_of(plan))
        worker_base = base.extend(output_of(plan))
        out: dict[int, Segment] = {}
        for stage in self.levels(task):
            calls = [self._call(pc, worker_base.extend(*(out[u] for u in preds[v]), instr[v]),
                                task.node_output_tokens[v], f"node{v}", "node", v + 1) for v in stage]
            yield calls[0] if len(calls) == 1 else Parallel(calls)
            out.update((v, output_of(c)) for v, c in zip(stage, calls))
            lead = lead.extend(*(out[v] for v in stage), self._instruction(pc, "review"))
            review = self._call(pc, lead, self._synth_len(pc), "lead", "review")
            yield review
            lead = lead.extend(output_of(review))

    def _debate(self, pc, task, base, instr, preds) -> Generator:
        k = self.debate_agents
        ctx = [base.extend(*instr) for _ in range(k)]
        answers: list[Segment] = []
        debate = self._instruction(pc, "debate")
        for r in range(self.debate_rounds + 1):
            if r:
                ctx = [ctx[a].extend(answers[a], *(answers[b] for b in range(k) if b != a), debate) for a in range(k)]
            calls = [self._call(pc, ctx[a], self._synth_len(pc), f"debater{a}", "debate", a + 1) for a in range(k)]
            yield calls[0] if k == 1 else Parallel(calls)
            answers = [output_of(c) for c in calls]
        judge = base.extend(*instr, *answers, self._instruction(pc, "judge"))
        yield self._call(pc, judge, self._synth_len(pc), "judge", "judge")

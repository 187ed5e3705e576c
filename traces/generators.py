"""Seeded program generators: the workload shapes the papers used, written once for sim and live.

Each generator is a frozen dataclass of parameters (defaults from the papers, see
``research/policies.md`` §11–12) registered by name, whose ``body(pc)`` is a program body: a
generator yielding :class:`~agentsim.workload.LLMCall`, :class:`~agentsim.workload.ToolCall` and
:class:`~agentsim.workload.Parallel` requests. All randomness comes from ``pc.rng`` (one stream per
program, derived from the run seed and the program id), so a program is identical in every backend.

Multi-agent *team* generators additionally define ``task(rng) -> TaskDAG`` and
``team_body(pc, task, topology)``; the shape policy picks the topology when the task starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Generator

import numpy as np

from agentsim.config import check_params, describe_params, param
from agentsim.errors import ConfigError
from agentsim.workload import CallHints, Context, LLMCall, Parallel, ProgramContext, ToolCall

_GENERATORS: dict[str, type] = {}

# help texts shared by several generators' parameters (each field declares its type and range with
# :func:`agentsim.config.param`; ``__post_init__`` checks them before any other rule)
PROMPT_HELP = "name of the shared prompt (programs with the same name share it)"
TOOLS_HELP = "tool tables {name, weight, dist, median, sigma, scale, alpha, max_time}"
SHARE_HELP = "share of the first prompt that is the shared system prompt"


def register_generator(name: str):
    """Class decorator: register a generator dataclass under ``name``."""

    def deco(cls: type) -> type:
        cls.name = name
        _GENERATORS[name] = cls
        return cls

    return deco


def generators() -> dict[str, type]:
    _load_extra()
    return dict(sorted(_GENERATORS.items()))


def make_generator(name: str, params: dict | None = None, where: str = "workload") -> Any:
    """Instantiate generator ``name`` with ``params``; unknown names or fields raise ConfigError."""
    _load_extra()
    cls = _GENERATORS.get(name)
    if cls is None:
        raise ConfigError(f"{where}.generator", f"unknown generator {name!r} (known: {', '.join(sorted(_GENERATORS))})")
    params = dict(params or {})
    names = {f.name for f in fields(cls)}
    for k in params:
        if k not in names:
            raise ConfigError(f"{where}.params.{k}", f"unknown parameter for generator {name!r} (known: {', '.join(sorted(names))})")
    try:
        return cls(**params)
    except ConfigError as e:  # a declared parameter out of its range: name it in full
        raise ConfigError(f"{where}.params.{e.where}", e.message) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}.params", f"{name}: {e}") from None


def generator_params(name: str) -> dict[str, str]:
    """``{parameter: "help; range (unit)"}`` of generator ``name`` (what ``--param`` accepts)."""
    _load_extra()
    if name not in _GENERATORS:
        raise ConfigError("generator", f"unknown generator {name!r} (known: {', '.join(sorted(_GENERATORS))})")
    return describe_params(_GENERATORS[name])


def _load_extra() -> None:
    # Further shapes live in sibling modules that register themselves on import.
    import importlib
    import importlib.util

    for mod in ("agentsim.traces.shapes",):
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)


# --------------------------------------------------------------------------- sampling helpers
def sample_calls(rng: np.random.Generator, mean: float, max_calls: int) -> int:
    """Number of calls: 1 + geometric with the given mean, capped at ``max_calls``."""
    if mean <= 1:
        return 1
    return int(min(max_calls, rng.geometric(1.0 / mean)))


def sample_len(rng: np.random.Generator, mean: float, sigma: float) -> int:
    """A token count >= 1 with the given mean: mean-preserving lognormal (sigma=0: constant)."""
    if sigma <= 0:
        return max(1, int(round(mean)))
    return max(1, int(round(mean * math.exp(sigma * rng.standard_normal() - 0.5 * sigma * sigma))))


@dataclass(frozen=True)
class ToolSpec:
    """Per-tool duration distribution: ``lognormal`` (median, sigma) or ``pareto`` (scale, alpha)."""

    name: str
    weight: float = param(1.0, 'relative probability of this tool', gt=0)
    dist: str = param("lognormal", "duration distribution", choices=("lognormal", "pareto", "constant"))
    median: float = param(1.0, 'median duration (lognormal; constant: the duration)', ge=0, unit='s')
    sigma: float = param(1.0, 'log-space sigma of the duration', ge=0)
    scale: float = param(0.5, 'Pareto scale (minimum duration)', gt=0, unit='s')
    alpha: float = param(1.5, 'Pareto shape (> 1 for a finite mean)', gt=0)
    max_time: float = param(120.0, 'cap on one duration', gt=0, unit='s')

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("tools", f"a tool needs a non-empty name, got {self.name!r}")
        check_params(self, f"tools[{self.name}]")
        if self.dist == "pareto" and self.alpha <= 1:
            raise ValueError(f"tool {self.name}: pareto alpha must be > 1 (finite mean)")

    def sample(self, rng: np.random.Generator) -> float:
        if self.dist == "lognormal":
            t = self.median * math.exp(self.sigma * rng.standard_normal())
        elif self.dist == "pareto":
            t = self.scale * (1.0 + rng.pareto(self.alpha))
        else:
            t = self.median
        return min(t, self.max_time)

    @property
    def mean(self) -> float:
        """Mean duration ignoring the cap (what an informed predictor would estimate)."""
        if self.dist == "lognormal":
            return self.median * math.exp(0.5 * self.sigma**2)
        if self.dist == "pareto":
            return self.scale * self.alpha / (self.alpha - 1)
        return self.median


def _tools(value: Any) -> tuple[ToolSpec, ...]:
    if isinstance(value, tuple) and all(isinstance(t, ToolSpec) for t in value):
        return value
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("tools must be a non-empty list of tool tables")
    tools = tuple(t if isinstance(t, ToolSpec) else ToolSpec(**t) for t in value)
    if not math.isfinite(sum(t.weight for t in tools)):
        raise ValueError("tools: the weights add up to more than a float holds; they are relative, so scale "
                         "them down")
    return tools


# Defaults after research/policies.md §12: shell/file/API tools lognormal (median 0.5-2 s,
# sigma 1.0-1.5), web tools Pareto-tailed (alpha 1.5), a fast calculator.
BFCL_TOOLS = (
    ToolSpec("web_search", weight=0.3, dist="pareto", scale=0.5, alpha=1.5),
    ToolSpec("api_call", weight=0.4, dist="lognormal", median=0.8, sigma=1.0),
    ToolSpec("calculator", weight=0.3, dist="lognormal", median=0.05, sigma=0.5),
)


def pick_tool(rng: np.random.Generator, tools: tuple[ToolSpec, ...]) -> ToolSpec:
    """A tool drawn with probability proportional to its weight."""
    if len(tools) == 1:
        return tools[0]
    total = sum(t.weight for t in tools)
    u = rng.random() * total
    acc = 0.0
    for t in tools:
        acc += t.weight
        if u < acc:
            return t
    return tools[-1]


# --------------------------------------------------------------------------- generators
@register_generator("react")
@dataclass(frozen=True)
class ReAct:
    """ReAct / function calling (BFCL-like): LLM -> tool -> LLM ..., the context grows each turn.

    Defaults after Autellix's BFCL v3 numbers: 10.75 calls per program (max 70), 735 prompt
    tokens and 34 output tokens per call on average. The first prompt is a shared tool-schema
    system prompt plus a private user query, sized so that the mean prompt over all calls is
    ``prompt_tokens_mean`` given the growth of ``output + observation`` tokens per turn.
    """

    calls_mean: float = param(10.75, 'mean LLM calls per program', ge=1, unit='calls')
    max_calls: int = param(70, 'max calls', ge=1)
    prompt_tokens_mean: float = param(735.0, 'mean prompt tokens', ge=0, unit='tokens')
    output_tokens_mean: float = param(34.0, 'mean output tokens', ge=0, unit='tokens')
    observation_tokens_mean: float = param(20.0, 'mean observation tokens', ge=0, unit='tokens')
    system_share: float = param(0.7, SHARE_HELP, ge=0, lt=1)
    length_sigma: float = param(0.3, 'log-space sigma of lengths', ge=0)
    system_prompt: str = param("bfcl-tools", PROMPT_HELP, nonempty=True)
    tools: tuple = param(BFCL_TOOLS, TOOLS_HELP, type=tuple)
    oracle_hints: bool = param(True, "hint each call's exact next-invocation distance (an oracle)")

    def __post_init__(self) -> None:
        check_params(self)
        object.__setattr__(self, "tools", _tools(self.tools))
        growth = (self.calls_mean - 1) * (self.output_tokens_mean + self.observation_tokens_mean)
        if self.prompt_tokens_mean - growth < 2:
            raise ValueError("prompt_tokens_mean too small for the per-turn growth of output + observation tokens")

    @property
    def initial_prompt_tokens(self) -> float:
        # E[prompt of call j] averaged over calls = init + E[j] * growth, and for 1 + geometric
        # call counts with mean m the call-weighted E[j] is m - 1.
        return self.prompt_tokens_mean - (self.calls_mean - 1) * (self.output_tokens_mean + self.observation_tokens_mean)

    def body(self, pc: ProgramContext) -> Generator:
        rng = pc.rng
        n = sample_calls(rng, self.calls_mean, self.max_calls)
        init = self.initial_prompt_tokens
        sys_tokens = int(round(init * self.system_share))
        ctx = Context.of(pc.shared(self.system_prompt, sys_tokens), pc.segment(max(1, int(round(init)) - sys_tokens)))
        tools, oracle_hints = self.tools, self.oracle_hints
        out_mean, obs_mean, sigma = self.output_tokens_mean, self.observation_tokens_mean, self.length_sigma
        for _ in range(n - 1):
            # draws in this order: the tool after the call, its duration, the call's output length
            tool = pick_tool(rng, tools)
            duration = tool.sample(rng)
            estimate = tool.mean
            hints = CallHints(tool_after=tool.name, tool_time_estimate=estimate,
                              next_invocation_distance=duration if oracle_hints else None)
            result = yield pc.llm(ctx, sample_len(rng, out_mean, sigma), hints=hints)
            yield ToolCall(tool.name, duration, estimate=estimate)
            obs = pc.segment(sample_len(rng, obs_mean, sigma))
            ctx = ctx.extend(result.output, obs)
        yield pc.llm(ctx, sample_len(rng, out_mean, sigma), hints=CallHints())  # the last call: no tool after it


@register_generator("single")
@dataclass(frozen=True)
class SingleCall:
    """One LLM call per program, lognormal lengths (defaults: Azure LLM inference 2023 conv trace).

    Means and log-sigmas measured on the trace's first 600 s (2,867 requests): prompt 1,147
    tokens (sigma 0.93), output 260 (sigma 0.92); lengths are capped at ``max_prompt_tokens`` /
    ``max_output_tokens`` like the trace (7,930 / 1,000), which trims the mean by about 1%.
    """

    prompt_tokens_mean: float = param(1147.0, 'mean prompt tokens', ge=0, unit='tokens')
    prompt_sigma: float = param(0.93, 'log-space sigma of prompt', ge=0)
    output_tokens_mean: float = param(260.0, 'mean output tokens', ge=0, unit='tokens')
    output_sigma: float = param(0.92, 'log-space sigma of output', ge=0)
    max_prompt_tokens: int = param(7930, 'max prompt tokens', ge=1, unit='tokens')
    max_output_tokens: int = param(1000, 'max output tokens', ge=1, unit='tokens')
    max_total_tokens: int = param(8192, "prompt + output cap (the model's context, Llama-3-8B)", ge=2,
                                 unit="tokens")

    def __post_init__(self) -> None:
        check_params(self)

    def body(self, pc: ProgramContext) -> Generator:
        rng = pc.rng
        out = min(self.max_output_tokens, sample_len(rng, self.output_tokens_mean, self.output_sigma))
        prompt = min(self.max_prompt_tokens, self.max_total_tokens - out,
                     sample_len(rng, self.prompt_tokens_mean, self.prompt_sigma))
        yield pc.llm(Context.of(pc.segment(prompt)), out)


@register_generator("chat")
@dataclass(frozen=True)
class Chat:
    """Multi-turn chat (ShareGPT-like): user turn -> answer, with human think time between turns.

    Defaults after Autellix's ShareGPT numbers: 6.66 calls per conversation (max 80), 256 new user
    tokens and 277 output tokens per call; each prompt carries the whole conversation so far.
    Think time: lognormal, median ``think_time_median`` seconds.
    """

    calls_mean: float = param(6.66, 'mean LLM calls per program', ge=1, unit='calls')
    max_calls: int = param(80, 'max calls', ge=1)
    user_tokens_mean: float = param(256.0, 'mean user tokens', ge=0, unit='tokens')
    output_tokens_mean: float = param(277.0, 'mean output tokens', ge=0, unit='tokens')
    system_tokens: int = param(64, 'system tokens', ge=1, unit='tokens')
    length_sigma: float = param(0.6, 'log-space sigma of lengths', ge=0)
    think_time_median: float = param(20.0, 'median human think time between turns', ge=0, unit='s')
    think_time_sigma: float = param(1.0, 'log-space sigma of think time', ge=0)
    system_prompt: str = param("chat-system", PROMPT_HELP, nonempty=True)

    def __post_init__(self) -> None:
        check_params(self)

    def body(self, pc: ProgramContext) -> Generator:
        rng = pc.rng
        n = sample_calls(rng, self.calls_mean, self.max_calls)
        ctx = Context.of(pc.shared(self.system_prompt, self.system_tokens))
        for i in range(n):
            ctx = ctx.extend(pc.segment(sample_len(rng, self.user_tokens_mean, self.length_sigma)))
            think = self.think_time_median * math.exp(self.think_time_sigma * rng.standard_normal())
            last = i == n - 1
            hints = CallHints(tool_after=None if last else "human", next_invocation_distance=None if last else think)
            result = yield pc.llm(ctx, sample_len(rng, self.output_tokens_mean, self.length_sigma), hints=hints)
            if last:
                break
            ctx = ctx.extend(result.output)
            yield ToolCall("human", think, estimate=self.think_time_median * math.exp(0.5 * self.think_time_sigma**2))


@register_generator("fanout")
@dataclass(frozen=True)
class FanOut:
    """Fan-out / fan-in (map-reduce): a planner call, ``width`` parallel workers, a reducer call.

    Each worker prompt = planner context + planner output + its own instruction; a worker may run
    ``worker_tool`` between two LLM calls. The reducer sees every worker's output.
    """

    width: int = param(4, 'width', ge=1)
    prompt_tokens: int = param(1024, 'prompt tokens', ge=1, unit='tokens')
    shared_tokens: int = param(512, 'shared tokens', ge=0, unit='tokens')
    plan_output_tokens: int = param(128, 'plan output tokens', ge=1, unit='tokens')
    worker_prompt_tokens: int = param(256, 'worker prompt tokens', ge=1, unit='tokens')
    worker_output_tokens: int = param(256, 'worker output tokens', ge=1, unit='tokens')
    worker_calls: int = param(1, 'worker calls', ge=1)
    reduce_output_tokens: int = param(256, 'reduce output tokens', ge=1, unit='tokens')
    length_sigma: float = param(0.3, 'log-space sigma of lengths', ge=0)
    tools: tuple = param((ToolSpec("retrieve", dist="lognormal", median=0.5, sigma=1.0),), TOOLS_HELP,
                         type=tuple)
    system_prompt: str = param("fanout-system", PROMPT_HELP, nonempty=True)

    def __post_init__(self) -> None:
        check_params(self)
        object.__setattr__(self, "tools", _tools(self.tools))
        if self.shared_tokens >= self.prompt_tokens:
            raise ValueError("shared_tokens must be < prompt_tokens")

    def body(self, pc: ProgramContext) -> Generator:
        rng = pc.rng
        ctx = Context.of(pc.shared(self.system_prompt, self.shared_tokens),
                         pc.segment(self.prompt_tokens - self.shared_tokens))
        plan = yield pc.llm(ctx, sample_len(rng, self.plan_output_tokens, self.length_sigma))
        ctx = ctx.extend(plan.output)
        # Everything a worker needs is drawn here, in worker order, before any branch runs: the
        # program's content must not depend on which branch a backend finishes first.
        branches = [self._worker(pc, ctx, pc.new_thread(), self._draw_worker(pc)) for _ in range(self.width)]
        outputs = yield Parallel(branches)
        reduce_ctx = ctx
        for out in outputs:
            reduce_ctx = reduce_ctx.extend(out)
        yield pc.llm(reduce_ctx, sample_len(rng, self.reduce_output_tokens, self.length_sigma))

    def _draw_worker(self, pc: ProgramContext) -> list:
        rng = pc.rng
        steps = [pc.segment(sample_len(rng, self.worker_prompt_tokens, self.length_sigma))]
        for j in range(self.worker_calls):
            call = pc.llm(Context.of(steps[0]), sample_len(rng, self.worker_output_tokens, self.length_sigma))
            steps.append(call)
            if j < self.worker_calls - 1:
                tool = pick_tool(rng, self.tools)
                steps.append(ToolCall(tool.name, tool.sample(rng), estimate=tool.mean))
                steps.append(pc.segment(64))
        return steps

    def _worker(self, pc: ProgramContext, ctx: Context, thread_id: int, steps: list) -> Generator:
        wctx = ctx.extend(steps[0])
        result = None
        for step in steps[1:]:
            if isinstance(step, ToolCall):
                yield step
            elif isinstance(step, LLMCall):
                step.context = wctx
                step.thread_id = thread_id
                result = yield step
                wctx = wctx.extend(result.output)
            else:
                wctx = wctx.extend(step)
        return result.output


# --------------------------------------------------------------------------- teams (shape policy)
@dataclass
class TaskDAG:
    """A multi-agent task: sub-task nodes (prompt/output sizes) and dependency edges.

    ``coupling`` in [0, 1] is AdaptOrch's gamma (how much sub-tasks depend on each other's
    content); ``default_topology`` is what a fixed-topology policy runs.
    """

    num_nodes: int
    edges: list[tuple[int, int]] = field(default_factory=list)
    coupling: float = 0.0
    default_topology: str = "sequential"
    node_prompt_tokens: list[int] = field(default_factory=list)
    node_output_tokens: list[int] = field(default_factory=list)

    def depth(self) -> int:
        """Longest path length in nodes (delta)."""
        level = [1] * self.num_nodes
        for u, v in sorted(self.edges, key=lambda e: e[1]):
            level[v] = max(level[v], level[u] + 1)
        return max(level) if level else 0

    def width(self) -> int:
        """Largest number of nodes on one level of the DAG (omega)."""
        level = [1] * self.num_nodes
        for u, v in sorted(self.edges, key=lambda e: e[1]):
            level[v] = max(level[v], level[u] + 1)
        counts: dict[int, int] = {}
        for lv in level:
            counts[lv] = counts.get(lv, 0) + 1
        return max(counts.values()) if counts else 0


class TeamGenerator:
    """Mixin marker: generators with ``task(rng)`` and ``team_body(pc, task, topology)``."""

    is_team: ClassVar[bool] = True

"""Adaptive topology: AdaptOrch's routing rule over a task DAG, with the router's own LLM calls charged.

AdaptOrch (research/policies.md §8) reads three features of the task DAG an LLM decomposer produced:
width ω (the widest topological layer, its O(|V|+|E|) approximation of the maximum antichain), depth δ
(the longest path, in nodes) and coupling γ (the mean edge coupling, none/weak/strong/critical =
0/0.3/0.7/1.0), and picks::

    |E| = 0                    -> parallel
    ω = 1                      -> sequential
    γ > θ_γ and |V| > θ_δ      -> hierarchical     (the source compares θ_δ with |V|; ``depth_test``)
    ω/|V| > θ_ω and γ <= θ_γ   -> parallel
    otherwise                  -> hybrid (parallel within a topological stage, stages in sequence)

with θ_ω = 0.5, θ_γ = 0.6, θ_δ = 5. The routing itself is linear-time; its real cost is the
decomposer LLM call that produced the DAG (and the synthesis calls, which the team topologies already
make: merge, review, judge). ``charge_router`` adds the decomposer call in front of the team's calls
(:meth:`AdaptOrch.wrap_team_body`, applied by the backend when the shape policy defines it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator

from agentsim.policies.registry import check_choice, check_range, register, register_bundle
from agentsim.workload import CallHints, Context, ProgramContext, stable_id

TOPOLOGIES = ("sequential", "parallel", "hierarchical", "hybrid", "debate")


@dataclass(frozen=True)
class DagFeatures:
    num_nodes: int
    num_edges: int
    width: int        # ω
    depth: int        # δ (nodes on the longest path)
    coupling: float   # γ

    @property
    def width_ratio(self) -> float:
        return self.width / self.num_nodes if self.num_nodes else 0.0


def dag_features(task: Any) -> DagFeatures:
    """ω, δ, γ of a task DAG (``num_nodes``, ``edges`` [(u, v)], ``coupling``)."""
    n = int(task.num_nodes)
    edges = list(task.edges)
    level = [0] * n
    preds: list[list[int]] = [[] for _ in range(n)]
    for u, v in edges:
        preds[v].append(u)
    # topological order by Kahn's algorithm (edges need not be sorted)
    indeg = [len(p) for p in preds]
    succ: list[list[int]] = [[] for _ in range(n)]
    for u, v in edges:
        succ[u].append(v)
    order = [v for v in range(n) if indeg[v] == 0]
    for v in order:
        for w in succ[v]:
            level[w] = max(level[w], level[v] + 1)
            indeg[w] -= 1
            if indeg[w] == 0:
                order.append(w)
    if len(order) != n:
        raise ValueError("task graph has a cycle")
    counts: dict[int, int] = {}
    for lv in level:
        counts[lv] = counts.get(lv, 0) + 1
    width = max(counts.values()) if counts else 0
    depth = (max(level) + 1) if n else 0
    return DagFeatures(n, len(edges), width, depth, float(task.coupling))


@register("shape", "adaptorch")
class AdaptOrch:
    """AdaptOrch's topology rule on the task DAG (ω, δ, γ), charging the decomposer's LLM call.

    Thresholds ``theta_width`` (0.5), ``theta_coupling`` (0.6), ``theta_depth`` (5); ``depth_test``:
    compare θ_δ with ``nodes`` (|V|, as the source writes) or ``depth`` (δ, as the name suggests);
    ``charge_router``: run a decomposer call of ``decomposer_prompt_tokens`` (the task) in,
    ``decomposer_output_tokens_per_node`` x |V| out, before the team starts.
    """

    def __init__(self, theta_width: float = 0.5, theta_coupling: float = 0.6, theta_depth: int = 5,
                 depth_test: str = "nodes", charge_router: bool = True, decomposer_prompt_tokens: int = 768,
                 decomposer_output_tokens_per_node: int = 48) -> None:
        check_choice("depth_test", depth_test, ("nodes", "depth"))
        for name, v in (("theta_width", theta_width), ("theta_coupling", theta_coupling)):
            check_range(name, v, 0.0, 1.0)
        for name, v in (("theta_depth", theta_depth), ("decomposer_prompt_tokens", decomposer_prompt_tokens),
                        ("decomposer_output_tokens_per_node", decomposer_output_tokens_per_node)):
            check_range(name, v, lo=0)
        self.theta_width = theta_width
        self.theta_coupling = theta_coupling
        self.theta_depth = theta_depth
        self.depth_test = depth_test
        self.charge_router = charge_router
        self.decomposer_prompt_tokens = decomposer_prompt_tokens
        self.decomposer_output_tokens_per_node = decomposer_output_tokens_per_node
        self.decisions: list[tuple[float, DagFeatures, str]] = []

    def choose(self, f: DagFeatures) -> str:
        if f.num_edges == 0:
            return "parallel"
        if f.width == 1:
            return "sequential"
        size = f.num_nodes if self.depth_test == "nodes" else f.depth
        if f.coupling > self.theta_coupling and size > self.theta_depth:
            return "hierarchical"
        if f.width_ratio > self.theta_width and f.coupling <= self.theta_coupling:
            return "parallel"
        return "hybrid"

    def shape(self, task: Any, now: float) -> str:
        f = dag_features(task)
        topology = self.choose(f)
        self.decisions.append((now, f, topology))
        return topology

    def wrap_team_body(self, pc: ProgramContext, task: Any, topology: str, body: Generator) -> Generator:
        """The team's program with the router's decomposer call in front (if ``charge_router``)."""
        if not self.charge_router:
            return body
        return _with_decomposer(pc, task, body, self.decomposer_prompt_tokens,
                                self.decomposer_output_tokens_per_node * int(task.num_nodes))


def _with_decomposer(pc: ProgramContext, task: Any, body: Generator, prompt_tokens: int,
                     output_tokens: int) -> Generator:
    ctx = Context.of(pc.shared("adaptorch-decomposer", max(1, prompt_tokens // 2)),
                     pc.segment(max(1, prompt_tokens - prompt_tokens // 2)))
    yield pc.llm(ctx, max(1, output_tokens), agent_id=stable_id("agent", pc.agent_id, "decomposer"),
                 hints=CallHints(stage="decompose"))
    return (yield from body)


register_bundle("adaptorch", "AdaptOrch adaptive topology (width/depth/coupling rule), decomposer call charged",
                route="least-loaded", order="fcfs", evict="lru", shape="adaptorch")
for _t in TOPOLOGIES:
    register_bundle(f"topology-{_t}", f"every multi-agent task run as {_t}", route="least-loaded", order="fcfs",
                    evict="lru", shape="fixed", params={"shape": {"topology": _t}})

"""``agentsim study scaling``: multi-node scaling per router (issue 13 study 1).

Sweeps ``experiments/specs/scaling.toml`` (agents scaled with the GPUs: weak scaling) and
``scaling_fixed.toml`` (a fixed total of agents: strong scaling): nodes x 4 A100-80GB, one Llama-3-8B
engine per GPU, closed-loop ReAct agents, for the routers round-robin (``vllm``), ``least-loaded``,
``prefix-affinity`` (SGLang's cache-aware router) and ``autellix-lb`` (Autellix's program-locality
load balancer, FCFS order).

Table ``scaling.csv``: one row per (variant, router, nodes) with ``gpus``, ``agents``,
``agents_per_gpu``, ``output_throughput`` (output tok/s, as ``vllm bench serve``), ``total_token_throughput``,
``p95_program_latency_s``, ``p95_ttft_ms``, ``prefix_hit_rate``, ``mean_busy_fraction`` and ``scaling_efficiency`` = throughput(N) / (N x throughput(1))
with throughput = output tok/s of the same router and variant (the seed's definition; > 90 % at 10 nodes is
its multi-node target, drawn on the figure). Figure ``scaling.png``: throughput, efficiency and p95 program
latency against nodes.
"""

from __future__ import annotations

from pathlib import Path

from agentsim.experiments.studies import Study, StudyOptions, StudyResult, register
from agentsim.experiments.studies.base import figure, load, policy_label, run_specs, save_figure

#: the seed's multi-node target: scaling efficiency above this at 10 nodes
TARGET_EFFICIENCY = 0.90
TARGET_NODES = 10
VARIANTS = {"scaling": "agents scaled with GPUs", "scaling_fixed": "fixed total agents"}


def scaling_table(tables: dict):
    """The per-(variant, router, nodes) table with ``scaling_efficiency`` (see the module docstring)."""
    import pandas as pd

    rows = []
    for variant, t in tables.items():
        for _, r in t.iterrows():
            v, cfg = r["_values"], r["_config"]
            nodes = int(cfg["cluster"]["num_nodes"])
            gpus = nodes * int(cfg["cluster"]["gpus_per_node"])
            agents = int(cfg["workload"]["agents"])
            rows.append({"variant": VARIANTS.get(variant, variant), "router": policy_label(v["policy"]),
                         "nodes": nodes, "gpus": gpus, "agents": agents, "agents_per_gpu": agents / gpus,
                         "output_throughput": r["output_throughput"],
                         "total_token_throughput": r["total_token_throughput"],
                         "p95_program_latency_s": r["p95_program_latency_s"], "p95_ttft_ms": r["p95_ttft_ms"],
                         "prefix_hit_rate": r["prefix_hit_rate"], "mean_busy_fraction": r["mean_busy_fraction"]})
    df = pd.DataFrame(rows)
    if not len(df):
        return df
    base = df[df["nodes"] == 1].set_index(["variant", "router"])["output_throughput"]
    df["scaling_efficiency"] = [
        r.output_throughput / (r.nodes * base[(r.variant, r.router)]) if (r.variant, r.router) in base.index else float("nan")
        for r in df.itertuples()]
    return df.sort_values(["variant", "router", "nodes"]).reset_index(drop=True)


def _findings(df) -> list[str]:
    out = []
    for variant, g in df.groupby("variant"):
        top = int(g["nodes"].max())
        at = TARGET_NODES if (g["nodes"] == TARGET_NODES).any() else top
        eff = g[g["nodes"] == at].set_index("router")["scaling_efficiency"].dropna()
        if not len(eff) or at == 1:
            continue
        ok = [r for r in eff.index if eff[r] > TARGET_EFFICIENCY]
        out.append(f"{variant}, {at} nodes: scaling efficiency "
                   + ", ".join(f"{r} {eff[r]:.0%}" for r in eff.sort_values(ascending=False).index)
                   + f"; {len(ok)} of {len(eff)} routers clear the seed's > {TARGET_EFFICIENCY:.0%}"
                   + ("" if at == TARGET_NODES else f" (measured at {at} nodes, the largest in this grid)"))
        hits = g[g["nodes"].isin([1, top])].pivot_table(index="router", columns="nodes", values="prefix_hit_rate")
        if top > 1 and 1 in hits.columns:
            out.append(f"{variant}: prefix-cache hit rate from 1 to {top} nodes: "
                       + ", ".join(f"{r} {hits.loc[r, 1]:.0%} -> {hits.loc[r, top]:.0%}" for r in hits.index))
        last = g[g["nodes"] == top].set_index("router")
        best = last["p95_program_latency_s"].idxmin()
        out.append(f"{variant}, {top} nodes ({int(last['agents'].iloc[0])} agents): lowest p95 program latency "
                   f"{best} ({last.loc[best, 'p95_program_latency_s']:.1f} s), highest "
                   f"{last['p95_program_latency_s'].idxmax()} ({last['p95_program_latency_s'].max():.1f} s); "
                   f"throughput {last['output_throughput'].min():,.0f}-{last['output_throughput'].max():,.0f} "
                   "output tok/s")
    return out


def plot(df, path: Path) -> Path:
    fig = figure(13, 4.2)
    ax = fig.subplots(1, 3)
    styles = {v: s for v, s in zip(VARIANTS.values(), ("-", "--"))}
    colors = {}
    for (variant, router), g in df.groupby(["variant", "router"]):
        c = colors.setdefault(router, f"C{len(colors)}")
        kw = dict(color=c, ls=styles.get(variant, ":"), marker="o", ms=4)
        lab = f"{router} ({variant})"
        ax[0].plot(g["nodes"], g["output_throughput"], label=lab, **kw)
        ax[1].plot(g["nodes"], 100 * g["scaling_efficiency"], label=lab, **kw)
        ax[2].plot(g["nodes"], g["p95_program_latency_s"], label=lab, **kw)
    ax[0].set_yscale("log")
    ax[0].set_xscale("log")
    ax[0].set_ylabel("output throughput (tok/s)")
    ax[1].axhline(100 * TARGET_EFFICIENCY, color="k", lw=0.8, ls=":")
    ax[1].text(df["nodes"].min(), 100 * TARGET_EFFICIENCY, " seed target > 90 %", va="bottom", fontsize=7)
    ax[1].set_ylabel("scaling efficiency (%)")
    ax[2].set_ylabel("p95 program latency (s)")
    for a in ax:
        a.set_xlabel("nodes (x 4 A100-80GB)")
        a.grid(alpha=0.3)
    ax[2].legend(fontsize=6)
    fig.suptitle("Multi-node scaling: Llama-3-8B per GPU, closed-loop ReAct agents "
                 "(solid: agents scaled with GPUs, dashed: fixed total)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def run(out: Path, opts: StudyOptions) -> StudyResult:
    specs = [(name, load(name, opts)) for name in VARIANTS]
    tables, failed = run_specs(out, opts, specs)
    res = StudyResult("scaling", failed=failed)
    df = scaling_table({k: t for k, t in tables.items() if len(t)})
    if not len(df):
        res.findings.append("no cell finished; nothing to analyse")
        return res
    res.tables["scaling"] = df
    res.figures.append(plot(df, out / "scaling.png"))
    res.findings += _findings(df)
    return res


register(Study("scaling", "Multi-node scaling: 1-20 nodes x 4 A100, per router; throughput, p95 program latency, "
                          "scaling efficiency vs the seed's > 90 % at 10 nodes", run))

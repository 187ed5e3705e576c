"""The policy studies (Autellix, ScaleSim, KVFlow, tool gap, topology) as ``agentsim study NAME``.

Each runs its spec ``experiments/specs/<name>.toml`` (``--quick``: the spec's ``[quick]`` grid) and
reuses the analysis of :mod:`agentsim.experiments.policy_report` (the figure and the numbers of
research/policies.md's reproductions). Tables: ``<name>.csv`` (one row per cell: grid values, policy
label, the run summary). Findings are computed from the cells: the best bundle on the study's metric
and its ratio to vLLM's default bundle.
"""

from __future__ import annotations

from pathlib import Path

from agentsim.experiments.studies import Study, StudyOptions, StudyResult, register
from agentsim.experiments.studies.base import figure, load, run_specs, save_figure

#: study -> (help line, metric column, unit); lower is better
POLICY_STUDIES = {
    "autellix": ("Autellix-like: program-level scheduling (PLAS/ATLAS/MLFQ/SJF) vs vLLM FCFS, Poisson "
                 "programs, 1x A100", "mean_program_token_latency_ms", "ms/token"),
    "scalesim": ("ScaleSim-like: invocation-distance KV eviction for a 1,000-agent simulation, 1x A100",
                 "mean_program_latency_s", "s"),
    "kvflow": ("KVFlow microbenchmark: steps-to-execution eviction + prefetch for a 10-agent workflow",
               "workflow_latency", "s"),
    "toolgap": ("Tool-gap KV retention (Continuum, Tokencake, HiCache) for SWE-agent-like programs under KV "
                "pressure", "mean_program_latency_s", "s"),
    "topology": ("Multi-agent team topologies vs AdaptOrch: calls, tokens, GPU-seconds per task "
                 "(--success TABLE for successful tasks per GPU-hour)", "gpu_s_per_task", "GPU-s/task"),
}


def _run(name: str, out: Path, opts: StudyOptions) -> StudyResult:
    from agentsim.experiments import policy_report as pr

    spec = load(name, opts)
    # the success table is read before any cell runs: a bad one is bad input, not found after the work
    success = pr.load_success(opts.extra.get("success")) if name == "topology" else None
    tables, failed = run_specs(out, opts, [(name, spec)])
    t = tables[name]
    res = StudyResult(name=name, failed=failed)
    if not len(t):
        res.findings.append(f"no cell of {name} finished; nothing to analyse")
        return res
    t["policy"] = [pr.label(v.get("policy", spec.base.get("policy", "vllm"))) for v in t["_values"]]
    fig = figure(11, 4.2) if name in ("autellix", "toolgap", "topology") else figure(8, 3.8)
    if name == "topology":
        rep = pr.report_topology(t, fig, success)
    else:
        rep = pr.REPORTS[name](t, fig)
    res.figures.append(save_figure(fig, out / f"{name}.png"))
    res.tables[name] = t.drop(columns=[c for c in t.columns if c.startswith("_")])
    summary = rep["summary"]
    metric, unit = POLICY_STUDIES[name][1], POLICY_STUDIES[name][2]
    if name == "autellix":
        means = t.groupby("policy")[metric].mean()
        res.findings += _best(means, "mean program token latency over the rates", unit)
        for key, row in summary["ratio_vs_vllm"].items():
            best = max(row, key=lambda p: float(str(row[p]).lstrip(">=")))
            res.findings.append(f"sustainable rate at {key.replace('_', ' ')} latency: best {best} at "
                                f"{row[best]}x vLLM's")
    elif name == "topology":
        per = {p: v["gpu_s_per_task"] for p, v in summary.items()}
        import pandas as pd

        res.findings += _best(pd.Series(per), "GPU-seconds per task", unit)
        if "successful_tasks_per_gpu_hour" in next(iter(summary.values())):
            st = {p: v["successful_tasks_per_gpu_hour"] for p, v in summary.items()
                  if v.get("successful_tasks_per_gpu_hour") == v.get("successful_tasks_per_gpu_hour")
                  and v.get("successful_tasks_per_gpu_hour") is not None}
            if st:
                b = max(st, key=st.get)
                res.findings.append(f"most successful tasks per GPU-hour: {b} ({st[b]:.0f})")
    else:
        import pandas as pd

        if name == "kvflow":
            vals = pd.Series({p: v["workflow_latency"] for p, v in summary.items()})
        elif name == "scalesim":
            vals = pd.Series({p: v["latency"] for p, v in summary.items()})
        else:
            vals = t.groupby("policy")[metric].mean()
        res.findings += _best(vals, {"kvflow": "workflow latency", "scalesim": "simulation completion time",
                                     "toolgap": "mean job completion time over the KV sizes"}[name], unit)
    return res


def _best(values, what: str, unit: str) -> list[str]:
    values = values.dropna()
    best = values.idxmin()
    line = f"lowest {what}: {best} ({values[best]:.3g} {unit})"
    if "vllm" in values.index and best != "vllm":
        r = values["vllm"] / values[best]
        line += (f", {r:.2f}x better than vllm ({values['vllm']:.3g} {unit})" if r >= 1.005 else
                 f", the same as vllm within 0.5 %")
    return [line]


for _name, (_help, _m, _u) in POLICY_STUDIES.items():
    register(Study(_name, _help, lambda out, opts, _n=_name: _run(_n, out, opts)))

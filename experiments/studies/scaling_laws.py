"""``agentsim study scaling-laws``: throughput and latency as laws in agents per GPU.

Sweeps ``experiments/specs/scaling_laws.toml``: {agents per GPU} x {GPUs} x {topology (TP, nodes)} with
closed-loop ReAct agents, Llama-3-8B on A100-80GB, least-loaded routing. For each TP degree (pooled over
the node counts: a law in agents per GPU should not depend on how many GPUs there are) it fits, with
``scipy.optimize.curve_fit``, two laws to each metric y(x), x = agents per GPU:

- power law      y = a * x**b
- saturating     y = a * x / (b + x)      (Michaelis-Menten: y -> a as x grows, half of it at x = b)

Metrics: ``throughput_per_gpu`` (output tok/s per GPU) and ``p95_program_latency_s``. Fit error: R² (on
y) and the median and maximum relative error ``|fit - y| / y`` over the cells. A law *breaks* at a cell
whose relative error exceeds :data:`BREAK_REL_ERROR` (listed in ``breaks``).

Tables: ``scaling_laws_cells.csv`` (every cell: nodes, tp, gpus, agents, agents_per_gpu, metrics),
``scaling_laws_fits.csv`` (metric, tp, law, parameters, r2, median_rel_error, max_rel_error, breaks).
Figure ``scaling_laws.png``: the cells and the better law per metric and TP.
"""

from __future__ import annotations

import math
from pathlib import Path

from agentsim.experiments.studies import Study, StudyOptions, StudyResult, register
from agentsim.experiments.studies.base import figure, run_one, save_figure

#: relative error above which a fitted law is said to break at a cell
BREAK_REL_ERROR = 0.15
METRICS = {"throughput_per_gpu": "output throughput per GPU (tok/s)",
           "p95_program_latency_s": "p95 program latency (s)"}


def power_law(x, a, b):
    return a * x ** b


def saturating(x, a, b):
    return a * x / (b + x)


LAWS = {"power": (power_law, "a * x^b"), "saturating": (saturating, "a * x / (b + x)")}


def fit_law(name: str, x, y) -> dict:
    """Fit law ``name`` to ``y(x)``: ``{law, formula, a, b, r2, median_rel_error, max_rel_error}``
    (NaN parameters when the fit does not converge or there are fewer than 3 points)."""
    import numpy as np
    from scipy.optimize import curve_fit

    f, formula = LAWS[name]
    x, y = np.asarray(x, float), np.asarray(y, float)
    out = {"law": name, "formula": formula, "a": math.nan, "b": math.nan, "r2": math.nan,
           "median_rel_error": math.nan, "max_rel_error": math.nan}
    ok = np.isfinite(x) & np.isfinite(y) & (y > 0)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return out
    p0 = (y.max(), 0.5) if name == "power" else (y.max() * 1.5, float(np.median(x)))
    try:
        p, _ = curve_fit(f, x, y, p0=p0, maxfev=20000)
    except (RuntimeError, ValueError):
        return out
    pred = f(x, *p)
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    rel = np.abs(pred - y) / y
    out.update(a=float(p[0]), b=float(p[1]), r2=1 - ss_res / ss_tot if ss_tot > 0 else math.nan,
               median_rel_error=float(np.median(rel)), max_rel_error=float(rel.max()))
    return out


def fits_table(cells):
    import pandas as pd

    rows = []
    for metric in METRICS:
        for tp, g in cells.groupby("tp"):
            for law in LAWS:
                r = fit_law(law, g["agents_per_gpu"], g[metric])
                breaks = []
                if math.isfinite(r["a"]):
                    pred = LAWS[law][0](g["agents_per_gpu"].to_numpy(float), r["a"], r["b"])
                    rel = (pred - g[metric].to_numpy(float)) / g[metric].to_numpy(float)
                    breaks = [f"{int(n)} nodes x {apg:g}/GPU ({e:+.0%})"
                              for n, apg, e in zip(g["nodes"], g["agents_per_gpu"], rel) if abs(e) > BREAK_REL_ERROR]
                rows.append({"metric": metric, "tp": int(tp), "cells": len(g), **r, "breaks": "; ".join(breaks)})
    return pd.DataFrame(rows)


def _findings(fits) -> list[str]:
    out = []
    for (metric, tp), g in fits.groupby(["metric", "tp"]):
        g = g.dropna(subset=["r2"])
        if not len(g):
            out.append(f"{metric}, TP{tp}: no law could be fitted")
            continue
        best = g.loc[g["r2"].idxmax()]
        other = g[g["law"] != best["law"]]
        line = (f"{metric}, TP{tp}: best law {best['law']} ({best['formula']}, a={best['a']:.3g}, b={best['b']:.3g}), "
                f"R² {best['r2']:.3f}, median relative error {best['median_rel_error']:.1%}")
        if len(other):
            o = other.iloc[0]
            line += f"; {o['law']}: R² {o['r2']:.3f}, median {o['median_rel_error']:.1%}"
        line += (f"; breaks (> {BREAK_REL_ERROR:.0%} off) at {best['breaks']}" if best["breaks"]
                 else f"; within {BREAK_REL_ERROR:.0%} at every cell")
        out.append(line)
    return out


def plot(cells, fits, path: Path) -> Path:
    import numpy as np

    fig = figure(12, 4.4)
    ax = fig.subplots(1, 2)
    marks = {1: "o", 2: "s", 4: "^"}
    for a, metric in zip(ax, METRICS):
        for i, (tp, g) in enumerate(cells.groupby("tp")):
            c = f"C{i}"
            for n, gn in g.groupby("nodes"):
                a.scatter(gn["agents_per_gpu"], gn[metric], color=c, marker=marks.get(int(n), "x"), s=22,
                          label=f"TP{tp}, {n} node{'s' if n > 1 else ''} ({4 * n} GPUs)")
            f = fits[(fits["metric"] == metric) & (fits["tp"] == tp)].dropna(subset=["r2"])
            if len(f):
                b = f.loc[f["r2"].idxmax()]
                xs = np.geomspace(g["agents_per_gpu"].min(), g["agents_per_gpu"].max(), 60)
                a.plot(xs, LAWS[b["law"]][0](xs, b["a"], b["b"]), color=c, lw=1,
                       label=f"TP{tp} fit: {b['law']} (R² {b['r2']:.2f})")
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("agents per GPU")
        a.set_ylabel(METRICS[metric])
        a.grid(alpha=0.3, which="both")
    ax[0].legend(fontsize=6)
    fig.suptitle("Scaling laws: Llama-3-8B on A100-80GB, closed-loop ReAct agents, least-loaded routing", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def run(out: Path, opts: StudyOptions) -> StudyResult:
    import pandas as pd

    t, res = run_one(out, opts, "scaling-laws", "scaling_laws")
    if not len(t):
        return res
    cl = [c["cluster"] for c in t["_config"]]
    gpus = [c["num_nodes"] * c["gpus_per_node"] for c in cl]
    agents = [int(c["workload"]["agents"]) for c in t["_config"]]
    cells = pd.DataFrame({"nodes": [c["num_nodes"] for c in cl], "tp": [c["tp"] for c in cl], "gpus": gpus,
                          "agents": agents, "agents_per_gpu": [a / g for a, g in zip(agents, gpus)],
                          "throughput_per_gpu": t["output_throughput"].to_numpy() / gpus,
                          "output_throughput": t["output_throughput"],
                          "p95_program_latency_s": t["p95_program_latency_s"], "p95_ttft_ms": t["p95_ttft_ms"],
                          "mean_busy_fraction": t["mean_busy_fraction"]})
    fits = fits_table(cells)
    res.tables["scaling_laws_cells"] = cells
    res.tables["scaling_laws_fits"] = fits
    res.figures.append(plot(cells, fits, out / "scaling_laws.png"))
    res.findings += _findings(fits)
    return res


register(Study("scaling-laws", "Scaling laws: {agents per GPU} x {GPUs} x {TP, nodes}; power-law and saturating "
                               "fits (curve_fit), R², median relative error, where they break", run))

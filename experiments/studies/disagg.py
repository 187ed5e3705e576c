"""``agentsim study disagg``: prefill/decode disaggregation and cross-engine prefix fetch (issue 11).

Two sweeps, DistServe-shaped (Zhong et al., OSDI '24: goodput = requests/s meeting both the TTFT and
the TPOT SLO; a layout is judged by the highest rate it sustains with >= 90 % of requests within
both):

- ``experiments/specs/disagg.toml``: 2 nodes x 4 A100-80GB, Llama-3-8B TP1, chat and ReAct programs
  arriving as Poisson processes over a range of rates, for the co-located layout (every engine prefills
  and decodes, vLLM's default) and the per-node disaggregated layouts 1P:3D, 2P:2D, 3P:1D (KV moves
  over NVLink within each node, :mod:`agentsim.sim.disagg`).
- ``experiments/specs/disagg-fetch.toml``: the same cluster, every engine mixed, multi-turn chat routed
  round-robin, with cross-engine prefix fetch off vs ``cheaper`` (:mod:`agentsim.policies.kvfetch`).

Tables: ``layouts.csv`` (one row per cell: ``workload``, ``layout``, ``rate`` (programs/s),
``request_goodput`` (calls/s within both SLOs), ``request_throughput`` (calls/s), ``slo_attainment``
(goodput / throughput, 0-1), TTFT/TPOT means and p99 (ms), ``total_kv_transfer_bytes``,
``mean_kv_transfer_time_ms``), ``capacity.csv`` (per workload and layout: the highest rate of the grid with
``slo_attainment >= 0.9``, programs/s; NaN if none), ``fetch.csv`` (one row per cell: ``prefix_fetch``,
``rate``, goodput, TTFT, prefix hit rate, KV bytes moved). Figures ``disagg-goodput.png`` (goodput and SLO
attainment against the rate, per workload and layout) and ``disagg-fetch.png`` (mean TTFT and prefix hit rate
against the rate, fetch off vs on). Findings are computed from these tables.
"""

from __future__ import annotations

import math
from pathlib import Path

from agentsim.experiments.studies import Study, StudyOptions, StudyResult, register
from agentsim.experiments.studies.base import figure, load, run_specs, save_figure

#: DistServe's attainment target: a rate is sustained when this share of calls meets both SLOs
ATTAINMENT = 0.90
LAYOUT_ORDER = ("co-located", "1P:3D", "2P:2D", "3P:1D")


def layout_label(roles, engines_per_node: int) -> str:
    """``co-located`` for no roles (every engine mixed), else ``{n}P:{m}D`` of the first node's engines."""
    roles = list(roles or [])
    if not roles or all(r == "mixed" for r in roles):
        return "co-located"
    first = roles[:engines_per_node] + ["mixed"] * max(0, engines_per_node - len(roles))
    p = sum(r == "prefill" for r in first)
    d = sum(r == "decode" for r in first)
    m = len(first) - p - d
    return f"{p}P:{d}D" + (f"+{m}M" if m else "")


def _row(r, extra: dict) -> dict:
    thr = r["request_throughput"]
    good = r.get("request_goodput", math.nan)
    return {**extra, "request_goodput": good, "request_throughput": thr,
            "slo_attainment": good / thr if thr and thr == thr and thr > 0 else math.nan,
            "mean_ttft_ms": r["mean_ttft_ms"], "p99_ttft_ms": r["p99_ttft_ms"], "mean_tpot_ms": r["mean_tpot_ms"],
            "p99_tpot_ms": r["p99_tpot_ms"], "prefix_hit_rate": r["prefix_hit_rate"],
            "total_kv_transfer_bytes": r.get("total_kv_transfer_bytes", 0.0),
            "mean_kv_transfer_time_ms": r.get("mean_kv_transfer_time_ms", 0.0),
            "mean_busy_fraction": r["mean_busy_fraction"], "num_calls": r["num_calls"]}


def layouts_table(t):
    """One row per cell of the layouts sweep (see the module docstring)."""
    import pandas as pd

    rows = []
    for _, r in t.iterrows():
        cl = r["_config"]["cluster"]
        per = cl["engines_per_node"] or cl["gpus_per_node"] // cl["tp"]
        rows.append(_row(r, {"workload": r["_config"]["workload"]["generator"],
                             "layout": layout_label(cl["disagg"]["roles"] or cl["disagg"]["node_roles"], per),
                             "rate": float(r["_config"]["workload"]["rate"])}))
    df = pd.DataFrame(rows)
    if len(df):
        df["_order"] = [LAYOUT_ORDER.index(x) if x in LAYOUT_ORDER else 99 for x in df["layout"]]
        df = df.sort_values(["workload", "_order", "rate"]).drop(columns="_order").reset_index(drop=True)
    return df


def capacity_table(df):
    """Per workload and layout: the highest rate with ``slo_attainment >= ATTAINMENT`` (NaN if none)."""
    import pandas as pd

    rows = []
    for (w, lay), g in df.groupby(["workload", "layout"], sort=False):
        ok = g[g["slo_attainment"] >= ATTAINMENT]
        rows.append({"workload": w, "layout": lay, "max_rate_at_90pct_slo": float(ok["rate"].max()) if len(ok) else math.nan,
                     "max_goodput": float(g["request_goodput"].max()),
                     "rate_of_max_goodput": float(g.loc[g["request_goodput"].idxmax(), "rate"])})
    return pd.DataFrame(rows)


def fetch_table(t):
    """One row per cell of the fetch sweep."""
    import pandas as pd

    rows = [_row(r, {"prefix_fetch": r["_config"]["cluster"]["disagg"]["prefix_fetch"],
                     "rate": float(r["_config"]["workload"]["rate"])}) for _, r in t.iterrows()]
    df = pd.DataFrame(rows)
    return df.sort_values(["prefix_fetch", "rate"]).reset_index(drop=True) if len(df) else df


def _layout_findings(df, cap) -> list[str]:
    out = []
    for w, g in cap.groupby("workload", sort=False):
        g = g.set_index("layout")
        rates = g["max_rate_at_90pct_slo"]
        if rates.notna().any():
            best = rates.idxmax()
            tied = [x for x in rates.index if rates[x] == rates[best]]
            line = (f"{w}: highest rate with >= {ATTAINMENT:.0%} of calls within both SLOs: {', '.join(tied)} "
                    f"({rates[best]:g} programs/s)")
            if "co-located" in rates.index and "co-located" not in tied:
                co = rates["co-located"]
                line += f"; co-located {co:g} programs/s" if co == co else "; co-located sustains none of the rates"
            out.append(line)
        else:
            out.append(f"{w}: no layout kept {ATTAINMENT:.0%} of calls within both SLOs at any rate of the grid")
        top = df[df["workload"] == w]
        hits = top.groupby("layout", sort=False)["prefix_hit_rate"].mean()
        out.append(f"{w}: mean prefix-cache hit rate " + ", ".join(f"{k} {v:.0%}" for k, v in hits.items())
                   + " (P/D: on the prefill engines)")
        hi = top[top["rate"] == top["rate"].max()].set_index("layout")["request_goodput"]
        if len(hi):
            b = hi.idxmax()
            out.append(f"{w} at {top['rate'].max():g} programs/s: highest goodput {b} ({hi[b]:.3g} calls/s)"
                       + (f" vs co-located {hi['co-located']:.3g}" if "co-located" in hi.index and b != "co-located"
                          else ""))
    return out


def _fetch_findings(df) -> list[str]:
    out = []
    on = df[df["prefix_fetch"] != "off"].set_index("rate")
    off = df[df["prefix_fetch"] == "off"].set_index("rate")
    for rate in sorted(set(on.index) & set(off.index)):
        a, b = off.loc[rate], on.loc[rate]
        out.append(f"prefix fetch at {rate:g} programs/s (round-robin chat): mean TTFT {a['mean_ttft_ms']:.3g} -> "
                   f"{b['mean_ttft_ms']:.3g} ms, prefix hit rate {a['prefix_hit_rate']:.0%} -> "
                   f"{b['prefix_hit_rate']:.0%}, goodput {a['request_goodput']:.3g} -> {b['request_goodput']:.3g} "
                   f"calls/s, {b['total_kv_transfer_bytes'] / 1e9:.3g} GB moved")
    return out


def _plot_layouts(df, path: Path) -> Path:
    ws = list(dict.fromkeys(df["workload"]))
    fig = figure(5.2 * len(ws), 7.0)
    for j, w in enumerate(ws):
        g = df[df["workload"] == w]
        ax1 = fig.add_subplot(2, len(ws), j + 1)
        ax2 = fig.add_subplot(2, len(ws), len(ws) + j + 1)
        for lay, h in g.groupby("layout", sort=False):
            ax1.plot(h["rate"], h["request_goodput"], marker="o", label=lay)
            ax2.plot(h["rate"], h["slo_attainment"], marker="o", label=lay)
        ax2.axhline(ATTAINMENT, color="grey", ls="--", lw=0.8)
        ax1.set_title(f"{w}: goodput (calls/s within TTFT and TPOT SLOs)", fontsize=9)
        ax2.set_title(f"{w}: SLO attainment", fontsize=9)
        ax2.set_xlabel("arrival rate (programs/s)")
        ax1.set_ylabel("calls/s")
        ax2.set_ylabel("fraction of calls")
        ax1.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_fetch(df, path: Path) -> Path:
    fig = figure(10, 3.6)
    ax1 = fig.add_subplot(1, 2, 1)
    ax2 = fig.add_subplot(1, 2, 2)
    for name, h in df.groupby("prefix_fetch", sort=False):
        ax1.plot(h["rate"], h["mean_ttft_ms"], marker="o", label=f"fetch {name}")
        ax2.plot(h["rate"], h["prefix_hit_rate"], marker="o", label=f"fetch {name}")
    ax1.set_title("round-robin chat: mean TTFT", fontsize=9)
    ax2.set_title("prefix-cache hit rate (fetched blocks count as hits)", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xlabel("arrival rate (programs/s)")
        ax.legend(fontsize=8)
    ax1.set_ylabel("ms")
    ax2.set_ylabel("fraction of prompt tokens")
    fig.tight_layout()
    return save_figure(fig, path)


def run(out: Path, opts: StudyOptions) -> StudyResult:
    specs = [("layouts", load("disagg", opts)), ("fetch", load("disagg-fetch", opts))]
    tables, failed = run_specs(out, opts, specs)
    res = StudyResult(name="disagg", failed=failed)
    lay = layouts_table(tables["layouts"])
    if len(lay):
        cap = capacity_table(lay)
        res.tables["layouts"] = lay
        res.tables["capacity"] = cap
        res.figures.append(_plot_layouts(lay, out / "disagg-goodput.png"))
        res.findings += _layout_findings(lay, cap)
    else:
        res.findings.append("no cell of the layouts sweep finished; nothing to analyse")
    fe = fetch_table(tables["fetch"])
    if len(fe):
        res.tables["fetch"] = fe
        res.figures.append(_plot_fetch(fe, out / "disagg-fetch.png"))
        res.findings += _fetch_findings(fe)
    else:
        res.findings.append("no cell of the fetch sweep finished; nothing to analyse")
    return res


register(Study("disagg", "P/D disaggregation (co-located vs 1P:3D, 2P:2D, 3P:1D on 2x4 A100; goodput under "
               "TTFT/TPOT SLOs, chat and ReAct) and cross-engine prefix fetch on vs off", run))

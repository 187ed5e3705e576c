"""Run the policy studies (experiments/specs/*.toml) and turn their sweeps into figures, tables and a PNG per study.

The same studies run from ``agentsim study NAME`` (``agentsim.experiments.studies.policies``, which
reuses this module's analysis and writes a study directory with ``study.json``); this script is kept
for its ``--figures DIR`` report (markdown tables and ``summary.json``).

    python -m agentsim.experiments.policy_report autellix      # or scalesim, kvflow, toolgap, topology, all
    python -m agentsim.experiments.policy_report all --workers 2 --figures docs/figures/policies

Each study is a sweep spec in ``experiments/specs/<study>.toml`` run with ``agentsim sweep``'s engine
(resumable: finished cells are not run again; ``--out`` moves the runs). The report prints a markdown
table, writes ``<figures>/<study>.png`` and adds the study's headline numbers to
``<figures>/summary.json`` (written atomically). ``topology`` can also take ``--success TABLE.toml``:
per-bundle task-success rates (e.g. from a paper) to report successful tasks per GPU-hour.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tomllib
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from agentsim.errors import ConfigError

STUDIES = ("autellix", "scalesim", "kvflow", "toolgap", "topology")


def spec_path(study: str) -> Path:
    return Path(str(resources.files("agentsim.experiments").joinpath("specs", f"{study}.toml")))


def run_study(study: str, out: Path | None, workers: int) -> tuple[pd.DataFrame, Path]:
    from agentsim.experiments.sweep import cell_id, load_spec, run_sweep

    spec = load_spec(spec_path(study))
    out = Path(out / study) if out is not None else spec.out
    table = run_sweep(spec, out=out, workers=workers)
    table["_cell"] = [str(out / "cells" / cell_id(c)) for c in spec.cells()]
    table["policy"] = [label(c.get("policy", spec.base.get("policy", "vllm"))) for c in spec.cells()]
    return table, out


def label(policy) -> str:
    """A short readable name for a policy spec."""
    if isinstance(policy, str):
        return policy
    name = policy.get("name", "vllm")
    if policy.get("evict") and policy["evict"] != name:
        name = f"{name}+{policy['evict']}"
    p = (policy.get("params") or {}).get("evict") or {}
    bits = [f"{k}={v}" for k, v in sorted(p.items())]
    return f"{name}[{', '.join(bits)}]" if bits else name


# --------------------------------------------------------------------------- studies
def sustainable_rate(rates: np.ndarray, lat: np.ndarray, target: float) -> tuple[float, bool]:
    """Highest arrival rate whose latency stays at or under ``target`` (log-linear interpolation
    between grid points), and whether it is only a lower bound (never crossed within the grid)."""
    order = np.argsort(rates)
    rates, lat = rates[order], lat[order]
    if lat[0] > target:
        return math.nan, False
    for i in range(1, len(rates)):
        if lat[i] <= target:
            continue
        a, b = math.log(lat[i - 1]), math.log(lat[i])
        return float(rates[i - 1] + (rates[i] - rates[i - 1]) * (math.log(target) - a) / (b - a)), False
    return float(rates[-1]), True


def report_autellix(t: pd.DataFrame, fig) -> dict:
    t = t.rename(columns={"workload.rate": "rate"})
    piv = t.pivot_table(index="rate", columns="policy", values="mean_program_token_latency_ms") / 1e3
    p95 = t.pivot_table(index="rate", columns="policy", values="p95_program_token_latency_ms") / 1e3
    base_low = float(piv["vllm"].iloc[0])
    out = {"token_latency_mean_s": piv.round(4).to_dict(), "token_latency_p95_s": p95.round(4).to_dict(),
           "sustainable_rate": {}, "ratio_vs_vllm": {}}
    for mult in (2, 4):
        target = mult * base_low
        found = {p: sustainable_rate(piv.index.to_numpy(float), piv[p].to_numpy(float), target) for p in piv.columns}
        key = f"{mult}x_low_load"
        # ">=": the policy stayed under the target up to the highest rate swept (a lower bound)
        out["sustainable_rate"][key] = {"target_s_per_token": round(target, 4),
                                        **{p: (">=" if capped else "") + f"{v:.2f}" for p, (v, capped) in found.items()}}
        base, base_capped = found["vllm"]
        out["ratio_vs_vllm"][key] = {p: ((">=" if capped and not base_capped else "") + f"{v / base:.2f}")
                                     for p, (v, capped) in found.items()}
    md_rates = ["", "| target (s/token) | " + " | ".join(piv.columns) + " |", "|---" * (len(piv.columns) + 1) + "|"]
    for key, row in out["sustainable_rate"].items():
        ratios = out["ratio_vs_vllm"][key]
        md_rates.append(f"| {row['target_s_per_token']:.3f} ({key.split('_')[0]} low-load FCFS) | "
                        + " | ".join(f"{row[p]} ({ratios[p]}x)" for p in piv.columns) + " |")
    ax = fig.subplots(1, 2)
    for p in piv.columns:
        ax[0].plot(piv.index, piv[p], marker="o", label=p)
        ax[1].plot(p95.index, p95[p], marker="o", label=p)
    for a, title in zip(ax, ("mean", "p95")):
        a.set_yscale("log")
        a.set_xlabel("program arrival rate (programs/s)")
        a.set_ylabel(f"{title} program token latency (s/token)")
        a.grid(alpha=0.3)
    ax[0].axhline(2 * base_low, color="grey", ls="--", lw=0.8)
    ax[0].legend(fontsize=8)
    fig.suptitle("Autellix-like: 1x A100, Llama-3-8B, Mixed (chat + ReAct + LATS), Poisson programs")
    md = ["| rate | " + " | ".join(piv.columns) + " |", "|---" * (len(piv.columns) + 1) + "|"]
    for r, row in piv.iterrows():
        md.append(f"| {r:g} | " + " | ".join(f"{v * 1e3:.0f} ms" for v in row) + " |")
    return {"summary": out, "markdown": "\n".join(md + md_rates)}


def _cell_programs(t: pd.DataFrame, skip_first: int = 0) -> pd.Series:
    lat = []
    for d in t["_cell"]:
        p = pd.read_parquet(Path(d) / "programs.parquet")
        p = p[(p["status"] == "finished") & (p["program_id"] >= skip_first)]
        lat.append(float(p["latency"].mean()))
    return pd.Series(lat, index=t.index)


def _bars(fig, names, values, ylabel, title, ref=None):
    ax = fig.subplots()
    ax.barh(range(len(names)), values, color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(ylabel)
    for i, v in enumerate(values):
        txt = f"{v:.1f}" + (f"  ({ref / v:.2f}x)" if ref else "")
        ax.text(v, i, " " + txt, va="center", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()


def report_scalesim(t: pd.DataFrame, fig) -> dict:
    g = t.groupby("policy", sort=False).agg(latency=("mean_program_latency_s", "mean"),
                                             ttft=("mean_ttft_ms", "mean"), hit=("prefix_hit_rate", "mean"))
    g["ttft"] = g["ttft"] / 1e3  # ms -> s, as the report states it
    lru = float(g.loc["vllm", "latency"])
    g["speedup_vs_lru"] = lru / g["latency"]
    _bars(fig, list(g.index), g["latency"].tolist(), "simulation completion time (s), mean of 3 seeds",
          "ScaleSim-like: 1,000 agents, 20 % active, 1x A100 (KV holds a fraction)", ref=lru)
    md = ["| eviction | completion (s) | speed-up vs LRU | mean TTFT (s) | prefix hit rate |", "|---|---|---|---|---|"]
    for p, r in g.iterrows():
        md.append(f"| {p} | {r.latency:.1f} | {r.speedup_vs_lru:.2f}x | {r.ttft:.2f} | {r.hit:.1%} |")
    return {"summary": g.round(4).to_dict(orient="index"), "markdown": "\n".join(md)}


def report_kvflow(t: pd.DataFrame, fig) -> dict:
    t = t.assign(workflow_latency=_cell_programs(t, skip_first=1))
    g = t.set_index("policy")[["workflow_latency", "prefix_hit_rate"]]
    lru = float(g.loc["vllm", "workflow_latency"])
    g["speedup_vs_lru"] = lru / g["workflow_latency"]
    _bars(fig, list(g.index), g["workflow_latency"].tolist(), "workflow latency (s)",
          "KVFlow microbenchmark: 10 agents, 8192/32/32, KV for 5 fixed prompts", ref=lru)
    md = ["| policy | workflow latency (s) | speed-up vs LRU | prefix hit rate |", "|---|---|---|---|"]
    for p, r in g.iterrows():
        md.append(f"| {p} | {r.workflow_latency:.2f} | {r.speedup_vs_lru:.2f}x | {r.prefix_hit_rate:.1%} |")
    return {"summary": g.round(4).to_dict(orient="index"), "markdown": "\n".join(md)}


def report_toolgap(t: pd.DataFrame, fig) -> dict:
    t = t.rename(columns={"cluster.engine.num_gpu_blocks_override": "blocks"})
    mean = t.pivot_table(index="blocks", columns="policy", values="mean_program_latency_s")
    p95 = t.pivot_table(index="blocks", columns="policy", values="p95_program_latency_s")
    ax = fig.subplots(1, 2)
    for p in mean.columns:
        ax[0].plot(mean.index * 16 / 1000, mean[p], marker="o", label=p)
        ax[1].plot(p95.index * 16 / 1000, p95[p], marker="o", label=p)
    for a, title in zip(ax, ("mean", "p95")):
        a.set_xlabel("GPU KV cache (thousand tokens)")
        a.set_ylabel(f"{title} job completion time (s)")
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=8)
    fig.suptitle("Tool-gap retention: SWE-agent-like programs, 0.2 programs/s, 1x A100")
    md = ["| KV (k tokens) | " + " | ".join(mean.columns) + " |", "|---" * (len(mean.columns) + 1) + "|"]
    for b in mean.index:
        md.append(f"| {b * 16 / 1000:.0f} | " + " | ".join(f"{mean.loc[b, p]:.0f} / {p95.loc[b, p]:.0f}"
                                                         for p in mean.columns) + " |")
    ratio = (mean["vllm"].to_numpy()[:, None] / mean.to_numpy())
    return {"summary": {"jct_mean_s": mean.round(2).to_dict(), "jct_p95_s": p95.round(2).to_dict(),
                        "speedup_vs_vllm_mean": pd.DataFrame(ratio, index=mean.index, columns=mean.columns)
                        .round(3).to_dict()},
            "markdown": "\n".join(md)}


def report_topology(t: pd.DataFrame, fig, success: dict | None = None) -> dict:
    rows = []
    for _, r in t.iterrows():
        calls = pd.read_parquet(Path(r["_cell"]) / "calls.parquet")
        progs = pd.read_parquet(Path(r["_cell"]) / "programs.parquet")
        eng = pd.read_parquet(Path(r["_cell"]) / "engines.parquet")
        done = progs[progs["status"] == "finished"]
        gpu_s = float(eng["busy_fraction"].sum()) * 1.0   # 1 s samples, one GPU per engine (TP1)
        n = len(done)
        row = {"policy": r["policy"], "tasks": n, "calls_per_task": len(calls) / max(n, 1),
               "tokens_per_task": float(calls["num_prompt_tokens"].sum() + calls["num_output_tokens"].sum()) / max(n, 1),
               "task_latency_s": float(done["latency"].mean()), "gpu_s_per_task": gpu_s / max(n, 1)}
        if success:
            rate = success.get(r["policy"])
            row["success_rate"] = rate
            row["successful_tasks_per_gpu_hour"] = (rate * 3600 / row["gpu_s_per_task"]) if rate is not None else None
        rows.append(row)
    g = pd.DataFrame(rows).set_index("policy")
    ax = fig.subplots(1, 2)
    ax[0].barh(range(len(g)), g["gpu_s_per_task"])
    ax[0].set_yticks(range(len(g)), g.index, fontsize=8)
    ax[0].set_xlabel("GPU-seconds per task")
    ax[1].barh(range(len(g)), g["task_latency_s"])
    ax[1].set_yticks(range(len(g)), [""] * len(g))
    ax[1].set_xlabel("task latency (s)")
    fig.suptitle("Multi-agent team tasks: fixed topologies vs AdaptOrch (decomposer charged)")
    cols = ["tasks", "calls_per_task", "tokens_per_task", "task_latency_s", "gpu_s_per_task"]
    if success:
        cols += ["success_rate", "successful_tasks_per_gpu_hour"]
    md = ["| policy | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for p, r in g.iterrows():
        md.append(f"| {p} | " + " | ".join("-" if r[c] is None or (isinstance(r[c], float) and math.isnan(r[c]))
                                          else f"{r[c]:.3g}" for c in cols) + " |")
    return {"summary": g.round(4).to_dict(orient="index"), "markdown": "\n".join(md)}


REPORTS = {"autellix": report_autellix, "scalesim": report_scalesim, "kvflow": report_kvflow,
           "toolgap": report_toolgap, "topology": report_topology}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def load_success(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(path, f"cannot read success table ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, f"malformed TOML ({e})") from None
    rates = data.get("success_rate")
    if not isinstance(rates, dict):
        raise ConfigError(f"{path}: success_rate", "needs a table {policy = rate in [0, 1]}")
    for k, v in rates.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ConfigError(f"{path}: success_rate.{k}", f"must be a number in [0, 1], got {v!r}")
    return {k: float(v) for k, v in rates.items()}


def main(argv: list[str] | None = None) -> int:
    """Exit status as the ``agentsim`` CLI: 2 bad input (one line), 1 a failed cell, 130 Ctrl-C."""
    from agentsim.errors import AgentsimError
    from agentsim.experiments.sweep import CellFailed

    try:
        return _main(argv)
    except AgentsimError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CellFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", choices=STUDIES + ("all",))
    ap.add_argument("--out", type=Path, default=None, help="runs directory (default: each spec's sweep.out)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--figures", type=Path, default=Path("docs/figures/policies"))
    ap.add_argument("--success", default=None, help="TOML with [success_rate] policy = rate (topology study)")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    success = load_success(args.success)
    if args.workers < 1:
        raise ConfigError("--workers", f"must be >= 1, got {args.workers}")
    summary_path = args.figures / "summary.json"
    if args.figures.exists() and not args.figures.is_dir():
        raise ConfigError(f"--figures {args.figures}", "is a file, not a directory")
    summary = {}
    if summary_path.exists():  # merged with this run's studies: it must be a report this script wrote
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            summary = None
        if not isinstance(summary, dict) or any(not isinstance(v, dict) or "runs" not in v for v in summary.values()):
            raise ConfigError(f"--figures {summary_path}", "exists and is not a policy report summary; refusing to "
                                                           "overwrite it -- choose another --figures directory")
    studies = STUDIES if args.study == "all" else (args.study,)
    for study in studies:   # a figure is this script's only if its summary lists the study
        png = args.figures / f"{study}.png"
        if (png.exists() or png.is_symlink()) and study not in summary:
            raise ConfigError(f"--figures {png}", "exists and was not written by this report; refusing to "
                                                  "overwrite it -- choose another --figures directory")
    for study in studies:
        table, out = run_study(study, args.out, args.workers)
        args.figures.mkdir(parents=True, exist_ok=True)   # only once there is a figure to write
        fig = plt.figure(figsize=(11, 4.2) if study in ("autellix", "toolgap", "topology") else (8, 3.8))
        rep = REPORTS[study](table, fig, success) if study == "topology" else REPORTS[study](table, fig)
        png = args.figures / f"{study}.png"
        tmp = png.with_name(f".{png.stem}.tmp-{os.getpid()}.png")
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        tmp.replace(png)
        plt.close(fig)
        summary[study] = {"runs": str(out), "spec": f"experiments/specs/{study}.toml", **rep["summary"]}
        _write_json(summary_path, summary)
        print(f"## {study}  ({png})\n\n{rep['markdown']}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

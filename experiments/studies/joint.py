"""``agentsim study joint``: successful tasks per GPU-hour and per dollar (task success x infrastructure).

Sweeps ``experiments/specs/joint.toml`` (multi-agent team tasks on one Llama-3-8B engine per GPU kind,
for each fixed topology and AdaptOrch's rule) and combines every cell with two user tables:

- a **success table** (``--success FILE``, TOML; default: the shipped *example*
  ``experiments/specs/topology_success_example.toml``)::

      [success_rate]              # task-success rate in [0, 1] per policy bundle (the `policy` of a cell)
      topology-parallel = 0.473
      adaptorch = 0.526

  bundles missing from it are reported without success numbers ("-");
- a **GPU price table** (``--prices FILE``, TOML; default ``experiments/specs/gpu_prices.toml``, whose
  sources are written in it)::

      [usd_per_gpu_hour]          # USD per GPU-hour per GPU kind (`cluster.gpu`), > 0
      a100-80gb = 5.12

Per cell: ``tasks`` (finished task programs), ``busy_gpu_hours`` (the GPU time the engines spent running
steps: the engines' 1 s ``busy_fraction`` samples x TP; the GPU time the tasks consume, as the topology
study's GPU-seconds per task), ``tasks_per_gpu_hour`` = tasks / busy_gpu_hours,
``successful_tasks_per_gpu_hour`` = success rate x that, ``successful_tasks_per_usd`` = that / the GPU's
price. ``gpu_hours`` (GPUs x the drained run's makespan ``duration_s``) and ``tasks_per_allocated_gpu_hour``
are kept too: with Poisson arrivals they measure the offered load, not the GPU's capacity. Table ``joint.csv``; figure ``joint.png``.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

from agentsim.errors import ConfigError
from agentsim.experiments.studies import Study, StudyOptions, StudyResult, register
from agentsim.experiments.studies.base import figure, policy_label, run_one, save_figure, spec_path


def load_prices(path: str | None) -> tuple[dict[str, float], str]:
    """The price table ``{gpu kind: USD per GPU-hour}`` and where it came from. Raises ConfigError naming
    the file (and ``usd_per_gpu_hour.KEY``) for an unreadable file or a value that is not a number > 0."""
    p = Path(path) if path else spec_path("gpu_prices")
    try:
        data = tomllib.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"--prices {p}", f"cannot read the price table ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--prices {p}", f"malformed TOML ({e})") from None
    t = data.get("usd_per_gpu_hour")
    if not isinstance(t, dict) or not t:
        raise ConfigError(f"--prices {p}: usd_per_gpu_hour", "needs a table {gpu kind = USD per GPU-hour}")
    for k, v in t.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            raise ConfigError(f"--prices {p}: usd_per_gpu_hour.{k}", f"must be a number > 0, got {v!r}")
    return {k: float(v) for k, v in t.items()}, (str(p) if path else "experiments/specs/gpu_prices.toml (defaults)")


def load_success_table(path: str | None) -> tuple[dict[str, float], str]:
    """The success table ``{bundle: rate}`` and a label saying whether it is the shipped example."""
    from agentsim.experiments.policy_report import load_success

    if path:
        return load_success(path), str(path)
    return (load_success(str(spec_path("topology_success_example"))),
            "EXAMPLE DATA: experiments/specs/topology_success_example.toml")


def joint_table(t, success: dict, prices: dict):
    import pandas as pd

    rows = []
    for _, r in t.iterrows():
        cfg = r["_config"]
        gpus = cfg["cluster"]["num_nodes"] * cfg["cluster"]["gpus_per_node"]
        gpu = cfg["cluster"]["gpu"]
        progs = pd.read_parquet(Path(r["_cell"]) / "programs.parquet")
        eng = pd.read_parquet(Path(r["_cell"]) / "engines.parquet")
        tasks = int((progs["status"] == "finished").sum())
        gpu_h = gpus * float(r["duration_s"]) / 3600
        tp = cfg["cluster"]["tp"]
        busy_h = float(eng["busy_fraction"].sum()) * float(cfg["sim"]["sample_interval"]) * tp / 3600
        pol = policy_label(r["_values"].get("policy", cfg["policy"]))
        rate = success.get(pol)
        price = prices.get(gpu)
        per_h = rate * tasks / busy_h if rate is not None and busy_h > 0 else None
        rows.append({"gpu": gpu, "policy": pol, "tasks": tasks, "gpu_hours": gpu_h, "busy_gpu_hours": busy_h,
                     "mean_task_latency_s": float(r["mean_program_latency_s"]), "success_rate": rate,
                     "usd_per_gpu_hour": price, "tasks_per_gpu_hour": tasks / busy_h if busy_h > 0 else None,
                     "tasks_per_allocated_gpu_hour": tasks / gpu_h if gpu_h > 0 else None,
                     "successful_tasks_per_gpu_hour": per_h,
                     "successful_tasks_per_usd": per_h / price if per_h is not None and price else None})
    return pd.DataFrame(rows)


def _findings(df, success_src: str, price_src: str) -> list[str]:
    out = []
    d = df.dropna(subset=["successful_tasks_per_gpu_hour"])
    if not len(d):
        return [f"no bundle of this grid is in the success table ({success_src})"]
    for gpu, g in d.groupby("gpu"):
        b = g.loc[g["successful_tasks_per_gpu_hour"].idxmax()]
        w = g.loc[g["successful_tasks_per_gpu_hour"].idxmin()]
        out.append(f"{gpu}: most successful tasks per GPU-hour {b['policy']} ({b['successful_tasks_per_gpu_hour']:.0f}), "
                   f"least {w['policy']} ({w['successful_tasks_per_gpu_hour']:.0f})")
    dd = d.dropna(subset=["successful_tasks_per_usd"])
    if len(dd):
        b = dd.loc[dd["successful_tasks_per_usd"].idxmax()]
        out.append(f"most successful tasks per dollar: {b['policy']} on {b['gpu']} ({b['successful_tasks_per_usd']:.1f} "
                   f"per USD at {b['usd_per_gpu_hour']:.2f} USD/GPU-hour)")
    out.append(f"success rates from {success_src}; prices from {price_src}")
    return out


def plot(df, path: Path, success_src: str) -> Path:
    fig = figure(12, 4.2)
    ax = fig.subplots(1, 2)
    pols = list(dict.fromkeys(df["policy"]))
    gpus = list(dict.fromkeys(df["gpu"]))
    w = 0.8 / max(len(gpus), 1)
    for i, gpu in enumerate(gpus):
        g = df[df["gpu"] == gpu].set_index("policy").reindex(pols)
        for a, col in zip(ax, ("successful_tasks_per_gpu_hour", "successful_tasks_per_usd")):
            a.barh([k + i * w for k in range(len(pols))], g[col].astype(float).fillna(0), height=w, label=gpu)
    for a, lab in zip(ax, ("successful tasks per GPU-hour", "successful tasks per USD")):
        a.set_yticks([k + w * (len(gpus) - 1) / 2 for k in range(len(pols))], pols, fontsize=8)
        a.set_xlabel(lab)
        a.grid(alpha=0.3, axis="x")
    ax[1].legend(fontsize=8)
    fig.suptitle(f"Joint task + infrastructure: team tasks, Llama-3-8B per GPU; success rates: {success_src}",
                 fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def run(out: Path, opts: StudyOptions) -> StudyResult:
    success, success_src = load_success_table(opts.extra.get("success"))
    prices, price_src = load_prices(opts.extra.get("prices"))
    t, res = run_one(out, opts, "joint", "joint")
    if not len(t):
        return res
    df = joint_table(t, success, prices)
    res.tables["joint"] = df
    res.figures.append(plot(df, out / "joint.png", success_src))
    res.findings += _findings(df, success_src, price_src)
    return res


register(Study("joint", "Joint task + infrastructure: successful tasks per GPU-hour and per dollar per topology and "
                        "GPU kind (--success TABLE, --prices TABLE)", run))

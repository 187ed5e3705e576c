"""``agentsim validate``: replay ``vllm bench serve`` runs in the simulator and compare vLLM's metrics.

Each result file's requests are replayed on one simulated engine with the given engine settings:
every request is a one-call program with its measured prompt and output length (random, distinct
prompt tokens, as ``vllm bench serve --dataset-name random`` sends), arriving when it arrived at the
client -- from the file's ``start_times`` (less ``queue_times``) where present, else from its
``request_rate`` and ``burstiness`` as ``vllm bench serve`` draws them (gamma inter-arrival times with
shape ``burstiness`` and mean ``1/rate``, rescaled so the last one lands at ``N/rate``;
``get_request`` in ``vllm/benchmarks/serve.py``), ``"inf"`` meaning all at once -- and limited to
``max_concurrency`` requests in flight when the run had one. Both sides are then summarised with
vLLM's own metric definitions (:mod:`agentsim.bench`) and compared: ``rel_error = simulated /
measured - 1``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from agentsim.bench import METRICS, BenchRun, bench_result_dict, serving_metrics
from agentsim.config import RunConfig, load_config
from agentsim.errors import AgentsimError, ConfigError

FORMAT = "agentsim-validation"
HEADLINE = ("duration", "output_throughput", "mean_ttft_ms", "mean_tpot_ms")
OUT_FILES = ("validation.json", "validation.png")


@dataclass
class Replay:
    """What the simulator made of one bench run: per-request arrays (request order) and vLLM's metrics."""

    send_at: np.ndarray       # s, when the client sent each request (after the concurrency limit)
    ttfts: np.ndarray         # s
    latencies: np.ndarray     # s
    output_lens: np.ndarray   # tokens
    input_lens: np.ndarray    # tokens
    duration: float           # s, run start to the last token
    metrics: dict[str, float]


def bench_config(config: str | Path | None, profile: str | None = None) -> RunConfig:
    """The run config a replay uses: the user's TOML (engine settings, profile, policy) on ONE engine
    (a ``vllm serve`` instance), draining every request. Config errors name the config file."""
    try:
        cfg = load_config(config, {"cluster.profile": profile})
    except ConfigError as e:
        if config is not None and not str(e.where).startswith(str(config)):
            raise ConfigError(f"{config}: {e.where}", e.message) from None
        raise
    cl = cfg.cluster
    cl = dataclasses.replace(cl, num_nodes=1, gpus_per_node=cl.tp, engines_per_node=1)
    return dataclasses.replace(cfg, cluster=cl, sim=dataclasses.replace(cfg.sim, drain=True))


def arrival_times(run: BenchRun, seed: int = 0) -> list[float]:
    """Client arrival time (s from the run's start) of each request, in the file's request order."""
    offs = run.arrival_offsets()
    if offs is not None:
        return offs
    n = run.num_requests
    if math.isinf(run.request_rate):
        return [0.0] * n
    rng = np.random.default_rng(run.seed if run.seed is not None else seed)
    if math.isinf(run.burstiness):
        gaps = np.full(n, 1.0 / run.request_rate)
    else:
        gaps = rng.gamma(shape=run.burstiness, scale=1.0 / (run.request_rate * run.burstiness), size=n)
    t = np.cumsum(gaps)
    if t[-1] > 0:
        t = t * ((n / run.request_rate) / t[-1])
    return [float(x) for x in t]


def lead_in(run: BenchRun) -> float:
    """Seconds of the measured ``duration`` outside the requests' span when arrivals come from
    ``start_times``: vLLM's clock starts before the first send (the first inter-arrival gap, task
    start-up) and stops after the last response is gathered; the replay's span starts at the first
    send, so this measured client-side constant is added to the simulated duration."""
    if run.start_times is None or run.latencies is None or not run.duration:
        return 0.0
    ok = run.success()
    ends = [s + l for s, l, g in zip(run.start_times, run.latencies, ok) if g]
    if not ends:
        return 0.0
    span = max(ends) - min(run.start_times)
    return max(0.0, run.duration - span)


def check_fits(run: BenchRun, cfg: RunConfig, profile) -> None:
    """Raise :class:`BenchError` naming the file and the request if a request is longer than the
    engine's context (``max_model_len``) -- before any replay runs."""
    from agentsim.bench import BenchError

    max_len = cfg.cluster.engine.max_model_len or profile.model.max_model_len
    for i, (a, b) in enumerate(zip(run.input_lens, run.output_lens)):
        if a + max(b, 1) > max_len:
            raise BenchError(f"{run.path}: input_lens[{i}]",
                             f"{a} prompt + {b} output tokens exceed the engine's max_model_len {max_len} "
                             "(set cluster.engine.max_model_len as the server had it)")


def replay(run: BenchRun, cfg: RunConfig, profile=None, seed: int = 0) -> Replay:
    """Simulate ``run``'s requests under ``cfg`` (see :func:`bench_config`); ``profile`` overrides the
    config's. Raises :class:`ConfigError` for settings the simulator rejects (a request longer than
    the model's context, ...)."""
    from agentsim.sim.runner import Simulation
    from agentsim.workload import Context, Program

    arrivals = arrival_times(run, seed)
    ok = run.success()

    def body_for(n_in: int, n_out: int):
        def body(pc):
            yield pc.llm(Context.of(pc.segment(n_in)), n_out)
        return body

    programs = []
    index = []
    for i in range(run.num_requests):
        if not ok[i]:
            continue  # failed requests are not in vLLM's metrics either
        # a successful request with no output token still runs its prefill (and one sampling step)
        programs.append(Program(len(programs), len(programs), "bench", float(arrivals[i]),
                                body_for(run.input_lens[i], max(run.output_lens[i], 1))))
        index.append(i)
    last = max((p.arrival_at for p in programs), default=0.0)
    cfg = dataclasses.replace(cfg, duration=max(cfg.duration, last + 1.0))
    sim = Simulation(cfg, profile, programs=programs, max_concurrency=run.max_concurrency)
    res = sim.run()
    calls = res.calls.sort_values("program_id", kind="stable")
    if len(calls) != len(programs) or (calls["status"] != "finished").any():
        raise AgentsimError(run.path, "the replay left requests unfinished")
    send = calls["arrival_at"].to_numpy(float)
    first = calls["first_token_at"].to_numpy(float)
    fin = calls["finish_at"].to_numpy(float)
    outs = np.array([run.output_lens[i] for i in index], dtype=int)
    ins = np.array([run.input_lens[i] for i in index], dtype=int)
    ttft = np.where(outs > 0, first - send, 0.0)  # vLLM: no token, TTFT stays 0
    lat = fin - send
    duration = float(fin.max()) if len(fin) else 0.0
    duration += lead_in(run)
    metrics = serving_metrics(ins.tolist(), outs.tolist(), ttft.tolist(), lat.tolist(), duration) if len(fin) else {}
    return Replay(send, ttft, lat, outs, ins, duration, metrics)


def compare(run: BenchRun, rep: Replay) -> dict[str, dict[str, float | None]]:
    """``{metric: {measured, simulated, rel_error}}`` for every metric the file has (vLLM key names)."""
    meas = run.measured()
    out: dict[str, dict[str, float | None]] = {}
    for key, _, _ in METRICS:
        if key not in meas or key not in rep.metrics:
            continue
        m, s = float(meas[key]), float(rep.metrics[key])
        out[key] = {"measured": m, "simulated": s, "rel_error": (s / m - 1.0) if m != 0 else None}
    return out


def replay_as_bench(run: BenchRun, rep: Replay) -> dict[str, Any]:
    """The replay in ``vllm bench serve``'s result format (request order, failed requests dropped)."""
    return bench_result_dict(rep.input_lens.tolist(), rep.output_lens.tolist(), rep.ttfts.tolist(),
                             rep.latencies.tolist(), rep.send_at.tolist(), rep.duration, run.request_rate,
                             run.burstiness, run.max_concurrency)


# ---------------------------------------------------------------------- output directory
def is_validation_dir(path: Path) -> bool:
    """A directory ``agentsim validate`` wrote: ``validation.json`` (format agentsim-validation) and
    nothing but :data:`OUT_FILES`."""
    if path.is_symlink() or not path.is_dir():
        return False
    names = {e.name for e in os.scandir(path)}
    if "validation.json" not in names or not names <= set(OUT_FILES):
        return False
    try:
        d = json.loads((path / "validation.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("format") == FORMAT


def check_out_dir(path: Path) -> None:
    """Refuse (OutputError, one line) a path holding anything ``agentsim validate`` did not write."""
    from agentsim.outputs import OutputError, dir_entries, probe_writable

    where = f"--out {path}"
    entries = dir_entries(path, where, "directory")
    if entries is None:
        probe_writable(path, where)   # before the replay: never only after it
        return
    if entries and not is_validation_dir(path):
        raise OutputError(where, "holds files agentsim validate did not write; refusing to touch it "
                                 "-- choose a new or empty directory")
    if entries and path.resolve() == Path.cwd().resolve():
        raise OutputError(where, "is the current directory and not empty; name a new directory")
    probe_writable(path, where)


def write_out_dir(path: Path, report: dict, runs: Sequence[dict]) -> None:
    """Write ``validation.json`` and ``validation.png`` into ``path`` atomically (a hidden sibling,
    then :func:`agentsim.outputs.swap_in`; a previous validation is swapped out)."""
    from agentsim.outputs import swap_in

    check_out_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        (tmp / "validation.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        plot(runs, tmp / "validation.png")
        check_out_dir(path)  # again: the path may have changed while the replays ran
        swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def plot(runs: Sequence[dict], out: Path) -> None:
    """Measured vs simulated per metric (one panel each) against the runs' loads (x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, _, _ in METRICS if any(k in r["metrics"] for r in runs)]
    ncol = 3
    nrow = max(1, -(-len(keys) // ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 2.8 * nrow), squeeze=False)
    labels = [r.get("label", Path(r["file"]).name) for r in runs]
    x = np.arange(len(runs))
    units = {k: u for k, _, u in METRICS}
    names = {k: n for k, n, _ in METRICS}
    for ax, key in zip(axes.flat, keys):
        m = [r["metrics"].get(key, {}).get("measured", np.nan) for r in runs]
        s = [r["metrics"].get(key, {}).get("simulated", np.nan) for r in runs]
        ax.plot(x, m, "o-", label="measured (vLLM)")
        ax.plot(x, s, "s--", label="simulated (agentsim)")
        ax.set_title(f"{names[key]} ({units[key]})", fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylim(bottom=0)  # from zero: a 0.1 % difference must not look like a 10x one
        ax.margins(x=0.15)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if keys:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def validate(paths: Sequence[str | Path], config: str | Path | None = None, profile: str | None = None,
             seed: int = 0) -> dict:
    """Load every bench file (all checked before any replay), replay each, and return the report
    ``{"format", "config", "profile", "runs": [{"file", "label", "metrics"}]}``."""
    from agentsim.bench import load_bench
    from agentsim.calibration.profile import resolve_profile

    runs = [load_bench(p) for p in paths]
    cfg = bench_config(config, profile)
    cl = cfg.cluster
    prof = resolve_profile(cl.profile, cl.gpu, cl.model, cl.tp)
    for run in runs:
        check_fits(run, cfg, prof)
    out = []
    for run in runs:
        rep = replay(run, cfg, prof, seed)
        out.append({"file": run.path, "label": run.label, "num_requests": run.num_requests,
                    "metrics": compare(run, rep)})
    return {
        "format": FORMAT,
        "config": str(config) if config is not None else None,
        "profile": {"name": prof.name, "source": prof.source},
        "engine": dataclasses.asdict(cl.engine),
        "runs": out,
    }


def render(report: dict, console) -> None:
    """One table per file: metric, measured, simulated, relative error."""
    from rich.table import Table

    units = {k: u for k, _, u in METRICS}
    names = {k: n for k, n, _ in METRICS}
    for r in report["runs"]:
        t = Table(title=f"{r['file']}  ({r['label']})")
        for col in ("metric", "measured", "simulated", "rel. error"):
            t.add_column(col, justify="left" if col == "metric" else "right")
        for key, v in r["metrics"].items():
            err = "-" if v["rel_error"] is None else f"{v['rel_error']:+.1%}"
            t.add_row(f"{names[key]} ({units[key]})  [{key}]", f"{v['measured']:,.3f}", f"{v['simulated']:,.3f}", err)
        console.print(t)
    worst = {}
    for k in HEADLINE:
        errs = [abs(r["metrics"][k]["rel_error"]) for r in report["runs"]
                if k in r["metrics"] and r["metrics"][k]["rel_error"] is not None]
        if errs:
            worst[k] = max(errs)
    if worst:
        console.print("largest |error| over the files: " + ", ".join(f"{names[k]} {v:.1%}" for k, v in worst.items()))

"""``agentsim simulate``, ``agentsim sweep`` and ``agentsim policies``."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=False)
err = Console(stderr=True)


class _LazyProgress:
    """A rich progress bar that appears only once a run has taken more than ``after`` seconds."""

    def __init__(self, label: str, after: float = 2.0) -> None:
        self.label = label
        self.after = after
        self.t0 = time.perf_counter()
        self.bar = None
        self.task = None

    def __call__(self, done: float, total: float) -> None:
        if self.bar is None:
            if time.perf_counter() - self.t0 < self.after:
                return
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                TextColumn("{task.completed:.0f}/{task.total:.0f} sim-s"),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=total)
        self.bar.update(self.task, completed=done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _fmt(v: float, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if unit == "ms":
        return f"{v * 1e3:,.1f}"
    if unit == "%":
        return f"{v * 100:.1f}%"
    return f"{v:,.2f}"


def print_summary(summary: dict, title: str, stats: dict | None = None) -> None:
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("mean", justify="right")
    t.add_column("p50", justify="right")
    t.add_column("p95", justify="right")
    t.add_column("p99", justify="right")
    for label, key in (("TTFT (ms)", "ttft"), ("TPOT (ms)", "tpot"), ("E2E (ms)", "e2e"), ("queue (ms)", "queue")):
        t.add_row(label, *(_fmt(summary.get(f"{key}_{s}"), "ms") for s in ("mean", "p50", "p95", "p99")))
    t.add_row("program latency (s)", *(_fmt(summary.get(f"program_latency_{s}")) for s in ("mean", "p50", "p95", "p99")))
    t.add_row("program token latency (ms)", _fmt(summary.get("program_token_latency_mean"), "ms"), "",
              _fmt(summary.get("program_token_latency_p95"), "ms"), _fmt(summary.get("program_token_latency_p99"), "ms"))
    console.print(t)
    t2 = Table(show_header=False)
    t2.add_column("k")
    t2.add_column("v", justify="right")
    t2.add_row("throughput (output tok/s)", _fmt(summary["output_tok_s"]))
    t2.add_row("throughput (prompt+output tok/s)", _fmt(summary["total_tok_s"]))
    t2.add_row("programs/s  |  calls/s", f"{_fmt(summary['programs_s'])}  |  {_fmt(summary['calls_s'])}")
    t2.add_row("finished programs  |  calls", f"{summary['num_programs']:.0f}  |  {summary['num_calls']:.0f}")
    t2.add_row("prefix-cache hit rate", _fmt(summary["prefix_hit_rate"], "%"))
    t2.add_row("mean KV usage  |  busy", f"{_fmt(summary['kv_usage_mean'], '%')}  |  {_fmt(summary['busy_fraction_mean'], '%')}")
    t2.add_row("preemptions", f"{summary['preemptions']:.0f}")
    if "goodput_calls_s" in summary:
        t2.add_row("goodput (calls/s within SLO)", _fmt(summary["goodput_calls_s"]))
    if stats:
        t2.add_row("simulator speed", f"{stats['num_llm_calls']:,} calls in {stats['wall_time_s']:.1f} s wall "
                                      f"({stats['calls_per_wall_s']:,.0f} calls/s)")
    console.print(t2)


def register_commands(app: typer.Typer) -> None:
    @app.command()
    def simulate(
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML run config; flags override it."),
        seed: Optional[int] = typer.Option(None, help="Root seed (default 0)."),
        policy: Optional[str] = typer.Option(None, help="Policy bundle or component name (see `agentsim policies`)."),
        nodes: Optional[int] = typer.Option(None, help="Number of nodes (default 1)."),
        gpus_per_node: Optional[int] = typer.Option(None, help="GPUs per node (default 4)."),
        tp: Optional[int] = typer.Option(None, help="Tensor-parallel degree per engine (default 1)."),
        gpu: Optional[str] = typer.Option(None, help="GPU kind (default a100-80gb)."),
        model: Optional[str] = typer.Option(None, help="Model (default llama-3-8b)."),
        profile: Optional[str] = typer.Option(None, help="Profile name or JSON path (default: shipped for gpu/model/tp)."),
        agents: Optional[int] = typer.Option(None, help="Closed-loop agents in flight (default 200)."),
        rate: Optional[float] = typer.Option(None, help="Poisson programs/s (sets --arrival poisson)."),
        arrival: Optional[str] = typer.Option(None, help="closed | poisson | trace."),
        generator: Optional[str] = typer.Option(None, help="Workload generator: react, chat, fanout, ..."),
        trace: Optional[str] = typer.Option(None, help="Replay a trace file (sets --arrival trace)."),
        time_scale: Optional[float] = typer.Option(None, help="Trace: multiply arrival offsets."),
        limit: Optional[int] = typer.Option(None, help="Trace: first N programs only."),
        duration: Optional[float] = typer.Option(None, help="Simulated seconds (default 600)."),
        max_model_len: Optional[int] = typer.Option(None, help="Engine context length (default: the model's)."),
        fast_forward: Optional[bool] = typer.Option(None, "--fast-forward/--no-fast-forward",
                                                    help="Advance decode-only stretches as one event (default on)."),
        out: Path = typer.Option(Path("runs/latest"), "--out", "-o", help="Result directory (written atomically)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary table."),
    ) -> None:
        """Simulate agent programs on a vLLM cluster and write Parquet results + manifest."""
        from agentsim.config import load_config
        from agentsim.metrics import write_results
        from agentsim.sim.runner import run

        if rate is not None and arrival is None:
            arrival = "poisson"
        if trace is not None and arrival is None:
            arrival = "trace"
        overrides = {
            "seed": seed, "policy": policy, "duration": duration,
            "cluster.num_nodes": nodes, "cluster.gpus_per_node": gpus_per_node, "cluster.tp": tp,
            "cluster.gpu": gpu, "cluster.model": model, "cluster.profile": profile,
            "workload.agents": agents, "workload.rate": rate, "workload.arrival": arrival,
            "workload.generator": generator, "workload.trace": trace, "workload.time_scale": time_scale,
            "workload.limit": limit, "sim.fast_forward": fast_forward,
            "cluster.engine.max_model_len": max_model_len,
        }
        cfg = load_config(config, overrides)
        bar = _LazyProgress("simulating")
        try:
            result = run(cfg, progress=bar)
        finally:
            bar.close()
        write_results(out, result.calls, result.programs, result.engines, result.summary,
                      {**result.manifest, "stats": result.stats})
        if not quiet:
            cl = cfg.cluster
            title = (f"{cl.num_nodes} node(s) x {cl.gpus_per_node} {cl.gpu}, {cl.model} TP{cl.tp}, "
                     f"{cl.num_engines} engines | policy {result.manifest['policy']} | seed {cfg.seed} | "
                     f"{cfg.duration:g} s simulated")
            print_summary(result.summary, title, result.stats)
            console.print(f"results: {out}/ (calls, programs, engines .parquet; summary.json; manifest.json)")

    @app.command()
    def sweep(
        spec: Path = typer.Argument(..., help="Sweep spec TOML: [base] config, [grid] of dotted keys -> lists."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: spec's sweep.out)."),
        workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Parallel worker processes (default: CPU count)."),
        ray_address: Optional[str] = typer.Option(None, "--ray", help="Run cells as Ray tasks on this cluster address."),
    ) -> None:
        """Run a grid of simulations (policies x parameters x seeds); resumable, one combined table."""
        from agentsim.experiments.sweep import load_spec, run_sweep

        sp = load_spec(spec)
        table = run_sweep(sp, out=out, workers=workers, ray_address=ray_address, console=err)
        show = [c for c in table.columns if not c.startswith("_")]
        metrics = ["output_tok_s", "ttft_p50", "ttft_p99", "e2e_p50", "program_latency_mean",
                   "program_latency_p99", "prefix_hit_rate", "preemptions"]
        t = Table(title=f"sweep: {len(table)} cells -> {sp.out if out is None else out}/results.parquet")
        keys = [c for c in show if c in sp.grid_keys]
        for c in keys + metrics:
            t.add_column(c, justify="right")
        for _, row in table.iterrows():
            t.add_row(*(str(row[c]) for c in keys), *(_fmt(row[m]) if m in row else "-" for m in metrics))
        console.print(t)

    @app.command()
    def validate(
        bench: list[Path] = typer.Argument(..., help="Result files of `vllm bench serve --save-result --save-detailed`."),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML run config: the engine settings of the measured server."),
        profile: Optional[str] = typer.Option(None, "--profile", help="Profile name or JSON path (overrides the config's)."),
        out: Path = typer.Option(Path("runs/validate"), "--out", "-o", help="Directory for validation.json and validation.png."),
        seed: int = typer.Option(0, help="Seed for arrival times drawn from a file's rate (files without start_times)."),
    ) -> None:
        """Replay `vllm bench serve` runs in the simulator; compare duration, throughput, TTFT, TPOT, ITL, E2EL."""
        from agentsim.validate import check_out_dir, render, validate as run_validate, write_out_dir

        check_out_dir(out)
        report = run_validate(bench, config, profile, seed)
        render(report, console)
        write_out_dir(out, report, report["runs"])
        console.print(f"wrote {out}/validation.json and {out}/validation.png")

    @app.command()
    def policies() -> None:
        """List every registered policy component and bundle with its parameters and defaults."""
        from agentsim.policies.registry import bundles, components

        t = Table(title="policy components", show_lines=False)
        t.add_column("decision")
        t.add_column("name", style="bold")
        t.add_column("parameters (defaults)")
        t.add_column("what it does")
        for e in components():
            params = ", ".join(f"{k}={v!r}" for k, v in e.params().items()) or "-"
            t.add_row(e.decision, e.name, params, e.summary)
        console.print(t)
        b = Table(title="policy bundles (--policy NAME)")
        b.add_column("name", style="bold")
        b.add_column("route")
        b.add_column("order")
        b.add_column("evict")
        b.add_column("shape")
        b.add_column("what it is")
        for e in bundles():
            b.add_row(e.name, *(e.components[d] for d in ("route", "order", "evict", "shape")), e.summary)
        console.print(b)

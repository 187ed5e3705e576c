"""``agentsim simulate``, ``agentsim sweep`` and ``agentsim policies``."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table


def make_console(stderr: bool = False) -> Console:
    """A rich Console for tables: on a terminal its width; to a pipe or a log file (where rich would
    cut every line at 80 columns) ``$COLUMNS`` if set, else 240 columns, so no row is truncated."""
    import os

    if os.environ.get("COLUMNS") or Console(stderr=stderr).is_terminal:
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=240)


console = make_console()
err = make_console(stderr=True)


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


def _fmt(v: float | None, unit: str = "") -> str:
    """A value for a table (see :func:`agentsim.metrics.format_value`)."""
    from agentsim.metrics import format_value

    return format_value(v, unit)


def print_summary(summary: dict, title: str, stats: dict | None = None) -> None:
    """Print a run's summary (the keys of :data:`agentsim.metrics.SUMMARY_KEYS`; units in the labels)."""
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("mean", justify="right")
    t.add_column("p50", justify="right")
    t.add_column("p95", justify="right")
    t.add_column("p99", justify="right")
    for label, key, unit in (("TTFT (ms)", "ttft", "ms"), ("TPOT (ms)", "tpot", "ms"), ("E2E latency (ms)", "e2el", "ms"),
                             ("queue time (ms)", "queue_time", "ms"), ("program latency (s)", "program_latency", "s")):
        t.add_row(label, *(_fmt(summary.get(f"{s}_{key}_{unit}")) for s in ("mean", "median", "p95", "p99")))
    t.add_row("program token latency (ms/token)", _fmt(summary.get("mean_program_token_latency_ms")), "",
              _fmt(summary.get("p95_program_token_latency_ms")), _fmt(summary.get("p99_program_token_latency_ms")))
    console.print(t)
    t2 = Table(show_header=False)
    t2.add_column("k")
    t2.add_column("v", justify="right")
    g = summary.get
    t2.add_row("duration (measured makespan, s)", _fmt(g("duration_s")))
    t2.add_row("output throughput (tok/s)", _fmt(g("output_throughput")))
    t2.add_row("total token throughput (prompt + output tok/s)", _fmt(g("total_token_throughput")))
    t2.add_row("programs/s  |  calls/s", f"{_fmt(g('program_throughput'))}  |  {_fmt(g('request_throughput'))}")
    t2.add_row("finished programs  |  calls", f"{_fmt(g('num_programs'), 'n')}  |  {_fmt(g('num_calls'), 'n')}")
    t2.add_row("prefix-cache hit rate", _fmt(g("prefix_hit_rate"), "%"))
    t2.add_row("mean KV usage  |  busy", f"{_fmt(g('mean_kv_usage'), '%')}  |  {_fmt(g('mean_busy_fraction'), '%')}")
    t2.add_row("preemptions", _fmt(g("num_preemptions"), "n"))
    if "request_goodput" in summary:
        t2.add_row("goodput (calls/s within SLO)", _fmt(summary["request_goodput"]))
    if g("total_kv_transfer_bytes"):  # KV moved between engines (agentsim.sim.disagg)
        t2.add_row("KV moved between engines (GB)  |  mean transfer (ms)",
                   f"{_fmt(g('total_kv_transfer_bytes') / 1e9)}  |  {_fmt(g('mean_kv_transfer_time_ms'))}")
    if g("mean_coordination_overhead_s"):
        t2.add_row("router time per program (s)", _fmt(g("mean_coordination_overhead_s")))
    if stats:
        t2.add_row("simulator speed", f"{stats['num_llm_calls']:,} calls in {stats['wall_time_s']:.1f} s wall "
                                      f"({stats['calls_per_wall_s']:,.0f} calls/s)")
    console.print(t2)


def parse_set_options(items: list[str], option: str = "--set") -> dict:
    """``["cluster.tp=2", 'policy="sjf"']`` -> ``{"cluster.tp": 2, "policy": "sjf"}``.

    VALUE is parsed as a TOML value (``2``, ``1.5``, ``true``, ``"text"``, ``[1, 2]``, ``{a = 1}``);
    a bare word that is not TOML (``sjf``) is taken as a string. Raises ConfigError naming the
    option for an item without ``=`` or with an empty key.
    """
    import tomllib

    from agentsim.errors import ConfigError

    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(option, f"expected KEY=VALUE with a dotted config KEY, got {item!r}")
        raw = raw.strip()
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            if not raw or any(c in raw for c in "\"'[]{}=\n"):
                raise ConfigError(f"{option} {key}", f"value {raw!r} is not a TOML value") from None
            value = raw  # a bare word: a string
        out[key] = value
    return out


def print_json(obj) -> None:
    """Print ``obj`` as JSON on stdout (NaN/inf as null, like summary.json)."""
    import json

    from agentsim.metrics import _jsonable

    typer.echo(json.dumps(_jsonable(obj), indent=2, sort_keys=True))


def simulate_title(cfg, result) -> str:
    """The header of ``simulate``'s table: what actually ran — the profile's own GPU and model (a
    ``--profile`` file may be for other hardware than ``cluster.gpu``/``cluster.model``), the policy,
    the seed and the simulated time the summary covers (its measured makespan)."""
    from agentsim.calibration.profile import resolve_profile

    cl = cfg.cluster
    prof = resolve_profile(cl.profile, cl.gpu, cl.model, cl.tp)
    drained = " (drained)" if cfg.sim.drain else ""
    return (f"{cl.num_nodes} node(s) x {cl.gpus_per_node} GPU(s), {cl.num_engines} engine(s) TP{cl.tp} | "
            f"profile {prof.name} ({prof.gpu.name}, {prof.model.name}) | policy {result.manifest['policy']} | "
            f"seed {cfg.seed} | {result.summary['duration_s']:,.1f} s simulated{drained}")


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
        block_size: Optional[int] = typer.Option(None, help="KV block size in tokens (vLLM --block-size; default 16)."),
        engines_per_node: Optional[int] = typer.Option(None, help="Engines per node (default gpus_per_node // tp)."),
        num_programs: Optional[int] = typer.Option(None, help="Stop starting programs after this many."),
        drain: Optional[bool] = typer.Option(None, "--drain/--no-drain",
                                             help="After --duration, start no programs and let running ones finish "
                                                  "(default off: the run ends at --duration)."),
        fast_forward: Optional[bool] = typer.Option(None, "--fast-forward/--no-fast-forward",
                                                    help="Advance decode-only stretches as one event (default on)."),
        set_: List[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                       help="Override any config field: dotted KEY, VALUE as TOML "
                                            "(e.g. --set cluster.engine.max_num_seqs=64 --set 'policy=\"sjf\"'); "
                                            "repeatable; applied after the other flags."),
        out: Path = typer.Option(Path("runs/latest"), "--out", "-o",
                                 help="Result directory: new, empty or a previous agentsim result (replaced "
                                      "atomically); anything else is refused."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary table."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON (on stdout) instead of tables."),
    ) -> None:
        """Simulate agent programs on a vLLM cluster and write Parquet results + manifest."""
        from agentsim.config import load_config
        from agentsim.metrics import write_results
        from agentsim.outputs import preflight_result_dir
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
            "cluster.engine.max_model_len": max_model_len, "cluster.engine.block_size": block_size,
            "cluster.engines_per_node": engines_per_node, "workload.num_programs": num_programs,
            "sim.drain": drain,
        }
        overrides.update(parse_set_options(set_))
        cfg = load_config(config, overrides)
        # before the run: never after the work is done; its note once the result is written
        note = preflight_result_dir(out, done=True)
        bar = _LazyProgress("simulating")
        try:
            result = run(cfg, progress=bar)
        finally:
            bar.close()
        from agentsim.traces.source import cut_note

        cut = cut_note(cfg, result.stats.get("num_trace_programs", 0), result.stats.get("num_programs_cut", 0))
        if cut:
            typer.echo(cut, err=True)
        write_results(out, result.calls, result.programs, result.engines, result.summary,
                      {**result.manifest, "stats": result.stats}, links=result.links)
        if note:
            typer.echo(note, err=True)
        if as_json:
            print_json(result.summary)
        elif not quiet:
            print_summary(result.summary, simulate_title(cfg, result), result.stats)
            links = ", links" if result.links is not None else ""
            console.print(f"results: {out}/ (calls, programs, engines{links} .parquet; summary.json; manifest.json)")

    @app.command()
    def sweep(
        spec: Path = typer.Argument(..., help="Sweep spec TOML: [base] config, [grid] of dotted keys -> lists."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: spec's sweep.out)."),
        workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Parallel worker processes, >= 1 "
                                                                            "(default: CPU count)."),
        ray_address: Optional[str] = typer.Option(None, "--ray", help="Run cells as Ray tasks on this cluster address."),
        set_: List[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                       help="Override a [base] config field for every cell: dotted KEY, VALUE as "
                                            "TOML (e.g. --set duration=30); repeatable; cells computed with "
                                            "another value are stale and rerun."),
        as_json: bool = typer.Option(False, "--json", help="Print the combined table as JSON (one object per cell)."),
    ) -> None:
        """Run a grid of simulations (policies x parameters x seeds); resumable, one combined table."""
        from agentsim.errors import ConfigError
        from agentsim.experiments.sweep import CellFailed, load_spec, run_sweep

        if workers is not None and workers < 1:
            raise ConfigError("--workers", f"must be >= 1, got {workers}")
        sp = load_spec(spec, overrides=parse_set_options(set_))
        try:
            table = run_sweep(sp, out=out, workers=workers, ray_address=ray_address, console=err)
        except CellFailed as e:  # a fault in a run (not bad input): one line, exit 1
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        if as_json:
            print_json(table.to_dict(orient="records"))
            return
        show = [c for c in table.columns if not c.startswith("_")]
        # (summary key, column header with its unit, _fmt unit)
        metrics = [("output_throughput", "output tok/s", ""), ("median_ttft_ms", "TTFT p50 ms", ""),
                   ("p99_ttft_ms", "TTFT p99 ms", ""), ("median_e2el_ms", "E2E p50 ms", ""),
                   ("mean_program_latency_s", "program latency mean s", ""),
                   ("p99_program_latency_s", "program latency p99 s", ""),
                   ("prefix_hit_rate", "prefix hit rate", "%"), ("num_preemptions", "preemptions", "n")]
        t = Table(title=f"sweep: {len(table)} cells -> {sp.out if out is None else out}/results.parquet")
        keys = [c for c in show if c in sp.grid_keys]
        for c in keys:
            t.add_column(c, justify="right")
        for _, head, _ in metrics:
            t.add_column(head, justify="right")
        for _, row in table.iterrows():
            t.add_row(*(str(row[c]) for c in keys), *(_fmt(row[m], u) if m in row else "-" for m, _, u in metrics))
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
        from agentsim.config import Param
        from agentsim.validate import check_out_dir, render, validate as run_validate, write_out_dir

        Param(int, ge=0).check(seed, "--seed")
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

"""``agentsim live`` (run a config on real vLLM engines) and ``agentsim compare`` (two result dirs).

``app`` is the typer group mounted as ``agentsim live``: its callback *is* the command, so
``agentsim live --local-nodes 2`` runs. :func:`compare_command` is the function behind
``agentsim compare RUN_A RUN_B``. Nothing here imports vLLM or Ray at module import.

Without ``--config`` the live defaults are small enough for a laptop or CI: one engine per node,
a tiny random Llama on vLLM's CPU backend, 4 closed-loop ReAct agents, 8 programs of a few calls
each with sub-second tools.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import List, Optional

import typer

from agentsim.errors import ConfigError

app = typer.Typer(
    help="Run agent programs on real vLLM engines (Ray cluster or HTTP endpoints); same results layout as simulate.",
    invoke_without_command=True, no_args_is_help=False, add_completion=False,
)

# Applied under the user's flags when no --config is given.
LIVE_DEFAULTS: dict = {
    "duration": 60.0,
    "sim.drain": True,
    "cluster.gpus_per_node": 1,
    "cluster.engines_per_node": 1,
    "cluster.engine.block_size": 32,
    "cluster.engine.max_num_seqs": 16,
    "cluster.engine.max_model_len": 4096,
    "workload.generator": "react",
    "workload.agents": 4,
    "workload.num_programs": 8,
    "workload.params": {"calls_mean": 4.0, "max_calls": 8,
                        "tools": [{"name": "api_call", "dist": "lognormal", "median": 0.3, "sigma": 0.5,
                                   "max_time": 2.0}]},
}


def _parse_kills(values: list[str]) -> tuple:
    out = []
    for v in values:
        try:
            eid, at = v.split("@")
            out.append((int(eid), float(at)))
        except ValueError:
            raise ConfigError("--kill-engine", f"expected ENGINE_ID@SECONDS, got {v!r}") from None
    return tuple(out)


@app.callback()
def live(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML run config (as for simulate); flags override it."),
    local_nodes: Optional[int] = typer.Option(None, "--local-nodes", help="Start an embedded Ray cluster of N nodes on this machine (loopback)."),
    address: Optional[str] = typer.Option(None, "--address", help="Join an existing Ray cluster: auto or HOST:PORT."),
    endpoints: Optional[str] = typer.Option(None, "--endpoints", help="Drive existing OpenAI-compatible vLLM servers instead: URL,URL,..."),
    seed: Optional[int] = typer.Option(None, help="Root seed (default 0)."),
    policy: Optional[str] = typer.Option(None, help="Policy bundle or component name (see `agentsim policies`)."),
    engines_per_node: Optional[int] = typer.Option(None, help="Engines per node (live default 1)."),
    tp: Optional[int] = typer.Option(None, help="Tensor-parallel degree per engine."),
    agents: Optional[int] = typer.Option(None, help="Closed-loop agents in flight."),
    rate: Optional[float] = typer.Option(None, help="Poisson programs/s (sets --arrival poisson)."),
    arrival: Optional[str] = typer.Option(None, help="closed | poisson | trace."),
    generator: Optional[str] = typer.Option(None, help="Workload generator: react, chat, fanout, ..."),
    num_programs: Optional[int] = typer.Option(None, help="Stop starting programs after this many."),
    duration: Optional[float] = typer.Option(None, help="Seconds during which programs start, as in simulate (wall seconds here; live default 60)."),
    model: str = typer.Option("tiny", help="Model directory or id for vLLM; 'tiny' = agentsim's tiny random Llama, made offline "
                                           "(the model `python -m agentsim.live.tiny_model DIR` writes)."),
    load_format: Optional[str] = typer.Option(None, help="vLLM load format (default: what the model needs: dummy (random weights) for "
                                                         "agentsim's tiny model, auto otherwise)."),
    dtype: Optional[str] = typer.Option(None, help="Model dtype (default: float32 for agentsim's tiny model, auto otherwise)."),
    data_plane: Optional[str] = typer.Option(None, help="Generate calls over: loopback (ZMQ, local default), node (ZMQ on the node's IP) or ray (--address default)."),
    kv_cache_gib: float = typer.Option(1.0, help="CPU backend: KV cache GiB per engine."),
    block_size: Optional[int] = typer.Option(None, help="KV block size (CPU backend: a multiple of 32)."),
    max_num_seqs: Optional[int] = typer.Option(None, help="vLLM --max-num-seqs per engine."),
    drain: Optional[bool] = typer.Option(None, "--drain/--no-drain",
                                         help="After --duration, start no programs and let running ones finish (as simulate "
                                              "--drain; default: the config's sim.drain, on without --config); "
                                              "--no-drain ends the run at --duration."),
    drain_timeout: Optional[float] = typer.Option(None, help="Longest wait for running programs after --duration, s (default: duration)."),
    flush_interval: float = typer.Option(5.0, help="Write partial results (marked incomplete) this often; 0 = only at the end."),
    sample_interval: float = typer.Option(1.0, help="Engine time-series period (s)."),
    kill_engine: List[str] = typer.Option([], "--kill-engine", help="Fault injection: ENGINE_ID@SECONDS (repeatable)."),
    engine_scheduler: bool = typer.Option(False, "--engine-scheduler", help="Host order/evict policies in vLLM even for FCFS/LRU."),
    kv_connector: str = typer.Option("example", "--kv-connector", help="P/D roles (cluster.disagg): example (vLLM's "
                                     "disk-based ExampleConnector) or nixl (NixlConnector over UCX; needs the nixl package)."),
    policy_import: List[str] = typer.Option([], "--policy-import", help="Module registering extra policies (imported in the engines too)."),
    out: Path = typer.Option(Path("runs/live"), "--out", "-o", help="Result directory (written atomically)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary table."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Forward engine logs to this terminal."),
) -> None:
    """Run a workload on real vLLM engines with the simulator's programs, policies and metrics."""
    if ctx.invoked_subcommand is not None:
        return
    from agentsim.config import MIN_SAMPLE_INTERVAL, Param, load_config
    from agentsim.live.driver import LiveOptions
    from agentsim.live.runner import LiveSettings, run_live

    # the driver's own periods and sizes, checked before a cluster starts (0 s: a busy loop)
    Param(float, ge=MIN_SAMPLE_INTERVAL).check(sample_interval, "--sample-interval")
    Param(float, ge=0).check(flush_interval, "--flush-interval")
    Param(float, ge=0, optional=True).check(drain_timeout, "--drain-timeout")
    Param(float, gt=0).check(kv_cache_gib, "--kv-cache-gib")
    if rate is not None and arrival is None:
        arrival = "poisson"
    flags = {
        "seed": seed, "policy": policy, "duration": duration, "cluster.engines_per_node": engines_per_node,
        "cluster.tp": tp, "cluster.engine.block_size": block_size, "cluster.engine.max_num_seqs": max_num_seqs,
        "workload.agents": agents, "workload.rate": rate, "workload.arrival": arrival,
        "workload.generator": generator, "workload.num_programs": num_programs, "sim.drain": drain,
    }
    if local_nodes is not None:
        flags["cluster.num_nodes"] = local_nodes
    if generator is not None and config is None:
        flags["workload.params"] = {}  # the react parameters in LIVE_DEFAULTS do not fit other generators
    overrides = {} if config is not None else {k: v for k, v in LIVE_DEFAULTS.items()}
    if config is None and local_nodes is None and address is None and not endpoints:
        overrides["cluster.num_nodes"] = 2
        local_nodes = 2
    overrides.update({k: v for k, v in flags.items() if v is not None})
    cfg = load_config(config, overrides)
    eps = tuple(e.strip() for e in endpoints.split(",") if e.strip()) if endpoints else ()
    if endpoints is not None and not eps:
        raise ConfigError("--endpoints", "give at least one URL")
    if config is not None and local_nodes is None and address is None and not eps:
        local_nodes = cfg.cluster.num_nodes
    from agentsim.outputs import preflight_result_dir

    note = preflight_result_dir(out)  # before any engine starts: never clobber the user's files
    if note:
        typer.echo(note, err=True)
    opt = LiveOptions(drain=cfg.sim.drain, drain_timeout=drain_timeout, flush_interval=flush_interval,
                      sample_interval=sample_interval, kill_engines=_parse_kills(kill_engine))
    settings = LiveSettings(local_nodes=local_nodes, address=address, endpoints=eps, model=model,
                            load_format=load_format, dtype=dtype, kv_cache_gib=kv_cache_gib, data_plane=data_plane,
                            force_engine_scheduler=engine_scheduler, policy_imports=tuple(policy_import),
                            kv_connector=kv_connector,
                            options=opt, log_to_driver=verbose, progress=None if quiet else _progress_printer())

    signals: list[int] = []

    def _term(signum, frame):  # a SIGTERM ends the run like Ctrl-C: partial results, marked incomplete
        signals.append(signum)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    try:
        result = run_live(cfg, settings, out)
    finally:
        signal.signal(signal.SIGTERM, old)
    if not quiet:
        _print(result, cfg, out)
    m = result.manifest
    if not m.get("complete"):  # exit status: 130 Ctrl-C, 143 SIGTERM (128 + signal), 1 otherwise incomplete
        if m.get("status") == "interrupted":
            raise typer.Exit(128 + (signals[0] if signals else signal.SIGINT))
        raise typer.Exit(1)


def _progress_printer():
    """``progress(line)`` for the live runner: ``[  12.3 s] line`` on stderr (start-up takes a while:
    the Ray cluster, then each engine loading its model)."""
    import sys
    import time

    t0 = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - t0:7.1f} s] {line}", file=sys.stderr, flush=True)

    return say


def _print(result, cfg, out: Path) -> None:
    m = result.manifest
    cl = cfg.cluster
    lo = m.get("live_options") or {}
    title = (f"live: {m.get('cluster')}, {len(m.get('engines', []))} engine(s), model {Path(str(m.get('live_model'))).name} "
             f"({m.get('load_format')}, {m.get('dtype')}) | policy {m['policy']} | seed {cfg.seed} | "
             f"arrivals for {lo.get('duration', cfg.duration):g} s{', drained' if lo.get('drain') else ''} | "
             f"{result.summary.get('duration_s', 0.0):,.1f} s run")
    try:
        from agentsim.commands import print_summary

        print_summary(result.summary, title)
    except ImportError:
        typer.echo(title)
        for k, v in sorted(result.summary.items()):
            typer.echo(f"  {k}: {v}")
    extra = []
    if m.get("engine_failures"):
        extra.append(f"engine failures: {', '.join(str(f['engine_id']) for f in m['engine_failures'])}; "
                     f"retried calls: {m.get('num_retries', 0)}")
    if result.summary.get("num_programs_failed"):
        extra.append(f"failed programs: {result.summary['num_programs_failed']:.0f} (see manifest.json errors)")
    for line in extra:
        typer.echo(line)
    status = "complete" if m.get("complete") else f"INCOMPLETE ({m.get('status')})"
    typer.echo(f"results: {out}/ ({status}; calls, programs, engines .parquet; summary.json; manifest.json)")


def compare_command(
    run_a: Path = typer.Argument(..., help="Result directory A (sim or live)."),
    run_b: Path = typer.Argument(..., help="Result directory B."),
    metric: List[str] = typer.Option([], "--metric", "-m", help="Only these summary keys (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Compare two runs metric by metric (TTFT, TPOT, E2E, program latency p50/p95/p99, throughput, hit rate)."""
    from agentsim.live.compare import print_comparison

    print_comparison(run_a, run_b, list(metric) or None, as_json)


compare_app = typer.Typer(help="Compare two result directories metric by metric.", add_completion=False)
compare_app.command("compare")(compare_command)

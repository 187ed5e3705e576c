"""``agentsim trace``: import, inspect, export and generate traces."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import typer

from agentsim.errors import ConfigError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Traces: import real traces into the canonical Parquet form, inspect, export, generate.")


def _options(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


@app.command("import")
def import_cmd(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="mooncake | azure | tau2 | tracelab | native | auto."),
    src: Path = typer.Argument(..., metavar="FILE", help="The trace file (may be gzip-compressed)."),
    out: Path = typer.Option(..., "-o", "--out", help="Canonical Parquet file to write (new, or a previous "
                                                       "agentsim trace; anything else is refused)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip malformed lines/records (and count them) "
                                                           "instead of failing before writing anything."),
    spread: bool = typer.Option(False, "--spread", help="mooncake: spread requests evenly within their ~3 s bucket."),
    sessions: bool = typer.Option(False, "--sessions", help="mooncake: rebuild sessions from prefix chains."),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="mooncake: tokens per hash_ids block (512)."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="tracelab rounds: 'cached' (the trace's cached "
                                                               "prefix, default) or 'append' (append-only history)."),
) -> None:
    """Import FILE (FORMAT) into canonical Parquet; nothing is written unless every record is valid."""
    from agentsim.traces.importers import import_trace

    note = _check_out(out)
    res = import_trace(src, out, None if fmt == "auto" else fmt, skip_bad=skip_bad,
                       **_options(spread=spread or None, sessions=sessions or None, block_size=block_size,
                                  prefix=prefix))
    typer.echo(f"imported {res.num_programs:,} programs ({res.num_steps:,} steps) from {src} "
               f"[{res.meta['source_format']}] -> {res.path}")
    _say(note)
    if res.num_skipped:
        typer.echo(f"skipped {res.num_skipped:,} bad records; first: " + " | ".join(res.skipped), err=True)


@app.command("inspect")
def inspect_cmd(
    src: Path = typer.Argument(..., metavar="FILE", help="A trace in any supported format, or canonical Parquet."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="Input format (default: guessed)."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip malformed records."),
    spread: bool = typer.Option(False, "--spread", help="mooncake: spread requests within their bucket."),
    sessions: bool = typer.Option(False, "--sessions", help="mooncake: rebuild sessions from prefix chains."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="tracelab rounds: cached | append."),
) -> None:
    """Counts, duration, arrival rate, length percentiles, calls/program, tool time and prefix reuse."""
    from agentsim.traces.importers import get_importer
    from agentsim.traces.stats import format_report, inspect_programs

    imp = get_importer(src, fmt, skip_bad=skip_bad,
                       **_options(spread=spread or None, sessions=sessions or None, prefix=prefix))
    st = inspect_programs(imp.programs(), imp.meta)
    if imp.num_skipped:
        st["num_skipped"] = imp.num_skipped
    if as_json:
        typer.echo(json.dumps(_jsonable(st), indent=2, sort_keys=True))
    else:
        typer.echo(format_report(st))
        if imp.num_skipped:
            typer.echo(f"skipped {imp.num_skipped:,} bad records; first: " + " | ".join(imp.skipped), err=True)


@app.command("export")
def export_cmd(
    src: Path = typer.Argument(..., metavar="FILE", help="A trace (canonical Parquet or any supported format)."),
    to: str = typer.Option(..., "--to", help="native (JSONL) | mooncake | azure."),
    out: Path = typer.Option(..., "-o", "--out", help="File to write (new, or a previous agentsim trace; "
                                                       "anything else is refused)."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="Input format (default: guessed)."),
) -> None:
    """Write a trace as agentsim JSONL, or back to the Mooncake / Azure formats (one-call programs)."""
    from agentsim.traces.export import export
    from agentsim.traces.importers import get_importer

    imp = get_importer(src, fmt)
    note = _check_out(out)
    path = export(imp.meta, imp.programs(), out, to)
    typer.echo(f"exported {src} -> {path} [{to}]")
    _say(note)


@app.command("generate")
def generate_cmd(
    generator: str = typer.Argument(..., help="A registered generator (react, chat, lats, team, ...)."),
    out: Path = typer.Option(..., "-o", "--out", help="Canonical Parquet file to write (new, or a previous "
                                                       "agentsim trace; anything else is refused)."),
    num_programs: int = typer.Option(100, "-n", "--num-programs", help="Programs to generate."),
    rate: Optional[float] = typer.Option(None, "--rate", help="Poisson arrivals (programs/s); default all at 0."),
    seed: int = typer.Option(0, "--seed", help="Run seed (same programs as `agentsim simulate --seed`)."),
    param: List[str] = typer.Option([], "--param", "-p", help="Generator parameter KEY=VALUE (VALUE as JSON)."),
) -> None:
    """Record a generator's programs (structure and token content, no timings) as a trace."""
    from agentsim.traces.canonical import write_trace
    from agentsim.traces.record import generate_programs

    from agentsim.config import Param

    Param(int, ge=1).check(num_programs, "--num-programs")
    Param(int, ge=0).check(seed, "--seed")
    Param(float, gt=0, optional=True).check(rate, "--rate")  # programs/s; NaN and inf refused
    params = {}
    for p in param:
        if "=" not in p:
            raise ConfigError("param", f"expected KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        try:
            params[k.strip()] = json.loads(v)
        except ValueError:
            params[k.strip()] = v
    note = _check_out(out)
    meta, progs = generate_programs(generator, params, num_programs, rate=rate, seed=seed)
    path = write_trace(out, meta, progs)
    typer.echo(f"generated {num_programs:,} {generator} programs -> {path}")
    _say(note)


def _check_out(out: Path) -> str | None:
    """Refuse (exit 2, one line) an ``-o`` that is a directory, a file agentsim did not write or a
    place no file can be made; a previous agentsim trace (canonical Parquet or agentsim JSONL) is
    replaced. Returns the note to print once the trace is written (None for a new file)."""
    from agentsim.outputs import REPLACE, is_agentsim_trace, preflight_output_file

    if preflight_output_file(out, "--out", is_agentsim_trace) == REPLACE:
        return f"note: replaced the previous agentsim trace {out}"
    return None


def _say(note: str | None) -> None:
    if note:
        typer.echo(note, err=True)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x

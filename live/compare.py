"""``agentsim compare RUN_A RUN_B``: two result directories, metric by metric, with relative differences.

Works on any two runs in the shared layout (sim vs live, policy vs policy, seed vs seed): it reads
``summary.json`` and ``manifest.json`` and, when the summaries lack a metric, recomputes it from the
Parquet tables with :func:`agentsim.metrics.summarize`. The relative difference is
``(B - A) / |A|`` (NaN when A is 0 or missing). Needs neither vLLM nor Ray.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from agentsim.errors import ConfigError

# (summary key, label, unit); unit "s" values are shown in ms
METRICS: tuple[tuple[str, str, str], ...] = (
    ("ttft_p50", "TTFT p50", "s"), ("ttft_p95", "TTFT p95", "s"), ("ttft_p99", "TTFT p99", "s"),
    ("tpot_p50", "TPOT p50", "s"), ("tpot_p95", "TPOT p95", "s"), ("tpot_p99", "TPOT p99", "s"),
    ("e2e_p50", "E2E p50", "s"), ("e2e_p95", "E2E p95", "s"), ("e2e_p99", "E2E p99", "s"),
    ("queue_p50", "queue p50", "s"), ("queue_p99", "queue p99", "s"),
    ("program_latency_p50", "program latency p50", "s"), ("program_latency_p95", "program latency p95", "s"),
    ("program_latency_p99", "program latency p99", "s"),
    ("program_token_latency_mean", "program token latency mean", "s"),
    ("output_tok_s", "throughput (output tok/s)", ""), ("total_tok_s", "throughput (total tok/s)", ""),
    ("programs_s", "programs/s", ""), ("calls_s", "calls/s", ""),
    ("prefix_hit_rate", "prefix-cache hit rate", "%"), ("preemptions", "preemptions", "n"),
    ("num_programs", "finished programs", "n"), ("num_calls", "finished calls", "n"),
    ("num_retries", "retried calls", "n"),
)


def load_run(path: str | Path) -> dict[str, Any]:
    """Summary and manifest of a result directory; ConfigError if it is not one."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(str(p), "no such result directory")
    sp = p / "summary.json"
    if not sp.exists():
        raise ConfigError(str(p), "not a result directory (no summary.json)")
    try:
        summary = json.loads(sp.read_text())
    except ValueError as e:
        raise ConfigError(str(sp), f"malformed JSON ({e})") from None
    manifest: dict = {}
    mp = p / "manifest.json"
    if mp.exists():
        try:
            manifest = json.loads(mp.read_text())
        except ValueError as e:
            raise ConfigError(str(mp), f"malformed JSON ({e})") from None
    missing = [k for k, _, _ in METRICS if k not in summary]
    if missing and (p / "calls.parquet").exists():
        from agentsim.metrics import summarize

        calls = pd.read_parquet(p / "calls.parquet")
        programs = pd.read_parquet(p / "programs.parquet")
        engines = pd.read_parquet(p / "engines.parquet")
        full = summarize(calls, programs, engines, float(summary.get("duration_s") or 1.0))
        full["num_retries"] = float(calls["num_retries"].clip(lower=0).sum())
        for k in missing:
            if k in full:
                summary[k] = full[k]
    return {"path": str(p), "summary": summary, "manifest": manifest}


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def compare_runs(a: str | Path, b: str | Path, keys: list[str] | None = None) -> pd.DataFrame:
    """One row per metric: ``metric, label, unit, a, b, diff, rel_diff``."""
    ra, rb = load_run(a), load_run(b)
    rows = []
    wanted = [m for m in METRICS if keys is None or m[0] in keys]
    if keys is not None:
        unknown = sorted(set(keys) - {m[0] for m in METRICS})
        if unknown:
            raise ConfigError("--metric", f"unknown metric {unknown[0]!r} (known: {', '.join(m[0] for m in METRICS)})")
    for key, label, unit in wanted:
        va, vb = _num(ra["summary"].get(key)), _num(rb["summary"].get(key))
        diff = vb - va
        rel = diff / abs(va) if va == va and va != 0 and vb == vb else math.nan
        rows.append({"metric": key, "label": label, "unit": unit, "a": va, "b": vb, "diff": diff, "rel_diff": rel})
    return pd.DataFrame(rows)


def describe(run: dict) -> str:
    m = run["manifest"]
    parts = [m.get("backend", "?"), f"policy {m.get('policy', '?')}", f"seed {m.get('seed', '?')}"]
    if m.get("complete") is False:
        parts.append("INCOMPLETE")
    return ", ".join(str(x) for x in parts)


def fmt_value(v: float, unit: str) -> str:
    if v != v:
        return "-"
    if unit == "s":
        return f"{v * 1e3:,.2f} ms"
    if unit == "%":
        return f"{v * 100:.1f}%"
    if unit == "n":
        return f"{v:,.0f}"
    return f"{v:,.2f}"


def fmt_rel(r: float) -> str:
    return "-" if r != r else f"{r * 100:+.1f}%"


def print_comparison(a: str | Path, b: str | Path, keys: list[str] | None = None, as_json: bool = False) -> pd.DataFrame:
    """Print the comparison (a rich table, or JSON lines with ``as_json``); return it."""
    df = compare_runs(a, b, keys)
    ra, rb = load_run(a), load_run(b)
    if as_json:
        print(json.dumps({"a": {"path": ra["path"], "run": describe(ra)}, "b": {"path": rb["path"], "run": describe(rb)},
                          "metrics": [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
                                      for r in df.to_dict("records")]}, indent=2))
        return df
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"A = {ra['path']} ({describe(ra)})\nB = {rb['path']} ({describe(rb)})")
    t.add_column("metric")
    t.add_column("A", justify="right")
    t.add_column("B", justify="right")
    t.add_column("B - A", justify="right")
    t.add_column("(B - A) / A", justify="right")
    for r in df.itertuples():
        t.add_row(r.label, fmt_value(r.a, r.unit), fmt_value(r.b, r.unit), fmt_value(r.diff, r.unit), fmt_rel(r.rel_diff))
    Console().print(t)
    return df

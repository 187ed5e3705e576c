"""``agentsim compare RUN_A RUN_B``: two result directories, metric by metric, with relative differences.

Works on any two runs in the shared layout (sim vs live, policy vs policy, seed vs seed): it reads
``summary.json`` and ``manifest.json`` and, when the summaries lack a metric, recomputes it from the
Parquet tables with :func:`agentsim.metrics.summarize`; summaries written before units were part
of the key names are read through :func:`agentsim.metrics.upgrade_summary`. Every metric has one
definition for sim and live (``agentsim.metrics``: throughput = count / measured makespan), and
each kind of quantity one unit (call latencies ms, program latencies s). The relative difference
is ``(B - A) / |A|`` (NaN when A is 0 or missing). The comparison warns when the runs differ in
cluster, model or workload (:func:`mismatches`). Needs neither vLLM nor Ray.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from agentsim.errors import ConfigError

# (summary key, label, unit): the summary.json keys of agentsim.metrics.SUMMARY_KEYS, whose names
# carry their unit; one unit per kind of quantity (call latencies ms, program latencies s,
# throughputs per second, rates %, counts n), printed once in the label
METRICS: tuple[tuple[str, str, str], ...] = (
    *((f"{s}_{k}_ms", f"{name} {lab}", "ms")
      for k, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2E latency"))
      for s, lab in (("mean", "mean"), ("median", "p50"), ("p95", "p95"), ("p99", "p99"))),
    ("mean_queue_time_ms", "queue time mean", "ms"), ("median_queue_time_ms", "queue time p50", "ms"),
    ("p99_queue_time_ms", "queue time p99", "ms"),
    *((f"{s}_program_latency_s", f"program latency {lab}", "s")
      for s, lab in (("mean", "mean"), ("median", "p50"), ("p95", "p95"), ("p99", "p99"))),
    ("mean_program_token_latency_ms", "program token latency mean", "ms/token"),
    ("output_throughput", "output throughput", "tok/s"), ("total_token_throughput", "total token throughput", "tok/s"),
    ("program_throughput", "program throughput", "programs/s"), ("request_throughput", "call throughput", "calls/s"),
    ("duration_s", "duration (measured makespan)", "s"),
    ("prefix_hit_rate", "prefix-cache hit rate", "%"), ("num_preemptions", "preemptions", "n"),
    ("num_programs", "finished programs", "n"), ("num_calls", "finished calls", "n"),
    ("total_input_tokens", "prompt tokens (finished calls)", "n"),
    ("total_output_tokens", "generated tokens", "n"),
    ("num_retries", "retried calls", "n"),
)


def load_run(path: str | Path) -> dict[str, Any]:
    """Summary and manifest of a result directory; ConfigError if it is not one."""
    p = Path(path)
    try:
        if not p.is_dir():
            raise ConfigError(str(p), "no such result directory")
    except OSError as e:   # a name too long, a loop of symbolic links
        raise ConfigError(str(p), f"cannot read it ({e.strerror or e})") from None
    sp = p / "summary.json"
    if not sp.exists():
        raise ConfigError(str(p), "not a result directory (no summary.json)")
    try:
        summary = json.loads(sp.read_text())
    except OSError as e:
        raise ConfigError(str(sp), f"cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise ConfigError(str(sp), f"malformed JSON ({e})") from None
    if not isinstance(summary, dict):
        raise ConfigError(str(sp), "not a summary (a JSON object of metrics expected)")
    from agentsim.metrics import upgrade_summary

    summary = upgrade_summary(summary)  # results written before units were in the key names
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

        tables = {}
        for name in ("calls", "programs", "engines"):
            f = p / f"{name}.parquet"
            try:
                tables[name] = pd.read_parquet(f)
            except Exception as e:  # noqa: BLE001 - a missing or corrupt table is the directory's fault
                raise ConfigError(str(f), f"cannot read the table ({type(e).__name__}: {e})"[:300]) from None
        calls, programs, engines = tables["calls"], tables["programs"], tables["engines"]
        duration = summary.get("duration_s")
        try:
            duration = float(duration or 0.0)
        except (TypeError, ValueError):
            duration = math.nan
        if not (math.isfinite(duration) and duration >= 0) or isinstance(summary.get("duration_s"), bool):
            raise ConfigError(f"{sp}: duration_s", f"must be a number of seconds >= 0, got {summary.get('duration_s')!r}")
        full = summarize(calls, programs, engines, duration)
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


def _what_ran(run: dict) -> dict[str, Any]:
    """Cluster, model and workload of a run, from its manifest (what a comparison must hold equal)."""
    m = run["manifest"]
    cfg = m.get("config") or {}
    cl = dict(cfg.get("cluster") or {})
    out: dict[str, Any] = {}
    if cl:
        # a live run's engines are on Ray nodes whatever the simulator's GPU kind says
        out["cluster"] = {k: cl.get(k) for k in ("num_nodes", "engines_per_node", "tp")}
        out["engine limits"] = {k: v for k, v in (cl.get("engine") or {}).items()
                                if k in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                                         "enable_prefix_caching", "enable_chunked_prefill")}
    if m.get("live_model"):
        out["model"] = Path(str(m["live_model"])).name  # the model directory (or id) vLLM served
    elif cl.get("model") is not None:
        out["model"] = _sim_model(m, cl)
    if cfg.get("workload") is not None:
        out["workload"] = cfg.get("workload")
    if "duration" in cfg:
        out["duration"] = cfg["duration"]
    if isinstance(cfg.get("sim"), dict) and "drain" in cfg["sim"]:
        out["drain"] = cfg["sim"]["drain"]
    return out


def _sim_model(m: dict, cl: dict) -> str:
    """The model a simulated run modelled: its profile's model (``--profile`` may name another
    model than ``cluster.model``), else ``cluster.model``."""
    prof = m.get("profile") or {}
    if prof.get("model"):
        return str(prof["model"])  # recorded by the run itself
    spec = prof.get("source") or prof.get("name")
    if spec:  # a manifest written before the model was recorded: read the profile it names
        from agentsim.calibration.profile import resolve_profile
        from agentsim.errors import AgentsimError

        try:
            return resolve_profile(str(spec), str(cl.get("gpu")), str(cl.get("model")), int(cl.get("tp") or 1)).model.name
        except (AgentsimError, OSError, ValueError):  # the profile file moved since the run
            pass
    return str(cl.get("model"))


def mismatches(ra: dict, rb: dict) -> list[str]:
    """One line per aspect in which run B did not run what run A ran (cluster, model, workload ...).

    Each run's ``manifest.json`` ``config`` (and ``live_model`` for a live run) is compared; an aspect
    a manifest does not record is not compared. A sim run and a live run of the same config differ
    only in their backend and policy, which a comparison is for.
    """
    wa, wb = _what_ran(ra), _what_ran(rb)
    out = []
    for k in wa:
        if k in wb and wa[k] != wb[k]:
            if isinstance(wa[k], dict) and isinstance(wb[k], dict):
                diff = sorted(x for x in set(wa[k]) | set(wb[k]) if wa[k].get(x) != wb[k].get(x))
                what = ", ".join(f"{x}: {wa[k].get(x)!r} vs {wb[k].get(x)!r}" for x in diff[:4])
                more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
                out.append(f"the runs differ in {k}: {what}{more}")
            else:
                out.append(f"the runs differ in {k}: {wa[k]!r} vs {wb[k]!r}")
    return out


def fmt_value(v: float, unit: str) -> str:
    """A value in its row's unit with readable precision (:func:`agentsim.metrics.format_value`)."""
    from agentsim.metrics import format_value

    return format_value(v, unit)


def fmt_rel(r: float) -> str:
    return "-" if r != r else f"{r * 100:+.1f}%"


def print_comparison(a: str | Path, b: str | Path, keys: list[str] | None = None, as_json: bool = False) -> pd.DataFrame:
    """Print the comparison (a rich table, or JSON with ``as_json``); return it.

    Warnings (on stderr, and as ``warnings`` in the JSON) name every way the two runs differ in
    cluster, model or workload (:func:`mismatches`): then the difference is not the policy's or
    the backend's alone.
    """
    df = compare_runs(a, b, keys)
    ra, rb = load_run(a), load_run(b)
    warn = mismatches(ra, rb)
    if as_json:
        print(json.dumps({"a": {"path": ra["path"], "run": describe(ra)}, "b": {"path": rb["path"], "run": describe(rb)},
                          "warnings": warn,
                          "metrics": [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
                                      for r in df.to_dict("records")]}, indent=2))
        for w in warn:
            print(f"warning: {w}", file=sys.stderr)
        return df
    from rich.table import Table

    from agentsim.commands import make_console

    t = Table(title=f"A = {ra['path']} ({describe(ra)})\nB = {rb['path']} ({describe(rb)})")
    t.add_column("metric")
    t.add_column("unit")
    t.add_column("A", justify="right")
    t.add_column("B", justify="right")
    t.add_column("B - A", justify="right")
    t.add_column("(B - A) / A", justify="right")
    for r in df.itertuples():
        t.add_row(r.label, r.unit if r.unit not in ("n", "%") else "", fmt_value(r.a, r.unit), fmt_value(r.b, r.unit),
                  fmt_value(r.diff, r.unit), fmt_rel(r.rel_diff))
    make_console().print(t)
    for w in warn:
        make_console(stderr=True).print(f"warning: {w}", markup=False, highlight=False)
    return df

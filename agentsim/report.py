"""``agentsim report DIR``: one self-contained HTML file (or markdown + PNGs) describing a run, a sweep
or a study directory.

What a report holds, for every kind of directory:

- a **title** naming what ran (the generator, policy and cluster of a run; the spec and grid of a
  sweep; the study's name), the directory, and the **command that reproduces it**;
- a **headline table** with units in the metric names (the keys of
  :data:`agentsim.metrics.SUMMARY_KEYS`, named like ``vllm bench serve``'s: ``mean_ttft_ms``, ...);
- **figures** drawn with matplotlib (Agg backend, PNG): for a run the TTFT / TPOT / E2E / program
  latency distributions as CDFs, the engines' KV-cache usage and queues over time and the token
  throughput over time; for a sweep each headline metric against the swept key; for a study the
  PNGs the study wrote (listed in its ``study.json``, written by ``agentsim study``:
  :mod:`agentsim.experiments.study_cli`) plus its tables, its findings and its failed cells;
- the **config and provenance** of every run (its ``manifest.json``: seed, policy, profile,
  versions, git revision, and the run config as TOML that ``agentsim simulate -c`` reads back) in
  collapsible ``<details>``.

HTML output is one file: CSS inline, figures as ``data:image/png;base64`` URIs, no script, no
external reference of any kind (the page reads the same offline). Every piece of text taken from the
directory is escaped (:func:`html.escape`). Tables longer than :data:`MAX_TABLE_ROWS` rows and runs
beyond :data:`MAX_PROVENANCE` are cut, with a note saying how many were left out.

Markdown output (``--format md``) writes ``NAME.md`` and its figures as PNG files in ``NAME_files/``
beside it (the layout ``jupyter nbconvert --to markdown`` uses), linked relatively, for READMEs.

A report of the same directory is byte-for-byte the same each time (no timestamps; matplotlib's PNG
writer stores no date).

Output rules (:mod:`agentsim.outputs`): the default output is ``DIR/report.html`` (``DIR/report.md``),
which agentsim's output checks accept inside a result, sweep or study directory
(:data:`agentsim.outputs.REPORT_ENTRIES`); an existing output file
(or figure folder) is refused without ``--force``, a directory or symbolic link always. Files are
written beside their destination and renamed into place, so an interrupted report leaves nothing
half-written.

Errors: :class:`~agentsim.errors.ConfigError` (one line, exit 2) for a directory that is not a run,
sweep or study, a malformed ``study.json`` / ``sweep.json`` / ``manifest.json``, or a file a
``study.json`` names that is missing or outside the directory; :class:`~agentsim.outputs.OutputError`
for an output path that would be overwritten.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
import os
import shlex
import shutil
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import typer

from agentsim.errors import ConfigError

#: rows shown of any table (the rest are counted in a note)
MAX_TABLE_ROWS = 60
#: runs whose provenance is shown one by one (the rest are counted in a note)
MAX_PROVENANCE = 40
#: series drawn in one sweep figure (the rest are counted in a note)
MAX_SERIES = 10
#: engines drawn one line each in the engine figure; more are drawn as their mean and min-max band
MAX_ENGINE_LINES = 8
#: points of a drawn CDF (quantiles of the data at evenly spaced probabilities)
CDF_POINTS = 1000

#: summary metrics a sweep report tabulates and plots against the swept key (those present)
SWEEP_METRICS = ("mean_ttft_ms", "p95_ttft_ms", "mean_tpot_ms", "p95_e2el_ms", "p95_program_latency_s",
                 "output_throughput", "request_throughput", "num_preemptions")
#: the latency families of a run's headline table: (name with unit, summary key pattern)
LATENCY_ROWS = (("ttft_ms", "{}_ttft_ms"), ("tpot_ms", "{}_tpot_ms"), ("e2el_ms", "{}_e2el_ms"),
                ("queue_time_ms", "{}_queue_time_ms"), ("program_latency_s", "{}_program_latency_s"),
                ("program_token_latency_ms", "{}_program_token_latency_ms"))
STATS = ("mean", "median", "p95", "p99")

HTML, MD = "html", "md"
FORMATS = (HTML, MD)
RUN, SWEEP, STUDY = "run", "sweep", "study"


# --------------------------------------------------------------------------------------------- model

@dataclass
class Figure:
    """One PNG figure: ``name`` (a file-name stem, ``[a-z0-9_]``), ``caption`` and the PNG bytes."""

    name: str
    caption: str
    png: bytes


@dataclass
class Table:
    """A table to show: ``columns`` and string ``rows`` (already formatted); ``note`` under it."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Provenance:
    """One run's provenance: ``fields`` (label -> text) and its run config as TOML (or None)."""

    label: str
    fields: dict[str, str]
    config_toml: Optional[str] = None
    command: Optional[str] = None


@dataclass
class Report:
    """Everything a report shows, independent of the output format."""

    kind: str
    title: str
    directory: str
    command: str
    command_note: str = ""
    facts: dict[str, str] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    provenance: list[Provenance] = field(default_factory=list)
    provenance_note: str = ""
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- input

def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(str(path), f"cannot read {what} ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), f"malformed JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ConfigError(str(path), f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def detect_kind(directory: str | Path) -> str:
    """``"study"`` (``study.json`` of kind ``agentsim-study``), ``"sweep"`` (``sweep.json``) or ``"run"``
    (``manifest.json`` and ``summary.json``) for ``directory``.

    Raises ConfigError naming the path for a missing path, a file, or a directory that is none of them.
    """
    d = Path(directory)
    if not d.exists():
        raise ConfigError(str(d), "no such directory")
    if not d.is_dir():
        raise ConfigError(str(d), "is a file; give a run, sweep or study directory")
    if (d / "study.json").is_file():
        return STUDY
    if (d / "sweep.json").is_file():
        return SWEEP
    if (d / "manifest.json").is_file() and (d / "summary.json").is_file():
        return RUN
    raise ConfigError(str(d), "not an agentsim run, sweep or study directory (no manifest.json + summary.json, "
                              "sweep.json or study.json in it)")


# --------------------------------------------------------------------------------------------- formatting

def _unit_of(key: str) -> str:
    from agentsim.metrics import SUMMARY_KEYS

    for k, unit, _ in SUMMARY_KEYS:
        if k == key:
            return unit
    return ""


def fmt(v: Any, key: str = "") -> str:
    """A value for a table: numbers by :func:`agentsim.metrics.format_value` (fractions as %, counts
    without decimals, per the summary key's unit); anything else as text."""
    from agentsim.metrics import format_value

    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v)).lower()
    if isinstance(v, (int, float, np.integer, np.floating)):
        unit = _unit_of(key)
        if isinstance(v, (int, np.integer)) and unit != "fraction":
            return f"{int(v):,}"
        kind = "%" if unit == "fraction" else "n" if unit in ("calls", "programs", "tokens", "preemptions") else ""
        return format_value(float(v), kind)
    return str(v)


def _toml_key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    return json.dumps(str(v))


def config_toml(config: dict) -> str:
    """A run config dict (a manifest's ``config``, :meth:`RunConfig.to_dict`) as TOML that
    :func:`agentsim.config.load_config` reads back to the same config (None fields are left out: their
    default is None; ``duration`` is left out when the run replayed a trace whole). The TOML is parsed
    back with :mod:`tomllib` here and a difference raises ``ValueError`` (never a wrong command)."""
    import tomllib

    cfg = json.loads(json.dumps(config))
    if cfg.get("duration_given") is False:
        cfg.pop("duration", None)
    cfg.pop("duration_given", None)
    lines: list[str] = []

    def scalars(d: dict) -> list[str]:
        return [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in d.items()
                if v is not None and not isinstance(v, dict) and not _is_table_list(v)]

    def emit(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                name = f"{prefix}{_toml_key(k)}"
                lines.append("")
                lines.append(f"[{name}]")
                lines.extend(scalars(v))
                emit(v, name + ".")
            elif _is_table_list(v):
                name = f"{prefix}{_toml_key(k)}"
                for item in v:
                    lines.append("")
                    lines.append(f"[[{name}]]")
                    lines.extend(f"{_toml_key(a)} = {_toml_value(b)}" for a, b in item.items() if b is not None)

    lines.extend(scalars(cfg))
    emit(cfg, "")
    text = "\n".join(lines).strip() + "\n"
    if _strip_none(tomllib.loads(text)) != _strip_none(cfg):
        raise ValueError("config_toml: the TOML does not read back to the config")
    return text


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _strip_none(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _strip_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_strip_none(x) for x in v if x is not None]
    return v


def _versions(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {x}" for k, x in sorted(v.items()))
    return "-" if v is None else str(v)


def _df_table(title: str, df: pd.DataFrame, note: str = "") -> Table:
    """``df`` as a :class:`Table` of at most :data:`MAX_TABLE_ROWS` rows (a note counts the rest)."""
    n = len(df)
    shown = df.head(MAX_TABLE_ROWS)
    rows = [[fmt(None if _isnan(v) else v, str(c)) for c, v in zip(shown.columns, r)]
            for r in shown.itertuples(index=False, name=None)]
    notes = [note] if note else []
    if n > MAX_TABLE_ROWS:
        notes.append(f"first {MAX_TABLE_ROWS} of {n:,} rows shown")
    return Table(title, [str(c) for c in df.columns], rows, "; ".join(notes))


def _isnan(v: Any) -> bool:
    return isinstance(v, (float, np.floating)) and math.isnan(v)


# --------------------------------------------------------------------------------------------- figures

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return buf.getvalue()


def _cdf(ax, values: np.ndarray, label: str, unit: str) -> None:
    v = values[np.isfinite(values)]
    if len(v) == 0:
        ax.text(0.5, 0.5, "no finished calls", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label)
        return
    p = np.linspace(0.0, 1.0, min(CDF_POINTS, len(v)))
    x = np.quantile(v, p)
    ax.step(x, p, where="post", color="#1f5f8b", lw=1.6)
    for q, ls in ((0.5, ":"), (0.95, "--")):
        xv = float(np.quantile(v, q))
        ax.axvline(xv, color="#b5452b", ls=ls, lw=1)
        ax.annotate(f"p{int(q * 100)} {fmt(xv)}", (xv, q), textcoords="offset points", xytext=(4, -12),
                    fontsize=8, color="#b5452b")
    if v.min() > 0 and v.max() / v.min() > 100:
        ax.set_xscale("log")
    ax.set_xlabel(unit)
    ax.set_ylabel("fraction ≤ x")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{label} (n = {len(v):,})")
    ax.grid(alpha=0.3)


def run_figures(d: Path, manifest: dict) -> tuple[list[Figure], list[str]]:
    """The figures of a run directory ``d`` and notes for those that could not be drawn.

    - ``latency_cdf``: CDFs of TTFT, TPOT, E2E latency (ms, finished calls of ``calls.parquet``) and
      program latency (s, finished programs), p50 and p95 marked (numpy's linear quantiles);
    - ``engines_over_time``: KV-cache usage (%) and running / waiting sequences per sample of
      ``engines.parquet`` (vLLM's ``vllm:gpu_cache_usage_perc``, ``num_requests_running`` /
      ``num_requests_waiting``);
    - ``throughput_over_time``: prefill and decode tokens per second over all engines (each sample's
      token counts cover the interval since the engine's previous sample) and finished calls per second.
    """
    plt = _plt()
    figs: list[Figure] = []
    notes: list[str] = []
    calls = _read_parquet(d / "calls.parquet", ["ttft", "tpot", "e2e", "status", "finish_at"])
    progs = _read_parquet(d / "programs.parquet", ["latency", "status"])
    eng = _read_parquet(d / "engines.parquet", ["engine_id", "time", "kv_usage", "num_running", "num_waiting",
                                                 "num_prefill_tokens", "num_decode_tokens"])
    if calls is not None and progs is not None:
        done = calls[calls["status"] == "finished"]
        pdone = progs[progs["status"] == "finished"]
        fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
        _cdf(axes[0, 0], done["ttft"].to_numpy(float) * 1e3, "TTFT", "ms")
        _cdf(axes[0, 1], done["tpot"].to_numpy(float) * 1e3, "TPOT", "ms")
        _cdf(axes[1, 0], done["e2e"].to_numpy(float) * 1e3, "E2E latency", "ms")
        _cdf(axes[1, 1], pdone["latency"].to_numpy(float), "program latency", "s")
        fig.tight_layout()
        figs.append(Figure("latency_cdf", "Latency distributions (CDF) of finished calls and programs; "
                                          "dotted p50, dashed p95.", _png(fig)))
    else:
        notes.append("calls.parquet or programs.parquet missing: no latency figure")
    if eng is not None and len(eng):
        eng = eng.sort_values(["time", "engine_id"], kind="stable")
        ids = sorted(eng["engine_id"].unique())
        by_t = eng.groupby("time", sort=True)
        t = by_t.size().index.to_numpy(float)
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 6.4), sharex=True)
        if len(ids) <= MAX_ENGINE_LINES:
            for e in ids:
                s = eng[eng["engine_id"] == e]
                a1.plot(s["time"], s["kv_usage"] * 100, lw=1.2, label=f"engine {e}")
            a1.legend(fontsize=8, ncol=4, loc="upper left")
        else:
            kv = by_t["kv_usage"]
            a1.fill_between(t, kv.min() * 100, kv.max() * 100, color="#1f5f8b", alpha=0.2, label="min-max")
            a1.plot(t, kv.mean() * 100, color="#1f5f8b", lw=1.4, label=f"mean of {len(ids)} engines")
            a1.legend(fontsize=8, loc="upper left")
        a1.set_ylabel("KV-cache usage (%)")
        a1.set_title("Engines over time")
        a1.grid(alpha=0.3)
        a2.plot(t, by_t["num_running"].sum(), label="running", color="#2b7a3d", lw=1.3)
        a2.plot(t, by_t["num_waiting"].sum(), label="waiting", color="#b5452b", lw=1.3)
        a2.set_ylabel(f"sequences (all {len(ids)} engines)")
        a2.set_xlabel("time (s)")
        a2.legend(fontsize=8, loc="upper left")
        a2.grid(alpha=0.3)
        fig.tight_layout()
        figs.append(Figure("engines_over_time", "KV-cache usage per engine and running / waiting sequences "
                                                "over time (engine samples).", _png(fig)))
        dt = np.diff(np.concatenate([[0.0], t]))
        dt[dt <= 0] = np.nan
        fig, (b1, b2) = plt.subplots(2, 1, figsize=(10, 5.6), sharex=True)
        b1.plot(t, by_t["num_decode_tokens"].sum().to_numpy(float) / dt, label="decode (output) tokens/s",
                color="#1f5f8b", lw=1.3)
        b1.plot(t, by_t["num_prefill_tokens"].sum().to_numpy(float) / dt, label="prefill tokens/s",
                color="#8b6d1f", lw=1.1, alpha=0.8)
        b1.set_ylabel("tokens/s")
        b1.set_title("Throughput over time (all engines)")
        b1.legend(fontsize=8, loc="upper left")
        b1.grid(alpha=0.3)
        if calls is not None:
            fin = calls.loc[calls["status"] == "finished", "finish_at"].to_numpy(float)
            edges = np.concatenate([[0.0], t])
            counts, _ = np.histogram(fin, bins=edges)
            b2.plot(t, counts / np.diff(edges), color="#2b7a3d", lw=1.3)
        b2.set_ylabel("finished calls/s")
        b2.set_xlabel("time (s)")
        b2.grid(alpha=0.3)
        fig.tight_layout()
        figs.append(Figure("throughput_over_time", "Prefill and decode tokens per second and finished calls per "
                                                   "second over time.", _png(fig)))
    else:
        notes.append("engines.parquet missing or empty (no engine samples): no engine or throughput figure")
    return figs, notes


def _read_parquet(p: Path, columns: list[str]) -> Optional[pd.DataFrame]:
    if not p.is_file():
        return None
    import pyarrow.parquet as pq

    try:
        have = set(pq.read_schema(p).names)
        return pd.read_parquet(p, columns=[c for c in columns if c in have]).reindex(columns=columns)
    except Exception as e:  # noqa: BLE001 - a damaged table is bad input, named
        raise ConfigError(str(p), f"cannot read the Parquet table ({type(e).__name__}: {e})") from None


def _numeric(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)


def sweep_figures(table: pd.DataFrame, grid_keys: list[str]) -> tuple[list[Figure], list[str]]:
    """One figure ``metrics_vs_<key>``: each of :data:`SWEEP_METRICS` present against the swept key
    ``x`` (the numeric grid key with the most values, else the first varying key, drawn as categories),
    one line per combination of the other varying keys; cells differing only in ``seed`` are averaged
    (the bars span their min-max)."""
    plt = _plt()
    varying = [k for k in grid_keys if k in table and table[k].nunique(dropna=False) > 1]
    cand = [k for k in varying if k != "seed"] or varying
    if not cand or not len(table):
        return [], ["the grid varies no key with more than one value: no sweep figure"]
    numeric = [k for k in cand if _numeric(table[k])]
    x = max(numeric, key=lambda k: table[k].nunique()) if numeric else cand[0]
    series_keys = [k for k in cand if k != x]
    metrics = [m for m in SWEEP_METRICS if m in table and table[m].notna().any()]
    if not metrics:
        return [], ["results hold none of the headline metrics: no sweep figure"]
    notes = []
    groups = list(table.groupby(series_keys, sort=False, dropna=False)) if series_keys else [((), table)]
    if len(groups) > MAX_SERIES:
        notes.append(f"sweep figure: first {MAX_SERIES} of {len(groups)} series drawn")
        groups = groups[:MAX_SERIES]
    xcat = not _numeric(table[x])
    xorder = list(dict.fromkeys(table[x].astype(str))) if xcat else None
    ncols = 3 if len(metrics) > 4 else 2 if len(metrics) > 1 else 1
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows + 0.6), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        for gi, (gkey, g) in enumerate(groups):
            gkey = gkey if isinstance(gkey, tuple) else (gkey,)
            label = ", ".join(f"{k}={_val(v)}" for k, v in zip(series_keys, gkey)) or m
            xs = g[x].astype(str) if xcat else g[x]
            agg = g[m].groupby(xs, sort=not xcat).agg(["mean", "min", "max"])
            if xcat:
                agg = agg.reindex([v for v in xorder if v in agg.index])
                # series side by side around each category (0.08 of a category apart)
                pos = np.array([xorder.index(v) for v in agg.index], float) + (gi - (len(groups) - 1) / 2) * 0.08
            else:
                pos = agg.index.to_numpy(float)
            yerr = np.vstack([agg["mean"] - agg["min"], agg["max"] - agg["mean"]])
            ax.errorbar(pos, agg["mean"], yerr=yerr if np.nanmax(yerr, initial=0) > 0 else None, marker="o",
                        ms=6 if xcat else 4, lw=1.3, ls="none" if xcat else "-", capsize=3, label=label)
        if xcat:
            ax.set_xticks(range(len(xorder)), xorder, rotation=20, ha="right", fontsize=8)
        unit = _unit_of(m)
        ax.set_title(f"{m} ({unit})" if unit and not m.endswith(f"_{unit}") else m, fontsize=10)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    if series_keys:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        rows = math.ceil(len(labels) / 4)
        fig.legend(handles, labels, loc="upper center", ncol=min(4, len(labels)), fontsize=9,
                   bbox_to_anchor=(0.5, 1.0), frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 1 - (0.035 + 0.03 * rows) / max(1, nrows / 2)))
    else:
        fig.tight_layout()
    seeded = "seed" in varying and x != "seed"
    caption = (f"Headline metrics against {x}" + (f", one line per {', '.join(series_keys)}" if series_keys else "")
               + ("; the mean over seeds, bars span min-max" if seeded else "") + ".")
    safe = "".join(c if c.isalnum() else "_" for c in x.lower())
    return [Figure(f"metrics_vs_{safe}", caption, _png(fig))], notes


# --------------------------------------------------------------------------------------------- builders

def _run_title(manifest: dict) -> str:
    cfg = manifest.get("config") or {}
    cl = cfg.get("cluster") or {}
    wl = cfg.get("workload") or {}
    backend = manifest.get("backend", "sim")
    what = "simulated" if backend == "sim" else f"{backend}"
    mix = wl.get("mix") or []
    gen = (f"mix of {' + '.join(str(m.get('generator', '?')) for m in mix if isinstance(m, dict))}" if mix
           else str(wl.get("generator", "?")))
    wl_text = (f"trace {Path(str(wl.get('trace'))).name}" if wl.get("arrival") == "trace"
               else f"{wl.get('agents', '?')} agents ({gen})" if wl.get("arrival") == "closed"
               else f"{gen} programs, {wl.get('arrival', '?')} arrivals")
    nodes = cl.get("num_nodes", "?")
    return (f"Run ({what}): {wl_text}, policy {manifest.get('policy', cfg.get('policy', '?'))}, "
            f"{nodes} node{'' if nodes == 1 else 's'} × {cl.get('gpus_per_node', '?')} {cl.get('gpu', '?')}, "
            f"{cl.get('model', '?')}")


def _provenance(label: str, manifest: dict, directory: Path, with_command: bool) -> Provenance:
    prof = manifest.get("profile")
    profile = prof.get("name", "?") if isinstance(prof, dict) else str(prof) if prof is not None else "-"
    fields = {}
    if isinstance(manifest.get("cell"), dict):
        fields["cell"] = ", ".join(f"{k}={_val(v)}" for k, v in manifest["cell"].items())
    fields.update({
        "backend": str(manifest.get("backend", "-")),
        "seed": str(manifest.get("seed", (manifest.get("config") or {}).get("seed", "-"))),
        "policy": str(manifest.get("policy", "-")),
        "profile": profile,
        "complete": str(manifest.get("complete", "-")).lower(),
        "versions": _versions(manifest.get("versions")),
        "git revision": str(manifest.get("git_revision") or "-"),
        "directory": str(directory),
    })
    stats = manifest.get("stats")
    if isinstance(stats, dict) and "wall_time_s" in stats:
        fields["wall time"] = f"{fmt(stats['wall_time_s'])} s"
    live = manifest.get("backend") == "live"
    if live:
        for key, name in (("cluster", "cluster"), ("live_model", "model"), ("gpu", "GPUs"), ("status", "status"),
                          ("load_format", "load format"), ("dtype", "dtype"), ("created_at", "created at")):
            if manifest.get(key) is not None:
                fields[name] = str(manifest[key])
        if isinstance(manifest.get("wall_time_s"), (int, float)):
            fields["wall time"] = f"{fmt(manifest['wall_time_s'])} s"
        if manifest.get("errors"):
            fields["errors"] = "; ".join(map(str, manifest["errors"][:5]))
        if isinstance(manifest.get("live_options"), dict):
            fields["live options"] = json.dumps(manifest["live_options"], sort_keys=True, default=str)
    toml = cmd = None
    if isinstance(manifest.get("config"), dict):
        try:
            toml = config_toml(manifest["config"])
        except ValueError:
            toml = None
        if with_command and toml is not None:
            cmd = (_live_command(manifest, directory) if live
                   else f"agentsim simulate -c config.toml -o {shlex.quote(str(directory))}")
    return Provenance(label, fields, toml, cmd)


def _live_command(manifest: dict, directory: Path) -> str:
    """``agentsim live`` with the config and what a live manifest records of the CLI: where it ran
    (``cluster``: an embedded N-node Ray cluster, a Ray address or vLLM endpoints), the model, its
    load format and dtype, and the driver options that have flags (``live_options``)."""
    import re

    args = ["agentsim", "live", "-c", "config.toml"]
    where = str(manifest.get("cluster") or "")
    m = re.fullmatch(r"local (\d+)-node Ray cluster", where)
    if m:
        args += ["--local-nodes", m.group(1)]
    elif where.startswith("Ray cluster "):
        args += ["--address", where[len("Ray cluster "):]]
    elif where.startswith("endpoints "):
        args += ["--endpoints", where[len("endpoints "):]]
    for key, flag in (("live_model", "--model"), ("load_format", "--load-format"), ("dtype", "--dtype")):
        if manifest.get(key) is not None:
            args += [flag, str(manifest[key])]
    opts = manifest.get("live_options") if isinstance(manifest.get("live_options"), dict) else {}
    if opts.get("drain_timeout") is not None:
        args += ["--drain-timeout", str(opts["drain_timeout"])]
    for key, flag in (("sample_interval", "--sample-interval"), ("flush_interval", "--flush-interval")):
        if opts.get(key) is not None:
            args += [flag, str(opts[key])]
    for kill in opts.get("kill_engines") or []:
        if isinstance(kill, (list, tuple)) and len(kill) == 2:
            args += ["--kill-engine", f"{kill[0]}@{kill[1]}"]
    return shlex.join(args + ["-o", str(directory)])


def build_run(d: Path) -> Report:
    """The report of a run directory (``simulate -o`` / ``live -o``)."""
    from agentsim.metrics import SUMMARY_KEYS, upgrade_summary

    manifest = _read_json(d / "manifest.json", "manifest")
    summary = upgrade_summary(_read_json(d / "summary.json", "summary"))
    prov = _provenance("this run", manifest, d, with_command=True)
    live = manifest.get("backend") == "live"
    rep = Report(RUN, _run_title(manifest), str(d),
                 prov.command or "(the manifest holds no run config)",
                 ("with config.toml as under Provenance (the run config this run used)"
                  + ("; a live run's engine settings not in its manifest (e.g. --kv-cache-gib) take their "
                     "defaults, and live timings vary from run to run" if live else "")) if prov.command else "")
    rep.facts = {"seed": prov.fields["seed"], "policy": prov.fields["policy"], "profile": prov.fields["profile"],
                 "complete": prov.fields["complete"], "duration_s": fmt(summary.get("duration_s"), "duration_s")}
    lat_rows = []
    for name, pat in LATENCY_ROWS:
        vals = [summary.get(pat.format(s)) for s in STATS]
        if any(v is not None for v in vals):
            lat_rows.append([name, *(fmt(v, pat.format(s)) if v is not None else "-" for s, v in zip(STATS, vals))])
    rep.tables.append(Table("Latency (finished calls and programs)", ["metric", *STATS], lat_rows,
                            "summary.json key = STAT_METRIC, e.g. mean_ttft_ms, p95_program_latency_s"))
    lat_keys = {pat.format(s) for _, pat in LATENCY_ROWS for s in STATS}
    other = [[k, fmt(summary[k], k), unit, meaning] for k, unit, meaning in SUMMARY_KEYS
             if k in summary and k not in lat_keys]
    known = {k for k, _, _ in SUMMARY_KEYS}
    other += [[k, fmt(v, k), "", ""] for k, v in sorted(summary.items()) if k not in known]
    rep.tables.append(Table("Throughput, counts and cache", ["key", "value", "unit", "meaning"], other))
    kinds = _program_kinds(d / "programs.parquet")
    if kinds is not None:
        rep.tables.append(kinds)
    rep.figures, rep.notes = run_figures(d, manifest)
    if manifest.get("complete") is False:
        rep.notes.insert(0, f"this run is incomplete (status {manifest.get('status', 'unknown')}): its tables hold the "
                            "results written so far")
    rep.provenance = [prov]
    return rep


def _program_kinds(path: Path) -> Optional[Table]:
    """Programs by kind (a mix of generators): finished / unfinished counts, mean and p95 program latency
    (s, finished programs, numpy's linear percentile as :func:`agentsim.metrics.summarize`) and mean
    LLM calls per finished program. None for a run with one kind."""
    progs = _read_parquet(path, ["kind", "status", "latency", "num_calls"])
    if progs is None or progs["kind"].nunique() < 2:
        return None
    rows = []
    for kind, g in progs.groupby("kind", sort=True):
        done = g[g["status"] == "finished"]
        lat = done["latency"].to_numpy(float)
        rows.append([str(kind), f"{len(done):,}", f"{len(g) - len(done):,}",
                     fmt(float(lat.mean()) if len(lat) else None),
                     fmt(float(np.percentile(lat, 95)) if len(lat) else None),
                     fmt(float(done["num_calls"].mean()) if len(done) else None)])
    return Table("Programs by kind", ["kind", "finished", "unfinished", "mean_program_latency_s",
                                      "p95_program_latency_s", "mean_calls_per_program"], rows)


def _cell_manifests(cells: Path) -> list[tuple[Path, dict]]:
    """(cell directory, manifest) of every run directory under ``cells`` (any depth): the cells of one
    sweep together, in its grid's order (``SWEEP/cells/<id>`` beside ``SWEEP/sweep.json``), the rest by path."""
    out = []
    if not cells.is_dir():
        return out
    for m in sorted(cells.rglob("manifest.json")):
        try:
            obj = json.loads(m.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict):
            out.append((m.parent, obj))
    orders: dict[Path, dict[str, int]] = {}

    def grid_order(sweep: Path) -> dict[str, int]:
        if sweep not in orders:
            orders[sweep] = {}
            try:
                grid = json.loads((sweep / "sweep.json").read_text()).get("grid")
            except (OSError, ValueError, UnicodeDecodeError, AttributeError):
                grid = None
            if isinstance(grid, dict) and grid and all(isinstance(v, list) for v in grid.values()):
                orders[sweep] = {_cell_sort_key(_grid_cell(grid, vals)): i
                                 for i, vals in enumerate(itertools.product(*grid.values()))}
        return orders[sweep]

    def key(cm: tuple[Path, dict]) -> tuple:
        sweep = cm[0].parent.parent
        order = grid_order(sweep) if (sweep / "sweep.json").is_file() else {}
        return (str(sweep), order.get(_cell_sort_key(cm[1].get("cell")), len(order)), str(cm[0]))

    return sorted(out, key=key)


def _add_cell_provenance(rep: Report, cells: list[tuple[Path, dict]], base: Path, keys: list[str] = ()) -> None:
    """Provenance of each run (the first :data:`MAX_PROVENANCE`), labelled with its path and its grid
    values (in the order of ``keys``, then the rest); the shared git revision and versions as facts."""
    shown = cells[:MAX_PROVENANCE]
    rep.provenance = []
    for c, m in shown:
        label = str(c.relative_to(base))
        cell = m.get("cell")
        if isinstance(cell, dict):
            ordered = [k for k in keys if k in cell] + [k for k in cell if k not in keys]
            label += ": " + ", ".join(f"{k}={_val(cell[k])}" for k in ordered)
        rep.provenance.append(_provenance(label, m, c, with_command=False))
    if len(cells) > len(shown):
        rep.provenance_note = f"first {len(shown)} of {len(cells)} runs shown; the rest are in their manifest.json"
    revs = {str(m.get("git_revision")) for _, m in cells}
    vers = {_versions(m.get("versions")) for _, m in cells}
    if len(revs) == 1:
        rep.facts["git revision"] = revs.pop()
    elif revs:
        rep.facts["git revision"] = f"{len(revs)} different revisions (see Provenance)"
    if len(vers) == 1:
        rep.facts["versions"] = vers.pop()


def build_sweep(d: Path) -> Report:
    """The report of a sweep directory (``agentsim sweep``): ``sweep.json``, ``results.parquet`` (or,
    for an unfinished sweep, the finished cells' ``summary.json``) and every cell's manifest."""
    from agentsim.metrics import upgrade_summary

    marker = _read_json(d / "sweep.json", "sweep marker")
    grid = marker.get("grid")
    if not isinstance(grid, dict):
        raise ConfigError(f"{d / 'sweep.json'}: grid", "missing or not an object")
    # a linked grid key "a,b" (experiments/sweep.py) sets the keys a and b together
    keys = [k.strip() for g in grid for k in str(g).split(",")]
    cells = _cell_manifests(d / "cells")
    spec = str(marker.get("spec", "SPEC.toml"))
    notes = []
    if (d / "results.parquet").is_file():
        table = _read_parquet_all(d / "results.parquet")
    else:
        rows = []
        for c, m in cells:
            try:
                s = upgrade_summary(json.loads((c / "summary.json").read_text()))
            except (OSError, ValueError):
                continue
            rows.append({**(m.get("cell") or {}), **s})
        table = pd.DataFrame(rows)
        total = math.prod(len(v) for v in grid.values() if isinstance(v, list)) or len(rows)
        notes.append(f"results.parquet is missing (the sweep did not finish): {len(rows)} of {total} cells found "
                     "in cells/; rerun the sweep to finish it")
    grid_txt = "; ".join(f"{k} ∈ {{{_values_text(v)}}}" for k, v in grid.items() if isinstance(v, list))
    rep = Report(SWEEP, f"Sweep {Path(spec).stem}: {grid_txt}", str(d),
                 f"agentsim sweep {shlex.quote(spec)} -o {shlex.quote(str(d))}",
                 "reruns only missing or stale cells; a sweep run with --set needs the same --set "
                 "(each cell's config is under Provenance)")
    total = math.prod(len(v) for v in grid.values() if isinstance(v, list))
    if (d / "results.parquet").is_file() and len(table) < total:
        notes.append(f"results.parquet holds {len(table)} of the grid's {total} cells (a sweep run with "
                     "keep-going lists the failed ones; rerun it to retry them)")
    rep.facts = {"spec": spec, "cells": f"{len(table)} of {total}",
                 "agentsim": str(marker.get("agentsim", "-"))}
    present = [k for k in keys if k in table]
    for k in present:  # a grid value that is a table or a list (Parquet struct / list) as JSON text
        if table[k].map(lambda v: isinstance(v, (dict, list, np.ndarray))).any():
            table[k] = table[k].map(lambda v: _val(_strip_none(v.tolist() if isinstance(v, np.ndarray) else v)))
    cols = present + [m for m in SWEEP_METRICS if m in table]
    if len(table):
        rep.tables.append(_df_table("Results (one row per cell)", table[cols],
                                    f"{len(table.columns) - len(cols)} more metric columns in results.parquet"
                                    if len(table.columns) > len(cols) else ""))
    figs, fnotes = sweep_figures(table, present)
    rep.figures = figs
    rep.notes = notes + fnotes
    _add_cell_provenance(rep, cells, d, keys)
    return rep


def _grid_cell(grid: dict, values: tuple) -> dict:
    """The cell dict of one combination of grid values (a linked key's list spread over its keys)."""
    cell: dict = {}
    for g, v in zip(grid, values):
        names = [k.strip() for k in str(g).split(",")]
        if len(names) > 1 and isinstance(v, list):
            cell.update(zip(names, v))
        else:
            cell[g] = v
    return cell


def _val(x: Any) -> str:
    """A grid value as text: JSON for a table or a list (a policy given as ``{name, route}``), else str."""
    return json.dumps(x, sort_keys=True, default=str) if isinstance(x, (dict, list)) else str(x)


def _values_text(values: list) -> str:
    """A grid key's values for a title: all of them, or the first 4, "…", the last and the count."""
    v = [_val(x) for x in values]
    return ", ".join(v) if len(v) <= 6 else f"{', '.join(v[:4])}, …, {v[-1]} ({len(v)} values)"


def _cell_sort_key(cell: Any) -> str:
    return json.dumps(cell, sort_keys=True, default=str)


def _read_parquet_all(p: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(p)
    except Exception as e:  # noqa: BLE001 - a damaged table is bad input, named
        raise ConfigError(str(p), f"cannot read the Parquet table ({type(e).__name__}: {e})") from None


def _inside(d: Path, rel: Any, where: str) -> Path:
    if not isinstance(rel, str) or not rel:
        raise ConfigError(where, f"must be a file path relative to the study directory, got {rel!r}")
    p = (d / rel)
    try:
        p.resolve().relative_to(d.resolve())
    except ValueError:
        raise ConfigError(where, f"{rel!r} is outside the study directory") from None
    if not p.is_file():
        raise ConfigError(where, f"no such file: {p}")
    return p


def build_study(d: Path) -> Report:
    """The report of a study directory: ``study.json`` (the study contract: ``study``, ``command``,
    ``tables`` name -> CSV, ``figures`` PNG paths, ``findings``, ``failed``, ``cells_dir``, ``versions``,
    ``git_revision``, ``created_utc``, ``wall_s``), its tables and figures, and the manifests of the
    runs under ``cells_dir``."""
    sj = d / "study.json"
    meta = _read_json(sj, "study.json")
    if meta.get("kind") != "agentsim-study":
        raise ConfigError(f"{sj}: kind", f"must be 'agentsim-study', got {meta.get('kind')!r}")
    name = meta.get("study")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{sj}: study", f"must be the study's name, got {name!r}")
    for k in ("findings", "failed", "figures"):
        v = meta.get(k, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{sj}: {k}", "must be a list of strings")
    tables = meta.get("tables", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{sj}: tables", "must be an object: table name -> CSV file")
    quick = " (quick)" if meta.get("quick") else ""
    cmd = meta.get("command")
    rep = Report(STUDY, f"Study {name}{quick}", str(d),
                 cmd if isinstance(cmd, str) and cmd
                 else f"agentsim study {shlex.quote(name)} -o {shlex.quote(str(d))}",
                 "resumable: finished cells are not re-run")
    rep.facts = {"study": name, "quick": str(bool(meta.get("quick"))).lower(),
                 "created_utc": str(meta.get("created_utc", "-")),
                 "wall_s": fmt(meta["wall_s"]) if isinstance(meta.get("wall_s"), (int, float)) else "-",
                 "versions": _versions(meta.get("versions")),
                 "git revision": str(meta.get("git_revision") or "-")}
    rep.findings = list(meta.get("findings", []))
    rep.failed = list(meta.get("failed", []))
    for tname, rel in tables.items():
        p = _inside(d, rel, f"{sj}: tables.{tname}")
        try:
            df = pd.read_csv(p)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ConfigError(str(p), f"cannot read the CSV table ({e})") from None
        rep.tables.append(_df_table(f"{tname} ({rel})", df))
    for i, rel in enumerate(meta.get("figures", [])):
        p = _inside(d, rel, f"{sj}: figures[{i}]")
        data = p.read_bytes()
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ConfigError(f"{sj}: figures[{i}]", f"{rel} is not a PNG file")
        stem = "".join(c if c.isalnum() else "_" for c in Path(rel).stem.lower())
        rep.figures.append(Figure(f"{i + 1:02d}_{stem}", rel, data))
    cells_dir = meta.get("cells_dir")
    if cells_dir is not None:
        if not isinstance(cells_dir, str):
            raise ConfigError(f"{sj}: cells_dir", f"must be a directory path or null, got {cells_dir!r}")
        cells = _cell_manifests(d / cells_dir)
        if not cells:
            rep.notes.append(f"cells_dir {cells_dir!r} holds no run manifests")
        vers, rev = rep.facts["versions"], rep.facts["git revision"]
        _add_cell_provenance(rep, cells, d)
        rep.facts["versions"], rep.facts["git revision"] = vers, rev
    return rep


BUILDERS = {RUN: build_run, SWEEP: build_sweep, STUDY: build_study}


def build_report(directory: str | Path) -> Report:
    """The :class:`Report` of a run, sweep or study directory (see :func:`detect_kind`)."""
    d = Path(directory)
    return BUILDERS[detect_kind(d)](d)


# --------------------------------------------------------------------------------------------- HTML

CSS = """
:root { --ink:#1d2330; --muted:#5b6475; --line:#d9dee7; --accent:#1f5f8b; --bg:#ffffff; --soft:#f4f6fa; }
* { box-sizing: border-box; }
body { margin:0; background:var(--soft); color:var(--ink);
       font:15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width:1080px; margin:0 auto; padding:28px 28px 60px; background:var(--bg); min-height:100vh;
       box-shadow:0 0 0 1px var(--line); }
h1 { font-size:1.6em; margin:0 0 4px; line-height:1.25; }
h2 { font-size:1.2em; margin:34px 0 10px; padding-bottom:4px; border-bottom:2px solid var(--line); }
h3 { font-size:1em; margin:20px 0 6px; }
.sub { color:var(--muted); margin:0 0 14px; }
nav { margin:10px 0 4px; font-size:.92em; }
nav a { color:var(--accent); text-decoration:none; margin-right:14px; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size:.88em; }
pre { background:var(--soft); border:1px solid var(--line); border-radius:6px; padding:10px 12px;
      overflow-x:auto; white-space:pre-wrap; word-break:break-word; }
table { border-collapse:collapse; margin:6px 0 4px; font-size:.9em; }
th, td { border:1px solid var(--line); padding:4px 9px; text-align:right; vertical-align:top; white-space:nowrap; }
th { background:var(--soft); font-weight:600; }
td:first-child, th:first-child { text-align:left; }
.text { text-align:left; } td.wrap { white-space:normal; min-width:16em; }
tbody tr:nth-child(even) td { background:#fafbfd; }
.scroll { overflow-x:auto; }
.note { color:var(--muted); font-size:.85em; margin:2px 0 12px; }
.callout { background:#fff8e6; border-left:4px solid #d9a21b; padding:6px 10px; margin:8px 0; font-size:.92em; }
.facts { display:grid; grid-template-columns:max-content 1fr; gap:2px 16px; font-size:.92em; margin:8px 0; }
.facts dt { color:var(--muted); } .facts dd { margin:0; word-break:break-word; }
figure { margin:14px 0 22px; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:4px; display:block; }
figcaption { color:var(--muted); font-size:.88em; margin-top:4px; }
ul.findings li { margin:3px 0; }
ul.failed li { color:#9b2d1a; }
details { border:1px solid var(--line); border-radius:6px; margin:6px 0; padding:4px 10px; }
details[open] { padding-bottom:10px; }
summary { cursor:pointer; font-weight:600; }
footer { color:var(--muted); font-size:.8em; margin-top:40px; }
"""


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _html_table(t: Table) -> str:
    numeric = [all(_looks_numeric(r[i]) for r in t.rows if i < len(r)) for i in range(len(t.columns))]
    cls = ["" if numeric[i] or i == 0 else " class=text" for i in range(len(t.columns))]
    wrap = [i for i in range(len(t.columns)) if any(len(r[i]) > 40 for r in t.rows if i < len(r))]
    for i in wrap:
        cls[i] = " class='text wrap'"
    head = "".join(f"<th{cls[i] if 'text' in cls[i] else ''}>{_e(c)}</th>" for i, c in enumerate(t.columns))
    body = "".join("<tr>" + "".join(f"<td{cls[i]}>{_e(v)}</td>" for i, v in enumerate(r)) + "</tr>"
                   for r in t.rows)
    note = f'<p class="note">{_e(t.note)}</p>' if t.note else ""
    return (f"<h3>{_e(t.title)}</h3><div class=scroll><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>{note}")


def _looks_numeric(s: str) -> bool:
    s = s.replace(",", "").rstrip("%")
    if s == "-":
        return True
    try:
        float(s)
        return True
    except ValueError:
        return False


def _facts(d: dict[str, str]) -> str:
    return "<dl class=facts>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in d.items()) + "</dl>"


def render_html(rep: Report) -> str:
    """The report as one self-contained HTML document (UTF-8 text)."""
    from agentsim import __version__

    sections = [("summary", "Summary")]
    if rep.findings or rep.failed:
        sections += [("findings", "Findings"), ("tables", "Tables")]
    if rep.figures:
        sections.append(("figures", "Figures"))
    sections += [("provenance", "Config and provenance"), ("reproduce", "Reproduce")]
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_e(rep.title)}</title><style>{CSS}</style></head><body><main>",
           f"<h1>{_e(rep.title)}</h1>",
           f'<p class="sub">agentsim {_e(rep.kind)} report of <code>{_e(rep.directory)}</code></p>',
           "<nav>" + "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in sections) + "</nav>",
           '<h2 id="summary">Summary</h2>', _facts(rep.facts)]
    out += [f'<p class="callout">{_e(n)}</p>' for n in rep.notes]
    if rep.findings or rep.failed:
        out.append('<h2 id="findings">Findings</h2>')
        if rep.findings:
            out.append("<ul class=findings>" + "".join(f"<li>{_e(f)}</li>" for f in rep.findings) + "</ul>")
        if rep.failed:
            out.append(f"<h3>Failed cells ({len(rep.failed)})</h3><ul class=failed>"
                       + "".join(f"<li>{_e(f)}</li>" for f in rep.failed) + "</ul>")
        out.append('<h2 id="tables">Tables</h2>')
    out += [_html_table(t) for t in rep.tables]
    if rep.figures:
        out.append('<h2 id="figures">Figures</h2>')
        for i, f in enumerate(rep.figures, 1):
            uri = "data:image/png;base64," + base64.b64encode(f.png).decode("ascii")
            out.append(f'<figure id="fig-{_e(f.name)}"><img src="{uri}" alt="{_e(f.caption)}">'
                       f"<figcaption>Figure {i}. {_e(f.caption)}</figcaption></figure>")
    out.append('<h2 id="provenance">Config and provenance</h2>')
    if rep.provenance_note:
        out.append(f'<p class="note">{_e(rep.provenance_note)}</p>')
    if not rep.provenance:
        out.append('<p class="note">no run manifests</p>')
    for p in rep.provenance:
        body = _facts(p.fields)
        if p.config_toml:
            body += f"<h3>config.toml</h3><pre><code>{_e(p.config_toml)}</code></pre>"
        out.append(f"<details{' open' if len(rep.provenance) == 1 else ''}><summary>{_e(p.label)}</summary>"
                   f"{body}</details>")
    out.append('<h2 id="reproduce">Reproduce</h2>')
    out.append(f"<pre><code>{_e(rep.command)}</code></pre>")
    if rep.command_note:
        out.append(f'<p class="note">{_e(rep.command_note)}</p>')
    out.append(f"<footer>Written by <code>agentsim report</code> (agentsim {_e(__version__)}). "
               "Self-contained: figures are embedded, nothing is loaded from elsewhere.</footer>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------- markdown

def _md(s: Any) -> str:
    """Text for a markdown table cell or line: HTML-escaped, pipes and newlines neutralised."""
    return html.escape(str(s), quote=False).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    numeric = [i > 0 and all(_looks_numeric(r[i]) for r in t.rows if i < len(r)) for i in range(len(t.columns))]
    lines = [f"**{_md(t.title)}**", "", "| " + " | ".join(_md(c) for c in t.columns) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_md(v) for v in r) + " |" for r in t.rows]
    if t.note:
        lines += ["", f"*{_md(t.note)}*"]
    return "\n".join(lines) + "\n"


def render_md(rep: Report, figure_dir: str) -> str:
    """The report as markdown; figure ``f`` is linked as ``figure_dir/<f.name>.png`` (relative)."""
    out = [f"# {_md(rep.title)}", "", f"agentsim {rep.kind} report of `{rep.directory}`", ""]
    out += [f"- **{_md(k)}**: {_md(v)}" for k, v in rep.facts.items()] + [""]
    out += [f"> {_md(n)}\n" for n in rep.notes]
    if rep.findings or rep.failed:
        out += ["## Findings", ""] + [f"- {_md(f)}" for f in rep.findings] + [""]
    if rep.failed:
        out += [f"**Failed cells ({len(rep.failed)})**", ""] + [f"- {_md(f)}" for f in rep.failed] + [""]
    if rep.findings or rep.failed:
        out += ["## Tables", ""]
    out += [_md_table(t) for t in rep.tables]
    if rep.figures:
        out += ["## Figures", ""]
        for i, f in enumerate(rep.figures, 1):
            link = urllib.parse.quote(f"{figure_dir}/{f.name}.png")
            out += [f"![{_md(f.caption)}]({link})", "", f"*Figure {i}. {_md(f.caption)}*", ""]
    out += ["## Config and provenance", ""]
    if rep.provenance_note:
        out += [f"*{_md(rep.provenance_note)}*", ""]
    for p in rep.provenance:
        out += [f"<details><summary>{html.escape(p.label)}</summary>", ""]
        out += [f"- **{_md(k)}**: {_md(v)}" for k, v in p.fields.items()]
        if p.config_toml:
            out += ["", "```toml", p.config_toml.rstrip("\n").replace("```", "` ` `"), "```"]
        out += ["", "</details>", ""]
    out += ["## Reproduce", "", "```bash", rep.command, "```", ""]
    if rep.command_note:
        out += [f"*{_md(rep.command_note)}*", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- writing

def figure_dir_for(out: Path) -> Path:
    """Where ``--format md`` puts the figures of ``out``: ``<stem>_files/`` beside it."""
    return out.with_name(out.stem + "_files")


def _check_target(out: Path, fmt_: str, force: bool) -> None:
    from agentsim.outputs import _os_errors, probe_writable

    where = f"--out {out}"
    with _os_errors(where):
        _check_target_path(out, fmt_, force, where)
    probe_writable(out, where)   # before the report is built: a place no file can be made is refused


def _check_target_path(out: Path, fmt_: str, force: bool, where: str) -> None:
    from agentsim.outputs import OutputError, _check_parent

    if out.is_symlink():
        raise OutputError(where, "is a symbolic link; give a file path")
    if out.is_dir():
        raise OutputError(where, "is an existing directory; give a file path")
    if out.exists() and not force:
        raise OutputError(where, "exists; pass --force to overwrite it")
    _check_parent(out, where)
    if fmt_ == MD:
        from agentsim.outputs import _check_names

        fd = figure_dir_for(out)
        w = f"--out {out}: figure folder {fd}"
        if fd.is_symlink() or (fd.exists() and not fd.is_dir()):
            raise OutputError(w, "exists and is not a folder; refusing to touch it")
        _check_names(fd)   # its name is longer than the file's
        if fd.is_dir():
            if not force:
                raise OutputError(w, "exists; pass --force to overwrite it")
            other = [e.name for e in os.scandir(fd)
                     if not (e.is_file(follow_symlinks=False) and e.name.endswith(".png"))]
            if other:
                raise OutputError(w, f"holds files a report did not write (e.g. {other[0]!r}); refusing to touch it")


def write_report(directory: str | Path, out: str | Path | None = None, fmt_: str | None = None,
                 force: bool = False) -> Path:
    """Build the report of ``directory`` and write it; returns the path written.

    ``out`` defaults to ``DIR/report.html`` (``DIR/report.md``); ``fmt_`` to ``md`` for a ``.md``
    ``out`` and ``html`` otherwise. Raises ConfigError (bad directory, unknown format) or OutputError
    (the output exists without ``force``, or is a directory / symlink), before anything is written.
    """
    d = Path(directory)
    if fmt_ is None:
        fmt_ = MD if out is not None and Path(out).suffix.lower() in (".md", ".markdown") else HTML
    if fmt_ not in FORMATS:
        raise ConfigError("--format", f"must be one of {', '.join(FORMATS)}, got {fmt_!r}")
    detect_kind(d)
    outp = Path(out) if out is not None else d / f"report.{fmt_}"
    _check_target(outp, fmt_, force)
    rep = build_report(d)
    _check_target(outp, fmt_, force)  # again: the path may have changed while the report was built
    outp.parent.mkdir(parents=True, exist_ok=True)
    tmp = outp.with_name(f".{outp.name}.tmp-{os.getpid()}")
    if fmt_ == HTML:
        try:
            tmp.write_text(render_html(rep), encoding="utf-8")
            os.replace(tmp, outp)
        finally:  # an interrupted write leaves no temporary (it would block a rerun into DIR)
            if tmp.exists():
                tmp.unlink()
        return outp
    fd = figure_dir_for(outp)
    ftmp = fd.with_name(f".{fd.name}.tmp-{os.getpid()}")
    try:
        ftmp.mkdir()
        for f in rep.figures:
            (ftmp / f"{f.name}.png").write_bytes(f.png)
        tmp.write_text(render_md(rep, fd.name), encoding="utf-8")
        from agentsim.outputs import swap_in

        swap_in(ftmp, fd)  # fd was checked above: absent, or a figure folder holding only PNGs
        os.replace(tmp, outp)
    finally:
        if ftmp.exists():
            shutil.rmtree(ftmp, ignore_errors=True)
        if tmp.exists():
            tmp.unlink()
    return outp


def report_command(
    directory: Path = typer.Argument(..., help="A run (simulate/live -o), sweep or study directory."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default DIR/report.html, "
                                                                   "DIR/report.md with --format md)."),
    format: Optional[str] = typer.Option(None, "--format", help="html (one self-contained file) or md "  # noqa: A002
                                                                 "(markdown + PNGs in NAME_files/); default "
                                                                 "from -o's suffix, else html."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing report."),
) -> None:
    """Write one self-contained report (HTML, or markdown + PNGs) of a run, sweep or study directory.

    Prints the path written. Exit 2 (one line): not a run, sweep or study; an existing output without --force.
    """
    typer.echo(str(write_report(directory, out, format, force)))


__all__ = ["Report", "Figure", "Table", "Provenance", "detect_kind", "build_report", "build_run", "build_sweep",
           "build_study", "render_html", "render_md", "write_report", "config_toml", "figure_dir_for",
           "report_command"]

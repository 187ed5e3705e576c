"""One metrics schema for sim and live: per-call, per-program and per-engine time-series tables.

Definitions follow ``vllm bench serve`` where one exists:
- TTFT = first_token_at - arrival_at; TPOT = (finish_at - first_token_at) / (num_output_tokens - 1)
  for calls with more than one output token; E2E = finish_at - arrival_at.
- queue_time = first scheduled - arrival (vLLM's ``request_queue_time_seconds``).
- prefix-cache hit rate = prompt tokens served from cache / prompt tokens, counted when a call is
  first scheduled (vLLM's ``prefix_cache_hits / prefix_cache_queries`` counts in tokens).
- program latency = end_at - arrival_at; Autellix's program-level token latency =
  program latency / output tokens of the program.
"""

from __future__ import annotations

import json
import math
import os
from array import array
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

SCHEMA_VERSION = 1

# (column, kind) where kind is one of i (int64), f (float64), s (string)
CALL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("call_id", "i"), ("program_id", "i"), ("agent_id", "i"), ("thread_id", "i"),
    ("program_kind", "s"), ("engine_id", "i"), ("node_id", "i"),
    ("arrival_at", "f"), ("scheduled_at", "f"), ("first_token_at", "f"), ("finish_at", "f"),
    ("queue_time", "f"), ("ttft", "f"), ("tpot", "f"), ("e2e", "f"),
    ("num_prompt_tokens", "i"), ("num_cached_tokens", "i"), ("num_computed_prompt_tokens", "i"),
    ("num_output_tokens", "i"), ("num_generated_tokens", "i"), ("num_preemptions", "i"),
    ("num_retries", "i"), ("service_time", "f"), ("status", "s"),
)
PROGRAM_COLUMNS: tuple[tuple[str, str], ...] = (
    ("program_id", "i"), ("agent_id", "i"), ("kind", "s"), ("arrival_at", "f"), ("end_at", "f"),
    ("latency", "f"), ("num_calls", "i"), ("num_tool_calls", "i"), ("num_prompt_tokens", "i"),
    ("num_output_tokens", "i"), ("llm_time", "f"), ("tool_time", "f"), ("critical_path_time", "f"),
    ("token_latency", "f"), ("status", "s"),
)
ENGINE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("engine_id", "i"), ("node_id", "i"), ("time", "f"), ("num_running", "i"), ("num_waiting", "i"),
    ("kv_usage", "f"), ("num_prefill_tokens", "i"), ("num_decode_tokens", "i"), ("busy_fraction", "f"),
    ("gpu_util", "f"),
)

_DTYPES = {"i": "int64", "f": "float64", "s": "string"}


class ColumnStore:
    """Append-only columnar rows (compact ``array`` storage; a million calls fit in ~200 MB)."""

    def __init__(self, columns: tuple[tuple[str, str], ...]) -> None:
        self.columns = columns
        self.names = [c for c, _ in columns]
        self._cols: list[Any] = [array("q") if k == "i" else array("d") if k == "f" else [] for _, k in columns]

    def append(self, row: tuple) -> None:
        for col, v in zip(self._cols, row):
            col.append(v)

    def __len__(self) -> int:
        return len(self._cols[0])

    def to_frame(self) -> pd.DataFrame:
        data = {}
        for (name, kind), col in zip(self.columns, self._cols):
            if kind == "s":
                data[name] = pd.array(col, dtype="string")
            else:
                data[name] = np.frombuffer(col, dtype=np.int64 if kind == "i" else np.float64).copy() \
                    if len(col) else np.array([], dtype=_DTYPES[kind])
        return pd.DataFrame(data)


def empty_frame(columns: tuple[tuple[str, str], ...]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=_DTYPES[k]) for c, k in columns})


def check_schema(df: pd.DataFrame, columns: tuple[tuple[str, str], ...], table: str) -> None:
    """Raise ValueError unless ``df`` has exactly the schema's columns and dtypes, in order."""
    want = [(c, _DTYPES[k]) for c, k in columns]
    got = [(c, str(df[c].dtype)) for c in df.columns]
    if got != want:
        raise ValueError(f"{table}: schema mismatch\n  want {want}\n  got  {got}")


def _pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else math.nan


def summarize(calls: pd.DataFrame, programs: pd.DataFrame, engines: pd.DataFrame, duration: float,
              slo_ttft: float | None = None, slo_tpot: float | None = None) -> dict[str, float]:
    """Headline numbers of a run (finished calls and programs only)."""
    done = calls[calls["status"] == "finished"]
    pdone = programs[programs["status"] == "finished"]
    out: dict[str, float] = {}
    out["duration_s"] = duration
    out["num_calls"] = float(len(done))
    out["num_programs"] = float(len(pdone))
    gen = float(calls["num_generated_tokens"].sum())
    out["output_tok_s"] = gen / duration if duration > 0 else math.nan
    out["total_tok_s"] = (gen + float(calls.loc[calls["status"] == "finished", "num_prompt_tokens"].sum())) / duration \
        if duration > 0 else math.nan
    out["programs_s"] = len(pdone) / duration if duration > 0 else math.nan
    out["calls_s"] = len(done) / duration if duration > 0 else math.nan
    for name, col in (("ttft", "ttft"), ("tpot", "tpot"), ("e2e", "e2e"), ("queue", "queue_time")):
        x = done[col].to_numpy()
        x = x[~np.isnan(x)]
        out[f"{name}_mean"] = float(x.mean()) if len(x) else math.nan
        for q in (50, 95, 99):
            out[f"{name}_p{q}"] = _pct(x, q)
    lat = pdone["latency"].to_numpy()
    tl = pdone["token_latency"].to_numpy()
    out["program_latency_mean"] = float(lat.mean()) if len(lat) else math.nan
    for q in (50, 95, 99):
        out[f"program_latency_p{q}"] = _pct(lat, q)
    out["program_token_latency_mean"] = float(tl.mean()) if len(tl) else math.nan
    out["program_token_latency_p95"] = _pct(tl, 95)
    out["program_token_latency_p99"] = _pct(tl, 99)
    prompt = float(done["num_prompt_tokens"].sum())
    out["prefix_hit_rate"] = float(done["num_cached_tokens"].sum()) / prompt if prompt else math.nan
    out["preemptions"] = float(calls["num_preemptions"].sum())
    if len(engines):
        out["kv_usage_mean"] = float(engines["kv_usage"].mean())
        out["busy_fraction_mean"] = float(engines["busy_fraction"].mean())
    else:
        out["kv_usage_mean"] = math.nan
        out["busy_fraction_mean"] = math.nan
    if slo_ttft is not None or slo_tpot is not None:
        ok = np.ones(len(done), dtype=bool)
        if slo_ttft is not None:
            ok &= done["ttft"].to_numpy() <= slo_ttft
        if slo_tpot is not None:
            t = done["tpot"].to_numpy()
            ok &= np.isnan(t) | (t <= slo_tpot)
        out["goodput_calls_s"] = float(ok.sum()) / duration if duration > 0 else math.nan
    return out


# --------------------------------------------------------------------------- result files
RESULT_FILES = ("calls.parquet", "programs.parquet", "engines.parquet", "summary.json", "manifest.json")


def write_results(out_dir: str | Path, calls: pd.DataFrame, programs: pd.DataFrame, engines: pd.DataFrame,
                  summary: dict, manifest: dict) -> Path:
    """Write a run's result directory atomically; never touch a path holding anything else.

    ``out_dir`` must be new, empty, or a previous agentsim result (see :mod:`agentsim.outputs`);
    otherwise :class:`agentsim.outputs.OutputError` is raised *before* anything is written. The files
    go to a hidden sibling ``.NAME.tmp-PID`` first; a new or empty path is then renamed into place,
    a previous result is swapped out by two renames and deleted. An empty directory that is the
    current directory cannot be renamed: the files are moved into it one by one, ``manifest.json``
    last, so it is recognised as a result only once complete. A run that fails part-way leaves no
    directory that looks like a result.
    """
    from agentsim.outputs import EMPTY, REPLACE, check_result_dir

    out_dir = Path(out_dir)
    state = check_result_dir(out_dir, "")
    in_place = state == EMPTY and _is_cwd(out_dir)
    if in_place:
        tmp = out_dir / f".agentsim.tmp-{os.getpid()}"
    else:
        tmp = _sibling(out_dir, "tmp")
    if tmp.exists():
        _rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        calls.to_parquet(tmp / "calls.parquet", index=False)
        programs.to_parquet(tmp / "programs.parquet", index=False)
        engines.to_parquet(tmp / "engines.parquet", index=False)
        (tmp / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2, sort_keys=True) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(_jsonable(manifest), indent=2, sort_keys=True) + "\n")
        state = check_result_dir(out_dir, "")  # again: the path may have changed while the run ran
        if in_place:
            for name in RESULT_FILES:  # manifest.json is last
                os.replace(tmp / name, out_dir / name)
            tmp.rmdir()
        elif state == REPLACE:
            old = _sibling(out_dir, "old")
            out_dir.rename(old)
            tmp.rename(out_dir)
            _rmtree(old)
        else:  # new, or an empty directory (rename(2) replaces an empty directory)
            tmp.rename(out_dir)
    except BaseException:
        _rmtree(tmp)
        raise
    return out_dir


def _sibling(path: Path, tag: str) -> Path:
    """A hidden name beside ``path`` (``-o .`` and ``-o ..`` have no usable name: use the resolved one)."""
    name = path.name if path.name not in ("", ".", "..") else path.resolve().name
    parent = path.parent if path.name not in ("", ".", "..") else path.resolve().parent
    return parent / f".{name}.{tag}-{os.getpid()}"


def _is_cwd(path: Path) -> bool:
    try:
        return path.resolve() == Path.cwd().resolve()
    except OSError:
        return False


def read_results(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    return {
        "calls": pd.read_parquet(run_dir / "calls.parquet"),
        "programs": pd.read_parquet(run_dir / "programs.parquet"),
        "engines": pd.read_parquet(run_dir / "engines.parquet"),
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "manifest": json.loads((run_dir / "manifest.json").read_text()),
    }


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, Path):
        return str(x)
    return x


def iter_rows(df: pd.DataFrame) -> Iterable[tuple]:
    return df.itertuples(index=False, name=None)

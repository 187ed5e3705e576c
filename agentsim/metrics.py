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
from enum import StrEnum
from pathlib import Path
from typing import Any, Iterable, Sequence

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
    ("kv_transfer_bytes", "i"), ("kv_transfer_time", "f"),
)
PROGRAM_COLUMNS: tuple[tuple[str, str], ...] = (
    ("program_id", "i"), ("agent_id", "i"), ("kind", "s"), ("arrival_at", "f"), ("end_at", "f"),
    ("latency", "f"), ("num_calls", "i"), ("num_tool_calls", "i"), ("num_prompt_tokens", "i"),
    ("num_output_tokens", "i"), ("llm_time", "f"), ("tool_time", "f"), ("critical_path_time", "f"),
    ("token_latency", "f"), ("status", "s"), ("coordination_overhead", "f"),
)
ENGINE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("engine_id", "i"), ("node_id", "i"), ("time", "f"), ("num_running", "i"), ("num_waiting", "i"),
    ("kv_usage", "f"), ("num_prefill_tokens", "i"), ("num_decode_tokens", "i"), ("busy_fraction", "f"),
    ("gpu_util", "f"),
)

_DTYPES = {"i": "int64", "f": "float64", "s": "string"}


class CallStatus(StrEnum):
    """Where an LLM call is (vLLM's ``RequestStatus``, ``vllm/v1/request.py``, in agentsim's words).

    The values are the strings ``calls.parquet`` has always held in ``status``, so old results
    read the same; a member compares equal to its string. In an engine: ``NEW`` (made, not yet
    queued), ``WAITING``, ``LOADING`` (its KV coming back from a CPU tier), ``RUNNING``,
    ``PREEMPTED``, ``FINISHED``. In a result row: ``FINISHED``; ``UNFINISHED`` (still in flight when
    the run ended); ``FAILED`` (live: its engine died past the retries, or it did not fit);
    ``RUNNING`` (live partial results only: in flight at the flush).
    """

    NEW = "new"
    WAITING = "waiting"
    LOADING = "loading"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    UNFINISHED = "unfinished"
    FAILED = "failed"


class ProgramStatus(StrEnum):
    """Where a program is (``ProgramRun.status``; the ``status`` column of ``programs.parquet``).

    The values are the strings that column has always held; a member compares equal to its string.
    ``RUNNING`` (being stepped; live partial results only), ``FINISHED`` (its body returned),
    ``UNFINISHED`` (still running when the run ended), ``FAILED`` (live: a call failed past the
    retries, did not fit, or the body raised).
    """

    RUNNING = "running"
    FINISHED = "finished"
    UNFINISHED = "unfinished"
    FAILED = "failed"


def call_row(call: Any, engine_id: int, node_id: int, status: str) -> tuple:
    """One call's row of :data:`CALL_COLUMNS`, for the simulator and the live driver alike.

    ``call`` has the :class:`~agentsim.policies.base.CallView` fields plus ``scheduled_at``,
    ``first_token_at``, ``finish_at`` (seconds of the run's clock, NaN until they happen),
    ``num_cached_tokens`` (negative = not looked up yet, written as 0),
    ``num_computed_prompt_tokens``, ``num_generated``, ``num_preemptions``, ``num_retries`` and
    ``service_time`` (s). The formulas are ``vllm bench serve``'s (``vllm/benchmarks/serve.py``
    ``calculate_metrics``): TTFT = first token - arrival; TPOT = (finish - first token) /
    (generated tokens - 1), NaN for one token; E2E = finish - arrival; queue_time = first scheduled
    - arrival. A time that has not happened makes its latency NaN.
    """
    arrival = call.arrival_at
    first = call.first_token_at
    finish = call.finish_at
    n = call.num_generated
    cached = call.num_cached_tokens
    return (
        call.call_id, call.program_id, call.agent_id, call.thread_id, call.program_kind, engine_id, node_id,
        arrival, call.scheduled_at, first, finish,
        call.scheduled_at - arrival, first - arrival, (finish - first) / (n - 1) if n > 1 else math.nan,
        finish - arrival,
        call.num_prompt_tokens, cached if cached > 0 else 0, call.num_computed_prompt_tokens,
        call.num_output_tokens, n, call.num_preemptions, call.num_retries, call.service_time, str(status),
        # KV moved to the call's engine (agentsim.sim.disagg); 0 where nothing moves (live engines today)
        getattr(call, "kv_transfer_bytes", 0), getattr(call, "kv_transfer_time", 0.0),
    )


def program_row(run: Any) -> tuple:
    """One program's row of :data:`PROGRAM_COLUMNS` from an :class:`agentsim.programs.ProgramRun`.

    latency = end_at - arrival_at and critical_path_time (the run's critical path, seconds) for a
    finished program, NaN otherwise; token_latency = latency / num_output_tokens (Autellix's
    program-level token latency, arXiv:2502.13965 §6), NaN without output tokens.
    """
    p = run.prog
    done = run.status == ProgramStatus.FINISHED
    lat = run.end_at - p.arrival_at if done else math.nan
    return (
        p.program_id, p.agent_id, p.kind, p.arrival_at, run.end_at, lat, run.num_calls, run.num_tool_calls,
        run.prompt_tokens, run.output_tokens, run.llm_time, run.tool_time, run.critical_path if done else math.nan,
        lat / run.output_tokens if run.output_tokens else math.nan, str(run.status),
        getattr(run, "coordination_overhead", 0.0),  # router time of its calls (s; agentsim.sim.disagg)
    )


def git_revision() -> str | None:
    """The commit agentsim runs from (``git rev-parse HEAD`` beside this file), None outside a checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_manifest(backend: str, config: dict, seed: int, versions: dict, **fields: Any) -> dict:
    """The ``manifest.json`` of a run, for every backend: schema version, backend (``sim``/``live``),
    the config as run, seed, the versions of agentsim, Python and ``versions`` (the backend's own
    packages), the git revision, then ``fields`` (the backend's own keys)."""
    import platform

    import agentsim

    return {
        "schema_version": SCHEMA_VERSION, "backend": backend, "config": config, "seed": seed,
        "versions": {"agentsim": agentsim.__version__, "python": platform.python_version(), **versions},
        "git_revision": git_revision(), **fields,
    }


class ColumnStore:
    """Append-only columnar rows (compact ``array`` storage; a million calls fit in ~200 MB).

    Rows wait as tuples in a short buffer and move into the columns ``CHUNK`` at a time, by C loops
    (``zip(*rows)`` and ``array.extend``) rather than one Python ``append`` per cell: a row costs
    one list append. A row is checked when its chunk moves (at the latest in ``len()`` or
    :meth:`to_frame`): a row of the wrong length (``ValueError``) or with a value of the wrong type
    (a float in an integer column ...: ``TypeError``) is dropped and the error raised there, after
    the chunk's other rows are stored; every column always holds the same rows.
    """

    CHUNK = 2048

    def __init__(self, columns: tuple[tuple[str, str], ...]) -> None:
        self.columns = columns
        self.names = [c for c, _ in columns]
        self._cols: list[Any] = [array("q") if k == "i" else array("d") if k == "f" else [] for _, k in columns]
        self._rows: list[tuple] = []

    def append(self, row: tuple) -> None:
        rows = self._rows
        rows.append(tuple(row))   # a copy of a list row (a tuple is kept as it is)
        if len(rows) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        """Move the buffered rows into the columns; raise for the first bad row (see the class)."""
        rows = self._rows
        if not rows:
            return
        self._rows = []
        if set(map(len, rows)) == {len(self._cols)}:
            try:
                staged = self._stage(rows)
            except (TypeError, OverflowError):
                staged = None
            if staged is not None:
                for c, v in zip(self._cols, staged):
                    c.extend(v)
                return
        # a bad row in the chunk: store the others one by one, then raise for the first bad one
        error = None
        for r in rows:
            try:
                if len(r) != len(self._cols):
                    raise ValueError(f"a row of {len(r)} values for {len(self._cols)} columns "
                                     f"({', '.join(self.names[:3])} ...)")
                staged = self._stage([r])
            except (TypeError, ValueError, OverflowError) as e:
                error = error or e
                continue
            for c, v in zip(self._cols, staged):
                c.extend(v)
        if error is not None:
            raise error

    def _stage(self, rows: list[tuple]) -> list:
        """``rows`` as one typed sequence per column (raises before any column changes)."""
        return [array(c.typecode, v) if isinstance(c, array) else v for c, v in zip(self._cols, zip(*rows))]

    def __len__(self) -> int:
        self._flush()
        return len(self._cols[0])

    def to_frame(self, sort_by: str | Sequence[str] | None = None, release: bool = False) -> pd.DataFrame:
        """The rows as a DataFrame with the schema's dtypes (a RangeIndex).

        ``sort_by``: numeric column(s) to order the rows by, ascending and stable (the same rows as
        ``.sort_values(sort_by, kind="stable").reset_index(drop=True)``, without a second copy of the
        table). ``release``: free each column's storage as soon as it is converted (the store is
        empty afterwards), so that converting a long run's calls needs about one table of memory
        more, not three (the stored columns, their copies and the sorted frame).
        """
        self._flush()
        order = None
        if sort_by is not None and len(self):
            keys = [sort_by] if isinstance(sort_by, str) else list(sort_by)
            cols = [self._numeric(self.names.index(k)) for k in keys]
            # np.lexsort sorts by its last key first, stably: the same order as a stable multi-key sort
            order = np.argsort(cols[0], kind="stable") if len(cols) == 1 else np.lexsort(cols[::-1])
            del cols
        data = {}
        for i, (name, kind) in enumerate(self.columns):
            col = self._cols[i]
            if kind == "s":
                values = pd.array(col, dtype="string")
                if order is not None:
                    values = values.take(order)
            elif len(col):
                view = self._numeric(i)
                values = view[order] if order is not None else view.copy()
                del view
            else:
                values = np.array([], dtype=_DTYPES[kind])
            data[name] = values
            if release:
                self._cols[i] = [] if kind == "s" else array(col.typecode)
            del col
        return pd.DataFrame(data, copy=False)

    def _numeric(self, i: int) -> np.ndarray:
        """Column ``i`` (integer or float) as a NumPy view of its storage (no copy)."""
        return np.frombuffer(self._cols[i], dtype=np.int64 if self.columns[i][1] == "i" else np.float64)


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


#: Every key :func:`summarize` writes to ``summary.json``: ``(key, unit, meaning)``. Names follow
#: ``vllm bench serve`` (``vllm/benchmarks/serve.py``: ``mean_ttft_ms``, ``median_ttft_ms``,
#: ``p99_ttft_ms``, ``output_throughput`` ...): the unit is the key's suffix, or given here.
#: Call latencies are in milliseconds, program latencies in seconds; the Parquet columns keep
#: seconds (``ttft``, ``e2e``, ``latency`` ...). Counts are floats (JSON numbers).
SUMMARY_KEYS: tuple[tuple[str, str, str], ...] = (
    ("duration_s", "s", "the run's measured makespan: time 0 to the end of the run (see summarize)"),
    ("num_calls", "calls", "finished calls"),
    ("num_programs", "programs", "finished programs"),
    ("total_input_tokens", "tokens", "prompt tokens of finished calls"),
    ("total_output_tokens", "tokens", "tokens generated by all calls (finished or not)"),
    ("output_throughput", "tok/s", "total_output_tokens / duration_s"),
    ("total_token_throughput", "tok/s", "(total_input_tokens + total_output_tokens) / duration_s"),
    ("request_throughput", "calls/s", "num_calls / duration_s"),
    ("program_throughput", "programs/s", "num_programs / duration_s"),
    *((f"{s}_{m}_ms", "ms", f"{s} {m.upper()} of finished calls")
      for m in ("ttft", "tpot", "e2el", "queue_time") for s in ("mean", "median", "p95", "p99")),
    *((f"{s}_program_latency_s", "s", f"{s} end - arrival of finished programs")
      for s in ("mean", "median", "p95", "p99")),
    *((f"{s}_program_token_latency_ms", "ms/token", f"{s} program latency / its output tokens (Autellix)")
      for s in ("mean", "p95", "p99")),
    ("prefix_hit_rate", "fraction", "prompt tokens served from the prefix cache / prompt tokens"),
    ("num_preemptions", "preemptions", "preemptions of all calls"),
    ("mean_kv_usage", "fraction", "mean KV-cache usage over the engine samples"),
    ("mean_busy_fraction", "fraction", "mean share of time an engine was running a step"),
    ("request_goodput", "calls/s", "finished calls within the TTFT/TPOT SLOs / duration_s (with an SLO)"),
    ("total_kv_transfer_bytes", "bytes", "KV bytes moved between engines for finished calls (P/D, prefix fetch)"),
    ("mean_kv_transfer_time_ms", "ms", "mean kv_transfer_time of finished calls that moved KV"),
    ("mean_coordination_overhead_s", "s", "mean router time (decision cost + RTT) per finished program"),
)

#: summary.json keys before units were part of the names (agentsim <= 0.1.0 results) -> today's
#: key and the factor that converts the old value (seconds) to the new unit.
RENAMED_SUMMARY_KEYS: dict[str, tuple[str, float]] = {
    "output_tok_s": ("output_throughput", 1.0), "total_tok_s": ("total_token_throughput", 1.0),
    "calls_s": ("request_throughput", 1.0), "programs_s": ("program_throughput", 1.0),
    "goodput_calls_s": ("request_goodput", 1.0), "preemptions": ("num_preemptions", 1.0),
    "kv_usage_mean": ("mean_kv_usage", 1.0), "busy_fraction_mean": ("mean_busy_fraction", 1.0),
    **{f"{old}_{s}": (f"{'median' if s == 'p50' else s}_{new}_ms", 1e3)
       for old, new in (("ttft", "ttft"), ("tpot", "tpot"), ("e2e", "e2el"), ("queue", "queue_time"))
       for s in ("mean", "p50", "p95", "p99")},
    **{f"program_latency_{s}": (f"{'median' if s == 'p50' else s}_program_latency_s", 1.0)
       for s in ("mean", "p50", "p95", "p99")},
    **{f"program_token_latency_{s}": (f"{s}_program_token_latency_ms", 1e3) for s in ("mean", "p95", "p99")},
}


def upgrade_summary(summary: dict) -> dict:
    """A summary.json dict with old key names (:data:`RENAMED_SUMMARY_KEYS`) renamed and rescaled.

    Keys already in today's form are kept as they are; a value that is not a number stays as is.
    """
    out = {}
    for k, v in summary.items():
        new, factor = RENAMED_SUMMARY_KEYS.get(k, (k, 1.0))
        if new in out and new != k:
            continue
        out[new] = v * factor if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None else v
    return out


def summarize(calls: pd.DataFrame, programs: pd.DataFrame, engines: pd.DataFrame, duration: float,
              slo_ttft: float | None = None, slo_tpot: float | None = None) -> dict[str, float]:
    """Headline numbers of a run: the keys of :data:`SUMMARY_KEYS`, with units in their names.

    ``calls``/``programs``/``engines``: the run's tables (:data:`CALL_COLUMNS` ...; times in
    seconds). Latencies and their percentiles cover finished calls and programs only.

    ``duration`` (seconds) is the run's **measured makespan**, the one definition of a run's length
    for sim and live alike: from time 0 (the first possible arrival) to the moment the run ended —
    when its last program finished for a drained run, when it was stopped otherwise. Every
    throughput is a count divided by it (``vllm bench serve`` divides by the benchmark's measured
    wall time the same way); a backend must never pad it with the configured duration, or a run
    that drained early would report a lower throughput than it achieved. Raises ``ValueError`` for
    a negative or non-finite ``duration``; 0 gives NaN throughputs.

    ``slo_ttft``/``slo_tpot`` (seconds): with either, ``request_goodput`` counts the finished calls
    whose TTFT and TPOT are within them (DistServe's goodput).
    """
    if not (duration >= 0 and math.isfinite(duration)):
        raise ValueError(f"summarize: duration must be a finite number of seconds >= 0, got {duration!r}")
    done = calls[calls["status"] == "finished"]
    pdone = programs[programs["status"] == "finished"]
    out: dict[str, float] = {}

    def per_s(n: float) -> float:
        return n / duration if duration > 0 else math.nan

    out["duration_s"] = float(duration)
    out["num_calls"] = float(len(done))
    out["num_programs"] = float(len(pdone))
    gen = float(calls["num_generated_tokens"].sum())
    prompt = float(done["num_prompt_tokens"].sum())
    out["total_input_tokens"] = prompt
    out["total_output_tokens"] = gen
    out["output_throughput"] = per_s(gen)
    out["total_token_throughput"] = per_s(gen + prompt)
    out["request_throughput"] = per_s(len(done))
    out["program_throughput"] = per_s(len(pdone))
    for name, col in (("ttft", "ttft"), ("tpot", "tpot"), ("e2el", "e2e"), ("queue_time", "queue_time")):
        x = done[col].to_numpy(dtype=float) * 1e3
        x = x[~np.isnan(x)]
        out[f"mean_{name}_ms"] = float(x.mean()) if len(x) else math.nan
        out[f"median_{name}_ms"] = _pct(x, 50)
        out[f"p95_{name}_ms"] = _pct(x, 95)
        out[f"p99_{name}_ms"] = _pct(x, 99)
    lat = pdone["latency"].to_numpy(dtype=float)
    tl = pdone["token_latency"].to_numpy(dtype=float) * 1e3
    tl = tl[~np.isnan(tl)]
    out["mean_program_latency_s"] = float(lat.mean()) if len(lat) else math.nan
    out["median_program_latency_s"] = _pct(lat, 50)
    out["p95_program_latency_s"] = _pct(lat, 95)
    out["p99_program_latency_s"] = _pct(lat, 99)
    out["mean_program_token_latency_ms"] = float(tl.mean()) if len(tl) else math.nan
    out["p95_program_token_latency_ms"] = _pct(tl, 95)
    out["p99_program_token_latency_ms"] = _pct(tl, 99)
    out["prefix_hit_rate"] = float(done["num_cached_tokens"].sum()) / prompt if prompt else math.nan
    out["num_preemptions"] = float(calls["num_preemptions"].sum())
    if len(engines):
        out["mean_kv_usage"] = float(engines["kv_usage"].mean())
        out["mean_busy_fraction"] = float(engines["busy_fraction"].mean())
    else:
        out["mean_kv_usage"] = math.nan
        out["mean_busy_fraction"] = math.nan
    if "kv_transfer_bytes" in done:
        moved = done[done["kv_transfer_bytes"] > 0]
        out["total_kv_transfer_bytes"] = float(done["kv_transfer_bytes"].sum())
        out["mean_kv_transfer_time_ms"] = float(moved["kv_transfer_time"].mean()) * 1e3 if len(moved) else 0.0
    if "coordination_overhead" in pdone:
        co = pdone["coordination_overhead"].to_numpy(dtype=float)
        out["mean_coordination_overhead_s"] = float(co.mean()) if len(co) else math.nan
    if slo_ttft is not None or slo_tpot is not None:
        ok = np.ones(len(done), dtype=bool)
        if slo_ttft is not None:
            ok &= done["ttft"].to_numpy() <= slo_ttft
        if slo_tpot is not None:
            t = done["tpot"].to_numpy()
            ok &= np.isnan(t) | (t <= slo_tpot)
        out["request_goodput"] = per_s(float(ok.sum()))
    return out


# --------------------------------------------------------------------------- result files
RESULT_FILES = ("calls.parquet", "programs.parquet", "engines.parquet", "links.parquet", "summary.json",
                "manifest.json")  # links.parquet only where links are modelled (agentsim.sim.network)


def write_results(out_dir: str | Path, calls: pd.DataFrame, programs: pd.DataFrame, engines: pd.DataFrame,
                  summary: dict, manifest: dict, links: pd.DataFrame | None = None) -> Path:
    """Write a run's result directory atomically; never touch a path holding anything else.

    ``out_dir`` must be new, empty, or a previous agentsim result (see :mod:`agentsim.outputs`);
    otherwise :class:`agentsim.outputs.OutputError` is raised *before* anything is written. The files
    go to a hidden sibling ``.NAME.tmp-PID`` first; a new or empty path is then renamed into place,
    a previous result is swapped out by two renames and deleted. An empty directory that is the
    current directory cannot be renamed: the files are moved into it one by one, ``manifest.json``
    last, so it is recognised as a result only once complete (a live run re-writing its partial
    results there replaces them the same way, the old manifest removed first; a *new* run into a
    current directory holding a result is refused by the CLI). A run that fails part-way leaves no
    directory that looks like a result.
    """
    from agentsim.outputs import EMPTY, REPLACE, check_result_dir, swap_in

    out_dir = Path(out_dir)
    state = check_result_dir(out_dir, "", allow_cwd=True)
    in_place = state in (EMPTY, REPLACE) and _is_cwd(out_dir)
    if in_place:
        tmp = out_dir / f".agentsim.tmp-{os.getpid()}"
    else:
        tmp = _sibling(out_dir, "tmp")
    if tmp.exists():
        _rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        from agentsim.outputs import OutputError

        raise OutputError(str(out_dir), f"cannot write there ({e.strerror})") from None
    try:
        calls.to_parquet(tmp / "calls.parquet", index=False)
        programs.to_parquet(tmp / "programs.parquet", index=False)
        engines.to_parquet(tmp / "engines.parquet", index=False)
        if links is not None:  # per-link utilisation (agentsim.sim.network.LINK_COLUMNS)
            links.to_parquet(tmp / "links.parquet", index=False)
        (tmp / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2, sort_keys=True) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(_jsonable(manifest), indent=2, sort_keys=True) + "\n")
        if in_place:  # again: the directory may have changed while the run ran
            others = [e.name for e in os.scandir(out_dir) if e.name != tmp.name]
            if others and not (set(others) <= set(RESULT_FILES) and "manifest.json" in others):
                check_result_dir(out_dir, "")  # raises: it holds something else now
            # the current directory cannot be renamed: the old manifest goes first and the new one
            # lands last, so the directory reads as a result only when it is whole again
            (out_dir / "manifest.json").unlink(missing_ok=True)
            for name in RESULT_FILES:  # manifest.json is last
                if (tmp / name).exists():  # links.parquet is optional
                    os.replace(tmp / name, out_dir / name)
            tmp.rmdir()
        else:
            check_result_dir(out_dir, "")  # again: the path may have changed while the run ran
            swap_in(tmp, out_dir)
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


def format_value(v: float | None, unit: str = "") -> str:
    """A value for a printed table (``simulate``, ``sweep``, ``compare``): ``%`` for fractions (0-1),
    counts without decimals (``n``), anything else with 3 significant digits at least (``0.0213``,
    ``4.56``, ``1,234.5``); ``-`` for None or NaN."""
    if v is None or v != v:
        return "-"
    if unit == "%":
        return f"{v * 100:.1f}%"
    if unit == "n":
        return f"{v:,.0f}"
    a = abs(v)
    if a >= 100 or a == 0:
        return f"{v:,.1f}"
    if a >= 1:
        return f"{v:,.2f}"
    return f"{v:.3g}"

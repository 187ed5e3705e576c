"""Sweeps: a grid of simulations run in parallel, resumable, combined into one table.

Spec (TOML)::

    [sweep]
    out = "runs/my-sweep"        # where cells and the combined table go (the only [sweep] key)
    [base]                       # any run-config table (as for --config); or base_config = "file.toml"
    duration = 120
    [grid]                       # dotted config keys -> lists; the grid is their product
    policy = ["vllm", "least-loaded"]
    "workload.agents" = [100, 200]
    seed = [0, 1]

Every cell is validated before any cell runs (its config, and what the run resolves from it:
policy bundle and parameters, profile, generator, engine limits, trace file); a bad value is one
line naming the spec and the cell.

Each cell is written atomically to ``out/cells/<cell id>/`` (the id hashes the cell's grid values,
so the directory of a cell stays put). Its manifest records the cell's **key**: a hash of the
whole resolved run config, the agentsim version and the size/mtime of the files the config names
(trace, profile JSON). A rerun reuses a cell only if its key matches; cells computed with another
``[base]``, another agentsim version or a changed input file are *stale*: the rerun says how many
on stderr and recomputes them. ``out/sweep.json`` marks the directory as a sweep;
``out/results.parquet`` has one row per cell: the grid values plus the run summary.

Linked keys: a grid key naming several dotted keys joined by commas takes a list of lists, zipped
instead of crossed (``"cluster.num_nodes,workload.agents" = [[1, 200], [2, 400]]``: agents scaled with
the nodes). A ``[quick]`` table holds the small grid of a study's ``--quick`` run (``load_spec(...,
quick=True)``): ``[quick.grid]`` replaces those grid keys' values, ``[quick.base]`` sets dotted keys in
``[base]``; an ordinary sweep ignores it.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from agentsim.config import RunConfig, config_from_dict, load_config
from agentsim.errors import AgentsimError, ConfigError
from agentsim.workload import stable_id

#: keys of the ``[sweep]`` table
SWEEP_KEYS = ("out",)
#: top-level entries of a spec
SPEC_SECTIONS = ("sweep", "base", "base_config", "grid", "quick")


class CellFailed(Exception):
    """A cell's run failed with an error that is not bad input (a fault in the run itself).

    ``str()`` is one line: the spec, the cell's grid values and the error.
    """


@dataclass
class SweepSpec:
    path: Path
    out: Path
    base: dict
    grid: dict[str, list]

    @property
    def grid_keys(self) -> list[str]:
        """The dotted config keys the grid sets (a linked key ``"a,b"`` gives ``a`` and ``b``)."""
        return [k for g in self.grid for k in _split_key(g)]

    def cells(self) -> list[dict]:
        keys = list(self.grid)
        cells = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            cell: dict = {}
            for k, v in zip(keys, values):
                names = _split_key(k)
                cell.update(zip(names, v) if len(names) > 1 else {k: v})
            cells.append(cell)
        return cells


def _split_key(key: str) -> list[str]:
    """The dotted keys of a grid key (several for a linked key ``"a,b"``)."""
    return [k.strip() for k in key.split(",")] if "," in key else [key]


def load_spec(path: str | Path, check: bool = True, overrides: dict | None = None, quick: bool = False) -> SweepSpec:
    """Read and validate a sweep spec (every cell, see :func:`check_cell`, unless ``check=False``).

    ``quick`` applies the spec's ``[quick]`` table (the small grid of a study's ``--quick`` run).

    ``overrides`` (dotted key -> value, ``sweep --set``) are set in ``[base]``; a key the grid
    varies is refused (the grid would overwrite it).

    Raises ConfigError naming ``SPEC: section.key`` (or ``SPEC: grid cell {...}: field``).
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(str(path), f"cannot read sweep spec ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), f"malformed TOML ({e})") from None
    unknown = set(data) - set(SPEC_SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: {sorted(unknown)[0]}", f"unknown section (known: {', '.join(SPEC_SECTIONS)})")
    sweep = data.get("sweep", {})
    if not isinstance(sweep, dict):
        raise ConfigError(f"{path}: sweep", "must be a table [sweep]")
    unknown = set(sweep) - set(SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: sweep.{sorted(unknown)[0]}", f"unknown key (known: {', '.join(SWEEP_KEYS)})")
    if "out" in sweep and (not isinstance(sweep["out"], str) or not sweep["out"].strip()):
        raise ConfigError(f"{path}: sweep.out", f"must be a directory path (a string), got {sweep['out']!r}")
    base = data.get("base", {})
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: base", "must be a table [base]")
    if "base_config" in data:
        if not isinstance(data["base_config"], str):
            raise ConfigError(f"{path}: base_config", f"must be a file path (a string), got {data['base_config']!r}")
        bc = (path.parent / data["base_config"]).resolve()
        try:
            base = {**tomllib.loads(bc.read_text()), **base}
        except OSError as e:
            raise ConfigError(f"{path}: base_config", f"cannot read {bc} ({e.strerror})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: base_config", f"{bc}: malformed TOML ({e})") from None
    grid = data.get("grid", {})
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: grid", "needs at least one key with a list of values")
    quick_t = data.get("quick", {})
    if not isinstance(quick_t, dict) or set(quick_t) - {"grid", "base"}:
        raise ConfigError(f"{path}: quick", "must be a table with [quick.grid] and/or [quick.base] only")
    if quick:
        qgrid = quick_t.get("grid", {})
        for k in qgrid:
            if k not in grid:
                raise ConfigError(f"{path}: quick.grid.{k}", "is not a key of [grid]")
        grid = {**grid, **qgrid}
        qbase = quick_t.get("base", {})
        if qbase:
            base = json.loads(json.dumps(base))
            for k, v in qbase.items():
                _set(base, k, v)
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{path}: grid.{k}", "must be a non-empty list")
        n = len(_split_key(k))
        if n > 1 and any(not isinstance(x, list) or len(x) != n for x in v):
            raise ConfigError(f"{path}: grid.{k}", f"a linked key takes lists of {n} values each")
        seen: set[str] = set()
        for x in v:   # the same value twice is the same cell twice: one run, two rows of the table
            key = json.dumps(x, sort_keys=True, default=str)
            if key in seen:
                raise ConfigError(f"{path}: grid.{k}", f"lists {x!r} twice")
            seen.add(key)
    if overrides:
        base = json.loads(json.dumps(base))
        for k, v in overrides.items():
            if any(k == g or k.startswith(g + ".") or g.startswith(k + ".") for g in
                   (x for key in grid for x in _split_key(key))):
                raise ConfigError(f"--set {k}", f"the grid of {path} varies {k}; change [grid] instead")
            try:
                _set(base, k, v)
            except ConfigError as e:
                raise ConfigError(f"--set {k}", e.message) from None
    try:  # an unknown key in [base] is named there, not in a grid cell
        config_from_dict(base)
    except AgentsimError as e:
        if e.message.startswith("unknown field"):
            raise ConfigError(f"{path}: base.{e.where}", e.message) from None
    spec = SweepSpec(path, Path(sweep.get("out", f"runs/{path.stem}")), base, grid)
    if check:
        _check_cells(spec)
    return spec


def _set(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, "conflicts with a non-table value in [base]")
    node[parts[-1]] = value


def _cell_data(base: dict, cell: dict) -> dict:
    data = json.loads(json.dumps(base))
    for k, v in cell.items():
        _set(data, k, v)
    return data


def _cell_where(spec: SweepSpec, cell: dict) -> str:
    return f"{spec.path}: grid cell {json.dumps(cell, sort_keys=True, default=str)}"


def cell_config(spec: SweepSpec, cell: dict) -> RunConfig:
    """The run config of one cell (``[base]`` with the cell's grid values set)."""
    try:
        return config_from_dict(_cell_data(spec.base, cell))
    except AgentsimError as e:
        raise ConfigError(f"{_cell_where(spec, cell)}: {e.where}", e.message) from None


def check_cell(cfg: RunConfig, _profiles: dict | None = None) -> None:
    """Resolve everything a run of ``cfg`` resolves before it starts, without running it.

    Builds the :class:`~agentsim.sim.runner.Simulation` (profile, engine limits, policy bundle and
    parameters, generators) with closed-loop arrivals, and opens a replayed trace's importer (format
    and file) without reading its records. Raises the AgentsimError the run would raise.
    """
    from agentsim.calibration.profile import resolve_profile
    from agentsim.sim.runner import Simulation

    cl = cfg.cluster
    key = (cl.profile, cl.gpu, cl.model, cl.tp)
    profiles = _profiles if _profiles is not None else {}
    if key not in profiles:
        profiles[key] = resolve_profile(cl.profile, cl.gpu, cl.model, cl.tp)
    wl = cfg.workload
    if wl.arrival == "trace":
        from agentsim.traces.importers import get_importer

        if not Path(wl.trace).is_file():
            raise ConfigError("workload.trace", f"no such file: {wl.trace}")
        get_importer(wl.trace, wl.trace_format)
        cfg = replace(cfg, workload=replace(wl, arrival="closed"))
    Simulation(cfg, profile=profiles[key])


def _check_cells(spec: SweepSpec) -> None:
    profiles: dict = {}
    seen: set[str] = set()
    for cell in spec.cells():
        cfg = cell_config(spec, cell)
        key = json.dumps(replace(cfg, seed=0).to_dict(), sort_keys=True, default=str)
        if key in seen:  # cells differing only in seed resolve the same things
            continue
        seen.add(key)
        try:
            check_cell(cfg, profiles)
        except AgentsimError as e:
            raise ConfigError(f"{_cell_where(spec, cell)}: {e.where}", e.message) from None


def cell_id(cell: dict) -> str:
    """The directory name of a cell: a hash of its grid values (stable across ``[base]`` changes)."""
    return f"{stable_id(json.dumps(cell, sort_keys=True, default=str)):016x}"


def _file_stamp(p: str | None) -> list | None:
    if not p:
        return None
    try:
        st = Path(p).stat()
    except OSError:
        return None
    return [str(Path(p).resolve()), st.st_size, st.st_mtime_ns]


def cell_key(cfg: RunConfig) -> str:
    """What a cell's result depends on: the whole resolved config, agentsim's version, input files."""
    import agentsim

    d = {"config": cfg.to_dict(), "agentsim": agentsim.__version__,
         "trace": _file_stamp(cfg.workload.trace), "profile": _file_stamp(cfg.cluster.profile)}
    return f"{stable_id(json.dumps(d, sort_keys=True, default=str)):016x}"


def _run_cell(base: dict, cell: dict, cell_dir: str, key: str | None = None) -> dict:
    """Worker: simulate one cell, write it atomically, return its summary row.

    ``key`` is the cell's :func:`cell_key` as the parent computed it (input files are stamped where
    the sweep was started, not on a Ray node); computed here when not given.

    Never raises for a failed run: returns ``{"_error": line, "_bad_input": bool}`` so the parent
    reports one line (no chained tracebacks across processes).
    """
    try:
        from agentsim.metrics import write_results
        from agentsim.sim.runner import run

        cfg = config_from_dict(_cell_data(base, cell))
        r = run(cfg)
        write_results(cell_dir, r.calls, r.programs, r.engines, r.summary,
                      {**r.manifest, "stats": r.stats, "cell": cell, "cell_key": key or cell_key(cfg)},
                      links=r.links)
        return {**cell, **r.summary}
    except AgentsimError as e:
        return {"_error": str(e), "_bad_input": True}
    except Exception as e:  # noqa: BLE001 - reported as one line naming the cell
        return {"_error": f"{type(e).__name__}: {e}", "_bad_input": False}


def _stored_key(cell_dir: Path) -> str | None:
    try:
        m = json.loads((cell_dir / "manifest.json").read_text())
        json.loads((cell_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return m.get("cell_key") if isinstance(m, dict) else None


def _upgrade(summary: dict) -> dict:
    """A stored cell summary in today's key names (``agentsim.metrics.upgrade_summary``)."""
    from agentsim import metrics

    up = getattr(metrics, "upgrade_summary", None)
    return up(summary) if up is not None else summary


def _write_marker(out: Path, spec: SweepSpec) -> None:
    import agentsim

    tmp = out / f".sweep.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"agentsim_sweep": 1, "agentsim": agentsim.__version__, "spec": str(spec.path),
                               "grid": spec.grid}, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(out / "sweep.json")


def _stored_summary(cdir: Path) -> dict | None:
    """A finished cell's metrics, or None when its ``summary.json`` is not one agentsim writes (not
    a JSON object of numbers with ``num_calls``: damaged, or edited by hand); the cell is then
    recomputed as a stale one (it is agentsim's own directory, checked by the caller)."""
    try:
        summary = json.loads((cdir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or "num_calls" not in summary or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in summary.values()):
        return None
    return _upgrade(summary)


def run_sweep(spec: SweepSpec, out: Path | None = None, workers: int | None = None,
              ray_address: str | None = None, console=None, progress=None, keep_going: bool = False) -> pd.DataFrame:
    """Run the cells that are missing or stale, then write and return the combined table.

    ``console`` (rich, stderr) shows a progress bar: cells done / total, failures, elapsed time and
    ETA (the mean time per finished cell so far times the cells left, the estimate rich's
    ``TimeRemainingColumn`` makes). ``progress(done, total, message)`` is also called once before the
    first cell and after every cell (``done`` counts reused cells too). With ``keep_going`` a cell that
    fails (not bad input) does not stop the sweep: it is left out of the table and listed in
    ``table.attrs["failed"]`` as ``"<cell id> <grid values>: <error>"``.

    Raises OutputError (before any cell runs) when ``out`` or a cell directory holds files agentsim
    did not write; ConfigError for ``workers < 1`` or a cell whose run finds bad input;
    :class:`CellFailed` for any other failure of a cell unless ``keep_going`` (finished cells are
    kept: a rerun resumes).
    """
    from agentsim.outputs import check_result_dir, check_sweep_dir

    if workers is not None and workers < 1:
        raise ConfigError("--workers", f"must be >= 1, got {workers}")
    if ray_address is not None:   # before anything is written: ray.init retries a closed port for minutes
        from agentsim.live.compat import check_ray_address

        check_ray_address(ray_address, "--ray")
    option = "--out" if out is not None else f"{spec.path}: sweep.out"
    out = Path(out or spec.out)
    check_sweep_dir(out, option)
    cells_dir = out / "cells"
    rows: dict[str, dict] = {}
    todo: list[tuple[str, dict]] = []
    keys: dict[str, str] = {}
    stale = 0
    for cell in spec.cells():
        cid = cell_id(cell)
        cdir = cells_dir / cid
        keys[cid] = cell_key(cell_config(spec, cell))
        if cdir.exists() or cdir.is_symlink():
            check_result_dir(cdir, option + " cell")  # a cell directory holding user files is refused
            stored = _stored_key(cdir)
            summary = _stored_summary(cdir) if stored is not None and stored == keys[cid] else None
            if summary is not None:
                rows[cid] = {**cell, **summary}
                continue
            stale += 1
        todo.append((cid, cell))
    try:
        cells_dir.mkdir(parents=True, exist_ok=True)
        _write_marker(out, spec)
    except OSError as e:
        from agentsim.outputs import OutputError

        raise OutputError(f"{option} {out}", f"cannot write there ({e.strerror})") from None
    total = len(rows) + len(todo)
    if console is not None:
        if rows:
            console.print(f"resuming: {len(rows)} of {total} cells already done", highlight=False, soft_wrap=True)
        if stale:
            console.print(f"stale: {stale} of {total} cells were computed with another config, agentsim version "
                          "or input file, or their summary is damaged; recomputing them", highlight=False,
                          soft_wrap=True)
    tracker = _Tracker(spec, console, total, len(rows), progress, keep_going, out)
    if todo:
        with tracker:
            if ray_address:
                _run_ray(spec, todo, cells_dir, ray_address, rows, tracker, keys)
            else:
                _run_local(spec, todo, cells_dir, workers, rows, tracker, keys)
    else:
        tracker.report("all cells reused")
    order = [cell_id(c) for c in spec.cells() if cell_id(c) in rows]
    table = pd.DataFrame([rows[c] for c in order])
    if len(table):
        metrics = sorted(c for c in table.columns if c not in spec.grid_keys)
        table = table[spec.grid_keys + metrics]
        for k in spec.grid_keys:
            if k in table and table[k].map(type).nunique() > 1:
                table[k] = table[k].astype(str)
        tmp = out / ".results.parquet.tmp"
        table.to_parquet(tmp, index=False)
        tmp.replace(out / "results.parquet")
    table.attrs["failed"] = list(tracker.failed)
    return table


class _Tracker:
    """Progress of one sweep: the rich bar (cells done / total, failures, elapsed, ETA), the
    ``progress`` callback, and the failed cells of a ``keep_going`` sweep."""

    def __init__(self, spec, console, total: int, reused: int, progress, keep_going: bool, out: Path) -> None:
        self.spec, self.console, self.total, self.done = spec, console, total, reused
        self.progress, self.keep_going, self.name = progress, keep_going, out.name
        self.failed: list[str] = []
        self.bar = self.task = None

    def __enter__(self) -> "_Tracker":
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn("sweep {task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("cells, {task.fields[failed]} failed"), TimeElapsedColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=True,
                            disable=self.console is None or not self.console.is_terminal)
        self.bar.__enter__()
        self.task = self.bar.add_task(self.name, total=self.total, completed=self.done, failed=0)
        self.report("started")
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def report(self, message: str) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total, message)

    def accept(self, cid: str, cell: dict, row: dict, rows: dict) -> None:
        """Record a finished cell (its row, or its failure); raise as :func:`_accept` unless keep_going."""
        self.done += 1
        try:
            rows[cid] = _accept(self.spec, cell, row)
            message = f"cell {cid} done"
        except CellFailed:
            if not self.keep_going:
                raise
            message = f"{cid} {json.dumps(cell, sort_keys=True, default=str)}: {row['_error']}"
            self.failed.append(message)
            message = "FAILED " + message
        if self.bar is not None:
            self.bar.update(self.task, advance=1, failed=len(self.failed))
        self.report(message)


def _accept(spec: SweepSpec, cell: dict, row: dict) -> dict:
    if "_error" in row:
        where = _cell_where(spec, cell)
        if row["_bad_input"]:
            raise ConfigError(where, row["_error"])
        raise CellFailed(f"{where}: {row['_error']} (finished cells are kept; rerun to resume)")
    return row


def _ignore_sigint() -> None:
    # workers leave Ctrl-C to the parent, which terminates them (no traceback per worker)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _registrations() -> tuple[list[str], list, bool]:
    """What this process registered beyond agentsim's own modules, for spawned workers: the
    importable modules outside ``agentsim`` that define registered policy components, generators or
    trace importers (a worker imports them), every policy bundle (data: a worker registers the same),
    and whether the workers must be forks: a registered class lives only here (in ``__main__`` or a
    module a worker cannot import), or the main script has no file to re-run (``python -`` reads it
    from stdin)."""
    import sys

    from agentsim.policies import registry
    from agentsim.traces import generators, importers

    classes = [e.factory for e in registry.components()]
    classes += list(generators.generators().values()) + list(importers.importers().values())
    modules: set[str] = set()
    local = False
    for cls in classes:
        name = getattr(cls, "__module__", None) or ""
        if name == "agentsim" or name.startswith("agentsim."):
            continue
        mod = sys.modules.get(name)
        if name in ("__main__", "__mp_main__") or mod is None or getattr(mod, "__spec__", None) is None:
            local = True
        else:
            modules.add(name)
    # a spawned worker re-runs the main script by its path first: a main read from stdin has none
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.exists(main_file):
        local = True
    return sorted(modules), registry.bundles(), local


def _worker_init(modules: list[str], bundles: list) -> None:
    """A sweep worker's start: SIGINT ignored, then the parent's registrations (see
    :func:`_registrations`)."""
    _ignore_sigint()
    _import_registrations(modules, bundles)


def _import_registrations(modules: list[str], bundles: list) -> None:
    """Import ``modules`` (they register policies, generators, trace importers) and register
    ``bundles``: what :func:`_registrations` found in the calling process."""
    import importlib

    from agentsim.policies import registry

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            # imported in the parent from a path it has dropped since: a cell that needs it fails on
            # its own, naming the component ("unknown route policy ..."), and the others run. (Any other
            # error of the module's is a fault of its own: the worker stops and prints it.)
            continue
    for b in bundles:
        registry.register_bundle(b.name, b.summary, b.params, **b.components)


def _run_local(spec, todo, cells_dir, workers, rows, tracker, keys) -> None:
    """The cells in worker processes on this machine (one process when ``workers`` is 1).

    Workers are fresh interpreters (``spawn``), not forks of this process: a fork copies the locks of
    every thread the parent runs (a notebook or test process that has used vLLM, Ray or torch; rich's
    refresh thread), and a child that finds one taken can crash or hang. They start with SIGINT
    ignored (a terminal's Ctrl-C reaches the whole process group; the parent stops them). A worker
    that dies (killed, e.g. out of memory, or crashed) ends the pool: the cells not finished by then
    fail with that reason (:class:`CellFailed`, or listed as failed with ``keep_going``), and the cells
    finished before are kept. (``multiprocessing.Pool`` would wait for the dead worker's cell for ever.)
    """
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(todo) == 1:
        for cid, cell in todo:
            tracker.accept(cid, cell, _run_cell(spec.base, cell, str(cells_dir / cid), keys[cid]), rows)
        return
    cells = dict(todo)
    finished: set[str] = set()
    modules, bundles, local = _registrations()
    # a policy, generator or trace importer registered only in this process (a notebook, a script's
    # `if __name__ == "__main__":` block) exists in forks alone: then fork, with its risk, as before
    method = "fork" if local else "spawn"
    pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context(method),
                               initializer=_worker_init, initargs=(modules, bundles))
    try:
        # the workers start inside submit(): they inherit SIGINT ignored from birth (before their
        # imports and the initializer), so a Ctrl-C then prints no traceback of theirs
        # (only from the main thread, and only over a handler Python installed: None is one set
        # outside Python, which is left alone)
        main_thread = threading.current_thread() is threading.main_thread()
        old = signal.getsignal(signal.SIGINT) if main_thread else None
        if old is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            futures = [pool.submit(_run_star, (spec.base, cell, str(cells_dir / cid), keys[cid], cid))
                       for cid, cell in todo]
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
        for fut in as_completed(futures):
            cid, row = fut.result()
            finished.add(cid)
            tracker.accept(cid, cells[cid], row, rows)
    except BrokenProcessPool:
        procs = list((getattr(pool, "_processes", None) or {}).values())
        _stop_workers(pool)   # waits for every worker to end: their exit codes are known after it
        why = _why_workers_died(procs)
        lost = [cid for cid, _ in todo if cid not in finished]
        message = f"a worker process {why} before this cell finished (the pool stops)"
        if not tracker.keep_going:
            raise CellFailed(f"{spec.path}: a worker process {why} while running cells; {len(lost)} cells "
                             f"did not finish, {len(rows)} finished cells are kept; rerun to resume") from None
        for cid in lost:
            tracker.accept(cid, cells[cid], {"_error": message, "_bad_input": False}, rows)
        return
    except BaseException:
        _stop_workers(pool)  # Ctrl-C or a failed cell: stop the others now (finished cells are on disk)
        raise
    pool.shutdown(wait=True)


def _why_workers_died(procs: list) -> str:
    """How a broken pool's workers (``multiprocessing`` processes, ended) ended, from their exit codes:
    "was killed by SIGKILL (out of memory?)", "exited with code 1", or "died" when none is known."""
    codes = sorted({p.exitcode for p in procs if p.exitcode is not None})
    # the executor itself ends the other workers with SIGTERM once one has died
    if len(codes) > 1 and -signal.SIGTERM in codes:
        codes.remove(-signal.SIGTERM)
    if not codes:
        return "died"
    parts = []
    for code in codes:
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            parts.append(f"was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else ""))
        elif code == 0:
            parts.append("stopped early (exit code 0: see the error it printed above)")
        else:
            parts.append(f"exited with code {code}")
    return " / ".join(parts)


def _stop_workers(pool) -> None:
    """Terminate ``pool``'s worker processes now and shut it down (cells in progress are lost; their
    directories are written atomically, so none is half-written)."""
    stop = getattr(pool, "terminate_workers", None)   # Python >= 3.14
    if stop is not None:
        stop()
    else:
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def _run_star(args: tuple) -> tuple[str, dict]:
    base, cell, cell_dir, key, cid = args
    return cid, _run_cell(base, cell, cell_dir, key)


RAY_MAX_RETRIES = 3  # Ray's own default for a task whose worker dies (``max_retries``)


def _run_ray_cell(modules: list[str], bundles: list, base: dict, cell: dict, cell_dir: str, key: str) -> dict:
    """A Ray task: the calling process's registrations (as a local worker gets them, see
    :func:`_registrations`; a module this node cannot import is skipped), then :func:`_run_cell`."""
    _import_registrations(modules, bundles)
    return _run_cell(base, cell, cell_dir, key)


def _ray_failure(e: BaseException) -> dict:
    """A Ray error from ``ray.get`` of a cell as a failed cell's row: one line, no traceback
    (``_run_cell`` itself never raises). Its worker or node died (after Ray's retries, up to
    ``RAY_MAX_RETRIES``; out of memory included), the task raised (a registering module failed to
    import on the node, say: its own error), or Ray gave up on it otherwise (cancelled, ...)."""
    from ray.exceptions import NodeDiedError, OutOfMemoryError, RayTaskError, WorkerCrashedError

    def first_line(x: BaseException) -> str:
        text = str(x).strip()
        return f"{type(x).__name__}: {text.splitlines()[0]}" if text else type(x).__name__

    if isinstance(e, RayTaskError):
        cause = e.cause if isinstance(e.cause, BaseException) else e
        why = f"its Ray task raised {first_line(cause)}"
    elif isinstance(e, (WorkerCrashedError, NodeDiedError, OutOfMemoryError)):
        why = f"its Ray worker died ({first_line(e)}); Ray retried it up to {RAY_MAX_RETRIES} times"
    else:
        why = f"Ray gave up on it ({first_line(e)})"
    return {"_error": why, "_bad_input": False}


def _run_ray(spec, todo, cells_dir, address, rows, tracker, keys) -> None:
    """The cells as Ray tasks on the cluster at ``address``.

    A task whose worker process or node dies is retried by Ray (``RAY_MAX_RETRIES`` times); after
    the last try the cell fails like any other (one line, :class:`CellFailed`; listed as failed
    with ``keep_going``), and the tasks still pending are cancelled unless ``keep_going``."""
    try:
        import ray
        from ray.exceptions import RayError
    except ImportError:
        raise ConfigError("--ray", "ray is not installed (pip install 'agentsim[ray]')") from None
    try:
        # Ray's INFO lines ("Connecting to existing Ray cluster ...") would mix with the progress lines
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as e:  # noqa: BLE001 - ray raises ConnectionError, ValueError, RuntimeError ...
        raise ConfigError("--ray", f"cannot join the Ray cluster at {address!r} ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''})") from None
    modules, bundles, _ = _registrations()
    remote = ray.remote(max_retries=RAY_MAX_RETRIES)(_run_ray_cell)
    cells = dict(todo)
    refs = {remote.remote(modules, bundles, spec.base, cell, str((cells_dir / cid).resolve()), keys[cid]): cid
            for cid, cell in todo}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    row = ray.get(ref)
                except RayError as e:
                    row = _ray_failure(e)
                tracker.accept(refs[ref], cells[refs[ref]], row, rows)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


__all__ = ["SweepSpec", "CellFailed", "load_spec", "run_sweep", "cell_config", "cell_id", "cell_key", "check_cell",
           "load_config"]

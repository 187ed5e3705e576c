"""Sweeps: a grid of simulations run in parallel, resumable, combined into one table.

Spec (TOML)::

    [sweep]
    out = "runs/my-sweep"        # where cells and the combined table go
    [base]                       # any run-config table (as for --config); or base_config = "file.toml"
    duration = 120
    [grid]                       # dotted config keys -> lists; the grid is their product
    policy = ["vllm", "least-loaded"]
    "workload.agents" = [100, 200]
    seed = [0, 1]

Each cell is written atomically to ``out/cells/<cell id>/`` (the id hashes the cell's settings),
so an interrupted sweep skips finished cells when run again. The combined table
``out/results.parquet`` has one row per cell: the grid values plus the run summary.
"""

from __future__ import annotations

import itertools
import json
import os
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from agentsim.config import config_from_dict, load_config
from agentsim.errors import ConfigError
from agentsim.workload import stable_id


@dataclass
class SweepSpec:
    path: Path
    out: Path
    base: dict
    grid: dict[str, list]

    @property
    def grid_keys(self) -> list[str]:
        return list(self.grid)

    def cells(self) -> list[dict]:
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(str(path), f"cannot read sweep spec ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"malformed TOML ({e})") from None
    unknown = set(data) - {"sweep", "base", "grid", "base_config"}
    if unknown:
        raise ConfigError(f"{path}: {sorted(unknown)[0]}", "unknown section (known: sweep, base, base_config, grid)")
    sweep = data.get("sweep", {})
    base = data.get("base", {})
    if "base_config" in data:
        bc = (path.parent / data["base_config"]).resolve()
        try:
            base = {**tomllib.loads(bc.read_text()), **base}
        except OSError as e:
            raise ConfigError(f"{path}: base_config", f"cannot read {bc} ({e.strerror})") from None
    grid = data.get("grid", {})
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: grid", "needs at least one key with a list of values")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{path}: grid.{k}", "must be a non-empty list")
    spec = SweepSpec(path, Path(sweep.get("out", f"runs/{path.stem}")), base, grid)
    for cell in spec.cells():  # validate every cell before running any
        cell_config(spec, cell)
    return spec


def _set(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def cell_config(spec: SweepSpec, cell: dict):
    data = json.loads(json.dumps(spec.base))
    for k, v in cell.items():
        _set(data, k, v)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{spec.path}: grid cell {cell}: {e.where}", e.message) from None


def cell_id(cell: dict) -> str:
    return f"{stable_id(json.dumps(cell, sort_keys=True, default=str)):016x}"


def _run_cell(base: dict, cell: dict, cell_dir: str) -> dict:
    """Worker: simulate one cell, write it atomically, return its summary row."""
    from agentsim.metrics import write_results
    from agentsim.sim.runner import run

    data = json.loads(json.dumps(base))
    for k, v in cell.items():
        _set(data, k, v)
    cfg = config_from_dict(data)
    r = run(cfg)
    write_results(cell_dir, r.calls, r.programs, r.engines, r.summary, {**r.manifest, "stats": r.stats, "cell": cell})
    return {**cell, **r.summary}


def run_sweep(spec: SweepSpec, out: Path | None = None, workers: int | None = None,
              ray_address: str | None = None, console=None) -> pd.DataFrame:
    out = Path(out or spec.out)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    todo: list[tuple[str, dict]] = []
    for cell in spec.cells():
        cid = cell_id(cell)
        summ = cells_dir / cid / "summary.json"
        if summ.exists():
            rows[cid] = {**cell, **json.loads(summ.read_text())}
        else:
            todo.append((cid, cell))
    if console is not None and rows:
        console.print(f"resuming: {len(rows)} of {len(rows) + len(todo)} cells already done")
    if todo:
        if ray_address:
            _run_ray(spec, todo, cells_dir, ray_address, rows, console)
        else:
            _run_local(spec, todo, cells_dir, workers, rows, console)
    order = [cell_id(c) for c in spec.cells()]
    table = pd.DataFrame([rows[c] for c in order])
    metrics = sorted(c for c in table.columns if c not in spec.grid)
    table = table[list(spec.grid) + metrics]
    for k in spec.grid:
        if k in table and table[k].map(type).nunique() > 1:
            table[k] = table[k].astype(str)
    tmp = out / ".results.parquet.tmp"
    table.to_parquet(tmp, index=False)
    tmp.replace(out / "results.parquet")
    return table


def _progress(console, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=console is None)


def _run_local(spec, todo, cells_dir, workers, rows, console) -> None:
    workers = workers or os.cpu_count() or 1
    with _progress(console, len(todo)) as bar:
        task = bar.add_task("cells", total=len(todo))
        if workers == 1:
            for cid, cell in todo:
                rows[cid] = _run_cell(spec.base, cell, str(cells_dir / cid))
                bar.advance(task)
            return
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            futs = {pool.submit(_run_cell, spec.base, cell, str(cells_dir / cid)): cid for cid, cell in todo}
            for fut in as_completed(futs):
                rows[futs[fut]] = fut.result()
                bar.advance(task)


def _run_ray(spec, todo, cells_dir, address, rows, console) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray", "ray is not installed (pip install 'agentsim[ray]')") from None
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(_run_cell)
    refs = {remote.remote(spec.base, cell, str((cells_dir / cid).resolve())): cid for cid, cell in todo}
    with _progress(console, len(todo)) as bar:
        task = bar.add_task("cells", total=len(todo))
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                rows[refs[ref]] = ray.get(ref)
                bar.advance(task)


__all__ = ["SweepSpec", "load_spec", "run_sweep", "cell_config", "cell_id", "load_config"]

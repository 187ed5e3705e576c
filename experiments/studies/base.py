"""Shared pieces of the studies: run a study's sweep specs with progress and failures, save figures.

A study's simulations are sweeps (:mod:`agentsim.experiments.sweep`) written under
``<out>/cells/<sweep name>/`` (each a sweep directory: ``sweep.json``, ``results.parquet``,
``cells/<cell id>/`` with the run's ``manifest.json``), so a rerun reuses every finished cell.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from agentsim.experiments.studies import StudyOptions

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from agentsim.experiments.studies import StudyResult


def spec_path(name: str) -> Path:
    """The shipped spec ``experiments/specs/<name>.toml``."""
    return Path(str(resources.files("agentsim.experiments").joinpath("specs", f"{name}.toml")))


def load(name: str, opts: StudyOptions, overrides: dict | None = None):
    """The sweep spec ``name`` with ``--quick``'s grid when ``opts.quick``, and the CLI's ``--set`` values
    (``opts.extra["set"]``) plus ``overrides`` set in its ``[base]``. Raises ConfigError as ``load_spec``."""
    from agentsim.experiments.sweep import load_spec

    sets = {**(opts.extra.get("set") or {}), **(overrides or {})}
    return load_spec(spec_path(name), overrides=sets or None, quick=opts.quick)


def run_specs(out: Path, opts: StudyOptions, specs: list[tuple[str, object]]) -> tuple[dict[str, "pd.DataFrame"], list[str]]:
    """Run sweeps ``[(sweep name, SweepSpec), ...]`` one after another into ``out/cells/<sweep name>``.

    Progress (``opts.progress``) counts cells over all the sweeps. Failed cells do not stop the study:
    they are returned as ``"<sweep>/<cell id> {grid values}: error"`` lines and left out of the tables.
    Each table has the sweep's grid values, the run summary, ``_cell`` (the cell's directory) and
    ``_values`` (the cell's grid values as in the spec: a policy table stays a dict) and ``_config``
    (the cell's whole run config as a nested dict, ``RunConfig.to_dict``).
    """
    from agentsim.experiments.sweep import cell_config, cell_id, run_sweep

    total = sum(len(s.cells()) for _, s in specs)
    offset = 0
    tables: dict = {}
    failed: list[str] = []
    for name, spec in specs:
        def progress(done: int, _total: int, message: str, _off=offset, _name=name) -> None:
            if opts.progress is not None:
                opts.progress(_off + done, total, f"{_name}: {message}")

        sweep_out = out / "cells" / name
        t = run_sweep(spec, out=sweep_out, workers=opts.workers, ray_address=opts.ray_address,
                      progress=progress, keep_going=True)
        failed += [f"{name}/{f}" for f in t.attrs.get("failed", [])]
        bad = {f.split(" ")[0] for f in t.attrs.get("failed", [])}
        ids = [cell_id(c) for c in spec.cells() if cell_id(c) not in bad]
        t = t.copy()
        t["_cell"] = [str(sweep_out / "cells" / cid) for cid in ids] if len(t) else []
        by_id = {cell_id(c): c for c in spec.cells()}
        t["_values"] = [by_id[cid] for cid in ids] if len(t) else []  # the grid values as written (dicts kept)
        t["_config"] = [cell_config(spec, by_id[cid]).to_dict() for cid in ids] if len(t) else []
        tables[name] = t
        offset += len(spec.cells())
    return tables, failed


def run_one(out: Path, opts: StudyOptions, name: str, spec: str) -> tuple["pd.DataFrame", "StudyResult"]:
    """Run study ``name``'s one sweep (``experiments/specs/<spec>.toml``, see :func:`run_specs`) and start its
    result: ``(table, StudyResult)`` with the failed cells; an empty table's result already says that no
    cell finished, so a study returns it as it is."""
    from agentsim.experiments.studies import StudyResult

    tables, failed = run_specs(out, opts, [(name, load(spec, opts))])
    res = StudyResult(name, failed=failed)
    if not len(tables[name]):
        res.findings.append("no cell finished; nothing to analyse")
    return tables[name], res


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (a temporary beside it, then a rename); closes it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    plt.close(fig)
    return path


def figure(*size: float):
    """A new matplotlib figure (Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.figure(figsize=size or (8, 4))


def policy_label(policy) -> str:
    """A short readable name for a policy spec (bundle name, or ``name+route`` for a dict)."""
    if isinstance(policy, str):
        return policy
    if isinstance(policy, dict) and set(policy) <= {"name", "route"} and "route" in policy:
        return policy["route"] if policy.get("name", "vllm") == "vllm" else f"{policy['name']}+{policy['route']}"
    from agentsim.experiments.policy_report import label

    return label(policy)

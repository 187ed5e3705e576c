"""Studies: one command per question (``agentsim study NAME``), each a set of sweeps plus its analysis.

A study is a :class:`Study` registered in :data:`STUDIES`; ``agentsim study NAME [--quick] [-o DIR]``
prepares the output directory, calls ``study.run(out, options)`` and writes what it returns
(:class:`StudyResult`): each table as ``<out>/<key>.csv``, the figures the study saved under ``<out>``,
and ``<out>/study.json`` (kind ``agentsim-study``: study, quick, command, tables, figures, findings,
failed, cells_dir, versions, git_revision, created_utc, wall_s). Studies run their simulations through
the sweep machinery (:mod:`agentsim.experiments.sweep`), so finished cells are reused by a rerun and
``--ray ADDRESS`` runs cells on a Ray cluster.

Each study lives in ``experiments/studies/<name>.py`` (``-`` in a name becomes ``_``) and registers
itself with :func:`register` when imported; this module imports them all.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    import pandas


@dataclass(frozen=True)
class StudyOptions:
    """How to run a study.

    ``quick``: the small grid (CI: seconds to ~2 minutes); ``workers``: local processes for sweep cells;
    ``ray_address``: run cells on that Ray cluster instead; ``progress(done, total, message)``: called as
    cells finish (cells done / total); ``extra``: study-specific options from the CLI (``--set KEY=VALUE``,
    ``--success FILE``, ...).
    """

    quick: bool = False
    workers: int = 1
    ray_address: str | None = None
    progress: Callable[[int, int, str], None] | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class StudyResult:
    """What a study produced.

    ``tables``: name -> DataFrame (written as ``<out>/<name>.csv``); ``figures``: PNG files written under
    the output dir; ``findings``: short sentences computed from the data; ``failed``: ``"cell-id: reason"``
    for each cell that failed.
    """

    name: str
    tables: dict[str, "pandas.DataFrame"] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Study:
    """A registered study: its CLI ``name``, a one-line ``help`` and ``run(out_dir, options)``."""

    name: str
    help: str
    run: Callable[[Path, StudyOptions], StudyResult]


#: name -> study, filled by :func:`register` as the study modules are imported
STUDIES: dict[str, Study] = {}


def register(study: Study) -> Study:
    """Add ``study`` to :data:`STUDIES` (a second registration under the same name replaces the first)."""
    STUDIES[study.name] = study
    return study


#: the study modules imported (and so registered) with this package
MODULES = ("policies", "scaling", "capacity", "scaling_laws", "joint", "fidelity", "disagg")


def _load() -> None:
    for mod in MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # a study module not written yet
            if e.name != f"{__name__}.{mod}":
                raise


_load()

__all__ = ["Study", "StudyOptions", "StudyResult", "STUDIES", "register"]

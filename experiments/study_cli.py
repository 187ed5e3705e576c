"""``agentsim study NAME``: run one registered study (:mod:`agentsim.experiments.studies`) end to end.

The output directory (``-o``, default ``runs/studies/NAME`` or ``runs/studies/NAME-quick``) may be new,
empty, or a previous study of the same name: it then holds only what a study writes --
``study.json``, the ``.agentsim-study`` marker (written first, so an interrupted study is resumable),
``*.csv`` tables, ``*.png`` figures and ``cells/`` (the sweeps, whose finished cells a rerun reuses).
Anything else is refused (:class:`~agentsim.outputs.OutputError`, exit 2) before any cell runs.
Tables and figures of the previous result that this run does not produce again are removed (they were
listed in its ``study.json``).

Progress goes to stderr: a rich bar on a terminal (cells done / total, failures, elapsed, ETA), one
line per finished cell otherwise (logs). The exit status is 1 if any cell failed (the failed cells are
listed at the end), 0 otherwise; bad input is one line and exit 2.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

import typer
import typer.core

from agentsim.errors import AgentsimError, ConfigError
from agentsim.outputs import REPORT_ENTRIES, OutputError, dir_entries

#: the marker file of a study directory (written before any cell runs)
MARKER = ".agentsim-study"


def check_study_dir(out: Path, name: str, quick: bool | None = None) -> list[str]:
    """Check that ``out`` may hold study ``name``'s results (with ``quick`` given, of a run of that kind:
    a ``--quick`` run and a full one never share a directory, their cells would mix); return the
    previous result's table and figure files (from its ``study.json``), which this run replaces.
    Raises OutputError naming ``-o OUT``."""
    where = f"-o {out}"
    entries = dir_entries(out, where, "study directory")
    if not entries:
        return []
    prev = None
    if "study.json" in entries:
        try:
            prev = json.loads((out / "study.json").read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            prev = None
        if not isinstance(prev, dict) or prev.get("kind") != "agentsim-study":
            raise OutputError(where, "holds a study.json agentsim did not write; choose a new or empty directory")
    marker = None
    if MARKER in entries:
        marker = (out / MARKER).read_text().strip()
    if prev is None and marker is None:
        raise OutputError(where, f"holds files agentsim did not write (e.g. {entries[0]!r}); refusing to touch it "
                                 "-- choose a new or empty directory")
    owner = (prev or {}).get("study") or marker
    if owner != name:
        raise OutputError(where, f"holds the results of study {owner!r}, not {name!r}; choose another directory")
    prev_quick = (prev or {}).get("quick")
    if quick is not None and isinstance(prev_quick, bool) and prev_quick != quick:
        had, other = ("--quick", "a full") if prev_quick else ("full", "a --quick")
        raise OutputError(where, f"holds the {had} run of study {name!r}; {other} run goes to its own "
                                 f"directory (default runs/studies/{name}{'' if prev_quick else '-quick'})")
    ours = set((prev or {}).get("tables", {}).values()) | set((prev or {}).get("figures", []))
    for e in entries:
        if e in ("study.json", MARKER, "cells") or e in ours or e in REPORT_ENTRIES or e.startswith("."):
            continue
        if e.endswith((".csv", ".png")) and prev is None:  # written by an interrupted run of this study
            continue
        raise OutputError(where, f"holds files agentsim did not write (e.g. {e!r}); refusing to touch it "
                                 "-- choose a new or empty directory")
    cells = out / "cells"
    if cells.exists() and (cells.is_symlink() or not cells.is_dir()):
        raise OutputError(where, "'cells' is not a directory agentsim wrote; refusing to touch it")
    return sorted(ours)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _versions() -> dict:
    import matplotlib
    import numpy
    import pandas
    import scipy
    import simpy

    import agentsim

    return {"agentsim": agentsim.__version__, "python": platform.python_version(), "simpy": simpy.__version__,
            "numpy": numpy.__version__, "scipy": scipy.__version__, "pandas": pandas.__version__,
            "matplotlib": matplotlib.__version__}


def _git_revision() -> str | None:
    from agentsim.metrics import git_revision  # lazily: pandas is not imported for `agentsim --help`

    return git_revision()


class Progress:
    """The study's progress on stderr: a rich bar on a terminal, one line per event otherwise.

    ETA = (seconds per cell computed so far) x (cells left); cells reused from a previous run
    are not counted in the rate.
    """

    def __init__(self, console, name: str) -> None:
        self.console, self.name = console, name
        self.t0 = time.perf_counter()
        self.first: tuple[int, float] | None = None
        self.failed = 0
        self.bar = self.task = None
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn(f"study {name}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("cells, {task.fields[failed]} failed, ETA {task.fields[eta]}"),
                           TimeElapsedColumn(), TextColumn("{task.description}"), console=console, transient=True)

    def eta(self, done: int, total: int) -> str:
        if self.first is None or done <= self.first[0]:
            return "?" if done < total else "0:00:00"
        rate = (time.perf_counter() - self.first[1]) / (done - self.first[0])
        s = int(rate * (total - done))
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

    def __call__(self, done: int, total: int, message: str) -> None:
        if self.first is None:
            self.first = (done, time.perf_counter())
        if "FAILED" in message:
            self.failed += 1
        eta = self.eta(done, total)
        if self.bar is not None:
            if self.task is None:
                self.bar.start()
                self.task = self.bar.add_task(message[:60], total=total, failed=0, eta="?")
            self.bar.update(self.task, completed=done, total=total, failed=self.failed, eta=eta,
                            description=message[:60])
            if "FAILED" in message:
                from rich.text import Text

                self.bar.console.print(Text.assemble(("failed ", "red"), message.replace("FAILED ", "", 1)),
                                       highlight=False, soft_wrap=True)
        else:
            self.console.print(f"[{done}/{total}] {self.failed} failed, ETA {eta}  {message}",
                               highlight=False, soft_wrap=True, markup=False)

    def close(self) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.stop()


def study_help() -> str:
    """The studies by name with their help lines (for ``agentsim study --help``)."""
    from agentsim.experiments.studies import STUDIES

    width = max(len(n) for n in STUDIES) if STUDIES else 0
    return "\n\n".join(f"{n.ljust(width)}  {s.help}" for n, s in sorted(STUDIES.items()))


#: The studies that read each extra table option (``experiments/studies/joint.py`` reads both,
#: ``policies.py`` the success table for ``topology``).
EXTRA_OPTIONS = {"success": ("joint", "topology"), "prices": ("joint",)}


def run_study(name: str, quick: bool, out: Optional[Path], workers: int, ray_address: Optional[str],
              sets: dict, extra: dict, command: str, console) -> int:
    """Run study ``name`` into ``out``; write its tables, figures and ``study.json``. Returns the exit
    status (1 if any cell failed). Raises ConfigError/OutputError for bad input before any cell runs."""
    from agentsim.experiments.studies import STUDIES, StudyOptions

    if name not in STUDIES:
        raise ConfigError("study NAME", f"unknown study {name!r} (known: {', '.join(sorted(STUDIES))})")
    if workers < 1:
        raise ConfigError("--workers", f"must be >= 1, got {workers}")
    for option, users in EXTRA_OPTIONS.items():   # a table a study never reads is a mistake, not a no-op
        if option in extra and name not in users:
            raise ConfigError(f"--{option}", f"study {name!r} does not read it (only {', '.join(users)})")
    study = STUDIES[name]
    out = Path(out) if out is not None else Path("runs/studies") / (f"{name}-quick" if quick else name)
    previous = check_study_dir(out, name, quick)
    created = not out.exists()  # on bad input, undo what this run made in a new or empty directory
    fresh = created or not any(out.iterdir())
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_text(out / MARKER, name + "\n")
    except OSError as e:
        raise OutputError(f"-o {out}", f"cannot write there ({e.strerror})") from None
    progress = Progress(console, name)
    t0 = time.perf_counter()
    opts = StudyOptions(quick=quick, workers=workers, ray_address=ray_address, progress=progress,
                        extra={**extra, "set": sets})
    try:
        result = study.run(out, opts)
    except AgentsimError:
        # bad input found by the study itself (an option, a file): nothing half-written is left behind
        # in a directory this run created; a previous result or an interrupted run's cells are kept
        if fresh and not (out / "cells").exists():
            for entry in out.iterdir():
                if entry.is_file() and not entry.is_symlink():
                    entry.unlink()
            if created and not any(out.iterdir()):
                out.rmdir()
        raise
    finally:
        progress.close()
    tables = {}
    for key, df in result.tables.items():
        fname = f"{key}.csv"
        tmp = out / f".{fname}.tmp-{os.getpid()}"
        df.to_csv(tmp, index=False)
        tmp.replace(out / fname)
        tables[key] = fname
    figures = [str(Path(f).resolve().relative_to(out.resolve())) for f in result.figures]
    for old in previous:  # a previous result's table or figure this run did not produce again
        if old not in tables.values() and old not in figures and (out / old).is_file():
            (out / old).unlink()
    doc = {"kind": "agentsim-study", "study": name, "quick": quick, "command": command, "tables": tables,
           "figures": figures, "findings": list(result.findings), "failed": list(result.failed),
           "cells_dir": "cells" if (out / "cells").is_dir() else None, "versions": _versions(),
           "git_revision": _git_revision(),
           "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "wall_s": round(time.perf_counter() - t0, 1)}
    _write_text(out / "study.json", json.dumps(doc, indent=2, default=str) + "\n")
    console.print(f"study {name}: {len(tables)} tables, {len(figures)} figures -> {out}/study.json",
                  highlight=False, soft_wrap=True)
    for f in result.findings:
        console.print(f"  - {f}", highlight=False, soft_wrap=True, markup=False)
    if result.failed:
        console.print(f"{len(result.failed)} cell(s) failed (finished cells are kept; rerun to retry them):",
                      highlight=False, soft_wrap=True)
        for f in result.failed:
            console.print(f"  failed: {f}", highlight=False, soft_wrap=True, markup=False)
        return 1
    return 0


STUDY_HELP = "Run a study: its sweeps (resumable), tables, figures, findings and study.json."


class _StudyCommand(typer.core.TyperCommand):
    """``agentsim study``: its help lists the registered studies, imported only when help is shown
    (so other commands do not import every study module)."""

    @property
    def help(self) -> str:
        if not getattr(self, "_full", False):
            return STUDY_HELP
        return STUDY_HELP + "\n\nStudies:\n\n" + study_help()

    @help.setter
    def help(self, value) -> None:
        pass

    def get_help(self, ctx) -> str:
        self._full = True
        return super().get_help(ctx)


def register(app: typer.Typer) -> None:
    """Add ``agentsim study`` to ``app``."""
    from agentsim.commands import err, parse_set_options

    @app.command("study", cls=_StudyCommand, help=STUDY_HELP,
                 context_settings={"help_option_names": ["--help", "-h"]})
    def study(
        name: str = typer.Argument(..., metavar="NAME", help="The study (listed above)."),
        quick: bool = typer.Option(False, "--quick", help="The small grid (CI: seconds to a minute or two)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: "
                                           "runs/studies/NAME, or NAME-quick with --quick); a rerun resumes."),
        workers: int = typer.Option(1, "--workers", "-j", help="Local worker processes for cells, >= 1."),
        ray_address: Optional[str] = typer.Option(None, "--ray", help="Run cells as Ray tasks on this cluster."),
        set_: List[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                       help="Override a \\[base] config field of the study's sweeps (VALUE as TOML); "
                                            "repeatable."),
        success: Optional[Path] = typer.Option(None, "--success", help="joint/topology: task-success table (TOML)."),
        prices: Optional[Path] = typer.Option(None, "--prices", help="joint: GPU price table (TOML, USD per GPU-hour)."),
    ) -> None:
        sets = parse_set_options(set_)
        extra = {k: str(v) for k, v in (("success", success), ("prices", prices)) if v is not None}
        cmd = ["agentsim", "study", name] + (["--quick"] if quick else []) + (["-o", str(out)] if out else [])
        cmd += (["-j", str(workers)] if workers != 1 else []) + (["--ray", ray_address] if ray_address else [])
        cmd += [a for s in set_ for a in ("--set", s)]
        cmd += [a for k, v in extra.items() for a in (f"--{k}", v)]
        code = run_study(name, quick, out, workers, ray_address, sets, extra, shlex.join(cmd), err)
        if code:
            raise typer.Exit(code)

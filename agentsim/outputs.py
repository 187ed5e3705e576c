"""Output paths: what agentsim may write to, checked before any work runs.

The rule (the kind of fault it closes: "an output path is trusted blindly"): agentsim never deletes
or overwrites anything it did not write itself.

- A **result directory** (``simulate -o``, ``live -o``, a sweep cell) may be a new path, an empty
  directory, or a previous agentsim result -- a directory holding ``manifest.json`` (a JSON object
  with ``schema_version``) and nothing but the files agentsim writes there (:data:`RESULT_FILES`).
  A previous result is replaced atomically (written beside it, then swapped by two renames) and the
  CLI says so on stderr; no ``--force`` is needed because re-running into the same directory
  (the default ``runs/latest``) is the everyday workflow and loses nothing the user made.
- Anything else is refused with :class:`OutputError` (one line naming the path, exit code 2):
  an ordinary file, a symbolic link, a directory holding other files, and the current directory
  (or an ancestor of it) unless it is empty -- a directory a shell sits in cannot be swapped.
- A **sweep directory** holds ``sweep.json``, ``results.parquet`` and ``cells/``; anything else
  in it is refused the same way.
- An **output file** (``trace import/export/generate -o``) may be new or a previous agentsim trace
  (canonical Parquet or agentsim JSONL), replaced by ``os.replace``; an existing directory or any
  other file is refused.

The checks here are pure (they read, never write); writers call them again at write time, so a
path that changed while the work ran is still never clobbered.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from agentsim.errors import AgentsimError

#: Files a result directory holds (``agentsim.metrics.write_results`` writes exactly these).
RESULT_FILES = ("calls.parquet", "programs.parquet", "engines.parquet", "links.parquet", "summary.json",
                "manifest.json")  # links.parquet only where links are modelled (agentsim.sim.network)
#: Entries a sweep directory holds (``agentsim.experiments.sweep``).
SWEEP_ENTRIES = ("sweep.json", "results.parquet", "cells")
#: What ``agentsim report DIR`` writes into a run, sweep or study directory by default (``report.html``;
#: ``report.md`` with its figures in ``report_files/``): accepted there beside the directory's own files.
REPORT_ENTRIES = ("report.html", "report.md", "report_files")

NEW, EMPTY, REPLACE = "new", "empty", "replace"


class OutputError(AgentsimError):
    """An output path that agentsim refuses to write (it holds something agentsim did not write)."""


@contextlib.contextmanager
def _os_errors(where: str, what: str = "cannot use this path"):
    """An OSError while a path is checked or probed (a name too long, a loop of symbolic links, a
    read-only file system) becomes :class:`OutputError` naming ``where``: one line, exit code 2."""
    try:
        yield
    except OSError as e:
        raise OutputError(where, f"{what} ({e.strerror or e})") from None


def _where(path: Path, option: str) -> str:
    return f"{option} {path}" if option else str(path)


def _is_cwd_or_ancestor(path: Path) -> bool:
    try:
        p = path.resolve()
        cwd = Path.cwd().resolve()
    except OSError:
        return False
    return p == cwd or p in cwd.parents


#: What the writers add to an output's name for their temporaries beside it (``.NAME.tmp-PID``,
#: ``.NAME.old-PID``: a dot, five characters, a process id of up to 7 digits, with room to spare).
TEMP_NAME_EXTRA = 16


def _check_names(p: Path) -> None:
    """Raise OSError if ``p`` cannot be made where the work will write it: a name still to be made
    longer than its file system allows (``stat`` of a missing path does not say so), counting the
    temporary ``.NAME.tmp-PID`` a writer makes beside the last one (ENAMETOOLONG), or a symbolic link
    on the way that leads nowhere or in a loop (ELOOP). Otherwise the write fails after the work."""
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if parent is None:
        return
    limit = _name_max(parent)
    parts = p.absolute().relative_to(parent).parts
    made = parent
    for k, part in enumerate(parts):
        extra = TEMP_NAME_EXTRA if k == len(parts) - 1 else 0
        if len(os.fsencode(part)) + extra > limit:
            why = " with the temporary .NAME.tmp-PID written beside it" if extra else ""
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG) + why, part)
        made = made / part
        if made.is_symlink() and not made.exists():   # it leads nowhere, or in a loop
            raise OSError(errno.ELOOP, "a symbolic link that leads nowhere or in a loop", str(made))


def _check_parent(p: Path, where: str) -> None:
    """The nearest existing ancestor of ``p`` must be a directory this process can write in."""
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(where, f"{parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(where, f"cannot write in {parent} (permission denied)")
            return


def foreign_report_entry(directory: Path, name: str) -> str | None:
    """Whether the entry ``name`` (one of :data:`REPORT_ENTRIES`) of ``directory`` is what ``agentsim
    report`` writes there: ``report.html`` / ``report.md`` a regular file, ``report_files`` a
    directory of PNG files and nothing else. Returns None if so, else the first entry that is not
    (``report_files/x/y.csv``, ``report.html`` when it is a directory), which agentsim must not
    delete with the directory it sits in."""
    q = directory / name
    try:
        if q.is_symlink():
            return name
        if name != "report_files":
            return None if q.is_file() else name
        if not q.is_dir():
            return name
        for e in sorted(os.scandir(q), key=lambda e: e.name):
            if not (e.is_file(follow_symlinks=False) and e.name.endswith(".png")):
                return f"{name}/{e.name}"
    except OSError:
        return name
    return None


def _foreign_entries(directory: Path, names, allowed) -> list[str]:
    """The entries of ``directory`` (``names``) agentsim did not write: not in ``allowed``, or a
    report entry holding something a report does not write (:func:`foreign_report_entry`)."""
    out = []
    for n in sorted(names):
        if n in REPORT_ENTRIES:
            bad = foreign_report_entry(directory, n)
            if bad is not None:
                out.append(bad)
        elif n not in allowed:
            out.append(n)
    return out


def is_result_dir(path: str | Path) -> bool:
    """True if ``path`` is a directory that agentsim wrote as a run result (and holds nothing else).

    Leftover hidden temporaries of an interrupted write (``.NAME.tmp-PID``) are not inside a
    result directory (they sit beside it), so none are allowed here. A report written into it
    (:data:`REPORT_ENTRIES`) counts only as the files ``agentsim report`` writes: a replaced result
    takes its old report with it, so anything else there (a folder named ``report.html``, a file of
    the user's in ``report_files/``) makes the directory not a result.
    """
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return False
    try:
        names = {e.name for e in os.scandir(p)}
    except OSError:
        return False
    if "manifest.json" not in names or _foreign_entries(p, names, RESULT_FILES):
        return False
    try:
        manifest = json.loads((p / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "schema_version" in manifest


def dir_entries(p: Path, where: str, kind: str) -> list[str] | None:
    """The sorted entry names of an output directory ``p`` about to be written, or None if it does
    not exist (its parent checked). Raises :class:`OutputError` (naming ``where``) for a symbolic
    link, an existing file (not a ``kind``) or an unreadable directory."""
    with _os_errors(where):
        link, exists, is_dir = p.is_symlink(), p.exists(), p.is_dir()
    if link:
        raise OutputError(where, "is a symbolic link; give the directory itself")
    with _os_errors(where):
        _check_names(p)
    if not exists:
        _check_parent(p, where)
        return None
    if not is_dir:
        raise OutputError(where, f"is an existing file, not a {kind}; choose another path")
    try:
        return sorted(e.name for e in os.scandir(p))
    except OSError as e:
        raise OutputError(where, f"cannot read the directory ({e.strerror})") from None


def swap_in(tmp: Path, dest: Path) -> None:
    """Move the finished directory ``tmp`` to ``dest``: rename(2) for a new path or an empty directory
    (it replaces an empty one); a non-empty ``dest`` -- which the caller has checked is a previous
    agentsim output -- is swapped out by two renames and only then deleted, so ``dest`` is never
    missing or half-written."""
    if dest.exists() and any(True for _ in os.scandir(dest)):
        named = dest if dest.name not in ("", ".", "..") else dest.resolve()
        old = named.parent / f".{named.name}.old-{os.getpid()}"
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old)
    else:
        tmp.rename(dest)


def check_result_dir(path: str | Path, option: str = "--out", allow_cwd: bool = False) -> str:
    """Classify a result-directory path: ``"new"``, ``"empty"`` or ``"replace"`` (a previous result).

    Raises :class:`OutputError` naming ``option`` and the path when writing there could lose
    something agentsim did not write: an existing file or symlink, a parent that is a file, a
    non-empty directory that is not a previous result, or the (non-empty) current directory.
    ``allow_cwd`` accepts a current directory holding a previous result (the writer replaces it in
    place, for a live run re-writing its own partial results; a new run is refused it up front).
    """
    p = Path(path)
    where = _where(p, option)
    entries = dir_entries(p, where, "result directory")
    if entries is None:
        return NEW
    if not entries:
        _check_parent(p, where)
        return EMPTY
    if _is_cwd_or_ancestor(p):
        if allow_cwd and is_result_dir(p):
            return REPLACE
        if is_result_dir(p):
            raise OutputError(where, "is the current directory and holds a previous result, which cannot be "
                                     "replaced atomically while a shell sits in it; run from its parent (-o NAME)")
        raise OutputError(where, "is the current directory (or holds it) and is not empty; "
                                 "name a new or empty directory, e.g. -o runs/NAME")
    if is_result_dir(p):
        _check_parent(p, where)
        return REPLACE
    other = _foreign_entries(p, entries, RESULT_FILES) or entries
    raise OutputError(where, f"holds files agentsim did not write (e.g. {other[0]!r}); refusing to touch it "
                             "-- choose a new or empty directory")


def describe(path: str | Path, state: str, done: bool = False) -> str | None:
    """The stderr note for a result path about to be written, or (``done``) just written; None when
    nothing is replaced. A command that can still fail before it writes says it when ``done``: an
    error then stays one line, with no note of a replacement that did not happen."""
    if state != REPLACE:
        return None
    if done:
        return f"note: replaced the previous agentsim result in {path}"
    return f"note: replacing the previous agentsim result in {path} (atomically, when this run is written)"


def preflight_result_dir(path: str | Path, option: str = "--out", done: bool = False) -> str | None:
    """:func:`check_result_dir`, then prove the directory the write will happen in is writable (a
    hidden probe directory is made and removed there). Returns the stderr note (:func:`describe`,
    worded for after the write when ``done``).

    For the CLI, before any work: a run is never computed only to find it cannot be written.
    """
    p = Path(path)
    state = check_result_dir(p, option)
    if state == EMPTY and _is_cwd_or_ancestor(p):
        where_to = p
    elif state == NEW:
        where_to = next(a for a in p.absolute().parents if a.exists())
    else:
        where_to = p.absolute().parent
    probe = where_to / f".agentsim-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise OutputError(_where(p, option), f"cannot write in {where_to} ({e.strerror})") from None
    return describe(p, state, done)


def check_sweep_dir(path: str | Path, option: str = "--out") -> str:
    """Classify a sweep output directory: ``"new"``, ``"empty"`` or ``"replace"`` (a previous sweep).

    A previous sweep holds only :data:`SWEEP_ENTRIES` (and hidden temporaries of its own writes).
    Raises :class:`OutputError` like :func:`check_result_dir`.
    """
    p = Path(path)
    where = _where(p, option)
    entries = dir_entries(p, where, "sweep directory")
    if entries is None:
        return NEW
    if not entries:
        return EMPTY
    other = [e for e in entries if e not in SWEEP_ENTRIES and e not in REPORT_ENTRIES
             and not e.startswith(".results.parquet.tmp")
             and not e.startswith(".sweep.json.tmp")]
    if other:
        raise OutputError(where, f"holds files agentsim did not write (e.g. {other[0]!r}); refusing to touch it "
                                 "-- choose a new or empty directory")
    cells = p / "cells"
    if cells.exists() and (cells.is_symlink() or not cells.is_dir()):
        raise OutputError(f"{where}", "'cells' is not a directory agentsim wrote; refusing to touch it")
    return REPLACE


def check_output_file(path: str | Path, option: str = "--out", is_ours=None) -> str:
    """Classify an output file path: ``"new"`` or ``"replace"`` (a previous agentsim output).

    ``is_ours(path) -> bool`` recognises a file agentsim wrote (default: never). Raises
    :class:`OutputError` for a directory, a symlink, a parent that is a file, or an existing file
    agentsim did not write.
    """
    p = Path(path)
    where = _where(p, option)
    with _os_errors(where):
        link, is_dir, exists = p.is_symlink(), p.is_dir(), p.exists()
        if not link:
            _check_names(p)
    if link:
        raise OutputError(where, "is a symbolic link; give a file path")
    if is_dir:
        raise OutputError(where, "is an existing directory; give a file path")
    if exists:
        if is_ours is not None and is_ours(p):
            return REPLACE
        raise OutputError(where, "exists and is not a file agentsim recognises as its own; refusing to "
                                 "overwrite it -- choose a new path or remove it yourself")
    _check_parent(p, where)
    return NEW


def preflight_output_file(path: str | Path, option: str = "--out", is_ours=None) -> str:
    """:func:`check_output_file`, then prove a file can be made where the write will happen (a hidden
    probe file is made and removed in the nearest existing ancestor directory). Raises
    :class:`OutputError` naming ``option`` and the path before any work: a read-only file system, a
    directory without write permission, a name too long for the file system."""
    p = Path(path)
    where = _where(p, option)
    state = check_output_file(p, option, is_ours)
    probe_writable(p, where)
    return state


def probe_writable(path: str | Path, where: str) -> None:
    """Prove an entry can be made beside ``path`` (where an atomic writer makes its temporary file or
    directory): a hidden probe directory is made and removed in the nearest existing ancestor. Raises
    :class:`OutputError` naming ``where`` if not (read-only file system, permission, a name too
    long), so the work is not done only to find it cannot be written."""
    p = Path(path)
    with _os_errors(where, "cannot write there"):
        _check_names(p)
        parent = next(a for a in p.absolute().parents if a.exists())
        probe = parent / f".agentsim-probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_resumable_dir(path: str | Path, marker: str, option: str = "--out") -> str:
    """Classify a directory a resumable job appends to (``calibrate profile --out``): ``"new"``,
    ``"empty"`` or ``"replace"`` (it holds the job's ``marker`` file, so it is resumed).

    Raises :class:`OutputError` for a file, a symlink, or a non-empty directory without ``marker``.
    """
    p = Path(path)
    where = _where(p, option)
    if p.is_symlink():
        raise OutputError(where, "is a symbolic link; give the directory itself")
    if not p.exists():
        return NEW
    if not p.is_dir():
        raise OutputError(where, "is an existing file, not a job directory; choose another path")
    entries = sorted(e.name for e in os.scandir(p))
    if not entries:
        return EMPTY
    if marker in entries:
        return REPLACE
    raise OutputError(where, f"holds files agentsim did not write (e.g. {entries[0]!r}) and no {marker}; "
                             "refusing to touch it -- choose a new or empty directory")


def is_agentsim_profile(path: str | Path) -> bool:
    """True for a step-time profile JSON agentsim wrote (an object with ``name`` and ``step_time``)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and "name" in obj and "step_time" in obj


def is_parquet(path: str | Path) -> bool:
    """True for a Parquet file (magic bytes ``PAR1`` at both ends)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(-4, os.SEEK_END)
            return head == b"PAR1" and f.read(4) == b"PAR1"
    except OSError:
        return False


def is_agentsim_trace(path: str | Path) -> bool:
    """True for a canonical agentsim trace (Parquet with agentsim metadata) or agentsim JSONL."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(4)
            if head == b"PAR1":
                from agentsim.traces.canonical import read_meta

                read_meta(p)
                return True
            f.seek(0)
            first = f.readline(1 << 20)
        obj = json.loads(first)
        return isinstance(obj, dict) and "agentsim_trace" in obj
    except Exception:  # noqa: BLE001 - anything unreadable is simply not ours
        return False


__all__ = ["OutputError", "RESULT_FILES", "SWEEP_ENTRIES", "REPORT_ENTRIES", "NEW", "EMPTY", "REPLACE", "is_result_dir",
           "check_result_dir", "check_sweep_dir", "check_output_file", "check_resumable_dir", "is_agentsim_trace",
           "is_agentsim_profile", "is_parquet", "describe", "preflight_result_dir", "preflight_output_file",
           "dir_entries", "swap_in", "foreign_report_entry", "probe_writable"]

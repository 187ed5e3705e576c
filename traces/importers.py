"""Importer registry, format detection and the streaming import into canonical Parquet.

Every importer reads its source as a stream and yields :class:`ProgramRecord` objects; a malformed
line, row or record raises :class:`~agentsim.errors.TraceError` naming ``file:line``. With
``skip_bad`` the importer skips it instead and counts it (:attr:`Importer.num_skipped`, the first
few messages in :attr:`Importer.skipped`). Text inputs may be gzip-compressed (detected by their
magic bytes, whatever the suffix).
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

from agentsim.config import Param
from agentsim.errors import ConfigError, TraceError
from agentsim.traces.canonical import ProgramRecord, Trace, TraceWriter, check_program

FORMATS = ("mooncake", "azure", "tau2", "tracelab", "native")
# other names get_importer accepts: "auto" (or None) guesses; canonical Parquet is read by "native"
FORMAT_ALIASES = {"auto": None, "parquet": "native", "canonical": "native"}


def accepted_formats() -> tuple[str, ...]:
    """Every format name :func:`get_importer` accepts (what error texts and config checks list)."""
    return (*FORMATS, *FORMAT_ALIASES)


def open_text(path: str | Path) -> io.TextIOBase:
    """Open a text trace for reading, transparently gunzipping it; newlines are kept as written."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise TraceError(str(path), "no such file") from None
    except OSError as e:
        raise TraceError(str(path), f"cannot read ({e.strerror})") from None
    magic = f.read(2)
    f.seek(0)
    raw = gzip.GzipFile(fileobj=f) if magic == b"\x1f\x8b" else f
    return _TraceText(raw, encoding="utf-8-sig", newline="", path=path)


class _TraceText(io.TextIOWrapper):
    """A trace's text: a read that fails (a truncated or corrupt gzip stream, bytes that are not
    UTF-8, a disk error) raises :class:`TraceError` naming the file, not EOFError -- which the CLI
    framework would report as a Ctrl-C -- or a traceback."""

    def __init__(self, raw, *, path: Path, **kw) -> None:
        super().__init__(raw, **kw)
        self._path = path

    def _failed(self, e: Exception) -> TraceError:
        return TraceError(str(self._path), f"cannot read as text ({e})")

    def __next__(self) -> str:
        try:
            return super().__next__()
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise self._failed(e) from None

    def read(self, size: int | None = -1) -> str:
        try:
            return super().read(size)
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise self._failed(e) from None

    def readline(self, size: int = -1) -> str:
        try:
            return super().readline(size)
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise self._failed(e) from None


class Importer:
    """Base class: options, bad-record accounting and program numbering.

    Subclasses set ``name``, ``OPTIONS`` (option name -> (default, :class:`~agentsim.config.Param`):
    its declared type, range and help, checked before anything is read) and implement
    :meth:`_programs`; ``meta`` may be completed while reading (it is written with the first
    row group, so anything needed for export must be known by then).
    """

    name: ClassVar[str] = ""
    OPTIONS: ClassVar[dict[str, tuple[Any, Param]]] = {}
    MAX_REPORTED = 5

    def __init__(self, path: str | Path, skip_bad: bool = False, **options: Any) -> None:
        self.path = Path(path)
        self.skip_bad = skip_bad
        self.options: dict[str, Any] = {}
        for k, (default, _) in self.OPTIONS.items():
            self.options[k] = default
        for k, v in options.items():
            if v is None:
                continue
            if k not in self.OPTIONS:
                known = ", ".join(self.OPTIONS) or "none"
                raise ConfigError(k, f"not an option of the {self.name} importer (its options: {known})")
            self.options[k] = self.OPTIONS[k][1].check(v, k)
        self.num_skipped = 0
        self.skipped: list[str] = []
        from agentsim.traces.canonical import make_meta

        self.meta = make_meta(self.name, self.path, options=dict(sorted(self.options.items())))

    def bad(self, where: str, message: str) -> None:
        """Report a malformed record: raise, or count it when skipping bad records."""
        if not self.skip_bad:
            raise TraceError(where, message)
        self.num_skipped += 1
        if len(self.skipped) < self.MAX_REPORTED:
            self.skipped.append(f"{where}: {message}")

    def where(self, line: int | str) -> str:
        return f"{self.path}:{line}"

    def json_lines(self, raw: bool = False) -> Iterator[tuple]:
        """(line number, ``file:line``, parsed value) for each non-blank JSONL line, plus the line's
        text when ``raw``; malformed lines go to :meth:`bad`."""
        with open_text(self.path) as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                w = self.where(ln)
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    self.bad(w, f"malformed JSON ({e.msg} at column {e.colno})")
                    continue
                yield (ln, w, obj, line) if raw else (ln, w, obj)

    def programs(self) -> Iterator[ProgramRecord]:
        """The programs, validated, numbered 0..n-1 in the order they are produced."""
        n = 0
        for prog in self._programs():
            prog.program_id = n
            check_program(prog, self.where(prog.key))
            yield prog
            n += 1

    def _programs(self) -> Iterator[ProgramRecord]:
        raise NotImplementedError


_REGISTRY: dict[str, type[Importer]] = {}


def register_importer(cls: type[Importer]) -> type[Importer]:
    _REGISTRY[cls.name] = cls
    return cls


def importers() -> dict[str, type[Importer]]:
    _load()
    return dict(_REGISTRY)


def _load() -> None:
    if len(_REGISTRY) < len(FORMATS):
        from agentsim.traces import azure, mooncake, native, tau2, tracelab  # noqa: F401  (register)


def sniff_format(path: str | Path) -> str:
    """Guess a trace's format from its name and first record."""
    path = Path(path)
    name = path.name.lower()
    for z in (".gz",):
        if name.endswith(z):
            name = name[: -len(z)]
    if name.endswith(".parquet"):
        return "native"
    with open_text(path) as f:
        try:
            head = f.read(65536)
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise TraceError(str(path), f"cannot read as text ({e})") from None
    first = next((ln for ln in head.splitlines() if ln.strip()), "")
    if name.endswith(".csv") or (first and not first.lstrip().startswith(("{", "["))):
        cols = {c.strip() for c in first.split(",")}
        if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= cols:
            return "azure"
        if {"input_len", "output_len", "round_idx"} <= cols:
            return "tracelab"
        raise TraceError(str(path), f"cannot tell the format of a CSV with header {first[:80]!r}; pass a format")
    if name.endswith(".json"):
        return "tau2"
    if head.lstrip().startswith("{") and not _one_json_line(first):
        # one JSON document over several lines (JSONL has one object per line)
        if '"simulations"' in head:
            return "tau2"
        raise TraceError(str(path), "cannot tell the format of this JSON document; pass a format")
    try:
        obj = json.loads(first)
    except ValueError:
        raise TraceError(f"{path}:1", "cannot tell the format (first line is not JSON); pass a format") from None
    if isinstance(obj, dict):
        if "hash_ids" in obj:
            return "mooncake"
        if "round_index" in obj and "input_tokens_total" in obj:
            return "tracelab"
        if "agentsim_trace" in obj or "steps" in obj:
            return "native"
        if "simulations" in obj:
            return "tau2"
    raise TraceError(f"{path}:1", "cannot tell the format from the first record; pass a format")


def _one_json_line(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def get_importer(path: str | Path, fmt: str | None = None, skip_bad: bool = False, **options: Any) -> Importer:
    """An importer for ``path`` (format guessed when ``fmt`` is None or ``"auto"``)."""
    _load()
    if fmt is not None and fmt not in _REGISTRY and fmt not in FORMAT_ALIASES:
        raise ConfigError("format", f"unknown trace format {fmt!r} (known: {', '.join(accepted_formats())})")
    fmt = FORMAT_ALIASES.get(fmt, fmt) if fmt is not None else None
    if fmt is None:
        fmt = sniff_format(path)
    cls = _REGISTRY[fmt]
    return cls(path, skip_bad=skip_bad, **options)


@dataclass
class ImportResult:
    path: Path
    num_programs: int
    num_steps: int
    num_skipped: int
    skipped: list[str]
    meta: dict


def import_trace(src: str | Path, out: str | Path, fmt: str | None = None, skip_bad: bool = False,
                 **options: Any) -> ImportResult:
    """Stream ``src`` into canonical Parquet at ``out``; nothing is written unless it all succeeds."""
    imp = get_importer(src, fmt, skip_bad=skip_bad, **options)
    writer = TraceWriter(out, imp.meta)
    with writer:
        for prog in imp.programs():
            writer.add(prog)
        if writer.num_programs == 0:
            raise TraceError(str(src), "no programs in the trace" + (
                f" ({imp.num_skipped} bad records skipped)" if imp.num_skipped else ""))
        writer.close()
    return ImportResult(Path(out), writer.num_programs, writer.num_steps, imp.num_skipped, imp.skipped, imp.meta)


def load_trace(src: str | Path, fmt: str | None = None, skip_bad: bool = False, **options: Any) -> Trace:
    """Import ``src`` (any format, or canonical Parquet) into memory."""
    imp = get_importer(src, fmt, skip_bad=skip_bad, **options)
    progs = list(imp.programs())
    if not progs:
        raise TraceError(str(src), "no programs in the trace")
    return Trace(imp.meta, progs)

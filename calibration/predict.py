"""``agentsim calibrate predict``: a profile's predicted step time for each row of a CSV of steps.

Input: a CSV file with a header row and at least the columns

- ``prefill_chunks``: the step's prefill chunks, ``;``-separated ``chunk@cached`` items (``chunk``
  new prompt tokens, >= 1, computed over ``cached`` tokens already in the KV cache, >= 0), e.g.
  ``512@0;16@4096``; empty for none;
- ``decode_ctx``: the context length (>= 1 tokens) of each decoding sequence, ``;``-separated;
  empty for none;

and optionally ``num_sampled`` (sequences that sample a token this step; default: every scheduled
sequence, i.e. every chunk finishes its prompt). Every other column is copied through. Output: the
same columns plus ``predicted_ms`` (the shortest decimal that round-trips the float), in input order.

Each row becomes a :class:`agentsim.calibration.profile.BatchShape` (a chunk ``c`` over ``k``
cached tokens has ``c*k + c*(c+1)/2`` causal attention pairs, ``calibration/batch.py``) and is priced
by :meth:`Profile.step_time`, the same call the simulator's engine model uses.

Errors (:class:`ConfigError`, so the CLI prints one line and exits 2) name ``FILE:LINE`` and the
column; the whole input is checked before anything is written, and the output is written
atomically (temporary name, then rename).
"""

from __future__ import annotations

import csv
from pathlib import Path

from agentsim.calibration.batch import attn_pairs
from agentsim.calibration.profile import BatchShape, Profile
from agentsim.errors import ConfigError

REQUIRED = ("prefill_chunks", "decode_ctx")
OUTPUT_COLUMN = "predicted_ms"


def _int(text: str, where: str, column: str, what: str, minimum: int) -> int:
    t = text.strip()
    try:
        v = int(t)
    except ValueError:
        raise ConfigError(where, f"column {column}: {what} {t!r} is not an integer") from None
    if v < minimum:
        raise ConfigError(where, f"column {column}: {what} must be >= {minimum}, got {v}")
    return v


def parse_step(prefill_chunks: str, decode_ctx: str, num_sampled: str | None, where: str) -> BatchShape:
    """The :class:`BatchShape` of one CSV row; raises :class:`ConfigError` naming ``where`` and the column."""
    chunks: list[tuple[int, int]] = []
    if prefill_chunks.strip():
        for item in prefill_chunks.split(";"):
            if "@" not in item:
                raise ConfigError(where, f"column prefill_chunks: {item.strip()!r} is not chunk@cached "
                                         f"(e.g. 512@0)")
            c, k = item.split("@", 1)
            chunks.append((_int(c, where, "prefill_chunks", "chunk", 1),
                           _int(k, where, "prefill_chunks", "cached", 0)))
    ctx = [_int(x, where, "decode_ctx", "context length", 1) for x in decode_ctx.split(";")] if decode_ctx.strip() else []
    if not chunks and not ctx:
        raise ConfigError(where, "columns prefill_chunks and decode_ctx are both empty: a step computes something")
    num_seqs = len(chunks) + len(ctx)
    sampled = -1
    if num_sampled is not None and num_sampled.strip():
        sampled = _int(num_sampled, where, "num_sampled", "count", 0)
        if sampled > num_seqs:
            raise ConfigError(where, f"column num_sampled: {sampled} exceeds the row's {num_seqs} scheduled sequences")
    return BatchShape(
        num_prefill_tokens=sum(c for c, _ in chunks),
        prefill_attn_pairs=sum(attn_pairs(c, k) for c, k in chunks),
        num_decode_seqs=len(ctx),
        decode_ctx_tokens=sum(ctx),
        num_prefill_seqs=len(chunks),
        num_sampled=sampled,
    )


def read_steps(path: Path) -> tuple[list[str], list[list[str]], list[BatchShape]]:
    """Header, rows and batch shapes of a steps CSV (every row checked)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ConfigError(str(path), f"cannot read steps CSV ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "not a UTF-8 text file") from None
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader)
    except StopIteration:
        raise ConfigError(f"{path}:1", f"empty file (expected a header with columns {', '.join(REQUIRED)})") from None
    except csv.Error as e:
        raise ConfigError(f"{path}:1", f"malformed CSV ({e})") from None
    header = [h.strip() for h in header]
    for col in REQUIRED:
        if col not in header:
            raise ConfigError(f"{path}:1", f"missing column {col} (header: {', '.join(header) or 'empty'})")
    if OUTPUT_COLUMN in header:
        raise ConfigError(f"{path}:1", f"column {OUTPUT_COLUMN} is already present (the output adds it)")
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise ConfigError(f"{path}:1", f"column {dup[0]} appears more than once")
    i_pre, i_dec = header.index("prefill_chunks"), header.index("decode_ctx")
    i_smp = header.index("num_sampled") if "num_sampled" in header else None
    rows: list[list[str]] = []
    shapes: list[BatchShape] = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise ConfigError(f"{path}:{reader.line_num}", f"malformed CSV ({e})") from None
        where = f"{path}:{reader.line_num}"
        if not row or all(not f.strip() for f in row) and len(row) <= 1:
            continue  # blank line
        if len(row) != len(header):
            raise ConfigError(where, f"{len(row)} fields, the header has {len(header)}")
        shapes.append(parse_step(row[i_pre], row[i_dec], row[i_smp] if i_smp is not None else None, where))
        rows.append(row)
    if not rows:
        raise ConfigError(str(path), "no step rows after the header")
    return header, rows, shapes


def predict_csv(profile: Profile, steps: Path, out: Path, force: bool = False) -> int:
    """Write ``out`` = ``steps`` + ``predicted_ms`` (``profile.step_time`` of each row, in ms); returns
    the number of rows. Raises :class:`ConfigError` for a bad input row (``FILE:LINE``, column) or an
    existing ``out`` without ``force``; nothing is written then."""
    if out.exists() and not force:
        raise ConfigError(str(out), "exists; pass --force to overwrite it")
    if out.exists() and out.is_dir():
        raise ConfigError(str(out), "is a directory")
    header, rows, shapes = read_steps(steps)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow([*header, OUTPUT_COLUMN])
        for row, shape in zip(rows, shapes):
            w.writerow([*row, repr(profile.step_time(shape) * 1e3)])
    tmp.replace(out)
    return len(rows)

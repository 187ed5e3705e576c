"""Azure LLM inference traces (Splitwise, ISCA'24): CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``.

``TIMESTAMP`` is an absolute wall-clock string with up to 9 fractional digits (the 2023 files
have 7, i.e. 100 ns); it is parsed exactly as integer nanoseconds (Python's ``datetime`` would
drop the seventh digit). Each row becomes a one-call program arriving at its offset from the
first row, with a private prompt (the trace has no content, so no prefix sharing). The first
timestamp, its number of fractional digits and the line terminator are kept in the metadata, and
each row's TIMESTAMP text in its program's ``arrival_text`` (rows may have 7, 3 or no fractional
digits), so that ``agentsim trace export --to azure`` reproduces the file byte for byte.
"""

from __future__ import annotations

import calendar
import csv
import re
from datetime import datetime
from typing import Iterator

from agentsim.traces.canonical import ProgramRecord, llm_step
from agentsim.traces.importers import Importer, open_text, register_importer

_TS = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?$")
COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def parse_timestamp_ns(s: str) -> tuple[int, int]:
    """(nanoseconds since 1970 UTC, number of fractional digits) of ``YYYY-MM-DD HH:MM:SS[.f]``."""
    m = _TS.match(s.strip())
    if not m:
        raise ValueError(f"not a timestamp like 2023-11-16 18:15:46.6805900: {s!r}")
    y, mo, d, h, mi, sec, frac = m.groups()
    try:
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(sec))
    except ValueError as e:
        raise ValueError(f"{s!r}: {e}") from None
    secs = calendar.timegm(dt.timetuple())
    frac = frac or ""
    return secs * 1_000_000_000 + int((frac + "000000000")[:9]), len(frac)


def format_timestamp_ns(ns: int, digits: int) -> str:
    secs, sub = divmod(ns, 1_000_000_000)
    import time

    t = time.gmtime(secs)
    base = time.strftime("%Y-%m-%d %H:%M:%S", t)
    return base + ("." + f"{sub:09d}"[:digits] if digits else "")


@register_importer
class AzureImporter(Importer):
    name = "azure"

    def _programs(self) -> Iterator[ProgramRecord]:
        with open_text(self.path) as f:
            first_line = f.readline()
            self.meta["line_terminator"] = "\r\n" if first_line.endswith("\r\n") else "\n"
            header = next(csv.reader([first_line]), [])
            header = [h.strip() for h in header]
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                from agentsim.errors import TraceError

                raise TraceError(self.where(1), f"missing columns {missing} (header: {','.join(header)})")
            self.meta["header"] = ",".join(header)
            ix = [header.index(c) for c in COLUMNS]
            reader = csv.reader(f)
            t0: int | None = None
            n = 0
            for row in reader:
                ln = reader.line_num + 1
                if not row or all(not c.strip() for c in row):
                    continue
                w = self.where(ln)
                if len(row) != len(header):
                    self.bad(w, f"expected {len(header)} fields, got {len(row)}")
                    continue
                try:
                    ns, digits = parse_timestamp_ns(row[ix[0]])
                except ValueError as e:
                    self.bad(w, f"TIMESTAMP: {e}")
                    continue
                vals = []
                for name, i in zip(COLUMNS[1:], ix[1:]):
                    try:
                        v = int(row[i])
                    except ValueError:
                        v = None
                    if v is None or v < 1:
                        self.bad(w, f"{name}: must be an integer >= 1, got {row[i]!r}")
                        break
                    vals.append(v)
                else:
                    if t0 is None:
                        t0 = ns
                        self.meta["t0"] = row[ix[0]].strip()
                        self.meta["t0_ns"] = ns
                        self.meta["timestamp_digits"] = digits
                    yield ProgramRecord(n, (ns - t0) / 1e9, "azure", f"line {ln}",
                                        [llm_step(0, n, [(n, vals[0])], vals[1])], row[ix[0]].strip())
                    n += 1

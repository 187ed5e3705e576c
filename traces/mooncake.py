"""Mooncake (FAST'25) request traces: JSONL with ``timestamp`` (ms), lengths and prefix ``hash_ids``.

Each line ``{"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, ..., 13]}``
becomes a one-call program arriving at its offset from the first line (a slice cut from later in
a file starts at 0 like the whole file); the first timestamp is kept in the metadata (``t0_ms``)
and each line's timestamp text in the program's ``arrival_text``, so ``agentsim trace export --to
mooncake`` writes the timestamps back as they were (``0.0`` stays ``0.0``). ``hash_ids`` are remapped prefix-block hashes of ``block_size`` (512)
tokens: block i's id encodes blocks 0..i, so one id is one content piece of 512 tokens and the
last piece holds the remainder (``len(hash_ids) == ceil(input_length / 512)``). Ids are
meaningful only inside one file.

Options:

- ``spread``: timestamps come in ~3 s buckets; spread the requests of a bucket evenly over it
  (request i of k at ``t + i * width / k``, width = the gap to the next bucket, or the last gap
  seen for the final bucket), keeping file order.
- ``sessions``: rebuild multi-turn sessions from prefix chains. A request's parent is the most
  recent earlier request holding its last reused block, and it needs at least two shared leading
  blocks (every request shares block 0, a system prompt). Each tree becomes one program whose
  turns are separated by a ``human`` think step lasting the gap between the two timestamps (so a
  replayed turn starts later than in the trace by its parent's service time). This mode holds
  the trace in memory.
- ``block_size``: tokens per hash block (512).
"""

from __future__ import annotations

import math
import re
from typing import Iterator

from agentsim.config import Param
from agentsim.traces.canonical import ProgramRecord, llm_step, tool_step
from agentsim.traces.importers import Importer, register_importer


_TIMESTAMP_TEXT = re.compile(r'"timestamp"\s*:\s*(-?[0-9][0-9.eE+-]*)')


@register_importer
class MooncakeImporter(Importer):
    name = "mooncake"
    OPTIONS = {
        "spread": (False, Param(bool, help="spread requests evenly within their ~3 s timestamp bucket")),
        "sessions": (False, Param(bool, help="rebuild sessions from prefix chains (one program per chain tree)")),
        "block_size": (512, Param(int, ge=1, unit="tokens", help="tokens per hash_ids block")),
    }

    def _requests(self) -> Iterator[tuple[int, float, int, int, list[int], str]]:
        """(line, timestamp ms, input, output, hash_ids, timestamp text) for every valid line, in file order."""
        bs = self.options["block_size"]
        for ln, w, r, line in self.json_lines(raw=True):
            if not isinstance(r, dict):
                self.bad(w, "expected a JSON object")
                continue
            ts, n_in, n_out, hids = (r.get(k) for k in ("timestamp", "input_length", "output_length", "hash_ids"))
            if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
                self.bad(w, f"timestamp: must be a number of ms >= 0, got {ts!r}")
            elif isinstance(n_in, bool) or not isinstance(n_in, int) or n_in < 1:
                self.bad(w, f"input_length: must be an integer >= 1, got {n_in!r}")
            elif isinstance(n_out, bool) or not isinstance(n_out, int) or n_out < 1:
                self.bad(w, f"output_length: must be an integer >= 1, got {n_out!r}")
            elif not isinstance(hids, list) or any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in hids):
                self.bad(w, "hash_ids: must be a list of integers >= 0")
            elif len(hids) != -(-n_in // bs):
                self.bad(w, f"hash_ids: has {len(hids)} ids but input_length {n_in} needs "
                            f"ceil({n_in}/{bs}) = {-(-n_in // bs)}")
            else:
                m = _TIMESTAMP_TEXT.search(line)
                yield ln, ts, n_in, n_out, hids, m.group(1) if m else ""

    def _spread(self, reqs: Iterator[tuple]) -> Iterator[tuple]:
        bucket: list[tuple] = []
        last_width = 0.0
        for r in reqs:
            if bucket and r[1] != bucket[0][1]:
                width = r[1] - bucket[0][1]
                if width > 0:
                    last_width = width
                else:  # timestamps went backwards (e.g. concatenated traces)
                    width = last_width
                yield from _spread_bucket(bucket, width)
                bucket = []
            bucket.append(r)
        if bucket:
            yield from _spread_bucket(bucket, last_width)

    def _pieces(self, n_in: int, hids: list[int]) -> list[tuple[int, int]]:
        bs = self.options["block_size"]
        last = n_in - bs * (len(hids) - 1)
        return [(h, bs) for h in hids[:-1]] + [(hids[-1], last)]

    def _origin(self, ts: float) -> float:
        """The first request's timestamp (ms): every arrival is relative to it (kept as ``t0_ms``)."""
        if "t0_ms" not in self.meta:
            self.meta["t0_ms"] = ts
        return self.meta["t0_ms"]

    def _programs(self) -> Iterator[ProgramRecord]:
        reqs = self._requests()
        if self.options["spread"]:
            reqs = self._spread(reqs)
        if self.options["sessions"]:
            yield from self._sessions(list(reqs))
            return
        for i, (ln, ts, n_in, n_out, hids, text) in enumerate(reqs):
            t0 = self._origin(ts)
            yield ProgramRecord(i, (ts - t0) / 1000.0, "mooncake", f"line {ln}",
                                [llm_step(0, i, self._pieces(n_in, hids), n_out)], text)

    def _sessions(self, reqs: list[tuple]) -> Iterator[ProgramRecord]:
        holder: dict[int, int] = {}   # block id -> index of the latest request holding it
        parent = [-1] * len(reqs)
        for i, (_, _, _, _, hids, _) in enumerate(reqs):
            k = 0
            for h in hids:
                if h in holder:
                    k += 1
                else:
                    break
            if k >= 2:
                parent[i] = holder[hids[k - 1]]
            for h in hids:
                holder[h] = i
        root = list(range(len(reqs)))
        for i in range(len(reqs)):
            if parent[i] >= 0:
                root[i] = root[parent[i]]
        members: dict[int, list[int]] = {}
        for i in range(len(reqs)):
            members.setdefault(root[i], []).append(i)
        order = sorted(members, key=lambda r: (reqs[r][1], r))
        origin = self._origin(reqs[order[0]][1]) if order else 0.0
        for pid, r in enumerate(order):
            steps = []
            step_of: dict[int, int] = {}   # request index -> its LLM step id
            t0 = reqs[r][1]
            for i in members[r]:
                ln, ts, n_in, n_out, hids, _ = reqs[i]
                parents: tuple[int, ...] = ()
                if parent[i] >= 0:
                    gap = max(0.0, (ts - reqs[parent[i]][1]) / 1000.0)
                    steps.append(tool_step(len(steps), pid, "human", gap, (step_of[parent[i]],)))
                    parents = (len(steps) - 1,)
                step_of[i] = len(steps)
                steps.append(llm_step(len(steps), pid, self._pieces(n_in, hids), n_out, parents,
                                      recorded_at=(ts - t0) / 1000.0))
            yield ProgramRecord(pid, (t0 - origin) / 1000.0, "mooncake-session", f"line {reqs[r][0]}", steps,
                                reqs[r][5])


def _spread_bucket(bucket: list[tuple], width: float) -> Iterator[tuple]:
    k = len(bucket)
    for i, (ln, ts, n_in, n_out, hids, text) in enumerate(bucket):
        # a moved request no longer has its source timestamp (exports check the text still fits)
        yield ln, ts + i * width / k, n_in, n_out, hids, text if i == 0 else ""

"""``vllm bench serve`` result files: reading them, and vLLM's serving metrics.

A result file is what ``vllm bench serve --save-result --save-detailed`` (``vllm/benchmarks/serve.py``)
or the older ``benchmarks/benchmark_serving.py --save-result`` writes: one JSON object with the run's
settings (``request_rate``: a number or ``"inf"`` for all requests at once, ``burstiness``,
``max_concurrency``, ``num_prompts``), its summary (``duration`` s, ``completed``,
``request_throughput`` req/s, ``output_throughput`` tok/s, ``mean_ttft_ms``, ``p99_tpot_ms`` ...)
and per-request lists of equal length: ``input_lens``, ``output_lens`` (tokens; 0 for a failed
request), ``ttfts`` (s), ``itls`` (a list of s per request), ``start_times`` (``time.perf_counter()``
when the request was sent, after the ``--max-concurrency`` semaphore; vLLM >= 0.8), ``latencies`` (s)
and ``queue_times`` (s the request waited for that semaphore; recent vLLM). Absent fields are not
compared; ``input_lens`` and ``output_lens`` are required, since without them there is nothing to
replay (``vllm bench serve`` drops the per-request lists unless ``--save-detailed`` is given).

Metric definitions are vLLM's ``calculate_metrics`` (``vllm/benchmarks/serve.py``): only successful
requests count; TTFT = first token - send; E2EL = last token - send; TPOT per request =
(E2EL - TTFT) / (output_len - 1), only for requests with more than one output token; ITL = every gap
between consecutive streamed chunks; throughputs divide by the run's ``duration``; ``pNN`` is
``numpy.percentile``; an empty list gives 0 (``np.mean(x or 0)``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from agentsim.errors import AgentsimError

# The metrics `agentsim validate` compares, with vLLM's names; (key, label, unit).
METRICS: tuple[tuple[str, str, str], ...] = (
    ("duration", "duration", "s"),
    ("request_throughput", "request throughput", "req/s"),
    ("output_throughput", "output throughput", "tok/s"),
    ("mean_ttft_ms", "mean TTFT", "ms"),
    ("median_ttft_ms", "median TTFT", "ms"),
    ("p99_ttft_ms", "p99 TTFT", "ms"),
    ("mean_tpot_ms", "mean TPOT", "ms"),
    ("median_tpot_ms", "median TPOT", "ms"),
    ("p99_tpot_ms", "p99 TPOT", "ms"),
    ("mean_itl_ms", "mean ITL", "ms"),
    ("median_itl_ms", "median ITL", "ms"),
    ("p99_itl_ms", "p99 ITL", "ms"),
    ("mean_e2el_ms", "mean E2EL", "ms"),
    ("median_e2el_ms", "median E2EL", "ms"),
    ("p99_e2el_ms", "p99 E2EL", "ms"),
)
METRIC_KEYS = tuple(k for k, _, _ in METRICS)
_PER_REQUEST = ("input_lens", "output_lens", "ttfts", "itls", "start_times", "latencies", "queue_times")


class BenchError(AgentsimError):
    """A bench result file is unreadable or inconsistent (names the file and the field)."""


@dataclass
class BenchRun:
    """One result file. Per-request lists are ``None`` when the file lacks them (never compared).

    ``request_rate``: requests/s, ``math.inf`` for a burst; ``burstiness``: the gamma shape of the
    inter-arrival times (1 = Poisson); ``max_concurrency``: the client's in-flight limit or None.
    """

    path: str
    input_lens: list[int]
    output_lens: list[int]
    ttfts: list[float] | None
    itls: list[list[float]] | None
    start_times: list[float] | None
    latencies: list[float] | None
    queue_times: list[float] | None
    errors: list[str] | None
    duration: float | None
    request_rate: float
    burstiness: float
    max_concurrency: int | None
    summary: dict[str, float]
    seed: int | None = None

    @property
    def num_requests(self) -> int:
        return len(self.input_lens)

    @property
    def label(self) -> str:
        """Short load description: ``burst N``, ``rate R/s`` and ``cK`` for a concurrency limit."""
        n = self.num_requests
        load = f"burst {n}" if math.isinf(self.request_rate) else f"{self.request_rate:g} req/s x {n}"
        return load + (f" c{self.max_concurrency}" if self.max_concurrency else "")

    def success(self) -> list[bool]:
        """Which requests succeeded: those without error text; in a file without ``errors``, those
        with output tokens (vLLM records 0 output tokens for a failed request)."""
        if self.errors is not None:
            return [not e for e in self.errors]
        return [o > 0 for o in self.output_lens]

    def send_offsets(self) -> list[float] | None:
        """Seconds from the first send to each request's send (from ``start_times``), or None."""
        if self.start_times is None:
            return None
        t0 = min(self.start_times)
        return [t - t0 for t in self.start_times]

    def arrival_offsets(self) -> list[float] | None:
        """Seconds from the first arrival to each request's arrival at the client, before the
        ``--max-concurrency`` semaphore (``start_times - queue_times``), or None without ``start_times``."""
        if self.start_times is None:
            return None
        if self.queue_times is None:
            return self.send_offsets()
        arr = [s - q for s, q in zip(self.start_times, self.queue_times)]
        t0 = min(arr)
        return [a - t0 for a in arr]

    def measured(self) -> dict[str, float]:
        """vLLM's metrics of this run: recomputed from the per-request lists where the file has them
        (so both sides use one definition), else the file's own summary fields."""
        out: dict[str, float] = {}
        ok = self.success()
        if self.ttfts is not None and self.latencies is not None and self.duration:
            itls = self.itls if self.itls is not None else None
            out.update(serving_metrics(
                [self.input_lens[i] for i in range(len(ok)) if ok[i]],
                [self.output_lens[i] for i in range(len(ok)) if ok[i]],
                [self.ttfts[i] for i in range(len(ok)) if ok[i]],
                [self.latencies[i] for i in range(len(ok)) if ok[i]],
                self.duration,
                [itls[i] for i in range(len(ok)) if ok[i]] if itls is not None else None,
            ))
            if itls is None:
                for k in ("mean_itl_ms", "median_itl_ms", "p99_itl_ms"):
                    out.pop(k, None)
        elif self.duration:
            n_ok = sum(ok)
            out["duration"] = self.duration
            out["request_throughput"] = n_ok / self.duration
            out["output_throughput"] = sum(o for o, g in zip(self.output_lens, ok) if g) / self.duration
        for k in METRIC_KEYS:
            if k not in out and k in self.summary:
                out[k] = self.summary[k]
        return out


def serving_metrics(input_lens: Sequence[int], output_lens: Sequence[int], ttfts: Sequence[float],
                    latencies: Sequence[float], duration: float,
                    itls: Sequence[Sequence[float]] | None = None) -> dict[str, float]:
    """vLLM's serving metrics of successful requests (``calculate_metrics`` in ``vllm/benchmarks/serve.py``).

    Inputs per request: prompt and output tokens, TTFT and E2E latency (s), optionally the
    inter-token gaps (s); ``duration``: the run's wall time (s). A request with 0 output tokens has
    TTFT 0 as vLLM records it; one with <= 1 output token has no TPOT. Without ``itls``, each request's
    gaps are taken as its TPOT repeated ``output_len - 1`` times (exact mean ITL when tokens stream
    one per chunk; median/p99 then describe per-request averages, not single gaps).
    Returns ``duration``, ``completed``, ``request_throughput``, ``output_throughput``,
    ``total_token_throughput`` and mean/median/p99 of TTFT, TPOT, ITL, E2EL in ms (vLLM's key names).
    Raises ValueError when the lists differ in length or ``duration`` is not positive.
    """
    n = len(output_lens)
    if not (len(input_lens) == len(ttfts) == len(latencies) == n) or (itls is not None and len(itls) != n):
        raise ValueError("per-request lists differ in length")
    if not duration > 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    tpots = []
    gaps: list[float] = []
    for i in range(n):
        o = output_lens[i]
        if o > 1:
            tpot = (latencies[i] - ttfts[i]) / (o - 1)
            tpots.append(tpot)
            if itls is None:
                gaps.extend([tpot] * (o - 1))
        if itls is not None:
            gaps.extend(itls[i])
    out = {
        "duration": float(duration),
        "completed": float(n),
        "request_throughput": n / duration,
        "output_throughput": float(sum(output_lens)) / duration,
        "total_token_throughput": float(sum(input_lens) + sum(output_lens)) / duration,
    }
    for name, vals in (("ttft", ttfts), ("tpot", tpots), ("itl", gaps), ("e2el", latencies)):
        arr = np.asarray(vals if len(vals) else [0.0], dtype=float)
        out[f"mean_{name}_ms"] = float(np.mean(arr)) * 1000
        out[f"median_{name}_ms"] = float(np.median(arr)) * 1000
        out[f"p99_{name}_ms"] = float(np.percentile(arr, 99)) * 1000
    return out


#: The largest integer a bench file's fields may hold: any larger one is no count of tokens or
#: seconds, and does not convert to a float or an int64 (JSON integers are unbounded).
MAX_JSON_INT = 2 ** 53


def _finite(x) -> bool:
    """A finite JSON number (an integer within :data:`MAX_JSON_INT`, or a finite float)."""
    if isinstance(x, bool):
        return False
    if isinstance(x, int):
        return abs(x) <= MAX_JSON_INT
    return isinstance(x, float) and math.isfinite(x)


def _num(d: dict, key: str, where: str, *, allow_inf: bool = False) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if allow_inf and isinstance(v, str) and v.strip().lower() in ("inf", "infinity"):
        return math.inf
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, int) and not _finite(v)):
        what = 'a number or "inf"' if allow_inf else "a number"
        raise BenchError(f"{where}: {key}", f"must be {what}, got {v!r}"[:200])
    v = float(v)
    if math.isnan(v) or (v < 0):
        raise BenchError(f"{where}: {key}", f"must be >= 0, got {v}")
    return v


def _list(d: dict, key: str, where: str, n: int | None, kind: str) -> list | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, list):
        raise BenchError(f"{where}: {key}", f"must be a list, got {type(v).__name__}")
    if n is not None and len(v) != n:
        raise BenchError(f"{where}: {key}", f"has {len(v)} entries but input_lens has {n}")
    for i, x in enumerate(v):
        if kind == "int":
            ok = isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_JSON_INT
        elif kind == "float":   # seconds: a time or a duration, never negative
            ok = _finite(x) and x >= 0
        elif kind == "floats":
            ok = isinstance(x, list) and all(_finite(y) and y >= 0 for y in x)
        else:
            ok = x is None or isinstance(x, str)
        if not ok:
            raise BenchError(f"{where}: {key}[{i}]", f"bad entry {x!r} (expected {kind})")
    return v


def load_bench(path: str | Path) -> BenchRun:
    """Read one result file; any problem is a :class:`BenchError` naming the file and the field."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise BenchError(where, f"cannot read bench result ({e.strerror})") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchError(f"{where}:{e.lineno}", f"malformed JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise BenchError(where, "not a vllm bench result (expected a JSON object)")
    for key in ("input_lens", "output_lens"):
        if key not in d:
            raise BenchError(f"{where}: {key}", "missing (save results with `vllm bench serve --save-result "
                                                "--save-detailed` to keep the per-request lists)")
    input_lens = _list(d, "input_lens", where, None, "int")
    n = len(input_lens)
    if n == 0:
        raise BenchError(f"{where}: input_lens", "is empty (no requests to replay)")
    if any(x < 1 for x in input_lens):
        i = next(i for i, x in enumerate(input_lens) if x < 1)
        raise BenchError(f"{where}: input_lens[{i}]", "a prompt needs at least one token")
    output_lens = _list(d, "output_lens", where, n, "int")
    lists = {k: _list(d, k, where, n, kind) for k, kind in (
        ("ttfts", "float"), ("itls", "floats"), ("start_times", "float"), ("latencies", "float"),
        ("queue_times", "float"), ("errors", "str"))}
    completed = d.get("completed")
    if completed is not None:
        if isinstance(completed, bool) or not isinstance(completed, int):
            raise BenchError(f"{where}: completed", f"must be an integer, got {completed!r}")
        if completed > n:
            raise BenchError(f"{where}: completed", f"{completed} exceeds the {n} requests in input_lens")
    duration = _num(d, "duration", where)
    if duration is not None and duration <= 0:
        raise BenchError(f"{where}: duration", f"must be > 0, got {duration}")
    rate = _num(d, "request_rate", where, allow_inf=True)
    burst = _num(d, "burstiness", where)
    if burst is not None and burst <= 0:
        raise BenchError(f"{where}: burstiness", f"must be > 0, got {burst}")
    mc = d.get("max_concurrency")
    if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int) or mc < 1):
        raise BenchError(f"{where}: max_concurrency", f"must be a positive integer or null, got {mc!r}")
    if lists["start_times"] is None and rate is None:
        raise BenchError(f"{where}: request_rate", "missing, and no start_times to take arrivals from")
    seed = d.get("seed") if isinstance(d.get("seed"), int) and not isinstance(d.get("seed"), bool) else None
    if lists["start_times"] is None:   # arrivals drawn from the rate (with start_times both are labels)
        if rate is not None and rate <= 0:
            raise BenchError(f"{where}: request_rate", f"must be > 0 requests/s (or \"inf\") to draw arrivals "
                                                       f"from, got {rate:g}")
        if seed is not None and seed < 0:
            raise BenchError(f"{where}: seed", f"must be an integer >= 0 to draw arrivals with, got {seed}")
    summary = {k: float(d[k]) for k in METRIC_KEYS
               if isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool)}
    run = BenchRun(
        path=where, input_lens=input_lens, output_lens=output_lens, ttfts=lists["ttfts"], itls=lists["itls"],
        start_times=lists["start_times"], latencies=lists["latencies"], queue_times=lists["queue_times"],
        errors=lists["errors"], duration=duration, request_rate=math.inf if rate is None else rate,
        burstiness=1.0 if burst is None else burst, max_concurrency=mc, summary=summary, seed=seed,
    )
    if not any(run.success()):   # nothing measured to replay, fit or compare against
        what = "errors" if run.errors is not None else "output_lens"
        raise BenchError(f"{where}: {what}", f"every one of the {n} requests failed (no measurement to use)")
    return run


def bench_result_dict(input_lens: Sequence[int], output_lens: Sequence[int], ttfts: Sequence[float],
                      latencies: Sequence[float], start_times: Sequence[float], duration: float,
                      request_rate: float = math.inf, burstiness: float = 1.0,
                      max_concurrency: int | None = None, queue_times: Sequence[float] | None = None,
                      itls: Sequence[Sequence[float]] | None = None) -> dict[str, Any]:
    """A result in ``vllm bench serve --save-result --save-detailed``'s format (tests, and
    ``agentsim validate`` writing what it simulated)."""
    m = serving_metrics(input_lens, output_lens, ttfts, latencies, duration, itls)
    d: dict[str, Any] = {
        "backend": "agentsim", "num_prompts": len(input_lens),
        "request_rate": "inf" if math.isinf(request_rate) else request_rate,
        "burstiness": burstiness, "max_concurrency": max_concurrency,
        "duration": duration, "completed": len(input_lens), "failed": 0,
        "total_input_tokens": int(sum(input_lens)), "total_output_tokens": int(sum(output_lens)),
        "request_throughput": m["request_throughput"], "output_throughput": m["output_throughput"],
        "total_token_throughput": m["total_token_throughput"],
        "input_lens": list(map(int, input_lens)), "output_lens": list(map(int, output_lens)),
        "ttfts": list(map(float, ttfts)),
        "latencies": list(map(float, latencies)), "start_times": list(map(float, start_times)),
        "errors": ["" for _ in input_lens],
    }
    if itls is not None:
        d["itls"] = [list(map(float, x)) for x in itls]
    if queue_times is not None:
        d["queue_times"] = list(map(float, queue_times))
    for k in METRIC_KEYS:
        if k not in d and k in m:
            d[k] = m[k]
    return d

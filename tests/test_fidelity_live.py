"""agentsim against real `vllm bench serve` results of vLLM's CPU build (issue 14's real check).

Two parts:

* **Stored results** (no vLLM needed): ``tests/data/vllm-bench-cpu`` holds 15 result files that
  ``vllm bench serve --save-result --save-detailed`` wrote against vLLM 0.32's CPU build serving the
  tiny random Llama (5 loads x 3 identical repeats; how they were made: that directory's README),
  plus the same engine's step profile. agentsim must read them exactly as vLLM computed them, and
  ``agentsim calibrate bench`` on one run followed by ``agentsim validate`` must land within the
  bounds below.
* **Live** (needs the vLLM CPU build; ~2-3 min on 2 cores): start the same server, run three small
  benches (a burst of 32 twice, a Poisson load once), calibrate on the first, validate all three.

Why the bounds are what they are (from the stored repeats)
-----------------------------------------------------------
The machine's 2 cores are shared with other work, and the server's 3 processes and the client's
compete for them, so identical runs differ a lot: over 3 repeats of a burst of 128, duration varied
1.39-1.73 s (-9 % / +12 % around the median), mean TTFT 707-864 ms, mean TPOT 14.0-19.4 ms; at
light Poisson load mean TTFT varied 52-513 ms and mean TPOT 1.6-7.4 ms. A simulator calibrated on
one run can therefore not be expected to be closer to another run than the two runs are to each
other. The checks are:

1. the run calibrated on is reproduced within ``FIT_TOL`` = 10 % on duration, output throughput,
   mean TTFT and mean TPOT (the fitter has six host/frontend terms for four numbers; it reached
   1-3 % on the stored burst);
2. a repeat of the same load is within ``(1 + FIT_TOL) * (1 + |calibrated run / repeat - 1|) - 1``
   on each of those metrics: the fit's tolerance compounded with the measured run-to-run
   difference. The repeat sends the same requests, so this checks that the replay of a file
   depends on its requests and arrivals only (the same simulated figures for both runs), and shows
   how far a single measured run can be from the next one: it is not a tighter test of the model;
3. Poisson loads below the server's capacity: duration and output throughput within
   ``POISSON_TOL`` = 20 %. Their duration is mostly the arrival schedule (repeat spread 2-11 %) plus
   the last requests' latency, so a simulator that got the engine's capacity badly wrong (or the
   arrivals) fails it; the burst-calibrated replay of the stored Poisson runs was within 12 %.
   Latency at light load is not bounded: identical stored runs differed by up to 10x in mean TTFT,
   so any bound short of that would be a coin toss; the figures are printed instead.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from agentsim.bench import METRIC_KEYS, load_bench

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "vllm-bench-cpu"
HEADLINE = ("duration", "output_throughput", "mean_ttft_ms", "mean_tpot_ms")
FIT_TOL = 0.10
POISSON_TOL = 0.20
LOADS = ("burst128", "burst128_c16", "poisson10", "poisson30", "poisson30_c8")


def _script():
    """benchmarks/fidelity_cpu.py as a module (its server settings, bench arguments and config)."""
    spec = importlib.util.spec_from_file_location("fidelity_cpu", ROOT / "benchmarks" / "fidelity_cpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


F = _script()


def agentsim(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentsim", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def calibrate_and_validate(tmp: Path, calibrate_on: Path, validate: list[Path]) -> dict[str, dict]:
    """``agentsim calibrate bench`` on one file (starting from the stored step profile), then
    ``agentsim validate`` on ``validate``; returns {file name: metrics} from validation.json."""
    cfg = F.write_config(tmp / "engine.toml", DATA / "profile.json")
    prof = tmp / "calibrated.json"
    r = agentsim("calibrate", "bench", calibrate_on, "-c", cfg, "-o", prof)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads(prof.read_text())["provenance"], "a calibrated profile records where it came from"
    out = tmp / "validation"
    r = agentsim("validate", *validate, "-c", cfg, "--profile", prof, "--out", out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    print(r.stdout)
    assert (out / "validation.png").stat().st_size > 0
    doc = json.loads((out / "validation.json").read_text())
    assert [Path(run["file"]).name for run in doc["runs"]] == [p.name for p in validate]
    return {Path(run["file"]).name: run["metrics"] for run in doc["runs"]}


def check_fitted_and_repeat(metrics: dict[str, dict], fitted: Path, repeats: list[Path]) -> None:
    """Bounds 1 and 2 of the module docstring."""
    base = json.loads(fitted.read_text())
    for k in HEADLINE:
        m = metrics[fitted.name][k]
        assert math.isclose(m["rel_error"], m["simulated"] / m["measured"] - 1, rel_tol=1e-9, abs_tol=1e-12)
        assert abs(m["rel_error"]) <= FIT_TOL, f"{fitted.name} {k}: calibrated on it, off by {m['rel_error']:+.1%}"
    for rep in repeats:
        d = json.loads(rep.read_text())
        for k in HEADLINE:
            noise = abs(base[k] / d[k] - 1)
            bound = (1 + FIT_TOL) * (1 + noise) - 1
            err = metrics[rep.name][k]["rel_error"]
            assert abs(err) <= bound, (
                f"{rep.name} {k}: {err:+.1%}; the runs differ by {noise:.1%}, so the bound is {bound:.1%}")


# ---------------------------------------------------------------------------------------------
# stored results (no vLLM)


def test_stored_results_are_complete_and_read_as_vllm_computed_them():
    files = sorted(DATA.glob("*_r*.json"))
    assert sorted(f.name for f in files) == sorted(f"{load}_r{k}.json" for load in LOADS for k in (1, 2, 3))
    manifest = (DATA / "manifest.tsv").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in manifest[1:]) == [f.name for f in files]
    for f in files:
        assert f.stat().st_size < 200_000, f"{f.name}: keep result files < 200 KB"
        d = json.loads(f.read_text())
        run = load_bench(f)
        assert run.num_requests == d["num_prompts"] == d["completed"] == 128 and d["failed"] == 0
        assert set(run.output_lens) == {32}  # --ignore-eos: every output exactly --random-output-len
        assert run.start_times is not None and run.itls is not None and run.queue_times is not None
        assert (run.max_concurrency is None) == ("_c" not in f.stem)
        assert math.isinf(run.request_rate) == f.stem.startswith("burst")
        # agentsim's metric definitions give vLLM's own numbers from the per-request lists
        measured = run.measured()
        compared = [k for k in METRIC_KEYS if k in d]
        assert len(compared) == len(METRIC_KEYS), f"{f.name}: vLLM saved {compared}"
        for k in compared:
            assert math.isclose(measured[k], d[k], rel_tol=1e-9, abs_tol=1e-9), f"{f.name} {k}: {measured[k]} vs {d[k]}"
    prof = json.loads((DATA / "profile.json").read_text())
    assert prof["kv"]["block_size"] == F.BLOCK_SIZE and prof["model"]["hidden_size"] == F.MODEL_SHAPE["hidden_size"]


def test_stored_burst_calibrated_on_one_repeat_validates_the_others(tmp_path):
    burst = [DATA / f"burst128_r{k}.json" for k in (1, 2, 3)]
    poisson = [DATA / f"{load}_r1.json" for load in ("poisson10", "poisson30", "poisson30_c8")]
    metrics = calibrate_and_validate(tmp_path, burst[0], burst + poisson)
    check_fitted_and_repeat(metrics, burst[0], burst[1:])
    for p in poisson:
        for k in ("duration", "output_throughput"):
            err = metrics[p.name][k]["rel_error"]
            assert abs(err) <= POISSON_TOL, f"{p.name} {k}: {err:+.1%}"


def test_validate_refuses_a_stored_file_without_per_request_lengths(tmp_path):
    d = json.loads((DATA / "burst128_r1.json").read_text())
    del d["output_lens"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    cfg = F.write_config(tmp_path / "engine.toml", DATA / "profile.json")
    out = tmp_path / "v"
    r = agentsim("validate", bad, "-c", cfg, "--out", out)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert str(bad) in line and "output_lens" in line, line
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# live: a real vLLM CPU server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("vllm")
    from agentsim.live.tiny_model import make_tiny_llama

    work = tmp_path_factory.mktemp("fidelity")
    model = make_tiny_llama(work / "model", **F.MODEL_SHAPE)
    with F.Server(model, work / "server.log") as srv:
        yield srv, model, work


def _bench(srv, model: Path, out: Path, n: int, rate: str, mc: int | None) -> Path:
    r = subprocess.run([*F.bench_command(), *F.bench_args(srv, model, n, rate, mc, out, 0)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and out.exists(), r.stdout[-2000:] + r.stderr[-3000:]
    return out


def _warm_up(url: str, n: int = 32) -> None:
    """Two bursts of ``n`` completions first: the first batches of each size after start-up pay
    one-off costs (in one session the first burst of 128 took 1.5 s, the next ones 0.93 s)."""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    # streamed, as `vllm bench serve` asks: the streaming path has first-use costs of its own (after a
    # non-streamed warm-up the first measured burst of 32 still took 0.55 s, the next 0.28 s)
    body = json.dumps({"model": F.SERVED_NAME, "prompt": "warm up " * 16, "max_tokens": 32, "ignore_eos": True,
                       "stream": True}).encode()

    def one(_: int) -> int:
        req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        text = urllib.request.urlopen(req, timeout=120).read().decode()
        return sum(1 for line in text.splitlines() if line.startswith("data: {"))

    for _ in range(2):
        with ThreadPoolExecutor(n) as pool:
            assert all(chunks >= 1 for chunks in pool.map(one, range(n)))


@pytest.mark.slow
def test_live_calibrate_on_one_burst_validate_a_repeat_and_a_poisson_load(server, tmp_path):
    srv, model, work = server
    _warm_up(srv.url)
    a = _bench(srv, model, tmp_path / "burst32_r1.json", 32, "inf", None)
    b = _bench(srv, model, tmp_path / "burst32_r2.json", 32, "inf", None)
    c = _bench(srv, model, tmp_path / "poisson16_c8.json", 48, "16", 8)
    for f in (a, b, c):
        run = load_bench(f)
        assert set(run.output_lens) == {32} and run.start_times is not None
    metrics = calibrate_and_validate(tmp_path, a, [a, b, c])
    check_fitted_and_repeat(metrics, a, [b])
    for k in ("duration", "output_throughput"):
        err = metrics[c.name][k]["rel_error"]
        assert abs(err) <= POISSON_TOL, f"{c.name} {k}: {err:+.1%}"

"""vLLM bench result files, vLLM's metric definitions, the frontend model, `agentsim validate` and
`agentsim calibrate bench`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agentsim.bench import BenchError, BenchRun, load_bench, serving_metrics
from agentsim.calibration.profile import FrontendCosts, profile_from_dict, resolve_profile
from agentsim.config import ClusterSpec, EngineLimits, RunConfig, SimOptions
from agentsim.errors import ConfigError
from agentsim.validate import bench_config, replay, replay_as_bench


def agentsim(*args, cwd=None, timeout=600):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "agentsim", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


BASE = resolve_profile(None, "a100-80gb", "llama-3-8b", 1)


def write(path: Path, d: dict) -> Path:
    path.write_text(json.dumps(d))
    return path


def bench_run(input_lens, output_lens, rate=math.inf, max_concurrency=None, path="mem") -> BenchRun:
    """A run with only the request list and load settings (what a replay needs)."""
    return BenchRun(path=path, input_lens=list(input_lens), output_lens=list(output_lens), ttfts=None, itls=None,
                    start_times=None, latencies=None, queue_times=None, errors=None, duration=None,
                    request_rate=rate, burstiness=1.0, max_concurrency=max_concurrency, summary={})


def simulated_bench_file(path: Path, profile, n=32, rate=math.inf, max_concurrency=None, seed=0) -> Path:
    """Simulate a burst / rate run with ``profile`` and write it as a `vllm bench serve` result."""
    rng = np.random.default_rng(seed)
    run = bench_run(rng.integers(32, 400, n), rng.integers(4, 48, n), rate, max_concurrency, str(path))
    rep = replay(run, bench_config(None), profile, seed)
    return write(path, replay_as_bench(run, rep))


# ---------------------------------------------------------------------- parsing
def test_parse_vllm_bench_serve_format(tmp_path):
    """`vllm bench serve --save-result --save-detailed` (vLLM 0.32): start_times, queue_times, "inf"."""
    d = {
        "date": "20261130-190000", "backend": "vllm", "model_id": "tiny", "num_prompts": 3,
        "request_rate": "inf", "burstiness": 1.0, "max_concurrency": 2,
        "duration": 1.5, "completed": 3, "failed": 0, "total_input_tokens": 60, "total_output_tokens": 9,
        "request_throughput": 2.0, "output_throughput": 6.0, "mean_ttft_ms": 100.0,
        "input_lens": [10, 20, 30], "output_lens": [1, 3, 5], "ttfts": [0.1, 0.2, 0.3],
        "itls": [[], [0.2, 0.2], [0.25, 0.25, 0.25, 0.25]], "latencies": [0.1, 0.6, 1.3],
        "start_times": [100.0, 100.0, 100.2], "queue_times": [0.0, 0.0, 0.2],
        "generated_texts": ["a", "b", "c"], "errors": ["", "", ""],
    }
    run = load_bench(write(tmp_path / "new.json", d))
    assert run.num_requests == 3 and math.isinf(run.request_rate) and run.max_concurrency == 2
    assert run.send_offsets() == [0.0, 0.0, pytest.approx(0.2)]
    assert run.arrival_offsets() == [0.0, 0.0, pytest.approx(0.0)]  # sent late because of the semaphore
    assert run.label == "burst 3 c2"
    m = run.measured()
    assert m["mean_ttft_ms"] == pytest.approx(200.0)  # recomputed from the lists, not the summary's 100
    assert m["mean_itl_ms"] == pytest.approx(1000 * (0.4 + 1.0) / 6)


def test_parse_benchmark_serving_py_format(tmp_path):
    """The older benchmarks/benchmark_serving.py: no start_times/latencies, numeric rate, summary only."""
    d = {
        "backend": "vllm", "model_id": "m", "num_prompts": 4, "request_rate": 2.0, "burstiness": 1.0,
        "max_concurrency": None, "duration": 3.0, "completed": 4, "total_input_tokens": 40,
        "total_output_tokens": 40, "request_throughput": 4 / 3, "output_throughput": 40 / 3,
        "mean_ttft_ms": 50.0, "median_ttft_ms": 45.0, "p99_ttft_ms": 90.0, "mean_tpot_ms": 12.0,
        "input_lens": [10, 10, 10, 10], "output_lens": [10, 10, 10, 10], "ttfts": [0.05] * 4,
        "itls": [[0.012] * 9] * 4, "generated_texts": ["x"] * 4, "errors": [""] * 4,
    }
    run = load_bench(write(tmp_path / "old.json", d))
    assert run.start_times is None and run.request_rate == 2.0 and run.arrival_offsets() is None
    m = run.measured()
    assert m["duration"] == 3.0 and m["output_throughput"] == pytest.approx(40 / 3)
    assert m["mean_ttft_ms"] == 50.0 and m["p99_ttft_ms"] == 90.0 and m["mean_tpot_ms"] == 12.0
    assert "mean_e2el_ms" not in m  # absent fields are not compared


def test_vllm_metric_definitions_by_hand():
    """calculate_metrics in vllm/benchmarks/serve.py, counted by hand: a 0-token output has TTFT 0 and
    no TPOT; TPOT = (latency - ttft) / (output - 1) only for outputs > 1 token; p99 is numpy's."""
    m = serving_metrics(input_lens=[10, 20, 30, 40], output_lens=[1, 3, 5, 0], ttfts=[0.1, 0.2, 0.3, 0.0],
                        latencies=[0.1, 0.6, 1.3, 0.05], duration=2.0)
    assert m["completed"] == 4 and m["request_throughput"] == 2.0
    assert m["output_throughput"] == 4.5 and m["total_token_throughput"] == (100 + 9) / 2
    assert m["mean_ttft_ms"] == pytest.approx(150.0) and m["median_ttft_ms"] == pytest.approx(150.0)
    # TPOTs: (0.6-0.2)/2 = 0.2 and (1.3-0.3)/4 = 0.25; the 1- and 0-token requests have none
    assert m["mean_tpot_ms"] == pytest.approx(225.0) and m["median_tpot_ms"] == pytest.approx(225.0)
    assert m["p99_tpot_ms"] == pytest.approx(1000 * (0.2 + 0.99 * 0.05))
    assert m["mean_e2el_ms"] == pytest.approx(1000 * 2.05 / 4)
    # without itls, each request's gaps are its TPOT repeated: 2 x 0.2 and 4 x 0.25
    assert m["mean_itl_ms"] == pytest.approx(1000 * (0.4 + 1.0) / 6)
    with pytest.raises(ValueError):
        serving_metrics([1], [1, 2], [0.1], [0.2], 1.0)


# ---------------------------------------------------------------------- frontend model
def _burst(profile, n, workers, out_tokens=16):
    cfg = bench_config(None)
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(
        cfg.cluster, engine=dataclasses.replace(cfg.cluster.engine, api_server_count=workers)))
    return replay(bench_run([100] * n, [out_tokens] * n), cfg, profile)


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_frontend_queue_gives_burst_first_token_growth(workers):
    """N requests at once, c API-server workers, setup s each: request k is handed to the engine at
    (floor(k/c)+1)*s, and a first token (its streaming job queued behind every setup job) reaches a
    client no earlier than floor(N/c)*s; every request whose engine first token came before then
    sees it at that same instant (issue 14: the first 68 of a 1280-burst shared one instant)."""
    s = 0.005
    prof = dataclasses.replace(BASE, frontend=FrontendCosts(per_request_s=s))
    n = 200
    rep = _burst(prof, n, workers)
    first = rep.ttfts.min()
    assert first == pytest.approx((n // workers) * s, abs=1e-9)
    assert (np.abs(rep.ttfts - first) < 1e-9).sum() > 1
    small = _burst(prof, 10, workers)
    # a small burst: the engine dominates (its first step), the frontend adds only the setup waves
    assert small.ttfts.min() < first / 5


def test_frontend_handoff_times_follow_fifo_waves():
    from agentsim.sim.runner import Simulation
    from agentsim.workload import Context, Program

    s, c, n = 0.004, 3, 12
    prof = dataclasses.replace(BASE, frontend=FrontendCosts(per_request_s=s))
    cfg = RunConfig(duration=100.0, cluster=ClusterSpec(gpus_per_node=1, engine=EngineLimits(api_server_count=c)),
                    sim=SimOptions(drain=True))

    def body(pc):
        yield pc.llm(Context.of(pc.segment(50)), 2)

    sim = Simulation(cfg, prof, programs=[Program(i, i, "b", 0.0, body) for i in range(n)])
    handed = []
    orig = sim.engines[0].add_call
    sim.engines[0].add_call = lambda call: (handed.append(sim.env.now), orig(call))
    sim.run()
    assert handed == pytest.approx([(k // c + 1) * s for k in range(n)], abs=1e-12)


def test_frontend_off_is_the_old_path_and_profile_roundtrip():
    d = BASE.to_dict()
    assert "frontend" not in d  # all zero: not written, profiles stay byte-identical
    on = dataclasses.replace(BASE, frontend=FrontendCosts(0.001, 2e-6, 3e-5, 4e-4))
    assert profile_from_dict(on.to_dict()).frontend == on.frontend
    bad = {**on.to_dict(), "frontend": {"per_request_s": -1.0}}
    with pytest.raises(ConfigError, match="frontend.per_request_s"):
        profile_from_dict(bad, "p.json")
    with pytest.raises(ConfigError, match="frontend.per_token"):
        profile_from_dict({**on.to_dict(), "frontend": {"per_token": 1.0}}, "p.json")
    # zero costs: no frontend built, results equal a run of the same requests without the field
    run = bench_run([64] * 8, [8] * 8)
    a = replay(run, bench_config(None), BASE)
    b = replay(run, bench_config(None), dataclasses.replace(BASE, frontend=FrontendCosts()))
    assert a.ttfts.tolist() == b.ttfts.tolist() and a.latencies.tolist() == b.latencies.tolist()


def test_frontend_output_cost_delays_first_and_last_token():
    """An idle frontend adds one token's cost to the first and to the last token, not n of them."""
    c = 0.002
    run = bench_run([64], [20])
    a = replay(run, bench_config(None), BASE)
    b = replay(run, bench_config(None), dataclasses.replace(BASE, frontend=FrontendCosts(per_output_token_s=c)))
    assert b.ttfts[0] == pytest.approx(a.ttfts[0] + c, abs=1e-12)
    assert b.latencies[0] == pytest.approx(a.latencies[0] + c, abs=1e-12)


def test_frontend_transport_delays_without_holding_a_worker():
    """transport_s: the way in and the way back of a request (and of its outputs) add 2 x transport to
    TTFT and E2E; it does not serialise a burst (no worker is held)."""
    tr = 0.01
    prof = dataclasses.replace(BASE, frontend=FrontendCosts(transport_s=tr))
    run = bench_run([64], [20])
    a = replay(run, bench_config(None), BASE)
    b = replay(run, bench_config(None), prof)
    assert b.ttfts[0] == pytest.approx(a.ttfts[0] + 2 * tr, abs=1e-12)
    assert b.latencies[0] == pytest.approx(a.latencies[0] + 2 * tr, abs=1e-12)
    burst = bench_run([64] * 50, [4] * 50)
    a = replay(burst, bench_config(None), BASE)
    b = replay(burst, bench_config(None), prof)
    assert b.ttfts.tolist() == pytest.approx((a.ttfts + 2 * tr).tolist(), abs=1e-9)


# ---------------------------------------------------------------------- agentsim validate
def test_validate_own_simulation_has_zero_error(tmp_path):
    prof = dataclasses.replace(BASE, frontend=FrontendCosts(per_request_s=1e-3, per_output_token_s=1e-5))
    prof_path = tmp_path / "prof.json"
    prof.save(prof_path)
    f1 = simulated_bench_file(tmp_path / "burst.json", prof, n=40)
    f2 = simulated_bench_file(tmp_path / "rate.json", prof, n=30, rate=6.0, max_concurrency=8, seed=1)
    out = tmp_path / "val"
    p = agentsim("validate", f1, f2, "--profile", prof_path, "--out", out)
    assert p.returncode == 0, p.stderr
    assert "mean TTFT" in p.stdout and "burst 40" in p.stdout
    rep = json.loads((out / "validation.json").read_text())
    assert [Path(r["file"]).name for r in rep["runs"]] == ["burst.json", "rate.json"]
    for r in rep["runs"]:
        for key in ("duration", "output_throughput", "request_throughput", "mean_ttft_ms", "p99_ttft_ms",
                    "mean_tpot_ms", "median_tpot_ms", "mean_itl_ms", "mean_e2el_ms", "p99_e2el_ms"):
            v = r["metrics"][key]
            assert set(v) == {"measured", "simulated", "rel_error"}
            assert abs(v["rel_error"]) < 1e-9, (r["file"], key, v)
    assert (out / "validation.png").stat().st_size > 1000
    # a second run replaces the previous validation; a directory with other files is refused
    assert agentsim("validate", f1, "--profile", prof_path, "--out", out).returncode == 0
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    p = agentsim("validate", f1, "--profile", prof_path, "--out", other)
    assert p.returncode == 2 and (other / "notes.txt").read_text() == "keep"
    assert len(os.listdir(other)) == 1


GOOD = {"request_rate": "inf", "duration": 1.0, "input_lens": [10, 12], "output_lens": [3, 4],
        "ttfts": [0.1, 0.1], "latencies": [0.3, 0.4], "start_times": [5.0, 5.0]}


@pytest.mark.parametrize("change, field", [
    ({"input_lens": None}, "input_lens"),
    ({"output_lens": None}, "output_lens"),
    ({"output_lens": [3]}, "output_lens"),
    ({"ttfts": [0.1, 0.1, 0.2]}, "ttfts"),
    ({"start_times": [5.0]}, "start_times"),
    ({"request_rate": "fast"}, "request_rate"),
    ({"input_lens": [10, "x"]}, "input_lens[1]"),
    ({"max_concurrency": 0}, "max_concurrency"),
    ({"burstiness": -1}, "burstiness"),
    # a rate of 0 with no start_times to take arrivals from (a division by zero before)
    ({"request_rate": 0, "start_times": None}, "request_rate"),
    ({"seed": -1, "request_rate": 5.0, "start_times": None}, "seed"),
    # JSON integers are unbounded: beyond any count, and no float or int64 holds them
    ({"input_lens": [10, 10 ** 30]}, "input_lens[1]"),
    ({"duration": 10 ** 400}, "duration"),
    ({"latencies": [0.3, 10 ** 400]}, "latencies[1]"),
])
def test_bad_bench_file_exits_2_one_line(tmp_path, change, field):
    d = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    f = write(tmp_path / "bad.json", d)
    out = tmp_path / "val"
    p = agentsim("validate", f, "--out", out)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and str(f) in lines[0] and field in lines[0], p.stderr
    assert not out.exists()


def test_bad_config_and_malformed_json_exit_2(tmp_path):
    f = write(tmp_path / "ok.json", GOOD)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[cluster.engine]\nmax_num_seqz = 4\n")
    out = tmp_path / "val"
    p = agentsim("validate", f, "-c", cfg, "--out", out)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert str(cfg) in p.stderr and "cluster.engine.max_num_seqz" in p.stderr and not out.exists()
    broken = tmp_path / "broken.json"
    broken.write_text('{"input_lens": [1,\n')
    p = agentsim("validate", broken, "--out", out)
    assert p.returncode == 2 and f"{broken}:" in p.stderr and not out.exists()
    with pytest.raises(BenchError, match="output_lens"):
        load_bench(write(tmp_path / "x.json", {**GOOD, "output_lens": [1, 2, 3]}))
    long = write(tmp_path / "long.json", {**GOOD, "input_lens": [10, 9000]})
    p = agentsim("validate", long, "--out", out)
    assert p.returncode == 2 and f"{long}: input_lens[1]" in p.stderr and "max_model_len" in p.stderr
    assert not out.exists()


def test_max_concurrency_limits_requests_in_flight():
    run = bench_run([64] * 12, [16] * 12, max_concurrency=3)
    rep = replay(run, bench_config(None), BASE)
    ends = rep.send_at + rep.latencies
    for t in rep.send_at:
        in_flight = ((rep.send_at <= t + 1e-12) & (ends > t + 1e-12)).sum()
        assert in_flight <= 3
    assert sorted(rep.send_at)[3] > 0  # the fourth request waited for a slot


# ---------------------------------------------------------------------- agentsim calibrate bench
def _truth():
    return dataclasses.replace(
        BASE, coefficients=dataclasses.replace(BASE.coefficients, const=BASE.coefficients.const * 1.5),
        frontend=FrontendCosts(per_request_s=2e-3, per_output_token_s=2e-5))


def test_calibrate_bench_recovers_known_terms(tmp_path):
    from agentsim.calibration.bench import fit_terms, run_errors

    truth = _truth()
    files = [simulated_bench_file(tmp_path / "a.json", truth, n=48, seed=1),
             simulated_bench_file(tmp_path / "b.json", truth, n=16, seed=2),
             simulated_bench_file(tmp_path / "c.json", truth, n=40, rate=8.0, max_concurrency=8, seed=3)]
    runs = [load_bench(f) for f in files]
    cfg = bench_config(None)
    fitted, nfev = fit_terms(BASE, runs, cfg, ["const", "per_request_s", "per_output_token_s"])
    # the well-determined terms come back; per_output_token_s is weakly determined by these short runs
    assert fitted.coefficients.const == pytest.approx(truth.coefficients.const, rel=0.03)
    assert fitted.frontend.per_request_s == pytest.approx(2e-3, rel=0.15)
    errs = run_errors(fitted, runs, cfg)
    assert max(abs(v) for e in errs for v in e.values()) < 0.01
    before = run_errors(BASE, runs, cfg)
    assert max(abs(v) for e in before for v in e.values()) > 0.1
    again, _ = fit_terms(BASE, runs, cfg, ["const", "per_request_s", "per_output_token_s"])
    assert again == fitted  # deterministic


def test_calibrate_bench_cli_writes_profile_with_provenance(tmp_path):
    truth = _truth()
    train = simulated_bench_file(tmp_path / "train.json", truth, n=40, seed=4)
    held = simulated_bench_file(tmp_path / "held.json", truth, n=24, seed=5)
    out = tmp_path / "fitted.json"
    p = agentsim("calibrate", "bench", train, "--holdout", held, "-o", out, "--max-evaluations", "40")
    assert p.returncode == 0, p.stderr
    assert "cross-validated error" in p.stdout
    prof = json.loads(out.read_text())
    bf = prof["provenance"]["bench_fit"]
    assert bf["files"] == [str(train)] and bf["holdout_files"] == [str(held)] and bf["cv"] == "holdout"
    assert set(bf["terms"]) >= {"const", "per_request_s", "per_prompt_token_s", "per_output_token_s"}
    # one training file cannot pin six terms down: the train error is small, the held-out one is reported
    assert prof["frontend"]["per_request_s"] > 0 and bf["train_error"]["max_abs"] < 0.05
    assert math.isfinite(bf["cv_error"]["max_abs"]) and bf["per_file_cv_error"][0]["file"] == str(held)
    # never overwritten without --force
    before = out.read_text()
    p = agentsim("calibrate", "bench", train, "-o", out)
    assert p.returncode == 2 and "--force" in p.stderr and out.read_text() == before


# ---------------------------------------------------------------------- real vLLM runs (CPU build)
REAL = Path(__file__).parent / "data" / "vllm-bench-cpu"


def _real_config(tmp_path: Path) -> RunConfig:
    """The engine settings benchmarks/fidelity_cpu.py served the tiny model with."""
    cfg = tmp_path / "engine.toml"
    cfg.write_text(f'[cluster]\ngpus_per_node = 1\nprofile = "{REAL / "profile.json"}"\n'
                   "[cluster.engine]\nblock_size = 32\nmax_num_batched_tokens = 2048\nmax_num_seqs = 64\n"
                   "max_model_len = 2048\n")
    return bench_config(cfg)


def test_calibrated_on_real_runs_predicts_other_repeats_within_their_spread(tmp_path):
    """`vllm bench serve` on vLLM's CPU build (5 loads x 3 repeats, tests/data/vllm-bench-cpu): fit the
    host and frontend terms on the first repeat of every load, then predict the other repeats. The
    bound is the measurement's own repeatability: each metric's median out-of-sample |error| must be
    within 1.5x the median |difference| between a repeat and the mean of the same load's other
    repeats (on the stored files: 2.5 % in duration, 48 % in mean TTFT, 15 % in mean TPOT), and the
    fit must improve duration and mean TPOT over the uncalibrated step profile (measured: 2.7 % -> 1.7 %
    and 37.5 % -> 10.9 %). Mean TTFT is NOT required to improve: fitted to the bursts' queueing, the
    frontend terms over-price light-load TTFT, which on 2 shared cores is mostly process wake-up
    (measured: 52.8 % -> 69.9 %, both within the repeats' own 1.5 x 48 %); README "Fidelity" says so."""
    from agentsim.calibration.bench import FRONTEND_TERMS, fit_terms, run_errors, step_terms
    from agentsim.calibration.profile import load_profile

    files = sorted(REAL.glob("*_r[0-9].json"))
    runs = {f.stem: load_bench(f) for f in files}
    loads = sorted({n.rsplit("_r", 1)[0] for n in runs})
    assert len(loads) >= 4 and all(f"{ld}_r1" in runs and f"{ld}_r2" in runs for ld in loads)
    cfg = _real_config(tmp_path)
    start = load_profile(REAL / "profile.json")
    train = [runs[f"{ld}_r1"] for ld in loads]
    test_names = [n for n in runs if not n.endswith("_r1")]
    fitted, _ = fit_terms(start, train, cfg, step_terms(start) + list(FRONTEND_TERMS))
    after = run_errors(fitted, [runs[n] for n in test_names], cfg)
    before = run_errors(start, [runs[n] for n in test_names], cfg)
    for metric in ("duration", "mean_ttft_ms", "mean_tpot_ms"):
        spread = []
        for n in test_names:
            load = n.rsplit("_r", 1)[0]
            others = [runs[m].measured()[metric] for m in runs if m.rsplit("_r", 1)[0] == load and m != n]
            spread.append(abs(runs[n].measured()[metric] / np.mean(others) - 1))
        err = np.median([abs(e[metric]) for e in after])
        print(f"{metric}: median |error| over the held-out repeats {np.median([abs(e[metric]) for e in before]):.1%} "
              f"uncalibrated, {err:.1%} calibrated; repeat-to-repeat {np.median(spread):.1%}")
        assert err <= 1.5 * np.median(spread), (metric, err, np.median(spread))
        if metric != "mean_ttft_ms":
            assert err <= np.median([abs(e[metric]) for e in before]) + 1e-9, metric

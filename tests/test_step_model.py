"""The step-time model (host terms and the linear layers' knee), its fit, profile format v2 / v1,
``agentsim calibrate show`` term shares and ``agentsim calibrate predict``."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agentsim.calibration.batch import BatchShape as ChunkShape
from agentsim.calibration.build_profiles import BUILDS
from agentsim.calibration.fit import (
    HOST_TERMS, as_features, error_stats, fit_step_time, predict_many,
)
from agentsim.calibration.layerwise import Assumptions, LayerwiseStepModel
from agentsim.calibration.models import LLAMA3_8B
from agentsim.calibration.profile import (
    COEFFICIENTS, COEFFICIENTS_V1, STEP_TIME_FIELDS, BatchShape, StepTimeCoefficients, load_profile,
    profile_from_dict, shipped_profiles,
)
from agentsim.calibration.hardware import GPUS
from agentsim.calibration.report import SHARE_SHAPES, TERM_LABELS, term_shares
from agentsim.errors import ConfigError

DEFAULT = "a100-80gb_llama-3-8b_tp1"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentsim", *args], capture_output=True, text=True, timeout=120)


def zero(**kw) -> StepTimeCoefficients:
    return StepTimeCoefficients(**{**{k: 0.0 for k in STEP_TIME_FIELDS}, **kw})


TRUE = StepTimeCoefficients(
    const=2e-3, per_prefill_token=3e-6, per_prefill_attn_pair=2e-10, per_decode_seq=1e-5,
    per_decode_ctx_token=4e-8, per_scheduled_seq=2.5e-5, per_sampled_token=4e-5, per_batched_token=2e-5,
    knee_tokens=300.0,
)


def random_shapes(n: int, seed: int) -> list[BatchShape]:
    """Heterogeneous steps: 0-3 prefill chunks, 0-256 decodes, a random number of them sampling."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        chunks = [(int(rng.integers(1, 2048)), int(rng.integers(0, 4096))) for _ in range(int(rng.integers(0, 4)))]
        ctx = rng.integers(1, 8192, int(rng.choice([0, 1, 3, 16, 64, 256]))).tolist()
        seqs = len(chunks) + len(ctx)
        if seqs == 0:
            continue
        out.append(BatchShape(
            num_prefill_tokens=sum(c for c, _ in chunks),
            prefill_attn_pairs=sum(c * k + c * (c + 1) // 2 for c, k in chunks),
            num_decode_seqs=len(ctx), decode_ctx_tokens=int(sum(ctx)), num_prefill_seqs=len(chunks),
            num_sampled=int(rng.integers(0, seqs + 1)) if rng.random() < 0.7 else -1,
        ))
    return out


# --------------------------------------------------------------------------- the form
def test_linear_term_is_flat_below_the_knee_and_linear_above():
    c = zero(per_batched_token=1e-6, knee_tokens=256)
    below = [c.predict(n, 0, 0, 0, 1) for n in (1, 16, 100, 256)]
    assert below == [256e-6] * 4
    # above the knee each extra batched token (prefill token or decode sequence) costs the slope
    assert c.predict(512, 0, 0, 0, 1) == pytest.approx(512e-6, rel=1e-12)
    assert c.predict(1000, 0, 24, 24_000, 1) == pytest.approx(1024e-6, rel=1e-12)
    assert c.predict(0, 0, 300, 300_000) - c.predict(0, 0, 299, 299_000) == pytest.approx(1e-6, rel=1e-9)


def test_host_terms_count_scheduled_sequences_and_sampled_tokens():
    c = zero(per_scheduled_seq=10e-6, per_sampled_token=30e-6)
    # 2 prefill chunks + 5 decodes, everyone samples (-1): 7 x 10 us + 7 x 30 us
    assert c.predict(600, 0, 5, 5000, 2) == pytest.approx(7 * 40e-6)
    # a chunk that does not finish its prompt does not sample: 6 sampled
    assert c.predict(600, 0, 5, 5000, 2, 6) == pytest.approx(7 * 10e-6 + 6 * 30e-6)


def test_step_time_step_seconds_terms_and_predict_many_agree():
    p = load_profile(shipped_profiles()[DEFAULT])
    shapes = random_shapes(200, 3)
    feats = as_features(shapes)
    many = predict_many(p.coefficients, shapes)
    for s, f, m in zip(shapes, feats, many):
        t = p.step_time(s)
        assert t == p.step_seconds(s.num_prefill_tokens, s.prefill_attn_pairs, s.num_decode_seqs,
                                   s.decode_ctx_tokens, s.num_prefill_seqs, s.num_sampled)
        assert sum(p.coefficients.terms(s).values()) == pytest.approx(t, rel=1e-12)
        assert m == pytest.approx(t, rel=1e-12)
        assert f[5] == (s.num_sampled if s.num_sampled >= 0 else s.num_prefill_seqs + s.num_decode_seqs)


# --------------------------------------------------------------------------- the fit
def test_fit_recovers_every_term_and_the_knee_from_synthetic_steps():
    shapes = random_shapes(300, 0)
    y = predict_many(TRUE, shapes)
    got = fit_step_time(shapes, y)
    assert got.knee_tokens == TRUE.knee_tokens
    for k in COEFFICIENTS:
        assert getattr(got, k) == pytest.approx(getattr(TRUE, k), rel=1e-6), k
    assert error_stats(predict_many(got, shapes), y).max < 1e-9


def test_fit_is_non_negative_and_deterministic():
    # time falls as decode context grows and as sequences are added: least squares would go negative
    shapes = [BatchShape(num_decode_seqs=b, decode_ctx_tokens=b * x) for b in (1, 2, 4) for x in (100, 5000, 50000)]
    y = np.array([10.0, 9.5, 9.0, 9.6, 9.1, 8.6, 9.2, 8.7, 8.2]) * 1e-3
    c = fit_step_time(shapes, y)
    assert min(getattr(c, k) for k in STEP_TIME_FIELDS) >= 0
    assert fit_step_time(shapes, y) == c
    with pytest.raises(ConfigError, match="points"):
        fit_step_time(shapes[:5], y[:5])
    with pytest.raises(ConfigError, match="points"):
        fit_step_time(shapes, np.r_[y[:-1], 0.0])
    with pytest.raises(ConfigError, match="terms"):
        fit_step_time(shapes, y, terms=["per_flop"])


def test_fit_of_host_terms_keeps_the_other_terms_of_the_base():
    shapes = random_shapes(100, 1)
    base = StepTimeCoefficients(**{k: getattr(TRUE, k) for k in STEP_TIME_FIELDS if k not in HOST_TERMS},
                                const=0.0, per_scheduled_seq=0.0, per_sampled_token=0.0)
    y = predict_many(TRUE, shapes)
    got = fit_step_time(shapes, y, terms=HOST_TERMS, base=base)
    for k in STEP_TIME_FIELDS:
        assert getattr(got, k) == pytest.approx(getattr(TRUE, k), rel=1e-6), k


def test_the_knee_found_in_vidurs_a100_linear_layer_timings():
    """Vidur's measured A100 Llama-3-8B linear layers are flat at small token counts and linear at
    large ones: the fitted knee sits between and fits far better than a straight line."""
    lw = LayerwiseStepModel(model=LLAMA3_8B, source_model=LLAMA3_8B, tp=1, gpu=GPUS["a100-80gb"].spec,
                            assumptions=Assumptions())
    tokens = [1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096, 8192]
    shapes = [BatchShape(num_prefill_tokens=n, num_prefill_seqs=1) for n in tokens]
    y = np.array([lw.linear_time(n) for n in tokens])
    terms = ("per_batched_token", "per_prefill_token")
    knee = fit_step_time(shapes, y, terms=terms)
    line = fit_step_time(shapes, y, terms=terms, knees=[0.0])
    assert 64 <= knee.knee_tokens <= 1024
    e_knee, e_line = (error_stats(predict_many(c, shapes), y) for c in (knee, line))
    assert e_knee.max < 0.25 < e_line.max and e_knee.median < e_line.median / 3


# --------------------------------------------------------------------------- format
def _default_dict() -> dict:
    return json.loads(shipped_profiles()[DEFAULT].read_text())


def test_shipped_profiles_are_v2_with_a_knee_and_the_stated_host_cost():
    for model, tp, _ in BUILDS:
        path = shipped_profiles()[f"a100-80gb_{model.name}_tp{tp}"]
        d = json.loads(path.read_text())
        assert d["format_version"] == 2 and set(d["step_time"]) == set(STEP_TIME_FIELDS)
        p = load_profile(path)
        assert p.coefficients.knee_tokens > 0 and p.coefficients.per_batched_token > 0
        assert p.coefficients.per_scheduled_seq == p.provenance["assumptions"]["cpu_overhead_per_seq_s"]
        assert p.fit_error["grid"]["p90_rel_error"] < 0.10


def test_a_version_1_profile_loads_with_host_and_knee_terms_zero(tmp_path):
    d = _default_dict()
    v1 = {"const": 5e-3, "per_prefill_token": 6e-5, "per_prefill_attn_pair": 3e-9, "per_decode_seq": 2e-5,
          "per_decode_ctx_token": 7e-8}
    d["format_version"] = 1
    d["step_time"] = v1
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    p = load_profile(path)
    assert all(getattr(p.coefficients, k) == 0.0 for k in ("per_scheduled_seq", "per_sampled_token",
                                                            "per_batched_token", "knee_tokens"))
    want = 5e-3 + 6e-5 * 700 + 3e-9 * 1e6 + 2e-5 * 9 + 7e-8 * 9000
    assert p.step_time(BatchShape(700, 1e6, 9, 9000, 2)) == pytest.approx(want, rel=1e-12)
    # saved again, it is a version-2 file that predicts the same
    p.save(tmp_path / "new.json")
    q = load_profile(tmp_path / "new.json")
    assert json.loads((tmp_path / "new.json").read_text())["format_version"] == 2
    assert q.coefficients == p.coefficients
    # a version-1 file still needs its five terms
    d["step_time"] = {k: v for k, v in v1.items() if k != "per_decode_seq"}
    with pytest.raises(ConfigError, match="step_time"):
        profile_from_dict(d, "old.json")
    assert set(COEFFICIENTS_V1) == set(v1)


@pytest.mark.parametrize("mutate, where", [
    (lambda st: st.pop("knee_tokens"), "step_time"),
    (lambda st: st.__setitem__("knee_tokens", -1.0), "step_time.knee_tokens"),
    (lambda st: st.__setitem__("per_sampled_token", float("inf")), "step_time.per_sampled_token"),
    (lambda st: st.__setitem__("per_scheduled_seq", -1e-6), "step_time.per_scheduled_seq"),
    (lambda st: st.__setitem__("per_seq", 1e-6), "step_time.per_seq"),
])
def test_v2_step_time_errors_name_file_and_field(mutate, where):
    d = _default_dict()
    mutate(d["step_time"])
    with pytest.raises(ConfigError) as e:
        profile_from_dict(d, "p.json")
    assert str(e.value).startswith(f"p.json: {where}")


# --------------------------------------------------------------------------- calibrate show
def test_show_prints_each_terms_share():
    p = load_profile(shipped_profiles()[DEFAULT])
    for _, shape in SHARE_SHAPES:
        total, frac = term_shares(p, shape)
        assert total > 0 and sum(frac.values()) == pytest.approx(1.0)
    # small decode batches are dominated by fixed work, long prefills by per-token work
    _, d1 = term_shares(p, SHARE_SHAPES[0][1])
    _, pf = term_shares(p, SHARE_SHAPES[4][1])
    assert d1["const"] + d1["per_batched_token"] > 0.8
    assert pf["per_batched_token"] + pf["per_prefill_token"] + pf["per_prefill_attn_pair"] > 0.9
    r = run_cli("calibrate", "show", DEFAULT)
    assert r.returncode == 0, r.stderr
    assert "share of the predicted step time per term" in r.stdout
    for label, _ in SHARE_SHAPES:
        assert label in r.stdout
    for k, head in TERM_LABELS.items():
        if k != "per_batched_token":
            assert head in r.stdout
    assert "us/scheduled seq" in r.stdout and "max(batched tokens" in r.stdout


# --------------------------------------------------------------------------- calibrate predict
ROWS = [
    ("512@0;16@4096", "", ""),
    ("", "1024", ""),
    ("", "1024;2048;17", ""),
    ("2048@1024", "100;200", ""),
    ("64@0", "5000", "1"),
    ("8192@0", "", "0"),
]


def _hand_shape(chunks: str, ctx: str, sampled: str) -> BatchShape:
    cs = [tuple(int(v) for v in item.split("@")) for item in chunks.split(";") if item]
    xs = [int(v) for v in ctx.split(";") if v]
    return BatchShape(sum(c for c, _ in cs), sum(c * k + c * (c + 1) / 2 for c, k in cs), len(xs), sum(xs),
                      len(cs), int(sampled) if sampled else -1)


def test_predict_equals_step_time_row_by_row(tmp_path):
    steps = tmp_path / "steps.csv"
    with open(steps, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step_id", "prefill_chunks", "decode_ctx", "num_sampled", "measured_ms"])
        for i, row in enumerate(ROWS):
            w.writerow([i, *row, f"{i}.5"])
    out = tmp_path / "out" / "pred.csv"
    r = run_cli("calibrate", "predict", DEFAULT, str(steps), "-o", str(out))
    assert r.returncode == 0, r.stderr
    p = load_profile(shipped_profiles()[DEFAULT])
    with open(out, newline="") as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(ROWS)
    for i, (row, g) in enumerate(zip(ROWS, got)):
        assert (g["step_id"], g["prefill_chunks"], g["decode_ctx"], g["num_sampled"], g["measured_ms"]) == (str(i), *row, f"{i}.5")
        assert float(g["predicted_ms"]) == p.step_time(_hand_shape(*row)) * 1e3
    # never overwritten without --force; with it, rewritten
    out.write_text("mine\n")
    r = run_cli("calibrate", "predict", DEFAULT, str(steps), "-o", str(out))
    assert r.returncode == 2 and "--force" in r.stderr and out.read_text() == "mine\n"
    r = run_cli("calibrate", "predict", DEFAULT, str(steps), "-o", str(out), "--force")
    assert r.returncode == 0 and out.read_text().startswith("step_id,")


@pytest.mark.parametrize("text, where, words", [
    ("prefill_chunks\n512@0\n", ":1", "decode_ctx"),
    ("decode_ctx,x\n5,1\n", ":1", "prefill_chunks"),
    ("", ":1", "empty"),
    ("prefill_chunks,decode_ctx\n", "steps.csv", "no step rows"),
    ("prefill_chunks,decode_ctx\n512@0,\n512,\n", ":3", "prefill_chunks"),
    ("prefill_chunks,decode_ctx\n0@0,\n", ":2", "prefill_chunks"),
    ("prefill_chunks,decode_ctx\n16@-1,\n", ":2", "prefill_chunks"),
    ("prefill_chunks,decode_ctx\nx@0,\n", ":2", "prefill_chunks"),
    ("prefill_chunks,decode_ctx\n,100;0\n", ":2", "decode_ctx"),
    ("prefill_chunks,decode_ctx\n,100;;3\n", ":2", "decode_ctx"),
    ("prefill_chunks,decode_ctx\n,1.5\n", ":2", "decode_ctx"),
    ("prefill_chunks,decode_ctx\n,\n", ":2", "both empty"),
    ("prefill_chunks,decode_ctx\n16@0,5,7\n", ":2", "fields"),
    ("prefill_chunks,decode_ctx,num_sampled\n16@0,5,3\n", ":2", "num_sampled"),
    ("prefill_chunks,decode_ctx,predicted_ms\n16@0,5,1\n", ":1", "predicted_ms"),
    ("prefill_chunks,decode_ctx\n\"16@0,5\n", ":2", "fields"),
])
def test_predict_rejects_bad_rows_naming_line_and_column(tmp_path, text, where, words):
    steps = tmp_path / "steps.csv"
    steps.write_text(text)
    out = tmp_path / "out.csv"
    r = run_cli("calibrate", "predict", DEFAULT, str(steps), "-o", str(out))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {steps}"), r.stderr
    assert where in lines[0] and words in lines[0], lines[0]
    assert not out.exists() and not (tmp_path / "out.csv.tmp").exists()


# --------------------------------------------------------------------------- calibrate fit / check on a job
def _synthetic_job(directory: Path, truth: StepTimeCoefficients) -> None:
    """A profiling job directory as ``calibrate profile`` writes it, with step times from ``truth``."""
    from agentsim.calibration.grid import GridLimits, holdout_mask
    from agentsim.calibration.job import JOB_FORMAT, JOB_VERSION, PROFILING_GRIDS, build_grid

    limits = GridLimits(2048, 64, 2048, 200_000)
    grid = build_grid(limits, **PROFILING_GRIDS["small"])
    mask = holdout_mask(grid, 4, 0)
    hf = {"num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 64, "intermediate_size": 512, "vocab_size": 1000, "max_position_embeddings": 2048}
    meta = {
        "format": JOB_FORMAT, "format_version": JOB_VERSION,
        "engine": {"model": str(directory / "tiny"), "tp": 1}, "options": {"grid": "small"},
        "engine_info": {"platform": "cpu", "omp_num_threads": "1", "device_name": "test cpu", "hf_config": hf,
                        "max_model_len": 2048, "dtype_bytes": 4, "dtype": "float32", "kv_capacity_tokens": 200_000,
                        "gpu_memory_utilization": 1.0, "block_size": 32, "vllm_version": "0.32",
                        "enforce_eager": True},
        "nvml": {"available": False},
        "grid": [{**p.to_dict(), "holdout": h} for p, h in zip(grid, mask)],
    }
    directory.mkdir()
    (directory / "job.json").write_text(json.dumps(meta))
    with open(directory / "points.jsonl", "w") as f:
        for p, h in zip(grid, mask):
            s = p.shape()
            n_pre = len(s.prefills)
            t = truth.predict(s.num_prefill_tokens, s.prefill_attn_pairs, s.num_decode_seqs, s.decode_ctx_tokens,
                              n_pre, n_pre + s.num_decode_seqs)
            sample = {"num_prefill_tokens": s.num_prefill_tokens, "prefill_attn_pairs": s.prefill_attn_pairs,
                      "num_decode_seqs": s.num_decode_seqs, "decode_ctx_tokens": s.decode_ctx_tokens,
                      "step_time_s": 3 * t, "step_cpu_time_s": t, "engine_step_time_s": 3 * t, "shape_ok": True}
            f.write(json.dumps({"point_id": p.point_id, "kind": p.kind, "holdout": h, "samples": [sample] * 2}) + "\n")


def test_calibrate_fit_and_check_use_the_v2_model(tmp_path):
    truth = StepTimeCoefficients(const=1.2e-3, per_prefill_token=2e-5, per_prefill_attn_pair=2e-8, per_decode_seq=0.0,
                                 per_decode_ctx_token=2e-7, per_scheduled_seq=5e-5, per_sampled_token=0.0,
                                 per_batched_token=1e-5, knee_tokens=64.0)
    job = tmp_path / "job"
    _synthetic_job(job, truth)
    out = tmp_path / "tiny.json"
    r = run_cli("calibrate", "fit", str(job), "--out", str(out), "--model-name", "tiny")
    assert r.returncode == 0, r.stderr
    assert "us/scheduled seq" in r.stdout and "max(batched tokens" in r.stdout
    d = json.loads(out.read_text())
    assert d["format_version"] == 2 and set(d["step_time"]) == set(STEP_TIME_FIELDS)
    assert d["fit_error"]["clock"] == "cpu" and d["fit_error"]["held_out"]["max_rel_error"] < 1e-6
    r = run_cli("calibrate", "check", str(out), str(job), "--max-median-error", "0.001")
    assert r.returncode == 0, r.stdout + r.stderr


def test_shipped_profiles_rebuild_identically():
    """A rebuild gives the same model (deterministic knee search), and the shipped files are that rebuild."""
    from agentsim.calibration.build_profiles import build_profile

    a, b = (build_profile(LLAMA3_8B, 2, LLAMA3_8B, "2026-01-01").to_dict() for _ in range(2))
    assert a == b
    shipped = json.loads(shipped_profiles()["a100-80gb_llama-3-8b_tp2"].read_text())
    for k in STEP_TIME_FIELDS:
        assert shipped["step_time"][k] == pytest.approx(a["step_time"][k], rel=1e-9), k
    r = subprocess.run([sys.executable, "-m", "agentsim.calibration.build_profiles", "--check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr

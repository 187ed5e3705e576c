"""GPU kinds, models from Hugging Face config.json files, derived profiles and the shipped H200 profiles."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from agentsim.calibration.batch import BatchShape
from agentsim.calibration.derive import build_profile, forward_held_out
from agentsim.calibration.fit import predict_many
from agentsim.calibration.h200 import GemmTable, H200_DATA_DIR, H200StepModel, attention_fits, forward_points
from agentsim.calibration.hardware import GPUS, gpu_kind_from_name, nearest_gpu
from agentsim.calibration.models import LLAMA3_8B, MODELS, load_hf_config, resolve_model
from agentsim.calibration.profile import load_profile, resolve_profile, shipped_profiles
from agentsim.errors import ConfigError

# Meta-Llama-3-8B's config.json (huggingface.co/meta-llama/Meta-Llama-3-8B), the keys agentsim reads.
LLAMA3_8B_CONFIG = {
    "_name_or_path": "meta-llama/Meta-Llama-3-8B", "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}
# Qwen3-4B-style: explicit head_dim (128, not 2560 / 32 = 80) and tied embeddings.
QWEN3_4B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "head_dim": 128, "hidden_size": 2560, "intermediate_size": 9728,
    "max_position_embeddings": 40960, "model_type": "qwen3", "num_attention_heads": 32,
    "num_hidden_layers": 36, "num_key_value_heads": 8, "tie_word_embeddings": True, "vocab_size": 151936,
}
MIXTRAL_CONFIG = {
    "architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
}


def _write(tmp_path, name, cfg):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d / "config.json"


# ------------------------------------------------------------------------------------------ GPU kinds
@pytest.mark.parametrize("nvml, kind", [
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A100 80GB PCIe", "a100-80gb"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
    ("NVIDIA H100 80GB HBM3", "h100-80gb"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200"), ("NVIDIA H200 NVL", "h200-nvl"), ("NVIDIA B200", "b200"),
    ("NVIDIA L40S", "l40s"), ("NVIDIA A10G", "a10g"),
    # other chips with other figures: no kind rather than a wrong one
    ("NVIDIA GH200 480GB", None), ("NVIDIA H20", None), ("NVIDIA A10", None), ("NVIDIA L40", None),
    ("NVIDIA H800", None), ("AMD Instinct MI300X", None),
])
def test_gpu_kind_from_nvml_name(nvml, kind):
    assert gpu_kind_from_name(nvml) == kind


def test_every_gpu_kind_is_reachable_and_sane():
    reached = {gpu_kind_from_name(n) for n in (
        "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
        "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA B200", "NVIDIA L40S", "NVIDIA A10G")}
    assert reached == set(GPUS)
    for key, g in GPUS.items():
        assert g.spec.name == key
        # memory-bound ridge point (FLOPs per byte) of every datacenter GPU lies in 50..500
        assert 50 < g.spec.peak_tflops * 1e12 / (g.spec.hbm_GBps * 1e9) < 500
    h200 = GPUS["h200"].spec
    assert (h200.hbm_GBps, h200.peak_tflops) == (4800.0, 989.0)
    assert h200.memory_gib * 1024 == pytest.approx(143771)  # nvidia-smi's total


def test_nearest_measured_gpu_prefers_the_same_generation():
    assert nearest_gpu("h100-pcie", ["a100-80gb", "h200"]) == "h200"
    assert nearest_gpu("a100-40gb", ["a100-80gb", "h200"]) == "a100-80gb"
    assert nearest_gpu("b200", ["a100-80gb", "h200"]) == "h200"  # closer figures (no Blackwell tables)
    assert nearest_gpu("l40s", ["a100-80gb", "h200"]) == "a100-80gb"


# ------------------------------------------------------------------------------------ model configs
def test_llama3_8b_config_reproduces_the_shipped_dims(tmp_path):
    path = _write(tmp_path, "Meta-Llama-3-8B", LLAMA3_8B_CONFIG)
    dims = load_hf_config(path)
    assert dims.name == "meta-llama-3-8b"
    for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
              "vocab_size", "max_model_len"):
        assert getattr(dims, k) == getattr(LLAMA3_8B, k), k
    assert dims.num_params == pytest.approx(LLAMA3_8B.num_params, rel=1e-3)
    # the config of a shipped model resolves to that model, so its measured profiles apply
    assert resolve_model(str(path)) is LLAMA3_8B
    assert resolve_model(str(path.parent)) is LLAMA3_8B  # a model folder works too
    assert resolve_profile(None, "a100-80gb", str(path), 1).name == "a100-80gb_llama-3-8b_tp1"


def test_qwen_style_config_loads_with_explicit_head_dim_and_tied_embeddings(tmp_path):
    path = _write(tmp_path, "qwen3-4b", QWEN3_4B_CONFIG)
    dims = resolve_model(str(path))
    assert (dims.name, dims.head_dim, dims.num_kv_heads, dims.max_model_len) == ("qwen3-4b", 128, 8, 40960)
    untied = load_hf_config(_write(tmp_path, "untied", {**QWEN3_4B_CONFIG, "tie_word_embeddings": False}))
    assert untied.num_params - dims.num_params == 151936 * 2560  # one embedding-sized matrix more
    # Qwen3-4B has ~4.02B parameters (its model card)
    assert dims.num_params == pytest.approx(4.02e9, rel=0.01)


@pytest.mark.parametrize("cfg, key", [
    (MIXTRAL_CONFIG, "num_local_experts"),
    ({**QWEN3_4B_CONFIG, "num_experts": 128, "moe_intermediate_size": 768}, "num_experts"),
    ({k: v for k, v in LLAMA3_8B_CONFIG.items() if k != "intermediate_size"}, "intermediate_size"),
    ({**LLAMA3_8B_CONFIG, "num_hidden_layers": 0}, "num_hidden_layers"),
    ({**LLAMA3_8B_CONFIG, "hidden_size": "4096"}, "hidden_size"),
    ({**LLAMA3_8B_CONFIG, "num_key_value_heads": 5}, "num_key_value_heads"),
    ({**LLAMA3_8B_CONFIG, "tie_word_embeddings": "no"}, "tie_word_embeddings"),
])
def test_bad_or_unsupported_config_is_one_line_naming_file_and_key(tmp_path, cfg, key):
    path = _write(tmp_path, "m", cfg)
    with pytest.raises(ConfigError) as e:
        resolve_model(str(path))
    assert e.value.where == f"{path}: {key}"
    assert "\n" not in str(e.value)


def test_malformed_config_names_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "hidden_size": 4096,\n  oops\n}')
    with pytest.raises(ConfigError) as e:
        resolve_model(str(path))
    assert e.value.where == f"{path}:3"


def test_cli_refuses_a_moe_config_with_exit_2_and_writes_nothing(tmp_path):
    path = _write(tmp_path, "mixtral", MIXTRAL_CONFIG)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "agentsim", "simulate", "--model", str(path), "--duration", "5",
                        "-o", str(out), "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "num_local_experts" in lines[0] and str(path) in lines[0]
    assert not out.exists()


def test_unknown_model_name_lists_shipped_models():
    with pytest.raises(ConfigError) as e:
        resolve_model("gpt-9")
    assert e.value.where == "cluster.model" and "llama-3-8b" in e.value.message


# ---------------------------------------------------------------------------------- derived profiles
@pytest.mark.parametrize("gpu, model, tp", [
    ("h100-80gb", "qwen2.5-7b", 1), ("b200", "llama-3-70b", 8), ("l40s", "llama-3-8b", 1),
    ("a10g", "llama-3-8b", 1), ("h200", "qwen2.5-14b", 2), ("a100-40gb", "qwen2.5-7b", 2),
])
def test_derived_profile_for_an_unseen_combination_is_marked_and_sane(gpu, model, tp):
    p = resolve_profile(None, gpu, model, tp)
    assert p.name == f"{gpu}_{model}_tp{tp}" and p.provenance["kind"] == "derived"
    assert "DERIVED" in p.provenance["note"] and p.provenance["assumptions"]
    assert p.gpu == GPUS[gpu].spec and p.tp == tp
    # one decode step streams every weight once: at least weights / datasheet HBM bandwidth, and
    # within a small factor of it (host terms, attention, launch floors, all-reduce)
    floor = p.model.num_params * 2 / tp / (p.gpu.hbm_GBps * 1e9)
    step = p.step_seconds(0, 0, 1, 512)
    assert floor < step < 8 * floor
    # a long prefill is compute-bound: at least its FLOPs at datasheet peak, within a factor
    flops = 2 * p.model.num_params / tp * 8192
    prefill = p.step_seconds(8192, 8192 * 8193 / 2, 0, 0, 1)
    assert flops / (p.gpu.peak_tflops * 1e12) < prefill < 4 * flops / (p.gpu.peak_tflops * 1e12)
    # more work never takes less time
    assert p.step_seconds(0, 0, 64, 64 * 512) > step
    assert p.step_seconds(2048, 2048 * 2049 / 2, 0, 0, 1) > p.step_seconds(512, 512 * 513 / 2, 0, 0, 1)


def test_derived_profile_from_a_user_config_drives_a_simulation(tmp_path):
    from agentsim.config import load_config
    from agentsim.sim.runner import run

    path = _write(tmp_path, "qwen3-4b", QWEN3_4B_CONFIG)
    cfg = load_config(None, {"cluster.gpu": "h100-80gb", "cluster.model": str(path), "cluster.tp": 1,
                             "cluster.gpus_per_node": 1, "duration": 20.0, "workload.agents": 4})
    result = run(cfg)
    assert len(result.calls) > 0


def test_a_faster_gpu_gives_faster_derived_steps():
    slow = resolve_profile(None, "a10g", "llama-3-8b", 1)
    fast = resolve_profile(None, "b200", "llama-3-8b", 1)
    for args in ((0, 0, 1, 512), (0, 0, 128, 128 * 2048), (4096, 4096 * 4097 / 2, 0, 0, 1)):
        assert fast.step_seconds(*args) < slow.step_seconds(*args)


def test_too_big_model_or_bad_tp_is_a_clear_error():
    with pytest.raises(ConfigError) as e:
        resolve_profile(None, "a10g", "llama-3-70b", 1)
    assert e.value.where == "cluster.tp" and "does not fit" in e.value.message
    with pytest.raises(ConfigError) as e:
        resolve_profile(None, "h200", "llama-3-8b", 3)
    assert e.value.where == "cluster.tp"
    with pytest.raises(ConfigError) as e:
        resolve_profile(None, "tpu-v5", "llama-3-8b", 1)
    assert e.value.where == "cluster.gpu"


# ------------------------------------------------------------------------------------- H200 tables
def test_gemm_table_interpolates_and_scales_outside_the_grid():
    g = GemmTable.from_csv(H200_DATA_DIR / "gemm.csv")
    # on the grid it returns the (monotone) measured median
    assert g.at(1024, 4096, 14336) == pytest.approx(g.curve(4096, 14336)[list(g.m).index(1024)])
    # twice the output width beyond the grid costs twice the edge
    assert g.at(512, 4096, 2 * 57344) == pytest.approx(2 * g.at(512, 4096, 57344))
    # compute-bound at 16k tokens: 2*m*k*n FLOPs at 40-100 % of the 989 TFLOP/s datasheet peak
    t = g.at(16384, 8192, 28672)
    assert 0.4 < 2 * 16384 * 8192 * 28672 / t / 989e12 < 1.0


def test_attention_fits_cover_every_measured_layout():
    fits = attention_fits()
    assert {(32, 8), (16, 4), (8, 2), (16, 2), (8, 1), (28, 4), (40, 8), (20, 4), (64, 8), (48, 8)} <= set(fits)
    for f in fits.values():
        assert min(f.prefill_const, f.prefill_pair, f.prefill_key, f.decode_const, f.decode_seq, f.decode_ctx) >= 0
        assert f.fit_error["prefill"]["median_rel_error"] < 0.25
        assert f.fit_error["decode"]["median_rel_error"] < 0.25


def test_h200_linear_layers_from_gemm_agree_with_the_measured_mlp_rows():
    measured = H200StepModel(LLAMA3_8B, 1, GPUS["h200"].spec)
    from_gemm = H200StepModel(LLAMA3_8B, 1, GPUS["h200"].spec, force_gemm=True)
    assert not measured.derived and from_gemm.derived
    for n in (1, 64, 512, 2048, 8192):
        assert from_gemm.linear_time(n) == pytest.approx(measured.linear_time(n), rel=0.25)


# -------------------------------------------------------------------------------- shipped H200 profiles
H200_NAMES = ["h200_llama-3-8b_tp1", "h200_llama-3-8b_tp2", "h200_llama-3-8b_tp4",
              "h200_llama-3-70b_tp4", "h200_llama-3-70b_tp8"]


def test_h200_profiles_are_shipped_and_resolved():
    shipped = shipped_profiles()
    for name in H200_NAMES:
        p = load_profile(shipped[name])
        assert p.provenance["kind"] == "measured-layers" and p.gpu.name == "h200"
        assert any("h200-torch" in f for f in p.provenance["files"])
    assert resolve_profile(None, "h200", "llama-3-8b", 1).name == "h200_llama-3-8b_tp1"


def test_h200_llama3_8b_held_out_error_on_forward_csv():
    """forward.csv's 46 whole steps were fitted to by nothing. Measured (python -m
    agentsim.calibration.h200): median 3.1 %, p90 8.0 %, max 11.7 % against graph replays; the
    bounds leave room for BLAS / NumPy differences only."""
    p = load_profile(shipped_profiles()["h200_llama-3-8b_tp1"])
    held = p.fit_error["held_out_forward"]["graph"]
    assert held["num_points"] == 46
    assert held["median_rel_error"] < 0.045 and held["p90_rel_error"] < 0.11 and held["max_rel_error"] < 0.15
    # recompute from the profile itself: its device terms (host terms removed) vs the measured steps
    c = p.coefficients
    a = p.provenance["assumptions"]
    import dataclasses
    device = dataclasses.replace(c, const=c.const - a["cpu_overhead_step_s"],
                                 per_scheduled_seq=c.per_scheduled_seq - a["cpu_overhead_per_seq_s"])
    shapes, t, _ = forward_points(truth="graph")
    rel = np.abs(predict_many(device, shapes) / t - 1)
    assert np.median(rel) == pytest.approx(held["median_rel_error"], abs=1e-4)
    assert forward_held_out(device)["graph"]["median_rel_error"] == pytest.approx(held["median_rel_error"], abs=1e-4)


def test_h200_profiles_rebuild_identically():
    r = subprocess.run([sys.executable, "-m", "agentsim.calibration.h200", "--check"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


def test_derivation_is_deterministic():
    a = build_profile("h100-80gb", MODELS["qwen2.5-7b"], 1, created_at="x")
    b = build_profile("h100-80gb", MODELS["qwen2.5-7b"], 1, created_at="x")
    assert a.to_dict() == b.to_dict()


def test_derivation_recovers_measured_h200_steps():
    """Where the answer is known (forward.csv), the two derivation paths a user's model or GPU
    takes stay close to it. Measured (python -m agentsim.calibration.h200 --derivation-check),
    layer model median / p90 / max: gemm.csv path 3.5 / 9.7 / 14.7 %, A100 tables scaled to the
    H200 by datasheet figures 10.6 / 16.3 / 21.7 %."""
    from agentsim.calibration.derive import derivation_check

    r = derivation_check()
    for key in ("h200_gemm_csv", "a100_tables_scaled_to_h200"):
        e = r[key]["layer_model"]
        assert e["num_points"] == 46
        assert e["median_rel_error"] < 0.13 and e["p90_rel_error"] < 0.21 and e["max_rel_error"] < 0.26, (key, e)
        assert r[key]["profile"]["median_rel_error"] < 0.13, (key, r[key]["profile"])


def test_h200_build_never_overwrites_a_file_it_did_not_write(tmp_path):
    (tmp_path / "h200_llama-3-8b_tp1.json").write_text("my notes")
    r = subprocess.run([sys.executable, "-m", "agentsim.calibration.h200", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "h200_llama-3-8b_tp1.json" in r.stderr
    assert (tmp_path / "h200_llama-3-8b_tp1.json").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h200_llama-3-8b_tp1.json"]


def test_calibrate_show_takes_gpu_model_tp_and_saves_a_derived_profile(tmp_path):
    """``calibrate show --gpu --model --tp`` shows the profile a run would use (here derived: no
    H100 tables are shipped) and ``--save`` writes it, never over an existing file."""
    from agentsim.calibration.profile import load_profile

    out = tmp_path / "h100.json"
    cmd = [sys.executable, "-m", "agentsim", "calibrate", "show", "--gpu", "h100-80gb", "--model", "llama-3-8b",
           "--save", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    p = load_profile(out)
    assert p.provenance["kind"] == "derived" and p.gpu.name.lower().startswith("h100")
    before = out.read_bytes()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "never overwrites" in r.stderr and out.read_bytes() == before
    r = subprocess.run([sys.executable, "-m", "agentsim", "calibrate", "show"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr

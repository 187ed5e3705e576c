"""Build the shipped A100-80GB profiles from Vidur's measured operator timings.

    python -m agentsim.calibration.build_profiles [--out DIR] [--check]

For each (model, TP) below, the layer-by-layer model of :mod:`agentsim.calibration.layerwise`
predicts the step time of every batch shape in :func:`~agentsim.calibration.grid.serving_grid`
(decode, prefill and mixed chunked-prefill steps within vLLM's default limits and the KV capacity);
the profile's step-time model (:class:`~agentsim.calibration.profile.StepTimeCoefficients`: per-step
constant, per-sequence terms, linear layers with a knee, attention terms) is then fitted to those times
with :func:`~agentsim.calibration.fit.fit_step_time` (non-negative, relative error, knee by search),
and the fit's error on the grid and on random heterogeneous batches it never saw is written into the
profile's ``fit_error``. The host per-sequence cost is not fitted here: it is the layer model's stated
assumption (``cpu_overhead_per_seq_s``), and per-sampled-token host cost is 0 (not in the layer
data); ``agentsim calibrate bench`` fits both to measured runs. Llama-3-8B and Llama-3-70B come straight from their measured rows; the
Qwen2.5 profiles are derived from the Llama-3-8B rows by model dimensions and say so.

``--check`` rebuilds into memory and exits 1 if a shipped profile differs (ignoring its date).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np

from agentsim.calibration.fit import error_stats, fit_step_time, predict_many
from agentsim.calibration.grid import GridLimits, random_batches, serving_grid
from agentsim.calibration.hardware import GPUS
from agentsim.calibration.layerwise import DATA_DIR, Assumptions, LayerwiseStepModel
from agentsim.calibration.models import LLAMA3_8B, LLAMA3_70B, QWEN25_7B, QWEN25_14B
from agentsim.calibration.profile import COEFFICIENTS, GPUSpec, ModelDims, Profile, StepTimeCoefficients, shipped_profiles

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"

# (target model, TP, measured source model)
BUILDS: tuple[tuple[ModelDims, int, ModelDims], ...] = (
    (LLAMA3_8B, 1, LLAMA3_8B),
    (LLAMA3_8B, 2, LLAMA3_8B),
    (LLAMA3_8B, 4, LLAMA3_8B),
    (LLAMA3_70B, 4, LLAMA3_70B),
    (LLAMA3_70B, 8, LLAMA3_70B),
    (QWEN25_7B, 1, LLAMA3_8B),
    (QWEN25_7B, 2, LLAMA3_8B),
    (QWEN25_14B, 1, LLAMA3_8B),
    (QWEN25_14B, 2, LLAMA3_8B),
)

GPU_MEMORY_UTILIZATION = 0.9
ACTIVATION_RESERVE_GIB = 3.0   # vLLM's profiled peak activations + CUDA graphs + NCCL buffers (assumed)
MAX_NUM_BATCHED_TOKENS = 8192  # vLLM's default for the OpenAI server on GPUs
MAX_NUM_SEQS = 256             # vLLM's default
KV_BLOCK_SIZE = 16             # vLLM's default on GPUs
RANDOM_BATCHES = 400
SEED = 0
SOURCE = "microsoft/vidur @ 7d47513 (MIT), data/profiling/{compute,network}/a100"


def kv_capacity_tokens(gpu: GPUSpec, model: ModelDims, tp: int, dtype_bytes: int = 2) -> int:
    """Tokens of KV cache one TP group holds: per-GPU memory x utilisation - weight shard - reserve,
    over the per-GPU KV bytes per token (KV heads are replicated when TP exceeds their number)."""
    weights = model.num_params * dtype_bytes / tp
    free = gpu.memory_gib * 2**30 * GPU_MEMORY_UTILIZATION - weights - ACTIVATION_RESERVE_GIB * 2**30
    kv_heads_per_gpu = max(1.0, model.num_kv_heads / tp)
    per_gpu_bpt = 2 * model.num_layers * kv_heads_per_gpu * model.head_dim * dtype_bytes
    if free <= 0:
        raise ValueError(f"{model.name} does not fit on {tp} x {gpu.name}")
    return int(free // per_gpu_bpt)


def build_profile(model: ModelDims, tp: int, source: ModelDims, created_at: str,
                  assumptions: Assumptions = Assumptions(), gpu_key: str = "a100-80gb",
                  data_dir: Path = DATA_DIR) -> Profile:
    gpu, links = GPUS[gpu_key].spec, GPUS[gpu_key].links
    lw = LayerwiseStepModel(model=model, source_model=source, tp=tp, gpu=gpu, assumptions=assumptions,
                            data_dir=data_dir)
    capacity = kv_capacity_tokens(gpu, model, tp)
    limits = GridLimits(MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS, model.max_model_len, capacity)
    grid = serving_grid(limits)
    shapes = [p.shape() for p in grid]
    times = np.array([lw.step_time(s) for s in shapes])
    # Host terms come from the layer model's stated assumption, not the fit (see the module docstring).
    host = StepTimeCoefficients(0.0, 0.0, 0.0, 0.0, 0.0, per_scheduled_seq=assumptions.cpu_overhead_per_seq_s)
    coeffs = fit_step_time(shapes, times, base=host,
                           terms=[t for t in COEFFICIENTS if t not in ("per_scheduled_seq", "per_sampled_token")])

    fit_err = {"what": "relative error of the step-time model against the layer-by-layer model "
                       "it was fitted to (the layer model itself is what Vidur's measurements support)"}
    pred = predict_many(coeffs, shapes)
    fit_err["grid"] = error_stats(pred, times).to_dict()
    kinds = np.array([p.kind for p in grid])
    fit_err["grid_by_kind"] = {k: error_stats(pred[kinds == k], times[kinds == k]).to_dict()
                               for k in ("decode", "prefill", "mixed")}
    rnd = random_batches(limits, RANDOM_BATCHES, SEED)
    rt = np.array([lw.step_time(s) for s in rnd])
    fit_err["held_out_random_batches"] = error_stats(predict_many(coeffs, rnd), rt).to_dict()
    fit_err["held_out_random_batches"]["seed"] = SEED

    name = f"{gpu.name}_{model.name}_tp{tp}"
    derived = model.name != source.name
    files = [lw.ops.source] + ([lw.all_reduce.source] if lw.all_reduce else [])
    provenance = {
        "kind": "derived" if derived else "measured-layers",
        "measured": f"A100-80GB per-layer operator timings of {source.name} at TP {tp} "
                    f"(linear layers, norms, rope, activation, embedding)"
                    + (" and 8-GPU DGX all-reduce timings" if tp > 1 else ""),
        "source": SOURCE,
        "files": [f"agentsim/calibration/data/vidur-a100/{f}" for f in files],
        "attention": "closed-form fits to Vidur's A100 Llama-3-8B attention.csv (research/simulators.md 2.3), "
                     "scaled by query / KV heads per GPU",
        "assumptions": {
            **assumptions.to_dict(),
            "activation_reserve_gib": ACTIVATION_RESERVE_GIB,
            "not_modelled": "sampling beyond the LM head, logits all-gather under TP, async scheduling overlap",
        },
        "grid": {"num_points": len(grid), "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
                 "max_num_seqs": MAX_NUM_SEQS, "kinds": {k: int((kinds == k).sum()) for k in ("decode", "prefill", "mixed")}},
        "command": "python -m agentsim.calibration.build_profiles",
        "created_at": created_at,
    }
    if derived:
        provenance["derived_from"] = source.name
        provenance["note"] = (f"DERIVED, not measured: each operator's {source.name} time is scaled by the ratio of "
                              f"its weight/activation size in {model.name}.")
    return Profile(
        name=name, gpu=gpu, model=model, tp=tp, dtype_bytes=2, coefficients=coeffs,
        kv_bytes_per_token=model.kv_bytes_per_token(2), kv_capacity_tokens=capacity,
        gpu_memory_utilization=GPU_MEMORY_UTILIZATION, links=links, provenance=provenance,
        fit_error=fit_err, kv_block_size=KV_BLOCK_SIZE,
    )


def build_all(created_at: str, assumptions: Assumptions = Assumptions()) -> list[Profile]:
    return [build_profile(m, tp, src, created_at, assumptions) for m, tp, src in BUILDS]


def _comparable(d: dict) -> dict:
    """The profile without its date, floats to 12 significant digits: a rebuild with another
    NumPy/BLAS build differs in the last bits of a least-squares fit (seen: numpy 2.3 vs 2.2),
    which is not a different profile."""
    def norm(x):
        if isinstance(x, float):
            return float(f"{x:.12g}")
        if isinstance(x, dict):
            return {k: norm(v) for k, v in x.items()}
        if isinstance(x, list):
            return [norm(v) for v in x]
        return x
    d = json.loads(json.dumps(d))
    d.get("provenance", {}).pop("created_at", None)
    return norm(d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agentsim.calibration.build_profiles", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=PROFILES_DIR, help="directory to write profiles to")
    ap.add_argument("--check", action="store_true", help="exit 1 if the shipped profiles differ from a rebuild")
    ap.add_argument("--vidur-prefill-kv-save", action="store_true",
                    help="charge prefill KV writes with Vidur's prefill kv_cache_save fit (5.3e-4 ms/token/layer) "
                         "instead of its decode fit; not for the shipped profiles")
    args = ap.parse_args(argv)
    if args.check and args.vidur_prefill_kv_save:
        ap.error("--check compares the shipped profiles, which use the default assumptions")
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    created = (datetime.fromtimestamp(int(epoch), timezone.utc).date() if epoch else date.today()).isoformat()
    profiles = build_all(created, Assumptions(vidur_prefill_kv_save=args.vidur_prefill_kv_save))
    if args.check:
        shipped = shipped_profiles()
        bad = []
        for p in profiles:
            path = shipped.get(p.name)
            if path is None or _comparable(json.loads(path.read_text())) != _comparable(p.to_dict()):
                bad.append(p.name)
        for name in bad:
            print(f"differs from a rebuild: {name}", file=sys.stderr)
        return 1 if bad else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for p in profiles:
        p.save(args.out / f"{p.name}.json")
        e = p.fit_error
        print(f"{p.name:34s} grid median/p90 {e['grid']['median_rel_error']:.1%}/{e['grid']['p90_rel_error']:.1%}  "
              f"random median/p90 {e['held_out_random_batches']['median_rel_error']:.1%}/"
              f"{e['held_out_random_batches']['p90_rel_error']:.1%}  KV {p.kv_capacity_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())

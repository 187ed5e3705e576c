"""Roofline-derived profiles: a documented stand-in until measured profiles replace them.

Assumptions (stated in each generated profile's provenance):
- weights are streamed from HBM once per step at ``hbm_efficiency`` of peak bandwidth, plus a
  fixed per-step CPU/launch overhead;
- every computed token costs 2 x params FLOPs at ``mfu_linear`` of peak (prefill and decode);
- attention costs 4 x layers x hidden FLOPs per (query, key) pair at ``mfu_attention``;
- a decode sequence reads its whole KV context from HBM at ``hbm_efficiency``;
- KV capacity = GPU memory x gpu_memory_utilization - weights - activation reserve.
"""

from __future__ import annotations

from datetime import date

from agentsim.calibration.hardware import GPUS
from agentsim.calibration.models import LLAMA3_8B
from agentsim.calibration.profile import GPUSpec, ModelDims, Profile, StepTimeCoefficients

A100_80GB = GPUS["a100-80gb"].spec
A100_LINKS = GPUS["a100-80gb"].links


def roofline_profile(
    gpu: GPUSpec = A100_80GB,
    model: ModelDims = LLAMA3_8B,
    tp: int = 1,
    dtype_bytes: int = 2,
    hbm_efficiency: float = 0.8,
    mfu_linear: float = 0.6,
    mfu_attention: float = 0.5,
    step_overhead_s: float = 1.5e-3,
    activation_reserve_gib: float = 3.0,
    gpu_memory_utilization: float = 0.9,
) -> Profile:
    bw = gpu.hbm_GBps * 1e9 * hbm_efficiency
    flops = gpu.peak_tflops * 1e12
    weight_bytes = model.num_params * dtype_bytes / tp
    per_token = 2 * model.num_params / tp / (flops * mfu_linear)
    kv_bpt = model.kv_bytes_per_token(dtype_bytes)
    coeffs = StepTimeCoefficients(
        const=weight_bytes / bw + step_overhead_s,
        per_prefill_token=per_token,
        per_prefill_attn_pair=4 * model.num_layers * model.hidden_size / tp / (flops * mfu_attention),
        per_decode_seq=per_token,
        per_decode_ctx_token=kv_bpt / tp / bw,
    )
    free = gpu.memory_gib * 2**30 * gpu_memory_utilization - weight_bytes - activation_reserve_gib * 2**30
    capacity = int(free / (kv_bpt / tp))
    return Profile(
        name=f"{gpu.name}_{model.name}_tp{tp}_roofline",
        gpu=gpu, model=model, tp=tp, dtype_bytes=dtype_bytes, coefficients=coeffs,
        kv_bytes_per_token=kv_bpt, kv_capacity_tokens=capacity,
        gpu_memory_utilization=gpu_memory_utilization, links=A100_LINKS,
        provenance={
            "kind": "roofline",
            "note": "Roofline, NOT measured: kept for comparison with the measured profile of the same "
                    "name without the _roofline suffix (python -m agentsim.calibration.build_profiles).",
            "assumptions": {
                "hbm_efficiency": hbm_efficiency, "mfu_linear": mfu_linear,
                "mfu_attention": mfu_attention, "step_overhead_s": step_overhead_s,
                "activation_reserve_gib": activation_reserve_gib,
            },
            "command": "python -m agentsim.calibration.roofline",
            "created_at": str(date.today()),
        },
    )


if __name__ == "__main__":  # pragma: no cover - regeneration script
    from importlib import resources
    from pathlib import Path

    out = Path(str(resources.files("agentsim.calibration") / "profiles"))
    p = roofline_profile()
    p.save(out / f"{p.name}.json")
    print(out / f"{p.name}.json")

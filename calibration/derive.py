"""Profiles for any (GPU kind, model, TP): built from the nearest measured tables, scaled by model
dims and, for a GPU without tables, by datasheet figures.

Measured tables exist for two GPUs: ``a100-80gb`` (Vidur's per-layer tables, :mod:`.layerwise`) and
``h200`` (our H200 tables, :mod:`.h200`). For a target ``(gpu, model, tp)``:

1. the *source GPU* is :func:`~agentsim.calibration.hardware.nearest_gpu` among those two (same chip
   generation first, then HBM bandwidth and TFLOP/s);
2. the source GPU's layer model prices the model's own shapes: on the H200, linear layers from
   ``gemm.csv`` at the model's per-GPU GEMM widths and attention from the nearest measured head
   layout scaled by query / KV heads; on the A100, Vidur's nearest measured model (by hidden size)
   scaled by each operator's weight/activation size;
3. if the target GPU is not the source GPU, each part is scaled by the ratio of the two GPUs'
   rooflines for that part (:class:`GPUScaledStepModel`): linear layers and the LM head by
   ``max(weight bytes / HBM, FLOPs / TFLOP/s)`` at the step's token count, prefill attention by
   TFLOP/s, decode attention and KV writes by HBM bandwidth, all-reduce by link bandwidth; host
   (CPU) time is not scaled;
4. the profile's coefficients are fitted (:func:`agentsim.calibration.fit.fit_step_time`) to the
   layer model's device times on the serving grid, and the host terms of
   :class:`~agentsim.calibration.layerwise.Assumptions` are added.

The result is marked ``"kind": "derived"`` with these assumptions in its provenance.
:func:`resolve_derived` is what :func:`agentsim.calibration.profile.resolve_profile` calls when no
shipped profile matches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import date
from functools import lru_cache

import numpy as np

from agentsim.calibration.batch import BatchShape
from agentsim.calibration.build_profiles import (
    GPU_MEMORY_UTILIZATION, KV_BLOCK_SIZE, MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS, RANDOM_BATCHES, SEED,
    kv_capacity_tokens,
)
from agentsim.calibration.fit import error_stats, fit_step_time, predict_many
from agentsim.calibration.grid import GridLimits, random_batches, serving_grid
from agentsim.calibration.hardware import GPUS, GPUKind, nearest_gpu
from agentsim.calibration.layerwise import VIDUR_MODEL_DIRS, Assumptions, LayerwiseStepModel
from agentsim.calibration.models import MODELS, resolve_model
from agentsim.calibration.profile import COEFFICIENTS, ModelDims, Profile
from agentsim.errors import ConfigError

MEASURED_GPUS = ("a100-80gb", "h200")
VIDUR_TPS = (1, 2, 4, 8)


def _roofline(bytes_: float, flops: float, gpu: GPUKind) -> float:
    return max(bytes_ / (gpu.spec.hbm_GBps * 1e9), flops / (gpu.spec.peak_tflops * 1e12))


@dataclass
class GPUScaledStepModel:
    """A source GPU's layer model with each part scaled to ``target`` by the ratio of rooflines
    (module docstring, step 3). Assumes the same fraction of peak is reached on both GPUs."""

    base: object  # LayerwiseStepModel | H200StepModel
    source: GPUKind
    target: GPUKind

    def __post_init__(self) -> None:
        m, tp = self.base.model, self.base.tp
        hd = m.head_dim
        q, kv = m.num_heads * hd / tp, max(1.0, m.num_kv_heads / tp) * hd
        self.linear_params = m.num_layers * (m.hidden_size * (q + 2 * kv) + q * m.hidden_size
                                             + 3 * m.hidden_size * m.intermediate_size / tp)
        self.lm_head_params = m.vocab_size * m.hidden_size / tp
        self.model, self.tp, self.gpu = m, tp, self.target.spec

    def _ratio(self, params: float, tokens: float) -> float:
        b, f = 2 * params, 2 * params * max(tokens, 1)
        return _roofline(b, f, self.target) / _roofline(b, f, self.source)

    def breakdown(self, batch: BatchShape) -> dict[str, float]:
        b = self.base
        bw = self.source.spec.hbm_GBps / self.target.spec.hbm_GBps
        fl = self.source.spec.peak_tflops / self.target.spec.peak_tflops
        src_link = self.source.links.nvlink_GBps
        link = src_link / self.target.links.nvlink_GBps
        if hasattr(b, "attention_prefill_time"):
            att_p, att_d = b.attention_prefill_time(batch), b.attention_decode_time(batch)
            extra = {"kv_write": b.kv_write_time(batch.num_tokens) * bw}
        else:  # the A100 layer model prices attention (with KV writes) in one part
            att_p = b.attention_time(BatchShape(prefills=batch.prefills)) if batch.prefills else 0.0
            att_d = b.attention_time(batch) - att_p
            extra = {}
        return {
            "linear": b.linear_time(batch.num_tokens) * self._ratio(self.linear_params, batch.num_tokens),
            "attention_prefill": att_p * fl,
            "attention_decode": att_d * bw,
            **extra,
            "all_reduce": b.all_reduce_time(batch.num_tokens) * link,
            "lm_head": b.lm_head_time(batch.num_seqs) * self._ratio(self.lm_head_params, batch.num_seqs),
            "cpu_overhead": b.cpu_overhead(batch.num_seqs),
        }

    def device_time(self, batch: BatchShape) -> float:
        return sum(v for k, v in self.breakdown(batch).items() if k != "cpu_overhead")

    def cpu_overhead(self, num_seqs: int) -> float:
        return self.base.cpu_overhead(num_seqs)


def _device_time(step_model, batch: BatchShape) -> float:
    if hasattr(step_model, "device_time"):
        return step_model.device_time(batch)
    return step_model.step_time(batch) - step_model.cpu_overhead(batch.num_seqs)


def step_model_for(gpu: str, model: ModelDims, tp: int, assumptions: Assumptions = Assumptions(),
                   source_gpu: str | None = None, force_gemm: bool = False):
    """(layer model, source GPU kind, notes) for ``model`` at ``tp`` on ``gpu`` (module docstring).
    ``source_gpu`` forces the measured tables used (default: the nearest); ``force_gemm`` prices an
    H200-measured model's linear layers from ``gemm.csv`` as for an unmeasured one (both for
    checking the derivation against measurements). Raises :class:`ConfigError` for an unknown GPU
    or a TP the model cannot be split by."""
    from agentsim.calibration.h200 import H200StepModel

    if gpu not in GPUS:
        raise ConfigError("cluster.gpu", f"unknown GPU {gpu!r} (known: {', '.join(GPUS)})")
    if model.num_heads % tp:
        raise ConfigError("cluster.tp", f"{model.name} has {model.num_heads} attention heads, not divisible by TP {tp}")
    if model.num_kv_heads % tp and tp % model.num_kv_heads:
        raise ConfigError("cluster.tp", f"{model.name}'s {model.num_kv_heads} KV heads can neither be split "
                                        f"nor replicated over TP {tp}")
    src = source_gpu or nearest_gpu(gpu, MEASURED_GPUS)
    if src not in MEASURED_GPUS:
        raise ConfigError("source_gpu", f"no measured tables for {src!r} (have {', '.join(MEASURED_GPUS)})")
    notes = []
    if src == "h200":
        base = H200StepModel(model, tp, GPUS["h200"].spec, assumptions=assumptions, force_gemm=force_gemm)
        if base.linear_measured:
            notes.append(f"linear layers: measured {base.ops.source} rows at TP {tp}")
        else:
            notes.append(f"linear layers: gemm.csv at this model's per-GPU GEMM shapes {base.shapes}")
        notes.append(f"elementwise ops: {base.ops.source} TP {base.source_tp} scaled by per-GPU width")
        notes.append(f"attention: H200 fit for {base.attn.q_heads}/{base.attn.kv_heads} query/KV heads per GPU, "
                     f"scaled x{base.q_scale:.3g} (query) and x{base.kv_scale:.3g} (KV)")
    else:
        if tp not in VIDUR_TPS:
            raise ConfigError("cluster.tp", f"no A100 measurements at TP {tp} to derive from (have {VIDUR_TPS})")
        source = min((MODELS[n] for n in VIDUR_MODEL_DIRS),
                     key=lambda s: abs(np.log(model.hidden_size / s.hidden_size)))
        base = LayerwiseStepModel(model=model, source_model=source, tp=tp, gpu=GPUS["a100-80gb"].spec,
                                  assumptions=assumptions)
        notes.append(f"operators: Vidur's A100 {source.name} TP {tp} rows scaled by weight/activation size")
    if src != gpu:
        notes.append(f"GPU: {src} times scaled to {gpu} by roofline ratios of datasheet figures "
                     f"(HBM {GPUS[src].spec.hbm_GBps:g} -> {GPUS[gpu].spec.hbm_GBps:g} GB/s, "
                     f"{GPUS[src].spec.peak_tflops:g} -> {GPUS[gpu].spec.peak_tflops:g} TFLOP/s, "
                     f"link {GPUS[src].links.nvlink_GBps:g} -> {GPUS[gpu].links.nvlink_GBps:g} GB/s)")
        return GPUScaledStepModel(base, GPUS[src], GPUS[gpu]), src, notes
    return base, src, notes


def fit_layer_model(step_model, limits: GridLimits, assumptions: Assumptions):
    """Coefficients for a layer model: device terms fitted to its device times on the serving grid
    (host terms held at 0), then the assumed host terms added. Returns ``(coefficients,
    device-only coefficients, fit_error dict, grid)``."""
    grid = serving_grid(limits)
    shapes = [p.shape() for p in grid]
    times = np.array([_device_time(step_model, s) for s in shapes])
    device = fit_step_time(shapes, times, terms=[t for t in COEFFICIENTS
                                                 if t not in ("per_scheduled_seq", "per_sampled_token")])
    coeffs = dataclasses.replace(device, const=device.const + assumptions.cpu_overhead_step_s,
                                 per_scheduled_seq=device.per_scheduled_seq + assumptions.cpu_overhead_per_seq_s)
    fit_err = {"what": "relative error of the step-time model's device terms against the layer model's "
                       "device times it was fitted to (host terms are assumptions, added after the fit)"}
    pred = predict_many(device, shapes)
    fit_err["grid"] = error_stats(pred, times).to_dict()
    kinds = np.array([p.kind for p in grid])
    fit_err["grid_by_kind"] = {k: error_stats(pred[kinds == k], times[kinds == k]).to_dict()
                               for k in ("decode", "prefill", "mixed") if (kinds == k).any()}
    rnd = random_batches(limits, RANDOM_BATCHES, SEED)
    rt = np.array([_device_time(step_model, s) for s in rnd])
    fit_err["held_out_random_batches"] = error_stats(predict_many(device, rnd), rt).to_dict()
    fit_err["held_out_random_batches"]["seed"] = SEED
    return coeffs, device, fit_err, grid


def forward_held_out(device) -> dict:
    """Error of device-only coefficients on ``forward.csv``'s 46 whole steps (Llama-3-8B TP1 on an
    H200), which no part of the model was fitted to. ``graph``: CUDA-graph replay for every row
    (device time, the primary figure: see :func:`agentsim.calibration.h200.forward_points`);
    ``graph_decode_eager_rest``: graph for decode-only rows, eager for the others (eager small
    steps carry ~5-20 ms of PyTorch dispatch that neither vLLM nor the model has)."""
    from agentsim.calibration.h200 import forward_points

    out = {"what": "relative error of the profile's device terms on data/h200-torch/forward.csv "
                   "(46 whole steps of Llama-3-8B TP1, not fitted to)"}
    for key, truth in (("graph", "graph"), ("graph_decode_eager_rest", "graph-decode")):
        shapes, t, kinds = forward_points(truth=truth)
        pred = predict_many(device, shapes)
        out[key] = error_stats(pred, t).to_dict()
        k = np.array(kinds)
        out[key]["by_kind"] = {kind: error_stats(pred[k == kind], t[k == kind]).to_dict()
                               for kind in ("decode", "prefill", "mixed")}
    return out


def build_profile(gpu: str, model: ModelDims | str, tp: int, created_at: str | None = None,
                  assumptions: Assumptions = Assumptions()) -> Profile:
    """A profile for ``(gpu, model, tp)`` from the nearest measured tables (module docstring).

    Its provenance ``kind`` is ``"measured-layers"`` when the GPU has tables and the model and TP
    were measured on it, else ``"derived"``. Raises :class:`ConfigError` naming ``cluster.gpu`` /
    ``cluster.tp`` when the GPU is unknown or the model does not fit or split.
    """
    from agentsim.calibration.h200 import H200_SOURCE, H200StepModel

    dims = resolve_model(model) if isinstance(model, str) else model
    step_model, src, notes = step_model_for(gpu, dims, tp, assumptions)
    kind = GPUS[gpu]
    try:
        capacity = kv_capacity_tokens(kind.spec, dims, tp)
    except ValueError:
        raise ConfigError("cluster.tp", f"{dims.name} ({dims.num_params / 1e9:.1f}B parameters) does not fit "
                                        f"on {tp} x {gpu} ({kind.spec.memory_gib:.0f} GiB each)") from None
    limits = GridLimits(MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS, dims.max_model_len, capacity)
    coeffs, device, fit_err, grid = fit_layer_model(step_model, limits, assumptions)
    # measured-layers: the GPU's own tables, this model's own rows at this TP, nothing scaled
    measured = isinstance(step_model, (H200StepModel, LayerwiseStepModel)) and not step_model.derived
    layer_model = step_model.base if isinstance(step_model, GPUScaledStepModel) else step_model
    files = getattr(layer_model, "files", None) or [
        f"agentsim/calibration/data/vidur-a100/{f}" for f in
        [layer_model.ops.source] + ([layer_model.all_reduce.source] if layer_model.all_reduce else [])]
    if isinstance(step_model, H200StepModel) and dims.name == "llama-3-8b" and tp == 1:
        fit_err["held_out_forward"] = forward_held_out(device)
    kinds = np.array([p.kind for p in grid])
    provenance = {
        "kind": "measured-layers" if measured else "derived",
        "measured": f"per-operator tables measured on {src}",
        "source": H200_SOURCE if src == "h200" else "microsoft/vidur @ 7d47513 (MIT), data/profiling/{compute,network}/a100",
        "files": files,
        "parts": notes,
        # DESIGN.md's three levels: which were measured, which derived or assumed
        "levels": {
            "gpu_physics": (f"measured ({src} tables)" if measured else f"derived from {src} tables"),
            "engine_host": "assumed (assumptions.cpu_overhead_*), not measured; fit with `agentsim calibrate bench`",
            "frontend": "not modelled (zero); fit with `agentsim calibrate bench`",
        },
        "assumptions": {
            **assumptions.to_dict(),
            "activation_reserve_gib": 3.0,
            "host_terms": "const += cpu_overhead_step_s, per_scheduled_seq = cpu_overhead_per_seq_s (not fitted)",
            "not_modelled": "vLLM's fused/paged kernels (PyTorch ops measured), sampling beyond the LM head, "
                            "logits all-gather under TP, async scheduling overlap",
        },
        "grid": {"num_points": len(grid), "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
                 "max_num_seqs": MAX_NUM_SEQS, "kinds": {k: int((kinds == k).sum()) for k in ("decode", "prefill", "mixed")}},
        "command": ("python -m agentsim.calibration.h200" if measured and src == "h200"
                    else f"agentsim.calibration.derive.build_profile({gpu!r}, {dims.name!r}, {tp})"),
        "created_at": created_at or date.today().isoformat(),
    }
    if src == "h200":
        provenance["gpu_physics"] = ("PyTorch ops (cuBLAS, SDPA/bmm attention) timed alone; each op's device time is its "
                                     "time above the CPU dispatch floor (agentsim.calibration.h200.H200StepModel._kernel)")
    if not measured:
        provenance["derived_from"] = src
        provenance["note"] = ("DERIVED, not measured: " + "; ".join(notes)
                              + ". Fit it to your own runs with `agentsim calibrate bench`.")
    return Profile(
        name=f"{gpu}_{dims.name}_tp{tp}", gpu=kind.spec, model=dims, tp=tp, dtype_bytes=2, coefficients=coeffs,
        kv_bytes_per_token=dims.kv_bytes_per_token(2), kv_capacity_tokens=capacity,
        gpu_memory_utilization=GPU_MEMORY_UTILIZATION, links=kind.links, provenance=provenance,
        fit_error=fit_err, kv_block_size=KV_BLOCK_SIZE,
    )


def derivation_check() -> dict:
    """How well derivation works where the answer is known: ``forward.csv`` (Llama-3-8B TP1 on an
    H200, whole steps) against (a) the shipped path (measured H200 rows), (b) the H200 path for an
    unmeasured model (linear layers from ``gemm.csv``), (c) the A100 tables scaled to the H200 by
    datasheet figures (as for a GPU without tables). Each: the layer model's device time, and the
    fitted profile's device terms; relative error vs CUDA-graph replays."""
    from agentsim.calibration.h200 import forward_points

    shapes, t, _ = forward_points(truth="graph")
    dims = MODELS["llama-3-8b"]
    out = {}
    for key, kw in (("h200_measured_rows", {}), ("h200_gemm_csv", {"force_gemm": True}),
                    ("a100_tables_scaled_to_h200", {"source_gpu": "a100-80gb"})):
        sm, _, _ = step_model_for("h200", dims, 1, **kw)
        layer = np.array([_device_time(sm, s) for s in shapes])
        capacity = kv_capacity_tokens(GPUS["h200"].spec, dims, 1)
        limits = GridLimits(MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS, dims.max_model_len, capacity)
        _, device, _, _ = fit_layer_model(sm, limits, Assumptions())
        out[key] = {"layer_model": error_stats(layer, t).to_dict(),
                    "profile": error_stats(predict_many(device, shapes), t).to_dict()}
    return out


@lru_cache(maxsize=64)
def derive_profile(gpu: str, model: ModelDims, tp: int) -> Profile:
    """:func:`build_profile` with its date left out, cached per ``(gpu, model, tp)`` (sweeps build
    many simulations of one cluster)."""
    return build_profile(gpu, model, tp, created_at="derived-at-run-time")


def resolve_derived(gpu: str, model: str, tp: int, shipped: dict) -> Profile:
    """The profile for ``(gpu, model, tp)`` when ``gpu_model_tp`` is not shipped: the shipped one
    of a model whose dims equal a ``config.json``'s, else a derived one. ``model`` is a shipped
    name or the path of a Hugging Face ``config.json``. Raises :class:`ConfigError` naming the
    field (``cluster.gpu``, ``cluster.model``, ``cluster.tp``) or the config file and key."""
    from agentsim.calibration.profile import load_profile, profile_key

    if gpu.lower() not in GPUS:
        raise ConfigError("cluster.gpu", f"unknown GPU {gpu!r} (known: {', '.join(GPUS)})")
    dims = resolve_model(model)
    key = profile_key(gpu, dims.name, tp)
    if key in shipped:
        return load_profile(shipped[key])
    return derive_profile(gpu.lower(), dims, tp)

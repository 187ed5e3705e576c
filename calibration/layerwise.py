"""A layer-by-layer A100 step-time model built from Vidur's measured operator timings.

:class:`LayerwiseStepModel` predicts the duration of one engine step for an arbitrary batch (a
:class:`~agentsim.calibration.batch.BatchShape`) as the sum of its parts, per transformer layer x
layers, plus per-step terms:

=====================  ====================================================================  ===========
part                   source                                                                kind
=====================  ====================================================================  ===========
linear + elementwise   ``mlp.csv`` medians (qkv/out/up/down projections, norms, rope, act,   measured
                       residual add) at the step's token count and TP degree, interpolated
embedding lookup       ``mlp.csv`` ``emb`` (once per step)                                   measured
attention              closed-form fits to Vidur's A100 Llama-3-8B ``attention.csv``         fitted
                       (``research/simulators.md`` section 2.3), scaled by heads per GPU
KV-cache write         Vidur's decode ``kv_cache_save`` fit, per token written               fitted
all-reduce (TP > 1)    ``network/a100_dgx/all_reduce.csv``, 2 per layer, message =           measured
                       tokens x hidden x 2 bytes, isotonic-smoothed over message size
LM head                roofline: weights streamed once, 2 x hidden x vocab FLOPs per         assumption
                       sampled sequence (Vidur's tables do not include it)
CPU overhead           a constant per step plus a term per sequence (Vidur ships no          assumption
                       CPU-overhead data)
=====================  ====================================================================  ===========

A model that Vidur did not measure is *derived*: each operator's time at the same token count is
scaled by the ratio of its weight (or activation) size in the target model to that in the source
model; the caller marks such profiles ``derived`` in their provenance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import isotonic_regression

from agentsim.calibration.batch import BatchShape
from agentsim.calibration.profile import GPUSpec, ModelDims
from agentsim.errors import ConfigError

DATA_DIR = Path(str(resources.files("agentsim.calibration") / "data" / "vidur-a100"))

# Vidur's model directory per source model (compute/meta-llama/<dir>/mlp.csv).
VIDUR_MODEL_DIRS = {"llama-3-8b": "Meta-Llama-3-8B", "llama-3-70b": "Meta-Llama-3-70B"}

# Operators per transformer layer in mlp.csv (all medians, ms per layer).
LAYER_OPS = (
    "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
    "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add",
)

# The attention fits of research/simulators.md 2.3 (ms per layer) were made on A100 Llama-3-8B TP1:
# 32 query heads and 8 KV heads of dim 128 on one GPU. Other shapes scale by heads per GPU.
_FIT_Q_WIDTH = 32 * 128
_FIT_KV_WIDTH = 8 * 128
ATTN_FIT = {
    "prefill_const_ms": 0.008,
    "prefill_c2_ms": 1.0e-7,        # x chunk^2
    "prefill_kc_ms": 1.0e-7,        # x computed x chunk (compute-bound part)
    "prefill_k_floor_ms": 1.2e-5,   # x computed (reading the cached prefix)
    "decode_const_ms": 0.020,
    "decode_ctx_ms": 2.3e-6,        # x sum of decode context tokens
    "kv_save_const_ms": 0.002,
    "kv_save_token_ms": 6.0e-6,     # x tokens written (Vidur's decode fit)
    "vidur_prefill_kv_save_token_ms": 5.3e-4,
}


def _op_width(model: ModelDims, op: str) -> float:
    """Size (elements) that an operator's time scales with, for deriving one model from another."""
    q = model.num_heads * model.head_dim
    kv = model.num_kv_heads * model.head_dim
    h, i = model.hidden_size, model.intermediate_size
    return {
        "input_layernorm": h, "post_attention_layernorm": h, "add": h, "emb": h,
        "attn_pre_proj": h * (q + 2 * kv),
        "attn_post_proj": q * h,
        "attn_rope": q + kv,
        "mlp_up_proj": h * 2 * i,  # gate and up projections (SwiGLU)
        "mlp_act": i,
        "mlp_down_proj": i * h,
    }[op]


@lru_cache(maxsize=None)
def _read_mlp_csv(path: str) -> pd.DataFrame:
    return pd.read_csv(path)


@lru_cache(maxsize=None)
def _read_all_reduce_csv(path: str) -> pd.DataFrame:
    return pd.read_csv(path, index_col=0)


@dataclass(frozen=True)
class OpTable:
    """Median per-layer time (s) of each operator at measured token counts, for one model and TP."""

    num_tokens: np.ndarray
    times: dict[str, np.ndarray]
    source: str

    @classmethod
    def from_vidur(cls, source_model: str, tp: int, data_dir: Path = DATA_DIR) -> OpTable:
        if source_model not in VIDUR_MODEL_DIRS:
            raise ConfigError("source_model", f"no Vidur measurements for {source_model!r} (have {', '.join(VIDUR_MODEL_DIRS)})")
        rel = Path("compute") / "meta-llama" / VIDUR_MODEL_DIRS[source_model] / "mlp.csv"
        path = data_dir / rel
        if not path.exists():
            raise ConfigError(str(path), "Vidur mlp.csv not found")
        return cls.from_csv(path, tp, str(rel))

    @classmethod
    def from_csv(cls, path: Path, tp: int, rel: str) -> OpTable:
        """Rows of one TP degree of a file in Vidur's ``mlp.csv`` layout (Vidur's A100 tables and
        our H200 ``mlp_<model>.csv`` share it); ``rel`` is the name recorded as the source."""
        df = _read_mlp_csv(str(path))
        df = df[df["num_tensor_parallel_workers"] == tp]
        if df.empty:
            raise ConfigError("tp", f"{rel} has no rows for TP {tp}")
        cols = {op: f"time_stats.{op}.median" for op in (*LAYER_OPS, "emb")}
        # Some token counts were measured twice: take the median of the medians.
        g = df.groupby("num_tokens")[list(cols.values())].median().sort_index()
        times = {op: g[c].to_numpy(dtype=float) * 1e-3 for op, c in cols.items()}
        return cls(num_tokens=g.index.to_numpy(dtype=float), times=times, source=rel)

    def at(self, op: str, n: float) -> float:
        """Interpolated time at ``n`` tokens; linear extrapolation from the last two points beyond."""
        x, y = self.num_tokens, self.times[op]
        if n <= x[-1]:
            return float(np.interp(n, x, y))
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
        return float(y[-1] + slope * (n - x[-1]))


@dataclass(frozen=True)
class AllReduceTable:
    """Isotonic-smoothed all-reduce time (s) vs message bytes for ``tp`` GPUs in one A100 DGX node."""

    size_bytes: np.ndarray
    times: np.ndarray
    source: str

    @classmethod
    def from_vidur(cls, tp: int, data_dir: Path = DATA_DIR) -> AllReduceTable:
        rel = Path("network") / "a100_dgx" / "all_reduce.csv"
        df = _read_all_reduce_csv(str(data_dir / rel))
        df = df[(df["num_workers"] == tp) & (df["devices_per_node"] == tp)]
        if df.empty:
            raise ConfigError("tp", f"{rel} has no single-node rows for {tp} GPUs")
        g = df.groupby("size")["time_stats.all_reduce.median"].median().sort_index()
        # Small messages are noisy (bimodal 10-60 us); the cost cannot fall with size, so fit the
        # monotone (isotonic) curve rather than interpolating the noise.
        smooth = isotonic_regression(g.to_numpy(dtype=float), increasing=True).x
        return cls(size_bytes=g.index.to_numpy(dtype=float), times=smooth * 1e-3, source=str(rel))

    def at(self, size: float) -> float:
        x, y = self.size_bytes, self.times
        if size <= x[-1]:
            return float(np.interp(size, x, y))
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
        return float(y[-1] + slope * (size - x[-1]))


@dataclass(frozen=True)
class Assumptions:
    """The terms not covered by measurements, each stated in the generated profile's provenance."""

    cpu_overhead_step_s: float = 1.5e-3
    cpu_overhead_per_seq_s: float = 5e-6
    lm_head_hbm_efficiency: float = 0.8
    lm_head_mfu: float = 0.6
    vidur_prefill_kv_save: bool = False

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class LayerwiseStepModel:
    """Step time of ``model`` at tensor-parallel degree ``tp`` on ``gpu``, from measured layer timings."""

    model: ModelDims
    source_model: ModelDims
    tp: int
    gpu: GPUSpec
    dtype_bytes: int = 2
    assumptions: Assumptions = field(default_factory=Assumptions)
    data_dir: Path = DATA_DIR

    def __post_init__(self) -> None:
        self.ops = OpTable.from_vidur(self.source_model.name, self.tp, self.data_dir)
        self.all_reduce = AllReduceTable.from_vidur(self.tp, self.data_dir) if self.tp > 1 else None
        self.op_scale = {
            op: _op_width(self.model, op) / _op_width(self.source_model, op) for op in (*LAYER_OPS, "emb")
        }
        kv_heads_per_gpu = max(1.0, self.model.num_kv_heads / self.tp)
        self.q_scale = self.model.num_heads / self.tp * self.model.head_dim / _FIT_Q_WIDTH
        self.kv_scale = kv_heads_per_gpu * self.model.head_dim / _FIT_KV_WIDTH

    @property
    def derived(self) -> bool:
        return self.model.name != self.source_model.name

    # ------------------------------------------------------------------ parts (seconds)
    def linear_time(self, num_tokens: int) -> float:
        per_layer = sum(self.op_scale[op] * self.ops.at(op, num_tokens) for op in LAYER_OPS)
        return self.model.num_layers * per_layer + self.op_scale["emb"] * self.ops.at("emb", num_tokens)

    def attention_time(self, batch: BatchShape) -> float:
        f, ms = ATTN_FIT, 1e-3
        per_layer = 0.0
        if batch.prefills:
            per_layer += f["prefill_const_ms"]
            for c, k in batch.prefills:
                per_layer += self.q_scale * f["prefill_c2_ms"] * c * c
                per_layer += k * max(self.q_scale * f["prefill_kc_ms"] * c, self.kv_scale * f["prefill_k_floor_ms"])
        if batch.decode_ctx:
            per_layer += f["decode_const_ms"] + self.kv_scale * f["decode_ctx_ms"] * batch.decode_ctx_tokens
        # Writing the new tokens' K and V into the paged cache.
        per_layer += f["kv_save_const_ms"] + self.kv_scale * f["kv_save_token_ms"] * batch.num_decode_seqs
        save_prefill = f["vidur_prefill_kv_save_token_ms"] if self.assumptions.vidur_prefill_kv_save else f["kv_save_token_ms"]
        per_layer += self.kv_scale * save_prefill * batch.num_prefill_tokens
        return self.model.num_layers * per_layer * ms

    def all_reduce_time(self, num_tokens: int) -> float:
        if self.all_reduce is None:
            return 0.0
        size = num_tokens * self.model.hidden_size * self.dtype_bytes
        return 2 * self.model.num_layers * self.all_reduce.at(size)

    def lm_head_time(self, num_seqs: int) -> float:
        a = self.assumptions
        weight = self.model.vocab_size * self.model.hidden_size / self.tp
        read = weight * self.dtype_bytes / (self.gpu.hbm_GBps * 1e9 * a.lm_head_hbm_efficiency)
        compute = 2 * weight * num_seqs / (self.gpu.peak_tflops * 1e12 * a.lm_head_mfu)
        return max(read, compute)

    def cpu_overhead(self, num_seqs: int) -> float:
        a = self.assumptions
        return a.cpu_overhead_step_s + a.cpu_overhead_per_seq_s * num_seqs

    def breakdown(self, batch: BatchShape) -> dict[str, float]:
        return {
            "linear": self.linear_time(batch.num_tokens),
            "attention": self.attention_time(batch),
            "all_reduce": self.all_reduce_time(batch.num_tokens),
            "lm_head": self.lm_head_time(batch.num_seqs),
            "cpu_overhead": self.cpu_overhead(batch.num_seqs),
        }

    def step_time(self, batch: BatchShape) -> float:
        """Seconds for one engine step computing ``batch``."""
        if batch.num_tokens == 0:
            raise ValueError("empty batch")
        return sum(self.breakdown(batch).values())

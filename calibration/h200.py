"""An H200 step-time model from our H200 measurements (``data/h200-torch/``, README there), and the
script that builds the shipped H200 profiles from it.

    python -m agentsim.calibration.h200 [--out DIR] [--check] [--derivation-check]

:class:`H200StepModel` predicts one engine step's time on one H200 (per GPU of a TP group) as the sum
of its parts, per transformer layer x layers, plus per-step terms:

=====================  ====================================================================  ===========
part                   source                                                                kind
=====================  ====================================================================  ===========
linear layers          ``mlp_<model>.csv`` medians (QKV, O, gate+up, down projections) at    measured
                       the step's token count and TP, for Llama-3-8B (TP 1/2/4) and 70B
                       (TP 4/8); any other model or TP: ``gemm.csv`` at the per-GPU GEMM
                       shapes ``tokens x k -> n`` read from its ``config.json`` dims         measured
elementwise            ``mlp_<model>.csv`` norms, RoPE, SiLU-and-mul, residual add,          measured
                       embedding; other models: nearest measured table scaled by per-GPU
                       width
attention              non-negative fits per head layout (query/KV heads per GPU) to         fitted
                       ``attention.csv`` + ``attention_more.csv``: prefill ``a + b x pairs
                       + c x keys``, decode ``a + b x seqs + c x context tokens``; other
                       layouts scale the nearest by query (prefill) / KV (decode) heads
LM head                ``gemm.csv`` at ``sampled x hidden -> vocab / TP``                    measured
KV-cache write         roofline: K and V of each new token written at HBM bandwidth          assumption
all-reduce (TP > 1)    Vidur's A100 DGX ``all_reduce.csv`` with its bandwidth part scaled    assumption
                       by NVLink (A100 300 -> H200 450 GB/s per direction)
CPU overhead           :class:`~agentsim.calibration.layerwise.Assumptions` (as the A100     assumption
                       profiles); not part of :meth:`H200StepModel.device_time`
=====================  ====================================================================  ===========

Every table times one operator alone, its runs queued back to back, so a run lasts ``max(CPU
dispatch, GPU work)``: small operators show the dispatch floor (~24 us for one cuBLAS call, ~100 us
for the unfused RoPE), not GPU time. :meth:`H200StepModel._kernel` turns each measured time into
device time (the time itself above twice the floor; up to 30 % above the floor the op's HBM
traffic at the bandwidth the tables' largest GEMV reaches, 80 % of the datasheet; linear in
between), which is what a CUDA-graph replay of the whole step costs.

These are PyTorch ops (cuBLAS GEMMs, SDPA/bmm attention), not vLLM's kernels: GPU physics. The
profiles are checked against ``forward.csv``'s 46 measured whole steps of Llama-3-8B TP1, which no
part of the model is fitted to (:func:`forward_held_out`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import isotonic_regression, nnls

from agentsim.calibration.batch import BatchShape
from agentsim.calibration.layerwise import LAYER_OPS, AllReduceTable, Assumptions, OpTable
from agentsim.calibration.profile import GPUSpec, ModelDims
from agentsim.errors import ConfigError

H200_DATA_DIR = Path(str(resources.files("agentsim.calibration") / "data" / "h200-torch"))
H200_SOURCE = "agentsim's own H200 measurements (PyTorch 2.11, CUDA 13.0, 2026-11-30), data/h200-torch/README.md"

# Measured per-layer tables per source model (Vidur's mlp.csv layout) and their TP degrees.
H200_MLP_FILES = {"llama-3-8b": "mlp_llama-3-8b.csv", "llama-3-70b": "mlp_llama-3-70b.csv"}
LINEAR_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
ELEMENTWISE_OPS = tuple(op for op in LAYER_OPS if op not in LINEAR_OPS)

# NVLink per direction (GB/s) of the A100 DGX whose all-reduce table is scaled to other GPUs.
A100_NVLINK_GBPS = 300.0
# Duration of one small kernel back to back with others in a CUDA graph (launch gap + minimal
# execution): an assumption; the tables time each operator alone, so they cannot show it.
KERNEL_FLOOR_S = 2e-6
# Times within this fraction above a dispatch floor count as the floor (an assumption): the medians
# of a dispatch-bound operator spread by tens of per cent between token counts in these tables
# (unfused RoPE at TP 4: 118-141 us from 1 to 512 tokens, ~1 MB of traffic).
TIMING_NOISE = 0.3


# ---------------------------------------------------------------------------------------------- GEMM
@dataclass(frozen=True)
class GemmTable:
    """bf16 GEMM ``x[m, k] @ W[n, k]^T`` median seconds on a grid of ``m`` (tokens) x ``k`` x ``n``.

    :meth:`at` interpolates linearly in ``m`` (proportionally beyond the last ``m``) and bilinearly in
    ``(k, n)``; a ``k`` or ``n`` outside the measured widths scales the nearest edge's time by the
    width ratio (GEMM work and weight bytes are both proportional to ``k x n``).
    """

    m: np.ndarray
    k: np.ndarray
    n: np.ndarray
    times: np.ndarray  # [m, k, n] seconds
    source: str = "gemm.csv"
    _curves: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_csv(cls, path: Path) -> GemmTable:
        df = _read_csv(str(path))
        g = df.groupby(["m_tokens", "k_in", "n_out"])["time_ms.median"].median()
        m, k, n = (np.array(sorted(g.index.get_level_values(i).unique()), dtype=float) for i in range(3))
        cube = g.unstack("n_out").reindex(pd.MultiIndex.from_product([m, k])).to_numpy(dtype=float)
        times = cube.reshape(len(m), len(k), len(n)) * 1e-3
        if np.isnan(times).any():
            raise ConfigError(str(path), "the GEMM grid has holes (every m x k x n must be measured)")
        return cls(m=m, k=k, n=n, times=times, source=path.name)

    def curve(self, k: float, n: float) -> np.ndarray:
        """Seconds at every measured ``m`` for widths ``k x n``."""
        key = (float(k), float(n))
        c = self._curves.get(key)
        if c is None:
            kc = min(max(k, self.k[0]), self.k[-1])
            nc = min(max(n, self.n[0]), self.n[-1])
            ki = min(int(np.searchsorted(self.k, kc, side="right")) - 1, len(self.k) - 2)
            ni = min(int(np.searchsorted(self.n, nc, side="right")) - 1, len(self.n) - 2)
            tk = (kc - self.k[ki]) / (self.k[ki + 1] - self.k[ki])
            tn = (nc - self.n[ni]) / (self.n[ni + 1] - self.n[ni])
            t = self.times
            c = ((1 - tk) * (1 - tn) * t[:, ki, ni] + tk * (1 - tn) * t[:, ki + 1, ni]
                 + (1 - tk) * tn * t[:, ki, ni + 1] + tk * tn * t[:, ki + 1, ni + 1])
            # no GEMM gets faster with more rows: isotonic in m removes timing noise at small m
            c = isotonic_regression(c * (k / kc) * (n / nc), increasing=True).x
            self._curves[key] = c
        return c

    def at(self, m: float, k: float, n: float) -> float:
        if m <= 0:
            return 0.0
        c = self.curve(k, n)
        if m <= self.m[-1]:
            return float(np.interp(m, self.m, c))
        return float(c[-1] * m / self.m[-1])


# ----------------------------------------------------------------------------------------- attention
@dataclass(frozen=True)
class AttentionFit:
    """Per-layer attention seconds for one head layout (query / KV heads per GPU, head dim 128).

    Prefill (all chunks of a step in one kernel): ``prefill_const + prefill_pair x pairs +
    prefill_key x keys`` with ``pairs`` the (query, key) products and ``keys`` the keys read;
    decode: ``decode_const + decode_seq x seqs + decode_ctx x context tokens``. Fitted non-negative
    on relative error (:func:`_nnls_rel`) to the measured rows; ``fit_error`` is the median / max
    relative error on them.
    """

    q_heads: int
    kv_heads: int
    prefill_const: float
    prefill_pair: float
    prefill_key: float
    decode_const: float
    decode_seq: float
    decode_ctx: float
    fit_error: dict
    prefill_floor: float = 0.0  # smallest measured prefill / decode time: the op's dispatch floor
    decode_floor: float = 0.0

    def prefill(self, chunks: tuple[tuple[int, int], ...], q_scale: float = 1.0, kv_scale: float = 1.0) -> float:
        if not chunks:
            return 0.0
        pairs = sum(c * k + c * (c + 1) / 2 for c, k in chunks)
        keys = sum(c + k for c, k in chunks)
        return self.prefill_const + q_scale * self.prefill_pair * pairs + kv_scale * self.prefill_key * keys

    def decode(self, ctx: tuple[int, ...], kv_scale: float = 1.0) -> float:
        if not ctx:
            return 0.0
        return self.decode_const + kv_scale * (self.decode_seq * len(ctx) + self.decode_ctx * sum(ctx))


def _nnls_rel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative error (rows divided by the target), columns scaled."""
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    sol, _ = nnls((x / scale) / y[:, None], np.ones_like(y), maxiter=50 * x.shape[1])
    return sol / scale


def _rel_err(pred: np.ndarray, y: np.ndarray) -> dict:
    r = np.abs(pred / y - 1)
    return {"num_points": int(len(y)), "median_rel_error": round(float(np.median(r)), 5),
            "max_rel_error": round(float(r.max()), 5)}


@lru_cache(maxsize=None)
def _read_csv(path: str) -> pd.DataFrame:
    return pd.read_csv(path)


@lru_cache(maxsize=None)
def attention_fits(data_dir: str = str(H200_DATA_DIR)) -> dict[tuple[int, int], AttentionFit]:
    """One :class:`AttentionFit` per measured head layout in ``attention.csv`` (heads divided by its
    TP column) and ``attention_more.csv`` (heads already per GPU); both files' rows are pooled per layout."""
    d = Path(data_dir)
    a = _read_csv(str(d / "attention.csv"))
    rows = []
    for _, r in a.iterrows():
        tp = int(r["num_tensor_parallel_workers"])
        pre = bool(r["is_prefill"])
        t = r["time_stats.attn_prefill.median"] if pre else r["time_stats.attn_decode.median"]
        rows.append((int(r["n_q_head"]) // tp, int(r["n_kv_head"]) // tp, pre, int(r["prefill_chunk_size"]),
                     int(r["kv_cache_size"]), int(r["batch_size"]), float(t)))
    m = _read_csv(str(d / "attention_more.csv"))
    for _, r in m.iterrows():
        rows.append((int(r["n_q_head"]), int(r["n_kv_head"]), bool(r["is_prefill"]), int(r["prefill_chunk_size"]),
                     int(r["kv_cache_size"]), int(r["batch_size"]), float(r["time_ms.median"])))
    df = pd.DataFrame(rows, columns=["q", "kv", "pre", "chunk", "kv_cache", "batch", "ms"]).dropna()
    out = {}
    for (q, kv), g in df.groupby(["q", "kv"]):
        p, dd = g[g.pre], g[~g.pre]
        c, k = p.chunk.to_numpy(float), p.kv_cache.to_numpy(float)
        # Causal rows (no cache) compute c(c+1)/2 pairs; the rows over a cache ran full attention of
        # the chunk over cache + chunk (README), c(k+c) pairs.
        pairs = np.where(k == 0, c * (c + 1) / 2, c * (k + c))
        xp = np.column_stack([np.ones_like(c), pairs, c + k])
        yp = p.ms.to_numpy(float) * 1e-3
        cp = _nnls_rel(xp, yp)
        b, ctx = dd.batch.to_numpy(float), dd.kv_cache.to_numpy(float)
        xd = np.column_stack([np.ones_like(b), b, b * ctx])
        yd = dd.ms.to_numpy(float) * 1e-3
        cd = _nnls_rel(xd, yd)
        out[(int(q), int(kv))] = AttentionFit(
            int(q), int(kv), *map(float, cp), *map(float, cd),
            fit_error={"prefill": _rel_err(xp @ cp, yp), "decode": _rel_err(xd @ cd, yd)},
            prefill_floor=float(yp.min()), decode_floor=float(yd.min()))
    return out


def attention_for(q_heads: float, kv_heads: float, data_dir: Path = H200_DATA_DIR) -> tuple[AttentionFit, float, float]:
    """The fit for a layout of ``q_heads`` / ``kv_heads`` per GPU and the scales to apply to it:
    the exact layout (scales 1) or the nearest one in ``|log q ratio| + |log kv ratio|``, with the
    prefill pair term scaled by query heads and the key / decode terms by KV heads."""
    fits = attention_fits(str(data_dir))
    key = min(fits, key=lambda l: abs(np.log(q_heads / l[0])) + abs(np.log(kv_heads / l[1])))
    return fits[key], q_heads / key[0], kv_heads / key[1]


# -------------------------------------------------------------------------------------- step model
def hbm_efficiency(gemm: GemmTable, gpu: GPUSpec) -> float:
    """Fraction of the datasheet HBM bandwidth a weight-streaming kernel reaches, measured in the
    tables themselves: the largest one-token GEMM (the widest ``k x n``, GBs of weights, so no
    dispatch or launch cost matters) -- 0.80 on the H200."""
    m, k, n = gemm.m[0], gemm.k[-1], gemm.n[-1]
    bytes_moved = 2 * (m * k + k * n + m * n)
    return float(bytes_moved / (gpu.hbm_GBps * 1e9) / gemm.times[0, -1, -1])


def _monotone(t: OpTable) -> OpTable:
    """The table with each operator's times made non-decreasing in tokens (isotonic regression): no
    operator gets faster with more tokens, but the medians at 1-16 tokens wander by tens of per cent
    (e.g. Llama-3-8B TP1 RoPE: 143 us at 1 token, 107 us at 16)."""
    return OpTable(num_tokens=t.num_tokens, source=t.source,
                   times={op: isotonic_regression(y, increasing=True).x for op, y in t.times.items()})


def _per_gpu_width(model: ModelDims, tp: int, op: str) -> float:
    """Elements per token an elementwise operator touches on one GPU of a TP group."""
    q = model.num_heads * model.head_dim / tp
    kv = max(1.0, model.num_kv_heads / tp) * model.head_dim
    return {"input_layernorm": model.hidden_size, "post_attention_layernorm": model.hidden_size,
            "add": model.hidden_size, "emb": model.hidden_size, "attn_rope": q + kv,
            "mlp_act": model.intermediate_size / tp}[op]


def _gemm_shapes(model: ModelDims, tp: int) -> dict[str, tuple[float, float]]:
    """``(k, n)`` per token of each linear layer on one GPU (column-parallel QKV and gate+up,
    row-parallel O and down, as vLLM's ``QKVParallelLinear`` / ``RowParallelLinear`` shard them)."""
    hd, h, i = model.head_dim, model.hidden_size, model.intermediate_size
    q = model.num_heads * hd / tp
    kv = max(1.0, model.num_kv_heads / tp) * hd
    return {"attn_pre_proj": (h, q + 2 * kv), "attn_post_proj": (q, h),
            "mlp_up_proj": (h, 2 * i / tp), "mlp_down_proj": (i / tp, h)}


def h200_measured_tps(data_dir: Path = H200_DATA_DIR) -> dict[str, tuple[int, ...]]:
    """Source model -> TP degrees its ``mlp_<model>.csv`` has rows for."""
    out = {}
    for name, f in H200_MLP_FILES.items():
        df = _read_csv(str(data_dir / f))
        out[name] = tuple(sorted(int(t) for t in df["num_tensor_parallel_workers"].unique()))
    return out


@dataclass
class H200StepModel:
    """Step time of ``model`` at tensor-parallel degree ``tp`` on H200s, from the H200 tables.

    ``source`` (set in ``__post_init__``) is the measured model whose ``mlp_*.csv`` rows give the
    elementwise ops; the linear layers come from the same rows when ``model`` *is* that model at a
    measured TP (``derived`` is False), else from ``gemm.csv`` at the model's own shapes.
    """

    model: ModelDims
    tp: int
    gpu: GPUSpec
    dtype_bytes: int = 2
    assumptions: Assumptions = field(default_factory=Assumptions)
    data_dir: Path = H200_DATA_DIR
    force_gemm: bool = False  # price linear layers from gemm.csv even for a measured model (checks)

    def __post_init__(self) -> None:
        from agentsim.calibration.models import MODELS, same_dims

        tps = h200_measured_tps(self.data_dir)
        measured = [n for n in H200_MLP_FILES if same_dims(self.model, MODELS[n]) and self.tp in tps[n]]
        self.linear_measured = bool(measured) and not self.force_gemm
        if measured:
            src, src_tp = measured[0], self.tp
        else:
            # nearest measured (model, TP) in per-GPU width of the elementwise ops (hidden, MLP width)
            cands = [(n, t) for n in H200_MLP_FILES for t in tps[n]]

            def dist(c: tuple[str, int]) -> float:
                s = MODELS[c[0]]
                return (abs(np.log(self.model.hidden_size / s.hidden_size))
                        + abs(np.log(self.model.intermediate_size / self.tp / (s.intermediate_size / c[1]))))

            src, src_tp = min(cands, key=dist)
        self.source = MODELS[src]
        self.source_tp = src_tp
        self.ops = _monotone(OpTable.from_csv(self.data_dir / H200_MLP_FILES[src], src_tp, H200_MLP_FILES[src]))
        self.gemm = GemmTable.from_csv(self.data_dir / "gemm.csv")
        self.op_scale = {op: _per_gpu_width(self.model, self.tp, op) / _per_gpu_width(self.source, src_tp, op)
                         for op in (*ELEMENTWISE_OPS, "emb")}
        self.shapes = _gemm_shapes(self.model, self.tp)
        q = self.model.num_heads / self.tp
        kv = max(1.0, self.model.num_kv_heads / self.tp)
        self.attn, self.q_scale, self.kv_scale = attention_for(q * self.model.head_dim / 128,
                                                               kv * self.model.head_dim / 128, self.data_dir)
        self.all_reduce = AllReduceTable.from_vidur(self.tp) if self.tp > 1 else None
        self.dispatch_floor = float(self.gemm.times.min())  # gemm.csv: 1 token x 2048 x 512 (2 MiB)
        self.hbm_efficiency = hbm_efficiency(self.gemm, self.gpu)
        # an op's smallest measured time is its dispatch floor (the linear ops of one mlp table
        # share one: each is a single cuBLAS call)
        self.op_floor = {op: float(self.ops.times[op].min()) for op in (*ELEMENTWISE_OPS, "emb")}
        self.linear_floor = min(float(self.ops.times[op].min()) for op in LINEAR_OPS)

    def _kernel(self, measured: float, floor: float, hbm_bytes: float = 0.0) -> float:
        """Device seconds of an operator timed alone. The tables queue each operator's timed runs
        back to back, so a run lasts ``max(F, work)``: ``F`` the CPU's dispatch time (the
        operator's *floor*), ``work`` the GPU time. Above ``2F`` the time is the work; at or below
        ``F`` (within ``TIMING_NOISE`` of it) the work is hidden and taken as its HBM traffic at the achieved bandwidth
        (:attr:`hbm_efficiency` x datasheet), at least one graph-replayed kernel
        (``KERNEL_FLOOR_S``; vLLM also fuses RoPE, SiLU-and-mul and add+RMSNorm into one kernel
        each); in between, linear (continuous)."""
        if measured >= 2 * floor:
            return measured
        hidden = max(KERNEL_FLOOR_S, hbm_bytes / (self.gpu.hbm_GBps * 1e9 * self.hbm_efficiency))
        top = floor * (1 + TIMING_NOISE)
        if measured <= top:
            return min(hidden, measured)
        return hidden + (measured - top) * (2 * floor - hidden) / (2 * floor - top)

    def _elementwise(self, op: str, n: float) -> float:
        """Device seconds of an elementwise op (several PyTorch kernels: its own floor; traffic:
        read and write ``n x width`` activations)."""
        w = _per_gpu_width(self.source, self.source_tp, op)
        return self.op_scale[op] * self._kernel(self.ops.at(op, n), self.op_floor[op], 2 * n * w * self.dtype_bytes * 2)

    def _gemm_bytes(self, m: float, k: float, n: float) -> float:
        return self.dtype_bytes * (m * k + k * n + m * n)

    @property
    def derived(self) -> bool:
        """True when any part is priced from another model's rows or scaled (not this model's own)."""
        return not self.linear_measured or (self.q_scale, self.kv_scale) != (1.0, 1.0)

    @property
    def files(self) -> list[str]:
        base = "agentsim/calibration/data/h200-torch/"
        out = [base + self.ops.source, base + "attention.csv", base + "attention_more.csv", base + "gemm.csv"]
        if self.all_reduce is not None:
            out.append("agentsim/calibration/data/vidur-a100/" + self.all_reduce.source)
        return out

    # ------------------------------------------------------------------ parts (seconds)
    def linear_time(self, num_tokens: int) -> float:
        if self.linear_measured:
            per_layer = sum(self._kernel(self.ops.at(op, num_tokens), self.linear_floor,
                                         self._gemm_bytes(num_tokens, *self.shapes[op])) for op in LINEAR_OPS)
        else:
            per_layer = sum(self._kernel(self.gemm.at(num_tokens, k, n), self.dispatch_floor,
                                         self._gemm_bytes(num_tokens, k, n)) for k, n in self.shapes.values())
        per_layer += sum(self._elementwise(op, num_tokens) for op in ELEMENTWISE_OPS)
        return self.model.num_layers * per_layer + self._elementwise("emb", num_tokens)

    def attention_prefill_time(self, batch: BatchShape) -> float:
        if not batch.prefills:
            return 0.0
        kv = max(1.0, self.model.num_kv_heads / self.tp) * self.model.head_dim
        q = self.model.num_heads / self.tp * self.model.head_dim
        traffic = sum((c * q * 2 + (c + k) * kv * 2) * self.dtype_bytes for c, k in batch.prefills)
        return self.model.num_layers * self._kernel(self.attn.prefill(batch.prefills, self.q_scale, self.kv_scale),
                                                    max(self.attn.prefill_floor, self.dispatch_floor), traffic)

    def attention_decode_time(self, batch: BatchShape) -> float:
        if not batch.decode_ctx:
            return 0.0
        # decode attention here is several kernels (bmm, softmax, bmm): its own dispatch floor
        kv = max(1.0, self.model.num_kv_heads / self.tp) * self.model.head_dim
        traffic = 2 * kv * self.dtype_bytes * batch.decode_ctx_tokens  # K and V of every context token
        return self.model.num_layers * self._kernel(self.attn.decode(batch.decode_ctx, self.kv_scale),
                                                    max(self.attn.decode_floor, self.dispatch_floor), traffic)

    def kv_write_time(self, num_tokens: int) -> float:
        kv_per_gpu = max(1.0, self.model.num_kv_heads / self.tp) * self.model.head_dim
        return num_tokens * 2 * kv_per_gpu * self.dtype_bytes * self.model.num_layers / (self.gpu.hbm_GBps * 1e9)

    def all_reduce_time(self, num_tokens: int) -> float:
        if self.all_reduce is None:
            return 0.0
        size = num_tokens * self.model.hidden_size * self.dtype_bytes
        t, t0 = self.all_reduce.at(size), float(self.all_reduce.times[0])
        # latency part as measured on the A100 DGX, bandwidth part scaled by NVLink bandwidth
        from agentsim.calibration.hardware import GPUS

        nvlink = GPUS["h200"].links.nvlink_GBps
        return 2 * self.model.num_layers * (t0 + (t - t0) * A100_NVLINK_GBPS / nvlink)

    def lm_head_time(self, num_sampled: int) -> float:
        k, n = self.model.hidden_size, self.model.vocab_size / self.tp
        return self._kernel(self.gemm.at(num_sampled, k, n), self.dispatch_floor, self._gemm_bytes(num_sampled, k, n))

    def cpu_overhead(self, num_seqs: int) -> float:
        a = self.assumptions
        return a.cpu_overhead_step_s + a.cpu_overhead_per_seq_s * num_seqs

    def breakdown(self, batch: BatchShape) -> dict[str, float]:
        return {
            "linear": self.linear_time(batch.num_tokens),
            "attention_prefill": self.attention_prefill_time(batch),
            "attention_decode": self.attention_decode_time(batch),
            "kv_write": self.kv_write_time(batch.num_tokens),
            "all_reduce": self.all_reduce_time(batch.num_tokens),
            "lm_head": self.lm_head_time(batch.num_seqs),
            "cpu_overhead": self.cpu_overhead(batch.num_seqs),
        }

    def device_time(self, batch: BatchShape) -> float:
        """Seconds the GPU is busy for ``batch`` (everything but the host terms)."""
        if batch.num_tokens == 0:
            raise ValueError("empty batch")
        b = self.breakdown(batch)
        return sum(v for k, v in b.items() if k != "cpu_overhead")

    def step_time(self, batch: BatchShape) -> float:
        """Seconds for one engine step computing ``batch`` (device + assumed host time)."""
        return self.device_time(batch) + self.cpu_overhead(batch.num_seqs)


# ------------------------------------------------------------------------------ held-out whole steps
def forward_points(data_dir: Path = H200_DATA_DIR, truth: str = "graph-decode") -> tuple[list[BatchShape], np.ndarray, list[str]]:
    """``forward.csv``'s 46 measured whole steps of Llama-3-8B TP1 as (shapes, seconds, kinds).

    ``truth = "graph-decode"``: ``graph_median_ms`` (a CUDA-graph replay, what vLLM V1 runs for
    decode batches) for decode-only rows, ``eager_median_ms`` for the rest; ``"graph"``: graph
    replay for every row (pure device time; eager small steps are host-bound by this unfused
    PyTorch model's ~10 ms of kernel launches, a cost vLLM's compiled model does not have).
    """
    if truth not in ("graph-decode", "graph"):
        raise ValueError(f"truth must be 'graph-decode' or 'graph', got {truth!r}")
    df = _read_csv(str(data_dir / "forward.csv"))
    shapes, times, kinds = [], [], []
    for _, r in df.iterrows():
        pt, pk, ds, dk = (int(r[c]) for c in ("prefill_tokens", "prefill_kv", "decode_seqs", "decode_kv"))
        s = BatchShape(prefills=((pt, pk),) if pt else (), decode_ctx=(dk,) * ds)
        use_graph = truth == "graph" or s.kind == "decode"
        shapes.append(s)
        times.append(float(r["graph_median_ms" if use_graph else "eager_median_ms"]) * 1e-3)
        kinds.append(s.kind)
    return shapes, np.array(times), kinds


# ------------------------------------------------------------------------------------ shipped builds
# (model name, TP): Llama-3-8B at the TPs of mlp_llama-3-8b.csv, Llama-3-70B at those of mlp_llama-3-70b.csv.
H200_BUILDS: tuple[tuple[str, int], ...] = (
    ("llama-3-8b", 1), ("llama-3-8b", 2), ("llama-3-8b", 4), ("llama-3-70b", 4), ("llama-3-70b", 8),
)


def build_all(created_at: str) -> list:
    """The shipped H200 profiles (see :func:`agentsim.calibration.derive.profile_from_step_model`)."""
    from agentsim.calibration.derive import build_profile

    return [build_profile("h200", name, tp, created_at) for name, tp in H200_BUILDS]


def main(argv: list[str] | None = None) -> int:
    from agentsim.calibration.build_profiles import PROFILES_DIR, _comparable
    from agentsim.calibration.profile import shipped_profiles

    ap = argparse.ArgumentParser(prog="python -m agentsim.calibration.h200", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=PROFILES_DIR, help="directory to write profiles to")
    ap.add_argument("--check", action="store_true", help="exit 1 if the shipped H200 profiles differ from a rebuild")
    ap.add_argument("--derivation-check", action="store_true",
                    help="print the error of derived Llama-3-8B TP1 H200 models on forward.csv (writes nothing)")
    args = ap.parse_args(argv)
    if args.derivation_check:
        from agentsim.calibration.derive import derivation_check

        for key, r in derivation_check().items():
            print(f"{key:28s} " + "  ".join(
                f"{part}: median/p90/max {e['median_rel_error']:.1%}/{e['p90_rel_error']:.1%}/{e['max_rel_error']:.1%}"
                f" (signed mean {e['mean_signed_rel_error']:+.1%})" for part, e in r.items()))
        return 0
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    created = (datetime.fromtimestamp(int(epoch), timezone.utc).date() if epoch else date.today()).isoformat()
    profiles = build_all(created)
    if args.check:
        shipped = shipped_profiles()
        bad = [p.name for p in profiles if p.name not in shipped
               or _comparable(json.loads(shipped[p.name].read_text())) != _comparable(p.to_dict())]
        for name in bad:
            print(f"differs from a rebuild: {name}", file=sys.stderr)
        return 1 if bad else 0
    # Only agentsim profiles are ever replaced: any other file of the same name is refused.
    for p in profiles:
        target = args.out / f"{p.name}.json"
        if target.exists():
            try:
                is_profile = json.loads(target.read_text()).get("format") == "agentsim-profile"
            except (OSError, ValueError, AttributeError):
                is_profile = False
            if not is_profile:
                print(f"error: {target}: exists and is not an agentsim profile; not overwritten", file=sys.stderr)
                return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for p in profiles:
        p.save(args.out / f"{p.name}.json")
        held = p.fit_error.get("held_out_forward", {}).get("graph")
        r = p.fit_error["held_out_random_batches"]
        line = (f"{p.name:28s} KV {p.kv_capacity_tokens} tokens  fit random median/p90 "
                f"{r['median_rel_error']:.1%}/{r['p90_rel_error']:.1%}")
        if held:
            line += (f"  forward.csv held-out median/p90/max {held['median_rel_error']:.1%}/"
                     f"{held['p90_rel_error']:.1%}/{held['max_rel_error']:.1%}")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Grids of controlled batch shapes: the serving grid the shipped profiles are fitted on, and the
grid the profiling job measures on a real engine.

A :class:`GridPoint` is one step shape: optionally one prefill chunk (``chunk`` new tokens over
``computed`` cached ones) and optionally ``batch`` decode sequences at context ``ctx`` each. The
three kinds are ``prefill`` (chunk only), ``decode`` (batch only) and ``mixed`` (both, as vLLM's
chunked-prefill scheduler builds them: running decodes first, then a chunk of a new prompt).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from agentsim.calibration.batch import BatchShape
from agentsim.workload import stable_id


@dataclass(frozen=True, slots=True)
class GridPoint:
    kind: str
    chunk: int = 0
    computed: int = 0
    batch: int = 0
    ctx: int = 0

    @property
    def point_id(self) -> str:
        return f"{self.kind}-c{self.chunk}-k{self.computed}-b{self.batch}-x{self.ctx}"

    def shape(self) -> BatchShape:
        prefills = ((self.chunk, self.computed),) if self.chunk else ()
        return BatchShape(prefills=prefills, decode_ctx=(self.ctx,) * self.batch)

    @property
    def num_tokens(self) -> int:
        return self.chunk + self.batch

    @property
    def kv_tokens(self) -> int:
        """KV-cache tokens the step needs resident (decode contexts + the prefill's prompt so far)."""
        return self.batch * (self.ctx + 1) + (self.chunk + self.computed if self.chunk else 0)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class GridLimits:
    """Engine limits a grid must respect (vLLM ``max_num_batched_tokens``, ``max_num_seqs``, ...)."""

    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    kv_capacity_tokens: int

    def admits(self, p: GridPoint) -> bool:
        return (
            p.num_tokens <= self.max_num_batched_tokens
            and p.batch + (1 if p.chunk else 0) <= self.max_num_seqs
            and p.chunk + p.computed <= self.max_model_len
            and p.ctx + 1 <= self.max_model_len
            and p.kv_tokens <= self.kv_capacity_tokens
        )


def build_grid(
    limits: GridLimits,
    decode_batches: list[int],
    decode_ctxs: list[int],
    prefill_chunks: list[int],
    prefill_computed: list[int],
    mixed_chunks: list[int],
    mixed_computed: list[int],
    mixed_batches: list[int],
    mixed_ctxs: list[int],
) -> list[GridPoint]:
    """Cartesian grids of each kind, filtered by ``limits``, in a fixed order."""
    pts: list[GridPoint] = []
    pts += [GridPoint("decode", batch=b, ctx=x) for x in decode_ctxs for b in decode_batches]
    pts += [GridPoint("prefill", chunk=c, computed=k) for k in prefill_computed for c in prefill_chunks]
    pts += [
        GridPoint("mixed", chunk=c, computed=k, batch=b, ctx=x)
        for c in mixed_chunks for k in mixed_computed for b in mixed_batches for x in mixed_ctxs
    ]
    seen: set[str] = set()
    out = []
    for p in pts:
        if limits.admits(p) and p.point_id not in seen:
            seen.add(p.point_id)
            out.append(p)
    return out


def serving_grid(limits: GridLimits) -> list[GridPoint]:
    """Batch shapes a GPU vLLM engine runs when serving agents: decode batches up to the sequence
    limit at 128..32k context, prefill chunks 16..8k over 0..16k cached tokens, and chunked-prefill
    steps mixing a chunk with running decodes."""
    return build_grid(
        limits,
        decode_batches=[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256],
        decode_ctxs=[128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768],
        prefill_chunks=[16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192],
        prefill_computed=[0, 256, 1024, 2048, 4096, 8192, 16384],
        mixed_chunks=[64, 256, 512, 1024, 2048, 4096],
        mixed_computed=[0, 1024, 4096],
        mixed_batches=[4, 16, 64, 128, 256],
        mixed_ctxs=[512, 2048, 8192],
    )


def random_batches(limits: GridLimits, num: int, seed: int) -> list[BatchShape]:
    """Heterogeneous batches (several prefill chunks, decode sequences of different contexts) for
    checking a fit away from the grid it was fitted on."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stable_id("random_batches")])))
    out: list[BatchShape] = []
    while len(out) < num:
        budget = limits.max_num_batched_tokens
        n_dec = int(rng.choice([0, 1, 4, 16, 32, 64, 128, 256]))
        n_dec = min(n_dec, limits.max_num_seqs)
        ctx = tuple(int(x) for x in np.exp(rng.uniform(np.log(64), np.log(limits.max_model_len - 1), n_dec)))
        budget -= n_dec
        prefills = []
        for _ in range(int(rng.integers(0, 3))):
            if budget < 16:
                break
            c = int(np.exp(rng.uniform(np.log(16), np.log(budget))))
            k = int(rng.choice([0, 0, int(rng.integers(0, max(1, limits.max_model_len - c)))]))
            prefills.append((c, k))
            budget -= c
        shape = BatchShape(prefills=tuple(prefills), decode_ctx=ctx)
        kv = sum(x + 1 for x in ctx) + sum(c + k for c, k in prefills)
        if shape.num_tokens == 0 or kv > limits.kv_capacity_tokens:
            continue
        out.append(shape)
    return out


def holdout_mask(points: list[GridPoint], every: int, seed: int) -> list[bool]:
    """Deterministically hold out about one point in ``every`` of each kind (stratified by kind,
    ordered by a seeded stable hash of the point id), so each kind is checked on unseen points."""
    mask = [False] * len(points)
    by_kind: dict[str, list[int]] = {}
    for i, p in enumerate(points):
        by_kind.setdefault(p.kind, []).append(i)
    for idx in by_kind.values():
        order = sorted(idx, key=lambda i: stable_id("holdout", seed, points[i].point_id))
        for j in order[: max(1, len(order) // every) if len(order) >= 2 else 0]:
            mask[j] = True
    return mask

"""The sanity report of ``agentsim calibrate show``: predicted step times beside their rooflines,
and each step-time term's share of the predicted time for a few batches.

Rooflines are *lower bounds* for one step of a TP group of ``tp`` GPUs, never an estimate:

- HBM: every weight except the embedding table (only the looked-up rows are read) is read once,
  plus the KV of every token attended to (decode contexts, cached prefixes) and the KV written,
  at ``tp x`` the GPU's peak HBM bandwidth;
- FLOP: ``2 x`` the non-embedding, non-LM-head parameters per token, the LM head for one token per
  sequence, and ``4 x head_dim x query heads`` per attention (query, key) pair per layer, at
  ``tp x`` the GPU's peak dense FLOP rate.

A step can never beat ``max(HBM, FLOP)``; how far above it a measured profile sits says how well the
engine uses the GPU (decode typically reaches 50-80 % of peak HBM bandwidth, prefill 40-75 % MFU).
"""

from __future__ import annotations

from dataclasses import dataclass

from agentsim.calibration import profile as _profile
from agentsim.calibration.batch import BatchShape
from agentsim.calibration.fit import shape_features
from agentsim.calibration.profile import Profile

# (label, shape): the points the issue asks the report to show.
SHOW_SHAPES: tuple[tuple[str, BatchShape], ...] = (
    ("decode b=1 ctx=1k", BatchShape.decode(1, 1024)),
    ("decode b=1 ctx=8k", BatchShape.decode(1, 8192)),
    ("decode b=32 ctx=1k", BatchShape.decode(32, 1024)),
    ("decode b=32 ctx=8k", BatchShape.decode(32, 8192)),
    ("decode b=128 ctx=1k", BatchShape.decode(128, 1024)),
    ("decode b=128 ctx=8k", BatchShape.decode(128, 8192)),
    ("prefill 512", BatchShape.prefill(512)),
    ("prefill 2k", BatchShape.prefill(2048)),
    ("prefill 8k", BatchShape.prefill(8192)),
)


# (label, shape): the batches whose per-term shares ``show`` prints.
SHARE_SHAPES: tuple[tuple[str, BatchShape], ...] = (
    ("decode 1 seq ctx=1k", BatchShape.decode(1, 1024)),
    ("decode 64 seqs ctx=1k", BatchShape.decode(64, 1024)),
    ("decode 256 seqs ctx=1k", BatchShape.decode(256, 1024)),
    ("prefill 512", BatchShape.prefill(512)),
    ("prefill 4096", BatchShape.prefill(4096)),
    ("mixed 512 + 64 decodes", BatchShape(prefills=((512, 0),), decode_ctx=(1024,) * 64)),
)
# Column headings of the share table, one per coefficient (host terms first).
TERM_LABELS = {
    "const": "const",
    "per_scheduled_seq": "host/seq",
    "per_sampled_token": "host/out",
    "per_batched_token": "linear (knee)",
    "per_prefill_token": "prefill tok",
    "per_decode_seq": "decode seq",
    "per_prefill_attn_pair": "prefill attn",
    "per_decode_ctx_token": "decode ctx",
}


def step_shape(shape: BatchShape) -> _profile.BatchShape:
    """The engine-side :class:`agentsim.calibration.profile.BatchShape` of a chunk-level shape
    (each prefill chunk is one scheduled sequence; every sequence samples)."""
    return _profile.BatchShape(*shape_features(shape))


def term_shares(profile: Profile, shape: BatchShape) -> tuple[float, dict[str, float]]:
    """Predicted seconds of ``shape`` and each term's fraction of it (fractions sum to 1)."""
    terms = profile.coefficients.terms(step_shape(shape))
    total = sum(terms.values())
    return total, {k: (v / total if total > 0 else 0.0) for k, v in terms.items()}


@dataclass(frozen=True, slots=True)
class ReportRow:
    label: str
    shape: BatchShape
    predicted: float
    hbm_roofline: float
    flop_roofline: float
    kv_tokens: int
    fits_kv: bool

    @property
    def roofline(self) -> float:
        return max(self.hbm_roofline, self.flop_roofline)

    @property
    def bound(self) -> str:
        return "HBM" if self.hbm_roofline >= self.flop_roofline else "FLOP"

    @property
    def ratio(self) -> float:
        return self.predicted / self.roofline if self.roofline > 0 else float("nan")


def embedding_params(profile: Profile) -> float:
    return profile.model.vocab_size * profile.model.hidden_size


def hbm_roofline(profile: Profile, shape: BatchShape) -> float:
    """Seconds to move the step's unavoidable bytes at the TP group's peak HBM bandwidth (0 if unknown)."""
    bw = profile.gpu.hbm_GBps * 1e9 * profile.tp
    if bw <= 0:
        return 0.0
    m, b = profile.model, profile.dtype_bytes
    weights = (m.num_params - embedding_params(profile)) * b
    kv_read = (shape.decode_ctx_tokens + sum(k for _, k in shape.prefills)) * profile.kv_bytes_per_token
    kv_write = shape.num_tokens * profile.kv_bytes_per_token
    return (weights + kv_read + kv_write) / bw


def flop_roofline(profile: Profile, shape: BatchShape) -> float:
    """Seconds for the step's FLOPs at the TP group's peak dense rate (0 if unknown)."""
    rate = profile.gpu.peak_tflops * 1e12 * profile.tp
    if rate <= 0:
        return 0.0
    m = profile.model
    emb = embedding_params(profile)
    # LM head counted per sequence below; assuming an untied one only under-counts (still a bound).
    body = max(0.0, m.num_params - 2 * emb)
    pairs = shape.prefill_attn_pairs + shape.decode_ctx_tokens
    flops = (2 * body * shape.num_tokens + 2 * emb * shape.num_seqs
             + 4 * m.head_dim * m.num_heads * m.num_layers * pairs)
    return flops / rate


def report_rows(profile: Profile) -> list[ReportRow]:
    rows = []
    for label, shape in SHOW_SHAPES:
        kv = shape.decode_ctx_tokens + sum(c + k for c, k in shape.prefills)
        # whole blocks per sequence, within the blocks vLLM V1 leaves beside its null block
        bs = profile.kv_block_size
        blocks = sum(-(-x // bs) for x in shape.decode_ctx) + sum(-(-(c + k) // bs) for c, k in shape.prefills)
        rows.append(ReportRow(
            label=label, shape=shape, predicted=profile.step_time(step_shape(shape)),
            hbm_roofline=hbm_roofline(profile, shape), flop_roofline=flop_roofline(profile, shape),
            kv_tokens=kv, fits_kv=blocks <= profile.kv_capacity_blocks - 1,
        ))
    return rows


def render_show(profile: Profile, console) -> None:
    """Print the sanity report for ``profile`` on a rich ``console``."""
    from rich.table import Table

    prov = profile.provenance
    m = profile.model
    console.print(f"[bold]{profile.name}[/bold]  ({profile.source or 'in memory'})")
    console.print(f"model {m.name}: {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_heads}/{m.num_kv_heads} "
                  f"(q/kv) x {m.head_dim}, {m.num_params / 1e9:.2f}B params;  GPU {profile.gpu.name} x TP {profile.tp};  "
                  f"provenance: {prov.get('kind', '?')}" + (f" from {prov['derived_from']}" if prov.get("derived_from") else "")
                  + (f", fitted to {prov['clock']} time" if prov.get("clock") else ""))
    console.print(f"KV cache: {profile.kv_capacity_tokens:,} tokens ({profile.kv_capacity_blocks:,} blocks of "
                  f"{profile.kv_block_size}) at gpu_memory_utilization {profile.gpu_memory_utilization}, "
                  f"{profile.kv_bytes_per_token:,} bytes/token")
    console.print("step time = " + describe_coefficients(profile.coefficients))
    fe = profile.fit_error or {}
    for key in ("grid", "held_out_random_batches", "train", "held_out"):
        if key in fe and isinstance(fe[key], dict):
            e = fe[key]

            def pct(v) -> str:   # None: no point to measure it on (written as null, not NaN)
                return "n/a" if not isinstance(v, (int, float)) else f"{v:.1%}"
            console.print(f"fit error ({key}): median {pct(e.get('median_rel_error'))}, "
                          f"p90 {pct(e.get('p90_rel_error'))} over {e.get('num_points', 0)} points")
    t = Table(title="predicted step time vs rooflines (lower bounds at peak HBM bandwidth / peak FLOP rate)")
    for col in ("batch", "predicted ms", "HBM roofline ms", "FLOP roofline ms", "x roofline", "tokens/s", "KV tokens"):
        t.add_column(col, justify="left" if col == "batch" else "right")
    known = profile.gpu.hbm_GBps > 0 and profile.gpu.peak_tflops > 0
    for r in report_rows(profile):
        tps = r.shape.num_tokens / r.predicted if r.predicted > 0 else float("nan")
        kv = f"{r.kv_tokens:,}" + ("" if r.fits_kv else " (exceeds capacity)")
        t.add_row(
            r.label, f"{r.predicted * 1e3:.2f}",
            f"{r.hbm_roofline * 1e3:.2f}" if known else "n/a", f"{r.flop_roofline * 1e3:.2f}" if known else "n/a",
            f"{r.ratio:.2f} ({r.bound})" if known else "n/a", f"{tps:,.0f}", kv,
        )
    console.print(t)
    shares = Table(title="share of the predicted step time per term (ms: predicted step; host/seq: per scheduled "
                         "sequence; host/out: per sampled token)")
    shares.add_column("batch", no_wrap=True)
    shares.add_column("ms", justify="right")
    for k in TERM_LABELS:
        label = f"linear, knee {profile.coefficients.knee_tokens:g}" if k == "per_batched_token" else TERM_LABELS[k]
        shares.add_column(label, justify="right")
    for label, shape in SHARE_SHAPES:
        total, frac = term_shares(profile, shape)
        shares.add_row(label, f"{total * 1e3:.2f}", *(f"{frac[k]:.0%}" if frac[k] else "-" for k in TERM_LABELS))
    console.print(shares)
    if not known:
        console.print("rooflines n/a: the profile's GPU has no stated HBM bandwidth / peak FLOP rate (e.g. a CPU engine)")


def describe_coefficients(st) -> str:
    """One line with every step-time term in readable units."""
    return (f"{st.const * 1e3:.3f} ms + {st.per_scheduled_seq * 1e6:.2f} us/scheduled seq + "
            f"{st.per_sampled_token * 1e6:.2f} us/sampled token + "
            f"{st.per_batched_token * 1e6:.3f} us/token x max(batched tokens, {st.knee_tokens:g}) + "
            f"{st.per_prefill_token * 1e6:.3f} us/prefill token + {st.per_decode_seq * 1e6:.3f} us/decode seq + "
            f"{st.per_prefill_attn_pair * 1e9:.4f} ns/attn pair + {st.per_decode_ctx_token * 1e9:.3f} ns/decode ctx token")

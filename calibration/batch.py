"""Batch shapes of one engine step and the five step-time features the profiles are fitted on.

A step computes some *prefill chunks* (``c`` new prompt tokens on top of ``k`` tokens already in
the KV cache) and some *decode sequences* (one new token each, attending over their context). The
features are exactly those of :meth:`agentsim.calibration.profile.StepTimeCoefficients.predict`::

    num_prefill_tokens  = sum c
    prefill_attn_pairs  = sum (c*k + c*(c+1)/2)      # causal query x key pairs
    num_decode_seqs     = number of decode sequences
    decode_ctx_tokens   = sum of the decode sequences' context lengths

so the build script (layer timings), the profiling job (a real vLLM engine) and the simulator all
count a batch the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEATURES = ("num_prefill_tokens", "prefill_attn_pairs", "num_decode_seqs", "decode_ctx_tokens")


def attn_pairs(chunk: int, computed: int) -> float:
    """Causal attention (query, key) pairs of a prefill chunk of ``chunk`` tokens over ``computed`` cached ones."""
    return chunk * computed + chunk * (chunk + 1) / 2


@dataclass(frozen=True, slots=True)
class BatchShape:
    """One engine step: prefill chunks as ``(chunk, computed)`` pairs and decode context lengths."""

    prefills: tuple[tuple[int, int], ...] = ()
    decode_ctx: tuple[int, ...] = ()

    @classmethod
    def decode(cls, batch: int, ctx: int) -> BatchShape:
        return cls(decode_ctx=(ctx,) * batch)

    @classmethod
    def prefill(cls, chunk: int, computed: int = 0) -> BatchShape:
        return cls(prefills=((chunk, computed),))

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c for c, _ in self.prefills)

    @property
    def prefill_attn_pairs(self) -> float:
        return sum(attn_pairs(c, k) for c, k in self.prefills)

    @property
    def num_decode_seqs(self) -> int:
        return len(self.decode_ctx)

    @property
    def decode_ctx_tokens(self) -> int:
        return sum(self.decode_ctx)

    @property
    def num_tokens(self) -> int:
        """Tokens the linear layers process this step (prefill tokens + one per decode sequence)."""
        return self.num_prefill_tokens + self.num_decode_seqs

    @property
    def num_seqs(self) -> int:
        return len(self.prefills) + len(self.decode_ctx)

    @property
    def kind(self) -> str:
        if self.prefills and self.decode_ctx:
            return "mixed"
        return "prefill" if self.prefills else "decode"

    def features(self) -> tuple[int, float, int, int]:
        return (self.num_prefill_tokens, self.prefill_attn_pairs, self.num_decode_seqs, self.decode_ctx_tokens)


def design_matrix(rows: list[tuple[float, float, float, float]] | np.ndarray) -> np.ndarray:
    """``[1, prefill tokens, attn pairs, decode seqs, decode ctx tokens]`` per row (the five coefficients' order)."""
    x = np.asarray(rows, dtype=float).reshape(-1, 4)
    return np.hstack([np.ones((len(x), 1)), x])

"""Fit the non-negative step-time model to measured (or layer-derived) step times.

The model is :class:`agentsim.calibration.profile.StepTimeCoefficients` (eight linear terms and the
linear layers' knee). :func:`fit_step_time` is the one fit every producer of profiles uses (the
shipped A100 build, the profiling job on a real engine, operator-level tables such as the H200
measurements):

- every coefficient is fitted with :func:`scipy.optimize.nnls`, so none is negative (no step gets
  faster by adding work);
- the squared *relative* error is minimised (each row and its target divided by the target), so a
  10 ms decode step counts as much as a 1 s prefill;
- the knee ``knee_tokens`` (where ``per_batched_token * max(T, knee)`` stops being flat) is found by
  search: NNLS at each candidate knee (about 5 % apart), then at whole tokens around the best one;
  the smallest loss wins (ties: the smaller knee).

:func:`fit_coefficients` keeps the five-term (format version 1) fit for callers with only the four
classic features.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from agentsim.calibration.profile import COEFFICIENTS, COEFFICIENTS_V1, StepTimeCoefficients
from agentsim.errors import ConfigError

# Columns of a feature array: the positional order of ``Profile.step_seconds`` / ``BatchShape``.
STEP_FEATURES = ("num_prefill_tokens", "prefill_attn_pairs", "num_decode_seqs", "decode_ctx_tokens",
                 "num_prefill_seqs", "num_sampled")
HOST_TERMS = ("const", "per_scheduled_seq", "per_sampled_token")


@dataclass(frozen=True, slots=True)
class ErrorStats:
    """Relative error ``|predicted - measured| / measured`` over a set of points."""

    num_points: int
    median: float
    p90: float
    max: float
    mean_signed: float  # mean of (predicted - measured) / measured: > 0 means the model is pessimistic

    def to_dict(self) -> dict:
        return {
            "num_points": self.num_points,
            "median_rel_error": round(self.median, 5),
            "p90_rel_error": round(self.p90, 5),
            "max_rel_error": round(self.max, 5),
            "mean_signed_rel_error": round(self.mean_signed, 5),
        }


def error_stats(predicted: np.ndarray, measured: np.ndarray) -> ErrorStats:
    predicted = np.asarray(predicted, dtype=float)
    measured = np.asarray(measured, dtype=float)
    if len(measured) == 0:
        return ErrorStats(0, float("nan"), float("nan"), float("nan"), float("nan"))
    signed = (predicted - measured) / measured
    rel = np.abs(signed)
    return ErrorStats(
        num_points=len(measured),
        median=float(np.median(rel)),
        p90=float(np.quantile(rel, 0.9)),
        max=float(rel.max()),
        mean_signed=float(signed.mean()),
    )


# --------------------------------------------------------------------------- features
def shape_features(batch) -> tuple[float, float, float, float, float, float]:
    """The six step features (:data:`STEP_FEATURES`) of one batch.

    ``batch`` is a :class:`agentsim.calibration.profile.BatchShape` (the engine's counts), or a
    :class:`agentsim.calibration.batch.BatchShape` (prefill chunks and decode contexts; every
    sequence is counted as sampling, as the layer model's LM head does).
    """
    if hasattr(batch, "prefills"):
        n_pre = len(batch.prefills)
        return (batch.num_prefill_tokens, batch.prefill_attn_pairs, batch.num_decode_seqs,
                batch.decode_ctx_tokens, n_pre, n_pre + batch.num_decode_seqs)
    return (batch.num_prefill_tokens, batch.prefill_attn_pairs, batch.num_decode_seqs,
            batch.decode_ctx_tokens, batch.num_prefill_seqs, batch.num_sampled)


def as_features(batches) -> np.ndarray:
    """An ``(n, 6)`` float array of :data:`STEP_FEATURES` from batch shapes, or from an array of
    ``(n, 4)`` classic features (prefill tokens, attention pairs, decode seqs, decode context
    tokens; then no prefill sequences are counted and every decode samples) or ``(n, 6)``.
    ``num_sampled = -1`` is resolved to the number of scheduled sequences."""
    if isinstance(batches, np.ndarray) or (len(batches) and isinstance(batches[0], (tuple, list, np.ndarray))):
        x = np.asarray(batches, dtype=float)
        if x.ndim == 1:
            x = x.reshape(1, -1)
        if x.shape[1] == 4:
            x = np.hstack([x, np.zeros((len(x), 1)), np.full((len(x), 1), -1.0)])
        elif x.shape[1] != 6:
            raise ValueError(f"features need 4 or 6 columns, got {x.shape[1]}")
        x = x.copy()
    else:
        x = np.array([shape_features(b) for b in batches], dtype=float).reshape(-1, 6)
    seqs = x[:, 4] + x[:, 2]
    x[:, 5] = np.where(x[:, 5] < 0, seqs, x[:, 5])
    return x


def design_matrix(features, knee_tokens: float = 0.0) -> np.ndarray:
    """``(n, 8)`` matrix whose columns multiply :data:`~agentsim.calibration.profile.COEFFICIENTS`
    in order, for the given knee (``features`` as for :func:`as_features`)."""
    x = as_features(features)
    tokens = x[:, 0] + x[:, 2]
    return np.column_stack([
        np.ones(len(x)), x[:, 0], x[:, 1], x[:, 2], x[:, 3],
        x[:, 4] + x[:, 2], x[:, 5], np.maximum(tokens, knee_tokens),
    ])


def predict_many(coeffs: StepTimeCoefficients, features) -> np.ndarray:
    """Seconds per row; equals :meth:`StepTimeCoefficients.predict` row by row."""
    c = np.array([getattr(coeffs, k) for k in COEFFICIENTS])
    return design_matrix(features, coeffs.knee_tokens) @ c


# --------------------------------------------------------------------------- the fit
def knee_candidates(max_tokens: float) -> np.ndarray:
    """0 and token counts from 1 to ``max_tokens`` spaced about 5 % apart (integers)."""
    if max_tokens < 1:
        return np.zeros(1)
    n = int(np.ceil(np.log(max_tokens) / np.log(1.05))) + 1
    return np.unique(np.concatenate([[0.0], np.round(np.geomspace(1, max_tokens, n))]))


def fit_step_time(batches, seconds, *, terms: Iterable[str] | None = None,
                  base: StepTimeCoefficients | None = None, knees: Sequence[float] | None = None,
                  weights=None) -> StepTimeCoefficients:
    """Fit :class:`StepTimeCoefficients` to measured step times: non-negative, relative error, knee by search.

    ``batches``: step shapes (``profile.BatchShape`` or ``batch.BatchShape``) or an ``(n, 4|6)``
    feature array (see :func:`as_features`); ``seconds``: the ``n`` measured step times (> 0).
    ``terms``: the coefficients to fit (default all of
    :data:`~agentsim.calibration.profile.COEFFICIENTS`, plus the knee when ``per_batched_token`` is
    fitted); the others keep their value in ``base`` (default 0), e.g. ``terms=HOST_TERMS`` fits
    only the host costs on top of a device-side profile. ``knees``: candidate knees (default
    :func:`knee_candidates` up to the data's largest batched-token count, then whole tokens between
    the best one's neighbours; ``base.knee_tokens`` when ``per_batched_token`` is not fitted). ``weights``: optional per-row weights (> 0) of the squared
    relative error.

    Raises :class:`ConfigError` (field ``points``) if there are fewer points than fitted terms or a
    time is not > 0 and finite, and (field ``terms``) for an unknown term name.
    """
    y = np.asarray(seconds, dtype=float).reshape(-1)
    x = as_features(batches)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} batches but {len(y)} step times")
    fit_terms = tuple(COEFFICIENTS) if terms is None else tuple(terms)
    bad = [t for t in fit_terms if t not in COEFFICIENTS]
    if bad:
        raise ConfigError("terms", f"unknown term {bad[0]!r} (known: {', '.join(COEFFICIENTS)})")
    if len(y) < len(fit_terms):
        raise ConfigError("points", f"need at least {len(fit_terms)} measured points to fit, got {len(y)}")
    if not np.all(np.isfinite(y) & (y > 0)):
        raise ConfigError("points", "every measured step time must be finite and > 0")
    base = base or StepTimeCoefficients(0.0, 0.0, 0.0, 0.0, 0.0)
    w = np.ones_like(y) if weights is None else np.sqrt(np.asarray(weights, dtype=float).reshape(-1))
    if w.shape != y.shape or not np.all(np.isfinite(w) & (w > 0)):
        raise ConfigError("weights", f"need {len(y)} finite weights > 0")
    idx = [COEFFICIENTS.index(t) for t in fit_terms]
    fixed_idx = [i for i in range(len(COEFFICIENTS)) if i not in idx]
    fixed_c = np.array([getattr(base, COEFFICIENTS[i]) for i in fixed_idx])
    if "per_batched_token" in fit_terms:
        tokens = x[:, 0] + x[:, 2]
        cand = knee_candidates(float(tokens.max())) if knees is None else np.asarray(knees, dtype=float)
    else:
        cand = np.array([base.knee_tokens if knees is None else float(np.asarray(knees).reshape(-1)[0])])
    if not (len(cand) and np.all(np.isfinite(cand) & (cand >= 0))):
        raise ConfigError("knees", "candidate knees must be finite and >= 0")

    def solve(knee: float) -> tuple[float, np.ndarray]:
        a = design_matrix(x, knee)
        rest = y - (a[:, fixed_idx] @ fixed_c if fixed_idx else 0.0)
        # The free terms fit what the fixed ones leave, still relative to the measured time.
        c = np.zeros(len(COEFFICIENTS))
        c[idx] = _nnls_free(a[:, idx], rest, y, w)
        if fixed_idx:
            c[fixed_idx] = fixed_c
        return float(np.sum((w * ((a @ c) - y) / y) ** 2)), c

    def search(knees_: np.ndarray, best=None):
        for knee in knees_:
            loss, c = solve(float(knee))
            if best is None or loss < best[0] * (1 - 1e-12):
                best = (loss, float(knee), c)
        return best

    best = search(cand)
    if knees is None and len(cand) > 1:
        # Refine between the best candidate's neighbours: whole tokens (at most 64 of them).
        i = int(np.searchsorted(cand, best[1]))
        lo, hi = cand[max(i - 1, 0)], cand[min(i + 1, len(cand) - 1)]
        fine = np.unique(np.round(np.linspace(lo, hi, min(64, int(hi - lo) + 1))))
        best = search(np.sort(np.r_[best[1], fine[fine != best[1]]]))
    _, knee, c = best
    return StepTimeCoefficients(**{k: float(v) for k, v in zip(COEFFICIENTS, c)}, knee_tokens=knee)


def _nnls_free(a: np.ndarray, rest: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Non-negative ``c`` minimising ``sum((w * (a @ c - rest) / y)^2)``. Columns are scaled to
    comparable magnitudes first (attention pairs reach 1e8) so NNLS is well conditioned."""
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    m = (a / scale) * (w / y)[:, None]
    sol, _ = nnls(m, rest * w / y, maxiter=50 * a.shape[1])
    return sol / scale


def fit_coefficients(features: np.ndarray, step_times: np.ndarray) -> StepTimeCoefficients:
    """The five-term (format version 1) fit: non-negative least squares on relative error of
    ``const + per_prefill_token, per_prefill_attn_pair, per_decode_seq, per_decode_ctx_token`` on
    ``(n, 4)`` classic features; host and knee terms stay 0.

    Raises :class:`ConfigError` if there are fewer points than coefficients or a time is not > 0.
    """
    return fit_step_time(features, step_times, terms=COEFFICIENTS_V1)

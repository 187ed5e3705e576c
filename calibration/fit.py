"""Fit the five non-negative step-time coefficients to measured (or layer-derived) step times.

The fit minimises the squared *relative* error, so a 10 ms decode step counts as much as a 1 s
prefill: each row of ``[1, features]`` and its target are divided by the target before
:func:`scipy.optimize.nnls`. Non-negativity keeps every coefficient physical (no step gets faster by
adding tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from agentsim.calibration.batch import design_matrix
from agentsim.calibration.profile import COEFFICIENTS, StepTimeCoefficients
from agentsim.errors import ConfigError


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


def fit_coefficients(features: np.ndarray, step_times: np.ndarray) -> StepTimeCoefficients:
    """Non-negative least squares on relative error; ``features`` rows are the four batch features.

    Raises :class:`ConfigError` if there are fewer points than coefficients or a time is not > 0.
    """
    x = design_matrix(features)
    y = np.asarray(step_times, dtype=float)
    if len(y) < len(COEFFICIENTS):
        raise ConfigError("points", f"need at least {len(COEFFICIENTS)} measured points to fit, got {len(y)}")
    if not np.all(y > 0):
        raise ConfigError("points", "every measured step time must be > 0")
    # Scale columns to comparable magnitudes (attention pairs reach 1e8) so NNLS is well conditioned.
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    a = (x / scale) / y[:, None]
    b = np.ones_like(y)
    sol, _ = nnls(a, b, maxiter=50 * a.shape[1])
    coef = sol / scale
    return StepTimeCoefficients(**{k: float(v) for k, v in zip(COEFFICIENTS, coef)})


def predict_many(coeffs: StepTimeCoefficients, features: np.ndarray) -> np.ndarray:
    x = design_matrix(features)
    c = np.array([getattr(coeffs, k) for k in COEFFICIENTS])
    return x @ c

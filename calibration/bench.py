"""``agentsim calibrate bench``: fit a profile's host and frontend terms to measured ``vllm bench serve`` runs.

The step-time terms fitted from controlled batches (``agentsim calibrate fit``) miss what only a
serving run shows: the engine's host work per step and per sequence (scheduling, sampling,
detokenization, output processing) and the API server's per-request work (HTTP, tokenization,
streaming). This fit adjusts those terms of a starting profile so that replaying the measured runs
(:func:`agentsim.validate.replay`, the same replay ``agentsim validate`` does) reproduces them.

Terms (non-negative, seconds):

- host (:class:`agentsim.calibration.profile.StepTimeCoefficients`): ``const`` (per step),
  ``per_scheduled_seq`` (per scheduled sequence per step), ``per_sampled_token`` (per sampled token);
- frontend (:class:`agentsim.calibration.profile.FrontendCosts`): ``per_request_s``,
  ``per_prompt_token_s``, ``per_output_token_s``, ``transport_s``;
- with ``all_terms``, every other step-time coefficient as well (the knee position stays).

Objective: the relative errors of ``duration``, ``mean_ttft_ms`` and ``mean_tpot_ms`` (vLLM's
definitions) over the training files, in a least-squares sense, plus a pull towards the starting
values: a residual ``ridge * (term - start) / magnitude`` per term (``ridge = 0.01``: moving a term by
its typical magnitude costs as much as a 1 % error). A few files give fewer residuals than there
are terms; without the pull, terms the files cannot tell apart drift to whatever fits one noisy
file (measured on the CPU bench files of ``tests/data/vllm-bench-cpu``: fitted on two files, the
out-of-sample mean-TTFT error was 26 % with the pull and > 300 % without). Optimiser: ``scipy.optimize.least_squares`` (trust-region
reflective, bounds ``>= 0``) on terms scaled by their starting magnitude, run twice: finite
differences with a relative step of 20 %, then 2 % from there (the simulated schedule changes in
discrete steps, so a small first step sees only that noise and stops early). Terms the runs cannot
tell apart (``per_request_s`` and ``per_prompt_token_s`` when every prompt has one length) stay
near their start. Deterministic: the replay is, and so is the optimiser.

Cross-validation: with ``holdout`` files, the fit uses the others and the error on the held-out
files is reported; otherwise each file is left out in turn (leave-one-file-out) when there are at
least two, and the reported error is over the left-out files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from agentsim.bench import BenchRun
from agentsim.calibration.profile import FrontendCosts, Profile
from agentsim.config import RunConfig

OBJECTIVE = ("duration", "mean_ttft_ms", "mean_tpot_ms")
HOST_TERMS = ("const", "per_scheduled_seq", "per_sampled_token")
FRONTEND_TERMS = ("per_request_s", "per_prompt_token_s", "per_output_token_s", "transport_s")
# starting magnitudes for terms that are 0 in the starting profile (s): tens of us of host work per
# sequence (issue 14), ms of request setup, us per token of tokenization / detokenization
_DEFAULT_SCALE = {
    "const": 1e-3, "per_scheduled_seq": 2e-5, "per_sampled_token": 2e-5,
    "per_request_s": 1e-3, "per_prompt_token_s": 1e-6, "per_output_token_s": 1e-5, "transport_s": 1e-3,
}


def step_terms(profile: Profile, all_terms: bool = False) -> list[str]:
    """The step-time coefficients this profile has that the fit adjusts (host ones, or all)."""
    names = [f.name for f in dataclasses.fields(profile.coefficients) if f.name != "knee_tokens"]
    if all_terms:
        return names
    return [n for n in HOST_TERMS if n in names]


def with_terms(profile: Profile, values: dict[str, float]) -> Profile:
    """``profile`` with the named step-time / frontend terms replaced."""
    st = {k: v for k, v in values.items() if k not in FRONTEND_TERMS}
    fe = {k: v for k, v in values.items() if k in FRONTEND_TERMS}
    out = profile
    if st:
        out = dataclasses.replace(out, coefficients=dataclasses.replace(out.coefficients, **st))
    if fe:
        out = dataclasses.replace(out, frontend=dataclasses.replace(out.frontend, **fe))
    return out


def term_values(profile: Profile, terms: Sequence[str]) -> dict[str, float]:
    return {t: float(getattr(profile.frontend if t in FRONTEND_TERMS else profile.coefficients, t)) for t in terms}


def run_errors(profile: Profile, runs: Sequence[BenchRun], cfg: RunConfig,
               metrics: Sequence[str] = OBJECTIVE) -> list[dict[str, float]]:
    """Per run, ``{metric: simulated / measured - 1}`` for the objective metrics the run has."""
    from agentsim.validate import compare, replay

    out = []
    for run in runs:
        cmp = compare(run, replay(run, cfg, profile))
        out.append({m: cmp[m]["rel_error"] for m in metrics if m in cmp and cmp[m]["rel_error"] is not None})
    return out


def summarize_errors(errs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean |error| per metric and the max |error| over all (fractions)."""
    out: dict[str, float] = {}
    allv = []
    for m in OBJECTIVE:
        v = [abs(e[m]) for e in errs if m in e]
        if v:
            out[f"mean_abs_{m}"] = float(np.mean(v))
            allv += v
    out["max_abs"] = float(max(allv)) if allv else 0.0
    return out


@dataclass
class BenchFit:
    profile: Profile
    terms: dict[str, float]
    start_terms: dict[str, float]
    train_errors: list[dict[str, float]]
    cv_errors: list[dict[str, float]] = field(default_factory=list)
    cv_files: list[str] = field(default_factory=list)
    num_evaluations: int = 0


def fit_terms(profile: Profile, runs: Sequence[BenchRun], cfg: RunConfig, terms: Sequence[str],
              ridge: float = 0.01, max_evaluations: int = 300, loss: str = "linear",
              f_scale: float = 1.0) -> tuple[Profile, int]:
    """Least-squares fit of ``terms`` (names of step-time or frontend fields) to ``runs``.

    Returns the fitted profile and the number of replays of the training set. Raises ValueError
    for an unknown term name or no training runs.
    """
    from scipy.optimize import least_squares

    if not runs:
        raise ValueError("no training runs")
    st_names = {f.name for f in dataclasses.fields(profile.coefficients)}
    for t in terms:
        if t not in st_names and t not in FRONTEND_TERMS:
            raise ValueError(f"unknown term {t!r}")
    start = term_values(profile, terms)
    scale = np.array([start[t] if start[t] > 0 else _DEFAULT_SCALE.get(t, 1e-6) for t in terms])
    u0 = np.array([start[t] for t in terms]) / scale
    nfev = 0

    def residuals(u: np.ndarray) -> np.ndarray:
        nonlocal nfev
        nfev += 1
        prof = with_terms(profile, {t: float(max(x, 0.0) * s) for t, x, s in zip(terms, u, scale)})
        res = []
        for e in run_errors(prof, runs, cfg):
            res += [e.get(m, 0.0) for m in OBJECTIVE]
        res += list(ridge * (u - u0))
        return np.asarray(res, dtype=float)

    # start from the profile, or (for all-zero terms) from their typical magnitude
    x0 = np.where(u0 > 0, u0, 1.0)
    sol = least_squares(residuals, x0, bounds=(0.0, np.inf), method="trf", diff_step=0.2, loss=loss, f_scale=f_scale,
                        max_nfev=max(1, max_evaluations // 2), xtol=1e-6, ftol=1e-8, gtol=1e-8)
    left = max_evaluations - nfev
    if left > 0:
        sol = least_squares(residuals, sol.x, bounds=(0.0, np.inf), method="trf", diff_step=0.02, loss=loss, f_scale=f_scale,
                            max_nfev=left, xtol=1e-6, ftol=1e-8, gtol=1e-8)
    best = {t: float(max(x, 0.0) * s) for t, x, s in zip(terms, sol.x, scale)}
    return with_terms(profile, best), nfev


def calibrate_bench(profile: Profile, runs: Sequence[BenchRun], cfg: RunConfig,
                    holdout: Sequence[BenchRun] = (), all_terms: bool = False,
                    terms: Sequence[str] | None = None, cross_validate: bool = True,
                    max_evaluations: int = 300) -> BenchFit:
    """Fit on ``runs`` and report cross-validated error (on ``holdout``, or leave-one-file-out)."""
    names = list(terms) if terms is not None else step_terms(profile, all_terms) + list(FRONTEND_TERMS)
    fitted, nfev = fit_terms(profile, runs, cfg, names, max_evaluations=max_evaluations)
    res = BenchFit(fitted, term_values(fitted, names), term_values(profile, names),
                   run_errors(fitted, runs, cfg), num_evaluations=nfev)
    if holdout:
        res.cv_errors = run_errors(fitted, holdout, cfg)
        res.cv_files = [r.path for r in holdout]
    elif cross_validate and len(runs) >= 2:
        for k, left in enumerate(runs):
            others = [r for i, r in enumerate(runs) if i != k]
            prof_k, _ = fit_terms(profile, others, cfg, names, max_evaluations=max_evaluations)
            res.cv_errors += run_errors(prof_k, [left], cfg)
            res.cv_files.append(left.path)
    return res


def with_provenance(fit: BenchFit, files: Sequence[str], holdout: Sequence[str], config: str | None,
                    cfg: RunConfig, start: Profile) -> Profile:
    """The fitted profile with a ``provenance.bench_fit`` record: files, settings, terms, errors."""
    prov = dict(fit.profile.provenance) if isinstance(fit.profile.provenance, dict) else {}
    prov["bench_fit"] = {
        "tool": "agentsim calibrate bench",
        "start_profile": start.source or start.name,
        "files": list(files),
        "holdout_files": list(holdout),
        "config": config,
        "engine": dataclasses.asdict(cfg.cluster.engine),
        "objective": list(OBJECTIVE),
        "terms": fit.terms,
        "start_terms": fit.start_terms,
        "train_error": summarize_errors(fit.train_errors),
        "cv": ("holdout" if holdout else "leave-one-file-out") if fit.cv_files else None,
        "cv_files": fit.cv_files,
        "cv_error": summarize_errors(fit.cv_errors) if fit.cv_errors else None,
        "per_file_train_error": [{"file": f, **e} for f, e in zip(files, fit.train_errors)],
        "per_file_cv_error": [{"file": f, **e} for f, e in zip(fit.cv_files, fit.cv_errors)],
    }
    return dataclasses.replace(fit.profile, provenance=prov, source="")


__all__ = ["BenchFit", "FrontendCosts", "calibrate_bench", "fit_terms", "run_errors", "step_terms",
           "summarize_errors", "with_provenance", "with_terms"]

"""Benchmark the step-time model: the cost of one prediction on the simulator's hot path, and how well
the version-2 form (host terms + linear-layer knee) fits measured whole steps compared with the
five-term version-1 form.

    python benchmarks/step_model.py [--calls 1000000]

1. ``Profile.step_seconds`` per call (ns) beside the five-term formula it replaced, with ``timeit``
   (best of 5; includes the lambda that calls it).
2. The H200 Llama-3-8B whole-forward measurements in ``agentsim/calibration/data/h200-torch/forward.csv``
   (46 step shapes, CUDA-graph medians; README there): both forms fitted with
   :func:`agentsim.calibration.fit.fit_step_time`, in-sample and leave-one-out relative error.
3. The shipped A100 profiles' recorded fit errors (``fit_error``: grid and held-out random batches).
"""

from __future__ import annotations

import argparse
import timeit
from pathlib import Path

import numpy as np


def hot_path(calls: int) -> None:
    from agentsim.calibration.profile import load_profile, shipped_profiles

    p = load_profile(shipped_profiles()["a100-80gb_llama-3-8b_tp1"])
    c = p.coefficients

    def five_terms(num_prefill_tokens, prefill_attn_pairs, num_decode_seqs, decode_ctx_tokens,
                   num_prefill_seqs=0, num_sampled=-1):
        # the version-1 formula as the simulator evaluated it before (baseline)
        return (c.const + c.per_prefill_token * num_prefill_tokens + c.per_prefill_attn_pair * prefill_attn_pairs
                + c.per_decode_seq * num_decode_seqs + c.per_decode_ctx_token * decode_ctx_tokens)

    for label, f in (("Profile.step_seconds (v2: host + knee)", p.step_seconds),
                     ("five-term formula (v1 baseline)", five_terms)):
        best = min(timeit.repeat(lambda: f(512, 131328.0, 64, 65536, 1, 65), number=calls, repeat=5))
        print(f"{label:40s}: {best / calls * 1e9:6.1f} ns/call")


def h200_forms() -> None:
    import pandas as pd

    from agentsim.calibration.fit import error_stats, fit_step_time, predict_many
    from agentsim.calibration.profile import COEFFICIENTS_V1

    path = Path(__file__).resolve().parent.parent / "calibration" / "data" / "h200-torch" / "forward.csv"
    if not path.exists():
        print(f"H200 form comparison not run: {path} is not in this tree")
        return
    d = pd.read_csv(path)
    c, k, n_dec, ctx = (d[col].to_numpy(float) for col in ("prefill_tokens", "prefill_kv", "decode_seqs", "decode_kv"))
    n_pre = (c > 0).astype(float)
    feats = np.column_stack([c, c * k + c * (c + 1) / 2, n_dec, n_dec * ctx, n_pre, n_pre + n_dec])
    y = d["graph_median_ms"].to_numpy() / 1e3
    print(f"H200 Llama-3-8B whole forward, CUDA graphs ({len(y)} shapes, {path.name}):")
    for label, kw in (("v1 (five terms)", {"terms": COEFFICIENTS_V1}), ("v2 (host + knee)", {})):
        fit = fit_step_time(feats, y, **kw)
        e = error_stats(predict_many(fit, feats), y)
        loo = np.array([
            abs(predict_many(fit_step_time(np.delete(feats, i, 0), np.delete(y, i), **kw), feats[i:i + 1])[0] / y[i] - 1)
            for i in range(len(y))
        ])
        print(f"  {label:17s} in-sample median/p90/max {e.median:5.1%}/{e.p90:5.1%}/{e.max:5.1%}   "
              f"leave-one-out median/p90/max {np.median(loo):5.1%}/{np.quantile(loo, 0.9):5.1%}/{loo.max():5.1%}"
              f"   knee {fit.knee_tokens:g} tokens")


def shipped_errors() -> None:
    from agentsim.calibration.profile import load_profile, shipped_profiles

    print("shipped A100 profiles (fit to the layer model; median/p90 relative error):")
    for name, path in shipped_profiles().items():
        p = load_profile(path)
        fe = p.fit_error or {}
        if "grid" not in fe:
            continue
        g, r = fe["grid"], fe["held_out_random_batches"]
        print(f"  {name:28s} grid {g['median_rel_error']:5.1%}/{g['p90_rel_error']:5.1%}   "
              f"random batches {r['median_rel_error']:5.1%}/{r['p90_rel_error']:5.1%}   "
              f"knee {p.coefficients.knee_tokens:g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1_000_000)
    args = ap.parse_args()
    hot_path(args.calls)
    h200_forms()
    shipped_errors()


if __name__ == "__main__":
    main()

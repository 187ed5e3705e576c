"""Benchmark the calibration pipeline: rebuild the shipped A100 profiles, then profile -> fit ->
check a real vLLM CPU engine running a tiny random Llama.

    python benchmarks/calibration_cpu_engine.py [--hidden 256] [--layers 2] [--grid small] [--reps 5] [--keep DIR]

Prints the wall time of each phase and the fit's error figures (median / p90 relative error on
fitted and held-out grid points). Needs vLLM (the CPU wheel: pip install 'agentsim[cpu]').
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return dt, r.stdout + r.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--grid", default="small")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--keep", type=Path, help="keep the job directory and profile here")
    args = ap.parse_args()

    py = sys.executable
    dt, _ = run([py, "-m", "agentsim.calibration.build_profiles", "--check"])
    print(f"rebuild + compare 9 shipped A100 profiles: {dt:.1f} s")

    work = args.keep or Path(tempfile.mkdtemp(prefix="agentsim-cal-"))
    work.mkdir(parents=True, exist_ok=True)
    from agentsim.live.tiny_model import make_tiny_llama

    model = make_tiny_llama(work / "model", hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                            num_layers=args.layers, num_heads=4, num_kv_heads=2, head_dim=64,
                            max_position_embeddings=2048)
    job = work / "job"
    dt, log = run([py, "-m", "agentsim", "calibrate", "profile", "--model", str(model), "--out", str(job),
                   "--grid", args.grid, "--reps", str(args.reps), "--load-format", "dummy", "--dtype", "float32",
                   "--max-model-len", "2048", "--max-num-batched-tokens", "2048", "--max-num-seqs", "64",
                   "--kv-cache-gib", "1"])
    n = len((job / "points.jsonl").read_text().splitlines())
    ready = re.search(r"engine ready in ([\d.]+) s", log)
    print(f"profile {n} grid points x {args.reps} steps (hidden {args.hidden}, {args.layers} layers): {dt:.1f} s "
          f"(engine start {ready.group(1) if ready else '?'} s)")
    prof = work / "tiny.json"
    dt, out = run([py, "-m", "agentsim", "calibrate", "fit", str(job), "--out", str(prof)])
    print(f"fit: {dt:.1f} s")
    for line in out.splitlines():
        if line.startswith(("fitted points", "held-out points", "coefficients", "wrote")):
            print("  " + line)
    dt, out = run([py, "-m", "agentsim", "calibrate", "check", str(prof), str(job)])
    print(f"check: {dt:.1f} s")
    print(out)


if __name__ == "__main__":
    main()

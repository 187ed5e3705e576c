"""How vLLM's engine versions serve the same burst: V1 (mixed batches), V0 (prefill-first steps),
V0 with multi-step scheduling and V0 with chunked prefill, in the simulator.

    python benchmarks/engine_versions.py [--n 10 160 640 1280] [--prompt 512] [--output 256] [--k 10]

A burst of N identical requests (``single`` generator, fixed lengths) arrives at t = 0 on one
engine (the shipped A100-80GB Llama-3-8B TP1 profile, ``max_num_seqs`` 1024, as in issue 14's
measurements). Prints, per N and engine: duration, output throughput, mean TTFT and TPOT as
``vllm bench serve`` defines them, preemptions, engine steps, and the simulator's wall time for
fast-forward on and off (results are identical; the script checks it).
"""

from __future__ import annotations

import argparse
import time

from agentsim.config import load_config
from agentsim.sim.runner import run

MODES = {
    "v1": {"scheduler": "v1"},
    "v1 no-chunk": {"scheduler": "v1", "enable_chunked_prefill": False},
    "v0": {"vllm_version": "0.6"},
    "v0 K": {"vllm_version": "0.6", "num_scheduler_steps": None},  # K filled from --k
    "v0 chunked": {"vllm_version": "0.6", "enable_chunked_prefill": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10, 160, 640, 1280])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=256)
    ap.add_argument("--k", type=int, default=10, help="num_scheduler_steps of the multi-step mode")
    args = ap.parse_args()
    print(f"{'N':>5} {'engine':<12} {'duration s':>10} {'out tok/s':>10} {'TTFT ms':>9} {'TPOT ms':>8} "
          f"{'preempt':>7} {'steps':>7} {'wall ff s':>9} {'wall step s':>11}")
    for n in args.n:
        for name, eng in MODES.items():
            eng = dict(eng, max_num_seqs=1024)
            if "num_scheduler_steps" in eng:
                eng["num_scheduler_steps"] = args.k
            results, walls = [], []
            for ff in (True, False):
                cfg = load_config(None, {
                    "cluster.num_nodes": 1, "cluster.gpus_per_node": 1, "cluster.engine": eng,
                    "workload.arrival": "closed", "workload.agents": n, "workload.num_programs": n,
                    "workload.generator": "single",
                    "workload.params": {"prompt_tokens_mean": args.prompt, "prompt_sigma": 0.0,
                                        "output_tokens_mean": args.output, "output_sigma": 0.0},
                    "sim.drain": True, "sim.fast_forward": ff, "duration": 1e6, "seed": 0})
                t = time.perf_counter()
                results.append(run(cfg))
                walls.append(time.perf_counter() - t)
            on, off = results
            assert on.calls.equals(off.calls), f"fast-forward changed the results ({name}, N={n})"
            s = on.summary
            name_k = name.replace("K", f"K={args.k}")
            print(f"{n:>5} {name_k:<12} {s['duration_s']:>10.2f} {s['output_throughput']:>10.0f} "
                  f"{s['mean_ttft_ms']:>9.0f} {s['mean_tpot_ms']:>8.1f} {s['num_preemptions']:>7.0f} "
                  f"{on.stats['num_steps']:>7} {walls[0]:>9.2f} {walls[1]:>11.2f}")


if __name__ == "__main__":
    main()

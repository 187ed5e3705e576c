"""Simulator speed and memory benchmark (issue 2). Not a test: run it on a quiet machine.

    python benchmarks/sim_speed.py a        # 1 engine x 10,000 single calls, Azure-conv-like lengths
    python benchmarks/sim_speed.py b        # 20 nodes x 4 A100, 4,000 closed-loop ReAct agents, 600 s
    python benchmarks/sim_speed.py all --repeat 3

Each case runs in a fresh subprocess (so peak RSS is that run's alone) and prints simulated LLM
calls per wall-clock second, wall and CPU time, and peak RSS; with --repeat the median is
reported. Results are also written as JSON lines to benchmarks/results/sim_speed.jsonl.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    # Vidur's reference run: 10k requests, one replica, Poisson 6.45 req/s (research/simulators.md 2.4)
    "a": {"cluster.num_nodes": 1, "cluster.gpus_per_node": 1, "workload.arrival": "poisson",
          "workload.rate": 6.45, "workload.generator": "single", "workload.num_programs": 10_000,
          "sim.drain": True, "duration": 1e9},
    "b": {"cluster.num_nodes": 20, "cluster.gpus_per_node": 4, "workload.arrival": "closed",
          "workload.agents": 4000, "workload.generator": "react", "duration": 600.0},
}


def child(case: str, fast_forward: bool) -> None:
    from agentsim.config import load_config
    from agentsim.sim.runner import run

    cfg = load_config(None, {**CASES[case], "sim.fast_forward": fast_forward})
    w0, c0 = time.perf_counter(), time.process_time()
    r = run(cfg)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(json.dumps({"case": case, "fast_forward": fast_forward, "llm_calls": r.stats["num_llm_calls"],
                      "finished_calls": int((r.calls["status"] == "finished").sum()),
                      "steps": r.stats["num_steps"], "wall_s": wall, "cpu_s": cpu,
                      "calls_per_wall_s": r.stats["num_llm_calls"] / wall, "peak_rss_gib": rss,
                      "sim_s": r.summary["duration_s"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("case", choices=["a", "b", "all"])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-fast-forward", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.case, not args.no_fast_forward)
        return
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    for case in (["a", "b"] if args.case == "all" else [args.case]):
        runs = []
        for _ in range(args.repeat):
            cmd = [sys.executable, __file__, case, "--child"] + (["--no-fast-forward"] if args.no_fast_forward else [])
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            runs.append(res)
            with open(out / "sim_speed.jsonl", "a") as f:
                f.write(json.dumps({**res, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "cpu_s", "calls_per_wall_s", "peak_rss_gib")}
        r0 = runs[0]
        print(f"case {case}: {r0['llm_calls']:,} LLM calls ({r0['finished_calls']:,} finished), {r0['steps']:,} engine steps, "
              f"{r0['sim_s']:.0f} s simulated | median of {len(runs)}: {med['wall_s']:.1f} s wall, {med['cpu_s']:.1f} s CPU, "
              f"{med['calls_per_wall_s']:,.0f} calls/s, peak RSS {med['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()

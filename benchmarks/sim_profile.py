"""Where the simulator's time goes (issue 10): one ``sim_speed.py`` case under cProfile, its self
time summed by component (the table in ``benchmarks/README.md``). Not a test; cProfile inflates
functions with many small calls, so read the shares, not the seconds.

    python benchmarks/sim_profile.py b --duration 30        # case (b) cut to 30 simulated seconds
    python benchmarks/sim_profile.py a --top 20             # case (a), and the 20 costliest functions
    python benchmarks/sim_profile.py b --duration 30 --policy kvflow   # case (b) with another bundle
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sim_speed import CASES  # noqa: E402

# (component, path fragments of its modules); the first match wins, in this order
COMPONENTS = [
    ("engine loop (sim/engine.py)", ("sim/engine.py",)),
    ("KV cache manager + block pool (sim/kv_manager.py, sim/kv.py)", ("sim/kv_manager.py", "sim/kv.py")),
    ("free-block queue (policies/baseline.py)", ("policies/baseline.py",)),
    ("other policies, KV tiers, disaggregation", ("policies/", "sim/tiers.py", "sim/disagg.py", "sim/network.py")),
    ("block hashes, contexts (agentsim/workload.py)", ("agentsim/workload.py",)),
    ("program driver (agentsim/programs.py)", ("agentsim/programs.py",)),
    ("runner: programs, routing, call records (sim/runner.py)", ("sim/runner.py",)),
    ("generators, RNG (traces/)", ("traces/",)),
    ("metric columns (agentsim/metrics.py)", ("agentsim/metrics.py",)),
    ("step-time model (calibration/)", ("calibration/",)),
    ("SimPy event loop", ("simpy/",)),
    ("garbage collection (gc.collect)", ("gc.collect",)),
]


def component(filename: str, func: str) -> str:
    where = f"{filename}:{func}".replace("\\", "/")
    for name, parts in COMPONENTS:
        if any(p in where for p in parts):
            return name
    if filename == "~":
        return "builtins called from the above (list/dict/heap ops ...)"
    return "other (imports, pandas, numpy, set-up)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=list(CASES))
    ap.add_argument("--duration", type=float, default=None, help="simulated seconds (default: the case's own)")
    ap.add_argument("--top", type=int, default=0, help="also print the N costliest functions by self time")
    ap.add_argument("--policy", default=None, metavar="BUNDLE", help="the policy bundle (default: the case's own)")
    args = ap.parse_args()
    from agentsim.config import load_config
    from agentsim.sim.runner import Simulation

    over = dict(CASES[args.case])
    if args.duration is not None:
        over["duration"] = args.duration
    if args.policy is not None:
        over["policy"] = args.policy
    cfg = load_config(None, over)
    prof = cProfile.Profile()
    c0 = time.process_time()
    prof.enable()
    result = Simulation(cfg).run()
    prof.disable()
    cpu = time.process_time() - c0
    stats = pstats.Stats(prof)
    shares: Counter = Counter()
    for (filename, _line, func), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():
        shares[component(filename, func)] += tottime
    total = sum(shares.values())
    n = result.stats["num_llm_calls"]
    print(f"case {args.case} ({over.get('policy', 'vllm')}): {n:,} LLM calls, {cpu:.1f} s CPU under cProfile ({n / cpu:,.0f} calls/CPU-s profiled)")
    print("| component | share of self time |\n|---|---|")
    for name, t in shares.most_common():
        print(f"| {name} | {100 * t / total:.0f} % |")
    if args.top:
        stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()

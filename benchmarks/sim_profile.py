"""Where the simulator's time goes (issue 10): one ``sim_speed.py`` case under cProfile, its self
time summed by component (the table in ``benchmarks/README.md``). Not a test; cProfile inflates
functions with many small calls, so read the shares, not the seconds.

    python benchmarks/sim_profile.py b --duration 30        # case (b) cut to 30 simulated seconds
    python benchmarks/sim_profile.py a --top 20             # case (a), and the 20 costliest functions
    python benchmarks/sim_profile.py b --duration 30 --policy kvflow   # case (b) with another bundle
    python benchmarks/sim_profile.py b --duration 150 --sampler py-spy  # sampled, not traced (pip install py-spy)

``--sampler py-spy`` samples the run's stack 200 times a second instead of tracing every call: no
per-call overhead, so small functions are not inflated, and a function's self time includes the C
builtins it calls (dict and list operations). Use it for the shares; cProfile for call counts.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
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


_FRAME = re.compile(r"(.*) \((.*):\d+\)$")


def sampled_shares(raw_lines) -> tuple[Counter, Counter, int]:
    """Self samples by component and by function from py-spy's ``--format raw`` lines
    (``frame;frame;... count``, each frame ``function (file:line)``, the innermost last).
    Returns (by component, by ``function (file)``, total samples)."""
    by_comp: Counter = Counter()
    by_func: Counter = Counter()
    total = 0
    for line in raw_lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        m = _FRAME.match(stack.rsplit(";", 1)[-1])
        func, filename = (m.group(1), m.group(2)) if m else (stack.rsplit(";", 1)[-1], "?")
        by_comp[component(filename, func)] += n
        by_func[f"{func} ({'/'.join(filename.replace(chr(92), '/').split('/')[-2:])})"] += n
    return by_comp, by_func, total


def _run_sampled(args) -> None:
    spy = shutil.which("py-spy")
    if spy is None:
        print("--sampler py-spy: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "stacks.txt"
        # the run itself is sim_speed.py's (one JSON line with its figures)
        cmd = [spy, "record", "--rate", "200", "--format", "raw", "--output", str(raw), "--",
               sys.executable, str(Path(__file__).with_name("sim_speed.py")), args.case, "--child"]
        cmd += (["--duration", str(args.duration)] if args.duration is not None else [])
        cmd += (["--policy", args.policy] if args.policy is not None else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not raw.is_file():
            sys.stderr.write(proc.stderr[-2000:])
            print(f"--sampler py-spy: the sampled run failed (exit {proc.returncode})", file=sys.stderr)
            sys.exit(1)
        by_comp, by_func, total = sampled_shares(raw.read_text().splitlines())
    run = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    print(f"case {args.case} ({run['policy']}): {run['llm_calls']:,} LLM calls, {run['cpu_s']:.1f} s CPU "
          f"({run['calls_per_cpu_s']:,.0f} calls/CPU-s, sampled)")
    print(f"{total:,} samples with Python frames at 200/s (py-spy)")
    print("| component | share of samples (self, incl. the builtins it calls) |\n|---|---|")
    for name, n in by_comp.most_common():
        print(f"| {name} | {100 * n / total:.0f} % |")
    if args.top:
        print()
        for name, n in by_func.most_common(args.top):
            print(f"{100 * n / total:5.1f} %  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=list(CASES))
    ap.add_argument("--duration", type=float, default=None, help="simulated seconds (default: the case's own)")
    ap.add_argument("--top", type=int, default=0, help="also print the N costliest functions by self time")
    ap.add_argument("--policy", default=None, metavar="BUNDLE", help="the policy bundle (default: the case's own)")
    ap.add_argument("--sampler", choices=("cprofile", "py-spy"), default="cprofile",
                    help="cprofile (default: traces every call, exact counts, inflates small functions) or "
                         "py-spy (samples the stack; needs pip install py-spy)")
    args = ap.parse_args()
    if args.sampler == "py-spy":
        _run_sampled(args)
        return
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

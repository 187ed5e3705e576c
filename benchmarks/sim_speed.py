"""Simulator speed and memory benchmark (issues 2 and 10). Not a test: run it on a quiet machine.

    python benchmarks/sim_speed.py a        # 1 engine x 10,000 single calls, Azure-conv-like lengths
    python benchmarks/sim_speed.py b        # 20 nodes x 4 A100, 4,000 closed-loop ReAct agents, 600 s
    python benchmarks/sim_speed.py c        # case b for one simulated hour (3,600 s): issue 10's goal
    python benchmarks/sim_speed.py d        # one ScaleSim-style society of 1,000 agents, `scalesim` bundle
    python benchmarks/sim_speed.py all --repeat 3   # a, b and d (c: name it)
    python benchmarks/sim_speed.py b --duration 60 --policy vllm kvflow llm-d   # one case, several bundles

Each case runs in a fresh subprocess (so peak RSS is that run's alone) and prints simulated LLM
calls per wall-clock second and per CPU second, wall and CPU time, and peak RSS; with --repeat the
median is reported. Results are also written as JSON lines to benchmarks/results/sim_speed.jsonl.
``--floor`` runs no engine: every LLM call is answered a fixed 1 s after it is made, so what is
timed is the program layer (bodies, the driver, tool waits) and SimPy alone, the part of a call no
engine change can speed up; issue 10's goal (25,000 calls/CPU-s = 40 us per call) minus this is
the time per call left for routing, the engine and the call records:
    python benchmarks/sim_speed.py b --duration 60 --floor
``--reference-loop`` runs every engine's plain call-by-call step loop
(:meth:`agentsim.sim.engine.Engine.use_reference_loop`) instead of the optimized one: same results,
the speed before issue 10.

``--baseline DIR`` times an earlier version side by side with this checkout: DIR holds that version's
package (``git worktree add /tmp/old REV && pip install --no-deps --target DIR /tmp/old``); each
repeat runs both, alternating which goes first, and the ratio of their medians is printed (this machine's speed
drifts by tens of percent over an hour, so only runs made together compare):

    python benchmarks/sim_speed.py b --duration 60 --policy llm-d scalesim --baseline /tmp/base --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
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
    "c": {"cluster.num_nodes": 20, "cluster.gpus_per_node": 4, "workload.arrival": "closed",
          "workload.agents": 4000, "workload.generator": "react", "duration": 3600.0},
    # the README's ScaleSim-like study cell (experiments/specs/scalesim.toml): an evict policy
    # whose order depends on the clock, so its engine runs without fast-forward windows
    "d": {"cluster.num_nodes": 1, "cluster.gpus_per_node": 1, "workload.arrival": "closed",
          "workload.agents": 1, "workload.num_programs": 1, "workload.generator": "society",
          "workload.params": {"num_agents": 1000, "num_steps": 20}, "policy": "scalesim",
          "sim.drain": True, "duration": 100000.0},
}


FLOOR_LATENCY_S = 1.0   # --floor: every LLM call is answered this long after it is made


def _answer_without_engines(finished: list) -> None:
    """--floor: replace the engines by a fixed answer. A call is still made (``_make_call``: its
    record, id, size checks) and the program waits for it through SimPy, but nothing routes,
    schedules, caches or records it: what remains is the program layer (bodies, ``drive``, tool
    waits) and the event loop, the part of a call the engine cannot speed up."""
    from agentsim.sim.runner import Simulation
    from agentsim.workload import CallResult, Segment

    def llm_call(self, req, strand, thread_id):
        env = self.env
        call = self._make_call(req, strand.run.prog, thread_id)
        yield env.timeout(FLOOR_LATENCY_S)
        finished[0] += 1
        return CallResult(call.call_id, Segment(call.output_seg_id, call.num_output_tokens),
                          call.arrival_at, call.arrival_at, env.now, 0)

    Simulation.llm_call = llm_call


def child(case: str, fast_forward: bool, reference: bool, policy: str | None, duration: float | None,
          floor: bool = False) -> None:
    from agentsim.config import load_config
    from agentsim.sim.runner import Simulation

    finished = [0]
    if floor:
        _answer_without_engines(finished)

    over = {**CASES[case], "sim.fast_forward": fast_forward}
    if policy is not None:
        over["policy"] = policy
    if duration is not None:
        over["duration"] = duration
    cfg = load_config(None, over)
    w0, c0 = time.perf_counter(), time.process_time()
    sim = Simulation(cfg)
    if reference:
        for e in sim.engines:
            e.use_reference_loop()
    r = sim.run()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    import agentsim
    import agentsim.sim.engine

    # where the package and its engine came from (an editable install can serve submodules from
    # elsewhere than the top-level package)
    where = [str(Path(m.__file__).resolve().parent) for m in (agentsim, agentsim.sim.engine)]
    print(json.dumps({"case": case, "policy": policy or over.get("policy", "vllm"), "fast_forward": fast_forward,
                      "package": where,
                      "reference_loop": reference, "floor": floor,
                      "llm_calls": r.stats["num_llm_calls"], "calls_per_cpu_s": r.stats["num_llm_calls"] / cpu,
                      "finished_calls": finished[0] if floor else int((r.calls["status"] == "finished").sum()),
                      "steps": r.stats["num_steps"], "wall_s": wall, "cpu_s": cpu,
                      "calls_per_wall_s": r.stats["num_llm_calls"] / wall, "peak_rss_gib": rss,
                      "sim_s": r.summary["duration_s"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("case", choices=[*CASES, "all"])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-fast-forward", action="store_true")
    ap.add_argument("--reference-loop", action="store_true", help="the plain call-by-call step loop (before issue 10)")
    ap.add_argument("--policy", nargs="+", default=[None], metavar="BUNDLE",
                    help="run the case with these policy bundles, one after another (default: the case's own, vllm)")
    ap.add_argument("--duration", type=float, default=None, help="simulated seconds (default: the case's own)")
    ap.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                    help="also time the agentsim package installed in DIR (pip install --no-deps --target DIR "
                         "<old checkout>), alternating with this checkout, and print the ratio")
    ap.add_argument("--floor", action="store_true",
                    help=f"no engines: every LLM call answered {FLOOR_LATENCY_S:g} s after it is made (the program "
                         "layer and SimPy alone: what a call costs outside the engine)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.case, not args.no_fast_forward, args.reference_loop, args.policy[0], args.duration, args.floor)
        return
    if args.floor and (args.reference_loop or args.no_fast_forward or args.baseline is not None):
        print("--floor: runs no engine, so --reference-loop, --no-fast-forward and --baseline do not apply",
              file=sys.stderr)
        sys.exit(2)
    from agentsim.policies.registry import bundles

    known = {b.name for b in bundles()}
    for p in args.policy:
        if p is not None and p not in known:
            print(f"--policy: unknown bundle {p!r} (known: {', '.join(sorted(known))})", file=sys.stderr)
            sys.exit(2)
    base = None
    if args.baseline is not None:
        base = args.baseline.resolve()
        if not (base / "agentsim" / "sim" / "engine.py").is_file():
            print(f"--baseline: {args.baseline} holds no agentsim package (make one with: "
                  f"pip install --no-deps --target {args.baseline} <an earlier checkout>)", file=sys.stderr)
            sys.exit(2)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    cells = [(case, p) for case in (["a", "b", "d"] if args.case == "all" else [args.case]) for p in args.policy]
    here = Path(__file__).resolve().parents[1]
    sides = [("baseline", base), ("this checkout", None)] if base is not None else [("this checkout", None)]
    for case, policy in cells:
        runs: dict[str, list] = {name: [] for name, _ in sides}
        for rep in range(args.repeat):
            for name, where in (sides if rep % 2 == 0 else sides[::-1]):   # alternate who goes first
                cmd = [sys.executable, __file__, case, "--child"] + (["--no-fast-forward"] if args.no_fast_forward else []) \
                    + (["--reference-loop"] if args.reference_loop else []) + (["--policy", policy] if policy else []) \
                    + (["--duration", str(args.duration)] if args.duration is not None else []) \
                    + (["--floor"] if args.floor else [])
                env = None
                if where is not None:
                    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(where)] + [
                        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr)
                    print(f"case {case} ({policy or 'vllm'}, {name}): the run failed (exit {proc.returncode})",
                          file=sys.stderr)
                    sys.exit(1)
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                if base is not None:
                    # say which code ran: the baseline's package must come from DIR, this
                    # checkout's from this checkout (an install of another copy would mislabel it)
                    want = where if where is not None else here
                    wrong = [p for p in res["package"] if not Path(p).is_relative_to(want)]
                    if wrong:
                        who = "the baseline run" if where is not None else "this checkout's run"
                        print(f"--baseline: {who} imported agentsim from {wrong[0]}, not from {want}"
                              + ("" if where is not None else " (install this checkout: pip install -e .)"),
                              file=sys.stderr)
                        sys.exit(2)
                res["code"] = name
                runs[name].append(res)
                with open(out / "sim_speed.jsonl", "a") as f:
                    f.write(json.dumps({**res, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        meds = {}
        for name, _ in sides:
            rs = runs[name]
            med = meds[name] = {k: statistics.median(r[k] for r in rs)
                                for k in ("wall_s", "cpu_s", "calls_per_wall_s", "calls_per_cpu_s", "peak_rss_gib")}
            r0 = rs[0]
            print(f"case {case} ({r0['policy']}): {r0['llm_calls']:,} LLM calls ({r0['finished_calls']:,} finished), {r0['steps']:,} engine steps, "
                  f"{r0['sim_s']:.0f} s simulated | median of {len(rs)}: {med['wall_s']:.1f} s wall, {med['cpu_s']:.1f} s CPU, "
                  f"{med['calls_per_wall_s']:,.0f} calls/wall-s, {med['calls_per_cpu_s']:,.0f} calls/CPU-s, "
                  f"peak RSS {med['peak_rss_gib']:.2f} GiB" + (" (reference loop)" if args.reference_loop else "")
                  + (f" (floor: no engines, {1e6 / med['calls_per_cpu_s']:.0f} us CPU per call)" if args.floor else "")
                  + (f" [{name}]" if base is not None else ""))
        if base is not None:
            keys = ("llm_calls", "finished_calls", "steps")
            same = len({tuple(r[k] for k in keys) for rs in runs.values() for r in rs}) == 1
            print(f"  this checkout / baseline: {meds['this checkout']['calls_per_cpu_s'] / meds['baseline']['calls_per_cpu_s']:.2f}x "
                  f"calls/CPU-s" + ("" if same else " (NOTE: the two ran different simulations: calls or steps differ)"))


if __name__ == "__main__":
    main()

"""Overhead of the live driver: per-call latency through it vs direct ``AsyncLLM.generate``.

One vLLM engine (CPU backend, tiny random Llama) in a Ray actor on a local 1-node cluster. For
each concurrency level the same ReAct workload (closed loop, ``--programs`` programs) runs:

1. through the driver (``LiveDriver``: token mapping, KV-view hashing, routing, priority, Ray RPC
   to the engine actor, records), recording every call's exact token ids and every tool wait;
2. directly: the recorded programs replayed inside the engine actor with plain
   ``AsyncLLM.generate`` (same prompts, same output lengths, same tool sleeps, same concurrency).

Both start from an empty prefix cache; the two are alternated ``--reps`` times (after one discarded
warm-up). Reported:

- *paired* (robust to the engine's run-to-run noise): for every call of the driver runs, the time
  the driver adds = driver E2E (call yielded by the program -> result back in the program) minus
  the ``AsyncLLM.generate`` time of that same request measured inside the engine process; and per
  program, the sum of its calls' added time relative to the rest of its latency;
- *A/B*: per-call p50/p95 and mean program latency of the driver runs vs the direct replays
  (identical workloads, separate runs: on a shared 2-core machine this carries the engine's noise).

    python benchmarks/live_overhead.py [--programs 16] [--reps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from agentsim.config import load_config
from agentsim.live.cluster import RayCluster
from agentsim.live.driver import EngineClient, LiveDriver, LiveOptions, RayEngineClient
from agentsim.live.engine import EngineSpec
from agentsim.live.tiny_model import make_tiny_llama
from agentsim.policies.registry import make_bundle
from agentsim.traces.source import ProgramSource
from agentsim.workload import ToolCall


class RecordingClient(EngineClient):
    """Passes calls through and records each program's LLM steps (token ids, max_tokens)."""

    def __init__(self, inner: RayEngineClient, steps: dict) -> None:
        self.inner, self.steps = inner, steps
        self.engine_time: dict[int, float] = {}
        self.engine_id, self.node_id, self.info = inner.engine_id, inner.node_id, inner.info

    async def generate(self, request_id, token_ids, max_tokens, priority, extra_args, run_epoch):
        pid = extra_args["agentsim"]["program_id"]
        self.steps.setdefault(pid, []).append(("llm", list(token_ids), int(max_tokens)))
        reply = await self.inner.generate(request_id, token_ids, max_tokens, priority, extra_args, run_epoch)
        # engine-side duration of exactly this request (same process as AsyncLLM)
        self.engine_time[extra_args["agentsim"]["call_id"]] = reply["done_at"] - reply["recv_at"]
        return reply

    async def poll(self):
        return await self.inner.poll()

    async def clock(self):
        return await self.inner.clock()

    async def reset_prefix_cache(self):
        return await self.inner.reset_prefix_cache()

    def fail_pending(self, why: str) -> None:
        self.inner.fail_pending(why)

    def close(self) -> None:
        self.inner.close()


class RecordingSource(ProgramSource):
    """The configured programs, with tool waits recorded into the same per-program step lists."""

    def __init__(self, spec, seed, steps: dict) -> None:
        super().__init__(spec, seed)
        self.steps = steps

    def make(self, agent_id, arrival_at):
        prog = super().make(agent_id, arrival_at)
        gen = prog.meta["generator"]
        steps = self.steps

        def body(pc, gen=gen):
            inner = gen.body(pc)
            value = None
            while True:
                try:
                    req = inner.send(value)
                except StopIteration as stop:
                    return stop.value
                if isinstance(req, ToolCall):
                    steps.setdefault(pc.program_id, []).append(("tool", req.duration))
                value = yield req

        prog.body = body
        return prog


def pct(x, q):
    return float(np.percentile(np.asarray(x), q)) if len(x) else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--programs", type=int, default=16)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tool", type=float, default=0.05, help="constant tool time (s)")
    ap.add_argument("--poll-interval", type=float, default=LiveOptions.poll_interval,
                    help="driver's KV-event/stats poll period (s)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    model = str(make_tiny_llama(Path(tempfile.gettempdir()) / "agentsim-bench-tiny", max_position_embeddings=16384))
    cluster = RayCluster.local(1)
    rows = []
    try:
        (h,) = cluster.start_engines([EngineSpec(engine_id=0, node_id=0, model=model, run_tag="bench",
                                                 max_model_len=8192, max_num_seqs=16).to_dict()])
        import ray

        for conc in args.concurrency:
            cfg = load_config(None, {
                "seed": 7, "duration": 600.0, "cluster.engine.block_size": 32, "workload.agents": conc,
                "workload.num_programs": args.programs,
                "workload.params": {"calls_mean": 6.0, "max_calls": 12,
                                    "tools": [{"name": "t", "dist": "constant", "median": args.tool}]}})
            drv_calls, drv_progs, dir_calls, dir_progs = [], [], [], []
            paired_added, paired_prog = [], []
            # rep 0 warms both paths up and is discarded; then the order alternates
            for rep in range(args.reps + 1):
                steps: dict = {}
                client = RecordingClient(RayEngineClient(h), steps)
                driver = LiveDriver([client], make_bundle("vllm"), block_size=32,
                                    options=LiveOptions(duration=cfg.duration, flush_interval=0,
                                                        poll_interval=args.poll_interval), seed=cfg.seed,
                                    max_num_seqs=16)

                def run_direct() -> dict:
                    ordered = [steps[pid] for pid in sorted(steps)]
                    ray.get(h.actor.reset_prefix_cache.remote())
                    return ray.get(h.actor.replay_direct.remote(ordered, conc))

                if rep % 2 == 0 or rep == 0:
                    res = driver.run(RecordingSource(cfg.workload, cfg.seed, steps))
                    out = run_direct()
                else:
                    # the programs are deterministic: record them with a throwaway driver run first
                    rec_driver = LiveDriver([client], make_bundle("vllm"), block_size=32,
                                            options=LiveOptions(duration=cfg.duration, flush_interval=0,
                                                                poll_interval=args.poll_interval),
                                            seed=cfg.seed, max_num_seqs=16)
                    rec_driver.run(RecordingSource(cfg.workload, cfg.seed, steps))
                    out = run_direct()
                    steps.clear()
                    res = driver.run(RecordingSource(cfg.workload, cfg.seed, steps))
                if rep == 0:
                    continue
                eng = res.calls["call_id"].map(client.engine_time)
                added = (res.calls["e2e"] - eng).to_numpy()
                paired_added += added.tolist()
                per_prog = res.calls.assign(added=added).groupby("program_id")["added"].sum()
                lat = res.programs.set_index("program_id")["latency"]
                paired_prog += (per_prog / (lat.loc[per_prog.index] - per_prog)).tolist()
                drv_calls += res.calls["e2e"].tolist()
                drv_progs += res.programs["latency"].tolist()
                dir_calls += out["call_lat"]
                dir_progs += out["prog_lat"]
            assert len(drv_calls) == len(dir_calls), (len(drv_calls), len(dir_calls))
            row = {
                "concurrency": conc, "calls": len(drv_calls), "programs": len(drv_progs),
                "driver_call_p50_ms": pct(drv_calls, 50) * 1e3, "direct_call_p50_ms": pct(dir_calls, 50) * 1e3,
                "driver_call_p95_ms": pct(drv_calls, 95) * 1e3, "direct_call_p95_ms": pct(dir_calls, 95) * 1e3,
                "added_call_p50_ms": (pct(drv_calls, 50) - pct(dir_calls, 50)) * 1e3,
                "driver_program_mean_s": float(np.mean(drv_progs)), "direct_program_mean_s": float(np.mean(dir_progs)),
            }
            row["program_overhead_pct"] = (row["driver_program_mean_s"] / row["direct_program_mean_s"] - 1) * 100
            row["paired_added_p50_ms"] = pct(paired_added, 50) * 1e3
            row["paired_added_p95_ms"] = pct(paired_added, 95) * 1e3
            row["paired_program_overhead_mean_pct"] = float(np.mean(paired_prog)) * 100
            row["load_avg_1m"] = os.getloadavg()[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        cluster.shutdown()
    print()
    print("paired (same calls): time the driver adds to AsyncLLM.generate")
    print(f"{'conc':>4} {'calls':>6} {'added p50':>10} {'added p95':>10} {'program overhead':>17}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['calls']:>6} {r['paired_added_p50_ms']:>8.2f}ms {r['paired_added_p95_ms']:>8.2f}ms "
              f"{r['paired_program_overhead_mean_pct']:>16.2f}%")
    print()
    print("A/B (separate runs of the same workload; includes run-to-run engine noise)")
    print(f"{'conc':>4} {'calls':>6} {'driver p50':>11} {'direct p50':>11} {'added p50':>10} "
          f"{'driver p95':>11} {'direct p95':>11} {'prog mean drv':>14} {'prog mean dir':>14} {'overhead':>9}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['calls']:>6} {r['driver_call_p50_ms']:>9.2f}ms {r['direct_call_p50_ms']:>9.2f}ms "
              f"{r['added_call_p50_ms']:>8.2f}ms {r['driver_call_p95_ms']:>9.2f}ms {r['direct_call_p95_ms']:>9.2f}ms "
              f"{r['driver_program_mean_s']:>13.3f}s {r['direct_program_mean_s']:>13.3f}s {r['program_overhead_pct']:>8.2f}%")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "args": vars(args) | {"json": str(args.json)},
                                         "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                                         "when": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))


if __name__ == "__main__":
    main()

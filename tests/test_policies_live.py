"""The same policy objects, fed the same event sequence, decide the same wherever they run.

The live side is the real vLLM 0.32 scheduler with agentsim's adapter (``AgentsimScheduler``: it hosts
the policy bundle inside the engine core, re-ranks requests every step, preempts for a better waiting
call and orders freed KV blocks through :class:`~agentsim.live.scheduler.PolicyFreeQueue`), driven
step by step with a scripted clock and stand-in model outputs (one sampled token per request whose
prompt is computed), as vLLM's own scheduler tests do. Every event the adapter hands the policy is
recorded with the call state it carried; the recording is then replayed into a fresh policy through
the simulator's call records (:class:`~agentsim.sim.engine.SimCall`), the one ranking and victim
rule both backends call (:mod:`agentsim.policies.ranking`; ``tests/test_contract.py`` checks that the
engine's victim is that rule's) and its block records (:class:`~agentsim.policies.base.BlockView`).
The decision logs must be identical.
"""

from __future__ import annotations

import os
import tempfile

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

STEP = 0.01


# one tiny model directory per test process, removed when the process exits (no agentsim-tiny-* left)
_TINY_DIR = tempfile.TemporaryDirectory(prefix="agentsim-tiny-")


def make_scheduler(policy, blocks, max_num_seqs):
    """A real AgentsimScheduler on a tiny model config (no weights, no model runner)."""
    import torch
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from agentsim.live.scheduler import AgentsimScheduler
    from agentsim.live.tiny_model import make_tiny_llama

    d = make_tiny_llama(os.path.join(_TINY_DIR.name, "tiny"))
    args = EngineArgs(model=str(d), tokenizer=str(d), load_format="dummy", dtype="float32", max_model_len=1024,
                      block_size=16, enable_prefix_caching=True, max_num_seqs=max_num_seqs,
                      scheduling_policy="priority",  # as the live engine actor starts vLLM
                      max_num_batched_tokens=1024, num_gpu_blocks_override=blocks, enforce_eager=True,
                      scheduler_cls="agentsim.live.scheduler.AgentsimScheduler",
                      additional_config={"agentsim": {"policy": policy, "engine_id": 0}})
    cfg = args.create_engine_config()
    cfg.cache_config.num_gpu_blocks = blocks
    kvc = KVCacheConfig(num_blocks=blocks, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["layer0"], FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=32,
                                                       dtype=torch.float32))])
    return AgentsimScheduler(vllm_config=cfg, kv_cache_config=kvc,
                             structured_output_manager=StructuredOutputManager(cfg), block_size=16)


class LiveRecorder:
    """Drives the scheduler and records what its policy saw and decided."""

    def __init__(self, sched):
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

        init_none_hash(sha256)
        self.hasher = get_request_block_hasher(16, sha256)
        self.sched = sched
        self.clock = 0.0
        sched.now = lambda: self.clock          # the run clock is injected, as in the driver
        self.events: list[tuple] = []
        # the policy's events and the scheduler's ranking decisions, through their public subscriptions
        for name in ("on_call_arrive", "on_call_finish"):
            sched.bundle.subscribe(name, lambda call, now, name=name:
                                   self.events.append((name, now, self.snapshot(call))))

        def decided(event, now, data):
            if event == "rank":
                self.events.append(("rank", now, [self.snapshot(c) for c in data["calls"]]))
            else:
                self.events.append(("preempt", now, [self.snapshot(c) for c in data["running"]],
                                    data["victim"].call_id))

        sched.subscribe(decided)

    @staticmethod
    def snapshot(c):
        return {"call_id": c.call_id, "program_id": c.program_id, "agent_id": c.agent_id,
                "arrival_at": c.arrival_at, "num_prompt_tokens": c.num_prompt_tokens,
                "num_output_tokens": c.num_output_tokens, "service_time": c.service_time,
                "wait_time": c.wait_time, "hints": dict(next_invocation_distance=c.hints.next_invocation_distance)}

    def request(self, cid, pid, n, out, t, hints=None):
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request

        meta = {"call_id": cid, "program_id": pid, "agent_id": pid, "arrival_at": t, "program_arrival_at": 0.0,
                "num_output_tokens": out, "hints": hints or {}}
        sp = SamplingParams(max_tokens=out, ignore_eos=True, extra_args={"agentsim": meta})
        return Request(f"req-{cid}", [4 + (cid * 37 + i) % 250 for i in range(n)], sp, None, block_hasher=self.hasher)

    def run(self, arrivals, max_steps=2000):
        from vllm.v1.outputs import ModelRunnerOutput

        s = self.sched
        todo = sorted(arrivals)
        for _ in range(max_steps):
            while todo and todo[0][0] <= self.clock + 1e-12:
                t, cid, pid, n, out, hints = todo.pop(0)
                s.add_request(self.request(cid, pid, n, out, t, hints))
            out = s.schedule()
            ids = list(out.num_scheduled_tokens)
            toks = [[5] if s.requests[r].num_computed_tokens >= s.requests[r].num_tokens else [] for r in ids]
            s.update_from_output(out, ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                                        sampled_token_ids=toks))
            self.clock = round(self.clock + STEP, 10)
            if not todo and not s.requests:
                return
        raise AssertionError("the scripted run did not finish")


def sim_call(snap):
    """The simulator's call record carrying the state the live adapter showed the policy."""
    from agentsim.sim.engine import SimCall
    from agentsim.workload import CallHints, Context, Segment

    c = SimCall(snap["call_id"], snap["program_id"], snap["agent_id"], 0, "", snap["arrival_at"], 0.0,
                Context.of(Segment(snap["call_id"], snap["num_prompt_tokens"])), snap["num_output_tokens"],
                snap["call_id"], CallHints(**snap["hints"]), (), None)
    c._service = snap["service_time"]
    c.wait_time = snap["wait_time"]
    return c


def replay_order(policy, events):
    """Feed the recorded events to a fresh bundle through the simulator's records and rules."""
    from agentsim.policies.ranking import pick_victim, rank
    from agentsim.policies.registry import make_bundle

    bundle = make_bundle(policy)
    calls: dict[int, object] = {}
    out = []

    def update(snap):
        c = calls.get(snap["call_id"])
        if c is None:
            c = calls[snap["call_id"]] = sim_call(snap)
        c._service, c.wait_time = snap["service_time"], snap["wait_time"]
        return c

    for ev in events:
        kind, now = ev[0], ev[1]
        if kind in ("on_call_arrive", "on_call_finish"):
            bundle.emit(kind, update(ev[2]), now)
        elif kind == "rank":
            cs = [update(s) for s in ev[2]]
            # the shared rule the engine sorts its waiting queue by (and the live scheduler re-ranks by)
            out.append(("rank", now, [c.call_id for c in rank(bundle.order, cs, now)]))
        elif kind == "preempt":
            out.append(("preempt", now, pick_victim(bundle.order, [update(s) for s in ev[2]], now).call_id))
    return out


def live_decisions(events):
    out = []
    for ev in events:
        if ev[0] == "rank":
            out.append(("rank", ev[1], [s["call_id"] for s in ev[2]]))
        elif ev[0] == "preempt":
            out.append(("preempt", ev[1], ev[3]))
    return out


def test_plas_decides_the_same_in_the_live_scheduler_and_in_the_simulator():
    # PLAS with small quanta and a low anti-starvation ratio, so that demotions, a promotion and a
    # preemption all happen within a short script: program 0 runs long calls, program 1 joins,
    # program 2 arrives with a first call, program 0 comes back
    policy = {"name": "autellix-plas", "params": {"order": {"q1": 0.05, "beta": 1.5}}}
    sched = make_scheduler(policy, blocks=64, max_num_seqs=2)
    rec = LiveRecorder(sched)
    rec.run([(0.0, 0, 0, 40, 30, None), (0.0, 1, 1, 40, 30, None), (0.05, 2, 2, 40, 12, None),
             (0.12, 3, 0, 40, 12, None), (0.2, 4, 3, 40, 12, None), (0.21, 5, 4, 40, 12, None),
             (0.3, 6, 2, 40, 12, None)])
    live = live_decisions(rec.events)
    assert sum(1 for d in live if d[0] == "rank") > 20
    assert any(d[0] == "preempt" for d in live), "the script should make the policy preempt"
    order = sched.bundle.order
    assert order.num_demotions > 0 and order.num_promotions > 0
    assert replay_order(policy, rec.events) == live


def test_invocation_distance_evicts_the_same_blocks_in_the_live_free_queue_and_in_the_simulator():
    from agentsim.policies.base import BlockView
    from agentsim.policies.registry import make_bundle

    policy = {"name": "vllm", "evict": "invocation-distance",
              "params": {"evict": {"cpu_tier": False, "unit": 0.01, "hold_levels": 1000}}}
    sched = make_scheduler(policy, blocks=24, max_num_seqs=2)
    rec = LiveRecorder(sched)
    merged: list[tuple] = []   # policy hooks and queue operations, in the order they happened

    class Recording:
        """Sits between the live adapter's PolicyFreeQueue and the policy's own queue."""

        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def append(self, b, now):
            merged.append(("append", now, (b.block_id, b.block_hash, b.agent_id, b.program_id, b.position)))
            self.inner.append(b, now)

        def remove(self, b):
            merged.append(("remove", None, (b.block_id,)))
            self.inner.remove(b)

        def pop(self, now):
            b = self.inner.pop(now)
            merged.append(("pop", now, (b.block_id, b.agent_id, b.position)))
            return b

    pfq = sched.kv_cache_manager.block_pool.free_block_queue
    assert type(pfq).__name__ == "PolicyFreeQueue"
    pfq._policy = Recording(pfq._policy)
    # five agents, two calls each; each tells how long until its next call (0.05 .. 0.45 s)
    gaps = {0: 0.45, 1: 0.05, 2: 0.3, 3: 0.15, 4: 0.25}
    arrivals = []
    for a, g in gaps.items():
        arrivals.append((0.02 * a, 2 * a, a, 80, 8, {"next_invocation_distance": g}))
        arrivals.append((0.02 * a + 0.12 + g, 2 * a + 1, a, 80, 8, None))
    emit = sched.bundle.emit
    sched.bundle.emit = lambda name, call, now: (merged.append(("hook", name, now, rec.snapshot(call))),
                                                 emit(name, call, now))
    rec.run(arrivals)
    live_pops = [m[2] for m in merged if m[0] == "pop"]
    assert len(live_pops) >= 5, "the script should make the engine evict"
    # replay: a fresh policy, its queue fed the same BlockView records and hook events
    bundle = make_bundle(policy)
    q = bundle.evict.new_free_queue(0)
    views: dict[int, BlockView] = {}
    sim_pops = []
    for m in merged:
        if m[0] == "hook":
            bundle.emit(m[1], sim_call(m[3]), m[2])
        elif m[0] == "append":
            bid, h, agent, pid, pos = m[2]
            v = views[bid] = BlockView(bid, block_hash=h, ref_count=0, last_used_at=m[1], program_id=pid,
                                       agent_id=agent, position=pos)
            q.append(v, m[1])
        elif m[0] == "remove":
            q.remove(views.pop(m[2][0]))
        else:
            b = q.pop(m[1])
            views.pop(b.block_id, None)
            sim_pops.append((b.block_id, b.agent_id, b.position))
    assert sim_pops == live_pops

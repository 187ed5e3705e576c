"""The one program driver (agentsim.programs): branches, thread ids, critical path, bad yields, and
every backend stepping programs through it -- the simulator, the live driver on a real vLLM CPU
engine in a local Ray cluster, the oracle's plan and the trace recorder agree program by program.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict
from pathlib import Path

import psutil
import pytest

from agentsim.config import load_config
from agentsim.policies.oracle import plan_body
from agentsim.programs import ProgramRun, ProgramYieldError, Strand, answer, drive, run_all_now, walk
from agentsim.sim.runner import Simulation
from agentsim.traces.generators import generators
from agentsim.traces.record import program_body, record_body
from agentsim.traces.source import ProgramSource
from agentsim.workload import (
    CallResult, Context, LLMCall, Parallel, Program, ProgramContext, Segment, ToolCall, stable_id,
)

ROOT = Path(__file__).resolve().parents[1]


class Answering:
    """An adapter that answers at once: a call takes ``num_output_tokens`` x 10 ms, logged per thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []   # (thread id, output tokens) in issue order
        self.tools: list[str] = []

    def llm_call(self, req, strand, thread_id):
        self.calls.append((thread_id, req.num_output_tokens))
        return answer(CallResult(len(self.calls), Segment(len(self.calls), req.num_output_tokens), 0.0, 0.0,
                                 req.num_output_tokens * 0.01, 0))

    def tool_call(self, req, strand):
        self.tools.append(req.name)
        return answer()

    def all_of(self, branches, strand):
        return answer(run_all_now(branches))


def _pc(pid: int = 7, kind: str = "test") -> ProgramContext:
    return ProgramContext(pid, pid, kind, None)


def _ctx(n: int = 16) -> Context:
    return Context.of(Segment(1, n))


def test_branches_thread_ids_and_critical_path():
    def worker(n_out: int, tool: float):
        r = yield LLMCall(_ctx(), n_out)          # thread 0: the strand's (inherited from the body)
        yield ToolCall("t", tool)
        return r.output.num_tokens

    def body(pc):
        yield LLMCall(_ctx(), 10)                              # 0.10 s
        out = yield Parallel([worker(20, 1.0),                 # 0.20 + 1.0
                              LLMCall(_ctx(), 50, thread_id=3),  # a bare request on its own thread: 0.50
                              ToolCall("slow", 2.5),             # a bare tool: 2.5 (the slowest branch)
                              Parallel([LLMCall(_ctx(), 5, thread_id=4)])])  # a nested Parallel
        yield LLMCall(_ctx(), 30, thread_id=2)                 # 0.30
        return out

    ops = Answering()
    run = ProgramRun(None, _pc())
    value = walk(body(_pc()), run, ops)
    # results come back in branch order, whatever the branch was
    assert value[0] == 20 and value[1].output.num_tokens == 50 and value[2] is None
    assert value[3][0].output.num_tokens == 5
    assert ops.calls == [(0, 10), (0, 20), (3, 50), (4, 5), (2, 30)]
    assert ops.tools == ["t", "slow"]
    assert run.num_calls == 5 and run.num_tool_calls == 2
    assert run.prompt_tokens == 5 * 16 and run.output_tokens == 115
    assert run.tool_time == 3.5
    assert run.llm_time == pytest.approx(1.15)
    assert run.critical_path == pytest.approx(0.10 + 2.5 + 0.30)


def test_a_calls_thread_id_wins_over_its_strands():
    def body(pc):
        yield Parallel([LLMCall(_ctx(), 1, thread_id=5)])
        yield LLMCall(_ctx(), 2)
        yield LLMCall(_ctx(), 3, thread_id=6)

    ops = Answering()
    walk(body(_pc()), ProgramRun(None, _pc()), ops)
    assert [t for t, _ in ops.calls] == [5, 0, 6]


@pytest.mark.parametrize("bad, what", [(42, "yielded 42"), (Parallel([LLMCall(_ctx(), 1), "x"]), "yielded a Parallel branch 'x'")])
def test_a_bad_yield_raises_one_error_in_every_backend(bad, what):
    def body(pc):
        yield LLMCall(_ctx(), 1)
        yield bad

    # the driver itself
    with pytest.raises(ProgramYieldError, match=rf"program 7 \(test\) {re.escape(what)}"):
        walk(body(_pc()), ProgramRun(None, _pc()), Answering())
    # the oracle's plan and the recorder (TypeError subclasses, as before)
    with pytest.raises(ProgramYieldError, match=re.escape(what)):
        plan_body(body(_pc()))
    with pytest.raises(TypeError, match=re.escape(what)):
        record_body(body, _pc())
    # the simulator
    cfg = load_config(None, {"cluster.gpus_per_node": 1, "duration": 10.0})
    prog = Program(0, 0, "bad", 0.0, body)
    with pytest.raises(ProgramYieldError, match=rf"program 0 \(bad\) {re.escape(what)}"):
        Simulation(cfg, programs=[prog]).run()


def test_drive_is_a_generator_the_backend_runs():
    """drive yields whatever the operations yield (here: a marker) and returns (critical path, value)."""
    class Waiting(Answering):
        def tool_call(self, req, strand):
            got = yield ("wait", req.duration)
            assert got == "resumed"

    def body(pc):
        yield ToolCall("a", 1.5)
        return "done"

    run = ProgramRun(None, _pc())
    gen = drive(body(_pc()), Strand(run), Waiting())
    assert next(gen) == ("wait", 1.5)
    with pytest.raises(StopIteration) as stop:
        gen.send("resumed")
    assert stop.value.value == (1.5, "done") and run.num_tool_calls == 1


def test_only_the_driver_steps_program_generators():
    """`grep` for generator stepping (.send( / .throw() in the package: only agentsim/programs.py.

    ZMQ sockets' ``send`` in the live driver is the one other ``.send(`` and is not a generator."""
    hits = []
    for d in ("agentsim", "sim", "live", "policies", "traces", "calibration", "experiments"):
        for f in sorted((ROOT / d).rglob("*.py")):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if re.search(r"\.(send|throw)\(", line) and "_sock.send(" not in line:
                    hits.append(f"{f.relative_to(ROOT)}:{i}")
    assert hits and {h.split(":")[0] for h in hits} == {"agentsim/programs.py"}, hits


# ---------------------------------------------------------------------------- sim = live = recorder = oracle
FAST = [{"name": "api", "dist": "constant", "median": 0.05}]
# every generator, scaled down for a tiny CPU model: 2 programs each, prompts under 256 tokens,
# outputs under 20 tokens, tools of 50 ms
SMALL = {
    "chat": {"calls_mean": 2.0, "max_calls": 3, "user_tokens_mean": 40.0, "output_tokens_mean": 8.0,
             "system_tokens": 64, "think_time_median": 0.05},
    "fanout": {"width": 3, "prompt_tokens": 96, "shared_tokens": 64, "plan_output_tokens": 8,
               "worker_prompt_tokens": 32, "worker_output_tokens": 8, "worker_calls": 2, "reduce_output_tokens": 8,
               "tools": FAST},
    "kvflow": {"num_agents": 3, "fixed_tokens": 64, "dynamic_tokens": 32, "output_tokens": 8, "cycles": 1},
    "lats": {"calls_mean": 4.0, "width": 2, "max_depth": 2, "max_iterations": 2, "prompt_tokens_mean": 64.0,
             "output_tokens_mean": 8.0, "observation_tokens_mean": 16.0, "value_instruction_tokens": 16, "tools": FAST},
    "mapreduce": {"num_chunks": 3, "chunk_tokens_mean": 64.0, "map_instruction_tokens": 16,
                  "map_output_tokens_mean": 8.0, "fan_in": 2, "reduce_instruction_tokens": 16,
                  "reduce_output_tokens_mean": 8.0},
    "react": {"calls_mean": 2.0, "max_calls": 3, "prompt_tokens_mean": 96.0, "output_tokens_mean": 8.0,
              "observation_tokens_mean": 16.0, "tools": FAST},
    "single": {"prompt_tokens_mean": 64.0, "output_tokens_mean": 8.0, "max_output_tokens": 16},
    "society": {"num_agents": 3, "num_steps": 2, "world_tokens": 64, "persona_tokens": 32,
                "observation_tokens_mean": 16.0, "output_tokens_mean": 8.0, "step_time": 0.05},
    "swe": {"calls_mean": 2.0, "max_calls": 3, "system_tokens": 64, "issue_tokens_mean": 64.0, "output_tokens_mean": 8.0,
            "observation_tokens_mean": 32.0, "max_observation_tokens": 64, "max_context_tokens": 1024, "tools": FAST},
    "team": {"nodes_min": 2, "nodes_max": 3, "system_tokens": 64, "task_tokens_mean": 32.0,
             "node_prompt_tokens_mean": 32.0, "node_output_tokens_mean": 8.0, "synth_output_tokens_mean": 8.0,
             "instruction_tokens": 16, "debate_agents": 2, "debate_rounds": 1},
}
BS = 32
NUM_PROGRAMS = 2
PROGRAM_FIELDS = ["program_id", "kind", "num_calls", "num_tool_calls", "num_prompt_tokens", "num_output_tokens",
                  "tool_time", "status"]


def test_every_generator_is_scaled_down_here():
    # the generators agentsim ships (other test modules register their own test-* generators in the session)
    shipped = {n for n, cls in generators().items() if cls.__module__.startswith("agentsim.")}
    assert len(shipped) >= 10 and set(SMALL) == shipped


def _cfg(generator: str, policy: object = "least-loaded"):
    return load_config(None, {
        "seed": 11, "duration": 60.0, "policy": policy, "sim.drain": True,
        "cluster.num_nodes": 1, "cluster.gpus_per_node": 1, "cluster.engine.block_size": BS,
        "workload.generator": generator, "workload.params": SMALL[generator],
        "workload.arrival": "poisson", "workload.rate": 4.0, "workload.num_programs": NUM_PROGRAMS,
    })


def _threads(calls) -> dict:
    """(program, thread) -> [(prompt tokens, output tokens), ...] in the order the thread issued them."""
    out = defaultdict(list)
    for r in calls.sort_values(["arrival_at", "call_id"], kind="stable").itertuples():
        out[(r.program_id, r.thread_id)].append((r.num_prompt_tokens, r.num_output_tokens))
    return dict(out)


def _programs(df) -> list[tuple]:
    return [tuple(r) for r in df[PROGRAM_FIELDS].sort_values("program_id").itertuples(index=False)]


def _offline(cfg) -> tuple[list[tuple], dict, list[tuple], dict]:
    """What the recorder and the oracle say about the run's programs: program rows, thread orders."""
    src = ProgramSource(cfg.workload, cfg.seed)
    rec_rows, rec_threads, plan_rows, plan_threads = [], defaultdict(list), [], defaultdict(list)
    for prog in src.poisson_arrivals(cfg.duration):
        pid = prog.program_id
        steps = record_body(program_body(prog), src.context_for(prog))
        llm = [s for s in steps if s.kind == "llm"]
        tools = [s for s in steps if s.kind == "tool"]
        rec_rows.append((pid, prog.kind, len(llm), len(tools), sum(s.input_tokens for s in llm),
                         sum(s.output_tokens for s in llm), sum(s.tool_time for s in tools)))
        for s in llm:
            rec_threads[(pid, s.thread_id)].append((s.input_tokens, s.output_tokens))
        fresh = ProgramSource(cfg.workload, cfg.seed)
        twin = next(p for p in fresh.poisson_arrivals(cfg.duration) if p.program_id == pid)
        plan = plan_body(program_body(twin)(fresh.context_for(twin)))
        plan_rows.append((pid, prog.kind, len(plan.calls), sum(c.num_prompt_tokens for c in plan.calls),
                          plan.num_output_tokens, plan.tool_time))
        for c in plan.calls:
            plan_threads[(pid, c.thread_id)].append((c.num_prompt_tokens, c.num_output_tokens))
    return rec_rows, dict(rec_threads), plan_rows, dict(plan_threads)


class InstantEngine:
    """A fake engine client (only to isolate the live driver): answers every call at once with
    ``max_tokens`` token ids; the node clock is the driver's own."""

    engine_id = 0
    node_id = 0
    info = {"vocab_size": 32000, "num_blocks": 4096, "max_model_len": 4096}

    async def generate(self, request_id, token_ids, max_tokens, priority, extra_args, run_epoch):
        await asyncio.sleep(0)
        t = time.monotonic()
        return {"token_ids": [7] * max_tokens, "scheduled_at": t, "first_token_at": t, "last_token_at": t,
                "num_cached_tokens": 0, "num_preemptions": 0}

    async def poll(self):
        return {"stats": {"t": time.monotonic(), "num_running": 0, "num_waiting": 0, "kv_usage": 0.0,
                          "prefill_tokens": 0, "decode_tokens": 0, "busy_time": 0.0}, "events": []}

    async def clock(self):
        return time.monotonic()

    async def reset_prefix_cache(self):
        return False


def _spy_plans(bundle) -> dict:
    """program id -> the plan the bundle's planner (``caps.planners``) was handed."""
    plans = {}
    (planner,) = bundle.caps.planners
    handed = planner.on_program_plan

    def on_program_plan(program_id, plan, now):
        plans[program_id] = plan
        handed(program_id, plan, now)

    planner.on_program_plan = on_program_plan   # the instance attribute is what prepare_program calls
    return plans


def _decomposer_calls(calls, programs) -> dict:
    """program id -> output tokens of its AdaptOrch decomposer call (its agent id says which)."""
    agent = dict(zip(programs["program_id"], programs["agent_id"]))
    return {int(r.program_id): int(r.num_output_tokens) for r in calls.itertuples()
            if r.agent_id == stable_id("agent", agent[r.program_id], "decomposer")}


def test_the_live_driver_prepares_programs_as_the_simulator_does():
    """Program preparation is the driver's (agentsim.programs.prepare_program), not the simulator's:
    the live driver hands the planner (sjf-oracle's ``on_program_plan``) the same plans and charges
    the shape policy's decomposer call (adaptorch's ``wrap_team_body``) as the simulator does."""
    from agentsim.live.driver import LiveDriver, LiveOptions
    from agentsim.policies.registry import make_bundle

    cfg = _cfg("team", {"name": "adaptorch", "order": "sjf-oracle"})
    sim_run = Simulation(cfg)
    sim_plans = _spy_plans(sim_run.bundle)
    sim = sim_run.run()
    bundle = make_bundle(cfg.policy)
    live_plans = _spy_plans(bundle)
    live = LiveDriver([InstantEngine()], bundle, block_size=BS, kv_events=False,
                      options=LiveOptions(duration=cfg.duration, flush_interval=0, sample_interval=5.0),
                      seed=cfg.seed, max_num_seqs=8).run(ProgramSource(cfg.workload, cfg.seed))
    assert sorted(sim_plans) == sorted(live_plans) == list(range(NUM_PROGRAMS))
    assert live_plans == sim_plans and all(p.calls for p in live_plans.values())
    assert (live.programs["status"] == "finished").all() and (live.calls["status"] == "finished").all()
    assert _programs(live.programs) == _programs(sim.programs)
    assert _threads(live.calls) == _threads(sim.calls)
    # one decomposer call per team program, 48 output tokens per task node, in both backends
    charged = _decomposer_calls(live.calls, live.programs)
    assert charged == _decomposer_calls(sim.calls, sim.programs)
    assert sorted(charged) == list(range(NUM_PROGRAMS)) and all(n % 48 == 0 and n > 0 for n in charged.values())


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """One vLLM CPU engine (the tiny random Llama) in a 1-node local Ray cluster, stopped by handle."""
    from agentsim.live.cluster import RayCluster
    from agentsim.live.engine import EngineSpec
    from agentsim.live.tiny_model import make_tiny_llama

    model = str(make_tiny_llama(tmp_path_factory.mktemp("model") / "tiny", max_position_embeddings=4096))
    cluster = RayCluster.local(1, object_store_mb=80)
    pids: list[int] = []
    try:
        spec = EngineSpec(engine_id=0, node_id=0, model=model, run_tag="pytest-programs", block_size=BS,
                          kv_cache_gib=0.25, max_model_len=2048, max_num_seqs=8)
        handles = cluster.start_engines([spec.to_dict()])
        pids = [p for h in handles for p in h.pids]
        yield handles[0]
    finally:
        cluster.shutdown()
    still = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not still, f"engine processes outlived the cluster: {still}"


@pytest.mark.slow
def test_sim_live_recorder_and_oracle_make_the_same_programs_on_every_generator(engine):
    from agentsim.live.driver import LiveDriver, LiveOptions, RayEngineClient
    from agentsim.policies.registry import make_bundle

    for generator in sorted(SMALL):
        cfg = _cfg(generator)
        sim = Simulation(cfg).run()
        live = LiveDriver([RayEngineClient(engine)], make_bundle(cfg.policy), block_size=BS,
                          options=LiveOptions(duration=cfg.duration, flush_interval=0, sample_interval=5.0),
                          seed=cfg.seed, max_num_seqs=8).run(ProgramSource(cfg.workload, cfg.seed))
        where = f"generator {generator}"
        assert len(sim.programs) == NUM_PROGRAMS and (sim.programs["status"] == "finished").all(), where
        # program structure, token counts and tool time: the same rows, exactly
        assert _programs(live.programs) == _programs(sim.programs), where
        assert (live.calls["status"] == "finished").all(), where
        # every thread issued the same calls in the same order
        assert _threads(live.calls) == _threads(sim.calls), where
        # the recorder and the oracle walk the same programs without a backend
        rec_rows, rec_threads, plan_rows, plan_threads = _offline(cfg)
        sim_rows = [r[:-1] for r in _programs(sim.programs)]
        assert rec_rows == sim_rows, where
        assert plan_rows == [(r[0], r[1], r[2], r[4], r[5], r[6]) for r in sim_rows], where
        assert rec_threads == _threads(sim.calls) == plan_threads, where


@pytest.mark.slow
def test_adaptorch_makes_the_same_programs_with_its_decomposer_call_in_sim_and_live(engine):
    """A shape policy's own LLM call (adaptorch's decomposer, ``wrap_team_body``) is charged in both
    backends, because both prepare a program through the one driver (``prepare_program``)."""
    from agentsim.live.driver import LiveDriver, LiveOptions, RayEngineClient
    from agentsim.policies.registry import make_bundle

    cfg = _cfg("team", "adaptorch")
    sim = Simulation(cfg).run()
    live = LiveDriver([RayEngineClient(engine)], make_bundle(cfg.policy), block_size=BS,
                      options=LiveOptions(duration=cfg.duration, flush_interval=0, sample_interval=5.0),
                      seed=cfg.seed, max_num_seqs=8).run(ProgramSource(cfg.workload, cfg.seed))
    assert (sim.programs["status"] == "finished").all() and (live.calls["status"] == "finished").all()
    assert _programs(live.programs) == _programs(sim.programs)
    assert _threads(live.calls) == _threads(sim.calls)
    charged = _decomposer_calls(live.calls, live.programs)
    assert sorted(charged) == list(range(NUM_PROGRAMS)) and charged == _decomposer_calls(sim.calls, sim.programs)
    # the decomposer call comes first in its program, then the team's calls
    agent = dict(zip(live.programs["program_id"], live.programs["agent_id"]))
    for pid, n_out in charged.items():
        first = live.calls[live.calls["program_id"] == pid].sort_values(["arrival_at", "call_id"]).iloc[0]
        assert first["agent_id"] == stable_id("agent", agent[pid], "decomposer") and first["num_output_tokens"] == n_out

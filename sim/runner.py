"""Run a configuration in the simulator: cluster of engines, router, programs, metrics.

Processes are named after their actors: ``agent`` (closed loop: one program after another),
``arrivals`` (Poisson or trace), ``program`` (steps one program's generator), and each engine's
own loop (:mod:`agentsim.sim.engine`). The route policy is consulted once per LLM call, with the
engines as read-only views; the bundle's hooks see program and call events. When the profile has
frontend costs, each engine gets vLLM's API server in front of it (:mod:`agentsim.sim.frontend`): a
call reaches the engine after its setup and tokenization, and its recorded first-token and finish
times are when the client sees them.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import pandas as pd
import simpy

from agentsim.calibration.profile import Profile, resolve_profile
from agentsim.config import RunConfig
from agentsim.errors import ConfigError
from agentsim.metrics import (
    CALL_COLUMNS, ENGINE_COLUMNS, PROGRAM_COLUMNS, CallStatus, ColumnStore, ProgramStatus, call_row,
    run_manifest, summarize,
)
from agentsim.programs import ProgramRun, Strand, drive, prepare_program, program_context
from agentsim.policies.registry import make_bundle
from agentsim.sim.engine import Engine, EngineList, SimCall
from agentsim.sim.kv import call_fits, num_call_blocks, num_reserved_blocks, v0_watermark_blocks
from agentsim.sim.frontend import Frontend, FrontendCall
from agentsim.traces.source import ProgramSource
from agentsim.workload import CallResult, LLMCall, Program, Segment, ToolCall

# Objects (KV blocks, calls) earlier runs in this process created since the last full collection,
# and how many may be left to the automatic collector before a run collects them first (see run()).
_objects_since_collection = 0
_RUN_GARBAGE_BUDGET = 200_000


@dataclass
class RunResult:
    config: RunConfig
    calls: pd.DataFrame
    programs: pd.DataFrame
    engines: pd.DataFrame
    summary: dict
    manifest: dict
    stats: dict = field(default_factory=dict)
    links: pd.DataFrame | None = None   # per-link utilisation series (agentsim.sim.network.LINK_COLUMNS)


class Simulation:
    """One simulated run; ``run()`` returns a :class:`RunResult`.

    It is the SimPy adapter of the program driver (:mod:`agentsim.programs`): ``llm_call``,
    ``tool_call`` and ``all_of`` yield SimPy events, and :func:`agentsim.programs.drive` steps each
    program's generator inside the program's SimPy process.
    """

    def __init__(self, cfg: RunConfig, profile: Profile | None = None,
                 on_step: Callable[[Engine], None] | None = None,
                 programs: list[Program] | None = None, max_concurrency: int | None = None) -> None:
        """``on_step(engine)`` runs after every applied step or window (tests check invariants).

        ``programs``: run exactly these programs at their ``arrival_at`` instead of the workload's
        arrivals (``agentsim validate`` replays a benchmark's requests this way); ``max_concurrency``:
        at most this many of them in flight, the others wait in arrival order, like the client
        semaphore of ``vllm bench serve --max-concurrency`` (``vllm/benchmarks/serve.py``).
        """
        if max_concurrency is not None and max_concurrency < 1:
            raise ConfigError("max_concurrency", f"must be >= 1, got {max_concurrency}")
        self.cfg = cfg
        cl = cfg.cluster
        self.profile = profile or resolve_profile(cl.profile, cl.gpu, cl.model, cl.tp)
        if self.profile.tp != cl.tp:
            raise ConfigError("cluster.tp", f"profile {self.profile.name} is for TP {self.profile.tp}, cluster asks TP {cl.tp}")
        lim = cl.engine
        self.num_blocks = lim.num_gpu_blocks_override or self.profile.kv_capacity_tokens // lim.block_size
        if self.num_blocks < 1:
            raise ConfigError("cluster.engine.block_size", "the KV cache holds no block of this size")
        self.max_model_len = lim.max_model_len or self.profile.model.max_model_len
        lim = self.limits = lim.resolved(self.max_model_len)  # the version's default token budget
        if self.num_blocks <= num_reserved_blocks(lim.scheduler):
            raise ConfigError("cluster.engine.num_gpu_blocks_override",
                              f"{self.num_blocks} KV block(s): vLLM V1 keeps one as its null block, none is left "
                              "for requests")
        if ((not lim.enable_chunked_prefill or lim.num_scheduler_steps > 1)
                and lim.max_num_batched_tokens < self.max_model_len):
            # as vLLM: without chunked prefill (or with V0 multi-step, which never chunks a prompt,
            # vllm/core/scheduler.py _get_prompt_limit) a prompt must fit one step's token budget
            raise ConfigError("cluster.engine.max_num_batched_tokens",
                              f"{lim.max_num_batched_tokens} is below max_model_len {self.max_model_len} "
                              + ("with chunked prefill disabled" if not lim.enable_chunked_prefill
                                 else "with multi-step scheduling (prompts are not chunked)"))
        self.bundle = make_bundle(cfg.policy)
        self.source = ProgramSource(cfg.workload, cfg.seed)
        self.env = simpy.Environment()
        self._programs = programs
        self._max_concurrency = max_concurrency
        # vLLM's API server per engine (agentsim.sim.frontend); None when the profile has no
        # frontend costs, so runs without them take exactly the old path
        self.frontends: list[Frontend] | None = None
        self._fe_calls: dict[int, FrontendCall] = {}
        self.calls = ColumnStore(CALL_COLUMNS)
        self.programs = ColumnStore(PROGRAM_COLUMNS)
        self.samples = ColumnStore(ENGINE_COLUMNS)
        self.engines = EngineList()
        eid = 0
        for node in range(cl.num_nodes):
            for _ in range(cl.num_engines_per_node):
                self.engines.append(Engine(
                    self.env, eid, node, self.profile, lim, self.bundle.order,
                    self.bundle.evict.new_free_queue(eid), self.num_blocks, on_finish=self._on_finish,
                    fast_forward=cfg.sim.fast_forward, sample_interval=cfg.sim.sample_interval,
                    max_ff_steps=cfg.sim.max_ff_steps, record_sample=self.samples.append, on_step=on_step,
                ))
                eid += 1
        if self.profile.frontend.enabled:
            self.frontends = [Frontend(self.env, self.profile.frontend, lim.api_server_count)
                              for _ in self.engines]
        self._next_call_id = 0
        self._active: dict[int, ProgramRun] = {}
        self._hooks = {name: self.bundle.hooks(name) for name in (
            "on_program_start", "on_program_end", "on_call_arrive", "on_call_finish", "on_tool_start", "on_tool_end")}
        self._route = self.bundle.route.route
        # the KV mechanisms the bundle's policies need (CPU tier, pins, prefetch, offload); None for
        # bundles that need none
        from agentsim.sim.tiers import attach_mechanisms

        self.mechanisms = attach_mechanisms(self)
        # KV movement between engines and router cost (agentsim.sim.disagg); None: the ordinary path
        from agentsim.sim.disagg import make_disagg

        self.disagg = make_disagg(self)

    # ------------------------------------------------------------------ processes
    def _agent(self, agent_id: int):
        """Closed loop: this agent runs one program after another until the run ends."""
        env = self.env
        until = self.cfg.duration
        while env.now < until and not self.source.exhausted():
            prog = self.source.make(agent_id, env.now)
            yield from self._program(prog)

    def _arrivals(self, programs, slots: simpy.Resource | None = None):
        env = self.env
        for prog in programs:
            if prog.arrival_at > env.now:
                yield env.timeout(prog.arrival_at - env.now)
            env.process(self._program(prog) if slots is None else self._limited(prog, slots))

    def _limited(self, prog: Program, slots: simpy.Resource):
        """A program that first waits for one of the client's ``slots`` (FIFO) and holds it to the end."""
        with slots.request() as req:
            yield req
            yield from self._program(prog)

    def _program(self, prog: Program):
        """One program's SimPy process: prepared (planners' plans, the body incl. a team wrapper) by
        :func:`agentsim.programs.prepare_program`, its body stepped by :func:`agentsim.programs.drive`."""
        env = self.env
        pc = program_context(prog, self.cfg.seed)
        run = ProgramRun(prog, pc, prepare_program(prog, pc, self.bundle, env.now))
        self._active[prog.program_id] = run
        start = env.now
        for fn in self._hooks["on_program_start"]:
            fn(prog.program_id, prog.agent_id, prog.kind, start)
        run.critical_path, _ = yield from drive(run.body, Strand(run), self)
        del self._active[prog.program_id]
        run.end_at = end = env.now
        for fn in self._hooks["on_program_end"]:
            fn(prog.program_id, end)
        run.status = ProgramStatus.FINISHED
        if self.disagg is not None:
            run.coordination_overhead = self.disagg.coordination.pop(prog.program_id, 0.0)
        self.programs.append(run.row())

    # ------------------------------------------------------------------ program operations (SimPy)
    def llm_call(self, req: LLMCall, strand: Strand, thread_id: int):
        """Route ``req`` to an engine (through its API server when the profile has one) and wait
        for it to finish; returns its :class:`CallResult` (times in simulated seconds)."""
        env = self.env
        call = self._make_call(req, strand.run.prog, thread_id)
        for fn in self._hooks["on_call_arrive"]:
            fn(call, env.now)
        if self.disagg is not None:
            # router cost, P/D pair or prefix fetch (agentsim.sim.disagg); returns the decode engine
            engine = yield from self.disagg.serve(call)
        else:
            engine = self.engines[self._route(call, self.engines, env.now)]
            if self.frontends is not None:
                # the engine's API server sets the request up and tokenizes it first
                fe = self.frontends[engine.engine_id]
                call.frontend = fe
                yield from fe.intake(call)
            engine.add_call(call)
            yield call.done
        call.done = None  # no call <-> event cycle for the collector to find
        return CallResult(call.call_id, Segment(call.output_seg_id, call.num_output_tokens),
                          call.arrival_at, call.first_token_at, call.finish_at, engine.engine_id)

    def tool_call(self, req: ToolCall, strand: Strand):
        """Wait ``req.duration`` simulated seconds, between the bundle's tool hooks."""
        env = self.env
        prog = strand.run.prog
        for fn in self._hooks["on_tool_start"]:
            fn(prog.program_id, prog.agent_id, req.name, req.estimate, env.now)
        if req.duration > 0:
            yield env.timeout(req.duration)
        for fn in self._hooks["on_tool_end"]:
            fn(prog.program_id, prog.agent_id, req.name, env.now)

    def all_of(self, branches: list, strand: Strand):
        """Each branch in its own SimPy process; their values in branch order once all are done."""
        env = self.env
        procs = [env.process(gen) for _, gen in branches]
        yield env.all_of(procs)
        return [p.value for p in procs]

    def _make_call(self, req: LLMCall, prog: Program, thread_id: int) -> SimCall:
        cid = self._next_call_id
        self._next_call_id += 1
        n_prompt = req.context.num_tokens
        total = n_prompt + req.num_output_tokens
        if total > self.max_model_len:
            raise ConfigError("cluster.engine.max_model_len",
                              f"program {prog.program_id} ({prog.kind}) makes a call of {n_prompt} prompt + "
                              f"{req.num_output_tokens} output tokens, longer than the model's context "
                              f"({self.max_model_len} tokens)")
        lim = self.limits
        if not call_fits(total, lim.block_size, self.num_blocks, lim.scheduler, lim.num_scheduler_steps,
                         lim.enable_chunked_prefill):
            # vLLM writes no KV for a call's last token; V1 keeps a null block, V0 a watermark free
            bs = lim.block_size
            need = num_call_blocks(total, bs, lim.num_scheduler_steps - 1)
            usable = self.num_blocks - (v0_watermark_blocks(self.num_blocks) if lim.scheduler == "v0" else 1)
            raise ConfigError("cluster.engine",
                              f"program {prog.program_id} ({prog.kind}) makes a call of {n_prompt} prompt + "
                              f"{req.num_output_tokens} output tokens, which needs {need} KV blocks of {bs} tokens; "
                              f"an engine can give one call {usable} of its {self.num_blocks} blocks")
        seg = req.output_seg_id
        if seg is None:
            seg = (prog.program_id << 20) | (0x80000 + cid % 0x7FFFF)
        cls = SimCall if self.frontends is None else FrontendCall
        call = cls(
            cid, prog.program_id, prog.agent_id if req.agent_id is None else req.agent_id,
            thread_id, prog.kind, self.env.now, prog.arrival_at, req.context,
            req.num_output_tokens, seg, req.hints, req.parent_call_ids, self.env.event(),
        )
        if self.frontends is not None:
            self._fe_calls[cid] = call
        return call

    def _on_finish(self, call: SimCall) -> None:
        if self.frontends is not None:
            # the engine is done; the client has the output once the API server has streamed it
            for fn in self._hooks["on_call_finish"]:
                fn(call, call.finish_at)
            call.frontend.finish(call, lambda: self._deliver(call))
            return
        self._record_call(call, CallStatus.FINISHED)
        for fn in self._hooks["on_call_finish"]:
            fn(call, call.finish_at)
        call.done.succeed()

    def _deliver(self, call: FrontendCall) -> None:
        """The client has the last token: record the call with the times the client saw."""
        del self._fe_calls[call.call_id]
        call.set_client_times()
        self._record_call(call, CallStatus.FINISHED)
        call.done.succeed()

    def _record_call(self, call: SimCall, status: CallStatus) -> None:
        e = call.engine
        self.calls.append(call_row(call, e.engine_id if e else -1, e.node_id if e else -1, status))

    # ------------------------------------------------------------------ run
    def run(self, progress: Callable[[float, float], None] | None = None) -> RunResult:
        cfg = self.cfg
        env = self.env
        wall0 = time.perf_counter()
        wl = cfg.workload
        if self._programs is not None:
            slots = None if self._max_concurrency is None else simpy.Resource(env, self._max_concurrency)
            env.process(self._arrivals(sorted(self._programs, key=lambda p: (p.arrival_at, p.program_id)), slots))
        elif wl.arrival == "closed":
            for a in range(wl.agents):
                env.process(self._agent(a))
        elif wl.arrival == "poisson":
            env.process(self._arrivals(self.source.poisson_arrivals(cfg.duration)))
        else:
            # a trace replays whole unless the user bounded it with an explicit duration (the
            # programs left out are counted: stats["num_programs_cut"])
            bound = cfg.duration if cfg.duration_given else None
            if bound is not None:
                self.source.bound_trace(bound)
            env.process(self._arrivals(self.source.trace_arrivals()))
        until = cfg.duration
        drain = cfg.sim.drain or (self._programs is None and wl.arrival == "trace" and not cfg.duration_given)
        # The run creates millions of long-lived objects (KV blocks, call records) and next to no
        # cyclic garbage: reference counting frees it (measured on every policy bundle: a few dozen
        # unreachable objects per run). The cyclic collector would only rescan the live objects --
        # a young-generation pass per chunk of sim time cost ~10 % of case b cut to 30 s, as much
        # again when the first collections after the run rescanned them -- so it stays off during
        # the run, as for a drained run, and afterwards the run's objects go straight to the oldest
        # generation (gc.freeze + gc.unfreeze moves them there at no cost), which only a full
        # collection scans. A full collection first frees what earlier runs in this process left
        # there (a sweep worker runs cell after cell), so that they are not kept during this one --
        # once they add up to more than _RUN_GARBAGE_BUDGET objects: a full collection costs
        # 0.05-0.3 s (all of the process's objects, vLLM and torch included when imported), more
        # than a small run (the test suite's) takes.
        global _objects_since_collection
        if _objects_since_collection > _RUN_GARBAGE_BUDGET:
            gc.collect()
            _objects_since_collection = 0
        gc_enabled = gc.isenabled()
        gc.disable()
        try:
            if drain:
                env.run()
                until = env.now  # drained: the run ends when the last program does
            else:
                chunks = 50
                for i in range(1, chunks + 1):
                    env.run(until=until * i / chunks)
                    if progress:
                        progress(env.now, until)
        finally:
            gc.freeze()
            gc.unfreeze()
            if gc_enabled:
                gc.enable()
            # what this run may leave for the next one to collect: its KV blocks and calls
            _objects_since_collection += self._next_call_id + sum(len(e.pool.blocks) for e in self.engines)
        for e in self.engines:
            e.finalize(until)
        # calls and programs still in flight when the run ends
        if self.frontends is not None:
            # with a frontend, every call not yet delivered to its client (in intake, in an
            # engine, or being streamed) is unfinished
            for c in self._fe_calls.values():
                self._record_call(c, CallStatus.UNFINISHED)
        else:
            for e in self.engines:
                for c in list(e.running) + [w if isinstance(w, SimCall) else w[-1] for w in e.waiting] + list(e.inbox):
                    # a disaggregated call still in its prefill leg is recorded as the call itself
                    self._record_call(getattr(c, "parent", c), CallStatus.UNFINISHED)
        for st in sorted(self._active.values(), key=lambda s: s.prog.program_id):
            st.status = ProgramStatus.UNFINISHED
            if self.disagg is not None:
                st.coordination_overhead = self.disagg.coordination.get(st.prog.program_id, 0.0)
            self.programs.append(st.row())
        wall = time.perf_counter() - wall0
        # sorted as they are converted, each column's storage freed once converted (a simulated hour
        # of case (b) holds 5.4 M call rows: the stored columns, copies and a sorted frame were 3x that)
        calls = self.calls.to_frame(sort_by="call_id", release=True)
        programs = self.programs.to_frame(sort_by="program_id", release=True)
        # engines emit samples when they apply steps (a fast-forward window emits at its end)
        engines = self.samples.to_frame(sort_by=["time", "engine_id"], release=True)
        summary = summarize(calls, programs, engines, until, cfg.slo_ttft, cfg.slo_tpot)
        links = None
        if self.disagg is not None:
            from agentsim.sim.network import LINK_COLUMNS

            store = ColumnStore(LINK_COLUMNS)
            for row in self.disagg.link_rows(cfg.sim.sample_interval, until):
                store.append(row)
            links = store.to_frame()
        stats = {
            "wall_time_s": wall,
            "num_steps": sum(e.num_steps for e in self.engines),
            "num_ff_windows": sum(e.num_ff_windows for e in self.engines),
            "num_llm_calls": self._next_call_id,
            "calls_per_wall_s": self._next_call_id / wall if wall > 0 else math.nan,
            "kv_blocks_per_engine": self.num_blocks,
            "num_engines": len(self.engines),
            "num_trace_programs": self.source.num_in_trace,
            "num_programs_cut": self.source.num_cut,
            **(self.disagg.stats() if self.disagg is not None else {}),
        }
        manifest = run_manifest(
            # as run: the version defaults the engine resolved (a V0 token budget) written out
            "sim", replace(cfg, cluster=replace(cfg.cluster, engine=self.limits)).to_dict(), cfg.seed, _versions(),
            policy=self.bundle.name,
            profile={"name": self.profile.name, "source": self.profile.source, "model": self.profile.model.name,
                     "gpu": self.profile.gpu.name, "provenance": self.profile.provenance},
            complete=True,
        )
        return RunResult(cfg, calls, programs, engines, summary, manifest, stats, links)


def run(cfg: RunConfig, progress: Callable[[float, float], None] | None = None) -> RunResult:
    """Simulate ``cfg`` and return its tables, summary and manifest."""
    return Simulation(cfg).run(progress)


def _versions() -> dict:
    """The simulator's packages for the manifest (agentsim and Python are added by run_manifest)."""
    import numpy
    import scipy

    return {"simpy": simpy.__version__, "numpy": numpy.__version__, "scipy": scipy.__version__,
            "pandas": pd.__version__}

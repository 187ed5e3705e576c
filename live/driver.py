"""The live driver: the simulator's program generators and policy objects, on real vLLM engines.

Each program runs in an asyncio task, its body stepped by the one program driver
(:func:`agentsim.programs.drive`, the same that steps it in the simulator); the driver is the
asyncio adapter that gives it three operations (``llm_call``, ``tool_call``, ``all_of``):

- ``LLMCall``: the prompt is the context's token ids (:class:`~agentsim.live.tokens.TokenMapper`),
  the route policy picks an engine from live :class:`~agentsim.live.views.LiveEngineView` s, the
  order policy's key becomes vLLM's ``priority``, hints travel in ``SamplingParams.extra_args``;
  the output is forced to the requested length (``max_tokens`` + ``ignore_eos``) and the tokens
  vLLM generated become the call's output segment, so the next prompt reuses exactly them.
- ``ToolCall``: the program really sleeps ``duration`` seconds (its ``tool_time`` counts
  ``duration``, as in the simulator).
- ``Parallel``: branches run as concurrent tasks; the program gets their results in order.

Engines are reached through an :class:`EngineClient` (a Ray actor here; an HTTP endpoint in
:mod:`agentsim.live.http`). An engine that dies mid-run is marked dead; its in-flight calls are
retried on the remaining engines (counted in ``num_retries``). Results follow
``agentsim.metrics`` exactly and are flushed atomically every ``flush_interval`` seconds with
``manifest.complete = false``; only the final write says ``complete = true``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from agentsim import metrics as M
from agentsim.policies.base import PolicyBundle
from agentsim.policies.ranking import PRIORITY_SCALE, priority_number  # noqa: F401  (PRIORITY_SCALE re-exported)
from agentsim.metrics import CallStatus, ProgramStatus
from agentsim.programs import ProgramRun, ProgramYieldError, Strand, drive, prepare_program, program_context
from agentsim.workload import CallResult, LLMCall, Program, Segment, ToolCall


class EngineDead(Exception):
    """The engine serving a call is gone (actor died, endpoint unreachable)."""


class EngineClient:
    """How the driver talks to one engine. Replies use the node's monotonic clock."""

    engine_id: int
    node_id: int
    info: dict

    async def generate(self, request_id: str, token_ids: list[int], max_tokens: int, priority: int,
                       extra_args: dict, run_epoch: float | None) -> dict:
        raise NotImplementedError

    async def poll(self) -> dict:
        raise NotImplementedError

    async def clock(self) -> float:
        raise NotImplementedError

    async def reset_prefix_cache(self) -> bool:
        """Empty the engine's prefix cache (so the driver's KV view starts exact); False if it could not."""
        return False


class RayEngineClient(EngineClient):
    """An :class:`~agentsim.live.engine.EngineHost` actor; actor death becomes :class:`EngineDead`.

    ``generate`` and ``poll`` go over the engine's ZMQ data plane when it has one
    (``info["data_plane"]``): a Ray actor call costs ~1 ms idle and ~3 ms next to a busy engine on
    a small machine, and handling it in the engine's process slows the engine. Clock and control
    use Ray. A poll the data plane does not answer within 1 s is retried over Ray, which notices
    an actor's death; the driver then fails the calls still waiting with :class:`EngineDead`.
    """

    def __init__(self, handle: Any, use_data_plane: bool = True) -> None:
        import ray.exceptions as rex

        self.handle = handle
        self.engine_id = handle.engine_id
        self.node_id = handle.node_id
        self.info = handle.info
        self._dead = (rex.RayActorError, rex.ActorUnavailableError)
        self._endpoint = handle.info.get("data_plane") if use_data_plane else None
        self._sock: Any = None
        self._waiting: dict[str, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._gone: str | None = None
        self._loop: Any = None
        self._npoll = 0

    def _open(self) -> None:
        import msgspec
        import zmq
        import zmq.asyncio

        self._sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self._endpoint)
        self._enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()

        async def read() -> None:
            while True:
                (payload,) = await self._sock.recv_multipart()
                rid, reply, err = dec.decode(payload)
                fut = self._waiting.pop(rid, None)
                if fut is None or fut.done():
                    continue
                if err is not None:
                    fut.set_exception(RuntimeError(f"engine {self.engine_id}: {err}"))
                else:
                    fut.set_result(reply)

        self._loop = asyncio.get_running_loop()
        self._reader = self._loop.create_task(read())

    def fail_pending(self, why: str) -> None:
        """The engine is gone: fail every call still waiting on the data plane."""
        self._gone = why
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(EngineDead(why))

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.cancel()
        self._waiting = {}
        self._loop = None

    async def _call(self, ref: Any) -> Any:
        try:
            return await ref
        except self._dead as e:
            raise EngineDead(f"engine {self.engine_id}: {type(e).__name__}") from None

    async def generate(self, request_id, token_ids, max_tokens, priority, extra_args, run_epoch):
        if self._gone is not None:
            raise EngineDead(self._gone)
        if self._endpoint:
            if self._sock is None or self._loop is not asyncio.get_running_loop():
                self.close()  # a socket and its reader belong to one event loop (one driver run)
                self._open()
            fut = asyncio.get_running_loop().create_future()
            self._waiting[request_id] = fut
            await self._sock.send(self._enc.encode([request_id, token_ids, max_tokens, priority, extra_args,
                                                    run_epoch]))
            return await fut
        try:
            ref = self.handle.actor.generate.remote(request_id, token_ids, max_tokens, priority, extra_args, run_epoch)
        except self._dead as e:
            raise EngineDead(f"engine {self.engine_id}: {type(e).__name__}") from None
        return await self._call(ref)

    async def poll(self) -> dict:
        """Stats + KV events: over the data plane; over Ray if that does not answer within 1 s
        (which raises :class:`EngineDead` when the actor is gone)."""
        if self._gone is not None:
            raise EngineDead(self._gone)
        if self._endpoint:
            if self._sock is None or self._loop is not asyncio.get_running_loop():
                self.close()
                self._open()
            self._npoll += 1
            rid = f"poll-{self._npoll}"
            fut = asyncio.get_running_loop().create_future()
            self._waiting[rid] = fut
            await self._sock.send(self._enc.encode([rid, "poll"]))
            try:
                return await asyncio.wait_for(fut, timeout=1.0)
            except asyncio.TimeoutError:
                self._waiting.pop(rid, None)
        return await self._call(self.handle.actor.poll.remote())

    async def clock(self) -> float:
        return await self._call(self.handle.actor.clock.remote())

    async def reset_prefix_cache(self) -> bool:
        return bool(await self._call(self.handle.actor.reset_prefix_cache.remote()))


@dataclass
class LiveOptions:
    """Driver knobs (all times in seconds of wall clock)."""

    duration: float = 60.0               # programs start during this long (as the config's `duration`)
    drain: bool = True                   # then let running programs finish (sim.drain = true) ...
    drain_timeout: float | None = None   # ... for at most this long (default: duration);
    #                                      without drain the run ends at `duration` (sim.drain = false)
    sample_interval: float = 1.0         # engine time-series period
    poll_interval: float = 0.25          # KV-event / stats refresh between replies
    flush_interval: float = 5.0          # partial results written this often (0 = only at the end)
    max_retries: int = 3                 # per call, after engine deaths
    token_low: int = 4                   # prompt token ids are drawn from [token_low, token_high)
    token_high: int | None = None        # default: min(vocab size, 32000)
    kill_engines: tuple = ()             # fault injection: ((engine_id, at_time), ...)
    reset_prefix_cache: bool = True      # start from empty prefix caches (where the engine allows it)
    slo_ttft: float | None = None
    slo_tpot: float | None = None


@dataclass
class LiveResult:
    out_dir: Path | None
    calls: Any
    programs: Any
    engines: Any
    summary: dict
    manifest: dict
    views: list = field(default_factory=list)


class _Awaiting:
    """Awaits a program-driver generator (:func:`agentsim.programs.drive`) in asyncio: its
    operations yield the futures of the coroutines they delegate to, so the task runs it."""

    __slots__ = ("gen",)

    def __init__(self, gen: Any) -> None:
        self.gen = gen

    def __await__(self) -> Any:
        return self.gen


_STATUS = [c for c, _ in M.PROGRAM_COLUMNS].index("status")


class ProgramFailed(Exception):
    """A program cannot go on (its call failed or does not fit); the program is recorded as failed."""


def priority_for(order: Any, call: Any, now: float) -> int:
    """The order policy's key as vLLM's integer ``priority`` (lower runs first; ties by arrival):
    :func:`agentsim.policies.ranking.priority_number`, the shared ranking rule's integer form."""
    return priority_number(order, call, now)


def call_extra_args(call: Any, now: float, order_key: float | None) -> dict:
    """Per-request hints for the in-engine scheduler (msgpack-friendly primitives only)."""
    h = call.hints
    return {"agentsim": {
        "call_id": call.call_id, "program_id": call.program_id, "agent_id": call.agent_id,
        "thread_id": call.thread_id, "kind": call.program_kind, "arrival_at": call.arrival_at,
        "program_arrival_at": call.program_arrival_at, "num_output_tokens": call.num_output_tokens,
        "parent_call_ids": list(call.parent_call_ids), "order_key": order_key,
        "hints": {k: v for k, v in (asdict(h) if h is not None else {}).items() if v is not None},
    }}


class LiveDriver:
    """Runs programs against engine clients with one policy bundle; records the shared metrics.

    ``programs``: an iterable of :class:`Program` (open loop, started at ``arrival_at``) or a
    :class:`agentsim.traces.source.ProgramSource` (closed loop / Poisson / trace per its spec).
    """

    def __init__(self, engines: Sequence[EngineClient], bundle: PolicyBundle, *, block_size: int,
                 options: LiveOptions | None = None, out_dir: str | Path | None = None, seed: int = 0,
                 manifest: dict | None = None, on_kill: Callable[[int], None] | None = None,
                 kv_events: bool = True, max_num_seqs: int = 256,
                 progress: Callable[[str], None] | None = None, progress_interval: float = 10.0) -> None:
        if not engines:
            raise ValueError("the live driver needs at least one engine")
        self.clients = list(engines)
        self.bundle = bundle
        self.opt = options or LiveOptions()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.seed = seed
        self.base_manifest = dict(manifest or {})
        self.on_kill = on_kill
        self.progress = progress
        self.progress_interval = progress_interval
        self.block_size = block_size
        vocab = min(int(c.info.get("vocab_size", 32000)) for c in self.clients)
        hi = self.opt.token_high if self.opt.token_high is not None else min(vocab, 32000)
        from agentsim.live.tokens import TokenMapper

        self.tokens = TokenMapper(self.opt.token_low, hi)
        self.hasher = None
        if kv_events:
            from agentsim.live.tokens import VllmBlockHasher

            algo = self.clients[0].info.get("hash_algo", "sha256")
            self.hasher = VllmBlockHasher(block_size, algo, bool(self.clients[0].info.get("int_block_hashes")))
            probe = self.hasher.probe()
            bad = [c.engine_id for c in self.clients if c.info.get("hash_probe") not in (None, probe)]
            if bad:
                raise RuntimeError(f"engines {bad} hash KV blocks differently from the driver "
                                   "(PYTHONHASHSEED or prefix_caching_hash_algo differ); KV-aware routing would be wrong")
        # a view counts the blocks requests can use: vLLM's num_gpu_blocks minus its null block, the
        # denominator of the kv_usage it reports (vllm/v1/core/block_pool.py get_usage)
        self.views = [LiveEngineView(c.engine_id, c.node_id, block_size,
                                     max(0, int(c.info.get("num_blocks", 0)) - 1), max_num_seqs, self.hasher)
                      for c in self.clients]
        self.max_model_len = min(int(c.info.get("max_model_len", 1 << 30)) for c in self.clients)
        self.calls = M.ColumnStore(M.CALL_COLUMNS)
        self.engine_rows = M.ColumnStore(M.ENGINE_COLUMNS)
        self.programs: dict[int, ProgramRun] = {}
        self.finished_programs: list[tuple] = []
        self.inflight_calls: dict[int, LiveCall] = {}
        self.errors: list[str] = []
        self.engine_failures: list[dict] = []
        self.engine_kills: list[dict] = []
        self.cache_reset: list[int] = []
        self.num_retries = 0
        self._offsets: dict[int, float] = {}
        self._t0 = 0.0
        self._next_call = 0
        self._prev_stats: dict[int, dict] = {}
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self._complete = False
        self._ended_at: float | None = None
        self._write_lock = threading.Lock()
        self._flush_job: asyncio.Future | None = None
        self._final_written = False

    # ------------------------------------------------------------------ clock
    def now(self) -> float:
        return time.monotonic() - self._t0

    def _to_run(self, engine_id: int, node_t: float) -> float:
        if not node_t:
            return float("nan")
        return node_t - self._offsets[engine_id] - self._t0

    async def _measure_offsets(self) -> None:
        """Per engine: node monotonic - driver monotonic, from the lowest-RTT of a few pings."""
        for c in self.clients:
            best = None
            for _ in range(5):
                a = time.monotonic()
                t = await c.clock()
                b = time.monotonic()
                if best is None or b - a < best[0]:
                    best = (b - a, t - (a + b) / 2)
            self._offsets[c.engine_id] = best[1]

    # ------------------------------------------------------------------ run
    def run(self, programs: Any) -> LiveResult:
        return asyncio.run(self.arun(programs))

    async def arun(self, programs: Any) -> LiveResult:
        await self._measure_offsets()
        if self.opt.reset_prefix_cache:
            # a warm cache from an earlier run would be invisible to this run's KV view (hits emit no events)
            done = await asyncio.gather(*(c.reset_prefix_cache() for c in self.clients))
            self.cache_reset = [c.engine_id for c, ok in zip(self.clients, done) if ok]
            for c, v in zip(self.clients, self.views):
                v.apply_events((await c.poll())["events"])  # events are ordered: a later "cleared" still applies
                if c.engine_id in self.cache_reset:
                    v.cached.clear()
        self._t0 = time.monotonic()
        bg = [asyncio.create_task(self._sampler()), asyncio.create_task(self._poller())]
        if self.opt.flush_interval > 0 and self.out_dir is not None:
            bg.append(asyncio.create_task(self._flusher()))
        if self.progress is not None and self.progress_interval > 0:
            bg.append(asyncio.create_task(self._reporter()))
        for eid, at in self.opt.kill_engines:
            bg.append(asyncio.create_task(self._kill_later(int(eid), float(at))))
        status = "finished"
        try:
            await self._start_programs(programs)
            pending = [t for t in self._tasks if not t.done()]
            if self.opt.drain:
                if pending:
                    limit = self.opt.drain_timeout if self.opt.drain_timeout is not None else self.opt.duration
                    await asyncio.wait(pending, timeout=max(0.0, limit))
            elif self.now() < self.opt.duration:
                # no drain: the run ends at `duration`, as a simulation does (sim.drain = false);
                # programs still running then are cut and recorded as unfinished
                await asyncio.sleep(self.opt.duration - self.now())
            self._stopping = True
            for t in list(self._tasks):
                if not t.done():
                    t.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
        except (asyncio.CancelledError, KeyboardInterrupt):
            status = "interrupted"
            raise
        finally:
            self._stopping = True
            for t in bg:
                t.cancel()
            for t in list(self._tasks):
                if not t.done():
                    t.cancel()
            try:  # let cancelled programs record themselves as unfinished before the final write
                await asyncio.gather(*bg, *self._tasks, return_exceptions=True)
            except asyncio.CancelledError:
                status = "interrupted"
            if self._flush_job is not None and not self._flush_job.done():
                # a partial flush still writing in its thread must land before the final write
                await asyncio.wait([self._flush_job])
            self._ended_at = self.now()
            for c in self.clients:
                if hasattr(c, "close"):
                    c.close()
            self._complete = status == "finished"
            result = self._write(final=True, status=status)
        return result

    async def _start_programs(self, programs: Any) -> None:
        from agentsim.traces.source import ProgramSource

        if isinstance(programs, ProgramSource):
            spec = programs.spec
            if spec.arrival == "closed":
                agents = [asyncio.create_task(self._agent_loop(programs, a)) for a in range(spec.agents)]
                self._tasks.update(agents)
                # agents stop starting programs at `duration`; draining their last program is arun's job
                await asyncio.wait(agents, timeout=max(0.0, self.opt.duration - self.now()))
                return
            it = programs.poisson_arrivals(self.opt.duration) if spec.arrival == "poisson" \
                else programs.trace_arrivals(self.opt.duration)
            await self._open_loop(it, programs)
        else:
            await self._open_loop(iter(programs), None)

    async def _agent_loop(self, source: Any, agent_id: int) -> None:
        while not self._stopping and self.now() < self.opt.duration and not source.exhausted():
            prog = source.make(agent_id, self.now())
            await self._run_program(prog, source)

    async def _open_loop(self, it: Iterable[Program], source: Any) -> None:
        for prog in it:
            if prog.arrival_at >= self.opt.duration:
                break
            delay = prog.arrival_at - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.create_task(self._run_program(prog, source))
            self._tasks.add(t)

    # ------------------------------------------------------------------ programs
    async def _run_program(self, prog: Program, source: Any) -> None:
        """One program's task: prepared as in the simulator (:func:`agentsim.programs.prepare_program`:
        the planners' plans, the body incl. a shape policy's own calls), then ``on_program_start``
        and the body stepped by :func:`agentsim.programs.drive`. A program whose preparation raises
        is recorded as failed, without start or end events."""
        pc = program_context(prog, self.seed)
        st = ProgramRun(prog, pc)
        self.programs[prog.program_id] = st
        started = False
        try:
            now = self.now()
            st.body = prepare_program(prog, pc, self.bundle, now)
            self.bundle.emit("on_program_start", prog.program_id, prog.agent_id, prog.kind, now)
            started = True
            st.critical_path, _ = await _Awaiting(drive(st.body, Strand(st), self))
            st.status = ProgramStatus.FINISHED
        except asyncio.CancelledError:
            st.status = ProgramStatus.UNFINISHED
            raise
        except (ProgramFailed, ProgramYieldError) as e:
            st.status = ProgramStatus.FAILED
            st.error = str(e)
        except Exception as e:  # noqa: BLE001 - a program bug fails that program, not the run
            st.status = ProgramStatus.FAILED
            st.error = f"{type(e).__name__}: {e}"
            self.errors.append(f"program {prog.program_id}: {traceback.format_exc(limit=3)}")
        finally:
            if st.status != ProgramStatus.UNFINISHED:
                st.end_at = self.now()
            if st.error and len(self.errors) < 50:
                self.errors.append(f"program {prog.program_id}: {st.error}")
            self.tokens.drop_program(prog.program_id)
            if st.status != ProgramStatus.UNFINISHED:
                self.finished_programs.append(st.row())
                del self.programs[prog.program_id]
                if started:
                    self.bundle.emit("on_program_end", prog.program_id, self.now())

    # ------------------------------------------------------------------ program operations (asyncio)
    def llm_call(self, req: LLMCall, strand: Strand, thread_id: int) -> Any:
        """Run ``req`` on an engine (:meth:`_llm`); for the program driver to ``yield from``."""
        return self._llm(req, strand.run, thread_id).__await__()

    def tool_call(self, req: ToolCall, strand: Strand) -> Any:
        """Sleep ``req.duration`` seconds between the bundle's tool hooks."""
        return self._tool(req, strand.run).__await__()

    def all_of(self, branches: list, strand: Strand) -> Any:
        """The branches as concurrent tasks (``asyncio.gather``); their values in branch order."""
        return asyncio.gather(*(_Awaiting(gen) for _, gen in branches)).__await__()

    async def _tool(self, req: ToolCall, st: ProgramRun) -> None:
        p = st.prog
        self.bundle.emit("on_tool_start", p.program_id, p.agent_id, req.name, req.estimate, self.now())
        await asyncio.sleep(req.duration)
        self.bundle.emit("on_tool_end", p.program_id, p.agent_id, req.name, self.now())

    # ------------------------------------------------------------------ calls
    async def _llm(self, req: LLMCall, st: ProgramRun, thread_id: int) -> CallResult:
        p = st.prog
        now = self.now()
        if req.output_seg_id is not None:
            call_id = req.output_seg_id
        else:
            self._next_call += 1
            call_id = (1 << 61) | self._next_call
        call = LiveCall(call_id, p.program_id, req.agent_id if req.agent_id is not None else p.agent_id,
                        thread_id, p.kind, now, p.arrival_at, req.context, req.num_output_tokens,
                        req.hints, tuple(req.parent_call_ids), req.output_seg_id)
        if call.num_prompt_tokens + call.num_output_tokens > self.max_model_len:
            call.status = CallStatus.FAILED
            self.calls.append(call.row())
            raise ProgramFailed(f"call {call_id}: prompt {call.num_prompt_tokens} + output {call.num_output_tokens} "
                                f"tokens exceed the engines' max_model_len {self.max_model_len}")
        token_ids = self.tokens.prompt(req.context)
        if self.hasher is not None:
            call.vllm_hashes = self.hasher.map_context(req.context.block_hashes(self.block_size), token_ids)
        self.bundle.emit("on_call_arrive", call, now)
        self.inflight_calls[call_id] = call
        try:
            reply, view = await self._dispatch(call, token_ids)
        except BaseException:
            self.inflight_calls.pop(call_id, None)
            if call.status == CallStatus.RUNNING:
                call.status = CallStatus.UNFINISHED if self._stopping else CallStatus.FAILED
            self.calls.append(call.row())
            raise
        self.inflight_calls.pop(call_id, None)
        eid = view.engine_id
        call.finish_at = self.now()
        call.scheduled_at = self._to_run(eid, reply["scheduled_at"])
        call.first_token_at = self._to_run(eid, reply["first_token_at"])
        if not call.first_token_at == call.first_token_at:  # engine stats missing: fall back to receipt
            call.first_token_at = call.finish_at
        last = self._to_run(eid, reply["last_token_at"])
        call.service_time = (last - call.scheduled_at) if last == last and call.scheduled_at == call.scheduled_at else 0.0
        call.wait_time = call.scheduled_at - call.arrival_at if call.scheduled_at == call.scheduled_at else 0.0
        out_ids = reply["token_ids"]
        call.num_generated = len(out_ids)
        call.num_cached_tokens = int(reply["num_cached_tokens"])
        call.num_preemptions = int(reply["num_preemptions"])
        call.kv_transfer_bytes = int(reply.get("kv_transfer_bytes", 0))  # P/D replies (agentsim.live.pd)
        call.kv_transfer_time = float(reply.get("kv_transfer_time", 0.0))
        call.status = CallStatus.FINISHED
        if req.output_seg_id is not None:
            self.tokens.register_output(p.program_id, req.output_seg_id, out_ids)
        self.calls.append(call.row())
        self.bundle.emit("on_call_finish", call, self.now())
        seg = Segment(req.output_seg_id if req.output_seg_id is not None else call_id, call.num_generated)
        return CallResult(call_id, seg, call.arrival_at, call.first_token_at, call.finish_at, eid)

    async def _dispatch(self, call: LiveCall, token_ids: list[int]) -> tuple[dict, LiveEngineView]:
        """Route, submit, and on engine death retry on another engine (``max_retries`` times)."""
        while True:
            alive = [v for v in self.views if v.alive]
            if not alive:
                call.status = CallStatus.FAILED
                raise ProgramFailed(f"call {call.call_id}: no engine alive")
            now = self.now()
            idx = self.bundle.route.route(call, alive, now)
            if not isinstance(idx, (int, np.integer)) or not 0 <= idx < len(alive):
                raise ProgramFailed(f"route policy returned {idx!r} for {len(alive)} engines")
            view = alive[int(idx)]
            client = self.clients[self.views.index(view)]
            call.engine_id = view.engine_id
            call.node_id = view.node_id
            okey = None
            try:
                k = self.bundle.order.key(call, now)
                okey = float(k[0] if isinstance(k, tuple) else k)
            except (TypeError, ValueError, IndexError):
                okey = None
            call.priority = priority_for(self.bundle.order, call, now)
            call.submitted_at = now
            view.add(call)
            try:
                reply = await client.generate(f"c{call.call_id:x}-{call.num_retries}", token_ids, call.num_output_tokens,
                                              call.priority, call_extra_args(call, now, okey),
                                              self._t0 + self._offsets[view.engine_id])
            except EngineDead as e:
                view.remove(call)
                self._mark_dead(view, str(e))
                if call.num_retries >= self.opt.max_retries:
                    call.status = CallStatus.FAILED
                    raise ProgramFailed(f"call {call.call_id}: gave up after {call.num_retries} retries ({e})") from None
                call.num_retries += 1
                self.num_retries += 1
                continue
            except BaseException:
                view.remove(call)
                raise
            view.remove(call)
            view.reported = reply.get("stats", view.reported)
            view.apply_events(reply.get("events", ()))
            return reply, view

    def _mark_dead(self, view: LiveEngineView, why: str) -> None:
        if view.alive:
            view.alive = False
            view.cached.clear()
            client = self.clients[self.views.index(view)]
            if hasattr(client, "fail_pending"):
                client.fail_pending(why)
            self.engine_failures.append({"engine_id": view.engine_id, "node_id": view.node_id, "at": self.now(),
                                         "error": why})

    async def _kill_later(self, engine_id: int, at: float) -> None:
        """Fault injection: kill engine ``engine_id`` at ``at`` s, once it has calls in flight
        (waiting up to 30 s more for some), so that the retry path is really exercised."""
        await asyncio.sleep(max(0.0, at - self.now()))
        if self.on_kill is None:
            return
        view = next((v for v in self.views if v.engine_id == engine_id), None)
        if view is None:
            self.errors.append(f"kill: no engine {engine_id}")
            return
        end = self.now() + 30.0
        while not view.outstanding and self.now() < end and not self._stopping:
            await asyncio.sleep(0.01)
        self.engine_kills.append({"engine_id": engine_id, "at": self.now(), "inflight": len(view.outstanding)})
        await asyncio.get_running_loop().run_in_executor(None, self.on_kill, engine_id)

    # ------------------------------------------------------------------ background
    async def _poller(self) -> None:
        """Refresh KV events and stats of idle engines between replies."""
        while True:
            await asyncio.sleep(self.opt.poll_interval)
            await self._poll_all(record=False)

    async def _sampler(self) -> None:
        while True:
            await self._poll_all(record=True)
            await asyncio.sleep(self.opt.sample_interval)

    async def _poll_all(self, record: bool) -> None:
        live = [(c, v) for c, v in zip(self.clients, self.views) if v.alive]
        outs = await asyncio.gather(*(c.poll() for c, _ in live), return_exceptions=True)
        now = self.now()
        for (c, v), out in zip(live, outs):
            if isinstance(out, EngineDead):
                self._mark_dead(v, str(out))
                continue
            if isinstance(out, BaseException):
                continue
            v.reported = out["stats"]
            v.apply_events(out["events"])
            if record:
                self._record_engine(v, out["stats"], now)

    def _record_engine(self, v: LiveEngineView, s: dict, now: float) -> None:
        prev = self._prev_stats.get(v.engine_id)
        self._prev_stats[v.engine_id] = s
        if prev is None:
            d_pre = d_dec = 0
            busy = 0.0
        else:
            d_pre = s["prefill_tokens"] - prev["prefill_tokens"]
            d_dec = s["decode_tokens"] - prev["decode_tokens"]
            dt = s["t"] - prev["t"]
            busy = min(1.0, max(0.0, (s["busy_time"] - prev["busy_time"]) / dt)) if dt > 0 else 0.0
        gpu = s.get("gpu_util")
        self.engine_rows.append((v.engine_id, v.node_id, now, int(s["num_running"]), int(s["num_waiting"]),
                                 float(s["kv_usage"]), int(d_pre), int(d_dec), busy,
                                 float(gpu) if gpu is not None else float("nan")))

    async def _reporter(self) -> None:
        """Every ``progress_interval`` s: run time, programs finished / running, calls, failures."""
        while True:
            await asyncio.sleep(self.progress_interval)
            phase = "starting programs" if self.now() < self.opt.duration else "draining"
            failed = sum(1 for r in self.finished_programs if r[_STATUS] == ProgramStatus.FAILED)
            self.progress(f"{self.now():.0f} s ({phase}): {len(self.finished_programs)} program(s) done"
                          f"{f' ({failed} failed)' if failed else ''}, {len(self.programs)} running, "
                          f"{len(self.calls)} call(s) done, {len(self.inflight_calls)} in flight")

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.opt.flush_interval)
            try:
                # tables are copied on the loop thread (appends happen there); parquet is written off it
                job = self._prepare(final=False, status="running")
                self._flush_job = asyncio.get_running_loop().run_in_executor(None, self._store, job)
                await asyncio.shield(self._flush_job)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a failed partial flush must not stop the run
                self.errors.append(f"flush: {e}")

    # ------------------------------------------------------------------ results
    def _frames(self):
        calls = self.calls.to_frame()
        inflight = [c.row() for c in list(self.inflight_calls.values())]
        if inflight:
            import pandas as pd

            calls = pd.concat([calls, _frame(M.CALL_COLUMNS, inflight)], ignore_index=True)
        rows = list(self.finished_programs) + [st.row() for st in list(self.programs.values())]
        programs = _frame(M.PROGRAM_COLUMNS, rows)
        engines = self.engine_rows.to_frame()
        calls = calls.sort_values("call_id", kind="stable").reset_index(drop=True)
        programs = programs.sort_values("program_id", kind="stable").reset_index(drop=True)
        engines = engines.sort_values(["time", "engine_id"], kind="stable").reset_index(drop=True)
        return calls, programs, engines

    def _write(self, final: bool, status: str) -> LiveResult:
        return self._store(self._prepare(final, status))

    def _store(self, res: LiveResult) -> LiveResult:
        if self.out_dir is not None:
            with self._write_lock:  # a partial flush may still be running in its thread
                if self._final_written and not res.manifest.get("final"):
                    return res  # never replace the final result with an older snapshot
                self._final_written = self._final_written or bool(res.manifest.get("final"))
                res.out_dir = M.write_results(self.out_dir, res.calls, res.programs, res.engines, res.summary, res.manifest)
        return res

    def _prepare(self, final: bool, status: str) -> LiveResult:
        calls, programs, engines = self._frames()
        # the measured makespan, as agentsim.metrics.summarize defines it for every backend: time 0
        # to the end of the run (never padded to the configured duration)
        duration = self._ended_at if final and self._ended_at is not None else self.now()
        summary = M.summarize(calls, programs, engines, max(duration, 0.0), self.opt.slo_ttft, self.opt.slo_tpot)
        summary["num_retries"] = float(self.num_retries)
        summary["num_engine_failures"] = float(len(self.engine_failures))
        summary["num_programs_failed"] = float((programs["status"] == ProgramStatus.FAILED).sum())
        unfinished = programs["status"].isin([ProgramStatus.UNFINISHED, ProgramStatus.RUNNING])
        summary["num_programs_unfinished"] = float(unfinished.sum())
        complete = final and self._complete
        manifest = dict(self.base_manifest)
        manifest.update({
            "backend": "live", "complete": complete, "status": status if final else "running", "final": final,
            "schema_version": M.SCHEMA_VERSION, "policy": self.bundle.name, "seed": self.seed,
            "engines": [dict(engine_id=c.engine_id, node_id=c.node_id,
                             **{k: c.info.get(k) for k in ("num_blocks", "block_size", "vllm_version",
                                                           "scheduler_cls", "max_model_len", "hostname")})
                        for c in self.clients],
            "engine_failures": list(self.engine_failures), "engine_kills": list(self.engine_kills),
            "prefix_cache_reset": list(self.cache_reset), "wall_time_s": self.now(),
            "num_retries": self.num_retries,
            "errors": list(self.errors[:20]), "clock_offsets": {str(k): v for k, v in self._offsets.items()},
            "gpu": self.base_manifest.get("gpu", "no GPU"),
            # the options this run really used (the caller's copy may predate the config's duration)
            "live_options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.opt).items()},
        })
        if not complete:
            summary["incomplete"] = 1.0
        return LiveResult(None, calls, programs, engines, summary, manifest, self.views)


def _frame(columns, rows):
    store = M.ColumnStore(columns)
    for r in rows:
        store.append(r)
    return store.to_frame()


from agentsim.live.views import LiveCall, LiveEngineView  # noqa: E402  (views import nothing from here)

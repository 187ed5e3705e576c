"""One vLLM engine in a Ray actor: ``AsyncLLM`` with prefix caching, priority scheduling, KV events.

:class:`EngineHost` is a plain class; :mod:`agentsim.live.cluster` wraps it with ``ray.remote`` and
places one per engine by node (custom ``node<k>`` resources) and GPU. It is an *async* actor: many
``generate`` calls are in flight at once and vLLM batches them.

- Timestamps in replies are the node's ``time.monotonic()`` (the engine core is a child process
  on the same node, and vLLM's ``RequestStateStats`` use the same clock); the driver converts them
  to its run clock with a per-engine offset measured at start (:meth:`EngineHost.clock`).
- KV-cache events are published by vLLM on a local ``ipc://`` socket (nothing leaves the node);
  a subscriber task here decodes them and the driver drains them with every reply and poll.
- Engine statistics (running/waiting, KV usage, prefill/decode tokens, busy time) come from a
  ``StatLoggerBase`` that vLLM calls after every engine step.
- With ``spec.scheduler`` set, vLLM loads :class:`agentsim.live.scheduler.AgentsimScheduler`
  (``scheduler_cls``) and passes it the policy spec through ``additional_config``.

vLLM is imported only inside the methods (the actor process), never at module import.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEDULER_CLS = "agentsim.live.scheduler.AgentsimScheduler"


@dataclass
class EngineSpec:
    """Everything needed to start one engine (plain data: it travels to the actor)."""

    engine_id: int
    node_id: int
    model: str
    run_tag: str = "run"
    load_format: str = "dummy"          # "dummy": random weights, only config + tokenizer needed
    dtype: str = "float32"
    block_size: int = 32                # CPU backend: a multiple of 32
    max_model_len: int = 8192
    max_num_seqs: int = 16
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    tp: int = 1
    kv_cache_gib: float = 1.0           # CPU backend: VLLM_CPU_KVCACHE_SPACE per engine
    gpu_memory_utilization: float | None = None
    enforce_eager: bool = True
    scheduling_policy: str = "priority"
    kv_events: bool = True
    scheduler: dict | None = None       # {"policy": spec, "log": path, "force_free_queue": bool}
    data_plane_host: str | None = "127.0.0.1"  # ZMQ socket for generate calls: an address, "node", or None (Ray)
    kv_transfer_config: dict | None = None  # vLLM KVTransferConfig fields (P/D roles, agentsim.live.pd)
    seed: int = 0
    env: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class _StatSink:
    """Per-engine accumulator fed by vLLM's stat logger after every step."""

    def __init__(self) -> None:
        self.num_running = 0
        self.num_waiting = 0
        self.kv_usage = 0.0
        self.prefill_tokens = 0       # cumulative prompt tokens computed
        self.decode_tokens = 0        # cumulative generated tokens
        self.cached_tokens = 0        # cumulative prompt tokens from the prefix cache
        self.queried_tokens = 0
        self.external_tokens = 0      # cumulative prompt tokens loaded by a KV connector (P/D decode side)
        self.kv_transfer: dict = {}   # cumulative KV connector counters (agentsim.live.kvconnector.STAT_KEYS)
        self.busy_time = 0.0          # cumulative seconds with work in the engine
        self.num_steps = 0
        self.num_preemptions = 0
        self._last_t: float | None = None
        self._last_busy = False
        self.gpu_util = None          # callable -> mean GPU utilisation (0..1) of this engine's GPUs

    def record(self, sched: Any, it: Any) -> None:
        now = time.monotonic()
        if self._last_t is not None and self._last_busy:
            self.busy_time += now - self._last_t
        self._last_t = now
        if sched is not None:
            self.num_running = int(sched.num_running_reqs)
            self.num_waiting = int(sched.num_waiting_reqs) + int(getattr(sched, "num_skipped_waiting_reqs", 0))
            self.kv_usage = float(sched.kv_cache_usage)
            pcs = getattr(sched, "prefix_cache_stats", None)
            if pcs is not None:
                self.queried_tokens += int(getattr(pcs, "queries", 0))
                self.cached_tokens += int(getattr(pcs, "hits", 0))
            kcs = getattr(sched, "kv_connector_stats", None)
            if isinstance(kcs, dict):
                for k, v in kcs.items():  # numbers are summed; lists (NIXL's per-transfer values) too, and counted
                    if isinstance(v, (int, float)):
                        self.kv_transfer[k] = self.kv_transfer.get(k, 0) + v
                    elif isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
                        self.kv_transfer[k] = self.kv_transfer.get(k, 0) + sum(v)
                        self.kv_transfer[f"{k}_count"] = self.kv_transfer.get(f"{k}_count", 0) + len(v)
            self.num_steps += 1
            self._last_busy = self.num_running + self.num_waiting > 0
        if it is not None:
            pts = getattr(it, "prompt_token_stats", None)
            self.prefill_tokens += int(pts.computed if pts is not None else it.num_prompt_tokens)
            self.external_tokens += int(getattr(pts, "external_kv_transfer", 0) or 0)
            self.decode_tokens += int(it.num_generation_tokens)
            self.num_preemptions += int(getattr(it, "num_preempted_reqs", 0))

    def snapshot(self) -> dict:
        return {
            "t": time.monotonic(), "num_running": self.num_running, "num_waiting": self.num_waiting,
            "kv_usage": self.kv_usage, "prefill_tokens": self.prefill_tokens,
            "decode_tokens": self.decode_tokens, "busy_time": self.busy_time, "num_steps": self.num_steps,
            "cached_tokens": self.cached_tokens, "queried_tokens": self.queried_tokens,
            "num_preemptions": self.num_preemptions, "external_tokens": self.external_tokens,
            "kv_transfer": dict(self.kv_transfer),
            "gpu_util": self.gpu_util() if self.gpu_util is not None else None,
        }


def _make_stat_logger_factory(sink: _StatSink):
    from vllm.v1.metrics.loggers import StatLoggerBase

    class AgentsimStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.sink = sink

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            self.sink.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return AgentsimStatLogger


class EngineHost:
    """The body of one engine actor. Call :meth:`start` once, then :meth:`generate` concurrently."""

    def __init__(self, spec: dict) -> None:
        self.spec = EngineSpec(**spec)
        self.llm: Any = None
        self.sink = _StatSink()
        self._events: list[tuple] = []
        self._event_task: asyncio.Task | None = None
        self._event_sock: Any = None
        self._kv_endpoint: str | None = None
        self._num_events = 0
        self._inflight: dict[str, float] = {}
        self._sched_log: str | None = None
        self._gpus: list = []
        self._dp_sock: Any = None
        self._dp_task: asyncio.Task | None = None
        self._dp_endpoint: str | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> dict:
        """Build the engine; return its facts (blocks, pid, children, hash probe, versions)."""
        from agentsim.live.compat import check_vllm

        s = self.spec
        os.environ.update({k: str(v) for k, v in s.env.items()})
        # vLLM spawns the engine core with this process's sys.path, not a fresh PYTHONPATH
        for p in reversed([p for p in str(s.env.get("PYTHONPATH", "")).split(os.pathsep) if p]):
            if p not in sys.path:
                sys.path.insert(0, p)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(s.kv_cache_gib)))))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        check_vllm()
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kw: dict[str, Any] = dict(
            model=s.model, load_format=s.load_format, dtype=s.dtype, enforce_eager=s.enforce_eager,
            block_size=s.block_size, max_model_len=s.max_model_len, max_num_seqs=s.max_num_seqs,
            enable_prefix_caching=s.enable_prefix_caching, scheduling_policy=s.scheduling_policy,
            disable_log_stats=False, skip_tokenizer_init=True, seed=s.seed,
            tensor_parallel_size=s.tp, enable_chunked_prefill=s.enable_chunked_prefill,
        )
        if s.max_num_batched_tokens is not None:
            kw["max_num_batched_tokens"] = s.max_num_batched_tokens
        if s.kv_transfer_config:
            from vllm.config import KVTransferConfig

            kw["kv_transfer_config"] = KVTransferConfig(**s.kv_transfer_config)
        if s.num_gpu_blocks_override is not None:
            kw["num_gpu_blocks_override"] = s.num_gpu_blocks_override
        if s.gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = s.gpu_memory_utilization
        if s.kv_events:
            from vllm.config import KVEventsConfig

            sock = os.path.join(tempfile.gettempdir(), f"agentsim-kv-{os.getpid()}-{s.engine_id}.sock")
            self._kv_endpoint = f"ipc://{sock}"
            kw["kv_events_config"] = KVEventsConfig(
                enable_kv_cache_events=True, publisher="zmq", endpoint=self._kv_endpoint,
                topic=f"kv@{s.run_tag}@{s.engine_id}")
        if s.scheduler is not None:
            self._sched_log = s.scheduler.get("log") or os.path.join(
                tempfile.gettempdir(), f"agentsim-sched-{os.getpid()}-{s.engine_id}.jsonl")
            cfg = dict(s.scheduler, log=self._sched_log, engine_id=s.engine_id)
            kw["scheduler_cls"] = SCHEDULER_CLS
            kw["additional_config"] = {"agentsim": cfg}
            if os.path.exists(self._sched_log):
                os.unlink(self._sched_log)
        if self._kv_endpoint:
            await self._start_subscriber()
        args = AsyncEngineArgs(**kw)
        try:
            self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[_make_stat_logger_factory(self.sink)])
        except Exception as e:
            logs = "the Ray worker logs (<ray session dir>/logs/worker-*.err)"
            try:
                import ray

                logs = os.path.join(ray.get_runtime_context().get_node_logs_dir() if hasattr(
                    ray.get_runtime_context(), "get_node_logs_dir") else "/tmp/ray/session_latest/logs", "worker-*.err")
            except Exception:  # noqa: BLE001
                pass
            raise RuntimeError(f"vLLM engine {s.engine_id} failed to start ({type(e).__name__}: {e}); "
                               f"the engine core's own error is in {logs}") from e
        cc = self.llm.vllm_config.cache_config
        from agentsim.live.tokens import engine_probe_hash

        import psutil

        if s.data_plane_host:
            host = s.data_plane_host
            if host == "node":  # the address Ray knows this node by (multi-host clusters)
                import ray

                host = ray.util.get_node_ip_address()
            await self._start_data_plane(host)
        me = psutil.Process()
        self._gpus = _nvml_handles()
        self.sink.gpu_util = (lambda: _nvml_util(self._gpus)) if self._gpus else None
        return {
            "gpus": [g[1] for g in self._gpus],
            "data_plane": self._dp_endpoint,
            "engine_id": s.engine_id, "node_id": s.node_id, "pid": os.getpid(),
            "child_pids": [p.pid for p in me.children(recursive=True)],
            "hostname": os.uname().nodename,
            "num_blocks": int(cc.num_gpu_blocks or 0), "block_size": int(cc.block_size),
            "hash_algo": str(cc.prefix_caching_hash_algo),
            "int_block_hashes": bool(vllm.envs.VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES),
            "hash_probe": engine_probe_hash(int(cc.block_size), str(cc.prefix_caching_hash_algo)),
            "vllm_version": vllm.__version__, "scheduler_cls": kw.get("scheduler_cls"),
            "max_model_len": int(self.llm.vllm_config.model_config.max_model_len),
            "vocab_size": int(self.llm.vllm_config.model_config.get_vocab_size()),
        }

    async def _start_subscriber(self) -> None:
        import msgspec
        import zmq
        import zmq.asyncio
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self._kv_endpoint)  # vLLM binds ipc endpoints; connecting first is fine
        self._event_sock = sock
        dec = msgspec.msgpack.Decoder(type=KVEventBatch)

        async def pump() -> None:
            while True:
                frames = await sock.recv_multipart()
                if len(frames) < 3:
                    continue
                batch = dec.decode(frames[-1])
                for ev in batch.events:
                    self._num_events += 1
                    if isinstance(ev, BlockStored):
                        self._events.append(("S", [_hkey(h) for h in ev.block_hashes]))
                    elif isinstance(ev, BlockRemoved):
                        self._events.append(("R", [_hkey(h) for h in ev.block_hashes]))
                    elif isinstance(ev, AllBlocksCleared):
                        self._events.append(("C", []))

        self._event_task = asyncio.get_running_loop().create_task(pump())

    async def _start_data_plane(self, host: str) -> None:
        """A ROUTER socket taking msgpack ``generate`` requests (cheaper per call than a Ray RPC).

        Frame: ``[identity, msgpack([request_id, token_ids, max_tokens, priority, extra_args, run_epoch])]``
        (or ``[request_id, "poll"]`` for :meth:`poll`); the reply is
        ``[identity, msgpack([request_id, reply_or_None, error_or_None])]``. Ray actor calls handled
        in this process slow the engine next to them on a small machine; these do not.
        """
        import msgspec
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        port = sock.bind_to_random_port(f"tcp://{host}")
        self._dp_sock = sock
        self._dp_endpoint = f"tcp://{host}:{port}"
        enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task] = set()

        async def handle(ident: bytes, args: list) -> None:
            rid = args[0]
            try:
                # [rid, "poll"] asks for stats + KV events; anything else is a generate call
                reply = await self.poll() if len(args) == 2 and args[1] == "poll" else await self.generate(*args)
                out = [rid, reply, None]
            except Exception as e:  # noqa: BLE001 - the driver turns it into the call's failure
                out = [rid, None, f"{type(e).__name__}: {e}"]
            await sock.send_multipart([ident, enc.encode(out)])

        async def serve() -> None:
            while True:
                ident, payload = await sock.recv_multipart()
                t = loop.create_task(handle(ident, dec.decode(payload)))
                pending.add(t)
                t.add_done_callback(pending.discard)

        self._dp_task = loop.create_task(serve())

    def _drain(self) -> list[tuple]:
        ev, self._events = self._events, []
        return ev

    async def shutdown(self) -> None:
        if self._dp_task is not None:
            self._dp_task.cancel()
        if self._dp_sock is not None:
            self._dp_sock.close(linger=0)
        if self._event_task is not None:
            self._event_task.cancel()
        if self._event_sock is not None:
            self._event_sock.close(linger=0)
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    # ------------------------------------------------------------------ requests
    async def generate(self, request_id: str, token_ids: list[int], max_tokens: int, priority: int,
                       extra_args: dict | None, run_epoch: float | None = None) -> dict:
        """Run one call to completion; ``run_epoch`` = the run's t=0 on this node's monotonic clock."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        t_recv = time.monotonic()
        xa = dict(extra_args or {})
        if run_epoch is not None:
            xa["agentsim_epoch"] = run_epoch
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, extra_args=xa or None,
                            output_kind=RequestOutputKind.FINAL_ONLY, detokenize=False)
        self._inflight[request_id] = t_recv
        final = None
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=token_ids), sp, request_id,
                                               priority=priority):
                final = out
        finally:
            self._inflight.pop(request_id, None)
        t_done = time.monotonic()
        m = final.metrics
        comp = final.outputs[0]
        return {
            "request_id": request_id,
            "token_ids": list(comp.token_ids),
            "num_cached_tokens": int(final.num_cached_tokens or 0),
            "recv_at": t_recv, "done_at": t_done,
            "queued_at": float(getattr(m, "queued_ts", 0.0) or 0.0),
            "scheduled_at": float(getattr(m, "scheduled_ts", 0.0) or 0.0),
            "first_token_at": float(getattr(m, "first_token_ts", 0.0) or 0.0),
            "last_token_at": float(getattr(m, "last_token_ts", 0.0) or 0.0),
            "num_preemptions": int(getattr(m, "num_preemptions", 0) or 0),
            "finish_reason": comp.finish_reason,
            "kv_transfer_params": getattr(final, "kv_transfer_params", None),
            "events": self._drain(),
            "stats": self.sink.snapshot(),
        }

    async def poll(self) -> dict:
        """Engine stats and the KV events since the last drain."""
        return {"stats": self.sink.snapshot(), "events": self._drain(), "num_inflight": len(self._inflight),
                "num_events": self._num_events}

    async def clock(self) -> float:
        return time.monotonic()

    async def reset_prefix_cache(self) -> bool:
        return bool(await self.llm.reset_prefix_cache())

    async def scheduler_records(self) -> list[dict]:
        """Decisions the in-engine scheduler logged (empty without ``spec.scheduler``)."""
        if not self._sched_log or not os.path.exists(self._sched_log):
            return []
        out = []
        with open(self._sched_log) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        break  # a partly written last line
        return out

    async def replay_direct(self, programs: list[list[tuple]], concurrency: int) -> dict:
        """Benchmark baseline: run recorded programs with plain ``AsyncLLM.generate`` in this process.

        ``programs``: per program, its steps in order: ``("llm", token_ids, max_tokens[, priority,
        extra_args])`` or ``("tool", seconds)``. ``concurrency`` programs run at once (closed loop, in list order).
        Returns per-call and per-program latencies (s).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        call_lat: list[float] = []
        prog_lat: list[float] = []
        queue = list(range(len(programs)))
        n = [0]

        async def one(steps: list[tuple]) -> None:
            t0 = time.monotonic()
            for step in steps:
                if step[0] == "tool":
                    await asyncio.sleep(step[1])
                    continue
                ids, max_tokens = step[1], step[2]
                priority = step[3] if len(step) > 3 else 0
                xa = step[4] if len(step) > 4 else None
                n[0] += 1
                sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, extra_args=xa,
                                    output_kind=RequestOutputKind.FINAL_ONLY, detokenize=False)
                t = time.monotonic()
                async for _ in self.llm.generate(TokensPrompt(prompt_token_ids=list(ids)), sp, f"direct-{n[0]}",
                                                 priority=priority):
                    pass
                call_lat.append(time.monotonic() - t)
            prog_lat.append(time.monotonic() - t0)

        async def worker() -> None:
            while queue:
                await one(programs[queue.pop(0)])

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
        return {"call_lat": call_lat, "prog_lat": prog_lat, "wall": time.monotonic() - t0}

    async def pids(self) -> list[int]:
        import psutil

        me = psutil.Process()
        return [me.pid] + [p.pid for p in me.children(recursive=True)]


def _nvml_handles() -> list:
    """NVML handles of the GPUs this process may use, or [] (no nvidia-ml-py, no driver, no GPU)."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        idx = [int(x) for x in visible.split(",") if x.strip().isdigit()] if visible else list(range(n))
        out = []
        for i in idx:
            if i < n:
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                out.append((h, name.decode() if isinstance(name, bytes) else str(name)))
        return out
    except Exception:  # noqa: BLE001 - NVML present but unusable: treat as no GPU
        return []


def _nvml_util(handles: list) -> float | None:
    import pynvml

    try:
        vals = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0 for h, _ in handles]
    except Exception:  # noqa: BLE001
        return None
    return sum(vals) / len(vals) if vals else None


def _hkey(h: Any) -> bytes | int:
    return bytes(h) if isinstance(h, (bytes, bytearray, memoryview)) else h

"""Drive a real in-process vLLM (v1) engine through controlled batch shapes and time its steps.

How a clean per-step time is obtained
-------------------------------------
* The engine core runs **in this process** (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; with TP > 1 on
  GPUs the model workers are still separate processes) with **async scheduling off**, so one
  ``EngineCore.step()`` is exactly schedule -> execute model -> sample -> update, with nothing
  overlapping it.
* The engine is started with ``scheduler_cls=StepTimingScheduler``, a subclass of vLLM's own
  scheduler (the documented ``scheduler_cls`` hook, no patching). It stamps the clock when
  ``schedule()`` starts and when ``update_from_output()`` returns, which brackets the whole engine
  step including the host-device sync of the sampled tokens, and it reads the batch's features
  from the scheduler's own bookkeeping (tokens scheduled per request and the tokens each had
  computed before), so a recorded step carries the shape vLLM actually ran, not the one we meant.
* Shapes are controlled by what is in the engine when it steps: a prefill point is one request
  whose first ``computed`` tokens were cached by a previous request (prefix caching); a decode
  point is ``batch`` requests whose prompts are all computed; a mixed point adds a new request to
  a running decode batch (vLLM schedules running decodes first, then the new chunk). Every
  prompt is fresh random token ids, so nothing else hits the prefix cache.
* On the CPU backend with one OpenMP thread the step's work is done by this process alone, so the
  process CPU time over the same interval is recorded too (``step_cpu_time_s``): on a machine
  whose cores other processes also use it excludes the time they took, which wall time does not
  (see :func:`agentsim.calibration.job.default_clock`).
* The frontend's output processing (detokenisation, request-state bookkeeping) is excluded from
  the step time; it runs in a separate process when vLLM serves. It is recorded per sample as
  ``engine_step_time_s`` for reference.

This module imports vLLM at import time; import it only when a profiling job runs.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

# Must be set before vLLM is imported: keep the engine core in this process, and let the CPU
# backend use the cores without pinning (other processes share them).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
# One OpenMP thread unless the user says otherwise: on a machine whose cores other processes also
# use, a multi-threaded CPU engine stalls at OpenMP barriers whenever one of its threads is
# descheduled (steps of 1 ms became 100 ms in trials), which no fit can absorb. GPU engines run one
# host thread per worker anyway.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from vllm import EngineArgs, SamplingParams  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.engine.llm_engine import LLMEngine  # noqa: E402

from agentsim.calibration.batch import attn_pairs  # noqa: E402
from agentsim.calibration.grid import GridPoint  # noqa: E402
from agentsim.calibration.job import EngineConfig  # noqa: E402
from agentsim.workload import stable_id  # noqa: E402


@dataclass(slots=True)
class StepRecord:
    """One engine step as the scheduler saw it."""

    num_prefill_tokens: int = 0
    prefill_attn_pairs: float = 0.0
    num_decode_seqs: int = 0
    decode_ctx_tokens: int = 0
    num_prefill_chunks: int = 0
    step_time_s: float = 0.0      # wall clock
    step_cpu_time_s: float = 0.0  # CPU time of this process over the same interval


class StepTimingScheduler(Scheduler):
    """vLLM's scheduler, plus a record (features, duration) of every step that ran tokens."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.agentsim_records: list[StepRecord] = []
        self._agentsim_pending: tuple[int, int, StepRecord] | None = None

    def schedule(self, *args, **kwargs):
        started = time.perf_counter_ns()
        started_cpu = time.process_time_ns()
        out = super().schedule(*args, **kwargs)
        if out.total_num_scheduled_tokens > 0:
            rec = StepRecord()
            for req_id, n in out.num_scheduled_tokens.items():
                req = self.requests[req_id]
                # schedule() has already advanced num_computed_tokens by n.
                before = req.num_computed_tokens - n
                if n == 1 and before >= req.num_prompt_tokens and before == req.num_tokens - 1:
                    rec.num_decode_seqs += 1
                    rec.decode_ctx_tokens += before + 1  # keys attended: the cached ones and itself
                else:
                    rec.num_prefill_chunks += 1
                    rec.num_prefill_tokens += n
                    rec.prefill_attn_pairs += attn_pairs(n, before)
            self._agentsim_pending = (started, started_cpu, rec)
        else:
            self._agentsim_pending = None
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        result = super().update_from_output(scheduler_output, model_runner_output)
        if self._agentsim_pending is not None:
            started, started_cpu, rec = self._agentsim_pending
            rec.step_time_s = (time.perf_counter_ns() - started) / 1e9
            rec.step_cpu_time_s = (time.process_time_ns() - started_cpu) / 1e9
            self.agentsim_records.append(rec)
            self._agentsim_pending = None
        return result


@dataclass
class EngineInfo:
    platform: str
    device_name: str
    vllm_version: str
    block_size: int
    num_kv_blocks: int
    kv_capacity_tokens: int
    max_model_len: int
    dtype: str
    dtype_bytes: int
    gpu_memory_utilization: float
    kv_cache_memory_bytes: int | None
    enforce_eager: bool
    vocab_size: int
    omp_num_threads: str | None = None
    hf_config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


class ShapeDriver:
    """An in-process vLLM engine plus the procedures that put it through one grid point."""

    def __init__(self, cfg: EngineConfig) -> None:
        import vllm
        from vllm.platforms import current_platform

        self.cfg = cfg
        on_cpu = current_platform.is_cpu()
        block = cfg.block_size or (32 if on_cpu else 16)
        eager = cfg.enforce_eager if cfg.enforce_eager is not None else on_cpu
        kv_gib = cfg.kv_cache_gib if cfg.kv_cache_gib is not None else (1.0 if on_cpu else None)
        args = EngineArgs(
            model=cfg.model, tensor_parallel_size=cfg.tp, dtype=cfg.dtype, load_format=cfg.load_format,
            block_size=block, max_model_len=cfg.max_model_len, max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_num_seqs=cfg.max_num_seqs, gpu_memory_utilization=cfg.gpu_memory_utilization,
            kv_cache_memory_bytes=int(kv_gib * 2**30) if kv_gib else None,
            enforce_eager=eager, seed=cfg.seed, enable_prefix_caching=True, enable_chunked_prefill=True,
            async_scheduling=False, scheduler_cls=StepTimingScheduler, skip_tokenizer_init=True,
            disable_log_stats=True,
        )
        self.engine = LLMEngine.from_engine_args(args)
        core_client = self.engine.engine_core
        core = getattr(core_client, "engine_core", None)
        if core is None:
            raise RuntimeError("the vLLM engine core is not in this process; set VLLM_ENABLE_V1_MULTIPROCESSING=0")
        if getattr(core, "batch_queue", None) is not None:
            raise RuntimeError("the engine overlaps batches (async scheduling / pipeline parallel); cannot time single steps")
        self.scheduler: StepTimingScheduler = core.scheduler
        vc = self.engine.vllm_config
        mc = vc.model_config
        num_blocks = int(vc.cache_config.num_gpu_blocks)
        torch_dtype = mc.dtype
        self.vocab_size = int(mc.get_vocab_size())
        self.info = EngineInfo(
            platform="cpu" if on_cpu else current_platform.device_type,
            device_name=_cpu_name() if on_cpu else str(current_platform.get_device_name()),
            vllm_version=vllm.__version__, block_size=int(vc.cache_config.block_size), num_kv_blocks=num_blocks,
            kv_capacity_tokens=num_blocks * int(vc.cache_config.block_size), max_model_len=int(mc.max_model_len),
            dtype=str(torch_dtype).replace("torch.", ""), dtype_bytes=int(torch_dtype.itemsize),
            gpu_memory_utilization=float(vc.cache_config.gpu_memory_utilization),
            kv_cache_memory_bytes=vc.cache_config.kv_cache_memory_bytes, enforce_eager=bool(mc.enforce_eager),
            vocab_size=self.vocab_size, omp_num_threads=os.environ.get("OMP_NUM_THREADS"), hf_config=mc.hf_config.to_dict() if hasattr(mc.hf_config, "to_dict") else {},
        )
        self._counter = 0
        self._background = 0  # requests that stay in the engine while a point is measured (decoders)

    # ------------------------------------------------------------------ engine plumbing
    def _tokens(self, n: int, *key: object) -> list[int]:
        rng = np.random.Generator(np.random.PCG64(stable_id("calibrate-prompt", self.cfg.seed, *key)))
        return rng.integers(10, max(11, self.vocab_size), n).tolist()

    def _add(self, tokens: list[int], max_tokens: int) -> str:
        self._counter += 1
        rid = f"cal-{self._counter}"
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False, temperature=0.0)
        self.engine.add_request(rid, {"prompt_token_ids": tokens}, params)
        return rid

    def _step(self) -> tuple[StepRecord | None, float]:
        """One engine step; returns the scheduler's record of it (None if it ran no tokens) and the
        wall time of the whole ``LLMEngine.step`` (engine core plus frontend output processing)."""
        recs = self.scheduler.agentsim_records
        n0 = len(recs)
        t0 = time.perf_counter_ns()
        self.engine.step()
        wall = (time.perf_counter_ns() - t0) / 1e9
        new = recs[n0:]
        del recs[:]
        return (new[-1] if new else None), wall

    def _drain(self, max_steps: int = 100000) -> None:
        for _ in range(max_steps):
            if not self.engine.has_unfinished_requests():
                return
            self._step()
        raise RuntimeError("engine did not finish its requests")

    def _abort(self, ids: list[str]) -> None:
        if ids:
            self.engine.abort_request(ids)
        self._drain()

    def _unfinished_ids_count(self) -> int:
        return self.engine.get_num_unfinished_requests()

    def _start_decoders(self, p: GridPoint, rep_key: object, extra_steps: int) -> list[str]:
        """Add ``p.batch`` requests and step until all are decoding (their prompts computed)."""
        budget = self.cfg.max_num_batched_tokens
        setup = -(-p.batch * p.ctx // budget) + 2
        ids = [self._add(self._tokens(max(1, p.ctx - 1), p.point_id, rep_key, i), setup + extra_steps + 8)
               for i in range(p.batch)]
        for _ in range(setup + 50):
            rec, _ = self._step()
            if rec is not None and rec.num_prefill_tokens == 0 and rec.num_decode_seqs == p.batch:
                return ids
        raise RuntimeError(f"{p.point_id}: decode batch never formed")

    # ------------------------------------------------------------------ measurement
    def warm_up(self) -> None:
        """Run a few unrecorded shapes so one-off costs (allocations, kernel selection) are paid."""
        for c in (16, min(512, self.cfg.max_num_batched_tokens - 1)):
            self._add(self._tokens(c, "warm", c), 2)
            self._drain()
        for i in range(min(8, self.cfg.max_num_seqs)):
            self._add(self._tokens(64, "warm-dec", i), 4)
        self._drain()

    def measure(self, p: GridPoint, reps: int) -> list[dict]:
        """Samples (features + times) of ``reps`` steps of shape ``p``; each carries ``shape_ok``,
        whether vLLM ran exactly the intended shape (decode contexts may drift by a token per step)."""
        self._background = 0
        samples: list[dict] = []

        def keep(rec: StepRecord | None, wall: float) -> None:
            if rec is None:
                raise RuntimeError(f"{p.point_id}: the measured step ran no tokens")
            s = {
                "num_prefill_tokens": rec.num_prefill_tokens, "prefill_attn_pairs": rec.prefill_attn_pairs,
                "num_decode_seqs": rec.num_decode_seqs, "decode_ctx_tokens": rec.decode_ctx_tokens,
                "step_time_s": rec.step_time_s, "step_cpu_time_s": rec.step_cpu_time_s, "engine_step_time_s": wall,
            }
            want_pairs = attn_pairs(p.chunk, p.computed) if p.chunk else 0.0
            s["shape_ok"] = (rec.num_prefill_tokens == p.chunk and rec.prefill_attn_pairs == want_pairs
                             and rec.num_decode_seqs == p.batch and rec.num_prefill_chunks == (1 if p.chunk else 0))
            samples.append(s)

        decoders: list[str] = []
        if p.batch:
            per_rep = (-(-p.computed // max(1, self.cfg.max_num_batched_tokens - p.batch)) + 2) if p.chunk else 1
            decoders = self._start_decoders(p, "dec", reps * per_rep + 2)
            self._background = len(decoders)
        try:
            for rep in range(reps):
                if p.chunk:
                    prompt = self._tokens(p.computed + p.chunk, p.point_id, rep)
                    if p.computed:
                        self._add(prompt[: p.computed], 1)
                        while self._unfinished_ids_count() > self._background:
                            self._step()
                    self._add(prompt, 1)
                    keep(*self._step())
                    while self._unfinished_ids_count() > self._background:
                        self._step()
                else:
                    keep(*self._step())
        finally:
            self._abort(decoders)
        return samples

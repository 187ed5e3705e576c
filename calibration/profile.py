"""Engine profiles: model dims, GPU, TP degree, step-time coefficients, KV capacity, provenance.

A profile is a small JSON file (format ``agentsim-profile``, version 2; version-1 files still load).
The simulator predicts the duration of one vLLM engine step from its batch shape
(:class:`BatchShape`) with non-negative coefficients (:class:`StepTimeCoefficients`)::

    step_time = const                                           # per-step host + launch work
              + per_scheduled_seq     * (prefill seqs + decode seqs)       # host, per sequence
              + per_sampled_token     * (sequences that sample a token)    # host, per output token
              + per_batched_token     * max(batched tokens, knee_tokens)   # linear layers
              + per_prefill_token     * (prompt tokens computed in this step)
              + per_decode_seq        * (decode sequences in this step)
              + per_prefill_attn_pair * (sum over prefill chunks of query x key pairs, causal)
              + per_decode_ctx_token  * (sum of the decode sequences' context lengths)

``batched tokens`` is vLLM's ``num_batched_tokens`` (prefill tokens + one per decode sequence). A
prefill chunk of ``c`` tokens on top of ``k`` cached/computed tokens has ``c*k + c*(c+1)/2``
attention pairs. Version-1 profiles are the special case ``per_scheduled_seq = per_sampled_token =
per_batched_token = knee_tokens = 0``. See :class:`StepTimeCoefficients` for the sources of each term.
"""

from __future__ import annotations

import math

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from agentsim.errors import ConfigError

FORMAT = "agentsim-profile"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
# The linear coefficients, in the column order of :func:`agentsim.calibration.fit.design_matrix`.
COEFFICIENTS = (
    "const",
    "per_prefill_token",
    "per_prefill_attn_pair",
    "per_decode_seq",
    "per_decode_ctx_token",
    "per_scheduled_seq",
    "per_sampled_token",
    "per_batched_token",
)
# Version 1 had only these; a version-1 file loads with the others (and ``knee_tokens``) at 0.
COEFFICIENTS_V1 = COEFFICIENTS[:5]
STEP_TIME_FIELDS = (*COEFFICIENTS, "knee_tokens")


@dataclass(frozen=True, slots=True)
class ModelDims:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_params: float
    max_model_len: int

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True, slots=True)
class GPUSpec:
    name: str
    memory_gib: float
    hbm_GBps: float
    peak_tflops: float


@dataclass(frozen=True, slots=True)
class StepTimeCoefficients:
    """Seconds of one engine step as a function of its batch shape (all fields >= 0).

    Terms (seconds; counts are per step)::

        const                                        per-step host work (schedule, launch) + weight-free fixed cost
        per_scheduled_seq     x (prefill + decode seqs)   host cost per scheduled sequence
        per_sampled_token     x sampled sequences        host cost per output token (sampling,
                                                         detokenization, output processing)
        per_batched_token     x max(T, knee_tokens)      linear layers, T = prefill tokens + decode seqs
        per_prefill_token     x prefill tokens           slope below the knee / prefill-only per-token work
        per_decode_seq        x decode seqs              per-decode-sequence device work (KV write, LM head)
        per_prefill_attn_pair x causal attention pairs   prefill attention FLOPs
        per_decode_ctx_token  x decode context tokens    decode attention KV reads

    Sources: the knee is the linear layers' memory->compute transition (a GEMM with ``T`` rows reads
    all its weights whatever ``T`` is, so its time is flat until ``T`` reaches the ridge point of the
    roofline, then grows with FLOPs); it is visible in Vidur's A100 ``mlp.csv`` and in the H200
    ``mlp_llama-3-8b.csv`` measurements (flat ~0.19 ms/layer up to ~128 tokens, 0.61 us/token/layer
    beyond ~512). The host terms are the CPU work vLLM does per step and per sequence
    (``vllm/v1/core/sched/scheduler.py`` ``schedule``/``update_from_output``,
    ``vllm/v1/sample/sampler.py``, ``vllm/v1/engine/output_processor.py`` detokenization), tens of
    microseconds per sequence per step on real engines (issue 14). Attention terms: FLOPs per
    (query, key) pair for prefill, KV bytes per context token for decode (Vidur's attention
    fits, research/simulators.md 2.3).
    """

    const: float
    per_prefill_token: float
    per_prefill_attn_pair: float
    per_decode_seq: float
    per_decode_ctx_token: float
    per_scheduled_seq: float = 0.0
    per_sampled_token: float = 0.0
    per_batched_token: float = 0.0
    knee_tokens: float = 0.0

    def predict(self, num_prefill_tokens: int, prefill_attn_pairs: float, num_decode_seqs: int,
                decode_ctx_tokens: int, num_prefill_seqs: int = 0, num_sampled: int = -1,
                num_scheduled: int = -1) -> float:
        """Seconds for one engine step with the given batch features (see the class docstring);
        ``num_sampled = -1`` means every sequence in the step samples; ``num_scheduled = -1`` means
        every sequence in the step was scheduled for it (a V0 multi-step chunk schedules once, so its
        steps 2..K pass 0: ``vllm/engine/llm_engine.py`` skips ``scheduler.schedule()`` while a
        multi-step chunk is in flight). Plain float arithmetic: this is the simulator's hot path."""
        num_seqs = num_prefill_seqs + num_decode_seqs
        if num_sampled < 0:
            num_sampled = num_seqs
        sched = num_seqs if num_scheduled < 0 else num_scheduled
        num_tokens = num_prefill_tokens + num_decode_seqs
        knee = self.knee_tokens
        return (
            self.const
            + self.per_prefill_token * num_prefill_tokens
            + self.per_prefill_attn_pair * prefill_attn_pairs
            + self.per_decode_seq * num_decode_seqs
            + self.per_decode_ctx_token * decode_ctx_tokens
            + self.per_scheduled_seq * sched
            + self.per_sampled_token * num_sampled
            + self.per_batched_token * (num_tokens if num_tokens > knee else knee)
        )

    def terms(self, batch: BatchShape) -> dict[str, float]:
        """Each term's seconds for ``batch`` (keys: the coefficient names; they sum to :meth:`predict`)."""
        num_seqs = batch.num_prefill_seqs + batch.num_decode_seqs
        sampled = num_seqs if batch.num_sampled < 0 else batch.num_sampled
        sched = num_seqs if batch.num_scheduled < 0 else batch.num_scheduled
        num_tokens = batch.num_prefill_tokens + batch.num_decode_seqs
        return {
            "const": self.const,
            "per_prefill_token": self.per_prefill_token * batch.num_prefill_tokens,
            "per_prefill_attn_pair": self.per_prefill_attn_pair * batch.prefill_attn_pairs,
            "per_decode_seq": self.per_decode_seq * batch.num_decode_seqs,
            "per_decode_ctx_token": self.per_decode_ctx_token * batch.decode_ctx_tokens,
            "per_scheduled_seq": self.per_scheduled_seq * sched,
            "per_sampled_token": self.per_sampled_token * sampled,
            "per_batched_token": self.per_batched_token * max(num_tokens, self.knee_tokens),
        }


@dataclass(frozen=True, slots=True)
class BatchShape:
    """What one engine step computes: the input of :meth:`Profile.step_time`.

    ``num_prefill_tokens``: prompt tokens computed this step (all prefill chunks);
    ``prefill_attn_pairs``: sum over chunks of ``c*k + c*(c+1)/2`` (chunk ``c`` over ``k`` computed tokens);
    ``num_decode_seqs``: sequences decoding one token; ``decode_ctx_tokens``: sum of their context lengths;
    ``num_prefill_seqs``: sequences with a prefill chunk this step;
    ``num_sampled``: sequences that sample a token at the end of this step (decodes + prefills that
    finish their prompt); ``-1`` means "every sequence in the step";
    ``num_scheduled``: sequences the scheduler planned for this step (host work per scheduled
    sequence); ``-1`` means "every sequence in the step" (0 for steps 2..K of a V0 multi-step chunk).
    """

    num_prefill_tokens: int = 0
    prefill_attn_pairs: int = 0
    num_decode_seqs: int = 0
    decode_ctx_tokens: int = 0
    num_prefill_seqs: int = 0
    num_sampled: int = -1
    num_scheduled: int = -1


@dataclass(frozen=True, slots=True)
class Links:
    nvlink_GBps: float
    pcie_GBps: float
    internode_GBps: float


FRONTEND_FIELDS = ("per_request_s", "per_prompt_token_s", "per_output_token_s", "transport_s")


@dataclass(frozen=True, slots=True)
class FrontendCosts:
    """Per-request CPU costs of vLLM's API server (the ``frontend`` section of a profile; seconds, >= 0).

    ``per_request_s``: HTTP handling and request setup (``OpenAIServingCompletion.create_completion``,
    ``AsyncLLM.add_request`` -> input processing), once per request;
    ``per_prompt_token_s``: tokenization / input processing per prompt token;
    ``per_output_token_s``: detokenization and streaming per output token
    (``vllm/v1/engine/output_processor.py`` ``OutputProcessor.process_outputs`` -> incremental
    detokenizer, then the SSE chunk written by ``serving_completion.py``);
    ``transport_s``: one-way delay between the API server and the engine core, paid by each request
    on its way in and by its outputs on their way back, without holding a worker (V1's ZMQ sockets
    between the two processes, ``vllm/v1/engine/core_client.py``; on a shared CPU, also the wait for
    the other process to be scheduled).

    vLLM runs all of these on the API server's single asyncio event loop, one per API server process
    (``--api-server-count``), so they are modelled as first-come-first-served work on
    ``cluster.engine.api_server_count`` frontend workers (:mod:`agentsim.sim.frontend`). All zero (the
    default) turns the frontend model off and leaves runs bit-identical to a profile without it.
    """

    per_request_s: float = 0.0
    per_prompt_token_s: float = 0.0
    per_output_token_s: float = 0.0
    transport_s: float = 0.0

    @property
    def enabled(self) -> bool:
        return (self.per_request_s > 0 or self.per_prompt_token_s > 0 or self.per_output_token_s > 0
                or self.transport_s > 0)

    def intake_seconds(self, num_prompt_tokens: int) -> float:
        """Frontend work before a request reaches the engine (setup + tokenization), seconds."""
        return self.per_request_s + self.per_prompt_token_s * num_prompt_tokens


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    gpu: GPUSpec
    model: ModelDims
    tp: int
    dtype_bytes: int
    coefficients: StepTimeCoefficients  # serialised as "step_time"
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    gpu_memory_utilization: float
    links: Links
    provenance: dict = field(default_factory=dict)
    fit_error: dict | None = None
    kv_block_size: int = 16  # block size the stated capacity in blocks refers to (vLLM's GPU default)
    frontend: FrontendCosts = field(default_factory=FrontendCosts)  # API server costs (all 0: off)
    source: str = ""  # where it was loaded from (not serialised)

    def step_time(self, batch: BatchShape) -> float:
        """Seconds for one engine step of shape ``batch`` (the one rule the engine model and
        calibration both use)."""
        return self.step_seconds(batch.num_prefill_tokens, batch.prefill_attn_pairs, batch.num_decode_seqs,
                                 batch.decode_ctx_tokens, batch.num_prefill_seqs, batch.num_sampled,
                                 batch.num_scheduled)

    @property
    def step_seconds(self) -> Callable[..., float]:
        """:meth:`step_time` with the batch features as positional numbers: call it as
        ``step_seconds(num_prefill_tokens, prefill_attn_pairs, num_decode_seqs, decode_ctx_tokens,
        num_prefill_seqs=0, num_sampled=-1, num_scheduled=-1) -> seconds`` (the simulator's hot path).

        It is :meth:`StepTimeCoefficients.predict` of this profile's coefficients, handed out as a
        bound method so a call costs one Python call, not two."""
        return self.coefficients.predict

    @property
    def kv_capacity_blocks(self) -> int:
        return self.kv_capacity_tokens // self.kv_block_size

    @property
    def raw_points_path(self) -> Path | None:
        """The optional Parquet file of raw measured points (``provenance.raw_points``, relative to
        the profile file), or None."""
        rel = self.provenance.get("raw_points") if isinstance(self.provenance, dict) else None
        if not rel:
            return None
        base = Path(self.source).parent if self.source else Path(".")
        return base / rel

    def to_dict(self) -> dict:
        d = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "gpu": asdict(self.gpu),
            "model": asdict(self.model),
            "tp": self.tp,
            "dtype_bytes": self.dtype_bytes,
            "step_time": asdict(self.coefficients),
            "kv": {
                "bytes_per_token": self.kv_bytes_per_token,
                "capacity_tokens": self.kv_capacity_tokens,
                "block_size": self.kv_block_size,
                "capacity_blocks": self.kv_capacity_blocks,
                "gpu_memory_utilization": self.gpu_memory_utilization,
            },
            "links": asdict(self.links),
            "provenance": self.provenance,
        }
        if self.fit_error is not None:
            d["fit_error"] = self.fit_error
        if self.frontend.enabled:  # written only when on: profiles without it stay byte-identical
            d["frontend"] = asdict(self.frontend)
        return d

    def save(self, path: str | Path) -> None:
        """Write atomically (temporary name, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        # strict JSON: a statistic that has no value (no held-out point) is null, not NaN
        tmp.write_text(json.dumps(_finite_or_none(self.to_dict()), indent=2, allow_nan=False) + "\n")
        tmp.replace(path)


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


def _need(d: Any, key: str, where: str, kind: type | tuple = (int, float)) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ConfigError(where, f"missing field '{key}'")
    v = d[key]
    if kind in ((int, float), int, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}.{key}", f"must be a number, got {v!r}")
    elif not isinstance(v, kind):
        raise ConfigError(f"{where}.{key}", f"must be {getattr(kind, '__name__', kind)}, got {v!r}")
    return v


def _positive(d: Any, key: str, where: str, whole: bool = False) -> float:
    """A GPU's or model's size: a finite number >= 0 (0: not known, as a fitted CPU profile's GPU
    bandwidth), or a whole number >= 1 when ``whole`` (a model dimension). A negative layer count
    used to load, and gave negative KV bytes."""
    v = float(_need(d, key, where))
    ok = (1 <= v < float("inf") and v == int(v)) if whole else 0 <= v < float("inf")
    if not ok:
        what = "a whole number >= 1" if whole else "a finite number >= 0"
        raise ConfigError(f"{where}.{key}", f"must be {what}, got {d[key]!r}")
    return v


def profile_from_dict(d: dict, source: str = "<dict>") -> Profile:
    """Validate and build a profile; errors name ``source`` and the field."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ConfigError(source, f"not an agentsim profile (expected \"format\": \"{FORMAT}\")")
    version = d.get("format_version")
    if isinstance(version, bool) or version not in READ_VERSIONS:
        raise ConfigError(f"{source}: format_version",
                          f"unsupported version {version!r} (this agentsim reads {', '.join(map(str, READ_VERSIONS))})")
    name = _need(d, "name", source, str)
    g = _need(d, "gpu", source, dict)
    gw = f"{source}: gpu"
    gpu = GPUSpec(
        name=_need(g, "name", gw, str),
        memory_gib=_positive(g, "memory_gib", gw),
        hbm_GBps=_positive(g, "hbm_GBps", gw),
        peak_tflops=_positive(g, "peak_tflops", gw),
    )
    m = _need(d, "model", source, dict)
    mw = f"{source}: model"
    model = ModelDims(
        name=_need(m, "name", mw, str),
        **{k: int(_positive(m, k, mw, whole=True)) for k in (
            "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
            "intermediate_size", "vocab_size", "max_model_len")},
        num_params=_positive(m, "num_params", mw),
    )
    st = _need(d, "step_time", source, dict)
    coeffs = {}
    # Version 1 had five coefficients; its files load with the host and knee terms at 0.
    for k in (STEP_TIME_FIELDS if version >= 2 else COEFFICIENTS_V1):
        v = float(_need(st, k, f"{source}: step_time"))
        if not 0 <= v < float("inf"):
            raise ConfigError(f"{source}: step_time.{k}", f"must be a finite number >= 0, got {v}")
        coeffs[k] = v
    unknown = sorted(set(st) - set(STEP_TIME_FIELDS))
    if unknown:
        raise ConfigError(f"{source}: step_time.{unknown[0]}",
                          f"unknown term (known: {', '.join(STEP_TIME_FIELDS)})")
    kv = _need(d, "kv", source, dict)
    kvw = f"{source}: kv"
    cap = int(_need(kv, "capacity_tokens", kvw))
    bpt = int(_need(kv, "bytes_per_token", kvw))
    util = float(_need(kv, "gpu_memory_utilization", kvw))
    if cap <= 0:
        raise ConfigError(f"{kvw}.capacity_tokens", f"must be > 0, got {cap}")
    if bpt <= 0:
        raise ConfigError(f"{kvw}.bytes_per_token", f"must be > 0, got {bpt}")
    if not 0 < util <= 1:
        raise ConfigError(f"{kvw}.gpu_memory_utilization", f"must be in (0, 1], got {util}")
    block_size = int(_need(kv, "block_size", kvw)) if "block_size" in kv else 16
    if block_size < 1:
        raise ConfigError(f"{kvw}.block_size", f"must be >= 1, got {block_size}")
    if "capacity_blocks" in kv and int(_need(kv, "capacity_blocks", kvw)) != cap // block_size:
        raise ConfigError(f"{kvw}.capacity_blocks",
                          f"{kv['capacity_blocks']} disagrees with capacity_tokens // block_size = {cap // block_size}")
    fit_error = d.get("fit_error")
    if fit_error is not None and not isinstance(fit_error, dict):
        raise ConfigError(f"{source}: fit_error", f"must be an object, got {fit_error!r}")
    ln = _need(d, "links", source, dict)
    links = Links(**{k: float(_need(ln, k, f"{source}: links")) for k in ("nvlink_GBps", "pcie_GBps", "internode_GBps")})
    tp = int(_need(d, "tp", source))
    if tp < 1:
        raise ConfigError(f"{source}: tp", f"must be >= 1, got {tp}")
    prov = _need(d, "provenance", source, dict)
    frontend = _frontend_from_dict(d.get("frontend"), source)
    return Profile(
        name=name, gpu=gpu, model=model, tp=tp, dtype_bytes=int(d.get("dtype_bytes", 2)),
        coefficients=StepTimeCoefficients(**coeffs), kv_bytes_per_token=bpt, kv_capacity_tokens=cap,
        gpu_memory_utilization=util, links=links, provenance=prov, fit_error=fit_error,
        kv_block_size=block_size, frontend=frontend, source=source,
    )


def _frontend_from_dict(fe: Any, source: str) -> FrontendCosts:
    """The optional ``frontend`` section (absent: all costs 0); unknown keys and negative costs are errors."""
    if fe is None:
        return FrontendCosts()
    if not isinstance(fe, dict):
        raise ConfigError(f"{source}: frontend", f"must be an object, got {fe!r}")
    for k in fe:
        if k not in FRONTEND_FIELDS:
            raise ConfigError(f"{source}: frontend.{k}", f"unknown field (known: {', '.join(FRONTEND_FIELDS)})")
    vals = {}
    for k in FRONTEND_FIELDS:
        if k in fe:
            v = float(_need(fe, k, f"{source}: frontend"))
            if not v >= 0:
                raise ConfigError(f"{source}: frontend.{k}", f"must be >= 0, got {v}")
            vals[k] = v
    return FrontendCosts(**vals)


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(str(path), f"cannot read profile ({e.strerror})") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}", f"malformed JSON ({e.msg})") from None
    return profile_from_dict(d, str(path))


def shipped_profiles() -> dict[str, Path]:
    """Name -> path of every profile shipped in ``agentsim/calibration/profiles``."""
    out: dict[str, Path] = {}
    base = resources.files("agentsim.calibration") / "profiles"
    for entry in sorted(base.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            out[entry.name[:-5]] = Path(str(entry))
    return out


def profile_key(gpu: str, model: str, tp: int) -> str:
    return f"{gpu}_{model}_tp{tp}".lower()


def resolve_profile(spec: str | None, gpu: str, model: str, tp: int) -> Profile:
    """A profile from an explicit path/name, or the shipped one for (gpu, model, tp), else one
    derived from the nearest measured tables (:func:`agentsim.calibration.derive.resolve_derived`;
    ``model`` may be the path of a Hugging Face ``config.json``). Raises :class:`ConfigError`
    naming the field (``cluster.profile`` / ``gpu`` / ``model`` / ``tp``) or the config file."""
    shipped = shipped_profiles()
    if spec:
        if spec in shipped:
            return load_profile(shipped[spec])
        p = Path(spec)
        if p.suffix == ".json" or p.exists():
            return load_profile(p)
        raise ConfigError("cluster.profile", f"unknown profile {spec!r} (shipped: {', '.join(shipped)})")
    key = profile_key(gpu, model, tp)
    if key in shipped:
        return load_profile(shipped[key])
    from agentsim.calibration.derive import resolve_derived

    return resolve_derived(gpu, model, tp, shipped)

"""Run configuration: one nested, frozen tree loaded from TOML and overridden by flags.

Validation happens in ``__post_init__`` and names the field (``cluster.tp``); unknown keys are
rejected with the list of known ones. Everything has a default: ``RunConfig()`` is the embedded
default run (1 node x 4 A100-80GB, Llama-3-8B TP1, 200 closed-loop ReAct agents, 10 minutes).
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from agentsim.errors import ConfigError


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(where, msg)


@dataclass(frozen=True)
class EngineLimits:
    """vLLM engine arguments that shape scheduling (defaults: vLLM v1 on an 80 GB GPU)."""

    block_size: int = 16                      # --block-size (tokens per KV block)
    max_num_batched_tokens: int = 8192        # --max-num-batched-tokens (token budget per step)
    max_num_seqs: int = 256                   # --max-num-seqs
    enable_chunked_prefill: bool = True       # --enable-chunked-prefill
    enable_prefix_caching: bool = True        # --enable-prefix-caching
    max_model_len: int | None = None          # --max-model-len (default: the profile's model)
    num_gpu_blocks_override: int | None = None  # --num-gpu-blocks-override (force a small KV cache)
    scheduler: str = "v1"                     # v1 (mixed batches, vLLM >= 0.8 default) | v0 (prefill-first)
    num_scheduler_steps: int = 1              # --num-scheduler-steps (V0 multi-step: K decode steps per schedule)
    api_server_count: int = 1                 # --api-server-count (frontend workers; their costs come from the profile)

    def __post_init__(self) -> None:
        w = "cluster.engine"
        _check(self.block_size >= 1, f"{w}.block_size", f"must be >= 1, got {self.block_size}")
        _check(self.max_num_batched_tokens >= 1, f"{w}.max_num_batched_tokens", "must be >= 1")
        _check(self.max_num_seqs >= 1, f"{w}.max_num_seqs", "must be >= 1")
        _check(self.max_model_len is None or self.max_model_len >= 2, f"{w}.max_model_len", "must be >= 2")
        _check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
               f"{w}.num_gpu_blocks_override", f"must be >= 1 (a cluster with no KV cache cannot serve)")
        _check(self.scheduler in ("v1", "v0"), f"{w}.scheduler", f"must be v1 or v0, got {self.scheduler!r}")
        _check(self.num_scheduler_steps >= 1, f"{w}.num_scheduler_steps", "must be >= 1")
        _check(self.num_scheduler_steps == 1 or self.scheduler == "v0", f"{w}.num_scheduler_steps",
               "multi-step scheduling exists only in vLLM's V0 engine (set scheduler = \"v0\")")
        _check(self.api_server_count >= 1, f"{w}.api_server_count", "must be >= 1")


@dataclass(frozen=True)
class ClusterSpec:
    """Nodes x GPUs, GPU kind, model, tensor parallelism and engine limits."""

    num_nodes: int = 1
    gpus_per_node: int = 4
    gpu: str = "a100-80gb"
    model: str = "llama-3-8b"
    tp: int = 1
    engines_per_node: int | None = None       # default: gpus_per_node // tp
    profile: str | None = None                # profile name or path (default: shipped for gpu/model/tp)
    engine: EngineLimits = field(default_factory=EngineLimits)

    def __post_init__(self) -> None:
        _check(self.num_nodes >= 1, "cluster.num_nodes", f"must be >= 1, got {self.num_nodes}")
        _check(self.gpus_per_node >= 1, "cluster.gpus_per_node", f"must be >= 1, got {self.gpus_per_node}")
        _check(self.tp >= 1, "cluster.tp", f"must be >= 1, got {self.tp}")
        _check(self.tp <= self.gpus_per_node, "cluster.tp",
               f"tensor parallel degree {self.tp} exceeds gpus_per_node {self.gpus_per_node}")
        if self.engines_per_node is not None:
            _check(self.engines_per_node >= 1, "cluster.engines_per_node",
                   f"must be >= 1, got {self.engines_per_node} (a cluster with zero engines cannot serve)")
            _check(self.engines_per_node * self.tp <= self.gpus_per_node, "cluster.engines_per_node",
                   f"{self.engines_per_node} engines x TP {self.tp} need more than {self.gpus_per_node} GPUs per node")

    @property
    def num_engines_per_node(self) -> int:
        return self.engines_per_node if self.engines_per_node is not None else self.gpus_per_node // self.tp

    @property
    def num_engines(self) -> int:
        return self.num_nodes * self.num_engines_per_node


@dataclass(frozen=True)
class MixEntry:
    generator: str = "react"
    weight: float = 1.0
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class WorkloadSpec:
    """What runs: generator(s) and arrivals (closed-loop agents, Poisson programs/s, or a trace)."""

    generator: str = "react"
    params: dict = field(default_factory=dict)
    mix: tuple[MixEntry, ...] = ()            # several generators with weights (overrides generator)
    arrival: str = "closed"                   # closed | poisson | trace
    agents: int = 200                         # closed: programs in flight (one per agent)
    rate: float = 1.0                         # poisson: programs per second
    num_programs: int | None = None           # stop starting programs after this many
    trace: str | None = None                  # trace file (arrival = "trace")
    trace_format: str | None = None           # mooncake | azure | tau2 | tracelab | native (default: by suffix)
    time_scale: float = 1.0                   # trace: multiply inter-arrival times
    limit: int | None = None                  # trace: first N programs only

    def __post_init__(self) -> None:
        _check(self.arrival in ("closed", "poisson", "trace"), "workload.arrival",
               f"must be closed, poisson or trace, got {self.arrival!r}")
        _check(self.agents >= 1, "workload.agents", f"must be >= 1, got {self.agents}")
        _check(self.rate > 0, "workload.rate", f"must be > 0, got {self.rate}")
        _check(self.num_programs is None or self.num_programs >= 1, "workload.num_programs", "must be >= 1")
        _check(self.time_scale > 0, "workload.time_scale", "must be > 0")
        if self.arrival == "trace":
            _check(bool(self.trace), "workload.trace", "arrival = 'trace' needs a trace file")
        for i, m in enumerate(self.mix):
            _check(m.weight > 0, f"workload.mix[{i}].weight", "must be > 0")


@dataclass(frozen=True)
class SimOptions:
    fast_forward: bool = True                 # advance decode-only stretches as one event
    sample_interval: float = 1.0              # engine time-series period (simulated s)
    max_ff_steps: int = 1_000_000             # cap on one fast-forward window
    drain: bool = False                       # after duration, stop new programs and finish the rest


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    duration: float = 600.0                   # simulated seconds
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    policy: Any = "vllm"                      # bundle name, or {name, route, order, evict, shape, params}
    sim: SimOptions = field(default_factory=SimOptions)
    slo_ttft: float | None = None
    slo_tpot: float | None = None

    def __post_init__(self) -> None:
        _check(self.duration > 0, "duration", f"must be > 0, got {self.duration}")

    def to_dict(self) -> dict:
        return asdict(self)


_SECTIONS = {"cluster": ClusterSpec, "workload": WorkloadSpec, "sim": SimOptions}


def _build(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(where or "config", f"must be a table, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k not in known:
            raise ConfigError(f"{where}.{k}" if where else k, f"unknown field (known: {', '.join(known)})")
        sub = f"{where}.{k}" if where else k
        if cls is ClusterSpec and k == "engine":
            v = _build(EngineLimits, v, sub)
        elif cls is WorkloadSpec and k == "mix":
            if not isinstance(v, list):
                raise ConfigError(sub, "must be an array of tables [[workload.mix]]")
            v = tuple(_build(MixEntry, m, f"{sub}[{i}]") for i, m in enumerate(v))
        elif cls is RunConfig and k in _SECTIONS:
            v = _build(_SECTIONS[k], v, sub)
        else:
            v = _coerce(known[k], v, sub)
        kwargs[k] = v
    return cls(**kwargs)


def _coerce(f: Any, v: Any, where: str) -> Any:
    t = str(f.type)
    if v is None:
        return v
    if t.startswith("int") and not ("float" in t):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(where, f"must be an integer, got {v!r}")
    elif t.startswith("float"):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(where, f"must be a number, got {v!r}")
        v = float(v)
    elif t.startswith("bool"):
        if not isinstance(v, bool):
            raise ConfigError(where, f"must be true or false, got {v!r}")
    elif t.startswith("str"):
        if not isinstance(v, str):
            raise ConfigError(where, f"must be a string, got {v!r}")
    elif t == "dict":
        if not isinstance(v, dict):
            raise ConfigError(where, f"must be a table, got {v!r}")
    return v


def config_from_dict(data: dict) -> RunConfig:
    return _build(RunConfig, data, "")


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Load a TOML config (or the defaults) and apply dotted overrides like ``{"cluster.tp": 2}``."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise ConfigError(str(p), f"cannot read config ({e.strerror})") from None
        try:
            data = tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(str(p), f"malformed TOML ({e})") from None
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, "conflicts with a non-table value in the config")
        node[parts[-1]] = value
    return config_from_dict(data)


def with_overrides(cfg: RunConfig, **kw: Any) -> RunConfig:
    return replace(cfg, **kw)

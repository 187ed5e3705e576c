"""Run configuration: one nested, frozen tree loaded from TOML and overridden by flags.

Every field is declared with :func:`param`: its type, range, unit and help text live in the
field's metadata, and ``__post_init__`` checks them (:func:`check_params`) before anything else
looks at the values, raising :class:`~agentsim.errors.ConfigError` that names the field
(``cluster.tp: must be an integer >= 1, got 0``). Floats are finite unless a field says
otherwise (NaN and inf are refused). Unknown keys are rejected with the list of known ones.
Everything has a default: ``RunConfig()`` is the embedded default run (1 node x 4 A100-80GB,
Llama-3-8B TP1, 200 closed-loop ReAct agents, 10 minutes). The same mechanism declares the
parameters of the workload generators (:mod:`agentsim.traces.generators`).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from agentsim.errors import ConfigError


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(where, msg)


# --------------------------------------------------------------------------- declared parameters
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               dict: "a table", tuple: "an array"}


@dataclass(frozen=True)
class Param:
    """The declared type and range of one config or generator field (kept in the field's metadata).

    ``type``: int, float, bool, str, dict or tuple (an int is accepted for a float and converted;
    a bool is never a number). ``ge``/``gt``/``le``/``lt``: inclusive/exclusive bounds.
    ``choices``: the accepted strings (or a zero-argument callable returning them, for registries
    loaded lazily); error texts list exactly these. ``optional``: None is accepted. ``finite``:
    refuse NaN and +-inf (floats; default True). ``unit`` and ``help`` feed :meth:`describe`.
    """

    type: type
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | Callable[[], tuple] = ()
    optional: bool = False
    finite: bool = True
    nonempty: bool = False
    unit: str = ""
    help: str = ""

    def accepted(self) -> tuple:
        return tuple(self.choices()) if callable(self.choices) else tuple(self.choices)

    def range_text(self) -> str:
        """``an integer >= 1``, ``a number in (0, 1]``, ``one of v1, v0`` ..."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.accepted()))
        word = _TYPE_WORDS.get(self.type, self.type.__name__)
        lo = (self.ge, "[") if self.ge is not None else (self.gt, "(") if self.gt is not None else None
        hi = (self.le, "]") if self.le is not None else (self.lt, ")") if self.lt is not None else None
        if lo and hi:
            return f"{word} in {lo[1]}{lo[0]:g}, {hi[0]:g}{hi[1]}"
        if lo:
            return f"{word} {'>=' if lo[1] == '[' else '>'} {lo[0]:g}"
        if hi:
            return f"{word} {'<=' if hi[1] == ']' else '<'} {hi[0]:g}"
        if self.nonempty:
            return f"a non-empty {word.split(' ', 1)[1]}"
        if self.type is float and self.finite:
            return "a finite number"
        return word

    def describe(self) -> str:
        """Help text with range and unit, e.g. ``engine time-series period; a number > 0 (simulated s)``."""
        unit = f" ({self.unit})" if self.unit else ""
        return f"{self.help}; {self.range_text()}{unit}" if self.help else f"{self.range_text()}{unit}"

    def check(self, value: Any, where: str) -> Any:
        """``value`` converted to the declared type; ConfigError at ``where`` if it is outside the range."""
        if value is None:
            if self.optional:
                return None
            raise ConfigError(where, f"must be {self.range_text()}, got nothing (null)")
        t = self.type
        shown = value  # errors quote what the user wrote, before any conversion
        if t is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(where, f"must be {self.range_text()}, got {shown!r}")
            value = float(value)
            if self.finite and not math.isfinite(value):
                raise ConfigError(where, f"must be a finite number ({self.range_text()}), got {shown!r}")
        elif t is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(where, f"must be {self.range_text()}, got {shown!r}")
        elif t is tuple:
            if isinstance(value, list):
                value = tuple(value)
            if not isinstance(value, tuple):
                raise ConfigError(where, f"must be {self.range_text()}, got {shown!r}")
        elif not isinstance(value, t) or (t is not bool and isinstance(value, bool)):
            raise ConfigError(where, f"must be {self.range_text()}, got {shown!r}")
        if self.choices and value not in self.accepted():
            raise ConfigError(where, f"must be {self.range_text()}, got {shown!r}")
        if self.nonempty and not value:
            raise ConfigError(where, f"must be {self.range_text()}, got {shown!r}")
        if t in (int, float) and not (value != value):  # NaN passes only where finite=False
            if ((self.ge is not None and not value >= self.ge) or (self.gt is not None and not value > self.gt)
                    or (self.le is not None and not value <= self.le) or (self.lt is not None and not value < self.lt)):
                raise ConfigError(where, f"must be {self.range_text()}, got {shown!r}")
        return value


def param(default: Any = MISSING, help: str = "", *, type: type | None = None, unit: str = "",
          default_factory: Any = MISSING, **rules: Any) -> Any:
    """A dataclass field with a declared :class:`Param` (type from ``type`` or the default's type).

    ``rules``: ``ge``, ``gt``, ``le``, ``lt``, ``choices``, ``finite``, ``nonempty``. A default of
    None makes the field optional.
    """
    sample = default if default is not MISSING else (default_factory() if default_factory is not MISSING else None)
    t = type if type is not None else (float if isinstance(sample, float) else builtins_type(sample))
    spec = Param(t, optional=default is None, unit=unit, help=help, **rules)
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata={"param": spec})
    return field(default=default, metadata={"param": spec})


def builtins_type(value: Any) -> type:
    for t in (bool, int, float, str, dict, tuple):
        if isinstance(value, t):
            return t
    raise TypeError(f"param(): give type= for a default of {value!r}")


def param_of(f: Any) -> Param | None:
    """The :class:`Param` declared for dataclass field ``f`` (None for nested sections)."""
    return f.metadata.get("param")


def check_params(obj: Any, where: str = "") -> None:
    """Check every declared field of dataclass ``obj`` (frozen or not); converts ints to floats.

    Raises ConfigError naming ``where.field`` (``field`` alone when ``where`` is empty).
    """
    for f in fields(obj):
        spec = f.metadata.get("param")
        if spec is None:
            continue
        v = getattr(obj, f.name)
        nv = spec.check(v, f"{where}.{f.name}" if where else f.name)
        if nv is not v:
            object.__setattr__(obj, f.name, nv)


def describe_params(cls: type) -> dict[str, str]:
    """``{field: "help; range (unit)"}`` for a dataclass with declared fields (help screens, docs)."""
    return {f.name: f.metadata["param"].describe() for f in fields(cls) if "param" in f.metadata}


def _trace_formats() -> tuple:
    from agentsim.traces.importers import accepted_formats  # lazily: the trace registry imports pyarrow

    return accepted_formats()


# Engine defaults that differ between vLLM versions, applied to the fields left unset (None):
# ``vllm_version`` picks the engine (``scheduler``), the engine picks the rest. "latest" is vLLM's
# V1 engine (the default since 0.8); "0.6" and "0.7" run the V0 engine, where prefix caching and
# chunked prefill are off by default (``vllm/config.py`` ``CacheConfig`` / ``SchedulerConfig`` and
# ``vllm/engine/arg_utils.py`` ``EngineArgs`` of v0.6.x).
VLLM_VERSION_SCHEDULER: dict[str, str] = {"latest": "v1", "0.7": "v0", "0.6": "v0"}
SCHEDULER_DEFAULTS: dict[str, dict[str, Any]] = {
    "v1": {"enable_chunked_prefill": True, "enable_prefix_caching": True},
    "v0": {"enable_chunked_prefill": False, "enable_prefix_caching": False},
}
V1_MAX_NUM_BATCHED_TOKENS = 8192  # agentsim's V1 default (vLLM V1's LLM-class default on GPUs)


def default_max_num_batched_tokens(scheduler: str, enable_chunked_prefill: bool, num_scheduler_steps: int,
                                   max_model_len: int) -> int:
    """vLLM's default ``max_num_batched_tokens`` (tokens per step) for one engine version.

    V0 (``SchedulerConfig.__init__`` in ``vllm/config.py``, v0.6.x): without chunked prefill
    ``max(max_model_len, 2048)`` (a whole prompt must fit one step); with chunked prefill 512, or
    ``max(max_model_len, 2048)`` with multi-step (which does not chunk prompts). V1: 8192.
    """
    if scheduler == "v0":
        if enable_chunked_prefill and num_scheduler_steps == 1:
            return 512
        return max(max_model_len, 2048)
    return V1_MAX_NUM_BATCHED_TOKENS


@dataclass(frozen=True)
class EngineLimits:
    """vLLM engine arguments that shape scheduling (defaults: vLLM's V1 engine on an 80 GB GPU).

    Names and meanings follow vLLM's ``EngineArgs`` (``vllm/engine/arg_utils.py``). ``vllm_version``
    picks the defaults of ``scheduler``, ``enable_chunked_prefill``, ``enable_prefix_caching`` and
    ``max_num_batched_tokens`` for the fields left unset (the version picks the engine, the engine
    the rest: :data:`VLLM_VERSION_SCHEDULER`, :data:`SCHEDULER_DEFAULTS`); after
    construction they are always concrete, except ``max_num_batched_tokens`` of a V0 engine whose
    ``max_model_len`` comes from the profile: :meth:`resolved` fills it. ``scheduler = "v0"`` and
    ``num_scheduler_steps`` are simulator-only (live engines run vLLM 0.32, V1).
    """

    block_size: int = param(16, "--block-size: tokens per KV block", ge=1, unit="tokens")
    max_num_batched_tokens: int | None = param(
        None, "--max-num-batched-tokens: token budget per step (default: the version's, 8192 for V1, "
        "max(max_model_len, 2048) for V0 without chunked prefill, 512 with it)", type=int, ge=1, unit="tokens")
    max_num_seqs: int = param(256, "--max-num-seqs: sequences per step", ge=1, unit="sequences")
    enable_chunked_prefill: bool | None = param(None, "--enable-chunked-prefill (default: the version's, "
                                                "on for V1, off for V0)", type=bool)
    enable_prefix_caching: bool | None = param(None, "--enable-prefix-caching (default: the version's, "
                                               "on for V1, off for V0)", type=bool)
    max_model_len: int | None = param(None, "--max-model-len (default: the profile's model)", type=int, ge=2,
                                      unit="tokens")
    num_gpu_blocks_override: int | None = param(None, "--num-gpu-blocks-override: force a small KV cache; "
                                                "vLLM V1 keeps one of them as its null block", type=int, ge=1,
                                                unit="blocks")
    scheduler: str | None = param(None, "v1 (mixed batches, vLLM >= 0.8) or v0 (prefill-first, simulator "
                                  "only; default: the version's)", type=str, choices=("v1", "v0"))
    num_scheduler_steps: int = param(1, "--num-scheduler-steps: V0 multi-step, K decode steps per schedule",
                                     ge=1, unit="steps")
    api_server_count: int = param(1, "--api-server-count: frontend workers (costs from the profile)", ge=1,
                                  unit="processes")
    vllm_version: str = param("latest", "vLLM version whose defaults fill the fields left unset",
                              choices=tuple(VLLM_VERSION_SCHEDULER))

    def __post_init__(self) -> None:
        w = "cluster.engine"
        check_params(self, w)
        if self.scheduler is None:
            object.__setattr__(self, "scheduler", VLLM_VERSION_SCHEDULER[self.vllm_version])
        for name, value in SCHEDULER_DEFAULTS[self.scheduler].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        _check(self.num_scheduler_steps == 1 or self.scheduler == "v0", f"{w}.num_scheduler_steps",
               "multi-step scheduling exists only in vLLM's V0 engine (set scheduler = \"v0\")")
        if self.max_num_batched_tokens is None and (self.scheduler == "v1" or self.max_model_len is not None):
            object.__setattr__(self, "max_num_batched_tokens", default_max_num_batched_tokens(
                self.scheduler, self.enable_chunked_prefill, self.num_scheduler_steps, self.max_model_len or 0))

    def resolved(self, max_model_len: int) -> "EngineLimits":
        """These limits with ``max_num_batched_tokens`` filled for a model of ``max_model_len`` tokens."""
        if self.max_num_batched_tokens is not None:
            return self
        return replace(self, max_num_batched_tokens=default_max_num_batched_tokens(
            self.scheduler, self.enable_chunked_prefill, self.num_scheduler_steps, max_model_len))


ROLES = ("prefill", "decode", "mixed")


@dataclass(frozen=True)
class NetworkSpec:
    """Links KV moves over between engines (:mod:`agentsim.sim.network`), per GPU and direction.

    Bandwidths default to the profile's GPU kind (``Profile.links``: NVLink, PCIe, and the per-GPU NIC
    as ``internode_GBps``, :data:`agentsim.calibration.hardware.GPUS`); an engine of TP ``t`` has ``t``
    GPUs, so ``t`` times the per-GPU figure. Latencies are one-way, per transfer.
    """

    intra_node: str = param("nvlink", "link between engines of one node: nvlink (NVLink/NVSwitch) or pcie",
                            choices=("nvlink", "pcie"))
    nvlink_GBps: float | None = param(None, "NVLink bandwidth per GPU and direction (default: the GPU kind's)",
                                      type=float, gt=0, unit="GB/s")
    pcie_GBps: float | None = param(None, "PCIe bandwidth per GPU and direction (default: the GPU kind's)",
                                    type=float, gt=0, unit="GB/s")
    nic_GBps: float | None = param(None, "inter-node NIC (IB/RoCE) bandwidth per GPU and direction (default: the "
                                   "GPU kind's, 25 GB/s = 200 Gb/s on A100)", type=float, gt=0, unit="GB/s")
    intra_node_latency: float = param(1e-5, "one-way latency of a transfer within a node", ge=0, unit="s")
    inter_node_latency: float = param(2e-5, "one-way latency of a transfer between nodes", ge=0, unit="s")

    def __post_init__(self) -> None:
        check_params(self, "cluster.network")


@dataclass(frozen=True)
class DisaggSpec:
    """Engine roles for prefill/decode disaggregation and cross-engine KV fetch (:mod:`agentsim.sim.disagg`).

    ``roles`` (one per engine id, engines numbered node by node) or ``node_roles`` (one per node, for all
    its engines); engines not named are ``mixed``. With a ``prefill`` or ``decode`` engine a call is
    prefilled (``max_tokens = 1``) on a prefill-capable engine, its KV moves to a decode-capable one,
    which decodes it (vLLM's P/D proxy, ``examples/online_serving/disaggregated_serving``).
    """

    roles: tuple = param((), "role per engine id: prefill, decode or mixed (unlisted engines: mixed)", type=tuple)
    node_roles: tuple = param((), "role per node id, for every engine of the node (unlisted nodes: mixed)",
                              type=tuple)
    transfer: str = param("layerwise", "P->D KV transfer: layerwise (pipelined with the prefill's layers) or "
                          "whole (after the prefill)", choices=("layerwise", "whole"))
    prefix_fetch: str = param("off", "cross-engine prefix fetch policy (agentsim.policies.kvfetch): off, "
                              "cheaper (fetch when the transfer beats recompute), always",
                              choices=("off", "cheaper", "always"))
    fetch_margin: float = param(1.0, "cheaper: fetch when transfer time x margin < recompute time", gt=0)

    def __post_init__(self) -> None:
        check_params(self, "cluster.disagg")
        for name in ("roles", "node_roles"):
            for i, r in enumerate(getattr(self, name)):
                _check(r in ROLES, f"cluster.disagg.{name}[{i}]", f"must be one of {', '.join(ROLES)}, got {r!r}")
        _check(not (self.roles and self.node_roles), "cluster.disagg.node_roles",
               "give roles per engine (roles) or per node (node_roles), not both")


@dataclass(frozen=True)
class RouterSpec:
    """What a routing decision costs (a central router, e.g. vLLM's P/D proxy or llm-d's gateway)."""

    decision_cost: float = param(0.0, "router compute time per routing decision", ge=0, unit="s")
    rtt: float = param(0.0, "network round trip client -> router per decision", ge=0, unit="s")

    def __post_init__(self) -> None:
        check_params(self, "cluster.router")


@dataclass(frozen=True)
class ClusterSpec:
    """Nodes x GPUs, GPU kind, model, tensor parallelism, engine limits, links, roles and router."""

    num_nodes: int = param(1, "nodes", ge=1, unit="nodes")
    gpus_per_node: int = param(4, "GPUs per node", ge=1, unit="GPUs")
    gpu: str = param("a100-80gb", "GPU kind (a shipped profile's GPU)", nonempty=True)
    model: str = param("llama-3-8b", "model (a shipped profile's model)", nonempty=True)
    tp: int = param(1, "tensor-parallel degree per engine", ge=1, unit="GPUs")
    engines_per_node: int | None = param(None, "engines per node (default: gpus_per_node // tp; a cluster "
                                         "with zero engines cannot serve)", type=int, ge=1, unit="engines")
    profile: str | None = param(None, "profile name or JSON path (default: shipped for gpu/model/tp)", type=str,
                                nonempty=True)
    engine: EngineLimits = field(default_factory=EngineLimits)
    network: NetworkSpec = field(default_factory=NetworkSpec)
    disagg: DisaggSpec = field(default_factory=DisaggSpec)
    router: RouterSpec = field(default_factory=RouterSpec)

    def __post_init__(self) -> None:
        check_params(self, "cluster")
        _check(self.tp <= self.gpus_per_node, "cluster.tp",
               f"tensor parallel degree {self.tp} exceeds gpus_per_node {self.gpus_per_node}")
        if self.engines_per_node is not None:
            _check(self.engines_per_node * self.tp <= self.gpus_per_node, "cluster.engines_per_node",
                   f"{self.engines_per_node} engines x TP {self.tp} need more than {self.gpus_per_node} GPUs per node")
        for name, cls in (("network", NetworkSpec), ("disagg", DisaggSpec), ("router", RouterSpec)):
            _check(isinstance(getattr(self, name), cls), f"cluster.{name}", "must be a table")
        d = self.disagg
        _check(len(d.node_roles) <= self.num_nodes, "cluster.disagg.node_roles",
               f"{len(d.node_roles)} roles for {self.num_nodes} node(s): node {self.num_nodes} does not exist")
        _check(len(d.roles) <= self.num_engines, "cluster.disagg.roles",
               f"{len(d.roles)} roles for {self.num_engines} engine(s) ({self.num_nodes} node(s) x "
               f"{self.num_engines_per_node}): engine {self.num_engines} does not exist")
        roles = self.engine_roles
        if any(r != "mixed" for r in roles):
            _check(any(r in ("prefill", "mixed") for r in roles), "cluster.disagg",
                   "no engine can prefill (every engine is decode-only); give at least one prefill or mixed engine")
            _check(any(r in ("decode", "mixed") for r in roles), "cluster.disagg",
                   "no engine can decode (every engine is prefill-only); give at least one decode or mixed engine")

    @property
    def engine_roles(self) -> tuple[str, ...]:
        """The role of each engine id (``mixed`` unless ``disagg.roles`` / ``disagg.node_roles`` say otherwise)."""
        d = self.disagg
        per = self.num_engines_per_node
        if d.node_roles:
            return tuple(d.node_roles[i // per] if i // per < len(d.node_roles) else "mixed"
                         for i in range(self.num_engines))
        return tuple(d.roles) + ("mixed",) * (self.num_engines - len(d.roles))

    @property
    def num_engines_per_node(self) -> int:
        return self.engines_per_node if self.engines_per_node is not None else self.gpus_per_node // self.tp

    @property
    def num_engines(self) -> int:
        return self.num_nodes * self.num_engines_per_node


@dataclass(frozen=True)
class MixEntry:
    generator: str = param("react", "a registered generator", nonempty=True)
    weight: float = param(1.0, "relative share of programs", gt=0)
    params: dict = param(default_factory=dict, help="the generator's parameters")

    def __post_init__(self) -> None:
        check_params(self, "")


@dataclass(frozen=True)
class WorkloadSpec:
    """What runs: generator(s) and arrivals (closed-loop agents, Poisson programs/s, or a trace)."""

    generator: str = param("react", "a registered generator (see `agentsim trace generate`)", nonempty=True)
    params: dict = param(default_factory=dict, help="the generator's parameters")
    mix: tuple[MixEntry, ...] = ()            # several generators with weights (overrides generator)
    arrival: str = param("closed", "closed-loop agents, Poisson arrivals or a trace",
                         choices=("closed", "poisson", "trace"))
    agents: int = param(200, "closed: programs in flight (one per agent)", ge=1, unit="agents")
    rate: float = param(1.0, "poisson: arrival rate", gt=0, unit="programs/s")
    num_programs: int | None = param(None, "stop starting programs after this many", type=int, ge=1,
                                     unit="programs")
    trace: str | None = param(None, "trace file (arrival = \"trace\")", type=str, nonempty=True)
    trace_format: str | None = param(None, "trace format (default: guessed from the file)", type=str,
                                     choices=_trace_formats)
    time_scale: float = param(1.0, "trace: multiply arrival offsets (2 = half the rate)", gt=0)
    limit: int | None = param(None, "trace: replay the first N programs only", type=int, ge=1, unit="programs")

    def __post_init__(self) -> None:
        check_params(self, "workload")
        if self.arrival == "trace":
            _check(bool(self.trace), "workload.trace", "arrival = 'trace' needs a trace file")
            # a trace's programs are its own: a count meant for generated programs would be ignored
            _check(self.num_programs is None, "workload.num_programs",
                   "counts generated programs (closed or poisson arrivals); to replay part of a trace "
                   "use workload.limit (--limit)")
        if not isinstance(self.mix, tuple):
            raise ConfigError("workload.mix", "must be an array of tables [[workload.mix]]")
        for i, m in enumerate(self.mix):
            if not isinstance(m, MixEntry):
                raise ConfigError(f"workload.mix[{i}]", "must be a table with generator, weight, params")
            check_params(m, f"workload.mix[{i}]")
        if self.mix and not math.isfinite(sum(m.weight for m in self.mix)):
            raise ConfigError("workload.mix", "the weights add up to more than a float holds; they are relative "
                                              "shares, so scale them down (e.g. 1 and 3)")


#: The finest engine time-series period (simulated s). A finer one fills memory with rows (one per
#: engine per period), and one below the clock's resolution never advances it: the run hangs
#: (``1e-17`` did). Engine steps take milliseconds, so nothing finer is needed.
MIN_SAMPLE_INTERVAL = 1e-3


@dataclass(frozen=True)
class SimOptions:
    fast_forward: bool = param(True, "advance decode-only stretches as one event")
    sample_interval: float = param(1.0, "engine time-series period", ge=MIN_SAMPLE_INTERVAL, unit="simulated s")
    max_ff_steps: int = param(1_000_000, "cap on one fast-forward window", ge=1, unit="steps")
    drain: bool = param(False, "after duration, stop new programs and finish the rest")

    def __post_init__(self) -> None:
        check_params(self, "sim")


@dataclass(frozen=True)
class RunConfig:
    seed: int = param(0, "root seed", ge=0)
    duration: float = param(600.0, "simulated time; bounds arrivals (a trace replays whole unless it is set)",
                            gt=0, unit="s")
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    policy: Any = "vllm"                      # bundle name, or {name, route, order, evict, shape, params}
    sim: SimOptions = field(default_factory=SimOptions)
    slo_ttft: float | None = param(None, "TTFT SLO for goodput", type=float, gt=0, unit="s")
    slo_tpot: float | None = param(None, "TPOT SLO for goodput", type=float, gt=0, unit="s")
    duration_given: bool = param(True, "whether duration was set; when false a trace replays whole (the loader "
                                       "sets it from the TOML and flags; True for a RunConfig built in Python)")

    def __post_init__(self) -> None:
        check_params(self, "")
        for name, cls in (("cluster", ClusterSpec), ("workload", WorkloadSpec), ("sim", SimOptions)):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(name, f"must be a table, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)


_SECTIONS = {"cluster": ClusterSpec, "workload": WorkloadSpec, "sim": SimOptions}
_CLUSTER_SECTIONS = {"engine": EngineLimits, "network": NetworkSpec, "disagg": DisaggSpec, "router": RouterSpec}


def _build(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(where or "config", f"must be a table, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k not in known:
            raise ConfigError(f"{where}.{k}" if where else k, f"unknown field (known: {', '.join(known)})")
        sub = f"{where}.{k}" if where else k
        if cls is ClusterSpec and k in _CLUSTER_SECTIONS:
            v = _build(_CLUSTER_SECTIONS[k], v, sub)
        elif cls is WorkloadSpec and k == "mix":
            if not isinstance(v, (list, tuple)):
                raise ConfigError(sub, "must be an array of tables [[workload.mix]]")
            v = tuple(_build(MixEntry, m, f"{sub}[{i}]") for i, m in enumerate(v))
        elif cls is RunConfig and k in _SECTIONS:
            v = _build(_SECTIONS[k], v, sub)
        else:
            spec = param_of(known[k])
            if spec is not None:  # check here too, so the error names the full dotted path
                v = spec.check(v, sub)
        kwargs[k] = v
    return cls(**kwargs)


def config_from_dict(data: dict) -> RunConfig:
    """A checked :class:`RunConfig` from a nested dict (a parsed TOML); raises ConfigError naming the field.

    ``duration_given`` is derived from whether ``duration`` is present (unless the dict says it,
    as ``RunConfig.to_dict()`` does), so ``config_from_dict(cfg.to_dict()) == cfg``.
    """
    if isinstance(data, dict) and "duration_given" not in data:
        data = {**data, "duration_given": "duration" in data}
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

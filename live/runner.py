"""``run_live(cfg, settings)``: a :class:`~agentsim.config.RunConfig` on real engines, end to end.

The cluster spec becomes engines (``num_nodes`` x ``engines_per_node``, TP inside a node, the
engine limits of ``cluster.engine``), the workload spec becomes a
:class:`~agentsim.traces.source.ProgramSource`, the policy spec becomes the same
:class:`~agentsim.policies.base.PolicyBundle` the simulator uses. Engines run either in a local
multi-node Ray cluster (``local_nodes``), on an existing Ray cluster (``address``) or behind
existing OpenAI-compatible vLLM servers (``endpoints``). ``cluster.model`` names the simulator's
profile; the live model is ``settings.model`` (default: a tiny random Llama made on the spot).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agentsim.config import RunConfig
from agentsim.errors import ConfigError
from agentsim.live.driver import LiveDriver, LiveOptions, LiveResult, RayEngineClient

TINY = "tiny"


@dataclass
class LiveSettings:
    """Where and how the engines run (everything that is not in the shared RunConfig)."""

    local_nodes: int | None = None        # start an embedded Ray cluster with this many nodes
    address: str | None = None            # or join this Ray cluster ("auto" or HOST:PORT)
    endpoints: tuple[str, ...] = ()       # or drive these OpenAI-compatible vLLM servers (no Ray)
    model: str = TINY                     # model dir / HF id, or "tiny" (made offline)
    model_cache: str | None = None        # where the tiny model is made (default ~/.cache/agentsim)
    load_format: str | None = None        # default: "dummy" (random weights) for tiny, else "auto"
    dtype: str | None = None              # default: float32 for tiny (CPU), else vLLM's "auto"
    data_plane: str | None = None         # loopback | node | ray (default: loopback locally, ray on --address)
    kv_cache_gib: float = 1.0             # CPU backend: KV cache per engine
    object_store_mb: int = 80             # local cluster: object store per node
    max_model_len: int | None = None      # default: cluster.engine.max_model_len or 8192
    force_engine_scheduler: bool = False  # host the order/evict policies in vLLM even for FCFS/LRU
    policy_imports: tuple[str, ...] = ()  # extra modules that register policies (imported in engines too)
    scheduler_log_dir: str | None = None
    engine_env: dict = field(default_factory=dict)
    kv_connector: str = "example"         # P/D roles: example (vLLM's disk-based connector) or nixl (agentsim.live.pd)
    options: LiveOptions = field(default_factory=LiveOptions)
    log_to_driver: bool = False
    progress: Any = None                  # progress(line): start-up and run progress (cluster, engines, programs)

    def __post_init__(self) -> None:
        n = sum(x is not None and x != () for x in (self.local_nodes, self.address, self.endpoints or None))
        if n > 1:
            raise ConfigError("live", "give only one of --local-nodes, --address and --endpoints")
        if self.local_nodes is not None and self.local_nodes < 1:
            raise ConfigError("--local-nodes", f"must be >= 1, got {self.local_nodes}")
        if self.kv_cache_gib <= 0:
            raise ConfigError("--kv-cache-gib", "must be > 0")
        if self.data_plane not in (None, "loopback", "node", "ray"):
            raise ConfigError("--data-plane", f"must be loopback, node or ray, got {self.data_plane!r}")

    def _model_defaults(self) -> dict:
        """Load format and dtype the model itself calls for: agentsim's tiny model (``tiny``, or a
        directory made by ``agentsim.live.tiny_model``) has no weights and is float32; anything
        else is loaded as vLLM would (``auto``). Decided from the directory, never from its name."""
        if self.model == TINY:
            return {"load_format": "dummy", "dtype": "float32"}
        from agentsim.live.tiny_model import tiny_model_defaults

        return tiny_model_defaults(self.model) or {"load_format": "auto", "dtype": "auto"}

    @property
    def resolved_load_format(self) -> str:
        return self.load_format or self._model_defaults()["load_format"]

    @property
    def resolved_dtype(self) -> str:
        return self.dtype or self._model_defaults()["dtype"]

    @property
    def data_plane_host(self) -> str | None:
        mode = self.data_plane or ("ray" if self.address else "loopback")
        return {"loopback": "127.0.0.1", "node": "node", "ray": None}[mode]


def default_model_cache() -> Path:
    return Path(os.environ.get("AGENTSIM_CACHE", Path.home() / ".cache" / "agentsim"))


def resolve_model(settings: LiveSettings) -> str:
    if settings.model != TINY:
        return settings.model
    from agentsim.live.tiny_model import make_default_tiny

    base = Path(settings.model_cache) if settings.model_cache else default_model_cache()
    return str(make_default_tiny(base / "tiny-llama"))


def needs_engine_scheduler(bundle: Any) -> bool:
    """True when the order/evict policies need more than vLLM's priority number and LRU."""
    from agentsim.policies.baseline import LRU

    return bool(bundle.caps.dynamic or bundle.caps.preemptive
                or not isinstance(bundle.evict, LRU))


def engine_specs(cfg: RunConfig, settings: LiveSettings, model: str, run_tag: str, scheduler: dict | None,
                 gpu: bool = False) -> list[dict]:
    from agentsim.live.engine import EngineSpec

    c = cfg.cluster
    e = c.engine
    max_len = settings.max_model_len or e.max_model_len or 8192
    if e.scheduler != "v1":
        raise ConfigError("cluster.engine.scheduler", "V0 scheduling (and num_scheduler_steps) is simulator-only: "
                          "live engines run vLLM 0.32, whose only engine is V1")
    # vLLM checks that one request of max_model_len fits the blocks left after its null block
    # (vllm/v1/core/kv_cache_utils.py get_kv_cache_configs: "Reserve the null block")
    if e.num_gpu_blocks_override is not None and -(-max_len // e.block_size) > e.num_gpu_blocks_override - 1:
        raise ConfigError("cluster.engine.num_gpu_blocks_override",
                          f"{e.num_gpu_blocks_override} blocks x {e.block_size} tokens (one kept as vLLM's null block) "
                          f"cannot hold one request of max_model_len {max_len} (vLLM refuses to start); raise it or "
                          "lower max_model_len")
    specs = []
    eid = 0
    for node in range(c.num_nodes):
        for _ in range(c.num_engines_per_node):
            sched = None
            if scheduler is not None:
                sched = dict(scheduler)
                if settings.scheduler_log_dir:
                    sched["log"] = str(Path(settings.scheduler_log_dir) / f"engine{eid}.jsonl")
            specs.append(EngineSpec(
                engine_id=eid, node_id=node, model=model, run_tag=run_tag, load_format=settings.resolved_load_format,
                dtype=settings.resolved_dtype, block_size=e.block_size, enforce_eager=not gpu,
                data_plane_host=settings.data_plane_host, max_model_len=max_len, max_num_seqs=e.max_num_seqs,
                max_num_batched_tokens=max(e.max_num_batched_tokens, max_len) if not e.enable_chunked_prefill
                else e.max_num_batched_tokens,
                enable_chunked_prefill=e.enable_chunked_prefill, enable_prefix_caching=e.enable_prefix_caching,
                num_gpu_blocks_override=e.num_gpu_blocks_override, tp=c.tp, kv_cache_gib=settings.kv_cache_gib,
                scheduler=sched, seed=cfg.seed, env=dict(settings.engine_env),
            ).to_dict())
            eid += 1
    return specs


def check_cpu_limits(cfg: RunConfig) -> None:
    """vLLM's CPU backend needs block sizes that are multiples of 32 (skipped where GPUs are visible)."""
    if _local_gpus():
        return
    bs = cfg.cluster.engine.block_size
    if bs % 32:
        raise ConfigError("cluster.engine.block_size",
                          f"{bs} is not a multiple of 32, which vLLM's CPU backend requires (use 32 or 64)")


def manifest_base(cfg: RunConfig, settings: LiveSettings, model: str) -> dict:
    """The live run's manifest before the driver adds its own keys: :func:`agentsim.metrics.run_manifest`
    (the one manifest builder of sim and live, git revision included) with the live settings."""
    from agentsim.live.compat import ray_version, vllm_version
    from agentsim.metrics import run_manifest

    where = (f"local {settings.local_nodes}-node Ray cluster" if settings.local_nodes
             else f"Ray cluster {settings.address}" if settings.address
             else f"endpoints {','.join(settings.endpoints)}")
    return run_manifest(
        "live", cfg.to_dict(), cfg.seed, {"vllm": vllm_version(), "ray": ray_version()},
        live_model=model, load_format=settings.resolved_load_format, dtype=settings.resolved_dtype,
        cluster=where, created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        live_options={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings.options).items()},
    )


def run_live(cfg: RunConfig, settings: LiveSettings, out_dir: str | Path | None = None) -> LiveResult:
    """Run ``cfg`` on real engines and write results to ``out_dir`` (if given)."""
    from agentsim.live.compat import check_vllm
    from agentsim.policies.registry import make_bundle
    from agentsim.traces.source import ProgramSource

    import importlib

    for mod in settings.policy_imports:
        importlib.import_module(mod)
    bundle = make_bundle(cfg.policy)
    source = ProgramSource(cfg.workload, cfg.seed)
    opt = replace(settings.options, duration=cfg.duration,
                  slo_ttft=cfg.slo_ttft if settings.options.slo_ttft is None else settings.options.slo_ttft,
                  slo_tpot=cfg.slo_tpot if settings.options.slo_tpot is None else settings.options.slo_tpot)
    from agentsim.live import pd

    roles = cfg.cluster.engine_roles
    pd.check_live_roles(roles, endpoints=bool(settings.endpoints), address=settings.address,
                        connector=settings.kv_connector)
    if settings.endpoints:
        from agentsim.live.http import run_endpoints

        return run_endpoints(cfg, settings, bundle, source, opt, out_dir)
    check_vllm()
    if not settings.address:
        check_cpu_limits(cfg)  # the embedded cluster runs vLLM's CPU backend unless this host has GPUs
    say = settings.progress or (lambda line: None)
    model = resolve_model(settings)
    say(f"model {model}: load format {settings.resolved_load_format}, dtype {settings.resolved_dtype}")
    run_tag = uuid.uuid4().hex[:8]
    scheduler = None
    if settings.force_engine_scheduler or needs_engine_scheduler(bundle):
        scheduler = {"policy": cfg.policy, "force_free_queue": settings.force_engine_scheduler,
                     "imports": list(settings.policy_imports)}
    engine_specs(cfg, settings, model, run_tag, scheduler)  # validate before starting anything
    from agentsim.live.cluster import RayCluster

    t0 = time.monotonic()
    if settings.address:
        say(f"joining Ray cluster {settings.address}")
        cluster = RayCluster.connect(settings.address, cfg.cluster.num_nodes, settings.log_to_driver)
    else:
        say(f"starting a local {settings.local_nodes or cfg.cluster.num_nodes}-node Ray cluster on 127.0.0.1")
        cluster = RayCluster.local(settings.local_nodes or cfg.cluster.num_nodes, settings.object_store_mb,
                                   log_to_driver=settings.log_to_driver)
    say(f"Ray cluster up ({time.monotonic() - t0:.0f} s)")
    with cluster, pd.PDStorage(enabled=pd.is_disaggregated(roles)) as pd_store:
        specs = engine_specs(cfg, settings, model, run_tag, scheduler, gpu=cluster.has_gpus())
        if pd_store.path is not None:  # P/D: each role's KV connector (agentsim.live.pd)
            specs = pd.apply_roles(specs, roles, pd_store.path, connector=settings.kv_connector)
        say(f"starting {len(specs)} vLLM engine(s) (each loads the model and profiles its KV cache)")
        handles = cluster.start_engines(specs, progress=settings.progress)
        say(f"running the workload: programs start for {opt.duration:g} s"
            + (", then running ones finish" if opt.drain else ", then the run ends"))
        by_id = {h.engine_id: h for h in handles}
        clients = pd.wrap_clients([RayEngineClient(h) for h in handles], roles, settings.kv_connector)
        manifest = manifest_base(cfg, settings, model)
        if pd_store.path is not None:
            manifest["pd"] = pd.manifest_entry(roles, settings.kv_connector)
        manifest["gpu"] = _gpu_summary(handles)
        driver = LiveDriver(clients, bundle, block_size=handles[0].info["block_size"], options=opt,
                            out_dir=out_dir, seed=cfg.seed, manifest=manifest,
                            on_kill=lambda eid: cluster.kill_engine(by_id[eid]),
                            max_num_seqs=cfg.cluster.engine.max_num_seqs, progress=settings.progress)
        result = driver.run(source)
        if pd_store.path is not None:
            result.manifest["pd"]["kv_transfer"] = pd.engine_transfer_totals(handles)
            if result.out_dir is not None:
                from agentsim import metrics as M

                M.write_results(result.out_dir, result.calls, result.programs, result.engines, result.summary,
                                result.manifest)
        if scheduler is not None:
            import ray

            recs = {}
            for h in handles:
                if h.alive:
                    try:
                        recs[h.engine_id] = len(ray.get(h.actor.scheduler_records.remote(), timeout=30))
                    except Exception:  # noqa: BLE001 - a dead engine has no records to give
                        pass
            result.manifest["scheduler_decisions"] = recs
            if result.out_dir is not None:
                from agentsim import metrics as M

                M.write_results(result.out_dir, result.calls, result.programs, result.engines, result.summary,
                                result.manifest)
    return result


def _local_gpus() -> bool:
    """GPUs visible on this host (NVML), without importing torch."""
    try:
        import pynvml
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:  # noqa: BLE001 - no driver: no GPU
        return False


def _gpu_summary(handles: list) -> Any:
    gpus = [h.info.get("gpus") for h in handles if h.info.get("gpus")]
    if not gpus:
        return "no GPU"
    return gpus

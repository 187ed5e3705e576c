"""A live session: one Ray cluster and its vLLM engines, started once, serving several runs in turn.

:func:`agentsim.live.runner.run_live` starts a cluster and its engines for one run and stops them at
the end. Measuring run-to-run noise needs the *same* engines to serve the same workload several
times (an engine start costs 20-50 s on a small CPU machine, and a fresh engine is a different
sample of the machine's state), so :class:`LiveSession` keeps them up::

    with LiveSession(cfg, settings) as s:          # cluster + engines of cfg.cluster
        r1 = s.run(cfg, out_dir="runs/a_r1")       # one LiveDriver run, results as run_live writes them
        r2 = s.run(cfg, out_dir="runs/a_r2")       # the same engines, prefix caches reset before each run

Each run is what ``run_live`` would do with the same config (same program source, policy bundle,
driver options, manifest fields); the driver resets every engine's prefix cache before it starts
(``LiveOptions.reset_prefix_cache``, vLLM's ``AsyncLLM.reset_prefix_cache``), so a repeat does not
hit blocks cached by the previous one. Runs given to one session must share its ``cluster`` section
(the engines are built from it); raises ``ValueError`` otherwise. Only a local embedded cluster
(``settings.local_nodes``) or an existing one (``settings.address``) is supported, not ``endpoints``.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from agentsim.config import RunConfig
from agentsim.live.driver import LiveDriver, LiveResult, RayEngineClient
from agentsim.live.runner import (LiveSettings, check_cpu_limits, engine_specs, manifest_base, needs_engine_scheduler,
                                  resolve_model)


class LiveSession:
    """Start the engines of ``cfg.cluster`` once (:meth:`start`, or ``with``), then :meth:`run` configs."""

    def __init__(self, cfg: RunConfig, settings: LiveSettings) -> None:
        if settings.endpoints:
            raise ValueError("LiveSession runs Ray engines; use run_live for --endpoints")
        self.cfg = cfg
        self.settings = settings
        self.cluster: Any = None
        self.handles: list = []
        self.model: str | None = None
        self.started_s: float | None = None   # seconds the cluster and engines took to start

    def start(self) -> "LiveSession":
        from agentsim.live.cluster import RayCluster
        from agentsim.live.compat import check_vllm
        from agentsim.policies.registry import make_bundle

        cfg, settings = self.cfg, self.settings
        check_vllm()
        if not settings.address:
            check_cpu_limits(cfg)
        say = settings.progress or (lambda line: None)
        self.model = resolve_model(settings)
        scheduler = None
        if settings.force_engine_scheduler or needs_engine_scheduler(make_bundle(cfg.policy)):
            scheduler = {"policy": cfg.policy, "force_free_queue": settings.force_engine_scheduler,
                         "imports": list(settings.policy_imports)}
        run_tag = uuid.uuid4().hex[:8]
        engine_specs(cfg, settings, self.model, run_tag, scheduler)  # validate before starting anything
        t0 = time.monotonic()
        if settings.address:
            self.cluster = RayCluster.connect(settings.address, cfg.cluster.num_nodes, settings.log_to_driver)
        else:
            self.cluster = RayCluster.local(settings.local_nodes or cfg.cluster.num_nodes, settings.object_store_mb,
                                            log_to_driver=settings.log_to_driver)
        try:
            specs = engine_specs(cfg, settings, self.model, run_tag, scheduler, gpu=self.cluster.has_gpus())
            say(f"starting {len(specs)} vLLM engine(s)")
            self.handles = self.cluster.start_engines(specs, progress=settings.progress)
        except BaseException:
            self.close()
            raise
        self.started_s = time.monotonic() - t0
        return self

    def run(self, cfg: RunConfig, out_dir: str | Path | None = None, manifest_extra: dict | None = None) -> LiveResult:
        """One run of ``cfg`` on the session's engines (``cfg.cluster`` must equal the session's);
        ``manifest_extra`` is added to the run's manifest (e.g. the host's load before the run)."""
        from agentsim.policies.registry import make_bundle
        from agentsim.traces.source import ProgramSource

        if self.cluster is None:
            raise RuntimeError("LiveSession.run before start()")
        if cfg.cluster != self.cfg.cluster:
            raise ValueError("LiveSession.run: the config's [cluster] differs from the engines the session started")
        settings = self.settings
        bundle = make_bundle(cfg.policy)
        if needs_engine_scheduler(bundle) != needs_engine_scheduler(make_bundle(self.cfg.policy)):
            raise ValueError("LiveSession.run: the policy needs another engine scheduler than the session's engines")
        source = ProgramSource(cfg.workload, cfg.seed)
        opt = replace(settings.options, duration=cfg.duration,
                      slo_ttft=cfg.slo_ttft if settings.options.slo_ttft is None else settings.options.slo_ttft,
                      slo_tpot=cfg.slo_tpot if settings.options.slo_tpot is None else settings.options.slo_tpot)
        manifest = manifest_base(cfg, settings, self.model)
        gpus = [h.info.get("gpus") for h in self.handles if h.info.get("gpus")]
        manifest["gpu"] = gpus or "no GPU"
        manifest.update(manifest_extra or {})
        by_id = {h.engine_id: h for h in self.handles}
        driver = LiveDriver([RayEngineClient(h) for h in self.handles if h.alive], bundle,
                            block_size=self.handles[0].info["block_size"], options=opt, out_dir=out_dir, seed=cfg.seed,
                            manifest=manifest, on_kill=lambda eid: self.cluster.kill_engine(by_id[eid]),
                            max_num_seqs=cfg.cluster.engine.max_num_seqs, progress=settings.progress)
        return driver.run(source)

    def engine_processes(self) -> list[list[str]]:
        """Per engine on this host: the names of its actor's descendant processes now (e.g.
        ``["VLLM::EngineCore"]``; a multiprocessing executor adds its worker), from psutil; engines on
        other hosts give ``[]``."""
        import psutil

        out = []
        here = os.uname().nodename
        for h in self.handles:
            names: list[str] = []
            if h.info.get("hostname") == here:
                try:
                    names = sorted(c.name() for c in psutil.Process(h.info["pid"]).children(recursive=True))
                except (psutil.Error, KeyError):
                    names = []
            out.append(names)
        return out

    def close(self) -> None:
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            cluster.__exit__(None, None, None)

    def __enter__(self) -> "LiveSession":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

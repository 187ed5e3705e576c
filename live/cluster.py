"""Ray for the live driver: an embedded local multi-node cluster, or an existing one; engine actors.

- :meth:`RayCluster.local` starts ``num_nodes`` raylets on this machine with
  ``ray.cluster_utils.Cluster``, each with a custom resource ``node<k>``, a small object store and
  loopback addresses, and connects to it. :meth:`RayCluster.connect` joins an existing cluster
  (``auto`` or ``HOST:PORT``) and places engines with node-affinity on its alive nodes.
- :meth:`RayCluster.start_engines` starts one :class:`~agentsim.live.engine.EngineHost` actor per
  engine spec, pinned to its node (and ``tp`` GPUs where the cluster has GPUs), and waits until
  every engine is up. Engine processes (the actor and its vLLM engine-core children) are
  recorded by pid so :meth:`shutdown` can make sure none outlives the run.

Ray is imported inside the methods.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from agentsim.errors import ConfigError


@dataclass
class EngineHandle:
    """A started engine: its actor handle and the facts it reported at start."""

    engine_id: int
    node_id: int
    actor: Any
    info: dict
    pids: list[int] = field(default_factory=list)
    alive: bool = True


class RayCluster:
    """A Ray connection plus what this run started on it (stop everything by handle)."""

    def __init__(self, local: Any | None, num_nodes: int, node_resources: bool) -> None:
        self._local = local
        self.num_nodes = num_nodes
        self.node_resources = node_resources
        self.engines: list[EngineHandle] = []
        self._node_ids: list[str] = []
        self._closed = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def local(cls, num_nodes: int, object_store_mb: int = 80, cpus_per_node: int = 1,
              log_to_driver: bool = False) -> "RayCluster":
        """Start an embedded ``num_nodes``-node cluster bound to 127.0.0.1 and connect to it."""
        if num_nodes < 1:
            raise ConfigError("--local-nodes", f"must be >= 1, got {num_nodes}")
        from agentsim.live.compat import check_ray

        check_ray()
        _force_loopback()
        import ray
        from ray.cluster_utils import Cluster

        if ray.is_initialized():  # a stale connection in this process would make ray.init fail
            ray.shutdown()
        store = int(object_store_mb) * 2**20
        common = dict(num_cpus=cpus_per_node, object_store_memory=store, node_ip_address="127.0.0.1")
        c = Cluster(initialize_head=True, connect=False,
                    head_node_args=dict(common, resources={"node0": 1.0}, include_dashboard=False))
        try:
            for k in range(1, num_nodes):
                c.add_node(**common, resources={f"node{k}": 1.0})
            c.wait_for_nodes(timeout=120)
            if not str(c.address).startswith("127.0.0.1:"):
                raise RuntimeError(f"local Ray cluster is not on loopback ({c.address})")
            ray.init(address=c.address, log_to_driver=log_to_driver, include_dashboard=False,
                     _node_ip_address="127.0.0.1")
        except BaseException:
            c.shutdown()
            raise
        return cls(c, num_nodes, node_resources=True)

    @classmethod
    def connect(cls, address: str, num_nodes: int | None = None, log_to_driver: bool = False) -> "RayCluster":
        """Join a running cluster; engines go to its alive nodes in a stable order."""
        from agentsim.live.compat import check_ray, check_ray_address

        check_ray()
        check_ray_address(address, "--address")   # ray.init retries a closed port for minutes
        import ray

        try:
            ray.init(address=address, log_to_driver=log_to_driver)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError("--address", f"cannot join Ray cluster {address!r}: {e}") from None
        nodes = sorted((n for n in ray.nodes() if n.get("Alive")),
                       key=lambda n: (n.get("NodeManagerAddress", ""), n["NodeID"]))
        if not nodes:
            ray.shutdown()
            raise ConfigError("--address", f"Ray cluster {address!r} has no alive nodes")
        self = cls(None, num_nodes or len(nodes), node_resources=False)
        self._node_ids = [n["NodeID"] for n in nodes]
        return self

    # ------------------------------------------------------------------ engines
    def has_gpus(self) -> bool:
        import ray

        return ray.cluster_resources().get("GPU", 0) > 0

    def _placement(self, node_id: int, tp: int) -> dict:
        import ray

        opts: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 1000, "max_restarts": 0}
        if ray.cluster_resources().get("GPU", 0) > 0:
            opts["num_gpus"] = tp
        if self.node_resources:
            opts["resources"] = {f"node{node_id}": 0.001}
        else:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            nid = self._node_ids[node_id % len(self._node_ids)]
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(nid, soft=False)
        return opts

    def start_engines(self, specs: list[dict], timeout: float = 600.0,
                      progress: Callable[[str], None] | None = None, tick: float = 15.0) -> list[EngineHandle]:
        """Start one actor per spec (all at once) and wait for every engine to be ready.

        ``progress(line)`` hears each engine as it becomes ready (with its start-up time) and, every
        ``tick`` seconds while some are still loading, how many are up — an engine takes 20-40 s
        on a small CPU machine and minutes for a large model on GPUs. An engine not ready within
        ``timeout`` seconds counts as failed; any failure stops every engine and raises RuntimeError
        naming each failed engine.
        """
        import ray

        from agentsim.live.engine import EngineHost

        say = progress or (lambda line: None)
        cls = ray.remote(EngineHost)
        t0 = time.monotonic()
        pending = []
        for spec in specs:
            actor = cls.options(**self._placement(spec["node_id"], spec.get("tp", 1)),
                                name=f"agentsim-engine-{spec['run_tag']}-{spec['engine_id']}").remote(spec)
            pending.append((spec, actor, actor.start.remote()))
        by_ref = {ref: (spec, actor) for spec, actor, ref in pending}
        results: dict[int, tuple[dict | None, str | None]] = {}
        waiting = [ref for _, _, ref in pending]
        next_tick = t0 + tick
        while waiting:
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                break
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=min(left, max(0.1, next_tick - time.monotonic())))
            for ref in ready:
                spec, _ = by_ref[ref]
                try:
                    info = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - report every engine that failed, then stop them all
                    last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
                    results[spec["engine_id"]] = (None, f"{type(e).__name__}: {last}")
                    say(f"engine {spec['engine_id']} failed to start ({time.monotonic() - t0:.0f} s)")
                    continue
                results[spec["engine_id"]] = (info, None)
                say(f"engine {spec['engine_id']} on node {spec['node_id']} ready "
                    f"({time.monotonic() - t0:.0f} s, {len(results)}/{len(specs)} up)")
            if waiting and time.monotonic() >= next_tick:
                say(f"waiting for {len(waiting)} engine(s) to load the model "
                    f"({time.monotonic() - t0:.0f} s, {len(results)}/{len(specs)} up)")
                next_tick += tick
        for ref in waiting:
            spec, _ = by_ref[ref]
            results[spec["engine_id"]] = (None, f"not ready within {timeout:g} s")
        handles: list[EngineHandle] = []
        errors = []
        for spec, actor, _ in pending:
            info, err = results[spec["engine_id"]]
            if info is None:
                errors.append(f"engine {spec['engine_id']}: {err}")
                handles.append(EngineHandle(spec["engine_id"], spec["node_id"], actor, {}, [], alive=False))
                continue
            handles.append(EngineHandle(spec["engine_id"], spec["node_id"], actor, info,
                                        [info["pid"], *info.get("child_pids", [])]))
        self.engines.extend(handles)
        if errors:
            self.stop_engines()
            raise RuntimeError("engines failed to start: " + "; ".join(errors))
        return handles

    def kill_engine(self, handle: EngineHandle) -> None:
        """Kill one engine actor abruptly (fault injection); its vLLM children are reaped too."""
        import ray

        ray.kill(handle.actor, no_restart=True)
        handle.alive = False
        self._reap(handle.pids, grace=5.0)
        remove_engine_temp_files(_local_actor_pids([handle]))

    def stop_engines(self) -> None:
        """Shut every engine down by its handle, then make sure its processes are gone."""
        import ray

        refs = []
        for h in self.engines:
            if h.alive:
                try:
                    refs.append(h.actor.shutdown.remote())
                except Exception:  # noqa: BLE001 - the actor may already be dead
                    pass
        if refs:
            try:
                ray.wait(refs, num_returns=len(refs), timeout=30)
            except Exception:  # noqa: BLE001
                pass
        for h in self.engines:
            try:
                ray.kill(h.actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
            h.alive = False
        self._reap([p for h in self.engines for p in h.pids], grace=10.0)
        remove_engine_temp_files(_local_actor_pids(self.engines))
        self.engines = []

    @staticmethod
    def _reap(pids: list[int], grace: float) -> None:
        """Wait for our own engine processes to exit; SIGKILL what is left (same host only)."""
        import psutil

        procs = []
        for pid in pids:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
        if not procs:
            return
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)

    def shutdown(self) -> None:
        """Stop engines, disconnect, and stop the embedded cluster (idempotent)."""
        if self._closed:
            return
        self._closed = True
        import ray

        try:
            self.stop_engines()
        finally:
            ray.shutdown()
            if self._local is not None:
                self._local.shutdown()
                self._local = None

    def __enter__(self) -> "RayCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _local_actor_pids(handles: list[EngineHandle]) -> list[int]:
    """The actor pids of the engines that ran on this host (their temp files are ours to clean)."""
    here = os.uname().nodename
    return [h.pids[0] for h in handles if h.pids and h.info.get("hostname") == here]


def remove_engine_temp_files(actor_pids: list[int], tmpdir: str | None = None) -> list[str]:
    """Delete what engine actors ``actor_pids`` left in the temp folder once their processes are gone.

    An :class:`~agentsim.live.engine.EngineHost` creates ``agentsim-kv-<pid>-<engine>.sock`` (vLLM's
    KV-event socket) and, when it hosts the scheduler without a log path, ``agentsim-sched-<pid>-
    <engine>.jsonl`` there (``live/engine.py``). Only files carrying these pids are touched, and only
    on this host (engines on other hosts clean nothing here). Returns the paths removed.
    """
    import glob
    import tempfile

    tmp = tmpdir or tempfile.gettempdir()
    gone = []
    for pid in actor_pids:
        for pattern in (f"agentsim-kv-{int(pid)}-*.sock", f"agentsim-sched-{int(pid)}-*.jsonl"):
            for path in glob.glob(os.path.join(tmp, pattern)):
                try:
                    os.unlink(path)
                    gone.append(path)
                except OSError:
                    pass
    return gone


def _force_loopback() -> None:
    """Make Ray use 127.0.0.1 for every node it starts from this process.

    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray resolve "this node's IP" to loopback instead
    of the routable interface. Ray reads it once, at import: if Ray was imported before (by the
    caller), its constant is set too, or the driver would look for the GCS on the machine's
    external address. Raylets and workers inherit the variable from this process.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # Ray's OOM killer acts on *host* memory: on a shared machine another user's job would get our
    # engines killed; leave out-of-memory to the kernel instead (override by setting it yourself)
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import sys

    consts = sys.modules.get("ray._private.ray_constants")
    if consts is not None:
        consts.ENABLE_RAY_CLUSTER = False


def wait_until(pred, timeout: float, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()

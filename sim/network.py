"""Links KV moves over between engines: bandwidth + latency, FIFO per link direction, busy-time series.

Topology (one entry per engine, engines numbered node by node as in the runner):

- **within a node**: each engine's GPUs reach the others over NVLink/NVSwitch (``intra_node =
  "nvlink"``, the DGX/HGX case) or over PCIe (``"pcie"``, cards without NVLink); a transfer
  occupies the source engine's egress port and the destination engine's ingress port.
- **between nodes**: each GPU has its own NIC (IB/RoCE, rail-optimised as in DGX A100/H100: 200 Gb/s
  HDR per A100, 400 Gb/s NDR per H100/H200); a transfer occupies the source engine's NIC egress and the
  destination engine's NIC ingress. The fabric between NICs is assumed non-blocking (a fat tree).

An engine of TP ``t`` holds its KV sharded over ``t`` GPUs, each sending its shard over its own link,
so its ports have ``t`` times the per-GPU bandwidth. Ports are full duplex: egress and ingress are
separate :class:`Link` objects. Per-GPU bandwidths default to the GPU kind's datasheet figures
(:data:`agentsim.calibration.hardware.GPUS`, carried in ``Profile.links``); ``cluster.network``
overrides them.

**Sharing rule: FIFO** (first come, first served) per link direction; a transfer starts when every
link of its path is free and holds them all for ``bytes / min(bandwidth)``, then arrives ``latency``
later (cut-through, no store-and-forward). Why FIFO rather than fair sharing: (1) vLLM's KV connectors
move one request's blocks as one batch of RDMA reads/writes posted in order on the engine pair's
queue pairs (``NixlConnector``: one read per request, ``start_load_kv``), so a link mostly drains
requests in order; (2) a transfer's completion time is known when it is queued, so the prefix-fetch
policy compares exact costs (:mod:`agentsim.policies.kvfetch`) and the model needs no rescheduling of
in-flight transfers (deterministic, no floating re-splits); (3) both rules are work-conserving, so the
link's busy time and the last completion of a backlog are the same -- FIFO finishes earlier transfers
sooner and none later than their fair-share bound for equal sizes. The cost: FIFO over a two-link
path can leave one link idle while the other is busy (no backfilling), which overstates queueing a
little under heavy cross traffic.

Every transfer's busy interval is recorded, so :meth:`Network.utilization` gives a per-link busy
fraction time series (the run's ``links.parquet``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

GB = 1e9


class Link:
    """One direction of one port: FIFO, ``bytes_per_s`` bandwidth; records busy intervals.

    ``busy_until``: when the last queued transfer leaves the link (s). ``intervals``: ``(start, end,
    bytes)`` per transfer, in start order (FIFO: starts are non-decreasing).
    """

    __slots__ = ("name", "kind", "direction", "node_id", "engine_id", "bytes_per_s", "busy_until", "bytes_sent",
                 "num_transfers", "intervals")

    def __init__(self, name: str, kind: str, direction: str, node_id: int, engine_id: int, GBps: float) -> None:
        if not (GBps > 0 and math.isfinite(GBps)):
            raise ValueError(f"link {name}: bandwidth must be a finite number > 0 GB/s, got {GBps!r}")
        self.name = name
        self.kind = kind
        self.direction = direction
        self.node_id = node_id
        self.engine_id = engine_id
        self.bytes_per_s = GBps * GB
        self.busy_until = 0.0
        self.bytes_sent = 0
        self.num_transfers = 0
        self.intervals: list[tuple[float, float, int]] = []


@dataclass(frozen=True, slots=True)
class Transfer:
    """One queued transfer: ``start``/``end`` of its link occupation and ``done`` (arrival at the
    destination, ``end`` + latency, or later for a layer-wise transfer waiting for the last layer), in
    seconds on the run clock; ``nbytes`` moved; ``links``: names of the links on its path."""

    src: int
    dst: int
    nbytes: int
    start: float
    end: float
    done: float
    links: tuple[str, ...]


class Network:
    """The links between ``engines`` (objects with ``engine_id`` and ``node_id``), see the module docstring.

    ``nvlink_GBps``/``pcie_GBps``/``nic_GBps``: per GPU and direction; ``tp``: GPUs per engine;
    ``intra_node``: ``"nvlink"`` or ``"pcie"``; latencies in seconds. Raises ValueError for a
    bandwidth that is not > 0.
    """

    def __init__(self, engines: Sequence[Any], *, nvlink_GBps: float, pcie_GBps: float, nic_GBps: float,
                 tp: int = 1, intra_node: str = "nvlink", intra_node_latency: float = 1e-5,
                 inter_node_latency: float = 2e-5) -> None:
        if intra_node not in ("nvlink", "pcie"):
            raise ValueError(f"intra_node must be nvlink or pcie, got {intra_node!r}")
        if intra_node_latency < 0 or inter_node_latency < 0:
            raise ValueError("link latencies must be >= 0 s")
        self.node_of = {e.engine_id: e.node_id for e in engines}
        self.intra_latency = intra_node_latency
        self.inter_latency = inter_node_latency
        intra_GBps = (nvlink_GBps if intra_node == "nvlink" else pcie_GBps) * tp
        self.links: list[Link] = []
        self._intra: dict[int, tuple[Link, Link]] = {}
        self._nic: dict[int, tuple[Link, Link]] = {}
        for e in engines:
            eid, node = e.engine_id, e.node_id
            pair = tuple(Link(f"node{node}/engine{eid}/{intra_node}-{d}", intra_node, d, node, eid, intra_GBps)
                         for d in ("out", "in"))
            nic = tuple(Link(f"node{node}/engine{eid}/nic-{d}", "nic", d, node, eid, nic_GBps * tp)
                        for d in ("out", "in"))
            self._intra[eid] = pair
            self._nic[eid] = nic
            self.links.extend(pair)
            self.links.extend(nic)
        self.bytes_sent = 0
        self.bytes_received = 0

    def path(self, src: int, dst: int) -> tuple[tuple[Link, Link], float]:
        """The links a transfer from engine ``src`` to engine ``dst`` occupies, and its latency (s)."""
        if src == dst:
            raise ValueError(f"no transfer from engine {src} to itself")
        if self.node_of[src] == self.node_of[dst]:
            return (self._intra[src][0], self._intra[dst][1]), self.intra_latency
        return (self._nic[src][0], self._nic[dst][1]), self.inter_latency

    def bandwidth(self, src: int, dst: int) -> float:
        """Bytes/s of the path's slowest link."""
        links, _ = self.path(src, dst)
        return min(link.bytes_per_s for link in links)

    def estimate(self, src: int, dst: int, nbytes: int, now: float) -> float:
        """Seconds from ``now`` until ``nbytes`` queued now would arrive (queueing included); nothing reserved."""
        links, lat = self.path(src, dst)
        start = max(now, *(link.busy_until for link in links))
        return start + nbytes / min(link.bytes_per_s for link in links) + lat - now

    def transfer(self, src: int, dst: int, nbytes: int, now: float, earliest: float | None = None,
                 not_before: float | None = None) -> Transfer:
        """Queue ``nbytes`` from engine ``src`` to ``dst`` (FIFO on every link of the path).

        The links start sending at ``max(earliest or now, the path's links free)`` and are busy for
        ``nbytes / min(bandwidth)``; the data arrives ``latency`` later, but not before ``not_before``
        + latency (a layer-wise transfer cannot deliver the last layer before it is computed).
        ``earliest`` may lie before ``now`` (a layer-wise transfer began with the prefill).
        """
        if nbytes < 0:
            raise ValueError(f"transfer of {nbytes} bytes")
        links, lat = self.path(src, dst)
        start = max(now if earliest is None else earliest, *(link.busy_until for link in links))
        end = start + nbytes / min(link.bytes_per_s for link in links)
        arrive = end if not_before is None else max(end, not_before)
        for link in links:
            link.busy_until = end
            link.bytes_sent += nbytes
            link.num_transfers += 1
            link.intervals.append((start, end, nbytes))
        self.bytes_sent += nbytes
        return Transfer(src, dst, nbytes, start, end, arrive + lat, tuple(link.name for link in links))

    def received(self, t: Transfer) -> None:
        """Count ``t``'s bytes as received at its destination (bytes sent = bytes received at the end)."""
        self.bytes_received += t.nbytes

    def utilization(self, interval: float, until: float) -> list[tuple]:
        """Rows ``(link, kind, direction, node_id, engine_id, time, busy_fraction, bytes)`` per link and
        sample interval ending at ``time`` (``interval``, ``2 * interval`` ... up to ``until``): the share of
        the interval the link was sending and the bytes it sent in it (split pro rata). Only links that
        ever carried a transfer get rows."""
        rows = []
        if interval <= 0 or until <= 0:
            return rows
        n = max(1, math.ceil(until / interval - 1e-9))
        for link in self.links:
            if not link.intervals:
                continue
            busy = [0.0] * n
            moved = [0.0] * n
            for s, e, b in link.intervals:
                if e <= s:
                    continue
                rate = b / (e - s)
                k = int(s // interval)
                while k < n and k * interval < e:
                    lo = max(s, k * interval)
                    hi = min(e, (k + 1) * interval, until)
                    if hi > lo:
                        busy[k] += hi - lo
                        moved[k] += (hi - lo) * rate
                    k += 1
            for k in range(n):
                width = min(interval, until - k * interval)
                rows.append((link.name, link.kind, link.direction, link.node_id, link.engine_id,
                             min((k + 1) * interval, until), min(1.0, busy[k] / width) if width > 0 else 0.0,
                             int(round(moved[k]))))
        return rows


#: ``links.parquet`` schema: (column, kind) as in :mod:`agentsim.metrics`
LINK_COLUMNS: tuple[tuple[str, str], ...] = (
    ("link", "s"), ("kind", "s"), ("direction", "s"), ("node_id", "i"), ("engine_id", "i"), ("time", "f"),
    ("busy_fraction", "f"), ("bytes", "i"),
)


def network_for(engines: Sequence[Any], profile: Any, cluster: Any) -> Network:
    """The :class:`Network` of a run: ``cluster.network`` (:class:`agentsim.config.NetworkSpec`) over the
    profile's GPU-kind link figures (``Profile.links``: ``nvlink_GBps``, ``pcie_GBps``, ``internode_GBps``)."""
    net = cluster.network
    links = profile.links
    bw = {"nvlink_GBps": net.nvlink_GBps or links.nvlink_GBps, "pcie_GBps": net.pcie_GBps or links.pcie_GBps,
          "nic_GBps": net.nic_GBps or links.internode_GBps}
    nodes = [e.node_id for e in engines]
    used = ((("nvlink_GBps" if net.intra_node == "nvlink" else "pcie_GBps"),) if len(nodes) > len(set(nodes)) else ())
    used += ("nic_GBps",) if len(set(nodes)) > 1 else ()
    for key in used:
        value = bw[key]
        if not (value and value > 0 and math.isfinite(value)):
            from agentsim.errors import ConfigError
            raise ConfigError(f"cluster.network.{key}", f"the profile {profile.name!r} (GPU {profile.gpu.name}) has no "
                              f"{key[:-5]} bandwidth ({value!r}); set "
                              f"cluster.network.{key} to the link's GB/s per GPU and direction")
    return Network(engines, nvlink_GBps=bw["nvlink_GBps"] or 1.0, pcie_GBps=bw["pcie_GBps"] or 1.0,
                   nic_GBps=bw["nic_GBps"] or 1.0,
                   tp=cluster.tp, intra_node=net.intra_node, intra_node_latency=net.intra_node_latency,
                   inter_node_latency=net.inter_node_latency)

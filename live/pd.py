"""Live prefill/decode disaggregation on vLLM engines: roles -> KV connectors, and the P/D proxy.

The roles are the simulator's (``cluster.disagg.roles`` / ``node_roles``, :class:`agentsim.config.DisaggSpec`):
``prefill``, ``decode`` or ``mixed`` per engine. Live, they map onto vLLM's KV-connector API
(``vllm/distributed/kv_transfer/kv_connector/v1/base.py``) as vLLM's own disaggregated-serving
examples do (``examples/online_serving/disaggregated_serving``):

- a ``prefill`` engine runs with ``kv_role = "kv_producer"``, a ``decode`` engine with
  ``"kv_consumer"``; a ``mixed`` engine has no connector. The connector is vLLM's disk-based
  ``ExampleConnector`` (the only built-in one that runs on vLLM's CPU build: see
  ``docs/notes/pd-live.md`` for what the others need), wrapped by
  :class:`agentsim.live.kvconnector.TimedExampleConnector` to count transfer seconds and bytes.
  Its ``shared_storage_path`` is one directory all engines of the run see (same host / shared FS).
- :class:`PDClient` is the proxy, in the driver's engine-client slot: a call routed to a decode
  engine is first sent to a prefill engine with ``max_tokens = 1`` (vLLM's
  ``disagg_proxy_demo.py`` / ``toy_proxy_server.py``), which writes the prompt's KV; then the same
  prompt goes to the decode engine, whose connector finds the KV (``get_num_new_matched_tokens``),
  loads it instead of recomputing, and generates the output the client sees. The call's
  ``scheduled_at`` is the prefill's, its first token is the decode engine's first token (the
  prefill's one token is discarded, as the proxies do), so TTFT includes the prefill, the KV
  write/read and the decode engine's first step.

Prefill engines are hidden from the route policy: it picks among decode (and mixed) engines, and
:class:`PDClient` picks the prefill engine with the fewest calls in flight (lowest id on ties).

Two limits of ``ExampleConnector`` shape the engine settings (:func:`apply_roles`): it saves a
request's KV only in the step the request is first scheduled (``build_connector_meta``), so a
prefill engine runs without chunked prefill and with ``max_num_batched_tokens >= max_model_len``
(a chunked prompt would be saved before its later chunks exist); and it loads the block-aligned
``prompt[:-1]`` (``get_num_new_matched_tokens``), so the decode engine recomputes at most one
block of the prompt.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from typing import Any, Sequence

from agentsim.errors import ConfigError
from agentsim.live.driver import EngineClient

#: agentsim role -> vLLM ``KVTransferConfig.kv_role`` (``mixed``: no connector)
KV_ROLE = {"prefill": "kv_producer", "decode": "kv_consumer"}
CONNECTOR = "TimedExampleConnector"
CONNECTOR_MODULE = "agentsim.live.kvconnector"
#: the connector's counters (``agentsim.live.kvconnector.STAT_KEYS``; not imported here: it imports vLLM)
TRANSFER_KEYS = ("save_s", "save_bytes", "save_tokens", "load_s", "load_bytes", "load_tokens", "num_loads")


def kv_transfer_config(role: str, storage_path: str) -> dict | None:
    """vLLM ``KVTransferConfig`` fields for an engine of ``role`` (None for ``mixed``).

    Raises ConfigError for a role that is not ``prefill``, ``decode`` or ``mixed``.
    """
    if role == "mixed":
        return None
    if role not in KV_ROLE:
        raise ConfigError("cluster.disagg.roles", f"must be one of prefill, decode, mixed, got {role!r}")
    return {"kv_connector": CONNECTOR, "kv_connector_module_path": CONNECTOR_MODULE, "kv_role": KV_ROLE[role],
            "kv_connector_extra_config": {"shared_storage_path": str(storage_path)}}


def is_disaggregated(roles: Sequence[str]) -> bool:
    return any(r != "mixed" for r in roles)


def apply_roles(specs: list[dict], roles: Sequence[str], storage_path: str) -> list[dict]:
    """Engine specs (``EngineSpec.to_dict()`` rows, by engine id) with each role's KV connector.

    Prefill engines also get ``enable_chunked_prefill = False`` and ``max_num_batched_tokens >=
    max_model_len`` (the example connector saves a prompt's KV in its first scheduled step only).
    Raises ConfigError when ``roles`` and ``specs`` disagree in length.
    """
    if len(roles) != len(specs):
        raise ConfigError("cluster.disagg.roles", f"{len(roles)} roles for {len(specs)} engines")
    out = []
    for spec, role in zip(specs, roles):
        s = dict(spec)
        s["kv_transfer_config"] = kv_transfer_config(role, storage_path)
        if role == "prefill":
            s["enable_chunked_prefill"] = False
            s["max_num_batched_tokens"] = max(int(s.get("max_num_batched_tokens") or 0), int(s["max_model_len"]))
        out.append(s)
    return out


def check_live_roles(roles: Sequence[str], *, endpoints: bool, address: str | None) -> None:
    """Refuse P/D set-ups the live driver cannot run (one line, ConfigError -> exit 2)."""
    if not is_disaggregated(roles):
        return
    if endpoints:
        raise ConfigError("cluster.disagg.roles", "live P/D needs engines agentsim starts (--local-nodes or "
                          "--address); --endpoints servers have no KV connector agentsim can configure")
    if address:
        raise ConfigError("cluster.disagg.roles", "live P/D uses vLLM's disk-based ExampleConnector, whose KV "
                          "files every engine must see on one filesystem: run it on --local-nodes")


class PDStorage:
    """A fresh directory for the connector's KV files (``path``), made on enter, removed (it and
    only it: agentsim made it) on exit; ``enabled=False``: nothing is made and ``path`` is None."""

    def __init__(self, enabled: bool = True, parent: str | None = None) -> None:
        self.enabled = enabled
        self.parent = parent
        self.path: str | None = None

    def __enter__(self) -> "PDStorage":
        if self.enabled:
            self.path = tempfile.mkdtemp(prefix="agentsim-pd-", dir=self.parent)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


def manifest_entry(roles: Sequence[str]) -> dict:
    """What a P/D run records in ``manifest.json`` under ``pd`` (before the transfer totals)."""
    return {"roles": list(roles), "kv_connector": f"{CONNECTOR_MODULE}.{CONNECTOR}",
            "vllm_connector": "ExampleConnector", "kv_roles": {r: KV_ROLE.get(r) for r in sorted(set(roles))}}


def engine_transfer_totals(handles: Sequence[Any], timeout: float = 30.0) -> dict:
    """Per engine id (str, for JSON): :func:`transfer_totals` of its stats, asked over Ray."""
    import ray

    out = {}
    for h in handles:
        if not getattr(h, "alive", True):
            continue
        try:
            out[str(h.engine_id)] = transfer_totals(ray.get(h.actor.poll.remote(), timeout=timeout)["stats"])
        except Exception:  # noqa: BLE001 - a dead engine has nothing to report
            continue
    return out


class PDClient(EngineClient):
    """A decode engine behind vLLM's P/D proxy protocol: prefill (``max_tokens = 1``) elsewhere first.

    ``decode``: the decode engine's client (this client takes its ``engine_id``, ``node_id`` and
    ``info``: the route policy and the KV view see the decode engine). ``prefills``: the prefill
    engines' clients, shared by every :class:`PDClient` of a run. Replies are the decode engine's
    reply with ``scheduled_at`` / ``queued_at`` / ``recv_at`` from the prefill (on the decode
    node's clock) and a ``pd`` dict: ``prefill_engine_id``, ``prefill_token_ids``,
    ``prefill_scheduled_at``, ``prefill_done_at``, ``decode_recv_at``, ``decode_scheduled_at``,
    ``decode_num_cached_tokens`` (node-monotonic seconds, token counts).
    """

    def __init__(self, decode: EngineClient, prefills: Sequence[EngineClient],
                 inflight: dict[int, int] | None = None) -> None:
        if not prefills:
            raise ValueError("a P/D client needs at least one prefill engine")
        self.decode = decode
        self.prefills = list(prefills)
        self.engine_id = decode.engine_id
        self.node_id = decode.node_id
        self.info = dict(decode.info, prefill_engines=[p.engine_id for p in self.prefills])
        self._inflight = inflight if inflight is not None else {p.engine_id: 0 for p in self.prefills}
        self._offsets: dict[int, float] = {}  # prefill node clock - decode node clock

    def _pick(self) -> EngineClient:
        return min(self.prefills, key=lambda p: (self._inflight.get(p.engine_id, 0), p.engine_id))

    async def _offset(self, p: EngineClient) -> float:
        """Prefill clock - decode clock, from the lowest-RTT of three ping pairs (0 on one host)."""
        if p.engine_id not in self._offsets:
            best = None
            for _ in range(3):
                a = time.monotonic()
                tp = await p.clock()
                b = time.monotonic()
                td = await self.decode.clock()
                c = time.monotonic()
                rtt = (b - a) + (c - b)
                est = (tp - (a + b) / 2) - (td - (b + c) / 2)
                if best is None or rtt < best[0]:
                    best = (rtt, est)
            self._offsets[p.engine_id] = best[1]
        return self._offsets[p.engine_id]

    async def generate(self, request_id, token_ids, max_tokens, priority, extra_args, run_epoch):
        p = self._pick()
        off = await self._offset(p)
        self._inflight[p.engine_id] = self._inflight.get(p.engine_id, 0) + 1
        try:
            pre = await p.generate(f"{request_id}-p", token_ids, 1, priority, extra_args,
                                   None if run_epoch is None else run_epoch + off)
        finally:
            self._inflight[p.engine_id] -= 1
        dec = await self.decode.generate(request_id, token_ids, max_tokens, priority, extra_args, run_epoch)

        def on_decode_clock(t: float) -> float:
            return t - off if t else 0.0

        reply = dict(dec)
        for k in ("recv_at", "queued_at", "scheduled_at"):
            reply[k] = on_decode_clock(pre.get(k, 0.0))
        reply["num_preemptions"] = int(pre.get("num_preemptions", 0)) + int(dec.get("num_preemptions", 0))
        reply["pd"] = {
            "prefill_engine_id": p.engine_id, "prefill_token_ids": list(pre.get("token_ids", [])),
            "prefill_scheduled_at": on_decode_clock(pre.get("scheduled_at", 0.0)),
            "prefill_done_at": on_decode_clock(pre.get("done_at", 0.0)),
            "decode_recv_at": dec.get("recv_at", 0.0), "decode_scheduled_at": dec.get("scheduled_at", 0.0),
            "decode_num_cached_tokens": int(dec.get("num_cached_tokens", 0)),
        }
        return reply

    async def poll(self) -> dict:
        return await self.decode.poll()

    async def clock(self) -> float:
        return await self.decode.clock()

    async def reset_prefix_cache(self) -> bool:
        outs = await asyncio.gather(self.decode.reset_prefix_cache(), *(p.reset_prefix_cache() for p in self.prefills))
        return all(outs)

    def fail_pending(self, why: str) -> None:
        if hasattr(self.decode, "fail_pending"):
            self.decode.fail_pending(why)

    def close(self) -> None:
        for c in (self.decode, *self.prefills):
            if hasattr(c, "close"):
                c.close()


def wrap_clients(clients: Sequence[EngineClient], roles: Sequence[str]) -> list[EngineClient]:
    """The clients the driver routes over: decode engines as :class:`PDClient` s sharing the prefill
    engines, mixed engines as they are; prefill engines only behind the P/D clients.

    ``roles[i]`` is the role of ``clients[i]`` (by position). Without prefill/decode roles the
    clients are returned unchanged.
    """
    if not is_disaggregated(roles):
        return list(clients)
    prefills = [c for c, r in zip(clients, roles) if r == "prefill"]
    inflight = {p.engine_id: 0 for p in prefills}
    out: list[EngineClient] = []
    for c, r in zip(clients, roles):
        if r == "decode":
            out.append(PDClient(c, prefills, inflight))
        elif r == "mixed":
            out.append(c)
    if not prefills or not any(r == "decode" for r in roles):
        raise ConfigError("cluster.disagg.roles", "live P/D needs at least one prefill and one decode engine "
                          f"(roles: {', '.join(roles)})")
    return out


def transfer_totals(stats: dict) -> dict:
    """The KV connector counters of one engine's stats snapshot (zeros when it has none)."""
    kv = stats.get("kv_transfer") or {}
    return {k: kv.get(k, 0) for k in TRANSFER_KEYS} | {"external_tokens": int(stats.get("external_tokens", 0))}

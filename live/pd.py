"""Live prefill/decode disaggregation on vLLM engines: roles -> KV connectors, and the P/D proxy.

The roles are the simulator's (``cluster.disagg.roles`` / ``node_roles``, :class:`agentsim.config.DisaggSpec`):
``prefill``, ``decode`` or ``mixed`` per engine. Live, they map onto vLLM's KV-connector API
(``vllm/distributed/kv_transfer/kv_connector/v1/base.py``) as vLLM's own disaggregated-serving
examples do (``examples/online_serving/disaggregated_serving``):

- a ``prefill`` engine runs with ``kv_role = "kv_producer"``, a ``decode`` engine with
  ``"kv_consumer"``; a ``mixed`` engine has no connector. The connector is vLLM's disk-based
  ``ExampleConnector`` (the only built-in one that runs on vLLM's CPU build as installed: see
  ``docs/design/live-pd.md`` for what the others need), wrapped by
  :class:`agentsim.live.kvconnector.TimedExampleConnector` to count transfer seconds and bytes.
  Its ``shared_storage_path`` is one directory all engines of the run see (same host / shared FS).
  With ``connector="nixl"`` it is vLLM's ``NixlConnector`` instead (every P/D engine ``kv_both``,
  UCX pulls of the prefill engine's blocks; needs the ``nixl`` package).
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
:func:`run_pd_bench` (``agentsim pd-bench``, :mod:`agentsim.live.pd_cli`) measures a P/D pair
against a co-located engine, one call at a time.

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
from pathlib import Path
from typing import Any, Sequence

from agentsim.errors import ConfigError
from agentsim.live.driver import EngineClient

#: agentsim role -> vLLM ``KVTransferConfig.kv_role`` (``mixed``: no connector)
KV_ROLE = {"prefill": "kv_producer", "decode": "kv_consumer"}
CONNECTOR = "TimedExampleConnector"
CONNECTOR_MODULE = "agentsim.live.kvconnector"
#: ``--kv-connector`` choices: the disk-based example connector (default) or NIXL (needs the nixl package)
CONNECTORS = ("example", "nixl")
#: what a NIXL prefill request carries (vLLM's examples/online_serving/disaggregated_serving proxies)
NIXL_PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                       "remote_block_ids": None, "remote_host": None, "remote_port": None}
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


def nixl_kv_transfer_config(buffer_device: str = "cpu") -> dict:
    """vLLM ``KVTransferConfig`` fields for ``NixlConnector`` (every P/D engine ``kv_both``, as vLLM's
    ``disaggregated_serving`` NIXL examples run it); ``buffer_device``: ``cpu`` on vLLM's CPU build
    (``vllm/distributed/kv_transfer/kv_connector/v1/nixl/utils.py`` ``_NIXL_SUPPORTED_DEVICE``)."""
    return {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": buffer_device}


def check_nixl() -> None:
    """ConfigError (exit 2) unless the ``nixl`` package vLLM imports (``nixl._api``) is installed."""
    import importlib.util

    if importlib.util.find_spec("nixl") is None:
        raise ConfigError("--kv-connector", "nixl needs the `nixl` Python package, which vLLM imports as nixl._api "
                          "(e.g. pip install --no-deps nixl==1.5.2 nixl-cu12==1.5.1: UCX, runs on CPU-only machines)")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def apply_roles(specs: list[dict], roles: Sequence[str], storage_path: str | None,
                connector: str = "example", buffer_device: str = "cpu") -> list[dict]:
    """Engine specs (``EngineSpec.to_dict()`` rows, by engine id) with each role's KV connector.

    ``connector``: ``example`` (:class:`agentsim.live.kvconnector.TimedExampleConnector`, files in
    ``storage_path``) or ``nixl`` (vLLM's ``NixlConnector``: the decode engine reads the prefill
    engine's KV blocks over UCX; each P/D engine gets its own NIXL side-channel port on 127.0.0.1,
    ``VLLM_NIXL_SIDE_CHANNEL_PORT`` / ``_HOST``). With the example connector, prefill engines also
    get ``enable_chunked_prefill = False`` and ``max_num_batched_tokens >= max_model_len`` (it saves
    a prompt's KV in its first scheduled step only). Raises ConfigError when ``roles`` and ``specs`` disagree
    in length or for an unknown connector.
    """
    if len(roles) != len(specs):
        raise ConfigError("cluster.disagg.roles", f"{len(roles)} roles for {len(specs)} engines")
    if connector not in CONNECTORS:
        raise ConfigError("--kv-connector", f"must be one of {', '.join(CONNECTORS)}, got {connector!r}")
    out = []
    for spec, role in zip(specs, roles):
        s = dict(spec)
        if connector == "nixl":
            if role not in ("mixed", *KV_ROLE):
                kv_transfer_config(role, "")  # raises the role error
            s["kv_transfer_config"] = None if role == "mixed" else nixl_kv_transfer_config(buffer_device)
            if role != "mixed":
                s["env"] = dict(s.get("env") or {}, VLLM_NIXL_SIDE_CHANNEL_PORT=str(_free_port()),
                                VLLM_NIXL_SIDE_CHANNEL_HOST="127.0.0.1")
        else:
            s["kv_transfer_config"] = kv_transfer_config(role, str(storage_path))
        if role == "prefill" and connector == "example":
            s["enable_chunked_prefill"] = False
            s["max_num_batched_tokens"] = max(int(s.get("max_num_batched_tokens") or 0), int(s["max_model_len"]))
        out.append(s)
    return out


def check_live_roles(roles: Sequence[str], *, endpoints: bool, address: str | None,
                     connector: str = "example") -> None:
    """Refuse P/D set-ups the live driver cannot run (one line, ConfigError -> exit 2)."""
    if connector not in CONNECTORS:
        raise ConfigError("--kv-connector", f"must be one of {', '.join(CONNECTORS)}, got {connector!r}")
    if not is_disaggregated(roles):
        return
    if endpoints:
        raise ConfigError("cluster.disagg.roles", "live P/D needs engines agentsim starts (--local-nodes or "
                          "--address); --endpoints servers have no KV connector agentsim can configure")
    if address:
        raise ConfigError("cluster.disagg.roles", "live P/D uses vLLM's disk-based ExampleConnector, whose KV "
                          "files every engine must see on one filesystem (or NIXL with its side channel on "
                          "127.0.0.1): run it on --local-nodes")
    if connector == "nixl":
        check_nixl()


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


def manifest_entry(roles: Sequence[str], connector: str = "example") -> dict:
    """What a P/D run records in ``manifest.json`` under ``pd`` (before the transfer totals)."""
    if connector == "nixl":
        return {"roles": list(roles), "kv_connector": "NixlConnector", "vllm_connector": "NixlConnector",
                "kv_roles": {r: (None if r == "mixed" else "kv_both") for r in sorted(set(roles))}}
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
        except ray.exceptions.RayError:  # a dead or unresponsive engine (actor died, timeout) has nothing to report
            continue
    return out


class PDClient(EngineClient):
    """A decode engine behind vLLM's P/D proxy protocol: prefill (``max_tokens = 1``) elsewhere first.

    ``decode``: the decode engine's client (this client takes its ``engine_id``, ``node_id`` and
    ``info``: the route policy and the KV view see the decode engine). ``prefills``: the prefill
    engines' clients, shared by every :class:`PDClient` of a run. Replies are the decode engine's
    reply with ``scheduled_at`` / ``queued_at`` / ``recv_at`` from the prefill (on the decode
    node's clock), ``num_cached_tokens`` = the prefill engine's prefix hits (the simulator's
    convention), ``kv_transfer_bytes`` = the tokens the decode engine's connector injected for
    this call (its ``kv_transfer_params``, :mod:`agentsim.live.kvconnector`; 0 when it loaded
    nothing) x the bytes per token that connector measured (NIXL: this call's pulled blocks x the
    decode engine's measured bytes per block),
    ``kv_transfer_time`` = the hand-off, s: prefill engine done -> decode engine schedules the step
    that injects the KV (the connector's own write and read times are inside the two engines'
    steps; per engine in ``stats["kv_transfer"]``), and a ``pd`` dict: ``prefill_engine_id``,
    ``prefill_token_ids``, ``prefill_scheduled_at``, ``prefill_done_at``, ``decode_recv_at``,
    ``decode_scheduled_at``, ``decode_num_cached_tokens``, ``loaded_tokens``, ``external_tokens``
    (vLLM's count: loaded beyond the decode engine's own prefix hits), ``saved_tokens`` (by the
    prefill engine) (node-monotonic seconds, token counts).
    """

    def __init__(self, decode: EngineClient, prefills: Sequence[EngineClient],
                 inflight: dict[int, int] | None = None, connector: str = "example") -> None:
        if not prefills:
            raise ValueError("a P/D client needs at least one prefill engine")
        self.connector = connector
        self._nixl_blocks = 0  # NIXL: blocks the decode engine was told to pull so far
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
            pre_args = dict(extra_args or {})
            if self.connector == "nixl":  # ask the prefill engine to keep the blocks for a remote decode
                pre_args["kv_transfer_params"] = dict(NIXL_PREFILL_PARAMS)
            pre = await p.generate(f"{request_id}-p", token_ids, 1, priority, pre_args,
                                   None if run_epoch is None else run_epoch + off)
        finally:
            self._inflight[p.engine_id] -= 1
        dec_args = dict(extra_args or {})
        if self.connector == "nixl":  # where the decode engine pulls the blocks from
            dec_args["kv_transfer_params"] = pre.get("kv_transfer_params")
        dec = await self.decode.generate(request_id, token_ids, max_tokens, priority, dec_args, run_epoch)

        def on_decode_clock(t: float) -> float:
            return t - off if t else 0.0

        reply = dict(dec)
        for k in ("recv_at", "queued_at", "scheduled_at"):
            reply[k] = on_decode_clock(pre.get(k, 0.0))
        reply["num_preemptions"] = int(pre.get("num_preemptions", 0)) + int(dec.get("num_preemptions", 0))
        # the simulator's convention (agentsim.sim.disagg): a P/D call's prefix hits are the prefill engine's
        reply["num_cached_tokens"] = int(pre.get("num_cached_tokens", 0))
        kv = (dec.get("stats") or {}).get("kv_transfer") or {}
        per_token = kv.get("load_bytes", 0) / kv["load_tokens"] if kv.get("load_tokens") else 0.0
        mine = ((dec.get("kv_transfer_params") or {}).get("agentsim") or {})  # agentsim.live.kvconnector
        moved = int(mine.get("loaded_tokens", 0))
        reply["kv_transfer_bytes"] = int(round(moved * per_token))
        if self.connector == "nixl":
            # NIXL pulls the prefill's blocks: this call's block count x the decode engine's measured
            # bytes per block so far (exact one call at a time; an estimate while pulls overlap)
            blocks = len(((pre.get("kv_transfer_params") or {}).get("remote_block_ids") or [[]])[0])
            self._nixl_blocks += blocks
            per_block = kv.get("bytes_transferred", 0) / self._nixl_blocks if self._nixl_blocks else 0.0
            moved = blocks * int(self.info.get("block_size", 0) or 0)
            reply["kv_transfer_bytes"] = int(round(blocks * per_block))
        # hand-off: prefill engine done -> decode engine schedules the step that injects the KV
        handoff = dec.get("scheduled_at", 0.0) - on_decode_clock(pre.get("done_at", 0.0))
        reply["kv_transfer_time"] = max(0.0, handoff) if dec.get("scheduled_at") and pre.get("done_at") else 0.0
        reply["pd"] = {
            "prefill_engine_id": p.engine_id, "prefill_token_ids": list(pre.get("token_ids", [])),
            "prefill_scheduled_at": on_decode_clock(pre.get("scheduled_at", 0.0)),
            "prefill_done_at": on_decode_clock(pre.get("done_at", 0.0)),
            "decode_recv_at": dec.get("recv_at", 0.0), "decode_scheduled_at": dec.get("scheduled_at", 0.0),
            "decode_num_cached_tokens": int(dec.get("num_cached_tokens", 0)),
            "loaded_tokens": moved, "external_tokens": int(mine.get("external_tokens", 0)),
            "saved_tokens": int(((pre.get("kv_transfer_params") or {}).get("agentsim") or {}).get("saved_tokens", 0)),
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


def wrap_clients(clients: Sequence[EngineClient], roles: Sequence[str],
                 connector: str = "example") -> list[EngineClient]:
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
            out.append(PDClient(c, prefills, inflight, connector))
        elif r == "mixed":
            out.append(c)
    if not prefills or not any(r == "decode" for r in roles):
        raise ConfigError("cluster.disagg.roles", "live P/D needs at least one prefill and one decode engine "
                          f"(roles: {', '.join(roles)})")
    return out


def make_pd_model(out_dir: str | Path, init_std: float = 0.2, seed: int = 0) -> Path:
    """agentsim's tiny Llama (:data:`~agentsim.live.tiny_model.TINY_MODEL_SHAPE`) with random weights
    of std ``init_std`` saved beside it (load it with ``load_format = "auto"``); returns its path.

    With transformers' default std (0.02) the tiny model emits one token whatever its context; at
    0.2 its greedy output depends on the whole prompt, so a decode engine that used the wrong KV
    (or none) would answer differently from a co-located engine. Idempotent: an existing directory
    with the same std and seed is left as is. Needs torch and transformers (both come with vLLM).
    """
    import json

    from agentsim.live.tiny_model import TINY_MODEL_SHAPE, make_tiny_llama

    out = make_tiny_llama(out_dir, **TINY_MODEL_SHAPE)
    marker = out / ".agentsim-pd-weights"
    want = {"init_std": float(init_std), "seed": int(seed)}
    if marker.is_file() and any(out.glob("*.safetensors")):
        try:
            if json.loads(marker.read_text()) == want:
                return out
        except ValueError:
            pass
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(out)
    cfg.initializer_range = float(init_std)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out)
    marker.write_text(json.dumps(want))
    return out


def transfer_totals(stats: dict) -> dict:
    """The KV connector counters of one engine's stats snapshot (zeros when it has none)."""
    kv = stats.get("kv_transfer") or {}
    out = {k: kv.get(k, 0) for k in TRANSFER_KEYS}
    # NIXL's statistics (vllm/.../kv_connector/v1/nixl/stats.py): the decode engine's pulls are its loads
    out["load_s"] += kv.get("transfer_duration", 0)
    out["load_bytes"] += kv.get("bytes_transferred", 0)
    out["num_loads"] += kv.get("transfer_duration_count", 0)
    return out | {"external_tokens": int(stats.get("external_tokens", 0))}


# ---------------------------------------------------------------------------------------------------- bench
def _call_metrics(r: dict) -> dict:
    """TTFT / TPOT / E2E (ms) of one reply, as ``vllm bench serve`` defines them, from the engine
    clocks: arrival = the first engine's receipt (the prefill engine's for a P/D call)."""
    n = len(r["token_ids"])
    first, last = r["first_token_at"], r["last_token_at"]
    return {"ttft_ms": 1e3 * (first - r["recv_at"]),
            "tpot_ms": 1e3 * (last - first) / (n - 1) if n > 1 else 0.0,
            "e2el_ms": 1e3 * (r["done_at"] - r["recv_at"])}


def run_pd_bench(model: str, prompt_lens: Sequence[int] = (256, 512, 1024, 1536), output_tokens: int = 32,
                 repeats: int = 3, seed: int = 0, kv_cache_gib: float = 1.0, block_size: int = 32,
                 progress: Any = None, connector: str = "example") -> dict:
    """One prefill + one decode engine vs one co-located (mixed) engine, same prompts, one call at a time.

    A local 2-node Ray cluster: prefill engine 0 on node 0, decode engine 1 on node 1, mixed engine 2
    on node 0 (no KV connector). Every call is a fresh random prompt (no prefix hits), sent first
    through :class:`PDClient` and then to the mixed engine. Per call: ``ttft_ms``, ``tpot_ms``,
    ``e2el_ms`` for both, the P/D call's ``prefill_ms`` (prefill engine receipt -> its reply),
    ``save_ms`` / ``load_ms`` (the connector's write and read time, :mod:`agentsim.live.kvconnector`),
    ``kv_bytes`` loaded, the decode engine's ``loaded_tokens`` and whether the greedy outputs are equal.
    Returns ``{"calls": [row, ...], "summary": [per prompt length: medians], "setup": {...}}``.
    """
    from agentsim.live.cluster import RayCluster
    from agentsim.live.driver import RayEngineClient
    from agentsim.live.engine import EngineSpec

    say = progress or (lambda line: None)
    max_len = max(2048, max(prompt_lens) + output_tokens)
    rows: list[dict] = []
    with PDStorage() as store:
        say("starting a local 2-node Ray cluster and 3 engines (prefill, decode, mixed)")
        with RayCluster.local(2) as cluster:
            common = dict(model=model, run_tag="pdbench", block_size=block_size, kv_cache_gib=kv_cache_gib,
                          max_model_len=max_len, max_num_seqs=8, load_format="auto", seed=seed)
            specs = apply_roles([EngineSpec(engine_id=0, node_id=0, **common).to_dict(),
                                 EngineSpec(engine_id=1, node_id=1, **common).to_dict(),
                                 EngineSpec(engine_id=2, node_id=0, **common).to_dict()],
                                ["prefill", "decode", "mixed"], store.path, connector=connector)
            handles = cluster.start_engines(specs, progress=say)
            prefill, decode, mixed = (RayEngineClient(h) for h in handles)
            client = PDClient(decode, [prefill], connector=connector)

            async def stats(c: EngineClient) -> dict:
                return transfer_totals((await c.poll())["stats"])

            async def bench() -> None:
                import random

                rng = random.Random(seed)
                # one warm-up call per path (first-call overheads: allocation, connector set-up)
                warm = [rng.randrange(4, 250) for _ in range(2 * block_size + 1)]
                await client.generate("warm-pd", warm, 2, 0, {}, None)
                await mixed.generate("warm-m", warm, 2, 0, {}, None)
                for n in prompt_lens:
                    for k in range(repeats):
                        ids = [rng.randrange(4, 250) for _ in range(n)]
                        p0, d0 = await stats(prefill), await stats(decode)
                        r = await client.generate(f"pd-{n}-{k}", ids, output_tokens, 0, {}, None)
                        p1, d1 = await stats(prefill), await stats(decode)
                        m = await mixed.generate(f"m-{n}-{k}", ids, output_tokens, 0, {}, None)
                        pm, mm = _call_metrics(r), _call_metrics(m)
                        rows.append({
                            "prompt_tokens": n, "repeat": k,
                            **{f"pd_{key}": v for key, v in pm.items()},
                            **{f"colocated_{key}": v for key, v in mm.items()},
                            "prefill_ms": 1e3 * (r["pd"]["prefill_done_at"] - r["recv_at"]),
                            "save_ms": 1e3 * (p1["save_s"] - p0["save_s"]),
                            "load_ms": 1e3 * (d1["load_s"] - d0["load_s"]),
                            "kv_bytes": int(d1["load_bytes"] - d0["load_bytes"]),
                            "loaded_tokens": int(d1["external_tokens"] - d0["external_tokens"]),
                            "kv_transfer_bytes": int(r.get("kv_transfer_bytes", 0)),
                            "same_output": r["token_ids"] == m["token_ids"],
                        })
                        say(f"prompt {n} tokens, repeat {k + 1}/{repeats}: P/D TTFT {pm['ttft_ms']:.1f} ms, "
                            f"co-located {mm['ttft_ms']:.1f} ms")
                client.close()
                mixed.close()

            asyncio.run(bench())
    import statistics

    summary = []
    for n in prompt_lens:
        sel = [r for r in rows if r["prompt_tokens"] == n]
        row = {"prompt_tokens": n, "num_calls": len(sel)}
        for key in ("colocated_ttft_ms", "pd_ttft_ms", "prefill_ms", "save_ms", "load_ms", "colocated_tpot_ms",
                    "pd_tpot_ms", "colocated_e2el_ms", "pd_e2el_ms", "kv_bytes", "loaded_tokens"):
            row[f"median_{key}"] = statistics.median(r[key] for r in sel)
        row["same_output"] = all(r["same_output"] for r in sel)
        summary.append(row)
    return {"calls": rows, "summary": summary,
            "setup": {"model": model, "output_tokens": output_tokens, "repeats": repeats, "seed": seed,
                      "block_size": block_size,
                      "kv_connector": f"{CONNECTOR_MODULE}.{CONNECTOR}" if connector == "example" else "NixlConnector"}}


def format_bench(res: dict) -> str:
    """The bench summary as a Markdown table (medians; ms, MB)."""
    head = ("| prompt tokens | TTFT co-located | TTFT P/D | of which prefill | KV save | KV load | KV moved | "
            "TPOT co-located | TPOT P/D | E2E co-located | E2E P/D | same output |")
    lines = [head, "|" + "---|" * 12]
    for s in res["summary"]:
        lines.append(
            f"| {s['prompt_tokens']} | {s['median_colocated_ttft_ms']:.1f} ms | {s['median_pd_ttft_ms']:.1f} ms | "
            f"{s['median_prefill_ms']:.1f} ms | {s['median_save_ms']:.1f} ms | {s['median_load_ms']:.1f} ms | "
            f"{s['median_kv_bytes'] / 1e6:.2f} MB ({s['median_loaded_tokens']:.0f} tok) | "
            f"{s['median_colocated_tpot_ms']:.2f} ms | {s['median_pd_tpot_ms']:.2f} ms | "
            f"{s['median_colocated_e2el_ms']:.0f} ms | {s['median_pd_e2el_ms']:.0f} ms | "
            f"{'yes' if s['same_output'] else 'NO'} |")
    return "\n".join(lines)

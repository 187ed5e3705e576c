"""``agentsim live --endpoints URL,...``: drive existing OpenAI-compatible vLLM servers, no Ray.

Each URL is one engine (``engine_id`` = its position, ``node_id`` = its host's first-seen index).
A call is a streamed ``POST /v1/completions`` whose prompt is the token ids, with ``max_tokens``,
``ignore_eos``, ``priority`` in the body and the agentsim hints flattened into ``vllm_xargs``
(keys ``agentsim_*``, which :mod:`agentsim.live.scheduler` also reads); ``return_token_ids``
brings back the generated ids so the next prompt reuses them. Times are taken by the driver
(client side, like ``vllm bench serve``): first streamed chunk = first token; the server's queue
time is not visible, so ``scheduled_at``/``queue_time`` are NaN. Engine stats come from each
server's ``/metrics`` (running, waiting, KV usage). No KV events: routes see no cached blocks.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlparse

from agentsim.errors import ConfigError
from agentsim.live.driver import EngineClient, EngineDead, LiveDriver, LiveResult


def flatten_extra_args(extra: dict) -> dict:
    """``{"agentsim": {...}}`` -> flat ``agentsim_<key>`` entries (vllm_xargs allows no nesting)."""
    out: dict[str, Any] = {}
    for k, v in (extra.get("agentsim") or {}).items():
        if k == "hints":
            for hk, hv in (v or {}).items():
                out[f"agentsim_hint_{hk}"] = hv
        elif v is None:
            continue
        else:
            out[f"agentsim_{k}"] = v
    for k, v in extra.items():
        if k != "agentsim":
            out[k] = v
    return out


def unflatten_extra_args(xa: dict) -> dict:
    """Inverse of :func:`flatten_extra_args` (used by the in-engine scheduler)."""
    meta: dict[str, Any] = {}
    hints: dict[str, Any] = {}
    for k, v in xa.items():
        if k.startswith("agentsim_hint_"):
            hints[k[len("agentsim_hint_"):]] = v
        elif k.startswith("agentsim_") and k != "agentsim_epoch":
            meta[k[len("agentsim_"):]] = v
    if hints:
        meta["hints"] = hints
    return meta


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum of each ``vllm:`` metric over its label sets (enough for one-engine servers)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        try:
            name_labels, value = line.rsplit(" ", 1)
            name = name_labels.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


class HttpEngineClient(EngineClient):
    def __init__(self, engine_id: int, node_id: int, url: str, session: Any, model: str, info: dict) -> None:
        self.engine_id = engine_id
        self.node_id = node_id
        self.url = url.rstrip("/")
        self.session = session
        self.model = model
        self.info = info
        self._t_last = time.monotonic()
        self._busy = 0.0
        self._prefill = 0.0
        self._decode = 0.0

    async def generate(self, request_id, token_ids, max_tokens, priority, extra_args, run_epoch):
        import aiohttp

        xa = flatten_extra_args(extra_args or {})
        if run_epoch is not None:
            xa["agentsim_epoch"] = run_epoch
        body = {"model": self.model, "prompt": token_ids, "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0.0, "priority": priority, "stream": True, "return_token_ids": True,
                "vllm_xargs": xa, "stream_options": {"include_usage": True}}
        t_send = time.monotonic()
        first = 0.0
        out_ids: list[int] = []
        cached = 0
        try:
            async with self.session.post(f"{self.url}/v1/completions", json=body,
                                         headers={"X-Request-Id": request_id}) as resp:
                if resp.status >= 500:
                    raise EngineDead(f"engine {self.engine_id}: HTTP {resp.status}")
                if resp.status != 200:
                    raise RuntimeError(f"engine {self.engine_id}: HTTP {resp.status}: {(await resp.text())[:300]}")
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    for ch in chunk.get("choices") or ():
                        ids = ch.get("token_ids") or []
                        if ids and not first:
                            first = time.monotonic()
                        out_ids.extend(ids)
                    usage = chunk.get("usage")
                    if usage:
                        cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, ConnectionError) as e:
            raise EngineDead(f"engine {self.engine_id}: {type(e).__name__}: {e}") from None
        done = time.monotonic()
        return {"request_id": request_id, "token_ids": out_ids, "num_cached_tokens": cached,
                "recv_at": t_send, "done_at": done, "queued_at": 0.0, "scheduled_at": 0.0,
                "first_token_at": first or done, "last_token_at": done, "num_preemptions": 0,
                "finish_reason": None, "events": [], "stats": {}}

    async def poll(self) -> dict:
        import aiohttp

        try:
            async with self.session.get(f"{self.url}/metrics") as resp:
                text = await resp.text()
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, ConnectionError) as e:
            raise EngineDead(f"engine {self.engine_id}: {type(e).__name__}") from None
        m = parse_prometheus(text)
        now = time.monotonic()
        running = m.get("vllm:num_requests_running", 0.0)
        waiting = m.get("vllm:num_requests_waiting", 0.0)
        if running + waiting > 0:
            self._busy += now - self._t_last
        self._t_last = now
        return {"stats": {"t": now, "num_running": int(running), "num_waiting": int(waiting),
                          "kv_usage": m.get("vllm:kv_cache_usage_perc", 0.0),
                          "prefill_tokens": int(m.get("vllm:prompt_tokens_total", m.get("vllm:prompt_tokens", 0.0))),
                          "decode_tokens": int(m.get("vllm:generation_tokens_total", m.get("vllm:generation_tokens", 0.0))),
                          "busy_time": self._busy, "gpu_util": None},
                "events": []}

    async def clock(self) -> float:
        return time.monotonic()


async def _discover(session: Any, url: str) -> tuple[str, int]:
    """The served model id and its max_model_len, from ``GET /v1/models``."""
    try:
        async with session.get(f"{url.rstrip('/')}/v1/models") as resp:
            data = await resp.json()
    except Exception as e:  # noqa: BLE001 - any failure here means the endpoint is unusable
        raise ConfigError("--endpoints", f"{url}: cannot list models ({type(e).__name__}: {e})") from None
    models = data.get("data") or []
    if not models:
        raise ConfigError("--endpoints", f"{url}: serves no model")
    return str(models[0]["id"]), int(models[0].get("max_model_len") or 1 << 30)


def run_endpoints(cfg, settings, bundle, source, opt, out_dir) -> LiveResult:
    """Run ``cfg`` against ``settings.endpoints`` (see the module docstring)."""
    from agentsim.live.runner import manifest_base

    for u in settings.endpoints:
        try:
            p = urlparse(u)
            p.port, p.hostname   # noqa: B018 - parse them now: a bad port or IPv6 host raises here
        except ValueError as e:
            raise ConfigError("--endpoints", f"not an http(s) URL: {u!r} ({e})") from None
        if p.scheme not in ("http", "https") or not p.netloc:
            raise ConfigError("--endpoints", f"not an http(s) URL: {u!r}")

    async def main() -> LiveResult:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            hosts: dict[str, int] = {}
            clients = []
            for i, url in enumerate(settings.endpoints):
                model, max_len = await _discover(session, url)
                node = hosts.setdefault(urlparse(url).hostname or "", len(hosts))
                info = {"num_blocks": 0, "block_size": cfg.cluster.engine.block_size, "max_model_len": max_len,
                        "vocab_size": _vocab_hint(settings, model), "hostname": url, "model": model}
                clients.append(HttpEngineClient(i, node, url, session, model, info))
            manifest = manifest_base(cfg, settings, clients[0].model)
            driver = LiveDriver(clients, bundle, block_size=cfg.cluster.engine.block_size, options=opt,
                                out_dir=out_dir, seed=cfg.seed, manifest=manifest, kv_events=False,
                                max_num_seqs=cfg.cluster.engine.max_num_seqs, progress=settings.progress)
            return await driver.arun(source)

    return asyncio.run(main())


def _vocab_hint(settings, served: str | None = None) -> int:
    """Token ids must exist in the served model: read config.json of ``--model`` or of the served
    model id when either is a local directory; otherwise assume 32000 (every common LLM has more)."""
    from pathlib import Path

    for cand in (settings.model, served):
        if cand and cand != "tiny":
            p = Path(cand) / "config.json"
            if p.exists():
                try:
                    return int(json.loads(p.read_text()).get("vocab_size", 32000))
                except (ValueError, TypeError):
                    pass
    return 32000

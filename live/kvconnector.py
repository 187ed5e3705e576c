"""vLLM's disk-based example KV connector with its transfer time and bytes counted (live P/D).

:class:`TimedExampleConnector` is vLLM's own ``ExampleConnector``
(``vllm/distributed/kv_transfer/kv_connector/v1/example_connector.py``: the prefill engine writes
each prompt's KV, layer by layer, as safetensors files under ``shared_storage_path``; the decode
engine finds a prompt's files by a hash of its block-aligned tokens and injects them into its
paged KV cache) and changes nothing it does. It only measures, in the worker process:

- ``save_s`` / ``save_bytes`` / ``save_tokens``: wall seconds spent in ``save_kv_layer`` (extracting
  the KV of the prompt's slots and writing it; inside the prefill's forward pass) and the KV bytes
  written (tokens x layers x ``H x C`` elements of the ``[B, H, N, C]`` per-layer cache view);
- ``load_s`` / ``load_bytes`` / ``load_tokens``: the same for ``start_load_kv`` (reading the files
  and injecting them, before the decode engine's first forward pass of that request).

The figures travel the way vLLM's connectors report transfer statistics: the worker's
``get_kv_connector_stats`` -> ``KVConnectorOutput`` -> ``SchedulerStats.kv_connector_stats`` (a
dict) -> agentsim's stat logger (:mod:`agentsim.live.engine`), which sums them per engine. Load it
with ``kv_connector_module_path = "agentsim.live.kvconnector"`` and
``kv_connector = "TimedExampleConnector"`` (:func:`agentsim.live.pd.kv_transfer_config`).

vLLM is imported at module import: this module is only imported by vLLM, inside engine processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ExampleConnector, align_to_block_size
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

#: the counters, all cumulative sums (seconds, bytes, tokens, calls)
STAT_KEYS = ("save_s", "save_bytes", "save_tokens", "load_s", "load_bytes", "load_tokens", "num_loads")


@dataclass
class TransferStats(KVConnectorStats):
    """Sums of the save/load counters over an interval (``data``: :data:`STAT_KEYS` -> number)."""

    def __post_init__(self) -> None:
        for k in STAT_KEYS:
            self.data.setdefault(k, 0)

    def reset(self) -> None:
        self.data = {k: 0 for k in STAT_KEYS}

    def aggregate(self, other: KVConnectorStats) -> "TransferStats":
        for k in STAT_KEYS:
            self.data[k] = self.data.get(k, 0) + other.data.get(k, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in STAT_KEYS)


def _token_bytes(kv_layer: Any) -> int:
    """Bytes of one token's KV in one layer of a ``[B, H, N, C]`` cache view: ``H x C x itemsize``."""
    shape = tuple(kv_layer.shape)
    return int(shape[1] * shape[3] * kv_layer.element_size()) if len(shape) == 4 else 0


class TimedExampleConnector(ExampleConnector):
    """``ExampleConnector`` plus save/load time and byte counters (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stats = TransferStats()
        self._counted: Any = None
        self._req_loads: dict[str, tuple[int, int]] = {}  # scheduler side: request id -> (external, injected)
        self._req_saves: dict[str, int] = {}               # scheduler side: request id -> tokens saved

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        t = time.perf_counter()
        super().save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)
        dt = time.perf_counter() - t
        meta = self._get_connector_metadata()
        n = sum(len(r.slot_mapping) for r in meta.requests if r.is_store)
        if n:
            self._stats.data["save_s"] += dt
            self._stats.data["save_bytes"] += n * _token_bytes(kv_layer)
            if meta is not self._counted:  # tokens once per step (this is called once per layer)
                self._counted = meta
                self._stats.data["save_tokens"] += n

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        loads = [r for r in meta.requests if not r.is_store]
        t = time.perf_counter()
        super().start_load_kv(forward_context, **kwargs)
        dt = time.perf_counter() - t
        if not loads or forward_context.attn_metadata is None:
            return
        per_token = sum(_token_bytes(layer.kv_cache) for layer in forward_context.no_compile_layers.values()
                        if getattr(layer, "kv_cache", None) is not None)
        n = sum(len(r.slot_mapping) for r in loads)
        self._stats.data["load_s"] += dt
        self._stats.data["load_bytes"] += n * per_token
        self._stats.data["load_tokens"] += n
        self._stats.data["num_loads"] += len(loads)

    # ---- scheduler side: per-request counts, returned with the request's output (kv_transfer_params)
    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        super().update_state_after_alloc(request, blocks, num_external_tokens)
        if num_external_tokens > 0:
            self._req_loads[request.request_id] = (
                int(num_external_tokens), align_to_block_size(len(request.prompt_token_ids or []), self._block_size))

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        for new_req in scheduler_output.scheduled_new_reqs:  # the requests the parent's rule will save
            ids = list(new_req.prompt_token_ids or [])
            if new_req.req_id not in self._requests_need_load and not self._found_match_for_prompt(
                    ids, [f.identifier for f in new_req.mm_features]):
                self._req_saves[new_req.req_id] = align_to_block_size(len(ids), self._block_size)
        return super().build_connector_meta(scheduler_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Blocks are freed at once (False) and the request's output carries
        ``kv_transfer_params = {"agentsim": {"external_tokens", "loaded_tokens", "saved_tokens"}}``:
        vLLM's count of prompt tokens taken from the connector (beyond local prefix hits), the
        tokens the connector injected (the whole block-aligned ``prompt[:-1]``) and wrote."""
        ext, loaded = self._req_loads.pop(request.request_id, (0, 0))
        saved = self._req_saves.pop(request.request_id, 0)
        return False, {"agentsim": {"external_tokens": ext, "loaded_tokens": loaded, "saved_tokens": saved}}

    def get_kv_connector_stats(self) -> TransferStats | None:
        if self._stats.is_empty():
            return None
        out, self._stats = self._stats, TransferStats()
        return out

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> TransferStats:
        return TransferStats(data=dict(data or {}))

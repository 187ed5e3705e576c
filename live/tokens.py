"""Segments to token ids, and the driver-side copy of vLLM's block hash.

A segment id names a token stream (``agentsim.workload``): here its tokens are drawn in chunks of
:data:`CHUNK` from a PCG64 stream seeded by (segment id, chunk index), so a shorter use of a
segment is exactly a prefix of a longer one and every process derives the same ids. The output
of an LLM call is a segment too: once vLLM has generated it, :meth:`TokenMapper.register_output`
records the real token ids under the call's ``output_seg_id`` and later prompts reuse them, so
the next call's prompt is byte-for-byte what vLLM cached.

:class:`VllmBlockHasher` maps agentsim's block hashes (``Context.block_hashes``) to the hashes vLLM
computes for the same token blocks, which is what its KV-cache events carry. It calls vLLM's own
``hash_block_tokens`` (imported lazily), and an engine reports a probe hash at start so a
mismatch (another hash algorithm, ``PYTHONHASHSEED`` set differently) is caught, not silently
misrouted.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from agentsim.workload import Context

CHUNK = 256
PROBE_TOKENS = 5  # token id used for the hash probe block


class TokenMapper:
    """Deterministic token ids for segments, plus the registry of generated outputs.

    ``token_low``/``token_high`` bound the ids drawn (keep special tokens out: the tiny model's
    ids 0..3 are ``<unk> <s> </s> <pad>``). ``max_chunks`` bounds the chunk cache.
    """

    def __init__(self, token_low: int, token_high: int, max_chunks: int = 16384) -> None:
        if not 0 <= token_low < token_high:
            raise ValueError(f"token range [{token_low}, {token_high}) is empty")
        self.token_low = token_low
        self.token_high = token_high
        self.max_chunks = max_chunks
        self._chunks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._outputs: dict[int, np.ndarray] = {}
        self._by_program: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ streams
    def _chunk(self, seg_id: int, idx: int) -> np.ndarray:
        key = (seg_id, idx)
        arr = self._chunks.get(key)
        if arr is not None:
            self._chunks.move_to_end(key)
            return arr
        ss = np.random.SeedSequence([seg_id & 0xFFFFFFFF, (seg_id >> 32) & 0xFFFFFFFF, idx, 0xA6E7])
        arr = np.random.Generator(np.random.PCG64(ss)).integers(
            self.token_low, self.token_high, size=CHUNK, dtype=np.int64)
        self._chunks[key] = arr
        if len(self._chunks) > self.max_chunks:
            self._chunks.popitem(last=False)
        return arr

    def segment_tokens(self, seg_id: int, num_tokens: int) -> np.ndarray:
        """The first ``num_tokens`` ids of segment ``seg_id`` (generated output if registered)."""
        out = self._outputs.get(seg_id)
        if out is not None and len(out) >= num_tokens:
            return out[:num_tokens]
        n_chunks = -(-num_tokens // CHUNK)
        if n_chunks == 1:
            return self._chunk(seg_id, 0)[:num_tokens]
        return np.concatenate([self._chunk(seg_id, i) for i in range(n_chunks)])[:num_tokens]

    def prompt(self, context: Context) -> list[int]:
        """Token ids of a whole context (its segments in order)."""
        parts = [self.segment_tokens(s.seg_id, s.num_tokens) for s in context.all_segments() if s.num_tokens]
        if not parts:
            return []
        return np.concatenate(parts).tolist() if len(parts) > 1 else parts[0].tolist()

    # ------------------------------------------------------------------ outputs
    def register_output(self, program_id: int, seg_id: int, token_ids: Sequence[int]) -> None:
        """Remember what vLLM generated for ``seg_id`` so later prompts carry exactly those ids."""
        self._outputs[seg_id] = np.asarray(token_ids, dtype=np.int64)
        self._by_program.setdefault(program_id, []).append(seg_id)

    def drop_program(self, program_id: int) -> None:
        """Forget a finished program's outputs (they are private to it)."""
        for seg_id in self._by_program.pop(program_id, ()):
            self._outputs.pop(seg_id, None)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)


class VllmBlockHasher:
    """agentsim block hash -> vLLM block hash, computed with vLLM's own function and cached.

    ``algo`` is vLLM's ``prefix_caching_hash_algo`` (default ``sha256``).
    """

    def __init__(self, block_size: int, algo: str = "sha256", int_hashes: bool = False) -> None:
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core import kv_cache_utils

        self.block_size = block_size
        self._fn = get_hash_fn_by_name(algo)
        kv_cache_utils.init_none_hash(self._fn)
        self._hash_block = kv_cache_utils.hash_block_tokens
        # vLLM publishes a hash as its low 64 bits (big-endian int) when VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES
        self.int_hashes = int_hashes
        self._map: dict[int, bytes | int] = {}
        self._raw: dict[int, bytes] = {}

    def probe(self) -> str:
        """Hash of one block of PROBE_TOKENS with no parent (engines report the same)."""
        return bytes(self._hash_block(self._fn, None, [PROBE_TOKENS] * self.block_size)).hex()

    def map_context(self, ash: Sequence[int], token_ids: Sequence[int]) -> list[bytes | int]:
        """vLLM's event keys for the full blocks of a prompt whose agentsim hashes are ``ash``."""
        bs = self.block_size
        out: list[bytes | int] = []
        parent: bytes | None = None
        m, raw = self._map, self._raw
        for i, h in enumerate(ash):
            v = raw.get(h)
            if v is None:
                v = bytes(self._hash_block(self._fn, parent, token_ids[i * bs:(i + 1) * bs]))
                raw[h] = v
                m[h] = (int.from_bytes(v, "big") & 0xFFFFFFFFFFFFFFFF) if self.int_hashes else v
            out.append(m[h])
            parent = v
        return out

    def lookup(self, agentsim_hash: int) -> bytes | int | None:
        return self._map.get(agentsim_hash)

    def __len__(self) -> int:
        return len(self._map)


def engine_probe_hash(block_size: int, algo: str = "sha256") -> str:
    """What an engine process computes for the probe block (run inside the engine's process)."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils

    fn = get_hash_fn_by_name(algo)
    kv_cache_utils.init_none_hash(fn)
    return bytes(kv_cache_utils.hash_block_tokens(fn, None, [PROBE_TOKENS] * block_size)).hex()

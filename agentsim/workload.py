"""The shared workload model: programs written once as generators, run by sim and live alike.

A *program* is one agent task (a ReAct loop, a chat session, a map-reduce ...). Its body is a
generator function ``body(pc: ProgramContext)`` that yields *requests* and receives their results:

- :class:`LLMCall`  -> :class:`CallResult` (the output :class:`Segment` and the call's timings)
- :class:`ToolCall` -> ``None`` after the tool's duration has elapsed
- :class:`Parallel` -> a list with one result per branch, once every branch is done

The simulator steps the generator from SimPy processes; the live driver steps the same generator
from asyncio. Nothing here imports simpy, ray or vllm.

Token content is modelled as *segments*: a segment id names a deterministic stream of tokens
(a shared system prompt, one user turn, one model output ...). A :class:`Context` is an immutable
sequence of (segment, length) pieces; KV-cache blocks are hashed over it exactly like vLLM hashes
token blocks (each block's hash chains its parent's hash and its own content), so two calls share
cached blocks exactly when they share a token prefix. In live mode each segment id maps to token
ids deterministically, so vLLM's prefix cache sees the same sharing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Generator

import numpy as np

__all__ = [
    "Segment",
    "Context",
    "CallHints",
    "LLMCall",
    "ToolCall",
    "Parallel",
    "CallResult",
    "ProgramContext",
    "Program",
    "stable_id",
    "ProgramBody",
]


def stable_id(*parts: object) -> int:
    """A process-independent 62-bit id from strings/ints (``hash(str)`` changes per process)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 2


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of ``num_tokens`` tokens whose content is named by ``seg_id``.

    Two segments with the same id have the same token stream; a shorter one is a prefix of a
    longer one (Mooncake's last ``hash_id`` of a request may cover fewer than 512 tokens).
    """

    seg_id: int
    num_tokens: int

    def __post_init__(self) -> None:
        if self.num_tokens < 0:
            raise ValueError(f"segment {self.seg_id}: num_tokens must be >= 0")


class Context:
    """An immutable token sequence: the prompt of an LLM call, built by appending segments.

    ``extend`` shares the parent's work, so a program whose history grows by a few hundred tokens
    per turn pays only for the new blocks when their hashes are computed.
    """

    __slots__ = ("parent", "segments", "num_tokens", "_hash_cache")

    def __init__(self, parent: Context | None = None, segments: tuple[Segment, ...] = ()) -> None:
        self.parent = parent
        self.segments = segments
        n = parent.num_tokens if parent is not None else 0
        for s in segments:
            n += s.num_tokens
        self.num_tokens = n
        # block_size -> (hashes of full blocks, pieces of the trailing partial block, tokens in it)
        self._hash_cache: dict[int, tuple[list[int], tuple, int]] | None = None

    @staticmethod
    def of(*segments: Segment) -> Context:
        return Context(None, tuple(segments))

    def extend(self, *segments: Segment) -> Context:
        """A new context: this one followed by ``segments`` (empty segments are dropped)."""
        for s in segments:
            if s.num_tokens <= 0:
                segments = tuple(s for s in segments if s.num_tokens > 0)
                if not segments:
                    return self
                break
        return Context(self, segments)

    def all_segments(self) -> list[Segment]:
        chain: list[Context] = []
        node: Context | None = self
        while node is not None:
            chain.append(node)
            node = node.parent
        out: list[Segment] = []
        for node in reversed(chain):
            out.extend(node.segments)
        return out

    def block_hashes(self, block_size: int) -> list[int]:
        """Hashes of the full ``block_size``-token blocks, hash-chained like vLLM's prefix cache.

        The returned list is shared with the cache: callers must not mutate it.
        """
        return self._hashes(block_size)[0]

    def _hashes(self, block_size: int) -> tuple[list[int], tuple, int]:
        cache = self._hash_cache
        if cache is None:
            cache = self._hash_cache = {}
        else:
            hit = cache.get(block_size)
            if hit is not None:
                return hit
        if self.parent is not None:
            parent_hashes, tail, filled = self.parent._hashes(block_size)
            hashes = parent_hashes.copy()
        else:
            hashes, tail, filled = [], (), 0
        prev = hashes[-1] if hashes else 0
        pieces = list(tail)
        append = hashes.append
        # tuples of ints hash identically in every process (no str randomisation); a block's hash
        # chains the previous block's and its pieces (seg_id, start, end) within their segments
        for seg in self.segments:
            seg_id = seg.seg_id
            end = seg.num_tokens
            pos = 0
            if filled and end:
                # complete the partial block the previous segments left
                pos = block_size - filled
                if pos > end:
                    pos = end
                pieces.append((seg_id, 0, pos))
                filled += pos
                if filled < block_size:
                    continue  # this segment is used up
                prev = hash((prev, tuple(pieces)))
                append(prev)
                pieces = []
                filled = 0
            # the blocks this segment fills alone: one piece each
            last = end - block_size
            while pos <= last:
                prev = hash((prev, ((seg_id, pos, pos + block_size),)))
                append(prev)
                pos += block_size
            if pos < end:
                pieces.append((seg_id, pos, end))
                filled = end - pos
        result = (hashes, tuple(pieces), filled)
        cache[block_size] = result
        return result

    def __repr__(self) -> str:
        return f"Context(num_tokens={self.num_tokens})"


@dataclass(slots=True)
class CallHints:
    """Optional information a program offers the policies (all may stay ``None``).

    ``next_invocation_distance``: expected time (s) until this agent's next LLM call after this one
    ends (ScaleSim's D_i, KVFlow's steps-to-execution when given in steps).
    ``tool_after``: name of the tool the program will run after this call, with ``tool_time_estimate``.
    ``deadline_at``: absolute deadline (s) for the call (HexGen-style stage SLO).
    ``stage``: free-form stage name in a workflow DAG.
    """

    next_invocation_distance: float | None = None
    next_invocation_steps: int | None = None
    tool_after: str | None = None
    tool_time_estimate: float | None = None
    deadline_at: float | None = None
    stage: str | None = None
    fixed_prefix_tokens: int | None = None


@dataclass(slots=True)
class LLMCall:
    """One LLM invocation: prompt ``context`` and a forced output length (``ignore_eos``)."""

    context: Context
    num_output_tokens: int
    agent_id: int | None = None  # defaults to the program's agent id
    thread_id: int = 0
    parent_call_ids: tuple[int, ...] = ()
    hints: CallHints = field(default_factory=CallHints)
    output_seg_id: int | None = None  # content id of the output; assigned by ProgramContext.llm

    def __post_init__(self) -> None:
        if self.num_output_tokens < 1:
            raise ValueError("LLMCall.num_output_tokens must be >= 1")
        if self.context.num_tokens < 1:
            raise ValueError("LLMCall.context must hold at least one token")


@dataclass(slots=True)
class ToolCall:
    """A tool (or human) step that takes ``duration`` seconds; live mode really waits."""

    name: str
    duration: float
    estimate: float | None = None  # what a predictor would say; None = unknown

    def __post_init__(self) -> None:
        if not self.duration >= 0:
            raise ValueError(f"ToolCall {self.name!r}: duration must be >= 0")


@dataclass(slots=True)
class Parallel:
    """Run branches concurrently; each branch is a request or a sub-program generator."""

    branches: list[Any]


@dataclass(slots=True)
class CallResult:
    """What an LLM call returns to its program."""

    call_id: int
    output: Segment
    arrival_at: float
    first_token_at: float
    finish_at: float
    engine_id: int


Request = LLMCall | ToolCall | Parallel
ProgramBody = Callable[["ProgramContext"], Generator[Any, Any, Any]]


class ProgramContext:
    """What a program body gets: its ids, a private seeded RNG, and segment constructors.

    Segment ids are derived from (program id, a per-program counter), so they do not depend on
    how the backend interleaves programs: sim and live build identical token streams.
    """

    __slots__ = ("program_id", "agent_id", "kind", "rng", "_next_seg", "_next_thread")

    def __init__(self, program_id: int, agent_id: int, kind: str, rng: np.random.Generator) -> None:
        self.program_id = program_id
        self.agent_id = agent_id
        self.kind = kind
        self.rng = rng
        self._next_seg = 0
        self._next_thread = 0

    def segment(self, num_tokens: int) -> Segment:
        """A fresh segment private to this program (a user turn, a tool result ...)."""
        self._next_seg += 1
        return Segment((self.program_id << 20) | (self._next_seg & 0xFFFFF), int(num_tokens))

    @staticmethod
    def shared(name: str, num_tokens: int) -> Segment:
        """A segment shared by every program that names it (a system prompt, tool schemas)."""
        return Segment(stable_id("shared", name) | (1 << 61), int(num_tokens))

    def llm(self, context: Context, num_output_tokens: int, **kw: Any) -> LLMCall:
        """Build an LLM call whose output segment id is fixed in advance (deterministic)."""
        call = LLMCall(context, int(num_output_tokens), **kw)
        self._next_seg += 1
        call.output_seg_id = (self.program_id << 20) | (self._next_seg & 0xFFFFF)
        return call

    def new_thread(self) -> int:
        self._next_thread += 1
        return self._next_thread


@dataclass(slots=True)
class Program:
    """One agent program instance: when it starts and the body to run."""

    program_id: int
    agent_id: int
    kind: str
    arrival_at: float
    body: ProgramBody
    seed: int = 0
    deadline_at: float | None = None
    meta: dict = field(default_factory=dict)

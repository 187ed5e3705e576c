"""Cross-engine prefix fetch: load a call's missing prefix blocks from another engine instead of recomputing.

The decision point is :class:`agentsim.policies.base.KVFetchPolicy`: when a call is routed to an
engine whose prefix cache holds fewer of its prompt blocks than another engine's, the backend shows
the policy each such source (:class:`FetchOption`: how many blocks it would bring, the transfer time
over the links as queued now, and the time the target engine would spend recomputing those tokens)
and the policy picks one source or none. Mooncake's KV pool, LMCache's P2P sharing and llm-d's
KV-aware routing make this trade (transfer vs recompute); the simulator carries the choice out in
:mod:`agentsim.sim.disagg` (the fetched blocks then count as prefix-cache hits, their recompute is
skipped).

Policies (``cluster.disagg.prefix_fetch``):

- ``off``: never fetch (vLLM without a KV connector: a miss is recomputed).
- ``cheaper``: the option with the largest saving ``recompute_s - transfer_s * margin``, if positive
  (ties: the option listed first, i.e. the lowest engine id).
- ``always``: the option bringing the most blocks (ties: the lowest engine id), whatever it costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from agentsim.policies.base import CallView


@dataclass(frozen=True, slots=True)
class FetchOption:
    """One possible source for a fetch.

    ``engine_id``: the source engine; ``num_blocks``: blocks it would bring (past the target's own
    prefix hit); ``nbytes``: their KV bytes (profile ``kv_bytes_per_token`` x block size x blocks);
    ``transfer_s``: seconds until they would arrive if queued now (link queueing, bandwidth, latency:
    :meth:`agentsim.sim.network.Network.estimate`); ``recompute_s``: seconds of prefill the target
    engine would spend on those tokens (profile step time, chunked by the token budget).
    """

    engine_id: int
    num_blocks: int
    nbytes: int
    transfer_s: float
    recompute_s: float


class NoFetch:
    """Never fetch: every prefix miss is recomputed (vLLM without a KV connector)."""

    name = "off"

    def choose(self, call: CallView, target_engine_id: int, options: Sequence[FetchOption], now: float) -> int | None:
        return None


class CheaperFetch:
    """Fetch from the source with the largest saving ``recompute_s - margin * transfer_s`` when it is > 0.

    ``margin`` >= 1 demands the transfer be that many times cheaper (a hedge against queueing the
    estimate did not see); ties go to the option listed first (lowest engine id).
    """

    name = "cheaper"

    def __init__(self, margin: float = 1.0) -> None:
        if not margin > 0:
            raise ValueError(f"margin must be > 0, got {margin!r}")
        self.margin = margin

    def choose(self, call: CallView, target_engine_id: int, options: Sequence[FetchOption], now: float) -> int | None:
        best, best_gain = None, 0.0
        for i, o in enumerate(options):
            gain = o.recompute_s - self.margin * o.transfer_s
            if gain > best_gain:
                best, best_gain = i, gain
        return best


class AlwaysFetch:
    """Fetch from the source bringing the most blocks, whatever the transfer costs (an upper bound on use)."""

    name = "always"

    def choose(self, call: CallView, target_engine_id: int, options: Sequence[FetchOption], now: float) -> int | None:
        if not options:
            return None
        return min(range(len(options)), key=lambda i: (-options[i].num_blocks, i))


FETCH_POLICIES = {"off": NoFetch, "cheaper": CheaperFetch, "always": AlwaysFetch}


def make_fetch_policy(name: str, margin: float = 1.0):
    """The policy ``name`` (``off``, ``cheaper``, ``always``); ``margin`` is ``cheaper``'s. KeyError if unknown."""
    if name == "cheaper":
        return CheaperFetch(margin)
    return FETCH_POLICIES[name]()

"""vLLM's API server in front of an engine: per-request CPU work that a burst queues for.

What a client sees of one request is framed by the API server, not by the engine: the server parses
the HTTP request, tokenizes the prompt and builds the engine request before the engine sees it, and
it detokenizes and streams every token the engine produces. In vLLM all of this runs on the API
server's single asyncio event loop, one loop per API server process (``--api-server-count``):

- intake: ``vllm/entrypoints/openai/completion/serving.py`` (``serving_completion.py`` before 0.11)
  ``create_completion`` -> ``vllm/v1/engine/async_llm.py`` ``AsyncLLM.add_request`` ->
  ``input_processor.process_inputs`` (tokenization, request setup), then the request is sent to the
  engine core;
- output: ``AsyncLLM``'s ``output_handler`` task takes each step's ``EngineCoreOutputs`` and runs
  ``vllm/v1/engine/output_processor.py`` ``OutputProcessor.process_outputs`` (incremental
  detokenization per request and token), and each request's stream generator writes its SSE chunk.

Because one event loop does both, a burst of N requests is handled one after the other: the first
token of the burst reaches its client only after the loop has worked through the requests queued
before it (issue 14: with N = 1280 the earliest first token came at ~4.2 s vs 0.14 s for N = 10).

Model: ``api_server_count`` workers share one first-come-first-served queue of jobs, each job
holding one worker for its cost (:class:`agentsim.calibration.profile.FrontendCosts`):

1. intake, when the client sends the request: ``per_request_s + per_prompt_token_s * prompt``;
   the request reaches the engine when it completes;
2. first token, when the engine samples it: ``per_output_token_s``; the client sees its first token
   when the job completes;
3. the remaining ``n - 1`` output tokens, when the engine finishes the request: the job holds a
   worker for ``per_output_token_s * (n - 1)`` (the work that vLLM spreads over the decode steps),
   and the client sees the last token ``per_output_token_s`` after the job starts (the earlier
   tokens were processed while the engine decoded, so an idle frontend adds one token's cost, a
   saturated one adds its queue).

With every cost zero the runner does not build a frontend at all (runs are bit-identical).
"""

from __future__ import annotations

import math
from typing import Callable

import simpy

from agentsim.calibration.profile import FrontendCosts
from agentsim.sim.engine import SimCall, delay_to


class Frontend:
    """``workers`` API server event loops sharing one FIFO job queue (a SimPy ``Resource``)."""

    def __init__(self, env: simpy.Environment, costs: FrontendCosts, workers: int) -> None:
        if workers < 1:
            raise ValueError("a frontend needs at least one worker")
        self.env = env
        self.costs = costs
        self.workers = simpy.Resource(env, capacity=workers)
        self.busy_time = 0.0  # worker-seconds of frontend work done (all jobs)

    def _job(self, cost: float, notify_after: float, on_notify: Callable[[float], None] | None):
        """Hold one worker for ``cost`` s once it is free (FIFO); call ``on_notify(t)`` at
        ``start + notify_after`` (``notify_after <= cost``)."""
        env = self.env
        with self.workers.request() as req:
            yield req
            start = env.now
            if notify_after > 0:
                yield env.timeout(delay_to(env.now, start + notify_after))
            if on_notify is not None:
                on_notify(env.now)
            rest = cost - notify_after
            if rest > 0:
                yield env.timeout(delay_to(env.now, start + cost))
            self.busy_time += cost

    def intake(self, num_prompt_tokens: int):
        """A process body: the request's setup + tokenization job; returns when it is done."""
        cost = self.costs.intake_seconds(num_prompt_tokens)
        yield from self._job(cost, cost, None)

    def first_token(self, call: FrontendCall, engine_at: float) -> None:
        """Queue the first token's detokenize/stream job (engine sampled it at ``engine_at``)."""
        self.env.process(self._first_token(call, engine_at))

    def _first_token(self, call: FrontendCall, engine_at: float):
        env = self.env
        if engine_at > env.now:
            yield env.timeout(delay_to(env.now, engine_at))
        c = self.costs.per_output_token_s

        def seen(t: float) -> None:
            call.client_first_token_at = t
            if call.finish_pending is not None and call.client_first_token_at >= 0:
                pending, call.finish_pending = call.finish_pending, None
                pending()

        yield from self._job(c, c, seen)

    def finish(self, call: FrontendCall, deliver: Callable[[], None]) -> None:
        """Queue the job for the tokens after the first; ``deliver()`` runs once the client has
        the last token (and, as a stream is ordered, not before it has the first one)."""
        self.env.process(self._finish(call, deliver))

    def _finish(self, call: FrontendCall, deliver: Callable[[], None]):
        c = self.costs.per_output_token_s
        rest = c * max(call.num_output_tokens - 1, 0)

        def seen(t: float) -> None:
            call.client_finish_at = t
            if call.num_output_tokens <= 1 or call.client_first_token_at >= 0:
                deliver()
            else:
                call.finish_pending = deliver  # the first token's job is still queued

        if call.num_output_tokens <= 1:
            # one token: its first-token job is the whole output; finish when it is delivered
            def one() -> None:
                call.client_finish_at = call.client_first_token_at
                deliver()

            if call.client_first_token_at >= 0:
                one()
            else:
                call.finish_pending = one
            return
        yield from self._job(rest, min(c, rest), seen)


class FrontendCall(SimCall):
    """A :class:`SimCall` that tells the frontend when the engine samples its first token.

    The engine sets ``first_token_at`` when it samples the first token (``Engine._apply``); this
    subclass turns that assignment into the first-token job, so the engine model needs no hook.
    """

    __slots__ = ("frontend", "client_first_token_at", "client_finish_at", "finish_pending")

    def __init__(self, *args, frontend: Frontend | None = None, **kw) -> None:
        self.frontend = None  # set after SimCall.__init__ (which assigns first_token_at = nan)
        self.client_first_token_at = -1.0
        self.client_finish_at = -1.0
        self.finish_pending = None
        super().__init__(*args, **kw)
        self.frontend = frontend

    def set_client_times(self) -> None:
        """Replace the engine's first-token and finish times by the ones the client saw (called
        once the last token is delivered; the engine and its policies have used the engine times)."""
        _FIRST_TOKEN_SLOT.__set__(self, self.client_first_token_at)
        self.finish_at = self.client_finish_at

    @property
    def first_token_at(self) -> float:  # type: ignore[override]
        return _FIRST_TOKEN_SLOT.__get__(self, FrontendCall)

    @first_token_at.setter
    def first_token_at(self, t: float) -> None:
        old = _FIRST_TOKEN_SLOT.__get__(self, FrontendCall) if self.frontend is not None else math.nan
        _FIRST_TOKEN_SLOT.__set__(self, t)
        if self.frontend is not None and math.isnan(old) and not math.isnan(t):
            self.frontend.first_token(self, t)


_FIRST_TOKEN_SLOT = SimCall.__dict__["first_token_at"]

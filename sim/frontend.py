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

Model: ``api_server_count`` workers (event loops), each serving its jobs first come, first served,
each job holding the worker for its cost (:class:`agentsim.calibration.profile.FrontendCosts`):

1. intake, when the client sends the request: ``per_request_s + per_prompt_token_s * prompt``,
   on the worker that is free first (the API server processes share one listening socket and the
   loop that gets to ``accept`` first takes the connection; ``vllm/entrypoints/cli/serve.py``
   ``run_multi_api_server``, ``vllm/entrypoints/launchers/launcher.py`` ``create_server_socket``);
   the request reaches the engine when the job completes. The request then stays on that worker;
2. first token, when the engine samples it: ``per_output_token_s``; the client sees its first token
   when the job completes;
3. the remaining ``n - 1`` output tokens, when the engine finishes the request: the job holds the
   worker for ``per_output_token_s * (n - 1)`` (the work vLLM spreads over the decode steps), and
   the client sees the last token ``per_output_token_s`` after the job starts (the earlier tokens
   were processed while the engine decoded, so an idle frontend adds one token's cost, a busy one
   adds its queue).

Jobs have fixed costs and each worker is FIFO, so a worker is a clock: a job queued at ``t`` starts
at ``max(t, free_at)`` and the worker is next free at its end. A burst of ``N`` requests on ``c``
workers with setup ``s`` therefore hands request ``k`` to the engine at ``(floor(k/c) + 1) * s``,
and no first token reaches a client before ``floor(N/c) * s``.

``transport_s`` delays the hand-off to the engine and the return of the first token and of the
last token (before their jobs are queued) without holding a worker.

With every cost zero the runner builds no frontend at all (runs are bit-identical).
"""

from __future__ import annotations

import math
from typing import Callable

import simpy

from agentsim.calibration.profile import FrontendCosts
from agentsim.sim.engine import SimCall, delay_to


class Frontend:
    """``workers`` API server event loops, each a FIFO server of fixed-cost jobs (a clock)."""

    def __init__(self, env: simpy.Environment, costs: FrontendCosts, workers: int) -> None:
        if workers < 1:
            raise ValueError("a frontend needs at least one worker")
        self.env = env
        self.costs = costs
        self.free_at = [0.0] * workers  # when each worker has done every job queued so far
        self.busy_time = 0.0  # worker-seconds of frontend work queued (all jobs)

    def _queue(self, worker: int, cost: float) -> float:
        """Queue a job of ``cost`` s on ``worker`` now; returns its start time."""
        start = self.free_at[worker]
        now = self.env.now
        if start < now:
            start = now
        self.free_at[worker] = start + cost
        self.busy_time += cost
        return start

    def _at(self, t: float, fn: Callable[[], None]) -> None:
        """Run ``fn()`` at simulated time ``t`` (now if ``t`` is not in the future)."""
        env = self.env
        ev = env.timeout(delay_to(env.now, t) if t > env.now else 0.0)
        ev.callbacks.append(lambda _ev: fn())

    def intake(self, call: FrontendCall):
        """A process body: the request's setup + tokenization on the first free worker (ties: the
        lowest index); returns when it is done, and pins the request to that worker."""
        now = self.env.now
        free = self.free_at
        w = min(range(len(free)), key=lambda i: (free[i] if free[i] > now else now, i))
        call.worker = w
        cost = self.costs.intake_seconds(call.num_prompt_tokens)
        done = self._queue(w, cost) + cost + self.costs.transport_s
        if done > now:
            yield self.env.timeout(delay_to(now, done))

    def first_token(self, call: FrontendCall, engine_at: float) -> None:
        """Queue the first token's detokenize/stream job once it is back from the engine (it was
        sampled at ``engine_at``)."""
        back = engine_at + self.costs.transport_s
        if back > self.env.now:
            self._at(back, lambda: self._first_token(call))
            return
        self._first_token(call)

    def _first_token(self, call: FrontendCall) -> None:
        c = self.costs.per_output_token_s
        seen_at = self._queue(call.worker, c) + c

        def seen() -> None:
            call.client_first_token_at = self.env.now
            if call.finish_pending is not None:
                pending, call.finish_pending = call.finish_pending, None
                pending()

        self._at(seen_at, seen)

    def finish(self, call: FrontendCall, deliver: Callable[[], None]) -> None:
        """Queue the job for the tokens after the first; ``deliver()`` runs once the client has the
        last token (and, as a stream is ordered, never before it has the first one)."""
        tr = self.costs.transport_s
        if tr > 0:
            self._at(self.env.now + tr, lambda: self._finish(call, deliver))
            return
        self._finish(call, deliver)

    def _finish(self, call: FrontendCall, deliver: Callable[[], None]) -> None:
        n = call.num_output_tokens
        if n <= 1:
            # one token: its first-token job is the whole output
            def one() -> None:
                call.client_finish_at = call.client_first_token_at
                deliver()

            if call.client_first_token_at >= 0:
                one()
            else:
                call.finish_pending = one
            return
        c = self.costs.per_output_token_s
        rest = c * (n - 1)
        seen_at = self._queue(call.worker, rest) + min(c, rest)

        def seen() -> None:
            call.client_finish_at = self.env.now
            if call.client_first_token_at >= 0:
                deliver()
            else:
                # the first token's job has not completed yet (another worker's order): the last
                # token is shown once the first one is
                def ordered() -> None:
                    call.client_finish_at = max(call.client_finish_at, call.client_first_token_at)
                    deliver()

                call.finish_pending = ordered

        self._at(seen_at, seen)


class FrontendCall(SimCall):
    """A :class:`SimCall` that tells the frontend when the engine samples its first token.

    The engine sets ``first_token_at`` when it samples the first token (``Engine._apply``); this
    subclass turns that assignment into the first-token job, so the engine model needs no hook.
    """

    __slots__ = ("frontend", "worker", "client_first_token_at", "client_finish_at", "finish_pending")

    def __init__(self, *args, frontend: Frontend | None = None, **kw) -> None:
        self.frontend = None  # set after SimCall.__init__ (which assigns first_token_at = nan)
        self.worker = 0
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

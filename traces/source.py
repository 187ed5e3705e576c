"""Program sources: turn a workload spec into programs with arrival times, for sim and live.

- ``closed``: ``agents`` programs in flight; when one ends, its agent starts the next one.
- ``poisson``: programs arrive as a Poisson process of ``rate`` programs/s.
- ``trace``: programs and arrival offsets come from a trace (``agentsim.traces.replay``),
  relative to its first program; the whole trace is replayed unless the run bounds it
  (``limit``, or a ``duration`` given explicitly), and :attr:`ProgramSource.num_cut` says how
  many programs such a bound left out.

Every program draws from its own RNG stream, seeded by (run seed, program id), so the same
program is generated whatever order a backend asks for them in.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from agentsim.config import WorkloadSpec
from agentsim.errors import ConfigError
from agentsim.traces.generators import make_generator
from agentsim.workload import Program, ProgramContext

_PROGRAM_STREAM = 1
_ARRIVAL_STREAM = 2


def program_rng(seed: int, program_id: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(_PROGRAM_STREAM, program_id))))


class ProgramSource:
    """Builds :class:`Program` objects for a workload spec and a run seed."""

    def __init__(self, spec: WorkloadSpec, seed: int) -> None:
        self.spec = spec
        self.seed = seed
        if spec.mix:
            self._gens = [make_generator(m.generator, m.params, f"workload.mix[{i}]") for i, m in enumerate(spec.mix)]
            w = np.array([m.weight for m in spec.mix], dtype=float)
            self._weights = w / w.sum()
        else:
            self._gens = [make_generator(spec.generator, spec.params)]
            self._weights = np.array([1.0])
        self._next_id = 0
        self._trace_programs: list[Program] | None = None
        self.num_in_trace = 0      # programs the trace holds (trace arrivals only)
        self.num_cut = 0           # trace programs not replayed: beyond ``limit`` or arriving after the bound
        if spec.arrival == "trace":
            from agentsim.traces import replay  # imported lazily: only trace runs need it

            if not hasattr(replay, "load_programs"):
                raise ConfigError("workload.trace", "trace replay is not available in this build")
            self._trace_programs = replay.load_programs(
                spec.trace, fmt=spec.trace_format, time_scale=spec.time_scale, limit=spec.limit, seed=seed)
            self.num_in_trace = getattr(self._trace_programs, "num_in_trace", len(self._trace_programs))
            self.num_cut = self.num_in_trace - len(self._trace_programs)

    @property
    def num_started(self) -> int:
        return self._next_id

    def exhausted(self) -> bool:
        n = self.spec.num_programs
        return n is not None and self._next_id >= n

    def make(self, agent_id: int | None, arrival_at: float) -> Program:
        """The next program (ids count up from 0); ``agent_id`` defaults to the program id."""
        pid = self._next_id
        self._next_id += 1
        rng = program_rng(self.seed, pid)
        k = 0 if len(self._gens) == 1 else int(rng.choice(len(self._gens), p=self._weights))
        gen = self._gens[k]
        aid = pid if agent_id is None else agent_id
        prog = Program(program_id=pid, agent_id=aid, kind=gen.name, arrival_at=arrival_at, body=None, seed=self.seed)
        prog.meta["generator"] = gen
        prog.meta["rng"] = rng
        return prog

    def context_for(self, prog: Program) -> ProgramContext:
        return ProgramContext(prog.program_id, prog.agent_id, prog.kind, prog.meta["rng"])

    # ------------------------------------------------------------------ arrivals
    def poisson_arrivals(self, until: float) -> Iterator[Program]:
        """Programs arriving as a Poisson process of ``rate``/s before ``until`` s.

        Raises ConfigError (``duration``) when not even the first program arrives before ``until``:
        a run in which nothing arrives measures nothing.
        """
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=(_ARRIVAL_STREAM,))))
        t = 0.0
        first = True
        while True:
            t += float(rng.exponential(1.0 / self.spec.rate))
            if first and t >= until:
                raise ConfigError("duration", f"no program arrives within {until:g} s at workload.rate "
                                              f"{self.spec.rate:g}/s (the first would arrive at {t:.4g} s)")
            first = False
            if t >= until or self.exhausted():
                return
            yield self.make(None, t)

    def bound_trace(self, until: float | None) -> int:
        """Bound the trace's arrivals to before ``until`` s (None: replay it whole); returns how many
        programs of the trace are then left out (``limit`` included; also :attr:`num_cut`).

        Raises ConfigError (``duration``) when no program arrives before ``until``.
        """
        assert self._trace_programs is not None
        progs = self._trace_programs
        if until is not None:
            kept = sum(1 for p in progs if p.arrival_at < until)
            if kept == 0:
                raise ConfigError("duration", f"no program of trace {self.spec.trace} arrives within {until:g} s "
                                              f"(the first arrives at {progs[0].arrival_at:g} s)")
            self._trace_programs = progs[:kept]   # programs are sorted by arrival
        self.num_cut = self.num_in_trace - len(self._trace_programs)
        return self.num_cut

    def trace_arrivals(self, until: float | None = None) -> Iterator[Program]:
        """The trace's programs in arrival order; those arriving at or after ``until`` s are not
        replayed (None: every program; see :meth:`bound_trace`, which also counts them)."""
        assert self._trace_programs is not None
        if until is not None:
            self.bound_trace(until)
        for prog in self._trace_programs:
            self._next_id = max(self._next_id, prog.program_id + 1)
            yield prog


def cut_note(cfg, num_in_trace: int, num_cut: int) -> str | None:
    """One line saying how many trace programs a bounded replay left out (None if none was).

    ``cfg`` is the run's :class:`~agentsim.config.RunConfig`; the split between ``workload.limit``
    and ``duration`` follows :func:`agentsim.traces.replay.load_programs` (limit first, by arrival).
    """
    if not num_cut:
        return None
    limit = cfg.workload.limit
    by_limit = max(0, num_in_trace - limit) if limit is not None else 0
    parts = []
    if num_cut - by_limit:
        parts.append(f"{num_cut - by_limit:,} arrive at or after duration {cfg.duration:g} s "
                     "(leave duration unset to replay the whole trace)")
    if by_limit:
        parts.append(f"{by_limit:,} beyond workload.limit {limit:,}")
    return (f"note: replayed {num_in_trace - num_cut:,} of {num_in_trace:,} trace programs; "
            + "; ".join(parts))

"""Program sources: turn a workload spec into programs with arrival times, for sim and live.

- ``closed``: ``agents`` programs in flight; when one ends, its agent starts the next one.
- ``poisson``: programs arrive as a Poisson process of ``rate`` programs/s.
- ``trace``: programs and arrival offsets come from a trace (``agentsim.traces.replay``).

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
        if spec.arrival == "trace":
            from agentsim.traces import replay  # imported lazily: only trace runs need it

            if not hasattr(replay, "load_programs"):
                raise ConfigError("workload.trace", "trace replay is not available in this build")
            self._trace_programs = replay.load_programs(
                spec.trace, fmt=spec.trace_format, time_scale=spec.time_scale, limit=spec.limit, seed=seed)

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
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=(_ARRIVAL_STREAM,))))
        t = 0.0
        while True:
            t += float(rng.exponential(1.0 / self.spec.rate))
            if t >= until or self.exhausted():
                return
            yield self.make(None, t)

    def trace_arrivals(self, until: float) -> Iterator[Program]:
        assert self._trace_programs is not None
        for prog in self._trace_programs:
            if prog.arrival_at >= until:
                return
            self._next_id = max(self._next_id, prog.program_id + 1)
            yield prog

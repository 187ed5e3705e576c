"""Scripted programs for the policy tests (tests/test_policies_*.py): a generator whose programs are
lists of steps, run on the real engine model with a constant step time, so every time can be worked
out by hand."""

from __future__ import annotations

from dataclasses import dataclass

from agentsim.config import load_config
from agentsim.sim.runner import Simulation
from agentsim.traces.generators import register_generator
from agentsim.workload import CallHints, Context, Parallel, ToolCall

from conftest import constant_profile

STEP = 0.01


# --------------------------------------------------------------------------- scripted programs
@register_generator("test-script")
@dataclass(frozen=True)
class Script:
    """Program i runs ``programs[i % len(programs)]``, a list of steps:

    - ``["tool", seconds]`` (named ``"t"``, or ``["tool", seconds, name]``);
    - ``["llm", new_tokens, output_tokens]``: the context grows by the previous output and
      ``new_tokens`` fresh private tokens; hints name the following tool and its exact duration;
    - ``["par", [steps...], [steps...], ...]``: branches on the current context, in parallel.
    ``shared_tokens``: every program's context starts with this shared system prompt.
    """

    programs: tuple = ()
    shared_tokens: int = 0

    def body(self, pc):
        steps = self.programs[pc.program_id % len(self.programs)]
        ctx = Context.of(pc.shared("test-script-system", self.shared_tokens)) if self.shared_tokens else None
        ctx = yield from self._run(pc, steps, ctx, 0)

    def _run(self, pc, steps, ctx, thread):
        prev = None
        for i, st in enumerate(steps):
            kind = st[0]
            if kind == "tool":
                yield ToolCall(st[2] if len(st) > 2 else "t", float(st[1]), estimate=float(st[1]))
            elif kind == "llm":
                new = pc.segment(int(st[1]))
                if ctx is None:
                    ctx = Context.of(new)
                else:
                    ctx = ctx.extend(*(s for s in (prev, new) if s is not None))
                nxt = steps[i + 1] if i + 1 < len(steps) else None
                hints = CallHints()
                if nxt is not None and nxt[0] == "tool":
                    hints = CallHints(tool_after=nxt[2] if len(nxt) > 2 else "t", tool_time_estimate=float(nxt[1]),
                                      next_invocation_distance=float(nxt[1]))
                result = yield pc.llm(ctx, int(st[2]), thread_id=thread, hints=hints)
                prev = result.output
            elif kind == "par":
                base = ctx.extend(prev) if prev is not None else ctx
                branches = [self._run(pc, b, base, pc.new_thread()) for b in st[1:]]
                outs = yield Parallel(branches)
                ctx, prev = base, None
                for o in outs:
                    if o is not None:
                        ctx = ctx.extend(o)
            else:
                raise ValueError(st)
        return prev


def scripted(programs, policy, *, blocks=None, max_num_seqs=256, engines=1, shared_tokens=0, step=STEP,
             profile=None, **over):
    """A Simulation of ``programs`` (one closed-loop agent each, program i started at t=0)."""
    eng = {"max_num_seqs": max_num_seqs}
    if blocks is not None:
        eng["num_gpu_blocks_override"] = blocks
    cfg = load_config(None, {
        "cluster.num_nodes": 1, "cluster.gpus_per_node": engines, "cluster.engine": eng,
        "workload.generator": "test-script", "workload.arrival": "closed", "workload.agents": len(programs),
        "workload.num_programs": len(programs),
        "workload.params": {"programs": programs, "shared_tokens": shared_tokens},
        "policy": policy, "sim.drain": True, "duration": 1000.0, **over})
    return Simulation(cfg, profile=profile or constant_profile(step))


def calls_of(result, program_id):
    c = result.calls
    return c[c["program_id"] == program_id].sort_values("call_id").reset_index(drop=True)

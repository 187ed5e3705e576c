"""Order policies (Autellix PLAS/ATLAS, MLFQ, SJF oracle, Kairos) on hand-checked scenarios run on the real
engine model.

Most scenarios use a constant 10 ms step (``conftest.constant_profile``): a call with P <= budget
prompt tokens and O output tokens then runs exactly O steps (one prefill step that samples the first
token, O - 1 decode steps), so every time below can be worked out by hand. Scripts: tests/policy_scripts.py.
"""

from __future__ import annotations

import pytest

from agentsim.config import load_config
from agentsim.sim.runner import Simulation

from conftest import constant_profile
from policy_scripts import STEP, calls_of, scripted


# --------------------------------------------------------------------------- program priority
def plas_race(policy):
    """A has run nine calls (0.9 s of service) and is back with its tenth call at 1.25 s; C has held
    the engine since 1.0 s with one long call; B's first call arrives at 1.5 s."""
    a = [["llm", 16, 10]] * 9 + [["tool", 0.35], ["llm", 16, 10]]
    c = [["tool", 1.0], ["llm", 16, 100]]
    b = [["tool", 1.5], ["llm", 16, 10]]
    sim = scripted([a, c, b], policy, max_num_seqs=1)
    levels = {}
    order = sim.bundle.order
    if hasattr(order, "calls"):
        sim.bundle.subscribe("on_call_arrive",
                             lambda call, now: levels.__setitem__(call.call_id, order.calls[call.call_id].level))
    return sim.run(), levels


def test_plas_runs_a_new_programs_first_call_ahead_of_a_long_programs_tenth_call():
    params = {"order": {"q1": 0.2}}   # queues [0, .2) [.2, .6) [.6, 1.4) ...
    r, levels = plas_race({"name": "autellix-plas", "params": params})
    a10 = calls_of(r, 0).iloc[9]
    b1 = calls_of(r, 2).iloc[0]
    c1 = calls_of(r, 1).iloc[0]
    assert a10["arrival_at"] == pytest.approx(1.25) and b1["arrival_at"] == pytest.approx(1.5)
    # A's nine calls gave its program 0.9 s of service: its tenth call enters queue 2 (0.6 <= 0.9 < 1.4)
    assert levels[int(a10["call_id"])] == 2 and levels[int(b1["call_id"])] == 0
    assert b1["scheduled_at"] < a10["scheduled_at"]
    # B's level-0 call preempted C (demoted to queue 1 after its first 0.2 s), which then ran before A
    assert b1["scheduled_at"] == pytest.approx(1.5, abs=STEP + 1e-9)
    assert c1["num_preemptions"] == 1 and c1["finish_at"] <= a10["scheduled_at"]
    # FCFS serves A's tenth call (it arrived first) before B's, after C ran to its end
    f, _ = plas_race("vllm")
    fa10, fb1, fc1 = calls_of(f, 0).iloc[9], calls_of(f, 2).iloc[0], calls_of(f, 1).iloc[0]
    assert fc1["finish_at"] <= fa10["scheduled_at"] < fb1["scheduled_at"]


def starvation(beta):
    low = [["llm", 16, 30], ["tool", 0.05], ["llm", 16, 10]]   # 0.3 s of service, back at 0.35 s
    stream = [[["tool", 0.305 + 0.1 * j], ["llm", 16, 10]] for j in range(20)]  # busy 0.305 .. 2.305
    sim = scripted([low] + stream, {"name": "autellix-plas", "params": {"order": {"q1": 0.1, "beta": beta}}},
                   max_num_seqs=1)
    return sim.run(), sim.bundle.order


def test_anti_starvation_promotes_a_call_once_wait_over_service_reaches_beta():
    r, order = starvation(beta=2.0)
    low2 = calls_of(r, 0).iloc[1]
    assert low2["arrival_at"] == pytest.approx(0.35)
    # program service 0.3 s (queue 2 of [0,.1) [.1,.3) [.3,.7)), no earlier wait: promoted when its
    # wait reaches 2 x 0.3 = 0.6 s, i.e. at 0.95 s; it then preempts the running stream call at the
    # next step boundary (0.305 + k x 10 ms)
    assert order.num_promotions >= 1
    assert 0.95 - 1e-9 <= low2["scheduled_at"] <= 0.96 + 1e-9
    never, _ = starvation(beta=None)
    # without it, the call only slips into the engine in the instant between two stream calls
    # at the very end of the stream (a same-instant arrival joins one step later)
    assert calls_of(never, 0).iloc[1]["scheduled_at"] > 2.0


def waves(policy):
    """A plan call (10 steps), a wave of 4 parallel calls (10 steps each), a second wave of 4."""
    wave = [[["llm", 16, 10]] for _ in range(4)]
    prog = [["llm", 16, 10], ["par", *wave], ["par", *wave]]
    sim = scripted([prog], {"name": "autellix-plas", "order": policy, "params": {"order": {"q1": 0.05}}},
                   max_num_seqs=1)
    base = {}
    order = sim.bundle.order
    sim.bundle.subscribe("on_call_arrive",
                         lambda call, now: base.__setitem__(call.call_id, (order.calls[call.call_id].base_service,
                                                                           order.calls[call.call_id].level)))
    r = sim.run()
    return r, base


def test_atlas_gives_one_programs_parallel_calls_one_priority():
    r, base = waves("atlas")
    ids = calls_of(r, 0)["call_id"].tolist()
    plan, w1, w2 = ids[0], ids[1:5], ids[5:9]
    s = 10 * STEP
    # every call of a wave inherits the program's one scalar: wave 1 the plan's 0.1 s, wave 2 the
    # critical path plan + one wave-1 call (0.2 s), not the sum of the wave's service
    assert len({base[c] for c in w1}) == 1 and base[w1[0]][0] == pytest.approx(s)
    assert len({base[c] for c in w2}) == 1 and base[w2[0]][0] == pytest.approx(2 * s)
    # PLAS adds up all the program's service: wave 2 enters at plan + 4 wave-1 calls
    rp, bp = waves("plas")
    idp = calls_of(rp, 0)["call_id"].tolist()
    assert bp[idp[5]][0] == pytest.approx(5 * s) and bp[idp[5]][1] > base[w2[0]][1]


def test_sjf_oracle_runs_the_program_with_less_remaining_work_first():
    # both programs' first calls wait behind a blocker; the short program (1 call) arrives last
    blocker = [["llm", 16, 50]]
    long_prog = [["tool", 0.1], ["llm", 16, 10], ["llm", 16, 10], ["llm", 16, 10], ["llm", 16, 10]]
    short_prog = [["tool", 0.2], ["llm", 16, 10]]
    sjf = {"name": "sjf-oracle", "params": {"order": {"preemptive": False}}}  # admission order only
    sim = scripted([blocker, long_prog, short_prog], sjf, max_num_seqs=1)
    r = sim.run()
    assert calls_of(r, 2).iloc[0]["scheduled_at"] < calls_of(r, 1).iloc[0]["scheduled_at"]
    f = scripted([blocker, long_prog, short_prog], "vllm", max_num_seqs=1).run()
    assert calls_of(f, 2).iloc[0]["scheduled_at"] > calls_of(f, 1).iloc[0]["scheduled_at"]


def test_program_plan_lists_the_calls_a_program_makes():
    from agentsim.policies.oracle import plan_body
    from agentsim.traces.generators import make_generator
    from agentsim.traces.source import program_rng
    from agentsim.workload import ProgramContext

    for name in ("react", "lats", "mapreduce", "chat"):
        gen = make_generator(name)
        plan = plan_body(gen.body(ProgramContext(7, 7, name, program_rng(0, 7))))
        cfg = load_config(None, {"workload.generator": name, "workload.num_programs": 1, "workload.arrival": "closed",
                                 "workload.agents": 1, "sim.drain": True, "cluster.gpus_per_node": 1})
        # program 0 of a run with the same seed as program 0 planned here
        plan0 = plan_body(gen.body(ProgramContext(0, 0, name, program_rng(0, 0))))
        r = Simulation(cfg, profile=constant_profile(STEP)).run()
        assert len(plan0.calls) == len(r.calls)
        assert sorted(c.num_prompt_tokens for c in plan0.calls) == sorted(r.calls["num_prompt_tokens"].tolist())
        assert sum(c.num_output_tokens for c in plan0.calls) == r.calls["num_output_tokens"].sum()
        assert len(plan.calls) >= 1


def test_kairos_learns_that_a_kind_runs_long():
    from agentsim.policies.priority import ShortestRemainingWorkflow

    pol = ShortestRemainingWorkflow(prompt_weight=0.0)

    class C:
        def __init__(self, cid, pid, kind, out):
            self.call_id, self.program_id, self.program_kind = cid, pid, kind
            self.num_prompt_tokens, self.num_output_tokens = 100, out

    cid = 0
    for pid, (kind, outs) in enumerate([("long", [10] * 5), ("short", [10])]):
        pol.on_program_start(pid, pid, kind, 0.0)
        for o in outs:
            pol.key(C(cid, pid, kind, o), 0.0)
            cid += 1
        pol.on_program_end(pid, 1.0)
    pol.on_program_start(10, 10, "long", 2.0)
    pol.on_program_start(11, 11, "short", 2.0)
    # a new 'long' program's first call expects 50 tokens of work left, a 'short' one 10
    assert pol.key(C(100, 10, "long", 10), 2.0) == 50
    assert pol.key(C(101, 11, "short", 10), 2.0) == 10

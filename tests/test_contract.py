"""The declared policy contract (agentsim/policies/base.py) and the one ranking rule (policies/ranking.py).

A bundle is checked once, when it is built: a component missing a hook its decision requires, or
claiming a capability without all of its members, is refused with one error naming the component and
the member. Backends read the resulting ``Capabilities`` instead of probing policies.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

from agentsim.errors import ConfigError
from agentsim.policies.base import Capabilities, PolicyBundle, PolicyContractError, TierSettings
from agentsim.policies.baseline import FCFS, LRU, FixedTopology, RoundRobin
from agentsim.policies.ranking import pick_victim, priority_number, rank, rank_key, should_preempt
from agentsim.policies.registry import make_bundle

ROOT = Path(__file__).resolve().parents[1]


class NoPreemptiveFlag:
    dynamic = False

    def key(self, call, now):
        return call.arrival_at


class HalfRetention(LRU):
    """Claims retention (defines ``retain``) but lacks the rest of the protocol."""

    def retain(self, call, now):
        return 1.0

    def is_pinned(self, program_id):
        return False


def test_a_bundle_missing_a_required_hook_is_refused_with_one_error_naming_it():
    with pytest.raises(PolicyContractError) as e:
        PolicyBundle("bad", RoundRobin(), NoPreemptiveFlag(), LRU(), FixedTopology())
    assert isinstance(e.value, ConfigError)   # the CLI prints it as one line and exits 2
    assert e.value.where == "policy.order"
    assert e.value.message == ("NoPreemptiveFlag lacks 'preemptive', required of every order policy "
                               "(OrderPolicy in agentsim/policies/base.py)")
    with pytest.raises(PolicyContractError) as e:
        PolicyBundle("bad", RoundRobin(), FCFS(), object(), FixedTopology())
    assert e.value.where == "policy.evict" and "'new_free_queue'" in e.value.message


def test_a_partly_claimed_capability_is_refused():
    with pytest.raises(PolicyContractError) as e:
        PolicyBundle("bad", RoundRobin(), FCFS(), HalfRetention(), FixedTopology())
    assert e.value.where == "policy.evict"
    assert "HalfRetention defines 'retain' but lacks 'on_unpin'" in e.value.message
    assert "Retention in agentsim/policies/base.py" in e.value.message


def test_shipped_bundles_declare_their_capabilities():
    caps = {name: make_bundle(name).caps for name in ("vllm", "continuum", "tokencake", "scalesim", "kvflow",
                                                      "hicache", "autellix-plas", "sjf-oracle", "adaptorch",
                                                      "prefix-affinity")}
    assert caps["vllm"] == Capabilities(dynamic=False, preemptive=False)
    assert not caps["vllm"].kv_mechanisms
    assert caps["continuum"].retention and not caps["continuum"].offload and caps["continuum"].reload_cost
    assert caps["continuum"].dynamic and caps["continuum"].reads_kv_state
    assert caps["tokencake"].retention and caps["tokencake"].offload and caps["tokencake"].tiers.cpu_tier
    assert caps["scalesim"].prefetch and caps["scalesim"].leveled and caps["scalesim"].clock_dependent_eviction
    assert not caps["scalesim"].prefetch_on_events and caps["kvflow"].prefetch_on_events
    assert caps["scalesim"].prefetch_among and not caps["kvflow"].prefetch_among   # the optional per-engine ask
    assert caps["hicache"].tiers == TierSettings(cpu_tier=True) and not caps["hicache"].prefetch
    assert caps["autellix-plas"].dynamic and caps["autellix-plas"].preemptive
    assert len(caps["sjf-oracle"].planners) == 1 and caps["adaptorch"].team_wrapper is not None
    # a tier asked for without prefetch: no prefetch capability even though the policy could
    off = make_bundle({"name": "scalesim", "params": {"evict": {"prefetch": False}}}).caps
    assert off.leveled and not off.prefetch and off.tiers.cpu_tier
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps["hicache"].tiers.cpu_gib = 1.0   # a value the policy returned, not shared mutable state



def test_a_subclass_overriding_the_candidates_does_not_inherit_the_per_engine_ask():
    """``prefetch_candidates_among`` must agree with ``prefetch_candidates``: a subclass that
    overrides only the latter is not asked per engine (it would get its parent's answer); one that
    overrides both, or neither, is."""
    from agentsim.policies.distance import InvocationDistance

    class Fewer(InvocationDistance):
        def prefetch_candidates(self, now):
            return super().prefetch_candidates(now)[:3]

    class Both(Fewer):
        def prefetch_candidates_among(self, now, agents):
            return [a for a in self.prefetch_candidates(now) if a in agents]

    def caps(evict):
        return PolicyBundle("x", RoundRobin(), FCFS(), evict, FixedTopology()).caps

    assert caps(InvocationDistance()).prefetch_among
    assert caps(Fewer()).prefetch and not caps(Fewer()).prefetch_among
    assert caps(Both()).prefetch_among


def test_subscribers_run_after_the_policies_hooks_and_unknown_events_are_refused():
    seen = []

    class Recording(FCFS):
        def on_call_arrive(self, call, now):
            seen.append(("policy", now))

    b = PolicyBundle("rec", RoundRobin(), Recording(), LRU(), FixedTopology())
    b.subscribe("on_call_arrive", lambda call, now: seen.append(("subscriber", now)))
    b.emit("on_call_arrive", None, 1.5)
    assert seen == [("policy", 1.5), ("subscriber", 1.5)]
    with pytest.raises(ValueError, match="unknown event 'on_call_arive'"):
        b.subscribe("on_call_arive", print)


class C:
    def __init__(self, seq, key, arrival_at=0.0):
        self.seq, self.k, self.arrival_at = seq, key, arrival_at


class ByK:
    dynamic = True
    preemptive = True

    def key(self, call, now):
        return call.k


def test_one_rank_rule_with_one_tie_breaker():
    order = ByK()
    a, b, c, d = C(3, 1.0), C(1, 2.0), C(2, 1.0), C(4, 2.0)
    assert [x.seq for x in rank(order, [a, b, c, d], 0.0)] == [2, 3, 1, 4]   # key, then seq
    assert rank_key(order, a, 0.0) == (1.0, 3)
    assert pick_victim(order, [a, b, c, d], 0.0) is d                       # highest (key, seq)
    assert should_preempt(order, c, a, 0.0)                                  # same key, earlier seq
    assert not should_preempt(order, a, c, 0.0) and not should_preempt(order, a, a, 0.0)
    # vLLM's integer priority: the key's first element at 1 ms resolution; inf clamps
    assert priority_number(FCFS(), C(0, None, arrival_at=12.25), 0.0) == 12250
    assert priority_number(order, C(0, (3, 0.5)), 0.0) == 3000
    assert priority_number(order, C(0, math.inf), 0.0) == 2**62


def test_the_simulator_engine_uses_the_shared_victim_rule():
    import simpy

    from agentsim.calibration.roofline import roofline_profile
    from agentsim.config import EngineLimits
    from agentsim.sim.engine import Engine

    order = ByK()
    engine = Engine(simpy.Environment(), 0, 0, roofline_profile(), EngineLimits(), order, LRU().new_free_queue(0), 64,
                    on_finish=lambda c: None)
    engine.running = [C(5, 1.0), C(2, 3.0), C(9, 3.0), C(1, 0.5)]
    assert engine._pick_victim(0.0) is pick_victim(order, engine.running, 0.0) is engine.running[2]


POLICY_NAMES = re.compile(r"^(self\.)?(order|evict|route|shape|pol|policy|bundle|ev|opts|comp|other|component)$")


def _contract_members() -> set[str]:
    """Every hook and capability member named in policies/base.py, and the dead probes removed in issue 9."""
    from agentsim.policies.base import CAPABILITIES, HOOKS, REQUIRED

    names = set(HOOKS) | {"victim", "preempted_to_front", "live_priority"}
    for _, members in REQUIRED.values():
        names.update(members)
    for _, _, members in CAPABILITIES.values():
        names.update(members)
    return names


def _probes(source: str, rel: str) -> list[str]:
    """getattr/hasattr calls in ``source`` that probe a policy: on a policy-named object, for a
    contract member by name, or for an attribute named by a variable (outside ``__getattr__``
    delegation)."""
    import ast

    members = _contract_members()
    found = []

    def visit(node, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Name)
                    and child.func.id in ("getattr", "hasattr") and len(child.args) >= 2):
                obj, attr = ast.unparse(child.args[0]), child.args[1]
                if (POLICY_NAMES.match(obj)
                        or (isinstance(attr, ast.Constant) and attr.value in members)
                        or (not isinstance(attr, ast.Constant) and func != "__getattr__")):
                    found.append(f"{rel}:{child.lineno}: {ast.unparse(child)}")
            visit(child, inner)

    visit(ast.parse(source), "")
    return found


def test_the_probe_check_finds_the_probes_it_is_for():
    old_disagg = (
        "def __init__(self, sim):\n"
        "    other = make_bundle(cfg.policy).route\n"
        "    for name, fns in sim._hooks.items():\n"
        "        fn = getattr(other, name, None)\n")
    assert _probes(old_disagg, "sim/disagg.py") == ["sim/disagg.py:4: getattr(other, name, None)"]
    assert len(_probes("def f(x, order):\n    hasattr(x, 'on_call_arrive')\n    getattr(order, 'key')\n", "x")) == 2
    # not probes: a vLLM object's optional field, delegation in __getattr__
    assert _probes("def f(sched):\n    getattr(sched, 'num_waiting_reqs', 0)\n"
                   "def __getattr__(self, name):\n    return getattr(self.inner, name)\n", "x") == []


def test_backends_do_not_probe_policies():
    """Every capability comes from ``bundle.caps`` and every hook from the bundle (``hooks``,
    ``subscribe``, ``component_hooks``): no getattr/hasattr on a policy in any module of the
    simulator (sim/) or the live backend (live/), nor in the program driver."""
    files = sorted((ROOT / "sim").rglob("*.py")) + sorted((ROOT / "live").rglob("*.py"))
    files += [ROOT / rel for rel in ("agentsim/programs.py", "policies/retention.py", "policies/distance.py",
                                      "policies/priority.py")]
    assert {"sim/disagg.py", "sim/tiers.py", "live/driver.py", "live/scheduler.py"} <= {
        str(f.relative_to(ROOT)) for f in files}
    found = []
    for f in files:
        found += _probes(f.read_text(), str(f.relative_to(ROOT)))
    assert found == []

"""Shape policies (AdaptOrch's topology rule, the decomposer call it charges).

Most scenarios use a constant 10 ms step (``conftest.constant_profile``): a call with P <= budget
prompt tokens and O output tokens then runs exactly O steps (one prefill step that samples the first
token, O - 1 decode steps), so every time below can be worked out by hand. Scripts: tests/policy_scripts.py.
"""

from __future__ import annotations

from agentsim.config import load_config
from agentsim.sim.runner import Simulation

from conftest import constant_profile
from policy_scripts import STEP


# --------------------------------------------------------------------------- topology
def dag(n, edges, coupling=0.3):
    from agentsim.traces.generators import TaskDAG

    return TaskDAG(num_nodes=n, edges=edges, coupling=coupling)


def test_adaptorch_rule_picks_each_topology():
    from agentsim.policies.topology import AdaptOrch, dag_features

    pol = AdaptOrch()
    cases = {
        "parallel (no edges)": (dag(4, []), "parallel"),
        "sequential (a chain: width 1)": (dag(4, [(0, 1), (1, 2), (2, 3)]), "sequential"),
        "hierarchical (6 > 5 nodes, coupling 0.8 > 0.6)": (dag(6, [(0, 2), (1, 3), (2, 4), (3, 5)], 0.8), "hierarchical"),
        "parallel (width 3 of 4 = 0.75 > 0.5, coupling 0.3)": (dag(4, [(0, 1)]), "parallel"),
        "hybrid (width 2 of 5 = 0.4)": (dag(5, [(0, 1), (0, 2), (1, 3), (2, 4)]), "hybrid"),
        "hybrid (coupled but small: 4 nodes)": (dag(4, [(0, 1), (0, 2), (1, 3)], 0.9), "hybrid"),
    }
    for name, (task, want) in cases.items():
        assert pol.shape(task, 0.0) == want, name
    f = dag_features(cases["hybrid (width 2 of 5 = 0.4)"][0])
    assert (f.width, f.depth, f.num_edges) == (2, 3, 4)
    # with depth_test="depth", θ_δ = 5 is compared with δ (3 here), not |V|
    assert AdaptOrch(depth_test="depth").shape(cases["hierarchical (6 > 5 nodes, coupling 0.8 > 0.6)"][0], 0) == "hybrid"


def test_adaptorch_runs_the_chosen_topology_and_charges_the_decomposer():
    from agentsim.policies.topology import dag_features
    from agentsim.traces.generators import make_generator
    from agentsim.traces.source import program_rng

    cfg = load_config(None, {"cluster.gpus_per_node": 1, "workload.generator": "team", "workload.arrival": "closed",
                             "workload.agents": 4, "workload.num_programs": 12, "policy": "adaptorch",
                             "sim.drain": True})
    sim = Simulation(cfg, profile=constant_profile(STEP))
    r = sim.run()
    team = make_generator("team")
    decisions = sim.bundle.shape.decisions
    assert len(decisions) == 12 and len({d[2] for d in decisions}) >= 2
    # each program: the topology's own calls plus one decomposer call (stage "decompose")
    for pid in range(12):
        task = team.task(program_rng(0, pid))
        topo = sim.bundle.shape.choose(dag_features(task))
        assert (r.calls["program_id"] == pid).sum() == team.expected_calls(task, topo) + 1
    fixed = Simulation(load_config(None, {"cluster.gpus_per_node": 1, "workload.generator": "team",
                                          "workload.arrival": "closed", "workload.agents": 4,
                                          "workload.num_programs": 12, "policy": "topology-sequential",
                                          "sim.drain": True}), profile=constant_profile(STEP)).run()
    for pid in range(12):
        task = team.task(program_rng(0, pid))
        assert (fixed.calls["program_id"] == pid).sum() == team.expected_calls(task, "sequential")

"""KV movement between engines (issue 11): links, P/D disaggregation, cross-engine prefix fetch, router cost.

Timelines use ``conftest.constant_profile`` (every engine step exactly ``STEP`` s) and link bandwidths
chosen so each transfer takes a round number of milliseconds, so every expected time is counted by
hand in the test. KV bytes: the roofline Llama-3-8B profile's 131,072 bytes per token, 2 MiB per
16-token block.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentsim.config import load_config
from agentsim.errors import ConfigError
from agentsim.policies.kvfetch import CheaperFetch, FetchOption, make_fetch_policy
from agentsim.sim.network import Network
from agentsim.sim.runner import Simulation
from agentsim.traces.generators import register_generator
from agentsim.workload import Context, ToolCall

from conftest import ROOFLINE, constant_profile

STEP = 0.01
BLOCK_BYTES = 16 * 131072             # one 16-token block of Llama-3-8B KV (bf16)
MS_GBPS = 3 * BLOCK_BYTES / 1e-3 / 1e9  # GB/s at which three blocks take exactly 1 ms


def _engines(nodes: list[int]):
    return [SimpleNamespace(engine_id=i, node_id=n) for i, n in enumerate(nodes)]


# ----------------------------------------------------------------------------- links
def test_single_transfer_on_an_idle_link_takes_latency_plus_bytes_over_bandwidth():
    net = Network(_engines([0, 1]), nvlink_GBps=300, pcie_GBps=25, nic_GBps=25, inter_node_latency=2e-5)
    b = 100_000_000
    t = net.transfer(0, 1, b, now=1.0)
    assert t.start == 1.0 and t.end == pytest.approx(1.0 + b / 25e9)
    assert t.done == pytest.approx(1.0 + 2e-5 + b / 25e9)
    assert t.links == ("node0/engine0/nic-out", "node1/engine1/nic-in")
    # within a node: NVLink, its own latency; TP 2 doubles the port bandwidth
    net2 = Network(_engines([0, 0]), nvlink_GBps=300, pcie_GBps=25, nic_GBps=25, tp=2, intra_node_latency=1e-5)
    assert net2.transfer(0, 1, b, now=0.0).done == pytest.approx(1e-5 + b / 600e9)
    assert net2.estimate(0, 1, b, now=0.0) == pytest.approx(2 * b / 600e9 + 1e-5)  # queued behind the first


def test_concurrent_transfers_share_a_link_fifo_and_disjoint_paths_run_in_parallel():
    bw = 10e9
    net = Network(_engines([0, 1, 2, 3]), nvlink_GBps=300, pcie_GBps=25, nic_GBps=bw / 1e9,
                  inter_node_latency=0.001)
    b = 10_000_000                    # 1 ms each at 10 GB/s
    a = net.transfer(0, 1, b, now=0.0)
    c = net.transfer(2, 1, b, now=0.0)  # same ingress (engine 1's NIC in): queued behind a
    d = net.transfer(3, 2, b, now=0.0)  # disjoint links: in parallel
    assert (a.start, a.end, a.done) == pytest.approx((0.0, 0.001, 0.002))
    assert (c.start, c.end, c.done) == pytest.approx((0.001, 0.002, 0.003))
    assert (d.start, d.done) == pytest.approx((0.0, 0.002))
    # utilisation by hand: engine 1's NIC-in busy 2 ms of the first 10 ms sample, 20 MB received
    rows = {r[0]: r for r in net.utilization(0.01, 0.02) if r[5] == pytest.approx(0.01)}
    assert rows["node1/engine1/nic-in"][6] == pytest.approx(0.2)
    assert rows["node1/engine1/nic-in"][7] == 2 * b
    assert rows["node0/engine0/nic-out"][6] == pytest.approx(0.1)
    with pytest.raises(ValueError):
        Network(_engines([0, 1]), nvlink_GBps=300, pcie_GBps=25, nic_GBps=0)


# ----------------------------------------------------------------------------- P/D on a hand-built pair
# agent -> list of (delay before the call s, prompt tokens (private), output tokens)
SCEN: dict[str, list] = {
    "one": [(0.0, 64, 3)],
    "two": [(0.0, 64, 3), (0.0, 64, 3)],
}


@register_generator("test-disagg-scenario")
@dataclass(frozen=True)
class _Scen:
    name: str = "one"

    def body(self, pc):
        delay, prompt, out = SCEN[self.name][pc.agent_id]
        if delay:
            yield ToolCall("wait", delay)
        yield pc.llm(Context.of(pc.segment(prompt)), out)


@register_generator("test-disagg-chat")
@dataclass(frozen=True)
class _Chat:
    """Two turns: the second prompt is the first prompt + its output + 8 new tokens."""

    prompt: int = 160

    def body(self, pc):
        first = Context.of(pc.segment(self.prompt))
        r = yield pc.llm(first, 4)
        yield pc.llm(first.extend(r.output, pc.segment(8)), 2)


def _cfg(generator: str, params: dict, agents: int, gpus: int, **over):
    base = {"cluster.num_nodes": 1, "cluster.gpus_per_node": gpus, "cluster.profile": ROOFLINE,
            "workload.arrival": "closed", "workload.agents": agents, "workload.num_programs": agents,
            "workload.generator": generator, "workload.params": params, "sim.drain": True, "duration": 1e6}
    base.update(over)
    return load_config(None, base)


def _run(cfg, on_step=None):
    sim = Simulation(cfg, profile=constant_profile(STEP), on_step=on_step)
    r = sim.run()
    assert (r.calls["status"] == "finished").all()
    return sim, r


def _pd(scen: str, transfer: str, **over):
    cfg = _cfg("test-disagg-scenario", {"name": scen}, len(SCEN[scen]), 2, **{
        "cluster.disagg": {"roles": ["prefill", "decode"], "transfer": transfer},
        "cluster.network": {"nvlink_GBps": MS_GBPS, "intra_node_latency": 0.001}, **over})
    return _run(cfg)


def test_disaggregated_ttft_is_prefill_plus_transfer_plus_the_decode_engines_first_step():
    sim, r = _pd("one", "whole")
    c = r.calls.iloc[0]
    # P: prefill 64 tokens in one step, 0 -> 0.01 (its one token is discarded, as vLLM's proxy does).
    # D pulls the 3 full blocks it lacks ((64 - 1) // 16 = 3; 3 x 2 MiB = 1 ms at MS_GBPS) + 1 ms
    # latency: KV usable at 0.012. D recomputes the 16-token tail and samples: first token 0.022.
    assert c["engine_id"] == 1 and c["kv_transfer_bytes"] == 3 * BLOCK_BYTES
    assert c["kv_transfer_time"] == pytest.approx(0.002)
    assert c["ttft"] == pytest.approx(STEP + 0.002 + STEP)
    assert c["finish_at"] == pytest.approx(0.022 + 2 * STEP) and c["tpot"] == pytest.approx(STEP)
    assert c["num_computed_prompt_tokens"] == 64 + 16 and c["num_cached_tokens"] == 0
    assert c["scheduled_at"] == 0.0 and c["queue_time"] == 0.0
    assert sim.disagg.network.bytes_sent == sim.disagg.network.bytes_received == 3 * BLOCK_BYTES
    assert r.links is not None and r.links["bytes"].sum() == 2 * 3 * BLOCK_BYTES  # P's out + D's in
    assert r.summary["total_kv_transfer_bytes"] == 3 * BLOCK_BYTES


def test_layerwise_transfer_overlaps_the_prefill():
    _, r = _pd("one", "layerwise")
    c = r.calls.iloc[0]
    # the link starts with the prefill (t = 0) and is done at 0.001, but the last layer's share
    # (1 ms / 32 layers) leaves only after the prefill ends: usable at 0.01 + 0.001/32 + 0.001
    ready = STEP + 0.001 / 32 + 0.001
    assert c["kv_transfer_time"] == pytest.approx(ready - STEP)
    assert c["ttft"] == pytest.approx(ready + STEP)


def test_disaggregated_ttft_includes_link_and_decode_queueing():
    _, r = _pd("two", "whole")
    a, b = r.calls.sort_values("agent_id")[["ttft", "kv_transfer_time"]].itertuples(index=False)
    # both prefills in P's first step (0 -> 0.01); transfers FIFO on the pair's NVLink ports:
    # A arrives 0.012, B 0.013 (1 ms behind A). D runs A's tail 0.012 -> 0.022; B joins at that
    # boundary and samples its first token at 0.032.
    assert a == pytest.approx((0.022, 0.002))
    assert b == pytest.approx((0.032, 0.003))


# ----------------------------------------------------------------------------- prefix fetch
def test_cheaper_fetch_policy_follows_the_cost_comparison():
    call = SimpleNamespace()
    opts = [FetchOption(0, 4, 4 * BLOCK_BYTES, transfer_s=0.02, recompute_s=0.03),
            FetchOption(2, 4, 4 * BLOCK_BYTES, transfer_s=0.005, recompute_s=0.03)]
    assert CheaperFetch().choose(call, 1, opts, 0.0) == 1          # largest saving
    assert CheaperFetch(margin=7.0).choose(call, 1, opts, 0.0) is None  # 7 x 5 ms > 30 ms
    assert CheaperFetch().choose(call, 1, opts[:1], 0.0) == 0
    assert CheaperFetch().choose(call, 1, [FetchOption(0, 1, 1, 0.03, 0.03)], 0.0) is None  # equal: recompute
    assert make_fetch_policy("off").choose(call, 1, opts, 0.0) is None
    assert make_fetch_policy("always").choose(call, 1, opts, 0.0) == 0


@pytest.mark.parametrize("gbps,fetched", [(MS_GBPS * 20, True), (MS_GBPS / 20, False)])
def test_fetch_is_chosen_exactly_when_cheaper_and_fetched_blocks_are_prefix_hits(gbps, fetched):
    # round robin: turn 1 on engine 0, turn 2 on engine 1, whose cache lacks the 160-token prompt
    # + 4 output tokens; engine 0 holds its 10 full blocks (164 tokens of KV: (173 - 1) // 16 = 10
    # looked-up blocks, 10 cached). Recompute = one step (STEP); transfer of 10 blocks = 10/3 ms
    # x 20 (slow) or / 20 (fast), + 0.1 ms latency.
    cfg = _cfg("test-disagg-chat", {}, 1, 2, **{
        "policy": {"name": "vllm", "route": "round-robin"},
        "cluster.disagg": {"prefix_fetch": "cheaper"},
        "cluster.network": {"nvlink_GBps": gbps, "intra_node_latency": 1e-4}})
    decisions = []
    sim = Simulation(cfg, profile=constant_profile(STEP))
    choose = sim.disagg.fetch.choose
    sim.disagg.fetch.choose = lambda *a: decisions.append((a[2], choose(*a))) or decisions[-1][1]
    r = sim.run()
    assert (r.calls["status"] == "finished").all()
    (opts, pick), = decisions
    o = opts[0]
    assert o.engine_id == 0 and o.num_blocks == 10 and o.recompute_s == pytest.approx(STEP)
    assert o.transfer_s == pytest.approx(10 * BLOCK_BYTES / (gbps * 1e9) + 1e-4)
    assert (pick == 0) == (o.transfer_s < o.recompute_s) == fetched
    turn2 = r.calls.sort_values("call_id").iloc[1]
    assert turn2["engine_id"] == 1 and turn2["num_prompt_tokens"] == 172
    if fetched:
        assert turn2["num_cached_tokens"] == 160 and turn2["num_computed_prompt_tokens"] == 12
        assert turn2["kv_transfer_bytes"] == 10 * BLOCK_BYTES
        assert turn2["kv_transfer_time"] == pytest.approx(o.transfer_s)
    else:
        assert turn2["num_cached_tokens"] == 0 and turn2["num_computed_prompt_tokens"] == 172
        assert turn2["kv_transfer_bytes"] == 0 and turn2["kv_transfer_time"] == 0.0


# ----------------------------------------------------------------------------- router cost
def test_router_cost_is_coordination_overhead_per_program():
    cfg = _cfg("test-disagg-chat", {}, 2, 2, **{"cluster.router": {"decision_cost": 0.002, "rtt": 0.001}})
    _, r = _run(cfg)
    # two calls per program, 3 ms each
    assert list(r.programs["coordination_overhead"]) == pytest.approx([0.006, 0.006])
    assert r.summary["mean_coordination_overhead_s"] == pytest.approx(0.006)
    assert (r.calls["queue_time"] >= 0).all() and (r.calls["arrival_at"] > 0).any()


# ----------------------------------------------------------------------------- invariants
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(seed=st.integers(0, 10_000), layout=st.sampled_from([("prefill", "decode", "decode"),
                                                               ("prefill", "prefill", "decode"),
                                                               ("mixed", "decode", "prefill")]),
       blocks=st.integers(128, 400), transfer=st.sampled_from(["whole", "layerwise"]),
       fetch=st.sampled_from(["off", "cheaper", "always"]))
def test_invariants_no_block_both_in_flight_and_free_and_bytes_conserved(seed, layout, blocks, transfer, fetch):
    cfg = load_config(None, {
        "seed": seed, "duration": 20.0, "cluster.num_nodes": 1, "cluster.gpus_per_node": 3,
        "cluster.profile": ROOFLINE, "cluster.engine": {"num_gpu_blocks_override": blocks},
        "cluster.disagg": {"roles": list(layout), "transfer": transfer, "prefix_fetch": fetch},
        "cluster.network": {"nvlink_GBps": 1.0},  # slow links: transfers span engine steps
        "workload.arrival": "poisson", "workload.rate": 3.0, "workload.generator": "chat",
        "workload.params": {"think_time_median": 0.5, "max_calls": 4, "user_tokens_mean": 120.0,
                            "output_tokens_mean": 60.0, "system_tokens": 200, "length_sigma": 0.3},
        "sim.drain": True})
    seen = {"steps": 0, "in_flight": 0}

    def check(engine):
        seen["steps"] += 1
        seen["in_flight"] += len(engine.tiers.loading)
        engine.pool.check()
        port = engine.tiers
        for job in port.loading:
            for b in job.blocks:
                assert b.ref_count > 0, "a block in flight is free (destination)"
        for job in port.loading + port.pending:
            for b in job.src_hold:  # the prefill engine's blocks being read (vLLM's delayed free)
                assert b.ref_count > 0, "a block in flight is free (source)"
        free = {id(b) for b in engine.pool.blocks if b.ref_count == 0}
        for job in port.loading:
            assert not free & {id(b) for b in job.blocks}

    sim = Simulation(cfg, on_step=check)
    r = sim.run()
    net = sim.disagg.network
    assert net.bytes_sent == net.bytes_received + sum(j.transfer.nbytes for j in sim.disagg.inflight.values())
    assert not sim.disagg.inflight  # drained: nothing left on the links
    assert (r.calls["status"] == "finished").all() and seen["steps"] > 0 and seen["in_flight"] > 0
    assert r.calls["kv_transfer_bytes"].sum() == net.bytes_received
    assert (r.calls["first_token_at"] >= r.calls["arrival_at"]).all()
    assert (r.calls["num_generated_tokens"] == r.calls["num_output_tokens"]).all()


# ----------------------------------------------------------------------------- bad specs via the CLI
@pytest.mark.parametrize("setting,message", [
    ('cluster.disagg.roles=["decode","decode","decode","decode"]', "cluster.disagg: no engine can prefill"),
    ('cluster.disagg.node_roles=["prefill","decode"]', "cluster.disagg.node_roles: 2 roles for 1 node(s): node 1"),
    ("cluster.network.nic_GBps=0", "cluster.network.nic_GBps: must be a number > 0, got 0"),
    # a profile without link figures (the CPU profile: 0 GB/s) and KV that must cross nodes
    (("cluster.profile=tests/data/vllm-bench-cpu/profile.json", 'cluster.disagg.roles=["prefill","decode"]',
      "cluster.num_nodes=2", "cluster.gpus_per_node=1", "cluster.engine.max_model_len=2048"),
     "cluster.network.nic_GBps: the profile 'cpu-amd-epyc_tiny-llama-h256-l2_tp1'"),
])
def test_bad_cluster_specs_are_one_line_and_exit_2(tmp_path, setting, message):
    out = tmp_path / "out"
    sets = [a for s in ([setting] if isinstance(setting, str) else setting) for a in ("--set", s)]
    p = subprocess.run([sys.executable, "-m", "agentsim", "simulate", "--duration", "5", "-q", "-o", str(out),
                        *sets], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parent.parent)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert not out.exists()


@pytest.mark.parametrize("cluster,message", [
    ({"disagg": {"roles": ["prefill"] * 4}}, "cluster.disagg: no engine can decode"),
    ({"disagg": {"roles": ["prefill"] + ["decode"] * 4}}, "cluster.disagg.roles: 5 roles for 4 engine(s)"),
    ({"num_nodes": 2, "disagg": {"node_roles": ["decode", "decode"]}}, "cluster.disagg: no engine can prefill"),
    ({"network": {"nvlink_GBps": -1.0}}, "cluster.network.nvlink_GBps: must be a number > 0"),
    ({"network": {"pcie_GBps": 0}}, "cluster.network.pcie_GBps: must be a number > 0"),
    ({"disagg": {"roles": ["prefil"]}}, "cluster.disagg.roles[0]: must be one of prefill, decode, mixed"),
    ({"disagg": {"roles": ["prefill"], "node_roles": ["decode"]}}, "not both"),
    ({"disagg": {"transfer": "eager"}}, "cluster.disagg.transfer: must be one of layerwise, whole"),
    ({"router": {"rtt": -0.1}}, "cluster.router.rtt: must be a number >= 0"),
])
def test_bad_cluster_specs_name_the_field(cluster, message):
    from agentsim.config import config_from_dict

    with pytest.raises(ConfigError) as e:
        config_from_dict({"cluster": cluster})
    assert message in str(e.value)


def test_roles_per_node_cover_every_engine_of_the_node():
    from agentsim.config import config_from_dict

    cl = config_from_dict({"cluster": {"num_nodes": 2, "disagg": {"node_roles": ["prefill"]}}}).cluster
    assert cl.engine_roles == ("prefill",) * 4 + ("mixed",) * 4


def test_pd_needs_prefix_caching_and_the_v1_engine():
    for engine, field in (({"enable_prefix_caching": False}, "enable_prefix_caching"),
                          ({"vllm_version": "0.6", "enable_prefix_caching": True}, "scheduler")):
        cfg = _cfg("test-disagg-scenario", {"name": "one"}, 1, 2, **{
            "cluster.disagg": {"roles": ["prefill", "decode"]}, "cluster.engine": engine})
        with pytest.raises(ConfigError, match=field):
            Simulation(cfg, profile=constant_profile(STEP))


def test_same_seed_gives_identical_disaggregated_runs():
    cfg = load_config(None, {
        "seed": 3, "duration": 6.0, "cluster.num_nodes": 2, "cluster.gpus_per_node": 2, "cluster.profile": ROOFLINE,
        "cluster.disagg": {"node_roles": ["prefill", "decode"], "prefix_fetch": "cheaper"},
        "workload.arrival": "poisson", "workload.rate": 4.0, "workload.generator": "chat",
        "workload.params": {"max_calls": 3, "user_tokens_mean": 100.0, "output_tokens_mean": 40.0, "system_tokens": 100},
        "sim.drain": True})
    a, b = Simulation(cfg).run(), Simulation(cfg).run()
    assert a.calls.equals(b.calls) and a.programs.equals(b.programs) and a.links.equals(b.links)
    assert a.calls["kv_transfer_bytes"].sum() > 0
    # prefill engines on node 0, decode engines on node 1: P -> D transfers cross the NICs (a fetch
    # between the two decode engines of node 1 uses NVLink)
    nic = a.links[a.links["kind"] == "nic"]
    assert set(nic["node_id"]) == {0, 1} and nic["bytes"].sum() > 0


OFFERED: list = []


def _probe_class():
    from agentsim.policies.registry import register

    @register("route", "test-disagg-role-probe")
    class RoleProbe:
        """Records the roles it is offered; picks the first ``mixed`` engine if any, else the first."""

        def route(self, call, engines, now):
            roles = [e.role for e in engines]
            OFFERED.append(tuple(roles))
            return roles.index("mixed") if "mixed" in roles and call.call_id % 2 == 0 else 0

    return RoleProbe


def test_the_route_policy_picks_the_pair_from_role_aware_views():
    _probe_class()
    OFFERED.clear()
    cfg = _cfg("test-disagg-scenario", {"name": "two"}, 2, 3, **{
        "policy": {"name": "vllm", "route": "test-disagg-role-probe"},
        "cluster.disagg": {"roles": ["prefill", "decode", "mixed"]},
        "cluster.network": {"nvlink_GBps": MS_GBPS, "intra_node_latency": 0.001}})
    _, r = _run(cfg)
    # asked twice per call: prefill-capable engines first, decode-capable second
    assert OFFERED == [("prefill", "mixed"), ("decode", "mixed")] * 2
    c = r.calls.sort_values("call_id")
    # call 0: both picks are the mixed engine -> co-located, nothing moves; call 1: prefill -> decode
    assert list(c["engine_id"]) == [2, 1]
    assert list(c["kv_transfer_bytes"]) == [0, 3 * BLOCK_BYTES]
    assert c.iloc[0]["ttft"] == pytest.approx(STEP)

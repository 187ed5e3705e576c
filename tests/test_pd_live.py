"""Live prefill/decode disaggregation (agentsim.live.pd) on real components: vLLM's CPU backend, a
tiny Llama with random weights, a prefill engine (kv_producer) on node 0 and a decode engine
(kv_consumer) on node 1 of a 2-node local Ray cluster, vLLM's ExampleConnector moving the KV.

The model's weights have std 0.2 (not transformers' 0.02, whose tiny model repeats one token
whatever the context), so its greedy output depends on the whole prompt: two prompts that differ
only in their first block give different outputs, and the decode engine reproduces each prompt's
co-located output only if it really used the KV the prefill engine computed for that prompt.
"""

from __future__ import annotations

import asyncio
import random
import textwrap

import psutil
import pytest

from agentsim.cli import run_cli
from agentsim.config import load_config
from agentsim.errors import ConfigError
from agentsim.live import pd
from agentsim.live.cluster import RayCluster
from agentsim.live.driver import LiveDriver, LiveOptions, RayEngineClient
from agentsim.live.engine import EngineSpec
from agentsim.policies.registry import make_bundle
from agentsim.traces.source import ProgramSource

pytestmark = pytest.mark.slow

BS = 32


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    model = str(pd.make_pd_model(tmp_path_factory.mktemp("model") / "tiny-w"))
    pids: list[int] = []
    with pd.PDStorage() as store:
        cluster = RayCluster.local(2, object_store_mb=80)
        try:
            common = dict(model=model, run_tag="pdtest", block_size=BS, kv_cache_gib=0.5, max_model_len=2048,
                          max_num_seqs=8, load_format="auto")
            specs = pd.apply_roles([EngineSpec(engine_id=0, node_id=0, **common).to_dict(),
                                    EngineSpec(engine_id=1, node_id=1, **common).to_dict()],
                                   ["prefill", "decode"], store.path)
            handles = cluster.start_engines(specs)
            pids = [p for h in handles for p in h.pids]
            yield cluster, handles, store.path
        finally:
            cluster.shutdown()
    still = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not still, f"engine processes outlived the cluster: {still}"


def _prompts(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Two prompts of ``n`` tokens that differ only in their first block."""
    rng = random.Random(seed)
    tail = [rng.randrange(4, 250) for _ in range(n - BS)]
    return [rng.randrange(4, 250) for _ in range(BS)] + tail, [rng.randrange(4, 250) for _ in range(BS)] + tail


def test_apply_roles_sets_connectors_and_prefill_limits():
    spec = EngineSpec(engine_id=0, node_id=0, model="m", max_model_len=4096, max_num_batched_tokens=512).to_dict()
    p, d, m = pd.apply_roles([spec, dict(spec, engine_id=1), dict(spec, engine_id=2)],
                             ["prefill", "decode", "mixed"], "/kv")
    assert p["kv_transfer_config"]["kv_role"] == "kv_producer"
    assert d["kv_transfer_config"]["kv_role"] == "kv_consumer"
    assert p["kv_transfer_config"]["kv_connector_extra_config"] == {"shared_storage_path": "/kv"}
    assert m["kv_transfer_config"] is None
    # the example connector saves a prompt in its first step: a prefill engine never chunks a prompt
    assert (p["enable_chunked_prefill"], p["max_num_batched_tokens"]) == (False, 4096)
    assert (d["enable_chunked_prefill"], d["max_num_batched_tokens"]) == (True, 512)
    with pytest.raises(ConfigError, match="cluster.disagg.roles"):
        pd.apply_roles([spec], ["prefill", "decode"], "/kv")
    # NIXL: every P/D engine kv_both with a CPU buffer and its own side-channel port; no prefill limits
    p, d, m = pd.apply_roles([spec, dict(spec, engine_id=1), dict(spec, engine_id=2)],
                             ["prefill", "decode", "mixed"], None, connector="nixl")
    assert p["kv_transfer_config"] == d["kv_transfer_config"] == {
        "kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
    assert m["kv_transfer_config"] is None and "VLLM_NIXL_SIDE_CHANNEL_PORT" not in m["env"]
    assert p["env"]["VLLM_NIXL_SIDE_CHANNEL_PORT"] != d["env"]["VLLM_NIXL_SIDE_CHANNEL_PORT"]
    assert (p["enable_chunked_prefill"], p["max_num_batched_tokens"]) == (True, 512)
    with pytest.raises(ConfigError, match="--kv-connector"):
        pd.apply_roles([spec], ["prefill"], None, connector="p2p")


def test_decode_loads_the_prefill_kv_and_matches_colocated(pair):
    cluster, handles, _ = pair
    prefill, decode = (RayEngineClient(h) for h in handles)
    client = pd.PDClient(decode, [prefill])
    a, b = _prompts(200, seed=1)
    c = _prompts(6 * BS + 1, seed=2)[0]

    async def run() -> dict:
        out = {}
        before = pd.transfer_totals((await decode.poll())["stats"])
        for name, ids in (("a", a), ("b", b)):
            out[name] = await client.generate(f"pd-{name}", ids, 12, 0, {}, None)
        out["decode"] = pd.transfer_totals((await decode.poll())["stats"])
        out["decode_before"] = before
        out["prefill"] = pd.transfer_totals((await prefill.poll())["stats"])
        out["c"] = await client.generate("pd-c", c, 12, 0, {}, None)
        # co-located reference: the same prompts prefilled and decoded on one engine, from scratch
        for name, ids in (("a", a), ("b", b), ("c", c)):
            assert await prefill.reset_prefix_cache()
            out["ref_" + name] = await prefill.generate(f"ref-{name}", ids, 12, 0, {}, None)
        client.close()
        return out

    out = asyncio.run(run())
    loaded = 192  # the example connector loads the block-aligned prompt[:-1]: 199 -> 6 blocks of 32
    for name in ("a", "b"):
        r = out[name]
        assert r["pd"]["prefill_engine_id"] == 0 and len(r["pd"]["prefill_token_ids"]) == 1
        assert r["pd"]["decode_num_cached_tokens"] == loaded
        assert r["pd"]["loaded_tokens"] == r["pd"]["external_tokens"] == r["pd"]["saved_tokens"] == loaded
        assert r["kv_transfer_bytes"] == loaded * 2048
        assert len(r["token_ids"]) == 12
        assert r["scheduled_at"] <= r["pd"]["prefill_done_at"] <= r["pd"]["decode_recv_at"] <= r["first_token_at"]
        assert r["token_ids"] == out["ref_" + name]["token_ids"], name
    # the outputs depend on the first block, whose KV only the prefill engine computed
    assert out["ref_a"]["token_ids"] != out["ref_b"]["token_ids"]
    # vLLM 0.32's ExampleConnector misses prompts of k * block_size + 1 tokens: it saves them under
    # the hash of prompt[:k*bs] and looks for prompt[:(k-1)*bs] (example_connector.py, make_meta vs
    # get_num_new_matched_tokens); the decode engine then recomputes, and the counters say so
    c = out["c"]
    assert c["pd"]["loaded_tokens"] == c["pd"]["external_tokens"] == c["kv_transfer_bytes"] == 0
    assert c["pd"]["saved_tokens"] == 6 * BS and c["pd"]["decode_num_cached_tokens"] == 0
    assert c["token_ids"] == out["ref_c"]["token_ids"]
    d0, d1, p = out["decode_before"], out["decode"], out["prefill"]
    assert d1["external_tokens"] - d0["external_tokens"] == 2 * loaded      # vLLM's own counter
    assert d1["load_tokens"] - d0["load_tokens"] == 2 * loaded              # the connector's
    assert d1["num_loads"] - d0["num_loads"] == 2
    kv_per_token = (d1["load_bytes"] - d0["load_bytes"]) / (2 * loaded)
    # 2 layers x 2 KV heads x (64 K + 64 V) float32 values per token
    assert kv_per_token == 2 * 2 * 128 * 4
    # the prefill engine wrote the same block-aligned prompt[:-1] the decode engine read
    assert p["save_tokens"] == 2 * loaded and p["save_bytes"] == p["save_tokens"] * kv_per_token
    assert d1["save_tokens"] == 0 and p["load_tokens"] == 0


def test_live_driver_runs_programs_disaggregated(pair, tmp_path):
    cluster, handles, _ = pair
    cfg = load_config(None, {
        "seed": 5, "duration": 30.0, "policy": "vllm", "cluster.num_nodes": 2, "cluster.gpus_per_node": 1,
        "cluster.engine.block_size": BS, "cluster.disagg.roles": ["prefill", "decode"],
        "workload.generator": "react", "workload.agents": 2, "workload.num_programs": 3,
        "workload.params": {"calls_mean": 2.0, "max_calls": 3, "output_tokens_mean": 16.0,
                            "tools": [{"name": "api", "dist": "constant", "median": 0.05}]},
    })
    clients = pd.wrap_clients([RayEngineClient(h) for h in handles], cfg.cluster.engine_roles)
    assert [type(c).__name__ for c in clients] == ["PDClient"]  # the route policy sees the decode engine only
    before = pd.engine_transfer_totals(handles)
    driver = LiveDriver(clients, make_bundle(cfg.policy), block_size=BS, options=LiveOptions(duration=cfg.duration),
                        out_dir=tmp_path / "run", seed=cfg.seed)
    res = driver.run(ProgramSource(cfg.workload, cfg.seed))
    after = pd.engine_transfer_totals(handles)
    calls = res.calls
    assert len(calls) >= 3 and (calls["status"] == "finished").all()
    assert (calls["engine_id"] == 1).all()
    assert (calls["ttft"] > 0).all() and (calls["first_token_at"] >= calls["scheduled_at"]).all()
    loaded = after["1"]["external_tokens"] - before["1"]["external_tokens"]
    injected = after["1"]["load_tokens"] - before["1"]["load_tokens"]
    # vLLM counts the tokens beyond the decode engine's own prefix hits (a program's earlier turns);
    # the example connector re-injects the whole block-aligned prompt[:-1], hits included
    assert 0 < loaded < injected
    # per call (the connector's kv_transfer_params): what it injected, 2 KiB per token; the calls
    # add up to the engine's counter
    assert calls["kv_transfer_bytes"].sum() == injected * 2048
    assert ((calls["kv_transfer_bytes"] == 0)
            | (calls["kv_transfer_bytes"] == (calls["num_prompt_tokens"] - 1) // BS * BS * 2048)).all()
    # every call's prompt went through the prefill engine (one token each)
    assert after["0"]["save_tokens"] > before["0"]["save_tokens"]
    assert (calls["kv_transfer_time"] >= 0).all()
    assert res.summary["total_kv_transfer_bytes"] == calls["kv_transfer_bytes"].sum()


@pytest.mark.parametrize("roles,flags,needle", [
    (["decode", "decode"], [], "no engine can prefill"),
    (["prefill", "oracle"], [], "cluster.disagg.roles[1]"),
    (["prefill", "decode"], ["--endpoints", "http://127.0.0.1:9"], "--endpoints servers have no KV connector"),
    (["prefill", "decode"], ["--address", "127.0.0.1:9"], "one filesystem"),
])
def test_bad_role_config_is_one_line_exit_2(tmp_path, capsys, roles, flags, needle):
    spec = tmp_path / "pd.toml"
    spec.write_text(textwrap.dedent(f"""
        duration = 5.0
        [cluster]
        num_nodes = 2
        gpus_per_node = 1
        disagg = {{ roles = {roles!r} }}
    """).replace("'", '"'))
    out = tmp_path / "out"
    rc = run_cli(["live", "-c", str(spec), "-q", "-o", str(out), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["--prompt-tokens", "256,x"], "--prompt-tokens"),
    (["--prompt-tokens", "1"], "--prompt-tokens"),
    (["--output-tokens", "1"], "--output-tokens"),
    (["--repeats", "0"], "--repeats"),
    (["--model", "no/such/model/dir"], "--model"),
])
def test_pd_bench_bad_input_is_one_line_exit_2(capsys, args, needle):
    rc = run_cli(["pd-bench", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(f"error: {needle}"), err

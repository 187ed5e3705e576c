"""``agentsim live`` and ``agentsim compare`` end to end, in subprocesses (real cluster, real servers).

The commands are reached through ``agentsim.cli.main`` (the real entry point, which turns input
errors into ``error: where: message`` and exit code 2). ``_ENTRY`` mounts ``agentsim.live.cli`` the
way the main CLI does, in case this checkout's ``agentsim/cli.py`` does not list it yet.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentsim import metrics as M

pytestmark = pytest.mark.slow

_ENTRY = """
import sys
import agentsim.cli as c
_orig = c._register_subapps
def _register():
    _orig()
    import agentsim.live.cli as lc
    if "live" not in {g.name for g in c.app.registered_groups}:
        c.app.add_typer(lc.app, name="live")
    if "compare" not in {cmd.name for cmd in c.app.registered_commands}:
        c.app.command("compare")(lc.compare_command)
c._register_subapps = _register
sys.argv[0] = "agentsim"
c.main()
"""


def agentsim(*args: str, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, AGENTSIM_CACHE=str(Path(cwd or ".") / "cache"))
    return subprocess.run([sys.executable, "-c", _ENTRY, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env)


def test_live_defaults_on_a_local_two_node_cluster(tmp_path):
    out = tmp_path / "run"
    p = agentsim("live", "--local-nodes", "2", "--out", str(out), cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "complete" in p.stdout and "TTFT" in p.stdout
    # start-up is reported as it happens (on stderr): the cluster, then each engine when ready
    assert "Ray cluster up" in p.stderr and "engine 0 on node 0 ready" in p.stderr, p.stderr[-3000:]
    r = M.read_results(out)
    M.check_schema(r["calls"], M.CALL_COLUMNS, "calls")
    M.check_schema(r["programs"], M.PROGRAM_COLUMNS, "programs")
    M.check_schema(r["engines"], M.ENGINE_COLUMNS, "engines")
    man = r["manifest"]
    assert man["complete"] is True and man["cluster"] == "local 2-node Ray cluster"
    assert man["live_options"]["duration"] == 60.0 and (man["load_format"], man["dtype"]) == ("dummy", "float32")
    assert [e["node_id"] for e in man["engines"]] == [0, 1] and man["gpu"] == "no GPU"
    assert len(r["programs"]) == 8 and (r["programs"]["status"] == "finished").all()
    assert (r["calls"]["status"] == "finished").all()
    assert r["engines"]["gpu_util"].isna().all()


def test_input_errors_are_one_line_and_exit_2(tmp_path):
    p = agentsim("live", "--kill-engine", "one@two", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --kill-engine:")
    cfg = tmp_path / "c.toml"
    cfg.write_text("[cluster]\nnum_nodes = 1\n[cluster.engine]\nblock_size = 16\n")
    p = agentsim("live", "-c", str(cfg), "--out", str(tmp_path / "y"), cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith("error: cluster.engine.block_size:")
    assert not (tmp_path / "y").exists()
    p = agentsim("live", "--local-nodes", "1", "--address", "auto", cwd=tmp_path)
    assert p.returncode == 2 and "only one of" in p.stderr
    p = agentsim("compare", str(tmp_path), str(tmp_path), cwd=tmp_path)
    assert p.returncode == 2 and "not a result directory" in p.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def vllm_server(tmp_path):
    """A real OpenAI-compatible vLLM server (CPU, tiny model) on loopback, stopped by its handle."""
    from agentsim.live.tiny_model import make_tiny_llama

    model = make_tiny_llama(tmp_path / "tiny")
    port = _free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--load-format", "dummy",
         "--dtype", "float32", "--enforce-eager", "--block-size", "32", "--max-model-len", "4096",
         "--scheduling-policy", "priority", "--enable-prompt-tokens-details", "--host", "127.0.0.1",
         "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("vLLM server did not come up:\n" + (tmp_path / "server.log").read_text()[-3000:])
                time.sleep(1)
        yield url, model
    finally:
        import signal

        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # our own session: the server and its engine core
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.close()


def test_endpoints_mode_and_compare(vllm_server, tmp_path):
    url, model = vllm_server
    a, b = tmp_path / "a", tmp_path / "b"
    for out, policy in ((a, "vllm"), (b, "least-loaded")):
        p = agentsim("live", "--endpoints", url, "--model", str(model), "--policy", policy, "--num-programs", "4",
                     "--agents", "2", "--duration", "30", "--out", str(out), "-q", cwd=tmp_path, timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        r = M.read_results(out)
        M.check_schema(r["calls"], M.CALL_COLUMNS, "calls")
        assert (r["programs"]["status"] == "finished").all() and len(r["programs"]) == 4
        assert (r["calls"]["num_generated_tokens"] == r["calls"]["num_output_tokens"]).all()
        # the server's own prefix cache saw the shared system prompt and the programs' growing contexts
        assert r["summary"]["prefix_hit_rate"] > 0.3
        assert r["manifest"]["cluster"] == f"endpoints {url}"
    p = agentsim("compare", str(a), str(b), "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    rows = {m["metric"]: m for m in doc["metrics"]}
    assert "live" in doc["a"]["run"] and "least-loaded" in doc["b"]["run"]
    assert rows["median_program_latency_s"]["a"] > 0 and rows["median_program_latency_s"]["b"] > 0
    assert rows["num_programs"]["rel_diff"] == 0.0
    p = agentsim("compare", str(a), str(b), cwd=tmp_path)
    assert p.returncode == 0 and "TTFT p50" in p.stdout and "(B - A) / A" in p.stdout

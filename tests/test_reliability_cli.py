"""Issue 12 part A: CLI outcomes (exit codes), output paths never trusted blindly, sweep cells.

Exit codes are checked on real subprocesses (``python -m agentsim``), including SIGINT sent to a
running simulation and sweep. Output-path safety is a table of cases through the CLI plus a
property over random directory trees through the writer itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agentsim
from agentsim.metrics import CALL_COLUMNS, ENGINE_COLUMNS, PROGRAM_COLUMNS, empty_frame, write_results
from agentsim.outputs import OutputError, check_result_dir, check_sweep_dir, is_result_dir

QUICK = ["--duration", "5", "--agents", "2"]


def agentsim_cli(*args, cwd=None, timeout=300):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "agentsim", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def snapshot(root: Path) -> dict:
    """Every path under ``root`` with its bytes (files) or None (directories), and the root's own kind."""
    if root.is_file():
        return {".": root.read_bytes()}
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() else None
    return out


def one_error_line(p: subprocess.CompletedProcess, *needles: str) -> str:
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- exit codes
@pytest.mark.parametrize("args", [
    [],                                   # `agentsim` alone: help, as a usage error
    ["simulat"],                          # unknown command
    ["simulate", "--polcy", "vllm"],      # unknown option
    ["simulate", "--nodes", "two"],       # a value of the wrong type
    ["trace", "import"],                  # missing arguments of a sub-app command
    ["sweep"],
])
def test_usage_errors_print_the_usage_line_and_exit_2(args):
    p = agentsim_cli(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and "Usage:" in p.stdout + p.stderr


def test_version_flag():
    p = agentsim_cli("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"agentsim {agentsim.__version__}"


def test_every_entry_point_success_and_bad_input(tmp_path):
    ok = [
        ["simulate", *QUICK, "-q", "-o", tmp_path / "run"],
        ["policies"],
        ["calibrate", "show", "a100-80gb_llama-3-8b_tp1"],
        ["trace", "generate", "chat", "-n", "2", "-o", tmp_path / "t.parquet"],
        ["trace", "inspect", tmp_path / "t.parquet"],
        ["trace", "export", tmp_path / "t.parquet", "--to", "native", "-o", tmp_path / "t.jsonl"],
        ["compare", tmp_path / "run", tmp_path / "run"],
    ]
    for args in ok:
        p = agentsim_cli(*args)
        assert p.returncode == 0, (args, p.stderr)
    bad = [
        (["simulate", *QUICK, "-o", tmp_path / "x", "--set", "duration=-1"], "duration"),
        (["trace", "inspect", tmp_path / "missing.jsonl"], "missing.jsonl"),
        (["compare", tmp_path / "run", tmp_path], "not a result directory"),
        (["calibrate", "show", "no-such-profile"], "no-such-profile"),
        (["live", "--endpoints", ",", "-o", tmp_path / "y"], "--endpoints"),
    ]
    for args, needle in bad:
        p = agentsim_cli(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert "Traceback" not in p.stderr and needle in p.stderr.strip().splitlines()[-1], (args, p.stderr)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_failed_calibration_check_exits_1(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_step_model import StepTimeCoefficients, _synthetic_job

    truth = StepTimeCoefficients(const=1.2e-3, per_prefill_token=2e-5, per_prefill_attn_pair=2e-8,
                                 per_decode_seq=0.0, per_decode_ctx_token=2e-7, per_scheduled_seq=5e-5,
                                 per_sampled_token=0.0, per_batched_token=1e-5, knee_tokens=64.0)
    _synthetic_job(tmp_path / "job", truth)
    prof = tmp_path / "tiny.json"
    assert agentsim_cli("calibrate", "fit", tmp_path / "job", "--out", prof, "--model-name", "tiny").returncode == 0
    d = json.loads(prof.read_text())
    d["step_time"] = {k: (v * 3 if isinstance(v, float) and k != "knee_tokens" else v)
                      for k, v in d["step_time"].items()}  # predictions 3x the measured times
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(d))
    p = agentsim_cli("calibrate", "check", wrong, tmp_path / "job", "--max-median-error", "0.15")
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "FAIL" in p.stderr and "Traceback" not in p.stderr
    assert agentsim_cli("calibrate", "check", prof, tmp_path / "job", "--max-median-error", "0.15").returncode == 0


def _interrupt(args, cwd, wait_for: float = 8.0) -> subprocess.CompletedProcess:
    """Start ``agentsim ARGS``, wait until it is simulating, send SIGINT, return the finished process."""
    env = {**os.environ, "COLUMNS": "200"}
    # a shell's background job (CI started from a script with `&`) inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: give the child the default disposition, as a terminal would
    proc = subprocess.Popen([sys.executable, "-m", "agentsim", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(wait_for)  # imports and set-up; the runs below last far longer than this
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_sigint_during_simulate_exits_130_and_writes_nothing(tmp_path):
    p = _interrupt(["simulate", "--duration", "100000", "-o", tmp_path / "run"], tmp_path)
    assert p.returncode == 130, p.stderr
    assert "Traceback" not in p.stderr and "interrupted" in p.stderr
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run*"))


def test_sigint_during_sweep_exits_130_and_stops_its_workers(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('[base]\nduration = 100000.0\n[base.workload]\nagents = 100\n[grid]\nseed = [0, 1, 2]\n')
    p = _interrupt(["sweep", spec, "-j", "2", "-o", tmp_path / "sw"], tmp_path)
    assert p.returncode == 130, p.stderr
    assert "Traceback" not in p.stderr
    assert not list((tmp_path / "sw" / "cells").iterdir())  # no cell finished, none half-written
    assert not (tmp_path / "sw" / "results.parquet").exists()


def _spawned_workers(pid: int) -> list[int]:
    """The multiprocessing worker processes (``spawn_main``) among ``pid``'s children (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid ...: comm may hold spaces, so split after its closing parenthesis
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                out.append(int(stat.parent.name))
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue   # a process that ended meanwhile
    return sorted(out)


def _gone(pid: int) -> bool:
    try:
        return b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()
    except FileNotFoundError:
        return True


def _wait_for_workers(pid: int, n: int, alive) -> list[int]:
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while len(workers) < n and time.monotonic() < deadline and alive():
        time.sleep(0.5)
        workers = _spawned_workers(pid)
    return workers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in /proc")
def test_a_sweep_worker_that_dies_fails_the_sweep_instead_of_hanging(tmp_path):
    """multiprocessing.Pool replaces a dead worker and waits for its cell for ever; the sweep must stop
    with one line naming how the worker ended (exit 1), keep nothing half-written and leave no worker
    behind."""
    spec = tmp_path / "s.toml"
    spec.write_text('[base]\nduration = 100000.0\n[base.workload]\nagents = 100\n[grid]\nseed = [0, 1, 2]\n')
    proc = subprocess.Popen([sys.executable, "-m", "agentsim", "sweep", str(spec), "-j", "2", "-o", str(tmp_path / "sw")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        workers = _wait_for_workers(proc.pid, 2, lambda: proc.poll() is None)
        assert len(workers) == 2, proc.communicate(timeout=30) if proc.poll() is not None else workers
        time.sleep(3)   # both are past their imports
        os.kill(workers[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:   # a hung sweep: stop it and its workers (they hold its pipes open)
            for pid in [proc.pid, *workers]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {spec}: a worker process was killed by SIGKILL (out of memory?) while "
                               "running cells; 3 cells did not finish, 0 finished cells are kept; rerun to resume"), lines
    assert _gone(workers[1])
    assert not list((tmp_path / "sw" / "cells").iterdir())   # no cell finished, none half-written
    assert not (tmp_path / "sw" / "results.parquet").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in /proc")
def test_a_dead_sweep_worker_fails_the_unfinished_cells_of_a_keep_going_sweep(tmp_path):
    """A study (keep_going) lists the cells a dead worker left unfinished as failed and carries on to
    its table, with the cells finished before kept."""
    import threading

    from agentsim.experiments import sweep as S

    spec_file = tmp_path / "s.toml"
    spec_file.write_text('[sweep]\nout = "sw"\n[base]\nduration = 100000.0\n[base.workload]\nagents = 100\n'
                         '[grid]\nseed = [0, 1, 2]\n')
    spec = S.load_spec(spec_file)
    got: dict = {}

    def run() -> None:
        try:
            got["table"] = S.run_sweep(spec, out=tmp_path / "sw", workers=2, keep_going=True)
        except BaseException as e:  # noqa: BLE001 - reported below
            got["error"] = e

    t = threading.Thread(target=run)
    t.start()
    workers = _wait_for_workers(os.getpid(), 2, t.is_alive)
    assert len(workers) == 2, got
    time.sleep(3)
    os.kill(workers[0], signal.SIGKILL)
    t.join(120)
    assert not t.is_alive() and "error" not in got, got
    table = got["table"]
    assert len(table) == 0
    failed = table.attrs["failed"]
    assert len(failed) == 3 and all("a worker process was killed by SIGKILL (out of memory?) before this cell "
                                    "finished" in f for f in failed), failed
    assert all(_gone(w) for w in workers)


def _ray_cell_workers() -> list[int]:
    """Ray worker processes running a sweep cell now (their process title is ``ray::<task>``)."""
    out = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmd.read_bytes().startswith(b"ray::_run_ray_cell"):
                out.append(int(cmd.parent.name))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in /proc")
def test_a_ray_sweep_whose_worker_keeps_dying_fails_in_one_line(tmp_path):
    """`agentsim sweep --ray`: a cell whose Ray worker is killed on every try (Ray retries it) fails
    with one line naming the error (exit 1), not Ray's traceback; the other cells are cancelled."""
    pytest.importorskip("ray", reason="ray is part of the test install ('.[test,cpu]')")
    from agentsim.experiments.sweep import RAY_MAX_RETRIES

    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    os.environ.update({k: env[k] for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED")})
    from ray.cluster_utils import Cluster

    common = dict(num_cpus=1, object_store_memory=80 * 2**20, node_ip_address="127.0.0.1")
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=dict(common, include_dashboard=False))
    spec = tmp_path / "s.toml"
    spec.write_text('[base]\nduration = 100000.0\n[base.workload]\nagents = 100\n[grid]\nseed = [0, 1, 2]\n')
    proc = None
    killed = 0
    try:
        cluster.add_node(**common)
        cluster.wait_for_nodes()
        proc = subprocess.Popen([sys.executable, "-m", "agentsim", "sweep", str(spec), "--ray", cluster.address,
                                 "-o", str(tmp_path / "sw")], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            for pid in _ray_cell_workers():
                time.sleep(1)   # past its start
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        cluster.shutdown()
    assert proc.returncode == 1, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {spec}: grid cell "), lines
    assert ("its Ray worker died (WorkerCrashedError: " in lines[0]
            and f"; Ray retried it up to {RAY_MAX_RETRIES} times (finished cells are kept; rerun to resume)" in lines[0]), lines
    assert killed >= 1 + RAY_MAX_RETRIES
    assert not list((tmp_path / "sw" / "cells").iterdir())   # no cell finished, none half-written


POLICY_MODULE = """
from agentsim.policies.registry import register


@register("route", "last-engine-test")
class LastEngine:
    \"\"\"Every call to the last engine (a test policy registered outside agentsim).\"\"\"

    def route(self, call, engines, now):
        return len(engines) - 1
"""


def test_spawned_sweep_workers_see_policies_and_bundles_registered_in_the_calling_process(tmp_path, monkeypatch):
    """A component registered by an importable module outside agentsim, and a bundle registered at run
    time, reach the spawned workers (the module is imported there, the bundle passed as data)."""
    from agentsim.experiments import sweep as S
    from agentsim.policies import registry

    (tmp_path / "my_policies_mod.py").write_text(POLICY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_policies_mod  # noqa: F401 - registers the route policy

    registry.register_bundle("last-engine-bundle-test", "test", route="last-engine-test", order="fcfs",
                             evict="lru", shape="fixed")
    try:
        modules, bundles, local = S._registrations()
        assert "my_policies_mod" in modules and not local
        assert "last-engine-bundle-test" in {b.name for b in bundles}
        spec_file = tmp_path / "s.toml"
        spec_file.write_text('[sweep]\nout = "sw"\n[base]\nduration = 5.0\npolicy = "last-engine-bundle-test"\n'
                             '[base.cluster]\ngpus_per_node = 2\n[base.workload]\nagents = 4\n[grid]\nseed = [0, 1]\n')
        table = S.run_sweep(S.load_spec(spec_file), out=tmp_path / "sw", workers=2)
        assert len(table) == 2 and not table.attrs["failed"]
        for cid in S.cell_id({"seed": 0}), S.cell_id({"seed": 1}):
            calls = pd.read_parquet(tmp_path / "sw" / "cells" / cid / "calls.parquet")
            assert len(calls) > 0 and set(calls["engine_id"]) == {1}   # the test policy routed them
    finally:
        registry._BUNDLES.pop("last-engine-bundle-test", None)
        registry._COMPONENTS.pop(("route", "last-engine-test"), None)


@pytest.mark.slow
def test_ray_sweep_tasks_see_policies_and_bundles_registered_in_the_calling_process(tmp_path):
    """The same on a 2-node Ray cluster (loopback): the module (importable on the nodes: on their
    PYTHONPATH) is imported by the Ray workers, the bundle passed as data."""
    pytest.importorskip("ray", reason="ray is part of the test install ('.[test,cpu]')")
    (tmp_path / "my_policies_mod.py").write_text(POLICY_MODULE)
    script = tmp_path / "run_it.py"
    script.write_text(textwrap.dedent('''
        import sys
        from pathlib import Path

        import my_policies_mod  # registers the route policy
        from agentsim.experiments import sweep as S
        from agentsim.policies.registry import register_bundle

        if __name__ == "__main__":
            register_bundle("last-engine-bundle-test", "test", route="last-engine-test", order="fcfs", evict="lru",
                            shape="fixed")
            spec = Path("s.toml")
            spec.write_text('[sweep]\\nout = "sw"\\n[base]\\nduration = 5.0\\npolicy = "last-engine-bundle-test"\\n'
                            '[base.cluster]\\ngpus_per_node = 2\\n[base.workload]\\nagents = 4\\n[grid]\\nseed = [0, 1]\\n')
            table = S.run_sweep(S.load_spec(spec), ray_address=sys.argv[1])
            assert len(table) == 2 and not table.attrs["failed"], table.attrs["failed"]
    '''))
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    # the nodes' workers inherit this process's environment (their PYTHONPATH holds the module)
    saved = dict(os.environ)
    os.environ.update(env)
    from ray.cluster_utils import Cluster

    common = dict(num_cpus=1, object_store_memory=80 * 2**20, node_ip_address="127.0.0.1")
    try:
        cluster = Cluster(initialize_head=True, connect=False, head_node_args=dict(common, include_dashboard=False))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        cluster.add_node(**common, env_vars={"PYTHONPATH": env["PYTHONPATH"]})
        cluster.wait_for_nodes()
        p = subprocess.run([sys.executable, str(script), cluster.address], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    finally:
        cluster.shutdown()
    assert p.returncode == 0, p.stderr
    from agentsim.experiments import sweep as S

    for cid in S.cell_id({"seed": 0}), S.cell_id({"seed": 1}):
        calls = pd.read_parquet(tmp_path / "sw" / "cells" / cid / "calls.parquet")
        assert len(calls) > 0 and set(calls["engine_id"]) == {1}   # the test policy routed them


def test_a_policy_registered_only_in_the_calling_script_still_runs_in_sweep_workers(tmp_path):
    """Registered under ``if __name__ == "__main__":`` (as in a notebook), a policy exists only in this
    process: the sweep forks its workers then, as before, instead of spawning them."""
    script = tmp_path / "run_it.py"
    script.write_text(textwrap.dedent('''
        import sys
        from pathlib import Path

        if __name__ == "__main__":
            from agentsim.experiments import sweep as S
            from agentsim.policies.registry import register, register_bundle

            @register("route", "last-engine-main")
            class LastEngine:
                def route(self, call, engines, now):
                    return len(engines) - 1

            register_bundle("last-engine-main-bundle", "test", route="last-engine-main", order="fcfs",
                            evict="lru", shape="fixed")
            out = Path(sys.argv[1])
            spec = out.parent / "s.toml"
            spec.write_text('[sweep]\\nout = "sw"\\n[base]\\nduration = 5.0\\npolicy = "last-engine-main-bundle"\\n'
                            '[base.cluster]\\ngpus_per_node = 2\\n[base.workload]\\nagents = 4\\n[grid]\\nseed = [0, 1]\\n')
            table = S.run_sweep(S.load_spec(spec), out=out, workers=2)
            print(len(table), len(table.attrs["failed"]))
    '''))
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "sw")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["2", "0"]


STALE_AND_STDIN = """
import pathlib
import sys
import tempfile

from agentsim.experiments import sweep as S

if __name__ == "__main__":
    # a policy module imported from a path the process has dropped since: a worker cannot import it
    d = tempfile.mkdtemp()
    pathlib.Path(d, "gone_policies_mod.py").write_text(
        "from agentsim.policies.registry import register\\n"
        "@register('route', 'gone-test')\\n"
        "class Gone:\\n"
        "    def route(self, call, engines, now):\\n"
        "        return 0\\n")
    sys.path.insert(0, d)
    import gone_policies_mod  # noqa: F401
    sys.path.remove(d)
    assert "gone_policies_mod" in S._registrations()[0]
    out = pathlib.Path(sys.argv[1])
    spec = out.parent / "s.toml"
    spec.write_text('[sweep]\\nout = "sw"\\n[base]\\nduration = 5.0\\n[base.workload]\\nagents = 4\\n'
                    '[grid]\\nseed = [0, 1]\\n')
    table = S.run_sweep(S.load_spec(spec), out=out, workers=2)
    print(len(table), len(table.attrs["failed"]))
"""


@pytest.mark.parametrize("how", ["script file", "script on stdin"])
def test_sweep_workers_start_despite_a_stale_registration_and_a_main_read_from_stdin(tmp_path, how):
    """A registration the workers cannot import (its module's path dropped since) does not stop them
    (the cells that do not use it run); a main script read from stdin (``python -``), which a spawned
    worker cannot re-run, makes the sweep fork its workers."""
    script = tmp_path / "run_it.py"
    script.write_text(STALE_AND_STDIN)
    args = [str(script)] if how == "script file" else ["-"]
    p = subprocess.run([sys.executable, *args, str(tmp_path / "sw")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300, input=None if how == "script file" else STALE_AND_STDIN)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["2", "0"]


# ----------------------------------------------------------------------------- output paths
def _user_tree(root: Path, case: str) -> Path:
    """A path holding something the user made; returns the ``-o`` argument."""
    if case == "dir with a user file":
        (root / "d" / "data").mkdir(parents=True)
        (root / "d" / "data" / "notes.txt").write_text("x")
        return root / "d"
    if case == "an ordinary file":
        (root / "f.txt").write_text("mine")
        return root / "f.txt"
    if case == "nested under a file":
        (root / "f.txt").write_text("mine")
        return root / "f.txt" / "run"
    if case == "a result plus a user file":
        write_results(root / "r", *_frames())
        (root / "r" / "notes.txt").write_text("mine")
        return root / "r"
    if case == "a manifest that is not agentsim's":
        (root / "m").mkdir()
        (root / "m" / "manifest.json").write_text('{"name": "my package"}')
        return root / "m"
    if case == "a symlink to a result":
        write_results(root / "r", *_frames())
        (root / "link").symlink_to(root / "r")
        return root / "link"
    raise AssertionError(case)


CASES = ["dir with a user file", "an ordinary file", "nested under a file", "a result plus a user file",
         "a manifest that is not agentsim's", "a symlink to a result"]


def _frames():
    return (empty_frame(CALL_COLUMNS), empty_frame(PROGRAM_COLUMNS), empty_frame(ENGINE_COLUMNS),
            {"duration_s": 1.0}, {"schema_version": 1, "backend": "test"})


@pytest.mark.parametrize("case", CASES)
def test_simulate_never_touches_a_path_agentsim_did_not_write(tmp_path, case):
    out = _user_tree(tmp_path, case)
    before = snapshot(tmp_path)
    p = agentsim_cli("simulate", *QUICK, "-q", "-o", out, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    one_error_line(p, "--out")
    assert snapshot(tmp_path) == before


def test_output_refused_before_the_run_starts(tmp_path):
    """A long run into a refused path fails at once (the check comes before the work)."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    t0 = time.monotonic()
    p = agentsim_cli("simulate", "--duration", "100000", "-o", tmp_path / "d")
    assert p.returncode == 2 and time.monotonic() - t0 < 60
    assert "Traceback" not in p.stderr


def test_dot_output(tmp_path):
    """`-o .`: the current directory is written in place when empty, refused otherwise."""
    (tmp_path / "here").mkdir()
    p = agentsim_cli("simulate", *QUICK, "-q", "-o", ".", cwd=tmp_path / "here")
    assert p.returncode == 0, p.stderr
    assert is_result_dir(tmp_path / "here")
    before = snapshot(tmp_path)
    p = agentsim_cli("simulate", *QUICK, "-q", "-o", ".", cwd=tmp_path / "here")
    assert p.returncode == 2 and "current directory" in one_error_line(p)
    (tmp_path / "notes.txt").write_text("mine")
    p = agentsim_cli("simulate", *QUICK, "-q", "-o", ".", cwd=tmp_path)
    assert p.returncode == 2 and "current directory" in one_error_line(p)
    p = agentsim_cli("simulate", *QUICK, "-q", "-o", "..", cwd=tmp_path / "here")
    assert p.returncode == 2
    assert snapshot(tmp_path) == {**before, "notes.txt": b"mine"}


def test_previous_result_replaced_atomically_and_said(tmp_path):
    out = tmp_path / "run"
    assert agentsim_cli("simulate", *QUICK, "-q", "-o", out).returncode == 0
    p = agentsim_cli("simulate", *QUICK, "--seed", "7", "-q", "-o", out)
    assert p.returncode == 0 and "replaced the previous agentsim result" in p.stderr
    assert json.loads((out / "manifest.json").read_text())["seed"] == 7
    assert sorted(x.name for x in tmp_path.iterdir()) == ["run"]  # no temporaries left beside it
    (tmp_path / "empty").mkdir()
    assert agentsim_cli("simulate", *QUICK, "-q", "-o", tmp_path / "empty").returncode == 0
    assert is_result_dir(tmp_path / "empty")


def test_live_refuses_a_busy_output_before_starting_engines(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    p = agentsim_cli("live", "--endpoints", "http://127.0.0.1:9", "-o", tmp_path / "busy", "-q")
    assert p.returncode == 2
    one_error_line(p, "busy")
    assert os.listdir(tmp_path / "busy") == ["notes.txt"]


def test_trace_outputs_are_checked(tmp_path):
    src = tmp_path / "t.parquet"
    assert agentsim_cli("trace", "generate", "chat", "-n", "2", "-o", src).returncode == 0
    (tmp_path / "dir").mkdir()
    (tmp_path / "mine.jsonl").write_text("my data\n")
    before = snapshot(tmp_path)
    for args in (["trace", "import", "native", src, "-o", tmp_path / "dir"],
                 ["trace", "import", "auto", src, "-o", tmp_path / "mine.jsonl"],
                 ["trace", "export", src, "--to", "native", "-o", tmp_path / "dir"],
                 ["trace", "export", src, "--to", "native", "-o", tmp_path / "mine.jsonl"],
                 ["trace", "generate", "chat", "-n", "2", "-o", tmp_path / "mine.jsonl"]):
        p = agentsim_cli(*args)
        assert p.returncode == 2, (args, p.stderr)
        one_error_line(p, "--out")
    assert snapshot(tmp_path) == before
    # a previous agentsim trace is replaced, and said so
    p = agentsim_cli("trace", "generate", "chat", "-n", "3", "-o", src)
    assert p.returncode == 0 and "replaced the previous agentsim trace" in p.stderr


def test_calibrate_outputs_are_checked(tmp_path):
    (tmp_path / "mine.json").write_text("{}")
    p = agentsim_cli("calibrate", "fit", tmp_path / "nojob", "--out", tmp_path / "mine.json")
    assert p.returncode == 2 and "mine.json" in one_error_line(p)
    assert (tmp_path / "mine.json").read_text() == "{}"


@st.composite
def user_trees(draw):
    """A directory tree of user files (names may collide with result file names)."""
    names = st.sampled_from(["calls.parquet", "summary.json", "manifest.json", "notes.txt", "data", "a", ".hidden"])
    files = draw(st.lists(st.tuples(st.lists(names, min_size=1, max_size=3), st.binary(max_size=20)),
                          min_size=1, max_size=5))
    return files


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=user_trees())
def test_property_a_user_tree_is_never_modified(tmp_path_factory, tree):
    root = tmp_path_factory.mktemp("tree")
    out = root / "out"
    out.mkdir()
    for parts, data in tree:
        p = out.joinpath(*parts)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            if not p.exists():
                p.write_bytes(data)
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            pass  # a name already taken by a file or directory
    before = snapshot(root)
    if not any(out.iterdir()):
        return
    with pytest.raises(OutputError):
        write_results(out, *_frames())
    with pytest.raises(OutputError):
        check_result_dir(out)
    with pytest.raises(OutputError):
        check_sweep_dir(out)
    assert snapshot(root) == before


# ----------------------------------------------------------------------------- simulate flags
def test_simulate_has_live_flags_set_and_json(tmp_path):
    out = tmp_path / "run"
    p = agentsim_cli("simulate", "--duration", "5", "--agents", "3", "--drain", "--num-programs", "4",
                     "--block-size", "32", "--engines-per-node", "2", "--set", "cluster.engine.max_num_seqs=8",
                     "--set", 'workload.params={calls_mean = 2.0}', "--json", "-o", out)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    cfg = json.loads((out / "manifest.json").read_text())["config"]
    assert cfg["sim"]["drain"] is True and cfg["workload"]["num_programs"] == 4
    assert cfg["cluster"]["engine"]["block_size"] == 32 and cfg["cluster"]["engines_per_node"] == 2
    assert cfg["cluster"]["engine"]["max_num_seqs"] == 8 and cfg["workload"]["params"] == {"calls_mean": 2.0}
    programs = pd.read_parquet(out / "programs.parquet")
    assert len(programs) == 4 and (programs["status"] == "finished").all()  # drained: every program ends
    assert pd.read_parquet(out / "engines.parquet")["engine_id"].nunique() == 2


@pytest.mark.parametrize("item,field", [
    ("foo", "--set"), ("=3", "--set"), ("cluster..tp=2", "--set"), ("cluster.tp=[1", "--set cluster.tp"),
    ("cluster.tpp=2", "cluster.tpp"), ("cluster.tp=two", "cluster.tp"),
])
def test_bad_set_is_one_line_exit_2(tmp_path, item, field):
    p = agentsim_cli("simulate", *QUICK, "--set", item, "-o", tmp_path / "run")
    assert p.returncode == 2
    one_error_line(p, field)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- sweeps
def _spec(tmp_path: Path, body: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def test_sweep_stale_cells_recomputed_after_a_base_change(tmp_path):
    body = """
        [sweep]
        out = "{out}"
        [base]
        duration = {d}
        [base.workload]
        agents = 3
        [grid]
        policy = ["vllm", "least-loaded"]
    """
    spec = _spec(tmp_path, body.format(out=tmp_path / "sw", d=5.0))
    p = agentsim_cli("sweep", spec, "-j", "1", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert [r["duration_s"] for r in rows] == [5.0, 5.0] and [r["policy"] for r in rows] == ["vllm", "least-loaded"]
    spec = _spec(tmp_path, body.format(out=tmp_path / "sw", d=7.0))
    p = agentsim_cli("sweep", spec, "-j", "1")
    assert p.returncode == 0, p.stderr
    assert "stale: 2 of 2 cells" in p.stderr
    table = pd.read_parquet(tmp_path / "sw" / "results.parquet")
    assert table["duration_s"].tolist() == [7.0, 7.0]
    for c in (tmp_path / "sw" / "cells").iterdir():
        assert json.loads((c / "manifest.json").read_text())["config"]["duration"] == 7.0
    p = agentsim_cli("sweep", spec, "-j", "1")
    assert p.returncode == 0 and "resuming: 2 of 2" in p.stderr and "stale" not in p.stderr


def test_sweep_cell_of_another_agentsim_version_is_stale(tmp_path):
    spec = _spec(tmp_path, f"""
        [sweep]
        out = "{tmp_path / 'sw'}"
        [base]
        duration = 5.0
        [base.workload]
        agents = 2
        [grid]
        seed = [0, 1]
    """)
    assert agentsim_cli("sweep", spec, "-j", "1").returncode == 0
    cell = sorted((tmp_path / "sw" / "cells").iterdir())[0]
    m = json.loads((cell / "manifest.json").read_text())
    m["cell_key"] = "0" * 16  # as written by another version
    (cell / "manifest.json").write_text(json.dumps(m))
    p = agentsim_cli("sweep", spec, "-j", "1")
    assert p.returncode == 0 and "stale: 1 of 2" in p.stderr and "resuming: 1 of 2" in p.stderr


@pytest.mark.parametrize("body,args,needles", [
    ('[sweep]\nout = "sw"\nouts = 1\n[grid]\nseed = [0]\n', [], ["sweep.outs", "unknown key"]),
    ('[sweeps]\nout = "sw"\n[grid]\nseed = [0]\n', [], ["sweeps", "unknown section"]),
    ('[sweep]\nout = "s.toml"\n[grid]\nseed = [0]\n', [], ["sweep.out", "s.toml"]),
    ('[sweep]\nout = 3\n[grid]\nseed = [0]\n', [], ["sweep.out"]),
    ('[base]\ndurationn = 5.0\n[grid]\nseed = [0]\n', [], ["base.durationn", "unknown field"]),
    ('[base.cluster]\nnodes = 2\n[grid]\nseed = [0]\n', [], ["base.cluster.nodes", "unknown field"]),
    ('[grid]\n"cluster.nodez" = [1]\n', [], ["grid cell", "cluster.nodez"]),
    ('[grid]\nseed = [0]\n', ["-j", "-1"], ["--workers", "-1"]),
    ('[grid]\nseed = [0]\n', ["-j", "0"], ["--workers"]),
    ('[base]\nduration = 5.0\n[grid]\npolicy = ["vllm", "nope"]\n', [], ['grid cell {"policy": "nope"}', "policy"]),
    ('[grid]\n"workload.agents" = [2, 0]\n', [], ['grid cell {"workload.agents": 0}', "workload.agents"]),
    ('[grid]\n"workload.generator" = ["react", "nope"]\n', [], ["grid cell", "workload.generator"]),
    ('[grid]\n"cluster.tp" = [1, 8]\n', [], ["grid cell", "cluster.tp"]),
    ('[base]\nduration = 5.0\n[grid]\n"policy.params.evict.source" = ["stepz"]\n', [], ["grid cell", "policy"]),
])
def test_sweep_input_faults_exit_2_one_line_before_any_cell(tmp_path, body, args, needles):
    spec = _spec(tmp_path, body)
    p = agentsim_cli("sweep", spec, *args, "-j", "1", cwd=tmp_path) if "-j" not in args else \
        agentsim_cli("sweep", spec, *args, cwd=tmp_path)
    assert p.returncode == 2, (p.stdout, p.stderr)
    line = one_error_line(p, *needles)
    assert "s.toml" in line or "--workers" in line
    assert not (tmp_path / "sw").exists() and not (tmp_path / "runs").exists()


def test_sweep_cell_failing_in_a_worker_is_one_line(tmp_path):
    # bad input found only by running the cell (a call longer than the context)
    spec = _spec(tmp_path, f"""
        [sweep]
        out = "{tmp_path / 'sw'}"
        [base]
        duration = 5.0
        [base.workload]
        agents = 2
        [grid]
        "cluster.engine.max_model_len" = [8192, 64]
    """)
    p = agentsim_cli("sweep", spec, "-j", "2")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and 'grid cell {"cluster.engine.max_model_len": 64}' in err[0] and "max_model_len" in err[0]


def test_sweep_cell_crash_is_reported_as_one_line(tmp_path, monkeypatch):
    """A fault in a run (not bad input) becomes CellFailed: one line with the spec, the cell and the error."""
    from agentsim.experiments import sweep as S
    from agentsim.sim import runner

    def boom(cfg, progress=None):
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(runner, "run", boom)
    spec = S.load_spec(_spec(tmp_path, "[base]\nduration = 5.0\n[grid]\nseed = [0, 1]\n"))
    with pytest.raises(S.CellFailed) as e:
        S.run_sweep(spec, out=tmp_path / "sw", workers=1)
    msg = str(e.value)
    assert "\n" not in msg and 'grid cell {"seed": 0}' in msg and "RuntimeError: engine exploded" in msg
    assert not list((tmp_path / "sw" / "cells").iterdir())


def test_sweep_never_touches_user_files(tmp_path):
    spec = _spec(tmp_path, "[base]\nduration = 5.0\n[base.workload]\nagents = 2\n[grid]\nseed = [0]\n")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    p = agentsim_cli("sweep", spec, "-o", tmp_path / "busy")
    assert p.returncode == 2 and "busy" in one_error_line(p)
    assert snapshot(tmp_path) == before
    # a cell directory holding a user file is refused before any cell runs
    assert agentsim_cli("sweep", spec, "-o", tmp_path / "sw", "-j", "1").returncode == 0
    cell = next((tmp_path / "sw" / "cells").iterdir())
    (cell / "notes.txt").write_text("mine")
    spec.write_text(spec.read_text().replace("duration = 5.0", "duration = 6.0"))  # the cell is stale
    p = agentsim_cli("sweep", spec, "-o", tmp_path / "sw", "-j", "1")
    assert p.returncode == 2 and "notes.txt" in one_error_line(p)
    assert (cell / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("manifest,code", [
    ({"complete": True, "status": "complete"}, 0),
    ({"complete": False, "status": "drain timeout"}, 1),   # incomplete: exit 1, with or without -q
    ({"complete": False, "status": "interrupted"}, 130),   # Ctrl-C: partial results written, 130
])
@pytest.mark.parametrize("quiet", [True, False])
def test_live_exit_status_follows_the_run(tmp_path, monkeypatch, manifest, code, quiet):
    """`agentsim live` through the real CLI wrapper, with the engines replaced by a finished result."""
    from types import SimpleNamespace

    from agentsim.cli import run_cli
    from agentsim.live import runner

    def fake_run_live(cfg, settings, out_dir=None):
        m = {"policy": "vllm", "cluster": "test", "engines": [], "live_model": "tiny", **manifest}
        return SimpleNamespace(manifest=m, summary={}, out_dir=out_dir)

    monkeypatch.setattr(runner, "run_live", fake_run_live)
    monkeypatch.setattr("agentsim.live.cli._print", lambda *a: None)
    args = ["live", "--endpoints", "http://127.0.0.1:9", "-o", str(tmp_path / "run")] + (["-q"] if quiet else [])
    assert run_cli(args) == code


def test_policy_report_outcomes(tmp_path):
    """`python -m agentsim.experiments.policy_report`: bad input is one line and exit 2, nothing written."""
    def report(*args):
        return subprocess.run([sys.executable, "-m", "agentsim.experiments.policy_report", *map(str, args)],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)

    p = report("autellix", "--workers", "0", "--figures", tmp_path / "fig")
    assert p.returncode == 2 and "--workers" in one_error_line(p)
    (tmp_path / "fig").mkdir()
    (tmp_path / "fig" / "summary.json").write_text('{"mine": 1}')
    p = report("autellix", "--figures", tmp_path / "fig", "--out", tmp_path / "runs")
    assert p.returncode == 2 and "summary.json" in one_error_line(p)
    assert os.listdir(tmp_path / "fig") == ["summary.json"] and not (tmp_path / "runs").exists()
    assert (tmp_path / "fig" / "summary.json").read_text() == '{"mine": 1}'


def test_writer_rewrites_its_own_result_in_the_current_directory(tmp_path, monkeypatch):
    """A live run flushing partial results into `-o .` replaces its own files (manifest last) and
    still refuses once anything else appears there."""
    monkeypatch.chdir(tmp_path)
    frames = _frames()
    write_results(".", *frames[:4], {"schema_version": 1, "flush": 1})
    write_results(".", *frames[:4], {"schema_version": 1, "flush": 2})
    assert is_result_dir(tmp_path) and json.loads((tmp_path / "manifest.json").read_text())["flush"] == 2
    assert sorted(os.listdir(tmp_path)) == sorted(["calls.parquet", "programs.parquet", "engines.parquet",
                                                   "summary.json", "manifest.json"])
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(OutputError):
        write_results(".", *frames[:4], {"schema_version": 1, "flush": 3})
    assert snapshot(tmp_path) == before


def test_unwritable_output_refused_before_the_run(tmp_path):
    """A path that cannot be created is one line and exit 2 before the work (not a traceback after it)."""
    for args in (["simulate", "--duration", "100000", "-o", "/proc/agentsim-run"],
                 ["sweep", _spec(tmp_path, "[grid]\nseed = [0]\n"), "-o", "/proc/agentsim-sweep"]):
        t0 = time.monotonic()
        p = agentsim_cli(*args)
        assert p.returncode == 2 and "/proc/agentsim-" in one_error_line(p), p.stderr
        assert time.monotonic() - t0 < 60


def test_sweep_set_overrides_base_and_makes_cells_stale(tmp_path):
    spec = _spec(tmp_path, f"""
        [sweep]
        out = "{tmp_path / 'sw'}"
        [base]
        duration = 5.0
        [base.workload]
        agents = 2
        [grid]
        seed = [0, 1]
    """)
    assert agentsim_cli("sweep", spec, "-j", "1").returncode == 0
    p = agentsim_cli("sweep", spec, "-j", "1", "--set", "duration=6.0", "--json")
    assert p.returncode == 0 and "stale: 2 of 2" in p.stderr
    assert [r["duration_s"] for r in json.loads(p.stdout)] == [6.0, 6.0]
    p = agentsim_cli("sweep", spec, "--set", "seed=3")
    assert p.returncode == 2 and "--set seed" in one_error_line(p)

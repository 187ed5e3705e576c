"""The benchmark scripts' bad input: one line naming the option, exit code 2, nothing run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _speed(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sim_speed.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_sim_speed_refuses_a_baseline_without_a_package_and_an_unknown_bundle(tmp_path):
    log = ROOT / "benchmarks" / "results" / "sim_speed.jsonl"
    before = log.stat().st_size if log.exists() else 0
    r = _speed("d", "--baseline", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"--baseline: {tmp_path} holds no agentsim package (make one with: pip install --no-deps --target "
        f"{tmp_path} <an earlier checkout>)"]
    r = _speed("d", "--policy", "no-such-bundle", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("--policy: unknown bundle 'no-such-bundle' (known: ")
    assert (log.stat().st_size if log.exists() else 0) == before   # no run was recorded


def test_sim_profile_sums_py_spy_samples_by_component_and_function():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from sim_profile import sampled_shares
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    raw = [
        "<module> (run.py:1);run (/x/sim/runner.py:300);allocate (/x/sim/kv.py:170) 7\n",
        "<module> (run.py:1);step (/y/simpy/core.py:182) 2\n",
        "<module> (run.py:1);run (/x/sim/runner.py:300);allocate (/x/sim/kv.py:171) 1\n",
        " 5\n",   # samples without Python frames (start-up, exit): not counted
    ]
    by_comp, by_func, total = sampled_shares(raw)
    assert total == 10
    assert by_comp == {"KV cache manager + block pool (sim/kv_manager.py, sim/kv.py)": 8, "SimPy event loop": 2}
    assert by_func == {"allocate (sim/kv.py)": 8, "step (simpy/core.py)": 2}


def test_sim_speed_floor_refuses_engine_options(tmp_path):
    r = _speed("b", "--floor", "--reference-loop", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "--floor: runs no engine, so --reference-loop, --no-fast-forward and --baseline do not apply"


def test_sim_profile_without_py_spy_says_how_to_install_it(tmp_path):
    # an empty PATH: py-spy cannot be found whether or not this machine has it
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sim_profile.py"), "a", "--sampler", "py-spy"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120, env={"PATH": str(tmp_path)})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "--sampler py-spy: py-spy is not installed (pip install py-spy)"


def test_kv_locality_refuses_sizes_that_cannot_run(tmp_path):
    script = str(ROOT / "benchmarks" / "kv_locality.py")
    r = subprocess.run([sys.executable, script, "--blocks", "0"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.strip() == "--blocks: must be >= 1, got 0"
    r = subprocess.run([sys.executable, script, "--pool-blocks", "100"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "--blocks x (--live + 1) = 1,326: more blocks than a pool has (--pool-blocks 100)"

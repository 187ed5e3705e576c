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

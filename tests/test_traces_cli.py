"""``agentsim trace ...`` end to end in a subprocess: import, inspect, export, generate, bad input."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

from agentsim.traces.canonical import Trace

DATA = Path(__file__).resolve().parents[1] / "traces" / "data"
MOONCAKE = DATA / "mooncake" / "conversation_first600s.jsonl.gz"
TAU2 = DATA / "tau2-bench" / "gpt-4.1_airline_1trial.json.gz"


def agentsim(*args, cwd=None):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "agentsim", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env=env)


def test_import_inspect_export(tmp_path):
    out = tmp_path / "m.parquet"
    p = agentsim("trace", "import", "mooncake", MOONCAKE, "-o", out)
    assert p.returncode == 0, p.stderr
    assert "imported 1,750 programs (1,750 steps)" in p.stdout
    p = agentsim("trace", "inspect", out, "--json")
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    assert st["num_programs"] == 1750 and round(st["prefix_reuse"], 4) == 0.2889
    p = agentsim("trace", "inspect", TAU2)
    assert p.returncode == 0, p.stderr
    assert "342 LLM calls, 148 tool calls" in p.stdout and "prefix reuse" in p.stdout
    p = agentsim("trace", "export", out, "--to", "mooncake", "-o", tmp_path / "back.jsonl")
    assert p.returncode == 0, p.stderr
    with gzip.open(MOONCAKE, "rb") as f:
        assert (tmp_path / "back.jsonl").read_bytes() == f.read()


def test_bad_line_one_error_line_exit_2_nothing_written(tmp_path):
    with gzip.open(MOONCAKE, "rt") as f:
        lines = f.read().splitlines()
    lines[41] = '{"timestamp": 123000, "input_length": "many", "output_length": 5, "hash_ids": [0]}'
    lines[99] = "{oops"
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.parquet"
    p = agentsim("trace", "import", "mooncake", src, "-o", out)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"error: {src}:42: input_length: must be an integer >= 1, got 'many'"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.jsonl"]
    p = agentsim("trace", "import", "mooncake", src, "-o", out, "--skip-bad")
    assert p.returncode == 0, p.stderr
    assert "imported 1,748 programs" in p.stdout
    assert "skipped 2 bad records" in p.stderr and f"{src}:42" in p.stderr and f"{src}:100" in p.stderr
    assert len(Trace.read(out).programs) == 1748


def test_bad_format_and_option_errors(tmp_path):
    p = agentsim("trace", "import", "csv", MOONCAKE, "-o", tmp_path / "x.parquet")
    assert p.returncode == 2 and p.stderr.startswith("error: format: unknown trace format 'csv'")
    p = agentsim("trace", "import", "tau2", MOONCAKE, "-o", tmp_path / "x.parquet", "--spread")
    assert p.returncode == 2 and "spread: not an option of the tau2 importer" in p.stderr
    p = agentsim("trace", "inspect", tmp_path / "missing.jsonl", "--format", "mooncake")
    assert p.returncode == 2 and "no such file" in p.stderr
    assert not list(tmp_path.iterdir())


def test_generate_then_simulate_replay(tmp_path):
    out = tmp_path / "g.parquet"
    p = agentsim("trace", "generate", "react", "-n", "20", "--rate", "2", "--seed", "3", "-p", "calls_mean=4",
                 "-o", out)
    assert p.returncode == 0, p.stderr
    t = Trace.read(out)
    assert len(t.programs) == 20 and t.meta["params"] == {"calls_mean": 4}
    run = tmp_path / "run"
    p = agentsim("simulate", "--trace", out, "--duration", "600", "-o", run)
    assert p.returncode == 0, p.stderr
    import pandas as pd

    progs = pd.read_parquet(run / "programs.parquet")
    calls = pd.read_parquet(run / "calls.parquet")
    assert len(progs) == 20
    assert len(calls) == sum(1 for pr in t.programs for s in pr.steps if s.kind == "llm")

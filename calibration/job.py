"""The profiling job: measure a grid of batch shapes on a vLLM engine, resumably; fit; check.

A job directory holds

- ``job.json``     what is measured: engine config, engine facts (vLLM version, device, KV blocks),
                   the grid with each point's held-out flag, NVML availability (written atomically
                   once, after the engine started);
- ``points.jsonl`` one line per measured grid point, appended and fsync'ed as soon as the point is
                   measured. A rerun with the same options skips the points already there; a line
                   cut short by a crash is dropped (and the file truncated to the last whole line).

``fit`` uses the points not held out; ``check`` reports the error on the held-out ones.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from agentsim.calibration.fit import STEP_FEATURES, ErrorStats, error_stats, fit_step_time, predict_many
from agentsim.calibration.grid import GridLimits, GridPoint, build_grid, holdout_mask
from agentsim.calibration.hardware import GPUS, gpu_kind_from_name, slug
from agentsim.calibration.models import model_dims_from_hf_config
from agentsim.calibration.profile import GPUSpec, Links, Profile
from agentsim.errors import ConfigError

JOB_FORMAT = "agentsim-calibration-job"
JOB_VERSION = 1
FEATURE_KEYS = ("num_prefill_tokens", "prefill_attn_pairs", "num_decode_seqs", "decode_ctx_tokens")

# Grids for the profiling job. Prefix lengths are multiples of 64 so they are whole KV blocks.
PROFILING_GRIDS: dict[str, dict[str, list[int]]] = {
    # A CPU engine with a tiny model (CI): ~30 points, a couple of minutes.
    "small": dict(
        decode_batches=[1, 4, 16, 32], decode_ctxs=[64, 256, 1024],
        prefill_chunks=[32, 128, 512, 1024], prefill_computed=[0, 512],
        mixed_chunks=[128, 512], mixed_computed=[0, 256], mixed_batches=[4, 16], mixed_ctxs=[256],
    ),
    # A GPU engine: the shapes a serving engine runs, within its limits (~150 points).
    "default": dict(
        decode_batches=[1, 2, 4, 8, 16, 32, 64, 128, 256], decode_ctxs=[128, 512, 1024, 2048, 4096, 8192],
        prefill_chunks=[32, 64, 128, 256, 512, 1024, 2048, 4096, 8192], prefill_computed=[0, 1024, 4096],
        mixed_chunks=[256, 1024, 2048], mixed_computed=[0, 2048], mixed_batches=[8, 32, 128], mixed_ctxs=[1024, 4096],
    ),
}


@dataclass(frozen=True)
class EngineConfig:
    """The engine a profiling job measures (the subset of vLLM engine arguments that matters)."""

    model: str
    tp: int = 1
    dtype: str = "auto"
    load_format: str = "auto"
    block_size: int | None = None          # None: 32 on CPU (must be a multiple of 32), 16 on GPU
    max_model_len: int | None = None
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    gpu_memory_utilization: float = 0.9
    kv_cache_gib: float | None = None      # None: 1 GiB on CPU, gpu_memory_utilization on GPU
    enforce_eager: bool | None = None      # None: eager on CPU, CUDA graphs on GPU
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class JobOptions:
    grid: str = "default"
    reps: int = 3
    holdout_every: int = 4
    seed: int = 0

    def to_dict(self) -> dict:
        return {"grid": self.grid, "reps": self.reps, "holdout_every": self.holdout_every, "seed": self.seed}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "agentsim":
        argv[0] = "agentsim"
    return shlex.join(argv)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


CLOCKS = {"wall": "step_time_s", "cpu": "step_cpu_time_s"}


def default_clock(meta: dict) -> str:
    """Which per-step time a job's fit uses by default.

    ``cpu`` (process CPU time) for a CPU engine running one OpenMP thread: its step is this one
    thread's work, and on a shared machine CPU time leaves out the time other processes held the
    core (wall times of a 2 ms step were seen to triple during other engineers' test runs).
    ``wall`` otherwise: a GPU step's host thread mostly waits for the device, so only wall time
    measures it (run GPU jobs on an otherwise idle machine).
    """
    info = meta.get("engine_info", {})
    if info.get("platform") == "cpu" and str(info.get("omp_num_threads")) == "1":
        return "cpu"
    return "wall"


# --------------------------------------------------------------------------- the on-disk store
class PointStore:
    """``points.jsonl``: append-only, one grid point per line, durable after each append."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, repair: bool = False) -> list[dict]:
        """All complete records. A last line without its newline (a crash mid-write) is dropped, and
        with ``repair`` cut from the file; a malformed line elsewhere is an error naming it."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        good_end = data.rfind(b"\n") + 1
        if good_end < len(data):
            print(f"{self.path}: dropping an incomplete last record ({len(data) - good_end} bytes, "
                  f"an interrupted write)", file=sys.stderr)
            if repair:
                with open(self.path, "r+b") as f:
                    f.truncate(good_end)
        out = []
        for lineno, line in enumerate(data[:good_end].decode().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{self.path}:{lineno}", f"malformed point record ({e.msg})") from None
            if not isinstance(rec, dict) or "point_id" not in rec or not isinstance(rec.get("samples"), list):
                raise ConfigError(f"{self.path}:{lineno}", "not a point record (needs point_id and samples)")
            out.append(rec)
        return out

    def append(self, rec: dict) -> None:
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


@dataclass
class Job:
    directory: Path
    meta: dict
    points: list[dict]

    @property
    def grid(self) -> list[GridPoint]:
        return [GridPoint(**{k: v for k, v in g.items() if k != "holdout"}) for g in self.meta["grid"]]

    @classmethod
    def load(cls, directory: str | Path) -> Job:
        d = Path(directory)
        path = d / "job.json"
        if not path.exists():
            raise ConfigError(str(d), "not a profiling job directory (no job.json; run `agentsim calibrate profile` first)")
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}", f"malformed JSON ({e.msg})") from None
        if meta.get("format") != JOB_FORMAT or meta.get("format_version") != JOB_VERSION:
            raise ConfigError(str(path), f"not an {JOB_FORMAT} v{JOB_VERSION} file")
        return cls(d, meta, PointStore(d / "points.jsonl").load())

    # ------------------------------------------------------------------ per-point table
    def clock(self, clock: str | None = None) -> str:
        clock = clock or default_clock(self.meta)
        if clock not in CLOCKS:
            raise ConfigError("--clock", f"unknown clock {clock!r} (have {', '.join(CLOCKS)})")
        return clock

    def table(self, clock: str | None = None) -> dict[str, np.ndarray]:
        """One row per measured point: mean features (``(n, 6)``, :data:`~agentsim.calibration.fit.STEP_FEATURES`),
        median step time (on ``clock``, default :func:`default_clock`), kind, held-out flag.

        A measured step's prefill chunk is a whole prompt (``vllm_engine.ShapeDriver.measure``), so
        it is one scheduled sequence that samples; every decode samples (``num_sampled`` = all).
        Samples without ``num_prefill_chunks`` (older jobs) count one prefill sequence if any prefill
        token ran."""
        key = CLOCKS[self.clock(clock)]
        rows = [r for r in self.points if r["samples"]]

        def sample_features(s: dict) -> list[float]:
            n_pre = s.get("num_prefill_chunks", 1 if s["num_prefill_tokens"] > 0 else 0)
            return [*(s[k] for k in FEATURE_KEYS), n_pre, n_pre + s["num_decode_seqs"]]

        feats = np.array([np.mean([sample_features(s) for s in r["samples"]], axis=0) for r in rows], dtype=float)
        times = np.array([np.median([s[key] for s in r["samples"]]) for r in rows], dtype=float)
        return {
            "point_id": np.array([r["point_id"] for r in rows]),
            "kind": np.array([r["kind"] for r in rows]),
            "holdout": np.array([bool(r["holdout"]) for r in rows]),
            "features": feats.reshape(-1, len(STEP_FEATURES)),
            "step_time_s": times,
        }


# --------------------------------------------------------------------------- running a job
def _check_same_job(meta: dict, engine_cfg: dict, options: dict, where: Path) -> None:
    for section, new in (("engine", engine_cfg), ("options", options)):
        old = meta.get(section, {})
        for k, v in new.items():
            if old.get(k) != v:
                flag = "--" + k.replace("_", "-")
                raise ConfigError(flag, f"{v!r} differs from the interrupted job in {where} ({old.get(k)!r}); "
                                        f"rerun with the same options to resume, or use a new --out")


def run_profile_job(engine_cfg: EngineConfig, out_dir: str | Path, options: JobOptions, max_points: int | None = None,
                    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Job:
    """Measure every grid point not yet in ``out_dir`` (creating the job on first run).

    vLLM is imported only here, once the options are validated. ``max_points`` stops after that many new points (the job stays resumable).
    """
    if options.grid not in PROFILING_GRIDS:
        raise ConfigError("--grid", f"unknown grid {options.grid!r} (have {', '.join(PROFILING_GRIDS)})")
    if options.reps < 1:
        raise ConfigError("--reps", f"must be >= 1, got {options.reps}")
    if options.holdout_every < 2:
        raise ConfigError("--holdout-every", f"must be >= 2, got {options.holdout_every}")
    out = Path(out_dir)
    model_dir = Path(engine_cfg.model)
    if not (model_dir / "config.json").exists():
        raise ConfigError("--model", f"{engine_cfg.model}: no config.json (expected a local model directory)")
    out.mkdir(parents=True, exist_ok=True)
    job_path = out / "job.json"
    store = PointStore(out / "points.jsonl")
    cfg_dict = engine_cfg.to_dict()
    meta = None
    if job_path.exists():
        meta = Job.load(out).meta
        _check_same_job(meta, cfg_dict, options.to_dict(), out)
    elif store.path.exists() and store.path.stat().st_size:
        raise ConfigError(str(store.path), "points without a job.json; use a new --out")
    done = {r["point_id"] for r in store.load(repair=True)}
    if meta is not None and all(GridPoint(**{k: v for k, v in g.items() if k != "holdout"}).point_id in done
                                for g in meta["grid"]):
        log(f"{out}: all {len(meta['grid'])} points already measured")
        return Job.load(out)

    from agentsim.calibration.hardware import NVML

    try:
        from agentsim.calibration.vllm_engine import ShapeDriver
    except ImportError as e:
        raise ConfigError("vllm", f"cannot import vLLM ({e}); install it (GPU: pip install vllm; "
                                  f"CPU: pip install 'agentsim[cpu]')") from None

    t0 = time.perf_counter()
    driver = ShapeDriver(engine_cfg)
    info = driver.info
    log(f"engine ready in {time.perf_counter() - t0:.1f} s: vLLM {info.vllm_version} on {info.platform} "
        f"({info.device_name}), {info.kv_capacity_tokens:,} KV tokens in blocks of {info.block_size}")
    nvml = NVML()
    if meta is None:
        limits = GridLimits(
            max_num_batched_tokens=engine_cfg.max_num_batched_tokens, max_num_seqs=engine_cfg.max_num_seqs,
            max_model_len=info.max_model_len,
            # leave room for the decode tokens generated while a point is measured
            kv_capacity_tokens=int(info.kv_capacity_tokens * 0.8),
        )
        grid = build_grid(limits, **PROFILING_GRIDS[options.grid])
        if len(grid) < 8:
            raise ConfigError("--grid", f"only {len(grid)} grid points fit this engine's limits; raise --max-model-len "
                                        f"/ --max-num-batched-tokens / the KV cache")
        mask = holdout_mask(grid, options.holdout_every, options.seed)
        meta = {
            "format": JOB_FORMAT, "format_version": JOB_VERSION,
            "engine": cfg_dict, "options": options.to_dict(), "engine_info": info.to_dict(),
            "nvml": nvml.describe(), "limits": asdict(limits),
            "grid": [{**p.to_dict(), "holdout": h} for p, h in zip(grid, mask)],
            "command": _command_line(),
            "created_at": _now(),
        }
        _write_json_atomic(job_path, meta)
    else:
        log(f"resuming {out}: {len(done)} of {len(meta['grid'])} points already measured")
    driver.warm_up()
    todo = [g for g in meta["grid"] if GridPoint(**{k: v for k, v in g.items() if k != "holdout"}).point_id not in done]
    for n, g in enumerate(todo):
        if max_points is not None and n >= max_points:
            log(f"stopping after {max_points} new points ({len(todo) - n} left; rerun to continue)")
            break
        p = GridPoint(**{k: v for k, v in g.items() if k != "holdout"})
        t = time.perf_counter()
        try:
            samples = driver.measure(p, options.reps)
        except KeyboardInterrupt:
            log(f"interrupted: {len(done) + n} of {len(meta['grid'])} points are in {store.path}; "
                f"rerun the same command to resume")
            raise SystemExit(130) from None
        rec = {
            "point_id": p.point_id, "kind": p.kind, "holdout": bool(g["holdout"]), "intended": p.to_dict(),
            "samples": samples, "shape_ok": all(s["shape_ok"] for s in samples),
            "nvml": nvml.sample(), "measured_at": _now(),
        }
        store.append(rec)
        med = np.median([s["step_time_s"] for s in samples])
        med_cpu = np.median([s["step_cpu_time_s"] for s in samples])
        log(f"[{len(done) + n + 1}/{len(meta['grid'])}] {p.point_id}: median step {med * 1e3:.2f} ms wall, "
            f"{med_cpu * 1e3:.2f} ms cpu "
            f"({len(samples)} steps, {time.perf_counter() - t:.1f} s)" + ("" if rec["shape_ok"] else "  [shape differs]"))
    return Job.load(out)


# --------------------------------------------------------------------------- fit and check
def _device_spec(meta: dict) -> tuple[GPUSpec, Links]:
    info = meta["engine_info"]
    nv = meta.get("nvml", {})
    name = nv["devices"][0]["name"] if nv.get("available") and nv.get("devices") else info["device_name"]
    kind = gpu_kind_from_name(name) if info["platform"] != "cpu" else None
    if kind:
        return GPUS[kind].spec, GPUS[kind].links
    prefix = "cpu-" if info["platform"] == "cpu" else ""
    mem = 0.0
    if info["platform"] == "cpu":
        try:
            mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        except (ValueError, OSError):
            mem = 0.0
    elif nv.get("available"):
        mem = nv["devices"][0]["memory_total_bytes"] / 2**30
    # Unknown device: bandwidth and FLOP rate 0 = not stated (``show`` prints no rooflines).
    return GPUSpec(prefix + slug(name)[:40], round(mem, 1), 0.0, 0.0), Links(0.0, 0.0, 0.0)


@dataclass
class FitResult:
    profile: Profile
    train: ErrorStats
    held_out: ErrorStats


def fit_job(job: Job, model_name: str | None = None, clock: str | None = None) -> FitResult:
    """Fit the step-time model (:func:`~agentsim.calibration.fit.fit_step_time`: every term, knee by
    search) on the job's non-held-out points and build a profile."""
    clock = job.clock(clock)
    t = job.table(clock)
    train = ~t["holdout"]
    if train.sum() < 8:
        raise ConfigError(str(job.directory), f"only {int(train.sum())} fitted points measured; run the job further")
    coeffs = fit_step_time(t["features"][train], t["step_time_s"][train])
    pred = predict_many(coeffs, t["features"])
    tr = error_stats(pred[train], t["step_time_s"][train])
    ho = error_stats(pred[~train], t["step_time_s"][~train])
    meta = job.meta
    info = meta["engine_info"]
    name = model_name or slug(Path(meta["engine"]["model"]).name)
    dims = model_dims_from_hf_config(info["hf_config"], name, info["max_model_len"])
    gpu, links = _device_spec(meta)
    kinds = t["kind"]
    fit_error = {
        "what": "relative error of the fitted step time against the engine's measured step time "
                "(per grid point: median over its repetitions)",
        "clock": clock,
        "train": tr.to_dict(), "held_out": ho.to_dict(),
        "held_out_by_kind": {k: error_stats(pred[~train & (kinds == k)], t["step_time_s"][~train & (kinds == k)]).to_dict()
                             for k in ("decode", "prefill", "mixed") if (~train & (kinds == k)).any()},
    }
    shape_bad = sum(1 for r in job.points if not r.get("shape_ok", True))
    provenance = {
        "kind": "measured-engine",
        "measured": f"whole vLLM engine steps of {meta['engine']['model']} at TP {meta['engine']['tp']} "
                    f"on {info['platform']} ({info['device_name']}), vLLM {info['vllm_version']}, "
                    f"{info['dtype']}, {'eager' if info['enforce_eager'] else 'CUDA graphs'}",
        "job_dir": str(job.directory),
        "clock": clock,
        "grid": meta["options"]["grid"], "num_points": len(t["step_time_s"]),
        "num_points_shape_differs": shape_bad,
        "nvml": meta.get("nvml"),
        "command": "agentsim calibrate fit",
        "job_created_at": meta.get("created_at"),
        "created_at": _now(),
    }
    prof = Profile(
        name=f"{gpu.name}_{name}_tp{meta['engine']['tp']}", gpu=gpu, model=dims, tp=int(meta["engine"]["tp"]),
        dtype_bytes=int(info["dtype_bytes"]), coefficients=coeffs,
        kv_bytes_per_token=dims.kv_bytes_per_token(int(info["dtype_bytes"])),
        kv_capacity_tokens=int(info["kv_capacity_tokens"]),
        gpu_memory_utilization=min(1.0, float(info["gpu_memory_utilization"])), links=links,
        provenance=provenance, fit_error=fit_error, kv_block_size=int(info["block_size"]),
    )
    return FitResult(prof, tr, ho)


def write_raw_points(job: Job, path: Path) -> None:
    """Every measured step (one row per sample) as Parquet, written atomically."""
    import pandas as pd

    rows = []
    for r in job.points:
        for i, s in enumerate(r["samples"]):
            rows.append({"point_id": r["point_id"], "kind": r["kind"], "holdout": bool(r["holdout"]), "rep": i,
                         **{k: s.get(k) for k in (*FEATURE_KEYS, "step_time_s", "step_cpu_time_s",
                                                  "engine_step_time_s", "shape_ok")}})
    tmp = path.with_name(path.name + ".tmp")
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    tmp.replace(path)


def check_profile(profile: Profile, job: Job, clock: str | None = None) -> dict[str, ErrorStats]:
    """Errors of ``profile`` on the job's held-out points, per kind, and on the fitted ones."""
    t = job.table(clock)
    pred = predict_many(profile.coefficients, t["features"])
    y, ho, kinds = t["step_time_s"], t["holdout"], t["kind"]
    out = {"held_out": error_stats(pred[ho], y[ho])}
    for k in ("decode", "prefill", "mixed"):
        m = ho & (kinds == k)
        if m.any():
            out[f"held_out {k}"] = error_stats(pred[m], y[m])
    out["fitted points"] = error_stats(pred[~ho], y[~ho])
    return out

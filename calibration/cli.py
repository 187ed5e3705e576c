"""``agentsim calibrate show | list | profile | fit | check | predict``."""

from __future__ import annotations

import contextlib
import math

import sys
from pathlib import Path
from typing import Optional

import typer

from agentsim.errors import ConfigError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _console():
    from rich.console import Console

    return Console(width=max(140, Console().width))


def load_named_profile(spec: str, where: str = "PROFILE"):
    """A shipped profile by name (``a100-80gb_llama-3-8b_tp1``) or a profile file by path."""
    from agentsim.calibration.profile import load_profile, shipped_profiles

    shipped = shipped_profiles()
    if spec in shipped:
        return load_profile(shipped[spec])
    p = Path(spec)
    if p.exists() or p.suffix == ".json":
        return load_profile(p)
    raise ConfigError(where, f"unknown profile {spec!r}: not a file and not a shipped name ({', '.join(shipped)})")


@app.command("list")
def list_cmd() -> None:
    """List the shipped profiles with their provenance and fit error."""
    from rich.table import Table

    from agentsim.calibration.profile import load_profile, shipped_profiles

    t = Table(title="shipped profiles")
    for col in ("name", "provenance", "KV tokens", "fit median / p90"):
        t.add_column(col)
    for name, path in shipped_profiles().items():
        p = load_profile(path)
        fe = (p.fit_error or {}).get("grid") or (p.fit_error or {}).get("held_out")
        err = f"{fe['median_rel_error']:.1%} / {fe['p90_rel_error']:.1%}" if fe else "-"
        kind = p.provenance.get("kind", "?") + (f" from {p.provenance['derived_from']}" if p.provenance.get("derived_from") else "")
        t.add_row(name, kind, f"{p.kv_capacity_tokens:,}", err)
    _console().print(t)


@app.command()
def show(
    profile: str = typer.Argument(None, help="shipped profile name or path to a profile JSON (or give --gpu/--model/--tp)"),
    gpu: str = typer.Option(None, "--gpu", help="GPU kind (a100-80gb, h100-80gb, h200, b200, l40s, ...): with --model/--tp, "
                                                "the profile a run would use (shipped, else derived)"),
    model: str = typer.Option(None, "--model", help="shipped model name or a Hugging Face config.json path"),
    tp: int = typer.Option(1, "--tp", min=1, help="tensor-parallel degree"),
    save: Path = typer.Option(None, "--save", help="also write the profile as JSON (new file only), e.g. to fit it with calibrate bench"),
) -> None:
    """Predicted step times (decode batch 1/32/128 at 1k/8k context, prefill 512/2k/8k) beside the HBM-bandwidth and FLOP rooflines, each step-time term's share for a few batches, and the KV capacity."""
    from agentsim.calibration.profile import resolve_profile
    from agentsim.calibration.report import render_show

    if profile is not None and (gpu or model):
        raise ConfigError("PROFILE", "give a profile or --gpu/--model/--tp, not both")
    if profile is not None:
        prof = load_named_profile(profile)
    elif gpu and model:
        prof = resolve_profile(None, gpu, model, tp)  # shipped for (gpu, model, tp), else derived
    else:
        raise ConfigError("PROFILE", "missing: give a profile name/path, or --gpu and --model (and --tp)")
    if save is not None and save.exists():
        raise ConfigError(str(save), "exists: agentsim never overwrites a file with --save (choose a new path)")
    render_show(prof, _console())
    if save is not None:
        prof.save(save)
        print(f"wrote {save} ({prof.name}; {prof.provenance.get('kind', '?')})")


@app.command()
def predict(
    profile: str = typer.Argument(..., help="shipped profile name or path to a profile JSON"),
    steps: Path = typer.Argument(..., help="CSV with columns prefill_chunks ('512@0;16@4096': chunk@cached, "
                                           "';'-separated, empty for none) and decode_ctx (context length per "
                                           "decoding sequence, ';'-separated, empty for none); optional num_sampled"),
    out: Path = typer.Option(..., "-o", "--out", help="CSV to write: the input columns plus predicted_ms"),
    force: bool = typer.Option(False, "--force", help="overwrite OUT if it exists"),
) -> None:
    """Predicted step time (ms) of each row of STEPS.csv under PROFILE, for comparing with steps you measured."""
    from agentsim.calibration.predict import predict_csv

    prof = load_named_profile(profile)
    n = predict_csv(prof, steps, out, force)
    print(f"wrote {out} ({n} steps predicted with {prof.name})")


@app.command("profile")
def profile_cmd(
    model: str = typer.Option(..., "--model", help="local model directory (config.json; weights unless --load-format dummy)"),
    tp: int = typer.Option(1, "--tp", help="tensor-parallel degree"),
    out: Path = typer.Option(..., "--out", help="job directory (created; rerun the same command to resume)"),
    grid: str = typer.Option("default", "--grid", help="shape grid: 'default' (GPU serving shapes) or 'small' (CPU / CI)"),
    reps: int = typer.Option(3, "--reps", help="measured steps per grid point"),
    holdout_every: int = typer.Option(4, "--holdout-every", help="hold out about one point in N of each kind for `check`"),
    seed: int = typer.Option(0, "--seed", help="seed for prompts and the held-out choice"),
    dtype: str = typer.Option("auto", "--dtype", help="vLLM dtype (auto, bfloat16, float16, float32)"),
    load_format: str = typer.Option("auto", "--load-format", help="vLLM load format ('dummy' = random weights)"),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="KV block size (default 16 on GPU, 32 on CPU)"),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="default: the model's"),
    max_num_batched_tokens: int = typer.Option(8192, "--max-num-batched-tokens"),
    max_num_seqs: int = typer.Option(256, "--max-num-seqs"),
    gpu_memory_utilization: float = typer.Option(0.9, "--gpu-memory-utilization"),
    kv_cache_gib: Optional[float] = typer.Option(None, "--kv-cache-gib", help="KV cache size (default 1 GiB on CPU; on GPU from --gpu-memory-utilization)"),
    enforce_eager: Optional[bool] = typer.Option(None, "--enforce-eager/--cuda-graphs", help="default: eager on CPU, CUDA graphs on GPU"),
    max_points: Optional[int] = typer.Option(None, "--max-points", help="stop after this many new points (resumable)"),
) -> None:
    """Measure a grid of controlled batch shapes on an in-process vLLM engine (appended to OUT/points.jsonl as measured; rerun to resume)."""
    from agentsim.calibration.job import EngineConfig, JobOptions, run_profile_job

    for flag, v, lo in (("--tp", tp, 1), ("--max-num-batched-tokens", max_num_batched_tokens, 16),
                        ("--max-num-seqs", max_num_seqs, 1)):
        if v < lo:
            raise ConfigError(flag, f"must be >= {lo}, got {v}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError("--gpu-memory-utilization", f"must be in (0, 1], got {gpu_memory_utilization}")
    if block_size is not None and block_size < 1:
        raise ConfigError("--block-size", f"must be >= 1, got {block_size}")
    if max_points is not None and max_points < 1:
        raise ConfigError("--max-points", f"must be >= 1, got {max_points}")
    if not (Path(model) / "config.json").exists():
        raise ConfigError("--model", f"{model}: no config.json (expected a local model directory)")
    from agentsim.outputs import check_resumable_dir

    check_resumable_dir(out, "job.json")  # a directory holding other files is refused before vLLM starts
    cfg = EngineConfig(
        model=str(Path(model).resolve()), tp=tp, dtype=dtype, load_format=load_format, block_size=block_size,
        max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
        gpu_memory_utilization=gpu_memory_utilization, kv_cache_gib=kv_cache_gib, enforce_eager=enforce_eager,
        seed=seed,
    )
    job = run_profile_job(cfg, out, JobOptions(grid=grid, reps=reps, holdout_every=holdout_every, seed=seed),
                          max_points=max_points)
    print(f"{len(job.points)} of {len(job.meta['grid'])} points measured in {out}", file=sys.stderr)


@app.command()
def fit(
    job_dir: Path = typer.Argument(..., help="profiling job directory"),
    out: Path = typer.Option(..., "--out", help="profile JSON to write (raw points go beside it as .points.parquet; "
                                                "refused if it exists, unless --force)"),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="model name in the profile (default: the model directory's name)"),
    clock: Optional[str] = typer.Option(None, "--clock", help="step time to fit: 'wall' or 'cpu' (default: cpu for a 1-thread CPU engine, else wall)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing --out profile (and its raw points)"),
) -> None:
    """Fit non-negative step-time coefficients on the job's points (held-out points excluded)."""
    from agentsim.calibration.job import fit_job, write_raw_points

    if model_name is not None and (not model_name or "_" in model_name or "/" in model_name):
        raise ConfigError("--model-name", f"{model_name!r}: must be non-empty without '_' or '/' "
                                          f"(profile names are <gpu>_<model>_tp<N>)")
    from agentsim.outputs import check_output_file, is_agentsim_profile, is_parquet

    # before fitting: never overwrite a user's file, nor a profile (perhaps tuned by hand) without --force
    raw = out.with_name(out.stem + ".points.parquet")
    for path, option in ((out, "--out"), (raw, "--out (raw points)")):
        if path.exists() and not path.is_dir() and not force:
            raise ConfigError(f"{option} {path}", "exists; pass --force to overwrite it")
    check_output_file(out, "--out", is_agentsim_profile)
    check_output_file(raw, "--out (raw points)", is_parquet)
    job = _load_job(job_dir)
    if len(job.points) < len(job.meta["grid"]):
        print(f"note: fitting {len(job.points)} of {len(job.meta['grid'])} grid points (the job is incomplete; "
              f"rerun `agentsim calibrate profile` with the same options to finish it)", file=sys.stderr)
    with _job_errors(job_dir):
        res = fit_job(job, model_name, clock)
    prof = res.profile
    out.parent.mkdir(parents=True, exist_ok=True)
    write_raw_points(job, raw)
    prof.provenance["raw_points"] = raw.name
    prof.save(out)
    from agentsim.calibration.report import describe_coefficients

    print(f"wrote {out} ({prof.name}, fitted to {prof.provenance['clock']} time)")
    print(f"coefficients: step time = {describe_coefficients(prof.coefficients)}")
    for label, e in (("fitted", res.train), ("held-out", res.held_out)):
        print(f"{label} points: {e.num_points}, median relative error {e.median:.1%}, p90 {e.p90:.1%}")


@contextlib.contextmanager
def _job_errors(job_dir: Path):
    """A profiling job whose files parse but do not hold what a job holds (a point without ``kind``,
    a sample that is not a table, a number given as text, job.json not an object): one line naming
    the job directory, exit 2, instead of the fitter's traceback."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ConfigError(str(job_dir), f"not a usable profiling job: its job.json or points.jsonl do not hold what "
                                        f"`agentsim calibrate profile` writes ({type(e).__name__}: {e})"[:400]) from None


def _load_job(job_dir: Path):
    """:meth:`Job.load` for fit and check: a damaged job is one line; a job with no point yet too."""
    from agentsim.calibration.job import Job

    with _job_errors(job_dir):
        job = Job.load(job_dir)
        job.meta["grid"]   # noqa: B018 - the grid the points were measured on
    if not job.points:
        raise ConfigError(str(job_dir), "holds no measured point yet (interrupted before its first one; rerun "
                                        "`agentsim calibrate profile` with the same options to measure them)")
    return job


@app.command()
def check(
    profile: str = typer.Argument(..., help="profile name or path"),
    job_dir: Path = typer.Argument(..., help="profiling job directory with measured points"),
    max_median_error: Optional[float] = typer.Option(None, "--max-median-error", help="exit 1 if the held-out median relative error exceeds this (e.g. 0.15)"),
    clock: Optional[str] = typer.Option(None, "--clock", help="measured time to compare with: 'wall' or 'cpu' (default: the one the profile was fitted to, else the job's)"),
) -> None:
    """Median and p90 relative error of PROFILE's predictions on the job's held-out grid points."""
    from rich.table import Table

    from agentsim.calibration.job import Job, check_profile

    from agentsim.calibration.job import CLOCKS

    if clock is not None and clock not in CLOCKS:
        raise ConfigError("--clock", f"unknown clock {clock!r} (have {', '.join(CLOCKS)})")
    if max_median_error is not None and not (math.isfinite(max_median_error) and max_median_error >= 0):
        raise ConfigError("--max-median-error", f"must be a finite number >= 0, got {max_median_error}")
    prof = load_named_profile(profile)
    job = _load_job(job_dir)
    clock = clock or (prof.provenance.get("clock") if isinstance(prof.provenance, dict) else None)
    clock = job.clock(clock if clock in CLOCKS else None)
    with _job_errors(job_dir):
        stats = check_profile(prof, job, clock)
    t = Table(title=f"{prof.name} vs measured steps ({clock} time) in {job_dir}")
    for col in ("points", "n", "median rel. error", "p90 rel. error", "max rel. error", "mean signed"):
        t.add_column(col, justify="left" if col == "points" else "right")
    for label, e in stats.items():
        t.add_row(label, str(e.num_points), f"{e.median:.1%}", f"{e.p90:.1%}", f"{e.max:.1%}", f"{e.mean_signed:+.1%}")
    _console().print(t)
    ho = stats["held_out"]
    print(f"held-out median relative error {ho.median:.1%}, p90 {ho.p90:.1%} over {ho.num_points} points")
    if ho.num_points == 0:
        raise ConfigError(str(job_dir), "no held-out points measured yet")
    if max_median_error is not None and not ho.median <= max_median_error:
        print(f"FAIL: median {ho.median:.1%} > {max_median_error:.1%}", file=sys.stderr)
        raise typer.Exit(1)


@app.command("bench")
def bench_cmd(
    bench: list[Path] = typer.Argument(..., help="`vllm bench serve --save-result --save-detailed` result files to fit to"),
    out: Path = typer.Option(..., "--out", "-o", help="profile JSON to write (refused if it exists, unless --force)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML run config: the measured server's engine settings and starting profile"),
    profile: Optional[str] = typer.Option(None, "--profile", help="starting profile name or path (overrides the config's)"),
    holdout: Optional[list[Path]] = typer.Option(None, "--holdout", help="files to report the error on instead of leave-one-file-out (repeatable)"),
    all_terms: bool = typer.Option(False, "--all-terms", help="fit every step-time coefficient, not only the host ones"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing --out file"),
    max_evaluations: int = typer.Option(300, "--max-evaluations", help="replays of the training set per fit (optimiser budget)"),
) -> None:
    """Fit the host (per step, per sequence, per sampled token) and frontend terms of a profile to measured bench runs; report cross-validated error."""
    from agentsim.bench import load_bench
    from agentsim.calibration.bench import OBJECTIVE, calibrate_bench, summarize_errors, with_provenance
    from agentsim.calibration.profile import resolve_profile
    from agentsim.validate import bench_config

    if out.exists() and not force:
        raise ConfigError(f"--out {out}", "exists; pass --force to overwrite it")
    if out.exists() and out.is_dir():
        raise ConfigError(f"--out {out}", "is a directory, not a profile file")
    if max_evaluations < 1:
        raise ConfigError("--max-evaluations", f"must be >= 1, got {max_evaluations}")
    runs = [load_bench(p) for p in bench]
    held = [load_bench(p) for p in (holdout or [])]
    cfg = bench_config(config, profile)
    cl = cfg.cluster
    start = resolve_profile(cl.profile, cl.gpu, cl.model, cl.tp)
    from agentsim.validate import check_fits

    for run in [*runs, *held]:
        check_fits(run, cfg, start)
    fit = calibrate_bench(start, runs, cfg, held, all_terms=all_terms, max_evaluations=max_evaluations)
    prof = with_provenance(fit, [str(p) for p in bench], [str(p) for p in (holdout or [])],
                           str(config) if config else None, cfg, start)
    out.parent.mkdir(parents=True, exist_ok=True)
    prof.save(out)
    print(f"wrote {out} ({prof.name}; {fit.num_evaluations} replays of the training set)")
    for t, v in fit.terms.items():
        print(f"  {t:<22} {fit.start_terms[t] * 1e6:12.3f} us -> {v * 1e6:12.3f} us")
    for label, errs, files in (("train", fit.train_errors, [str(p) for p in bench]),
                               ("cross-validated", fit.cv_errors, fit.cv_files)):
        if not errs:
            continue
        s = summarize_errors(errs)
        print(f"{label} error (mean |rel. error|): " + ", ".join(
            f"{m} {s[f'mean_abs_{m}']:.1%}" for m in OBJECTIVE if f"mean_abs_{m}" in s) + f"; max {s['max_abs']:.1%}")
        for f, e in zip(files, errs):
            print(f"  {f}: " + ", ".join(f"{m} {v:+.1%}" for m, v in e.items()))
        if label != "train" and not held and (len(runs) - 1) * len(OBJECTIVE) < len(fit.terms):
            print(f"  note: each leave-one-out fit had {(len(runs) - 1) * len(OBJECTIVE)} measured errors for "
                  f"{len(fit.terms)} terms; fit on more files (one run per load) for a meaningful estimate")

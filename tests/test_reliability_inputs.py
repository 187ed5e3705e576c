"""Issue 12, part B: every input checked before use, no silent data loss in replays, round trips.

Each fault of the issue is replayed with its input and the right value asserted; property tests
walk every declared field (config sections, generator parameters) and feed it values outside its
declared range.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentsim.config import (
    ClusterSpec, EngineLimits, MixEntry, Param, RunConfig, SimOptions, WorkloadSpec, config_from_dict, param_of,
)
from agentsim.errors import ConfigError
from agentsim.traces.generators import generator_params, generators, make_generator

DATA = Path(__file__).resolve().parents[1] / "traces" / "data"
MOONCAKE = DATA / "mooncake" / "conversation_first600s.jsonl.gz"
AZURE = DATA / "azure-llm-2023" / "conv_first600s.csv.gz"
TRACELAB_ROUNDS = DATA / "tracelab" / "sanitized_round_trace.jsonl"

# section path -> dataclass, for walking every declared config field
SECTIONS = {"": RunConfig, "cluster": ClusterSpec, "cluster.engine": EngineLimits, "workload": WorkloadSpec,
            "sim": SimOptions}


def agentsim(*args, cwd=None, timeout=600):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "agentsim", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def nested(dotted: str, value) -> dict:
    """``{"a": {"b": value}}`` for ``"a.b"``."""
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def numeric_fields():
    """(dotted name, Param) of every int/float field of every config section."""
    for prefix, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            spec = param_of(f)
            if spec is not None and spec.type in (int, float):
                yield (f"{prefix}.{f.name}" if prefix else f.name), spec


def outside(spec: Param) -> list:
    """Values the declared range refuses: 0 and negatives below a positive bound, NaN and inf."""
    bad = []
    lo = spec.ge if spec.ge is not None else spec.gt
    if lo is not None:
        for v in (0, -1, -1000):
            if v < lo or (spec.gt is not None and v <= spec.gt):
                bad.append(v if spec.type is int else float(v))
    if spec.type is float:
        bad += [math.nan, math.inf, -math.inf]
    else:
        bad += [1.5, True, "3"]   # not integers
    return bad


def test_every_numeric_config_field_declares_a_range():
    names = [n for n, _ in numeric_fields()]
    assert {"duration", "sim.sample_interval", "workload.rate", "cluster.engine.block_size",
            "cluster.engine.api_server_count", "slo_ttft"} <= set(names)
    for name, spec in numeric_fields():
        assert spec.ge is not None or spec.gt is not None, f"{name} has no lower bound"
        assert spec.describe()  # help text comes from the same declaration


@pytest.mark.parametrize("name,spec", list(numeric_fields()), ids=[n for n, _ in numeric_fields()])
def test_numeric_config_field_rejects_values_outside_its_range(name, spec):
    for v in outside(spec):
        with pytest.raises(ConfigError) as e:
            config_from_dict(nested(name, v))
        assert e.value.where == name, (name, v, str(e.value))
    # the boundary itself is accepted where the range is closed (cross-field rules allowing)
    if spec.ge is not None and name not in ("cluster.tp",):
        cfg = config_from_dict(nested(name, spec.ge if spec.type is int else float(spec.ge)))
        node = cfg
        for part in name.split("."):
            node = getattr(node, part)
        assert node == spec.ge


@given(st.floats(allow_nan=True, allow_infinity=True))
@settings(max_examples=200, deadline=None)
def test_float_fields_accept_exactly_their_range(x):
    for name in ("sim.sample_interval", "duration", "workload.rate", "workload.time_scale"):
        ok = math.isfinite(x) and x > 0
        if name == "sim.sample_interval":   # the finest period: a finer one hangs or fills memory
            from agentsim.config import MIN_SAMPLE_INTERVAL

            ok = math.isfinite(x) and x >= MIN_SAMPLE_INTERVAL
        try:
            config_from_dict(nested(name, x))
            accepted = True
        except ConfigError as e:
            accepted = False
            assert e.where == name
        assert accepted == ok, (name, x)


@pytest.mark.parametrize("toml,field", [
    ("[sim]\nsample_interval = 0\n", "sim.sample_interval"),            # the ZeroDivisionError
    ("duration = nan\n", "duration"),
    ("[workload]\narrival = \"poisson\"\nrate = inf\n", "workload.rate"),
    ("[cluster.engine]\nblock_size = -16\n", "cluster.engine.block_size"),
    ("slo_ttft = 0.0\n", "slo_ttft"),
    ('[workload]\ngenerator = "chat"\n[workload.params]\nthink_time_median = "abc"\n',
     "workload.params.think_time_median"),                               # the TypeError
    ('[workload]\ngenerator = "chat"\n[workload.params]\nthink_time_median = nan\n',
     "workload.params.think_time_median"),
    ('[[workload.mix]]\ngenerator = "react"\nweight = -1\n', "workload.mix[0].weight"),
    ('[workload]\ntrace_format = "csv"\n', "workload.trace_format"),
])
def test_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, toml, field):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    out = tmp_path / "run"
    p = agentsim("simulate", "-c", cfg, "-o", out, "-q")
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}: must be"), p.stderr
    assert "Traceback" not in p.stderr
    assert not out.exists() and sorted(x.name for x in tmp_path.iterdir()) == ["bad.toml"]


def test_trace_generate_bad_param_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "chat.parquet"
    p = agentsim("trace", "generate", "chat", "-n", "3", "-p", "think_time_median=abc", "-o", out)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        "error: workload.params.think_time_median: must be a number >= 0, got 'abc'"]
    assert list(tmp_path.iterdir()) == []
    p = agentsim("trace", "generate", "chat", "-n", "3", "--rate", "inf", "-o", out)
    assert p.returncode == 2 and p.stderr.startswith("error: --rate: must be a finite number"), p.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- generator parameters
def generator_fields():
    for name, cls in generators().items():
        if not cls.__module__.startswith("agentsim."):
            continue
        for f in dataclasses.fields(cls):
            spec = param_of(f)
            if spec is not None:
                yield name, f.name, spec


def test_every_generator_parameter_is_declared_with_help():
    """Every parameter of every shipped generator (tests register their own, undeclared ones in the
    same registry: the order tests run in must not matter)."""
    for name, cls in generators().items():
        if not cls.__module__.startswith("agentsim."):
            continue
        undeclared = [f.name for f in dataclasses.fields(cls) if param_of(f) is None]
        assert not undeclared, (name, undeclared)
        helps = generator_params(name)
        assert set(helps) == {f.name for f in dataclasses.fields(cls)}
        assert all(";" in h for h in helps.values())  # "help; range (unit)"


@pytest.mark.parametrize("gen,field,spec", [g for g in generator_fields() if g[2].type in (int, float)],
                         ids=[f"{g[0]}.{g[1]}" for g in generator_fields() if g[2].type in (int, float)])
def test_numeric_generator_parameter_rejects_values_outside_its_range(gen, field, spec):
    for v in outside(spec) + ["abc"]:
        with pytest.raises(ConfigError) as e:
            make_generator(gen, {field: v})
        assert e.value.where == f"workload.params.{field}", (gen, field, v, str(e.value))


def test_choice_parameters_list_exactly_what_they_accept():
    for gen, field, spec in generator_fields():
        if not spec.choices:
            continue
        with pytest.raises(ConfigError) as e:
            make_generator(gen, {field: "bogus"})
        listed = e.value.message.split("one of ", 1)[1].split(", got")[0].split(", ")
        assert tuple(listed) == spec.accepted()
        for v in listed:   # every listed value is accepted
            make_generator(gen, {field: v})


# --------------------------------------------------------------------------- policy error texts
def test_evict_source_error_lists_steps():
    """The issue: ``source = "stepz"`` listed ``oracle, ewma or none`` although ``steps`` is valid."""
    from agentsim.policies.registry import make_bundle

    spec = {"name": "vllm", "evict": "invocation-distance", "params": {"evict": {"source": "stepz"}}}
    with pytest.raises(ConfigError) as e:
        make_bundle(spec)
    assert e.value.message == "invocation-distance: source must be one of steps, oracle, ewma, none, got 'stepz'"


@pytest.mark.parametrize("decision,name,param", [
    ("evict", "invocation-distance", "source"), ("route", "least-loaded", "metric"),
    ("route", "autellix-lb", "metric"), ("route", "prefix-affinity", "match"), ("evict", "continuum", "ttl"),
    ("shape", "adaptorch", "depth_test"), ("shape", "fixed", "topology"),
])
def test_policy_choice_errors_list_exactly_the_accepted_values(decision, name, param):
    from agentsim.policies.registry import make_component

    with pytest.raises(ConfigError) as e:
        make_component(decision, name, {param: "bogus"})
    listed = e.value.message.split("must be one of ", 1)[1].split(", got")[0].split(", ")
    assert len(listed) >= 2
    for v in listed:
        make_component(decision, name, {param: v})


# --------------------------------------------------------------------------- replays lose nothing silently
def _mooncake_slice(tmp_path, n=40, start_ms=3_600_000) -> Path:
    """The sample's first ``n`` requests, moved to start at ``start_ms`` (a slice from later in a file)."""
    rows = []
    with gzip.open(MOONCAKE, "rt") as f:
        for line, _ in zip(f, range(n)):
            r = json.loads(line)
            r["timestamp"] += start_ms
            rows.append(json.dumps(r))
    p = tmp_path / "late.jsonl"
    p.write_text("\n".join(rows) + "\n")
    return p


def _run(cfg: dict):
    from agentsim.sim.runner import run

    return run(config_from_dict(cfg))


def test_mooncake_slice_starting_late_replays_every_request(tmp_path):
    """The issue: timestamps from 3,600,000 ms with duration 600 simulated 0 calls, exit 0."""
    path = _mooncake_slice(tmp_path)
    res = _run({"duration": 600.0, "cluster": {"gpus_per_node": 1, "engine": {"max_model_len": 131072}},
                "workload": {"arrival": "trace", "trace": str(path)}})
    assert res.summary["num_calls"] == 40 and len(res.programs) == 40
    assert res.programs["arrival_at"].min() == 0.0
    assert res.stats["num_programs_cut"] == 0 and res.stats["num_trace_programs"] == 40


def test_azure_time_scale_2_replays_the_whole_trace_by_default():
    """The issue: ``--trace azure --time-scale 2`` replayed 1,436 of 2,867 programs."""
    res = _run({"workload": {"arrival": "trace", "trace": str(AZURE), "time_scale": 2.0}})
    assert len(res.programs) == 2867 and (res.programs["status"] == "finished").all()
    assert res.stats["num_programs_cut"] == 0
    assert res.programs["arrival_at"].max() > 1190   # the scaled trace spans ~1,200 s


def test_tracelab_sample_replays_both_sessions():
    """The issue: the TraceLab sample replayed 1 of 2 sessions (the second starts 72 days later)."""
    res = _run({"cluster": {"gpus_per_node": 1, "engine": {"max_model_len": 131072}},
                "sim": {"sample_interval": 86400.0},
                "workload": {"arrival": "trace", "trace": str(TRACELAB_ROUNDS)}})
    assert len(res.programs) == 2 and (res.programs["status"] == "finished").all()
    assert res.summary["num_calls"] == 19


def test_bounded_replay_says_how_many_programs_were_cut(tmp_path):
    out = tmp_path / "run"
    p = agentsim("simulate", "--trace", AZURE, "--time-scale", "2", "--duration", "600", "-q", "-o", out)
    assert p.returncode == 0, p.stderr
    m = json.loads((out / "manifest.json").read_text())
    kept = m["stats"]["num_trace_programs"] - m["stats"]["num_programs_cut"]
    assert m["stats"]["num_trace_programs"] == 2867 and 1400 < kept < 1500
    assert (f"note: replayed {kept:,} of 2,867 trace programs; {2867 - kept:,} arrive at or after duration 600 s"
            in p.stderr)


def test_cut_note_splits_limit_and_duration():
    from agentsim.traces.source import cut_note

    cfg = config_from_dict({"duration": 50.0, "workload": {"arrival": "trace", "trace": "t.jsonl", "limit": 30}})
    assert cut_note(cfg, 100, 0) is None
    assert cut_note(cfg, 100, 75) == ("note: replayed 25 of 100 trace programs; 5 arrive at or after duration 50 s "
                                      "(leave duration unset to replay the whole trace); 70 beyond workload.limit 30")


def test_duration_given_only_when_set():
    assert not config_from_dict({}).duration_given
    assert config_from_dict({"duration": 600.0}).duration_given
    assert RunConfig().duration_given   # built in Python: duration bounds arrivals as before
    # the flag is part of the config (manifests and sweep cell keys tell the two replays apart)
    for data in ({}, {"duration": 600.0}, {"workload": {"mix": [{"generator": "chat", "weight": 2}]}}):
        cfg = config_from_dict(data)
        assert config_from_dict(cfg.to_dict()) == cfg
    assert config_from_dict({}).to_dict() != config_from_dict({"duration": 600.0}).to_dict()


def test_run_in_which_nothing_arrives_is_refused(tmp_path):
    out = tmp_path / "run"
    p = agentsim("simulate", "--rate", "0.001", "--duration", "1", "-q", "-o", out)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: duration: no program arrives within 1 s"), p.stderr
    assert not out.exists()


def test_bound_trace_refuses_an_empty_window(tmp_path):
    from agentsim.traces.source import ProgramSource

    path = _mooncake_slice(tmp_path, n=3)
    src = ProgramSource(WorkloadSpec(arrival="trace", trace=str(path)), 0)
    assert src.num_in_trace == 3 and src.bound_trace(None) == 0
    assert [p.arrival_at for p in src.trace_arrivals()] == [0.0, 0.0, 0.0]  # one 3 s bucket
    src = ProgramSource(WorkloadSpec(arrival="trace", trace=str(path), limit=2), 0)
    assert src.num_cut == 1


# --------------------------------------------------------------------------- round trips
AZURE_MIXED = ("TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
               "2023-11-16 18:15:46.6805900,374,44\r\n"
               "2023-11-16 18:15:50.002,396,109\r\n"
               "2023-11-16 18:15:51,879,59\r\n"
               "2023-11-16 18:15:52.1,91,16\r\n")


def test_azure_export_keeps_each_timestamp_as_written(tmp_path):
    """The issue: later rows with ``.002`` or no fraction came back as ``.0020000`` / ``.0000000``."""
    from agentsim.traces.export import export
    from agentsim.traces.importers import import_trace, load_trace

    src = tmp_path / "mixed.csv"
    src.write_bytes(AZURE_MIXED.encode())
    trace = load_trace(src)
    assert [p.arrival_at for p in trace.programs] == [0.0, 3.32141, 4.31941, 5.41941]
    export(trace.meta, trace.programs, tmp_path / "back.csv", "azure")
    assert (tmp_path / "back.csv").read_bytes() == src.read_bytes()
    # through canonical Parquet and native JSONL too
    import_trace(src, tmp_path / "t.parquet")
    pq = load_trace(tmp_path / "t.parquet")
    export(pq.meta, pq.programs, tmp_path / "t.jsonl", "native")
    nat = load_trace(tmp_path / "t.jsonl")
    export(nat.meta, nat.programs, tmp_path / "back2.csv", "azure")
    assert (tmp_path / "back2.csv").read_bytes() == src.read_bytes()
    # a moved arrival no longer matches its text: it is formatted with the first row's digits
    moved = load_trace(src)
    moved.programs[1].arrival_at += 1.0
    export(moved.meta, moved.programs, tmp_path / "moved.csv", "azure")
    assert (tmp_path / "moved.csv").read_text().splitlines()[2] == "2023-11-16 18:15:51.0020000,396,109"


def test_mooncake_export_keeps_timestamp_text(tmp_path):
    """The issue: ``"timestamp": 0.0`` came back as ``0``; a late slice keeps its own clock."""
    from agentsim.traces.export import export
    from agentsim.traces.importers import import_trace, load_trace

    lines = ['{"timestamp": 0.0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]}',
             '{"timestamp": 3000, "input_length": 10, "output_length": 2, "hash_ids": [2]}',
             '{"timestamp": 3000.5, "input_length": 512, "output_length": 1, "hash_ids": [3]}']
    src = tmp_path / "m.jsonl"
    src.write_text("\n".join(lines) + "\n")
    import_trace(src, tmp_path / "m.parquet")
    trace = load_trace(tmp_path / "m.parquet")
    assert [p.arrival_at for p in trace.programs] == [0.0, 3.0, 3.0005]
    export(trace.meta, trace.programs, tmp_path / "back.jsonl", "mooncake")
    assert (tmp_path / "back.jsonl").read_text() == src.read_text()

    late = _mooncake_slice(tmp_path, n=25)
    t = load_trace(late)
    assert t.meta["t0_ms"] == 3_600_000 and t.programs[0].arrival_at == 0.0
    export(t.meta, t.programs, tmp_path / "late_back.jsonl", "mooncake")
    assert (tmp_path / "late_back.jsonl").read_text() == late.read_text()


def test_canonical_files_without_arrival_text_still_read(tmp_path):
    import pyarrow.parquet as pq

    from agentsim.traces.canonical import iter_programs, read_tables
    from agentsim.traces.importers import import_trace

    import_trace(_mooncake_slice(tmp_path, n=5), tmp_path / "t.parquet")
    table = pq.read_table(tmp_path / "t.parquet")
    old = table.drop(["arrival_text"]).replace_schema_metadata(table.schema.metadata)
    pq.write_table(old, tmp_path / "old.parquet")
    progs = list(iter_programs(tmp_path / "old.parquet"))
    assert len(progs) == 5 and all(p.arrival_text == "" for p in progs)
    programs, _ = read_tables(tmp_path / "old.parquet")
    assert list(programs["arrival_text"]) == [""] * 5


@pytest.mark.parametrize("decision,name,param,value,word", [
    ("route", "autellix-lb", "threshold_tokens", "abc", "an integer"),       # was a TypeError mid-run
    ("route", "prefix-affinity", "cache_threshold", math.nan, "a finite number"),
    ("order", "plas", "preemptive", 1, "true or false"),
    ("evict", "invocation-distance", "unit", math.inf, "a finite number"),
])
def test_policy_parameter_types_checked_before_the_run(decision, name, param, value, word):
    from agentsim.policies.registry import make_bundle

    spec = {"name": "vllm", decision: name, "params": {decision: {param: value}}}
    with pytest.raises(ConfigError) as e:
        make_bundle(spec)
    assert e.value.where == f"policy.params.{decision}.{param}" and e.value.message.startswith(f"must be {word}")


def test_every_policy_bundle_passes_its_own_parameter_checks():
    from agentsim.policies.registry import bundles, make_bundle

    for b in bundles():
        assert make_bundle(b.name).name == b.name


def test_cli_export_straight_from_a_raw_file_keeps_the_source_clock(tmp_path):
    """An export streaming from a raw CSV/JSONL read the metadata before the importer had filled it
    in (the first timestamp), so Azure dates restarted at 2023-11-14 and Mooncake at 0."""
    src = tmp_path / "mixed.csv"
    src.write_bytes(AZURE_MIXED.encode())
    p = agentsim("trace", "export", src, "--to", "azure", "-o", tmp_path / "back.csv")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "back.csv").read_bytes() == src.read_bytes()
    late = _mooncake_slice(tmp_path, n=30)
    p = agentsim("trace", "export", late, "--to", "mooncake", "-o", tmp_path / "back.jsonl")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "back.jsonl").read_text() == late.read_text()
    p = agentsim("trace", "export", AZURE, "--to", "azure", "-o", tmp_path / "az.csv")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "az.csv").read_bytes() == gzip.decompress(AZURE.read_bytes())


def test_num_programs_is_not_silently_ignored_for_a_trace():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"workload": {"arrival": "trace", "trace": str(AZURE), "num_programs": 10}})
    assert e.value.where == "workload.num_programs" and "workload.limit" in e.value.message

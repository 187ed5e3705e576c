"""The simulator runs with Python's cyclic garbage collector off (``Simulation.run``: reference counting
frees its garbage; the collector would only rescan millions of live KV blocks and call records). That is
safe only while a run creates no reference cycles that become garbage: one per call would grow memory
without bound in a long run. These tests hold that, for every policy bundle and for teams, and that a
run gives the collector back as it found it."""

from __future__ import annotations

import gc

import pytest

from agentsim.config import load_config
from agentsim.policies.registry import bundles
from agentsim.sim.runner import Simulation

BASE = {"cluster.num_nodes": 1, "cluster.gpus_per_node": 2, "workload.arrival": "closed",
        "workload.agents": 24, "workload.generator": "react", "duration": 40.0,
        "cluster.engine.num_gpu_blocks_override": 400}   # small: evictions, preemptions, tier traffic


def _garbage_after_run(over: dict) -> tuple[int, int]:
    sim = Simulation(load_config(None, {**BASE, **over}))
    gc.collect()   # what building the simulation left (the collector is on then): only the run counts
    r = sim.run()
    found = gc.collect()   # the simulation is still alive: only cycles the run dropped are garbage
    return found, len(r.calls)


@pytest.mark.parametrize("policy", [b.name for b in bundles()])
def test_a_run_leaves_no_cyclic_garbage(policy):
    found, n = _garbage_after_run({"policy": policy})
    assert n > 100
    assert found == 0


@pytest.mark.parametrize("over", [
    {"workload.generator": "team", "workload.agents": 6, "policy": "adaptorch"},
    {"workload.generator": "society", "workload.agents": 1, "workload.num_programs": 1,
     "workload.params": {"num_agents": 40, "num_steps": 4}, "policy": "scalesim", "sim.drain": True},
    {"workload.arrival": "poisson", "workload.rate": 8.0, "workload.generator": "single",
     "cluster.engine.num_gpu_blocks_override": 1200},
])
def test_teams_societies_and_open_loop_runs_leave_no_cyclic_garbage(over):
    found, n = _garbage_after_run(over)
    assert n > 30
    assert found == 0


def test_a_run_gives_the_collector_back_as_it_found_it():
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            Simulation(load_config(None, {**BASE, "duration": 5.0})).run()
            assert gc.isenabled() is enabled
            assert gc.get_freeze_count() == 0
        finally:
            gc.enable()


def test_a_run_frees_what_earlier_runs_left_once_it_adds_up(monkeypatch):
    """The collector is off during a run, so a run first frees the cyclic garbage of the runs before it
    in this process (a sweep worker's previous cells) -- once their KV blocks and calls add up to more
    than ``_RUN_GARBAGE_BUDGET``; below that a small run does not pay for a full collection."""
    import weakref

    import agentsim.sim.runner as runner

    gc.collect()
    monkeypatch.setattr(runner, "_objects_since_collection", 0)

    def left_behind() -> weakref.ref:
        sim = Simulation(load_config(None, {**BASE, "duration": 5.0}))
        sim.run()
        return weakref.ref(sim.engines[0])   # the simulation is cyclic garbage once dropped

    enabled = gc.isenabled()
    gc.disable()   # only the run's own collection may free it
    try:
        monkeypatch.setattr(runner, "_RUN_GARBAGE_BUDGET", 10 ** 9)
        first = left_behind()
        assert runner._objects_since_collection > 100
        second = left_behind()
        assert first() is not None and second() is not None   # under the budget: not collected yet
        monkeypatch.setattr(runner, "_RUN_GARBAGE_BUDGET", 100)
        third = left_behind()
        assert first() is None and second() is None            # over it: the third run freed both
        assert third() is not None
    finally:
        if enabled:
            gc.enable()


@pytest.mark.parametrize("columns,key", [("calls", "call_id"), ("engines", ["time", "engine_id"])])
def test_column_store_sorted_release_conversion_equals_sort_values(columns, key):
    """``ColumnStore.to_frame(sort_by=..., release=True)`` (the runner's conversion: sorted column by
    column, each column's storage freed once converted) gives exactly the frame of a plain
    conversion sorted with pandas (ties kept in insertion order, NaN last), and empties the store."""
    import random

    import pandas as pd

    from agentsim.metrics import CALL_COLUMNS, ENGINE_COLUMNS, ColumnStore

    cols = CALL_COLUMNS if columns == "calls" else ENGINE_COLUMNS
    rng = random.Random(7)
    for n in (0, 1, 400):
        store = ColumnStore(cols)
        for _ in range(n):
            store.append(tuple(rng.randint(0, 5) if k == "i" else rng.choice([0.5, 1.0, 2.0, float("nan")])
                               if k == "f" else rng.choice(["finished", "unfinished"]) for _, k in cols))
        want = store.to_frame().sort_values(key, kind="stable").reset_index(drop=True)
        got = store.to_frame(sort_by=key, release=True)
        pd.testing.assert_frame_equal(got, want, check_exact=True)
        assert len(store) == 0 and list(got.dtypes) == list(want.dtypes)


def test_column_store_buffered_rows_equal_cell_by_cell_appends():
    """Rows move into the columns a chunk at a time (``ColumnStore.CHUNK``): across chunk boundaries
    the frame equals one built cell by cell, ``len`` counts buffered rows, and a bad row raises when
    its chunk moves, is dropped, and leaves the chunk's other rows and every column's length intact."""
    import random

    import numpy as np
    import pandas as pd

    from agentsim.metrics import ColumnStore

    cols = (("a", "i"), ("b", "f"), ("c", "s"))
    rng = random.Random(3)
    for n in (0, 1, ColumnStore.CHUNK - 1, ColumnStore.CHUNK, 2 * ColumnStore.CHUNK + 5):
        rows = [(rng.randint(-9, 9), rng.random(), rng.choice("xyz")) for _ in range(n)]
        store = ColumnStore(cols)
        for r in rows:
            store.append(r)
        assert len(store) == n
        want = pd.DataFrame({"a": np.array([r[0] for r in rows], dtype=np.int64),
                             "b": np.array([r[1] for r in rows], dtype=np.float64),
                             "c": pd.array([r[2] for r in rows], dtype="string")})
        pd.testing.assert_frame_equal(store.to_frame(), want, check_exact=True)

    store = ColumnStore(cols)
    store.append((1, 1.0, "x"))
    assert len(store) == 1          # moved into the columns
    store.append((2, 2.0, "y"))
    store.append((3.5, 3.0, "z"))   # a float in the integer column
    store.append((4, 4.0, "w"))
    with pytest.raises(TypeError):
        len(store)
    # the bad row is dropped, the chunk's other rows are stored, and every column has the same rows
    assert store.to_frame().values.tolist() == [[1, 1.0, "x"], [2, 2.0, "y"], [4, 4.0, "w"]]
    store.append((5, 2.0))
    store.append([6, 6.0, "v"])     # a list row is copied when appended
    with pytest.raises(ValueError, match="a row of 2 values for 3 columns"):
        store.to_frame()
    assert store.to_frame()["a"].tolist() == [1, 2, 4, 6]
    for _ in range(ColumnStore.CHUNK - 1):
        store.append((7, 7.0, "u"))
    with pytest.raises(TypeError):
        store.append((8, "not a float", "t"))   # fills the chunk: the append that moves it raises
    store.append((9, 9.0, "s"))                  # and the store goes on
    assert len(store) == 4 + ColumnStore.CHUNK - 1 + 1
    assert store.to_frame()["a"].tolist()[-2:] == [7, 9]

"""The results store: schema and migrations, refusing a newer store, several writer processes."""
import json
import multiprocessing
import os
import socket
import sqlite3
import subprocess
import sys

import pytest

from caffe_prune import store
from conftest import REPO


def a_run(i, metric="taylor", seed=0):
    return {"id": f"run{i:04d}", "net": "LeNet-5", "method": metric, "metric": metric, "oracle": None, "seed": seed,
            "config": {"metric": metric, "seed": seed, "shortlist": "paper"}, "run_dir": f"runs/run{i:04d}",
            "report_drop": 5.0}


def a_result(top1s, removed, host="h", pid=7):
    steps = [{"step": i, "group": None if i == 0 else i, "test": {"top1": t, "top5": 0.9, "loss": 1.0},
              "percent_conv_removed": r, "conv_weights": 100 - i, "fc_weights": 50, "active_channels": 9 - i,
              "macs": 1000 - 10 * i, "params": 200 - i, "percent_macs_removed": float(i), "seconds": 0.1}
             for i, (t, r) in enumerate(zip(top1s, removed))]
    return {"steps": steps, "removed_at_drop": removed[-1], "host": host, "pid": pid, "wall_s": 1.5,
            "protocol": {"data": "d"}, "versions": {"caffe": "1.0"}}


def test_a_new_store_is_wal_with_every_migration(tmp_path):
    with store.Store(tmp_path) as s:
        assert s.version == store.SCHEMA_VERSION == len(store.MIGRATIONS) == 3
        assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s.db.execute("PRAGMA busy_timeout").fetchone()[0] == store.BUSY_TIMEOUT_MS
        tables = {r[0] for r in s.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"schema_version", "runs", "steps", "attempts", "meta"} <= tables
        assert s.add_runs([a_run(1), a_run(2, "activation/x/l1/weights_removed")]) == 2
        assert s.add_runs([a_run(1)]) == 0                       # a run is inserted once
        attempt = s.start_attempt("run0001", "local", "h", 7)
        s.finish("run0001", attempt, a_result([0.70, 0.69, 0.60], [0, 2.5, 5.0]))
        s.finish("run0001", attempt, a_result([0.70, 0.69, 0.60], [0, 2.5, 5.0]))   # steps replaced, not doubled
        s.set_meta("spec", {"name": "x"})
        run = s.runs(status="done")[0]
        assert (run["steps"], run["initial_top1"], run["final_top1"], run["final_removed"]) == (2, 70.0, 60.0, 5.0)
        assert run["config"] == {"metric": "taylor", "seed": 0, "shortlist": "paper"} and run["versions"] == {"caffe": "1.0"}
        assert (run["input"], run["pointwise"], run["reduction"], run["scaling"]) == ("activation", "taylor", "l1", "count")
        other = s.runs(status="pending")[0]
        assert (other["scaling"], other["domino"]) == ("weights_removed", None)
        assert [st["step"] for st in s.steps("run0001")] == [0, 1, 2]
        assert s.db.execute("SELECT count(*) FROM steps").fetchone()[0] == 3
        rows = s.step_rows(["run0001"])
        assert [(r["macs"], r["params"], r["percent_macs_removed"]) for r in rows] == [(1000, 200, 0.0), (990, 199, 1.0),
                                                                                        (980, 198, 2.0)]
        assert run["final_macs_removed"] == 2.0 and run["macs_removed_at_drop"] is None   # not in that result
        assert s.counts() == {"done": 1, "pending": 1} and s.meta("spec") == {"name": "x"}
        assert [a["outcome"] for a in s.attempts("run0001")] == ["done"]


def test_an_older_store_is_migrated(tmp_path):
    """A version-1 store (runs and steps only) gains version 2's columns and tables on open, its rows
    kept and their taxonomy components filled in."""
    old = store.Store(tmp_path, target=1)
    assert old.version == 1
    with old.write() as db:
        db.execute("INSERT INTO runs (id, net, method, metric, seed, config, status, run_dir, created, removed_at_drop) "
                   "VALUES ('r1', 'LeNet-5', 'fisher', 'fisher', 3, '{}', 'done', 'runs/r1', 0, 12.5)")
    old.close()
    with store.Store(tmp_path) as s:
        assert s.version == 3
        (row,) = s.runs()
        assert row["macs_removed_at_drop"] is None
        assert (row["id"], row["seed"], row["removed_at_drop"], row["completions"]) == ("r1", 3, 12.5, 0)
        assert (row["input"], row["pointwise"], row["reduction"], row["scaling"]) == ("activation", "hess_sqgrad", "sum", "count")
        assert s.attempts() == []


def test_a_newer_store_is_refused_in_one_line(tmp_path):
    store.Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / store.STORE_NAME)
    db.execute("UPDATE schema_version SET version = 9")
    db.commit()
    db.close()
    path = tmp_path / store.STORE_NAME
    with pytest.raises(store.StoreError, match=rf"^{path} was written by a newer caffe-prune \(results store schema "
                                               rf"version 9; this one reads up to version 3\)"):
        store.Store(tmp_path)
    done = subprocess.run([sys.executable, "-m", "caffe_prune", "results", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "version 9" in done.stderr and "up to version 3" in done.stderr


def test_what_is_not_a_store(tmp_path):
    (tmp_path / "text").write_text("hello, I am not SQLite " * 100)
    with pytest.raises(store.StoreError, match="text is not a usable results store"):
        store.Store(tmp_path / "text")
    other = sqlite3.connect(tmp_path / "other.sqlite")
    other.execute("CREATE TABLE t (x)")
    other.commit()
    other.close()
    with pytest.raises(store.StoreError, match="an SQLite file but not a caffe-prune results store"):
        store.Store(tmp_path / "other.sqlite")
    with pytest.raises(store.StoreError, match="no results store at .*run `caffe-prune sweep`"):
        store.Store(tmp_path / "empty", create=False)


def _writer(path, worker, runs):
    """One driver process: adds every run (most are already there), then finishes its share."""
    with store.Store(path) as s:
        s.add_runs([a_run(i) for i in range(runs)])
        for i in range(worker, runs, 4):
            attempt = s.start_attempt(f"run{i:04d}", "local", "h", os.getpid())
            s.finish(f"run{i:04d}", attempt, a_result([0.7, 0.6], [0, i / 10], pid=os.getpid()))


def test_several_writer_processes(tmp_path):
    """Four processes writing at once (each transaction BEGIN IMMEDIATE, with a busy timeout): no
    error, no lost or doubled row."""
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_writer, args=(tmp_path, w, 60)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with store.Store(tmp_path) as s:
        runs = s.runs()
        assert len(runs) == 60 and all(r["status"] == "done" and r["completions"] == 1 for r in runs)
        assert s.db.execute("SELECT count(*) FROM steps").fetchone()[0] == 120
        assert sorted(r["removed_at_drop"] for r in runs) == pytest.approx([i / 10 for i in range(60)])
        assert len({a["pid"] for a in s.attempts()}) == 4


def test_an_attempt_left_open_by_a_killed_driver_is_closed_as_lost(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with store.Store(tmp_path) as s:
        s.add_runs([a_run(1)])
        s.start_attempt("run0001", "local", driver=f"{socket.gethostname()}:{dead.pid}")
        s.start_attempt("run0001", "local", driver=f"elsewhere:{dead.pid}")      # another host: unknowable
        s.start_attempt("run0001", "local")
        outcomes = [(a["attempt"], a["outcome"]) for a in s.attempts("run0001")]
        assert outcomes == [(1, "lost"), (2, None), (3, None)]
        s.end_attempt("run0001", 3, "interrupted", "Ctrl-C", "interrupted")
        assert s.runs()[0]["status"] == "interrupted"
        assert json.loads(json.dumps(s.attempts("run0001")[0]))["detail"].endswith("ended without an outcome (killed)")

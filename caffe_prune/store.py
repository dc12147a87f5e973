"""The results store of a sweep: one SQLite file (standard library), a row per run and a row per step.

A sweep directory's ``results.sqlite`` holds, for every run its SPEC expanded to (caffe_prune.sweep):

- ``runs``: the run's id (sha256 of its configuration), network, method (the metric's name, or
  ``oracle``), seed, the full configuration and protocol (JSON), the engine versions, status
  (``pending``, ``running``, ``retrying``, ``interrupted``, ``failed``, ``done``), the host that
  finished it, wall time, and the numbers a table needs: steps, initial and final test top-1, %
  conv weights removed at the end and at ``report_drop`` points below the start (papers/004
  Table 2's figure, ``removed_at_drop``). The metric's taxonomy components (input, pointwise,
  reduction, scaling, domino) are columns, so results group by component in SQL.
- ``steps``: one row per step of a finished run: the first group pruned (``grp``), test
  top-1/top-5/loss, weights left, % removed, MACs per image and parameters left, % of MACs removed,
  seconds, and the step's whole record as JSON (``record``, with every group it removed:
  caffe_prune.steps).
- ``attempts``: one row per time a worker was given the run (host, pid, executor, the driver that
  gave it, start, end, outcome: ``done``, ``failed``, ``died``, ``busy``, ``interrupted``, ``lost``).
  ``runs.completions`` counts the attempts that finished it: 1 for every run done exactly once.
- ``meta``: key/value (the last SPEC launched, as JSON).

The run directories stay the source of truth (a run resumes from its own directory); the store is
what is queried. Only a sweep's driver writes rows, in ``BEGIN IMMEDIATE`` transactions, with WAL
journaling and a busy timeout, so several drivers and readers can share one file.

Schema: ``schema_version`` holds one number. The schema *is* the list ``MIGRATIONS``: a new store
runs all of them, an older one the ones it lacks (in one transaction, on open), and a store written
by a newer caffe-prune is refused with a one-line error naming the file and both versions.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from caffe_prune.steps import archive_cell, groups_of, normalize

STORE_NAME = "results.sqlite"
BUSY_TIMEOUT_MS = 60_000
STATUSES = ("pending", "running", "retrying", "interrupted", "failed", "done")
COMPONENTS = ("input", "pointwise", "reduction", "scaling", "domino")


class StoreError(ValueError):
    """A store that cannot be used (newer schema, not SQLite, missing); one line naming the file."""


def _script(db, sql: str) -> None:
    """Statements one by one (executescript would commit the migration's transaction first)."""
    for statement in sql.split(";"):
        if any(line.strip() and not line.strip().startswith("--") for line in statement.splitlines()):
            db.execute(statement)


def _v1(db) -> None:
    """Runs and their steps."""
    _script(db, """
        CREATE TABLE runs (
            id TEXT PRIMARY KEY,            -- sha256 of the run's canonical configuration
            net TEXT NOT NULL,
            method TEXT NOT NULL,           -- the metric's name, or 'oracle'
            metric TEXT,                    -- NULL for an oracle run
            oracle TEXT,                    -- JSON list of constituents, NULL for a metric run
            seed INTEGER NOT NULL,
            config TEXT NOT NULL,           -- JSON: caffe_prune.pruning.Config as run, plus data and weights sha256
            protocol TEXT,                  -- JSON: the run directory's protocol (data, counts, groups)
            versions TEXT,                  -- JSON: Caffe, its source, BLAS, Python
            status TEXT NOT NULL DEFAULT 'pending',
            run_dir TEXT NOT NULL,          -- relative to the sweep directory
            host TEXT,                      -- where it finished
            wall_s REAL,                    -- wall time of the attempt that finished it
            steps INTEGER,
            initial_top1 REAL,              -- test top-1 (%) of the unpruned net
            final_top1 REAL,
            final_removed REAL,             -- % conv weights removed at the last step
            removed_at_drop REAL,           -- ... at the last measured step within report_drop points (Table 2)
            error TEXT,
            created REAL NOT NULL,
            finished REAL
        );
        CREATE TABLE steps (
            run_id TEXT NOT NULL REFERENCES runs(id),
            step INTEGER NOT NULL,
            grp INTEGER,                    -- the (first) group pruned (NULL for step 0), record: all of them
            top1 REAL, top5 REAL, loss REAL,  -- NULL when the step was not measured
            percent_conv_removed REAL,
            conv_weights INTEGER,
            fc_weights INTEGER,
            active_channels INTEGER,
            seconds REAL,
            record TEXT NOT NULL,           -- the step's line of steps.jsonl
            PRIMARY KEY (run_id, step)
        );
        CREATE INDEX runs_by_net_method ON runs (net, method);
    """)


def _v2(db) -> None:
    """Taxonomy components as columns, the stop figure's drop, attempts, meta."""
    for column in ("input TEXT", "pointwise TEXT", "reduction TEXT", "scaling TEXT", "domino TEXT",
                   "shortlist TEXT", "report_drop REAL NOT NULL DEFAULT 5.0", "step_seconds REAL",
                   "completions INTEGER NOT NULL DEFAULT 0", "started REAL"):
        db.execute(f"ALTER TABLE runs ADD COLUMN {column}")
    _script(db, """
        CREATE TABLE attempts (
            run_id TEXT NOT NULL REFERENCES runs(id),
            attempt INTEGER NOT NULL,       -- 1, 2, ... per run
            executor TEXT NOT NULL,         -- local or ray
            driver TEXT NOT NULL,           -- HOST:PID of the sweep that handed it out
            host TEXT, pid INTEGER,         -- the worker's (known when it starts, or from its result)
            started REAL NOT NULL,
            ended REAL,
            outcome TEXT,                   -- NULL while it runs
            detail TEXT,
            PRIMARY KEY (run_id, attempt)
        );
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
    """)
    rows = db.execute("SELECT id, metric FROM runs WHERE metric IS NOT NULL").fetchall()
    for run_id, metric in rows:
        db.execute("UPDATE runs SET input=?, pointwise=?, reduction=?, scaling=?, domino=? WHERE id=?",
                   (*components(metric).values(), run_id))


def _v3(db) -> None:
    """What a pruning state computes and holds: MACs and parameters per step (the compact net's,
    caffe_prune.graph.Costs) and the % of MACs removed at the drop per run."""
    for column in ("macs INTEGER", "params INTEGER", "percent_macs_removed REAL"):
        db.execute(f"ALTER TABLE steps ADD COLUMN {column}")
    for column in ("final_macs_removed REAL", "macs_removed_at_drop REAL"):
        db.execute(f"ALTER TABLE runs ADD COLUMN {column}")


MIGRATIONS = (_v1, _v2, _v3)       # MIGRATIONS[i] takes a store from version i to i + 1
SCHEMA_VERSION = len(MIGRATIONS)


def components(metric: str | None) -> dict:
    """The taxonomy components of a metric name (aliases resolved), None for each when there is
    no metric (an oracle run) or the name does not parse."""
    from caffe_prune.metrics.taxonomy import components as of_name
    return of_name(metric) or dict.fromkeys(COMPONENTS)


def store_path(location) -> Path:
    """A sweep directory's store, or the store file itself."""
    location = Path(location)
    if location.is_file():
        return location
    return location / STORE_NAME if location.is_dir() or not location.suffix else location


def driver_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Store:
    """One open results store. ``create`` False refuses a missing file instead of making one."""

    def __init__(self, location, create: bool = True, target: int = SCHEMA_VERSION):
        self.path = store_path(location)
        if not self.path.is_file():
            if not create:
                raise StoreError(f"no results store at {self.path}; run `caffe-prune sweep` into that directory first")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not create and self.path.stat().st_size == 0:   # SQLite would take it as a new store and write it
            raise StoreError(f"{self.path} is empty (0 bytes): not a results store (a copy cut short?); copy it "
                             f"again, or rerun `caffe-prune sweep` into that directory")
        self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._wal()
            self.db.execute("PRAGMA synchronous = FULL")
            self.version = self._migrate(target)
        except StoreError:
            self.db.close()
            raise
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise StoreError(f"{self.path} is not a usable results store ({exc})") from None

    def _wal(self) -> None:
        """WAL journaling. Switching a new file to WAL needs the database to itself, and SQLite
        answers "locked" at once (no busy handler) while another process opens it too: retried
        until the busy timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self.db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def write(self):
        """One BEGIN IMMEDIATE transaction: the write lock is taken at the start (waiting up to the
        busy timeout for another writer), so concurrent drivers never deadlock on an upgrade."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _found_version(self) -> int:
        has = self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'").fetchone()
        if not has:
            return 0
        row = self.db.execute("SELECT version FROM schema_version").fetchone()
        return row[0] if row else 0

    def _migrate(self, target: int) -> int:
        found = self._found_version()
        if found > SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer caffe-prune (results store schema version "
                             f"{found}; this one reads up to version {SCHEMA_VERSION}): upgrade caffe-prune to use it")
        if found >= target:
            return found
        with self.write() as db:
            found = self._found_version()        # another process may have migrated meanwhile
            if found == 0:
                if db.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]:
                    raise StoreError(f"{self.path} is an SQLite file but not a caffe-prune results store "
                                     f"(no schema_version table)")
                db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                db.execute("INSERT INTO schema_version VALUES (0)")
            for version in range(found, target):
                MIGRATIONS[version](db)
            db.execute("UPDATE schema_version SET version = ?", (target,))
        return target

    # ---- writes (the sweep's driver) ----

    def add_runs(self, runs) -> int:
        """Insert a pending row for each run not yet in the store; returns how many were new.
        `runs`: dicts with id, net, method, metric, oracle, seed, config, run_dir, report_drop."""
        now, added = time.time(), 0
        with self.write() as db:
            for r in runs:
                cur = db.execute(
                    "INSERT OR IGNORE INTO runs (id, net, method, metric, oracle, seed, config, run_dir, created, "
                    "input, pointwise, reduction, scaling, domino, shortlist, report_drop) "
                    "VALUES (?,?,?,?,?,?,?,?,?, ?,?,?,?,?,?,?)",
                    (r["id"], r["net"], r["method"], r["metric"], json.dumps(r["oracle"]) if r["oracle"] else None,
                     r["seed"], json.dumps(r["config"], sort_keys=True), r["run_dir"], now,
                     *components(r["metric"]).values(), r["config"].get("shortlist"), r["report_drop"]))
                added += cur.rowcount
        return added

    def set_meta(self, key: str, value) -> None:
        with self.write() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def start_attempt(self, run_id: str, executor: str, host=None, pid=None, driver=None) -> int:
        """Record that a worker was given the run; returns the attempt's number. Attempts left open by
        a driver of this host that is gone (killed) are closed as ``lost`` first."""
        now, driver = time.time(), driver or driver_id()
        with self.write() as db:
            for attempt, owner in db.execute("SELECT attempt, driver FROM attempts WHERE run_id=? AND outcome IS NULL",
                                             (run_id,)).fetchall():
                if _gone(owner) and owner != driver:
                    db.execute("UPDATE attempts SET outcome='lost', ended=?, detail=? WHERE run_id=? AND attempt=?",
                               (now, f"its sweep {owner} ended without an outcome (killed)", run_id, attempt))
            n = db.execute("SELECT coalesce(max(attempt), 0) + 1 FROM attempts WHERE run_id=?", (run_id,)).fetchone()[0]
            db.execute("INSERT INTO attempts (run_id, attempt, executor, driver, host, pid, started) VALUES (?,?,?,?,?,?,?)",
                       (run_id, n, executor, driver, host, pid, now))
            db.execute("UPDATE runs SET status='running', started=coalesce(started, ?), error=NULL WHERE id=?",
                       (now, run_id))
        return n

    def finish(self, run_id: str, attempt: int, result: dict) -> None:
        """A run's result (caffe_prune.sweep.execute): its steps, summary and the attempt's outcome,
        in one transaction. Steps are replaced, never appended twice."""
        steps, now = result["steps"], time.time()
        with self.write() as db:
            db.execute("DELETE FROM steps WHERE run_id=?", (run_id,))
            db.executemany("INSERT INTO steps (run_id, step, grp, top1, top5, loss, percent_conv_removed, conv_weights, "
                           "fc_weights, active_channels, seconds, record, macs, params, percent_macs_removed) "
                           "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                           [(run_id, s["step"], (groups_of(s) or [None])[0], _pct(s, "top1"), _pct(s, "top5"),
                             s.get("test", {}).get("loss"), s.get("percent_conv_removed"), s.get("conv_weights"),
                             s.get("fc_weights"), s.get("active_channels"), s.get("seconds"), json.dumps(s),
                             s.get("macs"), s.get("params"), s.get("percent_macs_removed"))
                            for s in steps])
            measured = [s for s in steps if "test" in s]
            db.execute(
                "UPDATE runs SET status='done', completions=completions+1, host=?, wall_s=?, steps=?, "
                "initial_top1=?, final_top1=?, final_removed=?, removed_at_drop=?, step_seconds=?, protocol=?, "
                "versions=?, error=NULL, finished=?, final_macs_removed=?, macs_removed_at_drop=? WHERE id=?",
                (result["host"], result["wall_s"], len(steps) - 1, _pct(steps[0], "top1"),
                 _pct(measured[-1], "top1") if measured else None, steps[-1].get("percent_conv_removed"),
                 result["removed_at_drop"], sum(s.get("seconds") or 0 for s in steps),
                 json.dumps(result.get("protocol")), json.dumps(result.get("versions")), now,
                 steps[-1].get("percent_macs_removed"), result.get("macs_removed_at_drop"), run_id))
            db.execute("UPDATE attempts SET outcome='done', ended=?, host=coalesce(host, ?), pid=coalesce(pid, ?) "
                       "WHERE run_id=? AND attempt=?", (now, result["host"], result["pid"], run_id, attempt))

    def end_attempt(self, run_id: str, attempt: int, outcome: str, detail: str | None, status: str) -> None:
        """Close an attempt that did not finish the run (failed, died, busy, interrupted) and set the
        run's status (failed, retrying, running, interrupted)."""
        now = time.time()
        with self.write() as db:
            db.execute("UPDATE attempts SET outcome=?, detail=?, ended=? WHERE run_id=? AND attempt=?",
                       (outcome, detail, now, run_id, attempt))
            db.execute("UPDATE runs SET status=?, error=? WHERE id=? AND status != 'done'",
                       (status, detail if status in ("failed", "retrying") else None, run_id))

    # ---- reads ----

    def runs(self, status=None, net=None, where: str = "", params=()) -> list:
        """Run rows as dicts (config, oracle, protocol, versions decoded), oldest first."""
        clauses, args = [], []
        for column, value in (("status", status), ("net", net)):
            if value is not None:
                values = [value] if isinstance(value, str) else list(value)
                clauses.append(f"{column} IN ({','.join('?' * len(values))})")
                args += values
        if where:
            clauses.append(where)
            args += list(params)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY created, id"
        return [_decode(dict(row)) for row in self.db.execute(sql, args)]

    def steps(self, run_id: str) -> list:
        """The step records of a finished run, in order, in the current schema (caffe_prune.steps)."""
        return [normalize(json.loads(r[0])) for r in self.db.execute("SELECT record FROM steps WHERE run_id=? "
                                                                     "ORDER BY step", (run_id,))]

    def step_rows(self, run_ids) -> list:
        """One dict per step of the runs: the step columns, ``groups`` (all the step removed, "17;4")."""
        rows = []
        for run_id in run_ids:
            for r in self.db.execute(
                    "SELECT run_id, step, grp, top1, top5, loss, percent_conv_removed, conv_weights, fc_weights, "
                    "active_channels, seconds, macs, params, percent_macs_removed, record FROM steps WHERE run_id=? "
                    "ORDER BY step", (run_id,)):
                row = dict(r)
                row["groups"] = archive_cell(json.loads(row.pop("record")))
                rows.append(row)
        return rows

    def attempts(self, run_id: str | None = None) -> list:
        sql, args = "SELECT * FROM attempts", ()
        if run_id is not None:
            sql, args = sql + " WHERE run_id=?", (run_id,)
        return [dict(r) for r in self.db.execute(sql + " ORDER BY run_id, attempt", args)]

    def counts(self) -> dict:
        """{status: number of runs}."""
        return {s: n for s, n in self.db.execute("SELECT status, count(*) FROM runs GROUP BY status")}


def _pct(step: dict, key: str):
    value = step.get("test", {}).get(key)
    return None if value is None else 100.0 * value


def _decode(row: dict) -> dict:
    for key in ("config", "oracle", "protocol", "versions"):
        if row.get(key):
            row[key] = json.loads(row[key])
    return row


def _gone(owner: str) -> bool:
    """Whether the sweep driver HOST:PID is known to have ended (only decidable on this host)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False

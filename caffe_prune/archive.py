"""A sweep's results as plain files small enough to commit beside its SPEC, read back by the reports.

A sweep's store (caffe_prune.store: SQLite, the run directories beside it) is where runs are made;
an archive is what is kept: ``experiments/results/<sweep>/``

- ``runs.csv``: one row per finished run: id, net, method, metric, oracle (JSON list), seed, the
  figures the tables read (``removed_at_drop``, ``macs_removed_at_drop``, ``report_drop``, steps,
  initial and final top-1), the run's configuration and protocol (JSON), and the wall time of the
  attempt that finished it (empty in archives written before it was kept);
- ``steps.csv.gz``: one row per step of those runs, the fields the figures read: the groups
  removed (caffe_prune.steps.archive_cell: "17", or "17;4" for a step of several), test
  top-1/top-5 (fractions, as the step records hold them) and loss, empty where the step was not
  measured; % of conv weights and of MACs removed (empty before MACs were counted), weights and
  MACs left, the constituent that first proposed an oracle's group, and a retraining's top-1
  before and after.

Paths in the configuration and protocol are cut to their last component (the weights' file is
named by its sha256 in a sweep): an archive names no machine's folders.

An archive grows: ``write`` merges the store's finished runs into what the archive already holds
(a sweep carried over several machines archives each machine's runs into the same files), keeping
every archived row as it was written; a run in both with different results is refused in one line.
``steps.csv.gz`` is replaced first and ``runs.csv`` last: ``runs.csv`` is the manifest, a step row
whose run it does not list is ignored, so a kill between the two renames leaves the archive as it
was. ``ids(dir)`` gives the run ids an archive holds, which a sweep skips (caffe_prune.sweep). Numbers are written with
Python's ``repr`` (the shortest text that reads back to the same float), so a report made from
an archive equals one made from the store. ``read(dir)`` gives the runs as the reports take them
(caffe_prune.report.runs_from_store), each with its steps.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import re
from pathlib import Path

from caffe_prune import fsio
from caffe_prune import steps as step_records
from caffe_prune.errors import DataError

RUNS, STEPS = "runs.csv", "steps.csv.gz"
RUN_COLUMNS = ("id", "net", "method", "metric", "oracle", "seed", "report_drop", "removed_at_drop",
               "macs_removed_at_drop", "steps", "initial_top1", "final_top1", "final_removed", "config", "protocol",
               "wall_s")
LEGACY_RUN_COLUMNS = RUN_COLUMNS[:-1]     # archives written before wall_s: read with it empty
STEP_COLUMNS = ("run_id", "step", "group", "top1", "top5", "loss", "percent_conv_removed", "percent_macs_removed",
                "conv_weights", "macs", "proposer", "retrain_before", "retrain_after", "retrain_iters")
JSON_COLUMNS = ("oracle", "config", "protocol")


_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s,/]+/)+([^\s,/]+)")


def _scrub(value):
    """``value`` (plain JSON data) with every absolute path cut to its last component."""
    if isinstance(value, str):
        return _PATH.sub(r"\1", value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def is_archive(location) -> bool:
    return (Path(location) / RUNS).is_file()


def _cell(value) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _step_row(run_id: str, step: dict) -> list:
    test, retrain = step.get("test") or {}, step.get("retrain") or {}
    return [_cell(v) for v in (
        run_id, step["step"], step_records.archive_cell(step), test.get("top1"), test.get("top5"), test.get("loss"),
        step.get("percent_conv_removed"), step.get("percent_macs_removed"), step.get("conv_weights"), step.get("macs"),
        step_records.first_proposer(step), retrain["before"]["top1"] if retrain else None,
        retrain["after"]["top1"] if retrain else None, retrain.get("iters"))]


def ids(location) -> set:
    """The ids of the runs an archive holds (empty when there is no archive at ``location``)."""
    return set(_archived_rows(Path(location))[0]) if is_archive(location) else set()


def _archived_rows(location: Path) -> tuple:
    """({run id: runs.csv row as text cells}, {run id: [steps.csv.gz rows]}) of an archive, as written."""
    try:
        runs = list(csv.reader(io.StringIO((location / RUNS).read_text())))
        steps = list(csv.reader(io.StringIO(gzip.decompress((location / STEPS).read_bytes()).decode())))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{location}: not a readable results archive ({exc})") from None
    if runs and tuple(runs[0]) == LEGACY_RUN_COLUMNS:
        runs = [list(RUN_COLUMNS)] + [row + [""] for row in runs[1:]]
    if not runs or tuple(runs[0]) != RUN_COLUMNS or not steps or tuple(steps[0]) != STEP_COLUMNS:
        raise DataError(f"{location}: the archive's columns are not {RUNS}: {','.join(RUN_COLUMNS)} and "
                        f"{STEPS}: {','.join(STEP_COLUMNS)}; it was written by another version of caffe-prune")
    by_run = {}
    for row in steps[1:]:
        by_run.setdefault(row[0], []).append(row)
    return {row[0]: row for row in runs[1:]}, by_run


def write(store_location, out_dir) -> dict:
    """The finished runs of a sweep's store merged into the archive in ``out_dir`` (created when
    there is none); the files are replaced atomically, steps first (see the module's docstring)."""
    from caffe_prune.store import Store
    out_dir = Path(out_dir)
    runs, steps = _archived_rows(out_dir) if is_archive(out_dir) else ({}, {})
    steps = {run_id: rows for run_id, rows in steps.items() if run_id in runs}   # a torn merge's extra steps
    before = len(runs)
    with Store(store_location, create=False) as store:
        for row in store.runs(status="done"):
            run = [json.dumps(_scrub(row[c]), sort_keys=True) if c in JSON_COLUMNS and row[c] is not None
                   else _cell(row[c]) for c in RUN_COLUMNS]
            run_steps = [_step_row(row["id"], step) for step in store.steps(row["id"])]
            if row["id"] in runs:      # the same run twice: its results must agree (its wall time may not)
                if (runs[row["id"]][:-1], steps.get(row["id"], [])) != (run[:-1], run_steps):
                    raise DataError(f"run {row['id'][:16]} ({row['net']}, {row['method']}, seed {row['seed']}) is in "
                                    f"{out_dir} and in {store_location} with different results "
                                    f"({_difference(runs[row['id']], run, steps.get(row['id'], []), run_steps)}); "
                                    f"archive into another folder, or remove one of them")
                continue
            runs[row["id"]], steps[row["id"]] = run, run_steps
    order = sorted(runs, key=lambda i: (runs[i][1], runs[i][2], int(runs[i][5]), i))   # net, method, seed, id
    run_text, step_text = io.StringIO(), io.StringIO()
    run_writer, step_writer = csv.writer(run_text, lineterminator="\n"), csv.writer(step_text, lineterminator="\n")
    run_writer.writerow(RUN_COLUMNS)
    step_writer.writerow(STEP_COLUMNS)
    for run_id in order:
        run_writer.writerow(runs[run_id])
        step_writer.writerows(steps.get(run_id, []))
    fsio.write_bytes(out_dir / STEPS, gzip.compress(step_text.getvalue().encode(), mtime=0))
    fsio.write_text(out_dir / RUNS, run_text.getvalue())
    return {"runs": len(runs), "added": len(runs) - before, "steps": sum(len(steps.get(i, [])) for i in order),
            "dir": str(out_dir)}


def _difference(archived: list, stored: list, archived_steps: list, stored_steps: list) -> str:
    """The first field in which an archived run and the store's differ, as a few words."""
    for column, a, b in zip(RUN_COLUMNS, archived, stored):
        if a != b:
            return f"{column} {a[:40] or '-'} vs {b[:40] or '-'}"
    if len(archived_steps) != len(stored_steps):
        return f"{len(archived_steps)} vs {len(stored_steps)} steps"
    for a, b in zip(archived_steps, stored_steps):
        for column, x, y in zip(STEP_COLUMNS, a, b):
            if x != y:
                return f"step {a[1]} {column} {x or '-'} vs {y or '-'}"
    return "?"


def _number(text: str):
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


def read(location) -> list:
    """The runs of an archive as the reports take them: dicts with id, net, method, metric, seed,
    config, protocol, removed (the Table-2 figure), report_drop, the taxonomy components, steps."""
    from caffe_prune.store import components
    location = Path(location)
    if not is_archive(location):
        raise DataError(f"{location} is not a results archive (no {RUNS}); write one with "
                        f"`caffe-prune results SWEEP_DIR --archive {location}`")
    steps = {}
    try:
        text = gzip.decompress((location / STEPS).read_bytes()).decode()
    except (OSError, EOFError) as exc:
        raise DataError(f"{location / STEPS}: not a gzipped CSV of steps ({exc})") from None
    for row in csv.DictReader(io.StringIO(text)):
        steps.setdefault(row["run_id"], []).append(_step(row))
    runs = []
    for row in csv.DictReader(io.StringIO((location / RUNS).read_text())):
        run = {k: (json.loads(v) if v else None) if k in JSON_COLUMNS else
               v if k in ("id", "net", "method", "metric") else _number(v) for k, v in row.items()}
        run["metric"] = run["metric"] or None
        runs.append({**run, "removed": run["removed_at_drop"], "protocol": run["protocol"] or {},
                     "dir": str(location), **components(run["metric"]), "domino": components(run["metric"])["domino"],
                     "steps": steps.get(run["id"], [])})
    return runs


def _step(row: dict) -> dict:
    """A step row as the figures read a step record."""
    values = {k: _number(v) for k, v in row.items() if k not in ("run_id", "proposer", "group")}
    step = {"step": values["step"], "groups": step_records.from_archive_cell(row["group"]),
            "percent_conv_removed": values["percent_conv_removed"], "conv_weights": values["conv_weights"]}
    if values["top1"] is not None:
        step["test"] = {"top1": values["top1"], "top5": values["top5"], "loss": values["loss"]}
    if values["percent_macs_removed"] is not None:
        step["percent_macs_removed"], step["macs"] = values["percent_macs_removed"], values["macs"]
    if row["proposer"]:
        step["proposers"] = [[[row["proposer"], None]]]
    if values["retrain_after"] is not None:
        step["retrain"] = {"before": {"top1": values["retrain_before"]},
                           "after": {"top1": values["retrain_after"]}, "iters": values["retrain_iters"]}
    return step

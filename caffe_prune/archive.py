"""A sweep's results as plain files small enough to commit beside its SPEC, read back by the reports.

A sweep's store (caffe_prune.store: SQLite, the run directories beside it) is where runs are made;
an archive is what is kept: ``experiments/results/<sweep>/``

- ``runs.csv``: one row per finished run: id, net, method, metric, oracle (JSON list), seed, the
  figures the tables read (``removed_at_drop``, ``macs_removed_at_drop``, ``report_drop``, steps,
  initial and final top-1), and the run's configuration and protocol (JSON);
- ``steps.csv.gz``: one row per step of those runs, the fields the figures read: the group, test
  top-1/top-5 (fractions, as the step records hold them) and loss, empty where the step was not
  measured; % of conv weights and of MACs removed (empty before MACs were counted), weights and
  MACs left, the constituent that first proposed an oracle's group, and a retraining's top-1
  before and after.

Paths in the configuration and protocol are cut to their last component (the weights' file is
named by its sha256 in a sweep): an archive names no machine's folders. Numbers are written with
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
from caffe_prune.errors import DataError

RUNS, STEPS = "runs.csv", "steps.csv.gz"
RUN_COLUMNS = ("id", "net", "method", "metric", "oracle", "seed", "report_drop", "removed_at_drop",
               "macs_removed_at_drop", "steps", "initial_top1", "final_top1", "final_removed", "config", "protocol")
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
        run_id, step["step"], step.get("group"), test.get("top1"), test.get("top5"), test.get("loss"),
        step.get("percent_conv_removed"), step.get("percent_macs_removed"), step.get("conv_weights"), step.get("macs"),
        (step.get("proposers") or [[None]])[0][0], retrain["before"]["top1"] if retrain else None,
        retrain["after"]["top1"] if retrain else None, retrain.get("iters"))]


def write(store_location, out_dir) -> dict:
    """The finished runs of a sweep's store as an archive in ``out_dir`` (written atomically)."""
    from caffe_prune.store import Store
    out_dir = Path(out_dir)
    runs, steps = io.StringIO(), io.StringIO()
    run_writer, step_writer = csv.writer(runs, lineterminator="\n"), csv.writer(steps, lineterminator="\n")
    run_writer.writerow(RUN_COLUMNS)
    step_writer.writerow(STEP_COLUMNS)
    count = rows = 0
    with Store(store_location, create=False) as store:
        for row in sorted(store.runs(status="done"), key=lambda r: (r["net"], r["method"], r["seed"], r["id"])):
            run_writer.writerow([json.dumps(_scrub(row[c]), sort_keys=True) if c in JSON_COLUMNS and row[c] is not None
                                 else _cell(row[c]) for c in RUN_COLUMNS])
            for step in store.steps(row["id"]):
                step_writer.writerow(_step_row(row["id"], step))
                rows += 1
            count += 1
    fsio.write_text(out_dir / RUNS, runs.getvalue())
    fsio.write_bytes(out_dir / STEPS, gzip.compress(steps.getvalue().encode(), mtime=0))
    return {"runs": count, "steps": rows, "dir": str(out_dir)}


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
    values = {k: _number(v) for k, v in row.items() if k not in ("run_id", "proposer")}
    step = {"step": values["step"], "group": values["group"],
            "percent_conv_removed": values["percent_conv_removed"], "conv_weights": values["conv_weights"]}
    if values["top1"] is not None:
        step["test"] = {"top1": values["top1"], "top5": values["top5"], "loss": values["loss"]}
    if values["percent_macs_removed"] is not None:
        step["percent_macs_removed"], step["macs"] = values["percent_macs_removed"], values["macs"]
    if row["proposer"]:
        step["proposers"] = [[row["proposer"], None]]
    if values["retrain_after"] is not None:
        step["retrain"] = {"before": {"top1": values["retrain_before"]},
                           "after": {"top1": values["retrain_after"]}, "iters": values["retrain_iters"]}
    return step

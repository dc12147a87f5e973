"""A pruning run's directory: the one place that knows its files and how they are written and read.

A run (caffe_prune.pruning) lives in a directory of plain files that need no code to read:

- ``config.json``: the header: the configuration, the sha256 of the definition, the weights and
  the data, the protocol and versions; written atomically (caffe_prune.fsio). An empty or torn one
  (a kill during its first write, a damaged copy) reads as absent (``header_torn`` tells the two
  apart), and the run rebuilds it from the command, but only when the steps already there agree
  with the command (caffe_prune.pruning);
- ``steps.jsonl``: one JSON object per completed step (caffe_prune.steps: its schema), appended
  and fsync'ed; step 0 is the unpruned net. A torn last line (a kill during the append) is cut off when the file is read;
  nothing is ever rewritten in place;
- ``.lock``: held by the one process that runs the run (fsio.RunLock). Forked children never hold
  it (fsio closes it in every fork) and die with their parent (``die_with_parent``), so the lock of
  a killed run is free at once and the same command resumes it;
- with a prune-retrain schedule: ``retrain-<step>/`` (the training run directory of that
  retraining, caffe_prune.train) and ``retrained-<step>.caffemodel`` (the net it left).

Everything that reads a run (pruning's resume, finetune, the reports, a sweep's store) reads it
here: ``RunDir(path).read()`` gives the header and the complete steps (a torn last line is left for
the run's owner to cut off: it may be appending right now).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from caffe_prune import fsio
from caffe_prune import steps as step_records
from caffe_prune.errors import InputError

CONFIG, STEPS, LOCK = "config.json", "steps.jsonl", ".lock"


class RunDir:
    """A pruning run's directory (see the module docstring)."""

    def __init__(self, path):
        self.path = Path(path)

    def __str__(self):
        return str(self.path)

    # ---- the lock ----

    def lock(self) -> fsio.RunLock:
        """Take the run's lock (fsio.InUse names the live owner when another process has it)."""
        return fsio.RunLock(self.path).acquire()

    # ---- the header ----

    def header(self) -> dict | None:
        """config.json, or None when there is none or it is empty or torn (a kill during its first
        write: the caller rebuilds it)."""
        path = self.path / CONFIG
        if path.is_dir():
            raise InputError(f"{path} is a directory; the run directory is damaged: use another --out")
        try:
            header = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return None
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from None
        return header if isinstance(header, dict) and isinstance(header.get("config"), dict) else None

    def header_torn(self) -> bool:
        """Whether config.json is there but unreadable as a header (empty, torn, not a run's)."""
        return (self.path / CONFIG).is_file() and self.header() is None

    def write_header(self, header: dict) -> None:
        fsio.write_json(self.path / CONFIG, header)

    # ---- the steps ----

    def steps(self, groups: int | None = None, repair: bool = True) -> list:
        """The complete steps in the current schema, checked (caffe_prune.steps.check: step n on line
        n + 1, step 0 the unpruned net, every later one removing groups below ``groups`` not removed
        before). ``repair``: cut a torn last line off the file (the run's owner only; readers leave it)."""
        path = self.path / STEPS
        if path.is_dir():
            raise InputError(f"{path} is a directory; the run directory is damaged: use --force or another --out")
        records = []
        for line in fsio.complete_lines(path, repair):
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append(None)
        return step_records.check(records, groups, path)

    def append(self, record: dict) -> None:
        fsio.append_line(self.path / STEPS, json.dumps(record))

    # ---- reading a run as plain files ----

    def read(self) -> tuple:
        """(header, steps) of a run made by `caffe-prune prune`; InputError naming the directory
        when it is not one."""
        header = self.header() if (self.path / CONFIG).exists() else None
        if header is None or not (self.path / STEPS).is_file():
            raise InputError(f"{self.path} is not a pruning run directory (no readable {CONFIG} and {STEPS}; "
                              f"make one with `caffe-prune prune ... --out {self.path}`)")
        steps = self.steps(repair=False)
        if not steps:
            raise InputError(f"{self.path}/{STEPS} holds no step 0: the run has not started")
        return header, steps

    # ---- housekeeping ----

    def remove_temporaries(self) -> None:
        """Files a write killed before its rename left behind (only while holding the lock)."""
        for stale in self.path.glob(".*.tmp"):
            stale.unlink()

    def clear(self) -> None:
        """--force: remove another run's files (the lock stays ours)."""
        for entry in self.path.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    # ---- prune-retrain ----

    def retraining(self, step: int) -> Path:
        """The training run directory of the retraining after ``step``."""
        return self.path / f"retrain-{step}"

    def retrained(self, step: int) -> Path:
        """The caffemodel the retraining after ``step`` left."""
        return self.path / f"retrained-{step}.caffemodel"

    def retrained_weights(self, last_step: int, steps) -> Path | None:
        """The newest ``retrained-<s>.caffemodel`` with s <= last_step among the steps that record a
        retraining (what a resumed run must load before re-committing its masks)."""
        done = [s["step"] for s in steps if "retrain" in s and s["step"] <= last_step]
        for step in sorted(done, reverse=True):
            path = self.retrained(step)
            if path.is_file():
                return path
            raise InputError(f"{path} is missing, but step {step} of {self.path} records its retraining; the run "
                              f"directory is damaged: use --force (starts over) or another --out")
        return None

    def drop_old_snapshots(self, step: int) -> None:
        """The snapshots of earlier retrainings, whose steps are recorded (their caffemodels stay)."""
        for earlier in self.path.glob("retrain-*/snapshots"):
            if earlier.parent.name != f"retrain-{step}":
                for path in sorted(earlier.glob("*"), key=lambda p: p.suffix != ".solverstate"):
                    if path.is_file():
                        path.unlink()

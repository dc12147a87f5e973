"""A pruning run's step record: one schema, read and written here alone.

A run's ``steps.jsonl`` (caffe_prune.rundir) holds one JSON object per step; step 0 is the unpruned
net. A step removes one or more groups (caffe_prune.schedule says how many): ``groups`` lists their
ids in the order they were chosen, and ``proposers`` one list per group of who proposed it
([constituent, rank] pairs: the metric itself at its rank, or the oracle's constituents):

    {"step": 3, "groups": [17, 4], "proposers": [[["taylor", 0]], [["taylor", 1]]],
     "sensitivities": {"17": 0.002, ...},            # the oracle's measured candidates (oracle runs)
     "layers": [...], "channels": [[layer, index], ...],   # what the step's groups held
     "conv_weights": ..., "fc_weights": ..., "macs": ..., "params": ..., "percent_conv_removed": ...,
     "percent_macs_removed": ..., "active_channels": ...,  # what the state after the step keeps
     "test": {"top1", "top5", "loss", "images"},     # every test_interval steps
     "retrain": {...},                               # with a prune-retrain schedule
     "seconds": ..., "phase_seconds": {...}}

Runs written before several groups per step existed hold ``"group": id`` and ``"proposers"`` of that
one group; ``normalize`` reads them as ``groups: [id]`` (every reader goes through it: the resume,
the results store, the archive, the API, export, finetune, the reports), so they replay and report
as they did. ``check`` validates a run's records; ``pruned_of`` is the pruning state they leave, in
the order the groups were removed.
"""
from __future__ import annotations

from typing import TypedDict

from caffe_prune.errors import InputError

ARCHIVE_SEPARATOR = ";"      # the groups of a step in one cell of an archive's steps.csv.gz


class Step(TypedDict, total=False):
    """A step record as this module writes it (see the module docstring)."""
    step: int
    groups: list
    proposers: list
    sensitivities: dict
    layers: list
    channels: list
    test: dict
    retrain: dict
    seconds: float
    phase_seconds: dict


def normalize(record: dict) -> Step:
    """A record in the current schema: a legacy ``"group": id`` (or None at step 0) becomes
    ``"groups": [id]`` (``[]``), its proposers a list for that one group; the keys keep their order."""
    if "groups" in record or "group" not in record:
        return record
    out = {}
    for key, value in record.items():
        if key == "group":
            out["groups"] = [] if value is None else [value]
        elif key == "proposers":
            out["proposers"] = [value]
        else:
            out[key] = value
    return out


def groups_of(record: dict) -> list:
    """The group ids a step removed, in the order chosen (none at step 0)."""
    return list(normalize(record).get("groups") or [])


def proposers_of(record: dict) -> list:
    """One proposer list per group of the step ([[constituent, rank], ...])."""
    return list(normalize(record).get("proposers") or [])


def first_proposer(record: dict) -> str | None:
    """The constituent that first proposed the step's first group (the oracle's phase structure)."""
    proposers = proposers_of(record)
    return proposers[0][0][0] if proposers and proposers[0] else None


def proposer_names(records) -> set:
    """Every constituent the records name as a proposer: a metric run's metric, an oracle's constituents."""
    return {pair[0] for record in records for group in proposers_of(record) for pair in group if pair}


def pruned_of(records) -> list:
    """Every group the records removed, in the order they were removed."""
    return [g for record in records for g in groups_of(record)]


def record(step: int, groups: list, proposers: list, **fields) -> Step:
    """A new step's record, keys in the schema's order."""
    if len(proposers) != len(groups):
        raise ValueError(f"step {step}: {len(groups)} groups but {len(proposers)} proposer lists")
    return {"step": step, "groups": [int(g) for g in groups], "proposers": [[list(p) for p in ps] for ps in proposers],
            **fields}


def check(records, groups: int | None, where) -> list:
    """The records in the current schema, after checking that record n is step n, step 0 is the
    unpruned net with its test scores, and every later step removes at least one group id (below
    ``groups`` when given) that no step removed before; InputError naming the line otherwise."""
    out, seen = [], set()
    for number, raw in enumerate(records, 1):
        rec = normalize(raw) if isinstance(raw, dict) else None
        expected = len(out)
        ids = rec.get("groups") if rec is not None else None
        valid = rec is not None and rec.get("step") == expected and isinstance(ids, list) and \
            all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g < (groups or float("inf")) for g in ids) and \
            (not ids and isinstance(rec.get("test"), dict) if expected == 0 else bool(ids)) and \
            not (set(ids) & seen) and len(set(ids)) == len(ids)
        if not valid:
            raise InputError(f"{where}:{number} is not step {expected} of this run; the run directory "
                             f"is damaged: use --force (starts over) or another --out")
        seen.update(ids)
        out.append(rec)
    return out


def archive_cell(record: dict) -> str:
    """The step's groups as an archive cell: "17" for one group (as archives always held), "17;4"."""
    return ARCHIVE_SEPARATOR.join(str(g) for g in groups_of(record))


def from_archive_cell(text: str) -> list:
    return [int(g) for g in text.split(ARCHIVE_SEPARATOR)] if text else []

"""What a finished (or running) pruning run shows: its scores as it continued from a step, the last
step within a drop of test top-1, and papers/004 Table 2's figure, the % of conv weights (or of
MACs) removed there. Read by the run itself (its stop rule), the command line, sweeps and reports.

``DEFAULT_DROP``: Table 2 reads each run at "a drop in test accuracy of at most 5%" (points of
top-1 below the unpruned net); a run without a drop stop (Figure 6's whole curves) is read there
too. It is the default of ``pruning.Config.max_drop`` and of a SPEC's ``report_drop``.
"""
from __future__ import annotations

DEFAULT_DROP = 5.0


def drop_of(max_drop: float | None) -> float:
    """The drop a run is read at: its own stop's, or DEFAULT_DROP for a run without a drop stop."""
    return DEFAULT_DROP if max_drop is None else max_drop


def final_scores(step: dict) -> dict | None:
    """A step's test scores as the run continued from it: after its retraining when it had one."""
    return (step.get("retrain") or {}).get("after") or step.get("test")


def step_at_drop(steps: list, max_drop: float | None = DEFAULT_DROP) -> int:
    """The last measured step within `max_drop` points of the start (after its retraining, when it
    had one; DEFAULT_DROP when the run itself had no drop stop); 0 when none is."""
    max_drop = drop_of(max_drop)
    initial = 100 * steps[0]["test"]["top1"]
    best = 0
    for number, step in enumerate(steps[1:], 1):     # steps[n] is step n
        scores = final_scores(step)
        if scores is not None:
            if 100 * scores["top1"] < initial - max_drop:
                break
            best = number
    return best


def removed_at_drop(steps: list, max_drop: float | None = DEFAULT_DROP, measure: str = "percent_conv_removed") -> float:
    """% of conv weights removed at the last measured step within `max_drop` points of the start
    (papers/004 Table 2's figure); ``measure`` "percent_macs_removed": the % of MACs removed there."""
    at = step_at_drop(steps, max_drop)
    return steps[at][measure] if at else 0.0

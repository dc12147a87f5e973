"""The myopic oracle (papers/004 §4): compose saliency metrics by measuring what they propose.

Each constituent metric ranks the prunable groups, least salient first. The oracle visits the
constituents round-robin; each contributes its lowest-ranked group not already short-listed, until
k unique candidates exist (fewer when the rankings run out). Every candidate's *sensitivity* is the
cross-entropy on validation batches with the candidate's whole group masked (Θ_C zeroed) minus the
unmasked loss (eq. 6); the least sensitive candidate is pruned. Which constituent proposed it, and at
which rank, is the paper's "phase structure" and is recorded.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Proposal:
    """A short-listed group and who proposed it: (constituent name, 0-based rank in its list)."""
    group: int
    proposers: tuple


def shortlist(rankings: dict, k: int) -> list:
    """Round-robin over `rankings` ({metric: [group ids, least salient first]}), in the dict's order.

    A constituent whose next group is already listed moves on to its next lower-ranked one; an
    exhausted list is skipped. Every constituent that has a listed group at the *same* rank it
    would have contributed is recorded as a proposer, so agreement between metrics is visible."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    position = {name: 0 for name in rankings}
    chosen, proposers = [], {}
    while len(chosen) < k and any(position[n] < len(r) for n, r in rankings.items()):
        for name, ranking in rankings.items():
            if len(chosen) == k:
                break
            while position[name] < len(ranking) and ranking[position[name]] in proposers:
                proposers[ranking[position[name]]].append((name, position[name]))
                position[name] += 1
            if position[name] < len(ranking):
                group = ranking[position[name]]
                chosen.append(group)
                proposers[group] = [(name, position[name])]
                position[name] += 1
    return [Proposal(group, tuple(proposers[group])) for group in chosen]


def sensitivities(candidates, masker, loss_of) -> dict:
    """{group: loss with the group masked - loss unmasked} (eq. 6). `loss_of()` returns the mean
    cross-entropy on the oracle's validation batches for the current masks (committed groups stay
    masked throughout; each candidate is masked, measured and restored bit-exactly)."""
    base = loss_of()
    result = {}
    for group in candidates:
        masker.mask(group)
        try:
            result[group] = loss_of() - base
        finally:
            masker.restore(group)
    return result


def choose(sensitivity: dict) -> int:
    """The least sensitive candidate; ties go to the lowest group id (deterministic)."""
    return min(sensitivity, key=lambda group: (sensitivity[group], group))

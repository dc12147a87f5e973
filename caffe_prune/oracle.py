"""The myopic oracle (papers/004 §4): compose saliency metrics by measuring what they propose.

Each constituent metric ranks the prunable groups, least salient first. The oracle visits the
constituents round-robin; each contributes its lowest-ranked group not already short-listed, until
k unique candidates exist (fewer when the rankings run out). Every candidate's *sensitivity* is the
cross-entropy on validation batches with the candidate's whole group masked (Θ_C zeroed) minus the
unmasked loss (eq. 6); the least sensitive candidate is pruned (with a schedule of N groups per
step, the N least sensitive that may go: ``order``). Which constituent proposed it, and at
which rank, is the paper's "phase structure" and is recorded.

Two short-listing rules (``SHORTLISTS``): ``paper``, the text's (a constituent whose next group is
already listed moves on to its next one), and ``authors-code``, the authors' released
``get_k_channels`` (kaveena/myopic-oracle, utils.py): round i takes every constituent's rank-i
group in turn, and a constituent whose rank-i group is already listed contributes nothing that
round. The two can short-list different groups when the constituents agree early.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Proposal:
    """A short-listed group and who proposed it: (constituent name, 0-based rank in its list)."""
    group: int
    proposers: tuple


SHORTLISTS = ("paper", "authors-code")


def shortlist(rankings: dict, k: int, rule: str = "paper") -> list:
    """Round-robin over `rankings` ({metric: [group ids, least salient first]}), in the dict's order.

    ``paper``: a constituent whose next group is already listed moves on to its next lower-ranked
    one; an exhausted list is skipped. Every constituent that has a listed group at the *same* rank it
    would have contributed is recorded as a proposer, so agreement between metrics is visible.
    ``authors-code``: see ``shortlist_authors_code``."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if rule == "authors-code":
        return shortlist_authors_code(rankings, k)
    if rule != "paper":
        raise ValueError(f"unknown shortlist rule {rule!r}; one of {', '.join(SHORTLISTS)}")
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


def shortlist_authors_code(rankings: dict, k: int) -> list:
    """The authors' released rule (``get_k_channels``): for rank i = 0, 1, ..., each constituent in
    turn offers its rank-i group; one already listed is not replaced by the constituent's next
    group (deliberately unlike the paper's text, which ``shortlist(rule="paper")`` follows).
    Constituents whose rank-i group was already listed are recorded as its proposers at rank i.
    (Their loop also stops one rank short of the end and lists every channel when at most k are
    active; with rankings over the same groups neither changes the result, so neither is copied.)"""
    chosen, proposers = [], {}
    depth = max((len(r) for r in rankings.values()), default=0)
    for rank in range(depth):
        for name, ranking in rankings.items():
            if len(chosen) == k:
                break
            if rank >= len(ranking):
                continue
            group = ranking[rank]
            if group in proposers:
                proposers[group].append((name, rank))
            else:
                chosen.append(group)
                proposers[group] = [(name, rank)]
        if len(chosen) == k:
            break
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


def order(sensitivity: dict) -> list:
    """The candidates, least sensitive first; ties go to the lowest group id (deterministic). A step
    that removes N groups takes the first N that may go."""
    return sorted(sensitivity, key=lambda group: (sensitivity[group], group))


def choose(sensitivity: dict) -> int:
    """The least sensitive candidate (``order``'s first)."""
    return min(sensitivity, key=lambda group: (sensitivity[group], group))

"""How many groups a pruning step removes: Algorithm 1's one, or a schedule that reaches a budget in
a handful of steps (as Torch-Pruning's ``iterative_steps`` and NNI's sparsity schedules do).

A schedule is a plain function of the step (``Schedule.quota(step, state)``), asked by the run at
the start of each step; the step then takes groups in its own order (a metric's ranking, least
salient first; the oracle's measured candidates, least sensitive first), each one allowed by the
constraints (caffe_prune.constraints) and leaving every layer a channel, until the quota is met:

- ``--per-step N``: N groups (default 1: Algorithm 1 exactly, every decision as before);
- ``--per-step P%``: groups until they hold P% of the original prunable channels (a group of k tied
  channels counts k);
- ``--per-step P%macs``: groups until they save P% of the MACs left at the step's start;
- ``--steps S`` with ``--target KEY=F``: a geometric schedule, step i keeping at most F^(i/S) of
  the original KEY (MACs, parameters or conv weights), so that step S reaches the budget.

A step also stops taking groups as soon as the run's ``--target`` is met. The saliencies are those
of the step's start: a group's score is not re-read when a neighbour taken earlier in the same step
changes its Θ_C (one ranking per step, as Torch-Pruning's pruner scores once per step); only
whether it may still go is (its layer must keep a channel, the constraints must hold).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from caffe_prune.errors import InputError

TARGETS = {"macs": "macs", "params": "params", "weights": "conv_weights"}   # --target key -> Costs field
_PER_STEP = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|%macs)?\s*$")


def parse_per_step(text) -> tuple:
    """``--per-step`` as (kind, amount): ("groups", N), ("channels", P) or ("macs", P); a bad value is
    one InputError line."""
    found = _PER_STEP.match(str(text))
    if not found:
        raise InputError(f"--per-step {text!r}: give N (groups), P% (of the original prunable channels) or "
                         f"P%macs (of the MACs left), e.g. --per-step 16 or --per-step 5%")
    amount, unit = float(found.group(1)), found.group(2)
    if unit is None:
        if amount != int(amount) or amount < 1:
            raise InputError(f"--per-step {text}: a step removes a whole number of groups, at least 1")
        return "groups", int(amount)
    if not 0 < amount <= 100:
        raise InputError(f"--per-step {text}: the percentage must be in (0, 100]")
    return ("channels" if unit == "%" else "macs"), amount


def within(costs, original, target: dict | None) -> bool:
    """Every budget of ``target`` met: each cost at most its fraction of the original."""
    return bool(target) and all(getattr(costs, TARGETS[key]) <= fraction * getattr(original, TARGETS[key])
                                for key, fraction in target.items())


@dataclass(frozen=True)
class Quota:
    """What one step removes: ``kind`` groups (``amount`` of them), channels (at least ``amount``),
    macs (at least ``amount`` MACs saved from ``start_macs``) or goal (``goal``: {Costs field: most
    left})."""
    kind: str
    amount: float = 1
    start_macs: int = 0
    goal: tuple = ()

    def met(self, graph, taken: list, state) -> bool:
        if not taken:
            return False
        if self.kind == "groups":
            return len(taken) >= self.amount
        if self.kind == "channels":
            return sum(len(graph.groups[g].channels) for g in taken) >= self.amount
        costs = state.costs()
        if self.kind == "macs":
            return self.start_macs - costs.macs >= self.amount
        return all(getattr(costs, field) <= most for field, most in self.goal)


class Schedule:
    """The quota of every step of a run (see the module docstring)."""

    ONE = Quota("groups", 1)          # Algorithm 1: one group per step

    @staticmethod
    def check(per_step: str | None, in_steps: int | None, target: dict | None) -> None:
        """The schedule's arguments, each bad one a line."""
        if per_step is not None:
            parse_per_step(per_step)
        if per_step is not None and in_steps is not None:
            raise InputError("give --per-step or --steps, not both")
        if in_steps is not None and not target:
            raise InputError("--steps S needs a budget to reach in S steps: add --target KEY=FRACTION, e.g. macs=0.5")
        if in_steps is not None and in_steps < 1:
            raise InputError(f"--steps must be at least 1, got {in_steps}")

    def __init__(self, graph, original, per_step: str | None = None, in_steps: int | None = None,
                 target: dict | None = None):
        self.check(per_step, in_steps, target)
        self.graph, self.original, self.target, self.in_steps = graph, original, target, in_steps
        self.kind, self.amount = parse_per_step(per_step) if per_step is not None else ("groups", 1)
        if in_steps is not None:
            self.kind = "goal"
        self.channels = sum(len(g.channels) for g in graph.groups)

    def quota(self, step: int, state) -> Quota:
        if self.kind == "groups":
            return Quota("groups", self.amount)
        if self.kind == "channels":
            return Quota("channels", max(1, math.ceil(self.amount / 100 * self.channels)))
        if self.kind == "macs":
            macs = state.costs().macs
            return Quota("macs", self.amount / 100 * macs, start_macs=macs)
        share = min(1.0, step / self.in_steps)
        return Quota("goal", goal=tuple((TARGETS[key], fraction ** share * getattr(self.original, TARGETS[key]))
                                        for key, fraction in sorted(self.target.items())))

    def select(self, order, state, quota: Quota, constraints) -> list:
        """Take groups of ``order`` that may go into ``state`` (added to it), in order, until the quota or
        the run's target is met; then the constraints' widths are rounded (``constraints.round``)."""
        taken = []
        for group in order:
            if quota.met(self.graph, taken, state) or within(state.costs(), self.original, self.target):
                break
            if state.fits(group) and constraints.allowed(group, state):
                state.add(group)
                taken.append(group)
        return constraints.round(taken, state, order)

    def trial(self, order, state, quota: Quota, constraints) -> int:
        """How many groups of ``order`` ``select`` would take (the state is left as it was)."""
        taken = self.select(order, state, quota, constraints)
        for group in reversed(taken):
            state.remove(group)
        return len(taken)

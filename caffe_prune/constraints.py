"""Where a run may not prune, and the widths it must leave (``--keep``, ``--min-channels``,
``--max-layer-fraction``, ``--round-to``), asked by caffe_prune.schedule for every group a step
would take. Widths are a producer layer's output channels; a group removes channels from every
layer it ties (a residual stream's group takes one channel of each of its convolutions), so tied
layers keep equal widths and every rule below holds for each of them.

- ``keep``: producer layers matching any of the glob patterns are never touched (a pattern that
  matches no convolution is refused in one line);
- ``min_channels``: every layer keeps at least M channels;
- ``max_layer_fraction``: no layer loses more than F of its original channels;
- ``round_to``: after every step, each layer's width is a multiple of R or its original width (a
  step that would leave another width takes the next groups of its own order that bring the layer
  down to a multiple, or gives back its last groups on that layer until it is one again).
"""
from __future__ import annotations

import fnmatch

from caffe_prune.errors import InputError


class Constraints:
    def __init__(self, graph, keep=None, min_channels=None, max_layer_fraction=None, round_to=None):
        self.graph = graph
        self.original = {name: info.num_output for name, info in graph.producers.items()}
        self.check(min_channels, max_layer_fraction, round_to)
        self.kept = set()
        for pattern in keep or ():
            matched = fnmatch.filter(self.original, pattern)
            if not matched:
                shown = ", ".join(list(self.original)[:8]) + (", ..." if len(self.original) > 8 else "")
                raise InputError(f"--keep {pattern}: no convolution of the net matches it (they are {shown})")
            self.kept.update(matched)
        self.min_channels, self.max_fraction, self.round_to = min_channels, max_layer_fraction, round_to

    @staticmethod
    def check(min_channels=None, max_layer_fraction=None, round_to=None) -> None:
        """Refuse values no net could meet, in one line naming the flag."""
        for name, value, low in (("--min-channels", min_channels, 1), ("--round-to", round_to, 1)):
            if value is not None and value < low:
                raise InputError(f"{name} must be at least {low}, got {value}")
        if max_layer_fraction is not None and not 0 < max_layer_fraction <= 1:
            raise InputError(f"--max-layer-fraction must be in (0, 1], got {max_layer_fraction}")

    @classmethod
    def of(cls, config, graph) -> "Constraints":
        return cls(graph, config.keep, config.min_channels, config.max_layer_fraction, config.round_to)

    def __bool__(self) -> bool:
        return bool(self.kept or self.min_channels or self.max_fraction or self.round_to)

    def why_not(self, group: int, state) -> str | None:
        """Which constraint keeps ``group`` from going in ``state`` (None: none does)."""
        for layer, count in self.graph.takes(group).items():
            if layer in self.kept:
                return f"--keep {layer}"
            left = state.active(layer) - count
            if self.min_channels and left < self.min_channels:
                return f"--min-channels {self.min_channels}"
            if self.max_fraction and self.original[layer] - left > self.max_fraction * self.original[layer]:
                return f"--max-layer-fraction {self.max_fraction:g}"
        return None

    def allowed(self, group: int, state) -> bool:
        return not self or self.why_not(group, state) is None

    def _off(self, layers, state):
        """The first of ``layers`` whose width is neither its original nor a multiple of round_to."""
        return next((layer for layer in layers if state.active(layer) != self.original[layer]
                     and state.active(layer) % self.round_to), None)

    def round(self, taken: list, state, order) -> list:
        """``taken`` (already in ``state``) completed or cut back so that every width is allowed by
        round_to (see the module docstring)."""
        if not self.round_to or not taken:
            return taken
        taken, touched = list(taken), {}
        for group in taken:
            touched.update(dict.fromkeys(self.graph.takes(group)))
        for _ in range(4 * len(self.graph.groups) + 16):
            layer = self._off(touched, state)
            if layer is None:
                return taken
            extra = next((g for g in order if g not in state.pruned and layer in self.graph.takes(g)
                          and state.fits(g) and self.allowed(g, state)), None)
            if extra is not None:
                state.add(extra)
                taken.append(extra)
                touched.update(dict.fromkeys(self.graph.takes(extra)))
            else:
                last = next(g for g in reversed(taken) if layer in self.graph.takes(g))
                state.remove(last)
                taken.remove(last)
        for group in reversed(taken):          # cannot settle: the step takes nothing
            state.remove(group)
        return []

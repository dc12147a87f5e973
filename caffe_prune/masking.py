"""Channel masks written straight into the parameter blobs of the Caffe nets in use.

Pruning a group (caffe_prune.graph) zeroes, in every given ``caffe.Net`` (a TEST net, and a TRAIN
net that may share its params), the regions of Θ_C, its slices (``graph.group_slices``, the one
geometry export and the counts read too): the producers' filters and biases, the consumers' input
slices (a convolution's weights for that input channel, in the right group; an InnerProduct's block
of H*W inputs) and, under the default semantics, the per-channel riders.

Semantics (say which in every record):

- ``zero-downstream`` (default): a pruned channel contributes **nothing** downstream, which is what
  the physically smaller network computes. Zeroing only a convolution's filter and bias leaves the
  BatchNorm after it emitting ``-mean / sqrt(var + eps)`` and a Scale emitting ``beta``: a constant
  feature map that would still reach residual sums and pooling. So the riders are zeroed too:
  BatchNorm mean (then ``(0 - 0) / sqrt(var + eps) = 0``), Scale gamma and beta, Bias.
- ``authors``: the authors' release zeroed only the producer's filter and bias and the consumers'
  input slices; offered to emulate their runs (the constant above then survives through sums, but
  reaches only consumer slices that are masked too, so the logits are the same under both).

``mask`` is temporary (an oracle probe), ``restore`` puts back the original values bit for bit,
``commit`` makes a mask permanent for the run. Overlapping regions (a convolution that is both the
producer of one group and the consumer of another shares ``W[out, in]``) are handled by restoring
from one copy of the original parameters taken before any mask, then re-applying every other
group still masked on the layers touched.
"""
from __future__ import annotations

from caffe_prune.graph import group_slices

SEMANTICS = ("zero-downstream", "authors")


class MaskError(ValueError):
    """A mask request that makes no sense (unknown semantics, group not masked, ...)."""


def regions(graph, group, semantics: str = "zero-downstream"):
    """The (layer, blob index, numpy index) regions a group zeroes in the net's parameter blobs: its
    slices (caffe_prune.graph.group_slices) that masking zeroes; the riders only under the
    zero-downstream semantics."""
    if semantics not in SEMANTICS:
        raise MaskError(f"semantics {semantics!r} is not one of {', '.join(SEMANTICS)}")
    return [(s.layer, s.blob, s.index) for s in group_slices(graph, group)
            if s.zero and (s.role != "rider" or semantics == "zero-downstream")]


class Masker:
    """Masks groups in the params of `nets` (writes go to each; nets sharing blobs see them once)."""

    def __init__(self, graph, nets, semantics: str = "zero-downstream"):
        if semantics not in SEMANTICS:
            raise MaskError(f"semantics {semantics!r} is not one of {', '.join(SEMANTICS)}")
        self.graph, self.nets, self.semantics = graph, list(nets), semantics
        self.by_id = {g.id: g for g in graph.groups}
        self.committed: set[int] = set()
        self.probing: set[int] = set()
        self._regions = {}      # group id -> regions (computed once)
        self._original = {}     # (layer, blob) -> copy of the original values, taken at first touch

    def group_regions(self, group_id: int) -> list:
        """The (layer, blob, index) regions the group zeroes (masking.regions), computed once."""
        return self._group(group_id)

    def _group(self, group_id: int):
        if group_id not in self.by_id:
            raise MaskError(f"no group {group_id} in this graph ({len(self.by_id)} groups)")
        if group_id not in self._regions:
            self._regions[group_id] = regions(self.graph, self.by_id[group_id], self.semantics)
        return self._regions[group_id]

    def _write(self, group_id: int, values=None) -> None:
        """Zero a group's regions (values None) or write the original values back."""
        for layer, blob, index in self._group(group_id):
            key = (layer, blob)
            if key not in self._original:
                self._original[key] = self.nets[0].params[layer][blob].data.copy()
            for net in self.nets:
                target = net.params[layer][blob].data
                target[index] = 0 if values is None else self._original[key][index]

    @property
    def masked(self) -> set:
        return self.committed | self.probing

    def mask(self, group_id: int) -> None:
        """Temporarily remove a group (e.g. for an oracle probe); undo with restore."""
        if group_id in self.masked:
            raise MaskError(f"group {group_id} is already masked")
        self._write(group_id)
        self.probing.add(group_id)

    def restore(self, group_id: int) -> None:
        """Put a temporarily masked group's parameters back exactly as they were."""
        if group_id not in self.probing:
            raise MaskError(f"group {group_id} is not temporarily masked"
                            + (" (it is committed)" if group_id in self.committed else ""))
        self.probing.discard(group_id)
        self._write(group_id, values="original")
        touched = {layer for layer, _, _ in self._group(group_id)}
        for other in self.masked:    # re-zero what other masks share with the restored regions
            if touched & {layer for layer, _, _ in self._group(other)}:
                self._write(other)

    def commit(self, group_id: int) -> None:
        """Remove a group for the rest of the run (masked first if it was not)."""
        if group_id in self.committed:
            raise MaskError(f"group {group_id} is already committed")
        if group_id not in self.probing:
            self._write(group_id)
        self.probing.discard(group_id)
        self.committed.add(group_id)

    def restore_all(self) -> None:
        for group_id in sorted(self.probing):
            self.restore(group_id)


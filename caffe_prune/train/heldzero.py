"""Parameter regions held at exactly zero while Caffe's solver trains: a pruning run's pruned groups."""
from __future__ import annotations

import numpy as np

from caffe_prune.train.recipe import TrainError


class HeldZero:
    """Parameter regions (layer, blob, index) held at exactly 0 while a solver trains: the pruned groups.

    How: the masked regions of every parameter's *gradient* (blob diff) are zeroed in the solver's
    ``on_gradients_ready`` callback, after the backward and before the update, and the masked
    *weights* are zeroed in ``on_start``, before every forward (and before every snapshot, test and
    save). Why both: with the diff zeroed, every Caffe update rule leaves a weight that is 0, and whose
    history is 0, at exactly 0: SGD and Nesterov add weight decay wd*w = 0 (L1: wd*sign(0) = 0) and
    keep momentum*0 + lr*0 = 0 in the history; AdaGrad, RMSProp, AdaDelta and Adam accumulate 0 and
    step by a multiple of the zero gradient. So the history of a masked weight stays 0 too, from a
    fresh solver or from this module's own snapshots. Zeroing the weights at on_start makes the forward
    see exact zeros whatever the solver and whatever history a restored solverstate brings. pycaffe's
    ``.diff``/``.data`` accessors sync a GPU blob to the host and mark it changed, so the same code is
    exact in GPU mode (at the cost of a host round trip of the masked blobs per iteration). The test
    nets share these blobs (Net::ShareTrainedLayersWith), so they see the zeros as well.
    """

    def __init__(self, regions, shapes: dict, origin: str):
        self.origin = origin
        self.masks = {}
        for layer, blob, index in regions:
            key = (layer, int(blob))
            if key not in self.masks:
                self.masks[key] = np.zeros(shapes[key], dtype=bool)
            self.masks[key][index] = True
        self.net = None
        self._blobs = []

    @classmethod
    def of(cls, masker, groups, origin: str) -> "HeldZero":
        """The regions of ``groups`` in a caffe_prune.masking.Masker's graph, with its net's shapes."""
        regions = [r for g in sorted(groups) for r in masker.group_regions(g)]
        net = masker.nets[0]
        shapes = {(l, b): net.params[l][b].data.shape for l, b, _ in regions}
        return cls(regions, shapes, origin)

    @property
    def values(self) -> int:
        return int(sum(m.sum() for m in self.masks.values()))

    def bind(self, net, where: str) -> "HeldZero":
        """Check that ``net`` (the training net) has every masked blob with the same shape, and hold it."""
        for (layer, blob), mask in self.masks.items():
            have = net.params[layer][blob].data.shape if layer in net.params and blob < len(net.params[layer]) \
                else None
            if have != mask.shape:
                shown = "no such blob" if have is None else "x".join(map(str, have))
                raise TrainError(f"{where} does not fit {self.origin}: layer {layer!r} blob {blob} is "
                                 f"{'x'.join(map(str, mask.shape))} there and {shown} here (a run directory "
                                 f"from another network?)")
        self.net = net
        self._blobs = [(net.params[layer][blob], mask) for (layer, blob), mask in self.masks.items()]
        return self

    def zero_weights(self) -> None:
        for blob, mask in self._blobs:
            np.putmask(blob.data, mask, 0)

    def zero_gradients(self) -> None:
        for blob, mask in self._blobs:
            np.putmask(blob.diff, mask, 0)

    def nonzero(self, net=None) -> int:
        """Masked values that are not exactly 0 in ``net`` (default: the bound one)."""
        net = net or self.net
        return int(sum(np.count_nonzero(net.params[l][b].data[m]) for (l, b), m in self.masks.items()))

    def describe(self) -> dict:
        return {"origin": self.origin, "values": self.values,
                "blobs": sorted(f"{l}/{b}" for l, b in self.masks)}

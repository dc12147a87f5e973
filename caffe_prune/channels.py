"""The channels of a Caffe network, traced layer by layer: which convolution output channels each
tensor channel comes from, what ties them together, what reads them and what rides on them
(caffe_prune.graph makes the prunable groups of this).

``trace(net_param, shapes)`` walks the layers Caffe instantiates
(``phases.instantiated_layers``: the TEST phase, or the TRAIN phase for a definition saved from the
TRAIN net) in net order. ``shapes`` maps every blob name to its shape as Caffe computed it
(``{name: blob.data.shape for name, blob in net.blobs.items()}``): no shape inference is
re-implemented here. Each blob name holds the *current* tensor, so an in-place layer (top ==
bottom) writes a new version under the same name and later readers see it; auto-inserted Split
layers never appear in a NetParameter (Caffe adds them in ``Net::Init``), explicit Split layers pass
channels through, and data/Input layers start the graph.

A *unit* is ``Channel(layer, index)``: output channel ``index`` of Convolution ``layer``. Channel c
of a tensor is the set of units it comes from (empty for a channel no convolution produces: the
image, an InnerProduct output, whatever leaves a barrier). How each layer type moves channels is
its rule's ``trace`` in caffe_prune.layers (the one registry), which records what it finds through
the ``Tracer``'s methods (``tie``, ``pin``, ``new_units``, ``add_weighted``, ``add_riders``,
``barrier``, ...); by kind:

- ``pass`` (ReLU, Pooling, Dropout, LRN, BatchNorm, Scale, Bias, PReLU, Crop on spatial axes, ...)
  passes them through unchanged; across-channel LRN is noted in ``lrn_across`` (pruning a channel
  changes its neighbours' normalisation, a data dependence that is not a weight dependence). A layer
  with per-channel blobs (BatchNorm, Scale, Bias, PReLU) records *riders*: they fall with the channel
  (which blobs are sliced, which zeroed: their rule's ``rider_blobs`` and ``zero_blobs``).
- ``eltwise`` (SUM, PROD, MAX) ties the units of channel c of all inputs (papers/004 §3.2: the
  transitive closure, by union-find). ``concat`` and ``slice`` on axis 1 offset channels.
- ``conv`` consumes its input (channel i owns the weight slice [:, i % (M/g)]) and produces new
  units. Grouped convolution (papers/004 §3.1, AlexNet): a consumer with ``group`` g and M input
  channels ties input channels i and j when i % (M/g) == j % (M/g); a grouped producer with N
  outputs ties output channels i and j when i % (N/g) == j % (N/g) (Caffe needs every group to
  keep the same width: num_output % group == 0). A **depthwise** convolution (g == M > 1, a channel
  multiplier N/g) instead ties input channel c with its own group's outputs: they fall together and
  the layer loses a group (``ProducerInfo.depthwise``).
- ``fc`` (InnerProduct) consumes: channel c of a (N, C, H, W) input owns the weight columns
  [c*H*W, (c+1)*H*W) (rows with ``transpose``; Caffe flattens C, H, W in that order); a
  Flatten/Reshape in between keeps the mapping when it only flattens C, H, W.
- ``head`` (losses, Accuracy, Softmax) after an InnerProduct see classes, not channels. Units that
  reach one directly, or a net output (a blob no layer reads), are unprunable: they are what the
  network computes (NIN's cccp6: its 10 channels ARE the classes).
- A type with no rule, Concat/Slice on another axis, Eltwise with inputs of different channel counts,
  InnerProduct/Convolution on an axis other than 1, or a Flatten/Reshape that is not a pure
  flattening is a **barrier**: every unit reaching it is unprunable (``barriers`` {layer: reason},
  ``unprunable`` {Channel: reason}), and what leaves it carries no units.

Unprunability spreads over ties: a unit tied to an unprunable one (or, through an Eltwise or a
grouped consumer, to a channel no convolution produces) is unprunable too.

"""
from __future__ import annotations

import math

from caffe_prune import layers
from caffe_prune.errors import InputError
from caffe_prune.layers.units import Channel, ConsumerSlice, Rider, Tensor, tensor_of
from caffe_prune.phases import instantiated_layers


class Tracer:
    """One pass over the layers in net order: each layer's rule traces it through the methods below,
    which record ties (union-find), consumers, riders and barriers. What it found, read by
    caffe_prune.graph.ChannelGraph:

    - ``parent`` (with ``find`` and ``key``): the union-find over units, in net order; ``reasons``:
      unit -> why it cannot be pruned (the first reason kept);
    - ``producers`` {conv: ProducerInfo}, ``fc`` {InnerProduct: FcInfo}, ``conv_io`` {conv: (input
      tensor, its units)}, ``fc_input`` {InnerProduct: input tensor}, ``sizes`` {weighted layer:
      (bottom shape, top shape)};
    - ``consumers`` and ``riders``: (ConsumerSlice | Rider, the units of that channel);
      ``riding`` {rider layer: (type, blobs sliced, blobs zeroed)};
    - ``barriers`` {layer: reason}, ``lrn_across`` {layer: the units it couples};
    - ``slices`` {channel-axis Slice: the channels of each top} (export moves its slice points)."""

    def __init__(self, shapes):
        self.shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        self.tensors = {}
        self.unread = {}                  # blob -> whether its current version has no reader yet
        self.parent = {}                  # union-find over units, in net order
        self.order = {}                   # conv layer -> position in the net
        self.reasons = {}                 # unit -> why it cannot be pruned (first reason kept)
        self.producers, self.conv_io = {}, {}
        self.fc, self.fc_input = {}, {}
        self.consumers, self.riders = [], []   # (ConsumerSlice | Rider, units of that channel)
        self.riding = {}                       # rider layer -> (type, blobs sliced, blobs zeroed)
        self.barriers, self.lrn_across = {}, {}
        self.sizes = {}                        # weighted layer -> (bottom shape, top shape)
        self.slices = {}                       # channel-axis Slice -> the channel sets of each top

    # ---- union-find and unprunable units ----

    def key(self, unit):
        return self.order[unit.layer], unit.index

    def axis(self, axis, blob):
        """A Caffe axis parameter made non-negative (-3 of a 4-D blob is 1)."""
        return axis + len(self.shapes.get(blob, ())) if axis < 0 else axis

    def find(self, unit):
        root = unit
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[unit] != root:
            self.parent[unit], unit = root, self.parent[unit]
        return root

    def tie(self, channel_sets, why):
        """Tensor channels that must fall together; a set with no unit can never fall, so units
        tied to one are unprunable."""
        units = [u for s in channel_sets for u in s]
        self.union(units)
        if units and any(not s for s in channel_sets):
            self.pin(units, why)

    def union(self, units):
        for unit in units[1:]:
            self.parent[self.find(unit)] = self.find(units[0])

    def pin(self, units, why):
        for unit in units:
            self.reasons.setdefault(unit, why)

    # ---- what the rules record ----

    def new_units(self, layer: str, count: int) -> tuple:
        """The output channels of weighted layer ``layer`` as units, in net order."""
        units = tuple(Channel(layer, i) for i in range(count))
        self.parent.update((u, u) for u in units)
        self.order[layer] = len(self.order)
        return units

    def add_weighted(self, layer, info, x, units, kind: str) -> None:
        """A weighted layer (``kind`` "conv": a producer with its ``units``; "fc": an InnerProduct)
        reading tensor ``x``: its geometry, its input, its sizes and, for every channel of ``x``
        that some convolution produces, a consumer slice."""
        if kind == "conv":
            self.producers[layer.name], self.conv_io[layer.name] = info, (x, units)
        else:
            self.fc[layer.name], self.fc_input[layer.name] = info, x
        self.sizes[layer.name] = (self.shapes.get(layer.bottom[0], ()), self.shapes.get(layer.top[0], ()))
        if kind == "conv" or info.in_channels is not None:
            self.consumers += [(ConsumerSlice(layer.name, kind, i), s) for i, s in enumerate(x.channels) if s]

    def add_riders(self, layer, x, sliced: tuple, zeroed: tuple) -> None:
        """Per-channel parameters of ``layer`` that fall with the channels of ``x`` they ride on."""
        self.riders += [(Rider(layer.name, layer.type, c), s) for c, s in enumerate(x.channels)]
        self.riding[layer.name] = (layer.type, sliced, zeroed)

    def add_slice(self, layer, tops) -> None:
        """A Slice on the channel axis cuts its input into ``tops``: export writes its slice points
        from the channels each keeps."""
        self.slices[layer.name] = tuple(t.channels for t in tops)

    def note_coupling(self, layer, x) -> None:
        """``layer`` mixes neighbouring channels of ``x`` without parameters (across-channel LRN)."""
        self.lrn_across[layer.name] = tuple(u for s in x.channels for u in sorted(s, key=self.key))

    def same_channels(self, x, top) -> Tensor:
        """``x``'s channels as blob ``top`` of a pass-through layer (its own spatial size)."""
        shape = self.shapes.get(top)
        block = x.block if x.block is None or shape is None else math.prod(shape[2:])
        return Tensor(x.channels, block)

    def barrier(self, layer, bottoms, why):
        """Everything reaching ``layer`` is unprunable; what leaves it carries no units."""
        self.barriers[layer.name] = why
        self.pin([u for t in bottoms for s in t.channels for u in s], f"reaches barrier {layer.name!r}: {why}")
        return self.fresh(layer)

    def shape(self, blob, layer):
        if blob not in self.shapes:
            raise InputError(f"layer {layer.name!r}: the shapes given hold no blob {blob!r}")
        return self.shapes[blob]

    def check_width(self, blob, tensor, layer):
        shape = self.shapes.get(blob)
        if shape is not None and len(shape) >= 2 and shape[1] != len(tensor.channels):
            raise InputError(f"layer {layer.name!r}: shapes give {blob!r} {shape[1]} channels, "
                             f"the graph traced {len(tensor.channels)}; shapes from another net?")

    def fresh(self, layer):
        """Tensors with no units for every top of ``layer``."""
        return [tensor_of(self.shapes.get(top)) for top in layer.top]

    # ---- the walk ----

    def visit(self, layer):
        for blob in layer.bottom:
            if blob not in self.tensors:
                raise InputError(f"layer {layer.name!r} reads blob {blob!r} that no earlier layer produces")
            self.unread[blob] = False
        bottoms = [self.tensors[b] for b in layer.bottom]
        rule = layers.rule(layer)
        why = rule.barrier(layer, self.axis)
        outs = self.barrier(layer, bottoms, why) if why else rule.trace(self, layer, bottoms)
        self.tensors.update(zip(layer.top, outs))
        self.unread.update((top, True) for top in layer.top)

    def outputs(self):
        """Units of the net's outputs (blobs no layer reads) are the network's interface: pinned."""
        for blob, unread in self.unread.items():
            if unread:
                self.pin([u for s in self.tensors[blob].channels for u in s],
                         f"reaches the net output {blob!r}: its channels are what the network computes")


def trace(net_param, shapes) -> Tracer:
    """The traversal of ``net_param``'s layers (TEST phase) with blob shapes as Caffe computed them."""
    if net_param.layers:
        raise InputError(f"net {net_param.name!r} uses the V1 'layers' field; upgrade it with "
                         f"Caffe's upgrade_net_proto_text")
    tracer = Tracer(shapes)
    tracer.tensors.update((name, tensor_of(tracer.shapes.get(name))) for name in net_param.input)
    for layer in instantiated_layers(net_param):
        tracer.visit(layer)
    tracer.outputs()
    return tracer

"""The channels of a Caffe network, traced layer by layer: which convolution output channels each
tensor channel comes from, what ties them together, what reads them and what rides on them
(caffe_prune.graph makes the prunable groups of this).

``trace(net_param, shapes)`` walks the layers Caffe instantiates
(``pycaffe.instantiated_layers``: the TEST phase, or the TRAIN phase for a definition saved from the
TRAIN net) in net order. ``shapes`` maps every blob name to its shape as Caffe computed it
(``{name: blob.data.shape for name, blob in net.blobs.items()}``): no shape inference is
re-implemented here. Each blob name holds the *current* tensor, so an in-place layer (top ==
bottom) writes a new version under the same name and later readers see it; auto-inserted Split
layers never appear in a NetParameter (Caffe adds them in ``Net::Init``), explicit Split layers pass
channels through, and data/Input layers start the graph.

A *unit* is ``Channel(layer, index)``: output channel ``index`` of Convolution ``layer``. Channel c
of a tensor is the set of units it comes from (empty for a channel no convolution produces: the
image, an InnerProduct output, whatever leaves a barrier). How each layer type moves channels is
its ``kind`` in caffe_prune.layers (the one registry):

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
from dataclasses import dataclass, field
from typing import NamedTuple

from caffe_prune import layers
from caffe_prune.pycaffe import instantiated_layers
from caffe_prune.errors import InputError

NO_UNITS = frozenset()


@dataclass(frozen=True)
class Channel:
    """A unit: output channel ``index`` of Convolution ``layer`` (papers/004 §3: A_i, made by W_i)."""
    layer: str
    index: int

    def __str__(self):
        return f"{self.layer}:{self.index}"


@dataclass(frozen=True)
class ConsumerSlice:
    """Input channel ``input_channel`` of ``layer``: a [:, c] weight slice ("conv") or a block of
    H*W weight columns ("fc"); removed with the channel."""
    layer: str
    kind: str
    input_channel: int


@dataclass(frozen=True)
class Rider:
    """Channel ``channel`` of a BatchNorm/Scale/Bias/PReLU layer's per-channel parameters."""
    layer: str
    type: str
    channel: int


@dataclass(frozen=True)
class ProducerInfo:
    """A Convolution's (or Deconvolution's) weights: num_output x (in_channels / group) x
    kernel_area (a Deconvolution stores them in_channels x (num_output / group) x kernel_area).

    ``depthwise``: every group reads exactly one input channel (group == in_channels > 1, a
    MobileNet depthwise or channel-multiplier convolution). Removing input channel c then removes
    the whole group c (its num_output / group outputs) and lowers ``group`` by one, instead of
    tying channel c to every other group's channel as AlexNet's two groups require. ``type`` is
    the layer's type, whose rule (caffe_prune.layers) gives the slice geometry."""
    num_output: int
    group: int
    kernel_area: int
    in_channels: int
    bias: bool
    depthwise: bool = False
    type: str = field(default="", compare=False)


class FcInfo(NamedTuple):
    """An InnerProduct's weights: num_output x (in_channels * block) columns (rows when
    ``transpose``, Caffe's inner_product_param.transpose, stores the matrix the other way)."""
    num_output: int
    in_channels: int | None
    block: int
    transpose: bool = False


class _Tensor(NamedTuple):
    channels: tuple      # one frozenset of units per channel
    block: int | None    # elements per channel (H*W); None for an InnerProduct's output


def _tensor_of(shape) -> _Tensor:
    """A tensor no convolution's units reach (data, or whatever leaves a barrier)."""
    if shape is None or len(shape) < 2:
        return _Tensor((), None)
    return _Tensor((NO_UNITS,) * shape[1], math.prod(shape[2:]))


class _Builder:
    """One pass over the layers in net order, recording ties (union-find), consumers and riders.
    How each layer type is followed comes from caffe_prune.layers (its ``kind``)."""

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
        return [_tensor_of(self.shapes.get(top)) for top in layer.top]

    # ---- layers ----

    def visit(self, layer):
        for blob in layer.bottom:
            if blob not in self.tensors:
                raise InputError(f"layer {layer.name!r} reads blob {blob!r} that no earlier layer produces")
            self.unread[blob] = False
        bottoms = [self.tensors[b] for b in layer.bottom]
        rule = layers.rule(layer.type)
        kind = rule.kind
        why = rule.barrier(layer, self.axis) if kind not in ("barrier", "data", "head") else None
        if why:
            kind = "barrier"
        if kind == "data":
            outs = self.fresh(layer)
        elif kind == "head":
            self.pin([u for t in bottoms for s in t.channels for u in s],
                     f"reaches {layer.type} {layer.name!r} with no InnerProduct in between: "
                     f"its channels are the classes")
            outs = self.fresh(layer)
        elif kind == "barrier":
            outs = self.barrier(layer, bottoms, why or f"layer type {layer.type!r} is not one the channel graph follows")
        else:
            outs = getattr(self, f"on_{kind}")(layer, bottoms)
        self.tensors.update(zip(layer.top, outs))
        self.unread.update((top, True) for top in layer.top)

    def outputs(self):
        """Units of the net's outputs (blobs no layer reads) are the network's interface: pinned."""
        for blob, unread in self.unread.items():
            if unread:
                self.pin([u for s in self.tensors[blob].channels for u in s],
                         f"reaches the net output {blob!r}: its channels are what the network computes")

    def barrier(self, layer, bottoms, why):
        self.barriers[layer.name] = why
        self.pin([u for t in bottoms for s in t.channels for u in s], f"reaches barrier {layer.name!r}: {why}")
        return self.fresh(layer)

    def on_sink(self, layer, bottoms):
        return []

    def on_pass(self, layer, bottoms):
        x, rule = bottoms[0], layers.rule(layer.type)
        if rule.rider_blobs(layer):
            self.riders += [(Rider(layer.name, layer.type, c), s) for c, s in enumerate(x.channels)]
            self.riding[layer.name] = (layer.type, rule.rider_blobs(layer), rule.zero_blobs(layer))
        if rule.couples(layer):
            self.lrn_across[layer.name] = tuple(u for s in x.channels for u in sorted(s, key=self.key))
        outs = []
        for top in layer.top:
            shape = self.shapes.get(top)
            block = x.block if x.block is None or shape is None else math.prod(shape[2:])
            outs.append(_Tensor(x.channels, block))
        return outs

    def on_flatten(self, layer, bottoms):
        """Keep the channels when the top is (N, C*H*W), or the shape is unchanged: an InnerProduct
        after it sees the same columns as without it (Caffe blobs are row-major N, C, H, W)."""
        x = bottoms[0]
        top = self.shape(layer.top[0], layer)
        if top == self.shapes.get(layer.bottom[0]) or top[1:] == (len(x.channels) * (x.block or 1),):
            return [x]
        return self.barrier(layer, bottoms, f"{layer.type} to {top} is not a pure flattening of C, H, W")

    def on_eltwise(self, layer, bottoms):
        widths = [len(t.channels) for t in bottoms]
        if len(set(widths)) > 1:
            return self.barrier(layer, bottoms, f"Eltwise inputs have {widths} channels")
        why = f"is added by Eltwise {layer.name!r} to a channel no convolution produces"
        for c in range(widths[0]):
            self.tie([t.channels[c] for t in bottoms], why)
        channels = tuple(NO_UNITS.union(*(t.channels[c] for t in bottoms)) for c in range(widths[0]))
        shape = self.shapes.get(layer.top[0])
        block = None if bottoms[0].block is None or shape is None else math.prod(shape[2:])
        return [_Tensor(channels, block)]

    def on_concat(self, layer, bottoms):
        shape = self.shape(layer.top[0], layer)
        return [_Tensor(sum((t.channels for t in bottoms), ()), math.prod(shape[2:]))]

    def on_slice(self, layer, bottoms):
        """Slice on the channel axis: each top takes its range of the input's channels."""
        x, outs, start = bottoms[0], [], 0
        for top in layer.top:
            width = self.shape(top, layer)[1]
            outs.append(_Tensor(x.channels[start:start + width], x.block))
            start += width
        return outs

    def on_conv(self, layer, bottoms):
        """A Convolution or Deconvolution: the ties are the same (their weights differ in layout
        only, which the layer rule's slice geometry answers)."""
        cp = layer.convolution_param
        x, out_shape = bottoms[0], self.shape(layer.top[0], layer)
        self.check_width(layer.bottom[0], x, layer)
        m, n, g = len(x.channels), out_shape[1], cp.group
        if n != cp.num_output or m % g or n % g:
            raise InputError(f"layer {layer.name!r}: {m} inputs, {n} outputs in shapes "
                                     f"(num_output {cp.num_output}), group {g} do not fit")
        units = tuple(Channel(layer.name, i) for i in range(n))
        self.parent.update((u, u) for u in units)
        self.order[layer.name] = len(self.order)
        per_in, per_out = m // g, n // g
        depthwise = g > 1 and per_in == 1
        if depthwise:
            # input channel c feeds group c alone: they fall together, and the group count drops
            for c in range(m):
                self.tie([x.channels[c], frozenset(units[c * per_out:(c + 1) * per_out])],
                         f"feeds depthwise Convolution {layer.name!r} from a channel no convolution produces")
        else:
            # consumer side, papers/004 §3.1: input channels i, i + M/g, ... share a weight slice
            for i in range(per_in):
                self.tie([x.channels[i + k * per_in] for k in range(g)],
                         f"is tied by grouped Convolution {layer.name!r} to a channel no convolution produces")
            # producer side: a grouped producer keeps its groups equal
            for i in range(per_out):
                self.union(units[i::per_out])
        self.consumers += [(ConsumerSlice(layer.name, "conv", i), s) for i, s in enumerate(x.channels) if s]
        if cp.kernel_h or cp.kernel_w:
            kernel_area = cp.kernel_h * cp.kernel_w
        else:
            sizes = list(cp.kernel_size)
            kernel_area = math.prod(sizes * (len(out_shape) - 2) if len(sizes) == 1 else sizes)
        self.producers[layer.name] = ProducerInfo(n, g, kernel_area, m, cp.bias_term, depthwise, layer.type)
        self.conv_io[layer.name] = (x, units)
        self.sizes[layer.name] = (self.shapes.get(layer.bottom[0], ()), out_shape)
        return [_Tensor(tuple(frozenset([u]) for u in units), math.prod(out_shape[2:]))]

    def on_fc(self, layer, bottoms):
        ip = layer.inner_product_param
        x, size = bottoms[0], math.prod(self.shape(layer.bottom[0], layer)[1:])
        if x.block is None:       # fed by an InnerProduct: no channels, one block that never falls
            self.fc[layer.name] = FcInfo(ip.num_output, None, size, ip.transpose)
        else:
            if len(x.channels) * x.block != size:
                raise InputError(f"layer {layer.name!r}: {len(x.channels)} channels of {x.block} "
                                         f"do not make its {size} inputs; shapes from another net?")
            self.fc[layer.name] = FcInfo(ip.num_output, len(x.channels), x.block, ip.transpose)
            self.consumers += [(ConsumerSlice(layer.name, "fc", c), s) for c, s in enumerate(x.channels) if s]
        self.fc_input[layer.name] = x
        self.sizes[layer.name] = (self.shapes.get(layer.bottom[0], ()), self.shapes.get(layer.top[0], ()))
        return [_Tensor((NO_UNITS,) * ip.num_output, None)]


def trace(net_param, shapes) -> _Builder:
    """The traversal of ``net_param``'s layers (TEST phase) with blob shapes as Caffe computed them."""
    if net_param.layers:
        raise InputError(f"net {net_param.name!r} uses the V1 'layers' field; upgrade it with "
                          f"Caffe's upgrade_net_proto_text")
    builder = _Builder(shapes)
    builder.tensors.update((name, _tensor_of(builder.shapes.get(name))) for name in net_param.input)
    for layer in instantiated_layers(net_param):
        builder.visit(layer)
    builder.outputs()
    return builder

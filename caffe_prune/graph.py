"""The channel dependency graph of a Caffe network: prunable groups and the weights they remove.

Papers/004 §3 ("Pruning and Non-Linear Data Dependence") and the Domino paper: removing output
channel c of a convolution removes its filter and bias (the *producer* side), the input slices of
every layer that reads that feature map (the *consumer* side: convolutions, InnerProducts), and the
per-channel parameters riding on it (BatchNorm mean/variance, Scale gamma/beta, Bias). Branches tie
channels together, so the unit of pruning is a **group**: every producer channel that must go with
it to keep every tensor dense, and Θ_C, every parameter removed with the group.

Building
--------
``ChannelGraph.build(net_param, shapes)`` walks the layers Caffe instantiates
(``engine.instantiated_layers``: the TEST phase, or the TRAIN phase for a definition saved from the
TRAIN net) in net order. ``shapes`` maps every blob name to its shape as Caffe computed it
(``{name: blob.data.shape for name, blob in net.blobs.items()}``): no shape inference is
re-implemented here. Each blob name holds the *current* tensor, so an in-place layer (top ==
bottom) writes a new version under the same name and later readers see it; auto-inserted Split
layers never appear in a NetParameter (Caffe adds them in ``Net::Init``), explicit Split layers pass
channels through, and data/Input layers start the graph. ``build_graph(net_param, input_shape)``
builds ``netdef.structure_form`` (data layers as one Input, label readers dropped) once in Caffe.

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

Groups and counts
-----------------
``graph.groups`` (a tuple: the graph is immutable) holds every prunable unit in exactly one
``Group``: frozen, with ``id`` (stable order: by first producer layer in net order, then smallest
channel), ``channels`` (sorted the same way), ``consumers`` (``ConsumerSlice(layer, kind,
input_channel)``, kind "conv" or "fc", input_channel the index in the consumer's input tensor),
``riders`` (``Rider(layer, type, channel)``) and ``layers`` (the producer layers it touches);
``group.details()`` prints it. ``graph.producers`` {conv: ProducerInfo(num_output, group,
kernel_area, in_channels, bias)}; ``graph.fc`` {InnerProduct: FcInfo(num_output, in_channels,
block)}, in_channels the channel count of the feeding tensor and block = H*W per channel (1 after
global pooling); for an InnerProduct fed by another InnerProduct in_channels is None and block is
its whole input size.

The caller holds the pruning state, a set ``pruned`` of group ids. A tensor channel is active while
none of its units' groups is pruned (an Eltwise output channel: its tied units fall together).

- ``active(layer, pruned)``: output channels of conv ``layer`` still present.
- ``conv_weights(pruned)``: sum over convs of active_out * (active_in / g) * kernel_area.
- ``fc_weights(pruned)``: sum over InnerProducts of num_output * active_in * block.
- ``weights_removed(gid, pruned)`` = conv_weights(pruned) - conv_weights(pruned | {gid}), and
  ``fc_weights_removed`` the same for fc: Θ_C counted transitively in the current state (removing
  conv2 channel 0 after conv1 channel 0 removes one input slice fewer).
- ``percent_conv_removed(pruned)`` = 100 * (1 - conv_weights(pruned) / conv_weights(set())),
  papers/004 Figure 6's x-axis.
- ``prunable(pruned)``: ids of groups not yet pruned whose removal leaves every producer layer
  they touch (and, for a grouped producer, every one of its groups) at least one active channel.

Slices and costs
----------------
``group_slices(graph, group)`` (also ``group.slices``) is the one geometry of a group: the
``layers.Slice``s (layer, blob, axis, positions) of every parameter blob that falls with it, as
each layer type's rule in caffe_prune.layers states them (a convolution's filter row and its
consumers' input columns, a deconvolution's the other way round, an InnerProduct's block of
columns, the riders' entries). Masking zeroes them, export deletes them along their axis, held-zero
training holds them, and every count reads them: ``costs(pruned)`` is what a pruning state leaves,
counted on the blobs the compact network would have (each parameter blob's shape less the distinct
positions removed along each axis): convolution and InnerProduct weights, multiply-accumulates per
image (a convolution's weights x its output positions, a deconvolution's x its input positions, an
InnerProduct's once) and all parameters; ``saved(gid, pruned)`` is what removing one more group
saves, touching only the layers it touches. ``conv_weights``, ``weights_removed`` and the other
counts above are these numbers. ``removed_positions(pruned)`` is what export deletes.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from caffe_prune import layers, netdef
from caffe_prune.engine import instantiated_layers
from caffe_prune.errors import EngineError

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
    type: str = field(default="Convolution", compare=False)


class FcInfo(NamedTuple):
    """An InnerProduct's weights: num_output x (in_channels * block) columns (rows when
    ``transpose``, Caffe's inner_product_param.transpose, stores the matrix the other way)."""
    num_output: int
    in_channels: int | None
    block: int
    transpose: bool = False


@dataclass(frozen=True)
class Group:
    """The units that must be pruned together, with what falls with them (Θ_C's structure), and
    ``slices``: the parameter-blob slices that fall with it (caffe_prune.layers.Slice)."""
    id: int
    channels: tuple
    consumers: tuple
    riders: tuple
    layers: tuple
    slices: tuple = field(default=(), compare=False, repr=False)

    def details(self) -> str:
        def by_layer(items, layer, index):
            rows = defaultdict(list)
            for item in items:
                rows[layer(item)].append(str(index(item)))
            return [f"    {name}: {', '.join(indices)}" for name, indices in rows.items()] or ["    -"]
        return "\n".join(
            [f"group {self.id}: {len(self.channels)} channel(s) in {', '.join(self.layers)}", "  channels:"]
            + by_layer(self.channels, lambda c: c.layer, lambda c: c.index)
            + ["  consumer input channels:"]
            + by_layer(self.consumers, lambda s: f"{s.layer} ({s.kind})", lambda s: s.input_channel)
            + ["  riders:"]
            + by_layer(self.riders, lambda r: f"{r.layer} ({r.type})", lambda r: r.channel))


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
            raise EngineError(f"layer {layer.name!r}: the shapes given hold no blob {blob!r}")
        return self.shapes[blob]

    def check_width(self, blob, tensor, layer):
        shape = self.shapes.get(blob)
        if shape is not None and len(shape) >= 2 and shape[1] != len(tensor.channels):
            raise EngineError(f"layer {layer.name!r}: shapes give {blob!r} {shape[1]} channels, "
                                     f"the graph traced {len(tensor.channels)}; shapes from another net?")

    def fresh(self, layer):
        """Tensors with no units for every top of ``layer``."""
        return [_tensor_of(self.shapes.get(top)) for top in layer.top]

    # ---- layers ----

    def visit(self, layer):
        for blob in layer.bottom:
            if blob not in self.tensors:
                raise EngineError(f"layer {layer.name!r} reads blob {blob!r} that no earlier layer produces")
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
            raise EngineError(f"layer {layer.name!r}: {m} inputs, {n} outputs in shapes "
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
                raise EngineError(f"layer {layer.name!r}: {len(x.channels)} channels of {x.block} "
                                         f"do not make its {size} inputs; shapes from another net?")
            self.fc[layer.name] = FcInfo(ip.num_output, len(x.channels), x.block, ip.transpose)
            self.consumers += [(ConsumerSlice(layer.name, "fc", c), s) for c, s in enumerate(x.channels) if s]
        self.fc_input[layer.name] = x
        self.sizes[layer.name] = (self.shapes.get(layer.bottom[0], ()), self.shapes.get(layer.top[0], ()))
        return [_Tensor((NO_UNITS,) * ip.num_output, None)]


class Costs(NamedTuple):
    """What a pruning state leaves (``ChannelGraph.costs``), or what a group's removal saves
    (``ChannelGraph.saved``): convolution and InnerProduct weights, multiply-accumulates per image
    (convolutions and InnerProducts as the compact network computes them), and all parameters
    (None when the graph was built without the parameter blobs' shapes)."""
    conv_weights: int
    fc_weights: int
    macs: int
    params: int | None

    def __sub__(self, other: "Costs") -> "Costs":
        return Costs(self.conv_weights - other.conv_weights, self.fc_weights - other.fc_weights,
                     self.macs - other.macs, None if self.params is None or other.params is None
                     else self.params - other.params)


class ChannelGraph:
    """Groups of units, the consumers and riders they take along, their slices, and the costs of
    any pruning state. Immutable after ``build``; the caller keeps the set of pruned group ids."""

    def __init__(self, builder: _Builder, params=None):
        """From a finished traversal; use ``ChannelGraph.build`` or ``build_graph``."""
        b = builder
        # unprunability spreads over ties: one reason per class, named on every unit
        class_reason = {}
        for unit, why in b.reasons.items():
            class_reason.setdefault(b.find(unit), (unit, why))
        unprunable, classes = {}, defaultdict(list)
        for unit in b.parent:
            root = b.find(unit)
            if root in class_reason:
                source, why = class_reason[root]
                unprunable[unit] = b.reasons.get(unit) or f"tied to {source}, which {why}"
            else:
                classes[root].append(unit)
        members = sorted((sorted(units, key=b.key) for units in classes.values()), key=lambda us: b.key(us[0]))
        gid_of = {unit: gid for gid, units in enumerate(members) for unit in units}
        self._never = len(members)        # index of the mask entry that is never set

        def gid(channel_set):             # every unit of one tensor channel is in one class
            return gid_of.get(next(iter(channel_set)), self._never) if channel_set else self._never

        self.producers = MappingProxyType(dict(b.producers))
        self.fc = MappingProxyType(dict(b.fc))
        self.barriers = MappingProxyType(dict(b.barriers))
        self.unprunable = MappingProxyType(unprunable)
        self.lrn_across = MappingProxyType(dict(b.lrn_across))
        self._gid_of = MappingProxyType(gid_of)
        attached = defaultdict(lambda: ([], []))
        for item, s in b.consumers:
            attached[gid(s)][0].append(item)
        for item, s in b.riders:
            attached[gid(s)][1].append(item)
        self.groups = tuple(
            Group(id=i, channels=tuple(units), consumers=tuple(attached[i][0]), riders=tuple(attached[i][1]),
                  layers=tuple(dict.fromkeys(u.layer for u in units)),
                  slices=self._slices(units, attached[i][0], attached[i][1], b.riding))
            for i, units in enumerate(members))

        # per-tensor-channel group ids, so that channel questions are a few numpy gathers
        def gids(channel_sets):
            return np.array([gid(s) for s in channel_sets], dtype=np.intp)
        self._conv = {name: (gids(x.channels), gids([{u} for u in units]))
                      for name, (x, units) in b.conv_io.items()}
        self._fc_in = {name: gids(x.channels) for name, x in b.fc_input.items()
                       if b.fc[name].in_channels is not None}

        # what each group takes from each (producer layer, conv group): prunable() keeps one of each
        # (a depthwise layer may lose whole groups: it keeps one channel in all)
        def conv_group(unit):
            info = self.producers[unit.layer]
            return unit.layer, 0 if info.depthwise else unit.index // (info.num_output // info.group)
        self._takes = [Counter(map(conv_group, g.channels)) for g in self.groups]
        self._weighed = self._weighed_layers(b, params)
        self._state = (None, None)

    def _slices(self, units, consumers, riders, riding) -> tuple:
        """The group's slices, as each layer type's rule states them (caffe_prune.layers)."""
        out = []
        for unit in units:
            info = self.producers[unit.layer]
            out += layers.rule(info.type).producer_slices(unit.layer, info, unit.index)
        for consumer in consumers:
            if consumer.kind == "conv":
                info = self.producers[consumer.layer]
                out += layers.rule(info.type).consumer_slices(consumer.layer, info, consumer.input_channel)
            else:
                out += layers.rule("InnerProduct").consumer_slices(consumer.layer, self.fc[consumer.layer],
                                                                   consumer.input_channel)
        for rider in riders:
            kind, sliced, zeroed = riding[rider.layer]
            out += layers.rule(kind).rider_slices(rider.layer, sliced, zeroed, rider.channel)
        return tuple(dict.fromkeys(out))

    def _weighed_layers(self, b, params) -> dict:
        """{layer: (what its weights count as, blob shapes, MACs per weight)} for the convolutions and
        InnerProducts, and (with ``params``, {layer: [blob shapes]} from Caffe) every layer with
        parameters, so that the counts of any state are the compact network's blob sizes."""
        weighed = {}
        for name, info in self.producers.items():
            rule = layers.rule(info.type)
            shapes = [rule.weight_shape(info)] + ([(info.num_output,)] if info.bias else [])
            weighed[name] = ("conv", shapes, rule.macs_per_weight(*b.sizes[name]))
        for name, info in self.fc.items():
            weighed[name] = ("fc", [layers.rule("InnerProduct").weight_shape(info)], 1)
        self._all_params = params is not None
        for name, shapes in (params or {}).items():
            shapes = [tuple(int(d) for d in shape) for shape in shapes]
            kind, _, per_weight = weighed.get(name, (None, None, 0))
            weighed[name] = (kind, shapes, per_weight)     # Caffe's own shapes, every blob
        return weighed

    @classmethod
    def build(cls, net_param, shapes, params=None) -> "ChannelGraph":
        """The graph of ``net_param`` (TEST phase), with blob shapes as Caffe computed them and,
        optionally, the parameter blobs' shapes ({layer: [shape, ...]}, for the parameter count)."""
        if net_param.layers:
            raise EngineError(f"net {net_param.name!r} uses the V1 'layers' field; upgrade it with "
                              f"Caffe's upgrade_net_proto_text")
        builder = _Builder(shapes)
        builder.tensors.update((name, _tensor_of(builder.shapes.get(name))) for name in net_param.input)
        for layer in instantiated_layers(net_param):
            builder.visit(layer)
        builder.outputs()
        return cls(builder, params)

    @classmethod
    def of_net(cls, net_param, net) -> "ChannelGraph":
        """The graph of ``net_param`` with blob and parameter shapes read from the caffe.Net built
        from it."""
        return cls.build(net_param, {name: blob.data.shape for name, blob in net.blobs.items()},
                         {name: [blob.data.shape for blob in blobs] for name, blobs in net.params.items()})

    # ---- a pruning state (a set of group ids) ----

    def _mask(self, pruned):
        mask = np.zeros(self._never + 1, dtype=bool)
        if pruned:
            ids = np.fromiter(pruned, dtype=np.intp, count=len(pruned))
            if ids.min() < 0 or ids.max() >= self._never:
                raise EngineError(f"pruned holds group ids outside 0..{self._never - 1}")
            mask[ids] = True
        return mask

    def group_of(self, layer: str, index: int) -> Group | None:
        """The group holding output channel ``index`` of conv ``layer`` (None if unprunable)."""
        gid = self._gid_of.get(Channel(layer, index))
        return None if gid is None else self.groups[gid]

    def active(self, layer: str, pruned) -> int:
        """Output channels of conv ``layer`` still present."""
        if layer not in self._conv:
            raise EngineError(f"{layer!r} is not a Convolution of this graph")
        return int(np.count_nonzero(~self._mask(pruned)[self._conv[layer][1]]))

    def present(self, layer: str, pruned, side: str = "output") -> np.ndarray:
        """One bool per channel, True while it is present in pruning state ``pruned``: the output
        channels of conv ``layer`` (``side="output"``), or the input channels of a conv or
        InnerProduct ``layer`` (``side="input"``; a channel no convolution produces is always
        present). What the saliency metrics' active counts and layer norms read."""
        mask = self._mask(pruned)
        if side == "output" and layer in self._conv:
            return ~mask[self._conv[layer][1]]
        if side == "input" and layer in self._conv:
            return ~mask[self._conv[layer][0]]
        if side == "input" and layer in self._fc_in:
            return ~mask[self._fc_in[layer]]
        raise EngineError(f"{layer!r} has no {side} channels in this graph (side is 'output' "
                          f"for a Convolution, 'input' for a Convolution or an InnerProduct fed channels)")

    def prunable(self, pruned) -> list:
        """Ids of groups not yet pruned whose removal leaves every producer layer they touch, and
        every group of a grouped producer, at least one active channel."""
        mask = self._mask(pruned)
        left = {}
        for name, (_, out_gids) in self._conv.items():
            info = self.producers[name]
            per_group = (~mask[out_gids]).reshape(1 if info.depthwise else info.group, -1).sum(axis=1)
            left.update(((name, k), int(count)) for k, count in enumerate(per_group))
        return [g.id for g in self.groups if not mask[g.id]
                and all(left[where] > count for where, count in self._takes[g.id].items())]

    # ---- slices and what they leave ----

    def _removed(self, pruned) -> dict:
        """{(layer, blob, axis): set of positions removed} in state ``pruned`` (the last state is
        kept: a step asks about one state many times)."""
        key = frozenset(pruned)
        if self._state[0] != key:
            self._mask(key)                                    # ids checked
            removed = defaultdict(set)
            for gid in key:
                for s in self.groups[gid].slices:
                    removed[(s.layer, s.blob, s.axis)].update(s.positions)
            per_layer = {name: self._layer_costs(name, removed) for name in self._weighed}
            self._state = (key, (removed, per_layer))
        return self._state[1]

    def _layer_costs(self, name, removed) -> tuple:
        """(conv weights, fc weights, MACs, parameters) that layer ``name`` keeps."""
        kind, shapes, per_weight = self._weighed[name]
        sizes = []
        for blob, shape in enumerate(shapes):
            size = 1
            for axis, dim in enumerate(shape):
                size *= dim - len(removed.get((name, blob, axis), ()))
            sizes.append(size)
        weights = sizes[0] if kind else 0
        return (weights if kind == "conv" else 0, weights if kind == "fc" else 0, weights * per_weight, sum(sizes))

    def costs(self, pruned) -> Costs:
        """What state ``pruned`` leaves (see the module docstring)."""
        _, per_layer = self._removed(pruned)
        totals = [sum(column) for column in zip(*per_layer.values())] or [0, 0, 0, 0]
        return Costs(*totals[:3], totals[3] if self._all_params else None)

    def saved(self, group_id: int, pruned) -> Costs:
        """What removing ``group_id`` saves in state ``pruned``: costs(pruned) - costs(pruned | {id}),
        computed on the layers the group touches only."""
        removed, per_layer = self._removed(pruned)
        if not 0 <= group_id < self._never:
            raise EngineError(f"no group {group_id}; the graph has groups 0..{self._never - 1}")
        added = defaultdict(set)
        for s in self.groups[group_id].slices:
            added[(s.layer, s.blob, s.axis)].update(s.positions)
        touched = {layer for layer, _, _ in added} & set(self._weighed)
        view = _Union(removed, added)
        before = [sum(per_layer[n][i] for n in touched) for i in range(4)]
        after = [sum(column) for column in zip(*(self._layer_costs(n, view) for n in touched))] or [0, 0, 0, 0]
        diff = [b - a for b, a in zip(before, after)]
        return Costs(*diff[:3], diff[3] if self._all_params else None)

    def removed_positions(self, pruned) -> dict:
        """{(layer, blob, axis): sorted positions} that export deletes for state ``pruned``; a grouped
        layer's groups must lose the same positions (the graph's ties make them)."""
        removed, _ = self._removed(pruned)
        within = defaultdict(lambda: defaultdict(set))
        for gid in pruned:
            for s in self.groups[gid].slices:
                if s.rows:
                    within[(s.layer, s.blob, s.axis)][s.rows].update(s.positions)
        for (layer, _, _), by_rows in within.items():
            info = self.producers[layer]
            kept = {frozenset(v) for v in by_rows.values()}
            if len(kept) > 1 or len(by_rows) != info.group:
                raise EngineError(f"layer {layer!r}: its groups lose different channels "
                                  f"{[sorted(v) for v in by_rows.values()]}; the graph's ties were violated")
        return {key: sorted(positions) for key, positions in removed.items() if positions}

    def conv_weights(self, pruned) -> int:
        """Convolution weights left: sum of active_out * (active_in / group) * kernel_area (a
        depthwise layer's groups read one input channel each, however many groups are left)."""
        return self.costs(pruned).conv_weights

    def fc_weights(self, pruned) -> int:
        """InnerProduct weights left: sum of num_output * active_in * block."""
        return self.costs(pruned).fc_weights

    def weights_removed(self, group_id: int, pruned) -> int:
        """Θ_C's convolution weights for ``group_id`` in the current state (papers/004 §3)."""
        return self.saved(group_id, pruned).conv_weights

    def fc_weights_removed(self, group_id: int, pruned) -> int:
        """Θ_C's InnerProduct weights for ``group_id`` in the current state."""
        return self.saved(group_id, pruned).fc_weights

    def percent_conv_removed(self, pruned) -> float:
        """100 * (1 - conv_weights(pruned) / conv_weights(set())): papers/004 Figure 6's x-axis."""
        return 100.0 * (1.0 - self.conv_weights(pruned) / self.conv_weights(set()))

    def layer_macs(self) -> dict:
        """{layer: multiply-accumulates per image} of the unpruned network's weighted layers."""
        _, per_layer = self._removed(set())
        return {name: costs[2] for name, costs in per_layer.items() if costs[2]}

    def chosen(self, ids) -> set:
        """The pruning state of groups ``ids`` taken in order, each refused when it would leave a
        layer without a channel (a layer keeps at least one)."""
        pruned = set()
        for i in ids:
            if not 0 <= i < len(self.groups):
                raise EngineError(f"no group {i}; the net has groups 0..{len(self.groups) - 1}")
            if i not in self.prunable(pruned) and i not in pruned:
                raise EngineError(f"with groups {sorted(pruned)} pruned, group {i} would leave "
                                  f"{', '.join(self.groups[i].layers)} without a channel (a layer keeps at least one)")
            pruned.add(i)
        return pruned

    def random_state(self, fraction: float, seed: int = 0) -> set:
        """A seeded random ``fraction`` of the groups, each drawn from what is still prunable."""
        if not 0 < fraction < 1:
            raise EngineError(f"the fraction of groups to prune must be in (0, 1), got {fraction}")
        rng, pruned = np.random.default_rng(seed), set()
        for _ in range(int(fraction * len(self.groups))):
            offered = self.prunable(pruned)
            if not offered:
                break
            pruned.add(int(rng.choice(offered)))
        return pruned


class _Union:
    """A read-only view of two {key: set} maps as their union (what a state plus one group removes)."""

    def __init__(self, base, added):
        self.base, self.added = base, added

    def get(self, key, default=()):
        extra = self.added.get(key)
        if not extra:
            return self.base.get(key, default)
        return self.base.get(key, set()) | extra


def group_slices(graph: ChannelGraph, group) -> tuple:
    """The parameter-blob slices that fall with ``group`` (a Group or its id): caffe_prune.layers.Slice."""
    return (graph.groups[group] if isinstance(group, int) else group).slices


def build_graph(net_param, input_shape=None) -> ChannelGraph:
    """The graph of a net's structure (caffe_prune.netdef.structure_form: its data layers as one
    Input of ``input_shape`` (C, H, W), found from the prototxt when None), with the blob and
    parameter shapes Caffe computes for it."""
    form = netdef.structure_form(net_param, input_shape)
    shapes = netdef.shapes(form)
    return ChannelGraph.build(form, shapes["blobs"], shapes["params"])

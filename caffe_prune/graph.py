"""The channel dependency graph of a Caffe network: prunable groups and the weights they remove.

Papers/004 §3 ("Pruning and Non-Linear Data Dependence") and the Domino paper: removing output
channel c of a convolution removes its filter and bias (the *producer* side), the input slices of
every layer that reads that feature map (the *consumer* side: convolutions, InnerProducts), and the
per-channel parameters riding on it (BatchNorm mean/variance, Scale gamma/beta, Bias). Branches tie
channels together, so the unit of pruning is a **group**: every producer channel that must go with
it to keep every tensor dense, and Θ_C, every parameter removed with the group.

The traversal (caffe_prune.channels.trace) follows each layer by its rule in caffe_prune.layers and
records units (``Channel(layer, index)``: output channel ``index`` of a convolution), their ties,
consumers, riders, barriers and unprunable units; ``ChannelGraph.build(net_param, shapes)`` makes
the groups of it. ``build_graph(net_param, input_shape)`` builds ``netdef.structure_form`` (data
layers as one Input, label readers dropped) once in Caffe for its shapes. Unprunability spreads
over ties: a unit tied to an unprunable one (or, through an Eltwise or a grouped consumer, to a
channel no convolution produces) is unprunable too.

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

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from caffe_prune import layers, netdef
from caffe_prune.channels import trace
from caffe_prune.layers.units import NO_UNITS, Channel, ConsumerSlice, FcInfo, ProducerInfo, Rider  # noqa: F401
from caffe_prune.errors import InputError


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

    def __init__(self, tracer, params=None):
        """From a finished traversal (caffe_prune.channels.Tracer); use ``ChannelGraph.build`` or
        ``build_graph``."""
        b = tracer
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
        self._slice_tops = {name: [gids(top) for top in tops] for name, tops in b.slices.items()}

        # what each group takes from each (producer layer, conv group): prunable() keeps one of each
        # (a depthwise layer may lose whole groups: it keeps one channel in all)
        def conv_group(unit):
            info = self.producers[unit.layer]
            return unit.layer, 0 if info.depthwise else unit.index // (info.num_output // info.group)
        self._takes = [Counter(map(conv_group, g.channels)) for g in self.groups]
        self._weighed = self._weighed_layers(b, params)
        self._state = (None, None)

    def _slices(self, units, consumers, riders, riding) -> tuple:
        """The group's slices, as each layer type's rule states them (caffe_prune.layers): its
        producers' filters, its consumers' input slices, its riders' entries."""
        weighted = {**self.producers, **self.fc}
        out = []
        for unit in units:
            info = self.producers[unit.layer]
            out += layers.rule(info.type).producer_slices(unit.layer, info, unit.index)
        for consumer in consumers:
            info = weighted[consumer.layer]
            out += layers.rule(info.type).consumer_slices(consumer.layer, info, consumer.input_channel)
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
            weighed[name] = ("fc", [layers.rule(info.type).weight_shape(info)], 1)
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
        return cls(trace(net_param, shapes), params)

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
                raise InputError(f"pruned holds group ids outside 0..{self._never - 1}")
            mask[ids] = True
        return mask

    def group_of(self, layer: str, index: int) -> Group | None:
        """The group holding output channel ``index`` of conv ``layer`` (None if unprunable)."""
        gid = self._gid_of.get(Channel(layer, index))
        return None if gid is None else self.groups[gid]

    def active(self, layer: str, pruned) -> int:
        """Output channels of conv ``layer`` still present."""
        if layer not in self._conv:
            raise InputError(f"{layer!r} is not a Convolution of this graph")
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
        raise InputError(f"{layer!r} has no {side} channels in this graph (side is 'output' "
                          f"for a Convolution, 'input' for a Convolution or an InnerProduct fed channels)")

    def _left(self, mask) -> dict:
        """{(producer layer, conv group): active output channels} in the state ``mask`` (a depthwise
        layer counts as one conv group: it may lose whole groups)."""
        left = {}
        for name, (_, out_gids) in self._conv.items():
            info = self.producers[name]
            per_group = (~mask[out_gids]).reshape(1 if info.depthwise else info.group, -1).sum(axis=1)
            left.update(((name, k), int(count)) for k, count in enumerate(per_group))
        return left

    def prunable(self, pruned) -> list:
        """Ids of groups not yet pruned whose removal leaves every producer layer they touch, and
        every group of a grouped producer, at least one active channel."""
        mask = self._mask(pruned)
        left = self._left(mask)
        return [g.id for g in self.groups if not mask[g.id]
                and all(left[where] > count for where, count in self._takes[g.id].items())]

    def slice_widths(self, layer: str, pruned) -> list | None:
        """The channels each top of channel-axis Slice ``layer`` keeps in state ``pruned`` (None for
        a layer that is not one): where export puts its slice points."""
        if layer not in self._slice_tops:
            return None
        mask = self._mask(pruned)
        return [int(np.count_nonzero(~mask[top])) for top in self._slice_tops[layer]]

    def takes(self, group_id: int) -> dict:
        """{producer layer: output channels} that removing the group takes from each layer."""
        out = Counter()
        for (layer, _), count in self._takes[group_id].items():
            out[layer] += count
        return dict(out)

    def state(self, pruned) -> "State":
        """The state ``pruned`` as a State that grows one group at a time (a step removing many)."""
        return State(self, pruned)

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
            raise InputError(f"no group {group_id}; the graph has groups 0..{self._never - 1}")
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
                raise InputError(f"layer {layer!r}: its groups lose different channels "
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
        """100 * (1 - conv_weights(pruned) / conv_weights(set())): papers/004 Figure 6's x-axis (0 for a
        net without convolution weights, an InnerProduct-only one)."""
        total = self.conv_weights(set())
        return 100.0 * (1.0 - self.conv_weights(pruned) / total) if total else 0.0

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
                raise InputError(f"no group {i}; the net has groups 0..{len(self.groups) - 1}")
            if i not in self.prunable(pruned) and i not in pruned:
                raise InputError(f"with groups {sorted(pruned)} pruned, group {i} would leave "
                                  f"{', '.join(self.groups[i].layers)} without a channel (a layer keeps at least one)")
            pruned.add(i)
        return pruned

    def random_state(self, fraction: float, seed: int = 0) -> set:
        """A seeded random ``fraction`` of the groups, each drawn from what is still prunable."""
        if not 0 < fraction < 1:
            raise InputError(f"the fraction of groups to prune must be in (0, 1), got {fraction}")
        rng, pruned = np.random.default_rng(seed), set()
        for _ in range(int(fraction * len(self.groups))):
            offered = self.prunable(pruned)
            if not offered:
                break
            pruned.add(int(rng.choice(offered)))
        return pruned


class State:
    """A pruning state that grows (and shrinks) one group at a time, with its costs and the active
    channels of every producer kept up to date: what a step that removes many groups asks after each
    one (caffe_prune.schedule), the same integers as ``graph.costs`` and ``graph.prunable`` of the
    same set, without recounting the whole net (touched layers only)."""

    def __init__(self, graph: ChannelGraph, pruned):
        self.graph, self.pruned = graph, set(pruned)
        removed, per_layer = graph._removed(self.pruned)
        self.removed = defaultdict(set, {key: set(v) for key, v in removed.items()})
        self.per_layer = dict(per_layer)
        self.left = graph._left(graph._mask(self.pruned))
        self.width = Counter()
        for (name, _), count in self.left.items():
            self.width[name] += count

    def fits(self, group_id: int) -> bool:
        """Not pruned, and removing it leaves every layer (and conv group) it touches a channel."""
        return group_id not in self.pruned and \
            all(self.left[where] > count for where, count in self.graph._takes[group_id].items())

    def add(self, group_id: int) -> None:
        self._change(group_id, +1)

    def remove(self, group_id: int) -> None:
        self._change(group_id, -1)

    def _change(self, group_id: int, sign: int) -> None:
        g = self.graph
        touched = set()
        for s in g.groups[group_id].slices:
            positions = self.removed[(s.layer, s.blob, s.axis)]
            (positions.update if sign > 0 else positions.difference_update)(s.positions)
            touched.add(s.layer)
        for name in touched & set(g._weighed):
            self.per_layer[name] = g._layer_costs(name, self.removed)
        for where, count in g._takes[group_id].items():
            self.left[where] -= sign * count
            self.width[where[0]] -= sign * count
        (self.pruned.add if sign > 0 else self.pruned.discard)(group_id)

    def costs(self) -> Costs:
        totals = [sum(column) for column in zip(*self.per_layer.values())] or [0, 0, 0, 0]
        return Costs(*totals[:3], totals[3] if self.graph._all_params else None)

    def active(self, layer: str) -> int:
        """Output channels of producer ``layer`` still present."""
        return self.width[layer]


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


__all__ = ["Channel", "ChannelGraph", "ConsumerSlice", "Costs", "FcInfo", "Group", "NO_UNITS", "ProducerInfo",
           "Rider", "State", "build_graph", "group_slices"]

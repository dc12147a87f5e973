"""From collected per-sample values to one saliency per channel, and to a ranking of groups.

``saliency(metric, tensors, graph, pruned)``: the mean over samples of the collected reduced
values (``collect``), the scaling across each layer in pruning state ``pruned``, and, for a Domino
metric, the aggregation over the channel's group. One float per channel of every group not pruned;
unprunable channels (``graph.unprunable``) are never scored.

``rank_groups(metric, tensors, graph, pruned)``: the groups that can still be pruned
(``graph.prunable(pruned)``), least salient first, as (group id, score). A plain metric scores a
group by the *minimum* over its channels: the group falls as soon as its least salient member is
chosen. A Domino metric already scores every member with the group's aggregate.

Scaling contexts (``taxonomy.Layer``), per item of a layer in the current state:

- feature maps: count = active count = H·W; present = the conv's output channels still present;
- filters W[o]: count = C/group · kh·kw; active count = the input channels of o's group still
  present x kh·kw; present = the output channels still present;
- a convolution's input slice W[outputs of group(i), i]: count = num_output/group · kh·kw; active
  count = that group's output channels still present x kh·kw; present = the input channels still
  present (layer norms run over the consumer's slices);
- an InnerProduct's block of channel c: count = active count = num_output · block;
- Θ_C (``weights_removed``) = ``graph.weights_removed`` + ``graph.fc_weights_removed`` of the
  item's group, and its MACs (``macs_removed``) = ``graph.saved(...).macs``, the same for every
  item of a group (NaN for an unprunable item).
"""
from __future__ import annotations

import numpy as np

from caffe_prune.metrics.taxonomy import Layer, Metric, MetricError, parse

AGGREGATIONS = {"sum": np.sum, "mean": np.mean, "max": np.max}


def _metric(metric) -> Metric:
    return metric if isinstance(metric, Metric) else parse(metric)


def layer_saliencies(metric, tensors, graph, pruned=frozenset(), slices: bool = False) -> dict:
    """{(layer, side): scaled saliency per item} of a plain metric: the mean over samples, then
    the scaling. Side "out": every conv's output channels; with ``slices`` (weights only) also
    side "in": every conv's and channel-fed InnerProduct's input slices."""
    m = _metric(metric).base
    pruned = frozenset(pruned)
    removed_of = _saved(graph, pruned, "weights") if m.scaling == "weights_removed" else None
    macs_of = _saved(graph, pruned, "macs") if m.scaling == "macs_removed" else None
    out = {}
    for conv, info in graph.producers.items():
        mean = m.over_samples(tensors.get(conv, "out", m.key), f"{conv} (output channels)")
        present = graph.present(conv, pruned, "output")
        if m.input == "activation":
            count = np.full(info.num_output, float(tensors.area[conv]))
            active = count
        else:
            cg = info.in_channels // info.group
            count = np.full(info.num_output, float(cg * info.kernel_area))
            per_group = graph.present(conv, pruned, "input").reshape(info.group, cg).sum(axis=1)
            active = np.repeat(per_group, info.num_output // info.group) * float(info.kernel_area)
        gids = [None if g is None else g.id for g in (graph.group_of(conv, i) for i in range(info.num_output))]
        out[(conv, "out")] = m.scale(mean, Layer(count, active, present, _items(removed_of, gids),
                                                 _items(macs_of, gids)), f"{conv} (output channels)")
    if slices and m.input == "weights":
        consumer_gid = {(s.layer, s.input_channel): group.id for group in graph.groups for s in group.consumers}
        for conv, info in graph.producers.items():
            og, cg = info.num_output // info.group, info.in_channels // info.group
            count = np.full(info.in_channels, float(og * info.kernel_area))
            per_group = graph.present(conv, pruned, "output").reshape(info.group, og).sum(axis=1)
            active = np.repeat(per_group, cg) * float(info.kernel_area)
            present = graph.present(conv, pruned, "input")
            gids = [consumer_gid.get((conv, i)) for i in range(info.in_channels)]
            mean = m.over_samples(tensors.get(conv, "in", m.key), f"{conv} (input slices)")
            out[(conv, "in")] = m.scale(mean, Layer(count, active, present, _items(removed_of, gids),
                                                    _items(macs_of, gids)), f"{conv} (input slices)")
        for fc, info in graph.fc.items():
            if info.in_channels is None:
                continue
            count = np.full(info.in_channels, float(info.num_output * info.block))
            present = graph.present(fc, pruned, "input")
            gids = [consumer_gid.get((fc, c)) for c in range(info.in_channels)]
            out[(fc, "in")] = m.scale(m.over_samples(tensors.get(fc, "in", m.key), f"{fc} (input blocks)"),
                                      Layer(count, count, present, _items(removed_of, gids), _items(macs_of, gids)),
                                      f"{fc} (input blocks)")
    return out


def saliency(metric, tensors, graph, pruned=frozenset()) -> dict:
    """{Channel: saliency} for every channel of every group not in ``pruned``."""
    m = _metric(metric)
    pruned = frozenset(pruned)
    per_layer = layer_saliencies(m, tensors, graph, pruned, slices=bool(m.domino))
    result = {}
    for group in graph.groups:
        if group.id in pruned:
            continue
        if m.domino:
            values = [per_layer[(c.layer, "out")][c.index] for c in group.channels]
            if m.input == "weights":
                values += [per_layer[(s.layer, "in")][s.input_channel] for s in group.consumers]
            score = float(AGGREGATIONS[m.domino](values))
            result.update((c, score) for c in group.channels)
        else:
            result.update((c, float(per_layer[(c.layer, "out")][c.index])) for c in group.channels)
    return result


def rank_groups(metric, tensors, graph, pruned=frozenset()) -> list:
    """[(group id, score)] for ``graph.prunable(pruned)``, ascending (ties by group id)."""
    scores = saliency(metric, tensors, graph, pruned)
    by_group = {}
    for gid in graph.prunable(pruned):
        by_group[gid] = min(scores[c] for c in graph.groups[gid].channels)
    bad = [gid for gid, s in by_group.items() if not np.isfinite(s)]
    if bad:
        raise MetricError(f"{metric}: saliency is not finite for group(s) {bad[:5]}; check the net's values")
    return sorted(by_group.items(), key=lambda item: (item[1], item[0]))


def _saved(graph, pruned, what: str):
    """gid -> what the group's removal saves in state ``pruned`` (``weights``: Θ_C, conv +
    InnerProduct weights; ``macs``: multiply-accumulates per image), each computed once; NaN for
    no group (an unprunable item) or a pruned one."""
    cache = {}

    def saved(gid):
        if gid is None or gid in pruned:
            return np.nan
        if gid not in cache:
            costs = graph.saved(gid, pruned)
            cache[gid] = float(costs.conv_weights + costs.fc_weights if what == "weights" else costs.macs)
        return cache[gid]
    return saved


def _items(saved, gids) -> np.ndarray:
    """What each item's group saves (NaN everywhere when the scaling does not read it)."""
    if saved is None:
        return np.full(len(gids), np.nan)
    return np.array([saved(gid) for gid in gids], dtype=np.float64)

"""Compact export: the physically smaller, dense network that a set of pruned groups leaves.

Masks (caffe_prune.masking) keep the tensors at full width with zeros where channels were removed;
export writes what a user deploys instead: reduced ``num_output``, filters sliced on both axes (per
group for grouped convolutions), biases, BatchNorm/Scale/Bias blobs and InnerProduct input blocks
sliced, and Concat/Eltwise widths following from their inputs. Under the zero-downstream semantics
the masked net and the export compute the same function, except where an across-channel LRN
(AlexNet's norm1/norm2) normalises over neighbouring channels: removing a channel changes its
neighbours' window, so the export still happens and the measured output deviation is reported
instead of claimed equal.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from caffe_prune import engine, netdef


def kept_indices(graph, pruned) -> dict:
    """Per layer, the channel indices that survive: 'out' for convolutions, 'in' for consumers,
    'rider' for BatchNorm/Scale/Bias; layers untouched by the pruned groups are absent."""
    by_id = {g.id: g for g in graph.groups}
    gone = {"out": {}, "in": {}, "rider": {}}
    for group_id in pruned:
        group = by_id[group_id]
        for unit in group.channels:
            gone["out"].setdefault(unit.layer, set()).add(unit.index)
        for consumer in group.consumers:
            gone["in"].setdefault(consumer.layer, set()).add(consumer.input_channel)
        for rider in group.riders:
            gone["rider"].setdefault(rider.layer, set()).add(rider.channel)
    return gone


def _keep(width: int, removed: set) -> np.ndarray:
    return np.array([c for c in range(width) if c not in removed], dtype=np.int64)


def compact(net_param, graph, pruned, net) -> tuple:
    """Return (compact NetParameter, {layer: [arrays]}) from the full-width `net`'s parameters."""
    gone = kept_indices(graph, pruned)
    out = engine.caffe_pb2().NetParameter()
    out.CopyFrom(net_param)
    weights = {}
    for layer in out.layer:
        if layer.name not in net.params:
            continue
        blobs = [b.data.copy() for b in net.params[layer.name]]
        if layer.type == "Convolution":
            info = graph.producers[layer.name]
            keep_out = _keep(info.num_output, gone["out"].get(layer.name, set()))
            per_group_in = info.in_channels // info.group
            keep_in = _keep(info.in_channels, gone["in"].get(layer.name, set()))
            local = [set(int(c) % per_group_in for c in keep_in if c // per_group_in == g)
                     for g in range(info.group)]
            if any(l != local[0] for l in local):
                raise engine.EngineError(f"layer {layer.name!r}: groups keep different input channels "
                                         f"{[sorted(l) for l in local]}; the graph's ties were violated")
            local_keep = np.array(sorted(local[0]), dtype=np.int64)
            blobs[0] = blobs[0][keep_out][:, local_keep]
            if len(blobs) > 1:
                blobs[1] = blobs[1][keep_out]
            layer.convolution_param.num_output = len(keep_out)
        elif layer.type == "InnerProduct" and layer.name in gone["in"]:
            _, in_channels, block = graph.fc[layer.name]
            keep_in = _keep(in_channels, gone["in"][layer.name])
            columns = (keep_in[:, None] * block + np.arange(block)[None, :]).ravel()
            blobs[0] = blobs[0][:, columns]
        elif layer.name in gone["rider"]:
            keep = _keep(blobs[0].shape[0], gone["rider"][layer.name])
            per_channel = 2 if layer.type == "BatchNorm" else len(blobs)   # BatchNorm's 3rd: scale factor
            blobs = [b[keep] if i < per_channel else b for i, b in enumerate(blobs)]
        weights[layer.name] = blobs
    return out, weights


def export(net_param, graph, pruned, net, out_dir, name: str) -> dict:
    """Write <out_dir>/<name>.prototxt and <name>.caffemodel (compact); return paths and widths."""
    compact_param, weights = compact(net_param, graph, pruned, net)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prototxt = netdef.write_prototxt(compact_param, out_dir / f"{name}.prototxt")
    form, _ = netdef.evaluation_form(compact_param)
    small = engine.net_from_param(form, probe=False)
    for layer, arrays in weights.items():
        for blob, array in zip(small.params[layer], arrays):
            if blob.data.shape != array.shape:
                raise engine.EngineError(f"export: layer {layer!r} blob shape {array.shape} does not fit the "
                                         f"compact net's {blob.data.shape}")
            blob.data[...] = array
    caffemodel = out_dir / f"{name}.caffemodel"
    small.save(str(caffemodel))
    return {"prototxt": str(prototxt), "caffemodel": str(caffemodel), "net": small,
            "lrn_across": sorted(set(graph.lrn_across) & _touched_lrn(graph, pruned)),
            "widths": {l: len(w[0]) for l, w in weights.items() if l in graph.producers}}


def _touched_lrn(graph, pruned) -> set:
    """Across-channel LRN layers whose input lost a channel (their output then deviates)."""
    touched = set()
    by_id = {g.id: g for g in graph.groups}
    for lrn, units in dict(graph.lrn_across).items():
        if any(unit in set(by_id[g].channels) for g in pruned for unit in units):
            touched.add(lrn)
    return touched

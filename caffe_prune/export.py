"""Compact export: the physically smaller, dense network that a set of pruned groups leaves.

Masks (caffe_prune.masking) keep the tensors at full width with zeros where channels were removed;
export writes what a user deploys instead: reduced ``num_output``, filters sliced on both axes (per
group for grouped convolutions; whole groups, and a smaller ``group``, for depthwise ones), biases,
the riders' per-channel blobs (BatchNorm, Scale, Bias, PReLU) and InnerProduct input blocks sliced,
and Concat/Eltwise/Slice widths following from their inputs. The definition written is the user's
own (data layers, losses and all), only narrower.

Before anything is written, the compact net is built (in a forked child first, so that a Caffe
CHECK cannot end the process) and run beside the masked one on the same inputs (the dataset's
images when given, else seeded random ones at the net's own input size); both files are then
written under temporary names and renamed. Under the zero-downstream semantics the two compute the
same function, except where an across-channel LRN normalises over neighbouring channels: removing a
channel changes its neighbours' window, so the measured deviation is reported instead of claimed
equal.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from caffe_prune import engine, fsio, netdef


def removed_indices(graph, pruned) -> dict:
    """Per layer, the channel indices that go: 'out' for convolutions, 'in' for consumers,
    'rider' for per-channel parameter layers; layers untouched by the pruned groups are absent."""
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


def _conv(layer, info, gone, blobs) -> list:
    keep_out = _keep(info.num_output, gone["out"].get(layer.name, set()))
    keep_in = _keep(info.in_channels, gone["in"].get(layer.name, set()))
    if info.depthwise:        # whole groups go: one input channel each, its outputs with it
        layer.convolution_param.group = len(keep_in)
        local_keep = np.array([0], dtype=np.int64)
    else:
        per_group_in = info.in_channels // info.group
        local = [set(int(c) % per_group_in for c in keep_in if c // per_group_in == g) for g in range(info.group)]
        if any(l != local[0] for l in local):
            raise engine.EngineError(f"layer {layer.name!r}: groups keep different input channels "
                                     f"{[sorted(l) for l in local]}; the graph's ties were violated")
        local_keep = np.array(sorted(local[0]), dtype=np.int64)
    blobs[0] = blobs[0][keep_out][:, local_keep]
    if len(blobs) > 1:
        blobs[1] = blobs[1][keep_out]
    layer.convolution_param.num_output = len(keep_out)
    return blobs


def compact(net_param, graph, pruned, net) -> tuple:
    """Return (compact NetParameter, {layer: [arrays]}) from the full-width ``net``'s parameters."""
    gone = removed_indices(graph, pruned)
    out = engine.caffe_pb2().NetParameter()
    out.CopyFrom(net_param)
    weights = {}
    for layer in out.layer:
        del layer.blobs[:]         # a definition embedded in a caffemodel carries its weights
        if layer.name not in net.params:
            continue
        blobs = [b.data.copy() for b in net.params[layer.name]]
        if layer.type == "Convolution" and layer.name in graph.producers:
            blobs = _conv(layer, graph.producers[layer.name], gone, blobs)
        elif layer.type == "InnerProduct" and layer.name in gone["in"]:
            info = graph.fc[layer.name]
            keep_in = _keep(info.in_channels, gone["in"][layer.name])
            columns = (keep_in[:, None] * info.block + np.arange(info.block)[None, :]).ravel()
            blobs[0] = blobs[0][columns] if info.transpose else blobs[0][:, columns]
        elif layer.name in gone["rider"]:
            keep = _keep(blobs[0].shape[0], gone["rider"][layer.name])
            sliced = graph.riding[layer.name][0]
            blobs = [b[keep] if i in sliced else b for i, b in enumerate(blobs)]
        weights[layer.name] = blobs
    return out, weights


def _outputs(net, x) -> dict:
    data = net.inputs[0]
    net.blobs[data].reshape(*x.shape)
    net.reshape()
    net.blobs[data].data[...] = x
    net.forward()
    return {name: net.blobs[name].data.copy() for name in net.outputs}


def compact_net(net_param, graph, pruned, net, input_shape, where: str, probe: bool = True) -> tuple:
    """(compact NetParameter, its weights, the compact structure form built in Caffe with them);
    ``probe``: build it in a forked child first (engine.probe_construct)."""
    compact_param, weights = compact(net_param, graph, pruned, net)
    form = netdef.structure_form(compact_param, input_shape, where)
    engine.check_net(form, "test", where)
    small = engine.net_from_param(netdef.without_fillers(form), probe=probe, where=f"{where} (compact)")
    for layer, arrays in weights.items():
        for blob, array in zip(small.params[layer], arrays):
            if blob.data.shape != array.shape:
                raise engine.EngineError(f"export: layer {layer!r} blob shape {array.shape} does not fit the "
                                         f"compact net's {blob.data.shape}")
            blob.data[...] = array
    return compact_param, weights, small


def export(net_param, graph, pruned, net, out_dir, name: str, input_shape, inputs=None,
           where: str | None = None, seed: int = 0) -> dict:
    """Write <out_dir>/<name>.prototxt and <name>.caffemodel (compact) once the compact net, run
    beside ``net`` (the full-width structure form with the pruned groups masked), is built; return
    paths, widths and the measured relative deviation of every net output."""
    where = where or f"net {net_param.name!r}"
    compact_param, weights, small = compact_net(net_param, graph, pruned, net, input_shape, where)
    given = inputs is not None
    if not given:
        inputs = np.random.default_rng(seed).normal(size=(4, *input_shape)).astype(np.float32)
    full_out, small_out = _outputs(net, inputs), _outputs(small, inputs)
    deviation = {blob: float(np.abs(full_out[blob] - small_out[blob]).max()
                             / max(np.abs(full_out[blob]).max(), 1e-12)) for blob in full_out}
    out_dir = Path(out_dir)
    prototxt = netdef.write_prototxt(compact_param, out_dir / f"{name}.prototxt")
    caffemodel = out_dir / f"{name}.caffemodel"
    with fsio.replacing(caffemodel) as tmp:
        small.save(str(tmp))
    return {"prototxt": str(prototxt), "caffemodel": str(caffemodel), "net": small, "deviation": deviation,
            "images_compared": len(inputs), "inputs": "the dataset's images" if given else f"random normal (seed {seed})",
            "lrn_across": sorted(set(graph.lrn_across) & touched_lrn(graph, pruned)),
            "widths": {l: len(w[0]) for l, w in weights.items() if l in graph.producers}}


def touched_lrn(graph, pruned) -> set:
    """Across-channel LRN layers whose input lost a channel (their output then deviates)."""
    touched = set()
    by_id = {g.id: g for g in graph.groups}
    for lrn, units in dict(graph.lrn_across).items():
        if any(unit in set(by_id[g].channels) for g in pruned for unit in units):
            touched.add(lrn)
    return touched

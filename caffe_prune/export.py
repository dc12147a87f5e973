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

from collections import defaultdict
from pathlib import Path

import numpy as np

from caffe_prune import fsio, layers, netdef, profile, pycaffe
from caffe_prune.errors import InputError


def compact(net_param, graph, pruned, net) -> tuple:
    """Return (compact NetParameter, {layer: [arrays]}) from the full-width ``net``'s parameters:
    every blob with the pruned groups' slices deleted along their axes (graph.removed_positions),
    and each resized layer's parameters following (its rule's ``resize``: num_output, group)."""
    removed = defaultdict(list)
    for (layer, blob, axis), positions in graph.removed_positions(pruned).items():
        removed[layer].append((blob, axis, positions))
    out = pycaffe.caffe_pb2().NetParameter()
    out.CopyFrom(net_param)
    weights = {}
    for layer in out.layer:
        del layer.blobs[:]         # a definition embedded in a caffemodel carries its weights
        if layer.name not in net.params:
            continue
        blobs = [b.data.copy() for b in net.params[layer.name]]
        for blob, axis, positions in removed.get(layer.name, ()):
            blobs[blob] = np.delete(blobs[blob], positions, axis=axis)
        if layer.name in graph.producers and layer.name in removed:
            layers.rule(layer).resize(layer, blobs, graph.producers[layer.name])
        weights[layer.name] = blobs
    return out, weights


def _outputs(net, x, logits: str | None = None) -> dict:
    data = net.inputs[0]
    net.blobs[data].reshape(*x.shape)
    net.reshape()
    net.blobs[data].data[...] = x
    net.forward()
    blobs = list(dict.fromkeys(list(net.outputs) + ([logits] if logits in net.blobs else [])))
    return {name: net.blobs[name].data.copy() for name in blobs}


def compact_net(net_param, graph, pruned, net, input_shape, where: str, probe: bool = True) -> tuple:
    """(compact NetParameter, its weights, the compact structure form built in Caffe with them);
    ``probe``: build it in a forked child first (pycaffe.probe_construct)."""
    compact_param, weights = compact(net_param, graph, pruned, net)
    form = netdef.structure_form(compact_param, input_shape, where)
    small = pycaffe.net_from_param(netdef.without_fillers(form), probe=probe, where=f"{where} (compact)")
    for layer, arrays in weights.items():
        for blob, array in zip(small.params[layer], arrays):
            if blob.data.shape != array.shape:
                raise InputError(f"export: layer {layer!r} blob shape {array.shape} does not fit the "
                                         f"compact net's {blob.data.shape}")
            blob.data[...] = array
    return compact_param, weights, small


def export(net_param, graph, pruned, net, out_dir, name: str, input_shape, inputs=None,
           where: str | None = None, seed: int = 0, logits: str | None = None) -> dict:
    """Write <out_dir>/<name>.prototxt and <name>.caffemodel (compact) once the compact net, run
    beside ``net`` (the full-width structure form with the pruned groups masked), is built; return
    paths, widths and the measured relative deviation of every net output and of the ``logits``
    blob (the head's: a saturated Softmax output would hide a difference in what it reads)."""
    where = where or f"net {net_param.name!r}"
    compact_param, weights, small = compact_net(net_param, graph, pruned, net, input_shape, where)
    given = inputs is not None
    if not given:
        inputs = np.random.default_rng(seed).normal(size=(4, *input_shape)).astype(np.float32)
    full_out, small_out = _outputs(net, inputs, logits), _outputs(small, inputs, logits)
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
            "widths": {l: int(compact_param.layer[_index(compact_param, l)].convolution_param.num_output)
                       for l in weights if l in graph.producers}}


def _index(net_param, name) -> int:
    return next(i for i, layer in enumerate(net_param.layer) if layer.name == name)


def touched_lrn(graph, pruned) -> set:
    """Across-channel LRN layers whose input lost a channel (their output then deviates)."""
    touched = set()
    by_id = {g.id: g for g in graph.groups}
    for lrn, units in dict(graph.lrn_across).items():
        if any(unit in set(by_id[g].channels) for g in pruned for unit in units):
            touched.add(lrn)
    return touched


def export_session(session, pruned, out_dir, semantics: str = "zero-downstream", images: int = 16,
                   seed: int = 0, timing: dict | None = None) -> dict:
    """`caffe-prune export`: the groups ``pruned`` masked in a structure-form session's net
    (caffe_prune.session.Session.open(..., form="structure")), the compact network written to
    ``out_dir`` after it is checked beside the masked one (on the session's test images when it has
    a dataset, else seeded random ones), and the report. The deviation policy: across-channel LRN
    touched by the pruning is reported with its measured deviation (a note); otherwise, under the
    zero-downstream semantics, a relative deviation above 1e-4 is a bug and refused."""
    from caffe_prune import masking
    g, network = session.graph, session.network
    masker = masking.Masker(g, [session.net], semantics)
    for group_id in sorted(pruned):
        masker.commit(group_id)
    inputs = session.dataset.test.head(images).x if session.dataset is not None else None
    try:
        logits = network.head().logits
    except InputError:        # a net without a classifier head: its outputs are compared
        logits = None
    done = export(network.param, g, pruned, session.net, out_dir, network.name, session.input_shape, inputs,
                  network.where, seed, logits)
    deviation = max(done["deviation"].values(), default=0.0)
    original, left = g.costs(set()), g.costs(pruned)
    report = {"groups_pruned": len(pruned), "semantics": semantics,
              "conv_weights": left.conv_weights, "conv_weights_original": original.conv_weights,
              "percent_conv_removed": round(g.percent_conv_removed(pruned), 3),
              "macs": left.macs, "macs_original": original.macs, "params": left.params,
              "params_original": original.params, "speedup_in_macs": round(original.macs / max(left.macs, 1), 3),
              "logits": logits,
              "prototxt": done["prototxt"], "caffemodel": done["caffemodel"], "widths": done["widths"],
              "max_relative_deviation": deviation, "deviation_by_output": done["deviation"],
              "compared_on": f"{done['images_compared']} images: {done['inputs']}",
              "lrn_across_touched": done["lrn_across"], "notes": []}
    if done["lrn_across"]:
        report["notes"].append(f"across-channel LRN {', '.join(done['lrn_across'])} normalises over neighbouring "
                               f"channels, so the compact net is not exactly the masked one; measured deviation "
                               f"{deviation:.3g}")
    elif semantics == "zero-downstream" and deviation > 1e-4:
        raise InputError(f"compact export deviates from the masked net by {deviation:.3g} (relative); "
                                 f"please report this as a bug")
    if timing is not None:            # the original and the compact network timed as Caffe runs them
        kept = {name: [b.data.copy() for b in blobs] for name, blobs in done["net"].params.items()}
        shape = session.input_shape
        before = profile.profile(network.param, session.weights, shape, where=network.where, **timing,
                                 costs={"macs": original.macs, "params": original.params})
        after = profile.profile(pycaffe.read_prototxt(done["prototxt"]), kept, shape, where=done["prototxt"],
                                **timing, costs={"macs": left.macs, "params": left.params})
        report["latency"] = profile.compare(before, after)
    return report

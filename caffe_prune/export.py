"""Compact export: the physically smaller, dense network that a set of pruned groups leaves, as
the files a Caffe user deploys.

Masks (caffe_prune.masking) keep the tensors at full width with zeros where channels were removed;
export writes what a user deploys instead: reduced ``num_output``, filters sliced on both axes (per
group for grouped convolutions; whole groups, and a smaller ``group``, for depthwise ones), biases,
the riders' per-channel blobs (BatchNorm, Scale, Bias, PReLU) and InnerProduct input blocks sliced,
and Concat/Eltwise/Slice widths following from their inputs. The definition written is the user's
own (data layers, losses and all), only narrower.

Before anything is written, the compact net is built (in a forked child first, so that a Caffe
CHECK cannot end the process) and run beside the masked one on the same inputs (the dataset's
images when given, else seeded random ones at the net's own input size). The export directory
then holds, written as one set (a directory built beside it and renamed into place, so that a
kill or a full disk leaves the previous export whole):

- ``NAME.caffemodel``: the weights (serialised in Python, caffe_prune.caffemodel);
- ``deploy.prototxt``: the deploy form (netdef.deploy_form: an Input layer, the TEST-phase layers,
  no data, loss or accuracy layers, a Softmax where the head was a SoftmaxWithLoss);
- ``train_val.prototxt``: the whole definition, narrower, with the data layers' own sources (for a
  built-in network, the CIFAR-10 LMDBs `caffe-prune data cifar10` writes), when the net has any;
- ``NAME.onnx`` (``onnx=True``): the ONNX graph (caffe_prune.onnx_export), checked in ONNX Runtime;
- ``export.json``: what was written and checked (the manifest, written last in the set).

Where OpenCV's DNN module is installed, the compact deploy files are loaded there too and its
outputs compared with Caffe's (caffe_prune.runtimes). Under the zero-downstream semantics the two compute the
same function, except where an across-channel LRN normalises over neighbouring channels: removing a
channel changes its neighbours' window, so the measured deviation is reported instead of claimed
equal.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from caffe_prune import caffemodel, fsio, layers, netdef, onnx_export, profile, pycaffe, runtimes
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
    _move_slice_points(out, graph, pruned)
    return out, weights


def _move_slice_points(out, graph, pruned) -> None:
    """A channel-axis Slice's points follow its narrower input: each top keeps what is left of its
    range (DPN cuts a convolution into a residual and a dense part: the old points would cut the
    narrower input at the old offsets, and Caffe refuses the negative top that leaves). A top left
    with no channel is removed, and so is that blob from the Concat or Silence reading it (a
    ShuffleChannel rewritten by caffe_prune.forks slices single channels); any other reader of an
    emptied top is refused in one line."""
    emptied = set()
    for layer in out.layer:
        widths = graph.slice_widths(layer.name, pruned) if layers.rule(layer).kind == "slice" else None
        if widths is None or widths == graph.slice_widths(layer.name, set()):
            continue
        kept = [(top, width) for top, width in zip(layer.top, widths) if width]
        emptied.update(top for top, width in zip(layer.top, widths) if not width)
        layer.top[:] = [top for top, _ in kept]
        layer.slice_param.slice_point[:] = [int(point) for point in np.cumsum([width for _, width in kept])[:-1]]
    if not emptied:
        return
    for layer in list(out.layer):
        if not emptied & set(layer.bottom):
            continue
        kind = layers.rule(layer).kind
        if kind not in ("concat", "sink"):
            raise InputError(f"export: the pruned groups empty blob {sorted(emptied & set(layer.bottom))[0]!r}, which "
                             f"layer {layer.name!r} ({layer.type}) reads; keep one of its channels")
        layer.bottom[:] = [b for b in layer.bottom if b not in emptied]
        if not layer.bottom and kind == "sink":
            out.layer.remove(layer)
        elif not layer.bottom:
            raise InputError(f"export: the pruned groups empty every input of {layer.type} {layer.name!r}; keep a channel")


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


MANIFEST = "export.json"
CHECK_TOLERANCE = 1e-4       # relative, on every output and the logits: OpenCV and ONNX Runtime against Caffe


def export(net_param, graph, pruned, net, out_dir, name: str, input_shape, inputs=None,
           where: str | None = None, seed: int = 0, logits: str | None = None, onnx: bool = False,
           sources: dict | None = None) -> dict:
    """Write the export directory ``out_dir`` (see the module docstring) once the compact net, run
    beside ``net`` (the full-width structure form with the pruned groups masked), is built; return
    paths, widths and the measured relative deviation of every net output and of the ``logits``
    blob (the head's: a saturated Softmax output would hide a difference in what it reads), and the
    OpenCV and ONNX Runtime checks (the deploy files in each beside the same files in Caffe).
    ``sources``: {source as the definition names it: source to write} for train_val.prototxt (a
    built-in network's LMDBs in place of its placeholders)."""
    where = where or f"net {net_param.name!r}"
    out_dir = Path(out_dir)
    _check_target(out_dir)
    compact_param, weights, small = compact_net(net_param, graph, pruned, net, input_shape, where)
    given = inputs is not None
    if not given:
        inputs = np.random.default_rng(seed).normal(size=(4, *input_shape)).astype(np.float32)
    full_out, small_out = _outputs(net, inputs, logits), _outputs(small, inputs, logits)
    deviation = {blob: _relative(full_out[blob], small_out[blob]) for blob in full_out}
    files = deploy_files(compact_param, weights, input_shape, name, where, onnx, sources)
    checks = {}
    with tempfile.TemporaryDirectory(prefix="caffe-prune-export-") as tmp:   # the runtimes read files
        for filename, data in files.items():
            (Path(tmp) / filename).write_bytes(data)
        # the reference: the deploy files as Caffe runs them (their outputs, e.g. the Softmax deploy adds)
        reference = runtimes.load("caffe", Path(tmp) / "deploy.prototxt", Path(tmp) / f"{name}.caffemodel").forward(
            np.asarray(inputs, dtype=np.float32))
        checks["opencv"] = runtimes.check("opencv", Path(tmp) / "deploy.prototxt", Path(tmp) / f"{name}.caffemodel",
                                          None, inputs, reference, CHECK_TOLERANCE)
        if onnx:
            checks["onnxruntime"] = runtimes.check("onnxruntime", Path(tmp) / "deploy.prototxt",
                                                   Path(tmp) / f"{name}.caffemodel", Path(tmp) / f"{name}.onnx",
                                                   inputs, reference, CHECK_TOLERANCE)
    paths = {filename: str(out_dir / filename) for filename in files}
    report = {"files": sorted(paths), "deviation": deviation, "images_compared": len(inputs),
              "macs_counted": counted_macs(small),
              "inputs": "the dataset's images" if given else f"random normal (seed {seed})",
              "lrn_across": sorted(set(graph.lrn_across) & touched_lrn(graph, pruned)),
              "widths": {l: int(compact_param.layer[_index(compact_param, l)].convolution_param.num_output)
                         for l in weights if l in graph.producers}, "runtimes": checks}
    files[MANIFEST] = (json.dumps(report, indent=1) + "\n").encode()
    _write_set(out_dir, files)
    return {**report, "deploy": paths["deploy.prototxt"], "caffemodel": paths[f"{name}.caffemodel"],
            "train_val": paths.get("train_val.prototxt"), "onnx": paths.get(f"{name}.onnx"),
            "prototxt": paths["deploy.prototxt"], "net": small}


def deploy_files(net_param, weights: dict, input_shape, name: str, where: str | None = None, onnx: bool = False,
                 sources: dict | None = None) -> dict:
    """{file name: bytes} a user deploys for ``net_param`` with ``weights`` {layer: [arrays]}:
    deploy.prototxt, NAME.caffemodel, train_val.prototxt (when it has data layers), NAME.onnx."""
    deploy = netdef.deploy_form(net_param, input_shape, where)
    files = {"deploy.prototxt": text_format.MessageToString(deploy).encode(),
             f"{name}.caffemodel": caffemodel.serialize(deploy, weights)}
    if netdef.data_layers(net_param):
        files["train_val.prototxt"] = text_format.MessageToString(_with_sources(net_param, sources)).encode()
    if onnx:
        files[f"{name}.onnx"] = onnx_export.to_onnx(deploy, weights, input_shape, name=name).SerializeToString()
    return files


def counted_macs(net) -> int:
    """Multiply-accumulates per image of a built net, counted from Caffe's own blob shapes: every
    convolution's and InnerProduct's weights times the positions each weight is used at (its
    rule's macs_per_weight of the bottom and top shapes), independently of the channel graph."""
    total = 0
    for name, layer in zip(net._layer_names, net.layers):
        rule = layers.rule(layer.type)
        if rule.kind in ("conv", "fc") and name in net.params:
            bottom, top = net.bottom_names[name][0], net.top_names[name][0]
            per_weight = rule.macs_per_weight(net.blobs[bottom].data.shape, net.blobs[top].data.shape)
            total += int(net.params[name][0].data.size) * int(per_weight)
    return total


def _relative(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


def _check_target(out_dir: Path) -> None:
    """An export replaces only an export (a directory with its manifest) or an empty directory, never
    a folder of the user's other files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is a file; give a directory for the export")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise InputError(f"--out {out_dir} holds files that are not an export (no {MANIFEST}); give an empty or "
                         f"new directory")


def _write_set(out_dir: Path, files: dict) -> None:
    """The files as one set: built in a directory beside ``out_dir``, renamed over it (fsio.replacing);
    a failed write (ENOSPC) leaves the previous export whole and says how many bytes it needed."""
    needed = sum(len(data) for data in files.values())
    try:
        with fsio.replacing(out_dir) as tmp:
            tmp.mkdir()
            for filename, data in files.items():
                with open(tmp / filename, "wb") as stream:
                    stream.write(data)
                    stream.flush()
                    os.fsync(stream.fileno())
    except OSError as exc:
        try:
            free = shutil.disk_usage(out_dir.parent if out_dir.parent.exists() else ".").free
        except OSError:
            free = None
        room = f"; {needed:,} bytes needed, {free:,} free" if free is not None else f"; {needed:,} bytes needed"
        raise fsio.FileError(exc.errno, f"cannot write the export {out_dir}: {exc.strerror or exc}{room} "
                                        f"(the previous export, if any, is unchanged)") from None


def _with_sources(net_param, sources: dict | None):
    """``net_param`` with the data layers' sources replaced as ``sources`` {source: new source} says."""
    if not sources:
        return net_param
    out = pycaffe.caffe_pb2().NetParameter()
    out.CopyFrom(net_param)
    for layer in out.layer:                      # both phases' data layers
        if layers.is_reader(layer) and layers.source(layer) in sources:
            layers.rule(layer).parameters(layer).source = sources[layers.source(layer)]
    return out


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
                   seed: int = 0, timing: dict | None = None, onnx: bool = False, eval_images: int = 1024) -> dict:
    """`caffe-prune export`: the groups ``pruned`` masked in a structure-form session's net
    (caffe_prune.session.Session.open(..., form="structure")), the export written to ``out_dir``
    after the compact net is checked beside the masked one (on the session's test images when it
    has a dataset, else seeded random ones), and the report: the compact and original top-1 on up
    to ``eval_images`` test images when there are any, the OpenCV and ONNX Runtime checks, and with
    ``timing`` the latency of both networks. The deviation policy: across-channel LRN touched by the
    pruning is reported with its measured deviation (a note); otherwise, under the zero-downstream
    semantics, a relative deviation above 1e-4 is a bug and refused, as is an ONNX graph that ONNX
    Runtime computes otherwise."""
    from caffe_prune import masking
    g, network = session.graph, session.network
    masker = masking.Masker(g, [session.net], semantics)
    dataset = session.dataset
    try:
        logits = network.head().logits
    except InputError:        # a net without a classifier head: its outputs are compared
        logits = None
    original_scores = _top1(session.net, dataset, eval_images, logits) if dataset is not None else None
    timing = dict(timing) if timing is not None else None
    served_names = (timing or {}).pop("runtimes", None) or []
    original_files = deploy_files(network.param, caffemodel.arrays_of(session.net), session.input_shape,
                                  network.name, network.where, "onnxruntime" in served_names) if served_names else None
    for group_id in sorted(pruned):
        masker.commit(group_id)
    inputs = dataset.test.head(images).x if dataset is not None else None
    sources = builtin_sources(network)
    done = export(network.param, g, pruned, session.net, out_dir, network.name, session.input_shape, inputs,
                  network.where, seed, logits, onnx=onnx, sources=sources)
    values = list(done["deviation"].values())
    deviation = float("nan") if any(np.isnan(values)) else max(values, default=0.0)
    original, left = g.costs(set()), g.costs(pruned)
    report = {"groups_pruned": len(pruned), "semantics": semantics,
              "conv_weights": left.conv_weights, "conv_weights_original": original.conv_weights,
              "percent_conv_removed": round(g.percent_conv_removed(pruned), 3),
              "macs": left.macs, "macs_original": original.macs, "params": left.params,
              "params_original": original.params, "speedup_in_macs": round(original.macs / max(left.macs, 1), 3),
              "logits": logits, "files": done["files"], "deploy": done["deploy"], "caffemodel": done["caffemodel"],
              "train_val": done["train_val"], "onnx": done["onnx"], "prototxt": done["prototxt"],
              "widths": done["widths"], "max_relative_deviation": deviation, "deviation_by_output": done["deviation"],
              "compared_on": f"{done['images_compared']} images: {done['inputs']}",
              "lrn_across_touched": done["lrn_across"], "runtimes": done["runtimes"],
              "macs_counted_on_the_compact_net": done["macs_counted"], "notes": []}
    if dataset is not None:
        compact_scores = _top1(done["net"], dataset, eval_images, logits)
        report["test"] = {"images": compact_scores["images"], "data": dataset.description,
                          "top1_original": original_scores["top1"], "top1_compact": compact_scores["top1"]}
    if sources:
        report["notes"].append(f"train_val.prototxt reads the CIFAR-10 LMDBs {', '.join(sorted(set(sources.values())))} "
                               f"(`caffe-prune data cifar10` writes them)")
    if done["lrn_across"]:
        report["notes"].append(f"across-channel LRN {', '.join(done['lrn_across'])} normalises over neighbouring "
                               f"channels, so the compact net is not exactly the masked one; measured deviation "
                               f"{deviation:.3g}")
    if done["macs_counted"] != left.macs:
        report["notes"].append(f"the compact net Caffe built computes {done['macs_counted']:,} MACs per image, the "
                               f"channel graph counted {left.macs:,}; please report this")
    if semantics == "zero-downstream" and not deviation <= 1e-4 and not done["lrn_across"]:   # NaN too
        raise InputError(f"compact export deviates from the masked net by {deviation:.3g} (relative)"
                         + ("; the net computes NaN: check its weights (a BatchNorm variance of 0?)" if np.isnan(deviation)
                            else "; please report this as a bug"))
    for name, check in done["runtimes"].items():
        if "skipped" in check:
            report["notes"].append(f"{name}: not checked ({check['skipped']})")
        elif not check["within"] and name == "onnxruntime" and not done["lrn_across"]:
            raise InputError(f"ONNX Runtime's outputs of {done['onnx']} deviate from Caffe's by "
                             f"{check['max_relative_deviation']:.3g} (relative); please report this as a bug")
        elif not check["within"]:
            report["notes"].append(f"{name} {check['version']} computes the compact net {check['max_relative_deviation']:.3g} "
                                   f"(relative) away from Caffe on {check['images']} images")
    if timing is not None:            # the original and the compact network timed as Caffe runs them
        kept = {name: [b.data.copy() for b in blobs] for name, blobs in done["net"].params.items()}
        shape = session.input_shape
        before = profile.profile(network.param, session.weights, shape, where=network.where, **timing,
                                 costs={"macs": original.macs, "params": original.params})
        after = profile.profile(pycaffe.read_prototxt(done["deploy"]), kept, shape, where=done["deploy"],
                                **timing, costs={"macs": left.macs, "params": left.params})
        report["latency"] = profile.compare(before, after)
        if served_names:
            report["served"] = _served(original_files, out_dir, network.name, served_names, timing)
    return report


def _served(original_files: dict, out_dir, name: str, names, timing: dict) -> list:
    """The original (its deploy files, written to a temporary directory) and the export timed in the
    runtimes ``names`` (profile.served), side by side."""
    args = dict(batch_sizes=timing["batch_sizes"], threads=timing["threads"], repeats=timing["repeats"])
    out_dir = Path(out_dir)
    compact = profile.served(out_dir / "deploy.prototxt", out_dir / f"{name}.caffemodel",
                             out_dir / f"{name}.onnx" if (out_dir / f"{name}.onnx").is_file() else None, names, **args)
    with tempfile.TemporaryDirectory(prefix="caffe-prune-original-") as tmp:
        for filename, data in original_files.items():
            (Path(tmp) / filename).write_bytes(data)
        onnx_path = Path(tmp) / f"{name}.onnx"
        original = profile.served(Path(tmp) / "deploy.prototxt", Path(tmp) / f"{name}.caffemodel",
                                  onnx_path if onnx_path.is_file() else None, names, **args)
    return profile.compare_served(original, compact)


def _top1(net, dataset, count: int, logits: str | None = None) -> dict:
    """Top-1 of a structure-form net on the first ``count`` test images (its logits' argmax)."""
    split = dataset.test.head(min(count, len(dataset.test)))
    blob = logits if logits in net.blobs else net.outputs[0]
    right = 0
    for lo in range(0, len(split), 64):
        x, y = split.batch(np.arange(lo, min(lo + 64, len(split))))
        out = _outputs(net, x, blob)[blob]
        right += int(np.count_nonzero(out.reshape(len(x), -1).argmax(axis=1) == y))
    return {"images": len(split), "top1": right / max(len(split), 1)}


def builtin_sources(network) -> dict | None:
    """{placeholder: LMDB} for a built-in network's train_val.prototxt: the CIFAR-10 LMDBs
    `caffe-prune data cifar10` writes (the definition's own sources are placeholders); None for a
    user's net, whose sources are written as they are."""
    if network.builtin is None:
        return None
    from caffe_prune.data.cifar10 import CACHE_DIR
    from caffe_prune.data.cifar10_convert import lmdb_name
    from caffe_prune.networks import SOURCES
    # the layout the built-in nets' weights expect
    return {value: str(CACHE_DIR / lmdb_name("bgr", phase)) for phase, value in SOURCES.items()}

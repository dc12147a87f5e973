"""Network definitions: what a net reads, where it ends, and the forms Caffe runs for us.

Any Caffe classifier arrives as a NetParameter (a prototxt, or the definition embedded in a
caffemodel): a deploy net (an ``Input`` layer or the old top-level ``input:`` fields, maybe a
``Softmax``), a train/val net (``Data``/``ImageData``/``HDF5Data`` layers, one or several losses,
``Accuracy`` layers), or a definition saved from a TRAIN net. This module derives from it, keeping
the user's blob and layer names:

- ``input_blobs``: the blob the images enter (and the label blob, if the net reads labels);
- ``declared_input_shape``: (C, H, W) as the definition states it: an Input layer or the old
  ``input_shape``/``input_dim`` fields, a data layer's ``crop_size``, ImageData's
  ``new_height``/``new_width``, MemoryData/DummyData shapes, else the first record of the LMDB,
  LevelDB, image list or HDF5 file the data layer names. Nothing is ever assumed: when nothing
  says, the caller asks for ``--input-shape C,H,W``;
- ``structure_form``: the net as graph and export see it: the data layers become one ``Input`` of
  that shape, the layers that read labels (losses, accuracies) are dropped, auto-inserted Split
  layers too (Caffe re-inserts its own);
- ``choose_head``: the logits: the last ``SoftmaxWithLoss``'s input (GoogLeNet's auxiliary
  classifiers come first, so the last is the main head; a note says so), else the last
  ``Softmax``'s (a deploy net's "prob"), else the last InnerProduct's or Convolution's output; or
  the blob the user names (``--logits``);
- ``evaluation_form``: the layers that feed the logits, fed by one ``Input`` layer (images and
  labels, in the net's own blob names), scored by Caffe's own ``SoftmaxWithLoss`` and ``Accuracy``
  (top-1, top-k) layers named ``EVAL_TOPS``;
- ``deploy_form``: the structure form as a Caffe user deploys it (``deploy.prototxt``), with a
  ``Softmax`` where the head was a SoftmaxWithLoss;
- ``gradient_form``: the evaluation form for saliency passes, with lr_mult 0 wherever a weight
  gradient is not needed to reach the layers below (the same blob diffs, half the GEMMs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from caffe_prune import fsio, phases, pycaffe
from caffe_prune.layers import DATA_TYPES, LEARNED_TYPES, LOSS_TYPES, role, rule
from caffe_prune.errors import InputError

# the tops of the scoring layers evaluation_form adds (a slash keeps them apart from user blobs)
EVAL_TOPS = {"loss": "caffe_prune/loss", "top1": "caffe_prune/top1", "top5": "caffe_prune/top5"}
INPUT_SHAPE_HINT = "pass --input-shape C,H,W"


def data_layers(net_param) -> list:
    return [layer for layer in phases.instantiated_layers(net_param) if layer.type in DATA_TYPES]


def input_blobs(net_param) -> tuple:
    """(images blob, label blob or None, the data layer or None). Old-style nets name their inputs
    at the top level (``input: "data"``)."""
    found = data_layers(net_param)
    if found:
        layer = found[0]
        if not layer.top:
            raise InputError(f"data layer {layer.name!r} has no top")
        return layer.top[0], (layer.top[1] if len(layer.top) > 1 else None), layer
    if net_param.input:
        return net_param.input[0], (net_param.input[1] if len(net_param.input) > 1 else None), None
    raise InputError(f"net {net_param.name!r} has no data layer, Input layer or input: field; "
                             f"it cannot be fed images")


def _old_style_shape(net_param):
    if net_param.input_shape:
        dims = list(net_param.input_shape[0].dim)
    else:
        dims = list(net_param.input_dim[:4])
    return tuple(int(d) for d in dims[1:]) if len(dims) >= 2 else None


def declared_input_shape(net_param, where: str) -> tuple:
    """(C, H, W) of the images as the definition states it (see the module docstring); raises
    InputError saying what is known and what to pass when nothing states it."""
    from caffe_prune.data import layer_records
    _, _, layer = input_blobs(net_param)
    if layer is None:
        shape = _old_style_shape(net_param)
        if shape:
            return shape
        raise InputError(f"{where}: input {net_param.input[0]!r} has no input_shape or input_dim; "
                                 f"{INPUT_SHAPE_HINT}")
    if layer.type == "Input":
        shapes = layer.input_param.shape
        if shapes and len(shapes[0].dim) >= 2:
            return tuple(int(d) for d in shapes[0].dim[1:])
        raise InputError(f"{where}: Input layer {layer.name!r} has no shape; {INPUT_SHAPE_HINT}")
    if layer.type == "MemoryData":
        p = layer.memory_data_param
        return int(p.channels), int(p.height), int(p.width)
    if layer.type == "DummyData":
        if layer.dummy_data_param.shape and len(layer.dummy_data_param.shape[0].dim) >= 2:
            return tuple(int(d) for d in layer.dummy_data_param.shape[0].dim[1:])
        raise InputError(f"{where}: DummyData layer {layer.name!r} has no shape; {INPUT_SHAPE_HINT}")
    crop = layer.transform_param.crop_size
    try:
        channels, height, width = layer_records.record_shape(layer)
    except ValueError as exc:      # the source is absent or unreadable: say what the prototxt gives
        known = _partial_shape(layer)
        raise InputError(f"{where}: the image shape is unknown: {exc}"
                                 + (f"; the prototxt gives {known}" if known else "")
                                 + f"; {INPUT_SHAPE_HINT}") from None
    return (channels, crop, crop) if crop else (channels, height, width)


def _partial_shape(layer) -> str:
    crop = layer.transform_param.crop_size
    if crop:
        return f"{crop}x{crop} after crop_size"
    p = layer.image_data_param
    if layer.type == "ImageData" and p.new_height:
        return f"{p.new_height}x{p.new_width} after new_height/new_width"
    return ""


def _without_splits(layers):
    """The layers minus Split layers (Caffe inserts its own), and {split top: the blob it copies}."""
    alias, kept = {}, []
    for layer in layers:
        if layer.type == "Split":
            alias.update({top: alias.get(layer.bottom[0], layer.bottom[0]) for top in layer.top})
        else:
            kept.append(layer)
    return kept, alias


def _copy(layer, alias):
    pb2 = pycaffe.caffe_pb2()
    copy = pb2.LayerParameter()
    copy.CopyFrom(layer)
    del copy.blobs[:]
    copy.ClearField("include")
    copy.ClearField("exclude")
    copy.ClearField("phase")   # a definition saved from the TRAIN net pins phase: TRAIN on every layer
    copy.bottom[:] = [alias.get(b, b) for b in layer.bottom]
    return copy


def _input_layer(out, name, tops_and_dims):
    layer = out.layer.add(name=name, type="Input", top=[top for top, _ in tops_and_dims])
    for _, dims in tops_and_dims:
        layer.input_param.shape.add(dim=list(dims))


def structure_form(net_param, input_shape=None, where: str | None = None):
    """The net as graph and export see it (batch 1): data layers -> one Input of ``input_shape``
    (declared_input_shape when None), label readers dropped, Split layers dropped."""
    where = where or f"net {net_param.name!r}"
    data, label, _ = input_blobs(net_param)
    shape = tuple(input_shape) if input_shape else declared_input_shape(net_param, where)
    layers, alias = _without_splits(phases.instantiated_layers(net_param))
    out = pycaffe.caffe_pb2().NetParameter(name=net_param.name)
    _input_layer(out, data, [(data, (1, *shape))])
    dropped = {label} if label else set()
    for layer in layers:
        bottoms = {alias.get(b, b) for b in layer.bottom}
        if layer.type in DATA_TYPES:
            continue
        if bottoms & dropped:
            dropped.update(layer.top)
            continue
        out.layer.append(_copy(layer, alias))
    return out


def deploy_form(net_param, input_shape=None, where: str | None = None):
    """What a Caffe user deploys (``deploy.prototxt``): the structure form (one ``Input`` of batch 1,
    the TEST-phase layers, no data, loss or accuracy layers; the user's layer and blob names), ending
    in a ``Softmax`` when the net's head was a SoftmaxWithLoss (named ``prob``, Caffe's own deploy
    convention, or ``prob_1``... when that name is taken)."""
    form = structure_form(net_param, input_shape, where)
    head = choose_head(net_param, where=where)
    if head.found_by.startswith("SoftmaxWithLoss") and not any(role(l.type) == "softmax" for l in form.layer):
        taken = {top for layer in form.layer for top in layer.top} | {layer.name for layer in form.layer}
        name, i = "prob", 1
        while name in taken:
            name, i = f"prob_{i}", i + 1
        form.layer.add(name=name, type="Softmax", bottom=[head.logits], top=[name])
    return form


def without_fillers(form):
    """A copy with Caffe's default constant fillers, for nets whose weights are loaded or never read
    (AlexNet's 68M fc weights would take half a second to fill)."""
    fast = pycaffe.caffe_pb2().NetParameter()
    fast.CopyFrom(form)
    for layer in fast.layer:
        for param in (layer.convolution_param, layer.inner_product_param):
            param.ClearField("weight_filler")
            param.ClearField("bias_filler")
    return fast


def shapes(form, where: str | None = None) -> dict:
    """{"blobs": {blob: shape}, "params": {layer: [shape of each parameter blob]}, "bytes_per_image"}
    of a form, as Caffe computes them (after pycaffe.check_net; ``where`` names the user's file)."""
    net = pycaffe.net_from_param(without_fillers(form), where=where)
    return {"blobs": {name: tuple(blob.shape) for name, blob in net.blobs.items()},     # shapes: nothing allocated
            "params": {name: [tuple(b.shape) for b in blobs] for name, blobs in net.params.items()},
            "bytes_per_image": _bytes_per_image(net, form)}


def _bytes_per_image(net, form) -> int:
    """What Caffe's forward holds per image of the batch: every blob's data once (the tops of the
    Split layers Caffe inserts share their bottom's) and the top-sized buffers layers keep
    (layers.Rule.buffers: BatchNorm, in-place Scale and PReLU, MAX pooling, LRN)."""
    declared = {layer.name: layer for layer in form.layer}
    per_image = {name: int(np.prod(blob.shape[1:])) for name, blob in net.blobs.items()}
    shared = {top for name, layer in zip(net._layer_names, net.layers) if layer.type == "Split"
              for top in net.top_names[name]}
    floats = sum(n for name, n in per_image.items() if name not in shared)
    for name, layer in zip(net._layer_names, net.layers):
        param, tops = declared.get(name), net.top_names[name]
        if param is not None and tops:
            floats += rule(param).buffers(param) * per_image[tops[0]]
    return 4 * floats


@dataclass(frozen=True)
class Head:
    """The classifier's logits blob, the layer it was found by, and a note when it was a choice."""
    logits: str
    found_by: str
    note: str = ""


def choose_head(net_param, logits: str | None = None, where: str | None = None) -> Head:
    """The logits (see the module docstring)."""
    where = where or f"net {net_param.name!r}"
    layers, alias = _without_splits(phases.instantiated_layers(net_param))
    produced = [top for layer in layers if layer.type not in DATA_TYPES for top in layer.top]
    if logits is not None:
        if logits not in produced:
            raise InputError(f"{where}: --logits {logits!r} is not a blob any layer produces; "
                                     f"candidates: {', '.join(dict.fromkeys(reversed(produced[-6:])))}")
        return Head(logits, "--logits")
    for types, what in ((("SoftmaxWithLoss",), "loss"), (("Softmax",), "softmax")):
        found = [layer for layer in layers if layer.type in types]
        if found:
            layer = found[-1]
            blob = alias.get(layer.bottom[0], layer.bottom[0])
            note = "" if len(found) == 1 else (
                f"{where} has {len(found)} {layer.type} layers ({', '.join(l.name for l in found)}); using the "
                f"last, {layer.name!r} on {blob!r} (choose another with --logits BLOB)")
            return Head(blob, f"{layer.type} {layer.name!r}", note)
    for layer in reversed(layers):
        if layer.type in ("InnerProduct", "Convolution"):
            return Head(layer.top[0], f"last {layer.type} {layer.name!r}",
                        f"{where} has no SoftmaxWithLoss or Softmax; using the output of the last "
                        f"{layer.type}, {layer.name!r}, as the logits (choose another with --logits BLOB)")
    others = sorted({layer.type for layer in layers if layer.type in LOSS_TYPES})
    raise InputError(f"{where} has no classifier head (no SoftmaxWithLoss, Softmax, InnerProduct or "
                             f"Convolution" + (f"; its losses are {', '.join(others)}" if others else "")
                             + "); name the logits blob with --logits BLOB")


def evaluation_form(net_param, input_shape, batch_size: int, head: Head, classes: int):
    """The layers feeding ``head.logits``, fed by one Input layer (the images and labels, in the net's
    own blob names) and scored by Caffe's SoftmaxWithLoss and Accuracy (top-1, top-min(5, classes))."""
    if batch_size < 1:
        raise InputError(f"the batch size must be at least 1, got {batch_size}")
    data, label, _ = input_blobs(net_param)
    layers, alias = _without_splits(phases.instantiated_layers(net_param))
    body = [layer for layer in layers if layer.type not in DATA_TYPES]
    names = {top for layer in body for top in layer.top} | {data}
    label = label or next(n for n in ("label", "caffe_prune/label") if n not in names)
    end = max((i for i, layer in enumerate(body) if head.logits in layer.top), default=-1)
    needed, kept = {head.logits}, []
    for layer in reversed(body[:end + 1]):
        if needed & set(layer.top):
            kept.append(layer)
            needed |= {alias.get(b, b) for b in layer.bottom}
    out = pycaffe.caffe_pb2().NetParameter(name=net_param.name)
    _input_layer(out, data, [(data, (batch_size, *input_shape)), (label, (batch_size,))])
    out.layer.extend(_copy(layer, alias) for layer in reversed(kept))
    out.layer.add(name="caffe_prune/loss", type="SoftmaxWithLoss", bottom=[head.logits, label],
                  top=[EVAL_TOPS["loss"]])
    out.layer.add(name="caffe_prune/top1", type="Accuracy", bottom=[head.logits, label], top=[EVAL_TOPS["top1"]])
    top5 = out.layer.add(name="caffe_prune/top5", type="Accuracy", bottom=[head.logits, label],
                         top=[EVAL_TOPS["top5"]])
    top5.accuracy_param.top_k = min(5, classes)   # Caffe CHECK-aborts on top_k > classes
    return out


def gradient_form(form):
    """The evaluation form for saliency passes: every layer fed by another learnable layer gets
    lr_mult 0 on its weights, so that Caffe's backward computes the blob diffs the metrics read and
    skips the weight gradients they never read (about half of a backward's GEMMs); the first
    learnable layers on each path from the input keep lr_mult 1, which is what makes Caffe run the
    backward through everything above them. The blob diffs are the same bits."""
    out = pycaffe.caffe_pb2().NetParameter()
    out.CopyFrom(form)
    needs = set()                      # blobs Caffe will back-propagate into
    for layer in out.layer:
        if layer.type in DATA_TYPES:
            continue
        fed = any(b in needs for b in layer.bottom)
        if layer.type in LEARNED_TYPES:
            if not layer.param:
                layer.param.add()
            layer.param[0].lr_mult = 0 if fed else (layer.param[0].lr_mult or 1)
            fed = True
        if fed:
            needs.update(layer.top)
    return out


def write_prototxt(net_param, path):
    """A NetParameter (or SolverParameter) as text, written atomically."""
    from google.protobuf import text_format
    return fsio.write_text(path, text_format.MessageToString(net_param))

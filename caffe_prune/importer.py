"""Import a published model in the authors' format into stock Caffe files.

The myopic-oracle release was made with the authors' Caffe fork: its prototxt carries fields stock
Caffe rejects (``convolution_mask_param``, extra mask ``param {}`` entries per convolution) and
``ImageData`` layers reading their PNG lists; a caffemodel of that fork may hold mask blobs after
the weights and bias. Import turns such a model into a stock prototxt + caffemodel:

- fields unknown to stock Caffe are dropped and listed in one warning;
- mask blobs, when present, are applied (weights x mask) and removed;
- weights are loaded *by layer name* into the project's own definition of that network
  (caffe_prune.networks) when it is one of the six, so every later step runs on the same prototxt;
  otherwise the cleaned authors' prototxt is used as it is.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from caffe_prune import fsio, netdef, pycaffe
from caffe_prune.errors import InputError

UNKNOWN_FIELD = re.compile(r'has no field named "(\w+)"')


def _skip_value(text: str, i: int) -> int:
    """Index just past the value that starts at text[i]: a {...} block, a quoted string or a token."""
    if text[i] == "{":
        depth, quote = 0, None
        while i < len(text):
            ch = text[i]
            if quote:
                quote = None if ch == quote and text[i - 1] != "\\" else quote
            elif ch in "\"'":
                quote = ch
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return i
    if text[i] in "\"'":
        end = text.index(text[i], i + 1)
        return end + 1
    match = re.compile(r"[^\s}]+").match(text, i)
    return match.end() if match else i


def parse_tolerant(path, message):
    """Parse a text prototxt, dropping every field stock Caffe does not know; returns the names dropped."""
    from google.protobuf import text_format
    path = Path(path)
    text = path.read_text()
    dropped = []
    while True:
        try:
            text_format.Parse(text, message)
            return dropped
        except text_format.ParseError as exc:
            field = UNKNOWN_FIELD.search(str(exc))
            if not field or not hasattr(exc, "GetLine"):
                raise InputError(f"{path}:{getattr(exc, 'GetLine', lambda: '?')()}: "
                                         f"{str(exc).split(' : ', 1)[-1]}") from None
            lines = text.split("\n")
            start = sum(len(l) + 1 for l in lines[:exc.GetLine() - 1])
            start = text.index(field.group(1), start)
            i = start + len(field.group(1))
            while text[i] in " \t\n:":
                i += 1
            text = text[:start] + text[_skip_value(text, i):]
            dropped.append(field.group(1))
            message.Clear()


def published_files(src) -> tuple[Path | None, Path]:
    """The authors' prototxt (masked.prototxt preferred; None if absent) and caffemodel of `src`,
    a published model directory or a caffemodel file."""
    src = Path(src)
    if src.is_file() and src.suffix == ".caffemodel":
        return None, src
    if not src.is_dir():
        raise InputError(f"{src} is neither a caffemodel nor a directory holding a published model")
    prototxts = [src / n for n in ("masked.prototxt", "original.prototxt") if (src / n).is_file()]
    models = sorted(src.glob("*.caffemodel"))
    if len(models) != 1:
        raise InputError(f"{src} must hold exactly one caffemodel (and optionally masked.prototxt "
                                 f"or original.prototxt); found {sorted(p.name for p in src.iterdir())}")
    return (prototxts[0] if prototxts else None), models[0]


def _blob_array(blob) -> np.ndarray:
    shape = tuple(blob.shape.dim) if blob.HasField("shape") else (blob.num, blob.channels, blob.height, blob.width)
    return np.asarray(blob.data, dtype=np.float32).reshape(shape)


def unmasked_weights(model_param) -> dict:
    """Layer name -> list of arrays, with any mask blobs applied and removed.

    The fork stores a layer's parameter blobs first (weights, bias) and then one binary mask per
    parameter, shaped like the blob it masks: a blob that has the shape of an earlier one and holds
    only 0 and 1 is that blob's mask. Only Convolution and InnerProduct layers carry masks (a Scale
    layer's beta, shaped like its gamma, may legitimately be all zeros)."""
    weights = {}
    for layer in model_param.layer:
        params = []
        maskable = layer.type in ("Convolution", "InnerProduct")
        for array in (_blob_array(b) for b in layer.blobs):
            target = next((i for i, p in enumerate(params) if p.shape == array.shape), None)
            if maskable and target is not None and np.isin(array, (0.0, 1.0)).all():
                params[target] = params[target] * array
            else:
                params.append(array)
        if params:
            weights[layer.name] = params
    return weights


def network_of(src: Path, model_param, net: str | None) -> str | None:
    """Which of the six networks a model is: `net` if given, else the directory's name
    ('ResNet-20-CIFAR10' -> 'ResNet-20'), else the name embedded in the caffemodel (ours)."""
    from caffe_prune import networks
    if net is not None:
        networks.train_test(net)   # raises on an unknown name
        return net
    for candidate in (src.name.removesuffix("-CIFAR10"), model_param.name):
        if candidate in networks.NETWORKS:
            return candidate
    return None


def weights_mismatch(net_param, weights: dict) -> str | None:
    """Why `weights` do not load by name into `net_param` (built in Caffe), or None if they do."""
    net = pycaffe.net_from_param(net_param)
    for layer, blobs in net.params.items():
        arrays = weights.get(layer)
        if arrays is None:
            return f"no weights for layer {layer!r}"
        if [b.data.shape for b in blobs] != [a.shape for a in arrays]:
            return (f"layer {layer!r} has blob shapes {[a.shape for a in arrays]}, "
                    f"the net expects {[b.data.shape for b in blobs]}")
    return None


def stock_definition(authors, model_param, weights: dict):
    """The authors' own definition made stock: their cleaned prototxt if given, else the one
    embedded in the caffemodel; param specs trimmed to the blobs each layer really has."""
    stock = pycaffe.caffe_pb2().NetParameter()
    stock.CopyFrom(authors if authors is not None else model_param)
    for layer in stock.layer:
        del layer.blobs[:]
        layer.ClearField("phase")
        del layer.param[len(weights.get(layer.name, [])):]
    return stock


def import_published(src, out_dir, net: str | None = None) -> dict:
    """Write <out_dir>/<name>.prototxt (stock, train/test), <name>.deploy.prototxt and
    <name>.caffemodel from a published model; return what was done.

    The project's own definition of the network is used when the weights fit it by layer name and
    shape; otherwise the authors' definition (made stock) is, with a warning saying why."""
    from caffe_prune import networks
    src, out_dir = Path(src), Path(out_dir)
    prototxt, caffemodel = published_files(src)
    model = pycaffe.read_caffemodel(caffemodel)
    name = network_of(src, model, net)
    authors, dropped = None, []
    if prototxt is not None:
        authors = pycaffe.caffe_pb2().NetParameter()
        dropped = parse_tolerant(prototxt, authors)
    weights = unmasked_weights(model)
    masked = sum(len(l.blobs) for l in model.layer) - sum(len(w) for w in weights.values())
    if dropped:
        warnings.warn(f"{prototxt}: dropped fields unknown to stock Caffe: "
                      f"{', '.join(sorted(set(dropped)))} ({len(dropped)} occurrences)", stacklevel=2)

    definition = "caffe_prune.networks"
    if name is not None:
        stock, deploy = networks.train_test(name), networks.deploy(name)
        why = weights_mismatch(deploy, weights)
        if why is not None:
            warnings.warn(f"{caffemodel} does not fit caffe_prune's {name} ({why}); "
                          f"using the model's own definition", stacklevel=2)
    if name is None or why is not None:
        stock = stock_definition(authors, model, weights)
        deploy = netdef.structure_form(stock, networks.IMAGE_SHAPE, str(caffemodel))   # the authors' nets read CIFAR-10
        name = name or caffemodel.parent.name
        definition = str(prototxt or caffemodel)
        why = weights_mismatch(deploy, weights)
        if why is not None:
            raise InputError(f"{caffemodel}: {why} in its own definition: the caffemodel is damaged")
    out_dir.mkdir(parents=True, exist_ok=True)
    stock_path = netdef.write_prototxt(stock, out_dir / f"{name}.prototxt")
    deploy_path = netdef.write_prototxt(deploy, out_dir / f"{name}.deploy.prototxt")
    net_ = pycaffe.load_net(deploy_path, probe=True)
    for layer, blobs in net_.params.items():
        for blob, array in zip(blobs, weights[layer]):
            blob.data[...] = array
    model_path = out_dir / f"{name}.caffemodel"
    with fsio.replacing(model_path) as tmp:
        net_.save(str(tmp))
    return {"network": name, "definition": definition, "prototxt": str(stock_path),
            "deploy": str(deploy_path), "caffemodel": str(model_path), "dropped_fields": sorted(set(dropped)),
            "mask_blobs_applied": masked, "layers": len(net_.params)}

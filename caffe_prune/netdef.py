"""Network definitions: the forms Caffe runs, derived from one NetParameter.

A trained model arrives as a NetParameter (a prototxt, or the definition embedded in a caffemodel)
with data layers that read files and a loss at the end. Pruning and evaluation feed data from
Python instead, so the toolkit derives an *evaluation* form: the data layers become ``Input`` layers
(``data`` and ``label``), auto-inserted Split layers are dropped (Caffe re-inserts them), and the
loss and accuracy are Caffe's own ``SoftmaxWithLoss`` and ``Accuracy`` layers (top-1 and top-5) on
the logits. The transform the data layers applied is returned alongside, because the fed data
must reproduce it (see caffe_prune.data.cifar10.caffe_input).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from caffe_prune import engine

DATA_TYPES = {"Data", "ImageData", "HDF5Data", "MemoryData", "Input", "DummyData", "WindowData"}
HEAD_TYPES = {"SoftmaxWithLoss", "Accuracy", "Softmax"}


@dataclass(frozen=True)
class Transform:
    """Caffe's transform_param as applied to TEST images: (pixel - mean_value[c]) * scale, BGR."""
    scale: float = 1.0
    mean_values: tuple = ()

    @classmethod
    def of(cls, layer) -> "Transform":
        tp = layer.transform_param
        if tp.mean_file:
            raise engine.EngineError(f"layer {layer.name!r}: transform_param mean_file is not supported; "
                                     f"use mean_value")
        if tp.crop_size:
            raise engine.EngineError(f"layer {layer.name!r}: transform_param crop_size is not supported")
        return cls(scale=tp.scale if tp.HasField("scale") else 1.0, mean_values=tuple(tp.mean_value))


def input_shape(layer) -> tuple:
    """(C, H, W) a data layer hands the net: an Input layer's own shape, an ImageData layer's
    new_height/new_width or crop, else CIFAR-10's 3x32x32 (what the six networks read)."""
    if layer.type == "Input" and layer.input_param.shape and len(layer.input_param.shape[0].dim) == 4:
        return tuple(layer.input_param.shape[0].dim[1:])
    crop = layer.transform_param.crop_size
    if crop:
        return (3, crop, crop)
    if layer.type == "ImageData" and layer.image_data_param.new_height:
        p = layer.image_data_param
        return (1 if p.HasField("is_color") and not p.is_color else 3, p.new_height, p.new_width)
    return (3, 32, 32)


def evaluation_form(net_param, batch_size: int = 128):
    """Return (NetParameter, Transform): the net fed by Input layers, scored by Caffe's own layers."""
    pb2 = engine.caffe_pb2()
    layers = engine.layers_in_phase(net_param, "test")
    if not any(l.type in DATA_TYPES for l in layers):   # a caffemodel saved from the TRAIN net
        layers = engine.layers_in_phase(net_param, "train")
    data_layers = [l for l in layers if l.type in DATA_TYPES]
    if not data_layers:
        raise engine.EngineError(f"net {net_param.name!r} has no data layer to take the transform from")
    transform = Transform.of(data_layers[0])
    losses = [l for l in layers if l.type == "SoftmaxWithLoss"]
    if len(losses) != 1:
        raise engine.EngineError(f"net {net_param.name!r} has {len(losses)} SoftmaxWithLoss layers; "
                                 f"expected one, on the logits")
    logits = losses[0].bottom[0]

    out = pb2.NetParameter(name=net_param.name)
    data = out.layer.add(name="data", type="Input", top=["data", "label"])
    data.input_param.shape.add(dim=[batch_size, *input_shape(data_layers[0])])
    data.input_param.shape.add(dim=[batch_size])
    split_alias = {}  # auto-inserted Split tops -> the blob they copy
    for layer in layers:
        if layer.type == "Split":
            split_alias.update({top: split_alias.get(layer.bottom[0], layer.bottom[0]) for top in layer.top})
            continue
        if layer.type in DATA_TYPES or layer.type in HEAD_TYPES:
            continue
        copy = out.layer.add()
        copy.CopyFrom(layer)
        del copy.blobs[:]
        copy.ClearField("include")
        copy.ClearField("exclude")
        copy.ClearField("phase")   # a definition saved from the TRAIN net pins phase: TRAIN on every layer
        copy.bottom[:] = [split_alias.get(b, b) for b in layer.bottom]
    logits = split_alias.get(logits, logits)
    out.layer.add(name="loss", type="SoftmaxWithLoss", bottom=[logits, "label"], top=["loss"])
    out.layer.add(name="top1", type="Accuracy", bottom=[logits, "label"], top=["top1"])
    top5 = out.layer.add(name="top5", type="Accuracy", bottom=[logits, "label"], top=["top5"])
    top5.accuracy_param.top_k = min(5, _classes(out, logits))   # Caffe CHECK-aborts on top_k > classes
    return out, transform


def _classes(net_param, logits: str) -> int:
    """How many classes the logits hold: num_output of the last layer writing them (5 if unknown)."""
    for layer in reversed(net_param.layer):
        if logits in layer.top:
            if layer.type == "InnerProduct":
                return layer.inner_product_param.num_output
            if layer.type == "Convolution":
                return layer.convolution_param.num_output
            if layer.bottom:
                logits = layer.bottom[0]
    return 5


def write_prototxt(net_param, path) -> Path:
    from google.protobuf import text_format
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_format.MessageToString(net_param))
    return path

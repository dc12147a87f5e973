"""One registry of per-layer rules: everything the toolkit asks about a Caffe layer *type*.

Every module that must know something about a layer type asks its rule here (``rule(type)`` or
``rule(layer)``), so that supporting a new type is one rule object (as Torch-Pruning keeps one
pruner per op type, owning both sides of a layer): ``register(type, rule)`` adds one for a layer
type of a Caffe fork or a user's own ``Python`` layer (keyed ``"Python:module.Layer"``, its
python_param), from a script or a plugin. The rules live by family: ``rule`` (the base ``Rule``
and ``Slice``), ``data`` (data layers, heads), ``weighted`` (Convolution, Deconvolution,
InnerProduct), ``passing`` (channel c in, channel c out), ``branches`` (Eltwise, Concat, Slice,
Flatten, Silence); ``units`` holds what the channel trace is made of. A rule answers:

- ``trace(tracer, layer, bottoms)``: how channels go through the layer (caffe_prune.channels walks
  the net and calls it); its ``kind`` names the family: ``data`` (starts tensors),
  ``head`` (losses, accuracy, softmax: the channels reaching it are the classes), ``pass``
  (channel c in, channel c out; per-channel parameters *ride* on the channel), ``conv`` (consumes
  its input's channels and produces new ones), ``fc`` (consumes; its outputs are no longer
  channels), ``eltwise`` (ties channel c of every input), ``concat``, ``slice`` (offsets on the
  channel axis), ``flatten`` (keeps channels only when it flattens C, H, W in order), ``sink``.
  A type with no entry is a **barrier**: the channels reaching it are unprunable, never guessed;
  ``barrier(layer, axis)`` names the parameter settings that make a known type one (a Scale with
  a second bottom, a Concat on another axis, a Reduction over the channels, ...).
- the **slice geometry** (``producer_slices``, ``consumer_slices``, ``rider_slices``): which parts
  of which parameter blobs fall with an output channel, an input channel, a per-channel parameter.
  caffe_prune.graph turns a group into those ``Slice``s once (``group_slices``); masking zeroes
  them, export deletes them along their axis, the weight and MAC counts and held-zero training read
  them. A Convolution's weights are (out, in/group, kh, kw), a Deconvolution's (in, out/group, kh,
  kw): the same questions, the axes swapped, answered here alone.
- what it **costs**: ``learns`` (weights the channel graph cuts: Convolution, Deconvolution,
  InnerProduct), ``macs_per_weight`` (a convolution's weight is used once per output position, a
  deconvolution's once per input position, an InnerProduct's once);
- riders (``rider_blobs``: the parameter blobs holding one entry per channel, which export slices;
  ``zero_blobs``: those whose zero makes a pruned channel's output zero, zeroed by masking's
  zero-downstream semantics: papers/004's constant-map trap for BatchNorm and Scale);
- ``in_place``: Caffe computes the layer correctly with top == bottom. A Convolution, Pooling or
  InnerProduct run in place computes garbage without any error, so the engine refuses it;
- ``check(layer)``: what Caffe's layer setup CHECK-aborts on (one line, or None);
- data layers: the parameter message, ``source``, ``batch_size``, which reader reads the records
  (caffe_prune.data.caffe_reading: ``db``, ``list``, ``hdf5``) and whether ``transform_param`` applies;
- heads: ``role`` (``loss``, ``accuracy``, ``softmax``);
- ``hessian``: OBD's strategy for the Hessian diagonal pass (one of ``HESSIAN``, each implemented
  once in caffe_prune.metrics.hessian):
  ``weighted`` (W∘W in Caffe's backward), ``diagonal`` (d²·h), ``routing`` (Caffe's backward as
  it is), ``pool`` (max: routing; average: divide by the window size first), ``loss`` (h seeded at
  the output; ``seeds`` which bottoms), or None with ``why`` saying why it has no diagonal rule;
  ``hessian_check(layer, bottoms)`` refuses parameter settings the rule does not cover.
"""
from __future__ import annotations

from caffe_prune.layers.branches import Eltwise, Flatten, OnChannels, Sink
from caffe_prune.layers.data import Data, Head
from caffe_prune.layers.passing import (LRN, MVN, BatchNorm, Crop, Dropout, Pass, Pooling, PReLU, Reduction,
                                        ScaleBias)
from caffe_prune.layers.rule import HESSIAN, KINDS, NO_DIAGONAL, ROLES, Rule, Slice
from caffe_prune.layers.weighted import Conv, InnerProduct

_DATA_PARAMS = {"Data": ("data_param", "db"), "ImageData": ("image_data_param", "list"),
                "HDF5Data": ("hdf5_data_param", "hdf5"), "MemoryData": ("memory_data_param", None),
                "WindowData": ("window_data_param", None), "DummyData": ("dummy_data_param", None),
                "Input": ("input_param", None)}

RULES = {
    # data layers: where tensors start
    **{t: Data(param, reader, transforms=t != "HDF5Data", fed=t == "Input") for t, (param, reader) in _DATA_PARAMS.items()},
    # heads: their inputs are the classes
    **{t: Head() for t in ("ArgMax", "HingeLoss", "InfogainLoss", "MultinomialLogisticLoss",
                           "SigmoidCrossEntropyLoss", "ContrastiveLoss")},
    "Accuracy": Head("accuracy"),
    "SoftmaxWithLoss": Head("loss", hessian="loss"),
    "EuclideanLoss": Head("loss", hessian="loss", seeds="all"),
    "Softmax": Head("softmax", why="softmax couples the channels it normalizes, so its Jacobian is not diagonal"),
    # channel c in, channel c out
    "ReLU": Pass(in_place=True, hessian="diagonal"),
    "Dropout": Dropout(),
    "BatchNorm": BatchNorm(),
    "Scale": ScaleBias("scale_param", riders=(0, 1), zeroes=(0, 1)),
    "Bias": ScaleBias("bias_param", riders=(0,), zeroes=(0,)),
    "PReLU": PReLU(),
    "ELU": Pass(in_place=True, why=NO_DIAGONAL),
    "Sigmoid": Pass(in_place=True, why=NO_DIAGONAL),
    "TanH": Pass(in_place=True, why=NO_DIAGONAL),
    "Swish": Pass(why=NO_DIAGONAL),
    # not in place: Clip's backward reads its bottom, so in place it passes every gradient (tests/test_forks.py)
    "Clip": Pass(why="Clip has no OBD rule here"),
    "Threshold": Pass(in_place=True, why="Threshold has no backward"),
    "Exp": Pass(in_place=True, why=NO_DIAGONAL),
    "AbsVal": Pass(why="AbsVal has no OBD rule here"),
    "Power": Pass(why=NO_DIAGONAL),
    "BNLL": Pass(why=NO_DIAGONAL),
    "Log": Pass(why=NO_DIAGONAL),
    "Pooling": Pooling(),
    "LRN": LRN(),
    "MVN": MVN(),
    "Reduction": Reduction(),
    "Split": Pass(hessian="routing"),
    "Crop": Crop(),
    # consumers and producers
    "Convolution": Conv(),
    "Deconvolution": Conv(transposed=True),
    "InnerProduct": InnerProduct(),
    # branches
    "Eltwise": Eltwise(),
    "Concat": OnChannels("concat", "concat_param", "concat_dim", "top"),
    "Slice": OnChannels("slice", "slice_param", "slice_dim", "bottom"),
    "Flatten": Flatten(),
    "Reshape": Flatten(),
    "Silence": Sink(),
}

BARRIER = Rule("barrier", why="no rule for this layer type")




def key(layer) -> str:
    """The registry key of a layer: its type, or for a ``Python`` layer "Python:module.Layer" (each
    Python layer class is a type of its own)."""
    if layer.type == "Python":
        return f"Python:{layer.python_param.module}.{layer.python_param.layer}"
    return layer.type


def rule(layer_or_type) -> Rule:
    """The rule of a layer (a LayerParameter) or of a layer type; one with no entry is a barrier."""
    name = layer_or_type if isinstance(layer_or_type, str) else key(layer_or_type)
    return RULES.get(name, BARRIER)


def register(layer_type: str, rule_: Rule) -> None:
    """Add (or replace) the rule of ``layer_type``: a type stock Caffe does not know (a fork's,
    built by a Caffe that has it) or ``"Python:module.Layer"`` for a Python layer, e.g.
    ``layers.register("Python:mylayers.Identity", layers.Pass(in_place=True))`` for a layer that
    passes its channels through. The rule is used by every question asked after the call."""
    if not isinstance(rule_, Rule):
        raise TypeError(f"register({layer_type!r}, ...) takes a caffe_prune.layers Rule, not {type(rule_).__name__}")
    if not isinstance(layer_type, str) or not layer_type:
        raise TypeError("register's layer type is a non-empty string (\"Python:module.Layer\" for a Python layer)")
    RULES[layer_type] = rule_
    for kind_set, member in ((DATA_TYPES, rule_.kind == "data"), (HEAD_TYPES, rule_.kind == "head"),
                             (LOSS_TYPES, rule_.kind == "head" and layer_type.endswith("Loss")),
                             (LEARNED_TYPES, rule_.learns)):
        (kind_set.add if member else kind_set.discard)(layer_type)


def types(kind: str) -> set:
    """Every layer type of one kind (e.g. all data layers)."""
    return {t for t, r in RULES.items() if r.kind == kind}


def type_reading(reader: str) -> str:
    """The data layer type whose records the reader ``db``, ``list`` or ``hdf5`` reads."""
    return next(t for t, r in RULES.items() if isinstance(r, Data) and r.reader == reader)


def role(layer_type: str) -> str | None:
    """A head's role (loss, accuracy, softmax), else None."""
    return getattr(rule(layer_type), "role", None)


def rider_blobs(layer) -> tuple:
    return rule(layer).rider_blobs(layer)


def zero_blobs(layer) -> tuple:
    return rule(layer).zero_blobs(layer)


def is_fed(layer) -> bool:
    """A layer whose tops the caller fills (an Input layer)."""
    return bool(getattr(rule(layer), "fed", False))


def reader(layer) -> str | None:
    """Which caffe_prune.data.caffe_reading reader reads the layer's records (db, list, hdf5), or None."""
    return getattr(rule(layer), "reader", None)


def transforms(layer) -> bool:
    """Whether the layer applies its transform_param (HDF5Data does not, and refuses one)."""
    return bool(getattr(rule(layer), "transforms", False))


def is_reader(layer) -> bool:
    """A data layer whose records caffe_prune.data.caffe_reading reads (Data, ImageData, HDF5Data)."""
    return getattr(rule(layer), "reader", None) is not None


def source(layer) -> str:
    """What a Data, ImageData or HDF5Data layer reads (its ``source``); "" for any other layer."""
    r = rule(layer)
    return r.source(layer) if isinstance(r, Data) and r.reader else ""


def batch_size(layer) -> int:
    """A data layer's batch_size (0 for a layer without one)."""
    r = rule(layer)
    return r.batch_size(layer) if isinstance(r, Data) else 0


# kept up to date by ``register`` (sets, changed in place, so that every importer sees a registered type)
DATA_TYPES = types("data")
HEAD_TYPES = types("head")
LOSS_TYPES = {t for t in HEAD_TYPES if t.endswith("Loss")}
LEARNED_TYPES = {t for t, r in RULES.items() if r.learns}


__all__ = ["BARRIER", "BatchNorm", "Conv", "Crop", "DATA_TYPES", "Data", "Dropout", "Eltwise", "Flatten", "HEAD_TYPES",
           "HESSIAN", "Head", "InnerProduct", "KINDS", "LEARNED_TYPES", "LOSS_TYPES", "LRN", "MVN", "NO_DIAGONAL",
           "OnChannels", "PReLU", "Pass", "Pooling", "ROLES", "RULES", "Reduction", "Rule", "ScaleBias", "Sink",
           "Slice", "batch_size", "is_fed", "is_reader", "key", "reader", "register", "rider_blobs", "role", "rule",
           "source", "transforms", "type_reading", "types", "zero_blobs"]

"""One registry of per-layer rules: how each Caffe layer type treats channels.

Every module that must know something about a layer type reads it here, so that supporting a new
type is one entry (as Torch-Pruning keeps one pruner per op type):

- ``kind``: how the channel graph (caffe_prune.graph) follows it:
  ``data`` (starts tensors; no channel comes from a convolution), ``head`` (losses, accuracy,
  softmax: the channels reaching it are the classes), ``pass`` (channel c in, channel c out; the
  per-channel parameters *ride* on the channel), ``conv`` (consumes its input's channels and
  produces new ones), ``fc`` (consumes; its outputs are no longer channels), ``eltwise`` (ties
  channel c of every input), ``concat``, ``slice`` (offsets on the channel axis), ``flatten``
  (keeps channels only when it flattens C, H, W in order), ``sink`` (reads, writes nothing).
  A type with no entry is a **barrier**: the channels reaching it are unprunable, never guessed.
- ``riders``: the parameter blobs holding one entry per channel (export slices them), and
  ``zeroes``: those whose zero makes a pruned channel's output zero (masking's zero-downstream
  semantics; papers/004's constant-map trap for BatchNorm and Scale).
- ``in_place``: Caffe computes the layer correctly with top == bottom (forward and backward). A
  Convolution, Pooling or InnerProduct run in place computes garbage without any error, so the
  engine refuses it (caffe_prune.engine.check_net).
- ``hessian``: OBD's rule for the Hessian diagonal pass (caffe_prune.metrics.hessian):
  ``weighted`` (W∘W in Caffe's backward), ``diagonal`` (a diagonal Jacobian: d²·h), ``routing``
  (Caffe's backward as it is), ``pool`` (max: routing; average: divide by the window size first),
  ``loss`` (h seeded at the output), or None with ``why`` saying why it has no diagonal rule.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    kind: str
    riders: tuple = ()
    zeroes: tuple = ()
    in_place: bool = False
    hessian: str | None = None
    why: str = ""


_NO_DIAGONAL = "its second derivative is not zero, so OBD's diagonal rule would need the gradient too"
_DATA = Rule("data", hessian="routing")
_HEAD = Rule("head", why="only SoftmaxWithLoss and EuclideanLoss seed h")

RULES = {
    # data layers: where tensors start
    **{t: _DATA for t in ("Data", "ImageData", "HDF5Data", "MemoryData", "Input", "DummyData", "WindowData")},
    # heads: their inputs are the classes
    **{t: _HEAD for t in ("Accuracy", "ArgMax", "HingeLoss", "InfogainLoss", "MultinomialLogisticLoss",
                          "SigmoidCrossEntropyLoss", "ContrastiveLoss")},
    "SoftmaxWithLoss": Rule("head", hessian="loss"),
    "EuclideanLoss": Rule("head", hessian="loss"),
    "Softmax": Rule("head", why="softmax couples the channels it normalizes, so its Jacobian is not diagonal"),
    # channel c in, channel c out
    "ReLU": Rule("pass", in_place=True, hessian="diagonal"),
    "Dropout": Rule("pass", in_place=True, hessian="diagonal"),
    "BatchNorm": Rule("pass", riders=(0, 1), zeroes=(0,), in_place=True, hessian="diagonal"),
    "Scale": Rule("pass", riders=(0, 1), zeroes=(0, 1), in_place=True, hessian="diagonal"),
    "Bias": Rule("pass", riders=(0,), zeroes=(0,), in_place=True, hessian="diagonal"),
    "PReLU": Rule("pass", riders=(0,), in_place=True, why="PReLU has no OBD rule here"),
    "ELU": Rule("pass", in_place=True, why=_NO_DIAGONAL),
    "Sigmoid": Rule("pass", in_place=True, why=_NO_DIAGONAL),
    "TanH": Rule("pass", in_place=True, why=_NO_DIAGONAL),
    "Swish": Rule("pass", why=_NO_DIAGONAL),
    "Clip": Rule("pass", in_place=True, why="Clip has no OBD rule here"),
    "Threshold": Rule("pass", in_place=True, why="Threshold has no backward"),
    "Exp": Rule("pass", in_place=True, why=_NO_DIAGONAL),
    "AbsVal": Rule("pass", why="AbsVal has no OBD rule here"),
    "Power": Rule("pass", why=_NO_DIAGONAL),
    "BNLL": Rule("pass", why=_NO_DIAGONAL),
    "Log": Rule("pass", why=_NO_DIAGONAL),
    "Pooling": Rule("pass", hessian="pool"),
    "LRN": Rule("pass", why="local response normalization couples neighbouring channels, so its Jacobian "
                            "is not diagonal"),
    "Split": Rule("pass", hessian="routing"),
    "Crop": Rule("pass", hessian="routing"),
    # consumers and producers
    "Convolution": Rule("conv", hessian="weighted"),
    "InnerProduct": Rule("fc", hessian="weighted"),
    # branches
    "Eltwise": Rule("eltwise", hessian="diagonal"),
    "Concat": Rule("concat", hessian="routing"),
    "Slice": Rule("slice", hessian="routing"),
    "Flatten": Rule("flatten", hessian="routing"),
    "Reshape": Rule("flatten", hessian="routing"),
    "Silence": Rule("sink"),
}

KINDS = ("data", "head", "pass", "conv", "fc", "eltwise", "concat", "slice", "flatten", "sink")
BARRIER = Rule("barrier", why="no rule for this layer type")


def rule(layer_type: str) -> Rule:
    """The rule of a layer type; a type with no entry is a barrier."""
    return RULES.get(layer_type, BARRIER)


def types(kind: str) -> frozenset:
    """Every layer type of one kind (e.g. all data layers)."""
    return frozenset(t for t, r in RULES.items() if r.kind == kind)


def rider_blobs(layer) -> tuple:
    """The per-channel parameter blobs of a layer instance (riders of its rule, limited to the blobs
    the layer really has: a Scale without bias_term has no beta; a channel-shared PReLU has none)."""
    r = rule(layer.type)
    if layer.type == "Scale":
        return (0, 1) if layer.scale_param.bias_term else (0,)
    if layer.type == "PReLU" and layer.prelu_param.channel_shared:
        return ()
    return r.riders


def zero_blobs(layer) -> tuple:
    """Of ``rider_blobs(layer)``, those to zero so that a pruned channel's output is zero."""
    return tuple(b for b in rule(layer.type).zeroes if b in rider_blobs(layer))


DATA_TYPES = types("data")
HEAD_TYPES = types("head")
LOSS_TYPES = frozenset(t for t in HEAD_TYPES if t.endswith("Loss"))

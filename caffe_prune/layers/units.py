"""What the channel trace is made of: units (a convolution's output channels), the tensors that carry
them from layer to layer, and what falls with a unit (consumer slices, riders), with the weighted
layers' geometry. Plain values, shared by the layer rules (which say how each type moves them) and
caffe_prune.channels (which walks a net) and caffe_prune.graph (which groups them)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

NO_UNITS = frozenset()


@dataclass(frozen=True)
class Channel:
    """A unit: output channel ``index`` of Convolution ``layer`` (papers/004 §3: A_i, made by W_i)."""
    layer: str
    index: int

    def __str__(self):
        return f"{self.layer}:{self.index}"


@dataclass(frozen=True)
class ConsumerSlice:
    """Input channel ``input_channel`` of weighted layer ``layer`` (a convolution's [:, c] weight
    slice, an InnerProduct's block of H*W columns; ``kind`` "conv" or "fc"): removed with the channel."""
    layer: str
    kind: str
    input_channel: int


@dataclass(frozen=True)
class Rider:
    """Channel ``channel`` of a layer's per-channel parameters (BatchNorm, Scale, Bias, PReLU)."""
    layer: str
    type: str
    channel: int


@dataclass(frozen=True)
class ProducerInfo:
    """A Convolution's (or Deconvolution's) weights: num_output x (in_channels / group) x
    kernel_area (a Deconvolution stores them in_channels x (num_output / group) x kernel_area).

    ``depthwise``: every group reads exactly one input channel (group == in_channels > 1, a
    MobileNet depthwise or channel-multiplier convolution). Removing input channel c then removes
    the whole group c (its num_output / group outputs) and lowers ``group`` by one, instead of
    tying channel c to every other group's channel as AlexNet's two groups require. ``type`` is
    the layer's type, whose rule (caffe_prune.layers) gives the slice geometry."""
    num_output: int
    group: int
    kernel_area: int
    in_channels: int
    bias: bool
    depthwise: bool = False
    type: str = field(default="", compare=False)


class FcInfo(NamedTuple):
    """An InnerProduct's weights: num_output x (in_channels * block) columns (rows when
    ``transpose``, Caffe's inner_product_param.transpose, stores the matrix the other way).
    ``type`` is the layer's type, whose rule gives the slice geometry."""
    num_output: int
    in_channels: int | None
    block: int
    transpose: bool = False
    type: str = "InnerProduct"


class Tensor(NamedTuple):
    """A blob as the trace sees it: one frozenset of units per channel, and the elements per
    channel (H*W; None for an InnerProduct's output, which has no channels)."""
    channels: tuple
    block: int | None


def tensor_of(shape) -> Tensor:
    """A tensor no convolution's units reach (data, or whatever leaves a barrier)."""
    if shape is None or len(shape) < 2:
        return Tensor((), None)
    return Tensor((NO_UNITS,) * shape[1], math.prod(shape[2:]))

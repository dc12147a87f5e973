"""The layers where tensors branch, meet or change shape: Eltwise (ties channel c of every input:
papers/004 §3.2's transitive closure), Concat and Slice on the channel axis (offset channels),
Flatten and Reshape (keep channels only as a pure flattening of C, H, W), Silence (a sink)."""
from __future__ import annotations

import math

from caffe_prune.layers.rule import Rule
from caffe_prune.layers.units import NO_UNITS, Tensor


class Eltwise(Rule):
    """SUM, PROD, MAX: channel c of every input falls together (a residual sum ties its branches);
    inputs of different widths are a barrier."""

    def __init__(self):
        super().__init__("eltwise", hessian="diagonal")

    def trace(self, tracer, layer, bottoms):
        widths = [len(t.channels) for t in bottoms]
        if len(set(widths)) > 1:
            return tracer.barrier(layer, bottoms, f"Eltwise inputs have {widths} channels")
        why = f"is added by Eltwise {layer.name!r} to a channel no convolution produces"
        for c in range(widths[0]):
            tracer.tie([t.channels[c] for t in bottoms], why)
        channels = tuple(NO_UNITS.union(*(t.channels[c] for t in bottoms)) for c in range(widths[0]))
        shape = tracer.shapes.get(layer.top[0])
        block = None if bottoms[0].block is None or shape is None else math.prod(shape[2:])
        return [Tensor(channels, block)]


class OnChannels(Rule):
    """Concat and Slice: on the channel axis they offset channels (their ``kind``); on another axis
    they are a barrier. ``field`` is the parameter message, ``legacy`` its old axis field, read on
    the blob ``side`` names (Concat's axis is its top's, Slice's its bottom's)."""

    def __init__(self, kind: str, field: str, legacy: str, side: str):
        super().__init__(kind, hessian="routing")
        for name, value in (("field", field), ("legacy", legacy), ("side", side)):
            object.__setattr__(self, name, value)

    def barrier(self, layer, axis):
        param = getattr(layer, self.field)
        blob = getattr(layer, self.side)[0]
        where = getattr(param, self.legacy) if param.HasField(self.legacy) else axis(param.axis, blob)
        return None if where == 1 else f"{layer.type} on axis {where}, not channels"

    def trace(self, tracer, layer, bottoms):
        if self.kind == "concat":          # the inputs' channels one after the other
            shape = tracer.shape(layer.top[0], layer)
            return [Tensor(sum((t.channels for t in bottoms), ()), math.prod(shape[2:]))]
        x, outs, start = bottoms[0], [], 0   # each top takes its range of the input's channels
        for top in layer.top:
            width = tracer.shape(top, layer)[1]
            outs.append(Tensor(x.channels[start:start + width], x.block))
            start += width
        tracer.add_slice(layer, outs)
        return outs


class Flatten(Rule):
    """Flatten and Reshape: keep the channels when the top is (N, C*H*W), or the shape is unchanged
    (an InnerProduct after it then sees the same columns as without it: Caffe blobs are row-major
    N, C, H, W); any other reshape is a barrier."""

    def __init__(self):
        super().__init__("flatten", hessian="routing")

    def trace(self, tracer, layer, bottoms):
        x = bottoms[0]
        top = tracer.shape(layer.top[0], layer)
        if top == tracer.shapes.get(layer.bottom[0]) or top[1:] == (len(x.channels) * (x.block or 1),):
            return [x]
        return tracer.barrier(layer, bottoms, f"{layer.type} to {top} is not a pure flattening of C, H, W")


class Sink(Rule):
    """Silence: reads its bottoms and produces nothing."""

    def __init__(self):
        super().__init__("sink")

    def trace(self, tracer, layer, bottoms):
        return []

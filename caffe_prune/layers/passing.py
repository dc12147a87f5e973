"""The layers that pass channel c through as channel c: activations, normalisations, pooling,
dropout, per-channel scales and biases (whose parameters ride on the channel), crops, reductions
over the spatial axes. Each says when its parameters make it a barrier, what Caffe CHECK-aborts
on, its OBD Hessian strategy and the buffers its forward keeps."""
from __future__ import annotations

from caffe_prune.layers.rule import Rule
from caffe_prune.layers.units import Tensor


class Pass(Rule):
    """Channel c in, channel c out (ReLU, Pooling, Dropout, LRN, BatchNorm, Scale, Bias, PReLU, Crop on
    spatial axes, ...). A layer with per-channel blobs records *riders*: they fall with the channel
    (which blobs are sliced, which zeroed: ``rider_blobs`` and ``zero_blobs``); one that couples
    neighbouring channels (across-channel LRN) is noted: pruning a channel changes its neighbours'
    normalisation, a data dependence that is not a weight dependence."""

    def __init__(self, riders=(), zeroes=(), in_place=False, hessian=None, why=""):
        super().__init__("pass", riders, zeroes, in_place, hessian, why)

    def trace(self, tracer, layer, bottoms):
        x = bottoms[0]
        if self.rider_blobs(layer):
            tracer.add_riders(layer, x, self.rider_blobs(layer), self.zero_blobs(layer))
        if self.couples(layer):
            tracer.note_coupling(layer, x)
        return [tracer.same_channels(x, top) for top in layer.top]


class ScaleBias(Pass):
    """Scale and Bias: riders on the channel axis; another axis makes them a barrier; num_axes 0 (one
    scalar) rides on nothing. A Scale with a second bottom on axis 0 (an SE block's per-image gate
    of shape (N, C), as caffe_prune.forks writes Axpy) multiplies channel c by channel c of the
    factor: like an Eltwise, channel c of both falls together (a removed channel of either leaves
    a zero product); a second bottom otherwise, or to a Bias (x + b is not zero when x is), is a
    barrier."""

    def __init__(self, field: str, riders, zeroes):
        super().__init__(riders, zeroes, in_place=True, hessian="diagonal")
        object.__setattr__(self, "field", field)

    def barrier(self, layer, axis):
        param = getattr(layer, self.field)
        where = axis(param.axis, layer.bottom[0])
        if len(layer.bottom) > 1 and not (self.field == "scale_param" and where == 0):
            return f"{layer.type} with a second bottom, other than a Scale's on axis 0"
        if len(layer.bottom) == 1 and where != 1:
            return f"{layer.type} on an axis other than channels"
        return None

    def trace(self, tracer, layer, bottoms):
        if len(bottoms) == 1:
            return super().trace(tracer, layer, bottoms)
        x, factor = bottoms
        shape = tracer.shapes.get(layer.bottom[1], ())
        if len(shape) < 2 or len(factor.channels) != len(x.channels) or layer.scale_param.bias_term:
            return tracer.barrier(layer, bottoms, f"Scale by a second bottom of shape {shape} (bias_term "
                                                  f"{layer.scale_param.bias_term}), not a gate of one value per "
                                                  f"image and channel of its input")
        why = f"is multiplied by Scale {layer.name!r} with a channel no convolution produces"
        for c in range(len(x.channels)):
            tracer.tie([x.channels[c], factor.channels[c]], why)
        merged = Tensor(tuple(a | b for a, b in zip(x.channels, factor.channels)), x.block)
        return [tracer.same_channels(merged, top) for top in layer.top]

    def rider_blobs(self, layer):
        param = getattr(layer, self.field)
        if len(layer.bottom) > 1:          # a gate: no blob of its own (a bias would be (N, C): a barrier)
            return ()
        if param.num_axes == 0:
            return ()
        if self.field == "scale_param" and not param.bias_term:
            return (0,)
        return self.riders

    def hessian_check(self, layer, bottoms):
        if bottoms > 1:
            return f"takes its factor from a second bottom; only a learned {layer.type} is diagonal"
        return None

    def buffers(self, layer):
        return int(self.field == "scale_param" and list(layer.bottom[:1]) == list(layer.top[:1]))


class PReLU(Pass):
    def __init__(self):
        super().__init__(riders=(0,), in_place=True, why="PReLU has no OBD rule here")

    def rider_blobs(self, layer):
        return () if layer.prelu_param.channel_shared else self.riders

    def buffers(self, layer):
        return int(list(layer.bottom[:1]) == list(layer.top[:1]))


class BatchNorm(Pass):
    def __init__(self):
        super().__init__(riders=(0, 1), zeroes=(0,), in_place=True, hessian="diagonal")

    def buffers(self, layer):
        return 2

    def hessian_check(self, layer, bottoms):
        param = layer.batch_norm_param
        test_phase = layer.phase == 1       # caffe.proto Phase: TRAIN = 0, TEST = 1
        global_stats = param.use_global_stats if param.HasField("use_global_stats") else test_phase
        if not global_stats:
            return "normalizes with the mini-batch's statistics, which couples the batch; build the net in the " \
                   "TEST phase"
        return None


class Crop(Pass):
    def __init__(self):
        super().__init__(hessian="routing")

    def barrier(self, layer, axis):
        return "Crop of the channel axis" if axis(layer.crop_param.axis, layer.bottom[0]) < 2 else None


class Pooling(Pass):
    def __init__(self):
        super().__init__(hessian="pool")

    def check(self, layer):
        pp = layer.pooling_param
        if not pp.global_pooling:
            kernels = [pp.kernel_h, pp.kernel_w] if pp.HasField("kernel_h") else [pp.kernel_size]
            if min(kernels) < 1:
                return "kernel_size must be at least 1 (or global_pooling: true)"
        strides = [pp.stride_h, pp.stride_w] if pp.HasField("stride_h") else [pp.stride]
        return "stride must be at least 1" if min(strides) < 1 else None

    def hessian_check(self, layer, bottoms):
        # caffe.proto PoolingParameter.PoolMethod: MAX = 0, AVE = 1, STOCHASTIC = 2
        return None if layer.pooling_param.pool in (0, 1) else "pools by neither MAX nor AVE, the two with a rule"

    @staticmethod
    def averages(layer) -> bool:
        return layer.pooling_param.pool == 1

    def buffers(self, layer):
        return int(layer.pooling_param.pool == 0 and len(layer.top) == 1)


class LRN(Pass):
    def __init__(self):
        super().__init__(why="local response normalization couples neighbouring channels, so its Jacobian "
                             "is not diagonal")

    def check(self, layer):
        size = layer.lrn_param.local_size
        return f"local_size {size} must be odd" if size % 2 == 0 else None

    def couples(self, layer):
        return layer.lrn_param.norm_region == layer.lrn_param.ACROSS_CHANNELS

    def buffers(self, layer):
        # within a channel Caffe builds it from split, square, pooling, power and product layers
        return 1 if self.couples(layer) else 5


class Dropout(Pass):
    def __init__(self):
        super().__init__(in_place=True, hessian="diagonal")

    def check(self, layer):
        ratio = layer.dropout_param.dropout_ratio
        return f"dropout_ratio {ratio} must be in [0, 1)" if not 0 <= ratio < 1 else None


class Reduction(Pass):
    """Reduction over the tail axes from ``axis``: from axis 2 on, each channel to one value (a
    global pooling: a pruned channel's zeros stay zero); over the channels it mixes them."""

    def __init__(self):
        super().__init__(why="no OBD rule here for a reduction")

    def barrier(self, layer, axis):
        where = axis(layer.reduction_param.axis, layer.bottom[0])
        return None if where >= 2 else f"Reduction from axis {where} mixes the channels"


class MVN(Pass):
    """Mean-variance normalisation per channel (a zero map stays zero: (0 - 0) / (0 + eps));
    across channels it normalises the channels together."""

    def __init__(self):
        super().__init__(why="no OBD rule here for a normalisation")

    def barrier(self, layer, axis):
        return "MVN across channels normalises them together" if layer.mvn_param.across_channels else None

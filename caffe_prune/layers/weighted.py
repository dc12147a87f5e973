"""The layers whose weights the channel graph cuts: Convolution and Deconvolution (which consume
their input's channels and produce new units), InnerProduct (which consumes them: its outputs are
no longer channels). Each rule states its trace, its slice geometry (the filter a unit owns, the
input slice a consumer loses), its weight shape and MACs, and how export resizes it."""
from __future__ import annotations

import math

from caffe_prune.errors import InputError
from caffe_prune.layers.rule import Rule, Slice
from caffe_prune.layers.units import NO_UNITS, FcInfo, ProducerInfo, Tensor


class Conv(Rule):
    """Convolution (weights out x in/group x kh x kw) and Deconvolution (``transposed``: in x
    out/group x kh x kw; Caffe's BaseConvolutionLayer with reverse_dimensions). ``info`` is the
    trace's ProducerInfo of the layer."""

    def __init__(self, transposed: bool = False):
        super().__init__("conv", hessian="weighted", learns=True)
        object.__setattr__(self, "transposed", transposed)

    def trace(self, tracer, layer, bottoms):
        """Consumes the input's channels and produces one unit per output channel. Grouped
        convolution (papers/004 §3.1, AlexNet): a consumer with ``group`` g and M input channels
        ties input channels i and j when i % (M/g) == j % (M/g); a grouped producer with N outputs
        ties output channels i and j when i % (N/g) == j % (N/g) (Caffe needs every group to keep
        the same width). A depthwise convolution (g == M > 1) instead ties input channel c with its
        own group's outputs: they fall together and the layer loses a group. A Deconvolution's ties
        are the same (its weights differ in layout only, which the slice geometry answers)."""
        cp = layer.convolution_param
        x, out_shape = bottoms[0], tracer.shape(layer.top[0], layer)
        tracer.check_width(layer.bottom[0], x, layer)
        m, n, g = len(x.channels), out_shape[1], cp.group
        if n != cp.num_output or m % g or n % g:
            raise InputError(f"layer {layer.name!r}: {m} inputs, {n} outputs in shapes "
                             f"(num_output {cp.num_output}), group {g} do not fit")
        units = tracer.new_units(layer.name, n)
        per_in, per_out = m // g, n // g
        depthwise = g > 1 and per_in == 1
        if depthwise:
            # input channel c feeds group c alone: they fall together, and the group count drops
            for c in range(m):
                tracer.tie([x.channels[c], frozenset(units[c * per_out:(c + 1) * per_out])],
                           f"feeds depthwise Convolution {layer.name!r} from a channel no convolution produces")
        else:
            # consumer side, papers/004 §3.1: input channels i, i + M/g, ... share a weight slice
            for i in range(per_in):
                tracer.tie([x.channels[i + k * per_in] for k in range(g)],
                           f"is tied by grouped Convolution {layer.name!r} to a channel no convolution produces")
            # producer side: a grouped producer keeps its groups equal
            for i in range(per_out):
                tracer.union(units[i::per_out])
        if cp.kernel_h or cp.kernel_w:
            kernel_area = cp.kernel_h * cp.kernel_w
        else:
            sizes = list(cp.kernel_size)
            kernel_area = math.prod(sizes * (len(out_shape) - 2) if len(sizes) == 1 else sizes)
        info = ProducerInfo(n, g, kernel_area, m, cp.bias_term, depthwise, layer.type)
        tracer.add_weighted(layer, info, x, units, "conv")
        return [Tensor(tuple(frozenset([u]) for u in units), math.prod(out_shape[2:]))]

    def check(self, layer):
        cp = layer.convolution_param
        if cp.num_output < 1:
            return f"num_output {cp.num_output} must be at least 1"
        kernels = list(cp.kernel_size) + ([cp.kernel_h, cp.kernel_w] if cp.HasField("kernel_h") else [])
        if not kernels or min(kernels) < 1:
            return "kernel_size (or kernel_h and kernel_w) must be given and at least 1"
        if any(s < 1 for s in list(cp.stride) + ([cp.stride_h, cp.stride_w] if cp.HasField("stride_h") else [])):
            return "stride must be at least 1"
        if cp.group < 1 or cp.num_output % cp.group:
            return f"num_output {cp.num_output} is not a multiple of group {cp.group}"
        if any(d < 1 for d in cp.dilation):
            return "dilation must be at least 1"
        return None

    def barrier(self, layer, axis):
        if len(layer.bottom) != 1 or len(layer.top) != 1 or axis(layer.convolution_param.axis, layer.bottom[0]) != 1:
            return f"{'Deconvolution' if self.transposed else 'Convolution'} with several bottoms or not on axis 1"
        return None

    def weight_shape(self, info) -> tuple:
        """The weight blob's shape with the kernel's axes as one (what the counts need)."""
        per_in, per_out = info.in_channels // info.group, info.num_output // info.group
        return (info.in_channels, per_out, info.kernel_area) if self.transposed else \
            (info.num_output, per_in, info.kernel_area)

    def producer_slices(self, name, info, o) -> list:
        """Output channel o: its filter (a conv's row o; a deconv's column o % (out/g) within its
        group's input rows, or the group's whole input row when depthwise) and its bias."""
        per_in, per_out = info.in_channels // info.group, info.num_output // info.group
        g = o // per_out
        if not self.transposed:
            weight = Slice(name, 0, 0, o, o + 1)
        elif info.depthwise:      # the group's single input row goes with it
            weight = Slice(name, 0, 0, g, g + 1)
        else:
            weight = Slice(name, 0, 1, o % per_out, o % per_out + 1, rows=(g * per_in, (g + 1) * per_in))
        return [weight] + ([Slice(name, 1, 0, o, o + 1)] if info.bias else [])

    def consumer_slices(self, name, info, c) -> list:
        """Input channel c: a conv's column c % (in/g) within its group's output rows (a depthwise
        conv: the group's output rows, which fall with it); a deconv's input row c."""
        per_in, per_out = info.in_channels // info.group, info.num_output // info.group
        if self.transposed:
            return [Slice(name, 0, 0, c, c + 1, "consumer")]
        if info.depthwise:
            return [Slice(name, 0, 0, c * per_out, (c + 1) * per_out, "consumer")]
        g = c // per_in
        return [Slice(name, 0, 1, c % per_in, c % per_in + 1, "consumer", rows=(g * per_out, (g + 1) * per_out))]

    def macs_per_weight(self, bottom_shape, top_shape) -> int:
        """A convolution's weight multiplies once per output position; a deconvolution's once per
        input position."""
        spatial = (bottom_shape if self.transposed else top_shape)[2:]
        out = 1
        for d in spatial:
            out *= int(d)
        return out

    def resize(self, layer, blobs, info) -> None:
        """After export deleted slices from ``blobs``: the layer's num_output (and, for a
        depthwise layer, its group count, one group per input channel left)."""
        cp, w = layer.convolution_param, blobs[0]
        per_out = info.num_output // info.group
        if self.transposed:
            groups = w.shape[0] if info.depthwise else info.group
            cp.num_output = w.shape[1] * groups
        else:
            cp.num_output = w.shape[0]
            groups = w.shape[0] // per_out if info.depthwise else info.group
        cp.group = groups


class InnerProduct(Rule):
    """InnerProduct: weights out x (C·block) (``transpose``: (C·block) x out); ``info`` is the
    trace's FcInfo. Channel c of a (N, C, H, W) input owns the weight columns [c*H*W, (c+1)*H*W)
    (Caffe flattens C, H, W in that order); its outputs carry no units."""

    def __init__(self):
        super().__init__("fc", hessian="weighted", learns=True)

    def trace(self, tracer, layer, bottoms):
        ip = layer.inner_product_param
        x, size = bottoms[0], math.prod(tracer.shape(layer.bottom[0], layer)[1:])
        if x.block is None:       # fed by an InnerProduct: no channels, one block that never falls
            info = FcInfo(ip.num_output, None, size, ip.transpose, layer.type)
        else:
            if len(x.channels) * x.block != size:
                raise InputError(f"layer {layer.name!r}: {len(x.channels)} channels of {x.block} "
                                 f"do not make its {size} inputs; shapes from another net?")
            info = FcInfo(ip.num_output, len(x.channels), x.block, ip.transpose, layer.type)
        tracer.add_weighted(layer, info, x, None, "fc")
        return [Tensor((NO_UNITS,) * ip.num_output, None)]

    def check(self, layer):
        if layer.inner_product_param.num_output < 1:
            return f"num_output {layer.inner_product_param.num_output} must be at least 1"
        return None

    def barrier(self, layer, axis):
        if axis(layer.inner_product_param.axis, layer.bottom[0]) != 1:
            return "InnerProduct on an axis other than channels"
        return None

    def weight_shape(self, info) -> tuple:
        size = info.block * (info.in_channels or 1)
        return (size, info.num_output) if info.transpose else (info.num_output, size)

    def consumer_slices(self, name, info, c) -> list:
        """Input channel c: its block of H·W columns (rows when transposed)."""
        return [Slice(name, 0, 0 if info.transpose else 1, c * info.block, (c + 1) * info.block, "consumer")]

    def macs_per_weight(self, bottom_shape, top_shape) -> int:
        return 1

    def resize(self, layer, blobs, info) -> None:
        pass

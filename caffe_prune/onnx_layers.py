"""The ONNX form of each Caffe layer type a deploy net uses: one converter per type
(``CONVERTERS``), each a few nodes whose result is Caffe's (see caffe_prune.onnx_export for the
rules that needed care), built on ``Builder`` (nodes, constants and unique names)."""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from caffe_prune.errors import InputError

BATCH = "N"                    # the symbolic batch dimension of every tensor


class Value(NamedTuple):
    """One ONNX value: its name and its shape, axis 0 the symbolic batch."""
    name: str
    shape: tuple



# ---------------------------------------------------------------------------------------------
# the graph under construction

class Builder:
    """Nodes, initializers and unique names; ``layer`` is the Caffe layer being converted, whose
    name prefixes every node and constant it adds."""

    def __init__(self):
        self.nodes, self.initializers = [], []
        self._names, self._node_names = set(), set()
        self.layer = None

    def unique(self, name: str, taken=None) -> str:
        taken = self._names if taken is None else taken
        candidate, i = name, 1
        while candidate in taken:
            candidate, i = f"{name}_{i}", i + 1
        taken.add(candidate)
        return candidate

    def reserve(self, name: str) -> None:
        if name in self._names:
            raise AssertionError(f"ONNX name {name!r} reserved twice")
        self._names.add(name)

    def const(self, suffix: str, array, dtype=np.float32) -> str:
        from onnx import numpy_helper
        name = self.unique(f"{self.layer.name}/{suffix}")
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), name))
        return name

    def node(self, op: str, inputs, output: str | None = None, **attrs) -> str:
        """Add one single-output node; without ``output`` its result gets a fresh internal name."""
        return self.multi(op, inputs, [output or self.unique(f"{self.layer.name}/{op.lower()}")], **attrs)[0]

    def multi(self, op: str, inputs, outputs, **attrs) -> list:
        from onnx import helper
        name = self.unique(self.layer.name if op != "Identity" else f"{self.layer.name}/identity",
                           self._node_names)
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, **attrs))
        return list(outputs)

    def reshape(self, x: Value, shape: tuple, output: str) -> Value:
        """Reshape to ``shape`` (axis 0 the batch, copied by ONNX's 0)."""
        assert shape[0] == BATCH
        target = self.const("shape", [0] + list(shape[1:]), np.int64)
        return Value(self.node("Reshape", [x.name, target], output), tuple(shape))


def refuse(layer, why: str, hint: str = "") -> InputError:
    """The one-line error for a layer, or a parameter value, with no exact ONNX form."""
    return InputError(f"layer {layer.name!r} ({layer.type}): {why} cannot be written to ONNX"
                       + (f"; {hint}" if hint else ""))


def _axis(layer, axis: int, rank: int, what: str = "axis") -> int:
    """Caffe's CanonicalAxisIndex; axis 0 is the batch, which the graph keeps symbolic."""
    if not -rank <= axis < rank:
        raise refuse(layer, f"{what} {axis} of a {rank}-axis blob")
    axis %= rank
    if axis == 0:
        raise refuse(layer, f"{what} 0 (the batch axis)", "the exported graph keeps the batch symbolic")
    return axis


def _spatial(layer, param, name: str, default: int) -> tuple[int, int]:
    """(h, w) of a ``kernel``/``stride``/``pad``/``dilation`` parameter: ``kernel_h``/``kernel_w``
    when set, else the value given once (or, for Convolution's repeated fields, once or per axis)."""
    if hasattr(param, f"{name}_h") and param.HasField(f"{name}_h"):
        return getattr(param, f"{name}_h"), getattr(param, f"{name}_w")
    name = "kernel_size" if name == "kernel" else name
    field = getattr(param, name)
    if isinstance(field, int):                      # Pooling's single fields
        values = [field] if param.HasField(name) else []
    else:
        values = list(field)
    if not values:
        return default, default
    if len(values) > 2:
        raise refuse(layer, f"{len(values)} spatial axes in {name}", "only 2-D layers are supported")
    return values[0], values[-1]


def _blobs(layer, blobs, count: int, shapes) -> list:
    if len(blobs) != count:
        raise InputError(f"layer {layer.name!r} ({layer.type}): {len(blobs)} parameter blobs, expected "
                          f"{count}; pass the weights as caffe.Net(...).params holds them")
    for i, (blob, want) in enumerate(zip(blobs, shapes)):
        if want is not None and tuple(blob.shape) != tuple(want):
            raise InputError(f"layer {layer.name!r} ({layer.type}): blob {i} has shape {tuple(blob.shape)}, "
                              f"expected {tuple(want)}; the weights do not fit the prototxt")
    return [np.asarray(b, dtype=np.float32) for b in blobs]


def _rank4(layer, x: Value) -> None:
    if len(x.shape) != 4:
        raise refuse(layer, f"a {len(x.shape)}-axis input", "only 2-D (N, C, H, W) layers are supported")


# ---------------------------------------------------------------------------------------------
# one converter per layer type: (builder, layer, inputs, blobs, outputs) -> output Values
# ``outputs`` are the ONNX names the layer's tops must get.

def _convolution(b, layer, xs, blobs, outs):
    x, = xs
    _rank4(layer, x)
    cp = layer.convolution_param
    if cp.axis != 1:
        raise refuse(layer, f"axis {cp.axis}", "only channel axis 1 is supported")
    kernel = _spatial(layer, cp, "kernel", 0)
    stride, pad, dilation = _spatial(layer, cp, "stride", 1), _spatial(layer, cp, "pad", 0), \
        _spatial(layer, cp, "dilation", 1)
    channels, group = x.shape[1], cp.group
    deconv = layer.type == "Deconvolution"
    weight_shape = (channels, cp.num_output // group) + kernel if deconv else \
        (cp.num_output, channels // group) + kernel
    blobs = _blobs(layer, blobs, 2 if cp.bias_term else 1, [weight_shape, (cp.num_output,)])
    inputs = [x.name, b.const("weight", blobs[0])] + ([b.const("bias", blobs[1])] if cp.bias_term else [])
    extent = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    if deconv:   # deconv_layer.cpp compute_output_shape
        size = [s * (i - 1) + e - 2 * p for i, s, e, p in zip(x.shape[2:], stride, extent, pad)]
    else:        # conv_layer.cpp: floor division, as ONNX Conv
        size = [(i + 2 * p - e) // s + 1 for i, s, e, p in zip(x.shape[2:], stride, extent, pad)]
    if min(size) < 1:
        raise InputError(f"layer {layer.name!r} ({layer.type}): output size {size} from input {x.shape[2:]}")
    y = b.node("ConvTranspose" if deconv else "Conv", inputs, outs[0], kernel_shape=list(kernel),
               strides=list(stride), pads=list(pad) * 2, dilations=list(dilation), group=group)
    return [Value(y, (BATCH, cp.num_output) + tuple(size))]


def _inner_product(b, layer, xs, blobs, outs):
    """Caffe flattens the input from ``axis`` on: (outer, K) times W^T, W stored (N, K), or (K, N)
    with ``transpose``."""
    x, = xs
    ip = layer.inner_product_param
    axis = _axis(layer, ip.axis, len(x.shape))
    k, n = math.prod(x.shape[axis:]), ip.num_output
    blobs = _blobs(layer, blobs, 2 if ip.bias_term else 1, [(k, n) if ip.transpose else (n, k), (n,)])
    weight = blobs[0] if ip.transpose else blobs[0].T            # (K, N)
    if axis == 1:      # (N, K): Gemm
        flat = x if len(x.shape) == 2 else Value(b.node("Flatten", [x.name], axis=1), (BATCH, k))
        inputs = [flat.name, b.const("weight", weight)] + ([b.const("bias", blobs[1])] if ip.bias_term else [])
        return [Value(b.node("Gemm", inputs, outs[0]), (BATCH, n))]
    flat = b.reshape(x, x.shape[:axis] + (k,), b.unique(f"{layer.name}/flat"))
    product = b.node("MatMul", [flat.name, b.const("weight", weight)],
                     None if ip.bias_term else outs[0])
    if ip.bias_term:
        product = b.node("Add", [product, b.const("bias", blobs[1])], outs[0])
    return [Value(product, x.shape[:axis] + (n,))]


def pooled_size(size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    """Caffe's pooled size (pooling_layer.cpp Reshape): rounded up in CEIL mode, then, with
    padding, one fewer when the last window would start in the end padding."""
    rounding = math.ceil if ceil else math.floor
    pooled = int(rounding((size + 2 * pad - kernel) / stride)) + 1
    if pad and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


def _pooling(b, layer, xs, blobs, outs):
    x, = xs
    _rank4(layer, x)
    pp = layer.pooling_param
    method = {0: "MAX", 1: "AVE"}.get(pp.pool)
    if method is None:
        raise refuse(layer, "STOCHASTIC pooling", "use MAX or AVE")
    height_width = x.shape[2:]
    if pp.global_pooling:   # Caffe: the kernel is the whole map, pad 0, stride 1 (CHECKed)
        y = b.node("GlobalMaxPool" if method == "MAX" else "GlobalAveragePool", [x.name], outs[0])
        return [Value(y, x.shape[:2] + (1, 1))]
    kernel, stride, pad = (_spatial(layer, pp, "kernel", 0), _spatial(layer, pp, "stride", 1),
                           _spatial(layer, pp, "pad", 0))
    ceil = getattr(pp, "round_mode", 0) == 0      # a build without the field rounds up
    size = [pooled_size(i, k, s, p, ceil) for i, k, s, p in zip(height_width, kernel, stride, pad)]
    for i, k, s, p, o in zip(height_width, kernel, stride, pad, size):
        if (o - 1) * s - p >= i:   # only without padding, stride > kernel: Caffe pools an empty window
            raise refuse(layer, f"a last window that starts past the input ({i} wide, kernel {k}, stride {s})",
                         "Caffe pools an empty window there")
    # end padding for floor-mode pooling to give Caffe's size: (o - 1) * s + k - (input + begin pad)
    if method == "MAX":     # padding never wins a max; windows clip at H as Caffe's do
        end = [max(0, (o - 1) * s + k - i - p) for i, k, s, p, o in zip(height_width, kernel, stride, pad, size)]
        y = b.node("MaxPool", [x.name], outs[0], kernel_shape=list(kernel), strides=list(stride),
                   pads=list(pad) + end)
        return [Value(y, x.shape[:2] + tuple(size))]
    y = average_pool(b, x.name, height_width, kernel, stride, pad, size, outs[0])
    return [Value(y, x.shape[:2] + tuple(size))]


def average_pool(b, x: str, height_width, kernel, stride, pad, size, output=None) -> str:
    """Caffe's average pooling of the (N, C, H, W) value ``x`` to ``size``: the window's sum over
    the input divided by its extent clipped at H + pad (pooling_layer.cpp). Written as
    AveragePool with begin pads ``pad``, the end pads that give Caffe's size, count_include_pad=0
    (the sum over the input divided by the input elements in the window, ONNX's default rule),
    then a constant map of (input elements / Caffe's divisor) per output position, computed here
    from the known sizes (1 everywhere without padding: the Mul is left out).

    Not a zero ``Pad`` node before the AveragePool, though that is exact too: ONNX Runtime's Pad
    fusion (from 1.19; microsoft/onnxruntime #22177, fixed by #23190 in January 2025) folds such a
    Pad into the AveragePool and keeps count_include_pad=0, dividing the padded windows by their
    input elements alone (0.8 relative error measured on 1.19.2, exact on 1.32.0); nor
    count_include_pad=1, whose end-padding divisor runtimes have computed in several ways
    (onnxruntime #16203, #24681)."""
    end = [max(0, (o - 1) * s + k - i - p) for i, k, s, p, o in zip(height_width, kernel, stride, pad, size)]
    ratios = []
    for i, k, s, p, o in zip(height_width, kernel, stride, pad, size):
        start = np.arange(o) * s - p
        inside = np.minimum(start + k, i) - np.maximum(start, 0)
        caffe_divisor = np.minimum(start + k, i + p) - start
        ratios.append(inside / caffe_divisor)
    ratio = np.outer(*ratios)
    exact = bool((ratio == 1).all())
    y = b.node("AveragePool", [x], output if exact else None, kernel_shape=list(kernel), strides=list(stride),
               pads=list(pad) + end, count_include_pad=0)
    if exact:
        return y
    return b.node("Mul", [y, b.const("divisor_ratio", ratio.reshape((1, 1) + ratio.shape))], output)


def _relu(b, layer, xs, blobs, outs):
    x, = xs
    slope = layer.relu_param.negative_slope
    if slope == 0:
        return [Value(b.node("Relu", [x.name], outs[0]), x.shape)]
    return [Value(b.node("LeakyRelu", [x.name], outs[0], alpha=slope), x.shape)]


def _prelu(b, layer, xs, blobs, outs):
    x, = xs
    if len(x.shape) < 2:
        raise refuse(layer, "a 1-axis input")
    shared = layer.prelu_param.channel_shared
    slope, = _blobs(layer, blobs, 1, [() if shared else (x.shape[1],)])     # shared: a 0-axis blob
    slope = slope.reshape((1,) if shared else (x.shape[1],) + (1,) * (len(x.shape) - 2))   # on axis 1
    return [Value(b.node("PRelu", [x.name, b.const("slope", slope)], outs[0]), x.shape)]


def _unary(op):
    def convert(b, layer, xs, blobs, outs):
        return [Value(b.node(op, [xs[0].name], outs[0]), xs[0].shape)]
    return convert


def _batch_norm(b, layer, xs, blobs, outs):
    x, = xs
    bn = layer.batch_norm_param
    if bn.HasField("use_global_stats") and not bn.use_global_stats:
        raise refuse(layer, "use_global_stats: false (statistics of each batch)",
                     "a deploy net uses the stored statistics: drop use_global_stats")
    if len(x.shape) < 2:
        raise refuse(layer, "a 1-axis input")
    channels = x.shape[1]
    mean, var, factor = _blobs(layer, blobs, 3, [(channels,), (channels,), (1,)])
    # batch_norm_layer.cpp: scale_factor = blob2 == 0 ? 0 : 1 / blob2, in the layer's float type
    factor = np.float32(0) if factor[0] == 0 else np.float32(1) / factor[0]
    mean, var = (mean * factor).astype(np.float32), (var * factor).astype(np.float32)
    inputs = [x.name, b.const("scale", np.ones(channels)), b.const("bias", np.zeros(channels)),
              b.const("mean", mean), b.const("var", var)]
    return [Value(b.node("BatchNormalization", inputs, outs[0], epsilon=bn.eps), x.shape)]


def _scale_bias(b, layer, xs, blobs, outs):
    """Scale (Mul, then its optional bias) or Bias (Add) by a learned blob spanning axes
    [axis, axis + num_axes), or by a second bottom; ONNX broadcasts from the last axis, so the
    operand gets trailing ones."""
    is_scale = layer.type == "Scale"
    param = layer.scale_param if is_scale else layer.bias_param
    x, rank = xs[0], len(xs[0].shape)
    bias_term = is_scale and param.bias_term
    if len(xs) == 2:
        # a tensor operand (squeeze-and-excitation): it spans x's leading axes, so axis 0
        operand = xs[1]
        if not (-rank <= param.axis < rank and param.axis % rank == 0) \
                or operand.shape != x.shape[:len(operand.shape)]:
            raise refuse(layer, f"a second bottom of shape {operand.shape} on axis {param.axis} of {x.shape}",
                         "a second bottom must span the leading axes from axis 0")
        if bias_term:
            raise refuse(layer, "bias_term with a second bottom (a learned bias with a batch axis)")
        _blobs(layer, blobs, 0, [])
        name = operand.name
        if len(operand.shape) < rank:
            trailing = b.const("axes", list(range(len(operand.shape), rank)), np.int64)
            name = b.node("Unsqueeze", [operand.name, trailing])
        biases = []
    else:
        if param.num_axes == 0:                     # one scalar
            axis, span = 0, ()
        else:
            axis = _axis(layer, param.axis, rank)
            stop = rank if param.num_axes == -1 else axis + param.num_axes
            if param.num_axes < -1 or stop > rank:
                raise refuse(layer, f"num_axes {param.num_axes} from axis {axis} of a {rank}-axis blob")
            span = x.shape[axis:stop]
        blobs = _blobs(layer, blobs, 2 if bias_term else 1, [span, span])
        trailing = span + (1,) * (rank - axis - len(span))
        name = b.const("scale" if is_scale else "bias", blobs[0].reshape(trailing))
        biases = [b.const("bias", blobs[1].reshape(trailing))] if bias_term else []
    y = b.node("Mul" if is_scale else "Add", [x.name, name], None if biases else outs[0])
    if biases:
        y = b.node("Add", [y, biases[0]], outs[0])
    return [Value(y, x.shape)]


def _eltwise(b, layer, xs, blobs, outs):
    ep = layer.eltwise_param
    if any(x.shape != xs[0].shape for x in xs):
        raise refuse(layer, f"bottoms of different shapes {[x.shape for x in xs]}")
    names = [x.name for x in xs]
    if ep.operation == 1:                       # SUM: sum of coeff_i * x_i
        coeffs = list(ep.coeff) or [1.0] * len(xs)
        if len(coeffs) != len(xs):
            raise refuse(layer, f"{len(coeffs)} coefficients for {len(xs)} bottoms")
        names = [n if c == 1 else b.node("Mul", [n, b.const("coeff", np.float32(c))]) for n, c in zip(names, coeffs)]
        y = b.node("Sum", names, outs[0]) if len(names) > 1 else b.node("Identity", names, outs[0])
    elif ep.operation == 0:                     # PROD
        y = names[0]
        for i, n in enumerate(names[1:], 2):
            y = b.node("Mul", [y, n], outs[0] if i == len(names) else None)
        if len(names) == 1:
            y = b.node("Identity", names, outs[0])
    else:                                       # MAX
        y = b.node("Max", names, outs[0])
    return [Value(y, xs[0].shape)]


def _concat(b, layer, xs, blobs, outs):
    cp = layer.concat_param
    rank = len(xs[0].shape)
    axis = _axis(layer, cp.concat_dim if cp.HasField("concat_dim") else cp.axis, rank)
    for x in xs:
        if len(x.shape) != rank or x.shape[:axis] + x.shape[axis + 1:] != xs[0].shape[:axis] + xs[0].shape[axis + 1:]:
            raise refuse(layer, f"bottoms {[x.shape for x in xs]} that differ off axis {axis}")
    shape = xs[0].shape[:axis] + (sum(x.shape[axis] for x in xs),) + xs[0].shape[axis + 1:]
    if len(xs) == 1:
        return [Value(b.node("Identity", [xs[0].name], outs[0]), shape)]
    return [Value(b.node("Concat", [x.name for x in xs], outs[0], axis=axis), shape)]


def _slice(b, layer, xs, blobs, outs):
    x, = xs
    sp = layer.slice_param
    axis = _axis(layer, sp.slice_dim if sp.HasField("slice_dim") else sp.axis, len(x.shape))
    total, tops = x.shape[axis], len(outs)
    if sp.slice_point:
        points = [0] + list(sp.slice_point) + [total]
        if len(sp.slice_point) != tops - 1 or any(q <= p for p, q in zip(points, points[1:])):
            raise refuse(layer, f"slice points {list(sp.slice_point)} for {tops} tops of {total}")
        sizes = [q - p for p, q in zip(points, points[1:])]
    else:
        if total % tops:
            raise refuse(layer, f"an equal split of {total} into {tops} tops")
        sizes = [total // tops] * tops
    if tops == 1:
        return [Value(b.node("Identity", [x.name], outs[0]), x.shape)]
    b.multi("Split", [x.name, b.const("split", sizes, np.int64)], outs, axis=axis)
    return [Value(o, x.shape[:axis] + (s,) + x.shape[axis + 1:]) for o, s in zip(outs, sizes)]


def _identity(b, layer, xs, blobs, outs):
    """Split (every top is the bottom) and Dropout (in TEST, Caffe copies the bottom)."""
    return [Value(b.node("Identity", [xs[0].name], o), xs[0].shape) for o in outs]


def _flatten(b, layer, xs, blobs, outs):
    x, = xs
    rank = len(x.shape)
    fp = layer.flatten_param
    start = _axis(layer, fp.axis, rank)
    end = fp.end_axis % rank if -rank <= fp.end_axis < rank else None
    if end is None or end < start:
        raise refuse(layer, f"end_axis {fp.end_axis} before axis {fp.axis} of a {rank}-axis blob")
    shape = x.shape[:start] + (math.prod(x.shape[start:end + 1]),) + x.shape[end + 1:]
    return [b.reshape(x, shape, outs[0])]


def reshaped(layer, shape: tuple) -> tuple:
    """Caffe's Reshape (reshape_layer.cpp) of ``shape`` (axis 0 the symbolic batch): dims
    [axis, axis + num_axes) replaced by ``reshape_param.shape``, 0 copying the input dim, -1
    inferred from the per-image count. The result's axis 0 must be the batch."""
    rp = layer.reshape_param
    rank = len(shape)
    start = rp.axis if rp.axis >= 0 else rank + rp.axis + 1
    stop = rank if rp.num_axes == -1 else start + rp.num_axes
    if not 0 <= start <= stop <= rank:
        raise refuse(layer, f"axis {rp.axis}, num_axes {rp.num_axes} of a {rank}-axis blob")
    new = []
    for i, d in enumerate(rp.shape.dim):
        new.append(shape[start + i] if d == 0 else d)
    out = list(shape[:start]) + new + list(shape[stop:])
    if out.count(-1) > 1:
        raise refuse(layer, "two -1 dimensions")
    per_image = math.prod(shape[1:])
    known = math.prod(d for d in out if d not in (-1, BATCH))
    if BATCH in out:
        if out.index(BATCH) != 0 or out.count(BATCH) > 1:
            raise refuse(layer, f"a shape {out} that moves the batch axis")
        if -1 in out:
            if per_image % known:
                raise refuse(layer, f"a shape {out} that does not divide {per_image} values per image")
            out[out.index(-1)] = per_image // known
    elif out and out[0] == -1 and known == per_image:
        out[0] = BATCH                      # -1 at axis 0 absorbs exactly the batch
    else:
        raise refuse(layer, f"a shape {list(rp.shape.dim)} that fixes or mixes the batch axis",
                     "write dim: 0 (or -1) for the batch")
    if math.prod(d for d in out if d != BATCH) != per_image:
        raise refuse(layer, f"a shape {out} holding a different count than {shape}")
    return tuple(out)


def _reshape(b, layer, xs, blobs, outs):
    return [b.reshape(xs[0], reshaped(layer, xs[0].shape), outs[0])]


def _lrn(b, layer, xs, blobs, outs):
    x, = xs
    _rank4(layer, x)
    lp = layer.lrn_param
    if lp.local_size % 2 == 0:
        raise refuse(layer, f"an even local_size {lp.local_size}", "Caffe requires it odd")
    if lp.norm_region == 0:                         # ACROSS_CHANNELS: k + alpha / n * sum
        y = b.node("LRN", [x.name], outs[0], size=lp.local_size, alpha=lp.alpha, beta=lp.beta, bias=lp.k)
        return [Value(y, x.shape)]
    # WITHIN_CHANNEL (lrn_layer.cpp): x * (1 + alpha * AVE-pool(x^2))^-beta, Caffe's own average
    # pooling padded by (n - 1) / 2 at stride 1: every window n x n, the padding in its divisor
    n, pre = lp.local_size, (lp.local_size - 1) // 2
    square = b.node("Mul", [x.name, x.name])
    average = average_pool(b, square, x.shape[2:], (n, n), (1, 1), (pre, pre), x.shape[2:])
    scaled = b.node("Mul", [average, b.const("alpha", np.float32(lp.alpha))])
    shifted = b.node("Add", [scaled, b.const("one", np.float32(1))])
    power = b.node("Pow", [shifted, b.const("minus_beta", np.float32(-lp.beta))])
    return [Value(b.node("Mul", [x.name, power], outs[0]), x.shape)]


def _softmax(b, layer, xs, blobs, outs):
    x, = xs
    rank = len(x.shape)
    axis = layer.softmax_param.axis
    if not -rank <= axis < rank:
        raise refuse(layer, f"axis {axis} of a {rank}-axis blob")
    return [Value(b.node("Softmax", [x.name], outs[0], axis=axis % rank), x.shape)]


def _power(b, layer, xs, blobs, outs):
    """(shift + scale * x) ^ power, the steps in Caffe's order (power_layer.cpp), trivial ones
    left out."""
    x, = xs
    pp = layer.power_param
    steps = [("Mul", pp.scale, pp.scale != 1), ("Add", pp.shift, pp.shift != 0), ("Pow", pp.power, pp.power != 1)]
    steps = [(op, v) for op, v, needed in steps if needed]
    y = x.name
    for i, (op, v) in enumerate(steps):
        y = b.node(op, [y, b.const(op.lower(), np.float32(v))], outs[0] if i == len(steps) - 1 else None)
    if not steps:
        y = b.node("Identity", [y], outs[0])
    return [Value(y, x.shape)]


CONVERTERS = {
    "Convolution": _convolution, "Deconvolution": _convolution, "InnerProduct": _inner_product,
    "Pooling": _pooling, "ReLU": _relu, "PReLU": _prelu, "Sigmoid": _unary("Sigmoid"),
    "TanH": _unary("Tanh"), "BatchNorm": _batch_norm, "Scale": _scale_bias, "Bias": _scale_bias,
    "Eltwise": _eltwise, "Concat": _concat, "Slice": _slice, "Split": _identity, "Dropout": _identity,
    "Flatten": _flatten, "Reshape": _reshape, "LRN": _lrn, "Softmax": _softmax, "Power": _power,
}

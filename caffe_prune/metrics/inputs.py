"""Per-sample weight gradients (and OBD Hessian diagonals) from Caffe's blobs.

Stock Caffe accumulates a Convolution's weight gradient over the batch: ``params[conv][0].diff``
is Σ_n of every sample's contribution, and nothing per sample is kept. But a convolution's output
is linear in its weights, y_n[o, p] = Σ_{c,k} W[o, c, k] x_n[c, p·s + k·d - pad], so sample n's
weight gradient is the correlation of that sample's bottom data with its top diff,

    dL/dW[o, c, k] = Σ_p dL/dy_n[o, p] · x_n[c, p·s + k·d - pad]      (within each group),

exactly what Caffe's ``weight_cpu_gemm`` computes and then sums over n. With OBD's diagonal rule the
same correlation of x_n² with h(y_n) gives d²L/dW² (the weight enters y once and linearly). An
InnerProduct's is the outer product of top diff and flattened bottom. Nothing here runs a network:
the bottoms, top diffs and h come from Caffe's forward, backward and ``hessian.hessian_diagonal``.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import numpy as np

from caffe_prune import layers
from caffe_prune.errors import InputError

CHUNK_ELEMENTS = 1 << 23   # per-sample tensors are built a few samples at a time, ~8M elements each


class Geometry(NamedTuple):
    """A 2-D Convolution's kernel (kh, kw), stride, pad, dilation (each (h, w)) and group."""
    kernel: tuple
    stride: tuple
    pad: tuple
    dilation: tuple
    group: int


def conv_geometry(layer) -> Geometry:
    """From a Convolution's LayerParameter (e.g. ``hessian.built_layers(net)``), as Caffe's
    BaseConvolutionLayer::LayerSetUp reads it (2-D only)."""
    cp = layer.convolution_param

    def pair(repeated, h, w, has_hw, default):
        if has_hw:
            return int(h), int(w)
        values = list(repeated) or [default]
        if len(values) == 1:
            return int(values[0]), int(values[0])
        if len(values) == 2:
            return int(values[0]), int(values[1])
        raise InputError(f"layer {layer.name!r}: only 2-D convolutions are supported")

    kernel = pair(cp.kernel_size, cp.kernel_h, cp.kernel_w, cp.HasField("kernel_h"), None)
    stride = pair(cp.stride, cp.stride_h, cp.stride_w, cp.HasField("stride_h"), 1)
    pad = pair(cp.pad, cp.pad_h, cp.pad_w, cp.HasField("pad_h"), 0)
    dilation = pair(cp.dilation, 0, 0, False, 1)
    return Geometry(kernel, stride, pad, dilation, int(cp.group))


def sample_chunks(n: int, per_sample: int):
    """Slices of the batch holding about CHUNK_ELEMENTS elements of per-sample tensors each."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_sample))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def conv_columns(bottom: np.ndarray, geometry: Geometry, out_hw) -> np.ndarray:
    """im2col per sample: (N, C, kh, kw, OH, OW), element [n, c, i, j, p, q] = the padded bottom at
    (p·stride + i·dilation, q·stride + j·dilation), as Caffe's im2col_cpu reads it."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry.kernel, geometry.stride, geometry.pad, geometry.dilation
    oh, ow = out_hw
    padded = np.pad(bottom, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = np.empty(bottom.shape[:2] + (kh, kw, oh, ow), dtype=bottom.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = padded[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
    return cols


def conv_weight_gradients(bottom: np.ndarray, top: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Per-sample correlation of ``bottom`` (N, C, H, W) with ``top`` (N, O, OH, OW) in the
    convolution's geometry: (N, O, C/group, kh, kw), in float64. With Caffe's bottom data and top
    diff, sample n's share of Caffe's weight diff (their sum over n is that diff); with bottom² and
    the top's h, OBD's d²L/dW² per sample."""
    n, c = bottom.shape[:2]
    o, (oh, ow) = top.shape[1], top.shape[2:]
    grp, (kh, kw) = geometry.group, geometry.kernel
    if c % grp or o % grp:
        raise InputError(f"{c} inputs and {o} outputs do not split into {grp} groups")
    cols = conv_columns(bottom, geometry, (oh, ow)).reshape(n, grp, c // grp * kh * kw, oh * ow)
    tops = top.reshape(n, grp, o // grp, oh * ow)
    out = np.matmul(tops.astype(np.float64), cols.astype(np.float64).transpose(0, 1, 3, 2))
    return out.reshape(n, o, c // grp, kh, kw)


def transposed(info) -> bool:
    """Whether the convolution-like layer ``info`` stores its weights transposed (a Deconvolution)."""
    return getattr(layers.rule(info.type), "transposed", False)


def conv_layout(weights: np.ndarray, info) -> np.ndarray:
    """Per-sample weights (n, *blob shape) of the convolution-like layer ``info`` (the graph's
    ProducerInfo) in a convolution's layout (n, out, in/group, kh, kw), where a metric reads output
    channel o's filter as row o: a Deconvolution's blob is (in, out/group, kh, kw) (its rule is
    ``transposed``), and the filter of its output o is column o % (out/group) of its group's rows."""
    if not transposed(info):
        return weights
    n, c, per_out, *kernel = weights.shape
    per_in = c // info.group
    grouped = weights.reshape(n, info.group, per_in, per_out, *kernel).swapaxes(2, 3)
    return grouped.reshape(n, info.group * per_out, per_in, *kernel)


def weight_gradients(info, geometry: Geometry):
    """(bottom data, top diff) -> per-sample weight gradients of the layer ``info`` in a
    convolution's layout (``conv_layout``). A Deconvolution's output is linear in its weights the
    other way round (it is a convolution's backward): dL/dW'[c, o, k] = Σ_p x[c, p] dL/dy[o, p·s + k·d
    - pad], the correlation of the top diff with the bottom data, in the same geometry."""
    if transposed(info):
        return lambda bottom, top: conv_layout(conv_weight_gradients(top, bottom, geometry), info)
    return partial(conv_weight_gradients, geometry=geometry)


def fc_weight_gradients(bottom: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Per-sample outer product of ``top`` (N, O) with the flattened ``bottom`` (N, D): (N, O, D),
    sample n's share of an InnerProduct's weight diff (or, with bottom² and h, its d²L/dW²)."""
    n = bottom.shape[0]
    return top.reshape(n, -1, 1).astype(np.float64) * bottom.reshape(n, 1, -1).astype(np.float64)


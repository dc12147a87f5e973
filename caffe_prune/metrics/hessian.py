"""Hessian diagonal of the loss w.r.t. activations: back-propagated second derivatives (OBD).

The taxonomy's second-order inputs need, for every activation x of a feature map, h = d²L/dx².
LeCun, Denker & Solla (1990), *Optimal Brain Damage*, back-propagate it like the gradient, keeping
only diagonal terms: h is set at the network's output from the loss, then each layer maps the h of
its output(s) to the h of its input(s):

========================  =====================================================================
layer                     rule (y = layer output, x = its input)
========================  =====================================================================
SoftmaxWithLoss           h_z = w p (1 - p) / n at logit z (p = softmax(z); n = Caffe's normalizer,
                          the batch size N for (N, C) logits; w = loss_weight; ignored labels 0).
                          The diagonal of diag(p) - p pᵀ: OBD drops the -p_j p_k cross terms.
EuclideanLoss             h = w / N for L = w/(2N) Σ ||a - b||² (exact), at both bottoms
Convolution, InnerProduct h_x = (W∘W)ᵀ h_y (the biases do not matter)
ReLU (leaky too)          h_x = f'(a)² h_y (f'' = 0 away from the kink, so OBD's f''(a)·g term is 0)
BatchNorm (global stats)  h_x = h_y / σ², σ² = var/s + eps (s = Caffe's stored scale factor)
Scale, Bias               h_x = γ² h_y; h_x = h_y
Dropout                   TEST: h_x = h_y; TRAIN: mask · scale² · h_y (the sampled mask)
Eltwise                   SUM: coeff_i² h_y; PROD: (Π_{j≠i} x_j)² h_y; MAX: h_y to the winner
Pooling                   MAX: h_y to the argmax Caffe recorded; AVE: Σ over the windows holding x
                          of h_y / K², K = Caffe's pool_size for that window (see below)
Split, Concat, Slice,     routing: Split sums its consumers' h, the others copy slices or views
Flatten, Reshape
LRN, Softmax, TanH, ...   refused with InputError: not diagonal (LRN couples channels) or a
                          nonlinearity whose f''(a)·g term would need the gradient as well
========================  =====================================================================

How this runs on stock Caffe, which has no second backward pass
----------------------------------------------------------------
After the caller's forward (which left ReLU inputs, max-pooling argmax indices, BatchNorm's
1/sqrt(var+eps) and Eltwise masks inside the layers), h is written into the diff of the loss
layer's bottom and Caffe's own ``Backward`` runs one layer at a time (``net._backward(i, i)``, from
the layer below the loss down). Where Caffe's backward is not already the rule, it gets help:

- *weighted layers* (Convolution, InnerProduct): their weight blobs are swapped for W∘W (float32,
  each shared blob once) for the pass, so Caffe's ``Wᵀ diff`` becomes ``(W∘W)ᵀ h``.
- *diagonal layers* (ReLU, BatchNorm, Scale, Bias, Dropout, Eltwise): Caffe's backward computes
  g = d·h with d the layer's own diagonal Jacobian (mask, 1/σ, γ, coeff, ...), taken from Caffe's
  state rather than re-derived here; the rule needs d²·h, which is g²/h (in float64; 0 where h is
  0). No weights are swapped and no forward is re-run for these (BatchNorm's backward divides by
  the σ its forward cached, so swapping its variance blob would need a second forward).
- *average pooling*: Caffe's backward gives each input Σ h_y / K; the top's diff is divided by K
  per output position first (K exactly as Caffe's pooling_layer.cpp computes it: the window clipped
  to the padded map, so padded cells count and cells past the padding do not, edge windows smaller).
- *routing layers* (Split, Concat, Slice, Flatten, Reshape, max pooling) need nothing: a 0/1 map
  squared is itself.

Only layers that feed the chosen loss are run, so accuracy layers and other heads are never
touched. Layer parameters (pooling geometry, BatchNorm's phase, ...) are not readable from a
``caffe.Net``; they come from Caffe's own record of the net (``net.save`` → NetParameter, with the
auto-inserted Split layers and each layer's phase; written to a temporary file with the weights,
once) and cached on the net object. Everything the pass changes is put back when it ends, also on
an error: weight blobs bit-exactly (saved copies),
every parameter diff (Caffe accumulates into them during the pass) and every blob diff.

Which value h refers to
-----------------------
For a blob name, h is w.r.t. the value its *producer* wrote, the layer that first lists it as a top:
for a convolution top it is the convolution's output, before any in-place BatchNorm, Scale or ReLU
(the pre-ReLU, pre-BN value), although after the forward the blob's data holds the post-ReLU
values. This is the same convention as Caffe's ``blob.diff`` after an ordinary backward.

Scaling
-------
h is for the loss Caffe reports: the *mean* over the batch (SoftmaxWithLoss and EuclideanLoss both
divide by N), so every sample's h carries a factor 1/N relative to that sample's own loss.
``per_sample=True`` multiplies by N (the loss bottom's batch size): then each sample's h is that of
its own loss (loss_weight × the loss a batch of one would report), as OBD's per-pattern sums use.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from caffe_prune import layers as rules, pycaffe
from caffe_prune.errors import InputError

# each layer type's rule (weighted: W∘W in Caffe's backward; diagonal: d²·h after Caffe's
# backward; routing: Caffe's backward as it is; pool; loss) is its ``hessian`` in caffe_prune.layers
LOSSES = tuple(sorted(t for t, r in rules.RULES.items() if r.hessian == "loss"))
SUPPORTED = sorted(t for t, r in rules.RULES.items() if r.hessian in ("weighted", "diagonal", "routing", "pool")
                   and r.kind != "data")
DEFINITION_ATTR = "_caffe_prune_layers"   # the cached NetParameter layers, on the caffe.Net


def hessian_diagonal(net, blobs, loss_layer=None, per_sample: bool = False) -> dict:
    """OBD's diagonal Hessian d²L/dx² for every activation of each blob in ``blobs``.

    ``net``: a ``caffe.Net`` on which forward has just been run (inputs and labels in place).
    ``blobs``: blob names (e.g. the top of each Convolution); h refers to the value each blob's
    producing layer wrote (a convolution's output before in-place BatchNorm/Scale/ReLU).
    ``loss_layer``: the loss layer's name; by default the one layer whose top has a loss weight.
    ``per_sample``: multiply by the batch size N (h of each sample's own loss instead of Caffe's
    batch mean). Returns {name: float32 array of the blob's shape (N, C, H, W)}. The net's weights
    come back bit-exactly, and its parameter and blob diffs as they were.
    """
    blobs = [blobs] if isinstance(blobs, str) else list(blobs)
    names = list(net._layer_names)
    types = [layer.type for layer in net.layers]
    loss_index = _loss_index(net, names, types, loss_layer)
    loss_name = names[loss_index]
    seeded = list(net.bottom_names[loss_name]) if rules.rule(types[loss_index]).seeds == "all" \
        else list(net.bottom_names[loss_name][:1])
    upstream, needed = _upstream(net, names, loss_index, seeded)
    for i in upstream:
        _check_type(names[i], types[i], len(net.bottom_names[names[i]]))
    producers = _producers(net, names, blobs, set(upstream), needed, loss_name)
    layers = built_layers(net)
    for i in upstream:
        problem = rules.rule(layers[i]).hessian_check(layers[i], len(net.bottom_names[names[i]]))
        if problem:
            raise InputError(f"layer {layers[i].name!r} ({layers[i].type}) {problem}")
    seeds = _loss_hessian(net, layers[loss_index], seeded)

    result = {}
    weighted = [names[i] for i in upstream if rules.rule(types[i]).hessian == "weighted"]
    with _restoring(net, weighted):
        for blob in net.blobs.values():
            blob.diff[...] = 0
        for name in blobs:          # a blob Caffe's backward never reaches keeps its NaN
            net.blobs[name].diff[...] = np.nan
        for name, h in seeds.items():
            net.blobs[name].diff[...] = h
        for i in upstream:
            _capture(net, blobs, producers, i, result)
            _step(net, i, types[i], layers[i])
        _capture(net, blobs, producers, -1, result)

    scale = net.blobs[seeded[0]].data.shape[0] if per_sample else 1
    for name in blobs:
        if np.isnan(result[name]).any():
            raise InputError(
                f"h for blob {name!r} is NaN: Caffe's backward does not reach it (nothing learnable "
                f"below it; set force_backward: true in the prototxt) or the net's values are not finite")
        if scale != 1:
            result[name] *= scale
    return {name: result[name] for name in blobs}


def built_layers(net) -> list:
    """Caffe's own record of the net's layers (LayerParameters aligned with ``net.layers``, with the
    auto-inserted Splits and each layer's phase), read once through ``net.save`` and cached."""
    cached = getattr(net, DEFINITION_ATTR, None)
    if cached is not None:
        return cached
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.caffemodel"
        net.save(str(path))
        param = pycaffe.read_caffemodel(path)
    layers = list(param.layer)
    for layer in layers:
        del layer.blobs[:]
    if [layer.name for layer in layers] != list(net._layer_names):
        raise InputError("net.save did not return the net's layers in order")
    setattr(net, DEFINITION_ATTR, layers)
    return layers


# ---- what the pass runs over ----------------------------------------------------------------------

def _loss_index(net, names, types, loss_layer) -> int:
    if loss_layer is None:
        weights = net.blob_loss_weights
        found = [i for i, name in enumerate(names) if any(weights[t] for t in net.top_names[name])]
        if len(found) != 1:
            raise InputError(f"the net has {len(found)} loss layers "
                                     f"({', '.join(names[i] for i in found) or 'none'}); name one with loss_layer")
        index = found[0]
    elif loss_layer in names:
        index = names.index(loss_layer)
    else:
        raise InputError(f"loss_layer {loss_layer!r} is not a layer of the net")
    if types[index] not in LOSSES:
        raise InputError(f"layer {names[index]!r} ({types[index]}): h at the output is known for "
                                 f"{' and '.join(LOSSES)} only")
    return index


def _upstream(net, names, loss_index, seeded):
    """Indices of the layers that feed the loss, from the loss down, and the blobs they touch."""
    needed = set(seeded)
    upstream = []
    for i in range(loss_index - 1, -1, -1):
        if needed & set(net.top_names[names[i]]):
            upstream.append(i)
            needed |= set(net.bottom_names[names[i]])
    return upstream, needed


def _producers(net, names, blobs, upstream, needed, loss_name) -> dict:
    """{blob: index of the layer that first writes it}, -1 for a net input."""
    producers = {}
    for name in blobs:
        if name not in net.blobs:
            raise InputError(f"blob {name!r} is not in the net")
        index = next((i for i, layer in enumerate(names) if name in net.top_names[layer]), -1)
        if (index not in upstream if index >= 0 else name not in needed):
            raise InputError(f"blob {name!r} does not feed the loss layer {loss_name!r}")
        producers[name] = index
    return producers


def _check_type(name, kind, n_bottoms) -> None:
    rule = rules.rule(kind)
    if n_bottoms == 0 or rule.hessian in ("weighted", "diagonal", "routing", "pool"):
        return
    reason = rule.why or "no OBD diagonal rule is implemented for this layer type"
    if rule.kind == "barrier":
        reason = "no OBD diagonal rule is implemented for this layer type"
    raise InputError(f"layer {name!r} ({kind}): {reason}; supported: {', '.join(SUPPORTED)}")


# ---- the loss ------------------------------------------------------------------------------------

def _loss_hessian(net, layer, seeded) -> dict:
    """{bottom blob: h at it}: the diagonal of the loss's Hessian w.r.t. its input(s)."""
    weight = float(net.blob_loss_weights[layer.top[0]])
    if rules.rule(layer).seeds == "all":   # EuclideanLoss, L = w/(2N) Σ (a - b)²: d²L/da² = w/N, for a and b
        return {name: np.full(net.blobs[name].data.shape, weight / net.blobs[name].data.shape[0])
                for name in seeded}
    logits = net.blobs[layer.bottom[0]].data.astype(np.float64)
    labels = net.blobs[layer.bottom[1]].data.reshape(-1).astype(int)
    axis = layer.softmax_param.axis % logits.ndim
    outer, inner = int(np.prod(logits.shape[:axis])), int(np.prod(logits.shape[axis + 1:]))
    z = np.moveaxis(logits, axis, -1).reshape(-1, logits.shape[axis])   # row i * inner + j: label's order
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    loss_param = layer.loss_param
    valid = np.ones(len(labels), dtype=bool)
    if loss_param.HasField("ignore_label"):
        valid = labels != loss_param.ignore_label
    modes = pycaffe.caffe_pb2().LossParameter
    mode = loss_param.normalization
    if not loss_param.HasField("normalization") and loss_param.HasField("normalize"):
        mode = modes.VALID if loss_param.normalize else modes.BATCH_SIZE
    normalizer = {modes.FULL: outer * inner, modes.VALID: int(valid.sum()),
                  modes.BATCH_SIZE: outer, modes.NONE: 1}[mode]
    h = weight * p * (1 - p) * valid[:, None] / max(1, normalizer)   # softmax_loss_layer.cpp get_normalizer
    shape = np.moveaxis(logits, axis, -1).shape
    return {layer.bottom[0]: np.moveaxis(h.reshape(shape), -1, axis)}


# ---- one layer of the pass -----------------------------------------------------------------------

def _capture(net, blobs, producers, index, result) -> None:
    for name in blobs:
        if producers[name] == index:
            result[name] = net.blobs[name].diff.copy()


def _step(net, index, kind, layer) -> None:
    """Map the h in layer ``index``'s top diff(s) to its bottom diff(s)."""
    bottoms, tops = net.bottom_names[layer.name], net.top_names[layer.name]
    if not bottoms:
        return
    rule = rules.rule(kind)
    if rule.hessian == "pool" and rule.averages(layer):
        top = net.blobs[tops[0]]
        top.diff[...] /= pool_sizes(layer.pooling_param, net.blobs[bottoms[0]].data.shape[2:],
                                    top.data.shape[2:]).astype(np.float32)
    if rule.hessian != "diagonal":
        net._backward(index, index)
        return
    h_top = net.blobs[tops[0]].diff.astype(np.float64)   # a copy: in place, Caffe overwrites it
    net._backward(index, index)
    for bottom in dict.fromkeys(bottoms):
        g = net.blobs[bottom].diff.astype(np.float64)     # d · h, d this layer's diagonal Jacobian
        h = np.divide(g * g, h_top, out=np.zeros_like(g), where=h_top != 0)   # d² · h
        h[np.isnan(h_top) | np.isnan(g)] = np.nan
        net.blobs[bottom].diff[...] = h


def pool_sizes(pool_param, in_shape, out_shape) -> np.ndarray:
    """K for every output position (PH, PW), as Caffe's average pooling divides (pooling_layer.cpp):
    the window [start, start + kernel) clipped to the padded map [-pad, size + pad)."""
    height, width = in_shape
    if pool_param.global_pooling:
        kernel = (height, width)
    elif pool_param.HasField("kernel_size"):
        kernel = (pool_param.kernel_size,) * 2
    else:
        kernel = (pool_param.kernel_h, pool_param.kernel_w)
    pad = (pool_param.pad_h, pool_param.pad_w) if pool_param.HasField("pad_h") else (pool_param.pad,) * 2
    stride = (pool_param.stride_h, pool_param.stride_w) if pool_param.HasField("stride_h") \
        else (pool_param.stride,) * 2
    sizes = []
    for axis in range(2):
        start = np.arange(out_shape[axis]) * stride[axis] - pad[axis]
        end = np.minimum(start + kernel[axis], in_shape[axis] + pad[axis])
        sizes.append(end - start)
    return np.outer(*sizes)


class _restoring:
    """Square the weighted layers' weights for the pass; afterwards put back every weight blob
    (bit-exactly), every parameter diff and every blob diff."""

    def __init__(self, net, weighted):
        self.net = net
        seen, self.weights = set(), []
        for name in weighted:
            blob = net.params[name][0]
            address = blob.data.__array_interface__["data"][0]
            if address not in seen:                     # a shared weight blob is squared once
                seen.add(address)
                self.weights.append(blob)

    def __enter__(self):
        self.saved_weights = [blob.data.copy() for blob in self.weights]
        self.param_diffs = [[blob, blob.diff.copy()] for blobs in self.net.params.values() for blob in blobs]
        self.blob_diffs = [[blob, blob.diff.copy()] for blob in self.net.blobs.values()]
        for blob in self.weights:
            data = blob.data
            np.square(data, out=data)
        return self

    def __exit__(self, *exc):
        for blob, saved in zip(self.weights, self.saved_weights):
            blob.data[...] = saved
        for blob, saved in self.param_diffs + self.blob_diffs:
            blob.diff[...] = saved
        return False

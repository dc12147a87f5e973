"""One Caffe forward and one backward per validation batch, turned into per-sample channel values.

``collect(net, graph, batches, names, reading)`` runs, for each batch (inputs already transformed,
labels), Caffe's forward over every layer once, Caffe's backward once (only if a requested metric
reads a gradient), and ``hessian.hessian_diagonal`` once (only if one reads OBD's h). From the blobs
it reads, for every producer convolution, the tensors the requested metrics need, and applies their
pointwise and reduction components at once, keeping one value per sample and item: an
(images x items) array per (input, pointwise, reduction). Keeping the raw per-sample tensors
instead would hold every feature map and per-sample weight gradient of every validation image
(gigabytes for ResNet-20 on 10,000 images); the reduced values are all that ``saliency`` needs to
average over samples, scale across layers and aggregate over groups. Metrics that read only the
weights (``weights/x/...``, static) need no pass and are computed once from the parameter blobs.

Items: the output channels of each convolution (side ``"out"``: its feature maps, or its filters
W[o]); and, for Domino metrics on weights, the input slices of each convolution (side ``"in"``:
W[outputs of the slice's group, i]) and of each InnerProduct fed channels (its block of columns).

What each input reads (``reading``)
-----------------------------------
In the published networks a BatchNorm, Scale and/or ReLU often run *in place* on a convolution's
top blob, so after Caffe's forward the blob holds the post-ReLU (post-BN) values, while after the
backward its diff is the gradient w.r.t. the *convolution's own output* (each in-place layer's
backward rewrote it on the way down). ``hessian_diagonal``'s h refers to the convolution's output
too.

- ``"authors"`` (default): x = ``net.blobs[top].data`` after the full forward, g =
  ``net.blobs[top].diff`` after the full backward: exactly the pair the authors' release read
  (their ``get_pruning_signals``), a post-ReLU value with a pre-ReLU gradient.
- ``"conv-output"``: x = the convolution's own output, copied right after the convolution ran (the
  forward is run in segments, ``net._forward(start, conv)``, so every layer still runs once),
  with the same g and h: value and derivatives of one tensor.

The two agree wherever no layer runs in place on the top (LeNet-5's convolutions). Weight inputs
are not affected: a convolution's weight gradient always pairs its bottom data (as it was when
the convolution ran) with the gradient w.r.t. its output.

Caffe's batch mean
------------------
Caffe's SoftmaxWithLoss reports the *mean* loss over the batch of N, so every blob diff holds
1/N of the gradient of that sample's own loss. ``per_sample`` multiplies by N, once, here; every
g is then the gradient of one sample's loss (loss_weight 1, no ignore_label: SoftmaxWithLoss's
normalizer is N), and ``hessian_diagonal(per_sample=True)`` does the same for h. This is not a
constant for every metric: second-order compositions (``taylor2_*``) add g and g² terms.

Caffe's parameter diffs are cleared before each backward (as the authors' loop did), so afterwards
they hold the last batch's gradient rather than an ever-growing sum.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from caffe_prune import evaluate
from caffe_prune.metrics import inputs, plugins
from caffe_prune.metrics.hessian import built_layers, hessian_diagonal
from caffe_prune.metrics.taxonomy import POINTWISE, REDUCTIONS, MetricError, parse
from caffe_prune.errors import InputError

READINGS = ("authors", "conv-output")


def per_sample(diff: np.ndarray, batch_size: int) -> np.ndarray:
    """A blob diff of Caffe's batch-mean loss -> the gradient of each sample's own loss (x N),
    in float64. The one place this factor is applied."""
    return diff.astype(np.float64) * batch_size


@dataclass
class Tensors:
    """What ``collect`` gathered: ``values[(layer, side)][(input, pointwise, reduction)]`` is an
    (images x items) float64 array of one sample's reduced value per item (one row for a static
    weights metric); ``area`` the H·W of each convolution's top."""
    reading: str
    metrics: tuple
    images: int = 0
    batches: int = 0
    values: dict = field(default_factory=lambda: defaultdict(dict))
    area: dict = field(default_factory=dict)

    @classmethod
    def merge(cls, static: "Tensors", parts: list) -> "Tensors":
        """One Tensors from ``static`` (the weights-only metrics, collected without a pass) and the
        per-batch ``parts`` of the metrics that need passes, in batch order: the same arrays one
        ``collect`` over all the batches builds."""
        merged = cls(static.reading, static.metrics + tuple(m for part in parts[:1] for m in part.metrics),
                     values={k: dict(v) for k, v in static.values.items()})
        for part in parts:
            merged.images += part.images
            merged.batches += part.batches
            merged.area.update(part.area)
        for where in {w for part in parts for w in part.values}:
            for key in {k for part in parts for k in part.values.get(where, {})}:
                merged.values.setdefault(where, {})[key] = np.concatenate([part.values[where][key] for part in parts])
        return merged

    def get(self, layer: str, side: str, key: tuple) -> np.ndarray:
        try:
            return self.values[(layer, side)][key]
        except KeyError:
            raise MetricError(f"{'/'.join(key)} on {layer!r} ({side}) was not collected; "
                              f"pass the metric in collect's needs (collected: {', '.join(self.metrics)})") from None


class _Plan:
    """Which (pointwise, reduction) pairs each input and side needs, and which tensors that takes."""

    def __init__(self, metrics):
        self.activation, self.weights_out, self.weights_in = set(), set(), set()
        self.static_out, self.static_in = set(), set()
        for m in metrics:
            pair = (m.pointwise, m.reduction)
            if m.input == "activation":
                self.activation.add(pair)
            elif m.static:
                self.static_out.add(pair)
                if m.domino:
                    self.static_in.add(pair)
            else:
                self.weights_out.add(pair)
                if m.domino:
                    self.weights_in.add(pair)
        dynamic = [m for m in metrics if not m.static]
        self.passes = bool(dynamic)
        self.reads = {inp: set().union(*(m.needs for m in dynamic if m.input == inp))
                      for inp in ("activation", "weights")}
        self.g = any("g" in reads for reads in self.reads.values())   # a backward is needed


def collect(net, graph, batches, names, reading: str = "authors") -> Tensors:
    """Gather what the metrics named in ``names`` read, from one forward and (if needed) one
    backward and one Hessian pass per batch. ``net``: an evaluation-form caffe.Net (Input blobs
    ``data`` and ``label``, SoftmaxWithLoss, TEST phase) with the pruning masks applied; ``graph``
    its ChannelGraph; ``batches``: (inputs, labels) arrays, inputs already transformed.

    Caffe computes a convolution's top diff when the convolution (or a layer below it) has
    learnable parameters, as in every net here; a frozen stem would need ``force_backward``, which
    stock Caffe's Accuracy layers refuse (they have no backward), so it is not set for you."""
    if reading not in READINGS:
        raise MetricError(f"invalid reading {reading!r}; valid: {', '.join(READINGS)}")
    metrics = [parse(name) for name in ([names] if isinstance(names, str) else names)]
    plan = _Plan(metrics)
    tensors = Tensors(reading, tuple(str(m) for m in metrics))
    convs = list(graph.producers)
    fcs = [f for f, info in graph.fc.items() if info.in_channels is not None]
    layers = built_layers(net) if plan.weights_out or plan.weights_in else None
    names = list(net._layer_names)
    index = {name: i for i, name in enumerate(names)}
    geometry = {c: inputs.conv_geometry(layers[index[c]]) for c in convs} if layers else {}

    for conv in convs:   # static: from the parameter blobs, once
        weights = inputs.conv_layout(net.params[conv][0].data.astype(np.float64)[None], graph.producers[conv])
        _reduce_weights(tensors, conv, "conv", plan.static_out, plan.static_in, weights, None, None,
                        graph.producers[conv].group)
    for fc in fcs if plan.static_in else ():
        weights = net.params[fc][0].data.astype(np.float64)[None]
        _reduce_weights(tensors, fc, "fc", (), plan.static_in, weights, None, None, graph.fc[fc].in_channels)
    if not plan.passes:
        return _stack(tensors)

    top = {c: net.top_names[c][0] for c in convs + fcs}
    bottom = {c: net.bottom_names[c][0] for c in convs + fcs}
    weighted = (convs + (fcs if plan.weights_in else [])) if plan.weights_out or plan.weights_in else []
    capture_top = set(convs) if plan.activation and reading == "conv-output" else set()
    capture_bottom = {layer for layer in weighted               # a bottom rewritten in place later
                      if any(bottom[layer] in net.top_names[n] for n in names[index[layer] + 1:])}
    stops = sorted({index[layer] for layer in capture_top | capture_bottom})
    act, wts = plan.reads["activation"], plan.reads["weights"]
    h_blobs = list(dict.fromkeys(([top[c] for c in convs] if "h" in act else [])
                                 + ([top[c] for c in weighted] if "h" in wts else [])))

    for batch_inputs, batch_labels in batches:
        n = evaluate.feed(net, batch_inputs, batch_labels)
        captured = {}
        start = 0
        for stop in stops:                    # Caffe's forward, in segments: each layer once
            net._forward(start, stop)
            layer = names[stop]
            if layer in capture_top:
                captured[("top", layer)] = net.blobs[top[layer]].data.copy()
            if layer in capture_bottom:
                captured[("bottom", layer)] = net.blobs[bottom[layer]].data.copy()
            start = stop + 1
        if start < len(names):
            net._forward(start, len(names) - 1)
        if plan.g:
            net.clear_param_diffs()
            net._backward(len(names) - 1, 0)
        h = hessian_diagonal(net, h_blobs, per_sample=True) if h_blobs else {}

        for conv in convs:
            blob = net.blobs[top[conv]]
            if plan.activation:
                x = captured.get(("top", conv), blob.data).astype(np.float64)
                g = per_sample(blob.diff, n) if "g" in act else None
                _reduce_activations(tensors, conv, plan.activation, x, g, h.get(top[conv]))
                tensors.area[conv] = x.shape[2] * x.shape[3]
        for layer in weighted:
            kind = "conv" if layer in graph.producers else "fc"
            out_pairs = plan.weights_out if kind == "conv" else ()
            if not out_pairs and not plan.weights_in:
                continue
            x_in = captured.get(("bottom", layer), net.blobs[bottom[layer]].data)
            g_top = net.blobs[top[layer]].diff
            h_top = h.get(top[layer])
            weights = net.params[layer][0].data.astype(np.float64)[None]
            per = weights.size      # elements per sample: the gradient, and for a conv its im2col
            if kind == "conv":
                columns = (g_top, x_in) if inputs.transposed(graph.producers[layer]) else (x_in, g_top)
                per = max(per, columns[0].shape[1] * weights[0, 0, 0].size * columns[1][0, 0].size)   # its im2col
                weights = inputs.conv_layout(weights, graph.producers[layer])
            split = graph.producers[layer].group if kind == "conv" else graph.fc[layer].in_channels
            grads = inputs.weight_gradients(graph.producers[layer], geometry[layer]) if kind == "conv" \
                else inputs.fc_weight_gradients
            for chunk in inputs.sample_chunks(n, per):
                gw = grads(x_in[chunk], per_sample(g_top[chunk], n)) if "g" in wts else None
                hw = grads(np.square(x_in[chunk].astype(np.float64)), h_top[chunk]) if "h" in wts else None
                _reduce_weights(tensors, layer, kind, out_pairs, plan.weights_in, weights, gw, hw, split)
        tensors.images += n
        tensors.batches += 1
    if tensors.batches == 0:
        raise InputError("collect was given no batches")
    return _stack(tensors)


def _append(tensors, layer, side, key, value) -> None:
    tensors.values[(layer, side)].setdefault(key, []).append(value)


def _reduce_activations(tensors, conv, pairs, x, g, h) -> None:
    """Feature maps (N, C, H, W): pointwise, then each reduction over H x W -> (N, C); a plugin's
    ``reduce`` does both."""
    for pw in sorted({p for p, _ in pairs}):
        if pw.startswith(plugins.PREFIX):
            values = plugins.get(plugins.split(pw)[0]).values(x, g, h, (2, 3), f"{conv} (feature maps)")
            _append(tensors, conv, "out", ("activation", pw, "plugin"), values)
            continue
        s = POINTWISE[pw].fn(x, g, h)
        for red in sorted(r for p, r in pairs if p == pw):
            _append(tensors, conv, "out", ("activation", pw, red), REDUCTIONS[red](s, (2, 3)))


def _reduce_weights(tensors, layer, kind, out_pairs, in_pairs, w, g, h, split) -> None:
    """Per-sample weight tensors (n, O, C/group, kh, kw) for a conv, (n, O, D) for an InnerProduct:
    pointwise, then each reduction over a filter (side "out", conv only) or over an input slice
    (side "in": a conv's W[outputs of the group, i], ``split`` = group; an InnerProduct's block of
    columns of channel c, ``split`` = its input channels)."""
    def sliced(s):        # each item of side "in" as a slice: (n, ..., items, ...) and its axes
        n = s.shape[0]
        if kind == "conv":
            o, cg = s.shape[1:3]
            return s.reshape(n, split, o // split, cg, -1), (2, 4)
        return s.reshape(n, s.shape[1], split, -1), (1, 3)

    for pw in sorted({p for p, _ in list(out_pairs) + list(in_pairs)}):
        if pw.startswith(plugins.PREFIX):
            _plugin_weights(tensors, layer, pw, pw in {p for p, _ in out_pairs}, pw in {p for p, _ in in_pairs},
                            w, g, h, sliced)
            continue
        s = POINTWISE[pw].fn(w, g, h)
        s = np.broadcast_to(s, np.broadcast_shapes(s.shape, w.shape))
        n = s.shape[0]
        for red in sorted(r for p, r in out_pairs if p == pw):
            _append(tensors, layer, "out", ("weights", pw, red), REDUCTIONS[red](s, (2, 3, 4)))
        reds = sorted(r for p, r in in_pairs if p == pw)
        if not reds:
            continue
        slices, axes = sliced(s)
        for red in reds:
            _append(tensors, layer, "in", ("weights", pw, red), REDUCTIONS[red](slices, axes).reshape(n, -1))


def _plugin_weights(tensors, layer, pw, out, into, w, g, h, sliced) -> None:
    """A plugin's ``reduce`` on a layer's weights: x the weights as every sample sees them (one
    row for a static metric), with g and h per sample; per filter (side "out") and per input
    slice (side "in")."""
    plugin = plugins.get(plugins.split(pw)[0])
    shape = (g if g is not None else h if h is not None else w).shape
    x = np.broadcast_to(w, shape)
    if out:
        _append(tensors, layer, "out", ("weights", pw, "plugin"), plugin.values(x, g, h, (2, 3, 4), f"{layer} (filters)"))
    if into:
        parts = [None if t is None else sliced(t)[0] for t in (x, g, h)]
        axes = sliced(x)[1]
        values = plugin.values(*parts, axes, f"{layer} (input slices)")
        _append(tensors, layer, "in", ("weights", pw, "plugin"), values.reshape(shape[0], -1))


def _stack(tensors: Tensors) -> Tensors:
    for per_key in tensors.values.values():
        for key, chunks in per_key.items():
            per_key[key] = np.concatenate(chunks, axis=0)
    tensors.values = dict(tensors.values)
    return tensors

"""Saliency metrics (caffe_prune.metrics) against numpy computations written here, from the blobs'
data and diff read directly after Caffe's own forward and backward: the paper's five, every
pointwise, reduction and scaling of the taxonomy, the two readings, per-sample weight gradients
(against Caffe's batch diff and against Caffe run on one image at a time), Domino aggregation,
group ranking, names, and one forward + one backward per batch."""
import csv
import json
import time

import numpy as np
import pytest

from caffe_prune import masking, metrics, netdef, networks, pycaffe
from caffe_prune.data import cifar10, cifar10_convert, validation
from caffe_prune.graph import ChannelGraph, Channel, build_graph
from caffe_prune.commands import metrics as metric_commands
from caffe_prune.metrics import inputs
from caffe_prune.metrics.hessian import hessian_diagonal
from conftest import PUBLISHED, SUBSET, evaluation_form

pytestmark = pytest.mark.xdist_group("test_metrics")       # one process: its module fixtures are costly

WEIGHTS = {"LeNet-5": PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel",
           "ResNet-20": PUBLISHED / "ResNet-20-CIFAR10" / "original.caffemodel"}

# Input -> conv1 -> ReLU in place -> max pool -> conv2 (stride 2) -> InnerProduct -> SoftmaxWithLoss
TINY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: %(n)d dim: 3 dim: 8 dim: 8 } shape { dim: %(n)d } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1
    weight_filler { type: "gaussian" std: 0.4 } bias_filler { type: "gaussian" std: 0.2 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1
    weight_filler { type: "gaussian" std: 0.4 } bias_filler { type: "gaussian" std: 0.2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv2" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

# grouped convolutions with stride, padding and dilation, for the per-sample weight gradients
GROUPED = """
name: "grouped"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: %(n)d dim: 4 dim: 9 dim: 9 } shape { dim: %(n)d } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2
    weight_filler { type: "gaussian" std: 0.4 } bias_filler { type: "gaussian" std: 0.2 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 4 kernel_h: 2 kernel_w: 3 pad_h: 1 pad_w: 2 dilation: 2 group: 2
    weight_filler { type: "gaussian" std: 0.4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv2" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


# ---- the reference computations, written out here ------------------------------------------------

POINTWISE = {
    "x": lambda x, g, h: x,
    "g": lambda x, g, h: g,
    "taylor": lambda x, g, h: -x * g,
    "hess_sqgrad": lambda x, g, h: 0.5 * (x * g) ** 2,
    "hess_obd": lambda x, g, h: 0.5 * x ** 2 * h,
    "taylor2_sqgrad": lambda x, g, h: -x * g + 0.5 * (x * g) ** 2,
    "taylor2_obd": lambda x, g, h: -x * g + 0.5 * x ** 2 * h,
    "apoz": lambda x, g, h: (x > 0).astype(float),
}
REDUCE = {
    "sum": lambda s, axes: s.sum(axis=axes),
    "l1": lambda s, axes: np.abs(s).sum(axis=axes),
    "l2": lambda s, axes: (s ** 2).sum(axis=axes),
    "abs_sum": lambda s, axes: np.abs(s.sum(axis=axes)),
    "sqr_sum": lambda s, axes: s.sum(axis=axes) ** 2,
}


class Case:
    """A net, its graph, batches of real or random images, and what Caffe's passes leave in the
    blobs, read batch by batch: (data, diff x N, h) of each conv top, the conv's own output, bottoms."""

    def __init__(self, net, graph, batches):
        self.net, self.graph, self.batches = net, graph, batches
        self.convs = list(graph.producers)

    def passes(self, want_h=True):
        net, out = self.net, []
        for x, y in self.batches:
            n = len(x)
            net.blobs["data"].data[...] = x
            net.blobs["label"].data[...] = y
            own = {}
            for conv in self.convs:              # the convolution's own output: a forward up to it
                net.forward(end=conv)
                own[conv] = net.blobs[conv].data.astype(np.float64).copy()
            net.forward()
            tops = self.convs + list(self.graph.fc)
            h = hessian_diagonal(net, tops, per_sample=True) if want_h else {}
            net.clear_param_diffs()
            net.backward()
            out.append({"n": n, "own": own, "h": h,
                        "data": {b: net.blobs[b].data.astype(np.float64).copy() for b in net.blobs.keys()},
                        "diff": {b: net.blobs[b].diff.astype(np.float64).copy() * n for b in net.blobs.keys()},
                        "param_diff": {l: net.params[l][0].diff.astype(np.float64).copy() for l in tops}})
        return out


def tiny_case(caffe, write_net, text=TINY, n=4, seed=0):
    pycaffe.caffe().set_random_seed(seed)
    path = write_net(text % dict(n=n), "tiny.prototxt")
    net = pycaffe.load_net(path, probe=False)
    graph = ChannelGraph.build(pycaffe.read_prototxt(path), {b: v.data.shape for b, v in net.blobs.items()})
    rng = np.random.default_rng(seed)
    shape = net.blobs["data"].data.shape
    batches = [(rng.normal(size=shape).astype(np.float32), rng.integers(0, 5, size=n)) for _ in range(2)]
    return Case(net, graph, batches), path


def published_case(name, tmp_path, per_batch=8, count=2):
    param = networks.train_test(name)
    form = evaluation_form(param, batch_size=per_batch)
    transform = networks.transform(name)
    net = pycaffe.load_net(netdef.write_prototxt(form, tmp_path / f"{name}.prototxt"), WEIGHTS[name], probe=False)
    images, labels = cifar10.read_split("test", SUBSET)
    x = cifar10_convert.caffe_input(images[:per_batch * count], transform.mean_values, transform.scale)
    batches = [(x[i:i + per_batch], labels[i:i + per_batch]) for i in range(0, per_batch * count, per_batch)]
    return Case(net, build_graph(param, networks.IMAGE_SHAPE), batches)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    pycaffe.set_mode("cpu")
    return published_case("ResNet-20", tmp_path_factory.mktemp("resnet"))


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    pycaffe.set_mode("cpu")
    return published_case("LeNet-5", tmp_path_factory.mktemp("lenet"))


def activation_reference(records, conv, pointwise, reduction, own=False):
    """Mean over every sample of one sample's reduced pointwise values: one value per channel."""
    rows = []
    for r in records:
        x = r["own"][conv] if own else r["data"][conv]
        s = POINTWISE[pointwise](x, r["diff"][conv], r["h"].get(conv))
        rows.append(REDUCE[reduction](s, (2, 3)))
    return np.concatenate(rows).mean(axis=0)


def present_outputs(graph, conv, pruned):
    return np.array([graph.group_of(conv, i) is None or graph.group_of(conv, i).id not in pruned
                     for i in range(graph.producers[conv].num_output)])


def scaled(values, scaling, count, active, present, removed, macs=None):
    if scaling == "none":
        return values
    if scaling == "count":
        return values / count
    if scaling == "active_count":
        return values / active
    if scaling == "l1_layer":
        return values / np.abs(values[present]).sum()
    if scaling == "l2_layer":
        return values / np.sqrt((values[present] ** 2).sum())
    if scaling == "macs_removed":
        return values / macs
    assert scaling == "weights_removed"
    return values / removed


def removed_by_hand(graph, conv, pruned):
    """Θ_C of each output channel's group, from the graph's counts (tested in test_graph); NaN for
    a channel that is unprunable or already pruned (never compared)."""
    return np.array([np.nan if graph.group_of(conv, i) is None or graph.group_of(conv, i).id in pruned else
                     graph.weights_removed(graph.group_of(conv, i).id, pruned)
                     + graph.fc_weights_removed(graph.group_of(conv, i).id, pruned)
                     for i in range(graph.producers[conv].num_output)])


def macs_by_hand(graph, conv, pruned):
    """The MACs per image each output channel's group saves, from the graph's counts (tested by hand
    in test_layers and below); NaN where not compared."""
    return np.array([np.nan if graph.group_of(conv, i) is None or graph.group_of(conv, i).id in pruned else
                     graph.saved(graph.group_of(conv, i).id, pruned).macs
                     for i in range(graph.producers[conv].num_output)])


def assert_saliency(got, conv, expected, pruned, graph, rtol=1e-6):
    """got: {Channel: value}; expected: one value per channel of conv, checked where not pruned."""
    checked = 0
    for i, want in enumerate(expected):
        group = graph.group_of(conv, i)
        if group is None or group.id in pruned:
            assert Channel(conv, i) not in got
            continue
        have = got[Channel(conv, i)]
        assert have == pytest.approx(want, rel=rtol, abs=1e-12 * max(1.0, np.abs(expected).max())), (conv, i)
        checked += 1
    assert checked > 0


# ---- 1. the paper's five, as the authors' release computes them ---------------------------------

def authors_five(records, conv, weights, active_in, kernel_area):
    """The authors' get_pruning_signals (myopic-oracle utils.py), per batch then averaged over the
    batches, with the diff rescaled to per-sample gradients (x N)."""
    per_batch = []
    for r in records:
        a, g = r["data"][conv], r["diff"][conv]
        n, _, hh, ww = a.shape
        per_batch.append({
            "mean_activations": np.abs(a).sum(axis=(0, 2, 3)) / (n * hh * ww),
            "taylor": np.abs(a * g).sum(axis=(0, 2, 3)) / (n * hh * ww),
            "fisher": 0.5 * ((a * g) ** 2).sum(axis=(0, 2, 3)) / (n * hh * ww),
            "mean_gradients": np.abs(g).sum(axis=(0, 2, 3)) / (n * hh * ww),
        })
    out = {k: np.mean([b[k] for b in per_batch], axis=0) for k in per_batch[0]}
    out["mean_sq_weights"] = (weights.astype(np.float64) ** 2).sum(axis=(1, 2, 3)) / (active_in * kernel_area)
    return out


def check_five(case, pruned, active_in):
    records = case.passes(want_h=False)
    tensors = metrics.collect(case.net, case.graph, case.batches, list(metrics.ALIASES))
    for conv in case.convs:
        info = case.graph.producers[conv]
        want = authors_five(records, conv, case.net.params[conv][0].data, active_in[conv], info.kernel_area)
        for alias in metrics.ALIASES:
            assert_saliency(metrics.saliency(alias, tensors, case.graph, pruned), conv, want[alias], pruned, case.graph)


def test_five_on_the_tiny_net(caffe, write_net):
    case, _ = tiny_case(caffe, write_net)
    pruned = {case.graph.group_of("conv1", 1).id}
    masking.Masker(case.graph, [case.net]).commit(next(iter(pruned)))
    check_five(case, pruned, {"conv1": 3, "conv2": 3})   # conv2 lost input 1


def test_five_on_lenet5(caffe, lenet):
    pruned = {lenet.graph.group_of("conv1", 7).id, lenet.graph.group_of("conv1", 11).id}
    masker = masking.Masker(lenet.graph, [lenet.net])
    for gid in pruned:
        masker.mask(gid)
    try:
        check_five(lenet, pruned, {"conv1": 3, "conv2": 18})
    finally:
        masker.restore_all()


def test_five_on_resnet20(caffe, resnet):
    active = {conv: info.in_channels for conv, info in resnet.graph.producers.items()}
    check_five(resnet, set(), active)


def test_five_from_one_forward_and_one_backward_per_batch(caffe, resnet):
    """The speed requirement: a thin wrapper counts the layers Caffe runs. All five metrics (and
    the conv-output reading, which runs the forward in segments) take every layer's forward once
    and one full backward per batch; an OBD metric adds exactly one Hessian pass."""

    class Counting:
        def __init__(self, net):
            self.__dict__.update(_net=net, forward=[], backward=[])

        def __getattr__(self, name):
            return getattr(self._net, name)

        def _forward(self, start, end):
            self.forward.append((start, end))
            return self._net._forward(start, end)

        def _backward(self, start, end):
            self.backward.append((start, end))
            return self._net._backward(start, end)

    layers = len(resnet.net.layers)
    for reading in metrics.READINGS:
        counting = Counting(resnet.net)
        start = time.perf_counter()
        metrics.collect(counting, resnet.graph, resnet.batches, list(metrics.ALIASES), reading)
        seconds = time.perf_counter() - start
        per_layer = np.zeros(layers, int)
        for a, b in counting.forward:
            per_layer[a:b + 1] += 1
        assert (per_layer == len(resnet.batches)).all(), reading
        assert counting.backward == [(layers - 1, 0)] * len(resnet.batches)
        print(f"\nfive metrics, {reading} reading: {len(counting.forward)} forward segments, "
              f"{len(counting.backward)} backward passes for {len(resnet.batches)} batches, {seconds:.2f} s")
    counting = Counting(resnet.net)
    metrics.collect(counting, resnet.graph, resnet.batches, list(metrics.ALIASES) + ["activation/hess_obd/sum/none"])
    full = [r for r in counting.backward if r == (layers - 1, 0)]
    single = [r for r in counting.backward if r != (layers - 1, 0)]
    assert len(full) == len(resnet.batches)
    assert all(a == b for a, b in single) and len(single) == len(set(single)) * len(resnet.batches)
    assert len(single) < layers * len(resnet.batches)      # one Hessian pass: each layer at most once


# ---- 2. the taxonomy: every pointwise, reduction and scaling ------------------------------------

ACTIVATION_COMBOS = [
    "activation/x/sum/none",
    "activation/g/l2/l1_layer",
    "activation/taylor/abs_sum/count",
    "activation/hess_sqgrad/l1/l2_layer",
    "activation/hess_obd/sum/active_count",
    "activation/taylor2_sqgrad/sqr_sum/weights_removed",
    "activation/taylor2_obd/l1/none",
    "activation/apoz/sum/count",
    "activation/taylor/sum/macs_removed",
]


def check_activation_combos(case, names, pruned, readings=("authors",)):
    records = case.passes()
    for reading in readings:
        tensors = metrics.collect(case.net, case.graph, case.batches, names, reading)
        for name in names:
            _, pw, red, sc = name.split("/")
            got = metrics.saliency(name, tensors, case.graph, pruned)
            for conv in case.convs:
                values = activation_reference(records, conv, pw, red, own=reading == "conv-output")
                area = records[0]["data"][conv].shape[2] * records[0]["data"][conv].shape[3]
                present = present_outputs(case.graph, conv, pruned)
                want = scaled(values, sc, area, area, present, removed_by_hand(case.graph, conv, pruned),
                              macs_by_hand(case.graph, conv, pruned))
                assert_saliency(got, conv, want, pruned, case.graph, rtol=1e-5)


def test_activation_taxonomy_on_the_tiny_net(caffe, write_net):
    case, _ = tiny_case(caffe, write_net)
    pruned = {case.graph.group_of("conv2", 4).id}
    masking.Masker(case.graph, [case.net]).commit(next(iter(pruned)))
    check_activation_combos(case, ACTIVATION_COMBOS, pruned, metrics.READINGS)
    # Θ_C by hand: a conv1 channel takes its 3x3x3 filter and a 3x3 slice of each of conv2's 5
    # remaining filters; a conv2 channel its 4x3x3 filter and its 2x2 block of the 5 logits' weights
    tensors = metrics.collect(case.net, case.graph, case.batches, ["activation/x/sum/weights_removed"])
    plain = metrics.collect(case.net, case.graph, case.batches, ["activation/x/sum/none"])
    s, p = (metrics.saliency(m, t, case.graph, pruned) for m, t in
            (("activation/x/sum/weights_removed", tensors), ("activation/x/sum/none", plain)))
    assert s[Channel("conv1", 0)] == pytest.approx(p[Channel("conv1", 0)] / (27 + 5 * 9))
    assert s[Channel("conv2", 0)] == pytest.approx(p[Channel("conv2", 0)] / (36 + 5 * 4))
    # MACs by hand: a conv1 channel's filter at its 8x8 positions and its slices of conv2's 5
    # remaining filters at conv2's 2x2; a conv2 channel's filter at 2x2 and its block of the logits
    macs = metrics.collect(case.net, case.graph, case.batches, ["activation/x/sum/macs_removed"])
    m = metrics.saliency("activation/x/sum/macs_removed", macs, case.graph, pruned)
    assert m[Channel("conv1", 0)] == pytest.approx(p[Channel("conv1", 0)] / (27 * 64 + 5 * 9 * 4))
    assert m[Channel("conv2", 0)] == pytest.approx(p[Channel("conv2", 0)] / (36 * 4 + 5 * 4))


def test_activation_taxonomy_on_lenet5_and_resnet20(caffe, lenet, resnet):
    names = ["activation/taylor/abs_sum/count", "activation/hess_obd/l2/l1_layer",
             "activation/taylor2_sqgrad/sum/weights_removed", "activation/apoz/sum/active_count"]
    check_activation_combos(lenet, names, set())
    check_activation_combos(resnet, names, set(), metrics.READINGS)


def correlation_loop(x, t, geometry):
    """Σ_p t[o, p] · x[c, p·s + k·d - pad] per output position p, within each group: a loop over
    output positions, unlike the im2col of caffe_prune.metrics.inputs."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), grp = geometry
    c, o = x.shape[0], t.shape[0]
    cg, og = c // grp, o // grp
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw)))
    out = np.zeros((o, cg, kh, kw))
    for p in range(t.shape[1]):
        for q in range(t.shape[2]):
            window = xp[:, p * sh:p * sh + (kh - 1) * dh + 1:dh, q * sw:q * sw + (kw - 1) * dw + 1:dw]
            for k in range(grp):
                out[k * og:(k + 1) * og] += np.einsum("o,ckl->ockl", t[k * og:(k + 1) * og, p, q],
                                                      window[k * cg:(k + 1) * cg])
    return out


def one_image_gradients(case, path_text, write_net, layers):
    """Each sample's own weight gradient from Caffe itself: a batch-of-one net sharing the weights,
    forward and backward per image. Returns {layer: (images, *weight shape)} and the h of each top."""
    single = pycaffe.load_net(write_net(path_text, "single.prototxt"), probe=False) if isinstance(path_text, str) \
        else path_text
    single.share_with(case.net)
    grads, hs, bottoms = {l: [] for l in layers}, {l: [] for l in layers}, {l: [] for l in layers}
    for x, y in case.batches:
        for i in range(len(x)):
            single.blobs["data"].data[...] = x[i:i + 1]
            single.blobs["label"].data[...] = y[i:i + 1]
            single.forward()
            h = hessian_diagonal(single, [single.top_names[l][0] for l in layers], per_sample=True)
            single.clear_param_diffs()
            single.backward()
            for l in layers:
                grads[l].append(single.params[l][0].diff.astype(np.float64).copy())
                hs[l].append(h[single.top_names[l][0]][0].astype(np.float64))
                bottoms[l].append(single.blobs[single.bottom_names[l][0]].data[0].astype(np.float64).copy())
    return ({l: np.array(v) for l, v in grads.items()}, {l: np.array(v) for l, v in hs.items()},
            {l: np.array(v) for l, v in bottoms.items()})


WEIGHT_COMBOS = [
    "weights/x/l1/active_count",
    "weights/g/sqr_sum/count",
    "weights/taylor/abs_sum/l1_layer",
    "weights/hess_sqgrad/sum/none",
    "weights/hess_obd/l2/weights_removed",
    "weights/taylor2_sqgrad/l1/l2_layer",
    "weights/taylor2_obd/sum/active_count",
]


def check_weight_combos(case, names, pruned, single, write_net, layers, active_in, rtol=1e-5):
    """Against Caffe's gradient of each image alone (float32, summed in another order: ``rtol``)."""
    grads, hs, bottoms = one_image_gradients(case, single, write_net, layers)
    tensors = metrics.collect(case.net, case.graph, case.batches, names)
    geometry = {l: inputs.conv_geometry(layer) for l, layer in
                zip(case.net._layer_names, metrics.hessian.built_layers(case.net)) if l in layers}
    for name in names:
        _, pw, red, sc = name.split("/")
        got = metrics.saliency(name, tensors, case.graph, pruned)
        for conv in layers:
            info = case.graph.producers[conv]
            w = case.net.params[conv][0].data.astype(np.float64)
            h_w = np.array([correlation_loop(b ** 2, h, geometry[conv]) for b, h in zip(bottoms[conv], hs[conv])])
            s = POINTWISE[pw](w[None], grads[conv], h_w)
            values = REDUCE[red](np.broadcast_to(s, grads[conv].shape), (2, 3, 4)).mean(axis=0)
            count = info.in_channels // info.group * info.kernel_area
            want = scaled(values, sc, count, active_in[conv] * info.kernel_area,
                          present_outputs(case.graph, conv, pruned), removed_by_hand(case.graph, conv, pruned))
            assert_saliency(got, conv, want, pruned, case.graph, rtol=rtol)


def test_weight_taxonomy_on_the_tiny_net(caffe, write_net):
    case, _ = tiny_case(caffe, write_net)
    pruned = {case.graph.group_of("conv1", 2).id}
    masking.Masker(case.graph, [case.net]).commit(next(iter(pruned)))
    check_weight_combos(case, WEIGHT_COMBOS, pruned, TINY % dict(n=1), write_net, ["conv1", "conv2"],
                        {"conv1": 3, "conv2": 3})


def test_weight_taxonomy_on_lenet5_and_resnet20(caffe, write_net, lenet, resnet, tmp_path):
    names = ["weights/g/l2/count", "weights/hess_obd/sum/l1_layer", "weights/taylor2_sqgrad/abs_sum/active_count"]

    def single(name, case):
        form = evaluation_form(networks.train_test(name), batch_size=1)
        return pycaffe.load_net(netdef.write_prototxt(form, tmp_path / f"{name}-1.prototxt"), probe=False)

    check_weight_combos(lenet, names, set(), single("LeNet-5", lenet), write_net, ["conv1", "conv2"],
                        {"conv1": 3, "conv2": 20}, rtol=1e-4)
    check_weight_combos(resnet, names, set(), single("ResNet-20", resnet), write_net,
                        ["group1_block0_conv0", "group1_block0_proj"],
                        {"group1_block0_conv0": 16, "group1_block0_proj": 16}, rtol=1e-4)


# ---- 3. per-sample weight gradients ---------------------------------------------------------------

def test_per_sample_weight_gradients_sum_to_caffes_diff(caffe, write_net, resnet):
    """Σ_n of the per-sample correlations equals Caffe's batch weight diff; with the top diff x N
    (as collect uses it) each equals the gradient Caffe computes for that image alone; grouped,
    strided, padded and dilated convolutions included, and ResNet-20's stride-2 convolutions."""
    case, _ = tiny_case(caffe, write_net, GROUPED, n=3)
    layers = metrics.hessian.built_layers(case.net)
    geometry = {l: inputs.conv_geometry(p) for l, p in zip(case.net._layer_names, layers) if p.type == "Convolution"}
    assert geometry["conv2"] == inputs.Geometry((2, 3), (1, 1), (1, 2), (2, 2), 2)
    records = case.passes(want_h=False)
    grads, _, _ = one_image_gradients(case, GROUPED % dict(n=1), write_net, ["conv1", "conv2"])
    for b, r in enumerate(records):
        n = r["n"]
        for conv in ("conv1", "conv2"):
            bottom = r["data"]["data" if conv == "conv1" else "conv1"]
            per = inputs.conv_weight_gradients(bottom, r["diff"][conv] / n, geometry[conv])
            np.testing.assert_allclose(per.sum(axis=0), r["param_diff"][conv], rtol=1e-5, atol=1e-7)
            per_sample = inputs.conv_weight_gradients(bottom, r["diff"][conv], geometry[conv])   # diff x N
            np.testing.assert_allclose(per_sample, grads[conv][b * n:(b + 1) * n], rtol=1e-4, atol=1e-6)
            loop = np.array([correlation_loop(x, t, geometry[conv]) for x, t in zip(bottom, r["diff"][conv])])
            np.testing.assert_allclose(per_sample, loop, rtol=1e-9, atol=1e-12)
    # ResNet-20: 3x3 stride 2 and the 1x1 stride-2 projection, on real images
    r = resnet.passes(want_h=False)[0]
    built = dict(zip(resnet.net._layer_names, metrics.hessian.built_layers(resnet.net)))
    for conv, bottom in (("group1_block0_conv0", "group0_block2_sum"), ("group2_block0_proj", "group1_block2_sum")):
        per = inputs.conv_weight_gradients(r["data"][bottom], r["diff"][conv], inputs.conv_geometry(built[conv]))
        caffe_diff = r["param_diff"][conv]
        np.testing.assert_allclose(per.sum(axis=0) / r["n"], caffe_diff, rtol=1e-4,
                                   atol=1e-5 * np.abs(caffe_diff).max())


# ---- 4. the two readings on ResNet-20 -------------------------------------------------------------

# pinned: first 16 subset test images, batches of 8, the published ResNet-20 weights
PINNED = {  # mean_activations of channel 0: (authors, conv-output)
    "group0_block0_conv0": (0.496845, 1.65477),
    "group0_block0_conv1": (0.837591, 2.86929),
}


def test_authors_reading_differs_from_conv_output_on_resnet20(caffe, resnet):
    """group0_block0_conv0's top holds BatchNorm, Scale and ReLU in place, group0_block0_conv1's
    BatchNorm and Scale. The authors' reading takes the post-ReLU (post-Scale) data with the
    gradient w.r.t. the convolution's output; conv-output takes the convolution's own output."""
    records = resnet.passes(want_h=False)
    convs = list(PINNED)
    r = records[0]
    w, b = (resnet.net.params["group0_block0_conv0"][i].data.astype(np.float64) for i in (0, 1))
    x = np.pad(r["data"]["first_conv"], ((0, 0), (0, 0), (1, 1), (1, 1)))   # conv0 reads first_conv
    own = np.zeros_like(r["own"]["group0_block0_conv0"])
    for i in range(32):
        for j in range(32):
            own[:, :, i, j] = np.einsum("nckl,ockl->no", x[:, :, i:i + 3, j:j + 3], w) + b
    np.testing.assert_allclose(r["own"]["group0_block0_conv0"], own, rtol=1e-4, atol=1e-4)
    assert r["data"]["group0_block0_conv0"].min() == 0 and own.min() < 0         # post-ReLU vs raw
    values = {}
    for reading in metrics.READINGS:
        tensors = metrics.collect(resnet.net, resnet.graph, resnet.batches,
                                  ["mean_activations", "mean_gradients", "taylor"], reading)
        for alias in ("mean_activations", "mean_gradients", "taylor"):
            values[reading, alias] = metrics.saliency(alias, tensors, resnet.graph)
        for conv in convs:
            area = 32 * 32
            for alias, pw, red in (("mean_activations", "x", "l1"), ("taylor", "taylor", "l1")):
                want = activation_reference(records, conv, pw, red, own=reading == "conv-output") / area
                assert_saliency(values[reading, alias], conv, want, set(), resnet.graph, rtol=1e-5)
    for conv in convs:
        channels = [Channel(conv, i) for i in range(16)]
        authors = np.array([values["authors", "mean_activations"][c] for c in channels])
        conv_output = np.array([values["conv-output", "mean_activations"][c] for c in channels])
        assert np.abs(authors - conv_output).max() > 0.1 * np.abs(conv_output).max()
        gradients = [values[reading, "mean_gradients"][c] for reading in metrics.READINGS for c in channels[:1]]
        assert gradients[0] == gradients[1]                       # the same diff in both readings
        assert (authors[0], conv_output[0]) == pytest.approx(PINNED[conv], rel=1e-5)
        print(f"\n{conv} channel 0 mean_activations: authors {authors[0]:.6g}, conv-output {conv_output[0]:.6g}")


# ---- 5. Domino and group ranking -----------------------------------------------------------------

def test_domino_aggregates_the_group_on_resnet20(caffe, resnet):
    base = "activation/taylor/abs_sum/count"
    records = resnet.passes(want_h=False)
    names = [base] + [f"domino-{agg}:{base}" for agg in metrics.DOMINO]
    tensors = metrics.collect(resnet.net, resnet.graph, resnet.batches, names)
    independent = {}
    for conv in resnet.convs:
        area = records[0]["data"][conv].shape[2] * records[0]["data"][conv].shape[3]
        for i, v in enumerate(activation_reference(records, conv, "taylor", "abs_sum") / area):
            independent[Channel(conv, i)] = v
    tied = [g for g in resnet.graph.groups if len(g.channels) > 1]
    assert len(tied) == 16 + 32 + 64
    for agg, fn in (("sum", np.sum), ("mean", np.mean), ("max", np.max)):
        got = metrics.saliency(f"domino-{agg}:{base}", tensors, resnet.graph)
        for group in resnet.graph.groups:
            want = fn([independent[c] for c in group.channels])
            for c in group.channels:
                assert got[c] == pytest.approx(want, rel=1e-6)
    ranking = metrics.rank_groups(f"domino-sum:{base}", tensors, resnet.graph)
    sums = {g.id: sum(independent[c] for c in g.channels) for g in resnet.graph.groups}
    assert [gid for gid, _ in ranking] == sorted(sums, key=lambda gid: (sums[gid], gid))
    # weights: the first stage's residual group 0 also takes input slice 0 of the five convolutions
    # reading that stream (group0's three conv0, group1_block0's conv0 and projection)
    name = "weights/x/l1/count"
    tensors = metrics.collect(resnet.net, resnet.graph, resnet.batches, [f"domino-{a}:{name}" for a in metrics.DOMINO])
    group = resnet.graph.groups[0]
    assert len(group.channels) == 4 and len(group.consumers) == 5
    w = {l: np.abs(resnet.net.params[l][0].data.astype(np.float64)) for l in resnet.graph.producers}
    parts = [w[c.layer][c.index].sum() / w[c.layer][c.index].size for c in group.channels] + \
        [w[s.layer][:, s.input_channel].sum() / w[s.layer][:, s.input_channel].size for s in group.consumers]
    for agg, fn in (("sum", np.sum), ("mean", np.mean), ("max", np.max)):
        got = metrics.saliency(f"domino-{agg}:{name}", tensors, resnet.graph)
        assert all(got[c] == pytest.approx(fn(parts), rel=1e-9) for c in group.channels)


def test_domino_on_weights_takes_the_consumer_slices(caffe, lenet):
    """LeNet-5: conv1 channel c falls with conv2's input slice W2[:, c]; conv2 channel c with ip1's
    25 columns of c. Static weights metric, numbers from the parameter blobs."""
    name = "weights/x/l2/count"
    tensors = metrics.collect(lenet.net, lenet.graph, lenet.batches, [f"domino-{a}:{name}" for a in metrics.DOMINO])
    w1, w2, ip1 = (lenet.net.params[l][0].data.astype(np.float64) for l in ("conv1", "conv2", "ip1"))
    for agg, fn in (("sum", np.sum), ("mean", np.mean), ("max", np.max)):
        got = metrics.saliency(f"domino-{agg}:{name}", tensors, lenet.graph)
        for c in (0, 5, 19):
            parts = [(w1[c] ** 2).sum() / (3 * 25), (w2[:, c] ** 2).sum() / (50 * 25)]
            assert got[Channel("conv1", c)] == pytest.approx(fn(parts), rel=1e-9)
        for c in (0, 33, 49):
            parts = [(w2[c] ** 2).sum() / (20 * 25), (ip1[:, c * 25:(c + 1) * 25] ** 2).sum() / (500 * 25)]
            assert got[Channel("conv2", c)] == pytest.approx(fn(parts), rel=1e-9)


def test_domino_on_weight_gradients_on_the_tiny_net(caffe, write_net):
    """A dynamic weights metric: the consumer slices' per-sample gradients, from Caffe one image
    at a time; conv1's channels take conv2's slices, conv2's the InnerProduct's columns."""
    case, _ = tiny_case(caffe, write_net)
    name = "weights/taylor/abs_sum/none"
    grads, _, _ = one_image_gradients(case, TINY % dict(n=1), write_net, ["conv1", "conv2"])
    single = pycaffe.load_net(write_net(TINY % dict(n=1), "single-ip.prototxt"), probe=False)
    single.share_with(case.net)
    ip_grads = []
    for x, y in case.batches:
        for i in range(len(x)):
            single.blobs["data"].data[...] = x[i:i + 1]
            single.blobs["label"].data[...] = y[i:i + 1]
            single.forward()
            single.clear_param_diffs()
            single.backward()
            ip_grads.append(single.params["ip"][0].diff.astype(np.float64).copy())
    ip_grads = np.array(ip_grads)
    w1, w2, ip = (case.net.params[l][0].data.astype(np.float64) for l in ("conv1", "conv2", "ip"))
    tensors = metrics.collect(case.net, case.graph, case.batches, [f"domino-sum:{name}", f"domino-max:{name}"])
    for agg, fn in (("sum", np.sum), ("max", np.max)):
        got = metrics.saliency(f"domino-{agg}:{name}", tensors, case.graph)
        for c in range(4):
            filt = np.abs((-w1[c] * grads["conv1"][:, c]).sum(axis=(1, 2, 3))).mean()
            piece = np.abs((-w2[:, c] * grads["conv2"][:, :, c]).sum(axis=(1, 2, 3))).mean()
            assert got[Channel("conv1", c)] == pytest.approx(fn([filt, piece]), rel=1e-5)
        for c in range(6):
            filt = np.abs((-w2[c] * grads["conv2"][:, c]).sum(axis=(1, 2, 3))).mean()
            cols = slice(4 * c, 4 * c + 4)
            piece = np.abs((-ip[:, cols] * ip_grads[:, :, cols]).sum(axis=(1, 2))).mean()
            assert got[Channel("conv2", c)] == pytest.approx(fn([filt, piece]), rel=1e-5)


def test_rank_groups_by_the_least_salient_member(caffe, resnet):
    pruned = {resnet.graph.group_of("group0_block0_conv0", 3).id, resnet.graph.group_of("first_conv", 5).id}
    masker = masking.Masker(resnet.graph, [resnet.net])
    for gid in pruned:
        masker.mask(gid)
    try:
        tensors = metrics.collect(resnet.net, resnet.graph, resnet.batches, ["taylor"])
    finally:
        masker.restore_all()
    scores = metrics.saliency("taylor", tensors, resnet.graph, pruned)
    ranking = metrics.rank_groups("taylor", tensors, resnet.graph, pruned)
    prunable = set(resnet.graph.prunable(pruned))
    assert {gid for gid, _ in ranking} == prunable and not prunable & pruned
    for gid, score in ranking:
        assert score == min(scores[c] for c in resnet.graph.groups[gid].channels)
    assert [s for _, s in ranking] == sorted(s for _, s in ranking)
    assert not any(c in scores for gid in pruned for c in resnet.graph.groups[gid].channels)
    assert not any(c in scores for c in resnet.graph.unprunable)
    assert metrics.rank(["taylor"], resnet.net, resnet.graph, resnet.batches, set())["taylor"][:3] == \
        [gid for gid, _ in metrics.rank_groups("taylor", metrics.collect(resnet.net, resnet.graph, resnet.batches,
                                                                         ["taylor"]), resnet.graph)][:3]


# ---- 6. names --------------------------------------------------------------------------------------

def test_every_composition_is_listed_and_parses():
    names = metrics.list_metrics()
    assert len(names) == len(set(names)) == 8 * 5 * 7 + 7 * 5 * 7 == 525      # with the deployment scaling
    paper = metrics.list_metrics(paper=True)
    assert len(paper) == 8 * 5 * 6 + 7 * 5 * 6 == 450 and not any(n.endswith("macs_removed") for n in paper)
    assert set(names) - set(paper) == {n for n in names if n.endswith("/macs_removed")}
    assert all(str(metrics.parse(n)) == n for n in names)
    assert len(metrics.list_metrics(domino=True)) == 4 * 525
    for alias, composition in metrics.ALIASES.items():
        assert str(metrics.parse(alias)) == composition
        eq, printed = metrics.AS_PRINTED[alias]
        assert str(metrics.parse(eq)) == printed
    assert str(metrics.parse("domino-mean:taylor")) == "domino-mean:activation/taylor/l1/count"


@pytest.mark.parametrize("name, message", [
    ("weights/apoz/sum/count", "invalid pointwise for weights 'apoz' in 'weights/apoz/sum/count'; valid: x, g, "
                               "taylor, hess_sqgrad, hess_obd, taylor2_sqgrad, taylor2_obd"),
    ("activation/taylor/l3/none", "invalid reduction 'l3' in 'activation/taylor/l3/none'; valid: sum, l1, l2, "
                                  "abs_sum, sqr_sum"),
    ("activation/x/sum/layer", "invalid scaling 'layer' in 'activation/x/sum/layer'; valid: none, count, "
                               "active_count, l1_layer, l2_layer, weights_removed, macs_removed"),
    ("gradient/x/sum/none", "invalid input 'gradient' in 'gradient/x/sum/none'; valid: activation, weights"),
    ("domino-avg:taylor", "invalid Domino aggregation 'avg' in 'domino-avg:taylor'; valid: sum, mean, max"),
    ("fischer", "'fischer' is neither input/pointwise/reduction/scaling nor an alias; aliases: mean_activations, "
                "taylor, fisher, mean_gradients, mean_sq_weights, eq1, eq2, eq3, eq4, eq5"),
])
def test_invalid_names_fail_with_one_line(name, message):
    with pytest.raises(metrics.MetricError) as caught:
        metrics.parse(name)
    assert str(caught.value) == message and "\n" not in message


def test_uncollected_metric_and_bad_reading(caffe, write_net):
    case, _ = tiny_case(caffe, write_net)
    tensors = metrics.collect(case.net, case.graph, case.batches, ["taylor"])
    with pytest.raises(metrics.MetricError, match=r"activation/g/l1 on 'conv1' \(out\) was not collected"):
        metrics.saliency("mean_gradients", tensors, case.graph)
    with pytest.raises(metrics.MetricError, match="invalid reading 'post-relu'; valid: authors, conv-output"):
        metrics.collect(case.net, case.graph, case.batches, ["taylor"], "post-relu")


# ---- 7. the command ------------------------------------------------------------------------------

def test_saliency_command_writes_the_ranking(caffe, tmp_path, capsys):
    import argparse
    parser = argparse.ArgumentParser()
    metric_commands.register(parser.add_subparsers(dest="command"))
    out_csv, out_json = tmp_path / "s.csv", tmp_path / "s.json"
    args = parser.parse_args(["saliency", "LeNet-5", str(WEIGHTS["LeNet-5"]), "--metric", "taylor",
                              "--batches", "1", "--batch-size", "32", "--seed", "3",
                              "--data", str(SUBSET), "--csv", str(out_csv), "--json", str(out_json)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "taylor = activation/taylor/l1/count (authors reading) on 32 validation images, 70 channels" in printed
    rows = list(csv.DictReader(out_csv.open()))
    result = json.loads(out_json.read_text())
    assert len(rows) == 70 and [int(r["rank"]) for r in rows] == list(range(70))
    values = [float(r["saliency"]) for r in rows]
    assert values == sorted(values) and values[0] >= 0
    assert [g["group"] for g in result["groups"]][:3] == [int(r["group"]) for r in rows[:3]]
    # the same images by hand: validation indices of the training split, drawn with the seed
    images, labels = cifar10.read_split("train", SUBSET)
    chosen = np.random.default_rng(3).choice(validation.validation_indices(len(images)), size=32, replace=False)
    form = evaluation_form(networks.train_test("LeNet-5"), batch_size=32)
    transform = networks.transform("LeNet-5")
    net = pycaffe.load_net(netdef.write_prototxt(form, tmp_path / "l.prototxt"), WEIGHTS["LeNet-5"], probe=False)
    net.blobs["data"].data[...] = cifar10_convert.caffe_input(images[chosen], transform.mean_values, transform.scale)
    net.blobs["label"].data[...] = labels[chosen]
    net.forward()
    net.backward()
    a, g = net.blobs["conv2"].data.astype(np.float64), net.blobs["conv2"].diff.astype(np.float64) * 32
    want = np.abs(a * g).sum(axis=(0, 2, 3)) / (32 * 10 * 10)     # conv2 maps are 10x10
    by_channel = {(r["layer"], int(r["channel"])): float(r["saliency"]) for r in rows}
    for c in (0, 17, 49):
        assert by_channel[("conv2", c)] == pytest.approx(want[c], rel=1e-5)

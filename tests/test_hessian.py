"""OBD's back-propagated Hessian diagonal (caffe_prune.metrics.hessian), checked against second
differences of the loss where the diagonal rule is exact, against numpy references of each layer's
rule, and for leaving the net as it was."""
import time

import numpy as np
import pytest
from google.protobuf import text_format

from caffe_prune import netdef, networks, pycaffe
from caffe_prune.data import cifar10, cifar10_convert
from caffe_prune.metrics.hessian import hessian_diagonal
from caffe_prune.errors import InputError
from conftest import PUBLISHED, SUBSET, evaluation_form

CONV1 = """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
"""

# Input -> conv1 -> ReLU -> one linear layer -> EuclideanLoss: here OBD's diagonal is the exact
# Hessian diagonal w.r.t. conv1's (pre-ReLU) output, mask * (W∘W)ᵀ 1 / N.
EUCLID = """
name: "euclid"
force_backward: true
layer { name: "data" type: "Input" top: "data" top: "target"
  input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } shape { %(target)s } } }
""" + CONV1 + """
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
%(head)s
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "target" top: "loss" }
"""
HEADS = {
    "InnerProduct": ("dim: 2 dim: 5", """layer { name: "head" type: "InnerProduct" bottom: "conv1" top: "out"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.2 }
    bias_filler { type: "gaussian" std: 0.1 } } }"""),
    "Convolution": ("dim: 2 dim: 5 dim: 6 dim: 6",
                    """layer { name: "head" type: "Convolution" bottom: "conv1" top: "out"
  convolution_param { num_output: 5 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.2 }
    bias_filler { type: "gaussian" std: 0.1 } } }"""),
}

SOFTMAX_HEAD = """
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "%(logits)s" bottom: "label" top: "loss" %(loss)s }
layer { name: "top1" type: "Accuracy" bottom: "%(logits)s" bottom: "label" top: "top1" }
"""


def build(write_net, text, phase="test"):
    pycaffe.caffe().set_random_seed(0)   # the fillers draw from Caffe's generator: the same weights every run
    return pycaffe.load_net(write_net(text), probe=False, phase=phase)


def conv3x3(x, w, b):
    """Caffe's 3x3, pad 1, stride 1 convolution (a correlation) in float64."""
    n, _, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for i in range(h):
        for j in range(wd):
            out[:, :, i, j] = np.einsum("nckl,ockl->no", xp[:, :, i:i + 3, j:j + 3], w) + b
    return out


def conv3x3_adjoint(g, w):
    """The transpose of conv3x3 (without bias) applied to g: what Caffe's backward computes."""
    n, _, h, wd = g.shape
    out = np.zeros((n, w.shape[1], h + 2, wd + 2))
    for i in range(h):
        for j in range(wd):
            out[:, :, i:i + 3, j:j + 3] += np.einsum("no,ockl->nckl", g[:, :, i, j], w)
    return out[:, :, 1:-1, 1:-1]


def softmax_hessian(logits, labels=None, weight=1.0, ignore=None):
    """w p (1 - p) / n, n the number of counted samples (Caffe's VALID normalization)."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    valid = np.ones(len(z), bool) if ignore is None else labels != ignore
    return weight * p * (1 - p) * valid[:, None] / max(1, valid.sum())


def f64(blob):
    return blob.data.astype(np.float64)


# ---- 1. exact where OBD is exact: second differences of the loss --------------------------------

@pytest.mark.parametrize("head", sorted(HEADS))
def test_equals_second_differences_of_the_loss(caffe, write_net, head):
    target_shape, head_text = HEADS[head]
    net = build(write_net, EUCLID % dict(target=target_shape, head=head_text))
    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.normal(size=net.blobs["data"].data.shape)
    net.forward()   # a target near the output keeps the loss, and float32 rounding in it, small
    net.blobs["target"].data[...] = net.blobs["out"].data + 0.1 * rng.normal(size=net.blobs["out"].data.shape)
    loss = float(net.forward()["loss"])
    h = hessian_diagonal(net, ["conv1"])["conv1"]

    net.forward(end="conv1")
    pre = f64(net.blobs["conv1"])              # conv1's output before the in-place ReLU
    n = pre.shape[0]
    w, b = f64(net.params["head"][0]), f64(net.params["head"][1])
    target = f64(net.blobs["target"])

    def numpy_loss(a):
        act = np.maximum(a, 0)
        out = act.reshape(n, -1) @ w.T + b if head == "InnerProduct" else conv3x3(act, w, b)
        return 0.5 / n * ((out - target) ** 2).sum()

    def caffe_loss(a):
        net.blobs["conv1"].data[...] = a
        return float(net.forward(start="relu1")["loss"])

    assert numpy_loss(pre) == pytest.approx(loss, rel=1e-5)
    # The closed form, mask * (W∘W)ᵀ 1 / N, in numpy.
    ones = np.ones(net.blobs["out"].data.shape)
    if head == "InnerProduct":
        closed = (ones @ w ** 2).reshape(pre.shape)
    else:
        closed = conv3x3_adjoint(ones, w ** 2)
    closed *= (pre > 0) / n
    np.testing.assert_allclose(h, closed, rtol=1e-5, atol=1e-9)

    def positions(alive, dead, margin):
        flat = pre.ravel()
        return np.concatenate([rng.choice(np.flatnonzero(flat > margin), alive, replace=False),
                               rng.choice(np.flatnonzero(flat < -margin), dead, replace=False)])

    def second_difference(loss_of, where, step):
        bump = np.zeros_like(pre)
        bump[where] = step
        return (loss_of(pre + bump) - 2 * loss_of(pre) + loss_of(pre - bump)) / step ** 2

    errors = {"caffe": [], "float64": []}
    # Caffe's float32 forward: the loss is exactly quadratic while the ReLU keeps its state, so
    # a large step (0.5, at positions at least 0.6 from the kink) has no truncation error and
    # little rounding error. float64 numpy evaluation of the same net: step 1e-3, positions at
    # least 2e-3 from the kink.
    for which, loss_of, step, margin, alive in (("caffe", caffe_loss, 0.5, 0.6, 8),
                                                ("float64", numpy_loss, 1e-3, 2e-3, 16)):
        for index in positions(alive, 4, margin):
            where = np.unravel_index(index, pre.shape)
            fd = second_difference(loss_of, where, step)
            if pre[where] < 0:      # a dead unit: no curvature
                assert h[where] == 0 and abs(fd) < 1e-6
            else:
                errors[which].append(abs(h[where] - fd) / fd)
    print(f"\n{head}: max relative error vs Caffe float32 second differences "
          f"{max(errors['caffe']):.2e} ({len(errors['caffe'])} positions), vs float64 numpy "
          f"{max(errors['float64']):.2e} ({len(errors['float64'])} positions)")
    assert errors["caffe"] and errors["float64"]
    assert max(errors["caffe"]) < 1e-4
    assert max(errors["float64"]) < 1e-6


# ---- 2. SoftmaxWithLoss at the logits and one InnerProduct below ---------------------------------

SOFTMAX = """
name: "softmax"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 6 } shape { dim: 4 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 0.5 }
    bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
""" + SOFTMAX_HEAD


def fed(net, seed=0, labels=(1, 2, 3, 0)):
    rng = np.random.default_rng(seed)
    net.blobs["data"].data[...] = rng.normal(size=net.blobs["data"].data.shape)
    net.blobs["label"].data[...] = labels[:net.blobs["label"].data.shape[0]]
    return net


@pytest.mark.parametrize("loss, weight, ignore", [("", 1.0, None), ("loss_weight: 0.5", 0.5, None),
                                                  ("loss_param { ignore_label: 2 }", 1.0, 2)])
def test_softmax_logits_and_one_layer_below(caffe, write_net, loss, weight, ignore):
    net = fed(build(write_net, SOFTMAX % dict(logits="ip2", loss=loss)))
    net.forward()
    h = hessian_diagonal(net, ["ip2", "ip1"])
    labels = net.blobs["label"].data.astype(int)
    h_logits = softmax_hessian(net.blobs["ip2"].data, labels, weight, ignore)
    np.testing.assert_allclose(h["ip2"], h_logits, rtol=1e-5, atol=1e-12)
    below = (net.blobs["ip1"].data > 0) * (h_logits @ f64(net.params["ip2"][0]) ** 2)
    np.testing.assert_allclose(h["ip1"], below, rtol=1e-5, atol=1e-12)
    per_sample = hessian_diagonal(net, ["ip2"], per_sample=True)["ip2"]
    np.testing.assert_allclose(per_sample, 4 * h_logits, rtol=1e-5, atol=1e-12)


# ---- 3. pooling --------------------------------------------------------------------------------

POOLED = """
name: "pooled"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 2 } } }
""" + CONV1 + """
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool" type: "Pooling" bottom: "conv1" top: "pool" pooling_param { %(pool)s } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
""" + SOFTMAX_HEAD % dict(logits="ip", loss="")


def numpy_pool_hessian(x, h_top, method, kernel, stride, pad):
    """The rule, written out window by window: MAX sends h to the window's (first) maximum, AVE
    gives each cell of the window h / K², K = the window's size clipped to the padded map."""
    n, c, height, width = x.shape
    out = np.zeros(x.shape)
    for ph in range(h_top.shape[2]):
        for pw in range(h_top.shape[3]):
            hs, ws = ph * stride - pad, pw * stride - pad
            he, we = min(hs + kernel, height + pad), min(ws + kernel, width + pad)
            k = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, height), min(we, width)
            for i in range(n):
                for j in range(c):
                    if method == "MAX":
                        window = x[i, j, hs:he, ws:we]
                        a, b = np.unravel_index(np.argmax(window), window.shape)
                        out[i, j, hs + a, ws + b] += h_top[i, j, ph, pw]
                    else:
                        out[i, j, hs:he, ws:we] += h_top[i, j, ph, pw] / k ** 2
    return out


@pytest.mark.parametrize("pool, method, kernel, stride, pad", [
    ("pool: MAX kernel_size: 3 stride: 2", "MAX", 3, 2, 0),       # last window clipped
    ("pool: MAX kernel_size: 2 stride: 2", "MAX", 2, 2, 0),
    ("pool: AVE kernel_size: 3 stride: 2", "AVE", 3, 2, 0),       # last window K = 2 x 3
    ("pool: AVE kernel_size: 3 stride: 2 pad: 1", "AVE", 3, 2, 1),  # padded cells count in K
    ("pool: AVE global_pooling: true", "AVE", 8, 1, 0),
])
def test_pooling_rules(caffe, write_net, pool, method, kernel, stride, pad):
    net = fed(build(write_net, POOLED % dict(pool=pool)))
    net.forward()
    h = hessian_diagonal(net, ["conv1", "pool"])
    h_logits = softmax_hessian(net.blobs["ip"].data)
    h_pool = (h_logits @ f64(net.params["ip"][0]) ** 2).reshape(net.blobs["pool"].data.shape)
    np.testing.assert_allclose(h["pool"], h_pool, rtol=1e-5, atol=1e-12)
    post_relu = f64(net.blobs["conv1"])
    expected = (post_relu > 0) * numpy_pool_hessian(post_relu, h_pool, method, kernel, stride, pad)
    np.testing.assert_allclose(h["conv1"], expected, rtol=1e-5, atol=1e-12)
    assert (h["conv1"] > 0).sum() > 10


# ---- BatchNorm, Scale, leaky ReLU, Eltwise ------------------------------------------------------

BN_ELTWISE = """
name: "bn_eltwise"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } shape { dim: 2 } } }
""" + CONV1 + """
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { eps: 0.001 } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" relu_param { negative_slope: 0.1 } }
layer { name: "conv2" type: "Convolution" bottom: "data" top: "conv2"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "sum" type: "Eltwise" bottom: "conv1" bottom: "conv2" top: "sum" eltwise_param { %(eltwise)s } }
layer { name: "ip" type: "InnerProduct" bottom: "sum" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
""" + SOFTMAX_HEAD % dict(logits="ip", loss="")


def bn_net(write_net, eltwise, phase="test"):
    net = fed(build(write_net, BN_ELTWISE % dict(eltwise=eltwise), phase=phase), labels=(3, 1))
    scale_factor = 2.5   # Caffe stores running sums; mean = blob0 / s, var = blob1 / s
    net.params["bn1"][0].data[...] = scale_factor * np.array([0.3, -0.2, 0.1, 0.5])
    net.params["bn1"][1].data[...] = scale_factor * np.array([0.5, 2.0, 1.2, 0.8])
    net.params["bn1"][2].data[...] = scale_factor
    net.params["scale1"][0].data[...] = [1.5, -0.7, 0.3, 2.0]
    net.params["scale1"][1].data[...] = [0.1, 0.2, -0.3, 0.0]
    return net


@pytest.mark.parametrize("eltwise", ["operation: SUM coeff: 2 coeff: -0.5", "operation: PROD",
                                     "operation: MAX"])
def test_batchnorm_scale_leaky_relu_eltwise(caffe, write_net, eltwise):
    net = bn_net(write_net, eltwise)
    net.forward()
    h = hessian_diagonal(net, ["conv1", "conv2", "sum"])
    h_sum = (softmax_hessian(net.blobs["ip"].data) @ f64(net.params["ip"][0]) ** 2).reshape(h["sum"].shape)
    np.testing.assert_allclose(h["sum"], h_sum, rtol=1e-5, atol=1e-12)
    a, b = f64(net.blobs["conv1"]), f64(net.blobs["conv2"])   # conv1: after BN, Scale, leaky ReLU
    if "SUM" in eltwise:
        h_a, h_b = 4 * h_sum, 0.25 * h_sum
    elif "PROD" in eltwise:
        h_a, h_b = b ** 2 * h_sum, a ** 2 * h_sum
    else:   # Caffe's MAX keeps the first bottom only where it is strictly larger
        h_a, h_b = (a > b) * h_sum, (a <= b) * h_sum
    gamma = np.array([1.5, -0.7, 0.3, 2.0])[:, None, None]
    variance = (np.array([0.5, 2.0, 1.2, 0.8]) + 0.001)[:, None, None]
    relu = np.where(a > 0, 1.0, 0.1 ** 2)
    np.testing.assert_allclose(h["conv1"], relu * gamma ** 2 / variance * h_a, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(h["conv2"], h_b, rtol=1e-5, atol=1e-12)


# ---- 4. the net is left as it was ---------------------------------------------------------------

SHARED_WEIGHTS = """
name: "shared"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 6 } shape { dim: 4 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" param { name: "w" }
  inner_product_param { num_output: 6 bias_term: false weight_filler { type: "gaussian" std: 0.7 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" param { name: "w" }
  inner_product_param { num_output: 6 bias_term: false } }
layer { name: "ip3" type: "InnerProduct" bottom: "ip2" top: "ip3"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
""" + SOFTMAX_HEAD % dict(logits="ip3", loss="")


def snapshot(net):
    return ([b.data.copy() for bs in net.params.values() for b in bs],
            [b.diff.copy() for bs in net.params.values() for b in bs],
            [b.data.copy() for b in net.blobs.values()], [b.diff.copy() for b in net.blobs.values()])


def assert_unchanged(net, before):
    for old, new in zip(before, snapshot(net)):
        assert len(old) == len(new)
        for x, y in zip(old, new):
            np.testing.assert_array_equal(x, y)   # bit-exact (NaN-free here)


def test_shared_weights_and_the_net_left_as_it_was(caffe, write_net):
    net = fed(build(write_net, SHARED_WEIGHTS))
    loss = float(net.forward()["loss"])
    net.backward()          # real gradients in the diffs, which the pass must not disturb
    before = snapshot(net)
    h = hessian_diagonal(net, ["ip1", "ip2"])
    assert_unchanged(net, before)
    assert float(net.forward()["loss"]) == loss
    w, w3 = f64(net.params["ip1"][0]), f64(net.params["ip3"][0])
    assert net.params["ip2"][0].data.ctypes.data == net.params["ip1"][0].data.ctypes.data   # one blob
    h_ip2 = softmax_hessian(net.blobs["ip3"].data) @ w3 ** 2
    np.testing.assert_allclose(h["ip2"], h_ip2, rtol=1e-5, atol=1e-12)
    # squared once, not twice, although two layers hold the blob
    np.testing.assert_allclose(h["ip1"], (net.blobs["ip1"].data > 0) * (h_ip2 @ w ** 2), rtol=1e-5, atol=1e-12)


# ---- refusals ----------------------------------------------------------------------------------

def test_refuses_what_it_cannot_do(caffe, write_net):
    lrn = POOLED.replace('name: "pool" type: "Pooling"', 'name: "norm1" type: "LRN"') \
        .replace("pooling_param { %(pool)s }", "lrn_param { local_size: 3 }")
    net = fed(build(write_net, lrn))
    net.forward()
    with pytest.raises(InputError, match=r"layer 'norm1' \(LRN\): .*not diagonal"):
        hessian_diagonal(net, ["conv1"])
    train = bn_net(write_net, "operation: SUM", phase="train")
    train.forward()
    with pytest.raises(InputError, match=r"'bn1' \(BatchNorm\) .*TEST phase"):
        hessian_diagonal(train, ["conv1"])
    net = fed(build(write_net, SOFTMAX % dict(logits="ip2", loss="")))   # no force_backward
    net.forward()
    with pytest.raises(InputError, match=r"'data' is NaN: Caffe's backward does not reach it"):
        hessian_diagonal(net, ["data"])
    with pytest.raises(InputError, match=r"blob 'nope' is not in the net"):
        hessian_diagonal(net, ["nope"])
    with pytest.raises(InputError, match=r"blob 'top1' does not feed the loss layer 'loss'"):
        hessian_diagonal(net, ["top1"])


@pytest.mark.parametrize("name", networks.NETWORKS)
def test_six_networks(caffe, write_net, name):
    """Every layer of the paper's networks has a rule (filler weights), except AlexNet's LRN."""
    form = evaluation_form(networks.train_test(name), batch_size=2)
    net = fed(pycaffe.load_net(write_net(text_format.MessageToString(form), f"{name}.prototxt"), probe=False))
    for layer_name, layer in zip(net._layer_names, net.layers):
        if layer.type == "BatchNorm":   # no statistics yet: variance 1, scale factor 1
            net.params[layer_name][1].data[...] = 1
            net.params[layer_name][2].data[...] = 1
    net.forward()
    convs = [net.top_names[n][0] for n, layer in zip(net._layer_names, net.layers) if layer.type == "Convolution"]
    if name == "AlexNet":
        with pytest.raises(InputError, match=r"layer 'norm2' \(LRN\)"):
            hessian_diagonal(net, convs)
        return
    for blob, h in hessian_diagonal(net, convs).items():
        assert np.isfinite(h).all() and (h >= 0).all() and (h > 0).any(), blob


# ---- 5. the published ResNet-20 ----------------------------------------------------------------

@pytest.mark.slow
def test_published_resnet20(caffe, write_net):
    form = evaluation_form(networks.train_test("ResNet-20"), batch_size=8)
    transform = networks.transform("ResNet-20")
    net = pycaffe.load_net(write_net(text_format.MessageToString(form), "resnet20.prototxt"),
                          PUBLISHED / "ResNet-20-CIFAR10" / "original.caffemodel", probe=False)
    images, labels = cifar10.read_split("test", SUBSET)
    net.blobs["data"].data[...] = cifar10_convert.caffe_input(images[:8], transform.mean_values, transform.scale)
    net.blobs["label"].data[...] = labels[:8]
    loss = float(net.forward()[netdef.EVAL_TOPS["loss"]])
    before = snapshot(net)
    convs = [net.top_names[name][0] for name, layer in zip(net._layer_names, net.layers)
             if layer.type == "Convolution"]
    assert len(convs) == 21
    start = time.perf_counter()
    h = hessian_diagonal(net, convs + ["fc", "global_avg_pool"])
    seconds = time.perf_counter() - start
    assert_unchanged(net, before)
    assert float(net.forward()[netdef.EVAL_TOPS["loss"]]) == loss
    start = time.perf_counter()
    again = hessian_diagonal(net, convs)   # the layer definitions are cached on the net now
    print(f"\nResNet-20, batch 8, h for {len(convs)} conv tops: first call {seconds:.3f} s, "
          f"second {time.perf_counter() - start:.3f} s")
    for name in convs:
        np.testing.assert_array_equal(again[name], h[name])
        assert h[name].shape == net.blobs[name].data.shape
        assert np.isfinite(h[name]).all() and (h[name] >= 0).all(), name
        assert (h[name] > 0).mean() > 0.05, name
    # The last block by hand: fc, global average pooling (K = 64), the sum's ReLU, Scale, BatchNorm.
    h_fc = softmax_hessian(net.blobs["fc"].data)
    np.testing.assert_allclose(h["fc"], h_fc, rtol=1e-5, atol=1e-12)
    h_pool = (h_fc @ f64(net.params["fc"][0]) ** 2).reshape(8, 64, 1, 1)
    np.testing.assert_allclose(h["global_avg_pool"], h_pool, rtol=1e-5, atol=1e-12)
    h_sum = (net.blobs["group2_block2_sum"].data > 0) * h_pool / 64 ** 2
    mean, var, factor = (f64(blob) for blob in net.params["group2_block2_conv1_bn"])
    gamma = f64(net.params["group2_block2_conv1_scale"][0])
    expected = (gamma ** 2 / (var / factor + 1e-5))[:, None, None] * h_sum
    np.testing.assert_allclose(h["group2_block2_conv1"], expected, rtol=1e-4, atol=1e-14)

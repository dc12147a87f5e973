"""The fork layers of public models, rewritten as stock Caffe (caffe_prune.forks): each replacement
against a numpy reference of what the fork computes (ReLU6 and its gradient, depthwise convolution,
channel shuffle, Axpy, floor-mode pooling), the channel graph through them, their weights loaded
by name from a fork's caffemodel, masking equal to export across an SE block, a channel shuffle and
DPN's Slice of a convolution into a residual and a dense part, and the one-line refusals."""
import argparse
import warnings

import numpy as np
import pytest

from caffe_prune import export, forks, layers, masking, pycaffe
from caffe_prune.commands import options
from caffe_prune.errors import InputError
from caffe_prune.pruning import Config
from caffe_prune.session import Network


def prototxt(shape, body):
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'name: "t"\nlayer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}\n{body}'


def conv(name, bottom, n, kernel=1, extra="", top=None, type_="Convolution"):
    return (f'layer {{ name: "{name}" type: "{type_}" bottom: "{bottom}" top: "{top or name}" convolution_param {{ '
            f'num_output: {n} kernel_size: {kernel} {extra} }} }}\n')


def opened(write_net, text, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        network = Network.open(write_net(text), fork_layers=True, **kw)
    return network, [str(w.message) for w in caught]


def built(network, seed=0):
    """The structure form in Caffe, every parameter blob seeded normal (a bias too)."""
    net = pycaffe.net_from_param(network.structure())
    rng = np.random.default_rng(seed)
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = rng.normal(size=blob.data.shape)
    return net


def forward(net, x, blob):
    net.blobs["data"].reshape(*x.shape)
    net.reshape()
    net.blobs["data"].data[...] = x
    net.forward()
    return net.blobs[blob].data.copy()


def layer_types(param):
    return [layer.type for layer in param.layer]


# ---- ReLU6 ----

RELU6 = conv("conv", "data", 2, extra='bias_term: false weight_filler { type: "constant" value: 1 }') + \
    'layer { name: "relu" type: "ReLU6" bottom: "conv" top: "conv" }\n' + \
    'layer { name: "out" type: "Power" bottom: "conv" top: "out" }\n'


@pytest.mark.parametrize("clip", [True, False])
def test_relu6_and_its_gradient(caffe, write_net, clip):
    """min(max(x, 0), 6) bit for bit (Clip, or without it ReLU and -max(-x, -6)), and the gradient
    of an in-place ReLU6 through the out-of-place replacement: 1 inside (0, 6), 0 outside."""
    param, notes = forks.rewrite(pycaffe.read_prototxt(write_net(prototxt((1, 1, 1, 9), RELU6))), clip=clip)
    assert ("Clip" in layer_types(param)) == clip and "ReLU6" not in layer_types(param)
    assert notes and "ReLU6 as" in notes[0]
    relu = next(layer for layer in param.layer if layer.name == "relu")
    assert list(relu.bottom) == ["relu/input"] and list(relu.top if clip else param.layer[-2].top) == ["conv"]
    param.force_backward = True
    net = pycaffe.net_from_param(param)
    x = np.array([-7, -1e-8, 0, 1e-8, 2.5, 6 - 1e-6, 6, 6 + 1e-6, 1e6], np.float32)
    net.params["conv"][0].data[...] = [[[[1.0]]], [[[-1.0]]]]
    x_both = np.concatenate([x, -x])          # the second filter negates
    out = forward(net, x.reshape(1, 1, 1, 9), "conv").ravel()
    np.testing.assert_array_equal(out, np.minimum(np.maximum(x_both, 0), 6).astype(np.float32))
    net.blobs["out"].diff[...] = 1
    net.backward()
    inside = (x_both > 0) & (x_both < 6)
    grad = net.blobs["relu/input"].diff.ravel()
    np.testing.assert_array_equal(grad[inside], 1)
    np.testing.assert_array_equal(grad[(x_both < 0) | (x_both > 6)], 0)


def test_clip_in_place_passes_every_gradient(caffe, write_net):
    """Why the registry refuses Clip in place and the rewrite writes it out of place: Caffe's Clip
    backward tests its bottom, which in place is the clipped output, always inside [0, 6]."""
    grads = {}
    for top in ("clipped", "conv"):               # out of place, then in place (param: the last)
        text = prototxt((1, 1, 1, 4), conv("conv", "data", 1, extra="bias_term: false") +
                        f'layer {{ name: "c" type: "Clip" bottom: "conv" top: "{top}" clip_param {{ min: 0 max: 6 }} }}\n')
        param = pycaffe.read_prototxt(write_net(text))
        param.force_backward = True
        net = pycaffe.caffe().Net(str(write_net(str(param), f"{top}.prototxt")), pycaffe.caffe().TEST)
        net.params["conv"][0].data[...] = 1
        forward(net, np.array([-2, 3, 8, -5], np.float32).reshape(1, 1, 1, 4), top)
        net.blobs[top].diff[...] = 1
        clip = list(net._layer_names).index("c")
        net._backward(clip, clip)                  # Clip's backward alone
        grads[top] = net.blobs["conv"].diff.ravel().copy()
    np.testing.assert_array_equal(grads["clipped"], [0, 1, 0, 0])
    np.testing.assert_array_equal(grads["conv"], [1, 1, 1, 1])     # in place: every gradient passes
    assert not layers.rule("Clip").in_place
    with pytest.raises(InputError, match="in place"):
        pycaffe.check_net(param, None, "n")


# ---- depthwise convolution ----

def numpy_depthwise(x, w, b, stride, pad, dilation):
    """out[n, o] = sum_pq w[o, 0, p, q] x[n, o // M, i s + p d - pad, j s + q d - pad] + b[o], M = O / C."""
    n, c, h, width = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (h + 2 * pad - dilation * (kh - 1) - 1) // stride + 1
    ow = (width + 2 * pad - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, o, oh, ow))
    for k in range(o):
        for p in range(kh):
            for q in range(kw):
                rows = slice(p * dilation, p * dilation + stride * (oh - 1) + 1, stride)
                cols = slice(q * dilation, q * dilation + stride * (ow - 1) + 1, stride)
                out[:, k] += w[k, 0, p, q] * xp[:, k // (o // c), rows, cols]
    return out + b[None, :, None, None]


@pytest.mark.parametrize("fork_type, outputs", [("ConvolutionDepthwise", 4), ("DepthwiseConvolution", 8)])
def test_depthwise_is_grouped_convolution(caffe, write_net, fork_type, outputs):
    """Convolution with group = the input channels (4, whatever the prototxt's group), the forks'
    (C·M, 1, kh, kw) weights, output o reading input o // M: a numpy depthwise convolution."""
    text = prototxt((2, 4, 9, 9), conv("c0", "data", 4) +
                    conv("dw", "c0", outputs, 3, "stride: 2 pad: 1 dilation: 2 group: 1", type_=fork_type))
    network, notes = opened(write_net, text)
    dw = network.param.layer[-1]
    assert (dw.type, dw.name, dw.convolution_param.group) == ("Convolution", "dw", 4)
    assert any(fork_type in note for note in notes)
    net = built(network)
    assert net.params["dw"][0].data.shape == (outputs, 1, 3, 3)
    x = np.random.default_rng(1).normal(size=(2, 4, 9, 9)).astype(np.float32)
    out = forward(net, x, "dw")
    want = numpy_depthwise(net.blobs["c0"].data, net.params["dw"][0].data, net.params["dw"][1].data, 2, 1, 2)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert network.graph.producers["dw"].depthwise


# ---- ShuffleChannel ----

SHUFFLE = conv("c0", "data", 6) + \
    'layer { name: "shuffle" type: "ShuffleChannel" bottom: "c0" top: "shuffle" shuffle_channel_param { group: 3 } }\n' + \
    conv("c1", "shuffle", 5) + \
    'layer { name: "pool" type: "Pooling" bottom: "c1" top: "pool" pooling_param { pool: AVE global_pooling: true } }\n' + \
    'layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 3 } }\n'


def test_shuffle_channel_is_the_permutation(caffe, write_net):
    """A Slice into single channels and a Concat in shuffled order: exactly numpy's reshape (N, g,
    C/g, H, W), transpose (0, 2, 1, 3, 4); the graph follows it (c1's input j is c0's channel
    perm[j]) and its groups stay one channel each."""
    network, notes = opened(write_net, prototxt((2, 3, 5, 5), SHUFFLE))
    assert layer_types(network.param).count("Slice") == 1 and "ShuffleChannel" not in layer_types(network.param)
    assert any("ShuffleChannel as" in note for note in notes)
    net = built(network)
    x = np.random.default_rng(2).normal(size=(2, 3, 5, 5)).astype(np.float32)
    shuffled = forward(net, x, "shuffle")
    c0 = net.blobs["c0"].data
    np.testing.assert_array_equal(shuffled, c0.reshape(2, 3, 2, 5, 5).transpose(0, 2, 1, 3, 4).reshape(2, 6, 5, 5))
    perm = np.arange(6).reshape(3, 2).T.ravel()
    g = network.graph
    for j in range(6):
        group = g.group_of("c0", int(perm[j]))
        assert [(s.layer, s.input_channel) for s in group.consumers] == [("c1", j)]


# ---- Axpy and the SE block ----

SE = conv("c1", "data", 8, 3, "pad: 1") + \
    'layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }\n' + \
    conv("c2", "c1", 8, 3, "pad: 1") + \
    'layer { name: "squeeze" type: "Pooling" bottom: "c2" top: "squeeze" pooling_param { pool: AVE global_pooling: true } }\n' + \
    conv("down", "squeeze", 2) + \
    'layer { name: "rd" type: "ReLU" bottom: "down" top: "down" }\n' + \
    conv("up", "down", 8) + \
    'layer { name: "gate" type: "Sigmoid" bottom: "up" top: "up" }\n' + \
    'layer { name: "axpy" type: "Axpy" bottom: "up" bottom: "c2" bottom: "c1" top: "sum" }\n' + \
    'layer { name: "r2" type: "ReLU" bottom: "sum" top: "sum" }\n' + \
    conv("c3", "sum", 4, 3) + \
    'layer { name: "pool" type: "Pooling" bottom: "c3" top: "pool" pooling_param { pool: AVE global_pooling: true } }\n' + \
    'layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 3 } }\n'


def test_axpy_is_a_times_x_plus_y_and_ties_the_gate(caffe, write_net):
    """Flatten, a two-bottom Scale on axis 0 and Eltwise SUM: a*x + y as numpy computes it in
    float32; the two-bottom Scale ties channel c of x (c2) with channel c of the gate's producer
    (up), and the sum with y (c1): 8 groups of three channels; down's and c3's of one."""
    network, _ = opened(write_net, prototxt((2, 3, 6, 6), SE))
    assert [layer.name for layer in network.param.layer if layer.name.startswith("axpy")] == \
        ["axpy/flat", "axpy/scale", "axpy"]
    net = built(network)
    out = forward(net, np.random.default_rng(3).normal(size=(2, 3, 6, 6)).astype(np.float32), "sum")
    a, x, y = (net.blobs[b].data for b in ("up", "c2", "c1"))
    pre = a[:, :, :1, :1] * x + y          # before r2's in-place ReLU
    np.testing.assert_allclose(out, np.maximum(pre, 0), rtol=1e-6, atol=1e-7)
    groups = network.graph.groups
    assert sorted(tuple(sorted((u.layer, u.index) for u in g.channels)) for g in groups if len(g.channels) == 3) == \
        [tuple(sorted([("c1", c), ("c2", c), ("up", c)])) for c in range(8)]
    assert len(groups) == 8 + 2 + 4 and not network.graph.barriers          # and c3's 4
    assert "second bottom" in layers.rule("Scale").hessian_check(network.param.layer[-6], 2)


def compare_export(network, pruned, shape, seed=0):
    """The masked full-width net and export's compact net on the same seeded inputs: their largest
    relative deviation over the net's outputs, and the compact definition."""
    net = built(network, seed)
    masker = masking.Masker(network.graph, [net])
    for gid in sorted(pruned):
        masker.commit(gid)
    compact_param, _, small = export.compact_net(network.param, network.graph, pruned, net, shape[1:], "t")
    x = np.random.default_rng(seed + 1).normal(size=shape).astype(np.float32)
    full, narrow = forward(net, x, "ip"), forward(small, x, "ip")
    assert not np.allclose(full, 0)
    return np.abs(full - narrow).max() / np.abs(full).max(), compact_param


def test_export_across_an_se_block_equals_the_masked_net(caffe, write_net):
    network, _ = opened(write_net, prototxt((2, 3, 6, 6), SE))
    g = network.graph
    pruned = {g.group_of("c1", 0).id, g.group_of("c1", 5).id, g.group_of("down", 1).id}
    deviation, compact = compare_export(network, pruned, (2, 3, 6, 6))
    assert deviation < 1e-5
    widths = {layer.name: layer.convolution_param.num_output for layer in compact.layer if layer.type == "Convolution"}
    assert widths == {"c1": 6, "c2": 6, "down": 1, "up": 6, "c3": 4}


def test_export_across_a_channel_shuffle_equals_the_masked_net(caffe, write_net):
    """Pruned channels empty their single-channel Slice tops: the tops leave the Slice and the Concat."""
    network, _ = opened(write_net, prototxt((2, 3, 5, 5), SHUFFLE))
    g = network.graph
    pruned = {g.group_of("c0", 1).id, g.group_of("c0", 4).id}
    deviation, compact = compare_export(network, pruned, (2, 3, 5, 5))
    assert deviation < 1e-5
    split = next(layer for layer in compact.layer if layer.type == "Slice")
    assert len(split.top) == 4 and list(split.slice_param.slice_point) == [1, 2, 3]


DPN = conv("c0", "data", 8, 3, "pad: 1") + \
    'layer { name: "r0" type: "ReLU" bottom: "c0" top: "c0" }\n' + \
    conv("dense0", "c0", 4) + \
    conv("c1", "c0", 12, 3, "pad: 1") + \
    'layer { name: "split" type: "Slice" bottom: "c1" top: "res" top: "dense1" slice_param { slice_point: 8 } }\n' + \
    'layer { name: "sum" type: "Eltwise" bottom: "c0" bottom: "res" top: "sum" }\n' + \
    'layer { name: "cat" type: "Concat" bottom: "dense0" bottom: "dense1" top: "cat" }\n' + \
    'layer { name: "join" type: "Concat" bottom: "sum" bottom: "cat" top: "join" }\n' + \
    conv("c2", "join", 4, 3) + \
    'layer { name: "pool" type: "Pooling" bottom: "c2" top: "pool" pooling_param { pool: MAX global_pooling: true } }\n' + \
    'layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 3 } }\n'


def test_dpn_slice_points_follow_the_pruned_channels(caffe, write_net):
    """DPN's pattern: c1 is cut at 8 into a residual part (added to c0) and a dense part (concatenated
    with dense0). Pruning channels on both sides of the cut moves the slice point (8 -> 6): the old
    point made Caffe refuse a negative top; the export equals the masked net."""
    network = Network.open(write_net(prototxt((2, 3, 6, 6), DPN)))
    g = network.graph
    pruned = {g.group_of("c1", 2).id, g.group_of("c1", 5).id, g.group_of("c1", 9).id, g.group_of("dense0", 0).id}
    assert {u.layer for u in g.group_of("c1", 2).channels} == {"c0", "c1"}
    deviation, compact = compare_export(network, pruned, (2, 3, 6, 6))
    assert deviation < 1e-5
    split = next(layer for layer in compact.layer if layer.name == "split")
    assert list(split.slice_param.slice_point) == [6]
    for seed in range(3):   # seeded random states, as `export --random-fraction 0.3` draws them
        deviation, _ = compare_export(network, g.random_state(0.3, seed), (2, 3, 6, 6), seed)
        assert deviation < 1e-5


# ---- Pooling ceil_mode: false ----

def numpy_floor_pool(x, k, s, p, average):
    """Floor-mode pooling as the forks' Caffe computes it: windows start at i*s - p, the average
    divides by the window clipped to the padded input, the max reads the unpadded input."""
    n, c, h, w = x.shape
    out_h, out_w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    out = np.zeros((n, c, out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            h0, w0 = i * s - p, j * s - p
            h1, w1 = min(h0 + k, h + p), min(w0 + k, w + p)
            size = (h1 - h0) * (w1 - w0)
            window = x[:, :, max(h0, 0):min(h1, h), max(w0, 0):min(w1, w)].astype(np.float64)
            out[:, :, i, j] = window.sum(axis=(2, 3)) / size if average else window.max(axis=(2, 3))
    return out


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("h, k, s, p", [(8, 3, 2, 0), (9, 3, 2, 1), (10, 2, 3, 1), (7, 3, 3, 2), (6, 2, 2, 0)])
def test_floor_pooling(caffe, write_net, pool, h, k, s, p):
    """ceil_mode: false by round_mode: FLOOR and, for builds without it, by the ceil-mode pooling
    cropped to the floor size: both equal a numpy floor pooling, and each other bit for bit."""
    body = (f'layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param {{ pool: {pool} '
            f'kernel_size: {k} stride: {s} pad: {p} ceil_mode: false }} }}\n')
    param = forks.read_prototxt(write_net(prototxt((2, 3, h, h + 1), body)))
    x = np.random.default_rng(h).normal(size=(2, 3, h, h + 1)).astype(np.float32)
    outs = []
    for round_mode in (True, False):
        stock, notes = forks.rewrite(param, round_mode=round_mode)
        assert ("Crop" in layer_types(stock)) != round_mode and "ceil_mode" in notes[0]
        outs.append(forward(pycaffe.net_from_param(stock), x, "pool"))
    want = numpy_floor_pool(x, k, s, p, pool == "AVE")
    assert outs[0].shape == want.shape
    np.testing.assert_allclose(outs[0], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_ceil_mode_true_is_dropped(caffe, write_net):
    body = 'layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { kernel_size: 3 stride: 2 ceil_mode: true } }\n'
    stock, notes = forks.rewrite(forks.read_prototxt(write_net(prototxt((1, 1, 8, 8), body))))
    assert not stock.layer[1].pooling_param.HasField("round_mode") and "dropped" in notes[0]


# ---- weights, refusals, options ----

def test_a_forks_caffemodel_loads_by_name(caffe, write_net, tmp_path):
    """Caffe copies trained layers by name and blob shapes: a caffemodel saved from the rewritten net,
    and the same bytes with the fork's layer types and shuffle_channel_param (a NetParameter of the
    forks' schema), load into the rewritten net with every parameter equal."""
    text = prototxt((1, 3, 5, 5), conv("c0", "data", 6) + conv("dw", "c0", 6, 3, "pad: 1", type_="ConvolutionDepthwise") +
                    SHUFFLE.split("\n", 1)[1].replace('bottom: "c0"', 'bottom: "dw"', 1))
    network, _ = opened(write_net, text)
    net = built(network)
    saved = tmp_path / "stock.caffemodel"
    net.save(str(saved))
    fork = forks.schema()()
    fork.ParseFromString(saved.read_bytes())
    for layer in fork.layer:
        if layer.name == "dw":
            layer.type = "ConvolutionDepthwise"
    fork.layer.add(name="shuffle", type="ShuffleChannel").shuffle_channel_param.group = 3
    forked = tmp_path / "fork.caffemodel"
    forked.write_bytes(fork.SerializeToString())
    for weights in (saved, forked):
        loaded = pycaffe.net_from_param(network.structure(), weights)
        for name, blobs in net.params.items():
            for a, b in zip(blobs, loaded.params[name], strict=True):
                np.testing.assert_array_equal(a.data, b.data)


def test_without_the_flag_each_fork_layer_is_refused_naming_it(caffe, write_net):
    for body, match in ((RELU6, "'ReLU6'.*--fork-layers"), (SHUFFLE, "shuffle_channel_param.*--fork-layers"),
                        (SE, "'Axpy'.*--fork-layers"),
                        (conv("dw", "data", 3, type_="DepthwiseConvolution"), "--fork-layers")):
        with pytest.raises(InputError, match=match):
            Network.open(write_net(prototxt((1, 3, 6, 6), body)))
    ceil = 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { kernel_size: 2 ceil_mode: false } }'
    with pytest.raises(InputError, match="ceil_mode.*--fork-layers"):
        Network.open(write_net(prototxt((1, 3, 6, 6), ceil)))
    assert set(forks.TYPES) <= set(pycaffe.FORK_TYPES)
    assert all("--fork-layers" in pycaffe.FORK_TYPES[t] for t in forks.TYPES)
    assert all("--fork-layers" in pycaffe.FORK_FIELDS[f] for f in forks.FIELDS)


def test_bad_fork_layers_are_one_line(caffe, write_net):
    odd = SHUFFLE.replace("group: 3", "group: 4")
    with pytest.raises(InputError, match="6 input channels do not make 4 groups"):
        opened(write_net, prototxt((1, 3, 5, 5), odd))
    with pytest.raises(InputError, match="num_output 6 for 4 input channels"):
        opened(write_net, prototxt((1, 4, 5, 5), conv("dw", "data", 6, 3, type_="ConvolutionDepthwise")))
    stock = pycaffe.caffe_pb2().NetParameter()
    stock.layer.add(name="s", type="ShuffleChannel", bottom=["x"], top=["y"])
    with pytest.raises(InputError, match="give the prototxt"):
        forks.rewrite(stock)


def test_the_option_reaches_the_network_and_a_run_records_it(caffe, write_net):
    parser = argparse.ArgumentParser()
    options.add_network(parser, weights=False)
    args = parser.parse_args([str(write_net(prototxt((1, 3, 6, 6), RELU6))), "--fork-layers"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        network = options.network(args)
    assert "Clip" in layer_types(network.param)
    assert any("--fork-layers rewrote 1 ReLU6 as Clip (min 0, max 6) (relu)" in str(w.message) for w in caught)
    assert Config.neutral()["fork_layers"] is False           # a later field: old sweep ids are kept
    assert Config(net="n", weights="w", metric="taylor", fork_layers=True).fork_layers

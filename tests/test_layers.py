"""The layer registry's rules: the types added as one entry each (Deconvolution, a consumer and
producer with transposed weights; Reduction and MVN, per-channel passes unless parameterised to mix
channels) counted by hand in the graph, their slices and MACs, their masks equal to the compact
export computed by Caffe, and a Deconvolution's per-sample weight gradients summing to Caffe's own."""
import numpy as np
import pytest
from google.protobuf import text_format

from caffe_prune import export, layers, masking, pycaffe
from caffe_prune.graph import Channel, ChannelGraph, group_slices
from caffe_prune.metrics import inputs
from conftest import REPO

DATA = 'name: "t"\nlayer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }\n'
FILL = 'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 }'


def conv(name, bottom, n, extra="kernel_size: 3 pad: 1", kind="Convolution"):
    return f'layer {{ name: "{name}" type: "{kind}" bottom: "{bottom}" top: "{name}" ' \
           f'convolution_param {{ num_output: {n} {extra} {FILL} }} }}\n'


def layer(name, kind, bottom, top=None, extra=""):
    return f'layer {{ name: "{name}" type: "{kind}" bottom: "{bottom}" top: "{top or name}" {extra} }}\n'


def tail(bottom):
    return (layer("pool", "Pooling", bottom, extra="pooling_param { pool: AVE global_pooling: true }")
            + layer("ip", "InnerProduct", "pool", extra=f"inner_product_param {{ num_output: 3 {FILL} }}"))


def deconv_net(group=1, num_output=6):
    return (DATA + conv("a", "data", 4) + layer("relu", "ReLU", "a", "a")
            + conv("d", "a", num_output, f"kernel_size: 2 stride: 2 group: {group}", kind="Deconvolution")
            + conv("b", "d", 5) + tail("b"))


def reduction_net(mvn="", reduction="axis: 2 operation: MEAN"):
    return (DATA + conv("a", "data", 4) + layer("mvn", "MVN", "a", "m", f"mvn_param {{ {mvn} }}")
            + conv("b", "m", 6) + layer("red", "Reduction", "b", "r", f"reduction_param {{ {reduction} }}")
            + layer("ip", "InnerProduct", "r", extra=f"inner_product_param {{ num_output: 3 {FILL} }}"))


def built(text):
    """(NetParameter, caffe.Net with seeded random weights, graph with Caffe's shapes)."""
    param = text_format.Parse(text, pycaffe.caffe_pb2().NetParameter())
    net = pycaffe.net_from_param(param)
    rng = np.random.default_rng(0)
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = rng.normal(0, 0.3, blob.data.shape)
    return param, net, ChannelGraph.of_net(param, net)


def units(name, indices):
    return tuple(Channel(name, i) for i in indices)


def run(net, x):
    net.blobs["data"].data[...] = x
    net.forward()
    return net.blobs["ip"].data.copy()


def assert_export_equals_masks(param, net, g, pruned):
    """The compact net Caffe builds from the export computes what the masked full-width net does."""
    x = np.random.default_rng(1).normal(size=net.blobs["data"].data.shape).astype(np.float32)
    masker = masking.Masker(g, [net])
    for gid in sorted(pruned):
        masker.commit(gid)
    _, weights, small = export.compact_net(param, g, pruned, net, (3, 8, 8), "test", probe=False)
    small.blobs["data"].reshape(*x.shape)
    small.reshape()
    masked, compact = run(net, x), run(small, x)
    np.testing.assert_allclose(compact, masked, rtol=1e-5, atol=1e-5 * np.abs(masked).max())
    assert not np.allclose(masked, run(pycaffe.net_from_param(param), x))   # the masks did change it
    return weights


def test_deconvolution_groups_weights_and_macs_by_hand(caffe):
    """conv a (4) -> Deconvolution d (6, kernel 2, stride 2: weights 4 x 6 x 2 x 2) -> conv b (5) ->
    global pooling -> ip (3). a:0 takes its filter (3*9) and d's input row 0 (6*2*2); d:0 takes
    its column 0 (4*2*2) and b's input slices (5*9). MACs: a 108 x 64 positions, d 96 x its 64
    input positions, b 270 x 256, ip 15."""
    _, net, g = built(deconv_net())
    assert len(g.groups) == 4 + 6 + 5 and not g.barriers
    assert net.params["d"][0].data.shape == (4, 6, 2, 2)
    assert g.conv_weights(set()) == 108 + 96 + 270
    a0, d0, b0 = g.group_of("a", 0).id, g.group_of("d", 0).id, g.group_of("b", 0).id
    assert g.weights_removed(a0, set()) == 27 + 24 and g.weights_removed(d0, set()) == 16 + 45
    assert g.weights_removed(b0, set()) == 54 and g.fc_weights_removed(b0, set()) == 3
    full = 108 * 64 + 96 * 64 + 270 * 256 + 15
    assert g.costs(set()).macs == full and g.layer_macs() == {"a": 108 * 64, "d": 96 * 64, "b": 270 * 256, "ip": 15}
    assert g.saved(d0, set()).macs == 16 * 64 + 45 * 256
    assert g.costs({d0}).macs == full - (16 * 64 + 45 * 256)
    # the slices the rule states: d's column 0 (axis 1), its bias entry, b's input column 0
    assert {(s.layer, s.blob, s.axis, s.start, s.stop) for s in group_slices(g, d0)} == {
        ("d", 0, 1, 0, 1), ("d", 1, 0, 0, 1), ("b", 0, 1, 0, 1)}
    assert {(s.layer, s.axis, s.start) for s in group_slices(g, a0) if s.layer == "d"} == {("d", 0, 0)}
    # params: every blob, biases included, as the compact net holds them
    assert g.costs(set()).params == sum(b.data.size for blobs in net.params.values() for b in blobs)
    assert g.saved(d0, set()).params == 16 + 1 + 45


def test_grouped_and_depthwise_deconvolution_ties(caffe):
    """Two groups (weights 4 x 3 x 2 x 2): inputs i and i+2 share a group's row position and fall
    together, as do outputs o and o+3 (each group keeps the same width); depthwise (group 4, two
    outputs per input): input c falls with its own group's outputs, as a depthwise convolution."""
    _, _, g = built(deconv_net(group=2))
    assert len(g.groups) == 2 + 3 + 5
    assert g.group_of("a", 0).channels == units("a", (0, 2))
    assert g.group_of("d", 0).channels == units("d", (0, 3))
    assert g.weights_removed(g.group_of("a", 0).id, set()) == 2 * 27 + 2 * 3 * 4
    assert g.weights_removed(g.group_of("d", 0).id, set()) == 4 * 1 * 4 + 2 * 45
    _, _, dw = built(deconv_net(group=4, num_output=8))
    assert len(dw.groups) == 4 + 5
    assert dw.group_of("a", 1).channels == units("a", (1,)) + units("d", (2, 3))
    assert dw.weights_removed(dw.group_of("a", 1).id, set()) == 27 + 2 * 4 + 2 * 45


@pytest.mark.parametrize("group,num_output", [(1, 6), (2, 6), (4, 8)])
def test_deconvolution_masks_equal_its_compact_export(caffe, group, num_output):
    param, net, g = built(deconv_net(group, num_output))
    pruned = g.chosen([g.groups[i].id for i in (0, len(g.groups) // 2, len(g.groups) - 2)])
    weights = assert_export_equals_masks(param, net, g, pruned)
    d = g.producers["d"]
    kept = weights["d"][0].shape
    assert kept[0] == d.in_channels - sum(1 for gid in pruned for c in g.groups[gid].channels if c.layer == "a")


def test_reduction_and_mvn_pass_channels_and_export_exactly(caffe):
    """MVN (per channel: a zero map stays zero) and Reduction from axis 2 (each channel to one
    value, as global pooling) pass channels; the InnerProduct after the Reduction reads one
    column per channel."""
    param, net, g = built(reduction_net())
    assert len(g.groups) == 4 + 6 and not g.barriers
    assert g.fc["ip"].block == 1 and g.fc["ip"].in_channels == 6
    b0 = g.group_of("b", 0).id
    assert g.weights_removed(b0, set()) == 4 * 9 and g.fc_weights_removed(b0, set()) == 3
    assert_export_equals_masks(param, net, g, g.chosen([g.group_of("a", 1).id, b0, g.group_of("b", 4).id]))


def test_reduction_over_channels_and_mvn_across_channels_are_barriers(caffe):
    text = (DATA + conv("a", "data", 4) + conv("b", "a", 6) + layer("red", "Reduction", "b", "r",
                                                                   "reduction_param { axis: 1 operation: SUM }")
            + 'layer { name: "sil" type: "Silence" bottom: "r" }\n' + tail("b"))
    _, _, over = built(text)
    assert "Reduction from axis 1 mixes the channels" in over.barriers["red"]
    assert set(over.unprunable) >= set(units("b", range(6)))
    _, _, across = built(reduction_net(mvn="across_channels: true"))
    assert "MVN across channels" in across.barriers["mvn"] and set(across.unprunable) >= set(units("a", range(4)))


def test_deconvolution_weight_gradients_sum_to_caffes(caffe):
    """Per-sample dL/dW' of the Deconvolution (the correlation of its top diff with its bottom, in
    its own (in, out/g, kh, kw) layout) sums over the samples to Caffe's accumulated weight diff;
    conv_layout puts output o's filter in row o."""
    text = deconv_net(group=2) + 'layer { name: "sq" type: "EuclideanLoss" bottom: "ip" bottom: "target" top: "l" }\n'
    text = text.replace('input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } }',
                        'top: "target" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 2 dim: 3 } }')
    param, net, g = built(text)
    rng = np.random.default_rng(2)
    net.blobs["data"].data[...] = rng.normal(size=(2, 3, 8, 8))
    net.blobs["target"].data[...] = rng.normal(size=(2, 3))
    net.forward()
    net.clear_param_diffs()
    net.backward()
    layer = next(l for l in param.layer if l.name == "d")
    per_sample = inputs.weight_gradients(g.producers["d"], inputs.conv_geometry(layer))(
        net.blobs["a"].data.astype(np.float64), net.blobs["d"].diff.astype(np.float64))
    caffe_diff = inputs.conv_layout(net.params["d"][0].diff.astype(np.float64)[None], g.producers["d"])[0]
    np.testing.assert_allclose(per_sample.sum(axis=0), caffe_diff, rtol=1e-4, atol=1e-6)
    w = net.params["d"][0].data       # output 4 (group 1, column 1): rows 2-3 of column 1
    assert per_sample.shape == (2, 6, 2, 2, 2)
    np.testing.assert_array_equal(inputs.conv_layout(w[None].astype(np.float64), g.producers["d"])[0, 4], w[2:4, 1])


def test_rules_answer_for_their_types():
    """What modules ask by type is answered here (one entry per type): data sources and readers,
    learned weights, heads' roles."""
    param = pycaffe.caffe_pb2().LayerParameter(name="x", type="ImageData")
    param.image_data_param.source, param.image_data_param.batch_size = "list.txt", 0
    assert layers.source(param) == "list.txt" and layers.reader(param) == "list"
    assert layers.rule("ImageData").check(param) == "batch_size 0 must be at least 1"
    assert layers.type_reading("db") == "Data" and layers.is_fed(pycaffe.caffe_pb2().LayerParameter(type="Input"))
    assert layers.LEARNED_TYPES == {"Convolution", "Deconvolution", "InnerProduct"}
    assert layers.role("Accuracy") == "accuracy" and layers.role("ReLU") is None
    assert layers.rule("Tile").kind == "barrier"


CUSTOM = REPO / "examples" / "custom_layer"
PYTHON_TAP = 'python_param { module: "identity_layer" layer: "Identity" }'


def python_tap_net():
    return (DATA + conv("a", "data", 4) + layer("tap", "Python", "a", "t", PYTHON_TAP)
            + layer("relu", "ReLU", "t", "t") + conv("b", "t", 5) + tail("b"))


def test_a_custom_layer_is_one_registered_rule(caffe, monkeypatch):
    """A user's Python layer (examples/custom_layer) is a barrier until its rule is registered (here
    through a plugin file's LAYER_RULES, as `--plugin examples/custom_layer/rules.py` does); then
    conv a is pruned across it, and the export equals the masked net in Caffe."""
    from caffe_prune.metrics import plugins
    monkeypatch.syspath_prepend(str(CUSTOM))                 # where Caffe imports the layer's module
    monkeypatch.setattr(layers.effects, "_python_layers_allowed", True)   # --allow-python-layers, for this test
    monkeypatch.setattr(layers, "RULES", dict(layers.RULES))   # the registration stays in this test
    param, net, g = built(python_tap_net())
    assert len(g.groups) == 5 and set(g.barriers) == {"tap"}
    assert "Python layer Python:identity_layer.Identity has no channel rule (caffe_prune.layers.register(" \
           "'Python:identity_layer.Identity', rule) gives it one)" in g.barriers["tap"]
    assert g.group_of("a", 0) is None and "reaches barrier 'tap'" in g.unprunable[Channel("a", 0)]
    assert plugins.load(CUSTOM / "rules.py") is None          # rules only: no metric
    assert layers.rule(param.layer[2]).kind == "pass" and layers.rule("Python").kind == "barrier"
    g = ChannelGraph.of_net(param, net)
    assert len(g.groups) == 4 + 5 and not g.barriers
    a1 = g.group_of("a", 1).id
    assert g.weights_removed(a1, set()) == 3 * 9 + 5 * 9      # its filter and conv b's input slice
    assert_export_equals_masks(param, net, g, g.chosen([a1, g.group_of("a", 3).id, g.group_of("b", 2).id]))


def test_register_refuses_what_is_not_a_rule(monkeypatch):
    monkeypatch.setattr(layers, "RULES", dict(layers.RULES))
    with pytest.raises(TypeError, match=r"register\('Foo', \.\.\.\) takes a caffe_prune.layers Rule, not dict"):
        layers.register("Foo", {"kind": "pass"})
    with pytest.raises(ValueError, match=r"a layer rule's kind is one of data, head, pass"):
        layers.Rule("passes")
    layers.register("Foo", layers.Pass())
    assert layers.rule("Foo").kind == "pass"

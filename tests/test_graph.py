"""The channel graph: group counts of the six networks reasoned out by hand, Θ_C weight counts worked
out by hand (papers/004 §3, §3.1 grouped convolution, §3.2 residual ties), barriers on tiny nets,
and the pruning-state counts against recounts from layer widths."""
import functools

import pytest
from google.protobuf import text_format

from caffe_prune import graph, networks, pycaffe
from caffe_prune.graph import Channel, ConsumerSlice, Rider
from caffe_prune.session import Network
from caffe_prune.errors import InputError
from conftest import conv_weight_count

# SqueezeNet's fire modules: (input channels, squeeze, expand) for fire2..fire9
FIRES = [(64, 16, 64), (128, 16, 64), (128, 32, 128), (256, 32, 128),
         (256, 48, 192), (384, 48, 192), (384, 64, 256), (512, 64, 256)]

GROUPS = {
    "LeNet-5": 20 + 50,
    "CIFAR10": 32 + 32 + 64,
    # three residual streams (first_conv + each block's conv1 + the projections tie 16, 32, 64
    # channels), plus every block's conv0 on its own
    "ResNet-20": 16 + 32 + 64 + 3 * 16 + 3 * 32 + 3 * 64,
    # every channel on its own, but cccp6's 10 reach the loss: they are the classes
    "NIN": 192 + 160 + 96 + 192 + 192 + 192 + 192 + 192,
    # conv2/4/5 read in 2 groups and conv2/4/5 produce in 2 groups: channel pairs (i, i + M/2)
    "AlexNet": 96 // 2 + 256 // 2 + 384 // 2 + 384 // 2 + 256 // 2,
    "SqueezeNet": 64 + sum(s + 2 * e for _, s, e in FIRES) + 1000,
}
# InnerProduct weights, from the spatial sizes Caffe computes for 32x32 inputs
FC_WEIGHTS = {
    "LeNet-5": 500 * 50 * 5 * 5 + 10 * 500,
    "CIFAR10": 64 * 64 * 4 * 4 + 10 * 64,
    "ResNet-20": 10 * 64,                                    # after global pooling: block 1
    "NIN": 0,
    "AlexNet": 4096 * 256 * 7 * 7 + 4096 * 4096 + 10 * 4096,
    "SqueezeNet": 10 * 1000,
}


@functools.lru_cache(maxsize=None)
def built(name):
    return Network.open(name).graph


@pytest.mark.parametrize("name", networks.NETWORKS)
def test_groups_and_weight_counts(caffe, name):
    net_param = networks.train_test(name)
    g = built(name)
    assert len(g.groups) == GROUPS[name]
    assert [group.id for group in g.groups] == list(range(len(g.groups)))
    assert g.conv_weights(set()) == conv_weight_count(net_param)
    assert g.fc_weights(set()) == FC_WEIGHTS[name]
    # every unit is in exactly one group, or unprunable
    units = [Channel(layer, i) for layer, info in g.producers.items() for i in range(info.num_output)]
    grouped = [c for group in g.groups for c in group.channels]
    assert len(grouped) == len(set(grouped))
    assert sorted(grouped + list(g.unprunable), key=str) == sorted(units, key=str)
    assert not g.barriers


def test_nin_classes_are_unprunable(caffe):
    g = built("NIN")
    assert set(g.unprunable) == {Channel("cccp6", i) for i in range(10)}
    # the structure form drops the loss (it reads labels): cccp6's channels reach the net's output
    assert all("net output 'pool3_flat'" in why for why in g.unprunable.values())
    assert g.group_of("cccp5", 7).consumers == (ConsumerSlice("cccp6", "conv", 7),)


def test_lenet5_weights_removed(caffe):
    g = built("LeNet-5")
    c1, c2 = g.group_of("conv1", 0).id, g.group_of("conv2", 0).id
    assert g.weights_removed(c1, set()) == 3 * 25 + 50 * 25     # filter + conv2's input slice
    assert g.fc_weights_removed(c1, set()) == 0
    assert g.weights_removed(c2, set()) == 20 * 25
    assert g.fc_weights_removed(c2, set()) == 500 * 25          # ip1's 5x5 block of pool2 channel 0
    assert g.weights_removed(c2, {c1}) == 19 * 25                # conv2's filter lost an input already
    assert g.fc["ip1"] == graph.FcInfo(500, 50, 25) and g.fc["ip2"] == graph.FcInfo(10, None, 500)
    assert g.producers["conv2"] == graph.ProducerInfo(50, 1, 25, 20, True)
    assert g.weights_removed(c1, {c1}) == 0


def test_resnet20_residual_ties(caffe):
    g = built("ResNet-20")
    stream0 = g.group_of("first_conv", 0)
    assert stream0.channels == (Channel("first_conv", 0), *(Channel(f"group0_block{b}_conv1", 0) for b in range(3)))
    assert set(stream0.consumers) == {ConsumerSlice(f"group0_block{b}_conv0", "conv", 0) for b in range(3)} | {
        ConsumerSlice("group1_block0_conv0", "conv", 0), ConsumerSlice("group1_block0_proj", "conv", 0)}
    assert len(stream0.riders) == 4 * 2 and Rider("first_conv_bn", "BatchNorm", 0) in stream0.riders
    assert stream0.layers == ("first_conv", "group0_block0_conv1", "group0_block1_conv1", "group0_block2_conv1")
    # filters: first_conv 3x3x3, three conv1 16x3x3; input slices: three conv0 (16 out, 3x3),
    # group1_block0_conv0 (32 out, 3x3) and the 1x1 projection (32 out)
    assert g.weights_removed(stream0.id, set()) == 27 + 3 * 16 * 9 + 3 * 16 * 9 + 32 * 9 + 32
    assert g.fc_weights_removed(stream0.id, set()) == 0

    stream2 = g.group_of("group2_block0_proj", 0)
    assert stream2.channels == (Channel("group2_block0_conv1", 0), Channel("group2_block0_proj", 0),
                                Channel("group2_block1_conv1", 0), Channel("group2_block2_conv1", 0))
    # filters: proj 32x1x1, three conv1 64x3x3; slices: group2_block1/2_conv0 (64 out, 3x3); fc 10 x 1
    assert g.weights_removed(stream2.id, set()) == 32 + 3 * 64 * 9 + 2 * 64 * 9
    assert g.fc_weights_removed(stream2.id, set()) == 10

    conv0 = g.group_of("group1_block1_conv0", 3)
    assert conv0.channels == (Channel("group1_block1_conv0", 3),)
    assert g.weights_removed(conv0.id, set()) == 32 * 9 + 32 * 9
    # transitively: with stream channel 0 gone, group0_block0_conv0's filter has 15 inputs and the
    # conv1 that reads its channel 0 has 15 outputs left
    first = g.group_of("group0_block0_conv0", 0).id
    assert g.weights_removed(first, {stream0.id}) == 15 * 9 + 15 * 9


def test_alexnet_grouped_convolution_ties(caffe):
    g = built("AlexNet")
    pair = g.group_of("conv1", 5)
    assert pair.channels == (Channel("conv1", 5), Channel("conv1", 53))          # (5 - 53) % 48 == 0
    assert pair.consumers == (ConsumerSlice("conv2", "conv", 5), ConsumerSlice("conv2", "conv", 53))
    assert g.weights_removed(pair.id, set()) == 2 * 3 * 9 + 256 * 1 * 25           # conv2: 48 -> 47 inputs per group
    assert g.group_of("conv2", 0).channels == (Channel("conv2", 0), Channel("conv2", 128))
    assert g.weights_removed(g.group_of("conv2", 0).id, set()) == 2 * 48 * 25 + 384 * 2 * 9
    # conv3 is not grouped, but conv4 reads it in 2 groups
    assert g.group_of("conv3", 1).channels == (Channel("conv3", 1), Channel("conv3", 193))
    assert g.weights_removed(g.group_of("conv3", 1).id, set()) == 2 * 256 * 9 + 384 * 1 * 9
    assert g.lrn_across["norm1"] == tuple(Channel("conv1", i) for i in range(96))
    assert len(g.lrn_across["norm2"]) == 256
    assert "conv1: 5, 53" in pair.details() and "conv2 (conv): 5, 53" in pair.details()


def test_squeezenet_concat_offsets(caffe):
    g = built("SqueezeNet")
    assert g.group_of("fire2/expand1x1", 5).consumers == (ConsumerSlice("fire3/squeeze1x1", "conv", 5),)
    assert g.group_of("fire2/expand3x3", 5).consumers == (ConsumerSlice("fire3/squeeze1x1", "conv", 64 + 5),)
    assert g.group_of("fire3/expand3x3", 0).consumers == (ConsumerSlice("fire4/squeeze1x1", "conv", 64),)  # via pool3
    assert g.group_of("fire9/expand3x3", 5).consumers == (ConsumerSlice("conv10", "conv", 256 + 5),)
    assert g.group_of("conv10", 7).consumers == (ConsumerSlice("ip", "fc", 7),)
    assert g.fc["ip"] == graph.FcInfo(10, 1000, 1)
    # expand3x3 channel: its 64x3x3 filter and one input column of fire3's squeeze (16 outputs)
    assert g.weights_removed(g.group_of("fire2/expand3x3", 5).id, set()) == 16 * 9 + 16


def test_prunable_keeps_the_last_channel(caffe):
    g = built("LeNet-5")
    conv1 = [g.group_of("conv1", i).id for i in range(20)]
    assert g.prunable(set()) == list(range(70))
    pruned = set(conv1[:-1])
    offered = g.prunable(pruned)
    assert conv1[-1] not in offered and len(offered) == 50
    assert g.active("conv1", pruned) == 1 and g.active("conv2", pruned) == 50

    r = built("ResNet-20")   # a tied set: the first residual stream, 4 layers
    stream0 = [r.group_of("first_conv", i).id for i in range(16)]
    pruned = set(stream0[:-1])
    assert stream0[-1] not in r.prunable(pruned) and stream0[-2] in r.prunable(set(stream0[:-2]))
    assert r.active("first_conv", pruned) == r.active("group0_block2_conv1", pruned) == 1

    a = built("AlexNet")     # a grouped producer: conv2 keeps one channel in each of its 2 groups
    conv2 = [a.group_of("conv2", i).id for i in range(128)]
    assert conv2[-1] not in a.prunable(set(conv2[:-1]))
    assert a.active("conv2", set(conv2[:-1])) == 2


def test_percent_conv_removed_matches_width_recount(caffe):
    g = built("CIFAR10")
    pruned = {g.group_of("conv1", i).id for i in range(4)} | {g.group_of("conv2", i).id for i in range(10)} \
        | {g.group_of("conv3", i).id for i in range(16)}
    widths = {"conv1": 32 - 4, "conv2": 32 - 10, "conv3": 64 - 16}
    left = widths["conv1"] * 3 * 25 + widths["conv2"] * widths["conv1"] * 25 + widths["conv3"] * widths["conv2"] * 25
    assert g.conv_weights(pruned) == left
    assert g.percent_conv_removed(pruned) == pytest.approx(100 * (1 - left / 79200))
    assert g.fc_weights(pruned) == 64 * widths["conv3"] * 16 + 10 * 64
    assert g.percent_conv_removed(set()) == 0


# ---- tiny nets: barriers, in-place layers, splits ------------------------------------------------

DATA = 'name: "tiny"\nlayer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n'


def conv(name, bottom, n, top=None):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top or name}" '
            f'convolution_param {{ num_output: {n} kernel_size: 3 pad: 1 }} }}\n')


def layer(name, kind, bottoms, tops, extra=""):
    b = " ".join(f'bottom: "{x}"' for x in bottoms)
    t = " ".join(f'top: "{x}"' for x in tops)
    return f'layer {{ name: "{name}" type: "{kind}" {b} {t} {extra} }}\n'


def caffe_graph(write_net, text):
    """The graph with shapes from the net Caffe builds."""
    path = write_net(text)
    net = pycaffe.load_net(path)
    shapes = {name: blob.data.shape for name, blob in net.blobs.items()}
    return graph.ChannelGraph.build(pycaffe.read_prototxt(path), shapes), shapes


def units(layer_name, n):
    return {Channel(layer_name, i) for i in range(n)}


def head(*bottoms):
    """One InnerProduct per bottom, so that no convolution's channels are the net's outputs
    (those are pinned: a net's outputs are what it computes)."""
    return "".join(layer(f"ip_{b}", "InnerProduct", [b], [f"ip_{b}"], "inner_product_param { num_output: 3 }")
                   for b in bottoms)


def test_unknown_layer_type_is_a_barrier(caffe, write_net):
    """Tile (not in caffe_prune.layers) repeats b's channels: the graph does not guess, b is pinned."""
    text = (DATA + conv("a", "data", 4) + conv("b", "a", 6)
            + layer("tile", "Tile", ["b"], ["t"], "tile_param { axis: 1 tiles: 2 }")
            + conv("c", "t", 2) + head("c"))
    g, _ = caffe_graph(write_net, text)
    assert list(g.barriers) == ["tile"] and "'Tile'" in g.barriers["tile"]
    assert set(g.unprunable) == units("b", 6)
    assert all("'tile'" in why for why in g.unprunable.values())
    assert {c for group in g.groups for c in group.channels} == units("a", 4) | units("c", 2)
    assert g.producers["c"].in_channels == 12
    assert g.conv_weights(set()) == 4 * 3 * 9 + 6 * 4 * 9 + 2 * 12 * 9
    assert g.weights_removed(g.group_of("a", 0).id, set()) == 3 * 9 + 6 * 9


def test_net_outputs_are_pinned(caffe, write_net):
    """A convolution whose channels leave the net (no head, no consumer) computes the outputs."""
    g, _ = caffe_graph(write_net, DATA + conv("a", "data", 4) + conv("b", "a", 5))
    assert set(g.unprunable) == units("b", 5) and "net output 'b'" in g.unprunable[Channel("b", 0)]
    assert len(g.groups) == 4


def test_slice_on_channels_offsets(caffe, write_net):
    text = (DATA + conv("a", "data", 6)
            + layer("slice", "Slice", ["a"], ["s1", "s2"], "slice_param { axis: 1 slice_point: 2 }")
            + conv("c", "s1", 2) + conv("d", "s2", 2) + head("c", "d"))
    g, _ = caffe_graph(write_net, text)
    assert not g.barriers and not g.unprunable
    assert g.group_of("a", 1).consumers == (ConsumerSlice("c", "conv", 1),)
    assert g.group_of("a", 2).consumers == (ConsumerSlice("d", "conv", 0),)      # channel 2 is s2's first
    assert g.weights_removed(g.group_of("a", 5).id, set()) == 3 * 9 + 2 * 9


def test_unprunable_spreads_over_ties(caffe, write_net):
    """Tile is not one of the graph's layers: a barrier. Unit a:0 reaches it, and b:0 is tied to a:0 by
    an Eltwise, so b:0 cannot fall either."""
    text = (DATA + conv("a", "data", 4) + conv("b", "data", 4)
            + layer("mvn", "Tile", ["a"], ["e"], "tile_param { axis: 1 tiles: 1 }")
            + layer("sum", "Eltwise", ["a", "b"], ["sum"]) + conv("c", "sum", 2) + conv("d", "e", 2) + head("c", "d"))
    g, _ = caffe_graph(write_net, text)
    assert set(g.unprunable) == units("a", 4) | units("b", 4)
    assert "barrier 'mvn'" in g.unprunable[Channel("a", 1)]
    assert g.unprunable[Channel("b", 1)].startswith("tied to a:1, which reaches barrier 'mvn'")
    assert len(g.groups) == 4


def test_eltwise_with_the_image_pins_units(caffe, write_net):
    text = DATA + conv("a", "data", 3) + layer("sum", "Eltwise", ["a", "data"], ["sum"]) + conv("c", "sum", 2) \
        + head("c")
    g, _ = caffe_graph(write_net, text)
    assert set(g.unprunable) == units("a", 3) and "Eltwise 'sum'" in g.unprunable[Channel("a", 0)]
    assert not g.barriers and len(g.groups) == 2


def test_concat_on_another_axis_is_a_barrier(caffe, write_net):
    text = (DATA + conv("a", "data", 4) + conv("b", "data", 4)
            + layer("cat", "Concat", ["a", "b"], ["cat"], "concat_param { axis: 2 }") + conv("c", "cat", 5)
            + head("c"))
    g, shapes = caffe_graph(write_net, text)
    assert tuple(shapes["cat"]) == (1, 4, 16, 8)
    assert list(g.barriers) == ["cat"] and "axis 2" in g.barriers["cat"]
    assert set(g.unprunable) == units("a", 4) | units("b", 4)
    assert all("'cat'" in why for why in g.unprunable.values())
    assert [group.channels for group in g.groups] == [(Channel("c", i),) for i in range(5)]


def test_eltwise_of_different_widths_is_a_barrier(caffe):
    """Caffe refuses this net, so the shapes are written by hand."""
    net_param = text_format.Parse(DATA + conv("a", "data", 4) + conv("b", "data", 6)
                                  + layer("sum", "Eltwise", ["a", "b"], ["sum"]) + conv("c", "sum", 5) + head("c"),
                                  pycaffe.caffe_pb2().NetParameter())
    shapes = {"data": (1, 3, 8, 8), "a": (1, 4, 8, 8), "b": (1, 6, 8, 8), "sum": (1, 4, 8, 8), "c": (1, 5, 8, 8),
              "ip_c": (1, 3)}
    g = graph.ChannelGraph.build(net_param, shapes)
    assert list(g.barriers) == ["sum"] and "[4, 6]" in g.barriers["sum"]
    assert set(g.unprunable) == units("a", 4) | units("b", 6)
    assert len(g.groups) == 5 and g.producers["c"].in_channels == 4
    with pytest.raises(InputError, match="'a'.*5"):   # shapes that do not fit the net
        graph.ChannelGraph.build(net_param, dict(shapes, a=(1, 5, 8, 8)))
    with pytest.raises(InputError, match="no blob 'c'"):
        graph.ChannelGraph.build(net_param, {k: v for k, v in shapes.items() if k != "c"})


@pytest.mark.parametrize("axis, pure", [(1, True), (2, False)])
def test_flatten_before_inner_product(caffe, write_net, axis, pure):
    text = (DATA + conv("a", "data", 4)
            + layer("flat", "Flatten", ["a"], ["flat"], f"flatten_param {{ axis: {axis} }}")
            + layer("ip", "InnerProduct", ["flat"], ["ip"], "inner_product_param { num_output: 10 }"))
    g, _ = caffe_graph(write_net, text)
    assert g.fc["ip"] == graph.FcInfo(10, 4, 64)
    if pure:   # channel 1 owns ip's columns [64, 128)
        assert not g.barriers and g.group_of("a", 1).consumers == (ConsumerSlice("ip", "fc", 1),)
        assert g.fc_weights_removed(g.group_of("a", 1).id, set()) == 10 * 64
    else:
        assert list(g.barriers) == ["flat"] and set(g.unprunable) == units("a", 4)


def test_in_place_layers_and_split(caffe, write_net):
    """BatchNorm, Scale and ReLU in place on a, then two readers: Caffe inserts a Split (an in-place
    layer after a second reader is refused by Caffe: "Top blob 'a' produced by multiple sources")."""
    text = (DATA + conv("a", "data", 4) + layer("a_bn", "BatchNorm", ["a"], ["a"])
            + layer("a_scale", "Scale", ["a"], ["a"], "scale_param { bias_term: true }")
            + layer("a_relu", "ReLU", ["a"], ["a"]) + conv("b", "a", 3) + conv("c", "a", 5) + head("b", "c"))
    g, shapes = caffe_graph(write_net, text)
    assert any("split" in name for name in shapes)
    group = g.group_of("a", 2)
    assert group.consumers == (ConsumerSlice("b", "conv", 2), ConsumerSlice("c", "conv", 2))
    assert group.riders == (Rider("a_bn", "BatchNorm", 2), Rider("a_scale", "Scale", 2))
    assert g.weights_removed(group.id, set()) == 3 * 9 + 3 * 9 + 5 * 9


def test_graph_is_immutable(caffe):
    g = built("LeNet-5")
    with pytest.raises(TypeError):
        g.producers["conv1"] = None
    with pytest.raises(AttributeError):
        g.groups[0].id = 3
    with pytest.raises(InputError):
        g.conv_weights({70})


def test_explicit_split_through_build_graph(caffe):
    """An explicit Split passes channels to both tops; build_graph's structure form drops it (Caffe
    re-inserts its own) and follows the split by name."""
    net_param = text_format.Parse(
        'name: "split"\n'
        + layer("data", "Input", [], ["data", "label"],
                "input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 2 } }")
        + conv("a", "data", 4) + layer("fork", "Split", ["a"], ["a1", "a2"]) + conv("b", "a1", 3)
        + layer("pool", "Pooling", ["a2"], ["pool"], "pooling_param { pool: AVE global_pooling: true }")
        + layer("ip", "InnerProduct", ["pool"], ["ip"], "inner_product_param { num_output: 10 }")
        + layer("loss", "SoftmaxWithLoss", ["ip", "label"], ["loss"]),
        pycaffe.caffe_pb2().NetParameter())
    g = graph.build_graph(net_param)
    assert g.group_of("a", 3).consumers == (ConsumerSlice("b", "conv", 3), ConsumerSlice("ip", "fc", 3))
    assert g.fc["ip"] == graph.FcInfo(10, 4, 1)
    assert g.weights_removed(g.group_of("a", 3).id, set()) == 3 * 9 + 3 * 9
    assert len(g.groups) == 4 and set(g.unprunable) == units("b", 3)   # b's channels are the net's outputs

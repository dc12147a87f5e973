"""The channel trace (caffe_prune.channels), layer by layer, against what a reader derives by hand
from the prototxt: which units each tensor channel carries, what a residual sum and a grouped
consumer tie, which consumer slices and riders are recorded, what an across-channel LRN couples,
and what a barrier and a net output pin."""
import pytest
from google.protobuf import text_format

from caffe_prune import pycaffe
from caffe_prune.channels import trace
from caffe_prune.errors import InputError
from caffe_prune.layers.units import Channel, ConsumerSlice, Rider

NET = '''
name: "t"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "a" type: "Convolution" bottom: "data" top: "a" convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "a" top: "a" }
layer { name: "sc" type: "Scale" bottom: "a" top: "a" scale_param { bias_term: true } }
layer { name: "b" type: "Convolution" bottom: "a" top: "b" convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" }
layer { name: "c" type: "Convolution" bottom: "sum" top: "c" convolution_param { num_output: 6 kernel_size: 1 group: 2 } }
layer { name: "lrn" type: "LRN" bottom: "c" top: "n" lrn_param { local_size: 3 } }
layer { name: "pool" type: "Pooling" bottom: "n" top: "p" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "p" top: "ip" inner_product_param { num_output: 3 } }
'''


def traced(text):
    param = text_format.Parse(text, pycaffe.caffe_pb2().NetParameter())
    net = pycaffe.net_from_param(param, probe=False)
    return trace(param, {name: blob.data.shape for name, blob in net.blobs.items()})


def units(layer, indices):
    return frozenset(Channel(layer, i) for i in indices)


def test_units_ties_consumers_and_riders_by_hand(caffe):
    t = traced(NET)
    # tensors: a's channel i is unit a:i (BatchNorm and Scale pass it in place); the sum carries a:i and b:i
    assert t.tensors["sum"].channels == tuple(units("a", [i]) | units("b", [i]) for i in range(4))
    assert t.tensors["p"].channels == tuple(units("c", [i]) for i in range(6)) and t.tensors["p"].block == 16
    assert t.tensors["ip"].block is None and t.tensors["ip"].channels == (frozenset(),) * 3
    # ties: the residual sum ties a:i with b:i; c's two groups tie its input channels i and i + 2 and its
    # outputs i and i + 3
    same = lambda x, y: t.find(x) == t.find(y)     # noqa: E731
    assert all(same(Channel("a", i), Channel("b", i)) for i in range(4))
    assert same(Channel("a", 0), Channel("a", 2)) and same(Channel("a", 1), Channel("b", 3))
    assert not same(Channel("a", 0), Channel("a", 1))
    assert same(Channel("c", 0), Channel("c", 3)) and not same(Channel("c", 0), Channel("c", 1))
    # what falls with a channel: b and c read the sum's channels, ip reads c's blocks of 16 columns
    consumers = {item for item, _ in t.consumers}
    assert consumers == ({ConsumerSlice("b", "conv", i) for i in range(4)} | {ConsumerSlice("c", "conv", i) for i in range(4)}
                         | {ConsumerSlice("ip", "fc", i) for i in range(6)})
    assert t.fc["ip"].in_channels == 6 and t.fc["ip"].block == 16
    assert t.producers["c"].group == 2 and t.producers["c"].in_channels == 4 and t.producers["c"].kernel_area == 1
    riders = {item: s for item, s in t.riders}
    assert riders[Rider("bn", "BatchNorm", 2)] == units("a", [2]) and riders[Rider("sc", "Scale", 0)] == units("a", [0])
    assert t.riding == {"bn": ("BatchNorm", (0, 1), (0,)), "sc": ("Scale", (0, 1), (0, 1))}
    # across-channel LRN couples c's channels (recorded, not tied); nothing is pinned, no barrier
    assert t.lrn_across == {"lrn": tuple(Channel("c", i) for i in range(6))}
    assert t.reasons == {} and t.barriers == {}


def test_barriers_and_outputs_pin_what_reaches_them(caffe):
    # Tile (stock Caffe, no rule here) between b and the sum: a barrier; what reaches it is pinned, what
    # leaves it carries no units, so the sum ties a's channels to channels no convolution produces
    t = traced(NET.replace('layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b"',
                           'layer { name: "tile" type: "Tile" bottom: "b" top: "bt" tile_param { axis: 1 tiles: 1 } }\n'
                           'layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "bt"'))
    assert t.barriers == {"tile": "layer type 'Tile' is not one the channel graph follows"}
    assert t.reasons[Channel("b", 3)] == "reaches barrier 'tile': layer type 'Tile' is not one the channel graph follows"
    assert t.reasons[Channel("a", 1)] == "is added by Eltwise 'sum' to a channel no convolution produces"
    assert t.tensors["bt"].channels == (frozenset(),) * 4 and Channel("c", 0) not in t.reasons
    # a net whose output is a convolution's top: those channels are what the net computes
    t = traced(NET.split('layer { name: "lrn"')[0])
    assert t.reasons[Channel("c", 5)] == "reaches the net output 'c': its channels are what the network computes"


def test_shapes_that_do_not_fit_are_one_line(caffe):
    param = text_format.Parse(NET, pycaffe.caffe_pb2().NetParameter())
    net = pycaffe.net_from_param(param, probe=False)
    shapes = {name: blob.data.shape for name, blob in net.blobs.items()}
    with pytest.raises(InputError, match=r"layer 'c': the shapes given hold no blob 'c'"):
        trace(param, {k: v for k, v in shapes.items() if k != "c"})
    with pytest.raises(InputError, match=r"layer 'a': 3 inputs, 5 outputs in shapes \(num_output 4\), group 1 "
                                         r"do not fit"):
        trace(param, {**shapes, "a": (1, 5, 8, 8)})

"""The myopic oracle: the round-robin shortlist by hand, and the choice equal to brute force."""
import numpy as np
import pytest

from caffe_prune import masking, oracle, pycaffe
from caffe_prune.graph import build_graph

TINY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 16 dim: 3 dim: 8 dim: 8 } shape { dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 }
    bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 5 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 }
    bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv2" top: "ip"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_shortlist_round_robin_by_hand():
    rankings = {"a": [3, 1, 4, 5], "b": [3, 9, 2], "c": [1, 7]}
    # a: 3; b: 3 taken -> 9; c: 1; a: 1 taken -> 4; b: 2; c: 7; a: 5; (b, c exhausted)
    got = oracle.shortlist(rankings, k=16)
    assert [p.group for p in got] == [3, 9, 1, 4, 2, 7, 5]
    assert got[0].proposers == (("a", 0), ("b", 0))          # b agreed at its rank 0
    assert got[2].proposers == (("c", 0), ("a", 1))
    assert [p.group for p in oracle.shortlist(rankings, k=3)] == [3, 9, 1]
    assert [p.group for p in oracle.shortlist({"a": [2, 2, 2]}, k=2)] == [2]    # fewer when they run out
    with pytest.raises(ValueError, match="k must be at least 1"):
        oracle.shortlist(rankings, k=0)


def test_shortlist_authors_code_rule_by_hand():
    """The authors' get_k_channels: a constituent whose rank-i group is already listed contributes
    nothing in round i; the paper's text lets it move on to its next group. Same rankings, two
    shortlists."""
    rankings = {"a": [3, 1, 4, 5], "b": [3, 9, 2], "c": [1, 7]}
    # rank 0: a 3; b 3 listed -> nothing; c 1 | rank 1: a 1 listed -> nothing; b 9; c 7 | rank 2: a 4; b 2 | rank 3: a 5
    got = oracle.shortlist(rankings, k=16, rule="authors-code")
    assert [p.group for p in got] == [3, 1, 9, 7, 4, 2, 5]
    assert got[0].proposers == (("a", 0), ("b", 0))
    assert got[1].proposers == (("c", 0), ("a", 1))
    authors = oracle.shortlist(rankings, k=4, rule="authors-code")
    paper = oracle.shortlist(rankings, k=4, rule="paper")
    assert [p.group for p in authors] == [3, 1, 9, 7]
    assert [p.group for p in paper] == [3, 9, 1, 4]          # 4 instead of 7: the rules pick other groups
    assert [p.group for p in oracle.shortlist({"a": [5, 6], "b": [5, 6]}, k=2, rule="authors-code")] == [5, 6]
    with pytest.raises(ValueError, match="unknown shortlist rule 'text'; one of paper, authors-code"):
        oracle.shortlist(rankings, k=4, rule="text")


def hand_theta(layer, c):
    """Θ_C of the tiny net written out by hand: (layer, blob, index) to zero."""
    if layer == "conv1":   # its filter and bias, and conv2's input slice
        return [("conv1", 0, (c,)), ("conv1", 1, (c,)), ("conv2", 0, (slice(None), c))]
    # conv2 (5 x 2 x 2 output): its filter and bias, and the ip block of 2*2 inputs
    return [("conv2", 0, (c,)), ("conv2", 1, (c,)), ("ip", 0, (slice(None), slice(4 * c, 4 * c + 4)))]


def test_choice_equals_brute_force(caffe, write_net):
    """Sensitivities measured through the masker equal a brute-force recomputation: each group's
    Θ_C (written out by hand) zeroed in a fresh copy of the weights, the loss measured by Caffe;
    the pick is the argmin."""
    path = write_net(TINY)
    param = pycaffe.read_prototxt(path)
    graph = build_graph(param)
    net = pycaffe.load_net(path)
    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.normal(size=(16, 3, 8, 8))
    net.blobs["label"].data[...] = rng.integers(0, 4, 16)
    original = {l: [b.data.copy() for b in blobs] for l, blobs in net.params.items()}
    masker = masking.Masker(graph, [net])

    def loss():
        return float(net.forward()["loss"])
    candidates = [g.id for g in graph.groups]
    measured = oracle.sensitivities(candidates, masker, loss)
    base = loss()
    assert len(graph.groups) == 11 and graph.fc["ip"].block == 4
    for group in graph.groups:
        (unit,) = group.channels
        for layer, blob, index in hand_theta(unit.layer, unit.index):
            net.params[layer][blob].data[index] = 0
        brute = loss() - base
        for layer, blobs in net.params.items():
            for b, o in zip(blobs, original[layer]):
                b.data[...] = o
        assert measured[group.id] == pytest.approx(brute, abs=1e-6)
    assert oracle.choose(measured) == min(candidates, key=lambda g: (measured[g], g))
    assert oracle.choose({4: 0.1, 2: 0.1, 7: 0.3}) == 2

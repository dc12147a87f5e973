"""The six networks: they build in Caffe, count the convolution weights papers/004 Table 1 gives,
copy the published prototxts layer for layer, load the published weights by name and reproduce
their logits, and the committed prototxt/ files are what networks.py generates."""
import re

import numpy as np
import pytest
from google.protobuf import text_format

from caffe_prune import layers, netdef, networks, pycaffe
from caffe_prune.data import cifar10, cifar10_convert
from caffe_prune.data.transform import Transform
from caffe_prune.errors import InputError
from conftest import PUBLISHED, REPO, SUBSET, TABLE1, evaluation_form, conv_weight_count

# Counted by hand from the layer shapes: out x in/group x kh x kw, summed over Convolution layers.
HAND_COUNTS = {
    "LeNet-5": 20 * 3 * 25 + 50 * 20 * 25,                                      # 26,500
    "CIFAR10": 32 * 3 * 25 + 32 * 32 * 25 + 64 * 32 * 25,                       # 79,200
    "ResNet-20": (16 * 3 * 9 + 6 * 16 * 16 * 9                                  # first_conv, group0
                  + 32 * 16 * 9 + 5 * 32 * 32 * 9 + 32 * 16                     # group1 (+ 1x1 proj)
                  + 64 * 32 * 9 + 5 * 64 * 64 * 9 + 64 * 32),                   # group2 (+ 1x1 proj)
    "NIN": (192 * 3 * 25 + 160 * 192 + 96 * 160                                 # conv1, cccp1, cccp2
            + 192 * 96 * 25 + 2 * 192 * 192                                     # conv2, cccp3, cccp4
            + 192 * 192 * 9 + 192 * 192 + 10 * 192),                            # conv3, cccp5, cccp6
    "AlexNet": (96 * 3 * 9 + 256 * 48 * 25 + 384 * 256 * 9                      # conv2: 2 groups
                + 384 * 192 * 9 + 256 * 192 * 9),                               # conv4, conv5: 2 groups
    "SqueezeNet": (64 * 3 * 9                                                   # conv1
                   + sum(s * c + e * s + e * s * 9                               # squeeze, expand1x1, expand3x3
                         for c, s, e in [(64, 16, 64), (128, 16, 64), (128, 32, 128), (256, 32, 128),
                                         (256, 48, 192), (384, 48, 192), (384, 64, 256), (512, 64, 256)])
                   + 1000 * 512),                                               # conv10
}

REFERENCES = {
    "LeNet-5": "LeNet-5-CIFAR10/masked.prototxt",
    "ResNet-20": "ResNet-20-CIFAR10/masked.prototxt",
    "AlexNet": "AlexNet-CIFAR10/original.prototxt",
    "SqueezeNet": "SqueezeNet-CIFAR10/original.prototxt",
}


def logits_blob(net_param):
    """The blob the final Softmax reads."""
    return [layer for layer in net_param.layer if layer.type == "Softmax"][-1].bottom[0]


def build_deploy(write_net, name, batch_size):
    net_param = networks.deploy(name, batch_size)
    path = write_net(text_format.MessageToString(net_param), f"{name}-deploy.prototxt")
    return net_param, path


@pytest.mark.parametrize("name", networks.NETWORKS)
def test_deploy_builds_and_counts_table1_conv_weights(caffe, write_net, name):
    net_param, path = build_deploy(write_net, name, batch_size=2)
    net = pycaffe.load_net(path)
    net.blobs["data"].data[...] = np.random.default_rng(0).normal(size=(2, 3, 32, 32))
    prob = net.forward()["prob"]
    assert prob.shape == (2, 10)   # (ResNet-20's BatchNorm has no statistics yet: its values are NaN)
    built = sum(net.params[layer.name][0].data.size for layer in net_param.layer if layer.type == "Convolution")
    assert built == conv_weight_count(net_param)
    table = TABLE1[name]["conv_params"]
    assert abs(built - table) <= 0.02 * table, f"{name}: {built} conv weights, Table 1 says {table}"


@pytest.mark.parametrize("name", networks.NETWORKS)
def test_conv_weight_count_matches_hand_count(name):
    assert conv_weight_count(networks.train_test(name)) == HAND_COUNTS[name]
    assert conv_weight_count(networks.deploy(name, 4)) == HAND_COUNTS[name]


def stock_body(net_param):
    """The layers between the data layers and the heads, as stock Caffe reads them: the authors'
    fork adds convolution_mask_param and two mask param specs per Convolution, dropped here."""
    body = []
    for layer in net_param.layer:
        if layer.type in layers.DATA_TYPES or layer.type in layers.HEAD_TYPES:
            continue
        copy = pycaffe.caffe_pb2().LayerParameter()
        copy.CopyFrom(layer)
        if copy.type == "Convolution":
            del copy.param[2:]
        body.append(copy)
    return body


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_layers_copy_the_published_prototxt(caffe, name):
    text = (PUBLISHED / REFERENCES[name]).read_text()
    reference = pycaffe.caffe_pb2().NetParameter()
    text_format.Parse(re.sub(r"convolution_mask_param\s*\{[^}]*\}", "", text), reference)
    ours, theirs = stock_body(networks.train_test(name)), stock_body(reference)
    assert [layer.name for layer in ours] == [layer.name for layer in theirs]
    for mine, published in zip(ours, theirs):
        assert mine == published, text_format.MessageToString(mine, as_one_line=True)
    train = [layer for layer in reference.layer if layer.type == "ImageData" and layer.include[0].phase == 0][0]
    assert networks.train_test(name).layer[0].transform_param == train.transform_param


@pytest.mark.parametrize("name", networks.NETWORKS)
def test_data_layers_and_heads(name):
    net_param = networks.train_test(name)
    train, test = net_param.layer[0], net_param.layer[1]
    assert (train.include[0].phase, test.include[0].phase) == (0, 1)   # TRAIN, TEST
    assert train.data_param.batch_size == test.data_param.batch_size == 128
    assert train.transform_param.mirror == (name != "ResNet-20") and not test.transform_param.mirror
    assert networks.transform(name) == Transform.of(test)
    heads = {layer.name: layer for layer in net_param.layer[-3:]}
    assert heads["loss"].type == "SoftmaxWithLoss" and not heads["loss"].include
    assert heads["accuracy_top5"].accuracy_param.top_k == 5 and heads["accuracy"].include[0].phase == 1
    assert {layer.type for layer in networks.deploy(name).layer} & {"Data", "SoftmaxWithLoss", "Accuracy"} == set()


@pytest.mark.parametrize("name", networks.NETWORKS)
def test_train_test_form_builds_when_fed_from_python(caffe, write_net, name):
    """The training net's layers and heads, with its Data layers swapped for Input (netdef)."""
    form = evaluation_form(networks.train_test(name), batch_size=2)
    net = pycaffe.load_net(write_net(text_format.MessageToString(form), f"{name}-eval.prototxt"), probe=False)
    assert net.blobs["data"].data.shape == (2, 3, 32, 32) and net.inputs == ["data", "label"]
    assert set(net.outputs) == set(netdef.EVAL_TOPS.values())
    assert net.blobs[logits_blob(networks.deploy(name))].data.shape == (2, 10)


@pytest.mark.parametrize("name", ["LeNet-5", "ResNet-20"])
def test_published_weights_load_by_name_and_give_the_same_logits(caffe, write_net, name):
    weights_path = PUBLISHED / f"{name}-CIFAR10" / "original.caffemodel"
    weights = pycaffe.read_caffemodel(weights_path)
    batch = 4
    deploy_param, deploy_path = build_deploy(write_net, name, batch)
    ours = pycaffe.load_net(deploy_path, weights_path, probe=False)
    pycaffe.check_weights(ours, weights, weights_path)
    assert set(ours.params) == {layer.name for layer in weights.layer if layer.blobs}   # nothing left at its filler

    # The embedded definition was saved from the TRAIN net: every layer carries `phase: TRAIN`,
    # which Caffe keeps over the net's phase; the evaluation form clears it (BatchNorm would otherwise
    # use mini-batch statistics).
    evaluation = evaluation_form(weights, batch_size=batch)
    assert not any(layer.HasField("phase") for layer in evaluation.layer)
    transform = networks.transform(name)
    theirs = pycaffe.load_net(write_net(text_format.MessageToString(evaluation), "embedded.prototxt"),
                             weights_path, probe=False)
    images, labels = cifar10.read_split("test", SUBSET)
    x = cifar10_convert.caffe_input(images[:batch], transform.mean_values, transform.scale)
    ours.blobs["data"].data[...] = x
    theirs.blobs["data"].data[...] = x
    theirs.blobs["label"].data[...] = labels[:batch]
    ours.forward()
    theirs.forward()
    mine, published = ours.blobs[logits_blob(deploy_param)].data, theirs.blobs[logits_blob(deploy_param)].data
    assert np.abs(published).max() > 1   # real logits, not zeros
    np.testing.assert_allclose(mine, published, rtol=1e-5, atol=1e-5 * np.abs(published).max())


@pytest.mark.parametrize("name", networks.NETWORKS)
def test_committed_prototxt_is_what_networks_generates(name):
    for filename, text in networks.prototxt_files(name).items():
        path = REPO / "prototxt" / name / filename
        assert path.is_file(), f"{path} missing: run tools/generate_prototxt.py"
        assert path.read_text() == text, f"{path} drifted from networks.py: run tools/generate_prototxt.py"


def test_solver_is_the_published_schedule():
    published = pycaffe.read_prototxt(PUBLISHED / "ResNet-20-CIFAR10" / "solver-gpu.prototxt",
                                     pycaffe.caffe_pb2().SolverParameter())
    ours = networks.solver("ResNet-20")
    for field in ("base_lr", "momentum", "weight_decay", "lr_policy", "max_iter", "test_interval", "test_iter"):
        assert getattr(ours, field) == getattr(published, field), field
    assert networks.solver("LeNet-5").weight_decay == pytest.approx(5e-4)
    assert ours.net == "prototxt/ResNet-20/train_test.prototxt"


@pytest.mark.parametrize("form", [networks.train_test, networks.deploy, networks.transform, networks.solver])
def test_unknown_network_is_a_one_line_error(form):
    with pytest.raises(InputError) as error:
        form("VGG-16")
    message = str(error.value)
    assert "\n" not in message and "'VGG-16'" in message
    assert all(name in message for name in networks.NETWORKS)

"""Every classifier prototxt that ships in Caffe's own source package (read from the verified source
tarball tools/caffe/build.sh fetched): the channel graph's group and weight counts derived by hand,
and an export of 30% of the groups, with random weights made here, that computes what the masked
net computes (across-channel LRN: the deviation is measured and bounded, not claimed zero)."""
import tarfile
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from caffe_prune import download, export, masking, pycaffe
from caffe_prune.session import Network
from caffe_prune.errors import InputError
from conftest import conv_weight_count

pytestmark = pytest.mark.xdist_group("test_caffe_models")       # one process: its module fixtures are costly

SOURCE = download.CACHE_ROOT / "downloads" / "caffe_1.0.0+git20180821.99bd997.orig.tar.gz"

# AlexNet's five convolutions (CaffeNet, R-CNN and flickr_style share them): conv2, conv4, conv5
# read and write in 2 groups, so channel i falls with channel i + M/2:
#   conv1 96 -> 48 pairs (conv2 reads it in 2 groups), conv2 256 -> 128, conv3 384 -> 192 (conv4
#   reads it in 2 groups), conv4 384 -> 192, conv5 256 -> 128
ALEXNET_GROUPS = 48 + 128 + 192 + 192 + 128
ALEXNET_CONV = 96 * 3 * 11 * 11 + 256 * 48 * 5 * 5 + 384 * 256 * 3 * 3 + 384 * 192 * 3 * 3 + 256 * 192 * 3 * 3
# GoogLeNet (Szegedy et al. 2015, Table 1): no sums and no grouped convolutions, so every output
# channel of its 57 convolutions is a group of its own: conv1 64, conv2/3x3_reduce 64, conv2/3x3 192,
# and each inception module's 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5 and pool proj
INCEPTION = {"3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64), "4a": (192, 96, 208, 16, 48, 64),
             "4b": (160, 112, 224, 24, 64, 64), "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
             "4e": (256, 160, 320, 32, 128, 128), "5a": (256, 160, 320, 32, 128, 128),
             "5b": (384, 192, 384, 48, 128, 128)}
GOOGLENET_GROUPS = 64 + 64 + 192 + sum(sum(widths) for widths in INCEPTION.values())   # 7,280
# train_val adds the two auxiliary classifiers' 1x1 convolutions (128 channels each)
GOOGLENET_AUX = 2 * 128
CIFAR10_GROUPS = 32 + 32 + 64     # conv1, conv2, conv3 of cifar10_quick and cifar10_full
LENET_GROUPS = 20 + 50

CASES = {   # file: (input shape given when the prototxt does not state it, groups, conv weights, slow)
    "models/bvlc_alexnet/deploy.prototxt": (None, ALEXNET_GROUPS, ALEXNET_CONV, True),
    "models/bvlc_alexnet/train_val.prototxt": ((3, 227, 227), ALEXNET_GROUPS, ALEXNET_CONV, True),
    "models/bvlc_reference_caffenet/deploy.prototxt": (None, ALEXNET_GROUPS, ALEXNET_CONV, True),
    "models/bvlc_reference_caffenet/train_val.prototxt": ((3, 227, 227), ALEXNET_GROUPS, ALEXNET_CONV, True),
    "models/bvlc_reference_rcnn_ilsvrc13/deploy.prototxt": (None, ALEXNET_GROUPS, ALEXNET_CONV, True),
    "models/finetune_flickr_style/deploy.prototxt": (None, ALEXNET_GROUPS, ALEXNET_CONV, True),
    "models/finetune_flickr_style/train_val.prototxt": ((3, 227, 227), ALEXNET_GROUPS, ALEXNET_CONV, True),
    "models/bvlc_googlenet/deploy.prototxt": (None, GOOGLENET_GROUPS, None, True),
    "models/bvlc_googlenet/train_val.prototxt": ((3, 224, 224), GOOGLENET_GROUPS + GOOGLENET_AUX, None, True),
    "examples/cifar10/cifar10_quick.prototxt": (None, CIFAR10_GROUPS, 79200, False),
    "examples/cifar10/cifar10_quick_train_test.prototxt": ((3, 32, 32), CIFAR10_GROUPS, 79200, False),
    "examples/cifar10/cifar10_full.prototxt": (None, CIFAR10_GROUPS, 79200, False),
    "examples/cifar10/cifar10_full_train_test.prototxt": ((3, 32, 32), CIFAR10_GROUPS, 79200, False),
    "examples/cifar10/cifar10_full_sigmoid_train_test.prototxt": ((3, 32, 32), CIFAR10_GROUPS, 79200, False),
    "examples/cifar10/cifar10_full_sigmoid_train_test_bn.prototxt": ((3, 32, 32), CIFAR10_GROUPS, 79200, False),
    "examples/mnist/lenet.prototxt": (None, LENET_GROUPS, 20 * 1 * 25 + 50 * 20 * 25, False),
    "examples/mnist/lenet_train_test.prototxt": ((1, 28, 28), LENET_GROUPS, 20 * 1 * 25 + 50 * 20 * 25, False),
}


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory):
    if not SOURCE.is_file():
        pytest.fail(f"{SOURCE} is missing: `make setup` fetches it (tools/caffe/build.sh)")
    root = tmp_path_factory.mktemp("caffe-source")
    with tarfile.open(SOURCE) as tar:
        tar.extractall(root, members=[m for m in tar.getmembers() if m.name in CASES and m.isfile()])
    return root


def case(name, marks=()):
    slow = CASES[name][3]
    return pytest.param(name, marks=[pytest.mark.slow] if slow else [], id=Path(name).parent.name + "/" + Path(name).name)


def randomize(net, seed=0):
    """He-scaled random weights (Caffe's deploy files have no fillers: all zeros would prove nothing);
    BatchNorm statistics positive, scale factor 1."""
    rng = np.random.default_rng(seed)
    for name, blobs in net.params.items():
        layer_type = net.layers[list(net._layer_names).index(name)].type
        for i, blob in enumerate(blobs):
            shape = blob.data.shape
            if layer_type == "BatchNorm":
                blob.data[...] = [rng.normal(0, 0.1, shape), rng.uniform(0.5, 1.5, shape), np.ones(shape)][i]
            elif i == 0 and len(shape) > 1:
                blob.data[...] = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
            else:
                blob.data[...] = rng.normal(0, 0.05, shape)


def export_random_fraction(network, out_dir, fraction=0.3, seed=1):
    """Prune a seeded random fraction of the groups on random weights; export; the export's record."""
    g = network.graph
    rng, pruned = np.random.default_rng(seed), set()
    for _ in range(int(fraction * len(g.groups))):
        pruned.add(int(rng.choice(g.prunable(pruned))))
    full = pycaffe.net_from_param(network.structure())
    randomize(full)
    masker = masking.Masker(g, [full])
    for group_id in sorted(pruned):
        masker.commit(group_id)
    inputs = rng.normal(size=(2, *network.input_shape)).astype(np.float32)
    done = export.export(network.param, g, pruned, full, out_dir, "compact", network.input_shape, inputs)
    assert sum(done["net"].params[l][0].data.size for l in g.producers) == g.conv_weights(pruned)
    return done, max(done["deviation"].values())


@pytest.mark.parametrize("name", [case(n) for n in CASES])
def test_groups_and_export(caffe, source_tree, tmp_path, name):
    shape, groups, conv, _ = CASES[name]
    network = Network.open(source_tree / name, shape)
    g = network.graph
    assert len(g.groups) == groups
    assert g.conv_weights(set()) == conv_weight_count(network.structure())
    if conv is not None:
        assert g.conv_weights(set()) == conv
    assert not g.barriers

    done, deviation = export_random_fraction(network, tmp_path)
    # the whole definition, narrower (a train_val input's train_val.prototxt; a deploy input's deploy.prototxt)
    exported = pycaffe.read_prototxt(done["train_val"] or done["deploy"])
    assert [layer.name for layer in exported.layer] == [layer.name for layer in network.param.layer]
    if not done["lrn_across"]:
        assert deviation <= 1e-5, f"{name}: relative deviation {deviation:.3g}"
        return
    # across-channel LRN sees other neighbours in the smaller net: measured, and with the LRN made
    # neutral (alpha 0: a constant factor k^-beta) the export is exact again
    print(f"{name}: across-channel LRN {done['lrn_across']}: relative deviation {deviation:.3g}")
    assert deviation < 0.01
    neutral = pycaffe.caffe_pb2().NetParameter()
    neutral.CopyFrom(network.param)
    for layer in neutral.layer:
        if layer.type == "LRN":
            layer.lrn_param.alpha = 0
    _, deviation = export_random_fraction(Network(neutral, name, input_shape=network.input_shape), tmp_path / "neutral")
    assert deviation <= 1e-5, f"{name} with neutral LRN: relative deviation {deviation:.3g}"


def test_train_val_without_data_asks_for_the_shape(caffe, source_tree):
    with pytest.raises(InputError, match=r"227x227 after crop_size; pass --input-shape C,H,W"):
        Network.open(source_tree / "models/bvlc_alexnet/train_val.prototxt").graph
    with pytest.raises(InputError, match=r"mnist_test_lmdb does not exist.*pass --input-shape C,H,W"):
        Network.open(source_tree / "examples/mnist/lenet_train_test.prototxt").graph


def test_googlenet_main_head_is_the_last_loss(caffe, source_tree):
    network = Network.open(source_tree / "models/bvlc_googlenet/train_val.prototxt", (3, 224, 224))
    head = network.head()
    assert head.logits == "loss3/classifier" and "3 SoftmaxWithLoss layers" in head.note
    assert network.head("loss1/classifier").logits == "loss1/classifier"
    with pytest.raises(InputError, match="--logits 'loss9' is not a blob any layer produces"):
        network.head("loss9")


def test_v1_prototxt_is_upgraded_by_caffe(caffe, tmp_path):
    """Caffe's V1 format (``layers { type: CONVOLUTION }``) is upgraded by Caffe's own
    upgrade_net_proto_text, with a note, and gives the same graph as the V2 form."""
    v1 = tmp_path / "v1.prototxt"
    v1.write_text('name: "v1" input: "data" input_dim: 1 input_dim: 1 input_dim: 12 input_dim: 12\n'
                  'layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1" '
                  'convolution_param { num_output: 4 kernel_size: 3 } }\n'
                  'layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }\n'
                  'layers { name: "ip" type: INNER_PRODUCT bottom: "conv1" top: "ip" '
                  'inner_product_param { num_output: 3 } }\n')
    with pytest.warns(UserWarning, match="V1 'layers' format; upgraded in memory with Caffe's upgrade_net_proto_text"):
        network = Network.open(v1)
    assert [layer.type for layer in network.param.layer] == ["Input", "Convolution", "ReLU", "InnerProduct"]
    assert len(network.graph.groups) == 4 and network.graph.fc["ip"].block == 100
    assert text_format.MessageToString(network.param).count("layer {") == 4

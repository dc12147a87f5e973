"""Networks and data the toolkit was not written for: nets built here with NetSpec (a MobileNet-style
depthwise net, ResNet-50-style bottlenecks, a DenseNet-style concat chain, an old-style `input:`
net) with hand-counted groups and exact exports; evaluate and prune on an LMDB of Datums and on an
ImageData list of PNGs made here, agreeing with Caffe's own TEST-phase data layer; and the bad
inputs of a new user, each a one-line error."""

import numpy as np
import pytest
from google.protobuf import text_format

from caffe_prune import pruning, pycaffe
from caffe_prune.data.dataset import open_dataset
from caffe_prune.graph import Channel
from caffe_prune.session import Network, Session
from caffe_prune.errors import DataError, InputError
from caffe_prune.steps import pruned_of
from conftest import evaluation
from test_caffe_models import export_random_fraction


def spec():
    cf = pycaffe.caffe()
    return cf.NetSpec(), cf.layers, cf.params


def bn_relu(n, L, name, bottom, relu=True, in_place=True):
    n[name + "_bn"] = L.BatchNorm(bottom, in_place=in_place)
    n[name + "_scale"] = L.Scale(n[name + "_bn"], in_place=True, bias_term=True)
    if relu:
        n[name + "_relu"] = L.ReLU(n[name + "_scale"], in_place=True)
        return n[name + "_relu"]
    return n[name + "_scale"]


def conv(n, L, name, bottom, out, kernel=1, stride=1, group=1, relu=True):
    n[name] = L.Convolution(bottom, num_output=out, kernel_size=kernel, stride=stride, pad=kernel // 2,
                            group=group, weight_filler=dict(type="msra"), bias_term=False)
    return bn_relu(n, L, name, n[name], relu)


def head(n, L, P, bottom, classes=10):
    n.pool = L.Pooling(bottom, pool=P.Pooling.AVE, global_pooling=True)
    n.fc = L.InnerProduct(n.pool, num_output=classes, weight_filler=dict(type="xavier"))
    n.prob = L.Softmax(n.fc)


def mobilenet():
    """conv1 3->8, depthwise 8 (group 8), pointwise 8->16, depthwise with channel multiplier 2
    (16 -> 32, group 16), pointwise 32->12, then global pooling and an InnerProduct."""
    n, L, P = spec()
    n.data = L.Input(shape=dict(dim=[1, 3, 16, 16]))
    x = conv(n, L, "conv1", n.data, 8, kernel=3)
    x = conv(n, L, "dw1", x, 8, kernel=3, group=8)
    x = conv(n, L, "pw1", x, 16)
    x = conv(n, L, "dw2", x, 32, kernel=3, stride=2, group=16)
    x = conv(n, L, "pw2", x, 12)
    head(n, L, P, x)
    return n.to_proto()


def bottlenecks():
    """A stem of 16, an identity bottleneck (16 -> 4 -> 4 -> 16, summed with the stem) and a
    projection bottleneck (16 -> 8 -> 8 -> 32, summed with a stride-2 1x1 projection to 32)."""
    n, L, P = spec()
    n.data = L.Input(shape=dict(dim=[1, 3, 16, 16]))
    stem = conv(n, L, "stem", n.data, 16, kernel=3)
    y = conv(n, L, "b1_reduce", stem, 4)
    y = conv(n, L, "b1_3x3", y, 4, kernel=3)
    y = conv(n, L, "b1_expand", y, 16, relu=False)
    n.b1_sum = L.Eltwise(stem, y)
    n.b1_relu = L.ReLU(n.b1_sum, in_place=True)
    y = conv(n, L, "b2_reduce", n.b1_relu, 8)
    y = conv(n, L, "b2_3x3", y, 8, kernel=3, stride=2)
    y = conv(n, L, "b2_expand", y, 32, relu=False)
    proj = conv(n, L, "b2_proj", n.b1_relu, 32, stride=2, relu=False)
    n.b2_sum = L.Eltwise(proj, y)
    n.b2_relu = L.ReLU(n.b2_sum, in_place=True)
    head(n, L, P, n.b2_relu)
    return n.to_proto()


def densenet():
    """conv0 3->8, two dense layers (BN-ReLU-conv, growth 4) each concatenated to what came before
    (8 -> 12 -> 16 channels), a 1x1 transition to 8, pooling and an InnerProduct."""
    n, L, P = spec()
    n.data = L.Input(shape=dict(dim=[1, 3, 16, 16]))
    n.conv0 = L.Convolution(n.data, num_output=8, kernel_size=3, pad=1, weight_filler=dict(type="msra"))
    x = n.conv0
    for i in (1, 2):
        a = bn_relu(n, L, f"d{i}_pre", x, in_place=False)   # pre-activation: x itself goes on
        n[f"d{i}"] = L.Convolution(a, num_output=4, kernel_size=3, pad=1, weight_filler=dict(type="msra"))
        n[f"cat{i}"] = L.Concat(x, n[f"d{i}"])
        x = n[f"cat{i}"]
    n.trans = L.Convolution(x, num_output=8, kernel_size=1, weight_filler=dict(type="msra"))
    head(n, L, P, n.trans)
    return n.to_proto()


OLD_STYLE = """name: "old"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 12 input_dim: 12
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 6 kernel_size: 3
  weight_filler { type: "xavier" } } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2" convolution_param { num_output: 5 kernel_size: 3
  weight_filler { type: "xavier" } } }
layer { name: "ip" type: "InnerProduct" bottom: "c2" top: "ip" inner_product_param { num_output: 4
  weight_filler { type: "xavier" } } }
"""


def write(tmp_path, param, name):
    path = tmp_path / f"{name}.prototxt"
    path.write_text(param if isinstance(param, str) else text_format.MessageToString(param))
    return path


def test_mobilenet_depthwise_prunes_channel_by_channel(caffe, tmp_path):
    network = Network.open(write(tmp_path, mobilenet(), "mobilenet"))
    g = network.graph
    # conv1's 8 channels each fall with dw1's channel; pw1's 16 each with dw2's 2 outputs; pw2's 12
    assert len(g.groups) == 8 + 16 + 12 and not g.unprunable
    assert g.group_of("conv1", 3).channels == (Channel("conv1", 3), Channel("dw1", 3))
    assert g.group_of("pw1", 5).channels == (Channel("pw1", 5), Channel("dw2", 10), Channel("dw2", 11))
    assert g.producers["dw2"].depthwise and not g.producers["pw1"].depthwise
    # conv1 8x3x9, dw1 8x1x9, pw1 16x8, dw2 32x1x9, pw2 12x32
    assert g.conv_weights(set()) == 216 + 72 + 128 + 288 + 384
    # conv1:3 takes its filter (27), dw1's row (9) and pw1's input column (16)
    assert g.weights_removed(g.group_of("conv1", 3).id, set()) == 27 + 9 + 16
    # pw1:5 takes its filter (8), dw2's two rows (18) and pw2's two input columns (2 x 12)
    assert g.weights_removed(g.group_of("pw1", 5).id, set()) == 8 + 18 + 24
    done, deviation = export_random_fraction(network, tmp_path / "export", fraction=0.5)
    assert deviation <= 1e-5
    compact = {layer.name: layer for layer in pycaffe.read_prototxt(done["prototxt"]).layer}
    assert compact["dw1"].convolution_param.group == compact["dw1"].convolution_param.num_output
    assert compact["dw2"].convolution_param.num_output == 2 * compact["dw2"].convolution_param.group
    # the last channel of a depthwise layer stays: whole groups may go, not all of them
    all_dw1 = {g.group_of("conv1", i).id for i in range(8)}
    assert not set(g.prunable(all_dw1 - {g.group_of("conv1", 0).id})) & {g.group_of("conv1", 0).id}


def test_bottleneck_residual_ties(caffe, tmp_path):
    network = Network.open(write(tmp_path, bottlenecks(), "bottleneck"))
    g = network.graph
    # the stem and b1_expand are summed: 16 tied pairs; b1's reduce and 3x3: 4 + 4; b2's reduce and
    # 3x3: 8 + 8; b2_proj and b2_expand are summed: 32 tied pairs
    assert len(g.groups) == 16 + 8 + 16 + 32
    assert g.group_of("stem", 2).channels == (Channel("stem", 2), Channel("b1_expand", 2))
    assert {c.layer for c in g.group_of("b2_proj", 0).channels} == {"b2_proj", "b2_expand"}
    # stem:2 takes its filter (27) and b1_expand's row (4), the input columns of b1_reduce (4),
    # b2_reduce (8) and b2_proj (32)
    assert g.weights_removed(g.group_of("stem", 2).id, set()) == 27 + 4 + 4 + 8 + 32
    _, deviation = export_random_fraction(network, tmp_path / "export")
    assert deviation <= 1e-5


def test_densenet_concat_chain(caffe, tmp_path):
    network = Network.open(write(tmp_path, densenet(), "densenet"))
    g = network.graph
    assert len(g.groups) == 8 + 4 + 4 + 8
    # conv0:1 is channel 1 of cat1 and of cat2: d1 and d2 read it (4 x 9 each), and trans (8)
    assert g.weights_removed(g.group_of("conv0", 1).id, set()) == 27 + 36 + 36 + 8
    # d2:0 is channel 12 of cat2: only the transition reads it
    assert [s.input_channel for s in g.group_of("d2", 0).consumers] == [12]
    assert {r.layer for r in g.group_of("conv0", 1).riders} == {"d1_pre_bn", "d1_pre_scale", "d2_pre_bn",
                                                                 "d2_pre_scale"}
    _, deviation = export_random_fraction(network, tmp_path / "export")
    assert deviation <= 1e-5


def test_old_style_input_fields(caffe, tmp_path):
    network = Network.open(write(tmp_path, OLD_STYLE, "old"))
    assert network.input_shape == (3, 12, 12)
    g = network.graph
    assert len(g.groups) == 6 + 5 and g.conv_weights(set()) == 6 * 27 + 5 * 54
    assert g.fc["ip"].block == 8 * 8
    head_ = network.head()
    assert head_.logits == "ip" and "no SoftmaxWithLoss or Softmax" in head_.note
    _, deviation = export_random_fraction(network, tmp_path / "export")
    assert deviation <= 1e-5



# ---- datasets the toolkit has not seen: an LMDB of Datums, an ImageData list of PNGs --------------

CLASSES = 7
NET = """name: "small"
%(data)s
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
  convolution_param { num_output: 6 kernel_size: 5 weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "p1" type: "Pooling" bottom: "c1" top: "p1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "c2" type: "Convolution" bottom: "p1" top: "c2"
  convolution_param { num_output: 8 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "fc" type: "InnerProduct" bottom: "c2" top: "fc"
  inner_product_param { num_output: 7 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" include { phase: TEST } }
"""
LMDB_LAYER = """layer { name: "data" type: "Data" top: "data" top: "label" include { phase: %(phase)s }
  transform_param { scale: 0.00390625 } data_param { source: "%(source)s" batch_size: %(batch)d backend: LMDB } }"""
IMAGES_LAYER = """layer { name: "data" type: "ImageData" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 32 mean_value: 104 mean_value: 117 mean_value: 123 scale: 0.0078125 }
  image_data_param { source: "%(source)s" root_folder: "%(root)s/" batch_size: %(batch)d } }"""


def images(rng, n, shape):
    """Pictures with some structure (a class-dependent bright square on noise), uint8 (N, C, H, W)."""
    x = rng.integers(0, 120, size=(n, *shape), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, size=n)
    for i, label in enumerate(labels):
        x[i, :, 2 + 2 * label:8 + 2 * label, 4:12] = 250
    return x, labels


def lmdb_of(path, x, labels):
    import caffe.io
    import lmdb
    with lmdb.open(str(path), map_size=1 << 26) as env, env.begin(write=True) as txn:
        for i, (image, label) in enumerate(zip(x, labels)):
            txn.put(b"%08d" % i, caffe.io.array_to_datum(image, int(label)).SerializeToString())
    return path


@pytest.fixture
def lmdb_net(caffe, tmp_path):
    """A train/test prototxt on two LMDBs of 1x28x28 Datums (7 classes), and filler weights."""
    rng = np.random.default_rng(0)
    train = lmdb_of(tmp_path / "train_lmdb", *images(rng, 90, (1, 28, 28)))
    test = lmdb_of(tmp_path / "test_lmdb", *images(rng, 60, (1, 28, 28)))
    data = LMDB_LAYER % dict(phase="TRAIN", source=train, batch=30) + "\n" + \
        LMDB_LAYER % dict(phase="TEST", source=test, batch=20)
    path = write(tmp_path, NET % dict(data=data), "lmdb_net")
    weights = tmp_path / "lmdb_net.caffemodel"
    pycaffe.load_net(path).save(str(weights))
    return path, weights, 3


@pytest.fixture
def images_net(caffe, tmp_path):
    """A TEST-only prototxt on an ImageData list of 3x40x40 PNGs read with crop 32 and mean values."""
    import skimage.io
    rng = np.random.default_rng(1)
    x, labels = images(rng, 40, (3, 40, 40))
    (tmp_path / "pngs").mkdir()
    lines = []
    for i, (image, label) in enumerate(zip(x, labels)):
        skimage.io.imsave(tmp_path / "pngs" / f"{i}.png", image.transpose(1, 2, 0), check_contrast=False)
        lines.append(f"{i}.png {label}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    data = IMAGES_LAYER % dict(source=tmp_path / "list.txt", root=tmp_path / "pngs", batch=10)
    path = write(tmp_path, NET % dict(data=data), "images_net")
    weights = tmp_path / "images_net.caffemodel"
    pycaffe.load_net(path).save(str(weights))
    return path, weights, 4


def caffe_reference(path, weights, batches):
    """What Caffe's own TEST-phase net computes on its own data layer: images, labels, logits."""
    net = pycaffe.load_net(path, weights)
    x, y, logits = [], [], []
    for _ in range(batches):
        net.forward()
        x.append(net.blobs["data"].data.copy())
        y.append(net.blobs["label"].data.copy())
        logits.append(net.blobs["fc"].data.copy())
    return np.concatenate(x), np.concatenate(y).astype(int), np.concatenate(logits)


def cross_entropy(logits, y):
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))


@pytest.mark.parametrize("net", ["lmdb_net", "images_net"])
def test_evaluate_agrees_with_caffes_own_data_layer(request, net):
    path, weights, batches = request.getfixturevalue(net)
    x, y, logits = caffe_reference(path, weights, batches)
    network = Network.open(path)
    session = Session(network, weights, open_dataset(network, progress=False, holdout=False))
    np.testing.assert_array_equal(session.dataset.test.x, x)           # the records, transformed as Caffe does
    np.testing.assert_array_equal(session.dataset.test.y, y)
    np.testing.assert_allclose(session.logits(x), logits, rtol=1e-5, atol=1e-6)
    scores = evaluation(path, weights, data=None)
    assert scores["images"] == len(y) and session.classes == CLASSES
    assert scores["top1"] == pytest.approx(np.mean(logits.argmax(axis=1) == y), abs=1e-6)
    assert scores["loss"] == pytest.approx(cross_entropy(logits, y), rel=1e-5)


def test_validation_of_a_single_source_is_held_out(images_net):
    """With no training source, pruning's validation images are drawn from the test source and kept
    out of its test split; every image is in exactly one of the two, as Caffe's layer reads it."""
    path, weights, batches = images_net
    x, y, _ = caffe_reference(path, weights, batches)
    with pytest.raises(DataError, match=r"images_net.prototxt has no TRAIN-phase data layer: .*--val-from test"):
        open_dataset(Network.open(path), progress=False)
    data = open_dataset(Network.open(path), progress=False, val_from="test")
    assert data.sources.startswith("validation 8 images from the test source (--val-from test), test 32 images")
    val = data.validation
    assert len(val.y) == 8 and len(data.test.y) == 32      # one fifth, as CIFAR-10's 10,000 of 50,000
    rows = {tuple(row.ravel()[:64]): i for i, row in enumerate(x)}
    picked = [rows[tuple(row.ravel()[:64])] for row in np.concatenate([val.x, data.test.x])]
    assert sorted(picked) == list(range(len(y)))


@pytest.mark.parametrize("net", ["lmdb_net", "images_net"])
def test_prune_with_a_metric_on_these_datasets(request, tmp_path, net):
    path, weights, batches = request.getfixturevalue(net)
    config = pruning.Config(net=str(path), weights=str(weights), metric="weights/x/l2/count", test_size=8,
                            batch_size=16, max_steps=4, max_drop=None, val_from="test")
    steps = pruning.Run(config, tmp_path / "run", progress=False).run()
    run = pruning.Run(config, tmp_path / "again", progress=False)
    x, y = run.test.x, run.test.y
    logits = run.session.logits(x)
    assert steps[0]["test"]["top1"] == pytest.approx(np.mean(logits.argmax(axis=1) == y), abs=1e-6)
    assert len(steps) == 5 and len(set(pruned_of(steps[1:]))) == 4
    # mean squares of weights on the filler weights, by hand: the smallest filter goes first
    w = {name: run.net.params[name][0].data.astype(np.float64) for name in ("c1", "c2")}
    scores = {(name, o): float(np.sum(w[name][o] ** 2) / w[name][o].size) for name in w for o in range(len(w[name]))}
    first = min(scores, key=scores.get)
    assert steps[1]["channels"] == [list(first)]
    run.close()


def test_a_batch_that_cannot_fit_is_refused_before_caffe_allocates_it(caffe, write_net):
    """3x1024x1024 images into 16 feature maps and MAX pooling: (3 + 16 + 2 x 16/4) x 1024² floats
    per image (the input, the map, the pooled top and its indices), 108 MiB; a batch of 4096 needs
    432 GiB, more than any machine here has, and is refused in one line naming the net."""
    path = write_net("""
name: "big"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 1024 dim: 1024 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 16 kernel_size: 3 pad: 1 } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 10 } }
""")
    network = Network.open(path)
    per_image = network.shapes(what="bytes_per_image")
    assert per_image == 4 * ((3 + 16 + 2 * 16 // 4) * 1024 * 1024 + 10)
    with pytest.raises(InputError, match=r"net.prototxt: its blobs take 108.0 MiB per image, 432.0 GiB at "
                                                 r"batch 4096, more than the .* GiB available; use --batch-size \d+"):
        Session(network, batch_size=4096)

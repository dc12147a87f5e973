"""Deploy networks for the export and runtime tests, and random weights for them (no tests here).

- The project's six networks: ``builtin(NAME)`` is prototxt/NAME/deploy.prototxt.
- Caffe's own model-zoo deploy files (GoogLeNet, AlexNet, ...): ``caffe_source(relpath, dest)``
  reads them from the Caffe source tree the build fetched (an unpacked tree under
  ~/.cache/caffe-prune, else the verified source tarball in its downloads/), and skips the test
  with the reason when neither is there.
- Three ImageNet architectures declared with pycaffe's NetSpec from their papers (He et al. 2016,
  Sandler et al. 2018, Huang et al. 2017), written here, not copied from any prototxt:
  ``resnet50``, ``mobilenet_v2``, ``densenet121``, each with ``input_size`` and a width knob so that
  a test can run them at 64x64 and a fraction of the channels.
- ``random_net(prototxt)``: Caffe's own fillers (seeded), then ``randomize``: a seeded He-normal
  for every blob Caffe's default constant-0 filler left zero (Caffe's deploy files have no fillers),
  and BatchNorm/Scale set to non-trivial values, the BatchNorm statistics calibrated on a forward
  of random images and stored multiplied by a scale factor far from 1, as a trained Caffe model
  stores them.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BUILTIN = ("LeNet-5", "CIFAR10", "ResNet-20", "NIN", "AlexNet", "SqueezeNet")
CACHE = Path(os.environ.get("CAFFE_PRUNE_CACHE") or Path.home() / ".cache" / "caffe-prune")
SOURCE_TARBALL = "caffe_*.orig.tar.gz"


def builtin(name: str) -> Path:
    return REPO / "prototxt" / name / "deploy.prototxt"


def caffe_source(relpath: str, dest: Path) -> Path:
    """``relpath`` (e.g. models/bvlc_googlenet/deploy.prototxt) from the Caffe source tree under
    the cache: an unpacked tree if there is one, else extracted from the source tarball into
    ``dest``; the test is skipped, saying why, when neither exists."""
    if CACHE.is_dir():
        for root in [CACHE, *CACHE.glob("*"), *CACHE.glob("*/*")]:        # an unpacked tree, 2 levels down
            if (root / relpath).is_file():
                return root / relpath
        for tarball in sorted((CACHE / "downloads").glob(SOURCE_TARBALL)):
            with tarfile.open(tarball) as tar:
                members = [m for m in tar.getmembers() if m.isfile() and
                           (m.name == relpath or m.name.endswith("/" + relpath))]
                if members:
                    target = dest / relpath
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(members[0]).read())
                    return target
    pytest.skip(f"{relpath}: no Caffe source tree or source tarball under {CACHE} (`make setup` fetches it)")


def write(net_param, path: Path) -> Path:
    path.write_text(str(net_param))
    return path


# ---------------------------------------------------------------------------------------------
# NetSpec architectures

def _spec(input_size: int):
    import caffe
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape=dict(dim=[1, 3, input_size, input_size]))
    return n


def _conv_bn(n, name, bottom, channels, kernel, stride=1, pad=0, group=1, relu=True, bn=None):
    """Convolution (no bias), BatchNorm and Scale in place, optionally ReLU in place: the unit all
    three architectures repeat. ``bn``: the BatchNorm/Scale name stem (default ``name``)."""
    from caffe import layers as L
    bn = bn or name
    conv = L.Convolution(bottom, num_output=channels, kernel_size=kernel, stride=stride, pad=pad,
                         group=group, bias_term=False, weight_filler=dict(type="msra"))
    setattr(n, name, conv)
    setattr(n, f"bn_{bn}", L.BatchNorm(conv, in_place=True))
    setattr(n, f"scale_{bn}", L.Scale(conv, in_place=True, bias_term=True))
    if relu:
        setattr(n, f"{name}_relu", L.ReLU(conv, in_place=True))
    return conv


def _head(n, bottom, classes, kernel=None):
    from caffe import layers as L, params as P
    pool = dict(global_pooling=True) if kernel is None else dict(kernel_size=kernel, stride=1)
    n.pool5 = L.Pooling(bottom, pool=P.Pooling.AVE, **pool)
    n.fc = L.InnerProduct(n.pool5, num_output=classes, weight_filler=dict(type="msra"))
    n.prob = L.Softmax(n.fc)


def resnet50(input_size: int = 224, width: float = 1.0, classes: int = 1000):
    """ResNet-50 (He et al. 2016, Table 1; the layout of the authors' Caffe release): 7x7/2 conv,
    3x3/2 max pool (Caffe's ceil rounding: 112 -> 56), four stages of [3, 4, 6, 3] bottlenecks
    1x1 -> 3x3 -> 1x1 (x4 expansion) with BatchNorm + Scale after every convolution, the stride on
    the first 1x1 of a stage and a 1x1 projection shortcut on its first block; 7x7 average pooling
    (input_size / 32), fc, Softmax. ``width`` scales every channel count."""
    from caffe import layers as L, params as P
    n = _spec(input_size)
    base = max(4, int(64 * width))
    x = _conv_bn(n, "conv1", n.data, base, 7, stride=2, pad=3)
    n.pool1 = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    x = n.pool1
    for stage, (blocks, mid) in enumerate(zip((3, 4, 6, 3), (base, 2 * base, 4 * base, 8 * base)), 2):
        for i in range(blocks):
            block = f"{stage}{chr(ord('a') + i)}"
            stride = 2 if i == 0 and stage > 2 else 1
            if i == 0:
                shortcut = _conv_bn(n, f"res{block}_branch1", x, 4 * mid, 1, stride, relu=False, bn=f"{block}_branch1")
            else:
                shortcut = x
            y = _conv_bn(n, f"res{block}_branch2a", x, mid, 1, stride, bn=f"{block}_branch2a")
            y = _conv_bn(n, f"res{block}_branch2b", y, mid, 3, pad=1, bn=f"{block}_branch2b")
            y = _conv_bn(n, f"res{block}_branch2c", y, 4 * mid, 1, relu=False, bn=f"{block}_branch2c")
            setattr(n, f"res{block}", L.Eltwise(shortcut, y))
            x = getattr(n, f"res{block}")
            setattr(n, f"res{block}_relu", L.ReLU(x, in_place=True))
    _head(n, x, classes, kernel=input_size // 32)
    proto = n.to_proto()
    proto.name = "ResNet-50"
    return proto


def _divisible(value: float, divisor: int = 8) -> int:
    """MobileNet v2's channel rounding (to a multiple of 8, never below 90% of the value)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def mobilenet_v2(input_size: int = 224, width: float = 1.0, classes: int = 1000):
    """MobileNet v2 (Sandler et al. 2018, Table 2): 3x3/2 conv 32, then inverted residuals
    (t, c, n, s) = (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1):
    1x1 expansion by t, 3x3 depthwise (a Convolution with group = channels), linear 1x1
    projection, an Eltwise sum when stride 1 keeps the width; 1x1 conv 1280, global average
    pooling, fc, Softmax. ReLU stands for ReLU6, which stock Caffe 1.0 has no layer for (the
    published Caffe ports use ReLU too)."""
    from caffe import layers as L
    n = _spec(input_size)
    channels = _divisible(32 * width)
    x = _conv_bn(n, "conv1", n.data, channels, 3, stride=2, pad=1)
    settings = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))
    for stage, (t, c, repeats, s) in enumerate(settings, 2):
        out = _divisible(c * width)
        for i in range(repeats):
            name, stride = f"conv{stage}_{i + 1}", s if i == 0 else 1
            y = x
            if t != 1:
                y = _conv_bn(n, f"{name}/expand", y, channels * t, 1)
            y = _conv_bn(n, f"{name}/dwise", y, channels * t, 3, stride=stride, pad=1, group=channels * t)
            y = _conv_bn(n, f"{name}/linear", y, out, 1, relu=False)
            if stride == 1 and channels == out:
                setattr(n, f"block{stage}_{i + 1}", L.Eltwise(x, y))
                y = getattr(n, f"block{stage}_{i + 1}")
            x, channels = y, out
    x = _conv_bn(n, "conv_last", x, _divisible(1280 * max(1.0, width)), 1)
    _head(n, x, classes)
    proto = n.to_proto()
    proto.name = "MobileNet-v2"
    return proto


def densenet121(input_size: int = 224, growth: int = 32, blocks=(6, 12, 24, 16), classes: int = 1000):
    """DenseNet-121 (Huang et al. 2017, Table 1): 7x7/2 conv 2k, 3x3/2 max pool with pad 1
    (Caffe's ceil rounding: 112 -> 57, not 56), dense blocks of [6, 12, 24, 16] layers
    BN-Scale-ReLU-1x1 conv 4k - BN-Scale-ReLU-3x3 conv k, each Concat-ed to the block's features,
    transitions BN-Scale-ReLU-1x1 conv (half the features) - 2x2/2 average pooling (ceil rounding on
    odd sizes, whose extra window Caffe's divisor clips); final BN-Scale-ReLU, global average
    pooling, fc, Softmax. ``growth`` is k (32 in the paper)."""
    from caffe import layers as L, params as P
    n = _spec(input_size)
    features = 2 * growth
    x = _conv_bn(n, "conv1", n.data, features, 7, stride=2, pad=3)
    n.pool1 = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2, pad=1)
    x = n.pool1

    def bn_relu(name, bottom):
        # BatchNorm reads the shared features, so it is not in place; Scale and ReLU are
        setattr(n, f"{name}/bn", L.BatchNorm(bottom))
        y = getattr(n, f"{name}/bn")
        setattr(n, f"{name}/scale", L.Scale(y, in_place=True, bias_term=True))
        setattr(n, f"{name}/relu", L.ReLU(y, in_place=True))
        return y

    for b, layers in enumerate(blocks, 2):
        for i in range(layers):
            name = f"conv{b}_{i + 1}"
            y = bn_relu(f"{name}/x1", x)
            setattr(n, f"{name}/x1", L.Convolution(y, num_output=4 * growth, kernel_size=1, bias_term=False,
                                                    weight_filler=dict(type="msra")))
            y = bn_relu(f"{name}/x2", getattr(n, f"{name}/x1"))
            setattr(n, f"{name}/x2", L.Convolution(y, num_output=growth, kernel_size=3, pad=1, bias_term=False,
                                                    weight_filler=dict(type="msra")))
            setattr(n, f"concat_{b}_{i + 1}", L.Concat(x, getattr(n, f"{name}/x2")))
            x, features = getattr(n, f"concat_{b}_{i + 1}"), features + growth
        if b < 1 + len(blocks):
            features //= 2
            y = bn_relu(f"conv{b}_blk", x)
            setattr(n, f"conv{b}_blk", L.Convolution(y, num_output=features, kernel_size=1, bias_term=False,
                                                      weight_filler=dict(type="msra")))
            setattr(n, f"pool{b}", L.Pooling(getattr(n, f"conv{b}_blk"), pool=P.Pooling.AVE, kernel_size=2, stride=2))
            x = getattr(n, f"pool{b}")
    _head(n, bn_relu("conv_final", x), classes)
    proto = n.to_proto()
    proto.name = "DenseNet-121"
    return proto


# ---------------------------------------------------------------------------------------------
# random weights

def random_net(prototxt: Path, seed: int = 0, calibrate_batch: int = 2):
    """A caffe.Net of ``prototxt`` in TEST with Caffe's fillers seeded by ``seed``, then
    ``randomize``-d."""
    import caffe
    caffe.set_mode_cpu()
    caffe.set_random_seed(seed)
    net = caffe.Net(str(prototxt), caffe.TEST)
    randomize(net, seed, calibrate_batch)
    return net


def randomize(net, seed: int = 0, calibrate_batch: int = 2) -> None:
    """Blobs that Caffe's default constant-0 filler left zero get a He-normal (weights) or
    N(0, 0.1) (biases); Scale gets gamma in U(0.5, 1.5) and beta N(0, 0.2); every BatchNorm gets
    the mean and variance of its input on a forward of ``calibrate_batch`` random images (the
    mean shifted by 0.1 sd, the variance times U(0.8, 1.25): not the batch's own), stored times a
    scale factor in U(5, 1000): the three-blob form of a trained model, so that a converter that
    forgot to divide by the factor, or to add eps, is off by orders of magnitude."""
    rng = np.random.default_rng(seed)
    names = list(net._layer_names)
    kinds = {name: layer.type for name, layer in zip(names, net.layers)}
    for name, blobs in net.params.items():
        kind = kinds[name]
        if kind == "Scale":
            blobs[0].data[...] = rng.uniform(0.5, 1.5, blobs[0].data.shape)
            if len(blobs) > 1:
                blobs[1].data[...] = rng.normal(0, 0.2, blobs[1].data.shape)
            continue
        if kind == "BatchNorm":
            continue
        for blob in blobs:
            if not blob.data.any():
                shape = blob.data.shape
                if len(shape) >= 2:
                    blob.data[...] = rng.normal(0, np.sqrt(2.0 / max(1, np.prod(shape[1:]))), shape)
                else:
                    blob.data[...] = rng.normal(0, 0.1, shape)
    batch_norms = [i for i, name in enumerate(names) if kinds[name] == "BatchNorm"]
    if not batch_norms:
        return
    data = net.inputs[0]
    shape = net.blobs[data].data.shape
    net.blobs[data].reshape(calibrate_batch, *shape[1:])
    net.reshape()
    net.blobs[data].data[...] = rng.standard_normal(net.blobs[data].data.shape)
    done = -1
    bottoms = {name: [net._blob_names[j] for j in net._bottom_ids(i)] for i, name in enumerate(names)}
    for i in batch_norms:
        if i - 1 > done:
            net.forward(start=names[done + 1], end=names[i - 1])
        x = net.blobs[bottoms[names[i]][0]].data
        axes = (0,) + tuple(range(2, x.ndim))
        mean = x.mean(axis=axes) + 0.1 * x.std(axis=axes) * rng.standard_normal(x.shape[1])
        var = x.var(axis=axes) * rng.uniform(0.8, 1.25, x.shape[1]) + 1e-3
        factor = rng.uniform(5, 1000)
        blobs = net.params[names[i]]
        blobs[0].data[...] = mean * factor
        blobs[1].data[...] = var * factor
        blobs[2].data[...] = factor
        net.forward(start=names[i], end=names[i])
        done = i
    net.blobs[data].reshape(*shape)
    net.reshape()


def params_of(net) -> dict:
    """{layer: [arrays]} as the exporter takes them."""
    return {name: [blob.data for blob in blobs] for name, blobs in net.params.items()}


def forward(net, x: np.ndarray, blobs=()) -> dict:
    """Caffe's forward of ``x`` (any batch): copies of its outputs and of ``blobs``."""
    data = net.inputs[0]
    if net.blobs[data].data.shape != x.shape:
        net.blobs[data].reshape(*x.shape)
        net.reshape()
    net.blobs[data].data[...] = x
    out = net.forward()
    result = {name: value.copy() for name, value in out.items()}
    result.update({name: net.blobs[name].data.copy() for name in blobs})
    return result


def images(shape: tuple, batch: int, seed: int = 0) -> np.ndarray:
    """Seeded N(0, 1) images, float32 NCHW."""
    return np.random.default_rng(seed).standard_normal((batch,) + tuple(shape)).astype(np.float32)


def logits_blob(net_param):
    """The blob the (last) Softmax reads, None without one."""
    for layer in reversed(net_param.layer):
        if layer.type == "Softmax":
            return layer.bottom[0]
    return None


def without_softmax(net_param):
    """A copy of the net without its Softmax layers: the logits become its outputs (a saturated
    Softmax hides differences)."""
    from caffe.proto import caffe_pb2
    copy = caffe_pb2.NetParameter()
    copy.CopyFrom(net_param)
    del copy.layer[:]
    copy.layer.extend(layer for layer in net_param.layer if layer.type != "Softmax")
    return copy

"""The paper's six CIFAR-10 networks, each declared once with pycaffe's NetSpec.

papers/004 (Table 1) prunes LeNet-5, CIFAR10, ResNet-20, NIN, AlexNet and SqueezeNet. Each is one
builder below that takes the data top and returns the logits top; every form Caffe runs is derived
from it: ``train_test`` (LMDB ``Data`` layers for both phases, ``SoftmaxWithLoss`` and top-1/top-5
``Accuracy``), ``deploy`` (an ``Input`` layer and a ``Softmax``), the TEST ``transform`` the fed data
must reproduce, and the ``solver``. ``tools/generate_prototxt.py`` writes them under ``prototxt/``.

Where the authors published a prototxt (their release's ``*-CIFAR10`` directories: LeNet-5, ResNet-20, AlexNet,
SqueezeNet) the layers copy it name for name (so the published caffemodels load by name), shape for
shape, filler for filler, minus what only the authors' Caffe fork knows: ``convolution_mask_param``
and the extra mask ``param {}`` entries (a stock Convolution takes at most 2 param specs). CIFAR10 is
Caffe's own ``examples/cifar10/cifar10_quick_train_test.prototxt``; NIN is the Caffe Model Zoo's
Network in Network for CIFAR-10 (gist mavenlin/e56253735ef32c3c296d).
"""
from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format

from caffe_prune import pycaffe
from caffe_prune.data.transform import Transform
from caffe_prune.errors import InputError

NETWORKS = ("LeNet-5", "CIFAR10", "ResNet-20", "NIN", "AlexNet", "SqueezeNet")

IMAGE_SHAPE = (3, 32, 32)     # CIFAR-10, channels in BGR order (caffe_prune.data.cifar10)
BATCH_SIZE = 128              # papers/004 section 5.1.3 and every published data layer
SOURCES = {"train": "{train_lmdb}", "test": "{test_lmdb}"}   # placeholders the train command fills
SCALE = 0.00390625            # 1/256, as in every published transform_param
# The authors' mean_value: ImageNet's R, G, B means, which Caffe subtracts from channels 0, 1, 2 of
# the image it decoded, i.e. from B, G, R. Copied as published, not "corrected".
MEAN_VALUES = [123.675, 116.28, 103.53]

# The TRAIN layer's transform_param; TEST uses the same without mirror (random flips are training
# augmentation; AlexNet's and SqueezeNet's published TEST layers do mirror, we do not).
TRAIN_TRANSFORMS = {
    "LeNet-5": dict(scale=SCALE, mirror=True),                          # LeNet-5 masked.prototxt
    # Our choice: cifar10_quick subtracts a mean_file computed from the LMDB; we use the authors' values.
    "CIFAR10": dict(scale=SCALE, mean_value=MEAN_VALUES, mirror=True),
    # ResNet-20 masked.prototxt has no mirror (the caffemodel's embedded TRAIN layer did mirror).
    "ResNet-20": dict(scale=SCALE, mean_value=MEAN_VALUES),
    # Our choice: the Model Zoo NIN was trained on GCN+ZCA-whitened data, which transform_param cannot express.
    "NIN": dict(scale=SCALE, mean_value=MEAN_VALUES, mirror=True),
    "AlexNet": dict(scale=SCALE, mean_value=MEAN_VALUES, mirror=True),     # AlexNet original.prototxt
    "SqueezeNet": dict(scale=SCALE, mean_value=MEAN_VALUES, mirror=True),  # SqueezeNet original.prototxt
}

# SGD schedules as plain data. The authors published only their retraining solvers
# (solver-gpu.prototxt beside each reference prototxt); no schedule for training from scratch exists.
# test_iter 100 x batch 128 reads 12,800 test images: Caffe's Data layer wraps around, as it did for them.
_PUBLISHED_SOLVER = dict(base_lr=0.001, momentum=0.9, weight_decay=5e-4, lr_policy="fixed", max_iter=20000,
                         test_interval=400, test_iter=100)
SOLVERS = {
    "LeNet-5": _PUBLISHED_SOLVER,                           # LeNet-5-CIFAR10/solver-gpu.prototxt
    "CIFAR10": _PUBLISHED_SOLVER,                           # no published solver: the same (our choice)
    "ResNet-20": dict(_PUBLISHED_SOLVER, weight_decay=1e-4),  # ResNet-20-CIFAR10/solver-gpu.prototxt
    "NIN": _PUBLISHED_SOLVER,                               # no published solver: the same (our choice)
    "AlexNet": _PUBLISHED_SOLVER,                           # AlexNet-CIFAR10/solver-gpu.prototxt
    "SqueezeNet": _PUBLISHED_SOLVER,                        # SqueezeNet-CIFAR10/solver-gpu.prototxt
}
# What every published solver-gpu.prototxt also sets, except solver_mode: GPU (pycaffe.set_mode decides)
# and their snapshot_prefix (ours is snapshots/<NET>, in solver()).
SOLVER_COMMON = dict(display=100, snapshot=500, test_initialization=True)


def _dsl():
    """pycaffe's NetSpec vocabulary (layers, params), imported through caffe_prune.pycaffe."""
    cf = pycaffe.caffe()
    return cf.layers, cf.params


def _lr(*mults):
    """param specs: one (lr_mult, decay_mult) pair, or a bare lr_mult, per learnable blob."""
    return [dict(lr_mult=m[0], decay_mult=m[1]) if isinstance(m, tuple) else dict(lr_mult=m) for m in mults]


# ---- the six builders: (NetSpec, data top) -> logits top ------------------------------------------

def lenet5(n, data):
    """LeNet-5 as the authors trained it: no ReLU after conv1 or conv2, only after ip1."""
    L, P = _dsl()
    xavier = dict(param=_lr(1, 2), weight_filler=dict(type="xavier"), bias_filler=dict(type="constant"))
    n.conv1 = L.Convolution(data, num_output=20, kernel_size=5, stride=1, **xavier)
    n.pool1 = L.Pooling(n.conv1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.conv2 = L.Convolution(n.pool1, num_output=50, kernel_size=5, stride=1, **xavier)
    n.pool2 = L.Pooling(n.conv2, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.ip1 = L.InnerProduct(n.pool2, num_output=500, **xavier)
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, num_output=10, **xavier)
    return n.ip2


def cifar10_quick(n, data):
    """Caffe's cifar10_quick: pool1 comes before relu1, and no ReLU between ip1 and ip2."""
    L, P = _dsl()

    def filled(std):
        return dict(param=_lr(1, 2), weight_filler=dict(type="gaussian", std=std),
                    bias_filler=dict(type="constant"))
    conv = dict(pad=2, kernel_size=5, stride=1)
    n.conv1 = L.Convolution(data, num_output=32, **conv, **filled(0.0001))
    n.pool1 = L.Pooling(n.conv1, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    n.relu1 = L.ReLU(n.pool1, in_place=True)
    n.conv2 = L.Convolution(n.relu1, num_output=32, **conv, **filled(0.01))
    n.relu2 = L.ReLU(n.conv2, in_place=True)
    n.pool2 = L.Pooling(n.relu2, pool=P.Pooling.AVE, kernel_size=3, stride=2)
    n.conv3 = L.Convolution(n.pool2, num_output=64, **conv, **filled(0.01))
    n.relu3 = L.ReLU(n.conv3, in_place=True)
    n.pool3 = L.Pooling(n.relu3, pool=P.Pooling.AVE, kernel_size=3, stride=2)
    n.ip1 = L.InnerProduct(n.pool3, num_output=64, **filled(0.1))
    n.ip2 = L.InnerProduct(n.ip1, num_output=10, **filled(0.1))
    return n.ip2


def resnet20(n, data):
    """ResNet-20 (He et al. 2016, CIFAR-10 variant) as the authors built it: every convolution is
    followed by BatchNorm + Scale; the first block of groups 1 and 2 halves the map with a stride-2
    conv0 and a stride-2 1x1 *projection* shortcut ``_proj`` (not the paper's option A zero-padding),
    so each group's width change costs weights; the block's ReLU follows the Eltwise sum."""
    L, P = _dsl()

    def conv_bn(name, bottom, num_output, kernel_size, stride, pad, relu=True):
        n[name] = L.Convolution(bottom, num_output=num_output, pad=pad, kernel_size=kernel_size, stride=stride,
                                weight_filler=dict(type="msra"), param=_lr((1, 1), (1, 1)))
        n[name + "_bn"] = L.BatchNorm(n[name], in_place=True, param=_lr((0, 0), (0, 0), (0, 0)))
        n[name + "_scale"] = L.Scale(n[name + "_bn"], in_place=True, bias_term=True)
        if not relu:
            return n[name + "_scale"]
        n[name + "_relu"] = L.ReLU(n[name + "_scale"], in_place=True)
        return n[name + "_relu"]

    x = conv_bn("first_conv", data, 16, 3, 1, 1)
    for group, width in enumerate((16, 32, 64)):
        for block in range(3):
            name = f"group{group}_block{block}"
            downsample = group > 0 and block == 0
            y = conv_bn(name + "_conv0", x, width, 3, 2 if downsample else 1, 1)
            y = conv_bn(name + "_conv1", y, width, 3, 1, 1, relu=False)
            if downsample:   # the reference lists the projection first in these two sums
                shortcut = conv_bn(name + "_proj", x, width, 1, 2, 0, relu=False)
                n[name + "_sum"] = L.Eltwise(shortcut, y, operation=P.Eltwise.SUM)
            else:
                n[name + "_sum"] = L.Eltwise(y, x, operation=P.Eltwise.SUM)
            n[name + "_relu"] = L.ReLU(n[name + "_sum"], in_place=True)
            x = n[name + "_relu"]
    n.global_avg_pool = L.Pooling(x, pool=P.Pooling.AVE, global_pooling=True)
    n.fc = L.InnerProduct(n.global_avg_pool, num_output=10, param=_lr((1, 1), (2, 0)),
                          weight_filler=dict(type="msra"), bias_filler=dict(type="constant", value=0))
    return n.fc


def nin(n, data):
    """Network in Network for CIFAR-10 (Lin et al. 2013) as in the Caffe Model Zoo: three mlpconv
    stages (a spatial conv, then two 1x1 "cccp" convs, each followed by a ReLU, cccp6 included) and
    global average pooling over the 10 maps of cccp6 as the classifier."""
    L, P = _dsl()
    zoo = dict(param=_lr((1, 1), (2, 0)), weight_filler=dict(type="gaussian", std=0.05),
               bias_filler=dict(type="constant", value=0))

    def conv_relu(name, relu_name, bottom, num_output, kernel_size, pad=0):
        n[name] = L.Convolution(bottom, num_output=num_output, pad=pad, kernel_size=kernel_size, **zoo)
        n[relu_name] = L.ReLU(n[name], in_place=True)
        return n[relu_name]

    x = conv_relu("conv1", "relu1", data, 192, 5, pad=2)
    x = conv_relu("cccp1", "relu_cccp1", x, 160, 1)
    x = conv_relu("cccp2", "relu_cccp2", x, 96, 1)
    n.pool1 = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    n.drop3 = L.Dropout(n.pool1, in_place=True, dropout_ratio=0.5)
    x = conv_relu("conv2", "relu2", n.drop3, 192, 5, pad=2)
    x = conv_relu("cccp3", "relu_cccp3", x, 192, 1)
    x = conv_relu("cccp4", "relu_cccp4", x, 192, 1)
    n.pool2 = L.Pooling(x, pool=P.Pooling.AVE, kernel_size=3, stride=2)
    n.drop6 = L.Dropout(n.pool2, in_place=True, dropout_ratio=0.5)
    x = conv_relu("conv3", "relu3", n.drop6, 192, 3, pad=1)
    x = conv_relu("cccp5", "relu_cccp5", x, 192, 1)
    x = conv_relu("cccp6", "relu_cccp6", x, 10, 1)
    # The Model Zoo writes kernel_size 8, stride 1: the same average over the 8x8 maps of cccp6.
    n.pool3 = L.Pooling(x, pool=P.Pooling.AVE, global_pooling=True)
    # Deviation from the Model Zoo (no parameters): logits (N, 10) like the other five, not (N, 10, 1, 1).
    n.pool3_flat = L.Flatten(n.pool3)
    return n.pool3_flat


def alexnet(n, data):
    """The authors' AlexNet for 32x32 inputs: conv1 is 3x3 stride 1 with no pool1; conv2, conv4 and
    conv5 keep AlexNet's two groups (each output channel sees half the input channels)."""
    L, P = _dsl()
    lr = _lr((1, 1), (2, 0))

    def gauss(bias):
        return dict(param=lr, weight_filler=dict(type="gaussian", std=0.01),
                    bias_filler=dict(type="constant", value=bias))
    lrn = dict(local_size=5, alpha=0.0001, beta=0.75)
    n.conv1 = L.Convolution(data, num_output=96, kernel_size=3, stride=1, param=lr,
                            weight_filler=dict(type="positive_unitball"),
                            bias_filler=dict(type="constant", value=0))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.norm1 = L.LRN(n.relu1, **lrn)
    n.conv2 = L.Convolution(n.norm1, num_output=256, pad=2, kernel_size=5, group=2, **gauss(0.1))
    n.relu2 = L.ReLU(n.conv2, in_place=True)
    n.norm2 = L.LRN(n.relu2, **lrn)
    n.pool2 = L.Pooling(n.norm2, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    n.conv3 = L.Convolution(n.pool2, num_output=384, pad=1, kernel_size=3, **gauss(0))
    n.relu3 = L.ReLU(n.conv3, in_place=True)
    n.conv4 = L.Convolution(n.relu3, num_output=384, pad=1, kernel_size=3, group=2, **gauss(0.1))
    n.relu4 = L.ReLU(n.conv4, in_place=True)
    n.conv5 = L.Convolution(n.relu4, num_output=256, pad=1, kernel_size=3, group=2, **gauss(0.1))
    n.relu5 = L.ReLU(n.conv5, in_place=True)
    n.pool5 = L.Pooling(n.relu5, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    n.fc6 = L.InnerProduct(n.pool5, num_output=4096, **gauss(0.1))
    n.relu6 = L.ReLU(n.fc6, in_place=True)
    n.drop6 = L.Dropout(n.relu6, in_place=True, dropout_ratio=0.5)
    n.fc7 = L.InnerProduct(n.drop6, num_output=4096, **gauss(0.1))
    n.relu7 = L.ReLU(n.fc7, in_place=True)
    n.drop7 = L.Dropout(n.relu7, in_place=True, dropout_ratio=0.5)
    n.fc8 = L.InnerProduct(n.drop7, num_output=10, **gauss(0))
    return n.fc8


def squeezenet(n, data):
    """The authors' SqueezeNet (v1.1 layout) for CIFAR-10: eight fire modules, each a 1x1 squeeze
    feeding 1x1 and 3x3 expands whose outputs are concatenated along channels; conv10 keeps
    ImageNet's 1000 outputs and an InnerProduct maps them to 10 classes. No param specs: Caffe's
    defaults (lr_mult 1, decay_mult 1 for weights and biases)."""
    L, P = _dsl()
    xavier = dict(weight_filler=dict(type="xavier"))

    def fire(index, bottom, squeeze, expand):
        f = f"fire{index}/"
        n[f + "squeeze1x1"] = L.Convolution(bottom, num_output=squeeze, kernel_size=1, **xavier)
        n[f + "relu_squeeze1x1"] = L.ReLU(n[f + "squeeze1x1"], in_place=True)
        n[f + "expand1x1"] = L.Convolution(n[f + "relu_squeeze1x1"], num_output=expand, kernel_size=1, **xavier)
        n[f + "relu_expand1x1"] = L.ReLU(n[f + "expand1x1"], in_place=True)
        n[f + "expand3x3"] = L.Convolution(n[f + "relu_squeeze1x1"], num_output=expand, pad=1, kernel_size=3,
                                           **xavier)
        n[f + "relu_expand3x3"] = L.ReLU(n[f + "expand3x3"], in_place=True)
        n[f + "concat"] = L.Concat(n[f + "relu_expand1x1"], n[f + "relu_expand3x3"])
        return n[f + "concat"]

    n.conv1 = L.Convolution(data, num_output=64, kernel_size=3, stride=2,
                            weight_filler=dict(type="positive_unitball"))
    n.relu_conv1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu_conv1, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    x = fire(2, n.pool1, 16, 64)
    x = fire(3, x, 16, 64)
    n.pool3 = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    x = fire(4, n.pool3, 32, 128)
    x = fire(5, x, 32, 128)
    n.pool5 = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    x = fire(6, n.pool5, 48, 192)
    x = fire(7, x, 48, 192)
    x = fire(8, x, 64, 256)
    x = fire(9, x, 64, 256)
    n.drop9 = L.Dropout(x, in_place=True, dropout_ratio=0.5)
    n.conv10 = L.Convolution(n.drop9, num_output=1000, kernel_size=1,
                             weight_filler=dict(type="gaussian", mean=0.0, std=0.01))
    n.relu_conv10 = L.ReLU(n.conv10, in_place=True)
    n.ip = L.InnerProduct(n.relu_conv10, num_output=10, weight_filler=dict(type="gaussian", std=0.1),
                          bias_filler=dict(type="constant", value=0))
    return n.ip


BUILDERS = {"LeNet-5": lenet5, "CIFAR10": cifar10_quick, "ResNet-20": resnet20, "NIN": nin,
            "AlexNet": alexnet, "SqueezeNet": squeezenet}


def _builder(name):
    if name not in BUILDERS:
        raise InputError(f"unknown network {name!r}; known networks: {', '.join(NETWORKS)}")
    return BUILDERS[name]


# ---- the forms ------------------------------------------------------------------------------------

def _data_layer(name, phase):
    """A NetSpec holding the LMDB Data layer (tops data, label) of one phase; TEST never mirrors."""
    L, P = _dsl()
    transform = dict(TRAIN_TRANSFORMS[name])
    if phase == "test":
        transform.pop("mirror", None)
    n = pycaffe.caffe().NetSpec()
    n.data, n.label = L.Data(source=SOURCES[phase], backend=P.Data.LMDB, batch_size=BATCH_SIZE,
                             transform_param=transform, ntop=2,
                             include=dict(phase=getattr(pycaffe.caffe_pb2(), phase.upper())))
    return n


def train_test(name):
    """The training net (both phases): TRAIN and TEST Data layers, the builder, the loss on the
    logits and TEST-only top-1 ("accuracy") and top-5 ("accuracy_top5") Accuracy layers."""
    build = _builder(name)
    L, _ = _dsl()
    test_phase = dict(phase=pycaffe.caffe_pb2().TEST)
    n = _data_layer(name, "test")
    logits = build(n, n.data)
    n.loss = L.SoftmaxWithLoss(logits, n.label)
    n.accuracy = L.Accuracy(logits, n.label, include=test_phase)
    n.accuracy_top5 = L.Accuracy(logits, n.label, include=test_phase, top_k=5)
    net = pycaffe.caffe_pb2().NetParameter(name=name)
    net.layer.extend(_data_layer(name, "train").to_proto().layer)
    net.layer.extend(n.to_proto().layer)
    return net


def deploy(name, batch_size: int = 1):
    """The inference net: an Input layer "data" of shape (batch_size, 3, 32, 32), the builder, and
    a Softmax "prob" on the logits."""
    build = _builder(name)
    L, _ = _dsl()
    n = pycaffe.caffe().NetSpec()
    n.data = L.Input(shape=dict(dim=[batch_size, *IMAGE_SHAPE]))
    n.prob = L.Softmax(build(n, n.data))
    net = n.to_proto()
    net.name = name
    return net


def definition(net):
    """A network name (one of the six), a prototxt, or a caffemodel whose embedded definition is
    used: what every command accepts as NET."""
    if net in NETWORKS:
        return train_test(net)
    path = Path(net)
    return pycaffe.read_caffemodel(path) if path.suffix == ".caffemodel" else pycaffe.read_prototxt(path)


def transform(name) -> Transform:
    """The TEST transform (scale, BGR mean values) that data fed from Python must reproduce."""
    _builder(name)
    return Transform.of(_data_layer(name, "test").to_proto().layer[0], f"{name}'s TEST data layer")


def solver(name, net_path=None):
    """The SolverParameter for training `name` (SOLVERS[name] plus SOLVER_COMMON)."""
    _builder(name)
    schedule = dict(SOLVERS[name], **SOLVER_COMMON)
    schedule["test_iter"] = [schedule["test_iter"]]     # a repeated field: one entry per test net
    return pycaffe.caffe_pb2().SolverParameter(
        net=net_path or f"prototxt/{name}/train_test.prototxt",
        snapshot_prefix=f"snapshots/{name}", **schedule)


# ---- the generated files --------------------------------------------------------------------------

HEADER = "# Generated from caffe_prune/networks.py by tools/generate_prototxt.py; do not edit.\n"


def prototxt_files(name) -> dict:
    """The text of prototxt/<name>/{train_test,deploy,solver}.prototxt."""
    return {
        "train_test.prototxt": HEADER + text_format.MessageToString(train_test(name)),
        "deploy.prototxt": HEADER + text_format.MessageToString(deploy(name)),
        "solver.prototxt": HEADER + text_format.MessageToString(solver(name)),
    }

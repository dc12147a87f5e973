"""Measured latency (caffe_prune.profile): the per-layer table adds up to the whole forward, timing
changes no parameter, the parameter count is the caffemodel's, a net with half the channels is
faster, and the command prints its documented JSON. The machine is shared and loaded, so nothing
here asserts an absolute time: only sums and ratios measured inside one process."""
import json
import subprocess
import sys

import numpy as np
import threadpoolctl
from google.protobuf import text_format

from caffe_prune import export, netdef, networks, profile, published_weights, pycaffe
from caffe_prune.session import Network
from conftest import REPO

RUN_FIELDS = {"batch", "threads", "repeats", "warmup", "median_ms", "iqr_ms", "q1_ms", "q3_ms", "min_ms"}
PROFILE_FIELDS = {"net", "input_shape", "gpu", "cores", "parameters", "costs", "runs"}


def toy(width: int):
    """conv 64 -> width -> width at 32x32 (1x1 kernels: pure GEMMs, a second per forward at most),
    Caffe's gaussian fillers for weights."""
    conv = ('layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" convolution_param {{ '
            'num_output: {width} kernel_size: 1 weight_filler {{ type: "gaussian" std: 0.05 }} }} }}\n'
            'layer {{ name: "relu_{name}" type: "ReLU" bottom: "{name}" top: "{name}" }}\n')
    text = ('name: "toy-%d"\nlayer { name: "data" type: "Input" top: "data" '
            'input_param { shape { dim: 1 dim: 64 dim: 32 dim: 32 } } }\n' % width)
    text += conv.format(name="conv1", bottom="data", width=width) + conv.format(name="conv2", bottom="conv1", width=width)
    return text_format.Parse(text, pycaffe.caffe_pb2().NetParameter())


def test_per_layer_table_adds_up_to_the_whole_forward(caffe):
    """LeNet-5 at batch 16 on one thread: every layer's median is positive, and the layer medians
    sum to between half the whole forward's fastest and 3x its median (the same layers, called one by one;
    the bounds leave room for a loaded machine, which once put the whole forward's median at 2.2x the sum)."""
    result = profile.profile(networks.train_test("LeNet-5"), published_weights.caffemodel("LeNet-5"), networks.IMAGE_SHAPE,
                             batch_sizes=(16,), threads=(1,), repeats=15, warmup=2)
    (run,) = result["runs"]
    assert RUN_FIELDS <= set(run) and run["batch"] == 16 and run["threads"] == 1
    assert [l["name"] for l in run["layers"]] == ["data", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2"]
    assert all(l["median_ms"] > 0 for l in run["layers"])
    total = sum(l["median_ms"] for l in run["layers"])
    assert 0.5 * run["min_ms"] <= total <= 3 * run["median_ms"], (total, run["min_ms"], run["median_ms"])
    assert abs(sum(l["share"] for l in run["layers"]) - 1) < 1e-2
    assert run["q1_ms"] <= run["median_ms"] <= run["q3_ms"] and run["iqr_ms"] >= 0
    table = profile.format_table(result, layers=3)
    assert "images/s" in table and "conv2" in table and "relu1" not in table     # only the 3 slowest


def test_latency_changes_no_parameter(caffe):
    """ResNet-20 (BatchNorm, whose TRAIN forward would move its statistics): after latency every
    parameter blob is bit-identical."""
    network = Network.open("ResNet-20")
    net = pycaffe.net_from_param(netdef.without_fillers(network.structure()), published_weights.caffemodel("ResNet-20"))
    net.blobs["data"].reshape(2, *networks.IMAGE_SHAPE)
    net.reshape()
    net.blobs["data"].data[...] = np.random.default_rng(0).normal(size=(2, *networks.IMAGE_SHAPE))
    before = {name: [b.data.copy() for b in blobs] for name, blobs in net.params.items()}
    result = profile.latency(net, repeats=2, warmup=1)
    assert len(result["layers"]) == len(net.layers)
    for name, blobs in net.params.items():
        for have, want in zip(blobs, before[name]):
            assert have.data.tobytes() == want.tobytes(), name


def test_parameter_count_is_the_caffemodels(caffe):
    """``parameters`` equals the blob sizes summed from the caffemodel's NetParameter (parsed here
    with caffe_pb2, not through the project); a compact export's {layer: [arrays]} gives its own
    sum; costs are copied as given; the BLAS thread count is back at pycaffe.BLAS_THREADS."""
    counted = {}
    for name in ("LeNet-5", "ResNet-20"):
        weights = published_weights.caffemodel(name)
        model = pycaffe.caffe_pb2().NetParameter()
        model.ParseFromString(weights.read_bytes())
        want = sum(int(np.prod(b.shape.dim)) if b.HasField("shape") else b.num * b.channels * b.height * b.width
                   for layer in model.layer for b in layer.blobs)
        costs = {"macs": 123, "note": ["given"]}
        result = profile.profile(networks.train_test(name), weights, networks.IMAGE_SHAPE, batch_sizes=(1,),
                                 threads=(1, "all"), repeats=1, warmup=0, per_layer=False, costs=costs)
        assert result["parameters"] == want, name
        counted[name] = want
        assert result["costs"] == costs and result["costs"] is not costs
        assert [r["threads"] for r in result["runs"]] == list(dict.fromkeys([1, pycaffe.cores()]))
        assert all(i["num_threads"] == pycaffe.BLAS_THREADS for i in threadpoolctl.threadpool_info()
                   if i["user_api"] == "blas")
    network = Network.open("LeNet-5")
    net = pycaffe.net_from_param(network.structure(), published_weights.caffemodel("LeNet-5"))
    param, arrays = export.compact(network.param, network.graph, {0, 1, 20}, net)
    small = profile.profile(param, arrays, networks.IMAGE_SHAPE, (1,), (1,), repeats=1, warmup=0, per_layer=False)
    assert small["parameters"] == sum(a.size for blobs in arrays.values() for a in blobs) < counted["LeNet-5"]


def test_half_the_channels_is_faster(caffe):
    """conv 64->256->256 against 64->128->128 at 32x32, batch 32, one thread (about 3.3x fewer
    MACs): the narrower net's median is below 0.75x the wider one's. A ratio inside one process,
    with a wide margin for a loaded machine. compare() reports the speed-up and matches the layers
    by name."""
    wide, narrow = (profile.profile(toy(w), None, None, (32,), (1,), repeats=5, warmup=1) for w in (256, 128))
    assert wide["parameters"] == 64 * 256 + 256 + 256 * 256 + 256
    assert narrow["runs"][0]["median_ms"] < 0.75 * wide["runs"][0]["median_ms"], (narrow["runs"], wide["runs"])
    both = profile.compare(wide, narrow)
    (run,) = both["runs"]
    assert run["speedup"] > 1 / 0.75 and both["parameters"]["ratio"] > 3
    assert [l["name"] for l in run["layers"]] == ["data", "conv1", "relu_conv1", "conv2", "relu_conv2"]
    assert all(l["original_ms"] is not None and l["compact_ms"] is not None for l in run["layers"])
    assert "speed-up" in profile.format_table(both)


def caffe_prune(*args):
    out = subprocess.run([sys.executable, "-m", "caffe_prune", *map(str, args)], capture_output=True,
                         text=True, cwd=REPO)
    return out.returncode, out.stdout, out.stderr


def test_command_prints_the_documented_json():
    weights = published_weights.caffemodel("LeNet-5")
    code, out, err = caffe_prune("profile", "LeNet-5", weights, "--json", "--repeats", "3", "--batch", "4")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == PROFILE_FIELDS and result["net"] == "LeNet-5" and result["input_shape"] == [3, 32, 32]
    # MACs by hand: conv1 20x(3x5x5) weights at 28x28, conv2 50x(20x5x5) at 10x10, ip1 500x1250, ip2 10x500
    macs = 20 * 75 * 784 + 50 * 500 * 100 + 500 * 1250 + 10 * 500
    assert result["costs"] == {"macs": macs, "params": result["parameters"]} and result["parameters"] > 0
    threads = list(dict.fromkeys([1, pycaffe.cores()]))
    assert [(r["batch"], r["threads"]) for r in result["runs"]] == [(b, t) for b in (1, 4) for t in threads]
    for run in result["runs"]:
        assert RUN_FIELDS | {"layers", "layers_sum_ms"} <= set(run) and run["repeats"] == 3
        assert all(set(l) == {"name", "type", "median_ms", "share"} for l in run["layers"])
    code, out, err = caffe_prune("profile", "LeNet-5", weights, "--threads", "1,many")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--threads: 'many' is not a thread count" in err

"""What a pruning state computes and holds (ChannelGraph.costs, from the groups' slices): MACs per
image, parameters and conv/InnerProduct weights, each equal to an independent count on the compact
network Caffe builds from the export, for the six built-in networks and zoo-style ones (depthwise,
bottleneck and concat branches, a grouped Deconvolution); what a run records per step; budgets."""
import json
import math
import subprocess
import sys

import pytest

from caffe_prune import export, netdef, networks, pycaffe
from caffe_prune.graph import ChannelGraph
from caffe_prune.session import Network
from caffe_prune.steps import pruned_of
from conftest import PUBLISHED, REPO, SUBSET
from test_layers import deconv_net
from test_session import bottlenecks, densenet, mobilenet, write

LENET = PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel"


def counted_by_caffe(net) -> dict:
    """From a built caffe.Net alone: a Convolution's weights once per output position, a
    Deconvolution's once per input position, an InnerProduct's once; every parameter blob."""
    macs = conv = fc = 0
    for name, layer in zip(net._layer_names, net.layers):
        if layer.type not in ("Convolution", "Deconvolution", "InnerProduct"):
            continue
        weights = net.params[name][0].data.size
        if layer.type == "InnerProduct":
            fc += weights
            macs += weights
            continue
        conv += weights
        blob = net.bottom_names[name][0] if layer.type == "Deconvolution" else net.top_names[name][0]
        macs += weights * math.prod(net.blobs[blob].data.shape[2:])
    params = sum(b.data.size for blobs in net.params.values() for b in blobs)
    return {"macs": macs, "conv_weights": conv, "fc_weights": fc, "params": params}


def check(form, graph, shape, pruned, where="test"):
    """The structure form's costs and those of its compact export at state ``pruned``."""
    full = pycaffe.net_from_param(form)
    assert counted_by_caffe(full) == graph.costs(set())._asdict()
    _, _, small = export.compact_net(form, graph, pruned, full, shape, where, probe=False)
    left = graph.costs(pruned)._asdict()
    assert counted_by_caffe(small) == left
    assert left["macs"] < graph.costs(set()).macs
    return left


@pytest.mark.parametrize("name", networks.NETWORKS)
def test_builtin_networks_costs_equal_their_compact_exports(caffe, name):
    network = Network.open(name)
    form = network.structure()
    g = network.graph
    pruned = g.random_state(0.3, seed=4)
    check(form, g, networks.IMAGE_SHAPE, pruned)
    # a group's saving is the difference of two states' costs, on every count
    gid = g.prunable(pruned)[0]
    assert g.saved(gid, pruned) == g.costs(pruned) - g.costs(pruned | {gid})


@pytest.mark.parametrize("build", [mobilenet, bottlenecks, densenet])
def test_zoo_style_networks_costs_equal_their_compact_exports(caffe, tmp_path, build):
    network = Network.open(write(tmp_path, build(), build.__name__))
    check(network.structure(), network.graph, network.input_shape, network.graph.random_state(0.5, seed=1))


def test_grouped_deconvolution_costs_equal_its_compact_export(caffe):
    from google.protobuf import text_format
    param = text_format.Parse(deconv_net(group=2), pycaffe.caffe_pb2().NetParameter())
    net = pycaffe.net_from_param(param)
    g = ChannelGraph.of_net(param, net)
    check(param, g, (3, 8, 8), g.chosen([0, 3, 7]))


def cli_prune(out, *extra):
    return subprocess.run([sys.executable, "-m", "caffe_prune", "prune", "LeNet-5", str(LENET), "--metric",
                           "weights/x/l2/none", "--test-size", "1", "--data", str(SUBSET), "--quiet",
                           "--out", str(out), *extra], cwd=REPO, capture_output=True, text=True)


def steps_of(out):
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def test_run_records_costs_and_stops_at_a_budget(caffe, tmp_path):
    """Every step records the compact net's MACs, parameters and weights at its state (counted by
    Caffe on the export), and --target macs=0.5 stops at the first step at most half the original's
    MACs; the same command resumes to the same end, a lower budget continues from there."""
    out = tmp_path / "run"
    done = cli_prune(out, "--target", "macs=0.5", "--no-drop-stop")
    assert done.returncode == 0, done.stderr
    steps = steps_of(out)
    header = json.loads((out / "config.json").read_text())
    original = header["original"]["macs"]
    network = Network.open("LeNet-5")
    full = pycaffe.net_from_param(network.structure())
    assert counted_by_caffe(full)["macs"] == original == steps[0]["macs"]
    assert steps[-1]["macs"] <= 0.5 * original < steps[-2]["macs"]
    g = network.graph
    for at in (1, len(steps) // 2, len(steps) - 1):
        pruned = set(pruned_of(steps[1:at + 1]))
        _, _, small = export.compact_net(network.structure(), g, pruned, full, networks.IMAGE_SHAPE, "t", probe=False)
        caffe_count = counted_by_caffe(small)
        assert {k: steps[at][k] for k in ("macs", "params", "conv_weights", "fc_weights")} == caffe_count
        assert steps[at]["percent_macs_removed"] == pytest.approx(100 * (1 - caffe_count["macs"] / original))
    assert cli_prune(out, "--target", "macs=0.5", "--no-drop-stop").returncode == 0
    assert steps_of(out) == steps                                    # resumed: already within the budget
    assert cli_prune(out, "--target", "macs=0.4", "--no-drop-stop").returncode == 0
    more = steps_of(out)
    assert more[:len(steps)] == steps and more[-1]["macs"] <= 0.4 * original < more[-2]["macs"]
    exported = subprocess.run([sys.executable, "-m", "caffe_prune", "export", "LeNet-5", str(LENET), "--run", str(out),
                               "--step", str(len(steps) - 1), "--out", str(tmp_path / "half"), "--no-timing"],
                              cwd=REPO, capture_output=True, text=True)     # the run's groups at that step
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["macs"] == steps[-1]["macs"]
    other = subprocess.run([sys.executable, "-m", "caffe_prune", "export", "CIFAR10", "published", "--run", str(out),
                            "--out", str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True)
    assert other.returncode == 2 and "pruned another network definition than CIFAR10" in other.stderr
    bad = cli_prune(tmp_path / "bad", "--target", "flops=0.5")
    assert bad.returncode == 2 and "--target flops: budgets are macs, params, weights" in bad.stderr
    assert cli_prune(tmp_path / "bad", "--target", "macs=1.5").returncode == 2


def test_export_reports_costs_and_times_both_networks(caffe, tmp_path):
    """`export` prints the compact network's MACs and parameters beside the original's (equal to a
    count on the written prototxt built by Caffe), checks the logits the Softmax reads, and times
    both networks (medians; no time is asserted: the numbers are the README's, measured once)."""
    network = Network.open("LeNet-5")
    g = network.graph
    pruned = g.random_state(0.5, seed=2)
    out = tmp_path / "exported"
    done = subprocess.run([sys.executable, "-m", "caffe_prune", "export", "LeNet-5", str(LENET), "--groups",
                           ",".join(map(str, sorted(pruned))), "--out", str(out), "--repeats", "2", "--batch", "4",
                           "--threads", "1"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.split("\n}\n")[0] + "\n}")
    written = netdef.structure_form(pycaffe.read_prototxt(out / "deploy.prototxt"), networks.IMAGE_SHAPE)
    small = pycaffe.net_from_param(written, out / "LeNet-5.caffemodel")
    counted = counted_by_caffe(small)
    assert (report["macs"], report["params"]) == (counted["macs"], counted["params"]) == (g.costs(pruned).macs,
                                                                                        g.costs(pruned).params)
    assert report["macs_original"] == g.costs(set()).macs and report["logits"] == "ip2"
    assert "ip2" in report["deviation_by_output"] and report["max_relative_deviation"] <= 1e-5
    assert set(report["speedup_measured"]) == {"batch 1, 1 thread(s)", "batch 4, 1 thread(s)"}
    assert f"MACs per image {g.costs(set()).macs:,} -> {counted['macs']:,}" in done.stdout

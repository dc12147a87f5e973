"""The command line end to end: graph summary and picture, export with its measured deviation."""
import json
import subprocess
import sys

from caffe_prune import graph_view
from conftest import PUBLISHED, REPO


def caffe_prune(*args):
    out = subprocess.run([sys.executable, "-m", "caffe_prune", *map(str, args)], capture_output=True,
                         text=True, cwd=REPO)
    return out.returncode, out.stdout, out.stderr


def test_graph_summary_and_picture(tmp_path):
    code, out, err = caffe_prune("graph", "ResNet-20", "--picture", tmp_path / "resnet.svg")
    assert code == 0, err
    assert "448 prunable groups over 21 convolutions; conv weights 270,256" in out
    assert "112 x 4" in out        # the residual streams: 16 + 32 + 64 groups of 4 tied channels
    svg = (tmp_path / "resnet.svg").read_text()
    assert "group2_block0_proj" in svg and "barriers:" not in out     # no barrier in ResNet-20
    assert graph_view.BARRIER_COLOUR not in svg


def test_export_reports_counts_and_deviation(tmp_path):
    weights = PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel"
    code, out, err = caffe_prune("export", "LeNet-5", weights, "--groups", "0,1,20", "--out", tmp_path, "--no-timing")
    assert code == 0, err
    report = json.loads(out)
    # conv1 loses 2 of 20 channels, conv2 1 of 50: 18*75 + 49*18*25 = 23,400 of 26,500
    assert report["conv_weights"] == 18 * 75 + 49 * 18 * 25 and report["widths"] == {"conv1": 18, "conv2": 49}
    # a built-in net's own data (CIFAR-10): compared on its test images, top-1 of both nets on them
    assert report["max_relative_deviation"] <= 1e-4 and report["compared_on"] == "16 images: the dataset's images"
    assert report["test"]["images"] == 1017 and 0.6 < report["test"]["top1_compact"] <= 1
    assert "1017 test images of CIFAR-10" in err and report["test"]["data"].startswith("CIFAR-10 at ")
    code, _, err = caffe_prune("export", "LeNet-5", weights, "--groups", "70", "--out", tmp_path)
    assert code == 2 and "--groups: no group 70; the net has groups 0..69" in err

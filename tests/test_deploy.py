"""What `export` writes is what a user deploys: deploy.prototxt and NAME.caffemodel load as written in
stock Caffe (pycaffe and the `caffe` binary) and OpenCV's DNN module and compute the compact net's
outputs, NAME.onnx matches them in ONNX Runtime, train_val.prototxt names no placeholder, and the
export directory is replaced as one set: a full disk leaves the previous export whole."""
import json
import os
import subprocess

import numpy as np
import pytest

import zoo
from caffe_prune import cli, export, masking, pycaffe
from caffe_prune.errors import InputError
from caffe_prune.networks import SOURCES
from caffe_prune.session import Network
from conftest import PUBLISHED, SUBSET

cv2 = pytest.importorskip("cv2", reason="OpenCV is not installed (pip install 'opencv-python-headless<5')")
pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install onnxruntime)")


def exported(tmp_path, network, fraction=0.3, seed=1, weights=None, onnx=True, out="export"):
    """A seeded random fraction of the groups pruned on ``weights`` (Caffe's fillers, randomised),
    exported; (the export's record, its random check inputs)."""
    g = network.graph
    rng, pruned = np.random.default_rng(seed), set()
    for _ in range(int(fraction * len(g.groups))):
        pruned.add(int(rng.choice(g.prunable(pruned))))
    full = pycaffe.net_from_param(network.structure(), weights)
    if weights is None:
        zoo.randomize(full, seed)
    masker = masking.Masker(g, [full])
    for group_id in sorted(pruned):
        masker.commit(group_id)
    inputs = rng.normal(size=(3, *network.input_shape)).astype(np.float32)
    done = export.export(network.param, g, pruned, full, tmp_path / out, "model", network.input_shape, inputs,
                         onnx=onnx, sources=export.builtin_sources(network))
    return done, inputs


def caffe_outputs(prototxt, caffemodel, x):
    import caffe
    net = caffe.Net(str(prototxt), str(caffemodel), caffe.TEST)        # stock Caffe, as written
    net.blobs["data"].reshape(*x.shape)
    net.reshape()
    net.blobs["data"].data[...] = x
    return {k: v.copy() for k, v in net.forward().items()}, net


@pytest.mark.parametrize("name", ["LeNet-5", "CIFAR10", "ResNet-20", "NIN", "AlexNet", "SqueezeNet"])
def test_the_builtin_nets_exports_load_and_match_everywhere(caffe, tmp_path, name):
    published = {"LeNet-5": "LeNet-5-CIFAR10", "CIFAR10": "CIFAR10-CIFAR10", "ResNet-20": "ResNet-20-CIFAR10",
                 "NIN": "NIN-CIFAR10"}
    weights = PUBLISHED / published[name] / "original.caffemodel" if name in published else None
    network = Network.open(name)
    done, x = exported(tmp_path, network, weights=weights)
    out = tmp_path / "export"
    assert sorted(p.name for p in out.iterdir()) == ["deploy.prototxt", "export.json", "model.caffemodel",
                                                     "model.onnx", "train_val.prototxt"]
    # deploy: an Input layer, the TEST layers, no data/loss/accuracy, a Softmax "prob" ending it
    deploy = pycaffe.read_prototxt(out / "deploy.prototxt")
    assert deploy.layer[0].type == "Input" and deploy.layer[-1].type == "Softmax" and deploy.layer[-1].top == ["prob"]
    assert not {"Data", "SoftmaxWithLoss", "Accuracy"} & {layer.type for layer in deploy.layer}
    outputs, net = caffe_outputs(out / "deploy.prototxt", out / "model.caffemodel", x)
    logits = network.head().logits
    compact = done["net"]
    compact.blobs["data"].reshape(*x.shape)
    compact.reshape()
    compact.blobs["data"].data[...] = x
    compact.forward()
    np.testing.assert_array_equal(net.blobs[logits].data, compact.blobs[logits].data)   # the same weights, bit for bit
    # OpenCV and ONNX Runtime as the export checked them, and again here on the written files
    checks = done["runtimes"]
    assert checks["opencv"]["within"] and checks["onnxruntime"]["within"] and checks["opencv"]["outputs"] == ["prob"]
    cv = cv2.dnn.readNetFromCaffe(str(out / "deploy.prototxt"), str(out / "model.caffemodel"))
    cv.setInput(x)
    prob = cv.forward()
    assert np.abs(prob - outputs["prob"]).max() <= 1e-4 * np.abs(outputs["prob"]).max()
    import onnxruntime
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (ort,) = session.run(["prob"], {"data": x})
    assert np.abs(ort - outputs["prob"]).max() <= 1e-4 * np.abs(outputs["prob"]).max()
    # train_val: the built-in net's sources are the LMDBs `caffe-prune data cifar10` writes, never a placeholder
    text = (out / "train_val.prototxt").read_text()
    assert not any(placeholder in text for placeholder in SOURCES.values())
    assert "cifar10-train-lmdb" in text and "cifar10-test-lmdb" in text
    for path in out.iterdir():
        assert b"{train_lmdb}" not in path.read_bytes() and b"{test_lmdb}" not in path.read_bytes()
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["files"] == ["deploy.prototxt", "model.caffemodel", "model.onnx", "train_val.prototxt"]


def test_caffe_time_runs_the_deploy_prototxt(caffe, tmp_path):
    tool = pycaffe.caffe_tool("caffe")
    if tool is None:
        pytest.skip("the Caffe build's `caffe` binary is not found")
    exported(tmp_path, Network.open("CIFAR10"), onnx=False)
    done = subprocess.run([str(tool), "time", "-model", str(tmp_path / "export" / "deploy.prototxt"),
                           "-iterations", "2"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GLOG_minloglevel": "0", "GLOG_logtostderr": "1"})
    assert done.returncode == 0 and "Average Forward pass" in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("build", [lambda: zoo.resnet50(64, 0.25, 10), lambda: zoo.mobilenet_v2(64, 0.5, 10),
                                   lambda: zoo.densenet121(64, 8, classes=10)], ids=["ResNet-50", "MobileNet-v2",
                                                                                     "DenseNet-121"])
def test_zoo_style_exports_match_in_onnx_runtime(caffe, tmp_path, build):
    network = Network.open(zoo.write(build(), tmp_path / "net.prototxt"))
    done, _ = exported(tmp_path, network)
    assert done["runtimes"]["onnxruntime"]["within"] and done["runtimes"]["opencv"]["within"]
    assert max(done["deviation"].values()) <= 1e-5


def test_an_export_replaces_only_an_export_as_one_set(caffe, tmp_path, capsys):
    network = Network.open("LeNet-5")
    done, _ = exported(tmp_path, network, onnx=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()}
    exported(tmp_path, network, fraction=0.5, onnx=False)                     # a second export replaces it
    after = {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()}
    assert set(after) == set(before) and after["model.caffemodel"] != before["model.caffemodel"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]           # nothing left beside it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's own file")
    with pytest.raises(InputError, match=r"--out .*mine holds files that are not an export \(no export.json\); "
                                         r"give an empty or new directory"):
        exported(tmp_path, network, onnx=False, out="mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's own file"


@pytest.fixture
def small_disk(tmp_path):
    """A 2,700 KiB tmpfs mounted here (root only; skipped with the reason where mounting is refused)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2700k", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode})")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_is_one_line_and_the_previous_export_stays_whole(caffe, small_disk, capsys):
    """LeNet-5's caffemodel is 2.6 MB: a heavily pruned export (0.2 MB) fits the 2,700 KiB disk, and
    so would the next one (2.6 MB) alone, but not built beside the first: one line naming the
    directory and the bytes needed, exit 2, and the first export is byte for byte as it was."""
    weights = PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel"
    out = small_disk / "lenet"
    args = ["export", "LeNet-5", str(weights), "--no-timing", "--data", str(SUBSET), "--out", str(out)]
    assert cli.main(args + ["--random-fraction", "0.9"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli.main(args + ["--groups", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write the export {out}: No space left on device;" in err
    assert "bytes needed" in err and "the previous export, if any, is unchanged" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["lenet"]

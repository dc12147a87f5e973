"""A battery of bad inputs across every command, as a new user makes them. Each must end with a
non-zero exit, one line on stderr naming the user's file or argument, no Python traceback and no
Caffe abort (each case runs `caffe-prune` in a forked child, so an abort shows as a signal); the
few inputs that are fine are asserted to exit 0 with the note they deserve.

The classes (CLASSES below): prototxt, weights, data, head, arguments, paths, run directory,
import, and correct."""
import io
import os
import re
import sys

import numpy as np
import pytest

from caffe_prune import cli, pycaffe
from conftest import PUBLISHED

LENET = PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel"
RESNET = PUBLISHED / "ResNet-20-CIFAR10" / "original.caffemodel"

TINY = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def tiny(old, new):
    assert old in TINY, old
    return TINY.replace(old, new)


def lmdb_of_shapes(path, shapes):
    import caffe.io
    import lmdb
    with lmdb.open(str(path), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i, shape in enumerate(shapes):
            txn.put(b"%08d" % i, caffe.io.array_to_datum(np.zeros(shape, np.uint8), i % 3).SerializeToString())


def mean_file(path, shape):
    import caffe.io
    path.write_bytes(caffe.io.array_to_blobproto(np.zeros((1, *shape), np.float32)).SerializeToString())


def image_list(tmp, n=4, size=40, missing=False):
    import skimage.io
    lines = []
    for i in range(n):
        name = tmp / f"img{i}.png"
        if not (missing and i == 2):
            skimage.io.imsave(name, np.full((size, size, 3), 60 + i, np.uint8), check_contrast=False)
        lines.append(f"{name} {i % 3}")
    (tmp / "list.txt").write_text("\n".join(lines) + "\n")
    return tmp / "list.txt"


def garbage_caffemodel(tmp):
    (tmp / "garbage.caffemodel").write_bytes(b"\xff\xfe not a protobuf \x00\x01" * 10)


def corrupt_weights(tmp, scale):
    model = pycaffe.read_caffemodel(LENET)
    layer = next(l for l in model.layer if l.name == "conv2")
    layer.blobs[0].data[7] = scale
    (tmp / "corrupt.caffemodel").write_bytes(model.SerializeToString())


def pooling_zero_model(tmp):
    model = pycaffe.read_caffemodel(LENET)
    next(l for l in model.layer if l.type == "Pooling").pooling_param.kernel_size = 0
    (tmp / "model").mkdir()
    (tmp / "model" / "original.caffemodel").write_bytes(model.SerializeToString())


def python_layer_model(tmp):
    model = pycaffe.read_caffemodel(LENET)
    layer = next(l for l in model.layer if l.type == "Pooling")
    layer.type = "Python"
    layer.python_param.module, layer.python_param.layer = "no_such_module_anywhere", "Pool"
    (tmp / "model").mkdir()
    (tmp / "model" / "original.caffemodel").write_bytes(model.SerializeToString())


def two_caffemodels(tmp):
    (tmp / "model").mkdir()
    for name in ("a", "b"):
        (tmp / "model" / f"{name}.caffemodel").write_bytes(LENET.read_bytes())


def run_dir_with(tmp, steps_text=None, steps_dir=False, config_dir=False):
    """A LeNet-5 run directory of 2 steps, then damaged."""
    out = tmp / "run"
    assert run_cli(["prune", "LeNet-5", str(LENET), "--metric", "mean_sq_weights", "--test-size", "1",
                    "--max-steps", "2", "--quiet", "--out", str(out)], tmp)[0] == 0
    if steps_text is not None:
        with open(out / "steps.jsonl", "a") as stream:
            stream.write(steps_text)
    if steps_dir:
        (out / "steps.jsonl").unlink()
        (out / "steps.jsonl").mkdir()
    if config_dir:
        (out / "config.json").unlink()
        (out / "config.json").mkdir()


def replaced_weights(tmp):
    (tmp / "w.caffemodel").write_bytes(LENET.read_bytes())
    assert run_cli(["prune", "LeNet-5", str(tmp / "w.caffemodel"), "--metric", "mean_sq_weights", "--test-size", "1",
                    "--max-steps", "1", "--quiet", "--out", str(tmp / "run")], tmp)[0] == 0
    (tmp / "w.caffemodel").write_bytes(RESNET.read_bytes())


def held_lock(tmp):
    """A run directory whose lock another live process holds (a sleeping child of the test)."""
    import subprocess
    (tmp / "run").mkdir()
    lock = tmp / "run" / ".lock"
    child = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time, json, socket\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.pwrite(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}).encode(), 0)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    HELD.append(child)


HELD = []
PRUNE = ["--metric", "mean_sq_weights", "--test-size", "1", "--max-steps", "1", "--quiet"]
RESUME = ["--metric", "mean_sq_weights", "--test-size", "1", "--quiet", "--max-steps", "3"]

# (id, class, files: {name: text} or a callable(tmp), argv, exit code, what the one line must say)
CASES = [
    # ---- prototxt ----
    ("parse error", "prototxt", {"n.prototxt": tiny("num_output: 4", "num_output: 4 }}")}, ["graph", "n.prototxt"], 2,
     "n.prototxt:4:"),
    ("typo field", "prototxt", {"n.prototxt": tiny("kernel_size: 3", "kernal_size: 3")}, ["graph", "n.prototxt"], 2,
     "no field named \"kernal_size\""),
    ("fork field ceil_mode", "prototxt", {"n.prototxt": tiny("stride: 2 }", "stride: 2 ceil_mode: true }")},
     ["graph", "n.prototxt"], 2, "ceil_mode"),
    ("fork layer type ReLU6", "prototxt", {"n.prototxt": tiny('type: "Softmax"', 'type: "ReLU6"')},
     ["graph", "n.prototxt"], 2, "'ReLU6', unknown to stock Caffe 1.0 (it comes from MobileNet v2 ports"),
    ("fork depthwise type", "prototxt", {"n.prototxt": tiny('"Convolution"', '"ConvolutionDepthwise"')},
     ["graph", "n.prototxt"], 2, "stock Convolution with group equal to its input channels"),
    ("made-up type", "prototxt", {"n.prototxt": tiny('type: "Softmax"', 'type: "Frobnicate"')},
     ["graph", "n.prototxt"], 2, "'Frobnicate', unknown to stock Caffe"),
    ("missing bottom", "prototxt", {"n.prototxt": tiny('bottom: "pool" top: "ip"', 'bottom: "pool5" top: "ip"')},
     ["graph", "n.prototxt"], 2, "reads blob 'pool5' that no earlier layer produces"),
    ("loss on a blob nobody makes", "prototxt",
     {"n.prototxt": TINY + 'layer { name: "l" type: "SoftmaxWithLoss" bottom: "fc9" bottom: "data" top: "l" }\n'},
     ["graph", "n.prototxt"], 2, "layer 'l' reads blob 'fc9' that no earlier layer produces"),
    ("conv in place", "prototxt", {"n.prototxt": tiny('top: "conv"\n', 'top: "data"\n').replace('bottom: "conv"', 'bottom: "data"')},
     ["graph", "n.prototxt"], 2, "reads and writes blob 'data' in place"),
    ("conv kernel 0", "prototxt", {"n.prototxt": tiny("kernel_size: 3", "kernel_size: 0")}, ["graph", "n.prototxt"], 2,
     "kernel_size (or kernel_h and kernel_w) must be given and at least 1"),
    ("pooling kernel 0", "prototxt", {"n.prototxt": tiny("kernel_size: 2", "kernel_size: 0")}, ["graph", "n.prototxt"], 2,
     "layer 'pool' (Pooling): kernel_size must be at least 1"),
    ("num_output 0", "prototxt", {"n.prototxt": tiny("num_output: 4", "num_output: 0")}, ["graph", "n.prototxt"], 2,
     "num_output 0 must be at least 1"),
    ("group does not divide", "prototxt", {"n.prototxt": tiny("num_output: 4", "num_output: 4 group: 3")},
     ["graph", "n.prototxt"], 2, "num_output 4 is not a multiple of group 3"),
    ("stride 0", "prototxt", {"n.prototxt": tiny("stride: 2 }", "stride: 0 }")}, ["graph", "n.prototxt"], 2,
     "stride must be at least 1"),
    ("even LRN window", "prototxt",
     {"n.prototxt": tiny('layer { name: "ip"', 'layer { name: "n" type: "LRN" bottom: "pool" top: "lrn" '
                                              'lrn_param { local_size: 4 } }\nlayer { name: "ip"')},
     ["graph", "n.prototxt"], 2, "local_size 4 must be odd"),
    ("dropout ratio 1.5", "prototxt",
     {"n.prototxt": tiny('layer { name: "ip"', 'layer { name: "d" type: "Dropout" bottom: "pool" top: "pool" '
                                              'dropout_param { dropout_ratio: 1.5 } }\nlayer { name: "ip"')},
     ["graph", "n.prototxt"], 2, "dropout_ratio 1.5 must be in [0, 1)"),
    ("eltwise widths differ", "prototxt",
     {"n.prototxt": tiny('layer { name: "ip"', 'layer { name: "s" type: "Eltwise" bottom: "pool" bottom: "data" '
                                              'top: "s" }\nlayer { name: "ip"')},
     ["graph", "n.prototxt"], 2, "Caffe cannot build this net"),
    ("empty prototxt", "prototxt", {"n.prototxt": "# nothing\n"}, ["graph", "n.prototxt"], 2, "defines no layers"),
    ("prototxt is a directory", "prototxt", lambda tmp: (tmp / "d.prototxt").mkdir(), ["graph", "d.prototxt"], 2,
     "d.prototxt is a directory"),
    ("prototxt missing", "prototxt", {}, ["graph", "nope.prototxt"], 2,
     "nope.prototxt is neither a file nor one of the built-in networks"),
    ("binary as prototxt", "prototxt", lambda tmp: (tmp / "b.prototxt").write_bytes(LENET.read_bytes()[:300]),
     ["graph", "b.prototxt"], 2, "b.prototxt:"),
    ("train_val without shape", "prototxt",
     {"n.prototxt": tiny('type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } }',
                         'type: "Data" top: "data" top: "label" data_param { source: "nolmdb" batch_size: 4 '
                         'backend: LMDB } transform_param { crop_size: 6 }')},
     ["graph", "n.prototxt"], 2, "nolmdb does not exist"),
    ("bad --input-shape", "arguments", {}, ["graph", "LeNet-5", "--input-shape", "3,32"], 2,
     "--input-shape '3,32' is not C,H,W"),
    ("zero --input-shape", "arguments", {}, ["graph", "LeNet-5", "--input-shape", "0,32,32"], 2,
     "--input-shape '0,32,32' is not C,H,W"),
    # ---- weights ----
    ("weights missing", "weights", {}, ["evaluate", "LeNet-5", "nope.caffemodel"], 2,
     "caffemodel nope.caffemodel does not exist"),
    ("weights garbage", "weights", garbage_caffemodel, ["evaluate", "LeNet-5", "garbage.caffemodel"], 2,
     "garbage.caffemodel is not a caffemodel"),
    ("weights of another net", "weights", {}, ["evaluate", "LeNet-5", str(RESNET)], 2,
     "holds no weights for layer(s) conv1, conv2, ip1, ip2 of the prototxt"),
    ("weights shape mismatch", "weights", {"n.prototxt": tiny("num_output: 4", "num_output: 5")},
     ["export", "n.prototxt", "w.caffemodel", "--groups", "0"], 2, "blob 0 has shape"),
    ("weights a directory", "weights", lambda tmp: (tmp / "w.caffemodel").mkdir(),
     ["evaluate", "LeNet-5", "w.caffemodel"], 2, "w.caffemodel is a directory"),
    # ---- data ----
    ("--data missing", "data", {}, ["evaluate", "LeNet-5", str(LENET), "--data", "nowhere"], 2,
     "--data nowhere does not exist"),
    ("--data not a dataset dir", "data", lambda tmp: (tmp / "emptydir").mkdir(),
     ["evaluate", "LeNet-5", str(LENET), "--data", "emptydir"], 2, "neither an LMDB (data.mdb) nor a LevelDB"),
    ("Datums differ in shape", "data", lambda tmp: lmdb_of_shapes(tmp / "db", [(3, 32, 32), (3, 30, 32)]),
     ["evaluate", "LeNet-5", str(LENET), "--data", "db"], 2, "records differ in shape"),
    ("crop larger than the image", "data", lambda tmp: image_list(tmp, size=20),
     ["evaluate", "LeNet-5", str(LENET), "--data", "list.txt", "--crop-size", "32"], 2,
     "crop_size 32 is larger than the 20x20 images"),
    ("mean_file of the wrong shape", "data", lambda tmp: (image_list(tmp, size=32), mean_file(tmp / "m.bp", (3, 28, 28))),
     ["evaluate", "LeNet-5", str(LENET), "--data", "list.txt", "--mean-file", "m.bp"], 2,
     "holds a 3x28x28 mean, the records are 3x32x32"),
    ("mean_file missing", "data", lambda tmp: image_list(tmp, size=32),
     ["evaluate", "LeNet-5", str(LENET), "--data", "list.txt", "--mean-file", "nomean.bp"], 2,
     "mean_file nomean.bp does not exist"),
    ("mean_file and mean_value", "data", lambda tmp: (image_list(tmp, size=32), mean_file(tmp / "m.bp", (3, 32, 32))),
     ["evaluate", "LeNet-5", str(LENET), "--data", "list.txt", "--mean-file", "m.bp", "--mean-value", "4"], 2,
     "both mean_file and mean_value"),
    ("two mean values for 3 channels", "data", lambda tmp: image_list(tmp, size=32),
     ["evaluate", "LeNet-5", str(LENET), "--data", "list.txt", "--mean-value", "4", "--mean-value", "5"], 2,
     "2 mean_value entries for 3-channel images"),
    ("image missing from the list", "data", lambda tmp: image_list(tmp, size=32, missing=True),
     ["evaluate", "LeNet-5", str(LENET), "--data", "list.txt"], 2, "img2.png"),
    ("empty image list", "data", {"list.txt": ""}, ["evaluate", "LeNet-5", str(LENET), "--data", "list.txt"], 2,
     "list.txt"),
    ("images of the wrong size for the net", "data", lambda tmp: image_list(tmp, size=40),
     ["evaluate", "LeNet-5", str(LENET), "--data", "list.txt"], 2,
     "the images are 3x40x40 after the transform, but LeNet-5 takes 3x32x32"),
    ("deploy net without --data", "data", {"n.prototxt": TINY}, ["evaluate", "n.prototxt", "w.caffemodel"], 2,
     "names no dataset to use: it is fed by an Input layer; pass --data"),
    ("labels beyond the classes", "data", lambda tmp: (image_list(tmp, n=6, size=8), (tmp / "n.prototxt").write_text(
        tiny("num_output: 3 }", "num_output: 2 }"))),
     ["evaluate", "n.prototxt", "w.caffemodel", "--data", "list.txt"], 2, "labels run 0..2 but"),
    ("user's bad archive kept", "data", {"cifar.tar.gz": "not an archive"},
     ["data", "cifar10", "--source", "cifar.tar.gz", "--out", "o"], 2, "cifar.tar.gz is not a .tar.gz archive"),
    ("--source missing", "data", {}, ["data", "cifar10", "--source", "none.tar.gz", "--out", "o"], 2,
     "none.tar.gz does not exist"),
    # ---- head ----
    ("no classifier head", "head",
     {"n.prototxt": 'name: "h"\nlayer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 '
                    'dim: 8 dim: 8 } } }\nlayer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param '
                    '{ pool: MAX kernel_size: 2 stride: 2 } }\n', "list.txt": "x.png 0\n"},
     ["saliency", "n.prototxt", str(LENET), "--metric", "taylor", "--data", "list.txt"], 2,
     "has no classifier head"),
    ("--logits not a blob", "head", {}, ["evaluate", "LeNet-5", str(LENET), "--logits", "fc9"], 2,
     "--logits 'fc9' is not a blob any layer produces"),
    # ---- arguments ----
    ("--batches 0", "arguments", {}, ["evaluate", "LeNet-5", str(LENET), "--batches", "0"], 2,
     "argument --batches: 0 must be at least 1"),
    ("saliency --batch-size 0", "arguments", {},
     ["saliency", "LeNet-5", str(LENET), "--metric", "taylor", "--batch-size", "0"], 2,
     "argument --batch-size: 0 must be at least 1"),
    ("prune --batch-size 0", "arguments", {}, ["prune", "LeNet-5", str(LENET), *PRUNE, "--batch-size", "0", "--out", "r"],
     2, "--batch-size must be at least 1"),
    ("saliency too many batches", "arguments", {},
     ["saliency", "LeNet-5", str(LENET), "--metric", "taylor", "--batches", "20"], 2,
     "20 batches of 128 need 2560 images; the validation split holds 1017"),
    ("--groups empty", "arguments", {}, ["export", "LeNet-5", str(LENET), "--groups", ""], 2,
     "--groups '' is not a comma-separated list"),
    ("--groups words", "arguments", {}, ["export", "LeNet-5", str(LENET), "--groups", "a,b"], 2,
     "--groups 'a,b' is not a comma-separated list"),
    ("--groups out of range", "arguments", {}, ["export", "LeNet-5", str(LENET), "--groups", "70"], 2,
     "--groups: no group 70; the net has groups 0..69"),
    ("--groups empties a layer", "arguments", {},
     ["export", "LeNet-5", str(LENET), "--groups", ",".join(map(str, range(20)))], 2,
     "group 19 would leave conv1 without a channel"),
    ("--random-fraction 1.5", "arguments", {}, ["export", "LeNet-5", str(LENET), "--random-fraction", "1.5"], 2,
     "--random-fraction must be in (0, 1)"),
    ("graph --list -1", "arguments", {}, ["graph", "LeNet-5", "--list", "-1"], 2, "--list -1"),
    ("--k 0", "arguments", {}, ["prune", "LeNet-5", str(LENET), "--oracle", "--k", "0", "--out", "r"], 2,
     "--k must be at least 1"),
    ("--eval-size 0", "arguments", {}, ["prune", "LeNet-5", str(LENET), *PRUNE, "--eval-size", "0", "--out", "r"], 2,
     "--eval-size must be at least 1"),
    ("--test-size 0", "arguments", {}, ["prune", "LeNet-5", str(LENET), "--metric", "taylor", "--test-size", "0",
                                        "--out", "r"], 2, "--test-size must be at least 1"),
    ("--max-drop -1", "arguments", {}, ["prune", "LeNet-5", str(LENET), *PRUNE, "--max-drop", "-1", "--out", "r"], 2,
     "--max-drop must be >= 0"),
    ("--max-steps 0", "arguments", {}, ["prune", "LeNet-5", str(LENET), "--metric", "taylor", "--max-steps", "0",
                                        "--out", "r"], 2, "--max-steps must be at least 1"),
    ("unknown metric", "arguments", {}, ["prune", "LeNet-5", str(LENET), "--metric", "taylr", "--out", "r"], 2,
     "'taylr' is neither input/pointwise/reduction/scaling nor an alias"),
    ("bad metric component", "arguments", {},
     ["saliency", "LeNet-5", str(LENET), "--metric", "activation/x/l3/count"], 2, "invalid reduction 'l3'"),
    ("bad Domino aggregation", "arguments", {},
     ["saliency", "LeNet-5", str(LENET), "--metric", "domino-median:taylor"], 2, "invalid Domino aggregation 'median'"),
    ("unknown oracle constituent", "arguments", {},
     ["prune", "LeNet-5", str(LENET), "--oracle", "taylor,fishr", "--out", "r"], 2, "'fishr'"),
    ("bad --semantics", "arguments", {}, ["prune", "LeNet-5", str(LENET), "--metric", "taylor", "--semantics", "x",
                                          "--out", "r"], 2, "argument --semantics: invalid choice: 'x'"),
    ("unknown network name", "arguments", {}, ["graph", "VGG-17"], 2, "VGG-17 is neither a file nor one of"),
    ("--gpu on a CPU build", "arguments", {}, ["evaluate", "LeNet-5", str(LENET), "--gpu"], 2, "GPU mode asked for"),
    ("picture suffix", "arguments", {}, ["graph", "LeNet-5", "--picture", "g.jpg"], 2, "must be .png or .svg"),
    # ---- paths the toolkit writes ----
    ("--out under a file", "paths", {"afile": "x"}, ["export", "LeNet-5", str(LENET), "--groups", "0", "--out",
                                                      "afile/sub"], 2, "afile/sub"),
    ("prune --out under a file", "paths", {"afile": "x"}, ["prune", "LeNet-5", str(LENET), *PRUNE, "--out",
                                                            "afile/run"], 2, "afile/run"),
    ("--csv on a read-only filesystem", "paths", {},
     ["saliency", "LeNet-5", str(LENET), "--metric", "mean_sq_weights", "--batches", "1", "--csv", "/proc/x.csv"], 2,
     "/proc/x.csv"),
    ("--json into a directory", "paths", lambda tmp: (tmp / "adir").mkdir(),
     ["saliency", "LeNet-5", str(LENET), "--metric", "mean_sq_weights", "--batches", "1", "--json", "adir"], 2,
     "adir"),
    ("picture under a file", "paths", {"afile": "x"}, ["graph", "LeNet-5", "--picture", "afile/g.svg"], 2,
     "afile/g.svg"),
    ("import --out under a file", "paths", {"afile": "x"}, ["import", str(PUBLISHED / "LeNet-5-CIFAR10"), "--out",
                                                             "afile/m"], 2, "afile/m"),
    # ---- run directories ----
    ("steps.jsonl line not a step", "run directory", lambda tmp: run_dir_with(tmp, steps_text="{}\n"),
     ["prune", "LeNet-5", str(LENET), *RESUME, "--out", "run"], 2,
     "steps.jsonl:4 is not step 3 of this run"),
    ("steps.jsonl a directory", "run directory", lambda tmp: run_dir_with(tmp, steps_dir=True),
     ["prune", "LeNet-5", str(LENET), *RESUME, "--out", "run"], 2,
     "steps.jsonl is a directory"),
    ("config.json a directory", "run directory", lambda tmp: run_dir_with(tmp, config_dir=True),
     ["prune", "LeNet-5", str(LENET), *RESUME, "--out", "run"], 2,
     "config.json is a directory"),
    ("another run in --out", "run directory", lambda tmp: run_dir_with(tmp),
     ["prune", "LeNet-5", str(LENET), *RESUME, "--seed", "4", "--out", "run"], 2,
     "holds a run with a different configuration (seed)"),
    ("weights replaced before a resume", "run directory", replaced_weights,
     ["prune", "LeNet-5", "w.caffemodel", *PRUNE, "--out", "run"], 2, "holds no weights for layer(s)"),
    ("run in use by another process", "run directory", held_lock,
     ["prune", "LeNet-5", str(LENET), *PRUNE, "--out", "run"], 2, "is in use by PID"),
    # ---- import ----
    ("import: pooling kernel 0 in the embedded definition", "import", pooling_zero_model, ["import", "model"], 2,
     "kernel_size must be at least 1"),
    ("import: Python layer module missing", "import", python_layer_model, ["import", "model", "--allow-python-layers"],
     2, "Caffe cannot build this net"),
    ("import: Python layer not allowed", "import", python_layer_model, ["import", "model"], 2,
     "layer 'pool1' is a Python layer: building it would import and run no_such_module_anywhere.Pool"),
    ("import: two caffemodels", "import", two_caffemodels, ["import", "model"], 2, "must hold exactly one caffemodel"),
    ("import: unknown --net", "import", {}, ["import", str(PUBLISHED / "LeNet-5-CIFAR10"), "--net", "LeNet-6"], 2,
     "unknown network 'LeNet-6'"),
    ("import: nothing there", "import", {}, ["import", "nothing"], 2, "nothing is neither a caffemodel nor a directory"),
    # ---- correct: exit 0, with the note they deserve ----
    ("non-finite weight", "weights", lambda tmp: corrupt_weights(tmp, float("inf")),
     ["evaluate", "LeNet-5", "corrupt.caffemodel", "--batches", "1"], 2, "the loss of images 0..127 is nan"),
    ("absurd weight warns", "correct", lambda tmp: corrupt_weights(tmp, 3.4e36),
     ["evaluate", "LeNet-5", "corrupt.caffemodel", "--batches", "1"], 0,
     "layer 'conv2' holds a weight of magnitude 3.4e+36"),
    ("non-UTF-8 file name", "correct", lambda tmp: (tmp / os.fsdecode(b"net-\xff.prototxt")).write_text(TINY),
     ["graph", os.fsdecode(b"net-\xff.prototxt")], 0, "tiny: 4 prunable groups"),
    ("V1 prototxt is upgraded", "correct", {"v1.prototxt": 'name: "v1" input: "data" input_dim: 1 input_dim: 1 '
                                                          'input_dim: 8 input_dim: 8\nlayers { name: "c" type: CONVOLUTION '
                                                          'bottom: "data" top: "c" convolution_param { num_output: 2 '
                                                          'kernel_size: 3 } }\nlayers { name: "ip" type: INNER_PRODUCT '
                                                          'bottom: "c" top: "ip" inner_product_param { num_output: 2 } }\n'},
     ["graph", "v1.prototxt"], 0, "upgraded in memory with Caffe's upgrade_net_proto_text"),
]


PROGRESS = re.compile(r"\d+/\d+ \[|\|.*\[")       # tqdm's progress lines on stderr


def run_cli(argv, cwd):
    """`caffe-prune ARGV` in a forked child (this interpreter, caffe already imported): (exit status
    or -signal, stdout, stderr)."""
    out, err = cwd / ".stdout", cwd / ".stderr"
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.chdir(cwd)
            for fd, path in ((1, out), (2, err)):
                target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(target, fd)
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), errors="surrogateescape", write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), errors="backslashreplace",
                                          write_through=True)
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return code, out.read_text(errors="replace"), err.read_text(errors="replace")


@pytest.mark.parametrize("name, kind, files, argv, code, says", CASES, ids=[c[0] for c in CASES])
def test_bad_input(caffe, tmp_path, name, kind, files, argv, code, says):
    if callable(files):
        files(tmp_path)
    else:
        for file, text in files.items():
            (tmp_path / file).write_text(text)
    if any(a == "w.caffemodel" for a in argv) and not (tmp_path / "w.caffemodel").exists():
        net = pycaffe.load_net(tmp_path / "n.prototxt" if (tmp_path / "n.prototxt").exists() else
                              _tiny_file(tmp_path))
        net.save(str(tmp_path / "w.caffemodel"))
        if (tmp_path / "n.prototxt").exists() and "num_output: 5" in (tmp_path / "n.prototxt").read_text():
            pycaffe.load_net(_tiny_file(tmp_path)).save(str(tmp_path / "w.caffemodel"))
    try:
        status, out, err = run_cli(argv, tmp_path)
    finally:
        for child in HELD:
            child.kill()
            child.wait()
        HELD.clear()
    assert status >= 0, f"{name}: killed by signal {-status} (a Caffe abort?): {err[-500:]}"
    assert "Traceback" not in err and "Check failure stack trace" not in err, err
    assert status == code, f"{name}: exit {status}: {err}"
    if code:
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note: ")
                 and not PROGRESS.search(line)]
        assert len(lines) == 1, f"{name}: {err}"
        assert says in lines[0], f"{name}: {lines[0]!r} does not say {says!r}"
        assert lines[0].startswith("caffe-prune")
    else:
        assert says in out + err, f"{name}: {out + err}"


def _tiny_file(tmp):
    path = tmp / "tiny-reference.prototxt"
    path.write_text(TINY)
    return path


def test_battery_size_by_class():
    kinds = [c[1] for c in CASES]
    assert len(CASES) >= 60 and len(set(c[0] for c in CASES)) == len(CASES)
    print({kind: kinds.count(kind) for kind in dict.fromkeys(kinds)})


def test_users_archive_is_never_renamed(caffe, tmp_path):
    (tmp_path / "cifar.tar.gz").write_bytes(b"\x1f\x8b" + b"x" * 100)
    status, _, err = run_cli(["data", "cifar10", "--source", "cifar.tar.gz", "--out", "o"], tmp_path)
    assert status == 2 and (tmp_path / "cifar.tar.gz").is_file() and not list(tmp_path.glob("*.corrupt"))

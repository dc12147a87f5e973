"""Models trained the Caffe way: Caffe's own CIFAR-10 example (convert_cifar_data's RGB LMDBs,
compute_image_mean's mean, cifar10_quick trained by Caffe's own `caffe train` into an HDF5
snapshot) evaluates here to what Caffe's own `caffe test` reports, through the net's own data layers
and through --data cifar10 with the right channel order; `data cifar10 --channel-order rgb` writes
what convert_cifar_data and compute_image_mean write, byte for byte; the validation images never
come from the test images silently; each phase is transformed with its own parameters."""
import json
import os
import re
import subprocess
import sys

import lmdb
import numpy as np
import pytest

import zoo
from caffe_prune import cli, pycaffe
from caffe_prune.data import cifar10_convert
from caffe_prune.data.dataset import open_dataset
from caffe_prune.session import Network
from conftest import REPO, SUBSET

QUIET = {**os.environ, "GLOG_minloglevel": "2"}


def tool(name):
    path = pycaffe.caffe_tool(name)
    if path is None:
        pytest.skip(f"the Caffe build's {name} is not found")
    return str(path)


def records(path) -> dict:
    with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
        return dict(txn.cursor())


@pytest.mark.slow
def test_rgb_layout_is_what_caffes_own_tools_write(tmp_path):
    """Full-size batches of random records (convert_cifar_data reads 10,000 a file): our LMDBs and
    mean equal what Caffe's convert_cifar_data and compute_image_mean write from the same files."""
    rng = np.random.default_rng(0)
    batches = tmp_path / "cifar-10-batches-bin"
    batches.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rows = rng.integers(0, 256, size=(10000, 3073), dtype=np.uint8)
        rows[:, 0] %= 10
        (batches / name).write_bytes(rows.tobytes())
    ours, caffes = tmp_path / "ours", tmp_path / "caffes"
    caffes.mkdir()
    cifar10_convert.prepare(tmp_path, ours, order="rgb", progress=False)
    subprocess.run([tool("convert_cifar_data"), str(batches), str(caffes), "lmdb"], check=True, env=QUIET,
                   capture_output=True)
    for split in ("train", "test"):
        mine, theirs = records(ours / f"cifar10_{split}_lmdb"), records(caffes / f"cifar10_{split}_lmdb")
        assert len(mine) == len(theirs) == (50000 if split == "train" else 10000)
        assert mine == theirs                                   # keys and Datum bytes alike
    subprocess.run([tool("compute_image_mean"), "-backend=lmdb", str(caffes / "cifar10_train_lmdb"),
                    str(caffes / "mean.binaryproto")], check=True, env=QUIET, capture_output=True)
    assert (ours / "mean.binaryproto").read_bytes() == (caffes / "mean.binaryproto").read_bytes()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Caffe's examples/cifar10 as a user has it: the subset in the RGB layout, cifar10_quick trained
    by Caffe's own `caffe train` for 300 iterations with an HDF5 snapshot; the test layer's batch
    set to 113 (9 x 113 = the subset's 1017 test images, so that `caffe test` sees each once)."""
    root = tmp_path_factory.mktemp("caffe-root")
    example = root / "examples" / "cifar10"
    net = zoo.caffe_source("examples/cifar10/cifar10_quick_train_test.prototxt", root)
    if net.parent != example:
        example.mkdir(parents=True, exist_ok=True)
        (example / net.name).write_text(net.read_text())
    text = (example / "cifar10_quick_train_test.prototxt").read_text()
    text = re.sub(r'(source: "examples/cifar10/cifar10_test_lmdb"\s*batch_size: )100', r"\g<1>113", text)
    (example / "cifar10_quick_train_test.prototxt").write_text(text)
    (example / "solver.prototxt").write_text(
        'net: "examples/cifar10/cifar10_quick_train_test.prototxt"\ntest_iter: 9\ntest_interval: 100000\n'
        'base_lr: 0.001\nmomentum: 0.9\nweight_decay: 0.004\nlr_policy: "fixed"\nmax_iter: 300\nsnapshot: 300\n'
        'snapshot_format: HDF5\nsnapshot_prefix: "examples/cifar10/cifar10_quick"\nsolver_mode: CPU\nrandom_seed: 1\n')
    cifar10_convert.prepare(SUBSET, example, order="rgb", progress=False)
    env = {**QUIET, "OPENBLAS_NUM_THREADS": "1"}
    subprocess.run([tool("caffe"), "train", "-solver", "examples/cifar10/solver.prototxt"], cwd=root, check=True,
                   env=env, capture_output=True)
    weights = example / "cifar10_quick_iter_300.caffemodel.h5"
    assert weights.is_file()
    done = subprocess.run([tool("caffe"), "test", "-model", "examples/cifar10/cifar10_quick_train_test.prototxt",
                           "-weights", str(weights), "-iterations", "9"], cwd=root, env={**env, "GLOG_minloglevel": "0",
                                                                                           "GLOG_logtostderr": "1"},
                          capture_output=True, text=True, check=True)
    accuracy = float(re.findall(r"accuracy = ([0-9.]+)", done.stderr)[-1])
    return root, weights, accuracy


def evaluate(root, *args):
    out = subprocess.run([sys.executable, "-m", "caffe_prune", "evaluate", *map(str, args), "--json"], cwd=root,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.slow
def test_a_caffe_trained_hdf5_model_scores_what_caffe_test_reports(trained):
    root, weights, accuracy = trained
    net = "examples/cifar10/cifar10_quick_train_test.prototxt"
    own = evaluate(root, net, weights)                                  # the net's own data layers
    assert own["images"] == 1017 and own["top1"] == pytest.approx(accuracy, abs=1e-6)
    rgb = evaluate(root, net, weights, "--data", SUBSET)                 # not a built-in net: RGB by default
    assert rgb["top1"] == own["top1"] and rgb["images"] == 1017
    explicit = evaluate(root, net, weights, "--data", SUBSET, "--channel-order", "rgb")
    assert explicit["top1"] == own["top1"]
    bgr = evaluate(root, net, weights, "--data", SUBSET, "--channel-order", "bgr")
    assert bgr["top1"] < own["top1"] - 0.02                             # the other order: silently worse


def test_hdf5_weights_that_do_not_fit_are_one_line(caffe, tmp_path, capsys):
    import h5py
    with h5py.File(tmp_path / "w.caffemodel.h5", "w") as f:
        f.create_dataset("data/conv1/0", data=np.zeros((3, 3, 5, 5), np.float32))
    (tmp_path / "junk.caffemodel.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    for weights, message in ((tmp_path / "w.caffemodel.h5", "holds no weights for layer(s)"),
                             (tmp_path / "junk.caffemodel.h5", "is not a caffemodel (HDF5: ")):
        assert cli.main(["evaluate", "CIFAR10", str(weights), "--batches", "1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert cli.main(["graph", str(tmp_path / "w.caffemodel.h5")]) == 2
    assert "an HDF5 caffemodel, which holds weights but no network definition" in capsys.readouterr().err
    named = tmp_path / "hdf5-inside.caffemodel"                 # the name of a binary one, HDF5 inside
    named.write_bytes((tmp_path / "w.caffemodel.h5").read_bytes())
    for argv in (["graph", str(named)], ["import", str(named), "--out", str(tmp_path / "imported")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{named} is an HDF5 caffemodel, which holds weights but no network " \
                                           f"definition" in err, err


def test_the_channel_order_is_stated_and_only_for_cifar10(caffe, tmp_path, capsys):
    lmdb_dir = tmp_path / "db"
    from caffe_prune.data import synthetic
    synthetic.write_random_lmdb(lmdb_dir, 8, (3, 32, 32), 10, 0)
    assert cli.main(["evaluate", "CIFAR10", "published", "--data", str(lmdb_dir), "--channel-order", "rgb"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--channel-order rgb: records of " in err and "are fed as they are stored" in err
    assert cli.main(["evaluate", "CIFAR10", "published", "--batches", "1"]) == 0
    assert "BGR planes (the built-in networks' published weights expect it; --channel-order to choose); " \
           "transform " in capsys.readouterr().out                  # a built-in net: the authors' order


IMAGE_DATA = """layer { name: "data" type: "ImageData" top: "data" top: "label" include { phase: TEST }
  image_data_param { source: "absent-list.txt" batch_size: 4 } }
"""
LMDB_DATA = """layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  data_param { source: "%s" batch_size: 4 backend: LMDB } }
"""
INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }\n'
BODY = """layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 10 } }
"""


def test_the_default_channel_order_follows_what_the_nets_data_layers_read(caffe, tmp_path):
    """Not a built-in net: BGR where its own data layers say so (ImageData reads through OpenCV; an
    LMDB `data cifar10` recorded as BGR), RGB otherwise (what convert_cifar_data writes); the
    records read are the release's planes in that order."""
    bgr_lmdb = cifar10_convert.prepare(SUBSET, tmp_path / "prepared", progress=False)["paths"]["test"]
    rgb_lmdb = cifar10_convert.prepare(SUBSET, tmp_path / "caffe-way", progress=False, order="rgb")["paths"]["test"]
    again = cifar10_convert.prepare(SUBSET, tmp_path / "caffe-way", progress=False, order="rgb")
    assert again["actions"] == {"train": "kept", "test": "kept", "mean": "kept", "validation": "kept"}
    cases = {"image-data": (IMAGE_DATA, "bgr", "its data layer 'data' (ImageData) reads images through OpenCV, BGR"),
             "bgr-lmdb": (LMDB_DATA % bgr_lmdb, "bgr", f"its data layer 'data' reads {bgr_lmdb}, recorded as BGR"),
             "rgb-lmdb": (LMDB_DATA % rgb_lmdb, "rgb", f"its data layer 'data' reads {rgb_lmdb}, recorded as RGB"),
             "bgr-name": (LMDB_DATA % (tmp_path / "absent" / "cifar10-test-lmdb"), "bgr", "its data layer 'data' "
                          "reads cifar10-test-lmdb, the name of the BGR LMDBs `caffe-prune data cifar10` writes"),
             "rgb-name": (LMDB_DATA % (tmp_path / "absent" / "cifar10_test_lmdb"), "rgb", "its data layer 'data' "
                          "reads cifar10_test_lmdb, the name of the RGB LMDBs `caffe-prune data cifar10` writes"),
             "deploy": (INPUT, "rgb", "as Caffe's convert_cifar_data wrote CIFAR-10 for a net trained the Caffe way")}
    from caffe_prune.data import cifar10
    release = cifar10.read_split("test", cifar10.fetch(SUBSET, progress=False))[0]
    for name, (data_layer, order, why) in cases.items():
        path = tmp_path / f"{name}.prototxt"
        path.write_text(data_layer + BODY)
        dataset = open_dataset(Network.open(path), data=str(SUBSET), progress=False, holdout=False)
        assert dataset.channel_order == order and f"{order.upper()} planes ({why}; --channel-order to choose)" \
            in dataset.sources, (name, dataset.sources)
        first = dataset._test.read([0, 1])[0]
        np.testing.assert_array_equal(first, release[:2, ::-1] if order == "bgr" else release[:2])
        asked = open_dataset(Network.open(path), data=str(SUBSET), progress=False, holdout=False,
                             channel_order="bgr")
        assert "BGR planes (as --channel-order asks)" in asked.sources


def single_source_net(tmp_path, train_source):
    lmdb_dir = tmp_path / "test-db"
    from caffe_prune.data import synthetic
    synthetic.write_random_lmdb(lmdb_dir, 300, (3, 32, 32), 10, 0)
    text = (REPO / "prototxt" / "CIFAR10" / "train_test.prototxt").read_text()
    text = text.replace("{test_lmdb}", str(lmdb_dir)).replace("{train_lmdb}", str(train_source))
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    return path


def test_validation_from_the_test_images_only_when_asked(caffe, tmp_path, capsys):
    net = single_source_net(tmp_path, tmp_path / "missing-train-db")
    common = ["prune", str(net), "--metric", "taylor", "--max-steps", "1", "--test-size", "1", "--eval-size", "1",
              "--batch-size", "32", "--quiet", "--out", str(tmp_path / "run")]
    from caffe_prune import published_weights
    weights = str(published_weights.caffemodel("CIFAR10"))
    common.insert(2, weights)
    assert cli.main(common) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "names TRAIN source" in err and "missing-train-db, which does not exist" in err
    assert "--val-from test" in err and not (tmp_path / "run" / "steps.jsonl").exists()
    assert cli.main(common + ["--val-from", "test"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{tmp_path / 'run'}: validation 60 images from the test source (--val-from test), "
                            f"test 240 images")


def test_each_phase_is_transformed_with_its_own_parameters(caffe, tmp_path):
    """The common CIFAR augmentation layout: 40x40 padded training records cropped to 32 with their
    own mean, 32x32 test records with theirs. Validation batches are the TRAIN layer's centre crop
    minus the TRAIN mean at the cropped positions; test batches the TEST records minus the TEST mean."""
    from caffe_prune.data import synthetic
    rng = np.random.default_rng(3)
    train_db, test_db = tmp_path / "train-db", tmp_path / "test-db"
    synthetic.write_random_lmdb(train_db, 50, (3, 40, 40), 10, 1)
    synthetic.write_random_lmdb(test_db, 20, (3, 32, 32), 10, 2)
    train_mean = rng.uniform(0, 255, (1, 3, 40, 40)).astype(np.float32)
    test_mean = rng.uniform(0, 255, (1, 3, 32, 32)).astype(np.float32)
    for name, mean in (("train-mean", train_mean), ("test-mean", test_mean)):
        blob = pycaffe.caffe_pb2().BlobProto(num=1, channels=3, height=mean.shape[2], width=mean.shape[3])
        blob.data.extend(mean.ravel())
        (tmp_path / f"{name}.binaryproto").write_bytes(blob.SerializeToString())
    text = (REPO / "prototxt" / "CIFAR10" / "train_test.prototxt").read_text()
    text = text.replace("{train_lmdb}", str(train_db)).replace("{test_lmdb}", str(test_db))
    text = re.sub(r"transform_param \{[^}]*\}", "TRANSFORM", text, count=2)
    text = text.replace("TRANSFORM", f'transform_param {{ crop_size: 32 mirror: true mean_file: "{tmp_path}/train-mean.binaryproto" }}', 1)
    text = text.replace("TRANSFORM", f'transform_param {{ mean_file: "{tmp_path}/test-mean.binaryproto" }}', 1)
    (tmp_path / "net.prototxt").write_text(text)
    dataset = open_dataset(Network.open(tmp_path / "net.prototxt"), progress=False)
    assert dataset.shape == (3, 32, 32) and "(TRAIN)" in dataset.val_transform.where
    train_records = records_array(train_db)
    test_records = records_array(test_db)
    positions = dataset.validation.positions[:4]
    x, _ = dataset.validation.batch(np.arange(4))
    expected = train_records[positions, :, 4:36, 4:36] - train_mean[0][:, 4:36, 4:36]
    np.testing.assert_array_equal(x, expected)
    x, _ = dataset.test.batch(np.arange(3))
    np.testing.assert_array_equal(x, test_records[:3] - test_mean[0])


def records_array(path):
    datum = pycaffe.caffe_pb2().Datum()
    out = []
    for _, value in sorted(records(path).items()):
        datum.ParseFromString(value)
        out.append(np.frombuffer(datum.data, np.uint8).reshape(datum.channels, datum.height, datum.width))
    return np.stack(out).astype(np.float32)


def test_a_run_that_failed_before_step_1_does_not_block_the_command(caffe, tmp_path, capsys):
    from caffe_prune import pruning, published_weights
    from caffe_prune.rundir import RunDir
    out = tmp_path / "run"
    weights = str(published_weights.caffemodel("LeNet-5"))
    RunDir(out).path.mkdir()
    base = dict(net="LeNet-5", weights=weights, metric="taylor", test_size=1, eval_size=1, batch_size=32,
                max_steps=1, data=str(SUBSET))
    first = pruning.Run(pruning.Config(**{**base, "seed": 5}), out, progress=False)
    first._append({"step": 0, "groups": [], "test": first._test(), **first._counts(set()), "seconds": 0.0})
    first.close()                                    # a run that stopped after step 0 (say its step 1 failed)
    steps = pruning.Run(pruning.Config(**{**base, "seed": 6}), out, progress=False).run()   # another config
    assert len(steps) == 2 and json.loads((out / "config.json").read_text())["config"]["seed"] == 6
    # with a pruning step recorded, another configuration is still refused
    with pytest.raises(Exception, match="holds a run with a different configuration"):
        pruning.Run(pruning.Config(**{**base, "seed": 7}), out, progress=False)


def test_training_writes_cifar10_in_the_order_the_net_will_be_fed(caffe, tmp_path):
    """`train --data`: the built-in nets' LMDBs are BGR, another net's RGB (what evaluate and prune
    then feed it), --channel-order chooses; a net whose own TRAIN and TEST LMDBs were written in
    different orders is refused in one line."""
    from caffe_prune import train
    text = (REPO / "prototxt" / "CIFAR10" / "train_test.prototxt").read_text()
    mine = tmp_path / "mine.prototxt"
    mine.write_text(text.replace("{train_lmdb}", "absent-train").replace("{test_lmdb}", "absent-test"))
    out = tmp_path / "lmdbs"
    for spec, order, asked in (("CIFAR10", "bgr", None), (mine, "rgb", None), (mine, "bgr", "bgr")):
        recipe = train.recipe(str(spec), SUBSET, out, progress=False, channel_order=asked)
        assert recipe.data["channel_order"] == order
        assert recipe.data["lmdb"]["test"] == str(out / cifar10_convert.LAYOUTS[order]["lmdb"].format(split="test"))
    mixed = tmp_path / "mixed.prototxt"
    mixed.write_text(text.replace("{train_lmdb}", str(out / "cifar10-train-lmdb"))
                     .replace("{test_lmdb}", str(out / "cifar10_test_lmdb")))
    assert cli.main(["train", str(mixed), "--iters", "1", "--out", str(tmp_path / "run")]) == 2
    from caffe_prune.errors import DataError
    with pytest.raises(DataError, match=r"mixed.prototxt: its data layers read different channel orders "
                                        r"\('data' reads BGR, 'data' reads RGB\)"):
        train.recipe(str(mixed), progress=False)

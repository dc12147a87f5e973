"""Datasets streamed a batch at a time (caffe_prune.data.dataset): the same images and hashes as the
records read whole and transformed, the paper's 10,000 validation images from large sets, memory
bounded by the batches, and bad input met mid-stream (a record that is not a Datum, a source that
changes during a run, a missing image) as one line naming the record."""
import subprocess
import sys
import time

import numpy as np
import pytest

from caffe_prune import pycaffe
from caffe_prune.data import layer_records, synthetic, validation
from caffe_prune.data.dataset import open_dataset, records_sha256
from caffe_prune.data.transform import Transform
from caffe_prune.session import Network
from conftest import REPO

NET = """name: "stream"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ crop_size: 10 mean_value: 100 mean_value: 120 mean_value: 140 scale: 0.02 }}
  data_param {{ source: "{lmdb}" backend: LMDB batch_size: 16 }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ crop_size: 10 mean_value: 100 mean_value: 120 mean_value: 140 scale: 0.02 }}
  data_param {{ source: "{lmdb}" backend: LMDB batch_size: 16 }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: 6 kernel_size: 3 weight_filler {{ type: "gaussian" std: 0.05 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "conv" top: "conv" }}
layer {{ name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param {{ pool: AVE global_pooling: true }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
  inner_product_param {{ num_output: 5 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""

DEPLOY = """name: "list"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 6 kernel_size: 3 weight_filler { type: "gaussian" std: 0.05 } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def cli(*argv, wait=True):
    command = [sys.executable, "-m", "caffe_prune", *map(str, argv)]
    if not wait:
        return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True)


@pytest.fixture
def stream(caffe, tmp_path):
    """A 300-record LMDB of random 3x12x12 Datums (5 classes), a train_val prototxt whose TRAIN and
    TEST layers both read it, and weights from the net's fillers."""
    lmdb = tmp_path / "lmdb"
    synthetic.write_random_lmdb(lmdb, 300, (3, 12, 12), classes=5, seed=3, progress=False)
    net = tmp_path / "net.prototxt"
    net.write_text(NET.format(lmdb=lmdb))
    weights = tmp_path / "w.caffemodel"
    assert cli("init", net, "--out", weights).returncode == 0
    return net, weights, lmdb


def test_synthetic_lmdb_is_seeded_and_reads_as_datums(caffe, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for path in (a, b):
        done = synthetic.write_random_lmdb(path, 1500, (2, 5, 7), classes=4, seed=9, progress=False)
    assert done["images"] == 1500 and (a / "data.mdb").read_bytes() == (b / "data.mdb").read_bytes()
    layer = pycaffe.caffe_pb2().LayerParameter(name="d", type="Data", top=["data", "label"])
    layer.data_param.source, layer.data_param.backend = str(a), pycaffe.caffe_pb2().DataParameter.LMDB
    got = layer_records.read(layer, progress=False)
    rng = np.random.default_rng(9)                  # the same draws, chunk by chunk
    pixels = rng.integers(0, 256, size=(1000, 70), dtype=np.uint8)
    labels = rng.integers(0, 4, size=1000)
    np.testing.assert_array_equal(got.images[:1000].reshape(1000, -1), pixels)
    np.testing.assert_array_equal(got.labels[:1000], labels)
    assert got.images.shape == (1500, 2, 5, 7) and got.labels.max() < 4


def test_streamed_splits_are_the_records_transformed(stream):
    """One source (both phases read the LMDB): the validation split is a fifth of it, drawn as
    CIFAR-10's, and held out of the test split; every way of reading a split gives the records
    read whole, transformed, bit for bit, and the split's sha256 is theirs."""
    net, _, lmdb = stream
    dataset = open_dataset(Network.open(net), progress=False, val_from="test")
    layer = pycaffe.read_prototxt(net).layer[1]
    whole = layer_records.read(layer, progress=False)
    val = validation.validation_indices(300, 0)
    rest = np.setdiff1d(np.arange(300), val)
    assert len(dataset.validation) == 60 and len(dataset.test) == 240
    transform = Transform.of(layer)
    np.testing.assert_array_equal(dataset.test.x, transform.apply(whole.images[rest]))
    np.testing.assert_array_equal(dataset.validation.y, whole.labels[val])
    streamed = list(dataset.test.batches(32))
    assert [len(y) for _, y in streamed] == [32] * 7 + [16]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in streamed]), dataset.test.x)
    index = np.random.default_rng(1).choice(240, 50, replace=False)
    x, y = dataset.test.batch(index)
    np.testing.assert_array_equal(x, dataset.test.x[index])
    np.testing.assert_array_equal(y, whole.labels[rest][index])
    assert dataset.test.sha256 == records_sha256(whole.images[rest], whole.labels[rest])
    assert dataset.validation.sha256 == records_sha256(whole.images[val], whole.labels[val])
    assert dataset.identity["validation_from"] == "the test source" and dataset.shape == (3, 10, 10)


def test_validation_is_the_papers_10000_of_a_large_set():
    assert len(validation.validation_indices(5085)) == 1017           # a fifth of a partial CIFAR-10
    assert len(validation.validation_indices(50_000)) == 10_000
    big = validation.validation_indices(1_281_167, seed=2)             # ImageNet's training set
    assert len(big) == 10_000 and (np.diff(big) > 0).all() and big[-1] < 1_281_167


def test_probe_frontiers_fit_the_budget_and_give_the_same_losses(caffe):
    """A worker keeps the probes' frontiers that fit its budget (the latest first) and resumes the
    others from an earlier one or the input: the losses are the same bits as with every frontier."""
    from caffe_prune import masking, engines
    from caffe_prune.session import Session
    from conftest import PUBLISHED, SUBSET
    session = Session.open("ResNet-20", PUBLISHED / "ResNet-20-CIFAR10" / "original.caffemodel", SUBSET,
                           batch_size=16, progress=False)
    masker = masking.Masker(session.graph, [session.net])
    batch = session.dataset.validation.batch(np.arange(16))
    candidates = [0, 17, 120, 300, 447]
    plan = engines.Plan(session.net, session.graph)
    starts = sorted({plan.start(masker.group_regions(g)) for g in candidates})
    sizes = {s: 16 * sum(int(np.prod(session.net.blobs[b].data.shape[1:])) * 4 for b in plan.frontier(s))
             for s in starts}
    results = {}
    for budget in (10 ** 12, sizes[starts[-1]] + sizes[starts[-2]], 0):
        worker = engines.Worker(session.net, session.graph, masker, 16, budget)
        kept = worker.frontiers(starts, 16)
        assert sum(sizes[s] for s in kept) <= budget
        results[budget] = (kept, worker.probe(batch, candidates))
    assert results[10 ** 12][0] == starts and results[0][0] == [] and results[sizes[starts[-1]] + sizes[starts[-2]]][0] == starts[-2:]
    assert results[10 ** 12][1] == results[0][1] == results[sizes[starts[-1]] + sizes[starts[-2]]][1]


@pytest.mark.slow
def test_evaluate_streams_in_bounded_memory(caffe, tmp_path):
    """Scoring every image of a 440 MiB LMDB grows the evaluating process's peak resident set by a
    fraction of it (the batches, not the data set); scoring two batches reads two batches."""
    lmdb = tmp_path / "big"
    synthetic.write_random_lmdb(lmdb, 3000, (3, 224, 224), classes=5, seed=0, progress=False)
    net = tmp_path / "net.prototxt"
    net.write_text(NET.format(lmdb=lmdb).replace("crop_size: 10", "crop_size: 200"))
    weights = tmp_path / "w.caffemodel"
    assert cli("init", net, "--out", weights).returncode == 0
    code = ("import resource, sys; from caffe_prune import cli; rc = cli.main(sys.argv[1:]); "
            "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    peaks = {}
    for batches in ("2", None):
        argv = ["evaluate", str(net), str(weights), "--json"] + (["--batches", batches] if batches else [])
        done = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        peaks[batches] = int(done.stdout.split("peak")[-1]) * 1024
    data_bytes = sum(f.stat().st_size for f in lmdb.iterdir())
    assert data_bytes > 400 * 2 ** 20
    assert peaks[None] - peaks["2"] < data_bytes / 4, (peaks, data_bytes)


def corrupt(lmdb, key: bytes):
    import lmdb as lm
    with lm.open(str(lmdb), map_size=1 << 30) as env, env.begin(write=True) as txn:
        txn.put(key, b"\xff\x00 not a Datum")


def test_a_record_that_does_not_parse_midway_is_named(stream):
    net, weights, lmdb = stream
    corrupt(lmdb, b"%08d" % 200)
    done = cli("evaluate", net, weights, "--json")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "record b'00000200'" in line and "is not a Datum" in line


def test_a_missing_image_of_a_list_is_named(caffe, tmp_path):
    import skimage.io
    lines = []
    for i in range(40):
        name = tmp_path / f"img{i}.png"
        if i != 33:
            skimage.io.imsave(name, np.full((12, 12, 3), 50 + i, np.uint8), check_contrast=False)
        lines.append(f"{name} {i % 5}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    net = tmp_path / "net.prototxt"
    net.write_text(DEPLOY)
    weights = tmp_path / "w.caffemodel"
    assert cli("init", net, "--out", weights).returncode == 0
    done = cli("evaluate", net, weights, "--data", tmp_path / "list.txt", "--scale", "0.02", "--json")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "list.txt:34" in line and "img33.png does not exist" in line
    short = tmp_path / "short.txt"                   # the lines before it are fine, and read alone
    short.write_text("\n".join(lines[:33]) + "\n")
    assert cli("evaluate", net, weights, "--data", short, "--scale", "0.02").returncode == 0



@pytest.mark.slow
def test_an_lmdb_that_changes_during_a_run_stops_it_and_the_resume_sees_it(stream):
    """A record added while a pruning run reads its LMDB, once it has taken a step: the run stops
    with one line naming the LMDB; the same command then refuses to resume a run of other data
    (contents, not the path). (A run stopped at step 0 has nothing to keep: its resume starts over.)"""
    net, weights, lmdb = stream
    out = lmdb.parent / "run"
    argv = ["prune", net, weights, "--metric", "weights/x/l1/none", "--no-drop-stop", "--batch-size", "16",
            "--test-size", "15", "--workers", "1", "--quiet", "--val-from", "test", "--out", out]
    proc = cli(*argv, wait=False)
    deadline = time.time() + 120
    def steps_taken():
        return len((out / "steps.jsonl").read_text().splitlines()) - 1 if (out / "steps.jsonl").is_file() else 0
    while time.time() < deadline and proc.poll() is None and steps_taken() < 1:
        time.sleep(0.05)
    import lmdb as lm
    import caffe.io
    with lm.open(str(lmdb), map_size=1 << 30) as env, env.begin(write=True) as txn:
        txn.put(b"%08d" % 300, caffe.io.array_to_datum(np.zeros((3, 12, 12), np.uint8), 1).SerializeToString())
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    (line,) = err.strip().splitlines()
    assert str(lmdb) in line and "changed since it was opened" in line
    again = cli(*argv)
    assert again.returncode == 2 and "validation_sha256" not in again.stderr
    assert "holds a run with a different configuration (data contents)" in again.stderr

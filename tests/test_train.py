"""Training with Caffe's SGD solver on the subset: it learns, it snapshots, it resumes."""
import numpy as np
import pytest

from caffe_prune import cli, engine, train
from caffe_prune.data import cifar10
from conftest import SUBSET, evaluation


@pytest.fixture(scope="module")
def lmdbs(tmp_path_factory):
    return cifar10.prepare(SUBSET, tmp_path_factory.mktemp("data"), progress=False)


def run(lmdbs, out, **kw):
    return train.train("LeNet-5", lmdbs["paths"]["train"], lmdbs["paths"]["test"], out,
                       n_test=lmdbs["counts"]["test"], mode="cpu", progress=False, **kw)


@pytest.mark.slow
def test_lenet5_from_scratch_beats_chance(caffe, lmdbs, tmp_path):
    """300 iterations of the published schedule (lr 0.001, momentum 0.9) on 5085 images: measured
    36.5% top-1 on the 1017 test images; chance is 10%."""
    done = run(lmdbs, tmp_path, max_iter=300)
    assert done["iterations"] == 300
    scores = evaluation("LeNet-5", done["weights"], None)
    assert scores["top1"] > 0.25
    # the solver's test net (8 batches, wrapping around to 1024 images) agrees with the exact count
    assert done["test_top1_net"] == pytest.approx(scores["top1"], abs=0.03)


def test_resume_continues_from_the_snapshot(caffe, lmdbs, tmp_path):
    first = run(lmdbs, tmp_path, max_iter=20)
    snapshot = tmp_path / "snapshots" / "LeNet-5_iter_20.caffemodel"
    assert first["solverstate"].endswith("LeNet-5_iter_20.solverstate") and snapshot.is_file()
    again = run(lmdbs, tmp_path / "again", max_iter=20, resume=first["solverstate"])   # no step left
    saved = engine.read_caffemodel(again["weights"])
    original = engine.read_caffemodel(snapshot)
    for a, b in zip(saved.layer, original.layer):
        for x, y in zip(a.blobs, b.blobs):
            np.testing.assert_array_equal(np.asarray(x.data), np.asarray(y.data))
    assert again["iterations"] == 20
    more = run(lmdbs, tmp_path, max_iter=30, resume="latest")
    assert more["iterations"] == 30 and more["solverstate"].endswith("_iter_30.solverstate")


def test_impossible_arguments(caffe, lmdbs, tmp_path):
    with pytest.raises(engine.EngineError, match="--iters must be at least 1"):
        run(lmdbs, tmp_path, max_iter=0)
    with pytest.raises(engine.EngineError, match="no .solverstate under"):
        run(lmdbs, tmp_path / "fresh", max_iter=5, resume="latest")
    with pytest.raises(engine.EngineError, match="unknown network 'LeNet-7'"):
        train.train("LeNet-7", "a", "b", tmp_path, n_test=10, progress=False)

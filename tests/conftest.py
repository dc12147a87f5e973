"""Shared fixtures: the engine's pycaffe, and a tiny net written from prototxt text."""
import json
import os
from pathlib import Path

import pytest

from caffe_prune import engine

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PUBLISHED = SHARED / "models" / "published"
SUBSET = SHARED / "data" / "cifar10-subset"
# papers/004 Table 1, as transcribed in ../shared/reference/published.json
TABLE1 = json.loads((SHARED / "reference" / "published.json").read_text())["table1_trained_networks"]
# the local mirrors the Makefile and .ci/run point the library at (set here too for a bare pytest)
os.environ.setdefault("CAFFE_PRUNE_DATA", str(SUBSET))
os.environ.setdefault("CAFFE_PRUNE_MODELS", str(PUBLISHED))


@pytest.fixture(scope="session")
def caffe():
    cf = engine.caffe()
    engine.set_mode("cpu")
    return cf


@pytest.fixture
def write_net(tmp_path):
    """Write prototxt text to a file and return its path."""
    def write(text, name="net.prototxt"):
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


def evaluation_form(net_param, batch_size=128, input_shape=(3, 32, 32), classes=10):
    """The evaluation form of a CIFAR-10 net (caffe_prune.netdef), as caffe_prune.session builds it."""
    from caffe_prune import netdef
    return netdef.evaluation_form(net_param, input_shape, batch_size, netdef.choose_head(net_param), classes)


def evaluation(net, weights, batches=None, data=SUBSET, **kw):
    """`caffe-prune evaluate NET WEIGHTS --data DATA` as a call: the scores."""
    import argparse
    from caffe_prune import cli
    args = argparse.Namespace(net=str(net), weights=str(weights), data=None if data is None else str(data),
                              batches=batches, input_shape=None,
                              logits=None, data_root="", scale=None, mean_value=None, mean_file=None, crop_size=None)
    for key, value in kw.items():
        setattr(args, key, value)
    return cli.run_evaluation(args, progress=False)[0]

"""Shared fixtures: the engine's pycaffe, and a tiny net written from prototxt text."""
import json
from pathlib import Path

import pytest

from caffe_prune import engine

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PUBLISHED = SHARED / "models" / "published"
SUBSET = SHARED / "data" / "cifar10-subset"
# papers/004 Table 1, as transcribed in ../shared/reference/published.json
TABLE1 = json.loads((SHARED / "reference" / "published.json").read_text())["table1_trained_networks"]


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

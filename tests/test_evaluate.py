"""The published models, fed as the original experiments fed them, reproduce papers/004 Table 1."""
import pytest

from caffe_prune import cli
from conftest import PUBLISHED, SUBSET, TABLE1


@pytest.mark.parametrize("name", ["LeNet-5", "ResNet-20"])
def test_published_model_reproduces_table1(caffe, name):
    weights = PUBLISHED / f"{name}-CIFAR10" / "original.caffemodel"
    scores = cli.run_evaluation(weights, weights, SUBSET, None, progress=False)
    assert scores["images"] == 1017
    assert abs(100 * scores["top1"] - TABLE1[name]["top1_percent"]) <= 3
    assert scores["top1"] <= scores["top5"] <= 1.0


def test_batches_limit_and_impossible_argument(caffe):
    weights = PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel"
    assert cli.run_evaluation(weights, weights, SUBSET, 2, progress=False)["images"] == 256
    with pytest.raises(Exception, match="--batches must be at least 1"):
        cli.run_evaluation(weights, weights, SUBSET, 0, progress=False)

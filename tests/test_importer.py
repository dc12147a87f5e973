"""Import of the authors' published format into stock files."""
import numpy as np
import pytest

from caffe_prune import importer, pycaffe
from caffe_prune.errors import InputError
from conftest import PUBLISHED, TABLE1, evaluation

FORK_PROTOTXT = """
name: "fork"
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 } param { lr_mult: 2 } param { lr_mult: 0 } param { lr_mult: 0 }
  convolution_mask_param { mask_term: true note: "a } in a string" }
  convolution_param { num_output: 20 kernel_size: 5 }
  saliency_param { saliency: TAYLOR }
}
"""


def test_parse_tolerant_drops_and_lists_unknown_fields(caffe, tmp_path):
    path = tmp_path / "fork.prototxt"
    path.write_text(FORK_PROTOTXT)
    net = pycaffe.caffe_pb2().NetParameter()
    dropped = importer.parse_tolerant(path, net)
    assert dropped == ["convolution_mask_param", "saliency_param"]
    assert net.layer[0].convolution_param.num_output == 20 and len(net.layer[0].param) == 4


def test_mask_blobs_are_applied_and_removed(caffe):
    model = pycaffe.read_caffemodel(PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel")
    conv1 = next(l for l in model.layer if l.name == "conv1")
    w = np.asarray(conv1.blobs[0].data, dtype=np.float32).reshape(20, 3, 5, 5)
    rng = np.random.default_rng(0)
    mask = (rng.random(w.shape) > 0.3).astype(np.float32)
    bias_mask = np.ones(20, dtype=np.float32)
    bias_mask[[2, 7]] = 0
    for array in (mask, bias_mask):
        blob = conv1.blobs.add()
        blob.shape.dim.extend(array.shape)
        blob.data.extend(array.ravel().tolist())
    weights = importer.unmasked_weights(model)
    assert len(weights["conv1"]) == 2
    np.testing.assert_array_equal(weights["conv1"][0], w * mask)
    b = np.asarray(conv1.blobs[1].data, dtype=np.float32)
    np.testing.assert_array_equal(weights["conv1"][1], b * bias_mask)


def test_not_a_published_directory(caffe, tmp_path):
    with pytest.raises(InputError, match="must hold exactly one caffemodel"):
        importer.import_published(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("name", ["LeNet-5", "ResNet-20"])
def test_import_published_scores_like_the_original(caffe, tmp_path, name):
    """Imported into the project's own definition, the weights score exactly as the original
    caffemodel with its embedded definition, and within 3 points of Table 1."""
    src = PUBLISHED / f"{name}-CIFAR10"
    with pytest.warns(UserWarning, match="dropped fields unknown to stock Caffe: convolution_mask_param"):
        done = importer.import_published(src, tmp_path)
    assert done["network"] == name and done["definition"] == "caffe_prune.networks"
    imported = evaluation(name, done["caffemodel"], None)
    original = evaluation(src / "original.caffemodel", src / "original.caffemodel", None)
    assert imported == pytest.approx(original, rel=1e-6)
    assert abs(100 * imported["top1"] - TABLE1[name]["top1_percent"]) <= 3


def test_import_falls_back_to_the_models_own_definition(caffe, tmp_path):
    """A caffemodel whose layer names do not fit caffe_prune's LeNet-5 is imported with its own
    (embedded) definition, with a warning naming the first mismatch, and still scores the same."""
    model = pycaffe.read_caffemodel(PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel")
    for layer in model.layer:
        if layer.name == "conv2":
            layer.name = "conv_b"
    (tmp_path / "LeNet-5-CIFAR10").mkdir()
    renamed = tmp_path / "LeNet-5-CIFAR10" / "original.caffemodel"
    renamed.write_bytes(model.SerializeToString())
    with pytest.warns(UserWarning, match=r"does not fit caffe_prune's LeNet-5 \(no weights for layer 'conv2'\)"):
        done = importer.import_published(renamed.parent, tmp_path / "out")
    assert done["definition"] == str(renamed)
    scores = evaluation(done["prototxt"], done["caffemodel"], 2)
    reference = evaluation(renamed, renamed, 2)
    assert scores == pytest.approx(reference, rel=1e-6)


def test_import_unknown_network_name(caffe, tmp_path):
    with pytest.raises(InputError, match="unknown network 'LeNet-6'"):
        importer.import_published(PUBLISHED / "LeNet-5-CIFAR10", tmp_path, net="LeNet-6")

"""CIFAR-10 as the original experiments fed it: records, channel order, transform, bad files."""
import numpy as np
import pytest

from caffe_prune import engine
from caffe_prune.data import cifar10
from conftest import SUBSET

IMAGE_DATA = """
layer {{ name: "data" type: "ImageData" top: "data" top: "label"
  transform_param {{ scale: 0.00390625 mean_value: 123.675 mean_value: 116.28 mean_value: 103.53 }}
  image_data_param {{ source: "{source}" batch_size: {n} new_height: 32 new_width: 32 }} }}
"""


def test_subset_counts_and_labels():
    images, labels = cifar10.read_split("train", SUBSET)
    assert images.shape == (5085, 3, 32, 32) and images.dtype == np.uint8
    test_images, test_labels = cifar10.read_split("test", SUBSET)
    assert test_images.shape == (1017, 3, 32, 32)
    # the official test_batch starts with cat, ship, ship, airplane, frog
    assert test_labels[:5].tolist() == [3, 8, 8, 0, 6]
    assert np.bincount(test_labels, minlength=10).sum() == 1017 and set(labels.tolist()) == set(range(10))


def test_input_equals_caffe_imagedata_on_png(caffe, tmp_path):
    """Images written as PNG and read back by Caffe's own ImageData layer (OpenCV imread: BGR)
    with transform_param equal caffe_input element for element."""
    import skimage.io
    images, labels = cifar10.read_split("test", SUBSET)
    n = 6
    lines = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        skimage.io.imsave(path, images[i].transpose(1, 2, 0), check_contrast=False)  # PNG holds RGB
        lines.append(f"{path} {labels[i]}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    proto = tmp_path / "imagedata.prototxt"
    proto.write_text(IMAGE_DATA.format(source=tmp_path / "list.txt", n=n))
    net = engine.load_net(proto)
    net.forward()
    expected = cifar10.caffe_input(images[:n], (123.675, 116.28, 103.53), 0.00390625)
    np.testing.assert_array_equal(net.blobs["data"].data, expected)
    np.testing.assert_array_equal(net.blobs["label"].data, labels[:n])
    # and it is not the RGB reading: channel order is load-bearing
    rgb = cifar10.caffe_input(images[:n, ::-1], (123.675, 116.28, 103.53), 0.00390625)
    assert np.abs(net.blobs["data"].data - rgb).max() > 0.1


def test_missing_directory_says_how_to_get_data(tmp_path):
    with pytest.raises(cifar10.DataError, match=r"no CIFAR-10 binary batches in .*caffe-prune data cifar10"):
        cifar10.read_split("test", tmp_path)


def test_truncated_record_file_names_file_and_size(tmp_path):
    bin_dir = tmp_path / cifar10.BIN_DIR
    bin_dir.mkdir()
    raw = (SUBSET / cifar10.BIN_DIR / "test_batch.bin").read_bytes()
    (bin_dir / "test_batch.bin").write_bytes(raw[:3073 * 4 + 100])
    with pytest.raises(cifar10.DataError, match=r"test_batch.bin has 12392 bytes, not a whole number"):
        cifar10.read_split("test", tmp_path)

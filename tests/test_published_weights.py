"""Published weights: mirror first, verified by size and sha256; downloads checked the same way."""
import json
import shutil

import pytest

from caffe_prune import published_weights
from caffe_prune.errors import InputError
from conftest import PUBLISHED


def test_mirror_is_used_and_verified():
    path = published_weights.caffemodel("ResNet-20")
    assert path == PUBLISHED / "ResNet-20-CIFAR10" / "original.caffemodel"


def test_mirror_with_another_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "LeNet-5-CIFAR10").mkdir()
    shutil.copy(PUBLISHED / "ResNet-20-CIFAR10" / "original.caffemodel", tmp_path / "LeNet-5-CIFAR10")
    monkeypatch.setenv(published_weights.MODELS_ENV, str(tmp_path))
    with pytest.raises(InputError, match=r"has 1112519 bytes, not 2629025: not the published LeNet-5"):
        published_weights.caffemodel("LeNet-5")


def test_download_is_verified_and_a_bad_one_moved_aside(tmp_path, monkeypatch):
    """A download (here from a file:// URL laid out like the authors' repository) is checked
    against the manifest; one with the wrong content is renamed *.corrupt and refused."""
    spec = json.loads(published_weights.MANIFEST.read_text())
    served = tmp_path / "served" / spec["commit"]
    (served / "LeNet-5-CIFAR10").mkdir(parents=True)
    shutil.copy(PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel", served / "LeNet-5-CIFAR10")
    spec["url"] = f"file://{tmp_path}/served/{{commit}}/{{dir}}/original.caffemodel"
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(spec))
    monkeypatch.setattr(published_weights, "MANIFEST", manifest)
    monkeypatch.setenv(published_weights.MODELS_ENV, str(tmp_path / "no-mirror"))
    cache = tmp_path / "cache"
    got = published_weights.caffemodel("LeNet-5", cache_dir=cache, progress=False)
    assert got == cache / "LeNet-5-CIFAR10" / "original.caffemodel" and got.stat().st_size == 2629025

    (served / "CIFAR10-CIFAR10").mkdir()
    (served / "CIFAR10-CIFAR10" / "original.caffemodel").write_bytes(b"\0" * 583328)
    with pytest.raises(InputError, match=r"sha256 [0-9a-f]+, not 72db633c.*moved aside to original.caffemodel.corrupt"):
        published_weights.caffemodel("CIFAR10", cache_dir=cache, progress=False)
    assert (cache / "CIFAR10-CIFAR10" / "original.caffemodel.corrupt").is_file()
    with pytest.raises(InputError, match=r"cannot download .*NIN-CIFAR10.*fetch it by hand"):
        published_weights.caffemodel("NIN", cache_dir=cache, progress=False)


def test_unknown_name():
    with pytest.raises(InputError, match="no published weights for 'AlexNet'"):
        published_weights.caffemodel("AlexNet")

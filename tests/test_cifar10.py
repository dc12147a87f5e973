"""CIFAR-10 as the original experiments fed it: records, channel order, transform, bad files;
its sources (directories, python pickles, archives, download), the LMDBs Caffe's Data layer reads,
and the validation split."""
import argparse
import functools
import hashlib
import http.server
import io
import json
import os
import pickle
import shutil
import tarfile
import threading

import numpy as np
import pytest

from caffe_prune import pycaffe
from caffe_prune.commands import data as data_commands
from caffe_prune.data import cifar10, cifar10_convert, validation
from caffe_prune.errors import DataError
from conftest import SUBSET

pytestmark = pytest.mark.xdist_group("test_data")       # one process: its module fixtures are costly

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
    net = pycaffe.load_net(proto)
    net.forward()
    expected = cifar10_convert.caffe_input(images[:n], (123.675, 116.28, 103.53), 0.00390625)
    np.testing.assert_array_equal(net.blobs["data"].data, expected)
    np.testing.assert_array_equal(net.blobs["label"].data, labels[:n])
    # and it is not the RGB reading: channel order is load-bearing
    rgb = cifar10_convert.caffe_input(images[:n, ::-1], (123.675, 116.28, 103.53), 0.00390625)
    assert np.abs(net.blobs["data"].data - rgb).max() > 0.1


def test_missing_directory_says_how_to_get_data(tmp_path):
    with pytest.raises(DataError, match=r"no CIFAR-10 binary batches in .*caffe-prune data cifar10"):
        cifar10.read_split("test", tmp_path)


def test_truncated_record_file_names_file_and_size(tmp_path):
    bin_dir = tmp_path / cifar10.BIN_DIR
    bin_dir.mkdir()
    raw = (SUBSET / cifar10.BIN_DIR / "test_batch.bin").read_bytes()
    (bin_dir / "test_batch.bin").write_bytes(raw[:3073 * 4 + 100])
    with pytest.raises(DataError, match=r"test_batch.bin has 12392 bytes, not a whole number"):
        cifar10.read_split("test", tmp_path)


# ---- conversion for Caffe's Data layer -----------------------------------------------------------

DATA_LAYER = """
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: {phase} }}
  transform_param {{ scale: 0.00390625 mirror: {mirror}
    mean_value: 123.675 mean_value: 116.28 mean_value: 103.53 }}
  data_param {{ source: "{source}" batch_size: {n} backend: LMDB }} }}
"""
MEANS, SCALE = (123.675, 116.28, 103.53), 0.00390625


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The subset converted once for this module: train/test LMDBs and the validation file."""
    out = tmp_path_factory.mktemp("prepared")
    return out, cifar10_convert.prepare(SUBSET, out, seed=0, progress=False)


def test_prepare_counts_and_second_run_keeps_everything(prepared):
    out, first = prepared
    assert first["counts"] == {"train": 5085, "test": 1017} and first["validation"] == 1017
    assert set(first["actions"].values()) == {"written"}
    again = cifar10_convert.prepare(SUBSET, out, seed=0, progress=False)
    assert set(again["actions"].values()) == {"kept"} and again["counts"] == first["counts"]
    other_seed = cifar10_convert.prepare(SUBSET, out, seed=1, progress=False)
    assert other_seed["actions"] == {"train": "kept", "test": "kept", "validation": "written"}
    cifar10_convert.prepare(SUBSET, out, seed=0, progress=False)   # leave seed 0 for the other tests


def test_data_layer_on_lmdb_equals_caffe_input(caffe, prepared, write_net):
    """Caffe's own Data layer reading the LMDB, with transform_param, gives exactly caffe_input:
    the records are BGR and untransformed."""
    out, _ = prepared
    n = 16
    proto = write_net(DATA_LAYER.format(phase="TEST", mirror="false", n=n, source=out / "cifar10-test-lmdb"))
    net = pycaffe.load_net(proto, phase="test")
    net.forward()
    images, labels = cifar10.read_split("test", SUBSET)
    np.testing.assert_array_equal(net.blobs["data"].data, cifar10_convert.caffe_input(images[:n], MEANS, SCALE))
    np.testing.assert_array_equal(net.blobs["label"].data, labels[:n])
    net.forward()   # the second batch continues in key order
    np.testing.assert_array_equal(net.blobs["data"].data, cifar10_convert.caffe_input(images[n:2 * n], MEANS, SCALE))


def test_data_layer_mirror_in_train_flips_some_images(caffe, prepared, write_net):
    out, _ = prepared
    n = 64
    proto = write_net(DATA_LAYER.format(phase="TRAIN", mirror="true", n=n, source=out / "cifar10-train-lmdb"))
    net = pycaffe.load_net(proto, phase="train")
    net.forward()
    images, labels = cifar10.read_split("train", SUBSET)
    expected = cifar10_convert.caffe_input(images[:n], MEANS, SCALE)
    got = net.blobs["data"].data
    plain = [np.array_equal(got[i], expected[i]) for i in range(n)]
    flipped = [np.array_equal(got[i], expected[i, :, :, ::-1]) for i in range(n)]
    assert all(p or f for p, f in zip(plain, flipped))
    assert any(p and not f for p, f in zip(plain, flipped)) and any(f and not p for p, f in zip(plain, flipped))
    np.testing.assert_array_equal(net.blobs["label"].data, labels[:n])


def test_lmdb_metadata_check_rejects_rgb_and_missing_json(prepared, tmp_path, write_net):
    out, _ = prepared
    meta = cifar10_convert.check_lmdb(out / "cifar10-test-lmdb", split="test", images=1017)
    assert meta["channel_order"] == "BGR" and sum(meta["label_counts"]) == 1017
    with pytest.raises(DataError, match=r"records split 'test', not 'train'"):
        cifar10_convert.check_lmdb(out / "cifar10-test-lmdb", split="train")
    rgb = tmp_path / "rgb-lmdb"
    shutil.copytree(out / "cifar10-test-lmdb", rgb)
    meta["channel_order"] = "RGB"
    (rgb / cifar10_convert.META).write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"rgb-lmdb/caffe-prune.json records channel_order 'RGB', not 'BGR'"):
        cifar10_convert.check_lmdb(rgb)
    proto = write_net(DATA_LAYER.format(phase="TEST", mirror="false", n=4, source=rgb))
    assert cifar10_convert.check_data_layers(pycaffe.read_prototxt(proto), proto) == "RGB"
    mixed = write_net(DATA_LAYER.format(phase="TRAIN", mirror="false", n=4, source=out / "cifar10-train-lmdb")
                      + DATA_LAYER.replace('name: "data"', 'name: "data_test"').format(
                          phase="TEST", mirror="false", n=4, source=rgb), name="mixed.prototxt")
    with pytest.raises(DataError, match=r"mixed.prototxt: its data layers read different channel orders "
                                        r"\('data' reads BGR, 'data_test' reads RGB\)"):
        cifar10_convert.check_data_layers(pycaffe.read_prototxt(mixed), mixed)
    broken = rgb.parent / "broken-lmdb"
    shutil.copytree(rgb, broken)
    (broken / cifar10_convert.META).write_text("{")
    proto = write_net(DATA_LAYER.format(phase="TEST", mirror="false", n=4, source=broken), name="broken.prototxt")
    with pytest.raises(DataError, match=r"broken.prototxt: layer 'data': .*caffe-prune.json is not JSON"):
        cifar10_convert.check_data_layers(pycaffe.read_prototxt(proto), proto)
    (rgb / cifar10_convert.META).unlink()
    with pytest.raises(DataError, match=r"rgb-lmdb has no caffe-prune.json"):
        cifar10_convert.check_lmdb(rgb)


# ---- sources: python pickles, archives, download -------------------------------------------------

def subset_records(name, n=None):
    raw = np.fromfile(SUBSET / cifar10.BIN_DIR / name, dtype=np.uint8).reshape(-1, cifar10.RECORD_BYTES)
    return raw[:n]


def write_py_batch(path, records):
    """A batch as the official python release pickles it (Python 2: numpy.core, bytes keys)."""
    batch = {b"batch_label": b"subset", b"labels": records[:, 0].astype(int).tolist(),
             b"data": np.ascontiguousarray(records[:, 1:]), b"filenames": [b"x.png"] * len(records)}
    path.write_bytes(pickle.dumps(batch, protocol=2).replace(b"numpy._core.", b"numpy.core."))


def test_py_directory_reads_back_as_binary(tmp_path):
    py_dir = tmp_path / "src" / cifar10.PY_DIR
    py_dir.mkdir(parents=True)
    for name in sum(cifar10.SPLIT_FILES.values(), []):
        write_py_batch(py_dir / name[:-4], subset_records(name))
    (py_dir / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane", b"automobile"]}, protocol=2))
    root = cifar10.fetch(tmp_path / "src", cache_dir=tmp_path / "cache")
    assert cifar10.summary(root) == {"train": 5085, "test": 1017}
    for split in ("train", "test"):
        for got, want in zip(cifar10.read_split(split, root), cifar10.read_split(split, SUBSET)):
            np.testing.assert_array_equal(got, want)
    assert (cifar10.binary_dir(root) / "batches.meta.txt").read_text() == "airplane\nautomobile\n"
    assert cifar10.fetch(py_dir, cache_dir=tmp_path / "cache") == root   # converted once, reused


def test_py_batch_that_calls_code_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return os.system, ("echo pwned",)
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": Exploit()}, protocol=2))
    with pytest.raises(DataError, match=r"test_batch is not a CIFAR-10 python batch: .*refers to "
                                                r"posix.system.*refusing"):
        cifar10.read_py_batch(path)


def make_archive(path, members):
    """A .tar.gz with members {name: bytes or None (a symlink)}."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def small_release(n=7):
    """The binary release's members, each batch cut to its first n records."""
    members = {f"{cifar10.BIN_DIR}/{name}": subset_records(name, n).tobytes()
               for name in sum(cifar10.SPLIT_FILES.values(), [])}
    members[f"{cifar10.BIN_DIR}/batches.meta.txt"] = b"airplane\n"
    return members


def md5_of(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_archive_extracts_only_expected_members(tmp_path):
    members = small_release()
    members.update({f"{cifar10.BIN_DIR}/run-me.sh": b"echo hi\n", "elsewhere/notes.txt": b"x"})
    archive = make_archive(tmp_path / "small.tar.gz", members)
    cache = tmp_path / "cache"
    root = cifar10.fetch(archive, cache_dir=cache, expected_md5=None)
    assert root == cache
    assert sorted(p.name for p in (cache / cifar10.BIN_DIR).iterdir()) == sorted(
        name.split("/")[1] for name in small_release())
    assert sorted(p.name for p in cache.iterdir()) == [cifar10.BIN_DIR, cifar10.FETCHED]
    assert cifar10.summary(root) == {"train": 35, "test": 7}
    images, labels = cifar10.read_split("test", root)
    np.testing.assert_array_equal(labels, subset_records("test_batch.bin", 7)[:, 0])


@pytest.mark.parametrize("evil", ["../evil", "/tmp/caffe-prune-evil", f"{cifar10.BIN_DIR}/../../evil",
                                  f"{cifar10.BIN_DIR}/test_batch.bin"])
def test_unsafe_archive_is_refused(tmp_path, evil):
    members = small_release()
    members[evil] = None if evil.endswith(".bin") else b"gotcha"   # the .bin one becomes a symlink
    archive = make_archive(tmp_path / "evil.tar.gz", members)
    with pytest.raises(DataError, match=r"evil.tar.gz: member .* is (an absolute path|a path with '..'|"
                                                r"a link); refusing the archive"):
        cifar10.fetch(archive, cache_dir=tmp_path / "cache", expected_md5=None)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "cache" / cifar10.BIN_DIR).exists()


def test_source_that_is_no_archive_is_left_alone(tmp_path):
    wrong = tmp_path / "data_batch_1.bin"
    shutil.copy(SUBSET / cifar10.BIN_DIR / "data_batch_1.bin", wrong)
    with pytest.raises(DataError, match=r"data_batch_1.bin is not a .tar.gz archive"):
        cifar10.fetch(wrong, cache_dir=tmp_path / "cache")
    assert wrong.is_file()


def test_md5_mismatch_of_the_users_archive_leaves_it(tmp_path):
    """An archive the user names is never renamed (only a download the toolkit made is moved aside:
    test_download_through_local_url_checks_md5)."""
    archive = make_archive(tmp_path / "small.tar.gz", small_release())
    got = md5_of(archive)
    with pytest.raises(DataError, match=rf"small.tar.gz: md5 {got} is not the official CIFAR-10 "
                                                rf"archive's {cifar10.ARCHIVE_MD5} .*left it where it is"):
        cifar10.fetch(archive, cache_dir=tmp_path / "cache")
    assert archive.is_file() and not list(tmp_path.glob("*.corrupt"))
    assert not (tmp_path / "cache" / cifar10.BIN_DIR).exists()


@pytest.fixture
def local_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www, counting requests."""
    www = tmp_path / "www"
    www.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


def test_download_through_local_url_checks_md5(tmp_path, local_server, monkeypatch):
    www, base, requests = local_server
    archive = make_archive(www / "cifar-10-binary.tar.gz", small_release())
    monkeypatch.setattr(cifar10, "URL", f"{base}/cifar-10-binary.tar.gz")
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", md5_of(archive))
    monkeypatch.setenv(cifar10.DATA_ENV, str(tmp_path / "nothing-here"))   # no local copy: download
    cache = tmp_path / "cache"
    root = cifar10.fetch(cache_dir=cache, progress=False)
    assert requests == ["/cifar-10-binary.tar.gz"] and md5_of(cache / "cifar-10-binary.tar.gz") == md5_of(archive)
    assert cifar10.summary(root) == {"train": 35, "test": 7}
    assert cifar10.fetch(cache_dir=cache, progress=False) == root and len(requests) == 1   # cached
    # a download that is not what the md5 says is moved aside, never extracted
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", "0" * 32)
    with pytest.raises(DataError, match=r"other/cifar-10-binary.tar.gz: md5 .* moved it aside"):
        cifar10.fetch(cache_dir=tmp_path / "other", progress=False)
    assert (tmp_path / "other" / "cifar-10-binary.tar.gz.corrupt").is_file()
    assert not (tmp_path / "other" / cifar10.BIN_DIR).exists()
    # file:// works the same way; a URL that does not answer says what to do
    root = cifar10.fetch(archive.as_uri(), cache_dir=tmp_path / "file", expected_md5=md5_of(archive))
    assert cifar10.summary(root)["test"] == 7
    with pytest.raises(DataError, match=r"cannot download .*missing.tar.gz .*pass the .tar.gz as --source"):
        cifar10.fetch(f"{base}/missing.tar.gz", cache_dir=tmp_path / "gone", progress=False)


# ---- the validation split ------------------------------------------------------------------------

def test_validation_indices_proportional_seeded_and_round_trip(tmp_path):
    indices = validation.validation_indices(5085, seed=0)
    assert len(indices) == 1017 and len(np.unique(indices)) == 1017
    assert indices.min() >= 0 and indices.max() < 5085
    assert len(validation.validation_indices(50_000)) == 10_000
    np.testing.assert_array_equal(indices, validation.validation_indices(5085, seed=0))
    other = validation.validation_indices(5085, seed=1)
    assert len(np.intersect1d(indices, other)) < 500   # ~1017 * 0.2 = 203 shared by chance
    path = validation.save_validation_indices(tmp_path / "val-indices.txt", indices, 5085, seed=0)
    assert path.read_text().startswith("# caffe-prune CIFAR-10 validation split: seed=0 n_train=5085 n_val=1017")
    np.testing.assert_array_equal(validation.load_validation_indices(path, seed=0, n_train=5085), indices)
    with pytest.raises(DataError, match=r"val-indices.txt: drawn with seed=0, not 3"):
        validation.load_validation_indices(path, seed=3)
    path.write_text(path.read_text() + "17\n")   # a repeated index
    with pytest.raises(DataError, match=r"not 1017 distinct values in 0..5084"):
        validation.load_validation_indices(path)


def test_cli_prints_counts(prepared, capsys):
    out, _ = prepared
    parser = argparse.ArgumentParser()
    data_commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "cifar10", "--source", str(SUBSET), "--out", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "train         5085 of 50,000 images" in printed and "(kept)" in printed
    assert "validation    1017 of the 5085 training images, seed 0" in printed

"""layer_records.read + transform.Transform against Caffe's own TEST-phase data layers, element for
element, on every kind of data layer (LMDB, LevelDB, encoded Datums, ImageData, HDF5Data); and
every bad input as a one-line DataError raised in this process (a Caffe CHECK would abort it)."""
import shutil
import subprocess
from pathlib import Path

import h5py
import lmdb
import numpy as np
import pytest
import skimage.io
from google.protobuf import text_format

from caffe_prune import pycaffe
from caffe_prune.data import caffe_reading, layer_records as data_records
from caffe_prune.errors import DataError
from caffe_prune.data.transform import Transform


@pytest.fixture(autouse=True)
def in_tmp(caffe, tmp_path, monkeypatch):
    """Each test in its own directory: every path in the layers is relative, as for Caffe."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def layer(text):
    param = pycaffe.caffe_pb2().LayerParameter()
    text_format.Parse(text, param)
    return param


def caffe_top(param):
    """data and label tops of Caffe's own layer `param`, one TEST-phase forward."""
    net_param = pycaffe.caffe_pb2().NetParameter(name="reference")
    net_param.layer.add().CopyFrom(param)
    net = pycaffe.net_from_param(net_param, phase="test", probe=False)
    net.forward()
    return net.blobs[param.top[0]].data.copy(), net.blobs[param.top[1]].data.copy()


def assert_as_caffe(param):
    """Transform.of(layer).apply(read(layer).images) and the labels equal Caffe's top blobs."""
    records = data_records.read(param, progress=False)
    got = Transform.of(param).apply(records.images)     # first: it refuses what Caffe aborts on
    want_data, want_labels = caffe_top(param)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want_data)
    np.testing.assert_array_equal(records.labels, want_labels)
    return records, want_data


def datum(array, label):
    import caffe.io
    return caffe.io.array_to_datum(array, label)


def write_lmdb(path, datums):
    with lmdb.open(str(path), map_size=1 << 26) as env, env.begin(write=True) as txn:
        for i, d in enumerate(datums):
            txn.put(b"%08d" % i, d.SerializeToString())
    return path


def write_leveldb(path, datums):
    import plyvel
    db = plyvel.DB(str(path), create_if_missing=True)
    for i, d in enumerate(datums):
        db.put(b"%08d" % i, d.SerializeToString())
    db.close()
    return path


def write_mean(path, mean):
    import caffe.io
    Path(path).write_bytes(caffe.io.array_to_blobproto(mean).SerializeToString())
    return path


def write_png(path, image_hwc):
    skimage.io.imsave(path, image_hwc, check_contrast=False)
    return Path(path)


def bgr(image_hwc):
    """What OpenCV (so Caffe) decodes a colour PNG to, as (C, H, W)."""
    return image_hwc[:, :, ::-1].transpose(2, 0, 1)


def one_line(exc_info):
    assert "\n" not in str(exc_info.value)
    return str(exc_info.value)


RNG = np.random.default_rng(2024)


# ---- Data layers ---------------------------------------------------------------------------------

def test_lmdb_uint8_mnist_like():
    images = RNG.integers(0, 256, (14, 1, 28, 28), dtype=np.uint8)
    labels = np.arange(14) % 7
    write_lmdb("mnist-lmdb", [datum(im, int(lb)) for im, lb in zip(images, labels)])
    param = layer("""name: "mnist" type: "Data" top: "data" top: "label"
        transform_param { scale: 0.00390625 mean_value: 33.3 }
        data_param { source: "mnist-lmdb" backend: LMDB batch_size: 14 }""")
    records, _ = assert_as_caffe(param)
    assert records.images.dtype == np.uint8
    np.testing.assert_array_equal(records.images, images)
    np.testing.assert_array_equal(records.labels, labels)
    assert data_records.count(param) == 14 and data_records.record_shape(param) == (1, 28, 28)
    np.testing.assert_array_equal(data_records.read(param, limit=5, progress=False).images, images[:5])


def test_lmdb_centre_crop_mean_file_scale():
    images = RNG.integers(0, 256, (6, 3, 40, 40), dtype=np.uint8)
    mean = RNG.uniform(0, 255, (1, 3, 40, 40))          # non-integer, float64 in the proto
    write_lmdb("rgb-lmdb", [datum(im, i) for i, im in enumerate(images)])
    write_mean("mean.binaryproto", mean)
    param = layer("""name: "rgb" type: "Data" top: "data" top: "label"
        transform_param { crop_size: 32 mean_file: "mean.binaryproto" scale: 0.017 }
        data_param { source: "rgb-lmdb" backend: LMDB batch_size: 6 }""")
    _, caffe_data = assert_as_caffe(param)
    transform = Transform.of(param)
    assert caffe_data.shape == (6, 3, 32, 32) and transform.output_shape((3, 40, 40)) == (3, 32, 32)
    # the full-size mean is subtracted at the cropped positions (offset (40 - 32) // 2 = 4)
    mean32 = mean[0].astype(np.float32)
    at_crop = (images[:, :, 4:36, 4:36].astype(np.float32) - mean32[:, 4:36, 4:36]) * np.float32(0.017)
    np.testing.assert_array_equal(caffe_data, at_crop)
    top_left = (images[:, :, 4:36, 4:36].astype(np.float32) - mean32[:, :32, :32]) * np.float32(0.017)
    assert np.abs(caffe_data - top_left).max() > 0.1


def test_leveldb_float_data_is_the_default_backend():
    images = RNG.normal(0, 50, (5, 2, 5, 6)).astype(np.float32)
    write_leveldb("float-leveldb", [datum(im, 10 + i) for i, im in enumerate(images)])
    param = layer("""name: "f" type: "Data" top: "data" top: "label"
        transform_param { mean_value: 1.5 mean_value: -2.25 scale: 0.3 }
        data_param { source: "float-leveldb" batch_size: 5 }""")        # backend defaults to LEVELDB
    records, _ = assert_as_caffe(param)
    assert records.images.dtype == np.float32
    np.testing.assert_array_equal(records.images, images)
    assert data_records.count(param) == 5 and data_records.record_shape(param) == (2, 5, 6)


def test_lmdb_of_encoded_png_of_differing_sizes():
    """Caffe decodes (OpenCV: BGR); shapes differ, so crop_size makes one batch of them."""
    pictures = [RNG.integers(0, 256, (36 + i, 40 + 2 * i, 3), dtype=np.uint8) for i in range(4)]
    datums = [pycaffe.caffe_pb2().Datum(encoded=True, label=i, data=write_png(f"{i}.png", p).read_bytes())
              for i, p in enumerate(pictures)]
    write_lmdb("png-lmdb", datums)
    param = layer("""name: "png" type: "Data" top: "data" top: "label"
        transform_param { crop_size: 32 mean_value: 104 mean_value: 117 mean_value: 123 scale: 0.5 }
        data_param { source: "png-lmdb" backend: LMDB batch_size: 4 }""")
    records, _ = assert_as_caffe(param)
    assert isinstance(records.images, list)
    for got, picture in zip(records.images, pictures):
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, bgr(picture))
    assert data_records.record_shape(param) == (3, 36, 40)
    gray = layer(text_format.MessageToString(param))
    del gray.transform_param.mean_value[1:]
    gray.transform_param.force_gray = True
    records, caffe_data = assert_as_caffe(gray)
    assert caffe_data.shape == (4, 1, 32, 32) and records.images[0].shape == (1, 36, 40)


def test_leveldb_of_encoded_jpeg():
    """Lossy decoding too is Caffe's own (OpenCV's libjpeg as Caffe calls it)."""
    smooth = np.linspace(0, 255, 24 * 24 * 3).reshape(24, 24, 3).astype(np.uint8)
    write_leveldb("jpeg-leveldb", [pycaffe.caffe_pb2().Datum(
        encoded=True, label=i, data=write_png(f"{i}.jpg", np.roll(smooth, 5 * i, axis=1)).read_bytes())
        for i in range(3)])
    param = layer("""name: "jpg" type: "Data" top: "data" top: "label"
        transform_param { crop_size: 20 mean_value: 128 scale: 0.0078125 }
        data_param { source: "jpeg-leveldb" backend: LEVELDB batch_size: 3 }""")
    records, _ = assert_as_caffe(param)
    assert records.images.shape == (3, 3, 24, 24) and records.labels.tolist() == [0, 1, 2]


def test_mixed_encoded_and_raw_datums_and_limits_that_stop_before_a_bad_one():
    """Only the encoded Datums go through Caffe, and it sees no record past the limit: a
    corrupt record after it does not stop a limited read (Caffe's reader runs ahead)."""
    pictures = [RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(4)]
    png = [write_png(f"{i}.png", p).read_bytes() for i, p in enumerate(pictures)]
    datums = [datum(bgr(pictures[0]).copy(), 0), pycaffe.caffe_pb2().Datum(encoded=True, data=png[1], label=1),
              datum(bgr(pictures[2]).copy(), 2), pycaffe.caffe_pb2().Datum(encoded=True, data=png[3], label=3)]
    write_lmdb("mixed-lmdb", datums)
    param = layer("""name: "mixed" type: "Data" top: "data" top: "label"
        transform_param { mean_value: 7 scale: 3 } data_param { source: "mixed-lmdb" backend: LMDB batch_size: 4 }""")
    records, _ = assert_as_caffe(param)
    np.testing.assert_array_equal(records.images, np.stack([bgr(p) for p in pictures]))
    write_lmdb("bad-lmdb", [pycaffe.caffe_pb2().Datum(encoded=True, data=png[0]),
                            pycaffe.caffe_pb2().Datum(encoded=True, data=png[1][:30])])
    param.data_param.source = "bad-lmdb"
    assert data_records.record_shape(param) == (3, 8, 8)
    np.testing.assert_array_equal(data_records.read(param, limit=1, progress=False).images[0], bgr(pictures[0]))
    with pytest.raises(DataError, match=r"Could not decode datum"):
        data_records.read(param, progress=False)
    Path("bad.png").write_bytes(png[0][:30])
    Path("list.txt").write_text("0.png 0\nbad.png 1\n")
    images = layer("""name: "img" type: "ImageData" top: "data" top: "label" image_data_param { source: "list.txt" }""")
    assert data_records.record_shape(images) == (3, 8, 8)
    np.testing.assert_array_equal(data_records.read(images, limit=1, progress=False).images[0], bgr(pictures[0]))


def test_mirror_flips_at_random_even_in_test_phase():
    """data_transformer.cpp: do_mirror = mirror() && Rand(2), whatever the phase. apply() never
    mirrors: Caffe's TEST top is it or its flip, image by image, and both happen."""
    images = RNG.integers(0, 256, (32, 1, 6, 7), dtype=np.uint8)
    write_lmdb("m-lmdb", [datum(im, 0) for im in images])
    param = layer("""name: "m" type: "Data" top: "data" top: "label" include { phase: TEST }
        transform_param { mirror: true scale: 2 }
        data_param { source: "m-lmdb" backend: LMDB batch_size: 32 }""")
    transform = Transform.of(param)
    assert transform.mirror
    expected = transform.apply(data_records.read(param, progress=False).images)
    caffe_data, _ = caffe_top(param)
    plain = [np.array_equal(c, e) for c, e in zip(caffe_data, expected)]
    flipped = [np.array_equal(c, e[:, :, ::-1]) for c, e in zip(caffe_data, expected)]
    assert all(p or f for p, f in zip(plain, flipped)) and any(plain) and any(flipped)


# ---- ImageData -----------------------------------------------------------------------------------

def write_image_list(name, pictures, labels, root=""):
    Path("imgs").mkdir(exist_ok=True)
    lines = []
    for i, (picture, label) in enumerate(zip(pictures, labels)):
        file = f"imgs/im {i}.png"                          # a space: the label follows the last one
        write_png(file, picture)
        lines.append(f"{file[len(root):]} {label}")
    Path(name).write_text("\n".join(lines) + "\n")
    return name


def test_imagedata_crop_and_mean_value():
    pictures = [RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(5)]
    write_image_list("list.txt", pictures, [4, 0, 9, 9, 1], root="imgs/")
    param = layer("""name: "img" type: "ImageData" top: "data" top: "label"
        transform_param { crop_size: 32 mean_value: 103.94 mean_value: 116.78 mean_value: 123.68 scale: 0.017 }
        image_data_param { source: "list.txt" root_folder: "imgs/" batch_size: 5 }""")
    records, caffe_data = assert_as_caffe(param)
    np.testing.assert_array_equal(records.images, np.stack([bgr(p) for p in pictures]))
    assert records.labels.tolist() == [4, 0, 9, 9, 1] and caffe_data.shape == (5, 3, 32, 32)
    assert data_records.count(param) == 5 and data_records.record_shape(param) == (3, 40, 40)


def test_imagedata_resize_gray():
    pictures = [RNG.integers(0, 256, (30 + 5 * i, 50 - 4 * i, 3), dtype=np.uint8) for i in range(4)]
    write_image_list("list.txt", pictures, [1, 2, 3, 4])
    param = layer("""name: "img" type: "ImageData" top: "data" top: "label"
        transform_param { scale: 0.25 }
        image_data_param { source: "list.txt" new_height: 24 new_width: 20 is_color: false batch_size: 4 }""")
    records, _ = assert_as_caffe(param)
    assert records.images.shape == (4, 1, 24, 20) and records.images.dtype == np.uint8
    assert data_records.record_shape(param) == (1, 24, 20)


def test_image_list_parse_follows_caffe():
    assert caffe_reading.parse_image_list("a b.png 3\nc.png  -2\nd.png x\ne.png\n\n") == \
        [("a b.png", 3), ("c.png ", -2), ("d.png", 0), ("e.png", 0), ("", 0)]


# ---- HDF5Data ------------------------------------------------------------------------------------

def test_hdf5_list_two_files_no_transform():
    first = RNG.normal(0, 3, (4, 2, 3, 5))                  # float64: Caffe reads it as float
    second = RNG.integers(-9, 9, (3, 2, 3, 5)).astype(np.int16)
    labels = np.arange(7, dtype=np.float32) * 1.5
    for name, data, lab in (("a.h5", first, labels[:4]), ("b.h5", second, labels[4:])):
        with h5py.File(name, "w") as h5:
            h5["data"], h5["label"] = data, lab
    Path("h5.txt").write_text("a.h5\n  b.h5\n")
    param = layer("""name: "h5" type: "HDF5Data" top: "data" top: "label"
        hdf5_data_param { source: "h5.txt" batch_size: 7 }""")
    records, _ = assert_as_caffe(param)
    assert Transform.of(param).is_identity and records.images.dtype == np.float32
    np.testing.assert_array_equal(records.images, np.concatenate([first, second]).astype(np.float32))
    assert data_records.count(param) == 7 and data_records.record_shape(param) == (2, 3, 5)
    assert data_records.read(param, limit=5, progress=False).labels.tolist() == labels[:5].tolist()


# ---- Caffe's own tools: convert_imageset (encoded LevelDB) and compute_image_mean ----------------

def caffe_tool(name):
    import caffe
    installed = Path(caffe.__file__).resolve().parents[4] / "bin" / name
    return str(installed) if installed.is_file() else shutil.which(name)


def test_caffe_written_leveldb_and_mean():
    convert, compute_mean = caffe_tool("convert_imageset"), caffe_tool("compute_image_mean")
    if not (convert and compute_mean):
        pytest.skip("Caffe's convert_imageset / compute_image_mean are not installed")
    pictures = [RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(4)]
    write_image_list("list.txt", pictures, [5, 6, 7, 8], root="imgs/")
    for command in ([convert, "--encoded", "--backend=leveldb", "imgs/", "list.txt", "png-leveldb"],
                    [compute_mean, "--backend=leveldb", "png-leveldb", "mean.binaryproto"]):
        subprocess.run(command, check=True, capture_output=True)
    param = layer("""name: "cv" type: "Data" top: "data" top: "label"
        transform_param { crop_size: 30 mean_file: "mean.binaryproto" scale: 0.1 }
        data_param { source: "png-leveldb" backend: LEVELDB batch_size: 4 }""")
    records, _ = assert_as_caffe(param)
    np.testing.assert_array_equal(records.images, np.stack([bgr(p) for p in pictures]))
    assert records.labels.tolist() == [5, 6, 7, 8]


# ---- bad input: one line, in this process --------------------------------------------------------

def rgb_lmdb(shapes=((3, 40, 40),) * 3):
    return write_lmdb("lmdb", [datum(RNG.integers(0, 256, s, dtype=np.uint8), 0) for s in shapes])


DATA = """name: "data" type: "Data" top: "data" top: "label"
    transform_param {{ {tp} }} data_param {{ source: "{source}" backend: {backend} batch_size: 2 }}"""


def data_layer(tp="", source="lmdb", backend="LMDB"):
    return layer(DATA.format(tp=tp, source=source, backend=backend))


@pytest.mark.parametrize("tp, match", [
    ('mean_file: "m.binaryproto" mean_value: 3', r"layer 'data': transform_param has both mean_file and mean_value"),
    ('mean_file: "nowhere.binaryproto"', r"layer 'data': mean_file nowhere.binaryproto does not exist"),
    ('mean_file: "list.txt"', r"layer 'data': mean_file list.txt is not .*BlobProto"),
    ('mean_file: "empty.binaryproto"', r"layer 'data': mean_file empty.binaryproto is not a mean image: "
                                       r"a BlobProto of shape \(\) holding 0 values"),
    ('mean_file: "m3.binaryproto"', r"layer 'data': mean_file m3.binaryproto holds a blob of shape \(3, 40, 40\), "
                                    r"which Caffe reads as .* 3x40x40x1; write the mean as \(1, C, H, W\)"),
])
def test_bad_transform_param_at_setup(tp, match):
    write_mean("m.binaryproto", np.zeros((1, 3, 40, 40)))
    write_mean("m3.binaryproto", np.zeros((3, 40, 40)))    # a mean written without its num axis
    Path("list.txt").write_text("a.png 1\nb.png 2\n")
    Path("empty.binaryproto").write_bytes(b"")
    with pytest.raises(DataError, match=match) as raised:
        Transform.of(data_layer(tp))
    one_line(raised)


@pytest.mark.parametrize("tp, records, match", [
    ("mean_value: 1 mean_value: 2", None, r"layer 'data': transform_param has 2 mean_value entries for "
                                          r"3-channel images; give 1 or 3"),
    ('mean_file: "m.binaryproto"', None, r"layer 'data': mean_file m.binaryproto holds a 3x32x32 mean, the "
                                         r"records are 3x40x40"),
    ("crop_size: 41", None, r"layer 'data': crop_size 41 is larger than the 40x40 images"),
    ("", [(3, 40, 40), (3, 36, 40)], r"layer 'data': records differ in shape \(\(3, 40, 40\) and \(3, 36, 40\)\)"),
    ("crop_size: 8", [(3, 40, 40), (1, 36, 40)], r"channels must agree even with crop_size"),
])
def test_bad_transform_for_the_records(tp, records, match):
    write_mean("m.binaryproto", np.zeros((1, 3, 32, 32)))
    transform = Transform.of(data_layer(tp))
    images = np.zeros((2, 3, 40, 40), np.uint8) if records is None else [np.zeros(s, np.uint8) for s in records]
    with pytest.raises(DataError, match=match) as raised:
        transform.apply(images)
    one_line(raised)


def test_hdf5data_with_transform_param_is_refused():
    param = layer("""name: "h5" type: "HDF5Data" top: "data" top: "label" transform_param { scale: 2 }
        hdf5_data_param { source: "h5.txt" batch_size: 2 }""")
    with pytest.raises(DataError, match=r"layer 'h5': HDF5Data does not transform data") as raised:
        Transform.of(param)
    one_line(raised)
    with pytest.raises(DataError, match=r"layer 'h5': HDF5Data does not transform data"):
        data_records.read(param)


def corrupt_png_lmdb():
    good = write_png("ok.png", np.zeros((8, 8, 3), np.uint8)).read_bytes()
    write_lmdb("lmdb", [pycaffe.caffe_pb2().Datum(encoded=True, data=good),
                        pycaffe.caffe_pb2().Datum(encoded=True, data=good[:40])])


def truncated_datum_lmdb():
    d = datum(np.zeros((3, 4, 4), np.uint8), 1)
    d.data = d.data[:-1]
    write_lmdb("lmdb", [d])


BAD_DATA = [
    (lambda: None, {}, r"layer 'data': LMDB lmdb does not exist \(paths are relative to the working directory"),
    (lambda: write_lmdb("lmdb", []), {}, r"layer 'data': LMDB lmdb holds no records"),
    (lambda: write_leveldb("lmdb", [datum(np.zeros((1, 2, 2), np.uint8), 0)]), {},
     r"layer 'data': lmdb is not an LMDB .*; it looks like a LevelDB: set backend: LEVELDB"),
    (lambda: rgb_lmdb(), {"backend": "LEVELDB"}, r"layer 'data': lmdb is not a LevelDB .*set backend: LMDB"),
    (lambda: rgb_lmdb([(3, 40, 40), (3, 40, 40), (3, 36, 40)]), {},
     r"layer 'data': records differ in shape: 3x40x40 \(record 0\) and 3x36x40 \(record 2\); .*crop_size"),
    (lambda: rgb_lmdb([(3, 40, 40), (1, 40, 40)]), {"tp": "crop_size: 32"},
     r"layer 'data': records differ in channels: 3x40x40 \(record 0\) and 1x40x40 \(record 1\)"),
    (truncated_datum_lmdb, {}, r"layer 'data': record b'00000000' of lmdb holds 47 bytes but its header says "
                               r"3x4x4 = 48"),
    (corrupt_png_lmdb, {}, r"layer 'data': Caffe's Data layer cannot read LMDB lmdb \(stopped after [01] of 2 "
                           r"records\): Could not decode datum"),
    (corrupt_png_lmdb, {"tp": "force_color: true force_gray: true"},
     r"layer 'data': transform_param sets both force_color and force_gray"),
]


@pytest.mark.parametrize("make, fields, match", BAD_DATA)
def test_bad_data_layer(make, fields, match):
    make()
    with pytest.raises(DataError, match=match) as raised:
        data_records.read(data_layer(**fields), progress=False)
    one_line(raised)


def image_list(lines, pictures=("a.png",), corrupt=("bad.png",)):
    for name in pictures:
        write_png(name, np.zeros((8, 8, 3), np.uint8))
    for name in corrupt:
        Path(name).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    if lines is not None:
        Path("list.txt").write_text(lines)


IMAGE = """name: "img" type: "ImageData" top: "data" top: "label"
    image_data_param {{ source: "list.txt" batch_size: 2 {extra} }}"""


@pytest.mark.parametrize("lines, extra, match", [
    (None, "", r"layer 'img': image list list.txt does not exist"),
    ("", "", r"layer 'img': image list list.txt is empty"),
    ("a.png 1\nmissing.png 2\n", "", r"layer 'img': list.txt:2: image missing.png does not exist"),
    ("a.png 1\n\na.png 2\n", "", r"layer 'img': list.txt:2 is an empty line"),
    ("a.png 1\n", "new_height: 8", r"layer 'img': image_data_param new_height 8, new_width 0"),
    ("a.png 1\nbad.png 2\n", "", r"layer 'img': Caffe's ImageData layer cannot read the images of list.txt "
                                 r"\(stopped after [01] of 2 records\): .*Could not load bad.png"),
])
def test_bad_image_data_layer(lines, extra, match):
    image_list(lines)
    with pytest.raises(DataError, match=match) as raised:
        data_records.read(layer(IMAGE.format(extra=extra)), progress=False)
    one_line(raised)


def h5_files(**files):
    for name, datasets in files.items():
        with h5py.File(f"{name}.h5", "w") as h5:
            for key, shape in datasets.items():
                h5[key] = np.zeros(shape, np.float32)
    Path("h5.txt").write_text(" ".join(f"{name}.h5" for name in files) + "\n")


@pytest.mark.parametrize("files, match", [
    ({"a": {"data": (2, 3)}}, r"layer 'h5': a.h5 has no dataset 'label' \(HDF5Data reads one dataset per top"),
    ({"a": {"data": (2, 3), "label": (3,)}}, r"layer 'h5': a.h5: datasets 'data' has 2 rows, 'label' has 3 rows"),
    ({"a": {"data": (2, 3), "label": (2,)}, "b": {"data": (2, 4), "label": (2,)}},
     r"layer 'h5': b.h5: dataset 'data' has records of shape \(4,\), a.h5's are \(3,\)"),
])
def test_bad_hdf5_data_layer(files, match):
    h5_files(**files)
    param = layer("""name: "h5" type: "HDF5Data" top: "data" top: "label" hdf5_data_param { source: "h5.txt" batch_size: 2 }""")
    with pytest.raises(DataError, match=match) as raised:
        data_records.read(param)
    one_line(raised)


def test_hdf5_list_naming_a_missing_or_foreign_file():
    Path("h5.txt").write_text("gone.h5\n")
    param = layer("""name: "h5" type: "HDF5Data" top: "data" hdf5_data_param { source: "h5.txt" batch_size: 1 }""")
    with pytest.raises(DataError, match=r"layer 'h5': h5.txt lists gone.h5, which does not exist"):
        data_records.count(param)
    Path("gone.h5").write_text("not hdf5")
    with pytest.raises(DataError, match=r"layer 'h5': gone.h5 \(listed in h5.txt\) is not an HDF5 file"):
        data_records.count(param)


def test_other_layer_types_are_named():
    with pytest.raises(DataError, match=r"layer 'in' has type 'Input'; records can be read from Data, "
                                        r"ImageData, HDF5Data layers"):
        data_records.read(layer('name: "in" type: "Input" top: "data"'))

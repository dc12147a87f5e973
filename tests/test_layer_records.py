"""records.Reader against layer_records.read and against Caffe's own layer: the same records bit for bit
at any positions (any order, repeats), for every kind of data layer; scan's sha256 equal to
dataset.records_sha256; chunks read ahead and stopped; use after a fork; bad and changed input as
one-line DataErrors; DBs reopened within long reads and key walks; and peak memory bounded while
streaming an LMDB (slow)."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import lmdb
import numpy as np
import pytest
from google.protobuf import text_format

from caffe_prune import pycaffe
from caffe_prune.data import base_reader, layer_records
from caffe_prune.errors import DataError
from caffe_prune.data.dataset import records_sha256
from caffe_prune.data.transform import Transform
from test_caffe_reading import caffe_top, datum, layer, one_line, write_image_list, write_leveldb, write_lmdb, write_png

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(7)


@pytest.fixture(autouse=True)
def in_tmp(caffe, tmp_path, monkeypatch):
    """Each test in its own directory: every path in the layers is relative, as for Caffe."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def data_layer(source, backend="LMDB", tp=""):
    return layer(f"""name: "data" type: "Data" top: "data" top: "label" transform_param {{ {tp} }}
        data_param {{ source: "{source}" backend: {backend} batch_size: 4 }}""")


def encoded(picture, label):
    return pycaffe.caffe_pb2().Datum(encoded=True, label=label, data=write_png(f"p{label}.png", picture).read_bytes())


# ---- the same records as caffe_reading.read, for every kind ---------------------------------------------

def lmdb_uint8():
    write_lmdb("lmdb", [datum(RNG.integers(0, 256, (3, 8, 9), dtype=np.uint8), i % 5) for i in range(23)])
    return data_layer("lmdb")


def lmdb_float():
    write_lmdb("lmdb", [datum(RNG.normal(0, 9, (2, 3, 4)).astype(np.float32), i) for i in range(11)])
    return data_layer("lmdb")


def lmdb_png():
    write_lmdb("lmdb", [encoded(RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8), i) for i in range(9)])
    return data_layer("lmdb")


def lmdb_png_sizes():
    """Shapes differ (crop_size allows it): images come as lists."""
    write_lmdb("lmdb", [encoded(RNG.integers(0, 256, (9 + i % 3, 10, 3), dtype=np.uint8), i) for i in range(8)])
    return data_layer("lmdb", tp="crop_size: 8")


def leveldb_uint8():
    write_leveldb("ldb", [datum(RNG.integers(0, 256, (1, 6, 5), dtype=np.uint8), 9 - i % 10) for i in range(17)])
    return data_layer("ldb", backend="LEVELDB")


def leveldb_png():
    write_leveldb("ldb", [encoded(RNG.integers(0, 256, (7, 7, 3), dtype=np.uint8), i) for i in range(6)])
    return data_layer("ldb", backend="LEVELDB")


def image_list():
    pictures = [RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8) for _ in range(9)]
    write_image_list("list.txt", pictures, [i % 4 for i in range(9)], root="imgs/")
    return layer("""name: "img" type: "ImageData" top: "data" top: "label"
        image_data_param { source: "list.txt" root_folder: "imgs/" batch_size: 3 }""")


def image_list_resized():
    pictures = [RNG.integers(0, 256, (10 + 3 * i, 16 - i, 3), dtype=np.uint8) for i in range(7)]
    write_image_list("list.txt", pictures, list(range(7)))
    return layer("""name: "img" type: "ImageData" top: "data" top: "label"
        image_data_param { source: "list.txt" new_height: 9 new_width: 11 is_color: false batch_size: 3 }""")


def hdf5_files():
    sizes = (4, 1, 6)
    for i, rows in enumerate(sizes):
        with h5py.File(f"{i}.h5", "w") as h5:
            h5["data"] = RNG.normal(0, 3, (rows, 2, 3, 2))     # float64, converted by HDF5
            h5["label"] = RNG.integers(0, 10, rows).astype(np.float64)
    Path("h5.txt").write_text("0.h5\n1.h5 2.h5\n")
    return layer("""name: "h5" type: "HDF5Data" top: "data" top: "label"
        hdf5_data_param { source: "h5.txt" batch_size: 2 }""")


KINDS = [lmdb_uint8, lmdb_float, lmdb_png, lmdb_png_sizes, leveldb_uint8, leveldb_png, image_list,
         image_list_resized, hdf5_files]


def pick(images, index):
    return [images[i] for i in index] if isinstance(images, list) else images[index]


def assert_same(got, images, labels, index):
    want = pick(images, index)
    if isinstance(want, list):
        assert len(got.images) == len(want)
        for g, w in zip(got.images, want):
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)
    else:
        assert isinstance(got.images, np.ndarray) and got.images.dtype == want.dtype
        np.testing.assert_array_equal(got.images, want)
    assert got.labels.dtype == labels.dtype
    np.testing.assert_array_equal(got.labels, labels[index])


@pytest.mark.parametrize("make", KINDS, ids=[k.__name__ for k in KINDS])
def test_same_records_as_sources_read(make):
    param = make()
    full = layer_records.read(param, progress=False)
    n = len(full.labels)
    with layer_records.open_records(param) as reader:
        assert len(reader) == n == layer_records.count(param)
        assert reader.record_shape() == layer_records.record_shape(param)
        rng = np.random.default_rng(n)
        for index in (np.arange(n), np.arange(3), rng.permutation(n)[:5], rng.integers(0, n, 6)):   # the last repeats
            assert_same(reader.read(index), full.images, full.labels, index)
            digest, labels = reader.scan(index, size=2)
            assert digest == records_sha256(pick(full.images, index), full.labels[index])
            np.testing.assert_array_equal(labels, np.asarray(full.labels[index], np.int64))
        index = rng.integers(0, n, 7)
        parts = list(reader.chunks(index, 3))
        assert [len(part.labels) for part in parts] == [3, 3, 1]
        for part, start in zip(parts, (0, 3, 6)):
            assert_same(part, full.images, full.labels, index[start:start + 3])
        reader.check_unchanged()
        # and against Caffe's own layer, one batch of all the records, at these positions
        index = rng.permutation(n)
        batched = layer(text_format.MessageToString(param))
        getattr(batched, {"Data": "data_param", "ImageData": "image_data_param",
                          "HDF5Data": "hdf5_data_param"}[param.type]).batch_size = n
        caffe_data, caffe_labels = caffe_top(batched)
        got = reader.read(index)
        np.testing.assert_array_equal(Transform.of(param).apply(got.images), caffe_data[index])
        np.testing.assert_array_equal(got.labels, caffe_labels[index])


def test_empty_read_and_scan():
    with layer_records.open_records(lmdb_uint8()) as reader:
        got = reader.read([])
        assert got.images == [] and got.labels.dtype == np.int64 and len(got.labels) == 0
        digest, labels = reader.scan([])
        assert digest == records_sha256([], []) and labels.tolist() == []
        assert list(reader.chunks([], 4)) == []


def test_lmdb_len_without_walk_and_keys_kept_whole():
    """len() is env.stat()'s; keys ending in NUL bytes stay distinct (a numpy "S" array would strip them)."""
    with lmdb.open("lmdb", map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i, key in enumerate((b"a", b"a\x00", b"a\x00\x00", b"b\x00")):
            txn.put(key, datum(np.full((1, 2, 2), i, np.uint8), i).SerializeToString())
    with layer_records.open_records(data_layer("lmdb")) as reader:
        assert len(reader) == 4 and reader._keys is None
        got = reader.read([3, 1, 2, 0])
        assert got.labels.tolist() == [3, 1, 2, 0] and got.images[:, 0, 0, 0].tolist() == [3, 1, 2, 0]


# ---- chunks: read ahead, stopped when closed ------------------------------------------------------

def read_ahead_threads():
    return [t for t in threading.enumerate() if t.name.startswith("caffe-prune read-ahead")]


def test_chunks_read_ahead_is_bounded_and_stops_when_closed():
    reader = layer_records.open_records(lmdb_uint8())
    started, real = [], reader._read

    def counted(run, first, progress=False):
        started.append(int(run[0]))
        return real(run, first, progress)
    reader._read = counted
    chunks = reader.chunks(range(23), 2, prefetch=2)
    first = next(chunks)
    assert first.labels.tolist() == [0, 1]
    deadline = time.monotonic() + 10
    while len(started) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert started == [0, 2, 4]            # the one handed over, and 2 ahead: no more
    assert len(read_ahead_threads()) == 1
    chunks.close()
    assert read_ahead_threads() == [] and started == [0, 2, 4]
    for part in reader.chunks(range(23), 5, prefetch=1):   # leaving a loop early closes it too
        break
    assert read_ahead_threads() == []
    assert [len(p.labels) for p in reader.chunks(range(23), 10, prefetch=0)] == [10, 10, 3]
    with pytest.raises(DataError, match=r"layer 'data': chunks of 0 records"):
        reader.chunks(range(3), 0)


# ---- after a fork --------------------------------------------------------------------------------

def in_child(work):
    """Run work() in a forked child; its exception's message, or None."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        message = b""
        try:
            work()
        except BaseException as exc:
            message = f"{type(exc).__name__}: {exc}".encode() or b"?"
        os.write(write_end, message)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message or None


@pytest.mark.parametrize("make", [lmdb_uint8, leveldb_uint8], ids=["lmdb", "leveldb"])
def test_a_reader_opens_its_own_handles_after_a_fork(make):
    param = make()
    full = layer_records.read(param, progress=False)
    reader = layer_records.open_records(param)
    assert_same(reader.read([0, 5]), full.images, full.labels, [0, 5])

    def child():
        assert_same(reader.read([7, 1, 7]), full.images, full.labels, [7, 1, 7])
        assert reader._pid == os.getpid()
        digest, _ = reader.scan(range(len(reader)), size=4)
        assert digest == records_sha256(full.images, full.labels)
    assert in_child(child) is None
    with reader._opened():                     # a fork while the parent reads (in another thread, say)
        inherited = getattr(reader, "_env", None) or reader._db
        if make is lmdb_uint8:
            assert in_child(child) is None     # the LMDB environment was closed in the child, a new one opened
        else:
            def refused():
                base_reader.LEVELDB_WAIT_S = 0.2
                reader.read([1])
            assert "LevelDB ldb stayed open elsewhere for 0.2 s (IO error: lock ldb/LOCK: already held by " \
                   "process)" in in_child(refused)
        assert (getattr(reader, "_env", None) or reader._db) is inherited   # the parent's, untouched
    assert_same(reader.read([3, 2]), full.images, full.labels, [3, 2])
    reader.close()


def test_a_chunks_iterator_does_not_cross_a_fork():
    reader = layer_records.open_records(lmdb_uint8())
    chunks = reader.chunks(range(23), 4)
    next(chunks)
    message = in_child(lambda: next(chunks))
    assert message and "a chunks() iterator of LMDB lmdb cannot go on in a forked child" in message
    assert len(next(chunks).labels) == 4
    chunks.close()


# ---- bad and changed input -----------------------------------------------------------------------

def test_a_record_that_is_not_a_datum_is_named_by_key_and_position():
    values = [datum(np.zeros((1, 2, 2), np.uint8), i).SerializeToString() for i in range(6)]
    values[3] = b"\x0a\xff not a Datum"
    with lmdb.open("lmdb", map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i, value in enumerate(values):
            txn.put(b"%08d" % i, value)
    reader = layer_records.open_records(data_layer("lmdb"))
    assert reader.read([0, 1, 2, 5]).labels.tolist() == [0, 1, 2, 5]
    with pytest.raises(DataError, match=r"^layer 'data': record b'00000003' of lmdb \(position 3 in key order\) "
                                        r"is not a Datum \(.*\); rewrite the LMDB$") as raised:
        reader.read(range(6))
    one_line(raised)
    chunks = reader.chunks(range(6), 2)
    assert next(chunks).labels.tolist() == [0, 1]
    with pytest.raises(DataError, match=r"record b'00000003' of lmdb \(position 3 in key order\) is not a Datum"):
        next(chunks)


def test_a_datum_whose_size_disagrees_with_its_header():
    short = datum(np.zeros((3, 4, 4), np.uint8), 1)
    short.data = short.data[:-1]
    write_lmdb("lmdb", [datum(np.zeros((3, 4, 4), np.uint8), 0)] * 2 + [short])
    reader = layer_records.open_records(data_layer("lmdb"))
    with pytest.raises(DataError, match=r"record b'00000002' of lmdb holds 47 bytes but its header says 3x4x4 = 48 "
                                        r"\(position 2 in key order\); rewrite the LMDB") as raised:
        reader.read([1, 2])
    one_line(raised)


def test_index_out_of_range_or_not_whole():
    reader = layer_records.open_records(lmdb_uint8())
    for bad, shown in (([0, 23], 23), ([-1], -1)):
        with pytest.raises(DataError, match=rf"^layer 'data': index {shown} is out of range: LMDB lmdb holds 23 "
                                            rf"records \(0 \.\. 22\)$") as raised:
            reader.read(bad)
        one_line(raised)
    with pytest.raises(DataError, match=r"index 30 is out of range"):
        reader.chunks(list(range(20)) + [30], 8)   # at once, not at the last chunk
    with pytest.raises(DataError, match=r"record indices must be one list of whole numbers, got float64"):
        reader.scan([0.5])


CHANGED = r"changed since it was opened \(.*\); rerun the command \(a resumed run compares the data's contents\)$"


def test_an_lmdb_changed_after_open():
    write_lmdb("lmdb", [datum(np.zeros((1, 2, 2), np.uint8), i) for i in range(3)])
    reader = layer_records.open_records(data_layer("lmdb"))
    reader.read([0])
    reader.check_unchanged()
    with lmdb.open("lmdb", map_size=1 << 26) as env, env.begin(write=True) as txn:
        txn.put(b"%08d" % 3, datum(np.ones((1, 2, 2), np.uint8), 3).SerializeToString())
    for call in (reader.check_unchanged, lambda: reader.read([1])):
        with pytest.raises(DataError, match=r"^layer 'data': LMDB lmdb changed since it was opened \(3 records at "
                                            r"transaction 1 when opened, now 4 at transaction 2\); rerun") as raised:
            call()
        one_line(raised)


def test_a_leveldb_changed_after_open():
    import plyvel
    write_leveldb("ldb", [datum(np.zeros((1, 2, 2), np.uint8), i) for i in range(3)])
    reader = layer_records.open_records(data_layer("ldb", backend="LEVELDB"))
    reader.read([0, 2])
    plyvel.DB("ldb").close()                   # another reader: not a change
    caffe_net = pycaffe.caffe_pb2().NetParameter(name="other")
    caffe_net.layer.add().CopyFrom(data_layer("ldb", backend="LEVELDB"))
    pycaffe.net_from_param(caffe_net, phase="test", probe=False).forward()   # Caffe reading it: not one either
    reader.check_unchanged()
    assert reader.read([1]).labels.tolist() == [1]
    db = plyvel.DB("ldb")
    db.put(b"00000001a", datum(np.zeros((1, 2, 2), np.uint8), 9).SerializeToString())
    db.close()
    for call in (reader.check_unchanged, lambda: reader.read([1]), reader.check_unchanged):   # and stays so
        with pytest.raises(DataError, match=r"^layer 'data': LevelDB ldb changed since it was opened \(its key 2 is "
                                            r"now b'00000001a', was b'00000002'\); rerun") as raised:
            call()
        one_line(raised)


def test_an_image_list_or_hdf5_file_changed_after_open():
    param = image_list()
    reader = layer_records.open_records(param)
    reader.read([1])
    with open("list.txt", "a") as listing:
        listing.write("im 0.png 3\n")
    with pytest.raises(DataError, match=r"^layer 'img': image list list.txt changed since it was opened \(list.txt: "
                                        r"\d+ bytes modified .* when opened, now \d+ bytes modified .*\); "
                                        r"rerun") as raised:
        reader.read([1])
    one_line(raised)
    reader = layer_records.open_records(hdf5_files())
    reader.read([0, 10])
    with h5py.File("2.h5", "a") as h5:
        h5["label"][0] = 99
    with pytest.raises(DataError, match=r"^layer 'h5': HDF5 list h5.txt changed since it was opened \(2.h5: "):
        reader.check_unchanged()
    os.remove("2.h5")
    with pytest.raises(DataError, match=r"\(2.h5: \d+ bytes modified .* when opened, now missing\)"):
        reader.read([0])


def test_a_missing_image_is_named_when_its_line_is_read():
    write_png("a.png", np.zeros((8, 8, 3), np.uint8))
    Path("list.txt").write_text("a.png 1\nmissing.png 2\na.png 3\n" + "".join(f"gone{i}.png 0\n" for i in range(2000)))
    reader = layer_records.open_records(layer("""name: "img" type: "ImageData" top: "data" top: "label"
        image_data_param { source: "list.txt" batch_size: 2 }"""))
    assert len(reader) == 2003                 # opened without looking at the images
    assert reader.read([2, 0]).labels.tolist() == [3, 1]
    with pytest.raises(DataError, match=r"^layer 'img': list.txt:2: image missing.png does not exist \(root_folder "
                                        r"'' \+ the path before the last space") as raised:
        reader.read([0, 1])
    one_line(raised)
    chunks = reader.chunks([0, 2, 1], 2)
    assert next(chunks).labels.tolist() == [1, 3]
    with pytest.raises(DataError, match=r"list.txt:2: image missing.png does not exist"):
        next(chunks)


# ---- bounded memory ------------------------------------------------------------------------------

MEASURE = """
import json, sys
import lmdb
import numpy as np
from google.protobuf import text_format
from caffe_prune import pycaffe
from caffe_prune.data import layer_records

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(key))

mode = sys.argv[1]
param = text_format.Parse('name: "data" type: "Data" top: "data" top: "label" data_param { source: "big" '
                          'backend: LMDB batch_size: 1 }', pycaffe.caffe_pb2().LayerParameter())
def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                          # VmHWM := VmRSS now
    return status("VmRSS:")

base = reset()
reader = layer_records.open_records(param)
n = len(reader)
reader.read([0])                              # the keys walked
opened = status("VmHWM:") - base
base = reset()
if mode == "scan":
    digest, labels = reader.scan(range(n), size=64)
    assert len(labels) == n
elif mode == "chunks":
    seen = 0
    for part in reader.chunks(range(n), 64, prefetch=2):
        seen += len(part.labels)
    assert seen == n
else:                                         # the trap: every value through one open environment
    with lmdb.open("big", readonly=True, lock=False) as env, env.begin() as txn:
        assert sum(len(value) for _, value in txn.cursor()) > 0
print(json.dumps({"growth": status("VmHWM:") - base, "opened": opened}))
"""


def stream_growth(mode):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", MEASURE, mode], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("walker", ["liblmdb", "py-lmdb", "leveldb"])
def test_a_long_read_or_key_walk_reopens_the_db(monkeypatch, walker):
    """Within one read, and within a walk of the keys, the DB is closed and reopened after
    REOPEN_BYTES may have been mapped (here: every 3 keys walked, every 3 records read)."""
    from caffe_prune.data import db_reader
    param = leveldb_uint8() if walker == "leveldb" else lmdb_uint8()
    full = layer_records.read(param, progress=False)
    n = len(full.labels)
    reopened, walked = [], []
    real = db_reader._c_keys
    monkeypatch.setattr(db_reader._Db, "_reopen", lambda self, verify=True: (
        reopened.append(1), self._release(), self._open(verify)))
    monkeypatch.setattr(db_reader, "_c_keys", lambda *args: (walked.append(1), real(*args))[1])
    if walker == "py-lmdb":
        monkeypatch.setattr(db_reader, "_liblmdb", lambda: None)
    monkeypatch.setattr(base_reader, "REOPEN_BYTES", 3 * base_reader.FAULT_SLACK)
    reader = layer_records.open_records(param)   # LevelDB: the keys walked now; LMDB: at the first read
    index = np.arange(n)[::-1]
    assert_same(reader.read(index), full.images, full.labels, index)
    walk, read = n // 3, (n - 1) // 3          # reopenings: after every 3 keys walked, 3 records read
    if walker == "liblmdb":
        assert len(walked) == walk + 1 and len(reopened) == read
    else:
        assert not walked and len(reopened) == walk + read


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs /proc/self/clear_refs (Linux)")
def test_streaming_an_lmdb_keeps_peak_memory_bounded(capsys):
    """400 MB of 3x256x256 Datums streamed by scan and chunks, each in a fresh process: its peak
    resident set grows by a few chunks, not by the data; reading every value through one open
    environment (the control) grows it by about the data, mapped pages counted."""
    n, shape = 2048, (3, 256, 256)
    record = int(np.prod(shape))
    rng = np.random.default_rng(0)
    with lmdb.open("big", map_size=n * (record + 8192) + (64 << 20)) as env:
        for start in range(0, n, 256):
            with env.begin(write=True) as txn:
                for i in range(start, start + 256):
                    d = pycaffe.caffe_pb2().Datum(channels=3, height=256, width=256, label=i % 10,
                                                 data=rng.integers(0, 256, record, dtype=np.uint8).tobytes())
                    txn.put(b"%08d" % i, d.SerializeToString())
    data, chunk = n * record, 64 * record
    bound = 6 * chunk + (32 << 20)              # (prefetch + 1 + the one being stacked, twice) chunks + slack
    found = {mode: stream_growth(mode) for mode in ("scan", "chunks", "control")}
    growth, opened = {mode: found[mode]["growth"] for mode in found}, max(f["opened"] for f in found.values())
    with capsys.disabled():
        print(f"\nstreamed {data / 2**20:.0f} MiB in chunks of 64 records ({chunk / 2**20:.1f} MiB): VmHWM grew "
              f"{growth['scan'] / 2**20:.0f} MiB (scan), {growth['chunks'] / 2**20:.0f} MiB (chunks, prefetch 2), "
              f"{opened / 2**20:.0f} MiB opening and walking the keys; one open environment: "
              f"{growth['control'] / 2**20:.0f} MiB; bound {bound / 2**20:.0f} MiB")
    assert max(growth["scan"], growth["chunks"]) < bound < data / 3
    assert opened < (32 << 20)
    assert growth["control"] > 0.9 * data       # what the bound is for: mapped pages do count

"""The Data layer's records (caffe_prune.data.layer_records): an LMDB or LevelDB of ``caffe_pb2.Datum``,
read by key in the cursor's order.

Unencoded Datums are read here (uint8 ``data``, else ``float_data`` as float32), as the layer reads
them; encoded ones are decoded by Caffe itself (caffe_reading._through_caffe), from a temporary LMDB of
just the Datums asked for (Caffe's reader runs ahead) or, when they are the whole source in order,
from the source. The keys are walked once (LMDB: at the first read, through liblmdb, which unlike
py-lmdb steps over values without touching them; LevelDB, which keeps no count: at open) and kept
packed (:class:`Keys`); each record is then a get by key. Both DBs are memory-mapped, so what a
walk or a read may have mapped is counted and the DB reopened after base_reader.REOPEN_BYTES (see
base_reader's docstring).
"""
from __future__ import annotations

import array
import contextlib
import ctypes
import ctypes.util
import functools
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from caffe_prune import layers, pycaffe
from caffe_prune.data import base_reader, caffe_reading, lmdb_meta
from caffe_prune.errors import DataError
from caffe_prune.data.base_reader import FAULT_SLACK, Reader
from caffe_prune.data.caffe_reading import WHERE_PATHS


class Keys:
    """A DB's keys in the cursor's order, packed in one bytes buffer with int64 ends: a key costs
    its length plus 8 bytes (a Python bytes object costs ~40 more, a list slot 8), and keys ending
    in NUL stay whole (a numpy "S" array would strip them)."""

    def __init__(self):
        self._blob, self._ends = bytearray(), array.array("q", [0])

    def append(self, key: bytes) -> None:
        self._blob += key
        self._ends.append(len(self._blob))

    def done(self) -> "Keys":
        self._blob, self._ends = bytes(self._blob), np.frombuffer(self._ends, np.int64).copy()
        return self

    def __len__(self) -> int:
        return len(self._ends) - 1

    def __getitem__(self, i) -> bytes:
        return self._blob[self._ends[i]:self._ends[i + 1]]


class _Val(ctypes.Structure):
    _fields_ = [("mv_size", ctypes.c_size_t), ("mv_data", ctypes.c_void_p)]


_MDB_RDONLY, _MDB_NOLOCK, _MDB_NEXT, _MDB_SET_RANGE, _MDB_NOTFOUND = 0x20000, 0x400000, 8, 17, -30798


@functools.lru_cache(maxsize=None)
def _liblmdb():
    """liblmdb through ctypes, or None where it is not found."""
    name = ctypes.util.find_library("lmdb")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        lib = None
    if lib is None:
        return None
    handle, out = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
    for function, args, result in (
            ("mdb_env_create", [out], ctypes.c_int),
            ("mdb_env_open", [handle, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint], ctypes.c_int),
            ("mdb_env_close", [handle], None),
            ("mdb_txn_begin", [handle, handle, ctypes.c_uint, out], ctypes.c_int),
            ("mdb_txn_abort", [handle], None),
            ("mdb_dbi_open", [handle, ctypes.c_char_p, ctypes.c_uint, ctypes.POINTER(ctypes.c_uint)], ctypes.c_int),
            ("mdb_cursor_open", [handle, ctypes.c_uint, out], ctypes.c_int),
            ("mdb_cursor_close", [handle], None),
            ("mdb_cursor_get", [handle, ctypes.POINTER(_Val), ctypes.POINTER(_Val), ctypes.c_int], ctypes.c_int),
            ("mdb_strerror", [ctypes.c_int], ctypes.c_char_p)):
        getattr(lib, function).argtypes, getattr(lib, function).restype = args, result
    return lib


def _c_keys(lib, path: str, after):
    """An LMDB's keys in the cursor's order after `after` (from the first when None), read by
    liblmdb read-only without a lock file; OSError when liblmdb fails."""
    env, txn, cursor, dbi = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_uint()

    def ok(rc, what):
        if rc:
            raise OSError(f"{what}: {lib.mdb_strerror(rc).decode(errors='replace')}")
    ok(lib.mdb_env_create(ctypes.byref(env)), "mdb_env_create")
    try:
        ok(lib.mdb_env_open(env, os.fsencode(path), _MDB_RDONLY | _MDB_NOLOCK, 0o644), "mdb_env_open")
        ok(lib.mdb_txn_begin(env, None, _MDB_RDONLY, ctypes.byref(txn)), "mdb_txn_begin")
        try:
            ok(lib.mdb_dbi_open(txn, None, 0, ctypes.byref(dbi)), "mdb_dbi_open")
            ok(lib.mdb_cursor_open(txn, dbi, ctypes.byref(cursor)), "mdb_cursor_open")
            try:
                key, data, op = _Val(), _Val(), _MDB_NEXT   # NEXT on a new cursor: the first key
                if after is not None:
                    start = ctypes.create_string_buffer(after, len(after))
                    key.mv_size, key.mv_data, op = len(after), ctypes.cast(start, ctypes.c_void_p), _MDB_SET_RANGE
                while True:
                    rc = lib.mdb_cursor_get(cursor, ctypes.byref(key), ctypes.byref(data), op)
                    if rc == _MDB_NOTFOUND:
                        return
                    ok(rc, "mdb_cursor_get")
                    found, op = ctypes.string_at(key.mv_data, key.mv_size), _MDB_NEXT
                    if found != after:   # SET_RANGE stops on `after` itself
                        yield found
            finally:
                lib.mdb_cursor_close(cursor)
        finally:
            lib.mdb_txn_abort(txn)
    finally:
        lib.mdb_env_close(env)


_OPENING = {}   # realpath of a DB -> the lock its readers in this process take to open it


def _forked() -> None:
    _OPENING.clear()   # a lock held by a parent's thread would never be released in the child


os.register_at_fork(after_in_child=_forked)


class _Db(Reader):
    """Data: an LMDB or LevelDB of Datums, read by key. A kind opens its DB (_open, which sets
    self._get(key) -> value or None), walks its keys after one (_keys_after: (key, what reading it
    may have mapped)) and closes it
    (_release). Neither is held between reads: py-lmdb refuses a second environment on the same
    files in one process, and LevelDB a second opener anywhere; readers of one DB in this process
    take turns (a lock per DB), each holding it for one read."""

    kind = ""

    def __init__(self, layer):
        self.source = layer.data_param.source
        super().__init__(layer, f"{self.kind} {self.source}")
        self.crop_size = layer.transform_param.crop_size
        self._keys, self._get = None, None
        if not self.source:
            raise DataError(f"{self.where}: data_param has no source")
        if not Path(self.source).exists():
            raise DataError(f"{self.where}: {self.kind} {self.source} does not exist ({WHERE_PATHS}, "
                            f"here {os.getcwd()})")

    def _turn(self):
        """The lock this process's readers of the DB take to open it (py-lmdb refuses a second
        environment on the same files in a process, LevelDB a second opener anywhere)."""
        return _OPENING.setdefault(os.path.realpath(self.source), threading.RLock())

    @contextlib.contextmanager
    def _opened(self, verify: bool = True):
        """The DB open for the duration (self._get), this process's other readers of it kept out."""
        with self._turn():
            try:
                self._open(verify)
                yield
            finally:
                self._release()

    def _reopen(self, verify: bool = True) -> None:
        """Close and open again: closing unmaps, so what was read leaves the resident set."""
        self._release()
        self._open(verify)

    def _key_list(self) -> Keys:
        if self._keys is None:
            keys = Keys()
            self._walk(lambda _, key: keys.append(key))
            self._keys = keys.done()
        return self._keys

    def _walk(self, visit) -> int:
        """visit(i, key) for every key in the cursor's order; returns how many. The DB is reopened
        after every REOPEN_BYTES the walk may have mapped (_keys_after says what each key cost)."""
        count, after = 0, None
        with self._opened(verify=False):
            while True:
                spent = 0
                for key, cost in self._keys_after(after):
                    visit(count, key)
                    count, spent, after = count + 1, spent + cost, key
                    if spent >= base_reader.REOPEN_BYTES:
                        break
                else:
                    return count
                self._reopen(verify=False)

    def _fetch(self, positions, progress) -> tuple:
        keys = self._key_list()
        images, encoded, labels, spent = [], {}, np.empty(len(positions), np.int64), 0
        with self._opened():
            for j, position in enumerate(tqdm(positions, unit="rec", desc=f"read {self.source}",
                                              disable=not progress, leave=False)):
                if spent >= base_reader.REOPEN_BYTES:
                    self._reopen()
                    spent = 0
                key = keys[position]
                value = self._get(key)
                if value is None:
                    raise self._changed(f"its key {key!r} is gone")
                spent += len(key) + len(value) + FAULT_SLACK
                datum = self._datum(position, key, value)
                labels[j] = datum.label
                images.append(None if datum.encoded else self._pixels(position, key, datum))
                if datum.encoded:
                    encoded[j] = value
        if encoded:
            whole = len(encoded) == len(self) and np.array_equal(positions, np.arange(len(self)))
            for j, pixels in self._decode(encoded, positions, whole, progress).items():
                images[j] = pixels
        return images, labels, bool(encoded)

    def _datum(self, position, key: bytes, value: bytes):
        from google.protobuf.message import DecodeError
        datum = pycaffe.caffe_pb2().Datum()
        at = f"(position {position} in key order)"
        try:
            datum.ParseFromString(value)
        except DecodeError as exc:
            raise DataError(f"{self.where}: record {key!r} of {self.source} {at} is not a Datum ({exc}); "
                            f"rewrite the {self.kind}") from None
        if datum.encoded and not datum.data:
            raise DataError(f"{self.where}: record {key!r} of {self.source} {at} is an encoded Datum without data")
        return datum

    def _pixels(self, position, key: bytes, datum) -> np.ndarray:
        """An unencoded Datum's (C, H, W) values, as DataTransformer::Transform(Datum) indexes
        them: the uint8 `data` when it is non-empty, else `float_data`."""
        c, h, w = datum.channels, datum.height, datum.width
        size, at = c * h * w, f"(position {position} in key order)"
        if min(c, h, w) <= 0:
            raise DataError(f"{self.where}: record {key!r} of {self.source} is a Datum of shape {c}x{h}x{w} "
                            f"{at}; Caffe needs positive channels, height and width")
        if datum.data:
            if len(datum.data) != size:
                raise DataError(f"{self.where}: record {key!r} of {self.source} holds {len(datum.data)} bytes but "
                                f"its header says {c}x{h}x{w} = {size} {at}; rewrite the {self.kind}")
            return np.frombuffer(datum.data, np.uint8).reshape(c, h, w)
        if len(datum.float_data) != size:
            raise DataError(f"{self.where}: record {key!r} of {self.source} holds {len(datum.float_data)} "
                            f"float_data values but its header says {c}x{h}x{w} = {size} {at}; rewrite the {self.kind}")
        return np.asarray(datum.float_data, np.float32).reshape(c, h, w)

    def _decode(self, encoded: dict, positions, whole: bool, progress: bool) -> dict:
        """Caffe's own decoding of the encoded Datums ({index in positions: value}). Caffe's reader
        runs ahead of the records asked for, so unless they are the whole source in order, it reads
        a temporary LMDB holding exactly those Datums."""
        tp = self.layer.transform_param
        if tp.force_color and tp.force_gray:
            raise DataError(f"{self.where}: transform_param sets both force_color and force_gray, which "
                            f"Caffe refuses for encoded Datums; keep one")
        pb2 = pycaffe.caffe_pb2()
        layer = pb2.LayerParameter(name=self.layer.name or "data", type=layers.type_reading("db"), top=["data", "label"])
        layer.data_param.CopyFrom(self.layer.data_param)
        for deprecated in ("scale", "mean_file", "crop_size", "mirror", "force_encoded_color"):
            layer.data_param.ClearField(deprecated)
        layer.data_param.batch_size, layer.data_param.rand_skip = 1, 0
        layer.transform_param.force_color, layer.transform_param.force_gray = tp.force_color, tp.force_gray
        what = f"{self.kind} {self.source}"
        with tempfile.TemporaryDirectory(prefix="caffe-prune-decode-") as tmp:
            if not whole:
                import lmdb
                copy = Path(tmp) / "encoded-lmdb"
                size = sum(len(v) for v in encoded.values())
                with lmdb.open(str(copy), map_size=2 * size + (1 << 22)) as env, env.begin(write=True) as txn:
                    for j, value in enumerate(encoded.values()):
                        txn.put(b"%012d" % j, value)   # key order is record order
                layer.data_param.source, layer.data_param.backend = str(copy), pb2.DataParameter.LMDB
                shown = ", ".join(str(positions[j]) for j in list(encoded)[:3])
                what = f"{what} (its encoded Datums {shown}{' ...' if len(encoded) > 3 else ''})"
            with self._turn() if whole else contextlib.nullcontext():   # Caffe opens the source itself
                decoded, _ = caffe_reading._through_caffe(layer, len(encoded), self.where, what, progress)
        return dict(zip(encoded, decoded))


class Lmdb(_Db):
    """Its length and version from env.stat() and env.info() at open (no walk); its keys walked at
    the first read. Opened without a lock file (read-only directories allowed), as before."""

    kind = "LMDB"

    def __init__(self, layer):
        super().__init__(layer)
        self._env = self._txn = self._state = None
        with self._opened():   # records the state
            self._count = self._state[0]

    def __len__(self) -> int:
        return self._count

    def _open(self, verify: bool = True) -> None:
        import lmdb
        lmdb_meta.check(self.source, self.where)   # a truncated data.mdb would fault (SIGBUS) when mapped
        try:
            self._env = lmdb.open(self.source, readonly=True, lock=False)
        except lmdb.Error as exc:
            hint = "; it looks like a LevelDB: set backend: LEVELDB" if (Path(self.source) / "CURRENT").is_file() else ""
            raise DataError(f"{self.where}: {self.source} is not an LMDB ({exc}){hint}") from None
        now = self._env.stat()["entries"], self._env.info()["last_txnid"]
        self._state = self._state or now
        if now != self._state:
            self._release()
            raise self._changed(f"{self._state[0]} records at transaction {self._state[1]} when opened, "
                                f"now {now[0]} at transaction {now[1]}")
        self._txn = self._env.begin(buffers=True)   # values as views, copied once below
        self._get = lambda key: None if (value := self._txn.get(key)) is None else bytes(value)

    def _check(self) -> None:
        with self._opened():   # _open compares
            pass

    def _key_list(self) -> Keys:
        keys = super()._key_list()
        if len(keys) != self._count:
            raise self._changed(f"{self._count} records when opened, {len(keys)} keys walked")
        return keys

    def _walk(self, visit) -> int:
        """Through liblmdb (the library Caffe reads LMDBs with), whose cursor touches the leaf pages
        only: py-lmdb's C extension touches every page of each value it steps over (it preloads
        them with the GIL released), so a walk through it reads the whole DB. py-lmdb's is the
        fallback, when liblmdb cannot be loaded or cannot open this LMDB."""
        if _liblmdb() is None:
            return super()._walk(visit)
        count, after = 0, None
        lmdb_meta.check(self.source, self.where)
        with self._turn():
            while True:
                spent = 0
                try:
                    with contextlib.closing(_c_keys(_liblmdb(), self.source, after)) as keys:
                        for key in keys:
                            visit(count, key)
                            count, spent, after = count + 1, spent + FAULT_SLACK, key
                            if spent >= base_reader.REOPEN_BYTES:
                                break
                        else:
                            return count
                except OSError:
                    if count:
                        raise self._changed(f"liblmdb stopped reading its keys after {count}") from None
                    return super()._walk(visit)

    def _keys_after(self, after):
        """py-lmdb's walk (the fallback): each step maps its value, whose size it counts."""
        cursor = self._txn.cursor()
        if after is not None and not (cursor.set_range(after) and (cursor.key() != after or cursor.next())):
            return   # past the last key (an unpositioned cursor would start again)
        for key, value in cursor.iternext(keys=True, values=True):
            yield bytes(key), len(key) + len(value) + FAULT_SLACK

    def _release(self) -> None:
        if self._txn is not None:
            self._txn.abort()
        if self._env is not None:
            self._env.close()
        self._env = self._txn = self._get = None

    def _forget(self):
        """In a forked child: an environment open at the fork (a read in another thread) is closed
        here, which without a lock file only unmaps the child's copy (py-lmdb refuses to open its
        files again while it is registered as open)."""
        if self._env is not None:
            with contextlib.suppress(Exception):
                self._env.close()
        self._env = self._txn = self._get = None


class LevelDb(_Db):
    """LevelDB keeps no count: its keys are walked at open. Between reads another opener that
    changed its table files or logs makes the next read walk the keys again to check them."""

    kind = "LevelDB"

    def __init__(self, layer):
        super().__init__(layer)
        self._db, self._stamp, self._failed = None, None, None
        self._key_list()

    def __len__(self) -> int:
        return len(self._keys)

    def _files(self) -> tuple:
        """What a LevelDB's contents live in: its table files and any log holding writes (every
        opening, a reader's too, writes a new manifest and an empty log, which say nothing)."""
        found = []
        with os.scandir(self.source) as entries:
            for entry in entries:
                status = entry.stat()
                if entry.name.endswith((".ldb", ".sst")) or (entry.name.endswith(".log") and status.st_size):
                    found.append((entry.name, status.st_size, status.st_mtime_ns))
        return tuple(sorted(found))

    def _check(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._stamp is not None and self._files() != self._stamp:
            self._verify()

    def _verify(self) -> None:
        """Another opener changed the files since this reader closed them: the keys must be the same."""
        keys = self._keys

        def same(i, key):
            if i >= len(keys) or key != keys[i]:
                self._failed = self._changed(f"its key {i} is now {key!r}, was {keys[i]!r}" if i < len(keys)
                                             else f"it holds more than its {len(keys)} keys")
                raise self._failed
        self._stamp = None   # the walk starts from the files as they are now
        count = self._walk(same)
        if count != len(keys):
            self._failed = self._changed(f"{count} keys, {len(keys)} when opened")
            raise self._failed

    def _open(self, verify: bool = True) -> None:
        if self._stamp is not None and self._files() != self._stamp:
            if not verify:
                raise self._changed("another process wrote to it while its keys were walked")
            self._verify()
        try:
            import plyvel
        except ImportError:
            raise DataError(f"{self.where}: reading the LevelDB {self.source} needs plyvel; "
                            f"`pip install plyvel`") from None
        deadline = time.monotonic() + base_reader.LEVELDB_WAIT_S
        while True:
            try:
                self._db = plyvel.DB(self.source, create_if_missing=False)
                self._get = self._db.get
                return
            except plyvel.Error as exc:
                why = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
                if not why.startswith("IO error: lock "):
                    hint = "; it looks like an LMDB: set backend: LMDB" if (Path(self.source) / "data.mdb").is_file() else ""
                    raise DataError(f"{self.where}: {self.source} is not a LevelDB ({why}){hint}") from None
                if time.monotonic() > deadline:
                    raise DataError(f"{self.where}: LevelDB {self.source} stayed open elsewhere for "
                                    f"{base_reader.LEVELDB_WAIT_S:g} s ({why}); LevelDB allows one opener at a time: "
                                    f"let the other finish, or copy the DB") from None
                time.sleep(0.05)

    def _keys_after(self, after):
        """LevelDB's iterator parses a block's entry headers and restart array, not its values."""
        keys = self._db.iterator(include_value=False) if after is None else \
            self._db.iterator(start=after, include_start=False, include_value=False)
        return ((key, len(key) + FAULT_SLACK) for key in keys)

    def _release(self) -> None:
        if self._db is not None:
            self._db.close()   # closes its iterators and unmaps its tables
            self._stamp = self._files()
        self._db = self._get = None

    def _forget(self):
        """In a forked child: a LevelDB open at the fork is left alone (closing it would wait for
        the parent's background thread); LevelDB then refuses this process another opening."""
        handle, self._db, self._get = self._db, None, None
        return handle

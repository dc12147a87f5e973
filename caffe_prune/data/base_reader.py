"""The reader every data source shares: records by position, streamed with read-ahead, hashed in
one pass, in bounded memory, checked against changes, safe across forks.

A :class:`Reader` (made by caffe_prune.data.layer_records.open_records for a Data, ImageData or
HDF5Data layer) holds ``len(reader)`` records in Caffe's TEST-phase order (a DB's key order, which
is its cursor's; the list's order; the rows of the listed HDF5 files in turn; no shuffle,
rand_skip ignored). ``read(indices)`` returns any of them in any order, ``chunks`` streams runs of
them with the next runs read ahead in a thread, ``scan`` hashes them in one pass. Each kind of
source supplies ``_fetch`` (caffe_prune.data.db_reader: LMDB, LevelDB; list_reader: image lists;
hdf5_reader: HDF5 lists), reading as caffe_prune.data.caffe_reading states Caffe reads.

Why it is built as it is:

- Memory is bounded by the records asked for at once (chunk size x prefetch depth), not by the
  source. A reader keeps an index only: a DB's keys packed in one buffer (db_reader.Keys: 1.28M
  keys cost tens of MB, not a list of Python objects), an image list's text. LMDB, and LevelDB's
  table files, are memory-mapped, and every page touched stays in the process's resident set
  until the map is closed (VmRSS and VmHWM count file-backed pages, and the kernel maps up to
  64 KiB of cached pages around each fault), so streaming 7 GB through one open environment would
  peak at 7 GB. A reader closes and reopens its DB after every :data:`REOPEN_BYTES` it may have
  mapped, key walks included, and holds it only while it reads.
- A source that changes under a reader would mix two versions: each read checks, before and after,
  that it has not (LMDB: its entries and last transaction; LevelDB: its table files and any log
  holding writes, and when another opener changed those, its keys; lists and HDF5: the files'
  sizes and mtimes), so that a long pass stops with one line instead. Not noticed: a LevelDB's
  values rewritten under the same keys, an image of a list rewritten in place.
- One opener at a time: py-lmdb refuses a second environment on the same files in one process,
  LevelDB a second opener anywhere (Caffe, a sibling worker). Readers of one DB in a process take
  turns; a LevelDB opened elsewhere is waited for, up to :data:`LEVELDB_WAIT_S`.
- The toolkit forks workers. A reader notices that it is in a new process and opens its own
  handles there; it never reads through one opened before the fork (LMDB forbids using an
  environment across a fork). One open at the fork (a read in another thread) is closed in the
  child if it is an LMDB's (without a lock file that only unmaps the child's copy) and left alone
  if it is a LevelDB's (closing would wait for a background thread the child does not have; the
  child cannot open that LevelDB then). A ``chunks`` iterator does not cross a fork (its thread
  stays in the parent).
"""
from __future__ import annotations

import hashlib
import os
import queue
import threading
import time

import numpy as np
from tqdm import tqdm

from caffe_prune.data import caffe_reading
from caffe_prune.data.caffe_reading import Records
from caffe_prune.errors import DataError

REOPEN_BYTES = 256 << 20      # what one opening of an LMDB or LevelDB may map before it is reopened
FAULT_SLACK = 128 << 10       # what reading one record may map beyond its bytes (fault-around, both ends)
LEVELDB_WAIT_S = 30.0         # how long to wait for another opener of a LevelDB to let go
RERUN = "rerun the command (a resumed run compares the data's contents)"
_INHERITED = []               # handles open at a fork that the child must not close: kept


class Reader:
    """The records of one data layer by position (0 .. len - 1, Caffe's order). One read at a time
    (a lock), from any thread; usable after a fork (see the module docstring)."""

    crop_size = 0

    def __init__(self, layer, what: str):
        self.layer, self.where, self.what = layer, f"layer {layer.name!r}", what   # what: "LMDB path"
        self._pid, self._lock = os.getpid(), threading.RLock()

    def __len__(self) -> int:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def close(self) -> None:
        """Let go of open handles (a later read opens them again)."""
        with self._owned():
            self._release()

    def read(self, indices, progress: bool = False) -> Records:
        """The records at these positions (any order, repeats allowed), as layer_records.read gives them:
        uint8 (k, C, H, W) images (float32 for float_data Datums and HDF5), or a list of (C, H, W)
        arrays when their shapes differ (with crop_size only); int64 labels (HDF5: the label
        dataset as float32, or None for one top). No positions: an empty list of images."""
        return self._read(self._positions(indices), None, progress)

    def chunks(self, indices, size: int, prefetch: int = 2, progress: bool = False):
        """An iterator of Records: the given positions in runs of `size`, in order. A thread reads
        the next `prefetch` runs ahead while the caller works on one (so at most prefetch + 1 runs
        are in memory; 0: each run is read when asked for). Closing the iterator, or dropping it,
        stops the thread after the run it is reading. The positions are checked here, at once."""
        positions = self._positions(indices)
        if size < 1 or prefetch < 0:
            raise DataError(f"{self.where}: chunks of {size} records, {prefetch} ahead; the size must be at "
                            f"least 1 and prefetch at least 0")
        runs = [positions[i:i + size] for i in range(0, len(positions), size)]
        return _ahead(self, runs, prefetch, progress)

    def scan(self, indices, size: int = 256, progress: bool = False) -> tuple:
        """(sha256 hex, int64 labels) of the records at these positions, in one streaming pass of
        chunks of `size`: the sha256 is dataset.records_sha256 of the same records read at once
        (their image bytes in order, then the labels as int64). For a one-top HDF5Data layer the
        labels are None and the sha256 covers the images alone."""
        digest, labels = hashlib.sha256(), []
        for records in self.chunks(indices, size, prefetch=1, progress=progress):
            for image in records.images if isinstance(records.images, list) else [records.images]:
                digest.update(np.ascontiguousarray(image))
            labels.append(records.labels)
        if any(part is None for part in labels):
            return digest.hexdigest(), None
        labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
        digest.update(labels.tobytes())
        return digest.hexdigest(), labels

    def check_unchanged(self) -> None:
        """DataError (one line naming the source) when the source changed since it was opened."""
        with self._owned():
            self._check()

    def check_nonempty(self) -> None:
        """DataError naming the source when it holds no records."""
        if not len(self):
            raise DataError(f"{self.where}: {self.what} holds no records")

    def record_shape(self) -> tuple:
        """(C, H, W) of the first record before the transform (HDF5: its data's row shape)."""
        self.check_nonempty()
        return self.read([0]).images[0].shape

    # ---- what the kinds share

    def _read(self, positions, first, progress: bool = False) -> Records:
        with self._owned():
            self._check()
            if not len(positions):
                return Records([], self._no_labels())
            unique, inverse = _unique(positions)
            images, labels, decoded = self._fetch(unique, progress)
            self._check()   # and nothing changed while they were read
        if inverse is not None:
            images = images[inverse] if isinstance(images, np.ndarray) else [images[j] for j in inverse]
            labels = None if labels is None else labels[inverse]
        return Records(caffe_reading._stack(images, self.crop_size, self.where, decoded, positions, first), labels)

    def _owned(self):
        """The reader's lock, once the reader knows which process it is in: in a forked child it
        drops the handles it inherited (_forget) and will open its own."""
        if self._pid != os.getpid():
            inherited = self._forget()
            if inherited is not None:
                _INHERITED.append(inherited)
            self._pid, self._lock = os.getpid(), threading.RLock()
        return self._lock

    def _positions(self, indices) -> np.ndarray:
        positions = np.arange(indices.start, indices.stop, indices.step) if isinstance(indices, range) \
            else np.asarray(indices)
        if positions.ndim != 1 or (positions.size and positions.dtype.kind not in "iu"):
            raise DataError(f"{self.where}: record indices must be one list of whole numbers, got "
                            f"{positions.dtype} of shape {positions.shape}")
        n = len(self)
        bad = positions[(positions < 0) | (positions >= n)]
        if bad.size:
            raise DataError(f"{self.where}: index {bad[0]} is out of range: {self.what} holds {n} records"
                            f"{f' (0 .. {n - 1})' if n else ''}")
        return positions.astype(np.int64)

    def _changed(self, detail: str) -> DataError:
        return DataError(f"{self.where}: {self.what} changed since it was opened ({detail}); {RERUN}")

    def _checkstamp(self, then: dict) -> None:
        """The files' sizes and mtimes are still those of `then` (_stamp)."""
        now = stamp(then)
        for path, was in then.items():
            if now[path] != was:
                is_ = "now missing" if now[path] is None else f"now {now[path][0]} bytes modified {_when(now[path][1])}"
                raise self._changed(f"{path}: {was[0]} bytes modified {_when(was[1])} when opened, {is_}")

    def _no_labels(self):
        return np.zeros(0, np.int64)

    # ---- what each kind does

    def _fetch(self, positions, progress) -> tuple:
        """(images: a list of (C, H, W) arrays or an array, labels, whether Caffe decoded some) of
        these distinct positions."""
        raise NotImplementedError

    def _check(self) -> None:
        """Raise _changed when the source changed since it was opened."""

    def _release(self) -> None:
        """Close what is open."""

    def _forget(self):
        """In a forked child: drop the handles open at the fork (see the module docstring); what
        is returned is kept, never closed."""


def _unique(positions) -> tuple:
    """The distinct positions in order of first appearance, and where each given one is among them
    (None when none repeats)."""
    unique, first, inverse = np.unique(positions, return_index=True, return_inverse=True)
    if len(unique) == len(positions):
        return positions, None
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return unique[order], rank[inverse.reshape(-1)]


def _first(records, run) -> tuple:
    return records.images[0].shape, int(run[0])


_END = object()


def _ahead(reader, runs, prefetch, progress):
    """The reader's records of each run in turn, the next `prefetch` runs read by a thread meanwhile
    (a semaphore holds it to that many). Each run is checked against the first one's shape, as one
    read of all of them would be (caffe_reading._stack)."""
    pid, first = os.getpid(), None
    bar = tqdm(total=sum(len(run) for run in runs), unit="rec", desc=f"read {reader.what}",
               disable=not progress, leave=False)
    try:
        if prefetch == 0:
            for run in runs:
                records = reader._read(run, first)
                first = first or _first(records, run)
                bar.update(len(run))
                yield records
            return
        done, slots, stop = queue.Queue(), threading.Semaphore(prefetch), threading.Event()
        thread = threading.Thread(target=_read_ahead, args=(reader, runs, done, slots, stop), daemon=True,
                                  name=f"caffe-prune read-ahead {reader.where}")
        thread.start()
        try:
            while True:
                if os.getpid() != pid:
                    raise DataError(f"{reader.where}: a chunks() iterator of {reader.what} cannot go on in a "
                                    f"forked child (its reading thread stayed in process {pid}); start a new one")
                item = done.get()
                slots.release()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                bar.update(len(item.images))
                yield item
        finally:
            if os.getpid() == pid:
                stop.set()
                thread.join()
    finally:
        bar.close()


def _read_ahead(reader, runs, done, slots, stop) -> None:
    first = None
    try:
        for run in runs:
            while not slots.acquire(timeout=0.1):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            records = reader._read(run, first)
            first = first or _first(records, run)
            done.put(records)
        done.put(_END)
    except BaseException as exc:   # raised in the caller, after the runs before it
        done.put(exc)


def stamp(paths) -> dict:
    """{path: (size, mtime in ns), or None when it is missing}."""
    found = {}
    for path in paths:
        try:
            status = os.stat(path)
            found[path] = (status.st_size, status.st_mtime_ns)
        except OSError:
            found[path] = None
    return found


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns // 10 ** 9)) + f".{ns % 10 ** 9:09d}"


# ---- ImageData: a list of image files ------------------------------------------------------------

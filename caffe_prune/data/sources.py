"""The records a Caffe data layer reads, before its transform, exactly as Caffe reads them.

:func:`read` takes a data LayerParameter and returns its records in Caffe's order (TEST phase:
no shuffle, no skip) as :class:`Records`; ``Transform.of(layer).apply(records.images)``
(caffe_prune.data.transform) is then what the layer's top blob holds, element for element.

- ``Data``: an LMDB or LevelDB (``data_param.backend``, LevelDB by default as in Caffe) of
  ``caffe_pb2.Datum`` in key order. Unencoded Datums are read here (uint8 ``data``, else
  ``float_data`` as float32), exactly as the layer reads them. Encoded ones (PNG, JPEG, ...
  bytes, ``encoded: true``) are decoded by Caffe itself, whose OpenCV decoder defines the
  pixels: a one-layer copy of the layer (batch_size 1, so that each record keeps its own shape;
  ``transform_param`` reduced to force_color/force_gray) is forwarded once per record.
- ``ImageData``: the list file (each line: path, last space, label, read by ``atoi``; a line
  without a space is a path with label 0, as in Caffe), ``root_folder`` + path (plain string
  concatenation, as Caffe does), ``new_height``/``new_width`` and ``is_color``. Read by Caffe's
  own ImageData layer (shuffle off, rand_skip 0), so decoding and resizing are OpenCV's as Caffe
  calls them.
- ``HDF5Data``: the source lists .h5 files (whitespace separated); the datasets are named by the
  layer's tops (the first is the data, the second the labels), read as float32 as Caffe's
  ``H5LTread_dataset_float`` does. Caffe applies **no transform** to HDF5Data, and aborts on one
  that has a ``transform_param``.

Paths (source, root_folder, the listed files) are relative to the working directory, as for Caffe.

Caffe reads bad input with CHECKs that abort the interpreter. Here everything that can be checked
in Python is checked before Caffe sees it, and the Caffe reading itself runs in a forked child
(as engine.probe_construct does), so that an image OpenCV cannot decode becomes a one-line
:class:`~caffe_prune.data.cifar10.DataError` carrying glog's message, never an abort.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import re
import signal
import tempfile
import traceback
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from caffe_prune import engine
from caffe_prune.errors import DataError

WHERE_PATHS = "paths are relative to the working directory"


class Records(NamedTuple):
    """What a data layer reads, untransformed: images is an (N, C, H, W) array (uint8 pixels;
    float32 for float_data Datums and HDF5), or a list of (C, H, W) arrays when their shapes
    differ (allowed with crop_size only); labels is an (N,) int64 array (HDF5: the label dataset
    as float32, or None for a layer with one top)."""
    images: np.ndarray | list
    labels: np.ndarray | None


def read(layer_param, limit: int | None = None, progress: bool = True) -> Records:
    """The first `limit` (default: all) records of a Data, ImageData or HDF5Data layer."""
    if limit is not None and limit < 1:
        raise DataError(f"layer {layer_param.name!r}: limit {limit} must be at least 1")
    return _source(layer_param).read(limit, progress)


def count(layer_param) -> int:
    """The number of records the layer reads in one pass (0 for an empty DB or list)."""
    return _source(layer_param).count()


def record_shape(layer_param) -> tuple:
    """(C, H, W) of the layer's first record before the transform (HDF5: the data dataset's shape
    without its first axis), without reading the whole set."""
    return _source(layer_param).record_shape()


def source_path(layer) -> str:
    """What a Data, ImageData or HDF5Data layer reads (its ``source``); "" for any other layer."""
    return {"Data": layer.data_param.source, "ImageData": layer.image_data_param.source,
            "HDF5Data": layer.hdf5_data_param.source}.get(layer.type, "")


def _source(layer):
    kinds = {"Data": _Db, "ImageData": _ImageList, "HDF5Data": _Hdf5List}
    if layer.type not in kinds:
        raise DataError(f"layer {layer.name!r} has type {layer.type!r}; records can be read from "
                        f"{', '.join(kinds)} layers")
    return kinds[layer.type](layer)


# ---- checks shared by the readers ----------------------------------------------------------------

def _stack(records, crop_size: int, where: str, decoded: bool = False):
    """One (N, C, H, W) array, or the list when shapes differ and crop_size brings them to one
    (Caffe's Data and ImageData layers abort on a batch of differing shapes otherwise)."""
    if isinstance(records, np.ndarray):
        return records
    first = records[0].shape
    odd = next((i for i, r in enumerate(records) if r.shape != first), None)
    if odd is None:
        return np.stack(records)
    note = " (encoded images, decoded by Caffe to check)" if decoded else ""
    shown = f"{'x'.join(map(str, first))} (record 0) and {'x'.join(map(str, records[odd].shape))} (record {odd})"
    if records[odd].shape[0] != first[0]:
        raise DataError(f"{where}: records differ in channels: {shown}{note}; Caffe aborts on a batch "
                        f"that mixes them")
    if not crop_size:
        raise DataError(f"{where}: records differ in shape: {shown}{note}; Caffe aborts on a batch of "
                        f"differing shapes unless transform_param crop_size brings them to one")
    return records


def _glog_reason(text: str, status: int) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    fatal = [ln.split("] ", 1)[-1] for ln in lines if ln[:1] == "F" and "] " in ln]
    errors = [ln.split("] ", 1)[-1] for ln in lines if ln[:1] == "E" and "] " in ln]
    reason = fatal[-1] if fatal else (lines[-1] if lines else f"exit status {status}")
    if errors and errors[-1] not in reason:
        reason = f"{errors[-1]}; {reason}"
    return reason


def _through_caffe(layer, n: int, where: str, what: str, progress: bool):
    """Forward a net of the single data layer `layer` (batch_size 1, no transform) n times and
    return the decoded images (uint8: Caffe's float top of an 8-bit image holds integers 0..255)
    as an (n, C, H, W) array, or a list of (C, H, W) arrays when their shapes differ, and the
    labels. It runs in a forked child in CPU mode (data layers read on the CPU in any mode), so
    that a CHECK failure while decoding becomes a DataError carrying glog's message; pixels come
    back through a temporary file and progress through a pipe."""
    net_param = engine.caffe_pb2().NetParameter(name="caffe-prune-read")
    net_param.layer.add().CopyFrom(layer)
    with tempfile.TemporaryDirectory(prefix="caffe-prune-read-") as tmp:
        raw, meta, log = Path(tmp) / "pixels.u8", Path(tmp) / "meta.npz", Path(tmp) / "stderr.txt"
        ticks_r, ticks_w = os.pipe()
        pid = os.fork()
        if pid == 0:   # child: read, write the results, report by exit status
            code = 3
            try:
                os.close(ticks_r)
                os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
                faulthandler.disable()   # the abort it would report is the expected outcome
                engine.caffe().set_mode_cpu()
                net = engine.net_from_param(net_param, probe=False)
                shapes, labels = [], []
                with open(raw, "wb") as pixels_out:
                    for i in range(n):
                        net.forward()
                        data = net.blobs["data"].data[0]
                        pixels = data.astype(np.uint8)
                        if not np.array_equal(pixels, data):
                            raise ValueError(f"record {i} decoded to values that are not 8-bit pixels "
                                             f"({data.min()}..{data.max()})")
                        pixels_out.write(pixels.tobytes())
                        shapes.append(data.shape)
                        labels.append(net.blobs["label"].data[0])
                        os.write(ticks_w, b".")
                np.savez(meta, shapes=np.asarray(shapes, np.int64), labels=np.asarray(labels, np.float32))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(ticks_w)
        done = 0
        try:
            with tqdm(total=n, unit="rec", desc=f"caffe reads {what}", disable=not progress, leave=False) as bar:
                while chunk := os.read(ticks_r, 4096):
                    done += len(chunk)
                    bar.update(len(chunk))
            _, status = os.waitpid(pid, 0)
        except BaseException:   # interrupted: do not leave the reader running
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        finally:
            os.close(ticks_r)
        if status != 0 or not meta.is_file():
            reason = _glog_reason(log.read_text(errors="replace") if log.is_file() else "", status)
            raise DataError(f"{where}: Caffe's {layer.type} layer cannot read {what} (stopped after "
                            f"{done} of {n} records): {reason}")
        with np.load(meta) as saved:
            shapes, labels = [tuple(s) for s in saved["shapes"]], saved["labels"]
        flat = np.fromfile(raw, np.uint8)
    if len(set(shapes)) == 1:
        return flat.reshape((n,) + shapes[0]), labels
    ends = np.cumsum([int(np.prod(s)) for s in shapes])
    return [part.reshape(shape) for part, shape in zip(np.split(flat, ends[:-1]), shapes)], labels


# ---- Data: LMDB and LevelDB of Datums ------------------------------------------------------------

class _Db:
    def __init__(self, layer):
        pb2 = engine.caffe_pb2()
        self.layer, self.where = layer, f"layer {layer.name!r}"
        self.source = layer.data_param.source
        self.lmdb = layer.data_param.backend == pb2.DataParameter.LMDB
        self.kind = "LMDB" if self.lmdb else "LevelDB"
        self.crop_size = layer.transform_param.crop_size
        if not self.source:
            raise DataError(f"{self.where}: data_param has no source")
        if not Path(self.source).exists():
            raise DataError(f"{self.where}: {self.kind} {self.source} does not exist ({WHERE_PATHS}, "
                            f"here {os.getcwd()})")

    @contextlib.contextmanager
    def _opened(self, counted: bool = True):
        """(number of records, or None for a LevelDB when not `counted`; iterator over (key, value)
        in Caffe's cursor order: by key)."""
        source = self.source
        if self.lmdb:
            import lmdb
            try:
                env = lmdb.open(source, readonly=True, lock=False)
            except lmdb.Error as exc:
                hint = "; it looks like a LevelDB: set backend: LEVELDB" if (Path(source) / "CURRENT").is_file() else ""
                raise DataError(f"{self.where}: {source} is not an LMDB ({exc}){hint}") from None
            try:
                with env.begin(buffers=False) as txn:
                    yield env.stat()["entries"], iter(txn.cursor())
            finally:
                env.close()
        else:
            try:
                import plyvel
            except ImportError:
                raise DataError(f"{self.where}: reading the LevelDB {source} needs plyvel; "
                                f"`pip install plyvel`") from None
            try:
                db = plyvel.DB(source, create_if_missing=False)
            except plyvel.Error as exc:
                hint = "; it looks like an LMDB: set backend: LMDB" if (Path(source) / "data.mdb").is_file() else ""
                why = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
                raise DataError(f"{self.where}: {source} is not a LevelDB ({why}){hint}") from None
            try:   # LevelDB keeps no count: walk the keys
                entries = sum(1 for _ in db.iterator(include_value=False)) if counted else None
                yield entries, db.iterator()
            finally:
                db.close()   # before Caffe opens it: LevelDB allows one opener at a time

    def count(self) -> int:
        with self._opened() as (entries, _):
            return entries

    def _datum(self, key: bytes, value: bytes):
        from google.protobuf.message import DecodeError
        datum = engine.caffe_pb2().Datum()
        try:
            datum.ParseFromString(value)
        except DecodeError as exc:
            raise DataError(f"{self.where}: record {key!r} of {self.source} is not a Datum ({exc})") from None
        if datum.encoded and not datum.data:
            raise DataError(f"{self.where}: record {key!r} of {self.source} is an encoded Datum without data")
        return datum

    def _pixels(self, key: bytes, datum) -> np.ndarray:
        """An unencoded Datum's (C, H, W) values, as DataTransformer::Transform(Datum) indexes
        them: the uint8 `data` when it is non-empty, else `float_data`."""
        c, h, w = datum.channels, datum.height, datum.width
        size = c * h * w
        if min(c, h, w) <= 0:
            raise DataError(f"{self.where}: record {key!r} of {self.source} is a Datum of shape "
                            f"{c}x{h}x{w}; Caffe needs positive channels, height and width")
        if datum.data:
            if len(datum.data) != size:
                raise DataError(f"{self.where}: record {key!r} of {self.source} holds {len(datum.data)} "
                                f"bytes but its header says {c}x{h}x{w} = {size}; rewrite the {self.kind}")
            return np.frombuffer(datum.data, np.uint8).reshape(c, h, w)
        if len(datum.float_data) != size:
            raise DataError(f"{self.where}: record {key!r} of {self.source} holds {len(datum.float_data)} "
                            f"float_data values but its header says {c}x{h}x{w} = {size}; rewrite the {self.kind}")
        return np.asarray(datum.float_data, np.float32).reshape(c, h, w)

    def _scan(self, limit, progress):
        """The first `limit` records: the unencoded ones' values (None where encoded), the
        encoded ones' raw values by position, the labels, and whether that was every record."""
        with self._opened(counted=limit is None or self.lmdb) as (entries, items):
            total = entries if limit is None else (limit if entries is None else min(limit, entries))
            records, encoded, labels = [], {}, []
            for i, (key, value) in zip(range(total), tqdm(items, total=total, unit="rec", desc=f"read {self.source}",
                                                          disable=not progress, leave=False)):
                datum = self._datum(key, value)
                labels.append(datum.label)
                records.append(None if datum.encoded else self._pixels(key, datum))
                if datum.encoded:
                    encoded[i] = value
        if not records:
            raise DataError(f"{self.where}: {self.kind} {self.source} holds no records")
        return records, encoded, np.asarray(labels, np.int64), len(records) == entries

    def _decode(self, encoded: dict, everything: bool, progress: bool) -> dict:
        """Caffe's own decoding of the encoded Datums, by position. Caffe's reader runs ahead of
        the records asked for, so unless every record of the source is encoded and read, it reads
        a temporary LMDB holding exactly those Datums."""
        tp = self.layer.transform_param
        if tp.force_color and tp.force_gray:
            raise DataError(f"{self.where}: transform_param sets both force_color and force_gray, which "
                            f"Caffe refuses for encoded Datums; keep one")
        layer = engine.caffe_pb2().LayerParameter(name=self.layer.name or "data", type="Data", top=["data", "label"])
        layer.data_param.CopyFrom(self.layer.data_param)
        for deprecated in ("scale", "mean_file", "crop_size", "mirror", "force_encoded_color"):
            layer.data_param.ClearField(deprecated)
        layer.data_param.batch_size, layer.data_param.rand_skip = 1, 0
        layer.transform_param.force_color, layer.transform_param.force_gray = tp.force_color, tp.force_gray
        what = f"{self.kind} {self.source}"
        with tempfile.TemporaryDirectory(prefix="caffe-prune-decode-") as tmp:
            if not everything:
                import lmdb
                copy = Path(tmp) / "encoded-lmdb"
                size = sum(len(v) for v in encoded.values())
                with lmdb.open(str(copy), map_size=2 * size + (1 << 22)) as env, env.begin(write=True) as txn:
                    for j, value in enumerate(encoded.values()):
                        txn.put(b"%012d" % j, value)   # key order is record order
                layer.data_param.source, layer.data_param.backend = str(copy), engine.caffe_pb2().DataParameter.LMDB
                what = f"{what} (its encoded Datums {', '.join(map(str, list(encoded)[:3]))}" \
                       f"{' ...' if len(encoded) > 3 else ''})"
            decoded, _ = _through_caffe(layer, len(encoded), self.where, what, progress)
        return dict(zip(encoded, decoded))

    def read(self, limit, progress) -> Records:
        records, encoded, labels, everything = self._scan(limit, progress)
        if encoded:
            for i, pixels in self._decode(encoded, everything and len(encoded) == len(records), progress).items():
                records[i] = pixels
        return Records(_stack(records, self.crop_size, self.where, decoded=bool(encoded)), labels)

    def record_shape(self) -> tuple:
        records, encoded, _, everything = self._scan(1, progress=False)
        if records[0] is None:
            records[0] = self._decode(encoded, everything, progress=False)[0]
        return records[0].shape


# ---- ImageData: a list of image files ------------------------------------------------------------

_ATOI = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)")


def _atoi(text: str) -> int:
    """C's atoi: leading white space, a sign, digits; 0 when there are none."""
    found = _ATOI.match(text)
    return int(found.group(1)) if found else 0


def parse_image_list(text: str) -> list[tuple[str, int]]:
    """(path, label) per line as ImageDataLayer parses its source: the label is atoi of what
    follows the last space; the path is what precedes it (the whole line when there is no space,
    whose label is then atoi of the whole line, usually 0)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()   # std::getline yields no line after the final newline
    entries = []
    for line in lines:
        pos = line.rfind(" ")
        entries.append((line[:pos] if pos >= 0 else line, _atoi(line[pos + 1:])))
    return entries


class _ImageList:
    def __init__(self, layer):
        p = layer.image_data_param
        self.layer, self.where = layer, f"layer {layer.name!r}"
        self.source, self.root = p.source, p.root_folder
        self.crop_size = layer.transform_param.crop_size
        if (p.new_height == 0) != (p.new_width == 0) or p.new_height < 0 or p.new_width < 0:
            raise DataError(f"{self.where}: image_data_param new_height {p.new_height}, new_width "
                            f"{p.new_width}; Caffe needs both set (positive) or neither")
        if not Path(self.source).is_file():
            raise DataError(f"{self.where}: image list {self.source} does not exist ({WHERE_PATHS}, "
                            f"here {os.getcwd()})")
        self.entries = parse_image_list(Path(self.source).read_bytes().decode(errors="surrogateescape"))

    def _checked(self, limit) -> int:
        if not self.entries:
            raise DataError(f"{self.where}: image list {self.source} is empty")
        n = len(self.entries) if limit is None else min(limit, len(self.entries))
        for number, (name, _) in enumerate(self.entries[:n], start=1):
            path = self.root + name   # Caffe concatenates: root_folder needs its trailing slash
            if not name:
                raise DataError(f"{self.where}: {self.source}:{number} is an empty line; Caffe would "
                                f"try to load the root_folder {self.root!r} itself")
            if not Path(path).is_file():
                raise DataError(f"{self.where}: {self.source}:{number}: image {path} does not exist "
                                f"(root_folder {self.root!r} + the path before the last space; {WHERE_PATHS})")
        return n

    def count(self) -> int:
        return len(self.entries)

    def read(self, limit, progress) -> Records:
        n = self._checked(limit)
        layer = engine.caffe_pb2().LayerParameter(name=self.layer.name or "data", type="ImageData",
                                                  top=["data", "label"])
        layer.image_data_param.CopyFrom(self.layer.image_data_param)
        for deprecated in ("scale", "mean_file", "crop_size", "mirror"):
            layer.image_data_param.ClearField(deprecated)
        layer.image_data_param.batch_size, layer.image_data_param.rand_skip = 1, 0
        layer.image_data_param.shuffle = False
        with tempfile.TemporaryDirectory(prefix="caffe-prune-images-") as tmp:
            if n < len(self.entries):   # Caffe's reader runs ahead: let it see only the first n lines
                layer.image_data_param.source = str(Path(tmp) / "list.txt")
                Path(layer.image_data_param.source).write_bytes(
                    "".join(f"{name} {label}\n" for name, label in self.entries[:n]).encode(errors="surrogateescape"))
            decoded, _ = _through_caffe(layer, n, self.where, f"the images of {self.source}", progress)
        labels = np.asarray([label for _, label in self.entries[:n]], np.int64)
        return Records(_stack(decoded, self.crop_size, self.where), labels)

    def record_shape(self) -> tuple:
        p = self.layer.image_data_param
        if p.new_height and p.new_width:
            self._checked(1)
            return (3 if p.is_color else 1), p.new_height, p.new_width
        return self.read(1, progress=False).images[0].shape


# ---- HDF5Data: a list of .h5 files ----------------------------------------------------------------

class _Hdf5List:
    """Checks every listed file before Caffe would meet it (Caffe opens them one by one as it
    reads, and aborts on the first bad one)."""

    def __init__(self, layer):
        import h5py
        self.layer, self.where = layer, f"layer {layer.name!r}"
        self.source, self.tops = layer.hdf5_data_param.source, list(layer.top)
        if layer.HasField("transform_param"):
            raise DataError(f"{self.where}: HDF5Data does not transform data and Caffe refuses its "
                            f"transform_param; remove it and store the data transformed")
        if not self.tops:
            raise DataError(f"{self.where}: an HDF5Data layer needs a top (its datasets are named by the tops)")
        if not Path(self.source).is_file():
            raise DataError(f"{self.where}: HDF5 list {self.source} does not exist ({WHERE_PATHS}, "
                            f"here {os.getcwd()})")
        self.files = Path(self.source).read_text(errors="surrogateescape").split()
        if not self.files:
            raise DataError(f"{self.where}: HDF5 list {self.source} names no file")
        self.rows, shapes = [], None
        for name in self.files:
            if not Path(name).is_file():
                raise DataError(f"{self.where}: {self.source} lists {name}, which does not exist ({WHERE_PATHS})")
            try:
                with h5py.File(name, "r") as h5:
                    found = {top: self._dataset(h5, name, top) for top in self.tops}
            except OSError as exc:
                raise DataError(f"{self.where}: {name} (listed in {self.source}) is not an HDF5 file ({exc})") from None
            rows = {top: shape[0] for top, shape in found.items()}
            if len(set(rows.values())) > 1:
                raise DataError(f"{self.where}: {name}: datasets {', '.join(f'{t!r} has {r} rows' for t, r in rows.items())}; "
                                f"Caffe needs the same number in each")
            if shapes is None:
                shapes = {top: shape[1:] for top, shape in found.items()}
            for top, shape in found.items():
                if shape[1:] != shapes[top]:
                    raise DataError(f"{self.where}: {name}: dataset {top!r} has records of shape {shape[1:]}, "
                                    f"{self.files[0]}'s are {shapes[top]}; Caffe reads every file with the first's shape")
            self.rows.append(rows[self.tops[0]])
        self.shape = shapes[self.tops[0]]

    def _dataset(self, h5, name, top) -> tuple:
        import h5py
        dataset = h5.get(top)
        if not isinstance(dataset, h5py.Dataset):
            raise DataError(f"{self.where}: {name} has no dataset {top!r} (HDF5Data reads one dataset per "
                            f"top, named like it: tops {self.tops})")
        if dataset.dtype.kind not in "fiu" or dataset.ndim < 1:
            raise DataError(f"{self.where}: {name}: dataset {top!r} is {dataset.dtype}{dataset.shape}; Caffe "
                            f"reads numeric (integer or float) datasets of at least one axis")
        if dataset.shape[0] == 0:
            raise DataError(f"{self.where}: {name}: dataset {top!r} has no rows")
        return tuple(dataset.shape)

    def count(self) -> int:
        return sum(self.rows)

    def record_shape(self) -> tuple:
        return self.shape

    def read(self, limit, progress) -> Records:
        import h5py
        left = self.count() if limit is None else min(limit, self.count())
        tops = self.tops[:2]
        parts = {top: [] for top in tops}
        with tqdm(total=left, unit="rec", desc=f"read {self.source}", disable=not progress, leave=False) as bar:
            for name, rows in zip(self.files, self.rows):
                if left == 0:
                    break
                take = min(rows, left)
                with h5py.File(name, "r") as h5:
                    for top in tops:   # converted by HDF5 itself, as H5LTread_dataset_float does
                        parts[top].append(h5[top].astype(np.float32)[:take])
                left -= take
                bar.update(take)
        images = np.concatenate(parts[tops[0]])
        labels = np.concatenate(parts[tops[1]]) if len(tops) > 1 else None
        return Records(images, labels)

"""Any records of a Caffe data layer, or all of them streamed, in bounded memory.

:func:`open_records` gives a caffe_prune.data.reader.Reader of a Data (LMDB or LevelDB:
caffe_prune.data.records_db), ImageData or HDF5Data layer (here); :func:`read`, :func:`count` and
:func:`record_shape` are the in-memory shortcuts (the first records, their number, the first one's
shape). The records are those Caffe's TEST-phase layer reads, bit for bit, as
caffe_prune.data.sources states it: the same Datum parsing, the same decoding by Caffe itself of
encoded Datums and image lists (a one-layer net in a forked child, fed a temporary LMDB or list of
just the records asked for), the same HDF5 conversion. ``Transform.of(layer).apply(images)``
(caffe_prune.data.transform) is then what the layer's top blob holds, element for element.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from caffe_prune import layers, pycaffe
from caffe_prune.data import records_db, sources
from caffe_prune.data.reader import Reader, _stamp
from caffe_prune.data.sources import WHERE_PATHS, Records
from caffe_prune.errors import DataError


def open_records(layer_param) -> "Reader":
    """A Reader of a Data (LMDB or LevelDB by data_param.backend, LevelDB by default as in Caffe),
    ImageData or HDF5Data layer. Close it (or use it in a ``with``) to let go of its handles."""
    kind = layers.reader(layer_param)
    if kind == "db":
        lmdb = layer_param.data_param.backend == pycaffe.caffe_pb2().DataParameter.LMDB
        return (records_db.Lmdb if lmdb else records_db.LevelDb)(layer_param)
    if kind is None:
        readable = ", ".join(layers.type_reading(k) for k in ("db", "list", "hdf5"))
        raise DataError(f"layer {layer_param.name!r} has type {layer_param.type!r}; records can be read from "
                        f"{readable} layers")
    return {"list": _ImageList, "hdf5": _Hdf5List}[kind](layer_param)


def read(layer_param, limit: int | None = None, progress: bool = True) -> Records:
    """The first `limit` (default: all) records of a Data, ImageData or HDF5Data layer, in memory."""
    if limit is not None and limit < 1:
        raise DataError(f"layer {layer_param.name!r}: limit {limit} must be at least 1")
    with open_records(layer_param) as reader:
        reader.check_nonempty()
        return reader.read(range(len(reader) if limit is None else min(limit, len(reader))), progress)


def count(layer_param) -> int:
    """The number of records the layer reads in one pass (0 for an empty DB or list)."""
    with open_records(layer_param) as reader:
        return len(reader)


def record_shape(layer_param) -> tuple:
    """(C, H, W) of the layer's first record before the transform (HDF5: the data dataset's shape
    without its first axis), without reading the whole set."""
    with open_records(layer_param) as reader:
        return reader.record_shape()


class _ImageList(Reader):
    """The list's text is kept and its lines found at open; the images of the lines a read asks for
    are checked then, not at open (a 1.28M-line list would stat every file up front)."""

    def __init__(self, layer):
        p = layer.image_data_param
        self.source, self.root = p.source, p.root_folder
        super().__init__(layer, f"image list {self.source}")
        self.crop_size = layer.transform_param.crop_size
        if (p.new_height == 0) != (p.new_width == 0) or p.new_height < 0 or p.new_width < 0:
            raise DataError(f"{self.where}: image_data_param new_height {p.new_height}, new_width "
                            f"{p.new_width}; Caffe needs both set (positive) or neither")
        if not Path(self.source).is_file():
            raise DataError(f"{self.where}: image list {self.source} does not exist ({WHERE_PATHS}, "
                            f"here {os.getcwd()})")
        self._stamp = _stamp([self.source])   # before the text: a change after it is noticed
        self._text = Path(self.source).read_bytes()
        breaks = np.flatnonzero(np.frombuffer(self._text, np.uint8) == ord("\n"))
        starts = np.concatenate([[0], breaks + 1])
        if starts[-1] == len(self._text):
            starts = starts[:-1]   # std::getline yields no line after the final newline
        self._starts, self._stops = starts, np.append(breaks, len(self._text))[:len(starts)]

    def __len__(self) -> int:
        return len(self._starts)

    def check_nonempty(self) -> None:
        if not len(self):
            raise DataError(f"{self.where}: image list {self.source} is empty")

    def _check(self) -> None:
        self._check_stamp(self._stamp)

    def _entries(self, positions) -> list:
        """(path, label) of these lines (sources.parse_image_line), their images checked."""
        entries = []
        for position in positions:
            line = self._text[self._starts[position]:self._stops[position]].decode(errors="surrogateescape")
            name, label = sources.parse_image_line(line)
            path = self.root + name   # Caffe concatenates: root_folder needs its trailing slash
            if not name:
                raise DataError(f"{self.where}: {self.source}:{position + 1} is an empty line; Caffe would "
                                f"try to load the root_folder {self.root!r} itself")
            if not Path(path).is_file():
                raise DataError(f"{self.where}: {self.source}:{position + 1}: image {path} does not exist "
                                f"(root_folder {self.root!r} + the path before the last space; {WHERE_PATHS})")
            entries.append((name, label))
        return entries

    def _fetch(self, positions, progress) -> tuple:
        entries = self._entries(positions)
        layer = pycaffe.caffe_pb2().LayerParameter(name=self.layer.name or "data", type=layers.type_reading("list"),
                                                  top=["data", "label"])
        layer.image_data_param.CopyFrom(self.layer.image_data_param)
        for deprecated in ("scale", "mean_file", "crop_size", "mirror"):
            layer.image_data_param.ClearField(deprecated)
        layer.image_data_param.batch_size, layer.image_data_param.rand_skip = 1, 0
        layer.image_data_param.shuffle = False
        what = f"the images of {self.source}"
        with tempfile.TemporaryDirectory(prefix="caffe-prune-images-") as tmp:
            if not np.array_equal(positions, np.arange(len(self))):   # Caffe's reader runs ahead: only these lines
                layer.image_data_param.source = str(Path(tmp) / "list.txt")
                Path(layer.image_data_param.source).write_bytes(
                    "".join(f"{name} {label}\n" for name, label in entries).encode(errors="surrogateescape"))
                if not np.array_equal(positions, np.arange(len(positions))):
                    shown = ", ".join(str(p + 1) for p in positions[:3])
                    what = f"{what} (its lines {shown}{' ...' if len(positions) > 3 else ''})"
            decoded, _ = sources._through_caffe(layer, len(positions), self.where, what, progress)
        return decoded, np.asarray([label for _, label in entries], np.int64), False

    def record_shape(self) -> tuple:
        p = self.layer.image_data_param
        if p.new_height and p.new_width:
            self.check_nonempty()
            self._entries([0])
            return (3 if p.is_color else 1), p.new_height, p.new_width
        return super().record_shape()


# ---- HDF5Data: a list of .h5 files ----------------------------------------------------------------

class _Hdf5List(Reader):
    """Checks every listed file at open (Caffe opens them one by one as it reads, and aborts on the
    first bad one); reads rows by file, converted to float32 by HDF5 as H5LTread_dataset_float does."""

    def __init__(self, layer):
        import h5py
        self.source, self.tops = layer.hdf5_data_param.source, list(layer.top)
        super().__init__(layer, f"HDF5 list {self.source}")
        if layer.HasField("transform_param"):
            raise DataError(f"{self.where}: HDF5Data does not transform data and Caffe refuses its "
                            f"transform_param; remove it and store the data transformed")
        if not self.tops:
            raise DataError(f"{self.where}: an HDF5Data layer needs a top (its datasets are named by the tops)")
        if not Path(self.source).is_file():
            raise DataError(f"{self.where}: HDF5 list {self.source} does not exist ({WHERE_PATHS}, "
                            f"here {os.getcwd()})")
        self._stamp = _stamp([self.source])
        self.files = Path(self.source).read_text(errors="surrogateescape").split()
        if not self.files:
            raise DataError(f"{self.where}: HDF5 list {self.source} names no file")
        self._stamp.update(_stamp(self.files))
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
        self.shape, self._shapes = shapes[self.tops[0]], shapes
        self._ends = np.cumsum(self.rows)

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

    def __len__(self) -> int:
        return int(self._ends[-1])

    def record_shape(self) -> tuple:
        return self.shape

    def _check(self) -> None:
        self._check_stamp(self._stamp)

    def _no_labels(self):
        return np.zeros((0,) + self._shapes[self.tops[1]], np.float32) if len(self.tops) > 1 else None

    def _fetch(self, positions, progress) -> tuple:
        import h5py
        tops = self.tops[:2]
        out = {top: np.empty((len(positions),) + self._shapes[top], np.float32) for top in tops}
        files = np.searchsorted(self._ends, positions, side="right")
        with tqdm(total=len(positions), unit="rec", desc=f"read {self.source}", disable=not progress,
                  leave=False) as bar:
            for f in np.unique(files):
                chosen = np.flatnonzero(files == f)
                rows = positions[chosen] - (self._ends[f] - self.rows[f])
                order = np.argsort(rows, kind="stable")   # HDF5 selects rows in increasing order
                chosen, rows = chosen[order], rows[order]
                picked = slice(int(rows[0]), int(rows[-1]) + 1) if rows[-1] - rows[0] + 1 == len(rows) else rows
                with h5py.File(self.files[f], "r") as h5:
                    for top in tops:   # converted by HDF5 itself, as H5LTread_dataset_float does
                        out[top][chosen] = h5[top].astype(np.float32)[picked]
                bar.update(len(rows))
        return out[tops[0]], (out[tops[1]] if len(tops) > 1 else None), False

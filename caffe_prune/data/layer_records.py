"""The records of any Caffe data layer, or all of them streamed, in bounded memory.

:func:`open_records` gives the caffe_prune.data.base_reader.Reader a layer needs: a Data layer's
LMDB or LevelDB (caffe_prune.data.db_reader), an ImageData list (list_reader), an HDF5Data list
(hdf5_reader); :func:`read`, :func:`count` and :func:`record_shape` are the in-memory shortcuts
(the first records, their number, the first one's shape). The records are those Caffe's TEST-phase
layer reads, bit for bit, as caffe_prune.data.caffe_reading states it: the same Datum parsing, the
same decoding by Caffe itself of encoded Datums and image lists (a one-layer net in a forked child,
fed a temporary LMDB or list of just the records asked for), the same HDF5 conversion.
``Transform.of(layer).apply(images)`` (caffe_prune.data.transform) is then what the layer's top
blob holds, element for element.
"""
from __future__ import annotations

from caffe_prune import layers, pycaffe
from caffe_prune.data import db_reader
from caffe_prune.data.base_reader import Reader
from caffe_prune.data.caffe_reading import Records
from caffe_prune.data.hdf5_reader import Hdf5List
from caffe_prune.data.list_reader import ImageList
from caffe_prune.errors import DataError


def open_records(layer_param) -> "Reader":
    """A Reader of a Data (LMDB or LevelDB by data_param.backend, LevelDB by default as in Caffe),
    ImageData or HDF5Data layer. Close it (or use it in a ``with``) to let go of its handles."""
    kind = layers.reader(layer_param)
    if kind == "db":
        lmdb = layer_param.data_param.backend == pycaffe.caffe_pb2().DataParameter.LMDB
        return (db_reader.Lmdb if lmdb else db_reader.LevelDb)(layer_param)
    if kind is None:
        readable = ", ".join(layers.type_reading(k) for k in ("db", "list", "hdf5"))
        raise DataError(f"layer {layer_param.name!r} has type {layer_param.type!r}; records can be read from "
                        f"{readable} layers")
    return {"list": ImageList, "hdf5": Hdf5List}[kind](layer_param)


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

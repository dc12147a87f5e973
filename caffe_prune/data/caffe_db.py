"""CIFAR-10 as Caffe's own ``Data`` layer reads it: an LMDB of ``caffe_pb2.Datum`` records.

The Data layer applies the reading prototxt's ``transform_param`` natively (``(pixel -
mean_value[c]) * scale``, mirror in TRAIN), so the records hold untransformed uint8 pixels in the
**BGR** plane order that the authors' ImageData layer got from OpenCV ``imread``. Nothing inside an
LMDB says which order or transform it holds, and a wrong one trains and scores silently worse (RGB
costs the published models 9 to 25 points of top-1). So each LMDB carries ``caffe-prune.json``
beside its ``data.mdb``, and :func:`check_lmdb` refuses one that lacks it or records anything else.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import lmdb
import numpy as np
from tqdm import tqdm

from caffe_prune import fsio, layers, pycaffe
from caffe_prune.errors import DataError

META = "caffe-prune.json"
CHANNEL_ORDER = "BGR"
STORAGE = "uint8, untransformed: transform_param of the reading prototxt applies"
SHAPE = [3, 32, 32]
KEY = "%08d"   # zero-padded, so that LMDB's byte order is the dataset's order
# why each recorded fact matters, for the error that finds it different
WHY = {
    "channel_order": "the prototxts' mean_value and the published weights expect BGR, as OpenCV imread gave it",
    "storage": "the Data layer applies transform_param itself, so transformed records would be transformed twice",
    "shape": "CIFAR-10 images are 3x32x32",
    "split": "a train LMDB read as test, or the reverse",
    "images": "it was converted from a different number of records",
    "source_sha256": "it was converted from other record files than the ones found now (stale)",
}
REDO = "recreate it with `caffe-prune data cifar10`"


def write_lmdb(path, images_rgb: np.ndarray, labels: np.ndarray, split: str, sources: dict,
               progress: bool = True) -> Path:
    """Write images (uint8 (N, 3, 32, 32), RGB as read from the binary release) as Datum records
    in BGR plane order, keys ``%08d``, then the metadata; built in ``PATH.partial`` and renamed, so
    an interrupted run never leaves a plausible-looking LMDB. `sources` maps record file names to
    their sha256 (cifar10.record_sha256)."""
    path = Path(path)
    images_rgb, labels = np.asarray(images_rgb), np.asarray(labels)
    if images_rgb.dtype != np.uint8 or list(images_rgb.shape[1:]) != SHAPE or len(labels) != len(images_rgb):
        raise DataError(f"{path}: cannot write {images_rgb.dtype}{images_rgb.shape} images with "
                        f"{len(labels)} labels; expected uint8 (N, 3, 32, 32) and N labels")
    datum = pycaffe.caffe_pb2().Datum(channels=SHAPE[0], height=SHAPE[1], width=SHAPE[2])
    bgr = images_rgb[:, ::-1]
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    # map_size is an upper bound, not an allocation: twice the payload leaves room for LMDB's pages
    env = lmdb.open(str(partial), map_size=2 * len(bgr) * (bgr[0].nbytes + 64) + (1 << 22))
    try:
        with tqdm(total=len(bgr), unit="img", desc=f"lmdb {split}", disable=not progress, leave=False) as bar:
            for start in range(0, len(bgr), 1000):
                with env.begin(write=True) as txn:
                    for i in range(start, min(start + 1000, len(bgr))):
                        datum.data = bgr[i].tobytes()
                        datum.label = int(labels[i])
                        txn.put((KEY % i).encode(), datum.SerializeToString())
                bar.update(min(1000, len(bgr) - start))
    finally:
        env.close()
    meta = {"written_by": "caffe-prune data cifar10", "format": "LMDB of caffe_pb2.Datum, keys " + KEY,
            "split": split, "images": len(bgr), "shape": SHAPE, "channel_order": CHANNEL_ORDER,
            "storage": STORAGE, "label_counts": np.bincount(labels, minlength=10).tolist(),
            "source_sha256": dict(sources)}
    fsio.write_json(partial / META, meta)
    with fsio.replacing(path) as tmp:          # the old LMDB stays until the new one is complete
        partial.rename(tmp)
    return path


def check_lmdb(path, split: str | None = None, images: int | None = None, sources: dict | None = None) -> dict:
    """The metadata of a CIFAR-10 LMDB, after checking it says BGR, untransformed uint8, 3x32x32,
    and as many records as the LMDB holds; and, when given, this split, this many images and these
    source files. Raises a one-line DataError naming what differs and why it matters."""
    path = Path(path)
    if not (path / "data.mdb").is_file():
        raise DataError(f"{path} is not an LMDB (no data.mdb); create it with `caffe-prune data cifar10`")
    meta_path = path / META
    if not meta_path.is_file():
        raise DataError(f"{path} has no {META}, so its channel order and transform are unknown and may "
                        f"not match the prototxt; {REDO}")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise DataError(f"{meta_path} is not JSON ({exc}); {REDO}") from None
    expected = {"channel_order": CHANNEL_ORDER, "storage": STORAGE, "shape": SHAPE,
                "split": split, "images": images, "source_sha256": sources}
    for key, want in expected.items():
        have = meta.get(key) if isinstance(meta, dict) else None
        if want is not None and have != want:
            shown = "" if key == "source_sha256" else f" {have!r}, not {want!r}"
            raise DataError(f"{meta_path} records {key}{shown}: {WHY[key]}; {REDO}")
    try:
        with lmdb.open(str(path), readonly=True, lock=False) as env:
            entries = env.stat()["entries"]
    except lmdb.Error as exc:
        raise DataError(f"{path}: LMDB cannot be opened ({exc}); {REDO}") from None
    if entries != meta.get("images"):
        raise DataError(f"{meta_path} records {meta.get('images')} images but the LMDB holds {entries}; {REDO}")
    return meta


def check_data_layers(net_param, prototxt) -> None:
    """check_lmdb on the source of every LMDB ``Data`` layer of a net, so that a prototxt is never
    trained or scored on records whose channel order or transform differ from what it assumes.
    Sources are relative to the working directory, as for Caffe."""
    lmdb_backend = pycaffe.caffe_pb2().DataParameter.LMDB
    for layer in net_param.layer:
        if layers.reader(layer) == "db" and layer.data_param.backend == lmdb_backend:
            try:
                check_lmdb(layer.data_param.source)
            except DataError as exc:
                raise DataError(f"{prototxt}: layer {layer.name!r}: {exc}") from None

"""CIFAR-10 converted for Caffe: the network's input in memory (``caffe_input``) and the LMDBs
Caffe's own ``Data`` layer reads (``write_lmdb``, ``check_lmdb``, ``prepare``).

The authors wrote every image to a PNG and read it back with Caffe's ImageData layer, which decodes
with OpenCV's ``imread``: pixels arrive in **BGR** order, then Caffe's DataTransformer computes
``(pixel - mean_value[c]) * scale``. The official binary release stores R, G, B planes, so the
conversion reverses the plane order. Feeding RGB instead costs the published models 9 to 25 points
of top-1 (measured): the order is load-bearing and pinned by a test.

The Data layer applies the reading prototxt's ``transform_param`` natively (``(pixel -
mean_value[c]) * scale``, mirror in TRAIN), so the records hold untransformed uint8 pixels. Nothing
inside an LMDB says which order or transform it holds, and a wrong one trains and scores silently
worse. So each LMDB carries ``caffe-prune.json`` beside its ``data.mdb``, and :func:`check_lmdb`
refuses one that lacks it or records anything else.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import lmdb
import numpy as np
from tqdm import tqdm

from caffe_prune import fsio, layers, pycaffe
from caffe_prune.data.cifar10 import (CACHE_DIR, OFFICIAL_COUNTS, SPLIT_FILES, binary_dir, fetch, read_split,
                                      record_sha256, summary)
from caffe_prune.data.validation import VAL_FILE, load_validation_indices, save_validation_indices, validation_indices
from caffe_prune.data import lmdb_meta
from caffe_prune.errors import DataError

def caffe_input(images_rgb: np.ndarray, mean_values=(), scale: float = 1.0, order: str = "bgr") -> np.ndarray:
    """What ImageData + transform_param hand the net for these images: BGR (``order`` "rgb": the
    release's planes, as convert_cifar_data's LMDB holds them), minus mean, times scale.

    ``mean_values`` follows Caffe: none, one for all channels, or one per channel (in that order)."""
    planes = (images_rgb[:, ::-1] if order == "bgr" else images_rgb).astype(np.float32)
    mean = np.asarray(mean_values, dtype=np.float32)
    if mean.size not in (0, 1, 3):
        raise DataError(f"transform_param has {mean.size} mean_value entries; Caffe accepts 1 or one per channel")
    if mean.size:
        planes -= mean.reshape(1, -1, 1, 1) if mean.size == 3 else mean
    return planes * np.float32(scale)


META = "caffe-prune.json"
# the two layouts `caffe-prune data cifar10` writes: the authors' (BGR planes, as OpenCV's imread gave
# their ImageData layer; the six built-in networks), and Caffe's own example's (convert_cifar_data:
# the release's RGB planes, keys format_int(i, 5), LMDBs named as create_cifar10.sh makes them, and
# mean.binaryproto as compute_image_mean writes it)
LAYOUTS = {"bgr": {"lmdb": "cifar10-{split}-lmdb", "key": "%08d", "order": "BGR"},
           "rgb": {"lmdb": "cifar10_{split}_lmdb", "key": "%05d", "order": "RGB"}}
MEAN_FILE = "mean.binaryproto"
STORAGE = "uint8, untransformed: transform_param of the reading prototxt applies"
SHAPE = [3, 32, 32]
# why each recorded fact matters, for the error that finds it different
WHY = {
    "channel_order": "a net fed another plane order than it was trained on scores silently worse (the built-in "
                     "nets' weights expect BGR, as OpenCV imread gave it; Caffe's own CIFAR-10 example wrote RGB)",
    "storage": "the Data layer applies transform_param itself, so transformed records would be transformed twice",
    "shape": "CIFAR-10 images are 3x32x32",
    "split": "a train LMDB read as test, or the reverse",
    "images": "it was converted from a different number of records",
    "source_sha256": "it was converted from other record files than the ones found now (stale)",
}
REDO = "recreate it with `caffe-prune data cifar10`"


def lmdb_name(order: str, split: str) -> str:
    """The directory name of a split's LMDB in a layout (``LAYOUTS``)."""
    return LAYOUTS[order]["lmdb"].format(split=split)


def order_named(name: str) -> str | None:
    """The layout whose LMDB of some split is called ``name``, or None."""
    return next((order for order in LAYOUTS for split in SPLIT_FILES if lmdb_name(order, split) == name), None)


def write_lmdb(path, images_rgb: np.ndarray, labels: np.ndarray, split: str, sources: dict,
               progress: bool = True, order: str = "bgr") -> Path:
    """Write images (uint8 (N, 3, 32, 32), RGB as read from the binary release) as Datum records in
    the plane order and with the keys of ``LAYOUTS[order]`` (zero-padded: LMDB's byte order is the
    dataset's), then the metadata; built in ``PATH.partial`` and renamed, so an interrupted run
    never leaves a plausible-looking LMDB. `sources` maps record file names to their sha256
    (cifar10.record_sha256)."""
    layout = LAYOUTS[order]
    path = Path(path)
    images_rgb, labels = np.asarray(images_rgb), np.asarray(labels)
    if images_rgb.dtype != np.uint8 or list(images_rgb.shape[1:]) != SHAPE or len(labels) != len(images_rgb):
        raise DataError(f"{path}: cannot write {images_rgb.dtype}{images_rgb.shape} images with "
                        f"{len(labels)} labels; expected uint8 (N, 3, 32, 32) and N labels")
    datum = pycaffe.caffe_pb2().Datum(channels=SHAPE[0], height=SHAPE[1], width=SHAPE[2])
    planes = images_rgb[:, ::-1] if order == "bgr" else images_rgb       # the planes as written
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    # map_size is an upper bound, not an allocation: twice the payload leaves room for LMDB's pages
    env = lmdb.open(str(partial), map_size=2 * len(planes) * (planes[0].nbytes + 64) + (1 << 22))
    try:
        with tqdm(total=len(planes), unit="img", desc=f"lmdb {split}", disable=not progress, leave=False) as bar:
            for start in range(0, len(planes), 1000):
                with env.begin(write=True) as txn:
                    for i in range(start, min(start + 1000, len(planes))):
                        datum.data = planes[i].tobytes()
                        datum.label = int(labels[i])
                        txn.put((layout["key"] % i).encode(), datum.SerializeToString())
                bar.update(min(1000, len(planes) - start))
    finally:
        env.close()
    meta = {"written_by": "caffe-prune data cifar10", "format": "LMDB of caffe_pb2.Datum, keys " + layout["key"],
            "split": split, "images": len(planes), "shape": SHAPE, "channel_order": layout["order"],
            "storage": STORAGE, "label_counts": np.bincount(labels, minlength=10).tolist(),
            "source_sha256": dict(sources)}
    fsio.write_json(partial / META, meta)
    with fsio.replacing(path) as tmp:          # the old LMDB stays until the new one is complete
        partial.rename(tmp)
    return path


def check_lmdb(path, split: str | None = None, images: int | None = None, sources: dict | None = None,
               order: str | None = "bgr") -> dict:
    """The metadata of a CIFAR-10 LMDB, after checking it says this channel ``order`` (None: either),
    untransformed uint8, 3x32x32, and as many records as the LMDB holds; and, when given, this
    split, this many images and these source files. Raises a one-line DataError naming what differs
    and why it matters."""
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
    expected = {"channel_order": LAYOUTS[order]["order"] if order else None, "storage": STORAGE, "shape": SHAPE,
                "split": split, "images": images, "source_sha256": sources}
    for key, want in expected.items():
        have = meta.get(key) if isinstance(meta, dict) else None
        if want is not None and have != want:
            shown = "" if key == "source_sha256" else f" {have!r}, not {want!r}"
            raise DataError(f"{meta_path} records {key}{shown}: {WHY[key]}; {REDO}")
    lmdb_meta.check(path, "the CIFAR-10 LMDB")   # Caffe's reads of a truncated data.mdb fault (SIGBUS)
    try:
        with lmdb.open(str(path), readonly=True, lock=False) as env:
            entries = env.stat()["entries"]
    except lmdb.Error as exc:
        raise DataError(f"{path}: LMDB cannot be opened ({exc}); {REDO}") from None
    if entries != meta.get("images"):
        raise DataError(f"{meta_path} records {meta.get('images')} images but the LMDB holds {entries}; {REDO}")
    return meta


def check_data_layers(net_param, prototxt, recorded_only: bool = False) -> str | None:
    """check_lmdb on the source of every LMDB ``Data`` layer of a net (``recorded_only``: of those
    holding this module's metadata; LMDBs of other tools are the user's), so that a prototxt is never
    trained or scored on records whose transform differs from what it assumes, nor trained on one
    channel order and tested on the other. Returns the channel order they share ("BGR", "RGB"; None
    without such layers). Sources are relative to the working directory, as for Caffe."""
    lmdb_backend = pycaffe.caffe_pb2().DataParameter.LMDB
    orders = []                       # (layer, order): a TRAIN and a TEST layer may share a name
    for layer in net_param.layer:
        if layers.reader(layer) == "db" and layer.data_param.backend == lmdb_backend and \
                not (recorded_only and not (Path(layer.data_param.source) / META).is_file()):
            try:
                orders.append((layer.name, check_lmdb(layer.data_param.source, order=None)["channel_order"]))
            except DataError as exc:
                raise DataError(f"{prototxt}: layer {layer.name!r}: {exc}") from None
    if len({order for _, order in orders}) > 1:
        shown = ", ".join(f"{name!r} reads {order}" for name, order in orders)
        raise DataError(f"{prototxt}: its data layers read different channel orders ({shown}): "
                        f"{WHY['channel_order']}; {REDO} with one --channel-order")
    return orders[0][1] if orders else None


def prepare(source=None, out_dir=None, seed: int = 0, cache_dir=None, progress: bool = True,
            order: str = "bgr") -> dict:
    """Fetch CIFAR-10 (see fetch) and write, in `out_dir` (default: the cache), what training and
    pruning read: the train and test LMDBs for Caffe's Data layer in the layout of ``order``
    (``LAYOUTS``: "bgr" ``cifar10-{train,test}-lmdb``, the authors'; "rgb" ``cifar10_{train,test}_lmdb``
    and ``mean.binaryproto``, exactly what Caffe's examples/cifar10/create_cifar10.sh makes), and
    ``val-indices.txt``. Whatever is already there and checks out against the records found is
    kept, so a second run only hashes the record files."""
    if order not in LAYOUTS:
        raise DataError(f"--channel-order must be one of {', '.join(LAYOUTS)}, got {order!r}")
    out = Path(out_dir) if out_dir is not None else CACHE_DIR
    root = fetch(source, cache_dir, progress=progress)
    counts = summary(root)
    result = {"source": str(binary_dir(root)), "counts": counts, "official": dict(OFFICIAL_COUNTS),
              "paths": {}, "actions": {}, "channel_order": order}
    for split in SPLIT_FILES:
        path = out / lmdb_name(order, split)
        sources = record_sha256(split, root)
        try:
            check_lmdb(path, split=split, images=counts[split], sources=sources, order=order)
            action = "kept"
        except DataError:
            images, labels = read_split(split, root)
            write_lmdb(path, images, labels, split, sources, progress, order)
            action = "written"
        result["paths"][split], result["actions"][split] = str(path), action
    if order == "rgb":           # the mean of the training records: kept while they are
        mean = out / MEAN_FILE
        if result["actions"]["train"] == "kept" and mean.is_file():
            result["actions"]["mean"] = "kept"
        else:
            write_mean(mean, read_split("train", root)[0])
            result["actions"]["mean"] = "written"
        result["paths"]["mean"] = str(mean)
    val_path = out / VAL_FILE
    try:
        indices = load_validation_indices(val_path, seed=seed, n_train=counts["train"])
        action = "kept"
    except DataError:
        indices = validation_indices(counts["train"], seed)
        save_validation_indices(val_path, indices, counts["train"], seed)
        action = "written"
    result["paths"]["validation"], result["actions"]["validation"] = str(val_path), action
    result.update(validation=len(indices), seed=seed)
    return result


def write_mean(path, images: np.ndarray) -> Path:
    """The per-pixel mean of ``images`` (uint8 (N, C, H, W), the planes as stored) as Caffe's
    compute_image_mean writes it: a BlobProto (1, C, H, W) of float32 sums divided by the count (the
    sums of uint8 are exact in float32 up to 65,793 images of 255, as CIFAR-10's 50,000 are)."""
    images = np.asarray(images)
    blob = pycaffe.caffe_pb2().BlobProto(num=1, channels=images.shape[1], height=images.shape[2],
                                        width=images.shape[3])
    mean = images.sum(axis=0, dtype=np.int64).astype(np.float32) / np.float32(len(images))
    blob.data.extend(mean.ravel())
    return fsio.write_bytes(path, blob.SerializeToString())

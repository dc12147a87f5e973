"""Synthetic data sets of any size for timing and memory measurements: an LMDB of random Datums.

``write_random_lmdb(path, images, shape, classes, seed)`` writes ``images`` unencoded uint8 Datums
of ``shape`` (C, H, W; 3x256x256 is an ImageNet-style LMDB, which networks crop to 227 or 224) with
labels 0..classes-1, keys ``%08d`` in order, pixels and labels from numpy's default_rng(seed): the
same arguments give the same bytes. It is written a thousand records per transaction into
``PATH.partial`` and renamed into place, so memory stays at one chunk and an interrupted run never
leaves a plausible-looking LMDB. What a pruning measurement reads from it is what Caffe's Data
layer would (caffe_prune.data.layer_records); nothing in it is a real image, so only times and memory mean
anything.

Disk space: ``bytes_needed`` estimates the file from LMDB's page arithmetic (a value over LMDB's
node limit takes whole overflow pages, its key a leaf node; leaves nearly full: the keys come in order), and a
filesystem with less free space is refused before anything is written; a write that fails anyway
(liblmdb reports a full tmpfs as "Input/output error" at commit) removes the partial LMDB and is one
line naming the path, the bytes needed and the bytes free.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from caffe_prune import fsio, pycaffe
from caffe_prune.errors import DataError

CHUNK = 1000
PAGE = 4096
NODE_MAX = ((PAGE - 16) // 2 & -2) - 2      # lmdb's me_nodemax: a larger node goes to overflow pages


def bytes_needed(images: int, value_bytes: int, key_bytes: int = 8) -> int:
    """About the size of an LMDB of ``images`` values of ``value_bytes`` written in key order
    (measured: 300 Datums of 3x32x32 take 305 pages, this says 306; 600 of 3x8x8, 39 and 44):
    overflow pages for values beyond NODE_MAX, leaf pages 80% full (liblmdb splits a page where an
    append lands, so in-order keys fill them), the two meta pages and a branch page."""
    if key_bytes + value_bytes + 8 > NODE_MAX:
        per_image, leaf = math.ceil((value_bytes + 16) / PAGE) * PAGE, key_bytes + 8 + 8 + 2
    else:
        per_image, leaf = 0, key_bytes + value_bytes + 8 + 2
    return images * per_image + math.ceil(1.25 * images * leaf / PAGE) * PAGE + 3 * PAGE


def _free_bytes(directory: Path) -> int:
    """What the filesystem of ``directory`` still gives an unprivileged writer."""
    return shutil.disk_usage(directory).free


def _no_space(path: Path, needed: int, free: int, why: str) -> DataError:
    return DataError(f"{path}: {why}: the LMDB needs about {needed:,} bytes and its filesystem has {free:,} free; "
                     f"free space there or write it elsewhere")


def write_random_lmdb(path, images: int, shape=(3, 256, 256), classes: int = 1000, seed: int = 0,
                      progress: bool = True) -> dict:
    """Write the LMDB (see the module docstring); returns what was written."""
    import lmdb
    path = Path(path)
    shape = tuple(int(d) for d in shape)
    if images < 1 or classes < 1 or len(shape) != 3 or min(shape) < 1:
        raise DataError(f"{path}: {images} images of shape {shape} with {classes} classes: give at least one "
                        f"image, one class and a shape C,H,W of positive sizes")
    size = int(np.prod(shape))
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    rng = np.random.default_rng(seed)
    datum = pycaffe.caffe_pb2().Datum(channels=shape[0], height=shape[1], width=shape[2])
    datum.data, datum.label = bytes(size), classes - 1          # the largest record: its size bounds them all
    needed = bytes_needed(images, datum.ByteSize())
    partial.parent.mkdir(parents=True, exist_ok=True)
    if needed > _free_bytes(partial.parent):
        raise _no_space(path, needed, _free_bytes(partial.parent), f"{images:,} Datums of {'x'.join(map(str, shape))}")
    partial.mkdir()
    # map_size bounds the file, it allocates nothing: a value larger than a page takes whole overflow
    # pages, so each record is rounded up to pages and given one more for its key and header
    page = 4096
    try:
        env = lmdb.open(str(partial), map_size=images * page * (-(-(size + 64) // page) + 1) + (1 << 26))
    except lmdb.Error as exc:      # its lock file and first pages did not fit
        shutil.rmtree(partial, ignore_errors=True)
        raise _no_space(path, needed, _free_bytes(partial.parent), f"creating it failed ({exc})") from None
    try:
        with tqdm(total=images, unit="img", desc=f"lmdb {path.name}", disable=not progress, leave=False) as bar:
            for start in range(0, images, CHUNK):
                count = min(CHUNK, images - start)
                pixels = rng.integers(0, 256, size=(count, size), dtype=np.uint8)
                labels = rng.integers(0, classes, size=count)
                with env.begin(write=True) as txn:
                    for i in range(count):
                        datum.data, datum.label = pixels[i].tobytes(), int(labels[i])
                        txn.put(b"%08d" % (start + i), datum.SerializeToString())
                bar.update(count)
    except BaseException as exc:
        env.close()
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, lmdb.Error) and not isinstance(exc, lmdb.MapFullError):   # a full disk: EIO or ENOSPC
            raise _no_space(path, needed, _free_bytes(partial.parent), f"writing it failed ({exc})") from None
        raise
    env.close()
    with fsio.replacing(path) as tmp:
        partial.rename(tmp)
    return {"path": str(path), "images": images, "shape": list(shape), "classes": classes, "seed": seed,
            "bytes": sum(f.stat().st_size for f in path.iterdir())}

"""Synthetic data sets of any size for timing and memory measurements: an LMDB of random Datums.

``write_random_lmdb(path, images, shape, classes, seed)`` writes ``images`` unencoded uint8 Datums
of ``shape`` (C, H, W; 3x256x256 is an ImageNet-style LMDB, which networks crop to 227 or 224) with
labels 0..classes-1, keys ``%08d`` in order, pixels and labels from numpy's default_rng(seed): the
same arguments give the same bytes. It is written a thousand records per transaction into
``PATH.partial`` and renamed into place, so memory stays at one chunk and an interrupted run never
leaves a plausible-looking LMDB. What a pruning measurement reads from it is what Caffe's Data
layer would (caffe_prune.data.layer_records); nothing in it is a real image, so only times and memory mean
anything.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from caffe_prune import fsio, pycaffe
from caffe_prune.errors import DataError

CHUNK = 1000


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
    partial.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    datum = pycaffe.caffe_pb2().Datum(channels=shape[0], height=shape[1], width=shape[2])
    # map_size bounds the file, it allocates nothing: a value larger than a page takes whole overflow
    # pages, so each record is rounded up to pages and given one more for its key and header
    page = 4096
    env = lmdb.open(str(partial), map_size=images * page * (-(-(size + 64) // page) + 1) + (1 << 26))
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
    except BaseException:
        env.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    env.close()
    with fsio.replacing(path) as tmp:
        partial.rename(tmp)
    return {"path": str(path), "images": images, "shape": list(shape), "classes": classes, "seed": seed,
            "bytes": sum(f.stat().st_size for f in path.iterdir())}

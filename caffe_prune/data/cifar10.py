"""CIFAR-10 exactly as the original experiments fed it to Caffe.

The authors wrote every image to a PNG and read it back with Caffe's ImageData layer, which decodes
with OpenCV's ``imread``: pixels arrive in **BGR** order, then Caffe's DataTransformer computes
``(pixel - mean_value[c]) * scale``. The official binary release stores each record as one label
byte followed by the R, G and B planes (32x32 each), so the conversion below reverses the plane order.
Feeding RGB instead costs the published models 9 to 25 points of top-1 (measured): the order is
load-bearing and pinned by a test.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

RECORD_BYTES = 1 + 3 * 32 * 32
SPLIT_FILES = {
    "train": [f"data_batch_{i}.bin" for i in range(1, 6)],
    "test": ["test_batch.bin"],
}
BIN_DIR = "cifar-10-batches-bin"
DATA_ENV = "CAFFE_PRUNE_DATA"
# this workplace's real subset of CIFAR-10 (5085 train / 1017 test), used when present
WORKPLACE_SUBSET = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10-subset"


class DataError(ValueError):
    """Missing, corrupt or mismatched data; the message is one line naming the file."""


def default_location() -> Path | None:
    """Where CIFAR-10 is looked for when no location is given: $CAFFE_PRUNE_DATA, then this
    workplace's ../shared subset, then the user cache that a download fills."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    if (WORKPLACE_SUBSET / BIN_DIR).is_dir():
        return WORKPLACE_SUBSET
    return Path.home() / ".cache" / "caffe-prune" / "data" / "cifar10"


def binary_dir(location=None) -> Path:
    """The directory holding the official binary batches, given it or its parent."""
    root = Path(location) if location is not None else default_location()
    for candidate in (root / BIN_DIR, root):
        if (candidate / SPLIT_FILES["test"][0]).is_file():
            return candidate
    raise DataError(f"no CIFAR-10 binary batches in {root} (expected {root / BIN_DIR}/test_batch.bin); "
                    f"pass --data DIR, set {DATA_ENV}, or fetch it with `caffe-prune data cifar10`")


def read_split(split: str, location=None):
    """Read all records of a split: images as uint8 (N, 3, 32, 32) in the file's RGB order, labels int64.

    A directory may hold fewer records than the official release; a file whose size is not a whole
    number of records is corrupt and rejected."""
    if split not in SPLIT_FILES:
        raise DataError(f"split {split!r} is not one of {sorted(SPLIT_FILES)}")
    directory = binary_dir(location)
    chunks = []
    for name in SPLIT_FILES[split]:
        path = directory / name
        if not path.is_file():
            raise DataError(f"{path} is missing from the CIFAR-10 directory {directory}")
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % RECORD_BYTES:
            raise DataError(f"{path} has {raw.size} bytes, not a whole number of {RECORD_BYTES}-byte "
                            f"records: the file is truncated or corrupt; fetch it again")
        chunks.append(raw.reshape(-1, RECORD_BYTES))
    records = np.concatenate(chunks)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{directory}: label {labels.max()} out of range 0..9: not CIFAR-10 binary records")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def caffe_input(images_rgb: np.ndarray, mean_values=(), scale: float = 1.0) -> np.ndarray:
    """What ImageData + transform_param hand the net for these images: BGR, minus mean, times scale.

    ``mean_values`` follows Caffe: none, one for all channels, or one per (BGR) channel."""
    bgr = images_rgb[:, ::-1].astype(np.float32)
    mean = np.asarray(mean_values, dtype=np.float32)
    if mean.size not in (0, 1, 3):
        raise DataError(f"transform_param has {mean.size} mean_value entries; Caffe accepts 1 or one per channel")
    if mean.size:
        bgr -= mean.reshape(1, -1, 1, 1) if mean.size == 3 else mean
    return bgr * np.float32(scale)

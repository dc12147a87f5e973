"""Caffe's ``DataTransformer`` in the TEST phase, in numpy, bit for bit.

A data layer's ``transform_param`` turns each record (uint8 pixels, or a Datum's ``float_data``)
into what the net sees. ``data_transformer.cpp`` does, per element and in float32::

    crop:  h_off = (H - crop_size) / 2, w_off likewise        (TEST: the centre; TRAIN: random)
    mean_file:   (x[c, h_off+h, w_off+w] - mean[c, h_off+h, w_off+w]) * scale
    mean_value:  (x[c, h_off+h, w_off+w] - mean_value[c]) * scale
    neither:      x[c, h_off+h, w_off+w] * scale

So the mean image is the full-size one and is subtracted at the cropped positions, the mean
comes before the scale, and ``scale`` multiplies even when it is 1 (exact). One ``mean_value``
serves every channel; otherwise there must be exactly one per channel. :class:`Transform`
repeats this with the same float32 operations, so its output equals Caffe's top blob element
for element (tests/test_caffe_reading.py compares them on every kind of data layer).

``mirror`` is recorded but never applied. Caffe flips at random wherever ``mirror: true`` is set,
*the TEST phase included* (``do_mirror = mirror() && Rand(2)`` has no phase test), so a TEST layer
with mirror on is not reproducible by anyone; :meth:`Transform.apply` is what such a layer gives
for the images its coin leaves unflipped, and what a layer without mirror gives for all.

Every condition on which Caffe's transformer CHECK-fails (and aborts the interpreter) is a
one-line :class:`~caffe_prune.errors.DataError` here, naming the layer or file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from caffe_prune import layers, pycaffe
from caffe_prune.errors import DataError


def read_mean_file(path, where: str) -> np.ndarray:
    """The mean image of a binaryproto ``BlobProto`` as Caffe's transformer reads it: float32
    (channels, height, width) of the blob's legacy 4-axis view (num, channels, height, width).
    A 4-axis (1, C, H, W) blob (what ``compute_image_mean`` writes) gives (C, H, W); with num > 1
    the first image is the one Caffe uses. A blob of fewer axes is refused here: Blob::LegacyShape
    pads it with 1s at the end, so Caffe would read a (C, H, W) blob as channels=H, height=W,
    width=1 and abort at the first record. ``double_data`` is rounded to float, as Blob::FromProto does."""
    from google.protobuf.message import DecodeError
    path = Path(path)
    what = f"{where}: mean_file {path}"
    if not path.is_file():
        raise DataError(f"{what} does not exist (paths are relative to the working directory); "
                        f"write it with Caffe's compute_image_mean or use mean_value")
    blob = pycaffe.caffe_pb2().BlobProto()
    try:
        blob.ParseFromString(path.read_bytes())
    except (DecodeError, OSError) as exc:
        raise DataError(f"{what} is not a binaryproto BlobProto ({exc}); "
                        f"write it with Caffe's compute_image_mean") from None
    legacy = any(blob.HasField(f) for f in ("num", "channels", "height", "width"))
    shape = (blob.num, blob.channels, blob.height, blob.width) if legacy else tuple(blob.shape.dim)
    values = blob.double_data if len(blob.double_data) else blob.data
    count = int(np.prod(shape, dtype=np.int64))
    if len(shape) > 4 or count <= 0 or len(values) != count or min(shape, default=1) < 0 \
            or len(blob.diff) not in (0, count) or len(blob.double_diff) not in (0, count):
        raise DataError(f"{what} is not a mean image: a BlobProto of shape {shape} holding "
                        f"{len(values)} values; write it with Caffe's compute_image_mean")
    num, channels, height, width = tuple(shape) + (1,) * (4 - len(shape))
    if len(shape) != 4:   # Caffe would take it, then abort at the first record it fits no image
        raise DataError(f"{what} holds a blob of shape {shape}, which Caffe reads as num x channels x height "
                        f"x width = {num}x{channels}x{height}x{width}; write the mean as (1, C, H, W)")
    mean = np.asarray(values, dtype=np.float64 if len(blob.double_data) else np.float32)
    mean = mean.astype(np.float32)[:channels * height * width].reshape(channels, height, width)
    mean.setflags(write=False)
    return mean


@dataclass(frozen=True)
class Transform:
    """A data layer's ``transform_param`` (TEST phase). Build it with :meth:`of` or
    :meth:`from_param`, which read the mean file and refuse what Caffe refuses at layer setup."""
    scale: float = 1.0
    mean_values: tuple = ()
    mean: np.ndarray | None = field(default=None, compare=False, repr=False)
    mean_file: str = ""                 # where `mean` came from, for messages ("" when none)
    crop_size: int = 0                  # 0: no crop
    mirror: bool = False                # recorded; never applied (see the module docstring)
    force_color: bool = False           # decoding of encoded Datums (layer_records.read), not here
    force_gray: bool = False
    where: str = field(default="transform_param", compare=False)

    @classmethod
    def of(cls, layer_param, where: str | None = None) -> "Transform":
        """The transform of a data LayerParameter (Data, ImageData, HDF5Data, ...). HDF5Data
        applies none, and Caffe aborts on an HDF5Data layer that has a transform_param."""
        where = where or f"layer {layer_param.name!r}"
        if not layers.transforms(layer_param):      # HDF5Data: no transform, and none accepted
            if layer_param.HasField("transform_param"):
                raise DataError(f"{where}: {layer_param.type} does not transform data and Caffe refuses its "
                                f"transform_param; remove it and store the data transformed")
            return cls(where=where)
        return cls.from_param(layer_param.transform_param, where)

    @classmethod
    def from_fields(cls, fields: dict | None) -> "Transform | None":
        """From the transform flags as plain data ({scale, mean_value, mean_file, crop_size}, what a
        run's configuration records); None when none was given."""
        if not fields:
            return None
        tp = pycaffe.caffe_pb2().TransformationParameter()
        for key, value in fields.items():
            if key == "mean_value":
                tp.mean_value.extend(value)
            elif key == "crop_size" and value < 0:
                raise DataError(f"--crop-size {value} must be at least 0")
            else:
                setattr(tp, key, value)
        return cls.from_param(tp, "the command line's transform")

    @classmethod
    def from_param(cls, tp, where: str) -> "Transform":
        """From a TransformationParameter message; `where` names the layer or file in errors."""
        if tp.HasField("mean_file") and len(tp.mean_value):
            raise DataError(f"{where}: transform_param has both mean_file and mean_value, which "
                            f"Caffe refuses; keep one")
        if tp.crop_size < 0:
            raise DataError(f"{where}: transform_param crop_size {tp.crop_size} is negative")
        mean = read_mean_file(tp.mean_file, where) if tp.HasField("mean_file") else None
        return cls(scale=float(tp.scale), mean_values=tuple(float(v) for v in tp.mean_value),
                   mean=mean, mean_file=tp.mean_file if tp.HasField("mean_file") else "",
                   crop_size=int(tp.crop_size), mirror=bool(tp.mirror), force_color=bool(tp.force_color),
                   force_gray=bool(tp.force_gray), where=where)

    @property
    def is_identity(self) -> bool:
        return not self.crop_size and self.mean is None and not self.mean_values and \
            np.float32(self.scale) == 1

    def output_shape(self, shape) -> tuple:
        """(C, h, w) that a (C, H, W) record becomes, after the checks Caffe makes on it."""
        channels, height, width = (int(d) for d in shape)
        if self.crop_size and (height < self.crop_size or width < self.crop_size):
            raise DataError(f"{self.where}: crop_size {self.crop_size} is larger than the "
                            f"{height}x{width} images; lower crop_size")
        if len(self.mean_values) not in (0, 1, channels):
            raise DataError(f"{self.where}: transform_param has {len(self.mean_values)} mean_value "
                            f"entries for {channels}-channel images; give 1 or {channels}")
        if self.mean is not None and self.mean.shape != (channels, height, width):
            c, h, w = self.mean.shape
            raise DataError(f"{self.where}: mean_file {self.mean_file} holds a {c}x{h}x{w} mean, the "
                            f"records are {channels}x{height}x{width} (the mean is of the uncropped "
                            f"images); compute it from these records with compute_image_mean, or give this phase's "
                            f"mean with --mean-file (test images) or --val-mean-file (validation images)")
        if self.crop_size:
            return channels, self.crop_size, self.crop_size
        return channels, height, width

    def apply(self, raw) -> np.ndarray:
        """What Caffe's TEST-phase data layer puts in its top blob for these records: float32
        (N, C, h, w). `raw` is a uint8 or float32 (N, C, H, W) array, or a list of (C, H, W)
        arrays; records of different H, W need crop_size (Caffe stacks them only once cropped)."""
        if isinstance(raw, (list, tuple)):
            records = [self._checked_dtype(np.asarray(r)) for r in raw]
            shapes = {r.shape for r in records}
            if not records:
                return np.zeros((0, 0, 0, 0), np.float32)
            if len(shapes) == 1:
                raw = np.stack(records)
            else:
                if any(len(s) != 3 for s in shapes):
                    raise DataError(f"{self.where}: records must be (C, H, W) arrays, got shapes "
                                    f"{sorted(shapes)[:3]}")
                if not self.crop_size or len({s[0] for s in shapes}) > 1:
                    first, other = records[0].shape, next(r.shape for r in records if r.shape != records[0].shape)
                    why = "crop_size would bring them to one size" if not self.crop_size else \
                        "channels must agree even with crop_size"
                    raise DataError(f"{self.where}: records differ in shape ({first} and {other}); "
                                    f"Caffe aborts on such a batch ({why})")
                return np.stack([self.apply(r[None])[0] for r in records])
        raw = self._checked_dtype(np.asarray(raw))
        if raw.ndim != 4:
            if self.is_identity and raw.ndim >= 1:   # HDF5Data: any shape, no transform
                return raw.astype(np.float32)
            raise DataError(f"{self.where}: records must be an (N, C, H, W) array, got shape {raw.shape}")
        _, height, width = raw.shape[1:]
        channels, out_h, out_w = self.output_shape(raw.shape[1:])
        h_off, w_off = (height - out_h) // 2, (width - out_w) // 2
        window = (slice(None), slice(h_off, h_off + out_h), slice(w_off, w_off + out_w))
        x = raw[(slice(None),) + window].astype(np.float32)
        if self.mean is not None:
            x -= self.mean[window]
        elif self.mean_values:
            x -= np.broadcast_to(np.asarray(self.mean_values, np.float32), (channels,))[:, None, None]
        x *= np.float32(self.scale)
        return x

    def _checked_dtype(self, array: np.ndarray) -> np.ndarray:
        if array.dtype not in (np.uint8, np.float32):
            raise DataError(f"{self.where}: records are {array.dtype}; Caffe's records are uint8 "
                            f"pixels or float32 float_data")
        return array

"""How Caffe's data layers read their records, before the transform: what every reader shares
(caffe_prune.data.layer_records reads through it): :class:`Records`, Caffe's own decoding in a forked
child, the rule on records of differing shapes, the image list's syntax.

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
(as pycaffe.probe_construct does), so that an image OpenCV cannot decode becomes a one-line
:class:`~caffe_prune.errors.DataError` carrying glog's message, never an abort.
"""
from __future__ import annotations

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

from caffe_prune import pycaffe
from caffe_prune.errors import DataError

WHERE_PATHS = "paths are relative to the working directory"


class Records(NamedTuple):
    """What a data layer reads, untransformed: images is an (N, C, H, W) array (uint8 pixels;
    float32 for float_data Datums and HDF5), or a list of (C, H, W) arrays when their shapes
    differ (allowed with crop_size only); labels is an (N,) int64 array (HDF5: the label dataset
    as float32, or None for a layer with one top)."""
    images: np.ndarray | list
    labels: np.ndarray | None


# ---- checks shared by the readers ----------------------------------------------------------------

def _stack(records, crop_size: int, where: str, decoded: bool = False, positions=None, first=None):
    """One (N, C, H, W) array, or the list when shapes differ and crop_size brings them to one
    (Caffe's Data and ImageData layers abort on a batch of differing shapes otherwise).
    `positions` name the records in messages (default 0, 1, ...); `first` is (shape, position) of
    the record an earlier chunk of the same pass began with, so that a pass read in chunks follows
    the rule as one read of all its records would."""
    positions = range(len(records)) if positions is None else positions
    shapes = [records.shape[1:]] * len(records) if isinstance(records, np.ndarray) else [r.shape for r in records]
    first_shape, first_position = first if first is not None else (shapes[0], positions[0])
    odd = next((i for i, shape in enumerate(shapes) if shape != first_shape), None)
    if odd is None:
        return records if isinstance(records, np.ndarray) else np.stack(records)
    note = " (encoded images, decoded by Caffe to check)" if decoded else ""
    shown = f"{'x'.join(map(str, first_shape))} (record {first_position}) and " \
            f"{'x'.join(map(str, shapes[odd]))} (record {positions[odd]})"
    if shapes[odd][0] != first_shape[0]:
        raise DataError(f"{where}: records differ in channels: {shown}{note}; Caffe aborts on a batch "
                        f"that mixes them")
    if not crop_size:
        raise DataError(f"{where}: records differ in shape: {shown}{note}; Caffe aborts on a batch of "
                        f"differing shapes unless transform_param crop_size brings them to one")
    if isinstance(records, np.ndarray) or len(set(shapes)) == 1:
        return records if isinstance(records, np.ndarray) else np.stack(records)   # one shape, not the first chunk's
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
    net_param = pycaffe.caffe_pb2().NetParameter(name="caffe-prune-read")
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
                pycaffe.caffe().set_mode_cpu()
                net = pycaffe.net_from_param(net_param, probe=False)
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


# ---- ImageData: a list of image files ------------------------------------------------------------

_ATOI = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)")


def _atoi(text: str) -> int:
    """C's atoi: leading white space, a sign, digits; 0 when there are none."""
    found = _ATOI.match(text)
    return int(found.group(1)) if found else 0


def parse_image_list(text: str) -> list[tuple[str, int]]:
    """(path, label) per line as ImageDataLayer parses its source (see parse_image_line)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()   # std::getline yields no line after the final newline
    return [parse_image_line(line) for line in lines]


def parse_image_line(line: str) -> tuple[str, int]:
    """(path, label) of one line of an image list: the label is atoi of what follows the last
    space; the path is what precedes it (the whole line when there is no space, whose label is
    then atoi of the whole line, usually 0)."""
    pos = line.rfind(" ")
    return line[:pos] if pos >= 0 else line, _atoi(line[pos + 1:])

"""The records of an ``ImageData`` layer: its list file's lines (path, last space, label), each image
read and resized by Caffe's own ImageData layer (caffe_prune.data.caffe_reading), by position, in
bounded memory (caffe_prune.data.base_reader.Reader)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from caffe_prune import layers, pycaffe
from caffe_prune.data import caffe_reading
from caffe_prune.data.base_reader import Reader, stamp
from caffe_prune.data.caffe_reading import WHERE_PATHS
from caffe_prune.errors import DataError


class ImageList(Reader):
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
        self._stamp = stamp([self.source])   # before the text: a change after it is noticed
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
        self._checkstamp(self._stamp)

    def _entries(self, positions) -> list:
        """(path, label) of these lines (caffe_reading.parse_image_line), their images checked."""
        entries = []
        for position in positions:
            line = self._text[self._starts[position]:self._stops[position]].decode(errors="surrogateescape")
            name, label = caffe_reading.parse_image_line(line)
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
            decoded, _ = caffe_reading._through_caffe(layer, len(positions), self.where, what, progress)
        return decoded, np.asarray([label for _, label in entries], np.int64), False

    def record_shape(self) -> tuple:
        p = self.layer.image_data_param
        if p.new_height and p.new_width:
            self.check_nonempty()
            self._entries([0])
            return (3 if p.is_color else 1), p.new_height, p.new_width
        return super().record_shape()

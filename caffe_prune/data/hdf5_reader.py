"""The records of an ``HDF5Data`` layer: the rows of the .h5 files its source lists, in turn, as
float32 (HDF5's conversion, as Caffe's H5LTread_dataset_float), by position, in bounded memory
(caffe_prune.data.base_reader.Reader). Caffe applies no transform to HDF5Data."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from caffe_prune.data.base_reader import Reader, stamp
from caffe_prune.data.caffe_reading import WHERE_PATHS
from caffe_prune.errors import DataError


class Hdf5List(Reader):
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
        self._stamp = stamp([self.source])
        self.files = Path(self.source).read_text(errors="surrogateescape").split()
        if not self.files:
            raise DataError(f"{self.where}: HDF5 list {self.source} names no file")
        self._stamp.update(stamp(self.files))
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
        self._checkstamp(self._stamp)

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

"""A dataset as evaluation, saliency and pruning see it: a test split that is only measured, a
validation split that every decision is judged on, and the transform the net's data layer applies.

Where the images come from (``open_dataset``'s ``data``):

- nothing: CIFAR-10 for the six built-in networks; else the net's own data layers, when their
  sources exist (the TEST-phase layer gives the test split, the TRAIN-phase layer the training
  images the validation split is drawn from);
- ``cifar10``, or a CIFAR-10 directory, archive or URL (caffe_prune.data.cifar10);
- an LMDB or LevelDB of Datums (a directory), an ImageData list file (``--data-root`` is its
  root_folder), an HDF5Data list file (its lines name ``.h5`` files);
- a prototxt whose data layers name the sources (and give the transform).

Records are read exactly as Caffe's data layers read them (caffe_prune.data.sources) and
transformed exactly as its DataTransformer does in the TEST phase (caffe_prune.data.transform):
from the transform flags when given, else the ``--data`` prototxt's TEST data layer, else the
net's, else none (with a note).

Validation (``val_split``): "seeded", ``cifar10.validation_indices`` (the paper's 10,000 of 50,000
training images, the same fraction of a smaller set); or, for CIFAR-10 only, "authors",
``cifar10.authors_validation_indices`` (the 5,000 images the authors' released code judged on; on a
partial copy the ones it holds). A source with no training part (one LMDB, one list) is split
instead when pruning needs validation images (``holdout``): they are drawn from it the same way and
the test split is the rest; ``evaluate`` (no holdout) scores every image of the source.

Each split records the sha256 of its records as read (images and labels), so that a run can tell
the same data at another path from other data at the same path.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from caffe_prune import engine, layers
from caffe_prune.data import cifar10, records
from caffe_prune.errors import DataError
from caffe_prune.data.transform import Transform


@dataclass(frozen=True)
class Split:
    """Transformed images (float32 N, C, H, W) and int64 labels, with the records' sha256."""
    x: np.ndarray
    y: np.ndarray
    sha256: str


def records_sha256(images, labels) -> str:
    h = hashlib.sha256()
    for image in (images if isinstance(images, list) else [images]):
        h.update(np.ascontiguousarray(image).tobytes())
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


@dataclass
class _Source:
    """Raw records of one split, read on demand: a CIFAR-10 split or a data layer."""
    description: str
    read: callable
    _cache: tuple | None = field(default=None, repr=False)

    def records(self) -> tuple:
        if self._cache is None:
            images, labels = self.read()
            if labels is None:
                raise DataError(f"{self.description} has no labels (a data layer with one top); "
                                f"evaluation and pruning need them")
            labels = np.asarray(labels)
            if labels.ndim != 1 or not np.array_equal(labels, np.round(labels)) or len(labels) == 0:
                raise DataError(f"{self.description}: labels must be one whole number per image")
            self._cache = (images, labels.astype(np.int64))
        return self._cache


class Dataset:
    """Test and validation splits, transformed; ``identity`` is what a run records about them."""

    def __init__(self, description: str, transform: Transform, test: _Source, train: _Source | None,
                 seed: int = 0, holdout: bool = True, val_split: str = "seeded", pick=None):
        self.description, self.transform, self.seed = description, transform, seed
        self._test, self._train, self.holdout = test, train, holdout
        # pick(labels) -> validation indices into the training records; None: seeded
        self.val_split, self._pick = val_split, pick

    def _split(self, images, labels, index) -> Split:
        picked = images[index] if not isinstance(images, list) else [images[i] for i in index]
        return Split(self.transform.apply(picked), labels[index], records_sha256(picked, labels[index]))

    @cached_property
    def _parts(self) -> dict:
        """{'test': indices, 'validation': indices} into the records of the source each comes from."""
        images, labels = self._test.records()
        if self._train is None:      # one source: validation drawn from it, the rest is the test split
            val = cifar10.validation_indices(len(labels), self.seed)
            rest = np.setdiff1d(np.arange(len(labels)), val) if self.holdout else np.arange(len(labels))
            return {"validation": val, "test": rest}
        return {"test": np.arange(len(labels))}

    @cached_property
    def test(self) -> Split:
        return self._split(*self._test.records(), self._parts["test"])

    @cached_property
    def validation(self) -> Split:
        if self._train is None:
            return self._split(*self._test.records(), self._parts["validation"])
        images, labels = self._train.records()
        index = self._pick(labels) if self._pick is not None else cifar10.validation_indices(len(labels), self.seed)
        return self._split(images, labels, index)

    @property
    def shape(self) -> tuple:
        """(C, H, W) the net is fed."""
        return tuple(self.test.x.shape[1:])

    @property
    def identity(self) -> dict:
        """What a run records: where the data came from, how it was split and transformed, and the
        sha256 of the records of each split (contents, not paths)."""
        t = self.transform
        split = {} if self.val_split == "seeded" else {"validation_split": self.val_split}   # seeded: as before
        return {"data": self.description, **split, "test_images": len(self.test.y), "test_sha256": self.test.sha256,
                "validation_images": len(self.validation.y), "validation_sha256": self.validation.sha256,
                "validation_from": "the training images" if self._train is not None else "the test source",
                "seed": self.seed, "transform": {"scale": t.scale, "mean_values": list(t.mean_values),
                                                 "mean_file": t.mean_file, "crop_size": t.crop_size}}

    def check_labels(self, classes: int, where: str, splits=("test",)) -> None:
        """Labels outside 0..classes-1 make Caffe's SoftmaxWithLoss read past its row (no check in a
        release build): refuse them."""
        for name in splits:
            y = getattr(self, name).y
            if y.min() < 0 or y.max() >= classes:
                raise DataError(f"{self.description}: {name} labels run {y.min()}..{y.max()} but {where} has "
                                f"{classes} classes; pass the matching --data or --logits")


# ---- where the records come from -----------------------------------------------------------------

def _cifar(location, progress) -> tuple:
    """CIFAR-10's test and train splits (raw BGR records, as the authors' ImageData layer saw them),
    and the records each training batch holds."""
    root = cifar10.fetch(location, progress=progress)
    counts = cifar10.summary(root)
    partial = "" if counts == cifar10.OFFICIAL_COUNTS else f", a partial copy: {counts['train']} train / " \
                                                           f"{counts['test']} test images"
    description = f"CIFAR-10 at {cifar10.binary_dir(root)}{partial}"

    def split(name):
        def read():
            images, labels = cifar10.read_split(name, root)
            return images[:, ::-1], labels      # the binary release is RGB; OpenCV gave BGR
        return _Source(f"{description} ({name})", read)
    return description, split("test"), split("train"), cifar10.train_batch_counts(root)


def _layer_source(layer, where, progress) -> _Source:
    return _Source(f"{where}: data layer {layer.name!r} ({layers.source(layer)})",
                   lambda: records.read(layer, progress=progress))


def _readable(layer) -> bool:
    path = layers.source(layer)
    return bool(path) and Path(path).exists()


def layer_for(path, root: str = "", transform_param=None):
    """A data LayerParameter reading ``path``: an LMDB or LevelDB directory, an HDF5 list file (its
    lines name .h5 files) or an ImageData list file (with ``root`` as its root_folder)."""
    pb2 = engine.caffe_pb2()
    path = Path(path)
    layer = pb2.LayerParameter(name="data", top=["data", "label"])
    if transform_param is not None:
        layer.transform_param.CopyFrom(transform_param)
    if path.is_dir():
        if (path / "data.mdb").is_file():
            backend = pb2.DataParameter.LMDB
        elif (path / "CURRENT").is_file():
            backend = pb2.DataParameter.LEVELDB
        else:
            raise DataError(f"{path} is a directory but neither an LMDB (data.mdb) nor a LevelDB (CURRENT), "
                            f"nor CIFAR-10; pass a dataset Caffe reads")
        layer.type = layers.type_reading("db")
        layer.data_param.source, layer.data_param.backend, layer.data_param.batch_size = str(path), backend, 1
        return layer
    if not path.is_file():
        raise DataError(f"--data {path} does not exist")
    first = next((ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()), "")
    if first.lower().endswith((".h5", ".hdf5")):
        layer.type = layers.type_reading("hdf5")
        layer.ClearField("transform_param")
        layer.hdf5_data_param.source, layer.hdf5_data_param.batch_size = str(path), 1
    else:
        layer.type = layers.type_reading("list")
        p = layer.image_data_param
        p.source, p.root_folder, p.batch_size = str(path), root, 1
    return layer


def _phase_layer(net_param, phase):
    """The first data layer of a phase; for "test", of the layers Caffe instantiates for evaluation
    (a definition saved from a TRAIN net has its data layers in TRAIN only)."""
    found = engine.instantiated_layers(net_param) if phase == "test" else engine.layers_in_phase(net_param, phase)
    return next((l for l in found if l.type in layers.DATA_TYPES), None)


VAL_SPLITS = ("seeded", "authors")


def open_dataset(network, data=None, transform=None, root: str = "", seed: int = 0,
                 progress: bool = True, holdout: bool = True, val_split: str = "seeded") -> Dataset:
    """The dataset for ``network`` (a caffe_prune.session.Network); see the module docstring.
    ``transform``: a Transform from the command line, replacing the data layers' own; ``holdout``:
    keep the validation images of a single source out of its test split (pruning; not evaluate);
    ``val_split``: "seeded" or, for CIFAR-10, "authors" (the authors' own validation images)."""
    if val_split not in VAL_SPLITS:
        raise DataError(f"--val-split must be one of {', '.join(VAL_SPLITS)}, got {val_split!r}")
    test_layer = _phase_layer(network.param, "test")
    own_transform = Transform.of(test_layer, f"{network.where}: layer {test_layer.name!r}") \
        if test_layer is not None and not layers.is_fed(test_layer) else None
    if own_transform is not None and own_transform.mirror and \
            any(l is test_layer for l in engine.layers_in_phase(network.param, "test")):
        warnings.warn(f"{own_transform.where}: mirror: true in the TEST phase; Caffe flips images at random even "
                      f"there (data_transformer.cpp has no phase test); they are fed unflipped here, as Caffe "
                      f"does for the images its coin leaves alone", stacklevel=2)
    data = None if data is None else str(data)
    if data is None and network.builtin:
        data = "cifar10"
    if data is None:
        if val_split == "authors":
            _not_cifar(f"{network.where}'s own data layers")
        if test_layer is None or not layers.is_reader(test_layer) or not _readable(test_layer):
            what = f"its data layer {test_layer.name!r} reads {layers.source(test_layer) or 'nothing'}, which " \
                   f"does not exist" if test_layer is not None and not layers.is_fed(test_layer) else "it is fed by an Input layer"
            raise DataError(f"{network.where} names no dataset to use: {what}; pass --data (cifar10, an LMDB or "
                            f"LevelDB, an image list, an HDF5 list, or a prototxt with data layers)")
        train_layer = _phase_layer(network.param, "train")
        train = _layer_source(train_layer, network.where, progress) \
            if train_layer is not None and train_layer is not test_layer and _readable(train_layer) else None
        return Dataset(f"{network.where}'s data layers", transform or own_transform,
                       _layer_source(test_layer, network.where, progress), train, seed, holdout)
    if data == "cifar10" or "://" in data or data.endswith((".tar.gz", ".tgz")) or \
            (Path(data).is_dir() and cifar10._holds_batches(Path(data))):
        description, test, train, counts = _cifar(None if data == "cifar10" else data, progress)
        pick = (lambda labels: cifar10.authors_validation_indices(len(labels), counts, labels)) \
            if val_split == "authors" else None
        return Dataset(description, _or_identity(transform or own_transform, description), test, train, seed,
                       val_split=val_split, pick=pick)
    if val_split == "authors":
        _not_cifar(data)
    if data.endswith(".prototxt"):
        param = engine.read_prototxt(data)
        test_layer, train_layer = _phase_layer(param, "test"), _phase_layer(param, "train")
        if test_layer is None or not _readable(test_layer):
            raise DataError(f"--data {data}: no TEST-phase data layer with an existing source")
        train = _layer_source(train_layer, data, progress) \
            if train_layer is not None and train_layer is not test_layer and _readable(train_layer) else None
        own = Transform.of(test_layer, f"{data}: layer {test_layer.name!r}")
        return Dataset(f"{data}'s data layers", transform or own, _layer_source(test_layer, data, progress),
                       train, seed, holdout)
    tp = None
    if transform is not None and (transform.force_color or transform.force_gray):
        tp = engine.caffe_pb2().TransformationParameter(force_color=transform.force_color,
                                                        force_gray=transform.force_gray)
    layer = layer_for(data, root, tp)
    source = _layer_source(layer, "--data", progress)
    chosen = Transform(where=f"{layer.type} (no transform)") if not layers.transforms(layer) \
        else _or_identity(transform or own_transform, data)
    return Dataset(f"{layer.type} {data}", chosen, source, None, seed, holdout)


def _not_cifar(what) -> None:
    raise DataError(f"--val-split authors: the authors' validation images are CIFAR-10 training images, and {what} "
                    f"is not CIFAR-10 (cifar10, or a CIFAR-10 directory, archive or URL); use --val-split seeded")


def _or_identity(transform, description) -> Transform:
    if transform is None:
        warnings.warn(f"{description}: no transform_param to apply (the net has no data layer with one and "
                      f"no --scale/--mean-value/--mean-file/--crop-size was given): records are fed as they are",
                      stacklevel=3)
        return Transform(where="no transform")
    return transform

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

Records are read exactly as Caffe's data layers read them (caffe_prune.data.caffe_reading) and
transformed exactly as its DataTransformer does in the TEST phase (caffe_prune.data.transform),
each split with its own phase's parameters: the test split with the TEST data layer's, the
validation split (when it comes from the training images) with the TRAIN data layer's (its
mean_file and crop_size, a padded-and-cropped layout say; applied as in TEST, a centre crop and no
mirror: the validation images are measured, not augmented). The transform flags replace both
(``--val-*`` flags the validation split's alone); else the ``--data`` prototxt's layers, else the
net's, else none (with a note).

CIFAR-10 read from its binary release is fed in a stated channel order (``channel_order``):
``bgr`` as the authors' ImageData layer read their PNG files, or ``rgb`` as the release stores it
and Caffe's own ``convert_cifar_data`` writes it into ``cifar10_{train,test}_lmdb``. Unasked
(``default_channel_order``), BGR for the six built-in networks (their published weights expect it) and
for a net whose own data layers say BGR (ImageData reads through OpenCV; an LMDB recorded, or
named, as `caffe-prune data cifar10` writes the BGR layout: an exported built-in net's),
RGB for every other net: a CIFAR-10 model trained with Caffe's own example saw RGB. Records of an
LMDB, a list or HDF5 are fed as stored.

Validation (``val_split``): "seeded", ``validation.validation_indices`` (the paper's 10,000 of 50,000
training images, the same fraction of a smaller set); or, for CIFAR-10 only, "authors",
``validation.authors_validation_indices`` (the 5,000 images the authors' released code judged on; on a
partial copy the ones it holds). Drawing the validation images from the test images (a source
with no training part: one LMDB, one list, a TRAIN layer whose source is missing or is the TEST
layer's) happens only when asked (``val_from="test"``): they are drawn from it the same way and the
test split is the rest; otherwise pruning (``holdout``) is refused in one line naming what is
missing. ``evaluate`` (no holdout) scores every image of the source.

Each split records the sha256 of its records as read (images and labels), so that a run can tell
the same data at another path from other data at the same path.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from functools import cached_property
from pathlib import Path

import numpy as np

from caffe_prune import layers, phases, pycaffe
from caffe_prune.data import cifar10, cifar10_convert, layer_records, validation
from caffe_prune.errors import DataError, NoDataset
from caffe_prune.data.transform import Transform


def records_sha256(images, labels) -> str:
    h = hashlib.sha256()
    for image in (images if isinstance(images, list) else [images]):
        h.update(np.ascontiguousarray(image).tobytes())
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def _labels(labels, where: str) -> np.ndarray:
    """A source's labels as int64, refused unless one whole number per image."""
    if labels is None:
        raise DataError(f"{where} has no labels (a data layer with one top); evaluation and pruning need them")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.array_equal(labels, np.round(labels)):
        raise DataError(f"{where}: labels must be one whole number per image")
    return labels.astype(np.int64)


class _Arrays:
    """Records held in memory (CIFAR-10: 150 MB of uint8 for the whole training set), read by position."""

    def __init__(self, description: str, read):
        self.description, self._read = description, read

    @cached_property
    def _records(self) -> tuple:
        images, labels = self._read()
        return images, _labels(labels, self.description)

    def __len__(self) -> int:
        return len(self._records[1])

    @property
    def labels(self) -> np.ndarray:
        return self._records[1]

    def read(self, positions) -> tuple:
        images, labels = self._records
        return images[positions], labels[positions]

    def chunks(self, positions, size: int, prefetch: int = 2):
        for lo in range(0, len(positions), size):
            yield self.read(positions[lo:lo + size])

    def scan(self, positions) -> tuple:
        images, labels = self.read(positions)
        return records_sha256(images, labels), labels

    def record_shape(self) -> tuple:
        return tuple(self._records[0].shape[1:])


class _Layer:
    """A data layer's records, read when a batch needs them (caffe_prune.data.layer_records: by key,
    by line, by row; decoded by Caffe a chunk at a time; bounded memory; safe across forks)."""

    def __init__(self, description: str, layer, progress: bool = False):
        self.description, self.layer, self.progress = description, layer, progress

    @cached_property
    def reader(self):
        return layer_records.open_records(self.layer)

    def __len__(self) -> int:
        return len(self.reader)

    def read(self, positions) -> tuple:
        got = self.reader.read(positions)
        return got.images, _labels(got.labels, self.description)

    def chunks(self, positions, size: int, prefetch: int = 2):
        for got in self.reader.chunks(positions, size, prefetch):
            yield got.images, _labels(got.labels, self.description)

    def scan(self, positions) -> tuple:
        digest, labels = self.reader.scan(positions, progress=self.progress)
        return digest, _labels(labels, self.description)

    def record_shape(self) -> tuple:
        return self.reader.record_shape()


class Split:
    """One split of a dataset: positions into a record source, transformed a batch at a time exactly
    as Caffe's TEST-phase data layer does (caffe_prune.data.transform). Memory is bounded by the
    batches asked for, not by the split: ``batch(index)`` reads and transforms the images at those
    positions of the split, ``batches(size)`` streams it with the next batches read ahead. ``y`` and
    ``sha256`` (the records as read, images then labels) come from one streaming pass over the
    split. ``x`` is the whole split transformed, in memory: for sets that fit."""

    def __init__(self, dataset: Dataset, name: str, source, positions: np.ndarray):
        self.dataset, self.name, self.source = dataset, name, source
        self.positions = np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def head(self, n: int) -> Split:
        """The first ``n`` images of the split, as a split."""
        return Split(self.dataset, self.name, self.source, self.positions[:n])

    def repeated(self, n: int) -> Split:
        """The split's images repeated (in order) up to ``n`` (bench's full protocol on a subset)."""
        return Split(self.dataset, self.name, self.source, np.resize(self.positions, n))

    def _checked(self, images, labels, first: int) -> tuple:
        self.dataset.check_batch(self.name, labels, first)
        return self.dataset.transform_of(self.name).apply(images), labels

    def batch(self, index) -> tuple:
        """(x, y): the images at ``index`` (positions within the split), transformed, and their labels."""
        index = np.asarray(index, dtype=np.int64)
        images, labels = self.source.read(self.positions[index])
        return self._checked(images, labels, int(index[0]) if len(index) else 0)

    def draw(self, count: int, size: int, seed: int) -> list:
        """``count`` batches of ``size`` images, drawn without replacement with numpy's
        default_rng(seed) (what `caffe-prune saliency` and caffe_prune.api.saliencies read)."""
        if count * size > len(self):
            raise DataError(f"{count} batches of {size} need {count * size} images; the {self.name} split "
                            f"holds {len(self)}")
        chosen = np.random.default_rng(seed).choice(len(self), size=count * size, replace=False)
        return [self.batch(chosen[i:i + size]) for i in range(0, len(chosen), size)]

    def batches(self, size: int, prefetch: int = 2):
        """(x, y) of the split in order, ``size`` images at a time, the next batches read ahead."""
        for number, (images, labels) in enumerate(self.source.chunks(self.positions, size, prefetch)):
            yield self._checked(images, labels, number * size)

    @cached_property
    def _scan(self) -> tuple:
        return self.source.scan(self.positions)

    @property
    def sha256(self) -> str:
        return self._scan[0]

    @property
    def y(self) -> np.ndarray:
        return self._scan[1]

    @cached_property
    def x(self) -> np.ndarray:
        if len(self) == 0:
            return self.dataset.transform_of(self.name).apply(np.zeros((0, *self.source.record_shape()), np.uint8))
        return np.concatenate([x for x, _ in self.batches(1024)])


class Dataset:
    """Test and validation splits (caffe_prune.data.dataset.Split: read a batch at a time), each with
    its phase's transform (``val_transform``: the validation split's, the test one's by default);
    ``identity`` is what a run records about them."""

    def __init__(self, description: str, transform: Transform, test, train=None, seed: int = 0,
                 holdout: bool = True, val_split: str = "seeded", pick=None, val_transform: Transform | None = None,
                 channel_order: str | None = None, order_why: str = ""):
        self.description, self.transform, self.seed = description, transform, seed
        # the same parameters are the same transform (and leave a run's identity as before there was a choice)
        same = val_transform is None or (transform is not None and _fields(val_transform) == _fields(transform))
        self.val_transform = transform if same else val_transform
        self.channel_order = channel_order         # CIFAR-10 from its binary release: "bgr" or "rgb"
        self.order_why = order_why                 # why that order, in words (caffe_prune.data.dataset.default_channel_order)
        self._test, self._train, self.holdout = test, train, holdout
        # pick(labels) -> validation indices into the training records; None: seeded
        self.val_split, self._pick = val_split, pick
        self.classes = self.where = None          # set by check_batches: every batch read is checked

    @cached_property
    def _parts(self) -> dict:
        """{'test': positions, 'validation': positions} into the source each split comes from."""
        n = len(self._test)
        if n == 0:
            raise DataError(f"{self._test.description} holds no records")
        if self._train is None:      # one source: validation drawn from it, the rest is the test split
            val = validation.validation_indices(n, self.seed)
            rest = np.setdiff1d(np.arange(n), val) if self.holdout else np.arange(n)
            return {"validation": val, "test": rest}
        if self._pick is not None:
            return {"test": np.arange(n), "validation": self._pick(self._train)}
        return {"test": np.arange(n), "validation": validation.validation_indices(len(self._train), self.seed)}

    @cached_property
    def test(self) -> Split:
        return Split(self, "test", self._test, self._parts["test"])

    @cached_property
    def validation(self) -> Split:
        return Split(self, "validation", self._train or self._test, self._parts["validation"])

    def transform_of(self, split: str) -> Transform:
        return self.val_transform if split == "validation" else self.transform

    @property
    def shape(self) -> tuple:
        """(C, H, W) the net is fed: the transform's output for the first record's shape (the
        validation split's must be the same: one net reads both)."""
        shape = tuple(self.transform.output_shape(self._test.record_shape()))
        if self._train is not None and self.val_transform is not self.transform:
            val = tuple(self.val_transform.output_shape(self._train.record_shape()))
            if val != shape:
                raise DataError(f"{self.description}: the validation images are {'x'.join(map(str, val))} after the "
                                f"TRAIN-phase transform ({self.val_transform.where}) but the test images "
                                f"{'x'.join(map(str, shape))} after the TEST-phase one ({self.transform.where}); "
                                f"one net reads both: give --val-crop-size (or --crop-size) so they agree")
        return shape

    @property
    def planes(self) -> str:
        """The channel order CIFAR-10 is fed in, and why, in words ("" for records fed as stored)."""
        return f"{self.channel_order.upper()} planes ({self.order_why})" if self.channel_order else ""

    @property
    def sources(self) -> str:
        """Where the validation and test images come from, in words (every run's first line)."""
        val = "the training images" if self._train is not None else "the test source (--val-from test)"
        order = f"; {self.planes}" if self.planes else ""
        transforms = f"transform {self.transform.where}" if self.val_transform is self.transform else \
            f"transforms: validation {self.val_transform.where}, test {self.transform.where}"
        return (f"validation {len(self.validation)} images from {val}, test {len(self.test)} images, of "
                f"{self.description}{order}; {transforms}")

    @property
    def identity(self) -> dict:
        """What a run records: where the data came from, how it was split and transformed, and the
        sha256 of the records of each split (contents, not paths), from one streaming pass over it."""
        split = {} if self.val_split == "seeded" else {"validation_split": self.val_split}   # seeded: as before
        # the validation split's own transform only where it differs: runs made before keep their identity
        own = {} if self.val_transform is self.transform else {"validation_transform": _fields(self.val_transform)}
        return {"data": self.description, **split, "test_images": len(self.test), "test_sha256": self.test.sha256,
                "validation_images": len(self.validation), "validation_sha256": self.validation.sha256,
                "validation_from": "the training images" if self._train is not None else "the test source",
                "seed": self.seed, "transform": _fields(self.transform), **own}

    def check_labels(self, classes: int, where: str, splits=("test",)) -> None:
        """Labels outside 0..classes-1 make Caffe's SoftmaxWithLoss read past its row (no check in a
        release build): refuse them (the whole splits, from their streaming pass)."""
        for name in splits:
            self._check(name, getattr(self, name).y, classes, where)

    def check_batches(self, classes: int, where: str) -> None:
        """Check the labels of every batch read from now on (a command that reads a few batches
        need not read the whole split first)."""
        self.classes, self.where = classes, where

    def check_batch(self, name: str, labels, first: int) -> None:
        if self.classes is not None and len(labels):
            self._check(name, labels, self.classes, self.where, first)

    def _check(self, name, y, classes, where, first=None) -> None:
        if len(y) and (y.min() < 0 or y.max() >= classes):
            at = "" if first is None else f" (in the batch from image {first} of the split)"
            raise DataError(f"{self.description}: {name} labels run {y.min()}..{y.max()} but {where} has "
                            f"{classes} classes{at}; pass the matching --data or --logits")


def _fields(t: Transform) -> dict:
    return {"scale": t.scale, "mean_values": list(t.mean_values), "mean_file": t.mean_file, "crop_size": t.crop_size}


# ---- where the records come from -----------------------------------------------------------------

CHANNEL_ORDERS = tuple(cifar10_convert.LAYOUTS)      # "bgr", "rgb"


def _cifar(location, progress, order: str = "bgr") -> tuple:
    """CIFAR-10's test and train splits in channel ``order`` (raw records: BGR as the authors'
    ImageData layer saw them, or RGB as the binary release and convert_cifar_data hold them), and
    the records each training batch holds."""
    root = cifar10.fetch(location, progress=progress)
    counts = cifar10.summary(root)
    partial = "" if counts == cifar10.OFFICIAL_COUNTS else f", a partial copy: {counts['train']} train / " \
                                                           f"{counts['test']} test images"
    description = f"CIFAR-10 at {cifar10.binary_dir(root)}{partial}"

    def split(name):
        def read():
            images, labels = cifar10.read_split(name, root)
            return (images[:, ::-1] if order == "bgr" else images), labels   # the release is RGB; OpenCV gave BGR
        return _Arrays(f"{description} ({name})", read)
    return description, split("test"), split("train"), cifar10.train_batch_counts(root)


def _layer_source(layer, where, progress) -> _Layer:
    return _Layer(f"{where}: data layer {layer.name!r} ({layers.source(layer)})", layer, progress)


def _other(train_layer, test_layer) -> bool:
    """Whether the TRAIN data layer reads a source of its own (one that exists and is not the TEST
    layer's: a train_val prototxt pointing both phases at one LMDB has one source, whose validation
    images are then held out of its test split)."""
    if train_layer is None or train_layer is test_layer or not _readable(train_layer):
        return False
    return Path(layers.source(train_layer)).resolve() != Path(layers.source(test_layer)).resolve()


def _readable(layer) -> bool:
    path = layers.source(layer)
    return bool(path) and Path(path).exists()


def layer_for(path, root: str = "", transform_param=None):
    """A data LayerParameter reading ``path``: an LMDB or LevelDB directory, an HDF5 list file (its
    lines name .h5 files) or an ImageData list file (with ``root`` as its root_folder)."""
    pb2 = pycaffe.caffe_pb2()
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
    found = phases.instantiated_layers(net_param) if phase == "test" else phases.layers_in_phase(net_param, phase)
    return next((l for l in found if l.type in layers.DATA_TYPES), None)


def default_channel_order(net_param, builtin: bool) -> tuple:
    """(order, why): the channel order CIFAR-10 is fed to a net in (and written in for training it)
    when none is asked for: BGR for the built-in networks and for a net whose own data layers read
    images through OpenCV (ImageData) or an LMDB recorded as BGR; RGB otherwise, as Caffe's
    convert_cifar_data wrote the LMDBs of a net trained with Caffe's own CIFAR-10 example."""
    if builtin:
        return "bgr", "the built-in networks' published weights expect it"
    for layer in net_param.layer:
        if layers.reader(layer) == "list":
            return "bgr", f"its data layer {layer.name!r} ({layer.type}) reads images through OpenCV, BGR"
        if layers.reader(layer) == "db":
            source = Path(layers.source(layer))
            try:
                order = json.loads((source / cifar10_convert.META).read_text())["channel_order"].lower()
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                order = None
            if order in CHANNEL_ORDERS:
                return order, f"its data layer {layer.name!r} reads {source}, recorded as {order.upper()}"
            named = cifar10_convert.order_named(source.name)                 # not recorded: its name says
            if named:
                return named, f"its data layer {layer.name!r} reads {source.name}, the name of the " \
                              f"{named.upper()} LMDBs `caffe-prune data cifar10` writes"
    return "rgb", "as Caffe's convert_cifar_data wrote CIFAR-10 for a net trained the Caffe way"


VAL_SPLITS = ("seeded", "authors")


VAL_FROM = ("train", "test")


def open_dataset(network, data=None, transform=None, root: str = "", seed: int = 0,
                 progress: bool = True, holdout: bool = True, val_split: str = "seeded",
                 val_transform=None, channel_order: str | None = None, val_from: str = "train") -> Dataset:
    """The dataset for ``network`` (a caffe_prune.session.Network); see the module docstring.
    ``transform``: a Transform from the command line, replacing the data layers' own (both phases';
    ``val_transform`` the validation split's alone); ``holdout``: pruning needs validation images
    (not evaluate); ``val_split``: "seeded" or, for CIFAR-10, "authors"; ``channel_order``: "bgr" or
    "rgb" for CIFAR-10 read from its binary release (None: the network's default, see the module
    docstring); ``val_from``: "test" allows the validation images to be drawn from the test source."""
    if val_split not in VAL_SPLITS:
        raise DataError(f"--val-split must be one of {', '.join(VAL_SPLITS)}, got {val_split!r}")
    if val_from not in VAL_FROM:
        raise DataError(f"--val-from must be one of {', '.join(VAL_FROM)}, got {val_from!r}")
    if channel_order is not None and channel_order not in CHANNEL_ORDERS:
        raise DataError(f"--channel-order must be one of {', '.join(CHANNEL_ORDERS)}, got {channel_order!r}")
    test_layer = _phase_layer(network.param, "test")
    train_layer = _phase_layer(network.param, "train")
    own_transform = _own(test_layer, network.where, "TEST") if transform is None else None
    if own_transform is not None and own_transform.mirror and \
            any(l is test_layer for l in phases.layers_in_phase(network.param, "test")):
        warnings.warn(f"{own_transform.where}: mirror: true in the TEST phase; Caffe flips images at random even "
                      f"there (data_transformer.cpp has no phase test); they are fed unflipped here, as Caffe "
                      f"does for the images its coin leaves alone", stacklevel=2)
    own_val = val_transform or (_own(train_layer, network.where, "TRAIN") if transform is None else transform)
    data = None if data is None else str(data)
    if data is None and network.builtin:
        data = "cifar10"
    is_cifar = data is not None and cifar10.names_cifar10(data)
    if channel_order is not None and not is_cifar:
        raise DataError(f"--channel-order {channel_order}: records of {data or network.where + chr(39) + 's data layers'} "
                        f"are fed as they are stored; the channel order is chosen only for CIFAR-10 read from its "
                        f"binary release (--data cifar10)")
    if data is None:
        if val_split == "authors":
            _not_cifar(f"{network.where}'s own data layers")
        if test_layer is None or not layers.is_reader(test_layer) or not _readable(test_layer):
            what = f"its data layer {test_layer.name!r} reads {layers.source(test_layer) or 'nothing'}, which " \
                   f"does not exist" if test_layer is not None and not layers.is_fed(test_layer) else "it is fed by an Input layer"
            raise NoDataset(f"{network.where} names no dataset to use: {what}; pass --data (cifar10, an LMDB or "
                            f"LevelDB, an image list, an HDF5 list, or a prototxt with data layers)")
        train = _training(train_layer, test_layer, network.where, holdout, val_from, progress)
        test_transform = transform or own_transform
        return Dataset(f"{network.where}'s data layers", test_transform, _layer_source(test_layer, network.where, progress),
                       train, seed, holdout, val_transform=(own_val or test_transform) if train is not None else val_transform)
    if is_cifar:
        if channel_order:
            order, why = channel_order, "as --channel-order asks"
        else:
            order, why = default_channel_order(network.param, bool(network.builtin))
            why += "; --channel-order to choose"
        description, test, train, counts = _cifar(None if data == "cifar10" else data, progress, order)
        pick = (lambda source: validation.authors_validation_indices(len(source), counts, source.labels)) \
            if val_split == "authors" else None
        test_transform = _or_identity(transform or own_transform, description)
        return Dataset(description, test_transform, test, train, seed, val_split=val_split, pick=pick,
                       val_transform=own_val, channel_order=order, order_why=why)
    if val_split == "authors":
        _not_cifar(data)
    if data.endswith(".prototxt"):
        param = pycaffe.read_prototxt(data)
        test_layer, train_layer = _phase_layer(param, "test"), _phase_layer(param, "train")
        if test_layer is None or not _readable(test_layer):
            raise DataError(f"--data {data}: no TEST-phase data layer with an existing source")
        train = _training(train_layer, test_layer, data, holdout, val_from, progress)
        own = transform or _own(test_layer, data, "TEST")
        return Dataset(f"{data}'s data layers", own, _layer_source(test_layer, data, progress), train, seed, holdout,
                       val_transform=(val_transform or (_own(train_layer, data, "TRAIN") if transform is None else
                                                        transform) or own) if train is not None else val_transform)
    tp = None
    if transform is not None and (transform.force_color or transform.force_gray):
        tp = pycaffe.caffe_pb2().TransformationParameter(force_color=transform.force_color,
                                                        force_gray=transform.force_gray)
    layer = layer_for(data, root, tp)
    if holdout and val_from != "test":
        raise DataError(f"--data {data} is one source with no training images to draw the validation images from; "
                        f"pruning judges every decision on validation images: pass a prototxt whose TRAIN and TEST data "
                        f"layers name both sources (--data NET.prototxt), or draw them from these images with "
                        f"--val-from test (they are then held out of the test split)")
    source = _layer_source(layer, "--data", progress)
    chosen = Transform(where=f"{layer.type} (no transform)") if not layers.transforms(layer) \
        else _or_identity(transform or own_transform, data)
    return Dataset(f"{layer.type} {data}", chosen, source, None, seed, holdout, val_transform=val_transform)


def _own(layer, where: str, phase: str):
    """A data layer's own transform (None for none, or an Input layer), named with its phase."""
    if layer is None or layers.is_fed(layer):
        return None
    return Transform.of(layer, f"{where}: layer {layer.name!r} ({phase})")


def _training(train_layer, test_layer, where: str, holdout: bool, val_from: str, progress: bool):
    """The training source validation images are drawn from, or None to draw them from the test
    source (only with ``val_from`` "test", or when no validation is needed); one line otherwise."""
    if _other(train_layer, test_layer):
        return _layer_source(train_layer, where, progress)
    if holdout and val_from != "test":
        if train_layer is None:
            what = "has no TRAIN-phase data layer"
        elif layers.is_fed(train_layer) or not layers.is_reader(train_layer):
            what = f"has no TRAIN-phase data layer reading records ({train_layer.name!r} is {train_layer.type})"
        elif not _readable(train_layer):
            what = f"names TRAIN source {layers.source(train_layer) or '(none)'}, which does not exist"
        else:
            what = f"reads the TEST source {layers.source(test_layer)} in its TRAIN phase too"
        raise DataError(f"{where} {what}: pruning judges every decision on validation images drawn from the training "
                        f"images; make the TRAIN layer's source readable, pass --data, or draw them from the test "
                        f"images with --val-from test (they are then held out of the test split)")
    return None


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

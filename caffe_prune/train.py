"""Training with Caffe's own solvers through pycaffe: any network with its own solver, from scratch or
from weights, and fine-tuning a pruned network with its pruned parameters held at exactly zero.

What is trained (``recipe``): one of the six built-in networks (its train/test definition and the
authors' schedule, networks.solver), a train/test prototxt (the same schedule, DEFAULT_SCHEDULE), or a
solver prototxt whose ``net:`` names the definition (relative to the working directory: Caffe's rule)
or whose ``net_param`` holds it. ``--solver-set key=value`` overrides any SolverParameter field.
Data: the built-in networks read CIFAR-10 LMDBs written by caffe_prune.data.cifar10.prepare (Caffe's
``Data`` layer applies transform_param itself); ``--data`` (CIFAR-10) points any net's ``Data`` layers
at those LMDBs; otherwise a net reads what its own data layers name (LMDB, LevelDB, ImageData lists,
HDF5), checked to exist first.

A training run directory (``train``), every file written through caffe_prune.fsio:

- ``train_test.prototxt``, ``solver.prototxt``: as used. The solver's ``net`` is the former; its
  ``snapshot_prefix`` is ``snapshots/.writing/NAME`` (Caffe writes there, then each file is moved into
  place), ``snapshot`` and ``test_interval`` are driven from here (the asked values are in train.json);
  ``random_seed`` is 0 unless the solver sets one, so that the same command trains the same bits;
- ``train.json``: what was asked: the source (and the sha256 of its definition), the starting weights
  (and sha256), the ``--solver-set`` overrides, the data, the held-zero regions, each resume;
- ``snapshots/NAME_iter_N.caffemodel`` and ``.solverstate``: the caffemodel is moved into place first,
  then the solverstate (``learned_net`` rewritten to the caffemodel beside it), so the newest
  solverstate always has its caffemodel and a kill never leaves a torn snapshot as the newest one;
- ``curve.jsonl``: one line per display interval, appended: ``iter``, ``loss`` (the mean training
  loss over the interval, loss weights applied), and every ``test_interval`` iterations and at the end
  ``test_top1`` and ``test`` (every output of the solver's test net, averaged over ``test_iter``
  batches as Caffe's Solver::Test does), at iteration 0 too when the solver's ``test_initialization``
  (Caffe's default) asks for it; ``curve.png``: train loss and test top-1 against iteration,
  the two plots of Caffe's plot_training_log;
- ``NAME.caffemodel`` (the final weights) and ``result.json`` (what came of it);
- ``.lock``: one process per directory (fsio.RunLock).

BLAS: one thread, as in a pruning run (caffe_prune.passes: OpenBLAS's bits depend on its thread
count), so that a run, its resume and a retraining inside a pruning run give the same bits on any
machine; measured here, one thread is also 4x faster than two on a busy 2-core machine (spinning
threads). The GPU is the fast path.

Resume (``--resume PATH|latest``): the solverstate restores weights, momentum history and iteration.
Deviation from Caffe, on purpose: Caffe's data layers restart at their first record after a restore;
here the train net's data layers are advanced by the batches already trained on (and the test net's
by those already tested), so that a resumed run sees the data an uninterrupted one would, and ends
with the same bits on the CPU (a net whose layers draw from Caffe's RNG in the forward, e.g. Dropout,
does not: pycaffe cannot restore that RNG). Ctrl-C writes a snapshot and stops.

Held zero (``HeldZero``): the regions of pruned groups (caffe_prune.masking.regions: filters and
biases, consumers' input slices, riders) stay exactly 0 throughout SGD, as the authors' Caffe fork
kept its masks in the blobs. See HeldZero's docstring for how and why it is exact.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from caffe_prune import engine, fsio, netdef, networks
from caffe_prune.data import sources
from caffe_prune.download import digest
from caffe_prune.layers import DATA_TYPES, LOSS_TYPES

ASKED, RESULT, CURVE, CURVE_PNG = "train.json", "result.json", "curve.jsonl", "curve.png"
WRITING = ".writing"      # snapshots/.writing/: where Caffe writes a snapshot before it is moved into place
# a definition given without a solver trains on the authors' published schedule (networks.SOLVERS:
# SGD, base_lr 0.001, momentum 0.9, weight decay 5e-4, fixed rate), the built-in networks' own
DEFAULT_SCHEDULE = "LeNet-5"
# fields the run directory decides (where files go, how testing and snapshots are driven)
MANAGED = ("net", "net_param", "train_net", "test_net", "train_net_param", "test_net_param", "snapshot_prefix",
           "snapshot_format")


class TrainError(engine.EngineError):
    """A training request that cannot be carried out; the message is one line."""


class Interrupted(TrainError):
    """Ctrl-C during training, after the snapshot was written."""


# ---- what is trained ----------------------------------------------------------------------------

@dataclass
class Recipe:
    """A train/test definition with its data sources as used, its solver, and where both came from."""
    net: object                 # NetParameter (both phases)
    solver: object              # SolverParameter (its net fields are filled in by ``train``)
    name: str                   # file names: NAME.caffemodel, NAME_iter_N.*
    where: str                  # names the user's file in messages
    source: dict                # train.json: kind (network, prototxt, solver), path, definition_sha256
    data: dict                  # train.json: what the data layers read
    builtin: str | None = None
    overrides: list = field(default_factory=list)
    cifar10: str | None = None  # the CIFAR-10 location the LMDBs came from (None: the net's own layers)


def is_cifar10(data) -> bool:
    """Whether a --data value names CIFAR-10 (as caffe_prune.data.dataset.open_dataset reads it)."""
    from caffe_prune.data import cifar10
    data = os.fsdecode(data)
    return data == "cifar10" or "://" in data or data.endswith((".tar.gz", ".tgz")) or \
        (Path(data).is_dir() and cifar10._holds_batches(Path(data)))


def recipe(spec, data=None, data_out=None, solver_set=(), progress: bool = True) -> Recipe:
    """The Recipe for SPEC: a built-in network's name, a train/test prototxt, or a solver prototxt."""
    spec = os.fsdecode(spec)
    if spec in networks.NETWORKS:
        solver = networks.solver(spec)
        return _finish(networks.train_test(spec), solver, spec, spec, {"kind": "network", "name": spec},
                       data, data_out, solver_set, progress, builtin=spec, solver_given=False)
    path = Path(spec)
    if not path.is_file():
        raise TrainError(f"{spec} is neither a prototxt nor one of the built-in networks "
                         f"({', '.join(networks.NETWORKS)})")
    if path.suffix == ".caffemodel":
        raise TrainError(f"{spec} is a caffemodel: train its definition (a train/test prototxt or a solver) and "
                         f"pass it as --weights")
    solver = _as_solver(path)
    if solver is None:
        net = engine.read_prototxt(path)
        return _finish(net, networks.solver(DEFAULT_SCHEDULE), spec, net.name or path.stem,
                       {"kind": "prototxt", "path": spec}, data, data_out, solver_set, progress, solver_given=False)
    net, net_where = _solver_net(solver, spec)
    return _finish(net, solver, net_where, net.name or Path(net_where).stem,
                   {"kind": "solver", "path": spec, "net": net_where}, data, data_out, solver_set, progress,
                   solver_given=True)


def recipe_of(network, data=None, data_out=None, solver_set=(), progress: bool = True) -> Recipe:
    """The Recipe for a caffe_prune.session.Network (a pruning run's): a built-in network's own, or the
    definition the network was opened from (which must read training images)."""
    if network.builtin:
        return recipe(network.builtin, data, data_out, solver_set, progress)
    data = data if data is not None and is_cifar10(data) else None      # else: the net's own data layers
    return _finish(network.param, networks.solver(DEFAULT_SCHEDULE), network.where, network.name,
                   {"kind": "prototxt", "path": network.where}, data, data_out, solver_set, progress,
                   solver_given=False)


def _as_solver(path: Path):
    """The SolverParameter a prototxt holds, or None when it is a net definition."""
    from google.protobuf import text_format
    pb2 = engine.caffe_pb2()
    solver = pb2.SolverParameter()
    try:
        text_format.Parse(path.read_text(errors="replace"), solver)
    except text_format.ParseError:
        return None
    except OSError as exc:
        raise TrainError(f"cannot read {path}: {exc.strerror}") from None
    return solver if solver.ListFields() else None


def _solver_net(solver, where: str) -> tuple:
    """(NetParameter, where) of a solver's net: ``net_param``, or ``net`` read relative to the working
    directory (Caffe's rule)."""
    if solver.train_net or solver.HasField("train_net_param") or solver.test_net or solver.test_net_param:
        raise TrainError(f"{where}: train_net/test_net are not supported; give one train/test definition with "
                         f"phase rules as net: (as Caffe's examples do)")
    if solver.HasField("net_param"):
        return solver.net_param, f"{where} (net_param)"
    if not solver.net:
        raise TrainError(f"{where} names no net (net: \"...prototxt\" or net_param {{ ... }})")
    net_path = Path(solver.net)
    if not net_path.is_file():
        raise TrainError(f"{where}: its net {solver.net} does not exist (Caffe reads it relative to the working "
                         f"directory {os.getcwd()})")
    return engine.read_prototxt(net_path), solver.net


def _finish(net_param, solver, where, name, source, data, data_out, solver_set, progress, builtin=None,
            solver_given=False) -> Recipe:
    from caffe_prune.data import caffe_db, cifar10
    source["definition_sha256"] = _sha256(net_param)
    train_layers = [l for l in engine.layers_in_phase(net_param, "train") if l.type in DATA_TYPES]
    test_layers = [l for l in engine.layers_in_phase(net_param, "test") if l.type in DATA_TYPES]
    if not train_layers or all(l.type == "Input" for l in train_layers):
        raise TrainError(f"{where} has no data layer in the TRAIN phase to read training images from: train a "
                         f"train/test definition (Data, ImageData or HDF5Data layers), not a deploy one")
    location = None
    if data is not None or builtin:
        location = None if data is None or os.fsdecode(data) == "cifar10" else os.fsdecode(data)
        if data is not None and not is_cifar10(data):
            raise TrainError(f"--data {os.fsdecode(data)}: training reads CIFAR-10 into LMDBs (cifar10, a directory, "
                             f"archive or URL); for other data point the net's own data layers at it")
        others = sorted({l.type for l in train_layers + test_layers if l.type != "Data"})
        if others:
            raise TrainError(f"--data points a net's Data layers at CIFAR-10 LMDBs, but {where} reads through "
                             f"{', '.join(others)} layers; point them at your data instead")
        unphased = [l.name for l in train_layers if not any(rule.HasField("phase") for rule in l.include)]
        if unphased:
            raise TrainError(f"--data: {where}'s data layer {unphased[0]!r} reads in both phases; give it "
                             f"include {{ phase: TRAIN }} (and a TEST layer) so that it reads the training images")
        prepared = cifar10.prepare(location, data_out, progress=progress)
        net_param = _with_sources(net_param, prepared["paths"]["train"], prepared["paths"]["test"])
        caffe_db.check_data_layers(net_param, where)   # BGR uint8 LMDBs written by caffe_prune.data
        data_record = {"kind": "cifar10", "source": prepared["source"], "counts": prepared["counts"],
                       "lmdb": {k: prepared["paths"][k] for k in ("train", "test")}}
        test_images = prepared["counts"]["test"]
    else:
        for phase in ("train", "test"):
            engine.check_net(net_param, phase, where, sources=True)
        data_record = {"kind": "the net's data layers",
                       "layers": [[l.name, l.type, sources.source_path(l)] for l in train_layers + test_layers]}
        test_images = None
        if test_layers and test_layers[0].type in ("Data", "ImageData", "HDF5Data"):
            try:
                test_images = sources.count(test_layers[0])
            except ValueError:
                test_images = None
    for phase in ("train", "test"):
        engine.check_net(net_param, phase, where)
    solver = _copy(solver)
    if not solver_given:      # our schedule: test on every test image once (the authors' read 12,800, wrapping)
        batch = _batch_size(test_layers[0]) if test_layers else 0
        solver.ClearField("test_iter")
        if test_images and batch:
            solver.test_iter.append(max(1, math.ceil(test_images / batch)))
    overrides = apply_overrides(solver, solver_set)
    if solver.test_iter and not test_layers:
        solver.ClearField("test_iter")          # no TEST phase: nothing to test
    _check_solver(solver, where)
    return Recipe(net_param, solver, _file_name(name), where, source, data_record, builtin, overrides,
                  cifar10=(location or "cifar10") if data_record["kind"] == "cifar10" else None)


def _with_sources(net_param, train_lmdb, test_lmdb):
    """The train/test net with its Data layers reading the given LMDBs."""
    pb2 = engine.caffe_pb2()
    out = pb2.NetParameter()
    out.CopyFrom(net_param)
    for layer in out.layer:
        if layer.type == "Data":
            phases = {rule.phase for rule in layer.include}
            layer.data_param.source = str(train_lmdb if pb2.TRAIN in phases else test_lmdb)
            layer.data_param.backend = pb2.DataParameter.LMDB
    return out


def _batch_size(layer) -> int:
    return {"Data": layer.data_param.batch_size, "ImageData": layer.image_data_param.batch_size,
            "HDF5Data": layer.hdf5_data_param.batch_size, "MemoryData": layer.memory_data_param.batch_size
            }.get(layer.type, 0)


def _copy(message):
    out = type(message)()
    out.CopyFrom(message)
    return out


def _sha256(message) -> str:
    import hashlib
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "net"


def apply_overrides(solver, pairs) -> list:
    """``--solver-set key=value`` on a SolverParameter (text-format values; a repeated field such as
    test_iter or stepvalue takes comma-separated values and is replaced); returns them as given."""
    from google.protobuf import descriptor, text_format
    done = []
    for pair in pairs or ():
        key, sep, value = str(pair).partition("=")
        key, value = key.strip(), value.strip()
        field_ = solver.DESCRIPTOR.fields_by_name.get(key)
        if not sep or field_ is None or not value:
            raise TrainError(f"--solver-set {pair!r} is not KEY=VALUE with a SolverParameter field as KEY "
                             f"(e.g. base_lr=0.01, max_iter=500, lr_policy=step, stepsize=1000)")
        if key in MANAGED:
            raise TrainError(f"--solver-set {key}: the run directory decides it (the solver as used is written there)")
        repeated = field_.is_repeated
        if repeated:
            solver.ClearField(key)
        for item in value.split(",") if repeated else [value]:
            item = item.strip()
            if field_.type == descriptor.FieldDescriptor.TYPE_STRING and not item.startswith('"'):
                item = json.dumps(item)
            try:
                text_format.Merge(f"{key}: {item}", solver)
            except text_format.ParseError as exc:
                raise TrainError(f"--solver-set {pair!r}: {str(exc).split(' : ', 1)[-1]}") from None
        done.append(f"{key}={value}")
    return done


def _check_solver(solver, where: str) -> None:
    """What Caffe's Solver CHECK-aborts on, or what cannot train at all, as one line."""
    if solver.max_iter < 1:
        raise TrainError(f"{where}: max_iter {solver.max_iter} must be at least 1 (--iters or --solver-set max_iter=N)")
    policies = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")
    if solver.lr_policy not in policies:
        raise TrainError(f"{where}: lr_policy {solver.lr_policy!r} is not one of Caffe's {', '.join(policies)}")
    if solver.lr_policy == "step" and solver.stepsize < 1:
        raise TrainError(f"{where}: lr_policy step needs stepsize >= 1")
    if solver.lr_policy == "multistep" and not solver.stepvalue:
        raise TrainError(f"{where}: lr_policy multistep needs stepvalue")
    kinds = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")
    kind = kinds[solver.solver_type] if solver.HasField("solver_type") and not solver.HasField("type") \
        else solver.type                           # Caffe upgrades the deprecated enum to the name
    if kind not in kinds:
        raise TrainError(f"{where}: solver type {kind!r} is not one of Caffe's {', '.join(kinds)}")
    if kind in ("AdaGrad", "RMSProp") and solver.momentum != 0:
        raise TrainError(f"{where}: {kind} takes no momentum (Caffe refuses {solver.momentum:g}); set momentum=0")
    if kind == "RMSProp" and not 0 <= solver.rms_decay < 1:
        raise TrainError(f"{where}: rms_decay {solver.rms_decay:g} must be in [0, 1)")
    if solver.regularization_type not in ("L1", "L2"):
        raise TrainError(f"{where}: regularization_type {solver.regularization_type!r} is not L1 or L2")
    if solver.average_loss < 1:
        raise TrainError(f"{where}: average_loss {solver.average_loss} must be at least 1")
    if solver.iter_size < 1:
        raise TrainError(f"{where}: iter_size {solver.iter_size} must be at least 1")


# ---- parameters held at zero --------------------------------------------------------------------

class HeldZero:
    """Parameter regions (layer, blob, index) held at exactly 0 while a solver trains: the pruned groups.

    How: the masked regions of every parameter's *gradient* (blob diff) are zeroed in the solver's
    ``on_gradients_ready`` callback, after the backward and before the update, and the masked
    *weights* are zeroed in ``on_start``, before every forward (and before every snapshot, test and
    save). Why both: with the diff zeroed, every Caffe update rule leaves a weight that is 0, and whose
    history is 0, at exactly 0: SGD and Nesterov add weight decay wd*w = 0 (L1: wd*sign(0) = 0) and
    keep momentum*0 + lr*0 = 0 in the history; AdaGrad, RMSProp, AdaDelta and Adam accumulate 0 and
    step by a multiple of the zero gradient. So the history of a masked weight stays 0 too, from a
    fresh solver or from this module's own snapshots. Zeroing the weights at on_start makes the forward
    see exact zeros whatever the solver and whatever history a restored solverstate brings. pycaffe's
    ``.diff``/``.data`` accessors sync a GPU blob to the host and mark it changed, so the same code is
    exact in GPU mode (at the cost of a host round trip of the masked blobs per iteration). The test
    nets share these blobs (Net::ShareTrainedLayersWith), so they see the zeros as well.
    """

    def __init__(self, regions, shapes: dict, origin: str):
        self.origin = origin
        self.masks = {}
        for layer, blob, index in regions:
            key = (layer, int(blob))
            if key not in self.masks:
                self.masks[key] = np.zeros(shapes[key], dtype=bool)
            self.masks[key][index] = True
        self.net = None
        self._blobs = []

    @classmethod
    def of(cls, masker, groups, origin: str) -> "HeldZero":
        """The regions of ``groups`` in a caffe_prune.masking.Masker's graph, with its net's shapes."""
        regions = [r for g in sorted(groups) for r in masker.group_regions(g)]
        net = masker.nets[0]
        shapes = {(l, b): net.params[l][b].data.shape for l, b, _ in regions}
        return cls(regions, shapes, origin)

    @property
    def values(self) -> int:
        return int(sum(m.sum() for m in self.masks.values()))

    def bind(self, net, where: str) -> "HeldZero":
        """Check that ``net`` (the training net) has every masked blob with the same shape, and hold it."""
        for (layer, blob), mask in self.masks.items():
            have = net.params[layer][blob].data.shape if layer in net.params and blob < len(net.params[layer]) \
                else None
            if have != mask.shape:
                shown = "no such blob" if have is None else "x".join(map(str, have))
                raise TrainError(f"{where} does not fit {self.origin}: layer {layer!r} blob {blob} is "
                                 f"{'x'.join(map(str, mask.shape))} there and {shown} here (a run directory "
                                 f"from another network?)")
        self.net = net
        self._blobs = [(net.params[layer][blob], mask) for (layer, blob), mask in self.masks.items()]
        return self

    def zero_weights(self) -> None:
        for blob, mask in self._blobs:
            np.putmask(blob.data, mask, 0)

    def zero_gradients(self) -> None:
        for blob, mask in self._blobs:
            np.putmask(blob.diff, mask, 0)

    def nonzero(self, net=None) -> int:
        """Masked values that are not exactly 0 in ``net`` (default: the bound one)."""
        net = net or self.net
        return int(sum(np.count_nonzero(net.params[l][b].data[m]) for (l, b), m in self.masks.items()))

    def describe(self) -> dict:
        return {"origin": self.origin, "values": self.values,
                "blobs": sorted(f"{l}/{b}" for l, b in self.masks)}


# ---- training ---------------------------------------------------------------------------------

def _iteration(state: Path) -> int:
    number = state.stem.rsplit("_iter_", 1)[-1]
    return int(number) if number.isdigit() else -1


def latest_solverstate(out_dir) -> Path | None:
    """The newest complete snapshot (a solverstate whose caffemodel is beside it) in out_dir/snapshots."""
    states = [p for p in Path(out_dir).glob("snapshots/*.solverstate") if p.with_suffix(".caffemodel").is_file()]
    return max(states, key=_iteration) if states else None


def _loss_blobs(net_param) -> list:
    """(top, loss weight) of the TRAIN net's losses, as Caffe sums them into the displayed loss."""
    out = []
    for layer in engine.layers_in_phase(net_param, "train"):
        if layer.type in LOSS_TYPES or (layer.loss_weight and layer.loss_weight[0]):
            weight = layer.loss_weight[0] if layer.loss_weight else 1.0
            if weight and layer.top:
                out.append((layer.top[0], float(weight)))
    return out


def _top1_blob(net_param) -> str | None:
    """The TEST net's top-1 Accuracy output (the first Accuracy layer with top_k 1)."""
    for layer in engine.layers_in_phase(net_param, "test"):
        if layer.type == "Accuracy" and layer.accuracy_param.top_k == 1 and layer.top:
            return layer.top[0]
    return None


def test_scores(solver, batches: int, top1: str | None) -> dict:
    """Every output of the solver's test net averaged over ``batches`` forwards (Solver::Test's
    arithmetic), and "top1". Caffe's own Solver::Test shares the trained weights into the test net
    first; calling the test net directly must do the same (Net::ShareTrainedLayersWith)."""
    net = solver.test_nets[0]
    net.share_with(solver.net)
    sums = {}
    for _ in range(max(1, batches)):
        for name, value in net.forward().items():
            sums[name] = sums.get(name, 0.0) + float(np.asarray(value).mean())
    scores = {name: total / max(1, batches) for name, total in sums.items()}
    return {"top1": scores.get(top1) if top1 else None, "outputs": scores}


def test_accuracy(solver, images: int, batch_size: int) -> float:
    """Mean of the test net's top-1 "accuracy" over ceil(images / batch) batches."""
    return test_scores(solver, max(1, math.ceil(images / batch_size)), "accuracy")["top1"]


def _advance(net, net_param, phase: str, batches: int) -> None:
    """Run a net's data layers alone for ``batches`` forwards: the records (and the mirror coins) an
    uninterrupted run would have consumed (see the module docstring: the deliberate deviation)."""
    if batches <= 0:
        return
    names = list(net._layer_names)
    data = {l.name for l in engine.layers_in_phase(net_param, phase) if l.type in DATA_TYPES and l.type != "Input"}
    for index in [i for i, n in enumerate(names) if n in data]:
        for _ in range(batches):
            net._forward(index, index)


def _load_weights(net, weights, where: str) -> list:
    """Copy weights by layer name into ``net`` (Caffe's fine-tuning rule: a layer the caffemodel lacks
    keeps its filler, with a note); ``weights`` is a caffemodel or a caffe.Net. Refuses weights of
    another network (no layer in common, or a blob of another shape) in one line."""
    if hasattr(weights, "params"):          # a caffe.Net (a pruning session's): by name, shapes checked
        common = [n for n in net.params if n in weights.params]
        for name in common:
            for i, (mine, theirs) in enumerate(zip(net.params[name], weights.params[name])):
                if mine.data.shape != theirs.data.shape:
                    raise TrainError(f"{where}: layer {name!r} blob {i} is {mine.data.shape} in the training net "
                                     f"and {theirs.data.shape} in the net it starts from")
                mine.data[...] = theirs.data
    else:
        param = engine.read_caffemodel(weights)
        have = {l.name for l in list(param.layer) + list(param.layers) if l.blobs}
        common = [n for n in net.params if n in have]
        if not common:
            raise TrainError(f"{os.fsdecode(weights)} holds no weights for any layer of {where} "
                             f"({', '.join(list(net.params)[:4])} ...): a caffemodel of another network?")
        engine.check_weights(types.SimpleNamespace(params={n: net.params[n] for n in common}), param, weights)
        net.copy_from(os.fsdecode(weights))
        engine.check_values(net, weights)
    missing = [n for n in net.params if n not in common]
    if missing:
        warnings.warn(f"{where}: layer(s) {', '.join(missing)} are not in the starting weights and keep their "
                      f"fillers (Caffe's fine-tuning rule)", stacklevel=3)
    return missing


def _restore(solver, state: Path, where: str) -> None:
    """solver.restore from a snapshot of this module: the solverstate's learned_net is pointed at the
    caffemodel beside it (wherever the directory is now), whose blob shapes are checked first."""
    pb2 = engine.caffe_pb2()
    model = state.with_suffix(".caffemodel")
    if not state.is_file() or not model.is_file():
        raise TrainError(f"--resume {state}: no such snapshot (a .solverstate with its .caffemodel beside it)")
    proto = pb2.SolverState()
    try:
        proto.ParseFromString(state.read_bytes())
    except Exception:
        raise TrainError(f"{state} is not a solverstate") from None
    engine.check_weights(solver.net, engine.read_caffemodel(model), model)
    proto.learned_net = str(model.resolve())
    with tempfile.TemporaryDirectory(prefix="caffe-prune-") as tmp:
        path = Path(tmp) / "resume.solverstate"
        path.write_bytes(proto.SerializeToString())
        solver.restore(str(path))


class _Snapshots:
    """Caffe writes a snapshot under snapshots/.writing/; it is moved into snapshots/ (caffemodel first,
    then the solverstate, learned_net rewritten) through caffe_prune.fsio."""

    def __init__(self, out: Path, name: str, held: HeldZero | None, keep: int | None = None):
        self.dir, self.name, self.held, self.keep = out / "snapshots", name, held, keep
        self.writing = self.dir / WRITING

    def prefix(self) -> str:
        return str((self.writing / self.name).resolve())

    def write(self, solver) -> Path:
        if self.held is not None:
            self.held.zero_weights()           # the last update's weights, before they are saved
        self.writing.mkdir(parents=True, exist_ok=True)
        solver.snapshot()
        stem = f"{self.name}_iter_{solver.iter}"
        written_model, written_state = self.writing / f"{stem}.caffemodel", self.writing / f"{stem}.solverstate"
        model, state = self.dir / f"{stem}.caffemodel", self.dir / f"{stem}.solverstate"
        with fsio.replacing(model) as tmp:
            os.replace(written_model, tmp)
        proto = engine.caffe_pb2().SolverState()
        proto.ParseFromString(written_state.read_bytes())
        proto.learned_net = str(model.resolve())
        fsio.write_bytes(state, proto.SerializeToString())
        written_state.unlink()
        if self.keep:
            older = sorted((p for p in self.dir.glob("*.solverstate") if p != state), key=_iteration)
            for old in older[:max(0, len(older) - self.keep + 1)]:
                old.unlink()                               # the solverstate first: its caffemodel is then unused
                old.with_suffix(".caffemodel").unlink(missing_ok=True)
        return state

    def clean(self) -> None:
        """What a killed snapshot left under .writing/."""
        if self.writing.is_dir():
            for stale in self.writing.iterdir():
                stale.unlink()


def _read_curve(path: Path, upto: int | None) -> list:
    lines = [json.loads(line) for line in fsio.complete_lines(path)]
    if upto is not None and any(line["iter"] > upto for line in lines):     # a resume: later lines go
        lines = [line for line in lines if line["iter"] <= upto]
        fsio.write_text(path, "".join(json.dumps(line) + "\n" for line in lines))
    return lines


def plot_curve(lines, path, title: str) -> Path:
    """Train loss and test top-1 against iteration (Caffe's plot_training_log charts 6 and 0), as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    trained = [l for l in lines if l.get("loss") is not None]
    left.plot([l["iter"] for l in trained], [l["loss"] for l in trained], color="C0", lw=1)
    left.set_xlabel("iteration")
    left.set_ylabel("train loss")
    tested = [l for l in lines if l.get("test_top1") is not None]
    right.plot([l["iter"] for l in tested], [100 * l["test_top1"] for l in tested], color="C1", marker="o", ms=3)
    right.set_xlabel("iteration")
    right.set_ylabel("test top-1 (%)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with fsio.replacing(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def _title(recipe: Recipe, out: Path) -> str:
    where = "" if recipe.where == recipe.name else f" ({recipe.where})"
    return f"{recipe.name}{where}: {out}"


def train(recipe: Recipe, out_dir, weights=None, max_iter: int | None = None, resume=None,
          held: HeldZero | None = None, mode: str = "auto", device: int = 0, progress: bool = True,
          final=None, snapshot_every: int | None = None, data_offset: int = 0, keep: int | None = None) -> dict:
    """Train ``recipe`` in the run directory ``out_dir`` (see the module docstring); returns what
    result.json holds. ``weights``: a caffemodel (or caffe.Net) to start from; ``resume``: a
    .solverstate, "latest", or "auto" (the newest snapshot when there is one, else a fresh start);
    ``held``: regions held at zero; ``final``: where the final caffemodel goes (default
    OUT/NAME.caffemodel); ``snapshot_every``: replaces the solver's ``snapshot``; ``keep``: how many
    snapshots to keep (default all; older ones are removed once a newer one is in place); ``data_offset``:
    training batches to skip first (a prune-retrain schedule continues the data where the last
    retraining stopped)."""
    from caffe_prune.passes import BLAS_THREADS, set_blas_threads
    cf = engine.caffe()
    mode = engine.set_mode(mode, device)
    set_blas_threads(BLAS_THREADS)     # as a pruning run: the same bits on any machine (caffe_prune.passes)
    out = Path(out_dir)
    with fsio.RunLock(out, "training run"):
        for stale in out.glob(".*.tmp"):
            stale.unlink()
        return _train(cf, mode, recipe, out, weights, max_iter, resume, held, progress, final, snapshot_every,
                      data_offset, keep)


def _train(cf, mode, recipe, out, weights, max_iter, resume, held, progress, final, snapshot_every, data_offset,
           keep):
    started = time.perf_counter()
    solver_param = _copy(recipe.solver)
    if max_iter is not None:
        if max_iter < 1:
            raise TrainError(f"--iters must be at least 1, got {max_iter}")
        solver_param.max_iter = max_iter
    snapshots = _Snapshots(out, recipe.name, held, keep)
    snapshots.clean()
    if resume in ("latest", "auto"):
        state = latest_solverstate(out)
        if state is None and resume == "latest":
            raise TrainError(f"--resume: no .solverstate under {out / 'snapshots'}")
        resume = state
    elif resume is not None:
        resume = Path(resume)
        if not resume.is_file():
            raise TrainError(f"--resume {resume}: no such .solverstate")
    elif latest_solverstate(out) is not None:
        raise TrainError(f"{out} holds snapshots of an earlier training: continue it with --resume latest, or use "
                         f"another --out")

    asked = {"test_interval": solver_param.test_interval, "snapshot": solver_param.snapshot,
             "display": solver_param.display, "test_initialization": solver_param.test_initialization}
    every = snapshot_every if snapshot_every is not None else solver_param.snapshot
    test_iter = solver_param.test_iter[0] if solver_param.test_iter else 0
    test_interval = solver_param.test_interval if solver_param.test_interval > 0 else solver_param.max_iter
    display = max(1, solver_param.display or 100)
    net_path = netdef.write_prototxt(recipe.net, out / "train_test.prototxt")
    solver_param.ClearField("net_param")
    solver_param.net = str(net_path.resolve())
    solver_param.snapshot_prefix = snapshots.prefix()
    solver_param.snapshot = 0                                # snapshots are driven from here (_Snapshots)
    solver_param.snapshot_format = solver_param.BINARYPROTO
    solver_param.test_interval = solver_param.max_iter + 1   # and tests (Caffe CHECKs test_interval > 0)
    solver_param.test_initialization = False
    solver_param.solver_mode = solver_param.GPU if mode.startswith("GPU") else solver_param.CPU
    if not solver_param.HasField("random_seed") or solver_param.random_seed < 0:
        solver_param.random_seed = 0                         # the same command trains the same bits
    solver_path = netdef.write_prototxt(solver_param, out / "solver.prototxt")
    for phase in ("train", "test"):
        engine.probe_construct(net_path, phase, recipe.where)   # a Caffe CHECK becomes one line, not an abort

    solver = cf.get_solver(str(solver_path))
    if held is not None:
        held.bind(solver.net, recipe.where)     # refused before anything is trained or recorded
    if resume is not None:
        _restore(solver, resume, recipe.where)
    elif weights is not None:
        _load_weights(solver.net, weights, recipe.where)
    if held is not None:
        held.zero_weights()
    asked_gpu = recipe.solver.HasField("solver_mode") and recipe.solver.solver_mode == recipe.solver.GPU
    if asked_gpu and not mode.startswith("GPU"):
        warnings.warn(f"{recipe.source.get('path', recipe.where)} asks for solver_mode: GPU; training on the CPU "
                      f"({'this pycaffe is CPU_ONLY' if not engine.gpu_built() else 'as asked'})", stacklevel=3)

    previous = _previous_asked(out)
    record = {"source": recipe.source, "weights": _weights_record(weights), "solver_set": recipe.overrides,
              "schedule": asked, "max_iter": solver_param.max_iter, "data": recipe.data,
              "held_zero": held.describe() if held is not None else None, "data_offset": data_offset,
              "mode": mode}
    if resume is not None and previous is not None:
        record = {**previous, "resumed": previous.get("resumed", []) + [{"from": str(resume), "max_iter":
                                                                         solver_param.max_iter}]}
    fsio.write_json(out / ASKED, record)
    losses = [(solver.net.blobs[top], weight) for top, weight in _loss_blobs(recipe.net)]   # looked up once
    window = []

    def on_start():
        if held is not None:
            held.zero_weights()

    def on_gradients_ready():
        if held is not None:
            held.zero_gradients()
        window.append(sum(weight * float(blob.data) for blob, weight in losses))

    solver.add_callback(on_start, on_gradients_ready)
    _advance(solver.net, recipe.net, "train", (data_offset + solver.iter) * max(1, solver_param.iter_size))
    initial_test = bool(solver.test_nets and test_iter and asked["test_initialization"])   # Caffe's test at 0
    if solver.test_nets and test_iter:
        tested = solver.iter // test_interval + (initial_test and solver.iter > 0)
        _advance(solver.test_nets[0], recipe.net, "test", tested * test_iter)
    top1 = _top1_blob(recipe.net)
    curve = _read_curve(out / CURVE, solver.iter if resume is not None else None)
    if resume is None and curve:
        fsio.write_text(out / CURVE, "")
        curve = []
    if initial_test and solver.iter == 0 and not curve:
        scores = test_scores(solver, test_iter, top1)
        curve.append({"iter": 0, "loss": None, "test_top1": scores["top1"], "test": scores["outputs"]})
        fsio.append_line(out / CURVE, json.dumps(curve[-1]))
    bar = tqdm(total=solver_param.max_iter, initial=solver.iter, desc=f"train {recipe.name}", unit="iter",
               disable=not progress)
    last_test = next((l for l in reversed(curve) if "test" in l), None)
    try:
        while solver.iter < solver_param.max_iter:
            now = solver.iter
            stops = [solver_param.max_iter] + [(now // k + 1) * k for k in (display, test_interval, every) if k]
            chunk = min(stops) - now
            window.clear()
            solver.step(chunk)
            bar.update(chunk)
            line = {"iter": solver.iter, "loss": float(np.mean(window)) if window else None}
            if solver.test_nets and test_iter and (solver.iter % test_interval == 0 or
                                                   solver.iter == solver_param.max_iter):
                if held is not None:
                    held.zero_weights()
                scores = test_scores(solver, test_iter, top1)
                line.update(test_top1=scores["top1"], test=scores["outputs"])
                last_test = line
            fsio.append_line(out / CURVE, json.dumps(line))
            curve.append(line)
            if every and solver.iter % every == 0 and solver.iter < solver_param.max_iter:
                snapshots.write(solver)
            shown = last_test.get("test_top1") if last_test else None
            bar.set_postfix(loss=f"{line['loss']:.4f}" if line["loss"] is not None else "-",
                            test_top1="-" if shown is None else f"{shown:.3f}")
    except KeyboardInterrupt:
        bar.close()
        snapshots.write(solver)
        plot_curve(curve, out / CURVE_PNG, _title(recipe, out))
        raise Interrupted(f"interrupted at iteration {solver.iter}; snapshot written, continue with "
                         f"--resume latest") from None
    bar.close()
    state = snapshots.write(solver)            # the final state too: a later --iters continues from it
    final = Path(final) if final is not None else out / f"{recipe.name}.caffemodel"
    with fsio.replacing(final) as tmp:
        solver.net.save(str(tmp))
    plot_curve(curve, out / CURVE_PNG, _title(recipe, out))
    result = {"network": recipe.name, "iterations": solver.iter, "final_loss": curve[-1]["loss"] if curve else None,
              "test_top1_net": last_test.get("test_top1") if last_test else None,
              "test_net": last_test.get("test") if last_test else None, "weights": str(final),
              "prototxt": str(net_path), "solver": str(solver_path), "solverstate": str(state),
              "curve": str(out / CURVE_PNG), "seconds": round(time.perf_counter() - started, 3), "mode": mode}
    if held is not None:
        stray = held.nonzero(solver.net)
        if stray:     # cannot happen (see HeldZero); said loudly if it ever does
            raise TrainError(f"internal error: {stray} held-zero values are not 0 after training; please report it")
        result["held_zero"] = {"values": held.values, "nonzero_after": stray}
    fsio.write_json(out / RESULT, result)
    return result


def _previous_asked(out: Path) -> dict | None:
    try:
        value = json.loads((out / ASKED).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _weights_record(weights) -> dict | None:
    if weights is None:
        return None
    if hasattr(weights, "params"):
        return {"from": "the pruning session's net (its current parameters)"}
    return {"path": os.fsdecode(weights), "sha256": digest(weights, "sha256")}


# ---- scoring a trained net on the project's evaluation path ------------------------------------

def score(recipe: Recipe, weights, progress: bool = False) -> dict:
    """top-1, top-5 and loss of ``weights`` on the recipe's test images by caffe_prune.evaluate (the
    built-in networks: the CIFAR-10 test split; otherwise what the TEST data layer as used reads)."""
    from caffe_prune.data.dataset import open_dataset
    from caffe_prune.session import Network, Session
    network = Network(recipe.net, recipe.where, recipe.builtin, networks.IMAGE_SHAPE if recipe.builtin else None)
    data = recipe.cifar10 if recipe.builtin else None
    dataset = open_dataset(network, data, progress=progress, holdout=False)
    session = Session(network, os.fsdecode(weights), dataset)
    scores = session.evaluate(dataset.test.x, dataset.test.y, progress=progress)
    return {**scores, "data": dataset.description}


# ---- prune-retrain (caffe_prune.pruning) -------------------------------------------------------

def retrained_weights(run_dir, last_step: int, steps) -> Path | None:
    """The newest ``retrained-<s>.caffemodel`` of a pruning run with s <= last_step among the steps
    that record a retraining (what a resumed run must load before re-committing its masks)."""
    done = [s["step"] for s in steps if "retrain" in s and s["step"] <= last_step]
    for step in sorted(done, reverse=True):
        path = Path(run_dir) / f"retrained-{step}.caffemodel"
        if path.is_file():
            return path
        raise engine.EngineError(f"{path} is missing, but step {step} of {run_dir} records its retraining; the run "
                                 f"directory is damaged: use --force (starts over) or another --out")
    return None


def retrain(session, masker, recipe_: Recipe, run_dir, step: int, iters: int, data_offset: int = 0,
            progress: bool = True) -> dict:
    """Fine-tune a pruning session's net in place: ``iters`` solver iterations of ``recipe_`` (the
    training form of the same network) starting from the session net's parameters, with the
    masker's committed groups held at zero; the result is saved atomically as
    RUN/retrained-<step>.caffemodel and copied back into the session's net. The training run
    directory is RUN/retrain-<step>/: a kill during retraining resumes from its newest snapshot (one
    every quarter of the iterations and one at the end, the newest kept); the snapshots of earlier
    retrainings, whose steps are recorded, are removed."""
    run_dir = Path(run_dir)
    for earlier in run_dir.glob("retrain-*/snapshots"):
        if earlier.parent.name != f"retrain-{step}":
            for path in sorted(earlier.glob("*"), key=lambda p: p.suffix != ".solverstate"):
                if path.is_file():
                    path.unlink()
    held = HeldZero.of(masker, masker.committed, f"the pruning run {run_dir}")
    final = run_dir / f"retrained-{step}.caffemodel"
    start = time.perf_counter()
    try:
        done = train(recipe_, run_dir / f"retrain-{step}", weights=session.net, max_iter=iters, resume="auto",
                     held=held, mode="auto", progress=progress, final=final,
                     snapshot_every=max(1, math.ceil(iters / 4)), data_offset=data_offset, keep=1)
    except Interrupted:
        raise KeyboardInterrupt from None       # the pruning run resumes it: rerun the same command
    session.net.copy_from(str(final))
    return {"iters": iters, "weights": final.name, "seconds": round(time.perf_counter() - start, 3),
            "final_loss": done["final_loss"]}

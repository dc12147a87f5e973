"""What is trained: a train/test definition with its data sources as used, and its solver.

``recipe(SPEC)``: one of the six built-in networks (its train/test definition and the authors'
schedule, networks.solver), a train/test prototxt (the same schedule, DEFAULT_SCHEDULE), or a solver
prototxt whose ``net:`` names the definition (relative to the working directory: Caffe's rule) or
whose ``net_param`` holds it; ``--solver-set key=value`` overrides any SolverParameter field (what
Caffe's Solver would CHECK-abort on is refused first, in one line). Data: the built-in networks read
CIFAR-10 LMDBs written by caffe_prune.data.cifar10_convert.prepare; ``--data`` (CIFAR-10) points any net's
``Data`` layers at those LMDBs; otherwise a net reads what its own data layers name, checked to exist.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from caffe_prune import layers, networks, phases, pycaffe
from caffe_prune.data import layer_records
from caffe_prune.data.dataset import default_channel_order
from caffe_prune.layers import DATA_TYPES
from caffe_prune.errors import InputError

# a definition given without a solver trains on the authors' published schedule (networks.SOLVERS:
# SGD, base_lr 0.001, momentum 0.9, weight decay 5e-4, fixed rate), the built-in networks' own
DEFAULT_SCHEDULE = "LeNet-5"
# fields the run directory decides (where files go, how testing and snapshots are driven)
MANAGED = ("net", "net_param", "train_net", "test_net", "train_net_param", "test_net_param", "snapshot_prefix",
           "snapshot_format")


class TrainError(InputError):
    """A training request that cannot be carried out; the message is one line."""


class Interrupted(TrainError):
    """Ctrl-C during training, after the snapshot was written."""


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
    """Whether a --data value names CIFAR-10 (caffe_prune.data.cifar10.names_cifar10)."""
    from caffe_prune.data import cifar10
    return cifar10.names_cifar10(data)


def recipe(spec, data=None, data_out=None, solver_set=(), progress: bool = True,
           channel_order: str | None = None) -> Recipe:
    """The Recipe for SPEC: a built-in network's name, a train/test prototxt, or a solver prototxt.
    ``channel_order``: the planes CIFAR-10's LMDBs are written in for ``data`` (None: the network's
    default, caffe_prune.data.dataset.default_channel_order, as evaluate and prune will feed it)."""
    spec = os.fsdecode(spec)
    if spec in networks.NETWORKS:
        solver = networks.solver(spec)
        return _finish(networks.train_test(spec), solver, spec, spec, {"kind": "network", "name": spec},
                       data, data_out, solver_set, progress, builtin=spec, solver_given=False,
                       channel_order=channel_order)
    path = Path(spec)
    if not path.is_file():
        raise TrainError(f"{spec} is neither a prototxt nor one of the built-in networks "
                         f"({', '.join(networks.NETWORKS)})")
    if path.suffix == ".caffemodel":
        raise TrainError(f"{spec} is a caffemodel: train its definition (a train/test prototxt or a solver) and "
                         f"pass it as --weights")
    solver = _as_solver(path)
    if solver is None:
        net = pycaffe.read_prototxt(path)
        return _finish(net, networks.solver(DEFAULT_SCHEDULE), spec, net.name or path.stem,
                       {"kind": "prototxt", "path": spec}, data, data_out, solver_set, progress, solver_given=False,
                       channel_order=channel_order)
    net, net_where = _solver_net(solver, spec)
    return _finish(net, solver, net_where, net.name or Path(net_where).stem,
                   {"kind": "solver", "path": spec, "net": net_where}, data, data_out, solver_set, progress,
                   solver_given=True, channel_order=channel_order)


def recipe_of(network, data=None, data_out=None, solver_set=(), progress: bool = True,
              channel_order: str | None = None) -> Recipe:
    """The Recipe for a caffe_prune.session.Network (a pruning run's): a built-in network's own, or the
    definition the network was opened from (which must read training images)."""
    if network.builtin:
        return recipe(network.builtin, data, data_out, solver_set, progress, channel_order)
    data = data if data is not None and is_cifar10(data) else None      # else: the net's own data layers
    return _finish(network.param, networks.solver(DEFAULT_SCHEDULE), network.where, network.name,
                   {"kind": "prototxt", "path": network.where}, data, data_out, solver_set, progress,
                   solver_given=False, channel_order=channel_order)


def _as_solver(path: Path):
    """The SolverParameter a prototxt holds, or None when it is a net definition."""
    from google.protobuf import text_format
    pb2 = pycaffe.caffe_pb2()
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
    return pycaffe.read_prototxt(net_path), solver.net


def _finish(net_param, solver, where, name, source, data, data_out, solver_set, progress, builtin=None,
            solver_given=False, channel_order: str | None = None) -> Recipe:
    from caffe_prune.data import cifar10_convert
    source["definition_sha256"] = _sha256(net_param)
    train_layers = [l for l in phases.layers_in_phase(net_param, "train") if l.type in DATA_TYPES]
    test_layers = [l for l in phases.layers_in_phase(net_param, "test") if l.type in DATA_TYPES]
    if not train_layers or all(layers.is_fed(l) for l in train_layers):
        raise TrainError(f"{where} has no data layer in the TRAIN phase to read training images from: train a "
                         f"train/test definition (Data, ImageData or HDF5Data layers), not a deploy one")
    location = None
    if data is not None or builtin:
        location = None if data is None or os.fsdecode(data) == "cifar10" else os.fsdecode(data)
        if data is not None and not is_cifar10(data):
            raise TrainError(f"--data {os.fsdecode(data)}: training reads CIFAR-10 into LMDBs (cifar10, a directory, "
                             f"archive or URL); for other data point the net's own data layers at it")
        others = sorted({l.type for l in train_layers + test_layers if layers.reader(l) != "db"})
        if others:
            raise TrainError(f"--data points a net's Data layers at CIFAR-10 LMDBs, but {where} reads through "
                             f"{', '.join(others)} layers; point them at your data instead")
        unphased = [l.name for l in train_layers if not any(rule.HasField("phase") for rule in l.include)]
        if unphased:
            raise TrainError(f"--data: {where}'s data layer {unphased[0]!r} reads in both phases; give it "
                             f"include {{ phase: TRAIN }} (and a TEST layer) so that it reads the training images")
        order = channel_order or default_channel_order(net_param, bool(builtin))[0]
        prepared = cifar10_convert.prepare(location, data_out, progress=progress, order=order)
        net_param = _with_sources(net_param, prepared["paths"]["train"], prepared["paths"]["test"])
        cifar10_convert.check_data_layers(net_param, where)   # uint8 LMDBs written by caffe_prune.data, one order
        data_record = {"kind": "cifar10", "source": prepared["source"], "counts": prepared["counts"],
                       "channel_order": order, "lmdb": {k: prepared["paths"][k] for k in ("train", "test")}}
        test_images = prepared["counts"]["test"]
    else:
        if channel_order is not None:
            raise TrainError(f"--channel-order {channel_order}: {where}'s own data layers are read as their records "
                             f"are stored; the order is chosen only for CIFAR-10 written from its release (--data)")
        for phase in ("train", "test"):
            pycaffe.check_net(net_param, phase, where, sources=True)
        recorded = cifar10_convert.check_data_layers(net_param, where, recorded_only=True)   # one order
        data_record = {"kind": "the net's data layers", **({"channel_order": recorded} if recorded else {}),
                       "layers": [[l.name, l.type, layers.source(l)] for l in train_layers + test_layers]}
        test_images = None
        if test_layers and layers.is_reader(test_layers[0]):
            try:
                test_images = layer_records.count(test_layers[0])
            except ValueError:
                test_images = None
    for phase in ("train", "test"):
        pycaffe.check_net(net_param, phase, where)
    solver = copied(solver)
    if not solver_given:      # our schedule: test on every test image once (the authors' read 12,800, wrapping)
        batch = layers.batch_size(test_layers[0]) if test_layers else 0
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
    pb2 = pycaffe.caffe_pb2()
    out = pb2.NetParameter()
    out.CopyFrom(net_param)
    for layer in out.layer:
        if layers.reader(layer) == "db":
            phases = {rule.phase for rule in layer.include}
            layer.data_param.source = str(train_lmdb if pb2.TRAIN in phases else test_lmdb)
            layer.data_param.backend = pb2.DataParameter.LMDB
    return out


def copied(message):
    """A copy of a protobuf message."""
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

"""The one way into a network, for every command and library entry point.

``Network.open(NET)``: NET is one of the six built-in networks, a prototxt, or a caffemodel whose
embedded definition is used. The structure (``graph``, ``structure``) needs nothing else: the
input shape comes from the prototxt (caffe_prune.netdef.declared_input_shape) or ``--input-shape``.

``Session.open(NET, WEIGHTS, data, ...)`` (or ``Session.from_config(config)`` for a pruning run's
caffe_prune.pruning.Config) adds what evaluation, saliency, pruning and export need, in one order
every caller shares: the network, its classifier head (``--logits`` or found; a net without one is
refused before any data is read), the dataset (caffe_prune.data.dataset, its transform from the
data layers or the transform flags), the Caffe mode, and the net built in Caffe with the weights:
the evaluation form (the layers feeding the logits, scored by Caffe's own loss and accuracy
layers) or, for export, the structure form (every layer), with the channel graph of that net.
"""
from __future__ import annotations

import os
import warnings
from functools import cached_property
from pathlib import Path

import numpy as np

from caffe_prune.layers import effects
from caffe_prune import evaluate, forks, netdef, networks, pycaffe
from caffe_prune.data.dataset import open_dataset
from caffe_prune.data.transform import Transform
from caffe_prune.graph import ChannelGraph
from caffe_prune.errors import InputError


def parse_shape(text) -> tuple | None:
    """``--input-shape C,H,W`` -> (C, H, W)."""
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in str(text).replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"--input-shape {text!r} is not C,H,W with three positive integers (e.g. 3,224,224)")
    return shape


class Network:
    """A network definition and where it came from (``where`` names it in every message)."""

    def __init__(self, param, where: str, builtin: str | None = None, input_shape=None):
        self.param, self.where, self.builtin = param, where, builtin
        self._input_shape = tuple(input_shape) if input_shape else None
        self._shapes = {}

    @classmethod
    def open(cls, spec, input_shape=None, fork_layers: bool = False) -> "Network":
        """``fork_layers``: rewrite the fork layers of public models as stock ones (caffe_prune.forks),
        with a note; without it they are refused in one line, as every type stock Caffe lacks."""
        spec = os.fsdecode(spec)
        if spec in networks.NETWORKS:
            return cls(networks.train_test(spec), spec, spec, input_shape or networks.IMAGE_SHAPE)
        path = Path(spec)
        if not path.exists():
            raise InputError(f"{spec} is neither a file nor one of the built-in networks "
                                     f"({', '.join(networks.NETWORKS)})")
        reader = forks.read_prototxt if fork_layers else pycaffe.read_prototxt
        if path.name.endswith(".caffemodel.h5"):
            raise InputError(f"{spec} is an HDF5 caffemodel, which holds weights but no network definition; "
                             f"give the net's prototxt as NET and {path.name} as WEIGHTS")
        param = pycaffe.read_caffemodel(path) if path.suffix == ".caffemodel" else reader(path)
        if not param.layer and not param.input:
            raise InputError(f"{spec} defines no layers: not a network prototxt")
        if fork_layers:
            param, notes = forks.rewrite(param, input_shape, spec)
            if notes:
                warnings.warn(f"{spec}: --fork-layers rewrote {'; '.join(notes)}", stacklevel=2)
        pycaffe.check_net(param, None, spec)
        return cls(param, spec, None, input_shape)

    @property
    def name(self) -> str:
        return self.param.name or Path(self.where).stem

    def declared_shape(self) -> tuple | None:
        """The input shape the definition (or --input-shape) states, or None when nothing does."""
        try:
            return self.input_shape
        except (InputError, ValueError):
            return None

    @cached_property
    def input_shape(self) -> tuple:
        """(C, H, W) the prototxt states (or --input-shape); InputError when nothing does."""
        return self._input_shape or netdef.declared_input_shape(self.param, self.where)

    def structure(self, input_shape=None):
        return netdef.structure_form(self.param, input_shape or self.input_shape, self.where)

    def shapes(self, input_shape=None, what: str = "blobs") -> dict:
        """{blob: shape} (``what="params"``: {layer: [parameter blob shapes]}; "bytes_per_image") of
        the structure form as Caffe computes them (netdef.shapes)."""
        shape = tuple(input_shape or self.input_shape)
        if shape not in self._shapes:
            self._shapes[shape] = netdef.shapes(self.structure(shape), self.where)
        return self._shapes[shape][what]

    @cached_property
    def graph(self) -> ChannelGraph:
        """The channel graph of the whole net (every TEST-phase layer but the label readers)."""
        return ChannelGraph.build(self.structure(), self.shapes(), self.shapes(what="params"))

    def head(self, logits: str | None = None) -> netdef.Head:
        return netdef.choose_head(self.param, logits, self.where)

    def classes(self, head: netdef.Head, input_shape=None) -> int:
        shape = self.shapes(input_shape).get(head.logits)
        if shape is None or len(shape) < 2:
            raise InputError(f"{self.where}: the logits blob {head.logits!r} has no class axis "
                                     f"(shape {shape}); choose another with --logits")
        return int(shape[1])


FORMS = ("evaluation", "structure")


class Session:
    """Network + weights + dataset + mode: the net in Caffe (the evaluation form, or the structure
    form for export) and its channel graph."""

    def __init__(self, network: Network, weights=None, dataset=None, batch_size: int = 128,
                 logits: str | None = None, mode: str = "auto", input_shape=None, device: int = 0,
                 form: str = "evaluation"):
        if form not in FORMS:
            raise InputError(f"form {form!r} is not one of {', '.join(FORMS)}")
        pycaffe.set_mode(mode, device)
        self.form = form                  # the form's name; self.param is its NetParameter
        self.network, self.dataset, self.weights = network, dataset, weights
        self.batch_size = batch_size
        self.input_shape = dataset.shape if dataset is not None else tuple(input_shape or network.input_shape)
        declared = network.declared_shape()
        if dataset is not None and declared and declared != self.input_shape:
            raise InputError(f"{dataset.description}: the images are {'x'.join(map(str, self.input_shape))} after "
                                     f"the transform, but {network.where} takes {'x'.join(map(str, declared))}; pass "
                                     f"--crop-size, other --data or --input-shape")
        self.head = self.classes = None
        if form == "evaluation":
            self.head = network.head(logits)
            if self.head.note:
                warnings.warn(self.head.note, stacklevel=2)
            self.classes = network.classes(self.head, self.input_shape)
            if dataset is not None:
                dataset.check_batches(self.classes, network.where)   # every batch read is checked
            self.param = netdef.evaluation_form(network.param, self.input_shape, batch_size, self.head, self.classes)
        else:
            self.param = network.structure(self.input_shape)
        if form == "evaluation":
            self._check_memory(batch_size)
        built = netdef.without_fillers(self.param) if weights is not None else self.param   # every blob is loaded
        self.net = pycaffe.net_from_param(built, weights, where=network.where)
        self.graph = ChannelGraph.of_net(self.param, self.net)

    def _check_memory(self, batch_size: int) -> None:
        """Refuse a batch whose blobs cannot fit (one line) rather than let the kernel kill the process
        mid-forward: Caffe holds every blob of the net, and some layers' buffers, for the whole batch
        (netdef.shapes: bytes_per_image; measured: ResNet-50 at 224x224 and batch 128 took 20 GiB
        before it was killed)."""
        per_image = self.network.shapes(self.input_shape, what="bytes_per_image")
        need, available = per_image * batch_size, pycaffe.available_bytes()
        if need > available:
            fits = max(1, int(0.8 * available // per_image))
            raise InputError(f"{self.network.where}: its blobs take {per_image / 2 ** 20:.1f} MiB per image, "
                                     f"{need / 2 ** 30:.1f} GiB at batch {batch_size}, more than the "
                                     f"{available / 2 ** 30:.1f} GiB available; use --batch-size {fits} or less")

    @classmethod
    def open(cls, net, weights=None, data=None, *, transform: dict | None = None, data_root: str = "",
             input_shape=None, logits: str | None = None, batch_size: int = 128, mode: str = "auto",
             device: int = 0, val_split: str = "seeded", holdout: bool = True, with_data: bool = True,
             form: str = "evaluation", progress: bool = True, allow_python_layers: bool | None = None,
             fork_layers: bool = False, val_transform: dict | None = None, channel_order: str | None = None,
             val_from: str = "train") -> "Session":
        """The session every command and entry point opens: ``net`` a Network or what Network.open
        takes; ``data`` what caffe_prune.data.dataset.open_dataset takes (None: the net's own data
        layers, CIFAR-10 for the built-in networks); ``transform`` the transform flags as plain data
        ({scale, mean_value, mean_file, crop_size}: Transform.from_fields), replacing the data
        layers'; ``with_data`` False opens no dataset (export with random inputs, structure only);
        ``allow_python_layers`` lets Caffe build the net's Python layers in this process from now on
        (True), refuses them (False), or leaves the process's choice (None: layers.effects.allow_python_layers);
        ``fork_layers``: Network.open's; ``val_transform`` the validation split's transform flags,
        ``channel_order`` and ``val_from``: open_dataset's."""
        if allow_python_layers is not None:
            effects.allow_python_layers(allow_python_layers)
        network = net if isinstance(net, Network) else Network.open(net, parse_shape(input_shape), fork_layers)
        if form == "evaluation":
            network.head(logits)                  # a net with no head is refused before any data is read
        dataset = open_dataset(network, data, Transform.from_fields(transform), data_root, progress=progress,
                               holdout=holdout, val_split=val_split, val_transform=Transform.from_fields(val_transform),
                               channel_order=channel_order, val_from=val_from) if with_data else None
        return cls(network, None if weights is None else os.fsdecode(weights), dataset, batch_size, logits, mode,
                   device=device, form=form)

    @classmethod
    def from_config(cls, config, weights=None, progress: bool = True, mode: str = "auto") -> "Session":
        """The session of a pruning run's configuration (caffe_prune.pruning.Config: net, weights,
        data, data_root, transform, input_shape, logits, batch_size, val_split); ``weights``
        replaces the configuration's (a retrained caffemodel)."""
        return cls.open(config.net, weights if weights is not None else config.weights, config.data,
                        transform=config.transform, data_root=config.data_root, input_shape=config.input_shape,
                        logits=config.logits, batch_size=config.batch_size, mode=mode,
                        val_split=config.val_split, progress=progress,
                        # a run's record may allow Python layers, never take back what this process allowed
                        allow_python_layers=True if getattr(config, "allow_python_layers", False) else None,
                        fork_layers=config.fork_layers, val_transform=config.val_transform,
                        channel_order=config.channel_order, val_from=config.val_from)

    def evaluate(self, x, y=None, batches: int | None = None, progress: bool = False) -> dict:
        """Scores of images ``x`` with labels ``y``, or of a dataset split ``x`` (streamed)."""
        return evaluate.evaluate(self.net, x, y, self.batch_size, batches=batches, progress=progress)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The logits of images ``x`` (labels are not read)."""
        evaluate.feed(self.net, x, np.zeros(len(x)))
        self.net.forward()
        return self.net.blobs[self.head.logits].data.copy()

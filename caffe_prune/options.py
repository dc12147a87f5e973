"""The command line's shared options, parsed once at the boundary into the objects inner code takes:
a ``Network`` (NET, ``--input-shape``), a ``Transform`` (``--scale``, ``--mean-value``,
``--mean-file``, ``--crop-size``), a ``Dataset`` (``--data``, ``--data-root``) and a ``Session``
(``--logits``, ``--batch-size``, ``--gpu``/``--cpu``)."""
from __future__ import annotations

import argparse

from caffe_prune import engine
from caffe_prune.data.transform import Transform
from caffe_prune.session import Network, Session, parse_shape

DATA_HELP = ("cifar10 or a CIFAR-10 directory/archive/URL, an LMDB or LevelDB of Datums, an ImageData list file, "
             "an HDF5Data list file, or a prototxt whose data layers name the sources (default: the net's own "
             "data layers; CIFAR-10 for the built-in networks)")


def positive(text) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def add_network(p, weights: bool = True, weights_required: bool = True) -> None:
    p.add_argument("net", help="a built-in network (LeNet-5, CIFAR10, ResNet-20, NIN, AlexNet, SqueezeNet), "
                               "a prototxt, or a caffemodel whose embedded definition is used")
    if weights:
        p.add_argument("weights", nargs=None if weights_required else "?", help="caffemodel")
    p.add_argument("--input-shape", default=None, metavar="C,H,W",
                   help="the image shape, when the prototxt does not state it")


def add_head(p) -> None:
    p.add_argument("--logits", default=None, metavar="BLOB",
                   help="the classifier's logits blob (default: the last SoftmaxWithLoss's input, else the "
                        "last Softmax's, else the last InnerProduct's output)")


def add_data(p) -> None:
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("--data-root", default="", metavar="DIR", help="root_folder of an ImageData list given as --data")
    p.add_argument("--scale", type=float, default=None, help="transform_param scale (replaces the net's transform)")
    p.add_argument("--mean-value", type=float, action="append", default=None, metavar="V",
                   help="transform_param mean_value (once, or once per channel in B,G,R order)")
    p.add_argument("--mean-file", default=None, help="transform_param mean_file (a binaryproto)")
    p.add_argument("--crop-size", type=int, default=None, help="transform_param crop_size (the centre, as in TEST)")


def add_mode(p) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--gpu", nargs="?", type=int, const=0, default=None, metavar="ID",
                      help="run Caffe on GPU ID (default 0); needs a CUDA build")
    mode.add_argument("--cpu", action="store_true", help="run Caffe on the CPU even in a CUDA build")


def add_training(p) -> None:
    """What `train` and `finetune` share (caffe_prune.train): schedule overrides, data, resume, mode."""
    p.add_argument("--iters", type=int, default=None, help="the solver's max_iter (same as --solver-set max_iter=N)")
    p.add_argument("--solver-set", action="append", default=None, metavar="KEY=VALUE",
                   help="override a SolverParameter field (repeatable): base_lr=0.01, lr_policy=step, stepsize=1000, "
                        "momentum=0.9, weight_decay=5e-4, test_iter=10, snapshot=500, type=Nesterov ...")
    p.add_argument("--data", default=None,
                   help="CIFAR-10 (cifar10, a directory, archive or URL) for the net's Data layers, written as LMDBs "
                        "(default: the built-in networks read CIFAR-10, other nets their own data layers)")
    p.add_argument("--data-out", default=None, help="where the CIFAR-10 LMDBs go (default: the data cache)")
    p.add_argument("--resume", default=None, help="a .solverstate, or 'latest' (the newest snapshot in the run directory)")
    add_mode(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def mode(args) -> tuple:
    """(mode, device) for engine.set_mode."""
    if getattr(args, "gpu", None) is not None:
        return "gpu", args.gpu
    return ("cpu" if getattr(args, "cpu", False) else "auto"), 0


def transform_fields(args) -> dict | None:
    """The transform flags as plain data (what a run's config records), or None when none was given."""
    fields = {"scale": args.scale, "mean_value": args.mean_value, "mean_file": args.mean_file,
              "crop_size": args.crop_size}
    fields = {k: v for k, v in fields.items() if v is not None}
    return fields or None


def transform_of(fields: dict | None) -> Transform | None:
    if not fields:
        return None
    tp = engine.caffe_pb2().TransformationParameter()
    for key, value in fields.items():
        if key == "mean_value":
            tp.mean_value.extend(value)
        elif key == "crop_size" and value < 0:
            raise engine.EngineError(f"--crop-size {value} must be at least 0")
        else:
            setattr(tp, key, value)
    return Transform.from_param(tp, "the command line's transform")


def network(args) -> Network:
    return Network.open(args.net, parse_shape(getattr(args, "input_shape", None)))


def dataset(args, net: Network, progress: bool = True, holdout: bool = True):
    from caffe_prune.data.dataset import open_dataset
    return open_dataset(net, args.data, transform_of(transform_fields(args)), args.data_root, progress=progress,
                        holdout=holdout)


def session(args, net: Network | None = None, with_data: bool = True, batch_size: int = 128, progress=True,
            holdout: bool = True):
    net = net or network(args)
    net.head(args.logits)                      # a net with no head is refused before any data is read
    data = dataset(args, net, progress, holdout) if with_data else None
    chosen, device = mode(args)
    return Session(net, args.weights, data, batch_size=batch_size, logits=args.logits, mode=chosen,
                   device=device)

"""The command line's shared options, parsed once at the boundary into the objects inner code takes:
a ``Network`` (NET, ``--input-shape``), the transform flags (``--scale``, ``--mean-value``,
``--mean-file``, ``--crop-size``), a ``Session`` (``--data``, ``--data-root``, ``--logits``,
``--batch-size``, ``--gpu``/``--cpu``: caffe_prune.session.Session.open) and a pruning run's
``Config`` (Algorithm 1's knobs: their defaults are read from caffe_prune.pruning.Config, never
restated here)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import warnings

from caffe_prune import engines, masking, metrics, oracle
from caffe_prune.data.dataset import CHANNEL_ORDERS, VAL_FROM, VAL_SPLITS
from caffe_prune.metrics.methods import DEFAULT_FORMS, PAPER_FORMS
from caffe_prune.errors import InputError, NoDataset
from caffe_prune.pruning import Config
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


def step_number(text):
    """A run's step: a whole number of at least 1, or ``last`` (-1: its last step)."""
    return -1 if str(text).strip().lower() == "last" else positive(text)


def add_network(p, weights: bool = True, weights_required: bool = True) -> None:
    p.add_argument("net", help="a built-in network (LeNet-5, CIFAR10, ResNet-20, NIN, AlexNet, SqueezeNet), "
                               "a prototxt, or a caffemodel whose embedded definition is used")
    if weights:
        p.add_argument("weights", nargs=None if weights_required else "?",
                       help="caffemodel, or 'published': the authors' weights of a built-in network (LeNet-5, "
                            "CIFAR10, NIN, ResNet-20; checked by sha256, downloaded once)")
    p.add_argument("--input-shape", default=None, metavar="C,H,W",
                   help="the image shape, when the prototxt does not state it")
    p.add_argument("--fork-layers", action="store_true",
                   help="rewrite the Caffe-fork layers of public models as stock layers computing the same "
                        "(ReLU6, ConvolutionDepthwise, ShuffleChannel, Axpy, Pooling ceil_mode; caffe_prune.forks)")
    add_trust(p)


def add_trust(p) -> None:
    """``--allow-python-layers``: a Python layer is its module's code, run when Caffe builds the net
    (caffe_prune.layers.effects); without the flag such a definition is refused (caffe_prune.cli sets
    layers.effects.allow_python_layers from it, and a run's Config records it)."""
    p.add_argument("--allow-python-layers", action="store_true",
                   help="let Caffe build the net's Python layers, which imports and runs the modules they name "
                        "with your rights (only for a definition you trust)")


def resolve_published(args) -> None:
    """WEIGHTS ``published``: the path of the authors' caffemodel of the built-in NET."""
    if getattr(args, "weights", None) == "published":
        from caffe_prune import published_weights
        args.weights = str(published_weights.caffemodel(args.net))


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
    for flag, kind, what in (("scale", float, "scale"), ("mean-value", float, "mean_value"),
                             ("mean-file", str, "mean_file"), ("crop-size", int, "crop_size")):
        p.add_argument(f"--val-{flag}", type=kind, default=None, metavar="V" if flag == "mean-value" else None,
                       action="append" if flag == "mean-value" else None,
                       help=f"transform_param {what} of the validation images only (their TRAIN phase's)")
    add_channel_order(p)


def add_channel_order(p) -> None:
    p.add_argument("--channel-order", choices=CHANNEL_ORDERS, default=None,
                   help="CIFAR-10's plane order as the net was (or is) trained on it: bgr (the authors' PNG pipeline; "
                        "default for the six built-in networks and a net whose data layers read through OpenCV or an "
                        "LMDB recorded as BGR) or rgb (Caffe's convert_cifar_data; default for any other net)")


def add_val_from(p, default: str = VAL_FROM[0]) -> None:
    """--val-from: what draws validation images (prune, sweep, saliency)."""
    p.add_argument("--val-from", choices=VAL_FROM, default=default,
                   help="where the validation images come from: train (default: the training images) or test (drawn "
                        "from the test source and held out of it, when there are no training images)")


def add_mode(p) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--gpu", nargs="?", type=int, const=0, default=None, metavar="ID",
                      help="run Caffe on GPU ID (default 0); needs a CUDA build")
    mode.add_argument("--cpu", action="store_true", help="run Caffe on the CPU even in a CUDA build")


def add_training(p) -> None:
    """What `train` and `finetune` share (caffe_prune.train): schedule overrides, data, resume, mode."""
    add_trust(p)
    p.add_argument("--iters", type=int, default=None, help="the solver's max_iter (same as --solver-set max_iter=N)")
    p.add_argument("--solver-set", action="append", default=None, metavar="KEY=VALUE",
                   help="override a SolverParameter field (repeatable): base_lr=0.01, lr_policy=step, stepsize=1000, "
                        "momentum=0.9, weight_decay=5e-4, test_iter=10, snapshot=500, type=Nesterov ...")
    p.add_argument("--data", default=None,
                   help="CIFAR-10 (cifar10, a directory, archive or URL) for the net's Data layers, written as LMDBs "
                        "(default: the built-in networks read CIFAR-10, other nets their own data layers)")
    p.add_argument("--data-out", default=None, help="where the CIFAR-10 LMDBs go (default: the data cache)")
    add_channel_order(p)
    p.add_argument("--resume", default=None, help="a .solverstate, or 'latest' (the newest snapshot in the run directory)")
    add_mode(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_engine(p) -> None:
    """How one run's Caffe work is done (caffe_prune.engines); the decisions are the same either way."""
    p.add_argument("--engine", choices=engines.ENGINES, default=Config.default("engine"),
                   help="fast (default): suffix-only probes, incremental test, workers; naive: full forwards "
                        "(the reference)")
    p.add_argument("--workers", type=int, default=None, help="fast engine's processes (default: one per core)")
    p.add_argument("--cache-mb", type=int, default=None,
                   help="fast engine's memory for test checkpoints, and apart for a probe batch's frontiers (default: an eighth of the free memory, at most 1 GiB)")


def add_forms(p, default: str | None = DEFAULT_FORMS) -> None:
    p.add_argument("--forms", choices=tuple(PAPER_FORMS), default=default,
                   help="papers/004's five where they are named as a set (an oracle over `paper`, and `reproduce`'s "
                        "metrics): table2 (the default), the forms that reproduce Table 2 (the authors' code's, Fisher "
                        "as eq. 4 is printed); code, as the authors' code computes all five; printed, eq1..eq5 (README, "
                        "Faithfulness)")


def add_prune(p, schedule_steps: bool = True) -> None:
    """Algorithm 1's knobs; each default is pruning.Config's (the paper's protocol, papers/004 §5).
    ``schedule_steps`` False leaves out ``--steps S`` (bench's --steps counts its own steps)."""
    d = Config.default
    p.add_argument("--k", type=int, default=d("k"), help=f"oracle shortlist size (default {d('k')})")
    p.add_argument("--eval-size", type=int, default=d("eval_size"),
                   help=f"validation batches per saliency (default {d('eval_size')})")
    p.add_argument("--oracle-eval-size", type=int, default=d("oracle_eval_size"),
                   help=f"validation batches per sensitivity (default {d('oracle_eval_size')})")
    p.add_argument("--test-size", type=int, default=d("test_size"),
                   help=f"test batches per measurement (default {d('test_size')}, or all)")
    p.add_argument("--test-interval", type=int, default=d("test_interval"),
                   help=f"measure test top-1 every N steps (default {d('test_interval')})")
    p.add_argument("--max-drop", type=float, default=d("max_drop"),
                   help=f"stop past this many points below the start (default {d('max_drop'):g})")
    p.add_argument("--no-drop-stop", action="store_true",
                   help="no drop stop: prune to the end (Figure 6's whole curves; --floor and --max-steps still stop)")
    p.add_argument("--floor", type=float, default=d("floor"), help="also stop below this absolute top-1 (%%)")
    p.add_argument("--target", type=target, default=d("target"), metavar="KEY=FRACTION[,...]",
                   help="also stop at the first step within this budget: the fraction left of macs (multiply-"
                        "accumulates per image), params (all parameters) or weights (conv weights), e.g. macs=0.5; "
                        "with --no-drop-stop the budget alone stops the run")
    p.add_argument("--max-steps", type=int, default=d("max_steps"), help="stop after N steps")
    p.add_argument("--per-step", default=d("per_step"), metavar="N|P%|P%macs",
                   help="groups a step removes: N (default 1, Algorithm 1), P%% of the original prunable channels, "
                        "or P%%macs of the MACs left (caffe_prune.schedule)")
    if schedule_steps:
        p.add_argument("--steps", dest="in_steps", type=int, default=d("in_steps"), metavar="S",
                       help="reach --target in S steps (a geometric schedule: step i keeps F^(i/S) of the original)")
    else:
        p.set_defaults(in_steps=d("in_steps"))
    p.add_argument("--keep", type=names, default=d("keep"), metavar="LAYER[,LAYER...]",
                   help="convolutions never pruned (glob patterns, e.g. conv1,res5*)")
    p.add_argument("--min-channels", type=int, default=d("min_channels"), metavar="M",
                   help="every convolution keeps at least M channels")
    p.add_argument("--max-layer-fraction", type=float, default=d("max_layer_fraction"), metavar="F",
                   help="no convolution loses more than this fraction of its channels")
    p.add_argument("--round-to", type=int, default=d("round_to"), metavar="R",
                   help="every pruned width a multiple of R (or the layer's original width)")
    p.add_argument("--seed", type=int, default=d("seed"), help=f"seed of the batch draws (default {d('seed')})")
    p.add_argument("--semantics", choices=masking.SEMANTICS, default=d("semantics"))
    p.add_argument("--reading", choices=metrics.READINGS, default=d("reading"),
                   help="which tensors activation metrics read (default: the authors' blob data/diff)")
    p.add_argument("--shortlist", choices=oracle.SHORTLISTS, default=d("shortlist"),
                   help="the oracle's short-listing rule: the paper's text (default) or the authors' released code")
    p.add_argument("--batch-size", type=int, default=d("batch_size"),
                   help=f"images per batch (default {d('batch_size')}, the paper's)")
    p.add_argument("--retrain-every", type=int, default=d("retrain_every"), metavar="S",
                   help="prune-retrain: after every S steps, fine-tune the masked net (pruned groups held at zero)")
    p.add_argument("--retrain-iters", type=int, default=d("retrain_iters"), metavar="I",
                   help="solver iterations of each retraining (the network's schedule; with --retrain-every)")
    p.add_argument("--val-split", choices=VAL_SPLITS, default=d("val_split"),
                   help="validation images: seeded (default; 10,000 random training images, the same fraction of a "
                        "set smaller than CIFAR-10's 50,000) or authors (CIFAR-10 only: the 5,000 the authors' release "
                        "lists, those present)")
    add_val_from(p, d("val_from"))
    add_forms(p)
    add_head(p)
    add_data(p)
    p.add_argument("--force", action="store_true", help="replace a run with another configuration in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def names(text) -> list:
    """``--keep a,b*`` as ["a", "b*"]."""
    out = [n.strip() for n in str(text).split(",") if n.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r} names no layer")
    return out


def target(text) -> dict:
    """``--target macs=0.5[,params=0.6]`` as {key: fraction left} (checked by pruning.Config)."""
    out = {}
    for pair in str(text).split(","):
        key, sep, value = pair.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(f"{pair!r} is not KEY=FRACTION (e.g. macs=0.5)")
    return out


def mode(args) -> tuple:
    """(mode, device) for pycaffe.set_mode."""
    if getattr(args, "gpu", None) is not None:
        return "gpu", args.gpu
    return ("cpu" if getattr(args, "cpu", False) else "auto"), 0


def transform_fields(args, prefix: str = "") -> dict | None:
    """The transform flags as plain data (what a run's config records), or None when none was given;
    ``prefix`` "val_": the validation split's own (--val-*)."""
    fields = {key: getattr(args, prefix + key, None) for key in ("scale", "mean_value", "mean_file", "crop_size")}
    fields = {k: v for k, v in fields.items() if v is not None}
    return fields or None


def network(args) -> Network:
    return Network.open(args.net, parse_shape(getattr(args, "input_shape", None)), getattr(args, "fork_layers", False))


def session(args, with_data: bool = True, batch_size: int = 128, progress=True, holdout: bool = True,
            form: str = "evaluation") -> Session:
    chosen, device = mode(args)
    return Session.open(network(args), args.weights, args.data if with_data else None,
                        transform=transform_fields(args), val_transform=transform_fields(args, "val_"),
                        channel_order=getattr(args, "channel_order", None), val_from=getattr(args, "val_from", "train"),
                        data_root=args.data_root, logits=getattr(args, "logits", None),
                        batch_size=batch_size, mode=chosen, device=device, holdout=holdout, with_data=with_data,
                        form=form, progress=progress)


def export_session(args) -> Session:
    """The structure-form session `export` checks on: ``--data``, else the net's own data layers (or
    CIFAR-10 for a built-in net), else none (random inputs, with a note saying why). Every image of
    the test source is a test image, as for `evaluate` (export draws no validation images)."""
    if args.data is not None:
        return session(args, form="structure", holdout=False)
    try:
        return session(args, form="structure", holdout=False)
    except NoDataset as exc:          # only a net without readable data: any other error is the user's to fix
        warnings.warn(f"the export is compared on random inputs: {' '.join(str(exc).split())}")
        return session(args, with_data=False, form="structure")


def runtime_names(text) -> list:
    """``--runtime caffe,opencv`` as a list of caffe_prune.runtimes names (empty without the flag)."""
    from caffe_prune.runtimes import RUNTIMES
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown:
        raise InputError(f"--runtime {', '.join(unknown)}: runtimes are {', '.join(RUNTIMES)}")
    return names


def oracle_list(value, forms: str = DEFAULT_FORMS) -> list:
    """The oracle's constituents: ``paper`` (or no list) is papers/004's five in ``forms``; otherwise
    the comma-separated names as given."""
    return list(PAPER_FORMS[forms]) if value in (None, "paper") else [m for m in value.split(",") if m]


def prune_config(args, net, weights, metric=None, oracle=None, seed=None) -> Config:
    """A pruning run's Config from the parsed options (each field the option of the same name)."""
    fields = {f.name for f in dataclasses.fields(Config)}
    given = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    given.update(net=os.fsdecode(net), weights=os.fsdecode(weights), metric=metric, oracle=list(oracle or []),
                 max_drop=None if getattr(args, "no_drop_stop", False) else args.max_drop,
                 seed=args.seed if seed is None else seed, transform=transform_fields(args),
                 val_transform=transform_fields(args, "val_"),
                 input_shape=getattr(args, "input_shape", None))
    return Config(**given)


def prune_method(args) -> tuple:
    """(metric, oracle constituents) of `prune`/`bench`'s --metric or --oracle [LIST] and --forms."""
    if getattr(args, "metric", None):
        return args.metric, None
    return None, oracle_list(getattr(args, "oracle", None), getattr(args, "forms", DEFAULT_FORMS))


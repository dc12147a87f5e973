"""`caffe-prune profile NET WEIGHTS`: measured forward latency, whole and per layer, as `caffe time`
reports it (caffe_prune.profile)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from caffe_prune import profile, pycaffe
from caffe_prune.commands import options
from caffe_prune.errors import InputError


def register(subparsers) -> None:
    p = subparsers.add_parser("profile", help="measured forward latency, whole and per layer (as `caffe time`)",
                              description=profile.__doc__.split("\n\n")[0])
    options.add_network(p)
    p.add_argument("--batch", type=int, default=32, help="the batch size measured beside batch 1 (default 32)")
    p.add_argument("--repeats", type=int, default=20, help="timed forwards per measurement (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards before them (default 3)")
    p.add_argument("--threads", default="1,all", help=f"{profile.THREADS_HELP} (default 1,all)")
    p.add_argument("--layers", type=int, default=10, help="how many of the slowest layers to print (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output (every layer)")
    p.add_argument("--runtime", default=None, metavar="R[,R...]",
                   help="also time the net's deploy form where models are served: caffe, opencv (OpenCV's DNN module), "
                        "onnxruntime (its ONNX export); batch 1 and --batch, each --threads")
    options.add_mode(p)
    p.set_defaults(func=cmd_profile)


def cmd_profile(args) -> int:
    for flag, value, least in (("--batch", args.batch, 1), ("--repeats", args.repeats, 1),
                               ("--warmup", args.warmup, 0), ("--layers", args.layers, 0)):
        if value < least:
            raise InputError(f"{flag} {value} must be at least {least}")
    counts = profile.thread_counts(args.threads.split(","))
    pycaffe.set_mode(*options.mode(args))
    network = options.network(args)
    costs = network.graph.costs(set())
    result = profile.profile(network.param, args.weights, network.input_shape, (1, args.batch), counts, args.repeats,
                             args.warmup, where=network.where, costs={"macs": costs.macs, "params": costs.params})
    result["net"] = network.name
    names = options.runtime_names(args.runtime)
    if names:
        result["served"] = _served(args, network, names, counts)
    print(json.dumps(result, indent=2) if args.json else profile.format_table(result, args.layers))
    if names and not args.json:
        print(profile.format_served(result["served"]))
    return 0


def _served(args, network, names, counts) -> list:
    """The net's deploy files (caffe_prune.export.deploy_files), written to a temporary directory,
    timed in each runtime."""
    from caffe_prune import caffemodel, export
    session = options.session(args, with_data=False, form="structure")
    files = export.deploy_files(network.param, caffemodel.arrays_of(session.net), session.input_shape, network.name,
                                network.where, onnx="onnxruntime" in names)
    with tempfile.TemporaryDirectory(prefix="caffe-prune-profile-") as tmp:
        for filename, data in files.items():
            (Path(tmp) / filename).write_bytes(data)
        onnx_path = Path(tmp) / f"{network.name}.onnx"
        return profile.served(Path(tmp) / "deploy.prototxt", Path(tmp) / f"{network.name}.caffemodel",
                              onnx_path if onnx_path.is_file() else None, names, (1, args.batch), counts,
                              args.repeats, args.warmup)

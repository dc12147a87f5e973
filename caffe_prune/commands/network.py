"""`caffe-prune graph`, `init`, `import`, `evaluate` and `export`: a network's structure, random
weights, the authors' format, test scores, and the physically smaller network of chosen groups."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from caffe_prune import caffemodel, fsio, masking, profile, published_weights, pycaffe, runtimes
from caffe_prune.commands import options
from caffe_prune.errors import InputError
from caffe_prune.steps import pruned_of


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="top-1, top-5 and loss on a dataset's test split")
    options.add_network(p)
    options.add_head(p)
    options.add_data(p)
    options.add_mode(p)
    p.add_argument("--batches", type=options.positive, default=None, help="only the first N batches")
    p.add_argument("--batch-size", type=options.positive, default=128, help="images per batch (default 128)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("import", help="published model in the authors' format -> stock prototxt + caffemodel")
    p.add_argument("src", help="a published model's directory (e.g. ResNet-20-CIFAR10 of the authors' release), a caffemodel, "
                               "or a network name whose published weights are fetched (models/published.json)")
    p.add_argument("--out", default="models/imported", help="output directory (default models/imported)")
    p.add_argument("--net", default=None, help="which of the six networks it is (default: from the names)")
    options.add_trust(p)
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("init", help="a caffemodel of the net's own fillers, seeded (random weights for measurements)")
    options.add_network(p, weights=False)
    p.add_argument("--out", required=True, help="the caffemodel to write")
    p.add_argument("--seed", type=int, default=0, help="Caffe's random seed (default 0)")
    options.add_mode(p)
    p.set_defaults(func=cmd_init, data=None, data_root="", scale=None, mean_value=None, mean_file=None,
                   crop_size=None)
    p = sub.add_parser("graph", help="channel groups, weights removed, barriers; optional picture")
    options.add_network(p, weights=False)
    p.add_argument("--picture", default=None, help="write the layer graph to this .png or .svg")
    p.add_argument("--list", type=int, default=3, help="how many groups to print in detail (default 3)")
    p.set_defaults(func=cmd_graph)
    p = sub.add_parser("export", help="prune chosen groups and write the physically smaller network")
    options.add_network(p)
    chosen = p.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--groups", help="comma-separated group ids (see `caffe-prune graph`)")
    chosen.add_argument("--random-fraction", type=float, help="prune this fraction of the groups at random")
    chosen.add_argument("--run", default=None, metavar="RUN_DIR",
                        help="the groups a pruning run removed (of this NET), up to --step")
    p.add_argument("--step", type=int, default=None, help="with --run: the step to export (default: its last)")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-fraction and the random check inputs")
    p.add_argument("--semantics", choices=masking.SEMANTICS, default="zero-downstream")
    p.add_argument("--images", type=options.positive, default=16,
                   help="test images to compare masked and compact nets on (with --data)")
    options.add_data(p)
    options.add_mode(p)
    p.add_argument("--out", default="models/exported", help="output directory (default models/exported)")
    p.add_argument("--no-timing", action="store_true", help="do not time the original and the compact network")
    p.add_argument("--batch", type=options.positive, default=32, help="the batch timed beside batch 1 (default 32)")
    p.add_argument("--repeats", type=options.positive, default=10, help="timed forwards each (default 10)")
    p.add_argument("--threads", default="1,all", help=f"{profile.THREADS_HELP} (default 1,all)")
    p.add_argument("--layers", type=int, default=8, help="the slowest layers to list (default 8)")
    p.add_argument("--json", default=None, metavar="F", help="also write the report (latency included) to F")
    p.add_argument("--onnx", action="store_true", help="also write NAME.onnx, checked in ONNX Runtime (pip install "
                                                       "'caffe-prune[deploy]')")
    p.add_argument("--runtime", default=None, metavar="R[,R...]",
                   help=f"also time both networks in these runtimes ({', '.join(runtimes.RUNTIMES)}), batch 1 and "
                        f"--batch, each --threads")
    p.add_argument("--eval-images", type=options.positive, default=1024,
                   help="test images the original's and the compact net's top-1 are measured on (default 1024, or all)")
    p.set_defaults(func=cmd_export)


def run_evaluation(args, progress=True) -> tuple:
    """(scores, session): the test split scored by Caffe's own Accuracy and SoftmaxWithLoss layers."""
    session = options.session(args, progress=progress, holdout=False, batch_size=getattr(args, "batch_size", 128))
    return session.evaluate(session.dataset.test, batches=args.batches, progress=progress), session


def print_scores(name, scores) -> None:
    print(f"{name}: top-1 {100 * scores['top1']:.2f}%  top-5 {100 * scores['top5']:.2f}%  "
          f"loss {scores['loss']:.4f}  ({scores['images']} test images)")


def cmd_evaluate(args) -> int:
    scores, session = run_evaluation(args, progress=not args.json)
    planes = session.dataset.planes
    scores = {**scores, "data": session.dataset.description, "logits": session.head.logits,
              "classes": session.classes, **({"channel_order": session.dataset.channel_order} if planes else {})}
    if args.json:
        print(json.dumps(scores))
    else:
        print_scores(os.fsdecode(args.weights), scores)
        print(f"  data: {scores['data']}" + (f", {planes}" if planes else "")
              + f"; transform {session.dataset.transform.where}; logits {scores['logits']!r} ({scores['classes']} classes)")
    return 0


def cmd_import(args) -> int:
    from caffe_prune import importer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        src = args.src
        if not Path(src).exists() and src in published_weights.manifest()["models"]:   # a name: fetch it
            src, args.net = published_weights.caffemodel(src), args.net or src
        done = importer.import_published(src, args.out, args.net)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print(json.dumps(done, indent=2))
    return 0


def cmd_init(args) -> int:
    """A caffemodel of the net's own fillers (Caffe's, seeded): random weights of any network, for
    measurements of time and memory (its accuracy is chance)."""
    pycaffe.caffe().set_random_seed(args.seed)
    session = options.session(argparse.Namespace(**vars(args), weights=None, logits=None), with_data=False,
                              form="structure")
    changed = caffemodel.for_measurement(session.net, args.seed)
    fsio.write_bytes(args.out, caffemodel.serialize(session.param, caffemodel.arrays_of(session.net)))
    params = sum(b.data.size for blobs in session.net.params.values() for b in blobs)
    print(f"{args.out}: {params:,} parameters of {session.network.name} from its fillers (seed {args.seed}); "
          f"{len(changed)} layers made fit for measuring (BatchNorm as identity, unfilled weights He-normal)")
    return 0


def cmd_graph(args) -> int:
    from caffe_prune import graph_view
    if args.list < 0:
        raise InputError(f"--list {args.list}: give how many groups to print, 0 or more")
    network = options.network(args)
    print(graph_view.summary(network.graph, network.name, args.list))
    if args.picture:
        print(f"picture: {graph_view.draw(network.graph, network.param, args.picture)}")
    return 0


def chosen_groups(g, args, network=None) -> set:
    """--groups ids (in order, each still prunable), a pruning run's groups up to --step (of the same
    network definition), or a seeded --random-fraction of the groups."""
    if getattr(args, "step", None) is not None and getattr(args, "run", None) is None:
        raise InputError("--step N reads a run's step: give it with --run RUN_DIR")
    if getattr(args, "run", None) is not None:
        from caffe_prune import pruning
        from caffe_prune.rundir import RunDir
        header, steps = RunDir(args.run).read()
        step = len(steps) - 1 if args.step is None else args.step
        if not 0 <= step < len(steps):
            raise InputError(f"--step {step}: {args.run} holds steps 0..{len(steps) - 1}")
        if network is not None and header.get("identity", {}).get("definition_sha256") != \
                pruning.definition_sha256(network.param):
            raise InputError(f"{args.run} pruned another network definition than {network.where}; "
                             f"give the run's own NET ({header.get('config', {}).get('net')})")
        return g.chosen(pruned_of(steps[1:step + 1]))
    if args.groups is not None:
        try:
            ids = [int(x) for x in args.groups.split(",")]
        except ValueError:
            raise InputError(f"--groups {args.groups!r} is not a comma-separated list of group ids "
                             f"(see `caffe-prune graph`)") from None
        try:
            return g.chosen(ids)
        except InputError as exc:
            raise InputError(f"--groups: {exc}") from None
    if not 0 < args.random_fraction < 1:
        raise InputError(f"--random-fraction must be in (0, 1), got {args.random_fraction}")
    return g.random_state(args.random_fraction, args.seed)


def cmd_export(args) -> int:
    """Prune the chosen groups (masks), verify the compact net beside the masked one, write it."""
    from caffe_prune import export
    session = options.export_session(args)
    names = options.runtime_names(args.runtime)
    timing = None if args.no_timing else {"batch_sizes": (1, args.batch), "repeats": args.repeats,
                                          "threads": profile.thread_counts(args.threads.split(",")),
                                          "runtimes": names}
    report = export.export_session(session, chosen_groups(session.graph, args, session.network), args.out,
                                   args.semantics, args.images, args.seed, timing, onnx=args.onnx,
                                   eval_images=args.eval_images)
    if args.run is not None:                          # what was exported, for the report's reader
        report = {"run": os.fsdecode(args.run), "step": args.step if args.step is not None else "last", **report}
    notes, latency, served = report.pop("notes"), report.pop("latency", None), report.pop("served", None)
    if latency is not None:
        report["speedup_measured"] = {f"batch {r['batch']}, {r['threads']} thread(s)": r["speedup"]
                                      for r in latency["runs"]}
    print(json.dumps(report, indent=2))
    if args.json:
        fsio.write_json(args.json, {**report, "latency": latency, "served": served}, indent=1)
    if "test" in report:
        t = report["test"]
        print(f"top-1 on {t['images']} test images of {t['data']}: {100 * t['top1_original']:.2f}% original, "
              f"{100 * t['top1_compact']:.2f}% compact", file=sys.stderr)      # stdout stays the JSON report
    if latency is not None:
        print(profile.format_table(latency, args.layers))
    if served:
        print(profile.format_served(served, compared=True))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0

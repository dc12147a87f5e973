"""`caffe-prune` command line: one sub-command per user task, each a thin layer over a module.

Every command parses its arguments into the project's objects (caffe_prune.options), calls a module,
and prints. ``main`` is the error boundary: a user's mistake (a bad file, argument or path) is one
line on stderr and exit status 2; anything unexpected is one line and status 1, with the traceback
only under ``--debug``; notes (warnings) print as "note: ..." lines.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

from caffe_prune import bench, engine, finetune, fsio, masking, options, profile, published
from caffe_prune.data import commands as data_commands
from caffe_prune.metrics import commands as metric_commands
from caffe_prune.metrics import plugins
from caffe_prune.sweep import commands as sweep_commands
from caffe_prune.sweep.reproduce import reproduce

TABLE1_TOP1 = {"LeNet-5": 69, "ResNet-20": 88}   # published top-1 (%), papers/004 Table 1


def cmd_doctor(args) -> int:
    """Print what the engine is made of, and what is missing with the command that fixes it."""
    problems = []
    if sys.version_info[:2] != (3, 11):
        problems.append(("Python %d.%d: Debian 12's boost-python (and so pycaffe) is for 3.11"
                         % sys.version_info[:2], "make setup  (creates .venv with /usr/bin/python3.11)"))
    for tool, fix in (("cmake", "tools/install-system-deps.sh"), ("protoc", "tools/install-system-deps.sh")):
        if shutil.which(tool) is None:
            problems.append((f"{tool} not on PATH (needed only to build Caffe)", fix))
    try:
        report = engine.versions()
    except engine.EngineError as exc:
        report = {}
        problems.append((str(exc), "make setup"))
    if args.json:
        print(json.dumps({"report": report, "problems": [p for p, _ in problems]}, indent=2))
    else:
        width = max((len(k) for k in report), default=0)
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
        for problem, fix in problems:
            print(f"missing: {problem}\n  fix: {fix}")
        if not problems:
            print("ok: stock pycaffe is ready")
    return 1 if problems else 0


def run_evaluation(args, progress=True) -> tuple:
    """(scores, session): the test split scored by Caffe's own Accuracy and SoftmaxWithLoss layers."""
    session = options.session(args, progress=progress, holdout=False, batch_size=getattr(args, "batch_size", 128))
    return session.evaluate(session.dataset.test, batches=args.batches, progress=progress), session

def print_scores(name, scores) -> None:
    print(f"{name}: top-1 {100 * scores['top1']:.2f}%  top-5 {100 * scores['top5']:.2f}%  "
          f"loss {scores['loss']:.4f}  ({scores['images']} test images)")

def cmd_evaluate(args) -> int:
    scores, session = run_evaluation(args, progress=not args.json)
    scores = {**scores, "data": session.dataset.description, "logits": session.head.logits,
              "classes": session.classes}
    if args.json:
        print(json.dumps(scores))
    else:
        print_scores(os.fsdecode(args.weights), scores)
        print(f"  data: {scores['data']}; logits {scores['logits']!r} ({scores['classes']} classes)")
    return 0

def cmd_import(args) -> int:
    import warnings
    from caffe_prune import importer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        src = args.src
        if not Path(src).exists() and src in published.manifest()["models"]:   # a name: fetch it
            src, args.net = published.caffemodel(src), args.net or src
        done = importer.import_published(src, args.out, args.net)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print(json.dumps(done, indent=2))
    return 0


def cmd_train(args) -> int:
    """Train NET (a built-in network, a train/test prototxt or a solver) with Caffe's solver, from
    scratch or from --weights; then score the final weights on the test images."""
    from caffe_prune import train
    recipe = train.recipe(args.net, args.data, args.data_out, args.solver_set or (), progress=not args.quiet)
    out = args.out or f"runs/train-{recipe.name}"
    mode, device = options.mode(args)
    done = train.train(recipe, out, weights=args.weights, max_iter=args.iters, resume=args.resume,
                       mode=mode, device=device, progress=not args.quiet)
    try:
        scores = train.score(recipe, done["weights"], progress=not args.quiet)
    except (engine.EngineError, ValueError) as exc:   # the net trained; only the evaluation path refused it
        scores = None
        print(f"note: the final weights were not scored by caffe-prune evaluate: {one_line(exc)}", file=sys.stderr)
    if scores is not None:
        print_scores(done["weights"], scores)
    print(json.dumps({**done, "test": scores}, indent=2))
    return 0


def cmd_init(args) -> int:
    """A caffemodel of the net's own fillers (Caffe's, seeded): random weights of any network, for
    measurements of time and memory (its accuracy is chance)."""
    from caffe_prune import fsio as files
    engine.caffe().set_random_seed(args.seed)
    session = options.session(argparse.Namespace(**vars(args), weights=None, logits=None), with_data=False,
                              form="structure")
    with files.replacing(args.out) as tmp:
        session.net.save(str(tmp))
    params = sum(b.data.size for blobs in session.net.params.values() for b in blobs)
    print(f"{args.out}: {params:,} parameters of {session.network.name} from its fillers (seed {args.seed})")
    return 0


def cmd_graph(args) -> int:
    from caffe_prune import graph_view
    if args.list < 0:
        raise engine.EngineError(f"--list {args.list}: give how many groups to print, 0 or more")
    network = options.network(args)
    print(graph_view.summary(network.graph, network.name, args.list))
    if args.picture:
        print(f"picture: {graph_view.draw(network.graph, network.param, args.picture)}")
    return 0

def chosen_groups(g, args, network=None) -> set:
    """--groups ids (in order, each still prunable), a pruning run's groups up to --step (of the same
    network definition), or a seeded --random-fraction of the groups."""
    if getattr(args, "run", None) is not None:
        from caffe_prune import pruning
        from caffe_prune.rundir import RunDir
        header, steps = RunDir(args.run).read()
        step = len(steps) - 1 if args.step is None else args.step
        if not 0 <= step < len(steps):
            raise engine.EngineError(f"--step {step}: {args.run} holds steps 0..{len(steps) - 1}")
        if network is not None and header.get("identity", {}).get("definition_sha256") != \
                pruning.definition_sha256(network.param):
            raise engine.EngineError(f"{args.run} pruned another network definition than {network.where}; "
                                     f"give the run's own NET ({header.get('config', {}).get('net')})")
        return g.chosen([s["group"] for s in steps[1:step + 1]])
    if args.groups is not None:
        try:
            ids = [int(x) for x in args.groups.split(",")]
        except ValueError:
            raise engine.EngineError(f"--groups {args.groups!r} is not a comma-separated list of group ids "
                                     f"(see `caffe-prune graph`)") from None
        try:
            return g.chosen(ids)
        except engine.EngineError as exc:
            raise engine.EngineError(f"--groups: {exc}") from None
    if not 0 < args.random_fraction < 1:
        raise engine.EngineError(f"--random-fraction must be in (0, 1), got {args.random_fraction}")
    return g.random_state(args.random_fraction, args.seed)


def cmd_export(args) -> int:
    """Prune the chosen groups (masks), verify the compact net beside the masked one, write it."""
    from caffe_prune import export
    session = options.session(args, with_data=args.data is not None, form="structure")
    timing = None if args.no_timing else {"batch_sizes": (1, args.batch), "repeats": args.repeats,
                                          "threads": profile.thread_counts(args.threads.split(","))}
    report = export.export_session(session, chosen_groups(session.graph, args, session.network), args.out,
                                   args.semantics,
                                   args.images, args.seed, timing)
    notes, latency = report.pop("notes"), report.pop("latency", None)
    if latency is not None:
        report["speedup_measured"] = {f"batch {r['batch']}, {r['threads']} thread(s)": r["speedup"]
                                      for r in latency["runs"]}
    print(json.dumps(report, indent=2))
    if args.json:
        fsio.write_json(args.json, {**report, "latency": latency}, indent=1)
    if latency is not None:
        print(profile.format_table(latency, args.layers))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def run_one(config, out, args) -> list:
    from caffe_prune import pruning
    run = pruning.Run(config, out, force=args.force, progress=not args.quiet)
    steps = run.run()
    drop = 5.0 if config.max_drop is None else config.max_drop      # read at 5 points without a drop stop
    removed = pruning.removed_at_drop(steps, drop)
    last = steps[-1]
    scores = next(pruning.final_scores(s) for s in reversed(steps) if pruning.final_scores(s))   # the last measured
    end = f"{last['percent_conv_removed']:.1f}% conv weights" + (
        f" and {last['percent_macs_removed']:.1f}% MACs" if "percent_macs_removed" in last else "")
    print(f"{out}: {len(steps) - 1} steps, {end} removed at the end (top-1 {100 * scores['top1']:.2f}%); "
          f"{removed:.1f}% of conv weights within {drop:g} points of the initial top-1 "
          f"{100 * steps[0]['test']['top1']:.2f}%")
    return steps


def cmd_prune(args) -> int:
    metric, constituents = options.prune_method(args)
    run_one(options.prune_config(args, args.net, args.weights, metric, constituents), args.out, args)
    return 0


def cmd_demo(args) -> int:
    """The README's first command: check the engine, then a short pruning run of the published
    LeNet-5 with the oracle and one single metric, ending in the report with its plot."""
    if cmd_doctor(argparse.Namespace(json=False)) != 0:
        return 1
    weights = published.caffemodel("LeNet-5")
    scores, _ = run_evaluation(argparse.Namespace(net="LeNet-5", weights=weights, batches=None, **vars(args)))
    print_scores("published LeNet-5", scores)
    print(f"paper (Table 1): top-1 {TABLE1_TOP1['LeNet-5']}% on the full 10,000-image test set")
    reproduce(args, "oracle", ["LeNet-5"], ["mean_sq_weights", "oracle"], [args.seed], args.out)
    return 0


# ---- bench, finetune, profile ------------------------------------------------------------------------

def register_bench(subparsers) -> None:
    p = subparsers.add_parser("bench", help="the same seeded run in the naive and fast engines, timed side by side",
                              description=bench.__doc__.split("\n\n")[0])
    options.add_network(p)
    method = p.add_mutually_exclusive_group()
    method.add_argument("--metric", help="a saliency metric (default: the oracle over the paper's five)")
    method.add_argument("--oracle", nargs="?", const="paper", default="paper", help="the oracle's constituents")
    p.add_argument("--steps", type=options.positive, default=5, help="pruning steps per mode (default 5)")
    p.add_argument("--modes", default="naive,naive-blas,fast-1,fast-N",
                   help="comma-separated: naive, naive-blas, fast-1, fast-N (default: all)")
    p.add_argument("--fill-test", action="store_true",
                   help="repeat the test images to fill --test-size batches (the full protocol on a subset)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    options.add_prune(p)
    p.add_argument("--workers", type=int, default=None, help="fast-N's processes (default: one per core)")
    p.add_argument("--cache-mb", type=int, default=None, help="fast engines' test checkpoint memory")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    metric, constituents = options.prune_method(args)
    config = options.prune_config(args, args.net, args.weights, metric, constituents)
    config = dataclasses.replace(config, max_drop=None, cache_mb=args.cache_mb)
    result = bench.bench(config, args.steps, [m for m in args.modes.split(",") if m], args.workers, args.fill_test,
                         progress=not args.json)
    print(json.dumps(result, indent=2) if args.json else bench.format_table(result))
    return 0


def register_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pruning run's network at step N, its pruned groups held at zero")
    p.add_argument("run", help="a pruning run directory (caffe-prune prune ... --out DIR)")
    p.add_argument("--step", type=options.positive, default=None,
                   help="fine-tune the net of steps 1..N (default: the last step within the run's drop)")
    p.add_argument("--net", default=None,
                   help="train this definition instead of the run's own (a network name, a train/test prototxt or "
                        "a solver); its layers must fit the run's")
    p.add_argument("--weights", default=None, help="start from these weights instead of the run's")
    options.add_training(p)
    p.add_argument("--out", default=None, help="training run directory (default DIR/finetune-N)")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    done = finetune.finetune(args.run, args.step, args.net, args.weights, args.iters, args.solver_set or (), args.data,
                             args.data_out, args.out, args.resume, *options.mode(args), progress=not args.quiet)
    print(f"{args.run} step {done['step']} ({done['percent_conv_removed']:.1f}% conv weights removed), "
          f"{done['test_images']} test images: top-1 {100 * done['before']['top1']:.2f}% before, "
          f"{100 * done['after']['top1']:.2f}% after {done['iterations']} iterations ({done['seconds']:.0f} s); "
          f"{done['held_zero']['values']} pruned values, {done['held_zero']['nonzero_after']} not zero")
    print(json.dumps({k: v for k, v in done.items() if k not in ("groups", "test_net")}, indent=2))
    return 0


def register_profile(subparsers) -> None:
    p = subparsers.add_parser("profile", help="measured forward latency, whole and per layer (as `caffe time`)",
                              description=profile.__doc__.split("\n\n")[0])
    options.add_network(p)
    p.add_argument("--batch", type=int, default=32, help="the batch size measured beside batch 1 (default 32)")
    p.add_argument("--repeats", type=int, default=20, help="timed forwards per measurement (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards before them (default 3)")
    p.add_argument("--threads", default="1,all", help=f"{profile.THREADS_HELP} (default 1,all)")
    p.add_argument("--layers", type=int, default=10, help="how many of the slowest layers to print (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output (every layer)")
    options.add_mode(p)
    p.set_defaults(func=cmd_profile)


def cmd_profile(args) -> int:
    for flag, value, least in (("--batch", args.batch, 1), ("--repeats", args.repeats, 1),
                               ("--warmup", args.warmup, 0), ("--layers", args.layers, 0)):
        if value < least:
            raise engine.EngineError(f"{flag} {value} must be at least {least}")
    counts = profile.thread_counts(args.threads.split(","))
    engine.set_mode(*options.mode(args))
    network = options.network(args)
    costs = network.graph.costs(set())
    result = profile.profile(network.param, args.weights, network.input_shape, (1, args.batch), counts, args.repeats,
                             args.warmup, where=network.where, costs={"macs": costs.macs, "params": costs.params})
    result["net"] = network.name
    print(json.dumps(result, indent=2) if args.json else profile.format_table(result, args.layers))
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage stays one --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="caffe-prune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="report Caffe's build, BLAS, mode, Python and protobuf versions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)
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
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("train", help="train a network with its solver (Caffe's), from scratch or from weights")
    p.add_argument("net", help="a built-in network (its schedule), a train/test prototxt (the same schedule), or a "
                               "solver prototxt whose net: is read relative to the working directory")
    p.add_argument("--weights", default=None, help="a caffemodel to start from (fine-tuning; by layer name)")
    options.add_training(p)
    p.add_argument("--out", default=None, help="run directory (default runs/train-NAME)")
    p.set_defaults(func=cmd_train)
    register_finetune(sub)
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
    p.set_defaults(func=cmd_export)
    data_commands.register(sub)
    register_bench(sub)
    register_profile(sub)
    metric_commands.register(sub)
    p = sub.add_parser("prune", help="Algorithm 1 with one saliency metric or the myopic oracle")
    options.add_network(p)
    method = p.add_mutually_exclusive_group(required=True)
    method.add_argument("--metric", help="a saliency metric (see `caffe-prune metrics list`)")
    method.add_argument("--oracle", nargs="?", const="paper",
                        help="the myopic oracle over these constituents (default: the paper's five)")
    options.add_prune(p)
    options.add_engine(p)
    p.add_argument("--out", required=True, help="run directory (resumed when it holds the same run)")
    p.set_defaults(func=cmd_prune)
    sweep_commands.register(sub)       # sweep, results, report, reproduce
    p = sub.add_parser("demo", help="check the engine, evaluate the published LeNet-5, prune it, report")
    p.add_argument("--oracle", default="paper", help=argparse.SUPPRESS)
    options.add_prune(p)
    p.add_argument("--out", default="runs/demo", help="where the runs and the report go (default runs/demo)")
    p.set_defaults(func=cmd_demo)
    _add_plugin_option(parser)
    return parser


def _add_plugin_option(parser) -> None:
    """``--plugin FILE`` on every command (each leaf of the command tree)."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subcommands:
        for child in dict.fromkeys(action.choices.values()):
            _add_plugin_option(child)
    if not subcommands:
        parser.add_argument("--plugin", action="append", default=[], metavar="FILE",
                            help="load a plugin saliency metric, used as plugin:NAME (repeatable; README, "
                                 "Your own saliency metric)")


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"note: {message}", file=sys.stderr)


def main(argv=None) -> int:
    for stream in (sys.stdout, sys.stderr):   # file names that are not UTF-8 print as their bytes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="print the Python traceback of an error")
    args = parser.parse_args(argv)
    warnings.showwarning = _note
    try:
        for path in getattr(args, "plugin", []):
            plugins.load(path)
        options.resolve_published(args)
        return args.func(args)
    except (engine.EngineError, ValueError, fsio.InUse) as exc:   # DataError and MetricError are ValueErrors
        if args.debug:
            raise
        print(f"caffe-prune: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if args.debug:
            raise
        where = f" {os.fsdecode(exc.filename)}" if getattr(exc, "filename", None) else ""
        print(f"caffe-prune: error:{where} {exc.strerror or one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("caffe-prune: interrupted; what was finished is kept (rerun the same command to resume)",
              file=sys.stderr)
        return 130
    except Exception as exc:   # a bug: one line, the traceback on request
        if args.debug:
            raise
        print(f"caffe-prune: internal error: {type(exc).__name__}: {one_line(exc)} "
              f"(rerun with --debug for the traceback and please report it)", file=sys.stderr)
        return 1


def one_line(exc) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())

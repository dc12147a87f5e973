"""`caffe-prune prune` (Algorithm 1 with a metric or the oracle), `bench` (the engines side by
side), `finetune` (a run's network with its pruned groups held at zero) and `demo`."""
from __future__ import annotations

import argparse
import dataclasses
import json

from caffe_prune import analysis, bench, finetune, fsio, published_weights
from caffe_prune.commands import options
from caffe_prune.errors import InputError

TABLE1_TOP1 = {"LeNet-5": 69, "ResNet-20": 88}   # published top-1 (%), papers/004 Table 1


def register(sub) -> None:
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

    p = sub.add_parser("bench", help="the same seeded run in the naive and fast engines, timed side by side",
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
    options.add_prune(p, schedule_steps=False)
    p.add_argument("--workers", type=int, default=None, help="fast-N's processes (default: one per core)")
    p.add_argument("--cache-mb", type=int, default=None, help="fast engines' test checkpoint memory")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("finetune", help="fine-tune a pruning run's network at step N, its pruned groups held at zero")
    p.add_argument("run", help="a pruning run directory (caffe-prune prune ... --out DIR)")
    p.add_argument("--step", type=options.step_number, default=None, metavar="N|last",
                   help="fine-tune the net of steps 1..N, or of all its steps (last; default: the last step within the "
                        "run's drop)")
    p.add_argument("--net", default=None,
                   help="train this definition instead of the run's own (a network name, a train/test prototxt or "
                        "a solver); its layers must fit the run's")
    p.add_argument("--weights", default=None, help="start from these weights instead of the run's")
    options.add_training(p)
    p.add_argument("--out", default=None, help="training run directory (default DIR/finetune-N)")
    p.add_argument("--json", default=None, metavar="F", help="also write the result (top-1 before and after) to F")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("demo", help="check the engine, evaluate the published LeNet-5, prune it, report")
    p.add_argument("--oracle", default="paper", help=argparse.SUPPRESS)
    options.add_prune(p)
    p.add_argument("--out", default="runs/demo", help="where the runs and the report go (default runs/demo)")
    p.set_defaults(func=cmd_demo)


def run_one(config, out, args) -> list:
    from caffe_prune import pruning
    run = pruning.Run(config, out, force=args.force, progress=not args.quiet)
    print(f"{out}: {run.session.dataset.sources}; {len(run.test)} test images measured per step", flush=True)
    steps = run.run()
    if run.unreachable:                 # the steps taken are kept; the budget cannot be met as constrained
        raise InputError(f"{out}: {run.unreachable}")
    drop = analysis.drop_of(config.max_drop)
    removed = analysis.removed_at_drop(steps, drop)
    last = steps[-1]
    scores = next(analysis.final_scores(s) for s in reversed(steps) if analysis.final_scores(s))   # the last measured
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


def cmd_bench(args) -> int:
    metric, constituents = options.prune_method(args)
    config = options.prune_config(args, args.net, args.weights, metric, constituents)
    config = dataclasses.replace(config, max_drop=None, cache_mb=args.cache_mb)
    result = bench.bench(config, args.steps, [m for m in args.modes.split(",") if m], args.workers, args.fill_test,
                         progress=not args.json)
    print(json.dumps(result, indent=2) if args.json else bench.format_table(result))
    return 0


def cmd_finetune(args) -> int:
    done = finetune.finetune(args.run, args.step, args.net, args.weights, args.iters, args.solver_set or (), args.data,
                             args.data_out, args.out, args.resume, *options.mode(args), progress=not args.quiet,
                             channel_order=args.channel_order)
    print(f"{args.run} step {done['step']} ({done['percent_conv_removed']:.1f}% conv weights removed), "
          f"{done['test_images']} test images: top-1 {100 * done['before']['top1']:.2f}% before, "
          f"{100 * done['after']['top1']:.2f}% after {done['iterations']} iterations ({done['seconds']:.0f} s); "
          f"{done['held_zero']['values']} pruned values, {done['held_zero']['nonzero_after']} not zero")
    result = {k: v for k, v in done.items() if k not in ("groups", "test_net")}
    print(json.dumps(result, indent=2))
    if args.json:
        fsio.write_json(args.json, result, indent=1)
    return 0


def cmd_demo(args) -> int:
    """The README's first command: check the engine, then a short pruning run of the published
    LeNet-5 with the oracle and one single metric, ending in the report with its plot."""
    from caffe_prune.commands.doctor import cmd_doctor
    from caffe_prune.commands.network import print_scores, run_evaluation
    from caffe_prune.commands.reproduce import reproduce
    if cmd_doctor(argparse.Namespace(json=False)) != 0:
        return 1
    weights = published_weights.caffemodel("LeNet-5")
    scores, _ = run_evaluation(argparse.Namespace(net="LeNet-5", weights=weights, batches=None, **vars(args)))
    print_scores("published LeNet-5", scores)
    print(f"paper (Table 1): top-1 {TABLE1_TOP1['LeNet-5']}% on the full 10,000-image test set")
    reproduce(args, "oracle", ["LeNet-5"], ["mean_sq_weights", "oracle"], [args.seed], args.out)
    return 0

"""`caffe-prune reproduce oracle|taxonomy|domino`: a paper's experiment (caffe_prune.sweep.papers)
as a sweep with the protocol `prune` would build from the same options (resumable), then its report."""
from __future__ import annotations

import dataclasses
import sys

from caffe_prune import pruning, report
from caffe_prune.commands import options
from caffe_prune.commands.sweep import add_executor_options
from caffe_prune.metrics import taxonomy
from caffe_prune.metrics.methods import ORACLE, PAPER_FIVE
from caffe_prune.sweep.driver import launch, sigterm_interrupts
from caffe_prune.sweep.executors import factory
from caffe_prune.sweep.papers import PAPERS
from caffe_prune.sweep.spec import RUN_FIELDS, parse_spec, weight_pairs


def register(subparsers) -> None:
    p = subparsers.add_parser("reproduce", help="a paper's experiment as a sweep, then its report: "
                                                "oracle (papers/004 Table 2 + Figure 6), taxonomy, domino")
    p.add_argument("paper", nargs="?", default="oracle", choices=tuple(PAPERS),
                   help="oracle (default), taxonomy or domino")
    p.add_argument("--nets", default=None, help="comma-separated networks (default: the paper's, see README)")
    p.add_argument("--weights", action="append", default=[], metavar="NET=PATH",
                   help="weights of a network without published ones (AlexNet, SqueezeNet)")
    p.add_argument("--methods", default=None, help="oracle: metrics and/or 'oracle' (default: the five + oracle)")
    p.add_argument("--metrics", default=None, help="taxonomy/domino: metric names or globs (default: the paper's)")
    p.add_argument("--domino", default=None, help="domino: aggregations (default sum,mean,max)")
    p.add_argument("--oracle", default="paper", help="the oracle's constituents (default: the paper's five)")
    p.add_argument("--runs", type=int, default=8, help="seeds per method (default 8)")
    options.add_prune(p)
    add_executor_options(p)
    p.add_argument("--out", default=None, help="the sweep directory (default runs/reproduce-PAPER)")
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args) -> int:
    try:
        reproduce(args, args.paper)
    except KeyboardInterrupt:
        return 130
    return 0


def reproduce(args, paper: str, nets=None, methods=None, seeds=None, out=None) -> list:
    """A paper's experiment as a sweep (resumable), then its report; returns the report paths.
    `args` carries the prune options (options.add_prune) and, optionally, executor options."""
    plan = PAPERS[paper]
    nets = nets or (args.nets.split(",") if getattr(args, "nets", None) else plan["nets"])
    five = list(taxonomy.PAPER_FORMS[getattr(args, "forms", "table2")])
    if methods is None and getattr(args, "methods", None):
        methods = [m for m in args.methods.split(",") if m]
    if methods is not None:
        metrics, with_oracle = [m for m in methods if m != ORACLE], ORACLE in methods
    else:
        given = getattr(args, "metrics", None)
        metrics = [m for m in given.split(",") if m] if given else \
            [five[PAPER_FIVE.index(m)] if m in PAPER_FIVE else m for m in plan["metrics"]]
        with_oracle = plan["oracle"]
    domino = getattr(args, "domino", None)
    domino = [d for d in domino.split(",") if d] if domino else plan["domino"]
    constituents = getattr(args, "oracle", "paper") or "paper"
    seeds = list(seeds) if seeds is not None else list(range(args.seed, args.seed + getattr(args, "runs", 1)))
    # the protocol exactly as `caffe-prune prune` would build it from the same options
    base = dataclasses.asdict(options.prune_config(args, nets[0], "published", metric=PAPER_FIVE[0]))
    protocol = {k: v for k, v in base.items() if k not in RUN_FIELDS and k not in pruning.Config.EXECUTION}
    protocol["stop"] = "end" if protocol["max_drop"] is None else "drop"
    if protocol["stop"] == "end":
        del protocol["max_drop"]
    weights = weight_pairs(getattr(args, "weights", []))
    raw = {"name": f"reproduce-{paper}", "out": out or getattr(args, "out", None) or f"runs/reproduce-{paper}",
           "data": base["data"], "networks": {n: weights.get(n, "published") for n in nets}, "metrics": metrics,
           "domino": domino, "seeds": seeds, "protocol": protocol,
           "oracles": [five if constituents == "paper" else constituents.split(",")] if with_oracle else []}
    spec = parse_spec(raw)
    with sigterm_interrupts():
        outcome = launch(spec, factory(getattr(args, "executor", "local"), getattr(args, "workers", None),
                                       getattr(args, "address", None)), retries=getattr(args, "retries", 2),
                         progress=not args.quiet)
    if not outcome.complete:
        print(f"caffe-prune: {outcome.runs - outcome.done_before - outcome.done} run(s) did not finish; "
              f"the report covers the finished ones", file=sys.stderr)
    paths = report.write_reports(spec.out, kinds=[paper])
    for path in paths:
        print(f"report: {path}")
    return paths

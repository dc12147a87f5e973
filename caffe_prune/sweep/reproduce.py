"""A paper's experiment as a sweep (resumable), then its report: `caffe-prune reproduce PAPER`."""
from __future__ import annotations

import dataclasses
import sys

from caffe_prune import options, pruning, report
from caffe_prune.metrics import taxonomy
from caffe_prune.metrics.methods import ORACLE, PAPER_FIVE
from caffe_prune.sweep.driver import _sigterm_interrupts, launch
from caffe_prune.sweep.executors import factory
from caffe_prune.sweep.spec import RUN_FIELDS, parse_spec, weight_pairs

PAPERS = {   # the paper's networks and methods; the reports print the published figures next to ours
    "oracle": {"nets": ["LeNet-5", "ResNet-20"], "metrics": list(PAPER_FIVE), "domino": [], "oracle": True},
    "taxonomy": {"nets": ["LeNet-5", "CIFAR10", "ResNet-20", "NIN"],        # its grid: the six scalings
                 "metrics": [f"*/*/*/{scaling}" for scaling in taxonomy.PAPER_SCALINGS], "domino": [],
                 "oracle": False},
    "domino": {"nets": ["ResNet-20", "AlexNet", "SqueezeNet", "NIN"], "metrics": list(PAPER_FIVE),
               "domino": list(taxonomy.DOMINO), "oracle": False},
}


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
    with _sigterm_interrupts():
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

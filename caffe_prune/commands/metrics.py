"""`caffe-prune saliency NET WEIGHTS --metric M`: one metric's per-channel saliencies, ranked.

Validation batches are drawn (seeded, without replacement) from the dataset's validation split
(caffe_prune.data.dataset: CIFAR-10's training images for the built-in networks), transformed as
NET's data layer did, and fed to NET's evaluation form with WEIGHTS (caffe_prune.session); the
metric is computed by ``collect`` + ``saliency`` in the unpruned state (caffe_prune.api.saliencies).
`caffe-prune metrics list`: every valid metric name, and the plugins loaded.
"""
from __future__ import annotations

import csv
import io
import os
import time

from caffe_prune import api, fsio, metrics
from caffe_prune.commands import options
from caffe_prune.metrics import READINGS, plugins


def register(subparsers) -> None:
    """Add `saliency NET WEIGHTS --metric M [--batches 2] [--seed S] [--csv F] [--json F]` and `metrics list`."""
    p = subparsers.add_parser("saliency", help="per-channel saliency of one metric on validation batches",
                              description=__doc__.split("\n\n")[0])
    options.add_network(p)
    p.add_argument("--metric", required=True,
                   help="input/pointwise/reduction/scaling, an alias (mean_activations, taylor, fisher, "
                        "mean_gradients, mean_sq_weights, eq1..eq5), or domino-{sum,mean,max}:METRIC")
    p.add_argument("--batches", type=options.positive, default=2, help="validation batches (default 2)")
    p.add_argument("--batch-size", type=options.positive, default=128, help="images per batch (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch draw (default 0)")
    p.add_argument("--reading", choices=READINGS, default="authors",
                   help="which tensor activation metrics read (default: the authors')")
    options.add_head(p)
    options.add_data(p)
    options.add_val_from(p)
    options.add_mode(p)
    p.add_argument("--top", type=int, default=5, help="rows printed at each end of the ranking")
    p.add_argument("--csv", default=None, metavar="F", help="write every channel's saliency and rank")
    p.add_argument("--json", default=None, metavar="F", help="write the channels and the group ranking")
    p.set_defaults(func=cmd_saliency)
    p = subparsers.add_parser("metrics", help="the saliency metrics: `metrics list` enumerates every valid name")
    p.add_argument("action", choices=("list",))
    p.add_argument("--domino", action="store_true", help="include the Domino variants")
    p.set_defaults(func=cmd_metrics)


def cmd_metrics(args) -> int:
    """Print every valid composition (and, with --domino, its Domino variants), then the aliases."""
    names = metrics.list_metrics(domino=args.domino)
    print("\n".join(names))
    print(f"# {len(names)} metrics; aliases: " + ", ".join(f"{a} = {m}" for a, m in metrics.ALIASES.items()))
    for plugin in plugins.loaded().values():
        scaling = plugin.scaling or "its own scale()"
        print(f"plugin:{plugin.name}  # {plugin.input} input, reads {''.join(sorted(plugin.needs))}, "
              f"scaling {scaling}; from {plugin.path}")
    return 0


def compute(session, metric, batches=2, seed=0, reading="authors") -> dict:
    """The metric's saliency of every prunable channel and the group ranking, as plain data."""
    parsed = metrics.parse(metric)
    graph = session.graph
    start = time.perf_counter()
    result = api.saliencies(session, metric, batches, seed, reading=reading)
    seconds = time.perf_counter() - start
    scores = result.channels
    group_rank = {gid: i for i, (gid, _) in enumerate(result.ranking)}
    order = sorted(scores, key=lambda c: (scores[c], graph.group_of(*c).id, c))
    channels = [{"rank": i, "layer": layer, "channel": index, "group": graph.group_of(layer, index).id,
                 "saliency": scores[(layer, index)]} for i, (layer, index) in enumerate(order)]
    return {"metric": metric, "composition": str(parsed), "reading": reading, "net": session.network.where,
            "weights": os.fsdecode(session.weights), "images": result.images, "batches": batches,
            "seed": seed, "seconds": seconds, "channels": channels,
            "groups": [{"rank": group_rank[gid], "group": gid, "score": score} for gid, score in result.ranking]}


def cmd_saliency(args) -> int:
    metrics.parse(args.metric)                    # a bad name is refused before anything is loaded
    session = options.session(args, batch_size=args.batch_size)
    result = compute(session, args.metric, args.batches, args.seed, args.reading)
    channels = result["channels"]
    print(f"{result['metric']} = {result['composition']} ({result['reading']} reading) on {result['images']} "
          f"validation images, {len(channels)} channels in {len(result['groups'])} prunable groups, "
          f"{result['seconds']:.2f} s")
    rows = channels if len(channels) <= 2 * args.top else channels[:args.top] + [None] + channels[-args.top:]
    print(f"{'rank':>6}  {'channel':<28} {'group':>6}  saliency")
    for row in rows:
        if row is None:
            print(f"{'...':>6}")
            continue
        channel = f"{row['layer']}:{row['channel']}"
        print(f"{row['rank']:>6}  {channel:<28} {row['group']:>6}  {row['saliency']:.6g}")
    if args.csv:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=["rank", "layer", "channel", "group", "saliency"])
        writer.writeheader()
        writer.writerows(channels)
        fsio.write_text(args.csv, text.getvalue())
        print(f"wrote {args.csv}")
    if args.json:
        fsio.write_json(args.json, result, indent=1)
        print(f"wrote {args.json}")
    return 0

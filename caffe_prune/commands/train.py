"""`caffe-prune train`: Caffe's solver on a built-in network, a train/test prototxt or a solver,
from scratch or from weights; then the final weights scored on every test image."""
from __future__ import annotations

import json
import sys

from caffe_prune.commands import options
from caffe_prune.commands.network import print_scores
from caffe_prune.errors import InputError, one_line


def register(sub) -> None:
    p = sub.add_parser("train", help="train a network with its solver (Caffe's), from scratch or from weights")
    p.add_argument("net", help="a built-in network (its schedule), a train/test prototxt (the same schedule), or a "
                               "solver prototxt whose net: is read relative to the working directory")
    p.add_argument("--weights", default=None, help="a caffemodel to start from (fine-tuning; by layer name)")
    options.add_training(p)
    p.add_argument("--out", default=None, help="run directory (default runs/train-NAME)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    """Train NET (a built-in network, a train/test prototxt or a solver) with Caffe's solver, from
    scratch or from --weights; then score the final weights on the test images."""
    from caffe_prune import train
    recipe = train.recipe(args.net, args.data, args.data_out, args.solver_set or (), progress=not args.quiet,
                          channel_order=args.channel_order)
    out = args.out or f"runs/train-{recipe.name}"
    mode, device = options.mode(args)
    done = train.train(recipe, out, weights=args.weights, max_iter=args.iters, resume=args.resume,
                       mode=mode, device=device, progress=not args.quiet)
    try:
        scores = train.score(recipe, done["weights"], progress=not args.quiet)
    except (InputError, ValueError) as exc:   # the net trained; only the evaluation path refused it
        scores = None
        print(f"note: the final weights were not scored by caffe-prune evaluate: {one_line(exc)}", file=sys.stderr)
    if scores is not None:
        print_scores(done["weights"], scores)
    print(json.dumps({**done, "test": scores}, indent=2))
    return 0

"""A trained net scored on the project's evaluation path, and a pruning run's retraining (prune-retrain:
fine-tune the masked net with its pruned groups held at zero, in the run's own directory)."""
from __future__ import annotations

import math
import time

from caffe_prune import networks
from caffe_prune.session import Network, Session
from caffe_prune.train.heldzero import HeldZero
from caffe_prune.train.loop import train
from caffe_prune.train.recipe import Interrupted, Recipe


def score(recipe: Recipe, weights, progress: bool = False) -> dict:
    """top-1, top-5 and loss of ``weights`` on the recipe's test images by caffe_prune.evaluate (the
    built-in networks: the CIFAR-10 test split; otherwise what the TEST data layer as used reads)."""
    network = Network(recipe.net, recipe.where, recipe.builtin, networks.IMAGE_SHAPE if recipe.builtin else None)
    session = Session.open(network, weights, recipe.cifar10 if recipe.builtin else None, holdout=False,
                           progress=progress)
    scores = session.evaluate(session.dataset.test, progress=progress)
    return {**scores, "data": session.dataset.description}


def retrain(session, masker, recipe_: Recipe, run, step: int, iters: int, data_offset: int = 0,
            progress: bool = True) -> dict:
    """Fine-tune a pruning session's net in place: ``iters`` solver iterations of ``recipe_`` (the
    training form of the same network) starting from the session net's parameters, with the
    masker's committed groups held at zero; the result is saved atomically as the run directory's
    ``retrained-<step>.caffemodel`` (``run``: a caffe_prune.rundir.RunDir) and copied back into the
    session's net. The training run directory is its ``retrain-<step>/``: a kill during retraining
    resumes from its newest snapshot (one every quarter of the iterations and one at the end, the
    newest kept); the snapshots of earlier retrainings, whose steps are recorded, are removed."""
    run.drop_old_snapshots(step)
    held = HeldZero.of(masker, masker.committed, f"the pruning run {run}")
    final = run.retrained(step)
    start = time.perf_counter()
    try:
        done = train(recipe_, run.retraining(step), weights=session.net, max_iter=iters, resume="auto",
                     held=held, mode="auto", progress=progress, final=final,
                     snapshot_every=max(1, math.ceil(iters / 4)), data_offset=data_offset, keep=1)
    except Interrupted:
        raise KeyboardInterrupt from None       # the pruning run resumes it: rerun the same command
    session.net.copy_from(str(final))
    return {"iters": iters, "weights": final.name, "seconds": round(time.perf_counter() - start, 3),
            "final_loss": done["final_loss"]}

"""Training with Caffe's own solvers through pycaffe: any network with its own solver, from scratch or
from weights, and fine-tuning a pruned network with its pruned parameters held at exactly zero.

What is trained (``recipe``): one of the six built-in networks (its train/test definition and the
authors' schedule, networks.solver), a train/test prototxt (the same schedule, DEFAULT_SCHEDULE), or a
solver prototxt whose ``net:`` names the definition (relative to the working directory: Caffe's rule)
or whose ``net_param`` holds it. ``--solver-set key=value`` overrides any SolverParameter field.
Data: the built-in networks read CIFAR-10 LMDBs written by caffe_prune.data.cifar10.prepare (Caffe's
``Data`` layer applies transform_param itself); ``--data`` (CIFAR-10) points any net's ``Data`` layers
at those LMDBs; otherwise a net reads what its own data layers name (LMDB, LevelDB, ImageData lists,
HDF5), checked to exist first.

A training run directory (``train``), every file written through caffe_prune.fsio:

- ``train_test.prototxt``, ``solver.prototxt``: as used. The solver's ``net`` is the former; its
  ``snapshot_prefix`` is ``snapshots/.writing/NAME`` (Caffe writes there, then each file is moved into
  place), ``snapshot`` and ``test_interval`` are driven from here (the asked values are in train.json);
  ``random_seed`` is 0 unless the solver sets one, so that the same command trains the same bits;
- ``train.json``: what was asked: the source (and the sha256 of its definition), the starting weights
  (and sha256), the ``--solver-set`` overrides, the data, the held-zero regions, each resume;
- ``snapshots/NAME_iter_N.caffemodel`` and ``.solverstate``: the caffemodel is moved into place first,
  then the solverstate (``learned_net`` rewritten to the caffemodel beside it), so the newest
  solverstate always has its caffemodel and a kill never leaves a torn snapshot as the newest one;
- ``curve.jsonl``: one line per display interval, appended: ``iter``, ``loss`` (the mean training
  loss over the interval, loss weights applied), and every ``test_interval`` iterations and at the end
  ``test_top1`` and ``test`` (every output of the solver's test net, averaged over ``test_iter``
  batches as Caffe's Solver::Test does), at iteration 0 too when the solver's ``test_initialization``
  (Caffe's default) asks for it; ``curve.png``: train loss and test top-1 against iteration,
  the two plots of Caffe's plot_training_log;
- ``NAME.caffemodel`` (the final weights) and ``result.json`` (what came of it);
- ``.lock``: one process per directory (fsio.RunLock).

BLAS: one thread, as in a pruning run (caffe_prune.engines: OpenBLAS's bits depend on its thread
count), so that a run, its resume and a retraining inside a pruning run give the same bits on any
machine; measured here, one thread is also 4x faster than two on a busy 2-core machine (spinning
threads). The GPU is the fast path.

Resume (``--resume PATH|latest``): the solverstate restores weights, momentum history and iteration.
Deviation from Caffe, on purpose: Caffe's data layers restart at their first record after a restore;
here the train net's data layers are advanced by the batches already trained on (and the test net's
by those already tested), so that a resumed run sees the data an uninterrupted one would, and ends
with the same bits on the CPU (a net whose layers draw from Caffe's RNG in the forward, e.g. Dropout,
does not: pycaffe cannot restore that RNG). Ctrl-C writes a snapshot and stops.

Held zero (``HeldZero``): the regions of pruned groups (caffe_prune.masking.regions: filters and
biases, consumers' input slices, riders) stay exactly 0 throughout SGD, as the authors' Caffe fork
kept its masks in the blobs. See HeldZero's docstring for how and why it is exact.

Modules, one job each: ``recipe`` (what is trained: definition, solver, data), ``heldzero`` (pruned
regions held at zero), ``loop`` (the training run directory and Caffe's solver stepping through it),
``plots`` (the curve's picture), ``retrain`` (scoring a trained net, and a pruning run's retraining).
"""
from caffe_prune.train.heldzero import HeldZero
from caffe_prune.train.loop import ASKED, CURVE, CURVE_PNG, RESULT, latest_solverstate, test_accuracy, test_scores, train
from caffe_prune.train.plots import plot_curve
from caffe_prune.train.recipe import (DEFAULT_SCHEDULE, Interrupted, Recipe, TrainError, apply_overrides, is_cifar10,
                                      recipe, recipe_of)
from caffe_prune.train.retrain import retrain, score

__all__ = ["ASKED", "CURVE", "CURVE_PNG", "DEFAULT_SCHEDULE", "HeldZero", "Interrupted", "RESULT", "Recipe",
           "TrainError", "apply_overrides", "is_cifar10", "latest_solverstate", "plot_curve", "recipe", "recipe_of",
           "retrain", "score", "test_accuracy", "test_scores", "train"]

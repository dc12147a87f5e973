"""The validation split every pruning decision is judged on (the test split is only measured).

- ``validation_indices``: papers/004's protocol, 10,000 random training images of the 50,000 (the
  same fraction of a smaller set, the same 10,000 of a larger one), seeded; any dataset's training
  records (caffe_prune.data.dataset), saved and read back with a checked header
  (``save_validation_indices``, ``load_validation_indices``);
- ``authors_validation_indices``: CIFAR-10 only, the 5,000 images the authors' released code judged
  on (``--val-split authors``), as positions among the training records present.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from caffe_prune import fsio
from caffe_prune.data.cifar10 import BATCH_RECORDS, OFFICIAL_COUNTS, SPLIT_FILES
from caffe_prune.errors import DataError

# The paper judges every pruning decision on 10,000 random training images of CIFAR-10's 50,000.
VALIDATION_IMAGES = 10_000
PAPER_TRAIN_IMAGES = OFFICIAL_COUNTS["train"]
VAL_FILE = "val-indices.txt"


def validation_indices(n_train: int, seed: int = 0) -> np.ndarray:
    """The training images every pruning decision is judged on: the paper draws 10,000 of the
    50,000 at random; a smaller set (a partial copy) gets the same fraction (1017 of the subset's
    5085), a larger one (ImageNet's 1.28M) the same 10,000. Sorted, so that the file reads in
    dataset order. The saved file, not the seed, is the record: numpy may change its generator."""
    if n_train < 1:
        raise DataError(f"cannot draw a validation split from {n_train} training images")
    n_val = min(VALIDATION_IMAGES, round(n_train * VALIDATION_IMAGES / PAPER_TRAIN_IMAGES))
    return np.sort(np.random.default_rng(seed).choice(n_train, size=n_val, replace=False))


_VAL_HEADER = re.compile(r"seed=(-?\d+) n_train=(\d+) n_val=(\d+)")


def save_validation_indices(path, indices, n_train: int, seed: int) -> Path:
    """Write one index per line under a header comment giving seed and counts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# caffe-prune CIFAR-10 validation split: seed={seed} n_train={n_train} n_val={len(indices)} "
              f"(the paper: 10,000 random training images of 50,000)\n")
    fsio.write_text(path, header + "".join(f"{int(i)}\n" for i in indices))
    return path


def load_validation_indices(path, seed: int | None = None, n_train: int | None = None) -> np.ndarray:
    """Read a file written by save_validation_indices, checking it against its header (count,
    range, no repeats) and against `seed` and `n_train` when given."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; create it with `caffe-prune data cifar10`")
    lines = path.read_text().splitlines()
    found = _VAL_HEADER.search(lines[0]) if lines and lines[0].startswith("#") else None
    if not found:
        raise DataError(f"{path}:1: no 'seed=S n_train=N n_val=V' header; recreate it with `caffe-prune data cifar10`")
    have_seed, have_train, n_val = map(int, found.groups())
    for what, want, have in (("seed", seed, have_seed), ("n_train", n_train, have_train)):
        if want is not None and want != have:
            raise DataError(f"{path}: drawn with {what}={have}, not {want}; rerun `caffe-prune data cifar10`")
    try:
        indices = np.array([int(line) for line in lines[1:] if line.strip()], dtype=np.int64)
    except ValueError as exc:
        raise DataError(f"{path}: {exc}; recreate it with `caffe-prune data cifar10`") from None
    if len(indices) != n_val or len(np.unique(indices)) != n_val or \
            (n_val and (indices.min() < 0 or indices.max() >= have_train)):
        raise DataError(f"{path}: the indices are not {n_val} distinct values in 0..{have_train - 1} as its "
                        f"header says; recreate it with `caffe-prune data cifar10`")
    return indices


# ---- the authors' own validation images (`--val-split authors`) ----------------------------------

# Their released list (myopic-oracle/caffe-training-data/eval-index.txt), as "N LABEL" lines in this
# package: see the file's header for the source and for how train-N.png maps to an official image.
AUTHORS_VAL_FILE = Path(__file__).with_name("authors_validation.txt")
AUTHORS_SHUFFLE_SEED = 42       # get.py: train_test_split(..., test_size=0.0, random_state=42)
AUTHORS_VAL_IMAGES = 5_000      # lines in their eval-index.txt (the paper's text says 10,000)


def authors_permutation() -> np.ndarray:
    """perm with train-N.png = official training image perm[N]: sklearn's ShuffleSplit with test_size
    0 keeps all of ``check_random_state(42).permutation(50000)``. RandomState's stream is frozen by
    numpy's compatibility policy, so this is the authors' permutation on any numpy."""
    return np.random.RandomState(AUTHORS_SHUFFLE_SEED).permutation(OFFICIAL_COUNTS["train"])


@lru_cache(maxsize=1)
def authors_validation() -> tuple:
    """(N, label) of the authors' validation images, int64 arrays in their file's order; N indexes
    their shuffled train-N.png (``authors_permutation()[N]`` is the official index)."""
    path = AUTHORS_VAL_FILE
    try:
        rows = [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        table = np.array(rows, dtype=np.int64).reshape(len(rows), 2)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: {getattr(exc, 'strerror', None) or exc}; reinstall caffe-prune") from None
    n, labels = table[:, 0], table[:, 1]
    if len(n) != AUTHORS_VAL_IMAGES or len(np.unique(n)) != len(n) or n.min() < 0 or \
            n.max() >= OFFICIAL_COUNTS["train"] or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: not {AUTHORS_VAL_IMAGES} distinct images in 0..{OFFICIAL_COUNTS['train'] - 1} "
                        f"with labels 0..9; reinstall caffe-prune")
    n.flags.writeable = labels.flags.writeable = False
    return n, labels


def authors_validation_indices(n_train: int, batch_counts=None, labels=None) -> np.ndarray:
    """Positions, among the `n_train` training records present (data_batch_1..5 concatenated), of
    the authors' validation images (``authors_validation``), sorted (dataset order, as
    ``validation_indices``).

    ``batch_counts``: the records each of data_batch_1..5 holds (``train_batch_counts``); needed for
    a partial copy, which is taken to hold the *first* records of each official batch, in order (as
    a 5085-image subset holds the first 1017 of each). A partial copy gives only the
    authors' images it holds, at their positions in its own record order: on that subset 508 of the
    5,000 (10% of the images, not the 20% the seeded split keeps); the full set gives all 5,000.
    ``labels``: the training labels present; when given, each picked image's label must be the
    authors' label, which catches records in another order than the official one.

    Raises DataError (one line) when the counts do not fit, when none of the authors' images is
    present, or when the labels disagree."""
    counts = [BATCH_RECORDS] * len(SPLIT_FILES["train"]) if batch_counts is None else [int(c) for c in batch_counts]
    if len(counts) != len(SPLIT_FILES["train"]) or min(counts) < 0 or max(counts) > BATCH_RECORDS:
        raise DataError(f"--val-split authors: training batches hold {counts} records; expected "
                        f"{len(SPLIT_FILES['train'])} counts of at most {BATCH_RECORDS} (data_batch_1..5)")
    if sum(counts) != n_train:
        what = "pass the records per batch (a partial copy)" if batch_counts is None else "they must agree"
        raise DataError(f"--val-split authors: {n_train} training images but the batches hold {sum(counts)}; {what}")
    ns, authors_labels = authors_validation()
    batch, record = np.divmod(authors_permutation()[ns], BATCH_RECORDS)
    present = record < np.asarray(counts)[batch]
    if not present.any():
        raise DataError(f"--val-split authors: none of the authors' {len(ns)} validation images is among the "
                        f"{n_train} training images here (the first {counts} records of data_batch_1..5); "
                        f"use --val-split seeded")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    positions = starts[batch[present]] + record[present]
    order = np.argsort(positions)
    positions, expected = positions[order], authors_labels[present][order]
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != n_train:
            raise DataError(f"--val-split authors: {len(labels)} training labels for {n_train} images")
        wrong = int(np.count_nonzero(labels[positions] != expected))
        if wrong:
            raise DataError(f"--val-split authors: {wrong} of the {len(positions)} authors' validation images here "
                            f"carry another label than in their list: these training records are not the official "
                            f"ones in the official order; use --val-split seeded")
    return positions



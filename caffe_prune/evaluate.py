"""Top-1, top-5 and loss of a Caffe net, computed by Caffe's own Accuracy and SoftmaxWithLoss layers.

The net is an evaluation form (caffe_prune.netdef): images and labels are fed into its Input
blobs (the net's own blob names) in batches, already transformed the way the data layer did it (a
dataset split streams them a batch at a time). The batch means Caffe reports are combined weighted
by batch size, so a short last batch counts for what it holds.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from caffe_prune.netdef import EVAL_TOPS
from caffe_prune.errors import InputError


def feed(net, x: np.ndarray, y: np.ndarray) -> int:
    """Put a batch into an evaluation form's Input blobs (images, labels), reshaping the net for a
    batch of another size; returns the batch size."""
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y) or len(x) == 0:
        raise InputError(f"a batch needs as many labels as images (got {len(x)} and {len(y)}), at least one")
    inputs = net.inputs
    if len(inputs) < 2:
        raise InputError(f"the net has inputs {list(inputs)}; an evaluation form takes images and labels")
    data, label = net.blobs[inputs[0]], net.blobs[inputs[1]]
    if data.data.shape != x.shape:
        data.reshape(*x.shape)
        label.reshape(len(y))
        net.reshape()
    data.data[...] = x
    label.data[...] = y
    return len(x)


def scores(net, first: int = 0) -> tuple:
    """(loss, top1, top5) of the batch a forward just scored; refuses a loss that is not finite
    (NaN logits make Caffe's Accuracy count nonsense). ``first``: the batch's first image, for the message."""
    loss = float(net.blobs[EVAL_TOPS["loss"]].data)
    if not np.isfinite(loss):
        n = net.blobs[net.inputs[0]].data.shape[0]
        raise InputError(f"the loss of images {first}..{first + n - 1} is {loss}: the net's weights or "
                                 f"inputs hold values that are not finite, so no accuracy it reports means anything")
    return loss, float(net.blobs[EVAL_TOPS["top1"]].data), float(net.blobs[EVAL_TOPS["top5"]].data)


def combine(rows) -> dict:
    """Per-batch (images, loss, top1, top5), in batch order -> the means weighted by batch size (the
    one place this arithmetic is done, so that every engine reports the same bits)."""
    totals = dict.fromkeys(EVAL_TOPS, 0.0)
    images = 0
    for n, *values in rows:
        for key, value in zip(EVAL_TOPS, values):
            totals[key] += value * n
        images += n
    result = {key: value / images for key, value in totals.items()}
    result["images"] = int(images)
    return result


def evaluate(net, inputs, labels=None, batch_size: int = 128, batches: int | None = None,
             progress: bool = True) -> dict:
    """Score ``inputs``: (N, C, H, W) float32 images already transformed, with ``labels``; or a
    dataset split (caffe_prune.data.dataset.Split, ``labels`` None), read and transformed a batch
    at a time, so that memory holds a batch, not the split. ``batches``: only the first N."""
    if batches is not None and batches < 1:
        raise InputError(f"--batches must be at least 1, got {batches}")
    if labels is None:
        split = inputs if batches is None else inputs.head(batches * batch_size)
        count, stream = len(split), split.batches(batch_size)
    else:
        if len(inputs) != len(labels):
            raise InputError(f"{len(inputs)} inputs but {len(labels)} labels")
        if batches is not None:
            inputs, labels = inputs[:batches * batch_size], labels[:batches * batch_size]
        count = len(inputs)
        stream = ((inputs[lo:lo + batch_size], labels[lo:lo + batch_size]) for lo in range(0, count, batch_size))
    if count == 0:
        raise InputError("no images to evaluate")
    rows = []
    for number, (x, y) in enumerate(tqdm(stream, total=-(-count // batch_size), desc="evaluate", unit="batch",
                                         disable=not progress, leave=False)):
        feed(net, x, y)
        net.forward()
        rows.append((len(x), *scores(net, number * batch_size)))
    return combine(rows)

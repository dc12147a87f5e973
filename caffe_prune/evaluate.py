"""Top-1, top-5 and loss of a Caffe net, computed by Caffe's own Accuracy and SoftmaxWithLoss layers.

The net is an evaluation form (caffe_prune.netdef): images and labels are fed into its Input
blobs (the net's own blob names) in batches, already transformed the way the data layer did it. The batch means Caffe reports
are combined weighted by batch size, so a short last batch counts for what it holds.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from caffe_prune import engine
from caffe_prune.netdef import EVAL_TOPS


def feed(net, x: np.ndarray, y: np.ndarray) -> int:
    """Put a batch into an evaluation form's Input blobs (images, labels), reshaping the net for a
    batch of another size; returns the batch size."""
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y) or len(x) == 0:
        raise engine.EngineError(f"a batch needs as many labels as images (got {len(x)} and {len(y)}), at least one")
    inputs = net.inputs
    if len(inputs) < 2:
        raise engine.EngineError(f"the net has inputs {list(inputs)}; an evaluation form takes images and labels")
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
        raise engine.EngineError(f"the loss of images {first}..{first + n - 1} is {loss}: the net's weights or "
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


def evaluate(net, inputs: np.ndarray, labels: np.ndarray, batch_size: int = 128,
             batches: int | None = None, progress: bool = True) -> dict:
    """Run `inputs` (N, C, H, W float32, already transformed) through `net` and score them."""
    if len(inputs) != len(labels):
        raise engine.EngineError(f"{len(inputs)} inputs but {len(labels)} labels")
    if batches is not None:
        if batches < 1:
            raise engine.EngineError(f"--batches must be at least 1, got {batches}")
        inputs, labels = inputs[:batches * batch_size], labels[:batches * batch_size]
    if len(inputs) == 0:
        raise engine.EngineError("no images to evaluate")
    rows = []
    starts = range(0, len(inputs), batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress, leave=False):
        x, y = inputs[start:start + batch_size], labels[start:start + batch_size]
        feed(net, x, y)
        net.forward()
        rows.append((len(x), *scores(net, start)))
    return combine(rows)

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
    totals = dict.fromkeys(EVAL_TOPS, 0.0)
    starts = range(0, len(inputs), batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress, leave=False):
        x, y = inputs[start:start + batch_size], labels[start:start + batch_size]
        feed(net, x, y)
        out = net.forward()
        if not np.isfinite(out[EVAL_TOPS["loss"]]).all():
            raise engine.EngineError(f"the loss of images {start}..{start + len(x) - 1} is "
                                     f"{float(out[EVAL_TOPS['loss']])}: the net's weights or inputs hold values "
                                     f"that are not finite, so no accuracy it reports means anything")
        for key in totals:
            totals[key] += float(out[EVAL_TOPS[key]]) * len(x)
    result = {key: value / len(inputs) for key, value in totals.items()}
    result["images"] = int(len(inputs))
    return result

"""Entropy of a channel's activations: a plugin saliency metric (README, Your own saliency metric).

Luo and Wu's entropy-based criterion ("An Entropy-based Pruning Method for CNN Compression", 2017):
average each feature map over its H x W positions (global average pooling), one value per image;
the channel's saliency is the entropy of the histogram of those values over the validation images.
A channel whose pooled output hardly varies from image to image carries little information about
the input and is pruned first. The taxonomy cannot express it: every composition there is a mean
over samples of a per-sample value, while an entropy is a property of the whole distribution, so
this plugin defines ``combine``.

Use: ``caffe-prune prune LeNet-5 --plugin examples/plugins/entropy.py --metric plugin:entropy ...``
(or ``plugin:entropy/weights_removed``, ``domino-sum:plugin:entropy``, an oracle constituent).
"""
import numpy as np

NAME = "entropy"
INPUT = "activation"        # the convolution's feature maps, as the built-in activation metrics read them
NEEDS = "x"                 # values only: no backward pass is run for it
SCALING = "none"            # plugin:entropy alone; plugin:entropy/SCALING for any built-in scaling
BINS = 32                   # histogram bins (the validation draw is a few hundred images per step)


def reduce(x, g, h, axes):
    """Global average pooling: one value per image and channel."""
    return x.mean(axis=axes)


def combine(values):
    """(images x channels) -> the entropy (nats) of each channel's histogram over the images; a
    channel whose pooled value never changes has entropy 0."""
    out = np.zeros(values.shape[1])
    for c in range(values.shape[1]):
        column = values[:, c]
        if column.max() == column.min():
            continue
        counts, _ = np.histogram(column, bins=BINS)
        p = counts[counts > 0] / len(column)
        out[c] = -(p * np.log(p)).sum()
    return out

"""Saliency metrics from Caffe passes: the taxonomy's compositions, the paper's five, Domino.

- ``taxonomy``: a metric is input x pointwise x reduction x scaling (``parse``, ``list_metrics``,
  ``ALIASES`` for papers/004's five, ``AS_PRINTED`` for equations 1-5);
- ``collect``: one forward, one backward (and one OBD Hessian pass, if asked) per validation batch,
  reduced to per-sample values per channel; ``inputs``: per-sample weight gradients;
- ``saliency``: one number per channel (``saliency``) and the prunable groups ranked
  (``rank_groups``); ``hessian``: OBD's Hessian diagonal from Caffe's backward.

``rankings(names, tensors, graph, pruned)`` is the pruning loop's call (on what the engine
collected): each metric's ranking as a list of group ids, least salient first; ``rank(names, net,
graph, batches, pruned, reading)`` is one ``collect`` for all ``names`` and then ``rankings``, for a
script that holds a net.
"""
from caffe_prune.metrics.collect import READINGS, Tensors, collect
from caffe_prune.metrics.saliency import layer_saliencies, rank_groups, saliency
from caffe_prune.metrics.taxonomy import (ALIASES, AS_PRINTED, DOMINO, EQUATIONS, Metric, MetricError,
                                          list_metrics, parse)


def rankings(names, tensors, graph, pruned=frozenset()) -> dict:
    """{name: [group ids of graph.prunable(pruned), least salient first]} from collected tensors."""
    return {name: [gid for gid, _ in rank_groups(name, tensors, graph, pruned)] for name in names}


def rank(names, net, graph, batches, pruned=frozenset(), reading: str = "authors") -> dict:
    """``rankings`` of one ``collect`` for all ``names``."""
    names = list(names)
    return rankings(names, collect(net, graph, batches, names, reading), graph, pruned)


__all__ = ["ALIASES", "AS_PRINTED", "DOMINO", "EQUATIONS", "READINGS", "Metric", "MetricError", "Tensors",
           "collect", "layer_saliencies", "list_metrics", "parse", "rank", "rank_groups", "rankings", "saliency"]

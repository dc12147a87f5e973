"""The three papers' experiments as sweeps: which networks, metrics, Domino aggregations and
whether the oracle (``caffe-prune reproduce PAPER``, caffe_prune.commands.reproduce); the reports
print the published figures next to ours (caffe_prune.report.published_figures)."""
from __future__ import annotations

from caffe_prune.metrics import taxonomy
from caffe_prune.metrics.methods import PAPER_FIVE

PAPERS = {   # the paper's networks and methods; the reports print the published figures next to ours
    "oracle": {"nets": ["LeNet-5", "ResNet-20"], "metrics": list(PAPER_FIVE), "domino": [], "oracle": True},
    "taxonomy": {"nets": ["LeNet-5", "CIFAR10", "ResNet-20", "NIN"],        # its grid: the six scalings
                 "metrics": [f"*/*/*/{scaling}" for scaling in taxonomy.PAPER_SCALINGS], "domino": [],
                 "oracle": False},
    "domino": {"nets": ["ResNet-20", "AlexNet", "SqueezeNet", "NIN"], "metrics": list(PAPER_FIVE),
               "domino": list(taxonomy.DOMINO), "oracle": False},
}

"""What the three papers published that a report sets beside our figures (quoted, never derived)."""
from __future__ import annotations

from caffe_prune.metrics.methods import ORACLE, oracle_of_forms
from caffe_prune.metrics.taxonomy import AS_PRINTED

# papers/004 Table 2 as published (conv weights removed, % at most 5 points below the initial top-1;
# tests/test_report.py checks the transcription against a reference copy when there is one)
PUBLISHED_TABLE2 = {
    "columns": ["LeNet-5", "CIFAR10", "ResNet-20", "NIN", "AlexNet"],
    "Mean of activations": [25, 30, 6, 14, 33],
    "1st order Taylor": [27, 17, 2, 14, 41],
    "Fisher information": [19, 39, 5, 20, 40],
    "Average of gradients": [29, 26, 2, 22, 39],
    "Mean squares of weights": [7, 24, 4, 27, 40],
    "Myopic Oracle (k=16)": {"mean": [30, 43, 12, 32, 55], "ci95": [10, 2, 3, 1, 1], "runs": 8},
}


def published_table2() -> dict:
    """papers/004 Table 2 as published (the transcription above)."""
    return PUBLISHED_TABLE2


PAPER_ROWS = {"mean_activations": "Mean of activations", "taylor": "1st order Taylor",
              "fisher": "Fisher information", "mean_gradients": "Average of gradients",
              "mean_sq_weights": "Mean squares of weights", ORACLE: "Myopic Oracle (k=16)"}
# the published row of each method: the five as the authors' code computes them, and as printed
PUBLISHED_ROW = dict(PAPER_ROWS)
for _alias, (_eq, _) in AS_PRINTED.items():
    PAPER_ROWS[_eq] = f"{PAPER_ROWS[_alias]} (eq. {_eq[2:]} as printed)"
    PUBLISHED_ROW[_eq] = PUBLISHED_ROW[_alias]
for _forms, _label in (("printed", "over eq. 1-5 as printed"), ("table2", "over the Table-2 forms")):
    PAPER_ROWS[oracle_of_forms(_forms)] = f"{PAPER_ROWS[ORACLE]} {_label}"
    PUBLISHED_ROW[oracle_of_forms(_forms)] = PUBLISHED_ROW[ORACLE]

# what the Taxonomy and Domino papers published that a sweep can be set beside (their abstracts:
# papers/000, papers/001 and 003); nothing else of theirs is quoted, and no number is derived
PUBLISHED_TAXONOMY = ("We perform an in-depth experimental investigation of more than 300 saliency metrics.",
                      "We find that some of our constructed metrics can outperform the best existing "
                      "state-of-the-art metrics for convolutional neural network channel pruning.")
PUBLISHED_DOMINO = ("Domino saliency metrics improved pruning rates in most tested networks and up to 25% in "
                    "AlexNet on CIFAR-10.")
# the structure a Domino metric accounts for (papers/004 §3, Figures 2-4); NIN is the branch-free control
BRANCHES = {"ResNet-20": "residual sums", "AlexNet": "grouped convolutions", "SqueezeNet": "concatenations",
            "NIN": None, "LeNet-5": None, "CIFAR10": None}
DOMINO_NETS = ("ResNet-20", "AlexNet", "SqueezeNet", "NIN")

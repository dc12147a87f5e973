"""The training curve's picture: train loss and test top-1 against iteration."""
from __future__ import annotations

from pathlib import Path

from caffe_prune import fsio


def plot_curve(lines, path, title: str) -> Path:
    """Train loss and test top-1 against iteration (Caffe's plot_training_log charts 6 and 0), as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    trained = [l for l in lines if l.get("loss") is not None]
    left.plot([l["iter"] for l in trained], [l["loss"] for l in trained], color="C0", lw=1)
    left.set_xlabel("iteration")
    left.set_ylabel("train loss")
    tested = [l for l in lines if l.get("test_top1") is not None]
    right.plot([l["iter"] for l in tested], [100 * l["test_top1"] for l in tested], color="C1", marker="o", ms=3)
    right.set_xlabel("iteration")
    right.set_ylabel("test top-1 (%)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with fsio.replacing(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def title(recipe, out: Path) -> str:
    where = "" if recipe.where == recipe.name else f" ({recipe.where})"
    return f"{recipe.name}{where}: {out}"

"""The reports' plots (matplotlib, written atomically as PNG): Figure 6, the oracle's phases, the
taxonomy's ranking and component effects, the schedules' quality against speed."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from caffe_prune import fsio
from caffe_prune.steps import first_proposer
from caffe_prune.report.published_figures import PAPER_ROWS
from caffe_prune.report.stats import AXIS_LABELS, MEASURES, band, curve, paper_five

def save_figure(fig, path, rect=(0, 0, 1, 1)) -> Path:
    """A matplotlib figure as a PNG, laid out within ``rect`` (of the figure; the rest for a figure
    legend), written atomically (caffe_prune.fsio), then closed."""
    import matplotlib.pyplot as plt
    fig.tight_layout(rect=rect)
    with fsio.replacing(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def figure6(runs, path, title, x: str = "weights", published: bool = False) -> Path:
    """papers/004 Figure 6: single metrics dashed, the oracle solid; a method with several runs is
    drawn as its mean with the 95% band (the paper bands the oracle's 8 runs). Prune-retrain runs
    (not in the paper) are a curve of their own per schedule, each retraining an arrow from the
    top-1 before it to the top-1 after it (a marker), where the run continued from. ``published``:
    each method's Table-2 figure for the network marked on the 5-point-drop line in its colour
    (an x for the paper's point; the oracle's with its interval)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method = defaultdict(list)
    for run in runs:
        schedule = (run["config"].get("retrain_every"), run["config"].get("retrain_iters"))
        by_method[(run["method"], *(schedule if schedule[0] else (0, 0)))].append(run)
    for i, ((method, every, iters), group) in enumerate(sorted(by_method.items())):
        color = f"C{i % 10}"
        label = PAPER_ROWS.get(method, method) + (f", retrained every {every} steps" if every else "")
        solid = bool(group[0]["config"].get("oracle"))
        if len(group) >= 2 or solid:
            grid, mean, half = band(group, x)
            ax.plot(grid, mean, color=color, lw=2 if solid else 1.2, ls="-" if solid else "--",
                    label=f"{label} ({len(group)} runs)")
            ax.fill_between(grid, mean - half, mean + half, color=color, alpha=0.25 if solid else 0.12)
        else:
            ax.plot(*curve(group[0]["steps"], x), color=color, ls="--", lw=1, label=label)
        # prune-retrain runs: an arrow from the accuracy before each retraining to the accuracy after,
        # which is where the run continued from (caffe_prune.pruning's retrain records)
        marked = [(s[MEASURES[x]], 100 * s["retrain"]["before"]["top1"], 100 * s["retrain"]["after"]["top1"])
                  for run in group for s in run["steps"] if "retrain" in s]
        for at, before, after in marked:
            ax.annotate("", xy=(at, after), xytext=(at, before),
                        arrowprops=dict(arrowstyle="->", color=color, lw=0.9, shrinkA=0, shrinkB=0))
        if published:
            _mark_table2(ax, method, group, color, x)
        if marked:
            done = sorted({s["retrain"]["iters"] for run in group for s in run["steps"] if "retrain" in s})
            ax.scatter([m[0] for m in marked], [m[2] for m in marked], color=color, marker="^", s=22, zorder=3,
                       label=f"{label}: after retraining ({'/'.join(map(str, done))} iterations)")
    if published:
        ax.plot([], [], color="black", marker="x", ls="none", label="papers/004 Table 2 (at the 5-point drop)")
    initial = np.mean([100 * r["steps"][0]["test"]["top1"] for r in runs])
    ax.axhline(initial - 5, color="grey", lw=0.8, ls=":", label="5-point drop")
    ax.set_xlabel(AXIS_LABELS[x])
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_schedules(rows, path) -> Path:
    """Quality against speed (README, Pruning schedules): a panel per network, test top-1 at the
    budget against the steps taken (log scale): each run a small dot, each (method, schedule) its
    mean, filled at the budget and hollow after the fine-tune (where there is one), joined by an
    arrow. ``rows``: report.faithfulness's schedule rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    nets = sorted({row["net"] for row in rows})
    methods = sorted({row["method"] for row in rows})
    fig, axes = plt.subplots(1, len(nets), figsize=(5.5 * len(nets), 4.5), squeeze=False)
    for ax, net in zip(axes[0], nets):
        for row in (r for r in rows if r["net"] == net):
            color = f"C{methods.index(row['method']) % 10}"
            steps = np.mean(row["steps"])
            ax.scatter(row["steps"], row["top1"], color=color, s=8, alpha=0.5)
            ax.plot([steps], [np.mean(row["top1"])], color=color, marker="o", ms=7)
            ax.annotate(row["schedule"].split(" (")[0].replace(" of the channels", "").replace(" a step", "/step"),
                        (steps, np.mean(row["top1"])), textcoords="offset points", xytext=(6, -3), fontsize=6,
                        color=color)
            if row["tuned"]:
                ax.scatter(row["tuned_steps"], row["tuned"], color=color, s=8, alpha=0.5)
                ax.plot([steps], [np.mean(row["tuned"])], color=color, marker="o", ms=7, mfc="white")
                ax.annotate("", xy=(steps, np.mean(row["tuned"])), xytext=(steps, np.mean(row["top1"])),
                            arrowprops=dict(arrowstyle="->", color=color, lw=0.8, shrinkA=4, shrinkB=4))
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("steps to half the MACs (log scale)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"{net}: pruned to half its MACs")
    for i, method in enumerate(methods):
        axes[0][0].plot([], [], color=f"C{i % 10}", marker="o", ls="none", label=f"{method}: at the budget")
        axes[0][0].plot([], [], color=f"C{i % 10}", marker="o", mfc="white", ls="none",
                        label="then 300 masked iterations")
    axes[0][0].scatter([], [], color="grey", s=8, label="each seed")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7)
    return save_figure(fig, path, rect=(0, 0.1, 1, 1))


def _mark_table2(ax, method, group, color, x) -> None:
    from caffe_prune.report.published_figures import PUBLISHED_ROW, published_table2
    table2, net = published_table2(), group[0]["net"]
    value = table2.get(PUBLISHED_ROW.get(method, ""))
    if value is None or net not in table2["columns"] or x != "weights":
        return
    i = table2["columns"].index(net)
    at = np.mean([100 * r["steps"][0]["test"]["top1"] for r in group]) - 5
    if isinstance(value, dict):
        ax.errorbar([value["mean"][i]], [at], xerr=[value["ci95"][i]], color=color, marker="x", ms=8, capsize=3, lw=1)
    else:
        ax.plot([value[i]], [at], color=color, marker="x", ms=8, ls="none")


def phases(runs, path, title) -> Path | None:
    """For each oracle run, the constituent that first proposed each pruned group, by step."""
    oracle_runs = [r for r in runs if r["config"].get("oracle")]
    if not oracle_runs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(oracle_runs[0]["config"]["oracle"])
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.45 * len(oracle_runs)))
    for row, run in enumerate(oracle_runs):
        for step in run["steps"][1:]:
            first = first_proposer(step)
            ax.scatter(step["percent_conv_removed"], row, color=f"C{names.index(first)}", s=14, marker="s")
    for i, name in enumerate(names):
        ax.scatter([], [], color=f"C{i}", marker="s", label=PAPER_ROWS.get(name, name))
    ax.set_yticks(range(len(oracle_runs)), [f"seed {r['config']['seed']}" for r in oracle_runs])
    ax.set_xlabel("% of convolution weights removed")
    ax.set_title(title)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return save_figure(fig, path)


def plot_ranking(rows, path, title) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.2))
    x = np.arange(1, len(rows) + 1)
    ax.errorbar(x, [r[1] for r in rows], yerr=[r[2] for r in rows], fmt="o", ms=2.5, lw=0.7, color="C0",
                label="metric (mean ± 95% CI)")
    for i, r in enumerate(rows):
        alias = paper_five(r[0])
        if alias:
            ax.plot(x[i], r[1], "s", color="C3", ms=6)
            ax.annotate(alias, (x[i], r[1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([], [], "s", color="C3", label="papers/004's five")
    ax.set_xlabel("rank")
    ax.set_ylabel("% conv weights removed at the drop")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_components(effects: dict, path, title) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = {c: rows for c, rows in effects.items() if len(rows) >= 2}
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(3.2 * max(1, len(shown)), 3.4), squeeze=False)
    for ax, (component, rows) in zip(axes[0], shown.items()):
        y = np.arange(len(rows))
        ax.barh(y, [0 if math.isnan(r[4]) else r[4] for r in rows], xerr=[r[5] for r in rows], color="C0", alpha=0.7)
        ax.set_yticks(y, [r[0] for r in rows], fontsize=7)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_title(component, fontsize=9)
        ax.set_xlabel("effect (points)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def taxonomy_index(aggregation: str) -> int:
    from caffe_prune.metrics.taxonomy import DOMINO
    return DOMINO.index(aggregation) if aggregation in DOMINO else len(DOMINO)

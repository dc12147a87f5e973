"""The Domino report: each base metric against its Domino variants per network."""
from __future__ import annotations

from pathlib import Path

from caffe_prune import fsio
from caffe_prune.analysis import DEFAULT_DROP
from caffe_prune.report.figures import save_figure, taxonomy_index
from caffe_prune.report.published_figures import BRANCHES, DOMINO_NETS, PUBLISHED_DOMINO
from caffe_prune.report.stats import difference_ci, mean_ci, scores_of
from caffe_prune.report.text import pm, protocol_lines

def domino_pairs(scores: dict) -> list:
    """[(base metric, aggregation, base {seed: value}, Domino {seed: value})] for every Domino metric
    whose base was run too (the base as it was named: an alias pairs with its domino-AGG:alias)."""
    pairs = []
    for metric in sorted(scores):
        if metric.startswith("domino-"):
            head, _, base = metric.partition(":")
            if base in scores:
                pairs.append((base, head[len("domino-"):], scores[base], scores[metric]))
    return pairs


def domino_report(runs, out_dir) -> Path:
    """Each base metric against its Domino variants per network: both means and their difference
    with a 95% CI (paired by seed when both have the same seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [r for r in runs if r["metric"]]
    drop = runs[0]["report_drop"] if runs else DEFAULT_DROP
    present = list(dict.fromkeys(r["net"] for r in runs))
    nets = [n for n in DOMINO_NETS if n in present] + [n for n in present if n not in DOMINO_NETS]
    lines = ["# Domino saliency metrics against their base metrics", "",
             f"% of conv weights removed at the last measured step at most {drop:g} points below the unpruned "
             f"network's test top-1, mean ± 95% CI over seeds; difference = Domino - base (paired by seed when "
             f"both ran the same seeds, else Welch), and relative to the base.", "",
             f"- published (Domino paper, abstract): \"{PUBLISHED_DOMINO}\" (the abstract does not say whether "
             f"the 25% is relative or in points; both are printed below)."]
    alexnet = []
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(nets) + 3), 4))
    xticks, xlabels, x = [], [], 0
    sections = []
    for net in nets:
        pairs = domino_pairs(scores_of([r for r in runs if r["net"] == net]))
        if not pairs:
            continue
        kind = BRANCHES.get(net, "unknown")
        sections += [f"## {net} ({'branches: ' + kind if kind else 'no branches: the control'})", "",
                     "| base metric | Domino | base % removed | Domino % removed | difference (points) | relative |",
                     "| --- | --- | ---: | ---: | ---: | ---: |"]
        start = x
        for base, agg, b, d in pairs:
            bm, bh = mean_ci(list(b.values()))
            dm, dh = mean_ci(list(d.values()))
            diff, half = difference_ci(d, b)
            relative = f"{100 * diff / bm:+.0f}%" if bm > 0 else "-"
            sections.append(f"| `{base}` | {agg} | {pm(bm, bh, len(b))} | {pm(dm, dh, len(d))} | "
                            f"{diff:+.1f} ± {half:.1f} | {relative} |")
            ax.bar(x, diff, yerr=half, color=f"C{taxonomy_index(agg)}", alpha=0.8)
            if net == "AlexNet":
                alexnet.append((diff, 100 * diff / bm if bm > 0 else float("nan"), base, agg))
            x += 1
        xticks.append((start + x - 1) / 2)
        xlabels.append(net + ("" if BRANCHES.get(net) else "\n(control)"))
        x += 1
        sections.append("")
    if alexnet:
        diff, rel, base, agg = max(alexnet)
        lines.append(f"- ours, AlexNet: the largest improvement is {diff:+.1f} points ({rel:+.0f}% relative), "
                     f"domino-{agg}:{base} over {base}.")
    else:
        lines.append("- ours, AlexNet: not in these runs.")
    lines.append("")
    lines += sections
    if xticks:
        for agg in sorted({p[1] for net in nets for p in domino_pairs(scores_of([r for r in runs if r["net"] == net]))}):
            ax.bar([], [], color=f"C{taxonomy_index(agg)}", label=f"domino-{agg}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(xticks, xlabels, fontsize=8)
        ax.set_ylabel("Domino - base (points of % removed)")
        ax.set_title("Domino variants against their base metrics (95% CI)")
        ax.legend(fontsize=7)
        save_figure(fig, out_dir / "domino.png")
        lines += ["![Domino against base](domino.png)", ""]
    else:
        plt.close(fig)
        lines += ["No Domino metric was run together with its base metric.", ""]
    lines += protocol_lines(runs)
    path = out_dir / "domino.md"
    fsio.write_text(path, "\n".join(lines))
    return path

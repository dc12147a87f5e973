"""The taxonomy report: metrics ranked per network, component effects, the weights-removed scaling, and
the best constructed metric against the best of papers/004's five."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from caffe_prune import fsio
from caffe_prune.metrics.taxonomy import ALIASES
from caffe_prune.report.figures import plot_components, plot_ranking
from caffe_prune.report.published_figures import PUBLISHED_TAXONOMY
from caffe_prune.report.stats import (COMPONENTS, component_effects, components, difference_ci, mean_ci,
                                      paper_five, ranking, scores_of, weights_removed_view)
from caffe_prune.report.text import pm, protocol_lines


def best_table(runs) -> str:
    """Markdown, one row per network: the best constructed metric (no Domino, not one of the five)
    against the best of papers/004's five, their difference paired by seed, and where the five
    rank among all the metrics run ("" when a network lacks either)."""
    rows = []
    for net in dict.fromkeys(r["net"] for r in runs if r["metric"]):
        scores = scores_of([r for r in runs if r["net"] == net and r["metric"]])
        five = {m: v for m, v in scores.items() if paper_five(m)}
        built = {m: v for m, v in scores.items() if not paper_five(m) and components(m).get("domino") == "none"}
        if not five or not built:
            continue
        order = [m for m, *_ in ranking(scores)]          # ties as the ranking breaks them
        best_five, best_built = (next(m for m in order if m in chosen) for chosen in (five, built))
        b, f = built[best_built], five[best_five]
        diff, half = difference_ci(b, f)
        ranks = ", ".join(f"{paper_five(m)} {order.index(m) + 1}" for m in sorted(five, key=order.index))
        rows.append(f"| {net} | {len(scores)} | `{best_built}` | {pm(*mean_ci(list(b.values())), len(b))} | "
                    f"{paper_five(best_five)} (`{ALIASES[paper_five(best_five)]}`) | "
                    f"{pm(*mean_ci(list(f.values())), len(f))} | {diff:+.1f} ± {half:.1f} | {ranks} |")
    if not rows:
        return ""
    return "\n".join(["| network | metrics | best constructed | % removed | best of the five | % removed | "
                      "difference (points) | rank of each of the five |",
                      "| --- | ---: | --- | ---: | --- | ---: | ---: | --- |", *rows])


def taxonomy_report(runs, out_dir, top: int = 25) -> Path:
    """Metrics ranked per network, the component view, the weights-removed scaling, and the best
    constructed metric against the best of papers/004's five; ``taxonomy-<NET>.csv`` holds the
    whole ranking."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [r for r in runs if r["metric"]]
    if not runs:
        raise ValueError("no single-metric runs to rank")
    drop = runs[0]["report_drop"]
    nets = list(dict.fromkeys(r["net"] for r in runs))
    metrics = {r["metric"] for r in runs}
    lines = ["# Taxonomy of saliency metrics: ranking and components", "",
             f"Each metric's % of conv weights removed (transitively) at the last measured step at most {drop:g} "
             f"points below the unpruned network's test top-1, mean ± 95% CI over seeds (Student t; ± 0.0 for "
             f"one run).", "",
             f"- published (Taxonomy paper, abstract): \"{PUBLISHED_TAXONOMY[0]}\"",
             f"- ours: {len(metrics)} distinct metrics on {len(nets)} network(s), {len(runs)} runs "
             f"({len([m for m in metrics if components(m).get('domino') == 'none'])} "
             f"without Domino aggregation).",
             "- the paper's per-metric figures are not available here, so none are printed.", ""]
    for net in nets:
        scores = scores_of([r for r in runs if r["net"] == net])
        rows = ranking(scores)
        table = io.StringIO()
        writer = csv.writer(table)
        writer.writerow(["rank", "metric", *COMPONENTS, "paper_five", "mean_removed", "ci95", "runs"])
        for i, (m, mean, half, n) in enumerate(rows, 1):
            p = components(m)
            writer.writerow([i, m, *(p.get(c) for c in COMPONENTS), paper_five(m) or "", round(mean, 4),
                             round(half, 4), n])
        fsio.write_text(out_dir / f"taxonomy-{net}.csv", table.getvalue())
        lines += [f"## {net}", "", f"{len(rows)} metrics; the top {min(top, len(rows))} "
                  f"(all in `taxonomy-{net}.csv`):", "",
                  "| rank | metric | % removed | papers/004 |", "| ---: | --- | ---: | --- |"]
        lines += [f"| {i} | `{m}` | {pm(mean, half, n)} | {paper_five(m) or ''} |"
                  for i, (m, mean, half, n) in enumerate(rows[:top], 1)]
        fig = plot_ranking(rows, out_dir / f"taxonomy-{net}.png", f"{net}: metrics ranked")
        lines += ["", f"![{net} ranking]({fig.name})", ""]
        means = {m: float(np.mean(list(v.values()))) for m, v in scores.items()}
        effects = {c: component_effects(means, c) for c in COMPONENTS}
        effects = {c: rows_ for c, rows_ in effects.items() if len(rows_) >= 2}
        if effects:
            lines += [f"### {net}: components", "",
                      "Each level's mean over the metrics that have it, and its paired effect: within each "
                      "context (the other components fixed), the level's score minus the context's mean, "
                      "averaged over the contexts that hold at least two levels.", "",
                      "| component | level | metrics | mean % removed | effect (points) | contexts |",
                      "| --- | --- | ---: | ---: | ---: | ---: |"]
            for component, rows_ in effects.items():
                for level, n, mean, half, eff, eff_half, contexts in rows_:
                    effect = "-" if math.isnan(eff) else f"{eff:+.1f} ± {eff_half:.1f}"
                    lines.append(f"| {component} | {level} | {n} | {mean:.1f} ± {half:.1f} | {effect} | {contexts} |")
            fig = plot_components(effects, out_dir / f"components-{net}.png", f"{net}: component effects")
            lines += ["", f"![{net} components]({fig.name})", ""]
        view = weights_removed_view(means)
        if view:
            lines += [f"### {net}: the weights-removed scaling", "",
                      "`weights_removed` (divide by the weights that fall with the channel's group) against each "
                      "other scaling, same input, pointwise, reduction and Domino aggregation:", "",
                      "| other scaling | contexts | weights_removed - other (points) | weights_removed ahead |",
                      "| --- | ---: | ---: | ---: |"]
            lines += [f"| {s} | {n} | {mean:+.1f} ± {half:.1f} | {wins} of {n} |" for s, n, mean, half, wins in view]
            lines.append("")
    best = best_table(runs)
    if best:
        lines += ["## The best constructed metric against the best of papers/004's five", "",
                  f"- published (Taxonomy paper, abstract): \"{PUBLISHED_TAXONOMY[1]}\"", "", best, ""]
    lines += protocol_lines(runs)
    path = out_dir / "taxonomy.md"
    fsio.write_text(path, "\n".join(lines))
    return path

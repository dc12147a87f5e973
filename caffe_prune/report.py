"""Reports: what the runs got, side by side with what the three papers published.

Three kinds, each a Markdown file with PNG plots in one directory:

- ``oracle`` (papers/004): Table 2, "conv weights removed at a test top-1 drop of at most 5
  points", mean ± 95% CI over seeds next to the published values, and the protocol actually used;
  ``figure6-<NET>.png`` (test top-1 against % conv weights removed: single metrics dashed, the
  oracle solid, each with its 95% band when it has several runs) and ``phases-<NET>.png`` (which
  constituent proposed the group the oracle pruned, step by step: the paper's phase structure).
- ``taxonomy`` (the Taxonomy paper): metrics ranked by the mean % conv weights removed at a 5-point
  drop, per network, with 95% CIs; each component's marginal effect across the others; the
  weights-removed scaling against the others; the best constructed metric against the best of
  papers/004's five.
- ``domino`` (the Domino paper): each base metric against its Domino variants per network, the
  difference with its 95% CI, branched networks beside the branch-free control (NIN).

Input is run directories (caffe_prune.pruning: config.json + steps.jsonl, read without the code that
wrote them; ``write_report``) or a sweep's results store (caffe_prune.store; ``write_reports``).
Where a paper published a figure the report prints it, quoted, next to ours; it never makes one up.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from caffe_prune import fsio
from caffe_prune.metrics.taxonomy import ALIASES, AS_PRINTED, MetricError, parse
from caffe_prune.pruning import removed_at_drop

ORACLE = "oracle"


def oracle_of_forms(forms: str) -> str:
    """The method name of the oracle over the paper's five in ``forms`` (metrics.taxonomy.PAPER_FORMS);
    the authors' code's forms are plain ``oracle``."""
    return ORACLE if forms == "code" else f"oracle ({forms} forms)"
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


def save_figure(fig, path) -> Path:
    """A matplotlib figure as a PNG, written atomically (caffe_prune.fsio), then closed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with fsio.replacing(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


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


def load_run(run_dir) -> dict:
    run_dir = Path(run_dir)
    header = json.loads((run_dir / "config.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines() if line.strip()]
    config = header["config"]
    return {"dir": str(run_dir), "config": config, "protocol": header["protocol"], "steps": steps,
            "method": config["metric"] or ORACLE, "net": Path(config["net"]).name}


def mean_ci(values) -> tuple:
    """Mean and the half-width of its 95% confidence interval (Student t; 0 for one value)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), 0.0
    from scipy import stats
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half)


def curve(steps) -> tuple:
    """(% conv weights removed, test top-1 %) at the measured steps."""
    measured = [s for s in steps if "test" in s]
    return (np.array([s["percent_conv_removed"] for s in measured]),
            np.array([100 * s["test"]["top1"] for s in measured]))


def band(runs) -> tuple:
    """(grid of % removed, mean test top-1, 95% CI half-width) over runs, each curve interpolated on
    the grid up to its own last measured step (a run that stopped earlier leaves the mean there)."""
    grid = np.linspace(0, max(curve(r["steps"])[0].max() for r in runs), 200)
    ys = np.array([np.interp(grid, *curve(r["steps"]), right=np.nan) for r in runs])
    ok = np.sum(~np.isnan(ys), axis=0) >= 1
    mean = np.nanmean(ys[:, ok], axis=0)
    half = np.array([mean_ci(col[~np.isnan(col)])[1] for col in ys[:, ok].T])
    return grid[ok], mean, half


def figure6(runs, path, title) -> Path:
    """papers/004 Figure 6: single metrics dashed, the oracle solid; a method with several runs is
    drawn as its mean with the 95% band (the paper bands the oracle's 8 runs). Prune-retrain runs
    (not in the paper) are a curve of their own per schedule, each retraining an arrow from the
    top-1 before it to the top-1 after it (a marker), where the run continued from."""
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
            grid, mean, half = band(group)
            ax.plot(grid, mean, color=color, lw=2 if solid else 1.2, ls="-" if solid else "--",
                    label=f"{label} ({len(group)} runs)")
            ax.fill_between(grid, mean - half, mean + half, color=color, alpha=0.25 if solid else 0.12)
        else:
            ax.plot(*curve(group[0]["steps"]), color=color, ls="--", lw=1, label=label)
        # prune-retrain runs: an arrow from the accuracy before each retraining to the accuracy after,
        # which is where the run continued from (caffe_prune.pruning's retrain records)
        marked = [(s["percent_conv_removed"], 100 * s["retrain"]["before"]["top1"], 100 * s["retrain"]["after"]["top1"])
                  for run in group for s in run["steps"] if "retrain" in s]
        for x, before, after in marked:
            ax.annotate("", xy=(x, after), xytext=(x, before),
                        arrowprops=dict(arrowstyle="->", color=color, lw=0.9, shrinkA=0, shrinkB=0))
        if marked:
            done = sorted({s["retrain"]["iters"] for run in group for s in run["steps"] if "retrain" in s})
            ax.scatter([m[0] for m in marked], [m[2] for m in marked], color=color, marker="^", s=22, zorder=3,
                       label=f"{label}: after retraining ({'/'.join(map(str, done))} iterations)")
    initial = np.mean([100 * r["steps"][0]["test"]["top1"] for r in runs])
    ax.axhline(initial - 5, color="grey", lw=0.8, ls=":", label="5-point drop")
    ax.set_xlabel("% of convolution weights removed (transitively)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


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
            first = step["proposers"][0][0]
            ax.scatter(step["percent_conv_removed"], row, color=f"C{names.index(first)}", s=14, marker="s")
    for i, name in enumerate(names):
        ax.scatter([], [], color=f"C{i}", marker="s", label=PAPER_ROWS.get(name, name))
    ax.set_yticks(range(len(oracle_runs)), [f"seed {r['config']['seed']}" for r in oracle_runs])
    ax.set_xlabel("% of convolution weights removed")
    ax.set_title(title)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return save_figure(fig, path)


def table(runs, max_drop: float = 5.0) -> str:
    """Markdown: % conv weights removed at <= max_drop points, ours (mean ± 95% CI, n) | paper."""
    nets = list(dict.fromkeys(r["net"] for r in runs))
    columns = published_table2()
    results = defaultdict(list)
    for run in runs:
        results[(run["method"], run["net"])].append(removed_at_drop(run["steps"], max_drop))
    methods = [m for m in PAPER_ROWS if any(k[0] == m for k in results)]
    methods += sorted({k[0] for k in results} - set(methods))
    lines = ["| metric | " + " | ".join(f"{n} (ours) | {n} (paper)" for n in nets) + " |",
             "| --- |" + " ---: | ---: |" * len(nets)]
    for method in methods:
        cells = []
        for net in nets:
            values = results.get((method, net))
            mean, half = mean_ci(values) if values else (float("nan"), 0.0)
            ours = f"{mean:.1f} ± {half:.1f} (n={len(values)})" if values else "-"
            paper = columns.get(PUBLISHED_ROW.get(method, ""), None)
            if isinstance(paper, dict):
                i = columns["columns"].index(net) if net in columns["columns"] else None
                paper = f"{paper['mean'][i]} ± {paper['ci95'][i]}" if i is not None else "-"
            elif paper is not None:     # a network the paper did not prune: nothing to print
                paper = str(paper[columns["columns"].index(net)]) if net in columns["columns"] else None
            cells += [ours, paper or "-"]
        lines.append(f"| {PAPER_ROWS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run_dirs, out_dir) -> Path:
    """Table, figures and protocol for the runs in `run_dirs`; returns report.md's path."""
    return oracle_report([load_run(d) for d in run_dirs], out_dir, "report.md")


def data_line(protocol: dict) -> str:
    """The data a run read, with its image counts ("5085 train / 1017 test images") unless its
    description already gives them."""
    data = str(protocol.get("data", "?"))
    counts = protocol.get("counts") or {}
    parts = [f"{counts[k]} {k}" for k in ("train", "test") if k in counts]
    return data if "images" in data or not parts else f"{data}, {' / '.join(parts)} images"


def stop_rule(c: dict) -> str:
    rule = ("no drop stop (whole curves)" if c.get("max_drop") is None
            else f"stop at a drop of more than {c['max_drop']} points")
    if c.get("floor") is not None:
        rule += f", or below {c['floor']}% top-1"
    if c.get("max_steps") is not None:
        rule += f", or after {c['max_steps']} steps"
    return rule


def oracle_report(runs, out_dir, name: str = "oracle.md") -> Path:
    """papers/004's Table 2 (ours next to the published), Figure 6 and the phase structure."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not runs:
        raise ValueError("no runs to report on")
    lines = ["# Reproduction of papers/004 Table 2 and Figure 6", "",
             "Conv weights removed (%, counted transitively) at the last measured step whose test top-1 "
             "is at most 5 points below the unpruned network's, mean ± 95% CI over seeds:", "",
             table(runs), ""]
    for net in dict.fromkeys(r["net"] for r in runs):
        group = [r for r in runs if r["net"] == net]
        fig = figure6(group, out_dir / f"figure6-{net}.png", f"{net}: test top-1 while pruning")
        lines += [f"![{net}]({fig.name})", ""]
        phase = phases(group, out_dir / f"phases-{net}.png", f"{net}: constituent followed by the oracle")
        if phase:
            lines += [f"![{net} phases]({phase.name})", ""]
    first = runs[0]
    c, p = first["config"], first["protocol"]
    lines += ["## Protocol used", "",
              f"- data: {data_line(p)} (the paper "
              f"used the full 50,000 / 10,000). Validation: {p['validation_images']} training images "
              f"(paper: 10,000); test measured on {p['test_images_per_measurement']} images per step.",
              f"- batches of {c['batch_size']}: {c['eval_size']} per saliency computation, {c['oracle_eval_size']} per "
              f"oracle sensitivity; oracle k = {c['k']} ({c.get('shortlist', 'paper')} shortlist); test every "
              f"{c['test_interval']} step(s); {stop_rule(c)}.",
              f"- masking semantics: {c['semantics']}; tensors read: {c['reading']}.",
              f"- runs: {len(runs)}; seeds: {', '.join(sorted({str(r['config']['seed']) for r in runs}))}.",
              "- differences from the paper: a subset of CIFAR-10 when the full set is absent (accuracies and "
              "the drop criterion then rest on fewer test images), and the published networks evaluated with "
              "stock Caffe; every other setting follows the protocol of papers/004 §5.1.3.", ""]
    report = out_dir / name
    fsio.write_text(report, "\n".join(lines))
    return report


# ---- reports from a sweep's results store -----------------------------------------------------------

KINDS = ("oracle", "taxonomy", "domino")
COMPONENTS = ("input", "pointwise", "reduction", "scaling", "domino")
FIVE_BY_COMPOSITION = {composition: alias for alias, composition in ALIASES.items()}
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


def paper_five(metric: str | None) -> str | None:
    """The alias when `metric` is one of papers/004's five (by name or by its composition)."""
    if not metric:
        return None
    if metric in ALIASES:
        return metric
    return FIVE_BY_COMPOSITION.get(metric)


def runs_from_store(location, steps_for=lambda row: True) -> list:
    """The finished runs of a sweep's store as the dicts load_run gives, plus id, seed, metric, the
    taxonomy components and ``removed`` (the Table-2 figure the store holds); steps are read for
    the rows `steps_for` accepts."""
    from caffe_prune.store import Store
    with Store(location, create=False) as store:
        runs = []
        for row in store.runs(status="done"):
            runs.append({"dir": row["run_dir"], "id": row["id"], "config": row["config"],
                         "protocol": row["protocol"] or {}, "method": row["method"], "net": row["net"],
                         "seed": row["seed"], "metric": row["metric"], "removed": row["removed_at_drop"],
                         "report_drop": row["report_drop"], **{c: row[c] for c in COMPONENTS},
                         "steps": store.steps(row["id"]) if steps_for(row) else None})
    return runs


def applicable(runs) -> list:
    """The kinds of report the runs support."""
    kinds = []
    if any(r["config"].get("oracle") or paper_five(r["metric"]) for r in runs):
        kinds.append("oracle")
    if len({r["metric"] for r in runs if r["metric"] and not r["domino"]}) >= 2:
        kinds.append("taxonomy")
    if any(r["domino"] for r in runs):
        kinds.append("domino")
    return kinds


def write_reports(sweep_dir, out_dir=None, kinds=None) -> list:
    """The reports `kinds` (default: every applicable one) from SWEEP_DIR's store into `out_dir`
    (default SWEEP_DIR/report); returns the Markdown files' paths."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir else (sweep_dir if sweep_dir.is_dir() else sweep_dir.parent) / "report"
    bad = [k for k in kinds or [] if k not in KINDS]
    if bad:
        raise ValueError(f"unknown report kind(s) {', '.join(bad)}; one of {', '.join(KINDS)}")
    runs = runs_from_store(sweep_dir, steps_for=lambda row: False)
    if not runs:
        raise ValueError(f"{sweep_dir}: no finished runs to report on")
    kinds = kinds or applicable(runs)
    paths = []
    if "oracle" in kinds:
        def wanted(row):
            return row["method"] in PAPER_ROWS or bool(row["config"].get("oracle")) or paper_five(row["metric"])
        chosen = [r for r in runs_from_store(sweep_dir, wanted) if r["steps"] is not None]
        paths.append(oracle_report(chosen or runs_from_store(sweep_dir), out_dir, "oracle.md"))
    if "taxonomy" in kinds:
        paths.append(taxonomy_report(runs, out_dir))
    if "domino" in kinds:
        paths.append(domino_report(runs, out_dir))
    return paths


def difference_ci(a: dict, b: dict) -> tuple:
    """Mean of a - b and its 95% CI half-width. a, b: {seed: value}. Paired by seed when both
    have the same seeds (n >= 2), else Welch's unpaired interval; 0 when either has one value."""
    from scipy import stats
    if set(a) == set(b) and len(a) >= 2:
        return mean_ci([a[s] - b[s] for s in sorted(a)])
    x, y = np.array(list(a.values()), float), np.array(list(b.values()), float)
    diff = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return diff, 0.0
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    if vx + vy == 0:
        return diff, 0.0
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    return diff, float(stats.t.ppf(0.975, df) * math.sqrt(vx + vy))


def _scores(runs) -> dict:
    """{metric: {seed: % conv weights removed at the report drop}}."""
    out = defaultdict(dict)
    for r in runs:
        if r["metric"] and r["removed"] is not None:
            out[r["metric"]][r["seed"]] = r["removed"]
    return out


def _pm(mean, half, n=None) -> str:
    text = f"{mean:.1f} ± {half:.1f}"
    return text + (f" (n={n})" if n is not None else "")


def _components(metric: str) -> dict:
    try:
        m = parse(metric)
    except MetricError:
        return {}
    return {"input": m.input, "pointwise": m.pointwise, "reduction": m.reduction, "scaling": m.scaling,
            "domino": m.domino or "none"}


def ranking(scores: dict) -> list:
    """[(metric, mean, CI half-width, n)], most weights removed first."""
    rows = [(m, *mean_ci(list(v.values())), len(v)) for m, v in scores.items()]
    return sorted(rows, key=lambda row: (-row[1], row[0]))


def component_effects(means: dict, component: str) -> list:
    """Each level of `component`: (level, metrics, mean ± CI over those metrics, paired effect ± CI,
    contexts). The paired effect compares metrics that differ in this component only: within each
    context (the other components fixed) a level's score minus the context's mean, averaged over
    contexts; so it is the level's marginal effect across the others."""
    parts = {m: _components(m) for m in means}
    parts = {m: p for m, p in parts.items() if p}
    others = [c for c in COMPONENTS if c != component]
    by_level, contexts = defaultdict(list), defaultdict(dict)
    for m, p in parts.items():
        by_level[p[component]].append(means[m])
        contexts[tuple(p[c] for c in others)][p[component]] = means[m]
    effects = defaultdict(list)
    for members in contexts.values():
        if len(members) >= 2:
            centre = float(np.mean(list(members.values())))
            for level, value in members.items():
                effects[level].append(value - centre)
    rows = []
    for level in sorted(by_level):
        mean, half = mean_ci(by_level[level])
        effect = mean_ci(effects[level]) if effects[level] else (float("nan"), 0.0)
        rows.append((level, len(by_level[level]), mean, half, *effect, len(effects[level])))
    return rows


def weights_removed_view(means: dict) -> list:
    """The Taxonomy paper's own scaling against each other: (other scaling, contexts, mean of
    weights_removed - other ± CI, contexts where weights_removed removed more)."""
    parts = {m: _components(m) for m in means}
    table = defaultdict(dict)
    for m, p in parts.items():
        if p:
            table[(p["input"], p["pointwise"], p["reduction"], p["domino"])][p["scaling"]] = means[m]
    diffs = defaultdict(list)
    for row in table.values():
        if "weights_removed" in row:
            for scaling, value in row.items():
                if scaling != "weights_removed":
                    diffs[scaling].append(row["weights_removed"] - value)
    return [(s, len(d), *mean_ci(d), sum(x > 0 for x in d)) for s, d in sorted(diffs.items())]


def _plot_ranking(rows, path, title) -> Path:
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


def _plot_components(effects: dict, path, title) -> Path:
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


def taxonomy_report(runs, out_dir, top: int = 25) -> Path:
    """Metrics ranked per network, the component view, the weights-removed scaling, and the best
    constructed metric against the best of papers/004's five; ``taxonomy-<NET>.csv`` holds the
    whole ranking."""
    import csv
    import io
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
             f"({len([m for m in metrics if _components(m).get('domino') == 'none'])} "
             f"without Domino aggregation).",
             "- the paper's per-metric figures are not available here, so none are printed.", ""]
    best_rows = []
    for net in nets:
        scores = _scores([r for r in runs if r["net"] == net])
        rows = ranking(scores)
        table = io.StringIO()
        writer = csv.writer(table)
        writer.writerow(["rank", "metric", *COMPONENTS, "paper_five", "mean_removed", "ci95", "runs"])
        for i, (m, mean, half, n) in enumerate(rows, 1):
            p = _components(m)
            writer.writerow([i, m, *(p.get(c) for c in COMPONENTS), paper_five(m) or "", round(mean, 4),
                             round(half, 4), n])
        fsio.write_text(out_dir / f"taxonomy-{net}.csv", table.getvalue())
        lines += [f"## {net}", "", f"{len(rows)} metrics; the top {min(top, len(rows))} "
                  f"(all in `taxonomy-{net}.csv`):", "",
                  "| rank | metric | % removed | papers/004 |", "| ---: | --- | ---: | --- |"]
        lines += [f"| {i} | `{m}` | {_pm(mean, half, n)} | {paper_five(m) or ''} |"
                  for i, (m, mean, half, n) in enumerate(rows[:top], 1)]
        fig = _plot_ranking(rows, out_dir / f"taxonomy-{net}.png", f"{net}: metrics ranked")
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
            fig = _plot_components(effects, out_dir / f"components-{net}.png", f"{net}: component effects")
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
        five = {m: v for m, v in scores.items() if paper_five(m)}
        built = {m: v for m, v in scores.items() if not paper_five(m) and _components(m).get("domino") == "none"}
        if five and built:
            best_five = max(five, key=lambda m: (np.mean(list(five[m].values())), m))
            best_built = max(built, key=lambda m: (np.mean(list(built[m].values())), m))
            best_rows.append((net, best_built, built[best_built], best_five, five[best_five]))
    if best_rows:
        lines += ["## The best constructed metric against the best of papers/004's five", "",
                  f"- published (Taxonomy paper, abstract): \"{PUBLISHED_TAXONOMY[1]}\"", "",
                  "| network | best constructed | % removed | best of the five | % removed | difference (points) |",
                  "| --- | --- | ---: | --- | ---: | ---: |"]
        for net, built, b, five, f in best_rows:
            diff, half = difference_ci(b, f)
            lines.append(f"| {net} | `{built}` | {_pm(*mean_ci(list(b.values())), len(b))} | {paper_five(five)} "
                         f"(`{ALIASES[paper_five(five)]}`) | {_pm(*mean_ci(list(f.values())), len(f))} | "
                         f"{diff:+.1f} ± {half:.1f} |")
        lines.append("")
    lines += _protocol_lines(runs)
    path = out_dir / "taxonomy.md"
    fsio.write_text(path, "\n".join(lines))
    return path


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
    drop = runs[0]["report_drop"] if runs else 5.0
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
        pairs = domino_pairs(_scores([r for r in runs if r["net"] == net]))
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
            sections.append(f"| `{base}` | {agg} | {_pm(bm, bh, len(b))} | {_pm(dm, dh, len(d))} | "
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
        for agg in sorted({p[1] for net in nets for p in domino_pairs(_scores([r for r in runs if r["net"] == net]))}):
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
    lines += _protocol_lines(runs)
    path = out_dir / "domino.md"
    fsio.write_text(path, "\n".join(lines))
    return path


def taxonomy_index(aggregation: str) -> int:
    from caffe_prune.metrics.taxonomy import DOMINO
    return DOMINO.index(aggregation) if aggregation in DOMINO else len(DOMINO)


def _protocol_lines(runs) -> list:
    if not runs:
        return []
    c, p = runs[0]["config"], runs[0].get("protocol") or {}
    seeds = sorted({r["seed"] for r in runs})
    return ["## Protocol used", "",
            f"- data: {data_line(p)}; "
            f"test measured on {p.get('test_images_per_measurement', '?')} images per step.",
            f"- batches of {c['batch_size']}, {c['eval_size']} per saliency computation; "
            f"test every {c['test_interval']} step(s); {stop_rule(c)}.",
            f"- masking semantics: {c['semantics']}; tensors read: {c['reading']}.",
            f"- runs: {len(runs)}; seeds: {', '.join(map(str, seeds))}.", ""]

"""The reproduction report: papers/004 Table 2 and Figure 6 side by side with what a run matrix got.

Input is run directories (caffe_prune.pruning: config.json + steps.jsonl), read without the code
that wrote them. Output, in one directory: ``report.md`` (the table "conv weights removed at a test
top-1 drop of at most 5 points", mean ± 95% CI over seeds, next to the published values, and the
protocol actually used), ``figure6-<NET>.png`` (test top-1 against % conv weights removed: single
metrics dashed, the oracle solid with its 95% band) and ``phases-<NET>.png`` (which constituent
proposed the group the oracle pruned, step by step: the paper's phase structure).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from caffe_prune.download import WORKPLACE_SHARED
from caffe_prune.pruning import removed_at_drop

ORACLE = "oracle"
# papers/004 Table 2 as published (conv weights removed, % at most 5 points below the initial top-1),
# for machines without this workplace's ../shared/reference/published.json (tests check they agree)
PUBLISHED_TABLE2 = {
    "columns": ["LeNet-5", "CIFAR10", "ResNet-20", "NIN", "AlexNet"],
    "Mean of activations": [25, 30, 6, 14, 33],
    "1st order Taylor": [27, 17, 2, 14, 41],
    "Fisher information": [19, 39, 5, 20, 40],
    "Average of gradients": [29, 26, 2, 22, 39],
    "Mean squares of weights": [7, 24, 4, 27, 40],
    "Myopic Oracle (k=16)": {"mean": [30, 43, 12, 32, 55], "ci95": [10, 2, 3, 1, 1], "runs": 8},
}
SHARED_REFERENCE = WORKPLACE_SHARED / "reference" / "published.json"


def published_table2() -> dict:
    """Table 2 from this workplace's reference file when present, else the transcription above."""
    if SHARED_REFERENCE.is_file():
        return json.loads(SHARED_REFERENCE.read_text())["table2_conv_weights_removed_percent_at_max_5pt_test_drop"]
    return PUBLISHED_TABLE2
PAPER_ROWS = {"mean_activations": "Mean of activations", "taylor": "1st order Taylor",
              "fisher": "Fisher information", "mean_gradients": "Average of gradients",
              "mean_sq_weights": "Mean squares of weights", ORACLE: "Myopic Oracle (k=16)"}


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


def figure6(runs, path, title) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method = defaultdict(list)
    for run in runs:
        by_method[run["method"]].append(run)
    for i, (method, group) in enumerate(sorted(by_method.items())):
        color = f"C{i}"
        label = PAPER_ROWS.get(method, method)
        if method == ORACLE:
            grid = np.linspace(0, max(curve(r["steps"])[0].max() for r in group), 200)
            ys = np.array([np.interp(grid, *curve(r["steps"]), right=np.nan) for r in group])
            ok = np.sum(~np.isnan(ys), axis=0) >= 1
            mean = np.nanmean(ys[:, ok], axis=0)
            half = np.array([mean_ci(col[~np.isnan(col)])[1] for col in ys[:, ok].T])
            ax.plot(grid[ok], mean, color=color, lw=2, label=f"{label} ({len(group)} runs)")
            ax.fill_between(grid[ok], mean - half, mean + half, color=color, alpha=0.25)
        else:
            for j, run in enumerate(group):
                ax.plot(*curve(run["steps"]), color=color, ls="--", lw=1, label=label if j == 0 else None)
    initial = np.mean([100 * r["steps"][0]["test"]["top1"] for r in runs])
    ax.axhline(initial - 5, color="grey", lw=0.8, ls=":", label="5-point drop")
    ax.set_xlabel("% of convolution weights removed (transitively)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def phases(runs, path, title) -> Path | None:
    """For each oracle run, the constituent that first proposed each pruned group, by step."""
    oracle_runs = [r for r in runs if r["method"] == ORACLE]
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


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
            paper = columns.get(PAPER_ROWS.get(method, ""), None)
            if isinstance(paper, dict):
                i = columns["columns"].index(net) if net in columns["columns"] else None
                paper = f"{paper['mean'][i]} ± {paper['ci95'][i]}" if i is not None else "-"
            elif paper is not None and net in columns["columns"]:
                paper = str(paper[columns["columns"].index(net)])
            cells += [ours, paper or "-"]
        lines.append(f"| {PAPER_ROWS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run_dirs, out_dir) -> Path:
    """Table, figures and protocol for the runs in `run_dirs`; returns report.md's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in run_dirs]
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
              f"- data: {p['data']} ({p['counts']['train']} train / {p['counts']['test']} test images; the paper "
              f"used the full 50,000 / 10,000). Validation: {p['validation_images']} training images "
              f"(paper: 10,000); test measured on {p['test_images_per_measurement']} images per step.",
              f"- batches of {c['batch_size']}: {c['eval_size']} per saliency computation, {c['oracle_eval_size']} per "
              f"oracle sensitivity; oracle k = {c['k']}; test every {c['test_interval']} step(s); "
              f"stop at a drop of more than {c['max_drop']} points.",
              f"- masking semantics: {c['semantics']}; tensors read: {c['reading']}.",
              f"- runs: {len(runs)}; seeds: {', '.join(sorted({str(r['config']['seed']) for r in runs}))}.",
              "- differences from the paper: a subset of CIFAR-10 when the full set is absent (accuracies and "
              "the drop criterion then rest on fewer test images), and the published networks evaluated with "
              "stock Caffe; every other setting follows the protocol in ../shared/reference/published.json.", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report

"""The oracle report (papers/004): Table 2 beside the published values, Figure 6, the phase structure."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from caffe_prune import fsio
from caffe_prune.metrics.methods import ORACLE
from caffe_prune.analysis import DEFAULT_DROP, removed_at_drop
from caffe_prune.report.figures import figure6, phases
from caffe_prune.report.published_figures import PAPER_ROWS, PUBLISHED_ROW, published_table2
from caffe_prune.report.stats import mean_ci, measure_of
from caffe_prune.report.text import data_line, stop_rule
from caffe_prune.rundir import RunDir

def table(runs, max_drop: float = DEFAULT_DROP, x: str = "weights") -> str:
    """Markdown: % conv weights (``x`` "macs": % MACs) removed at <= max_drop points, ours (mean ±
    95% CI, n) | paper (the papers published weights only)."""
    nets = list(dict.fromkeys(r["net"] for r in runs))
    columns = published_table2() if x == "weights" else {"columns": []}
    results = defaultdict(list)
    for run in runs:
        results[(run["method"], run["net"])].append(removed_at_drop(run["steps"], max_drop,
                                                                    measure_of(run["steps"], x)))
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


def oracle_report(runs, out_dir, name: str = "oracle.md", x: str = "weights") -> Path:
    """papers/004's Table 2 (ours next to the published), Figure 6 and the phase structure; ``x``
    "macs" reads both by the % of MACs removed instead (the papers published no such figure)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not runs:
        raise ValueError("no runs to report on")
    what = "Conv weights removed (%, counted transitively)" if x == "weights" else \
        "Multiply-accumulates per image removed (%, as the compact network computes them)"
    lines = ["# Reproduction of papers/004 Table 2 and Figure 6", "",
             f"{what} at the last measured step whose test top-1 is at most 5 points below the unpruned "
             f"network's, mean ± 95% CI over seeds:", "", table(runs, x=x), ""]
    suffix = "" if x == "weights" else "-macs"
    for net in dict.fromkeys(r["net"] for r in runs):
        group = [r for r in runs if r["net"] == net]
        fig = figure6(group, out_dir / f"figure6-{net}{suffix}.png", f"{net}: test top-1 while pruning", x)
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


def load_run(run_dir) -> dict:
    """A run directory's configuration, protocol and steps (caffe_prune.rundir), as a report reads it."""
    header, steps = RunDir(run_dir).read()
    config = header["config"]
    return {"dir": str(run_dir), "config": config, "protocol": header["protocol"], "steps": steps,
            "method": config["metric"] or ORACLE,
            "net": Path(config["net"]).name}


def write_report(run_dirs, out_dir) -> Path:
    """Table, figures and protocol for the runs in `run_dirs`; returns report.md's path."""
    return oracle_report([load_run(d) for d in run_dirs], out_dir, "report.md")

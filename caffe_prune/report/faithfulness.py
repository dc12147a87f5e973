"""The README's measured results, rebuilt from the results committed under ``experiments/results/``.

Each result the README quotes sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``
and is made here from the archive (caffe_prune.archive) of the sweep ``BLOCKS[NAME]`` names, by the
same code as the reports (caffe_prune.report), never typed by hand:
``caffe-prune report experiments/results --readme README.md`` rewrites every block whose archive is
there and ``--check`` only says which differ.

- ``resnet-oracle``: papers/004 Table 2's ResNet-20 oracle, the Table-2 forms against the code's,
  paired by seed;
- ``taxonomy``: the taxonomy over all its compositions, per network: the best constructed metric
  against the best of papers/004's five, and where the five rank;
- ``macs``: the scalings by Θ_C and by MACs against none, read by % of weights and % of MACs;
- ``entropy-lenet``: the example plugin metric beside the oracle and built-in metrics;
- ``deployment``: a run pruned to a MACs budget and its export, timed (README, Pruning for deployment);
- ``zoo-bench``, ``bench``: one oracle step's cost on the zoo's ImageNet nets, and ResNet-20's bench;
- ``table2``: papers/004 Table 2's columns for LeNet-5, CIFAR10, ResNet-20 and NIN from their sweeps'
  archives (the five in the Table-2 forms and the oracle over them), each figure beside the paper's,
  and where ours falls outside the paper's band;
- ``figure6``: Figure 6 for the networks whose whole curves are archived, drawn into ``figures/``
  beside the README (95% bands over seeds, the paper's Table-2 points marked);
- ``forms``, ``shortlist``: the five as the authors' code computes them against the equations as
  printed, and the oracle's shortlist as the text states it against the authors' release;
- ``schedules``, ``resnet50-schedule``, ``deploy``: pruning schedules, quality against speed (with
  figures/schedules.png), ResNet-50 to half its MACs, and the exports timed in three runtimes.

A block may read several archives of one folder (``table2`` and ``figure6`` do); the figures
(``DRAWINGS``) are written only when the README is rebuilt (``--check`` compares the text).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from caffe_prune import archive, fsio
from caffe_prune.report.figures import figure6, plot_schedules
from caffe_prune.report.oracle import table
from caffe_prune.report.published_figures import PAPER_ROWS, PUBLISHED_ROW, published_table2
from caffe_prune.metrics.taxonomy import PAPER_SCALINGS
from caffe_prune.report.stats import component_effects, components, difference_ci, mean_ci, scores_of
from caffe_prune.report.taxonomy import best_table
from caffe_prune.analysis import DEFAULT_DROP, removed_at_drop


def _resnet_oracle(runs) -> str:
    by_forms = {}
    for run in runs:
        by_forms.setdefault(run["method"], {})[run["seed"]] = removed_at_drop(run["steps"], DEFAULT_DROP)
    lines = [table(runs)]
    if {"oracle", "oracle (table2 forms)"} <= set(by_forms):
        diff, half = difference_ci(by_forms["oracle (table2 forms)"], by_forms["oracle"])
        lines += ["", f"Table-2 forms minus the code's forms, paired by seed: {diff:+.1f} ± {half:.1f} points "
                      f"(n={len(by_forms['oracle'])})."]
    return "\n".join(lines)


def _taxonomy(runs) -> str:
    """The best table, and each reduction's and each scaling's paired effect per network
    (report.stats.component_effects; a composition's score is its mean over seeds)."""
    from caffe_prune.metrics.taxonomy import REDUCTIONS
    lines = [best_table(runs)]
    for component, levels in (("reduction", REDUCTIONS), ("scaling", PAPER_SCALINGS)):
        lines += ["", f"Each {component}'s paired effect on the % of conv weights removed (points, ± 95% CI): a "
                      f"composition's score minus the mean of those that differ from it in the {component} only:", "",
                  "| network | seeds | " + " | ".join(levels) + " |", "| --- | ---: |" + " ---: |" * len(levels)]
        for net in dict.fromkeys(r["net"] for r in runs if r["metric"]):
            mine = [r for r in runs if r["net"] == net and r["metric"]]
            means = {m: float(np.mean(list(v.values()))) for m, v in scores_of(mine).items()}
            effects = {row[0]: row[4:6] for row in component_effects(means, component)}
            lines.append(f"| {net} | {len({r['seed'] for r in mine})} | "
                         + " | ".join(f"{effects[x][0]:+.1f} ± {effects[x][1]:.1f}"
                                      if x in effects and not np.isnan(effects[x][0]) else "-" for x in levels) + " |")
    return "\n".join(lines)


def _macs(runs) -> str:
    weights, macs = table(runs), table(runs, x="macs")
    return "\n".join(["% of conv weights removed at the 5-point drop:", "", weights, "",
                      "% of MACs per image removed at the 5-point drop:", "", macs, "", _macs_paired(runs)])


def _macs_paired(runs) -> str:
    """`macs_removed` against each other scaling of the same base composition (input, pointwise,
    reduction), paired by base and seed, by % of MACs removed at the 5-point drop."""
    table_ = ["`macs_removed` against the other scalings of the same composition, paired by composition and "
              "seed (% of MACs removed at the 5-point drop):", "",
              "| network | against | pairs | macs_removed minus it (points) | macs_removed ahead / behind |",
              "| --- | --- | ---: | ---: | ---: |"]
    for net in dict.fromkeys(r["net"] for r in runs):
        values = {}
        for run in runs:
            parts = components(run["metric"] or "")
            if run["net"] == net and parts.get("scaling"):
                key = (parts["input"], parts["pointwise"], parts["reduction"], parts["domino"], run["seed"])
                values.setdefault(parts["scaling"], {})[key] = removed_at_drop(
                    run["steps"], DEFAULT_DROP, "percent_macs_removed")
        mine = values.pop("macs_removed", {})
        for other, theirs in sorted(values.items()):
            diffs = [mine[k] - theirs[k] for k in sorted(set(mine) & set(theirs))]
            if diffs:
                mean, half = mean_ci(diffs)
                table_.append(f"| {net} | {other} | {len(diffs)} | {mean:+.1f} ± {half:.1f} | "
                              f"{sum(d > 0 for d in diffs)} / {sum(d < 0 for d in diffs)} |")
    return "\n".join(table_)


def _entropy(runs) -> str:
    return table(runs)


def _deployment(path: Path) -> str:
    """The deployment example: a run pruned to a MACs budget (its run directory's config.json and
    steps.jsonl) and `export --run ... --json export.json` of its last step."""
    import json
    from caffe_prune.rundir import RunDir
    folder = path.parent
    header, steps = RunDir(folder / "run").read()
    report = json.loads(path.read_text())
    first, last = steps[0], steps[-1]
    rows = [("test top-1 (%)", f"{100 * first['test']['top1']:.2f}", f"{100 * last['test']['top1']:.2f}", ""),
            ("MACs per image", f"{report['macs_original']:,}", f"{report['macs']:,}",
             f"{report['macs_original'] / report['macs']:.2f}x fewer"),
            ("parameters", f"{report['params_original']:,}", f"{report['params']:,}",
             f"{report['params_original'] / report['params']:.2f}x fewer"),
            ("conv weights", f"{report['conv_weights_original']:,}", f"{report['conv_weights']:,}",
             f"{report['percent_conv_removed']:.1f}% removed")]
    for run in (report.get("latency") or {}).get("runs", []):
        rows.append((f"latency, batch {run['batch']}, {run['threads']} thread(s) (ms, median)",
                     f"{run['original_ms']:.2f}", f"{run['compact_ms']:.2f}", f"{run['speedup']:.2f}x faster"))
    config = header["config"]
    lines = [f"{config['net']}, `{config['metric']}`, {len(steps) - 1} steps to "
             f"{', '.join(f'{k}={v}' for k, v in (config.get('target') or {}).items())} "
             f"(top-1 on {header['protocol']['test_images_per_measurement']} test images):", "",
             "| | original | compact | |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {name} | {a} | {b} | {c} |" for name, a, b, c in rows]
    return "\n".join(lines)


def _zoo_bench(folder: Path) -> str:
    """`caffe-prune bench --oracle --steps 1 --modes fast-N --test-size 2 --json` of each zoo net
    (one oracle step at k = 16 on the fast engine's workers); the test phase per batch, and the
    step at the default 80 test batches projected from it."""
    import json
    lines = ["| network | input, batch | saliency (s) | probes, k = 16 (s) | test per batch (s) | "
             "oracle step, 80 test batches (s, projected) | peak memory per process (GiB) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for path in sorted(folder.glob("*.json")):
        if path.stem == "resnet20":
            continue
        result = json.loads(path.read_text())
        (mode, row), = result["modes"].items()
        phases = row["phases"]
        batches = result["test_images"] // result["batch_size"]
        per_batch = phases["test"] / batches
        step = phases["saliency"] + phases["probes"] + 80 * per_batch
        peak = max(result["peak_rss_mib"], row["worker_peak_rss_mib"]) / 1024
        lines.append(f"| `{Path(result['net']).name}` | {'x'.join(map(str, result['input_shape']))}, "
                     f"{result['batch_size']} | {phases['saliency']:.1f} | {phases['probes']:.1f} | {per_batch:.1f} | "
                     f"{step:.0f} | {peak:.2f} |")
    return "\n".join(lines)


def _bench(path: Path) -> str:
    """ResNet-20's `caffe-prune bench ResNet-20 published --steps 5 --json`: each engine's seconds
    per step and phase, the speed-up over the naive loop, and whether it decided the same."""
    import json
    result = json.loads(path.read_text())
    lines = [f"{result['steps']} oracle steps (k = {result['k']}), {result['test_images']} test images per "
             f"measurement, {result['cores']} cores:", "",
             "| engine | s/step | saliency | probes | test | speed-up over naive | same decisions |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, row in result["modes"].items():
        phases = row["phases"]
        lines.append(f"| {name} | {row['seconds_per_step']:.2f} | {phases.get('saliency', 0):.2f} | "
                     f"{phases.get('probes', 0):.2f} | {phases.get('test', 0):.2f} | "
                     f"{row.get('speedup_vs_naive', 1.0):.2f}x | {row.get('same_as_naive', '-')} |")
    modes = result["modes"]
    many = next((n for n in modes if n.startswith("fast-") and n != "fast-1"), None)
    if "fast-1" in modes and many:
        ratio = modes["fast-1"]["phases"]["saliency"] / modes[many]["phases"]["saliency"]
        lines += ["", f"The saliency phase on {result['workers']} workers: {ratio:.2f}x the one-worker fast engine."]
    return "\n".join(lines)


# papers/004's networks in its column order, and the archive of each Table-2 column
TABLE2_NETS = ("LeNet-5", "CIFAR10", "ResNet-20", "NIN")
TABLE2_ARCHIVES = {"table2": None, "table2-resnet": None, "resnet-oracle": "oracle (table2 forms)", "table2-nin": None}
FIGURE6_ARCHIVES = {"table2": ("LeNet-5", "CIFAR10"), "resnet-figure6": ("ResNet-20",)}
FIGURES = "figures"


def _table2_runs(results_dir: Path) -> list:
    runs = []
    for name, method in TABLE2_ARCHIVES.items():
        if archive.is_archive(results_dir / name):
            runs += [r for r in archive.read(results_dir / name) if method is None or r["method"] == method]
    return sorted(runs, key=lambda r: TABLE2_NETS.index(r["net"]) if r["net"] in TABLE2_NETS else len(TABLE2_NETS))


def _table2(results_dir: Path) -> str:
    """Table 2 from the archives, then each figure the paper's band does not hold: the oracle's
    mean outside the paper's mean ± both intervals, a metric's published value outside our 95% CI."""
    runs = _table2_runs(results_dir)
    lines = [table(runs), ""]
    published = published_table2()
    outside = []
    for (method, net), values in sorted(_by_method_net(runs).items()):
        paper = published.get(PUBLISHED_ROW.get(method, ""))
        if paper is None or net not in published["columns"]:
            continue
        i = published["columns"].index(net)
        mean, half = mean_ci(values)
        if isinstance(paper, dict):
            low, high = paper["mean"][i] - paper["ci95"][i] - half, paper["mean"][i] + paper["ci95"][i] + half
            if not low <= mean <= high:
                outside.append(f"{net}, {PAPER_ROWS.get(method, method)}: {mean:.1f} ± {half:.1f} against "
                               f"{paper['mean'][i]} ± {paper['ci95'][i]}")
        elif len(values) > 1 and not mean - half <= paper[i] <= mean + half:
            outside.append(f"{net}, {PAPER_ROWS.get(method, method)}: {mean:.1f} ± {half:.1f} against {paper[i]}")
    lines.append("Outside the paper's band (ours, mean ± 95% CI, against the published figure): "
                 + ("; ".join(outside) if outside else "none") + ".")
    return "\n".join(lines)


def _by_method_net(runs) -> dict:
    out = {}
    for run in runs:
        out.setdefault((run["method"], run["net"]), []).append(removed_at_drop(run["steps"], DEFAULT_DROP))
    return out


def _figure6(results_dir: Path, readme_dir: Path | None = None) -> str:
    """Links to figures/figure6-NET.png for every network with archived whole curves; with
    ``readme_dir`` the figures are drawn there too."""
    lines = []
    for name, nets in FIGURE6_ARCHIVES.items():
        if not archive.is_archive(results_dir / name):
            continue
        runs = archive.read(results_dir / name)
        for net in nets:
            group = [r for r in runs if r["net"] == net]
            if not group:
                continue
            seeds = len({r["seed"] for r in group})
            path = f"{FIGURES}/figure6-{net}.png"
            if readme_dir is not None:
                figure6(group, readme_dir / path, f"{net}: test top-1 while pruning ({seeds} seeds, "
                                                  f"{'whole curves' if name != 'resnet-figure6' else 'to a top-1 of 30%'})",
                        published=True)
            lines.append(f"![Figure 6, {net}]({path})")
    return "\n\n".join(lines)


def _forms(runs) -> str:
    """The five in the authors' code's forms and as printed (eq. 1-5), per network, beside Table 2."""
    from caffe_prune.metrics.taxonomy import AS_PRINTED
    five = list(AS_PRINTED)                          # the aliases, in the paper's order
    printed = [AS_PRINTED[m][0] for m in five]
    results = _by_method_net(runs)
    published = published_table2()
    lines = ["| % conv weights removed | " + " | ".join(PAPER_ROWS[m] for m in five) + " |",
             "| --- |" + " ---: |" * len(five)]
    nearer = {"code's forms": [], "as printed": [], "neither": []}   # which form is nearer Table 2, per cell
    for net in [n for n in TABLE2_NETS if any(k[1] == n for k in results)]:
        i = published["columns"].index(net)
        lines.append(f"| {net}, Table 2 | " + " | ".join(str(published[PAPER_ROWS[m]][i]) for m in five) + " |")
        for label, names in (("code's forms", five), ("as printed", printed)):
            cells = []
            for m in names:
                values = results.get((m, net))
                cells.append(f"{mean_ci(values)[0]:.1f} ± {mean_ci(values)[1]:.1f} (n={len(values)})" if values else "-")
            lines.append(f"| {net}, {label} | " + " | ".join(cells) + " |")
        for code, as_printed in zip(five, printed):
            a, b = results.get((code, net)), results.get((as_printed, net))
            if a and b:
                paper = published[PAPER_ROWS[code]][i]
                gap_code, gap_printed = abs(np.mean(a) - paper), abs(np.mean(b) - paper)
                which = "neither" if gap_code == gap_printed else "code's forms" if gap_code < gap_printed else "as printed"
                nearer[which].append(f"{net} {PAPER_ROWS[code]}")
    lines += ["", "Nearer Table 2's figure (means): " + "; ".join(
        f"{label}: {len(cells)} ({', '.join(cells)})" for label, cells in nearer.items() if cells) + "."]
    return "\n".join(lines)


def _shortlist(results_dir: Path) -> str:
    """The oracle with the authors' released shortlist minus the text's, paired by seed, per network."""
    paper = archive.read(results_dir / "shortlist") if archive.is_archive(results_dir / "shortlist") else []
    code = archive.read(results_dir / "shortlist-authors") if archive.is_archive(results_dir / "shortlist-authors") else []
    lines = ["| network | the text's shortlist | the authors' release | release minus text, paired by seed |",
             "| --- | ---: | ---: | ---: |"]
    for net in [n for n in TABLE2_NETS if any(r["net"] == n for r in paper + code)]:
        a = {r["seed"]: removed_at_drop(r["steps"], DEFAULT_DROP) for r in code if r["net"] == net}
        b = {r["seed"]: removed_at_drop(r["steps"], DEFAULT_DROP) for r in paper if r["net"] == net}
        cells = [f"{mean_ci(list(v.values()))[0]:.1f} ± {mean_ci(list(v.values()))[1]:.1f} (n={len(v)})" if v else "-"
                 for v in (b, a)]
        diff = f"{difference_ci(a, b)[0]:+.1f} ± {difference_ci(a, b)[1]:.1f}" if a and b else "-"
        lines.append(f"| {net} | {cells[0]} | {cells[1]} | {diff} |")
    return "\n".join(lines)


def _schedule_of(config: dict) -> str:
    """A run's schedule in words (caffe_prune.schedule)."""
    if config.get("in_steps"):
        return f"{config['in_steps']} steps (geometric)"
    per_step = config.get("per_step")
    if per_step is None:
        return "1 group a step (Algorithm 1)"
    if per_step.endswith("%macs"):
        return f"{per_step[:-5]}% of the MACs left a step"
    return f"{per_step} of the channels a step" if per_step.endswith("%") else f"{per_step} groups a step"


def _schedule_rows(path: Path) -> list:
    """Each (network, method, schedule) of the schedules archive with its runs' figures, in the
    table's order: steps, groups a step, test top-1 at the budget (%) and after the fine-tune
    (schedules-finetune/ID.json, where there is one; tuned_steps: those runs' steps), MACs left, the
    run's wall time."""
    import json
    tuned = {file.stem: json.loads(file.read_text()) for file in (path.parent / "schedules-finetune").glob("*.json")}
    groups = {}
    for run in archive.read(path):
        groups.setdefault((run["net"], PAPER_ROWS.get(run["method"], run["method"]), _schedule_of(run["config"])),
                          []).append(run)
    return [{"net": net, "method": method, "schedule": schedule, "runs": len(group),
             "steps": [len(r["steps"]) - 1 for r in group],
             "per_step": [np.mean([len(s["groups"]) for s in r["steps"][1:]]) for r in group],
             "top1": [r["final_top1"] for r in group],                                     # % (runs.csv)
             "tuned": [100 * tuned[r["id"][:16]]["after"]["top1"] for r in group if r["id"][:16] in tuned],
             "tuned_steps": [len(r["steps"]) - 1 for r in group if r["id"][:16] in tuned],
             "left": [r["steps"][-1]["macs"] / r["steps"][0]["macs"] for r in group],
             "wall": [r["wall_s"] for r in group if r.get("wall_s")]}
            for (net, method, schedule), group in sorted(groups.items(),
                                                         key=lambda kv: (kv[0][0], kv[0][1], _order(kv[0][2])))]


def _schedules(path: Path, readme_dir: Path | None = None) -> str:
    """Quality against speed: the table of _schedule_rows (means over seeds) and its plot,
    figures/schedules.png (drawn there with ``readme_dir``)."""
    rows = _schedule_rows(path)
    lines = ["| network | method | schedule | runs | steps | groups a step | test top-1 at the budget (%) | "
             "after 300 masked iterations (%) | MACs left | wall time (s, the runs' range) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        tuned, runs = row["tuned"], row["runs"]
        tuned_cell = "-" if not tuned else _pm(tuned) + (f" (n={len(tuned)})" if len(tuned) < runs else "")
        lines.append(f"| {row['net']} | {row['method']} | {row['schedule']} | {runs} | {np.mean(row['steps']):.0f} | "
                     f"{np.mean(row['per_step']):.1f} | {_pm(row['top1'])} | {tuned_cell} | "
                     f"{np.mean(row['left']):.3f} | {_range(row['wall'])} |")
    plot = f"{FIGURES}/schedules.png"
    if readme_dir is not None:
        plot_schedules(rows, readme_dir / plot)
    return "\n".join(lines) + f"\n\n![Quality against speed]({plot})"


def _order(schedule: str) -> int:
    return 0 if schedule.startswith("1 group") else 3 if "geometric" in schedule else 1 if schedule.startswith("1%") else 2


def _pm(values) -> str:
    mean, half = mean_ci(values)
    return f"{mean:.1f} ± {half:.1f}"


def _range(values) -> str:
    if not values:
        return "-"
    low, high = f"{min(values):.0f}", f"{max(values):.0f}"
    return low if low == high else f"{low}-{high}"


def _resnet50(folder: Path) -> str:
    """ResNet-50 (the zoo's deploy prototxt, random weights, a synthetic 224x224 LMDB) pruned to half
    its MACs: each run directory under ``folder`` (config.json, steps.jsonl) and the export of its
    last step (export.json: the MACs Caffe's shapes give for the compact net)."""
    import json
    from caffe_prune.rundir import RunDir
    lines = ["| method | schedule | steps | groups removed | wall time (min) | peak memory per process (GiB) | "
             "MACs left (run's record) | MACs left (compact net, Caffe's shapes) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run_dir in sorted(p for p in folder.iterdir() if (p / "config.json").is_file()):
        header, steps = RunDir(run_dir).read()
        config = header["config"]
        exported = json.loads((run_dir.parent / f"{run_dir.name}-export.json").read_text()) \
            if (run_dir.parent / f"{run_dir.name}-export.json").is_file() else {}
        peak = max(max(s.get("peak_rss_mib", {}).get("main", 0), s.get("peak_rss_mib", {}).get("worker", 0))
                   for s in steps)
        method = config["metric"] or "oracle over the Table-2 forms"
        original = header["original"]["macs"]
        counted = exported.get("macs_counted_on_the_compact_net")
        lines.append(f"| {method} | {_schedule_of(config)} | {len(steps) - 1} | {sum(len(s['groups']) for s in steps)} | "
                     f"{sum(s.get('seconds') or 0 for s in steps) / 60:.1f} | {peak / 1024:.2f} | "
                     f"{steps[-1]['macs'] / original:.3f} ({steps[-1]['macs']:,}) | "
                     + (f"{counted / original:.3f} ({counted:,})" if counted else "-") + " |")
    return "\n".join(lines)


def _deploy(folder: Path) -> str:
    """`export --json` reports with `--runtime caffe,opencv,onnxruntime`: the MACs ratio beside the
    measured speed-up in each runtime, batch 1 and 32, 1 and 2 threads; then, for pycaffe, the
    layers that gain least."""
    import json
    reports = {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}
    summary = ["| network | MACs fewer | parameters fewer | conv weights removed | test top-1 (%), original -> compact |",
               "| --- | ---: | ---: | ---: | --- |"]
    for name, report in reports.items():
        test = report.get("test")
        top1 = f"{100 * test['top1_original']:.1f} -> {100 * test['top1_compact']:.1f} ({test['images']} images)" \
            if test else "-"
        summary.append(f"| {name} | {report['speedup_in_macs']:.2f}x | "
                       f"{report['params_original'] / max(report['params'], 1):.2f}x | "
                       f"{report['percent_conv_removed']:.1f}% | {top1} |")
    threads = sorted({r["threads"] for report in reports.values() for r in report.get("served") or []})
    lines = summary + ["", "Latency, original -> compact (ms, median), and the speed-up (its quartile range):", "",
                       "| network | runtime | batch | " + " | ".join(f"{t} thread(s)" for t in threads) + " |",
                       "| --- | --- | ---: | " + " | ".join("---" for _ in threads) + " |"]
    notes = []
    for name, report in reports.items():
        cells = {}
        for r in report.get("served") or []:
            low, high = r["speedup_range"]
            cells.setdefault((r["runtime"], r["batch"]), {})[r["threads"]] = \
                f"{r['original_ms']:.2f} -> {r['compact_ms']:.2f}: {r['speedup']:.2f}x ({low:.2f}-{high:.2f})"
        for (runtime, batch), by_threads in cells.items():
            lines.append(f"| {name} | {runtime} | {batch} | " + " | ".join(by_threads.get(t, "-") for t in threads) + " |")
        runs = (report.get("latency") or {}).get("runs") or []
        if runs:
            ref = max(runs, key=lambda r: (r["batch"], -r["threads"]))
            layers = [l for l in ref.get("layers", []) if l["original_ms"] and l["compact_ms"]]
            total = sum(l["original_ms"] for l in layers) or 1
            slow = sorted((l for l in layers if l["original_ms"] > 0.05 * total), key=lambda l: l["speedup"] or 0)[:3]
            if slow:
                notes.append(f"{name} (pycaffe, batch {ref['batch']}, {ref['threads']} thread): "
                             + ", ".join(f"{l['name']} ({l['type']}, {100 * l['original_ms'] / total:.0f}% of the "
                                         f"time) {l['speedup']:.2f}x" for l in slow))
    if notes:
        lines += ["", "The layers that gain least, among those taking at least 5% of the original's forward: "
                  + "; ".join(notes) + "."]
    return "\n".join(lines)


def _archived(builder):
    return lambda folder: builder(archive.read(folder))


# README block -> (what it reads under experiments/results: an archive, a file or a folder; what makes it)
BLOCKS = {"resnet-oracle": ("resnet-oracle", _archived(_resnet_oracle)),
          "taxonomy": ("taxonomy-all", _archived(_taxonomy)),
          "macs": ("macs-scaling", _archived(_macs)),
          "entropy-lenet": ("entropy-lenet", _archived(_entropy)),
          "deployment": ("deployment/export.json", _deployment),
          "zoo-bench": ("zoo-bench", _zoo_bench),
          "bench": ("zoo-bench/resnet20.json", _bench),
          "table2": ("table2", lambda path: _table2(path.parent)),
          "figure6": ("table2", lambda path: _figure6(path.parent)),
          "forms": ("forms", _archived(_forms)),
          "shortlist": ("shortlist", lambda path: _shortlist(path.parent)),
          "schedules": ("schedules", _schedules),
          "resnet50-schedule": ("resnet50-schedule", _resnet50),
          "deploy": ("deploy", _deploy)}


# README block -> what draws its figures beside the README (results folder, README's folder)
DRAWINGS = {"figure6": _figure6,
            "schedules": lambda results_dir, readme_dir: _schedules(results_dir / "schedules", readme_dir)}


def _present(path: Path) -> bool:
    """An archive, a file, or a folder of results (JSON files or run directories: what each block reads)."""
    return archive.is_archive(path) or path.is_file() or \
        (path.is_dir() and (any(path.glob("*.json")) or any(path.glob("*/config.json"))))


def rebuild(results_dir) -> dict:
    """{block: Markdown} for every block whose results are in ``results_dir``."""
    results_dir = Path(results_dir)
    return {block: build(results_dir / folder).strip()
            for block, (folder, build) in BLOCKS.items() if _present(results_dir / folder)}


def _pattern(block: str):
    return re.compile(rf"(<!-- results:{re.escape(block)} -->\n)(.*?)(<!-- /results:{re.escape(block)} -->)", re.S)


def update(readme, results_dir, check: bool = False) -> dict:
    """Rewrite the README's blocks from the archives (``check``: write nothing); returns
    {"changed": [...], "same": [...], "missing": [blocks without an archive or without markers]}."""
    readme = Path(readme)
    text = readme.read_text()
    built = rebuild(results_dir)
    outcome = {"changed": [], "same": [], "missing": sorted(set(BLOCKS) - set(built))}
    for block, markdown in built.items():
        pattern = _pattern(block)
        found = pattern.search(text)
        if not found:
            outcome["missing"].append(block)
            continue
        new = f"{markdown}\n"
        outcome["same" if found.group(2) == new else "changed"].append(block)
        text = text[:found.start(2)] + new + text[found.end(2):]
    if not check:
        for block, draw in DRAWINGS.items():                      # the figures the blocks link to
            if block in built:
                draw(Path(results_dir), readme.parent)
        if outcome["changed"]:
            fsio.write_text(readme, text)
    return outcome

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
- ``zoo-bench``, ``bench``: one oracle step's cost on the zoo's ImageNet nets, and ResNet-20's bench.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from caffe_prune import archive, fsio
from caffe_prune.report.oracle import table
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
    """The best table, and each scaling's paired effect per network (report.stats.component_effects)."""
    lines = [best_table(runs), "", "Each scaling's paired effect on the % of conv weights removed (points, ± 95% CI): "
             "a composition's score minus the mean of those that differ from it in the scaling only:", "",
             "| network | " + " | ".join(PAPER_SCALINGS) + " |", "| --- |" + " ---: |" * len(PAPER_SCALINGS)]
    for net in dict.fromkeys(r["net"] for r in runs if r["metric"]):
        means = {m: float(np.mean(list(v.values())))
                 for m, v in scores_of([r for r in runs if r["net"] == net and r["metric"]]).items()}
        effects = {row[0]: row[4:6] for row in component_effects(means, "scaling")}
        lines.append(f"| {net} | " + " | ".join(f"{effects[s][0]:+.1f} ± {effects[s][1]:.1f}"
                                                if s in effects and not np.isnan(effects[s][0]) else "-"
                                                for s in PAPER_SCALINGS) + " |")
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


def _archived(builder):
    return lambda folder: builder(archive.read(folder))


# README block -> (what it reads under experiments/results: an archive, a file or a folder; what makes it)
BLOCKS = {"resnet-oracle": ("resnet-oracle", _archived(_resnet_oracle)),
          "taxonomy": ("taxonomy-all", _archived(_taxonomy)),
          "macs": ("macs-scaling", _archived(_macs)),
          "entropy-lenet": ("entropy-lenet", _archived(_entropy)),
          "deployment": ("deployment/export.json", _deployment),
          "zoo-bench": ("zoo-bench", _zoo_bench),
          "bench": ("zoo-bench/resnet20.json", _bench)}


def _present(path: Path) -> bool:
    """An archive, a file, or a folder of bench results (what each block reads)."""
    return archive.is_archive(path) or path.is_file() or (path.is_dir() and any(path.glob("*.json")))


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
    if outcome["changed"] and not check:
        fsio.write_text(readme, text)
    return outcome

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

Input is run directories (caffe_prune.rundir: config.json + steps.jsonl, read without the code that
wrote them; ``write_report``) or a sweep's results store (caffe_prune.store; ``write_reports``).
Where a paper published a figure the report prints it, quoted, next to ours; it never makes one up.

Modules, one job each: ``published`` (what the papers published), ``stats`` (means, intervals, the
rankings and component effects), ``text`` (the lines every report shares), ``figures`` (the plots),
and one module per report: ``oracle``, ``taxonomy``, ``domino``.
"""
from __future__ import annotations

from pathlib import Path

from caffe_prune import archive
from caffe_prune.report.domino import domino_report
from caffe_prune.report.oracle import oracle_report, write_report
from caffe_prune.report.published_figures import PAPER_ROWS
from caffe_prune.report.stats import COMPONENTS, mean_ci, paper_five
from caffe_prune.report.taxonomy import taxonomy_report

KINDS = ("oracle", "taxonomy", "domino")


def runs_from_store(location, steps_for=lambda row: True) -> list:
    """The finished runs of a sweep's store (or of a results archive, caffe_prune.archive) as the
    dicts load_run gives, plus id, seed, metric, the taxonomy components and ``removed`` (the
    Table-2 figure the store holds); steps are read for the rows `steps_for` accepts."""
    from caffe_prune.store import Store
    if archive.is_archive(location):
        return [r if steps_for(r) else {**r, "steps": None} for r in archive.read(location)]
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


def write_reports(sweep_dir, out_dir=None, kinds=None, x: str = "weights") -> list:
    """The reports `kinds` (default: every applicable one) from SWEEP_DIR's store into `out_dir`
    (default SWEEP_DIR/report); ``x`` "macs": the oracle report by % of MACs removed; returns the
    Markdown files' paths."""
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
        paths.append(oracle_report(chosen or runs_from_store(sweep_dir), out_dir,
                                   "oracle.md" if x == "weights" else "oracle-macs.md", x))
    if "taxonomy" in kinds:
        paths.append(taxonomy_report(runs, out_dir))
    if "domino" in kinds:
        paths.append(domino_report(runs, out_dir))
    return paths


__all__ = ["KINDS", "applicable", "domino_report", "mean_ci", "oracle_report", "runs_from_store", "taxonomy_report",
           "write_report", "write_reports"]

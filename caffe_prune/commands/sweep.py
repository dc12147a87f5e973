"""`caffe-prune sweep` (a SPEC's runs into a results store, resumable, skipping what its archive
holds) and `results` (query a store, write CSV, merge the finished runs into an archive)."""
from __future__ import annotations

import fnmatch
from collections import defaultdict

import csv
import io

from caffe_prune import archive, fsio, report
from caffe_prune import store as results_store
from caffe_prune.commands import options
from caffe_prune.sweep.driver import launch, resolve_data, sigterm_interrupts
from caffe_prune.sweep.executors import factory
from caffe_prune.sweep.spec import Spec, SweepError, expand, load_spec, parse_spec, protocol_keys, weight_pairs

PROTOCOL_FLAGS = {   # flag -> (protocol key, type, help); defaults come from pruning.Config
    "--stop": ("stop", str, "drop: stop past --max-drop points (Table 2); end: whole curves (Figure 6)"),
    "--max-drop": ("max_drop", float, "points of test top-1 below the start to stop past (stop drop)"),
    "--floor": ("floor", float, "also stop below this absolute top-1 (%%)"),
    "--max-steps": ("max_steps", int, "stop after N steps"),
    "--target": ("target", options.target, "also stop within this budget: macs=0.5 (fraction left; params, weights)"),
    "--report-drop": ("report_drop", float, "the drop at which the Table-2 figure is read (default 5)"),
    "--k": ("k", int, "oracle shortlist size"),
    "--per-step": ("per_step", str, "groups a step removes: N, P%% (of the prunable channels) or P%%macs"),
    "--steps": ("in_steps", int, "reach --target in S steps (geometric)"),
    "--keep": ("keep", options.names, "convolutions never pruned (glob patterns)"),
    "--min-channels": ("min_channels", int, "every convolution keeps at least M channels"),
    "--max-layer-fraction": ("max_layer_fraction", float, "no convolution loses more than this fraction"),
    "--round-to": ("round_to", int, "every pruned width a multiple of R"),
    "--shortlist": ("shortlist", str, "oracle shortlist rule: paper (the text) or authors-code (their release)"),
    "--eval-size": ("eval_size", int, "validation batches per saliency"),
    "--oracle-eval-size": ("oracle_eval_size", int, "validation batches per oracle sensitivity"),
    "--test-size": ("test_size", int, "test batches per measurement"),
    "--test-interval": ("test_interval", int, "measure test top-1 every N steps"),
    "--batch-size": ("batch_size", int, "images per batch"),
    "--semantics": ("semantics", str, "masking semantics: zero-downstream or authors"),
    "--reading": ("reading", str, "tensors activation metrics read: authors or conv-output"),
}


def add_executor_options(p) -> None:
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: a process pool on this machine (default); ray: tasks on a Ray cluster")
    p.add_argument("--workers", type=int, default=None, help="local worker processes (default: one per core)")
    p.add_argument("--address", default=None, help="the Ray head's HOST:PORT (with --executor ray)")
    p.add_argument("--retries", type=int, default=2, help="times a run whose worker died is given to another (default 2)")


def executor_factory(args):
    """The executor the options ask for (caffe_prune.sweep.executors.factory)."""
    return factory(getattr(args, "executor", "local"), getattr(args, "workers", None), getattr(args, "address", None))


def register(subparsers) -> None:
    """Add `sweep` and `results`."""
    p = subparsers.add_parser("sweep", help="run a SPEC's pruning runs (resumable) into a results store",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("spec", nargs="?", default=None, help="a TOML SPEC (flags below override or replace it)")
    p.add_argument("--name", default=None, help="the sweep's name (default: the SPEC file's name, or 'sweep')")
    p.add_argument("--out", default=None, help="the sweep directory (default runs/sweeps/NAME)")
    p.add_argument("--archive", default=None, metavar="DIR",
                   help="the sweep's results archive (default: the SPEC's archive): runs it holds are not run again")
    p.add_argument("--no-archive", action="store_true", help="ignore the SPEC's archive: run every run the store lacks")
    p.add_argument("--nets", default=None, help="comma-separated networks, with published weights unless --weights")
    p.add_argument("--weights", action="append", default=[], metavar="NET=PATH", help="a network's caffemodel")
    p.add_argument("--metrics", default=None, help="comma-separated metric names, aliases or globs")
    p.add_argument("--domino", default=None, help="comma-separated Domino aggregations (sum,mean,max) to add")
    p.add_argument("--oracle", action="append", default=None, metavar="M1,M2,...|paper",
                   help="an oracle over these constituents (repeatable)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, or a count N for 0..N-1")
    p.add_argument("--data", default=None, help="CIFAR-10 directory, archive or URL")
    options.add_forms(p, default=None)
    for flag, (key, kind, text) in PROTOCOL_FLAGS.items():
        p.add_argument(flag, dest=f"protocol_{key}", type=kind, default=None, help=text)
    add_executor_options(p)
    p.add_argument("--dry-run", action="store_true", help="list the runs and what the store holds; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = subparsers.add_parser("results", help="query a sweep's results store: filter, group, export CSV")
    p.add_argument("sweep_dir", help="a sweep directory (or its results.sqlite)")
    p.add_argument("--net", default=None, help="only this network")
    p.add_argument("--metric", default=None, help="only methods matching this glob")
    p.add_argument("--status", default=None, help=f"only runs with this status ({', '.join(results_store.STATUSES)})")
    p.add_argument("--seed", type=int, default=None, help="only this seed")
    p.add_argument("--by", default=None, help=f"group by these columns ({', '.join(GROUP_COLUMNS)})")
    p.add_argument("--csv", default=None, metavar="F", help="write the rows shown (or, with --steps, every step) to F")
    p.add_argument("--steps", action="store_true", help="with --csv: one row per step of the selected runs")
    p.add_argument("--archive", default=None, metavar="DIR",
                   help="write the finished runs as a results archive (runs.csv + steps.csv.gz, small enough to "
                        "commit; report reads it) into DIR, e.g. experiments/results/NAME")
    p.set_defaults(func=cmd_results)



def spec_from_args(args) -> Spec:
    """The SPEC file (if any) with the flags given on top: flags replace the file's values."""
    raw = load_spec(args.spec) if args.spec else {}
    if args.name:
        raw["name"] = args.name
    if args.out:
        raw["out"] = args.out
    if args.archive:
        raw["archive"] = args.archive
    if args.no_archive:
        raw.pop("archive", None)
    if args.data:
        raw["data"] = args.data
    if args.nets:
        raw["networks"] = {n: "published" for n in args.nets.split(",") if n}
    weights = weight_pairs(args.weights)
    if weights:
        raw["networks"] = {**(raw.get("networks") if isinstance(raw.get("networks"), dict)
                              else {n: "published" for n in raw.get("networks", [])}), **weights}
    if args.metrics is not None:
        raw["metrics"] = [m for m in args.metrics.split(",") if m]
    if args.domino is not None:
        raw["domino"] = [d for d in args.domino.split(",") if d]
    if args.forms is not None:
        raw["forms"] = args.forms
    if args.oracle is not None:
        raw["oracles"] = ["paper" if o == "paper" else [m for m in o.split(",") if m] for o in args.oracle]
    if args.seeds is not None:
        raw["seeds"] = int(args.seeds) if args.seeds.isdigit() else [int(s) for s in args.seeds.split(",") if s]
    protocol = dict(raw.get("protocol", {}))
    for key in protocol_keys():
        value = getattr(args, f"protocol_{key}", None)
        if value is not None:
            protocol[key] = value
    if protocol:
        raw["protocol"] = protocol
    return parse_spec(raw)


def cmd_sweep(args) -> int:
    spec = spec_from_args(args)
    if args.dry_run:
        return dry_run(spec)
    make = executor_factory(args)
    try:
        with sigterm_interrupts():
            outcome = launch(spec, make, retries=args.retries, progress=not args.quiet)
    except KeyboardInterrupt:
        return 130
    return 0 if outcome.complete else 1


def dry_run(spec: Spec) -> int:
    tasks = expand(spec, resolve_data(spec.data))
    status = {run_id: "archived" for run_id in (archive.ids(spec.archive) if spec.archive else ())}
    path = results_store.store_path(spec.out)
    if path.is_file():
        with results_store.Store(path, create=False) as store:
            status.update({r["id"]: r["status"] for r in store.runs() if r["id"] not in status or r["status"] == "done"})
    for t in tasks:
        print(f"{t['id'][:16]}  {t['net']:<10} seed {t['seed']:<3} {status.get(t['id'], 'new'):<11} {t['method']}")
    counts = defaultdict(int)
    for t in tasks:
        counts[status.get(t["id"], "new")] += 1
    print(f"# {len(tasks)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0


GROUP_COLUMNS = ("net", "method", "metric", "seed", "status", "shortlist") + results_store.COMPONENTS


RUN_COLUMNS = ("id", "net", "method", "seed", "status", "steps", "initial_top1", "final_top1", "final_removed",
               "removed_at_drop", "macs_removed_at_drop", "report_drop", "completions", "wall_s", "host", "run_dir") + results_store.COMPONENTS


def select_runs(store, net=None, metric=None, status=None, seed=None) -> list:
    rows = store.runs(status=status, net=net)
    if metric:
        rows = [r for r in rows if fnmatch.fnmatchcase(r["method"], metric)]
    if seed is not None:
        rows = [r for r in rows if r["seed"] == seed]
    return rows


def group_rows(rows, by) -> list:
    """One row per group: runs, done, and mean ± 95% CI of the Table-2 figure over the done runs."""
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(k) for k in by)].append(r)
    out = []
    for key, members in groups.items():
        done = [r for r in members if r["status"] == "done" and r["removed_at_drop"] is not None]
        mean, half = report.mean_ci([r["removed_at_drop"] for r in done]) if done else (None, None)
        out.append({**dict(zip(by, key)), "runs": len(members), "done": len(done),
                    "removed_at_drop_mean": None if mean is None else round(mean, 3),
                    "removed_at_drop_ci95": None if half is None else round(half, 3),
                    "final_removed_mean": round(sum(r["final_removed"] for r in done) / len(done), 3) if done else None,
                    "initial_top1_mean": round(sum(r["initial_top1"] for r in done) / len(done), 3) if done else None})
    return sorted(out, key=lambda g: (-(g["removed_at_drop_mean"] or -1), [str(g[k]) for k in by]))


def cmd_results(args) -> int:
    if args.archive:
        written = archive.write(args.sweep_dir, args.archive)
        print(f"{written['dir']}: {written['runs']} finished runs ({written['steps']} steps), "
              f"{written['added']} of them added from {args.sweep_dir}")
        return 0
    with results_store.Store(args.sweep_dir, create=False) as store:
        rows = select_runs(store, args.net, args.metric, args.status, args.seed)
        if args.steps:
            if not args.csv:
                raise SweepError("--steps writes every step of the selected runs: give --csv FILE")
            table = store.step_rows([r["id"] for r in rows])
        elif args.by:
            by = [c for c in args.by.split(",") if c]
            bad = [c for c in by if c not in GROUP_COLUMNS]
            if bad:
                raise SweepError(f"--by {', '.join(bad)}: not a column; group by {', '.join(GROUP_COLUMNS)}")
            table = group_rows(rows, by)
        else:
            table = [{k: r.get(k) for k in RUN_COLUMNS} for r in rows]
        counts = store.counts()
    if args.csv:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(table[0]) if table else ["id"])
        writer.writeheader()
        writer.writerows(table)
        fsio.write_text(args.csv, text.getvalue())
        print(f"wrote {len(table)} rows to {args.csv}")
    if not args.steps:
        shown = table if args.by else [{k: (r[k][:12] if k == "id" else r[k]) for k in
                                        ("id", "net", "method", "seed", "status", "steps", "removed_at_drop",
                                         "final_removed", "wall_s")} for r in table]
        print(format_table(shown))
    print("# runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0


def format_table(rows) -> str:
    if not rows:
        return "(no runs)"
    columns = list(rows[0])

    def cell(v):
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
    cells = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)

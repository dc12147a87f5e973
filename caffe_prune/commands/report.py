"""`caffe-prune report`: Markdown and PNG reports from a sweep's store or a results archive, and
`--readme` to rebuild the README's measured blocks from the committed archives."""
from __future__ import annotations

from caffe_prune import report


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="Markdown + PNG reports (oracle, taxonomy, domino) from a sweep's store")
    p.add_argument("sweep_dir", help="a sweep directory")
    p.add_argument("--kind", default=None, help="comma-separated: oracle, taxonomy, domino (default: what the runs allow)")
    p.add_argument("--out", default=None, help="where the report goes (default SWEEP_DIR/report)")
    p.add_argument("--x", choices=("weights", "macs"), default="weights",
                   help="read Table 2 and Figure 6 by %% of conv weights removed (default, the papers') or of MACs")
    p.add_argument("--readme", default=None, metavar="FILE",
                   help="SWEEP_DIR is a folder of results archives (experiments/results): rebuild FILE's "
                        "<!-- results:NAME --> blocks from them (caffe_prune.report.faithfulness)")
    p.add_argument("--check", action="store_true", help="with --readme: write nothing, exit 1 if a block differs")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    if args.readme:
        from caffe_prune.report import faithfulness
        outcome = faithfulness.update(args.readme, args.sweep_dir, check=args.check)
        for key in ("changed", "same", "missing"):
            print(f"{key}: {', '.join(outcome[key]) or '-'}")
        if args.check and outcome["changed"]:
            print(f"{args.readme} differs from {args.sweep_dir} in {', '.join(outcome['changed'])}; "
                  f"rebuild it without --check")
            return 1
        return 0
    kinds = [k for k in args.kind.split(",") if k] if args.kind else None
    for path in report.write_reports(args.sweep_dir, args.out, kinds, args.x):
        print(f"report: {path}")
    return 0

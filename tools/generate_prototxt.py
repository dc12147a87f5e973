"""Write prototxt/<NET>/{train_test,deploy,solver}.prototxt from caffe_prune/networks.py.

The prototxt files are generated, never edited: networks.py is the one source of truth, and
tests/test_networks.py fails when the committed files drift from what this writes.

    .venv/bin/python tools/generate_prototxt.py            # (re)write all six networks
    .venv/bin/python tools/generate_prototxt.py --check    # exit 1 if any file differs
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from caffe_prune import networks  # noqa: E402  (after the path is set)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "prototxt", help="directory to write into")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs")
    parser.add_argument("names", nargs="*", default=list(networks.NETWORKS), help="networks (default: all)")
    args = parser.parse_args(argv)
    stale = []
    for name in args.names:
        for filename, text in networks.prototxt_files(name).items():
            path = args.out / name / filename
            if path.is_file() and path.read_text() == text:
                continue
            stale.append(path)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    verb = "differ from networks.py" if args.check else "written"
    print(f"{len(stale)} file(s) {verb}" + "".join(f"\n  {p}" for p in stale))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())

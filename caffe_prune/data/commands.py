"""`caffe-prune data cifar10`: fetch CIFAR-10 and convert it for Caffe's Data layer.

``register`` adds the sub-command to the top-level parser of caffe_prune.cli; errors are
cifar10.DataError, which the CLI prints on one line.
"""
from __future__ import annotations

from caffe_prune.data import cifar10


def register(subparsers) -> None:
    """Add `data cifar10 [--source DIR|ARCHIVE|URL] [--out DIR] [--seed N]` to `subparsers`."""
    data = subparsers.add_parser("data", help="fetch a dataset and convert it for Caffe's Data layer")
    datasets = data.add_subparsers(dest="dataset", required=True)
    p = datasets.add_parser("cifar10", help="CIFAR-10 as train/test LMDBs (BGR, uint8) and the validation split",
                            description=cifar10.prepare.__doc__)
    p.add_argument("--source", default=None, metavar="DIR|ARCHIVE|URL",
                   help="a directory with cifar-10-batches-bin/ or cifar-10-batches-py/, a .tar.gz, or a URL "
                        f"(default: ${cifar10.DATA_ENV}, a local mirror, else the official download)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"where the LMDBs and {cifar10.VAL_FILE} go (default {cifar10.CACHE_DIR})")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split (default 0)")
    p.set_defaults(func=cmd_cifar10)


def cmd_cifar10(args) -> int:
    result = cifar10.prepare(args.source, args.out, args.seed)
    counts, official = result["counts"], result["official"]
    partial = any(counts[s] != official[s] for s in counts)
    print(f"source      {result['source']}" + ("  (a partial copy of CIFAR-10)" if partial else ""))
    for split in ("train", "test"):
        print(f"{split:<11} {counts[split]:>6} of {official[split]:,} images -> {result['paths'][split]} "
              f"({result['actions'][split]})")
    print(f"validation  {result['validation']:>6} of the {counts['train']} training images, seed {result['seed']} "
          f"-> {result['paths']['validation']} ({result['actions']['validation']})")
    return 0

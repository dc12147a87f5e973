"""`caffe-prune data cifar10`: fetch CIFAR-10 and convert it for Caffe's Data layer; `caffe-prune data
synthetic`: an LMDB of random Datums of any size (caffe_prune.data.synthetic), for measurements.

Errors are caffe_prune.errors.DataError, which the command line prints on one line.
"""
from __future__ import annotations

from caffe_prune.data import cifar10, cifar10_convert, synthetic, validation
from caffe_prune.errors import DataError


def register(subparsers) -> None:
    """Add `data cifar10 [--source DIR|ARCHIVE|URL] [--out DIR] [--seed N] [--channel-order bgr|rgb]` and
    `data synthetic` to `subparsers`."""
    data = subparsers.add_parser("data", help="fetch a dataset and convert it for Caffe's Data layer")
    datasets = data.add_subparsers(dest="dataset", required=True)
    p = datasets.add_parser("cifar10", help="CIFAR-10 as train/test LMDBs (uint8, BGR or RGB) and the validation split",
                            description=cifar10_convert.prepare.__doc__)
    p.add_argument("--source", default=None, metavar="DIR|ARCHIVE|URL",
                   help="a directory with cifar-10-batches-bin/ or cifar-10-batches-py/, a .tar.gz, or a URL "
                        f"(default: ${cifar10.DATA_ENV}, a local mirror, else the official download)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"where the LMDBs and {validation.VAL_FILE} go (default {cifar10.CACHE_DIR})")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split (default 0)")
    p.add_argument("--channel-order", choices=tuple(cifar10_convert.LAYOUTS), default="bgr",
                   help="bgr (default): the authors' layout, cifar10-{train,test}-lmdb, what the built-in networks read; "
                        "rgb: exactly what Caffe's examples/cifar10/create_cifar10.sh writes (convert_cifar_data's "
                        "cifar10_{train,test}_lmdb and compute_image_mean's mean.binaryproto)")
    p.set_defaults(func=cmd_cifar10)
    p = datasets.add_parser("synthetic", help="an LMDB of random uint8 Datums (times and memory, not accuracy)",
                            description=synthetic.__doc__.split("\n\n")[0])
    p.add_argument("out", help="the LMDB directory to write")
    p.add_argument("--images", type=int, default=1000, help="how many records (default 1000)")
    p.add_argument("--shape", default="3,256,256", metavar="C,H,W", help="each record's shape (default 3,256,256)")
    p.add_argument("--classes", type=int, default=1000, help="labels 0..N-1 (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pixels and labels (default 0)")
    p.set_defaults(func=cmd_synthetic)


def cmd_cifar10(args) -> int:
    result = cifar10_convert.prepare(args.source, args.out, args.seed, order=args.channel_order)
    counts, official = result["counts"], result["official"]
    partial = any(counts[s] != official[s] for s in counts)
    print(f"source      {result['source']}" + ("  (a partial copy of CIFAR-10)" if partial else ""))
    for split in ("train", "test"):
        print(f"{split:<11} {counts[split]:>6} of {official[split]:,} images -> {result['paths'][split]} "
              f"({result['actions'][split]}, {result['channel_order'].upper()} planes)")
    if "mean" in result["paths"]:
        print(f"mean        {result['paths']['mean']} (compute_image_mean's, of the training images)")
    print(f"validation  {result['validation']:>6} of the {counts['train']} training images, seed {result['seed']} "
          f"-> {result['paths']['validation']} ({result['actions']['validation']})")
    return 0


def cmd_synthetic(args) -> int:
    try:
        shape = tuple(int(d) for d in args.shape.replace("x", ",").split(","))
    except ValueError:
        raise DataError(f"--shape {args.shape!r} is not C,H,W") from None
    done = synthetic.write_random_lmdb(args.out, args.images, shape, args.classes, args.seed)
    print(f"{done['path']}: {done['images']} random {'x'.join(map(str, done['shape']))} Datums, labels "
          f"0..{done['classes'] - 1}, seed {done['seed']}, {done['bytes'] / 2**30:.2f} GiB")
    return 0

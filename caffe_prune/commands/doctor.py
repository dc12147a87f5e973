"""`caffe-prune doctor`: what the engine is made of (Caffe's build, BLAS, mode, Python, numpy,
protobuf; CUDA and GPUs for a CUDA build), and what is missing with the command that fixes it."""
from __future__ import annotations

import json
import shutil
import sys

from caffe_prune import pycaffe
from caffe_prune.errors import InputError


def register(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="report Caffe's build, BLAS, mode, Python and protobuf versions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    """Print what the engine is made of, and what is missing with the command that fixes it."""
    problems = []
    if sys.version_info[:2] != (3, 11):
        problems.append(("Python %d.%d: Debian 12's boost-python (and so pycaffe) is for 3.11"
                         % sys.version_info[:2], "make setup  (creates .venv with /usr/bin/python3.11)"))
    for tool, fix in (("cmake", "tools/install-system-deps.sh"), ("protoc", "tools/install-system-deps.sh")):
        if shutil.which(tool) is None:
            problems.append((f"{tool} not on PATH (needed only to build Caffe)", fix))
    try:
        report = pycaffe.versions()
    except InputError as exc:
        report = {}
        problems.append((str(exc), "make setup"))
    if args.json:
        print(json.dumps({"report": report, "problems": [p for p, _ in problems]}, indent=2))
    else:
        width = max((len(k) for k in report), default=0)
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
        for problem, fix in problems:
            print(f"missing: {problem}\n  fix: {fix}")
        if not problems:
            print("ok: stock pycaffe is ready")
    return 1 if problems else 0

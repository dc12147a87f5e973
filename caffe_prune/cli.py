"""`caffe-prune` command line: one sub-command per user task, each a thin layer over the library.

The commands live in caffe_prune.commands (one module per family: each parses its arguments into
the project's objects, calls the library and prints); this module only assembles the parser and is
the error boundary. ``main``: a user's mistake (a bad file, argument or path) is one line on stderr
and exit status 2; anything unexpected is one line and status 1, with the traceback only under
``--debug``; notes (warnings) print as "note: ..." lines.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from caffe_prune.layers import effects
from caffe_prune import fsio
from caffe_prune.commands import (data, doctor, metrics, network, options, profile, prune, report, reproduce, sweep,
                                  train)
from caffe_prune.errors import InputError, one_line
from caffe_prune.metrics import plugins

# the order `caffe-prune --help` lists them in
COMMANDS = (doctor, network, train, data, profile, metrics, prune, sweep, report, reproduce)


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage stays one --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="caffe-prune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for family in COMMANDS:
        family.register(sub)
    _add_plugin_option(parser)
    return parser


def _add_plugin_option(parser) -> None:
    """``--plugin FILE`` on every command (each leaf of the command tree)."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subcommands:
        for child in dict.fromkeys(action.choices.values()):
            _add_plugin_option(child)
    if not subcommands:
        parser.add_argument("--plugin", action="append", default=[], metavar="FILE",
                            help="load a plugin saliency metric, used as plugin:NAME (repeatable; README, "
                                 "Your own saliency metric)")
        parser.add_argument("--plugin-timeout", type=float, default=None, metavar="SECONDS",
                            help="end the run in one line when one call of a plugin's functions takes longer")


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"note: {message}", file=sys.stderr)


def main(argv=None) -> int:
    for stream in (sys.stdout, sys.stderr):   # file names that are not UTF-8 print as their bytes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="print the Python traceback of an error")
    args = parser.parse_args(argv)
    warnings.showwarning = _note
    try:
        effects.allow_python_layers(getattr(args, "allow_python_layers", False))   # refused unless the user says
        plugins.set_timeout(getattr(args, "plugin_timeout", None))
        for path in getattr(args, "plugin", []):
            plugins.load(path)
        options.resolve_published(args)
        return args.func(args)
    except (InputError, ValueError, fsio.InUse) as exc:   # DataError and MetricError are ValueErrors
        if args.debug:
            raise
        print(f"caffe-prune: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if args.debug:
            raise
        where = f" {os.fsdecode(exc.filename)}" if getattr(exc, "filename", None) else ""
        print(f"caffe-prune: error:{where} {exc.strerror or one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("caffe-prune: interrupted; what was finished is kept (rerun the same command to resume)",
              file=sys.stderr)
        return 130
    except Exception as exc:   # a bug: one line, the traceback on request
        if args.debug:
            raise
        print(f"caffe-prune: internal error: {type(exc).__name__}: {one_line(exc)} "
              f"(rerun with --debug for the traceback and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

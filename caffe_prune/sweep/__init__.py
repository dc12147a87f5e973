"""Sweeps: thousands of independent pruning runs from one SPEC, resumable, into one results store.

A **SPEC** (a small TOML file, or the same as flags of ``caffe-prune sweep``) names networks and
their weights, a metric set, oracles, seeds and the protocol::

    name = "lenet-domino"                       # default: the SPEC file's name
    out = "runs/sweeps/lenet-domino"            # the sweep directory (default runs/sweeps/NAME)
    archive = "experiments/results/lenet-domino"   # its committed results archive (optional): runs there are skipped
    data = "data/cifar10"                       # default: as every command finds CIFAR-10
    seeds = [0, 1]                              # or a count: seeds = 8 is 0..7
    metrics = ["mean_sq_weights", "activation/taylor/*/weights_removed"]   # names, aliases, globs
    domino = ["sum"]                            # also every metric's domino-sum: variant
    oracles = ["paper", ["mean_sq_weights", "taylor"]]   # each an oracle over its constituents
    forms = "table2"                            # "paper": papers/004's five in these forms (table2, code,
                                                #   printed; caffe_prune.metrics.methods)

    [networks]                                  # or networks = ["LeNet-5", "ResNet-20"] (published)
    "LeNet-5" = "published"                     # the authors' weights (models/published.json)
    AlexNet = "runs/train-AlexNet/AlexNet_iter_20000.caffemodel"

    [protocol]                                  # caffe_prune.pruning.Config's fields; defaults: the paper's
    stop = "drop"                               # "drop": stop past max_drop points (Table 2); "end": no
    max_drop = 5.0                              #   drop stop, whole Figure-6 curves (floor/max_steps apply)
    test_size = 80
    shortlist = "paper"                         # or "authors-code" (caffe_prune.oracle)

A glob is matched component by component (``*`` never crosses a ``/``) against the taxonomy's
compositions, ``metrics.list_metrics()``, and against the Domino variants only when it starts with
``domino``. Relative paths are relative to the directory the command runs in.

**Runs and their ids.** The SPEC expands to net x method x seed. A run's id is the sha256 of the
canonical JSON of its whole configuration (every field of ``pruning.Config``, the data directory),
with the weights file's sha256 in place of its path, so the same weights at another path give the
same id. Relaunching the same or an extended SPEC skips finished runs and resumes interrupted ones
from their directories. A SPEC's ``archive`` (caffe_prune.archive: the finished runs as committed
files) carries a sweep over machines: a run whose id it holds is skipped, so a fresh clone
elsewhere runs only what is missing, and ``caffe-prune results SWEEP_DIR --archive DIR`` merges
the new runs into it. The sweep directory holds::

    results.sqlite             the store (caffe_prune.store): a row per run, per step, per attempt
    weights/SHA256.caffemodel  each weights file once, by content (where every node reads it)
    runs/ID16/                 a run directory (config.json, steps.jsonl; attempts.jsonl: which
                               process worked on it, one line per start)
    report/                    `caffe-prune report`'s Markdown and PNG files

**Executors** (``LocalExecutor``, ``RayExecutor``) share one small interface: ``capacity()``,
``submit(task) -> {host, pid}``, ``events(timeout) -> [(kind, task, payload)]`` with kind ``done``
(payload: ``execute``'s result), ``failed`` (the run raised: one line), ``died`` (the worker process
ended without a result) or ``busy`` (another process holds the run directory), and
``close(cancel)``. ``execute`` is the one function that calls the pruning engine. The driver
(``launch``) hands runs out, writes every outcome to the store, gives a run whose worker died to a
new worker (it resumes from its directory), and on Ctrl-C stops the workers, keeps the finished runs
and marks the running ones ``interrupted``: the same command resumes them.

Modules, one job each: ``spec`` (the SPEC, its runs and their ids), ``executors`` (``execute`` and the
local and Ray executors), ``driver`` (``launch``), ``papers`` (each paper's experiment as a sweep's
contents). The commands are in caffe_prune.commands (sweep, results, reproduce).
"""
from caffe_prune.sweep.driver import Outcome, launch, resolve_data
from caffe_prune.sweep.executors import LocalExecutor, RayExecutor, execute, make_executor
from caffe_prune.sweep.spec import (Spec, SweepError, expand, load_spec, match_metrics, method_names, parse_protocol,
                                    parse_spec, run_id)

__all__ = ["LocalExecutor", "Outcome", "RayExecutor", "Spec", "SweepError", "execute", "expand", "launch", "load_spec",
           "make_executor", "match_metrics", "method_names", "parse_protocol", "parse_spec", "resolve_data", "run_id"]

"""Sweeps: thousands of independent pruning runs from one SPEC, resumable, into one results store.

A **SPEC** (a small TOML file, or the same as flags of ``caffe-prune sweep``) names networks and
their weights, a metric set, oracles, seeds and the protocol::

    name = "lenet-domino"                       # default: the SPEC file's name
    out = "runs/sweeps/lenet-domino"            # the sweep directory (default runs/sweeps/NAME)
    data = "data/cifar10"                       # default: as every command finds CIFAR-10
    seeds = [0, 1]                              # or a count: seeds = 8 is 0..7
    metrics = ["mean_sq_weights", "activation/taylor/*/weights_removed"]   # names, aliases, globs
    domino = ["sum"]                            # also every metric's domino-sum: variant
    oracles = ["paper", ["mean_sq_weights", "taylor"]]   # each an oracle over its constituents

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
from their directories. The sweep directory holds::

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
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from hashlib import sha256
from pathlib import Path

from caffe_prune import fsio, passes
from caffe_prune import store as results_store
from caffe_prune.metrics import taxonomy
from caffe_prune.report import ORACLE, oracle_of_forms

RUN_FIELDS = ("net", "weights", "metric", "oracle", "seed", "data")   # what a SPEC varies; the rest is protocol
STOPS = ("drop", "end")
SPEC_KEYS = ("name", "out", "data", "networks", "metrics", "domino", "oracles", "seeds", "protocol")
PAPER_FIVE = tuple(taxonomy.ALIASES)          # papers/004's five constituents, in the paper's order
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class SweepError(ValueError):
    """A SPEC or a sweep that cannot run; one line, listing what exists where that helps."""


# ---- SPEC ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Spec:
    """A parsed SPEC: what to run (networks -> weights, methods, seeds) and how (protocol)."""
    name: str
    out: str
    data: str | None
    networks: dict                 # {network: "published" | caffemodel path}
    metrics: list                  # names, aliases or globs, as given
    domino: list                   # Domino aggregations whose variants are added
    oracles: list                  # [[constituent, ...], ...]
    seeds: list
    protocol: dict                 # Config fields other than RUN_FIELDS, plus stop and report_drop

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_defaults() -> dict:
    """pruning.Config's protocol fields and their defaults (the paper's protocol, papers/004 §5)."""
    from caffe_prune.pruning import Config
    out = {}
    for f in dataclasses.fields(Config):
        if f.name not in RUN_FIELDS and f.name not in Config.EXECUTION:
            out[f.name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return out


def protocol_keys() -> dict:
    """{key: default} of a SPEC's [protocol] table: Config's fields, the stop rule and the drop at
    which the Table-2 figure is read (report_drop, 5 points unless given)."""
    return {**config_defaults(), "stop": "drop", "report_drop": 5.0}


def load_spec(path) -> dict:
    """A SPEC file as plain data (TOML, read with the standard library's tomllib)."""
    import tomllib
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"no SPEC file {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"{path}: not valid TOML ({exc})") from None
    raw.setdefault("name", path.stem)
    return raw


def parse_spec(raw: dict) -> Spec:
    """Validate plain SPEC data (from TOML or flags) into a Spec; every error is one line."""
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise SweepError(f"unknown SPEC key(s) {', '.join(unknown)}; valid: {', '.join(SPEC_KEYS)}")
    name = str(raw.get("name") or "sweep")
    networks = raw.get("networks")
    if not networks:
        raise SweepError("the SPEC names no networks (networks = [\"LeNet-5\"] or a [networks] table)")
    if isinstance(networks, (list, tuple)):
        networks = {n: "published" for n in networks}
    if not isinstance(networks, dict):
        raise SweepError("networks must be a list of names or a table {network = weights}")
    from caffe_prune import networks as known
    for net in networks:
        if net not in known.NETWORKS and not Path(net).is_file():
            raise SweepError(f"unknown network {net!r}; networks: {', '.join(known.NETWORKS)} (or a prototxt path)")
    metrics, domino = _strings(raw.get("metrics", []), "metrics"), _strings(raw.get("domino", []), "domino")
    for agg in domino:
        if agg not in taxonomy.DOMINO:
            raise SweepError(f"unknown Domino aggregation {agg!r}; valid: {', '.join(taxonomy.DOMINO)}")
    oracles = []
    for entry in raw.get("oracles", []):
        constituents = list(PAPER_FIVE) if entry == "paper" else _strings(entry, "an oracle's constituents")
        if not constituents:
            raise SweepError("an oracle needs at least one constituent (or \"paper\" for the paper's five)")
        for m in constituents:
            _check_metric(m)
        oracles.append(constituents)
    if not metrics and not oracles:
        raise SweepError("the SPEC names no metrics and no oracles")
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise SweepError(f"seeds must be a count or a list of integers, got {seeds!r}")
    protocol = parse_protocol(raw.get("protocol", {}))
    return Spec(name=name, out=str(raw.get("out") or Path("runs") / "sweeps" / name), data=raw.get("data"),
                networks={str(k): str(v) for k, v in networks.items()}, metrics=metrics, domino=domino,
                oracles=oracles, seeds=list(dict.fromkeys(seeds)), protocol=protocol)


def parse_protocol(given: dict) -> dict:
    """The [protocol] table with defaults filled in, its types checked and the stop rule applied:
    ``stop = "drop"`` keeps max_drop; ``stop = "end"`` sets max_drop None (no drop stop: the whole
    Figure-6 curve, until nothing is left, ``floor`` or ``max_steps``)."""
    from caffe_prune import oracle
    defaults = protocol_keys()
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise SweepError(f"unknown protocol key(s) {', '.join(unknown)}; valid: {', '.join(defaults)}")
    protocol = dict(defaults)
    for key, value in given.items():
        kind = _kind(key, defaults[key])
        accepted = (int, float) if kind is float else kind
        if isinstance(value, bool) or (value is not None and not isinstance(value, accepted)):
            raise SweepError(f"protocol {key} must be {kind.__name__}, got {value!r}")
        protocol[key] = float(value) if kind is float and value is not None else value
    if protocol["stop"] not in STOPS:
        raise SweepError(f"protocol stop must be one of {', '.join(STOPS)}, got {protocol['stop']!r}")
    if protocol["stop"] == "end":
        if given.get("max_drop") is not None:
            raise SweepError("protocol max_drop applies to stop = \"drop\" only; stop = \"end\" has no drop stop")
        protocol["max_drop"] = None
    if protocol["shortlist"] not in oracle.SHORTLISTS:
        raise SweepError(f"protocol shortlist must be one of {', '.join(oracle.SHORTLISTS)}, "
                         f"got {protocol['shortlist']!r}")
    return protocol


_TYPES = {"float": float, "int": int, "str": str, "dict": dict, "list": list, "bool": bool}


def _kind(key, default):
    """A protocol key's type: its default's, or for a None default the first type of Config's
    annotation (``float | None`` -> float)."""
    if default is not None:
        return type(default)
    from caffe_prune.pruning import Config
    annotation = {f.name: f.type for f in dataclasses.fields(Config)}.get(key, "str")
    return _TYPES.get(str(annotation).split("|")[0].strip(), str)


def _strings(value, what) -> list:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise SweepError(f"{what} must be a list of names, got {value!r}")
    return list(value)


def _check_metric(name: str) -> None:
    try:
        taxonomy.parse(name)
    except taxonomy.MetricError as exc:
        raise SweepError(f"unknown metric: {exc}") from None


def is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def match_metrics(pattern: str) -> list:
    """The taxonomy's metric names matching `pattern`, component by component (``*`` never crosses
    a ``/``); Domino variants only for a pattern starting with ``domino``."""
    names = taxonomy.list_metrics(domino=pattern.startswith("domino"))
    parts = pattern.split("/")
    found = [n for n in names if len(n.split("/")) == len(parts)
             and all(fnmatch.fnmatchcase(a, b) for a, b in zip(n.split("/"), parts))]
    if not found:
        raise SweepError(f"metric glob {pattern!r} matches none of the {len(names)} metrics; components: "
                         f"input {'|'.join(taxonomy.INPUTS)}, pointwise {'|'.join(taxonomy.POINTWISE)}, "
                         f"reduction {'|'.join(taxonomy.REDUCTIONS)}, scaling {'|'.join(taxonomy.SCALINGS)} "
                         f"(`caffe-prune metrics list --domino` lists them all)")
    return found


def method_names(spec: Spec) -> list:
    """Every metric the SPEC names (globs expanded, then its Domino variants), in order, once."""
    names = []
    for entry in spec.metrics:
        if is_glob(entry):
            names += match_metrics(entry)
        else:
            _check_metric(entry)
            names.append(entry)
    names = list(dict.fromkeys(names))
    for agg in spec.domino:
        names += [f"{taxonomy.DOMINO_PREFIX}{agg}:{n}" for n in names if not n.startswith(taxonomy.DOMINO_PREFIX)]
    return list(dict.fromkeys(names))


def oracle_method(constituents, config: dict) -> str:
    """An oracle run's method name: ``oracle`` for the paper's five as the authors' code computes
    them, ``oracle (FORM forms)`` for another of taxonomy.PAPER_FORMS (each reported in Table 2's
    oracle row), otherwise ``oracle:A+B``; a non-default shortlist rule is appended."""
    forms = [f for f, five in taxonomy.PAPER_FORMS.items() if sorted(constituents) == sorted(five)]
    if forms:
        name = ORACLE if forms[0] == "code" else oracle_of_forms(forms[0])
    else:
        name = ORACLE + ":" + "+".join(constituents)
    return name if config.get("shortlist", "paper") == "paper" else f"{name} [{config['shortlist']} shortlist]"


# ---- expansion into runs ---------------------------------------------------------------------------

def resolve_weights(net: str, weights: str) -> Path:
    from caffe_prune import engine, published
    if weights == "published":
        try:
            return Path(published.caffemodel(net))
        except engine.EngineError as exc:
            raise SweepError(f"{exc}; give {net}'s weights in the SPEC ([networks] {net} = \"PATH\") "
                             f"or as --weights {net}=PATH") from None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise SweepError(f"{net}: no weights file {path}")
    return path


def stage_weights(path: Path, sweep_dir: Path | None) -> tuple:
    """(path the runs use, sha256): the file once per content in SWEEP_DIR/weights/SHA256.caffemodel
    (a hard link where possible), so that every node of a cluster reads it where it reads the run
    directories. Without a sweep directory (a dry run) nothing is copied."""
    from caffe_prune.download import digest
    sha = digest(path, "sha256")
    if sweep_dir is None:
        return str(Path(path).resolve()), sha
    target = sweep_dir / "weights" / f"{sha}.caffemodel"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        try:
            os.link(path, partial)
        except OSError:
            shutil.copyfile(path, partial)
        os.replace(partial, target)
    return str(target), sha


def run_id(config: dict, weights_sha: str, data: str | None) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of the run's whole configuration
    (every field of pruning.Config and the data it reads), the weights by content (sha256) instead
    of by path. A field added to Config after runs were stored (``pruning.later``) is left out while
    it has its default, which behaves as before it existed: the ids of stored runs stay valid."""
    from caffe_prune import pruning
    neutral = pruning.Config.neutral()
    identity = {k: v for k, v in {**config, "weights": weights_sha, "data": data}.items()
                if not (k in neutral and v == neutral[k])}
    return sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def expand(spec: Spec, data: str, sweep_dir: Path | None = None) -> list:
    """The SPEC's runs (net x method x seed), each a task: plain data an executor can ship."""
    from caffe_prune import engine
    from caffe_prune.pruning import Config
    protocol = {k: v for k, v in spec.protocol.items() if k not in ("stop", "report_drop")}
    methods = [(m, None) for m in method_names(spec)] + [(None, c) for c in spec.oracles]
    tasks, seen = [], set()
    for net, weights in spec.networks.items():
        weights_path, sha = stage_weights(resolve_weights(net, weights), sweep_dir)
        for metric, constituents in methods:
            for seed in spec.seeds:
                config = dataclasses.asdict(Config(net=net, weights=weights_path, metric=metric,
                                                   oracle=list(constituents or []), seed=seed, **protocol))
                try:
                    Config(**config).check()
                except (engine.EngineError, TypeError) as exc:
                    raise SweepError(f"protocol: {exc}") from None
                rid = run_id(config, sha, data)
                if rid in seen:
                    continue
                seen.add(rid)
                tasks.append({"id": rid, "run_dir": f"runs/{rid[:16]}", "net": net, "seed": seed,
                              "metric": metric, "oracle": list(constituents) if constituents else None,
                              "method": metric or oracle_method(constituents, config), "config": config,
                              "data": data, "report_drop": spec.protocol["report_drop"]})
    return tasks


# ---- one run: the only place a sweep calls the pruning engine ----------------------------------------

def execute(task: dict) -> dict:
    """Run (or resume, or just read back) one pruning run in its directory; returns its steps and
    summary. Appends who ran it to the directory's ``attempts.jsonl`` first."""
    from caffe_prune import pruning
    started = time.time()
    run_dir = Path(task["sweep_dir"]) / task["run_dir"]
    run_dir.mkdir(parents=True, exist_ok=True)
    fsio.append_line(run_dir / "attempts.jsonl", json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                             "started": started, "executor": task.get("executor")}))
    # one process per run: the executor runs runs side by side, one per core
    config = pruning.Config(**{k: v for k, v in task["config"].items() if k not in pruning.Config.EXECUTION},
                            workers=1)
    steps = pruning.Run(config, run_dir, data=task["data"], progress=False).run()
    header = json.loads((run_dir / "config.json").read_text())
    return {"id": task["id"], "steps": steps, "removed_at_drop": pruning.removed_at_drop(steps, task["report_drop"]),
            "protocol": header.get("protocol"), "versions": header.get("versions"),
            "host": socket.gethostname(), "pid": os.getpid(), "wall_s": round(time.time() - started, 3)}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"


def _classify(message: str) -> str:
    """``busy`` when the engine refused the run directory because another process holds it."""
    return "busy" if " in use by " in message else "failed"


# ---- executors -------------------------------------------------------------------------------------

@contextmanager
def _environ(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker when its driver dies (even by SIGKILL), so no orphan keeps
    writing a run directory that a relaunched sweep resumes."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _worker_main(conn, parent: int) -> None:
    """A local worker: runs tasks from `conn` one at a time until told to stop. Ctrl-C is the
    driver's to handle (it stops the workers), so the worker ignores SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            reply = ("done", execute(task))
        except Exception as exc:   # the run's own error, reported as one line; the worker lives on
            message = _one_line(exc)
            reply = (_classify(message), message)
        conn.send(reply)


class _Worker:
    def __init__(self, process, conn):
        self.process, self.conn, self.task = process, conn, None


class LocalExecutor:
    """A pool of worker processes on this machine (one per core by default), started with ``spawn``
    (never forked from a process that has imported Caffe or OpenBLAS). A run computes with one BLAS
    thread (caffe_prune.passes.BLAS_THREADS: its bits do not depend on the machine), so the runs
    side by side are the parallelism. A worker that dies is replaced; its run is reported ``died``."""
    name = "local"

    def __init__(self, workers: int | None = None):
        cores = passes.cores()
        self.workers = workers or max(1, cores // passes.BLAS_THREADS)
        self.threads = passes.BLAS_THREADS
        if self.workers < 1:
            raise SweepError(f"--workers must be at least 1, got {self.workers}")
        self.cores = cores
        self.context = multiprocessing.get_context("spawn")
        self.idle, self.busy = [], []

    def describe(self) -> str:
        return (f"local executor: {self.workers} worker(s) x {self.threads} BLAS thread(s) "
                f"on {self.cores} core(s)")

    def capacity(self) -> int:
        return self.workers - len(self.busy)

    def _spawn(self) -> _Worker:
        ours, theirs = self.context.Pipe()
        threads = {v: str(self.threads) for v in BLAS_THREAD_VARIABLES}
        with _environ(threads):        # read by OpenBLAS/OpenMP when the worker loads them
            process = self.context.Process(target=_worker_main, args=(theirs, os.getpid()), daemon=True,
                                           name="caffe-prune-sweep-worker")
            process.start()
        theirs.close()
        return _Worker(process, ours)

    def submit(self, task: dict) -> dict:
        worker = self.idle.pop() if self.idle else self._spawn()
        worker.task = task
        worker.conn.send(task)
        self.busy.append(worker)
        return {"host": socket.gethostname(), "pid": worker.process.pid}

    def events(self, timeout: float) -> list:
        if not self.busy:
            time.sleep(min(timeout, 0.05))
            return []
        handles = [w.conn for w in self.busy] + [w.process.sentinel for w in self.busy]
        ready = set(multiprocessing.connection.wait(handles, timeout))
        out = []
        for worker in list(self.busy):
            if worker.conn not in ready and worker.process.sentinel not in ready:
                continue
            try:
                if worker.conn.poll():
                    kind, payload = worker.conn.recv()
                    self.busy.remove(worker)
                    self.idle.append(worker)
                    out.append((kind, worker.task, payload))
                    continue
            except (EOFError, OSError):
                pass
            worker.process.join(timeout=5)
            if worker.process.exitcode is None:
                continue
            self.busy.remove(worker)
            worker.conn.close()
            code = worker.process.exitcode
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            out.append(("died", worker.task, f"worker {socket.gethostname()}:{worker.process.pid} died ({how})"))
        return out

    def close(self, cancel: bool = False) -> None:
        for worker in self.idle + self.busy:
            try:
                if cancel and worker in self.busy:
                    worker.process.terminate()
                else:
                    worker.conn.send(None)
            except OSError:
                pass
        for worker in self.idle + self.busy:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        self.idle, self.busy = [], []


def _ray_task(task: dict) -> dict:
    return execute(task)


class RayExecutor:
    """The same runs as Ray tasks on an existing cluster (``ray start --head`` on one node,
    ``ray start --address HEAD:PORT`` on the others). Each task needs one CPU (a run computes with
    one BLAS thread); it writes its run directory (the sweep directory must be on storage every
    node mounts at the same path) and returns its summary, which this driver writes to the store.
    Ray does not retry a task itself: a task whose worker or node died is reported ``died`` and the
    driver gives it to a new one, which resumes it from its directory."""
    name = "ray"

    def __init__(self, address: str):
        try:
            import ray
        except ImportError:
            raise SweepError("the Ray executor needs the ray package: pip install 'caffe-prune[ray]' "
                             "(here: .venv/bin/pip install ray)") from None
        self.ray, self.address, self.threads = ray, address, passes.BLAS_THREADS
        if address != "auto":
            check_answers(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        except Exception as exc:          # what ray.init raises depends on the Ray version
            raise SweepError(f"could not join the Ray cluster at {address}: {_one_line(exc)}") from None
        env = {v: str(self.threads) for v in BLAS_THREAD_VARIABLES}
        self.remote = ray.remote(_ray_task).options(num_cpus=self.threads, max_retries=0,
                                                    runtime_env={"env_vars": env})
        self.refs = {}

    def describe(self) -> str:
        cpus = self.ray.cluster_resources().get("CPU", 0)
        return f"ray executor at {self.address}: {cpus:g} CPU(s) in the cluster, {self.threads} per run"

    def capacity(self) -> int:
        cpus = int(self.ray.cluster_resources().get("CPU", 0)) // self.threads
        return max(1, 2 * cpus) - len(self.refs)

    def submit(self, task: dict) -> dict:
        self.refs[self.remote.remote(task)] = task
        return {"host": None, "pid": None}       # known once it starts (attempts.jsonl) or ends

    def events(self, timeout: float) -> list:
        if not self.refs:
            time.sleep(min(timeout, 0.05))
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
        out = []
        for ref in ready:
            task = self.refs.pop(ref)
            try:
                out.append(("done", task, self.ray.get(ref)))
            except self.ray.exceptions.RayTaskError as exc:     # the run itself raised
                message = _one_line(getattr(exc, "cause", None) or exc)
                out.append((_classify(message), task, message))
            except self.ray.exceptions.RayError as exc:         # its worker or node died
                out.append(("died", task, _one_line(exc).split(" Traceback")[0][:300]))
        return out

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for ref in self.refs:
                try:
                    self.ray.cancel(ref, force=True)
                except Exception:
                    pass
        self.refs = {}
        self.ray.shutdown()


def check_answers(address: str, timeout: float = 5.0) -> None:
    """A TCP connection to HOST:PORT, so that a wrong address fails in seconds with a clear line."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise SweepError(f"--address must be HOST:PORT (the head's `ray start --head --port PORT`), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise SweepError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                         f"`ray start --head --port {port}` on the head node, or check --address") from None


def make_executor(kind: str = "local", workers=None, address=None):
    if kind == "local":
        if address:
            raise SweepError("--address is for --executor ray")
        return LocalExecutor(workers)
    if kind == "ray":
        if not address:
            raise SweepError("--executor ray needs --address HOST:PORT (the head node's Ray port), or 'auto'")
        if workers:
            raise SweepError("--workers is for the local executor; a Ray cluster runs as many runs as it has CPUs")
        return RayExecutor(address)
    raise SweepError(f"unknown executor {kind!r}; one of local, ray")


# ---- the driver ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    runs: int
    done_before: int
    done: int = 0
    failed: int = 0
    busy: int = 0
    interrupted: int = 0
    sweep_dir: str = ""

    @property
    def complete(self) -> bool:
        return self.done_before + self.done == self.runs


def launch(spec: Spec, executor_factory=None, retries: int = 2, progress: bool = True, log=print) -> Outcome:
    """Expand `spec`, skip the runs its store has finished, and run the rest with the executor
    `executor_factory()` makes (default: local). Resumable: interrupted any way, the same call
    continues. Returns the counts; raises KeyboardInterrupt after recording an interruption."""
    from tqdm import tqdm
    sweep_dir = Path(spec.out).resolve()
    data = resolve_data(spec.data, progress)
    expand(spec, data)                         # every error in the SPEC before anything is written
    tasks = expand(spec, data, sweep_dir)
    with results_store.Store(sweep_dir) as store:
        store.add_runs(tasks)
        store.set_meta("spec", spec.as_dict())
        done = {r["id"] for r in store.runs(status="done")}
        todo = [dict(t, sweep_dir=str(sweep_dir)) for t in tasks if t["id"] not in done]
        outcome = Outcome(runs=len(tasks), done_before=len(tasks) - len(todo), sweep_dir=str(sweep_dir))
        log(f"sweep {spec.name}: {len(tasks)} runs, {outcome.done_before} done before, {len(todo)} to run "
            f"-> {sweep_dir}")
        if not todo:
            return outcome
        executor = (executor_factory or LocalExecutor)()
        log(executor.describe())
        bar = tqdm(total=len(tasks), initial=outcome.done_before, unit="run", desc=f"sweep {spec.name}",
                   disable=not progress, dynamic_ncols=True)
        queue, inflight, deaths = list(reversed(todo)), {}, defaultdict(int)

        def note(message):
            (bar.write if progress else log)(message)
        try:
            while queue or inflight:
                while queue and executor.capacity() > 0:
                    task = dict(queue.pop(), executor=executor.name)
                    where = executor.submit(task)
                    inflight[task["id"]] = store.start_attempt(task["id"], executor.name, **where)
                for kind, task, payload in executor.events(timeout=0.5):
                    attempt = inflight.pop(task["id"])
                    if kind == "done":
                        store.finish(task["id"], attempt, payload)
                        outcome.done += 1
                        bar.update(1)
                    elif kind == "died":
                        deaths[task["id"]] += 1
                        again = deaths[task["id"]] <= retries
                        store.end_attempt(task["id"], attempt, "died", _with_worker(payload, task),
                                          "retrying" if again else "failed")
                        note(f"{task['run_dir']} ({task['method']}, seed {task['seed']}): {payload}; "
                             + ("given to another worker" if again else f"failed after {retries} retries"))
                        if again:
                            queue.append(task)
                        else:
                            outcome.failed += 1
                    else:          # failed (the run raised) or busy (another process holds its directory)
                        store.end_attempt(task["id"], attempt, kind, payload, "failed" if kind == "failed" else "running")
                        setattr(outcome, kind, getattr(outcome, kind) + 1)
                        note(f"{task['run_dir']} ({task['method']}, seed {task['seed']}): {kind}: {payload}")
                bar.set_postfix(running=len(inflight), failed=outcome.failed, refresh=False)
        except KeyboardInterrupt:
            executor.close(cancel=True)
            for run_id, attempt in inflight.items():
                store.end_attempt(run_id, attempt, "interrupted", "the sweep was interrupted", "interrupted")
            outcome.interrupted = len(inflight)
            bar.close()
            log(f"interrupted: {outcome.done_before + outcome.done} of {len(tasks)} runs done, "
                f"{len(inflight)} interrupted (resumable), {len(queue)} not started; "
                f"the same command continues the sweep")
            raise KeyboardInterrupt from None
        executor.close()
        bar.close()
    log(f"sweep {spec.name}: {outcome.done_before + outcome.done} of {len(tasks)} runs done"
        + (f", {outcome.failed} failed" if outcome.failed else "")
        + (f", {outcome.busy} held by another process" if outcome.busy else "") + f"; store: {store.path}")
    return outcome


def resolve_data(data: str | None, progress: bool = False) -> str | None:
    """The data every run reads, as an absolute local path: CIFAR-10 fetched (downloaded or
    extracted) once here rather than raced by every worker, when that is what `data` names or
    nothing is named; any other source (an LMDB, a list file) as its absolute path."""
    from caffe_prune.data import cifar10
    try:
        return str(Path(cifar10.fetch(None if data == "cifar10" else data, progress=progress)).resolve())
    except cifar10.DataError:
        if data is not None and Path(data).exists():
            return str(Path(data).resolve())
        raise


def _with_worker(message: str, task: dict) -> str:
    """Add the worker that last started the run (its attempts.jsonl line), when the executor did
    not name it (Ray)."""
    if message.startswith("worker "):
        return message
    try:
        lines = (Path(task["sweep_dir"]) / task["run_dir"] / "attempts.jsonl").read_text().splitlines()
        last = json.loads(lines[-1])
        return f"{message} (last started by {last['host']}:{last['pid']})"
    except (OSError, ValueError, IndexError, KeyError):
        return message


@contextmanager
def _sigterm_interrupts():
    """SIGTERM (a scheduler's preemption, `kill`) is handled as Ctrl-C is."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- command line ----------------------------------------------------------------------------------

PROTOCOL_FLAGS = {   # flag -> (protocol key, type, help); defaults come from pruning.Config
    "--stop": ("stop", str, "drop: stop past --max-drop points (Table 2); end: whole curves (Figure 6)"),
    "--max-drop": ("max_drop", float, "points of test top-1 below the start to stop past (stop drop)"),
    "--floor": ("floor", float, "also stop below this absolute top-1 (%%)"),
    "--max-steps": ("max_steps", int, "stop after N steps"),
    "--report-drop": ("report_drop", float, "the drop at which the Table-2 figure is read (default 5)"),
    "--k": ("k", int, "oracle shortlist size"),
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
    """A function making the executor the options ask for (made once there is work to do); the
    options are checked now, before anything runs."""
    kind, workers = getattr(args, "executor", "local"), getattr(args, "workers", None)
    address = getattr(args, "address", None)
    if kind == "local":
        LocalExecutor(workers)                    # only checks the numbers: starts no process
        if address:
            raise SweepError("--address is for --executor ray")
    elif not address:
        raise SweepError("--executor ray needs --address HOST:PORT (the head node's Ray port), or 'auto'")
    elif address != "auto":
        check_answers(address)                    # seconds, before anything is written
    return lambda: make_executor(kind, workers, address)


def register(subparsers) -> None:
    """Add `sweep`, `results`, `report` and `reproduce` to caffe_prune.cli's parser."""
    p = subparsers.add_parser("sweep", help="run a SPEC's pruning runs (resumable) into a results store",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("spec", nargs="?", default=None, help="a TOML SPEC (flags below override or replace it)")
    p.add_argument("--name", default=None, help="the sweep's name (default: the SPEC file's name, or 'sweep')")
    p.add_argument("--out", default=None, help="the sweep directory (default runs/sweeps/NAME)")
    p.add_argument("--nets", default=None, help="comma-separated networks, with published weights unless --weights")
    p.add_argument("--weights", action="append", default=[], metavar="NET=PATH", help="a network's caffemodel")
    p.add_argument("--metrics", default=None, help="comma-separated metric names, aliases or globs")
    p.add_argument("--domino", default=None, help="comma-separated Domino aggregations (sum,mean,max) to add")
    p.add_argument("--oracle", action="append", default=None, metavar="M1,M2,...|paper",
                   help="an oracle over these constituents (repeatable)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, or a count N for 0..N-1")
    p.add_argument("--data", default=None, help="CIFAR-10 directory, archive or URL")
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
    p.set_defaults(func=cmd_results)

    p = subparsers.add_parser("report", help="Markdown + PNG reports (oracle, taxonomy, domino) from a sweep's store")
    p.add_argument("sweep_dir", help="a sweep directory")
    p.add_argument("--kind", default=None, help="comma-separated: oracle, taxonomy, domino (default: what the runs allow)")
    p.add_argument("--out", default=None, help="where the report goes (default SWEEP_DIR/report)")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("reproduce", help="a paper's experiment as a sweep, then its report: "
                                                "oracle (papers/004 Table 2 + Figure 6), taxonomy, domino")
    p.add_argument("paper", nargs="?", default="oracle", choices=tuple(PAPERS),
                   help="oracle (default), taxonomy or domino")
    p.add_argument("--nets", default=None, help="comma-separated networks (default: the paper's, see README)")
    p.add_argument("--weights", action="append", default=[], metavar="NET=PATH",
                   help="weights of a network without published ones (AlexNet, SqueezeNet)")
    p.add_argument("--methods", default=None, help="oracle: metrics and/or 'oracle' (default: the five + oracle)")
    p.add_argument("--metrics", default=None, help="taxonomy/domino: metric names or globs (default: the paper's)")
    p.add_argument("--domino", default=None, help="domino: aggregations (default sum,mean,max)")
    p.add_argument("--oracle", default="paper", help="the oracle's constituents (default: the paper's five)")
    p.add_argument("--forms", choices=tuple(taxonomy.PAPER_FORMS), default="table2",
                   help="the paper's five (singly and as the oracle's constituents): table2 (default), the forms "
                        "that reproduce Table 2 (the authors' code's, Fisher as eq. 4 is printed; README, "
                        "Faithfulness); code, as the authors' code computes all five; printed, eq1..eq5")
    p.add_argument("--runs", type=int, default=8, help="seeds per method (default 8)")
    from caffe_prune.cli import add_prune_options
    add_prune_options(p)
    add_executor_options(p)
    p.add_argument("--out", default=None, help="the sweep directory (default runs/reproduce-PAPER)")
    p.set_defaults(func=cmd_reproduce)


def spec_from_args(args) -> Spec:
    """The SPEC file (if any) with the flags given on top: flags replace the file's values."""
    raw = load_spec(args.spec) if args.spec else {}
    if args.name:
        raw["name"] = args.name
    if args.out:
        raw["out"] = args.out
    if args.data:
        raw["data"] = args.data
    if args.nets:
        raw["networks"] = {n: "published" for n in args.nets.split(",") if n}
    weights = _pairs(args.weights)
    if weights:
        raw["networks"] = {**(raw.get("networks") if isinstance(raw.get("networks"), dict)
                              else {n: "published" for n in raw.get("networks", [])}), **weights}
    if args.metrics is not None:
        raw["metrics"] = [m for m in args.metrics.split(",") if m]
    if args.domino is not None:
        raw["domino"] = [d for d in args.domino.split(",") if d]
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


def _pairs(values) -> dict:
    out = {}
    for value in values or []:
        net, sep, path = value.partition("=")
        if not sep or not net or not path:
            raise SweepError(f"--weights takes NET=PATH, got {value!r}")
        out[net] = path
    return out


def cmd_sweep(args) -> int:
    spec = spec_from_args(args)
    if args.dry_run:
        return dry_run(spec)
    factory = executor_factory(args)
    try:
        with _sigterm_interrupts():
            outcome = launch(spec, factory, retries=args.retries, progress=not args.quiet)
    except KeyboardInterrupt:
        return 130
    return 0 if outcome.complete else 1


def dry_run(spec: Spec) -> int:
    tasks = expand(spec, resolve_data(spec.data))
    status = {}
    path = results_store.store_path(spec.out)
    if path.is_file():
        with results_store.Store(path, create=False) as store:
            status = {r["id"]: r["status"] for r in store.runs()}
    for t in tasks:
        print(f"{t['id'][:16]}  {t['net']:<10} seed {t['seed']:<3} {status.get(t['id'], 'new'):<11} {t['method']}")
    counts = defaultdict(int)
    for t in tasks:
        counts[status.get(t["id"], "new")] += 1
    print(f"# {len(tasks)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0


# ---- results ---------------------------------------------------------------------------------------

GROUP_COLUMNS = ("net", "method", "metric", "seed", "status", "shortlist") + results_store.COMPONENTS
RUN_COLUMNS = ("id", "net", "method", "seed", "status", "steps", "initial_top1", "final_top1", "final_removed",
               "removed_at_drop", "report_drop", "completions", "wall_s", "host", "run_dir") + results_store.COMPONENTS


def select_runs(store, net=None, metric=None, status=None, seed=None) -> list:
    rows = store.runs(status=status, net=net)
    if metric:
        rows = [r for r in rows if fnmatch.fnmatchcase(r["method"], metric)]
    if seed is not None:
        rows = [r for r in rows if r["seed"] == seed]
    return rows


def group_rows(rows, by) -> list:
    """One row per group: runs, done, and mean ± 95% CI of the Table-2 figure over the done runs."""
    from caffe_prune.report import mean_ci
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(k) for k in by)].append(r)
    out = []
    for key, members in groups.items():
        done = [r for r in members if r["status"] == "done" and r["removed_at_drop"] is not None]
        mean, half = mean_ci([r["removed_at_drop"] for r in done]) if done else (None, None)
        out.append({**dict(zip(by, key)), "runs": len(members), "done": len(done),
                    "removed_at_drop_mean": None if mean is None else round(mean, 3),
                    "removed_at_drop_ci95": None if half is None else round(half, 3),
                    "final_removed_mean": round(sum(r["final_removed"] for r in done) / len(done), 3) if done else None,
                    "initial_top1_mean": round(sum(r["initial_top1"] for r in done) / len(done), 3) if done else None})
    return sorted(out, key=lambda g: (-(g["removed_at_drop_mean"] or -1), [str(g[k]) for k in by]))


def cmd_results(args) -> int:
    import csv
    import io
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


def cmd_report(args) -> int:
    from caffe_prune import report
    kinds = [k for k in args.kind.split(",") if k] if args.kind else None
    for path in report.write_reports(args.sweep_dir, args.out, kinds):
        print(f"report: {path}")
    return 0


# ---- reproduce PAPER -------------------------------------------------------------------------------

PAPERS = {   # the paper's networks and methods; the reports print the published figures next to ours
    "oracle": {"nets": ["LeNet-5", "ResNet-20"], "metrics": list(PAPER_FIVE), "domino": [], "oracle": True},
    "taxonomy": {"nets": ["LeNet-5", "CIFAR10", "ResNet-20", "NIN"], "metrics": ["*/*/*/*"], "domino": [],
                 "oracle": False},
    "domino": {"nets": ["ResNet-20", "AlexNet", "SqueezeNet", "NIN"], "metrics": list(PAPER_FIVE),
               "domino": list(taxonomy.DOMINO), "oracle": False},
}


def reproduce(args, paper: str, nets=None, methods=None, seeds=None, out=None) -> list:
    """A paper's experiment as a sweep (resumable), then its report; returns the report paths.
    `args` carries the prune options (cli.add_prune_options) and, optionally, executor options."""
    from caffe_prune import pruning, report
    plan = PAPERS[paper]
    nets = nets or (args.nets.split(",") if getattr(args, "nets", None) else plan["nets"])
    five = list(taxonomy.PAPER_FORMS[getattr(args, "forms", "table2")])
    if methods is None and getattr(args, "methods", None):
        methods = [m for m in args.methods.split(",") if m]
    if methods is not None:
        metrics, with_oracle = [m for m in methods if m != ORACLE], ORACLE in methods
    else:
        given = getattr(args, "metrics", None)
        metrics = [m for m in given.split(",") if m] if given else \
            [five[PAPER_FIVE.index(m)] if m in PAPER_FIVE else m for m in plan["metrics"]]
        with_oracle = plan["oracle"]
    domino = getattr(args, "domino", None)
    domino = [d for d in domino.split(",") if d] if domino else plan["domino"]
    constituents = getattr(args, "oracle", "paper") or "paper"
    seeds = list(seeds) if seeds is not None else list(range(args.seed, args.seed + getattr(args, "runs", 1)))
    # the protocol exactly as `caffe-prune prune` would build it from the same options
    from caffe_prune.cli import prune_config
    base = dataclasses.asdict(prune_config(args, nets[0], "published", metric=PAPER_FIVE[0]))
    protocol = {k: v for k, v in base.items() if k not in RUN_FIELDS and k not in pruning.Config.EXECUTION}
    protocol["stop"] = "end" if protocol["max_drop"] is None else "drop"
    if protocol["stop"] == "end":
        del protocol["max_drop"]
    weights = _pairs(getattr(args, "weights", []))
    raw = {"name": f"reproduce-{paper}", "out": out or getattr(args, "out", None) or f"runs/reproduce-{paper}",
           "data": base["data"], "networks": {n: weights.get(n, "published") for n in nets}, "metrics": metrics,
           "domino": domino, "seeds": seeds, "protocol": protocol,
           "oracles": [five if constituents == "paper" else constituents.split(",")] if with_oracle else []}
    spec = parse_spec(raw)
    with _sigterm_interrupts():
        outcome = launch(spec, executor_factory(args), retries=getattr(args, "retries", 2),
                         progress=not args.quiet)
    if not outcome.complete:
        print(f"caffe-prune: {outcome.runs - outcome.done_before - outcome.done} run(s) did not finish; "
              f"the report covers the finished ones", file=sys.stderr)
    paths = report.write_reports(spec.out, kinds=[paper])
    for path in paths:
        print(f"report: {path}")
    return paths


def cmd_reproduce(args) -> int:
    try:
        reproduce(args, args.paper)
    except KeyboardInterrupt:
        return 130
    return 0

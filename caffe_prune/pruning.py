"""Algorithm 1 of papers/004: iterative channel pruning without retraining, one group per step, or
as many as a schedule asks (caffe_prune.schedule) where the constraints allow (caffe_prune.constraints).

Each step draws ``eval_size`` random validation batches, ranks the prunable groups with the chosen
saliency metric (or short-lists k of them with the myopic oracle and measures them: k >= the groups
the step will take), removes the least salient group, or the N least salient of that one ranking
(their masks committed in the Caffe net's blobs), and measures test top-1 every ``test_interval``
steps. A step's record (caffe_prune.steps) names the groups it removed, in the order chosen. The run stops when test top-1 falls more than ``max_drop`` points below the
initial accuracy (never, with ``max_drop`` None: Figure 6's whole curves), below an optional
absolute ``floor``, after ``max_steps``, or when nothing is left to prune. Every decision uses
validation images (caffe_prune.data.dataset); the test set is only measured.

A run lives in a directory of plain files (caffe_prune.rundir: ``config.json``, ``steps.jsonl``,
the lock, and with a prune-retrain schedule the retrainings): a killed run, restarted with the same
command, replays the committed groups and continues after the last complete step, and ends exactly
as an uninterrupted run would. With a prune-retrain schedule (``retrain_every`` S, ``retrain_iters``
I; not in Algorithm 1) the masked net is fine-tuned for I solver iterations after every S committed
steps, every pruned group held at zero (caffe_prune.train.retrain); that step's record holds
``"retrain": {"iters", "before", "after", "seconds", ...}`` (test scores before and after), and the
stop rule reads the accuracy after. A resume loads the newest retrained caffemodel at or before the
last complete step before re-committing the masks; a kill during a retraining resumes it from its
newest snapshot (see caffe_prune.train for why that ends with the same bits).

A resume compares contents, not paths: the same weights and data at another path continue the
run, other contents at the same path are refused (``--force`` starts over); a directory holding no
pruning step yet (a run that failed before step 1: only step 0's measurement) is simply replaced,
so that the command, corrected, runs without --force. ``config.json`` that is
empty or torn (a kill during its first write) is rebuilt from the command when the steps already
recorded agree with it (their proposers are the command's metric, or its oracle's constituents, and
their channels this network's groups); otherwise it is one line and nothing is appended.

Randomness: the only RNG is numpy's ``default_rng([seed, step, stream])``, stream 0 drawing the
saliency batches and stream 1 the oracle's, both without replacement from the validation split.
A step's draws therefore depend on (seed, step) alone, never on what ran before in the process.
Caffe's forward and backward are deterministic on the CPU (and so is a retraining: its solver's
random_seed is fixed and its data continue where the previous retraining stopped).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from caffe_prune import engines, masking, metrics, oracle, pycaffe
from caffe_prune import steps as step_records
from caffe_prune.analysis import DEFAULT_DROP, final_scores
from caffe_prune.constraints import Constraints
from caffe_prune.download import digest
from caffe_prune.errors import InputError, PluginError
from caffe_prune.metrics import plugins
from caffe_prune.rundir import RunDir
from caffe_prune.schedule import TARGETS, Schedule, within
from caffe_prune.session import Session


def later(default):
    """A Config field added after runs were stored, whose default behaves as before it existed: sweep
    ids leave it out while it has that default (caffe_prune.sweep.run_id)."""
    return field(default=default, metadata={"later": True})


@dataclass
class Config:
    """Everything that shapes a run's decisions (a restart must repeat it exactly)."""
    net: str
    weights: str
    metric: str | None = None             # a single saliency metric, or
    oracle: list = field(default_factory=list)   # the oracle's constituents
    k: int = 16
    eval_size: int = 2                    # validation batches per saliency computation
    oracle_eval_size: int = 2             # validation batches per oracle sensitivity
    test_size: int = 80                   # test batches per measurement (or all available)
    test_interval: int = 1
    max_drop: float | None = DEFAULT_DROP   # points of top-1 below the initial accuracy; None: no drop stop
    floor: float | None = None            # optional absolute top-1 (%) to stop at
    batch_size: int = 128
    seed: int = 0
    semantics: str = "zero-downstream"
    reading: str = "authors"
    max_steps: int | None = None
    shortlist: str = "paper"              # the oracle's rule: "paper" (the text) or "authors-code" (oracle.SHORTLISTS)
    data: str | None = None               # the dataset (caffe_prune.data.dataset; None: the net's own)
    data_root: str = ""
    val_split: str = later("seeded")      # the validation images: "seeded" or the authors' own (CIFAR-10; dataset.VAL_SPLITS)
    transform: dict | None = None         # transform flags replacing the data layer's (options.transform_fields)
    logits: str | None = None
    input_shape: str | None = None
    engine: str = "fast"                  # how the Caffe work is done (caffe_prune.engines): same decisions
    workers: int | None = None            # fast engine's processes (default: one per core)
    cache_mb: int | None = None           # fast engine's test checkpoints (default: engines.default_cache_mb)
    retrain_every: int | None = later(None)   # prune-retrain: fine-tune after every S committed steps (None: never)
    retrain_iters: int | None = later(None)   # ... for I solver iterations, pruned groups held at zero
    target: dict | None = later(None)         # a budget to stop at: {"macs"|"params"|"weights": fraction left}
    plugins: dict | None = later(None)        # {name: file} of the plugin metrics used (caffe_prune.metrics.plugins)
    per_step: str | None = later(None)        # groups a step removes: "N", "P%" (of the prunable channels), "P%macs"
    in_steps: int | None = later(None)        # reach the target in this many steps (a geometric schedule)
    keep: list | None = later(None)           # producer layers (glob patterns) never pruned
    min_channels: int | None = later(None)    # every layer keeps at least this many channels
    max_layer_fraction: float | None = later(None)   # no layer loses more than this fraction of its channels
    round_to: int | None = later(None)        # every width left a multiple of this (or the original)
    val_transform: dict | None = later(None)  # the validation split's own transform flags (--val-*)
    channel_order: str | None = later(None)   # CIFAR-10's planes: "bgr" or "rgb" (None: the network's default)
    val_from: str = later("train")            # "test": the validation images may come from the test source
    allow_python_layers: bool = later(False)  # let Caffe build the net's Python layers (runs their modules' code)
    fork_layers: bool = later(False)          # fork layers rewritten as stock ones (caffe_prune.forks)

    # where things are, not what they are: a resume compares their contents (sha256) instead
    LOCATIONS = ("net", "weights", "data", "data_root", "plugins")
    # when to stop, not what to decide: a resume may extend or shorten a run
    STOPS = ("max_steps", "max_drop", "floor", "target")
    # how the work is done, not what it decides: a resume may switch
    EXECUTION = ("engine", "workers", "cache_mb")

    @classmethod
    def neutral(cls) -> dict:
        """{field: default} of the fields added later (see ``later``)."""
        return {f.name: f.default for f in fields(cls) if f.metadata.get("later")}

    @classmethod
    def default(cls, name: str):
        """A field's default (what every command's option of the same name defaults to)."""
        f = next(f for f in fields(cls) if f.name == name)
        return f.default_factory() if f.default_factory is not MISSING else f.default

    def check(self) -> None:
        if (self.metric is None) == (not self.oracle):
            raise InputError("give exactly one of --metric M or --oracle M1,M2,...")
        for name, value, low in (("k", self.k, 1), ("eval_size", self.eval_size, 1),
                                 ("oracle_eval_size", self.oracle_eval_size, 1), ("test_size", self.test_size, 1),
                                 ("test_interval", self.test_interval, 1), ("batch_size", self.batch_size, 1)):
            if value < low:
                raise InputError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
        if self.max_drop is not None and self.max_drop < 0:
            raise InputError(f"--max-drop must be >= 0 points, got {self.max_drop}")
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.semantics not in masking.SEMANTICS:
            raise InputError(f"--semantics must be one of {', '.join(masking.SEMANTICS)}")
        if self.engine not in engines.ENGINES:
            raise InputError(f"--engine must be one of {', '.join(engines.ENGINES)}")
        if self.workers is not None and self.workers < 1:
            raise InputError(f"--workers must be at least 1, got {self.workers}")
        if self.cache_mb is not None and self.cache_mb < 0:
            raise InputError(f"--cache-mb must be 0 or more, got {self.cache_mb}")
        if self.shortlist not in oracle.SHORTLISTS:
            raise InputError(f"--shortlist must be one of {', '.join(oracle.SHORTLISTS)}")
        if (self.retrain_every is None) != (self.retrain_iters is None):
            raise InputError("--retrain-every S and --retrain-iters I go together")
        for name, value in (("retrain_every", self.retrain_every), ("retrain_iters", self.retrain_iters)):
            if value is not None and value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        Schedule.check(self.per_step, self.in_steps, self.target)
        Constraints.check(self.min_channels, self.max_layer_fraction, self.round_to)
        for key, fraction in (self.target or {}).items():
            if key not in TARGETS:
                raise InputError(f"--target {key}: budgets are {', '.join(TARGETS)} (fractions left, e.g. "
                                         f"--target macs=0.5)")
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
                raise InputError(f"--target {key}={fraction}: the fraction left must be in (0, 1]")
        from caffe_prune.data.dataset import VAL_SPLITS
        if self.val_split not in VAL_SPLITS:
            raise InputError(f"--val-split must be one of {', '.join(VAL_SPLITS)}, got {self.val_split!r}")
        names = [self.metric] if self.metric else self.oracle
        self.plugins = plugins.resolve(names, self.plugins)     # loaded here (a sweep's worker: from its file)
        for name in names:
            try:
                metrics.parse(name)
            except metrics.MetricError as exc:   # its message lists the valid names
                raise InputError(str(exc)) from None


@contextlib.contextmanager
def _at_step(step: int):
    """A worker's death (engines.WorkerDied) names the step it ended (a plugin's error already does)."""
    try:
        yield
    except engines.WorkerDied as exc:
        raise engines.WorkerDied(f"step {step}: {exc}") from None


def definition_sha256(net_param) -> str:
    return hashlib.sha256(net_param.SerializeToString(deterministic=True)).hexdigest()


class Run:
    """One pruning run: the session (net, graph, data), the masks, and the run directory."""

    def __init__(self, config: Config, out_dir, data=None, force: bool = False, progress: bool = True):
        config.check()
        if data is not None and config.data is None:     # the older call: data beside the config
            config.data = os.fsdecode(data)
        self.config, self.out, self.progress = config, Path(out_dir), progress
        self.dir = RunDir(self.out)
        self.timing = {}                 # seconds of the current step's phases (saliency, probes, test)
        self.engine = None               # the engine config.engine names (caffe_prune.engines), once made
        self.lock = self.dir.lock()
        try:
            self.session = Session.from_config(config, progress=progress)
            dataset, network = self.session.dataset, self.session.network
            self.net, self.graph = self.session.net, self.session.graph
            self.masker = masking.Masker(self.graph, [self.net], config.semantics)
            dataset.check_labels(self.session.classes, network.where, ("test", "validation"))
            self.validation = dataset.validation
            test_images = min(len(dataset.test), config.test_size * config.batch_size)
            self.header = {
                "config": asdict(config),
                "identity": {"definition_sha256": definition_sha256(network.param),
                             "weights_sha256": digest(config.weights, "sha256"),
                             "data": {k: v for k, v in dataset.identity.items() if k != "data"},
                             **({"plugins": plugins.identity(config.plugins)} if config.plugins else {})},
                "protocol": {"data": dataset.description, "channel_order": dataset.channel_order, "counts": {"test": len(dataset.test)},
                             "validation_images": len(self.validation), "test_images_per_measurement": test_images,
                             "input_shape": list(self.session.input_shape), "logits": self.session.head.logits,
                             "classes": self.session.classes, "groups": len(self.graph.groups),
                             "conv_weights": self.graph.conv_weights(set())},
                "versions": {k: v for k, v in pycaffe.versions().items() if k in ("caffe", "source", "blas", "python")},
                "original": self.graph.costs(set())._asdict(),     # what the unpruned net computes and holds
            }
            self.schedule = Schedule(self.graph, self.graph.costs(set()), config.per_step, config.in_steps,
                                     config.target)
            self.constraints = Constraints.of(config, self.graph)
            self.unreachable = None          # why the run stopped short of its --target, when it did
            self.retraining = None
            if config.retrain_every:           # the training form, checked before any step is taken
                from caffe_prune import train
                self.retraining = train.recipe_of(network, config.data, progress=progress,
                                                  channel_order=dataset.channel_order)
            self.steps = self._open(force)
            self.test = dataset.test.head(test_images)
            self.engine = engines.make(config.engine, self.session, self.masker, self.test, config.workers,
                                      config.cache_mb)
        except BaseException:
            self.lock.release()
            raise

    # ---- the run directory (caffe_prune.rundir) ----

    @staticmethod
    def _decisive(header: dict) -> dict:
        ignored, neutral = Config.LOCATIONS + Config.STOPS + Config.EXECUTION, Config.neutral()
        config = {k: v for k, v in header.get("config", {}).items()
                  if k not in ignored and not (k in neutral and v == neutral[k])}
        # the records' sha256 (identity) tells other data, or another channel order, from the same at another path
        protocol = {k: v for k, v in header.get("protocol", {}).items() if k not in ("data", "channel_order")}
        return {"config": config, "identity": header.get("identity"), "protocol": protocol}

    def _open(self, force: bool) -> list:
        """Create the run directory, or resume the run in it when it is this run."""
        self.dir.remove_temporaries()             # a write killed before its rename (we hold the lock)
        previous = self.dir.header()
        why = self._disagreement() if previous is None and self.dir.header_torn() else None
        if why:
            if not force:
                raise InputError(f"{self.out}/config.json is empty or torn, and {why}: rerun the "
                                 f"command that made the run (its config is rebuilt from it), or use --force to start "
                                 f"over or another --out")
            self.dir.clear()
        if previous is not None and self._decisive(previous) != self._decisive(self.header):
            if not force and len(self.dir.steps(len(self.graph.groups), repair=False)) > 1:
                mine, theirs = self._decisive(self.header), self._decisive(previous)
                differ = sorted(k for k in mine["config"] if theirs["config"].get(k) != mine["config"][k])
                differ += [f"{k} contents" for k in ("definition_sha256", "weights_sha256", "data", "plugins")
                           if (theirs.get("identity") or {}).get(k) != mine["identity"].get(k)]
                raise InputError(f"{self.out} holds a run with a different configuration "
                                         f"({', '.join(differ) or 'protocol'}); use another --out or --force")
            self.dir.clear()
            previous = None
        if previous is None or previous["config"] != self.header["config"]:   # new, or new paths/stop rule
            self.dir.write_header(self.header)
        steps = self.dir.steps(len(self.graph.groups))
        if self.config.retrain_every and len(steps) > 1:
            retrained = self.dir.retrained_weights(len(steps) - 1, steps)
            if retrained is not None:       # the net as the last retraining left it (its masks are zeros)
                self.net.copy_from(str(retrained))
        for group in step_records.pruned_of(steps[1:]):
            self.masker.commit(group)
        return steps

    def _disagreement(self) -> str | None:
        """Why the steps in the run directory were not made by this command (None when they may have
        been): what the header would have said, read from the steps themselves, for a torn config.json."""
        c, taken = self.config, self.dir.steps(len(self.graph.groups), repair=False)[1:]
        if not taken:
            return None
        names, oracle_steps = step_records.proposer_names(taken), ["sensitivities" in s for s in taken]
        if c.metric and (names != {c.metric} or any(oracle_steps)) or \
                not c.metric and not (names <= set(c.oracle) and all(oracle_steps)):
            theirs = ("the oracle over " if all(oracle_steps) else "") + ", ".join(sorted(names))
            mine = f"--metric {c.metric}" if c.metric else f"--oracle {','.join(c.oracle)}"
            done = "its step was" if len(taken) == 1 else f"its {len(taken)} steps were"
            return f"{done} decided by {theirs}, not by {mine}"
        for record in taken:
            held = [[u.layer, u.index] for g in step_records.groups_of(record) for u in self.graph.groups[g].channels]
            if "channels" in record and record["channels"] != held:
                return f"its step {record['step']} removed other channels than this network's groups"
        return None

    def _append(self, record: dict) -> None:
        self.dir.append(record)
        self.steps.append(record)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.lock.release()

    # ---- measurements ----

    def _batches(self, step: int, stream: int, count: int):
        """`count` validation batches drawn without replacement by default_rng([seed, step, stream])."""
        size = min(count * self.config.batch_size, len(self.validation))
        rng = np.random.default_rng([self.config.seed, step, stream])
        chosen = np.sort(rng.choice(len(self.validation), size=size, replace=False))
        b = self.config.batch_size
        return [self.validation.batch(chosen[i:i + b]) for i in range(0, size, b)]

    def _test(self) -> dict:
        start = time.perf_counter()
        scores = self.engine.test()
        self.timing["test"] = round(time.perf_counter() - start, 4)
        return scores

    def _counts(self, pruned) -> dict:
        """What the masked net computes and holds, counted as its compact export would
        (graph.costs): conv and InnerProduct weights, MACs per image, all parameters."""
        g = self.graph
        costs, original = g.costs(pruned), self.header["original"]
        return {"conv_weights": costs.conv_weights, "fc_weights": costs.fc_weights,
                "percent_conv_removed": g.percent_conv_removed(pruned), "macs": costs.macs, "params": costs.params,
                "percent_macs_removed": 100.0 * (1.0 - costs.macs / original["macs"]),
                "active_channels": sum(g.active(layer, pruned) for layer in g.producers)}

    # ---- Algorithm 1 ----

    def decide(self, step: int, pruned: set) -> dict:
        """Choose the groups to prune at `step`: the least salient of the metric's ranking, or the least
        sensitive of the oracle's measured shortlist, as many as the schedule's quota (constraints
        holding). {"groups", "proposers" (one list per group), "sensitivities" (the oracle's)}."""
        c = self.config
        names = [c.metric] if c.metric else list(c.oracle)
        start = time.perf_counter()
        try:
            tensors = self.engine.collect(self._batches(step, 0, c.eval_size), names, c.reading)
            rankings = metrics.rankings(names, tensors, self.graph, pruned)
        except PluginError as exc:
            raise PluginError(f"step {step}: {exc}") from None
        self.timing["saliency"] = round(time.perf_counter() - start, 4)
        state = self.graph.state(pruned)
        quota = self.schedule.quota(step, state)
        if c.metric:
            ranking = rankings[c.metric]
            rank = {group: i for i, group in enumerate(ranking)}
            groups = self.schedule.select(ranking, state, quota, self.constraints)
            return {"groups": groups, "proposers": [[[c.metric, rank[g]]] for g in groups]}
        # the shortlist holds at least as many candidates as the step will take (k >= N)
        k = c.k
        if quota != Schedule.ONE or self.constraints or c.target:
            everything = [p.group for p in oracle.shortlist(rankings, len(self.graph.groups), c.shortlist)]
            k = max(c.k, self.schedule.trial(everything, state, quota, self.constraints))
        proposals = oracle.shortlist(rankings, k, c.shortlist)
        start = time.perf_counter()
        sensitivity = self.engine.sensitivities([p.group for p in proposals], self._batches(step, 1, c.oracle_eval_size))
        self.timing["probes"] = round(time.perf_counter() - start, 4)
        groups = self.schedule.select(oracle.order(sensitivity), state, quota, self.constraints)
        proposers = {p.group: p.proposers for p in proposals}
        return {"groups": groups, "proposers": [[list(p) for p in proposers[g]] for g in groups],
                "sensitivities": {str(g): s for g, s in sensitivity.items()}}

    def advance(self, step: int, pruned: set) -> dict | None:
        """One step of Algorithm 1 from the state ``pruned``: decide, commit the masks, count what the
        state keeps, measure (every test_interval steps), retrain (with a prune-retrain schedule);
        the step's record, not yet appended (None when nothing may be pruned any more)."""
        c = self.config
        start = time.perf_counter()
        self.timing = {}
        state = self.graph.state(pruned)
        if not any(state.fits(g) and self.constraints.allowed(g, state) for g in self.graph.prunable(pruned)):
            return None
        choice = self.decide(step, pruned)
        groups = choice.pop("groups")
        if not groups:
            return None
        self.engine.commit(groups)
        pruned.update(groups)
        held = [self.graph.groups[g] for g in groups]
        record = step_records.record(step, groups, choice.pop("proposers"), **choice,
                                     layers=list(dict.fromkeys(layer for g in held for layer in g.layers)),
                                     channels=[[u.layer, u.index] for g in held for u in g.channels],
                                     **self._counts(pruned))
        if step % c.test_interval == 0:
            record["test"] = self._test()
        if c.retrain_every and step % c.retrain_every == 0:
            record["retrain"] = self._retrain(step, record.get("test") or self._test())
        record["seconds"] = round(time.perf_counter() - start, 4)
        record["phase_seconds"] = dict(self.timing)
        record["peak_rss_mib"] = self._peak_memory()
        return record

    def _peak_memory(self) -> dict:
        """The peak resident memory so far (MiB) of this process and of its largest engine worker."""
        def peak(pid):
            try:
                return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                            if line.startswith("VmHWM")) / 1024
            except (OSError, StopIteration, ValueError):
                return 0.0
        workers = self.engine.worker_pids() if hasattr(self.engine, "worker_pids") else []
        return {"main": round(peak(os.getpid()), 1), "worker": round(max([peak(w) for w in workers] or [0.0]), 1)}

    def run(self) -> list:
        """Prune until the stop criterion; returns all step records (resumed or new)."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> list:
        c = self.config
        self.timing = {}
        if not self.steps:
            with _at_step(0):
                self._append(step_records.record(0, [], [], test=self._test(), **self._counts(set()), seconds=0.0))
        initial = 100 * self.steps[0]["test"]["top1"]
        pruned = set(step_records.pruned_of(self.steps[1:]))
        bar = tqdm(total=len(self.graph.groups), initial=len(pruned), unit="group",
                   desc=f"prune {Path(c.net).name}", disable=not self.progress)
        with contextlib.closing(bar):
            while not self._finished(initial):
                with _at_step(len(self.steps)):
                    record = self.advance(len(self.steps), pruned)
                if record is None:
                    self.unreachable = self._short_of_target(pruned) if c.target else None
                    break
                self._append(record)
                bar.update(len(record["groups"]))
                top1 = record.get("test", {}).get("top1")
                bar.set_postfix(removed=f"{record['percent_conv_removed']:.1f}%",
                                active=record["active_channels"], top1="-" if top1 is None else f"{100 * top1:.1f}")
        return self.steps

    def _within_budget(self) -> bool:
        """Every budget of ``target`` met: the costs left are at most the fractions of the original."""
        return within(self.graph.costs(set(step_records.pruned_of(self.steps[1:]))), self.graph.costs(set()),
                      self.config.target)

    def _short_of_target(self, pruned) -> str:
        """Why the run stopped before its --target: which constraint left nothing to prune, and how far it got."""
        state = self.graph.state(pruned)
        reasons = sorted({self.constraints.why_not(g, state) or (f"--round-to {self.config.round_to}"
                                                                 if self.config.round_to else "the layers' last channels")
                          for g in self.graph.prunable(pruned)})
        costs, original = state.costs(), self.graph.costs(set())
        left = ", ".join(f"{key} {getattr(costs, TARGETS[key]) / (getattr(original, TARGETS[key]) or 1):.3f}"
                         for key in sorted(self.config.target))
        what = ", ".join(reasons) if reasons else "no group is left that keeps every layer a channel"
        target = ",".join(f"{k}={v:g}" for k, v in sorted(self.config.target.items()))
        if not self.graph.groups:     # nothing was ever prunable: no constraint is to blame
            return (f"--target {target} cannot be reached: {self.session.network.where} has no prunable channel "
                    f"group (`caffe-prune graph` says why), so nothing can be pruned; left of the original: {left}")
        return (f"--target {target} not reached: after step {len(self.steps) - 1} nothing more may be pruned "
                f"({what}); left of the original: {left}")

    def _retrain(self, step: int, before: dict) -> dict:
        """Fine-tune the masked net in place (caffe_prune.train.retrain); the fast engine's workers hold
        copies of the old weights, and the masker the old originals, so both are made again."""
        from caffe_prune import train
        c = self.config
        self.engine.close()
        done = train.retrain(self.session, self.masker, self.retraining, self.dir, step, c.retrain_iters,
                             data_offset=(step // c.retrain_every - 1) * c.retrain_iters, progress=self.progress)
        committed = list(self.masker.committed)
        self.masker = masking.Masker(self.graph, [self.net], c.semantics)
        for group in committed:
            self.masker.commit(group)
        self.engine = engines.make(c.engine, self.session, self.masker, self.test, c.workers, c.cache_mb)
        return {**done, "before": before, "after": self._test()}

    def _finished(self, initial: float) -> bool:
        c, last = self.config, self.steps[-1]
        if c.max_steps is not None and len(self.steps) > c.max_steps:
            return True
        if c.target and self._within_budget():
            return True
        scores = final_scores(last)
        if scores is None or not step_records.groups_of(last):
            return False
        top1 = 100 * scores["top1"]
        dropped = c.max_drop is not None and top1 < initial - c.max_drop
        return dropped or (c.floor is not None and top1 < c.floor)

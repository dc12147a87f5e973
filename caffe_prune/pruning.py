"""Algorithm 1 of papers/004: iterative channel pruning without retraining, one group per step.

Each step draws ``eval_size`` random validation batches, ranks the prunable groups with the chosen
saliency metric (or short-lists k of them with the myopic oracle and measures them), removes the
least salient group (its masks committed in the Caffe net's blobs), and measures test top-1 every
``test_interval`` steps. The run stops when test top-1 falls more than ``max_drop`` points below the
initial accuracy, below an optional absolute ``floor``, or when nothing is left to prune. Every
decision uses validation images (training images listed in val-indices.txt); the test set is only
measured.

A run lives in a directory, in plain formats that need no code to read:

- ``config.json``: the decision-relevant configuration, versions, data counts and protocol;
- ``steps.jsonl``: one JSON object per completed step, appended and fsync'ed; step 0 is the
  unpruned net. A killed run, restarted with the same command, replays the committed groups and
  continues after the last complete line, and ends exactly as an uninterrupted run would.

Randomness: the only RNG is numpy's ``default_rng([seed, step, stream])``, stream 0 drawing the
saliency batches and stream 1 the oracle's, both without replacement from the validation indices.
A step's draws therefore depend on (seed, step) alone, never on what ran before in the process.
Caffe's forward and backward are deterministic on the CPU.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from caffe_prune import engine, evaluate, masking, metrics, netdef, networks, oracle
from caffe_prune.data import cifar10
from caffe_prune.graph import build_graph


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
    max_drop: float = 5.0                 # points of top-1 below the initial accuracy
    floor: float | None = None            # optional absolute top-1 (%) to stop at
    batch_size: int = 128
    seed: int = 0
    semantics: str = "zero-downstream"
    reading: str = "authors"
    max_steps: int | None = None

    def check(self) -> None:
        if (self.metric is None) == (not self.oracle):
            raise engine.EngineError("give exactly one of --metric M or --oracle M1,M2,...")
        for name, value, low in (("k", self.k, 1), ("eval_size", self.eval_size, 1),
                                 ("oracle_eval_size", self.oracle_eval_size, 1), ("test_size", self.test_size, 1),
                                 ("test_interval", self.test_interval, 1), ("batch_size", self.batch_size, 1)):
            if value < low:
                raise engine.EngineError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
        if self.max_drop < 0:
            raise engine.EngineError(f"--max-drop must be >= 0 points, got {self.max_drop}")
        if self.max_steps is not None and self.max_steps < 1:
            raise engine.EngineError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.semantics not in masking.SEMANTICS:
            raise engine.EngineError(f"--semantics must be one of {', '.join(masking.SEMANTICS)}")
        for name in [self.metric] if self.metric else self.oracle:
            try:
                metrics.parse(name)
            except metrics.MetricError as exc:   # its message lists the valid names
                raise engine.EngineError(str(exc)) from None


class Run:
    """One pruning run: the net, its graph and masks, the data, and the run directory."""

    def __init__(self, config: Config, out_dir, data=None, force: bool = False, progress: bool = True):
        config.check()
        self.config, self.out, self.progress = config, Path(out_dir), progress
        engine.set_mode("auto")
        self.net_param = networks.definition(config.net)
        self.graph = build_graph(self.net_param)
        form, self.transform = netdef.evaluation_form(self.net_param, batch_size=config.batch_size)
        self.net = engine.net_from_param(form, config.weights)
        self.masker = masking.Masker(self.graph, [self.net], config.semantics)
        prepared = cifar10.prepare(data, progress=progress)
        train_x, train_y = cifar10.read_split("train", prepared["source"])
        val = cifar10.load_validation_indices(prepared["paths"]["validation"])
        self.val_x, self.val_y = self._inputs(train_x[val]), train_y[val]
        test_x, self.test_y = cifar10.read_split("test", prepared["source"])
        self.test_x = self._inputs(test_x)
        self.protocol = {"data": prepared["source"], "counts": prepared["counts"], "validation_images": len(val),
                         "test_images_per_measurement": min(len(self.test_y), config.test_size * config.batch_size),
                         "groups": len(self.graph.groups), "conv_weights": self.graph.conv_weights(set())}
        self.steps = self._open(force)

    def _inputs(self, images):
        return cifar10.caffe_input(images, self.transform.mean_values, self.transform.scale)

    # ---- the run directory ----

    def _open(self, force: bool) -> list:
        """Create the run directory, or resume the run in it when its config is this one."""
        config_path, steps_path = self.out / "config.json", self.out / "steps.jsonl"
        header = {"config": asdict(self.config), "protocol": self.protocol,
                  "versions": {k: v for k, v in engine.versions().items() if k in ("caffe", "source", "blas", "python")}}
        if config_path.is_file():
            previous = json.loads(config_path.read_text())
            if previous.get("config") != header["config"] or previous.get("protocol") != header["protocol"]:
                if not force:
                    differ = sorted(k for k in header["config"] if previous.get("config", {}).get(k) != header["config"][k])
                    raise engine.EngineError(f"{self.out} holds a run with a different configuration "
                                             f"({', '.join(differ) or 'data/protocol'}); use another --out or --force")
                shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        if not config_path.is_file():
            config_path.write_text(json.dumps(header, indent=2) + "\n")
        steps = []
        if steps_path.is_file():
            for line in steps_path.read_text().splitlines():
                try:
                    steps.append(json.loads(line))
                except ValueError:   # a line cut by a kill: everything after it is redone
                    break
            steps_path.write_text("".join(json.dumps(s) + "\n" for s in steps))
        for step in steps[1:]:
            self.masker.commit(step["group"])
        return steps

    def _append(self, record: dict) -> None:
        with open(self.out / "steps.jsonl", "a") as stream:
            stream.write(json.dumps(record) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        self.steps.append(record)

    # ---- measurements ----

    def _batches(self, step: int, stream: int, count: int):
        """`count` validation batches drawn without replacement by default_rng([seed, step, stream])."""
        size = min(count * self.config.batch_size, len(self.val_y))
        rng = np.random.default_rng([self.config.seed, step, stream])
        chosen = np.sort(rng.choice(len(self.val_y), size=size, replace=False))
        b = self.config.batch_size
        return [(self.val_x[chosen[i:i + b]], self.val_y[chosen[i:i + b]]) for i in range(0, size, b)]

    def _test(self) -> dict:
        return evaluate.evaluate(self.net, self.test_x, self.test_y, self.config.batch_size,
                                 batches=self.config.test_size, progress=False)

    def _loss(self, batches) -> float:
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        return evaluate.evaluate(self.net, x, y, self.config.batch_size, progress=False)["loss"]

    def _counts(self, pruned) -> dict:
        g = self.graph
        return {"conv_weights": g.conv_weights(pruned), "fc_weights": g.fc_weights(pruned),
                "percent_conv_removed": g.percent_conv_removed(pruned),
                "active_channels": sum(g.active(layer, pruned) for layer in g.producers)}

    # ---- Algorithm 1 ----

    def decide(self, step: int, pruned: set) -> dict:
        """Choose the group to prune at `step`: the least salient by the metric, or the oracle's pick."""
        c = self.config
        names = [c.metric] if c.metric else list(c.oracle)
        batches = self._batches(step, 0, c.eval_size)
        rankings = metrics.rank(names, self.net, self.graph, batches, pruned, reading=c.reading)
        if c.metric:
            return {"group": rankings[c.metric][0], "proposers": [[c.metric, 0]]}
        proposals = oracle.shortlist(rankings, c.k)
        oracle_batches = self._batches(step, 1, c.oracle_eval_size)
        sensitivity = oracle.sensitivities([p.group for p in proposals], self.masker,
                                           lambda: self._loss(oracle_batches))
        group = oracle.choose(sensitivity)
        proposers = next(p.proposers for p in proposals if p.group == group)
        return {"group": group, "proposers": [list(p) for p in proposers],
                "sensitivities": {str(g): s for g, s in sensitivity.items()}}

    def run(self) -> list:
        """Prune until the stop criterion; returns all step records (resumed or new)."""
        c = self.config
        if not self.steps:
            self._append({"step": 0, "group": None, "test": self._test(), **self._counts(set()), "seconds": 0.0})
        initial = 100 * self.steps[0]["test"]["top1"]
        pruned = {s["group"] for s in self.steps[1:]}
        bar = tqdm(total=len(self.graph.groups), initial=len(pruned), unit="group",
                   desc=f"prune {Path(c.net).name}", disable=not self.progress)
        while not self._finished(initial):
            step = len(self.steps)
            start = time.perf_counter()
            if not self.graph.prunable(pruned):
                break
            choice = self.decide(step, pruned)
            self.masker.commit(choice["group"])
            pruned.add(choice["group"])
            group = self.graph.groups[choice["group"]]
            record = {"step": step, **choice, "layers": list(group.layers),
                      "channels": [[u.layer, u.index] for u in group.channels], **self._counts(pruned)}
            if step % c.test_interval == 0:
                record["test"] = self._test()
            record["seconds"] = round(time.perf_counter() - start, 4)
            self._append(record)
            bar.update(1)
            top1 = record.get("test", {}).get("top1")
            bar.set_postfix(removed=f"{record['percent_conv_removed']:.1f}%",
                            active=record["active_channels"], top1="-" if top1 is None else f"{100 * top1:.1f}")
        bar.close()
        return self.steps

    def _finished(self, initial: float) -> bool:
        c, last = self.config, self.steps[-1]
        if c.max_steps is not None and len(self.steps) > c.max_steps:
            return True
        if "test" not in last or last["group"] is None:
            return False
        top1 = 100 * last["test"]["top1"]
        return top1 < initial - c.max_drop or (c.floor is not None and top1 < c.floor)


def removed_at_drop(steps: list, max_drop: float = 5.0) -> float:
    """% of conv weights removed at the last measured step within `max_drop` points of the start
    (papers/004 Table 2's figure)."""
    initial = 100 * steps[0]["test"]["top1"]
    best = 0.0
    for step in steps[1:]:
        if "test" in step:
            if 100 * step["test"]["top1"] < initial - max_drop:
                break
            best = step["percent_conv_removed"]
    return best


"""A training run directory and Caffe's solver stepping through it (see caffe_prune.train for the
directory's files): snapshots moved into place atomically, the curve appended, resume continuing the
data where it stopped, Ctrl-C writing a snapshot, held-zero regions applied at every step."""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from caffe_prune import fsio, layers, netdef, phases, pycaffe
from caffe_prune.download import digest
from caffe_prune.layers import DATA_TYPES, LOSS_TYPES
from caffe_prune.train.heldzero import HeldZero
from caffe_prune.train.plots import plot_curve, title
from caffe_prune.train.recipe import Interrupted, Recipe, TrainError, copied

ASKED, RESULT, CURVE, CURVE_PNG = "train.json", "result.json", "curve.jsonl", "curve.png"
WRITING = ".writing"      # snapshots/.writing/: where Caffe writes a snapshot before it is moved into place


def _iteration(state: Path) -> int:
    number = state.stem.rsplit("_iter_", 1)[-1]
    return int(number) if number.isdigit() else -1


def latest_solverstate(out_dir) -> Path | None:
    """The newest complete snapshot (a solverstate whose caffemodel is beside it) in out_dir/snapshots."""
    states = [p for p in Path(out_dir).glob("snapshots/*.solverstate") if p.with_suffix(".caffemodel").is_file()]
    return max(states, key=_iteration) if states else None


def _loss_blobs(net_param) -> list:
    """(top, loss weight) of the TRAIN net's losses, as Caffe sums them into the displayed loss."""
    out = []
    for layer in phases.layers_in_phase(net_param, "train"):
        if layer.type in LOSS_TYPES or (layer.loss_weight and layer.loss_weight[0]):
            weight = layer.loss_weight[0] if layer.loss_weight else 1.0
            if weight and layer.top:
                out.append((layer.top[0], float(weight)))
    return out


def _top1_blob(net_param) -> str | None:
    """The TEST net's top-1 Accuracy output (the first Accuracy layer with top_k 1)."""
    for layer in phases.layers_in_phase(net_param, "test"):
        if layers.role(layer.type) == "accuracy" and layer.accuracy_param.top_k == 1 and layer.top:
            return layer.top[0]
    return None


def test_scores(solver, batches: int, top1: str | None) -> dict:
    """Every output of the solver's test net averaged over ``batches`` forwards (Solver::Test's
    arithmetic), and "top1". Caffe's own Solver::Test shares the trained weights into the test net
    first; calling the test net directly must do the same (Net::ShareTrainedLayersWith)."""
    net = solver.test_nets[0]
    net.share_with(solver.net)
    sums = {}
    for _ in range(max(1, batches)):
        for name, value in net.forward().items():
            sums[name] = sums.get(name, 0.0) + float(np.asarray(value).mean())
    scores = {name: total / max(1, batches) for name, total in sums.items()}
    return {"top1": scores.get(top1) if top1 else None, "outputs": scores}


def test_accuracy(solver, images: int, batch_size: int) -> float:
    """Mean of the test net's top-1 "accuracy" over ceil(images / batch) batches."""
    return test_scores(solver, max(1, math.ceil(images / batch_size)), "accuracy")["top1"]


def _advance(net, net_param, phase: str, batches: int) -> None:
    """Run a net's data layers alone for ``batches`` forwards: the records (and the mirror coins) an
    uninterrupted run would have consumed (see the module docstring: the deliberate deviation)."""
    if batches <= 0:
        return
    names = list(net._layer_names)
    data = {l.name for l in phases.layers_in_phase(net_param, phase) if l.type in DATA_TYPES and not layers.is_fed(l)}
    for index in [i for i, n in enumerate(names) if n in data]:
        for _ in range(batches):
            net._forward(index, index)


def _load_weights(net, weights, where: str) -> list:
    """Copy weights by layer name into ``net`` (Caffe's fine-tuning rule: a layer the caffemodel lacks
    keeps its filler, with a note); ``weights`` is a caffemodel or a caffe.Net. Refuses weights of
    another network (no layer in common, or a blob of another shape) in one line."""
    if hasattr(weights, "params"):          # a caffe.Net (a pruning session's): by name, shapes checked
        common = [n for n in net.params if n in weights.params]
        for name in common:
            for i, (mine, theirs) in enumerate(zip(net.params[name], weights.params[name])):
                if mine.data.shape != theirs.data.shape:
                    raise TrainError(f"{where}: layer {name!r} blob {i} is {mine.data.shape} in the training net "
                                     f"and {theirs.data.shape} in the net it starts from")
                mine.data[...] = theirs.data
    else:
        param = pycaffe.read_caffemodel(weights, shapes=True)
        have = {l.name for l in list(param.layer) + list(param.layers) if l.blobs}
        common = [n for n in net.params if n in have]
        if not common:
            raise TrainError(f"{os.fsdecode(weights)} holds no weights for any layer of {where} "
                             f"({', '.join(list(net.params)[:4])} ...): a caffemodel of another network?")
        pycaffe.check_weights(types.SimpleNamespace(params={n: net.params[n] for n in common}), param, weights)
        net.copy_from(os.fsdecode(weights))
        pycaffe.check_values(net, weights)
    missing = [n for n in net.params if n not in common]
    if missing:
        warnings.warn(f"{where}: layer(s) {', '.join(missing)} are not in the starting weights and keep their "
                      f"fillers (Caffe's fine-tuning rule)", stacklevel=3)
    return missing


def _restore(solver, state: Path, where: str) -> None:
    """solver.restore from a snapshot of this module: the solverstate's learned_net is pointed at the
    caffemodel beside it (wherever the directory is now), whose blob shapes are checked first."""
    pb2 = pycaffe.caffe_pb2()
    model = state.with_suffix(".caffemodel")
    if not state.is_file() or not model.is_file():
        raise TrainError(f"--resume {state}: no such snapshot (a .solverstate with its .caffemodel beside it)")
    proto = pb2.SolverState()
    try:
        proto.ParseFromString(state.read_bytes())
    except Exception:
        raise TrainError(f"{state} is not a solverstate") from None
    pycaffe.check_weights(solver.net, pycaffe.read_caffemodel(model, shapes=True), model)
    proto.learned_net = str(model.resolve())
    with tempfile.TemporaryDirectory(prefix="caffe-prune-") as tmp:
        path = Path(tmp) / "resume.solverstate"
        path.write_bytes(proto.SerializeToString())
        solver.restore(str(path))


class _Snapshots:
    """Caffe writes a snapshot under snapshots/.writing/; it is moved into snapshots/ (caffemodel first,
    then the solverstate, learned_net rewritten) through caffe_prune.fsio."""

    def __init__(self, out: Path, name: str, held: HeldZero | None, keep: int | None = None):
        self.dir, self.name, self.held, self.keep = out / "snapshots", name, held, keep
        self.writing = self.dir / WRITING

    def prefix(self) -> str:
        return str((self.writing / self.name).resolve())

    def write(self, solver) -> Path:
        if self.held is not None:
            self.held.zero_weights()           # the last update's weights, before they are saved
        self.writing.mkdir(parents=True, exist_ok=True)
        solver.snapshot()
        stem = f"{self.name}_iter_{solver.iter}"
        written_model, written_state = self.writing / f"{stem}.caffemodel", self.writing / f"{stem}.solverstate"
        model, state = self.dir / f"{stem}.caffemodel", self.dir / f"{stem}.solverstate"
        with fsio.replacing(model) as tmp:
            os.replace(written_model, tmp)
        proto = pycaffe.caffe_pb2().SolverState()
        proto.ParseFromString(written_state.read_bytes())
        proto.learned_net = str(model.resolve())
        fsio.write_bytes(state, proto.SerializeToString())
        written_state.unlink()
        if self.keep:
            older = sorted((p for p in self.dir.glob("*.solverstate") if p != state), key=_iteration)
            for old in older[:max(0, len(older) - self.keep + 1)]:
                old.unlink()                               # the solverstate first: its caffemodel is then unused
                old.with_suffix(".caffemodel").unlink(missing_ok=True)
        return state

    def clean(self) -> None:
        """What a killed snapshot left under .writing/."""
        if self.writing.is_dir():
            for stale in self.writing.iterdir():
                stale.unlink()


def _read_curve(path: Path, upto: int | None) -> list:
    lines = [json.loads(line) for line in fsio.complete_lines(path)]
    if upto is not None and any(line["iter"] > upto for line in lines):     # a resume: later lines go
        lines = [line for line in lines if line["iter"] <= upto]
        fsio.write_text(path, "".join(json.dumps(line) + "\n" for line in lines))
    return lines


def train(recipe: Recipe, out_dir, weights=None, max_iter: int | None = None, resume=None,
          held: HeldZero | None = None, mode: str = "auto", device: int = 0, progress: bool = True,
          final=None, snapshot_every: int | None = None, data_offset: int = 0, keep: int | None = None) -> dict:
    """Train ``recipe`` in the run directory ``out_dir`` (see the module docstring); returns what
    result.json holds. ``weights``: a caffemodel (or caffe.Net) to start from; ``resume``: a
    .solverstate, "latest", or "auto" (the newest snapshot when there is one, else a fresh start);
    ``held``: regions held at zero; ``final``: where the final caffemodel goes (default
    OUT/NAME.caffemodel); ``snapshot_every``: replaces the solver's ``snapshot``; ``keep``: how many
    snapshots to keep (default all; older ones are removed once a newer one is in place); ``data_offset``:
    training batches to skip first (a prune-retrain schedule continues the data where the last
    retraining stopped)."""
    cf = pycaffe.caffe()
    mode = pycaffe.set_mode(mode, device)
    pycaffe.set_blas_threads(pycaffe.BLAS_THREADS)     # as a pruning run: the same bits on any machine (caffe_prune.engines)
    out = Path(out_dir)
    with fsio.RunLock(out, "training run"):
        for stale in out.glob(".*.tmp"):
            stale.unlink()
        return _train(cf, mode, recipe, out, weights, max_iter, resume, held, progress, final, snapshot_every,
                      data_offset, keep)


def _train(cf, mode, recipe, out, weights, max_iter, resume, held, progress, final, snapshot_every, data_offset,
           keep):
    started = time.perf_counter()
    solver_param = copied(recipe.solver)
    if max_iter is not None:
        if max_iter < 1:
            raise TrainError(f"--iters must be at least 1, got {max_iter}")
        solver_param.max_iter = max_iter
    snapshots = _Snapshots(out, recipe.name, held, keep)
    snapshots.clean()
    if resume in ("latest", "auto"):
        state = latest_solverstate(out)
        if state is None and resume == "latest":
            raise TrainError(f"--resume: no .solverstate under {out / 'snapshots'}")
        resume = state
    elif resume is not None:
        resume = Path(resume)
        if not resume.is_file():
            raise TrainError(f"--resume {resume}: no such .solverstate")
    elif latest_solverstate(out) is not None:
        raise TrainError(f"{out} holds snapshots of an earlier training: continue it with --resume latest, or use "
                         f"another --out")

    asked = {"test_interval": solver_param.test_interval, "snapshot": solver_param.snapshot,
             "display": solver_param.display, "test_initialization": solver_param.test_initialization}
    every = snapshot_every if snapshot_every is not None else solver_param.snapshot
    test_iter = solver_param.test_iter[0] if solver_param.test_iter else 0
    test_interval = solver_param.test_interval if solver_param.test_interval > 0 else solver_param.max_iter
    display = max(1, solver_param.display or 100)
    net_path = netdef.write_prototxt(recipe.net, out / "train_test.prototxt")
    solver_param.ClearField("net_param")
    solver_param.net = str(net_path.resolve())
    solver_param.snapshot_prefix = snapshots.prefix()
    solver_param.snapshot = 0                                # snapshots are driven from here (_Snapshots)
    solver_param.snapshot_format = solver_param.BINARYPROTO
    solver_param.test_interval = solver_param.max_iter + 1   # and tests (Caffe CHECKs test_interval > 0)
    solver_param.test_initialization = False
    solver_param.solver_mode = solver_param.GPU if mode.startswith("GPU") else solver_param.CPU
    if not solver_param.HasField("random_seed") or solver_param.random_seed < 0:
        solver_param.random_seed = 0                         # the same command trains the same bits
    solver_path = netdef.write_prototxt(solver_param, out / "solver.prototxt")
    for phase in ("train", "test"):
        pycaffe.probe_construct(net_path, phase, recipe.where)   # a Caffe CHECK becomes one line, not an abort

    solver = cf.get_solver(str(solver_path))
    if held is not None:
        held.bind(solver.net, recipe.where)     # refused before anything is trained or recorded
    if resume is not None:
        _restore(solver, resume, recipe.where)
    elif weights is not None:
        _load_weights(solver.net, weights, recipe.where)
    if held is not None:
        held.zero_weights()
    asked_gpu = recipe.solver.HasField("solver_mode") and recipe.solver.solver_mode == recipe.solver.GPU
    if asked_gpu and not mode.startswith("GPU"):
        warnings.warn(f"{recipe.source.get('path', recipe.where)} asks for solver_mode: GPU; training on the CPU "
                      f"({'this pycaffe is CPU_ONLY' if not pycaffe.gpu_built() else 'as asked'})", stacklevel=3)

    previous = _previous_asked(out)
    record = {"source": recipe.source, "weights": _weights_record(weights), "solver_set": recipe.overrides,
              "schedule": asked, "max_iter": solver_param.max_iter, "data": recipe.data,
              "held_zero": held.describe() if held is not None else None, "data_offset": data_offset,
              "mode": mode}
    if resume is not None and previous is not None:
        record = {**previous, "resumed": previous.get("resumed", []) + [{"from": str(resume), "max_iter":
                                                                         solver_param.max_iter}]}
    fsio.write_json(out / ASKED, record)
    losses = [(solver.net.blobs[top], weight) for top, weight in _loss_blobs(recipe.net)]   # looked up once
    window = []

    def on_start():
        if held is not None:
            held.zero_weights()

    def on_gradients_ready():
        if held is not None:
            held.zero_gradients()
        window.append(sum(weight * float(blob.data) for blob, weight in losses))

    solver.add_callback(on_start, on_gradients_ready)
    _advance(solver.net, recipe.net, "train", (data_offset + solver.iter) * max(1, solver_param.iter_size))
    initial_test = bool(solver.test_nets and test_iter and asked["test_initialization"])   # Caffe's test at 0
    if solver.test_nets and test_iter:
        tested = solver.iter // test_interval + (initial_test and solver.iter > 0)
        _advance(solver.test_nets[0], recipe.net, "test", tested * test_iter)
    top1 = _top1_blob(recipe.net)
    curve = _read_curve(out / CURVE, solver.iter if resume is not None else None)
    if resume is None and curve:
        fsio.write_text(out / CURVE, "")
        curve = []
    if initial_test and solver.iter == 0 and not curve:
        scores = test_scores(solver, test_iter, top1)
        curve.append({"iter": 0, "loss": None, "test_top1": scores["top1"], "test": scores["outputs"]})
        fsio.append_line(out / CURVE, json.dumps(curve[-1]))
    bar = tqdm(total=solver_param.max_iter, initial=solver.iter, desc=f"train {recipe.name}", unit="iter",
               disable=not progress)
    last_test = next((l for l in reversed(curve) if "test" in l), None)
    try:
        while solver.iter < solver_param.max_iter:
            now = solver.iter
            stops = [solver_param.max_iter] + [(now // k + 1) * k for k in (display, test_interval, every) if k]
            chunk = min(stops) - now
            window.clear()
            solver.step(chunk)
            bar.update(chunk)
            line = {"iter": solver.iter, "loss": float(np.mean(window)) if window else None}
            if solver.test_nets and test_iter and (solver.iter % test_interval == 0 or
                                                   solver.iter == solver_param.max_iter):
                if held is not None:
                    held.zero_weights()
                scores = test_scores(solver, test_iter, top1)
                line.update(test_top1=scores["top1"], test=scores["outputs"])
                last_test = line
            fsio.append_line(out / CURVE, json.dumps(line))
            curve.append(line)
            if every and solver.iter % every == 0 and solver.iter < solver_param.max_iter:
                snapshots.write(solver)
            shown = last_test.get("test_top1") if last_test else None
            bar.set_postfix(loss=f"{line['loss']:.4f}" if line["loss"] is not None else "-",
                            test_top1="-" if shown is None else f"{shown:.3f}")
    except KeyboardInterrupt:
        bar.close()
        snapshots.write(solver)
        plot_curve(curve, out / CURVE_PNG, title(recipe, out))
        raise Interrupted(f"interrupted at iteration {solver.iter}; snapshot written, continue with "
                         f"--resume latest") from None
    bar.close()
    state = snapshots.write(solver)            # the final state too: a later --iters continues from it
    final = Path(final) if final is not None else out / f"{recipe.name}.caffemodel"
    with fsio.replacing(final) as tmp:
        solver.net.save(str(tmp))
    plot_curve(curve, out / CURVE_PNG, title(recipe, out))
    result = {"network": recipe.name, "iterations": solver.iter, "final_loss": curve[-1]["loss"] if curve else None,
              "test_top1_net": last_test.get("test_top1") if last_test else None,
              "test_net": last_test.get("test") if last_test else None, "weights": str(final),
              "prototxt": str(net_path), "solver": str(solver_path), "solverstate": str(state),
              "curve": str(out / CURVE_PNG), "seconds": round(time.perf_counter() - started, 3), "mode": mode}
    if held is not None:
        stray = held.nonzero(solver.net)
        if stray:     # cannot happen (see HeldZero); said loudly if it ever does
            raise TrainError(f"internal error: {stray} held-zero values are not 0 after training; please report it")
        result["held_zero"] = {"values": held.values, "nonzero_after": stray}
    fsio.write_json(out / RESULT, result)
    return result


def _previous_asked(out: Path) -> dict | None:
    try:
        value = json.loads((out / ASKED).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _weights_record(weights) -> dict | None:
    if weights is None:
        return None
    if hasattr(weights, "params"):
        return {"from": "the pruning session's net (its current parameters)"}
    return {"path": os.fsdecode(weights), "sha256": digest(weights, "sha256")}

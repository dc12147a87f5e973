"""Training with Caffe's own SGD solver, through pycaffe.

The network's train/test prototxt (caffe_prune.networks) reads LMDBs through Caffe's ``Data``
layer, which applies transform_param (scale, mean_value, TRAIN mirroring) itself. The solver's
schedule is the network's (networks.solver); Caffe snapshots every ``snapshot`` iterations, and an
interrupted run (Ctrl-C) snapshots before it stops, so ``--resume`` from the newest
``.solverstate`` loses nothing. Periodic test accuracy is Caffe's Accuracy layer on the solver's
test net (sharing the weights); the final top-1 is measured on every test image by
caffe_prune.evaluate.
"""
from __future__ import annotations

import math
from pathlib import Path

from tqdm import tqdm

from caffe_prune import engine, netdef
from caffe_prune.data import caffe_db


def _with_sources(net_param, train_lmdb, test_lmdb):
    """The train/test net with its Data layers reading the given LMDBs."""
    pb2 = engine.caffe_pb2()
    out = pb2.NetParameter()
    out.CopyFrom(net_param)
    for layer in out.layer:
        if layer.type == "Data":
            phases = {rule.phase for rule in layer.include}
            layer.data_param.source = str(train_lmdb if pb2.TRAIN in phases else test_lmdb)
            layer.data_param.backend = pb2.DataParameter.LMDB
    return out


def latest_solverstate(out_dir) -> Path | None:
    states = sorted(Path(out_dir).glob("snapshots/*.solverstate"),
                    key=lambda p: int(p.stem.rsplit("_iter_", 1)[-1]))
    return states[-1] if states else None


def test_accuracy(solver, images: int, batch_size: int) -> float:
    """Mean of the test net's top-1 Accuracy over ceil(images / batch) batches.

    Caffe's own Solver::Test shares the trained weights into the test net before testing; calling
    the test net directly must do the same (Net::ShareTrainedLayersWith), or it scores its fillers."""
    net = solver.test_nets[0]
    net.share_with(solver.net)
    batches = max(1, math.ceil(images / batch_size))
    return sum(float(net.forward()["accuracy"]) for _ in range(batches)) / batches


def train(name: str, train_lmdb, test_lmdb, out_dir, n_test: int, max_iter: int | None = None,
          resume=None, mode: str = "auto", progress: bool = True) -> dict:
    """Train network `name`; returns paths and the final scores. `resume`: a .solverstate, or
    "latest" for the newest snapshot in out_dir."""
    from caffe_prune import networks
    cf = engine.caffe()
    mode = engine.set_mode(mode)
    out_dir = Path(out_dir)
    (out_dir / "snapshots").mkdir(parents=True, exist_ok=True)
    net_param = _with_sources(networks.train_test(name), train_lmdb, test_lmdb)
    net_path = netdef.write_prototxt(net_param, out_dir / "train_test.prototxt")
    engine.check_net(net_param, "train", net_path)
    caffe_db.check_data_layers(net_param, net_path)   # BGR uint8 LMDBs written by caffe_prune.data

    solver_param = networks.solver(name)
    solver_param.net = str(net_path)
    solver_param.snapshot_prefix = str(out_dir / "snapshots" / name)
    solver_param.solver_mode = solver_param.GPU if mode.startswith("GPU") else solver_param.CPU
    if max_iter is not None:
        if max_iter < 1:
            raise engine.EngineError(f"--iters must be at least 1, got {max_iter}")
        solver_param.max_iter = max_iter
    # Testing is driven from here (progress bar), so Caffe's own periodic test is switched off.
    test_interval = max(1, solver_param.test_interval)
    solver_param.test_interval = solver_param.max_iter + 1
    solver_param.test_initialization = False
    solver_path = netdef.write_prototxt(solver_param, out_dir / "solver.prototxt")
    solver = cf.get_solver(str(solver_path))

    if resume == "latest":
        resume = latest_solverstate(out_dir)
        if resume is None:
            raise engine.EngineError(f"--resume: no .solverstate under {out_dir / 'snapshots'}")
    if resume is not None:
        if not Path(resume).is_file():
            raise engine.EngineError(f"--resume {resume}: no such .solverstate")
        solver.restore(str(resume))

    batch = net_param.layer[0].data_param.batch_size or 128
    display = max(1, min(solver_param.display or 100, test_interval))
    bar = tqdm(total=solver_param.max_iter, initial=solver.iter, desc=f"train {name}",
               unit="iter", disable=not progress)
    accuracy, loss = None, None
    try:
        while solver.iter < solver_param.max_iter:
            chunk = min(display, solver_param.max_iter - solver.iter)
            solver.step(chunk)
            bar.update(chunk)
            loss = float(solver.net.blobs["loss"].data)
            if solver.iter % test_interval < chunk:
                accuracy = test_accuracy(solver, n_test, batch)
            bar.set_postfix(loss=f"{loss:.4f}", test_top1="-" if accuracy is None else f"{accuracy:.3f}")
        accuracy = test_accuracy(solver, n_test, batch)
    except KeyboardInterrupt:
        solver.snapshot()
        bar.close()
        raise engine.EngineError(f"interrupted at iteration {solver.iter}; snapshot written, continue with "
                                 f"--resume latest") from None
    bar.close()
    solver.snapshot()
    weights = out_dir / f"{name}.caffemodel"
    solver.net.save(str(weights))
    return {"network": name, "iterations": solver.iter, "final_loss": loss, "test_top1_net": accuracy,
            "weights": str(weights), "prototxt": str(net_path), "solverstate": str(latest_solverstate(out_dir))}

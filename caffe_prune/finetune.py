"""Fine-tuning a masked pruning run: ``caffe-prune finetune DIR --step N``.

A pruning run directory (caffe_prune.pruning) records, step by step, the group each step removed, by
its id in the channel graph of the run's evaluation form. This module rebuilds that session from
``config.json`` (the same definition, weights and dataset; the definition and weights are checked by
sha256 against the run's identity, so that the ids mean what they meant), commits the groups of steps
1..N (from the run's ``retrained-<s>.caffemodel`` when a prune-retrain schedule left one at or before
N), and trains the network's training form from those weights with the regions of those groups held
at exactly zero throughout (caffe_prune.train.HeldZero). The training form is the run's own network
(a built-in network's train/test definition, or the run's prototxt), or another definition given as
NET (a solver, say) whose layers fit the run's: every masked blob must exist there with the same
shape, else the run directory is refused as one of another network.

Test top-1 is measured before and after, on every image of the run's test split, by
caffe_prune.evaluate. The output is a training run directory (caffe_prune.train; by default
``DIR/finetune-<N>``) whose ``result.json`` adds ``before``, ``after``, the step, its groups and the %
of conv weights removed, and the zeros counted on the fine-tuned blobs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from caffe_prune.layers import effects
from caffe_prune import analysis, fsio, masking, pruning, train
from caffe_prune.download import digest
from caffe_prune.rundir import RunDir
from caffe_prune.session import Network, Session, parse_shape
from caffe_prune.errors import InputError
from caffe_prune.steps import pruned_of


class FinetuneError(InputError):
    """A fine-tuning request that cannot be carried out; the message is one line."""


def read_run(run_dir) -> tuple:
    """(Config, header, steps) of a pruning run directory, read through caffe_prune.rundir."""
    try:
        header, steps = RunDir(run_dir).read()
    except InputError as exc:
        raise FinetuneError(str(exc)) from None
    known = {f.name for f in dataclasses.fields(pruning.Config)}
    config = pruning.Config(**{k: v for k, v in header["config"].items() if k in known})
    # a run's record never lets Caffe run code this process was not told to trust (--allow-python-layers)
    config.allow_python_layers = bool(config.allow_python_layers) and effects.python_layers_allowed()
    return config, header, steps


def session_at(run_dir, step: int | None = None, progress: bool = True) -> dict:
    """The run's session with the groups of steps 1..step committed (default step: the last measured
    step within the run's drop, analysis.step_at_drop): {session, masker, step, steps, config, weights}."""
    run_dir = Path(run_dir)
    config, header, steps = read_run(run_dir)
    last = len(steps) - 1
    if last < 1:
        raise FinetuneError(f"{run_dir} has no pruning step yet (only step 0)")
    if step is None:
        step = analysis.step_at_drop(steps, config.max_drop) or last
    elif step == -1:                  # --step last
        step = last
    if not 1 <= step <= last:
        raise FinetuneError(f"--step {step}: {run_dir} has steps 1..{last}")
    identity = header.get("identity") or {}
    network = Network.open(config.net, parse_shape(config.input_shape), config.fork_layers)
    if pruning.definition_sha256(network.param) != identity.get("definition_sha256"):
        raise FinetuneError(f"{config.net} is not the definition {run_dir} was pruned on (its sha256 differs from "
                            f"the run's): its group ids would mean other channels")
    if not Path(config.weights).is_file() or digest(config.weights, "sha256") != identity.get("weights_sha256"):
        raise FinetuneError(f"{config.weights}, the weights {run_dir} was pruned from, is missing or has other "
                            f"contents (sha256) than the run recorded")
    weights = RunDir(run_dir).retrained_weights(step, steps) or Path(config.weights)
    session = Session.from_config(config, weights=weights, progress=progress)
    masker = masking.Masker(session.graph, [session.net], config.semantics)
    for group in pruned_of(steps[1:step + 1]):
        masker.commit(group)
    return {"session": session, "masker": masker, "step": step, "steps": steps, "config": config,
            "weights": weights}


def finetune(run_dir, step: int | None = None, spec=None, weights=None, iters: int | None = None, solver_set=(),
             data=None, data_out=None, out=None, resume=None, mode: str = "auto", device: int = 0,
             progress: bool = True, channel_order: str | None = None) -> dict:
    """Train the run's network at ``step`` with its pruned groups held at zero; see the module docstring.
    CIFAR-10 is written in the planes the run was measured in (``channel_order``, when given, must be
    those)."""
    run_dir = Path(run_dir)
    state = session_at(run_dir, step, progress)
    session, masker, step, config = state["session"], state["masker"], state["step"], state["config"]
    test = session.dataset.test
    before = session.evaluate(test, progress=False)
    held = train.HeldZero.of(masker, masker.committed, f"the pruning run {run_dir} (steps 1..{step})")
    data = data if data is not None else config.data
    order = session.dataset.channel_order                  # the planes the run was measured in
    if channel_order is not None and channel_order != order:
        measured = f"{order.upper()} planes" if order else "records fed as stored"
        raise InputError(f"--channel-order {channel_order}: the run {run_dir} was measured on {measured}; "
                         f"fine-tuning it on other planes would train it for another input")
    recipe = train.recipe(spec, data, data_out, solver_set, progress, order) if spec is not None else \
        train.recipe_of(session.network, data, data_out, solver_set, progress, order)
    out = Path(out) if out is not None else run_dir / f"finetune-{step}"
    done = train.train(recipe, out, weights=weights or state["weights"], max_iter=iters, resume=resume, held=held,
                       mode=mode, device=device, progress=progress)
    session.net.copy_from(done["weights"])
    after = session.evaluate(test, progress=False)
    record = state["steps"][step]
    result = {**done, "run": str(run_dir), "step": step, "groups": pruned_of(state["steps"][1:step + 1]),
              "percent_conv_removed": record["percent_conv_removed"], "run_test_at_step": record.get("test"),
              "test_images": len(test), "before": before, "after": after,
              "held_zero": {"values": held.values, "nonzero_after": held.nonzero(session.net)}}
    fsio.write_json(out / train.RESULT, result)
    return result

"""caffe-prune from Python: a small, stable API for scripts and notebooks.

Everything a command does, as functions of plain values; every other module is internal and may
change. Names and signatures here stay put (new keyword arguments only, with defaults).

    from caffe_prune import api
    session = api.open_session("LeNet-5", api.published_weights("LeNet-5"))     # CIFAR-10: its data
    for group in api.groups(session)[:3]:
        print(group.id, group.layers, len(group.channels), group.theta_c, group.macs)
    scores = api.saliencies(session, "taylor", batches=2)           # or "plugin:NAME" after load_plugin
    steps = api.prune(api.Config(net="LeNet-5", weights=api.published_weights("LeNet-5"),
                                 metric="taylor", max_steps=5), "runs/taylor")
    run = api.read_run("runs/taylor")
    api.export(session, run.pruned, "models/taylor-5")

- ``open_session``: a network (built-in name, prototxt or caffemodel), its weights and data, built
  in Caffe (caffe_prune.session.Session.open: every keyword it takes);
- ``groups``: the channel groups (caffe_prune.graph: what must be pruned together), each with its
  layers, channels, the input slices that fall with it, Θ_C (weights removed with it) and the MACs
  per image it saves, in a pruning state;
- ``saliencies``: a metric's saliency of every channel and the groups ranked, least salient first
  (a taxonomy name, one of papers/004's five, ``eqN``, ``domino-AGG:...``, or ``plugin:NAME``);
- ``published_weights``: the authors' caffemodel of a built-in network;
- ``load_plugin``: register a plugin metric file (caffe_prune.metrics.plugins) in this process;
- ``prune``: a pruning run (Algorithm 1 with a metric, or the myopic oracle) into a run directory,
  resumed when it holds the same run; ``Config`` is caffe_prune.pruning.Config;
- ``read_run``: a run directory's configuration and step records;
- ``evaluate``: top-1, top-5 and loss of a session's test split (optionally with groups pruned);
- ``export``: the compact network of a pruning state, checked beside the masked one.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from caffe_prune import masking, metrics
from caffe_prune.metrics import plugins
from caffe_prune.pruning import Config, Run
from caffe_prune.steps import pruned_of
from caffe_prune.rundir import RunDir
from caffe_prune.session import Session

__all__ = ["Config", "GroupInfo", "RunRecord", "Saliencies", "evaluate", "export", "groups", "load_plugin",
           "open_session", "prune", "published_weights", "read_run", "saliencies"]


@dataclass(frozen=True)
class GroupInfo:
    """One channel group in a pruning state: ``channels`` and ``consumers`` as (layer, index)."""
    id: int
    layers: tuple
    channels: tuple
    consumers: tuple
    theta_c: int        # conv + InnerProduct weights removed with the group (the Taxonomy paper's Θ_C)
    macs: int           # multiply-accumulates per image its removal saves
    prunable: bool      # False once pruned, or when it is the last of a layer's channels


@dataclass(frozen=True)
class Saliencies:
    """A metric's values in one pruning state: ``channels`` {(layer, index): saliency}, ``ranking``
    [(group id, score)] least salient first (a group scores the minimum of its channels; a Domino
    metric scores every channel with its group's aggregate)."""
    metric: str
    channels: dict
    ranking: list
    images: int


@dataclass(frozen=True)
class RunRecord:
    """A run directory read back: its header's parts and its step records (caffe_prune.steps's
    schema: every step's ``groups``, runs written before it included)."""
    config: dict
    identity: dict
    protocol: dict
    original: dict | None
    steps: list

    @property
    def pruned(self) -> list:
        """The groups pruned, in the order they were removed."""
        return pruned_of(self.steps[1:])


def open_session(net, weights=None, data=None, **options) -> Session:
    """A network with its weights and data, built in Caffe (Session.open's keywords: transform,
    input_shape, logits, batch_size, mode, val_split, form, ...)."""
    return Session.open(net, weights, data, **options)


def published_weights(net: str) -> str:
    """The authors' caffemodel of a built-in network (LeNet-5, CIFAR10, NIN, ResNet-20), checked by
    sha256 ($CAFFE_PRUNE_MODELS's mirror, or downloaded once into the cache)."""
    from caffe_prune import published_weights
    return str(published_weights.caffemodel(net))


def load_plugin(path) -> plugins.Plugin | None:
    """Register the plugin metric in ``path`` (it is then ``plugin:NAME`` everywhere) and its layer
    rules (``LAYER_RULES``); None for a file of layer rules only."""
    return plugins.load(path)


def groups(session: Session, pruned=()) -> list:
    """Every channel group, with Θ_C and the MACs its removal saves in pruning state ``pruned``."""
    g, pruned = session.graph, set(pruned)
    can = set(g.prunable(pruned))
    out = []
    for group in g.groups:
        saved = g.saved(group.id, pruned) if group.id not in pruned else None
        out.append(GroupInfo(group.id, tuple(group.layers), tuple((c.layer, c.index) for c in group.channels),
                             tuple((s.layer, s.input_channel) for s in group.consumers),
                             0 if saved is None else saved.conv_weights + saved.fc_weights,
                             0 if saved is None else saved.macs, group.id in can))
    return out


@contextmanager
def _masked(session: Session, pruned, semantics: str):
    """The session's net with the groups ``pruned`` masked, restored afterwards."""
    masker = masking.Masker(session.graph, [session.net], semantics)
    for group_id in sorted(set(pruned)):
        masker.mask(group_id)
    try:
        yield
    finally:
        masker.restore_all()


def saliencies(session: Session, metric: str, batches: int = 2, seed: int = 0, pruned=(),
               reading: str = "authors", semantics: str = "zero-downstream") -> Saliencies:
    """``metric`` on ``batches`` validation batches (the session's batch size, drawn without
    replacement with default_rng(seed)), with the groups ``pruned`` masked."""
    metrics.parse(metric)
    drawn = session.dataset.validation.draw(batches, session.batch_size, seed)
    with _masked(session, pruned, semantics):
        tensors = metrics.collect(session.net, session.graph, drawn, [metric], reading)
    scores = metrics.saliency(metric, tensors, session.graph, set(pruned))
    return Saliencies(metric, {(c.layer, c.index): v for c, v in scores.items()},
                      metrics.rank_groups(metric, tensors, session.graph, set(pruned)), tensors.images)


def evaluate(session: Session, pruned=(), batches: int | None = None, semantics: str = "zero-downstream") -> dict:
    """Top-1, top-5 (fractions) and loss on the session's test split, groups ``pruned`` masked."""
    with _masked(session, pruned, semantics):
        return session.evaluate(session.dataset.test, batches=batches)


def prune(config: Config, out, force: bool = False, progress: bool = True) -> list:
    """Run (or resume) Algorithm 1 into run directory ``out``; the step records."""
    return Run(config, out, force=force, progress=progress).run()


def read_run(out) -> RunRecord:
    """A run directory's configuration, identity, protocol, original costs and steps."""
    header, steps = RunDir(Path(out)).read()
    return RunRecord(header.get("config", {}), header.get("identity", {}), header.get("protocol", {}),
                     header.get("original"), steps)


def export(session: Session, pruned, out_dir, semantics: str = "zero-downstream", images: int = 16,
           timing: dict | None = None) -> dict:
    """The compact network with the groups ``pruned`` removed, written to ``out_dir`` (prototxt and
    caffemodel) after it is checked beside the masked net; its costs (and latency, with ``timing``
    {"batch_sizes", "repeats", "threads"}). ``session`` opened with ``form="structure"``, or a
    session of the same network and weights (reopened in that form here)."""
    from caffe_prune.export import export_session
    structure = session if session.form == "structure" else Session(
        session.network, session.weights, session.dataset, session.batch_size, input_shape=session.input_shape,
        form="structure")
    return export_session(structure, set(pruned), out_dir, semantics, images, 0, timing)

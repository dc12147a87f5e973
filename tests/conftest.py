"""Shared fixtures: the engine's pycaffe, and a tiny net written from prototxt text.

The local mirrors (../shared beside the checkout: the CIFAR-10 subset, the published weights, the
papers' figures) are read where a test uses them, never at import: without them the suite still
collects, and every test that names them (directly, through a module constant made from them, or
through its fixtures) is skipped with the reason."""
import json
import os
import types
from functools import lru_cache
from pathlib import Path

import pytest

from caffe_prune import layers, phases, pycaffe

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAFFE_PRUNE_TEST_SHARED", REPO.parent / "shared"))
PUBLISHED = SHARED / "models" / "published"
SUBSET = SHARED / "data" / "cifar10-subset"
MIRROR_NAMES = ("SHARED", "PUBLISHED", "SUBSET", "TABLE1")
MISSING = None if SUBSET.is_dir() and PUBLISHED.is_dir() else \
    f"needs the local mirrors {SUBSET} and {PUBLISHED} (CAFFE_PRUNE_DATA, CAFFE_PRUNE_MODELS), absent here"
# the local mirrors the Makefile and .ci/run point the library at (set here too for a bare pytest)
if MISSING is None:
    os.environ.setdefault("CAFFE_PRUNE_DATA", str(SUBSET))
    os.environ.setdefault("CAFFE_PRUNE_MODELS", str(PUBLISHED))


class _Table1(dict):
    """papers/004 Table 1, as transcribed in ../shared/reference/published.json, read on first use."""

    def __missing__(self, name):
        self.update(json.loads((SHARED / "reference" / "published.json").read_text())["table1_trained_networks"])
        return dict.__getitem__(self, name)


TABLE1 = _Table1()


def _names(code) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


@lru_cache(maxsize=None)
def _mirror_globals(module) -> frozenset:
    """The module's globals that are the mirrors or made from them (paths under SHARED, texts naming it)."""
    shared = str(SHARED)
    return frozenset(name for name, value in vars(module).items()
                     if name in MIRROR_NAMES or (isinstance(value, (str, Path)) and shared in str(value)))


def _needs_mirror(item) -> bool:
    module = item.module
    mirror = _mirror_globals(module)
    functions = [item.function] + [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs
                                   if getattr(d.func, "__module__", None) == module.__name__]
    return any(_names(f.__code__) & mirror for f in functions if hasattr(f, "__code__"))


# `make test` runs the tests on two processes (pytest-xdist, --dist loadgroup): each test goes to
# whichever process is free, except in the files whose module fixtures are costly (a Ray cluster,
# sweeps run once, converted data, a pruned net, the Caffe source tree): those mark themselves
# `xdist_group` and stay on one process. The longest files come first (--durations, 2 cores), so
# that the short tests at the end even out the two processes. Only the order changes.
LONGEST_FIRST = ("test_engines.py", "test_export.py", "test_pruning.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if MISSING is not None:
        for item in items:
            if isinstance(item, pytest.Function) and _needs_mirror(item):
                item.add_marker(pytest.mark.skip(reason=MISSING))


@pytest.fixture(scope="session")
def caffe():
    cf = pycaffe.caffe()
    pycaffe.set_mode("cpu")
    return cf


@pytest.fixture
def write_net(tmp_path):
    """Write prototxt text to a file and return its path."""
    def write(text, name="net.prototxt"):
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


def evaluation_form(net_param, batch_size=128, input_shape=(3, 32, 32), classes=10):
    """The evaluation form of a CIFAR-10 net (caffe_prune.netdef), as caffe_prune.session builds it."""
    from caffe_prune import netdef
    return netdef.evaluation_form(net_param, input_shape, batch_size, netdef.choose_head(net_param), classes)


def evaluation(net, weights, batches=None, data=SUBSET, **kw):
    """`caffe-prune evaluate NET WEIGHTS --data DATA` as a call: the scores."""
    import argparse
    from caffe_prune.commands.network import run_evaluation
    args = argparse.Namespace(net=str(net), weights=str(weights), data=None if data is None else str(data),
                              batches=batches, input_shape=None,
                              logits=None, data_root="", scale=None, mean_value=None, mean_file=None, crop_size=None)
    for key, value in kw.items():
        setattr(args, key, value)
    return run_evaluation(args, progress=False)[0]


def conv_weight_count(net_param, channels: int = 3) -> int:
    """Convolution weights of a NetParameter, by shape arithmetic (no net is built): an independent
    count to hold the channel graph's against (it was caffe_prune.networks.conv_weight_count).

    Counted: for every Convolution layer (1x1 cccp, squeeze/expand and projection convolutions
    included), its weight blob num_output x (input channels / group) x kernel_h x kernel_w, which is
    papers/004 Table 1's "conv params" (e.g. LeNet-5 26.5K). Not counted: convolution biases,
    InnerProduct weights, BatchNorm and Scale blobs. Input channels follow the blobs from the data
    layer (`channels` for a Data layer, the shape of an Input layer) through Concat (sum) and the
    layers that keep channels (ReLU, Pooling, BatchNorm, ...)."""
    width = {top: None for top in net_param.input}
    total = 0
    for layer in phases.layers_in_phase(net_param, "test"):
        bottoms = [width.get(b) for b in layer.bottom]
        if layer.type == "Input":
            out = [shape.dim[1] if len(shape.dim) > 1 else None for shape in layer.input_param.shape]
        elif layer.type in ("Data", "ImageData"):
            out = [channels, None]
        elif layer.type == "Convolution":
            cp = layer.convolution_param
            if bottoms[0] is None or bottoms[0] % cp.group:
                raise ValueError(f"layer {layer.name!r}: cannot tell its input channels "
                                         f"({bottoms[0]}) or they do not divide into {cp.group} groups")
            kernel_h = cp.kernel_h or cp.kernel_size[0]
            kernel_w = cp.kernel_w or cp.kernel_size[-1]
            total += cp.num_output * (bottoms[0] // cp.group) * kernel_h * kernel_w
            out = [cp.num_output]
        elif layer.type == "InnerProduct":
            out = [layer.inner_product_param.num_output]
        elif layer.type == "Concat" and layer.concat_param.axis == 1 and None not in bottoms:
            out = [sum(bottoms)]
        elif layers.rule(layer.type).kind in ("pass", "eltwise") or layer.type == "Softmax":
            out = bottoms[:1] * len(layer.top)
        else:   # Flatten, Reshape, losses: channels no longer mean feature maps
            out = [None] * len(layer.top)
        width.update(zip(layer.top, out))
    return total

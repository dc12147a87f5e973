"""Plugin metrics (caffe_prune.metrics.plugins): a plugin that re-implements a built-in composition
gives the built-in's saliencies bit for bit and the same pruning decisions, alone, with Domino and
as an oracle constituent; a changed plugin is refused on resume; every bad plugin is one line."""
import json
import textwrap

import numpy as np
import pytest

from caffe_prune import cli, metrics, pruning
from caffe_prune.errors import InputError, PluginError
from caffe_prune.metrics import plugins
from caffe_prune.session import Session
from conftest import PUBLISHED, REPO, SUBSET

LENET = PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel"
RESNET = PUBLISHED / "ResNet-20-CIFAR10" / "original.caffemodel"
WEIGHTS = {"LeNet-5": LENET, "ResNet-20": RESNET}

# weights/x/sqr_sum/none and taylor (= activation/taylor/l1/count), written as a researcher would
SQR_SUM = """
import numpy as np
NAME = "sqr_sum_weights"
INPUT = "weights"
NEEDS = "x"
def reduce(x, g, h, axes):
    return np.square(x.sum(axis=axes))
"""
TAYLOR = """
import numpy as np
NAME = "my_taylor"
INPUT = "activation"
NEEDS = "xg"
SCALING = "count"
def reduce(x, g, h, axes):
    return np.abs(-x * g).sum(axis=axes)
"""
# the same pairs the built-ins make: (plugin metric, built-in metric)
PAIRS = [("plugin:sqr_sum_weights", "weights/x/sqr_sum/none"),
         ("plugin:my_taylor", "taylor"),
         ("plugin:my_taylor/weights_removed", "activation/taylor/l1/weights_removed"),
         ("domino-sum:plugin:sqr_sum_weights", "domino-sum:weights/x/sqr_sum/none"),
         ("domino-max:plugin:my_taylor", "domino-max:taylor")]


@pytest.fixture
def fresh_registry(monkeypatch):
    """This process's plugins as a new command's: none loaded (the CLI loads them per command)."""
    monkeypatch.setattr(plugins, "_LOADED", {})


@pytest.fixture(scope="module")
def plugin_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugins")
    paths = {}
    for name, text in (("sqr_sum.py", SQR_SUM), ("taylor.py", TAYLOR)):
        (folder / name).write_text(textwrap.dedent(text))
        paths[name] = folder / name
        plugins.load(folder / name)
    return paths


@pytest.mark.parametrize("net", ["LeNet-5", "ResNet-20"])
def test_a_plugin_reimplementing_a_builtin_gives_its_saliencies(caffe, plugin_files, net):
    """Every channel's saliency (Domino on weights: the consumers' input slices too) equals the
    built-in's exactly, in the unpruned state and after groups are pruned."""
    session = Session.open(net, WEIGHTS[net], SUBSET, progress=False)
    batches = session.dataset.validation.draw(1, 64, seed=3)
    names = [n for pair in PAIRS for n in pair]
    tensors = metrics.collect(session.net, session.graph, batches, names)
    for pruned in (set(), {0, 3, len(session.graph.groups) - 2}):
        for plugin_metric, builtin in PAIRS:
            mine = metrics.saliency(plugin_metric, tensors, session.graph, pruned)
            theirs = metrics.saliency(builtin, tensors, session.graph, pruned)
            assert mine.keys() == theirs.keys() and len(mine) > 0
            assert all(mine[c] == theirs[c] or (np.isnan(mine[c]) and np.isnan(theirs[c])) for c in mine), plugin_metric


def _decisions(steps):
    return [(s["groups"], s.get("sensitivities"), s["test"]["top1"]) for s in steps]


@pytest.mark.parametrize("net, steps", [("LeNet-5", 4), ("ResNet-20", 2)])
def test_same_decisions_alone_and_as_an_oracle_constituent(caffe, plugin_files, tmp_path, net, steps):
    base = dict(net=net, weights=str(WEIGHTS[net]), test_size=2, eval_size=1, oracle_eval_size=1,
                batch_size=64, max_steps=steps, seed=4, data=str(SUBSET))
    for mine, theirs in (dict(metric="plugin:my_taylor"), dict(metric="taylor")), \
            (dict(metric=None, oracle=["plugin:sqr_sum_weights", "plugin:my_taylor"], k=4),
             dict(metric=None, oracle=["weights/x/sqr_sum/none", "taylor"], k=4)):
        a = pruning.Run(pruning.Config(**base, **mine), tmp_path / "a", progress=False, force=True).run()
        b = pruning.Run(pruning.Config(**base, **theirs), tmp_path / "b", progress=False, force=True).run()
        assert len(a) == steps + 1 and _decisions(a) == _decisions(b)
    header = json.loads((tmp_path / "a" / "config.json").read_text())
    assert header["config"]["plugins"] == {n: str(plugin_files[f].resolve())
                                           for n, f in (("sqr_sum_weights", "sqr_sum.py"), ("my_taylor", "taylor.py"))}
    assert header["identity"]["plugins"] == {n: plugins.get(n).sha256 for n in ("my_taylor", "sqr_sum_weights")}


def test_a_changed_plugin_is_refused_on_resume(caffe, tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(textwrap.dedent(TAYLOR).replace("my_taylor", "changing"))
    config = dict(net="LeNet-5", weights=str(LENET), metric="plugin:changing", test_size=2, eval_size=1,
                  batch_size=64, data=str(SUBSET))
    plugins.load(path)
    pruning.Run(pruning.Config(**config, max_steps=1), tmp_path / "run", progress=False).run()
    steps = pruning.Run(pruning.Config(**config, max_steps=2), tmp_path / "run", progress=False).run()
    assert len(steps) == 3                                    # the same plugin: resumed
    path.write_text(path.read_text() + "# a comment changes the source\n")
    with pytest.raises(InputError, match=r"different configuration \(plugins contents\)"):
        pruning.Run(pruning.Config(**config, max_steps=3, plugins={"changing": str(path)}), tmp_path / "run",
                    progress=False)


BAD = {
    "raises": ("def reduce(x, g, h, axes):\n    raise RuntimeError('boom')\n",
               "plugin raises ({path}): reduce raised RuntimeError: boom on conv1 (feature maps)"),
    "shape": ("def reduce(x, g, h, axes):\n    return x.sum(axis=(1, 2, 3))\n",
              "plugin shape ({path}): reduce returned shape (64,) on conv1 (feature maps); expected (64, 20), "
              "one value per sample and item (x (64, 20, 28, 28) reduced over axes (2, 3))"),
    "nan": ("import numpy as np\ndef reduce(x, g, h, axes):\n    return np.full(x.shape[:2], np.nan)\n",
            "plugin nan ({path}): reduce returned NaN or infinite values on conv1 (feature maps)"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_plugin_is_one_line_naming_it_and_the_step(caffe, fresh_registry, tmp_path, capsys, kind):
    source, message = BAD[kind]
    path = tmp_path / f"{kind}.py"
    path.write_text(f"INPUT = 'activation'\nNEEDS = 'x'\n{source}")
    code = cli.main(["prune", "LeNet-5", str(LENET), "--plugin", str(path), "--metric", f"plugin:{kind}",
                     "--test-size", "1", "--eval-size", "1", "--batch-size", "64", "--data", str(SUBSET),
                     "--quiet", "--out", str(tmp_path / "run"), "--workers", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err == "caffe-prune: error: step 1: " + message.format(path=path.resolve())


@pytest.mark.parametrize("text, argv, message", [
    (None, ["--plugin", "missing.py"], "plugin missing.py: no such file; --plugin takes a Python file"),
    ("import nonexistent_module\n", [], "importing it raised ModuleNotFoundError: No module named 'nonexistent_module'"),
    ("INPUT = 'activation'\nNEEDS = 'x'\n", [], "defines no function reduce(x, g, h, axes)"),
    ("INPUT = 'activation'\nNEEDS = 'xq'\ndef reduce(x, g, h, axes): pass\n", [], "NEEDS must be a string of x, g"),
    ("INPUT = 'pixels'\nNEEDS = 'x'\ndef reduce(x, g, h, axes): pass\n", [],
     "INPUT must be one of activation, weights, got 'pixels'"),
    ("INPUT = 'weights'\nNEEDS = 'x'\nSCALING = 'max'\ndef reduce(x, g, h, axes): pass\n", [],
     "SCALING must be one of none, count"),
    (None, [], "plugin:bad: no plugin of that name is loaded"),
])
def test_plugins_that_cannot_load_are_one_line(caffe, fresh_registry, tmp_path, capsys, text, argv, message):
    extra = list(argv)
    if text is not None:
        (tmp_path / "bad.py").write_text(text)
        extra = ["--plugin", str(tmp_path / "bad.py")]
    code = cli.main(["prune", "LeNet-5", str(LENET), "--metric", "plugin:bad", "--out", str(tmp_path / "run"),
                     "--data", str(SUBSET), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and message in err, err
    assert not (tmp_path / "run" / "steps.jsonl").exists()


def test_two_files_under_one_name_are_refused(fresh_registry, tmp_path):
    for i in (1, 2):
        (tmp_path / f"v{i}.py").write_text(f"NAME = 'twice'\nINPUT = 'weights'\nNEEDS = 'x'\n"
                                           f"def reduce(x, g, h, axes):\n    return x.sum(axis=axes) * {i}\n")
    plugins.load(tmp_path / "v1.py")
    with pytest.raises(PluginError, match="plugin twice: loaded from .*v1.py and from .*v2.py with other contents"):
        plugins.load(tmp_path / "v2.py")


def test_the_example_entropy_plugin_by_hand(caffe):
    """examples/plugins/entropy.py: the entropy of each channel's pooled activations equals one
    computed here from the feature maps Caffe's forward leaves in the blob."""
    entropy = plugins.load(REPO / "examples" / "plugins" / "entropy.py")
    session = Session.open("LeNet-5", LENET, SUBSET, progress=False)
    (x, y), = session.dataset.validation.draw(1, 128, seed=0)
    tensors = metrics.collect(session.net, session.graph, [(x, y)], ["plugin:entropy"])
    scores = metrics.saliency("plugin:entropy", tensors, session.graph)
    pooled = session.net.blobs[session.net.top_names["conv2"][0]].data.astype(np.float64).mean(axis=(2, 3))
    for c in (0, 7, 49):
        counts, _ = np.histogram(pooled[:, c], bins=entropy_bins())
        p = counts[counts > 0] / 128
        expected = float(-(p * np.log(p)).sum())
        got = next(v for ch, v in scores.items() if ch.layer == "conv2" and ch.index == c)
        assert got == pytest.approx(expected, rel=1e-12) and 0 < got <= np.log(32)
    assert entropy.name == "entropy" and entropy.needs == frozenset("x")


def entropy_bins():
    import importlib.util
    spec = importlib.util.spec_from_file_location("entropy_example", REPO / "examples" / "plugins" / "entropy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BINS

"""Opening a downloaded prototxt runs no code and writes no file (caffe_prune.layers.effects).

A Python layer names a module Caffe imports when it builds the net: here a module in the test's
directory that, imported, writes a marker file and prints. Without --allow-python-layers every
command that opens a network refuses it in one line naming the layer and the opt-in, and the
marker never appears; with it, the marker does (the detector works). An HDF5Output layer creates
(truncating) its file_name when built: graph, init, evaluate and export leave that file's bytes as
they were. Every case runs in a temporary directory."""
import dataclasses
import json

import numpy as np
import pytest

from caffe_prune import pycaffe
from caffe_prune.data.synthetic import write_random_lmdb
from caffe_prune.layers import effects
from caffe_prune.pruning import Config
from caffe_prune.sweep.spec import run_id
from test_bad_inputs import PROGRESS, run_cli

HEAD = """name: "downloaded"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
"""
TAIL = """layer { name: "ip" type: "InnerProduct" bottom: "tap" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""
PYTHON = HEAD + """layer { name: "tap" type: "Python" bottom: "conv" top: "tap"
  python_param { module: "marker_layer" layer: "Identity" } }
""" + TAIL
PLAIN = PYTHON.replace('type: "Python"', 'type: "ReLU"').replace(
    'python_param { module: "marker_layer" layer: "Identity" }', "")
HDF5 = PLAIN + """layer { name: "dump" type: "HDF5Output" bottom: "ip" bottom: "prob"
  hdf5_output_param { file_name: "victim.h5" } }
"""
# imported, it leaves a marker and talks; as a layer it passes its bottom through
MARKER = '''
import pathlib, os
pathlib.Path(os.environ.get("MARKER_DIR", "."), "imported").write_text("marker_layer ran")
print("MARKER LAYER WAS IMPORTED")
import caffe


class Identity(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = top[0].diff
'''


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note: ")
             and not PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("caffe-prune: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def downloaded(caffe, tmp_path, monkeypatch):
    """The test directory: the Python-layer prototxt, its module (importable: on sys.path), weights
    of the same net without the Python layer's code (its ReLU twin has the same parameters), a
    caffemodel embedding the Python-layer definition, and a 3x8x8 LMDB with labels 0..2."""
    (tmp_path / "marker_layer.py").write_text(MARKER)
    (tmp_path / "py.prototxt").write_text(PYTHON)
    (tmp_path / "plain.prototxt").write_text(PLAIN)
    pycaffe.load_net(tmp_path / "plain.prototxt").save(str(tmp_path / "w.caffemodel"))
    embedded = pycaffe.read_caffemodel(tmp_path / "w.caffemodel")
    next(l for l in embedded.layer if l.name == "tap").CopyFrom(
        next(l for l in pycaffe.read_prototxt(tmp_path / "py.prototxt").layer if l.name == "tap"))
    (tmp_path / "py.caffemodel").write_bytes(embedded.SerializeToString())
    write_random_lmdb(tmp_path / "lmdb", 16, (3, 8, 8), classes=3, progress=False)
    monkeypatch.syspath_prepend(str(tmp_path))          # where Caffe would import the module from
    monkeypatch.setenv("MARKER_DIR", str(tmp_path))
    return tmp_path


COMMANDS = {
    "graph": ["graph", "py.prototxt"],
    "graph of a caffemodel's definition": ["graph", "py.caffemodel"],
    "evaluate": ["evaluate", "py.prototxt", "w.caffemodel", "--data", "lmdb"],
    "init": ["init", "py.prototxt", "--out", "new.caffemodel"],
    "export": ["export", "py.prototxt", "w.caffemodel", "--groups", "0", "--out", "exported", "--no-timing"],
    "profile": ["profile", "py.prototxt", "w.caffemodel", "--repeats", "1"],
    "prune": ["prune", "py.prototxt", "w.caffemodel", "--data", "lmdb", "--metric", "mean_sq_weights",
              "--batch-size", "4", "--max-steps", "1", "--quiet", "--out", "run"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_python_layer_is_refused_before_its_module_is_imported(downloaded, name):
    before = sorted(p.name for p in downloaded.iterdir())
    status, out, err = run_cli(COMMANDS[name], downloaded)
    line = one_error(err)
    assert status == 2
    assert "layer 'tap' is a Python layer: building it would import and run marker_layer.Identity" in line
    assert "--allow-python-layers" in line
    assert not (downloaded / "imported").exists() and "MARKER LAYER" not in out + err
    # nothing written (the prune run directory and its lock are the one exception: it names the refusal's owner)
    assert sorted(p.name for p in downloaded.iterdir() if p.name not in ("run", ".stdout", ".stderr")) == \
        sorted(p for p in before if p not in (".stdout", ".stderr"))


def test_the_zen_of_python_is_not_printed(caffe, tmp_path):
    """The issue's own case: python_param { module: "this" } printed the Zen of Python at `graph`."""
    (tmp_path / "zen.prototxt").write_text(PYTHON.replace('module: "marker_layer" layer: "Identity"',
                                                          'module: "this" layer: "X"'))
    status, out, err = run_cli(["graph", "zen.prototxt"], tmp_path)
    assert status == 2 and "Beautiful is better than ugly" not in out + err
    assert "layer 'tap' is a Python layer: building it would import and run this.X" in one_error(err)


def test_with_the_opt_in_the_module_runs(downloaded):
    """The detector above works: --allow-python-layers lets Caffe import the module (the marker
    appears) and the net is used (its Python layer a barrier of the channel graph)."""
    status, out, err = run_cli(["graph", "py.prototxt", "--allow-python-layers"], downloaded)
    assert status == 0, err
    assert (downloaded / "imported").read_text() == "marker_layer ran"
    assert "tap: Python layer Python:marker_layer.Identity has no channel rule" in out


def test_a_run_records_the_opt_in_and_old_sweep_ids_stay(downloaded):
    status, _, err = run_cli(["prune", "py.prototxt", "w.caffemodel", "--data", "lmdb", "--val-from", "test",
                              "--metric", "mean_sq_weights", "--batch-size", "4", "--max-steps", "1", "--quiet",
                              "--out", "run", "--allow-python-layers"], downloaded)
    assert status == 0, err
    assert json.loads((downloaded / "run" / "config.json").read_text())["config"]["allow_python_layers"] is True
    assert json.loads((downloaded / "run" / "steps.jsonl").read_text().splitlines()[0])["test"]["images"] > 0
    # the same command without the opt-in is refused before the run is opened; its steps stay
    steps = (downloaded / "run" / "steps.jsonl").read_bytes()
    status, _, err = run_cli(["prune", "py.prototxt", "w.caffemodel", "--data", "lmdb", "--val-from", "test",
                              "--metric", "mean_sq_weights", "--batch-size", "4", "--max-steps", "2", "--quiet",
                              "--out", "run"], downloaded)
    assert status == 2 and "--allow-python-layers" in one_error(err)
    assert (downloaded / "run" / "steps.jsonl").read_bytes() == steps
    # a field added later: a run without it keeps the sweep id it had before the field existed
    config = dataclasses.asdict(Config(net="LeNet-5", weights="w.caffemodel", metric="taylor"))
    assert run_id(config, "sha", None) == run_id({k: v for k, v in config.items() if k != "allow_python_layers"},
                                                "sha", None)
    assert run_id({**config, "allow_python_layers": True}, "sha", None) != run_id(config, "sha", None)


def test_a_runs_record_does_not_opt_in_for_finetune(downloaded, monkeypatch):
    """A run directory from elsewhere saying allow_python_layers: true does not make finetune run the
    code: the process must be told (finetune --allow-python-layers)."""
    from caffe_prune import finetune
    header = {"config": {**dataclasses.asdict(Config(net=str(downloaded / "py.prototxt"), weights="w.caffemodel",
                                                     metric="taylor")), "allow_python_layers": True}}
    (downloaded / "run").mkdir()
    (downloaded / "run" / "config.json").write_text(json.dumps(header))
    (downloaded / "run" / "steps.jsonl").write_text(json.dumps({"step": 0, "groups": [], "proposers": [],
                                                               "test": {"top1": 0.5}}) + "\n")
    monkeypatch.setattr(effects, "_python_layers_allowed", False)
    assert finetune.read_run(downloaded / "run")[0].allow_python_layers is False
    monkeypatch.setattr(effects, "_python_layers_allowed", True)
    assert finetune.read_run(downloaded / "run")[0].allow_python_layers is True


@pytest.fixture
def with_hdf5_output(caffe, tmp_path):
    (tmp_path / "h5.prototxt").write_text(HDF5)
    (tmp_path / "plain.prototxt").write_text(PLAIN)
    pycaffe.load_net(tmp_path / "plain.prototxt").save(str(tmp_path / "w.caffemodel"))
    write_random_lmdb(tmp_path / "lmdb", 16, (3, 8, 8), classes=3, progress=False)
    (tmp_path / "victim.h5").write_bytes(b"the user's own results, not to be truncated\n" * 100)
    return tmp_path


@pytest.mark.parametrize("argv", [
    ["graph", "h5.prototxt"],
    ["init", "h5.prototxt", "--out", "new.caffemodel"],
    ["evaluate", "h5.prototxt", "w.caffemodel", "--data", "lmdb"],
    ["export", "h5.prototxt", "w.caffemodel", "--groups", "0", "--out", "exported", "--no-timing"],
], ids=lambda argv: argv[0])
def test_an_hdf5_output_layer_never_writes_its_file(with_hdf5_output, argv):
    victim = with_hdf5_output / "victim.h5"
    before = victim.read_bytes()
    status, out, err = run_cli(argv, with_hdf5_output)
    # export's deployment check (caffe_prune.runtimes) runs the written net in OpenCV, which has no HDF5Output
    assert status == 0 or argv[0] == "export" and "opencv cannot run" in one_error(err), err
    assert victim.read_bytes() == before
    assert sorted(p.name for p in with_hdf5_output.glob("*.h5")) == ["victim.h5"]
    if argv[0] == "graph":   # the channel graph still sees the layer the user's net has
        assert "dump: layer type 'HDF5Output' is not one the channel graph follows" in out
    if argv[0] == "export" and status == 0:  # the definition written is the user's own, HDF5Output included
        written = (with_hdf5_output / "exported").glob("*.prototxt")
        assert any('type: "HDF5Output"' in p.read_text() for p in written)


def test_inert_replaces_writers_and_leaves_the_definition(caffe, tmp_path):
    from google.protobuf import text_format
    param = text_format.Parse(HDF5, pycaffe.caffe_pb2().NetParameter())
    with pytest.warns(UserWarning, match=r"layer 'dump' would create or truncate 'victim.h5'"):
        inert, replaced = effects.inert(param, "h5.prototxt")
    assert replaced == [("dump", "victim.h5")]
    dump = next(l for l in inert.layer if l.name == "dump")
    assert dump.type == "Silence" and list(dump.bottom) == ["ip", "prob"] and not dump.HasField("hdf5_output_param")
    assert next(l for l in param.layer if l.name == "dump").type == "HDF5Output"      # the user's, unchanged
    plain = text_format.Parse(PLAIN, pycaffe.caffe_pb2().NetParameter())
    assert effects.inert(plain, "plain") == (plain, [])
    # the built net computes the same blobs as the net without the layer
    (tmp_path / "h5.prototxt").write_text(HDF5)
    (tmp_path / "plain.prototxt").write_text(PLAIN)
    with pytest.warns(UserWarning):
        a = pycaffe.load_net(tmp_path / "h5.prototxt")
    b = pycaffe.load_net(tmp_path / "plain.prototxt")
    for name in b.params:
        for x, y in zip(a.params[name], b.params[name]):
            x.data[...] = y.data
    x = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    a.blobs["data"].data[...] = x
    b.blobs["data"].data[...] = x
    a.forward()
    b.forward()
    assert np.array_equal(a.blobs["prob"].data, b.blobs["prob"].data)


def test_a_sweep_spec_may_opt_in_and_nothing_else_takes_a_bool():
    from caffe_prune.sweep.spec import SweepError, parse_protocol
    assert parse_protocol({"allow_python_layers": True})["allow_python_layers"] is True
    assert parse_protocol({})["allow_python_layers"] is False
    with pytest.raises(SweepError, match="protocol k must be int, got True"):
        parse_protocol({"k": True})
    with pytest.raises(SweepError, match="protocol allow_python_layers must be bool, got 1"):
        parse_protocol({"allow_python_layers": 1})

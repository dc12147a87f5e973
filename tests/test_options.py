"""The shared options (caffe_prune.commands.options): every default of `prune` is pruning.Config's,
each option lands in the Config field of its name, and a bad value is one line."""
import argparse
import dataclasses

import pytest

from caffe_prune import cli, pruning
from caffe_prune.commands import options
from caffe_prune.metrics.methods import PAPER_FORMS


def prune_args(*extra):
    return cli.build_parser().parse_args(["prune", "LeNet-5", "w.caffemodel", "--out", "r", *extra])


def test_every_prune_default_is_configs():
    args = prune_args("--metric", "taylor")
    config = options.prune_config(args, args.net, args.weights, *options.prune_method(args))
    defaults = pruning.Config(net="LeNet-5", weights="w.caffemodel", metric="taylor")
    assert dataclasses.asdict(config) == dataclasses.asdict(defaults)


def test_options_land_in_their_fields():
    args = prune_args("--oracle", "--forms", "code", "--k", "8", "--no-drop-stop", "--floor", "30", "--target",
                      "macs=0.5,params=0.7", "--mean-value", "104", "--mean-value", "117", "--crop-size", "28",
                      "--engine", "naive", "--seed", "3", "--val-split", "authors")
    metric, constituents = options.prune_method(args)
    config = options.prune_config(args, args.net, args.weights, metric, constituents)
    assert metric is None and constituents == list(PAPER_FORMS["code"])
    assert (config.k, config.max_drop, config.floor, config.seed, config.engine, config.val_split) == \
        (8, None, 30.0, 3, "naive", "authors")
    assert config.target == {"macs": 0.5, "params": 0.7}
    assert config.transform == {"mean_value": [104.0, 117.0], "crop_size": 28}
    assert options.oracle_list("taylor,fisher") == ["taylor", "fisher"]
    assert options.oracle_list(None, "table2") == list(PAPER_FORMS["table2"])


@pytest.mark.parametrize("text, message", [("0", "0 must be at least 1"), ("x", "'x' is not a whole number")])
def test_positive(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        options.positive(text)


def test_target_and_mode():
    with pytest.raises(argparse.ArgumentTypeError, match=r"'macs' is not KEY=FRACTION \(e.g. macs=0.5\)"):
        options.target("macs")
    assert options.mode(argparse.Namespace(gpu=1)) == ("gpu", 1)
    assert options.mode(argparse.Namespace(gpu=None, cpu=True)) == ("cpu", 0)
    assert options.mode(argparse.Namespace()) == ("auto", 0)


def test_a_bad_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        prune_args("--metric", "taylor", "--engine", "quick")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'quick'" in err

"""Algorithm 1 runs: the stop rule, determinism, a killed run resumed to the same end, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from caffe_prune import engine, pruning
from conftest import PUBLISHED, REPO, SUBSET

LENET = PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel"
RESNET = PUBLISHED / "ResNet-20-CIFAR10" / "original.caffemodel"


def config(**kw):
    base = dict(net="LeNet-5", weights=str(LENET), metric="mean_activations", test_size=8)
    return pruning.Config(**{**base, **kw})


def steps_of(run_dir):
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]


DECISIONS = ("step", "group", "proposers", "percent_conv_removed", "conv_weights", "test")


def decisions(steps):
    return [{k: s.get(k) for k in DECISIONS} for s in steps]


def test_stop_rule_and_counts(caffe, tmp_path):
    """With max_drop 1 point the run ends at the first step more than 1 point down; every record's
    counts match the graph; removed_at_drop is the last step within the drop."""
    run = pruning.Run(config(max_drop=1.0), tmp_path, data=SUBSET, progress=False)
    steps = run.run()
    initial = 100 * steps[0]["test"]["top1"]
    assert all(100 * s["test"]["top1"] >= initial - 1.0 for s in steps[1:-1])
    assert 100 * steps[-1]["test"]["top1"] < initial - 1.0
    pruned = {s["group"] for s in steps[1:]}
    assert len(pruned) == len(steps) - 1
    assert steps[-1]["conv_weights"] == run.graph.conv_weights(pruned)
    assert pruning.removed_at_drop(steps, 1.0) == steps[-2]["percent_conv_removed"]


def test_removed_at_drop_by_hand():
    steps = [{"test": {"top1": 0.70}, "percent_conv_removed": 0},
             {"test": {"top1": 0.69}, "percent_conv_removed": 5},
             {"percent_conv_removed": 8},                          # not measured
             {"test": {"top1": 0.66}, "percent_conv_removed": 10},
             {"test": {"top1": 0.64}, "percent_conv_removed": 12},
             {"test": {"top1": 0.68}, "percent_conv_removed": 14}]  # after the drop: does not count
    assert pruning.removed_at_drop(steps, 5.0) == 10


def test_killed_run_resumes_to_the_same_end(caffe, tmp_path):
    """A run killed (SIGKILL) mid-way and restarted with the same command ends with exactly the
    decisions and measurements of an uninterrupted run with the same seed."""
    command = [sys.executable, "-m", "caffe_prune", "prune", "LeNet-5", str(LENET), "--oracle",
               "--k", "8", "--test-size", "2", "--max-steps", "14", "--max-drop", "100", "--seed", "3", "--data", str(SUBSET), "--quiet"]
    whole = tmp_path / "whole"
    subprocess.run(command + ["--out", str(whole)], check=True, cwd=REPO, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command + ["--out", str(killed)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (killed / "steps.jsonl").is_file() and len(steps_of(killed)) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 5 <= len(steps_of(killed)) < 15
    subprocess.run(command + ["--out", str(killed)], check=True, cwd=REPO, capture_output=True)
    assert decisions(steps_of(killed)) == decisions(steps_of(whole))
    assert len(steps_of(whole)) == 15


def test_same_seed_same_decisions_other_seed_other_batches(caffe, tmp_path):
    a = pruning.Run(config(max_steps=6, seed=1), tmp_path / "a", data=SUBSET, progress=False).run()
    b = pruning.Run(config(max_steps=6, seed=1), tmp_path / "b", data=SUBSET, progress=False).run()
    assert decisions(a) == decisions(b)
    run = pruning.Run(config(max_steps=6, seed=2), tmp_path / "c", data=SUBSET, progress=False)
    assert [len(x) for x, _ in run._batches(1, 0, 2)] == [128, 128]
    first = run._batches(1, 0, 2)[0][1]
    other = pruning.Run(config(max_steps=6, seed=1), tmp_path / "a", data=SUBSET, progress=False)._batches(1, 0, 2)[0][1]
    assert (first != other).any()


@pytest.mark.parametrize("kw, message", [
    (dict(metric=None, oracle=["taylor"], k=0), "--k must be at least 1"),
    (dict(metric="taylr"), "taylr"),
    (dict(max_drop=-1.0), "--max-drop must be >= 0"),
    (dict(metric=None, oracle=[]), "give exactly one of --metric M or --oracle"),
])
def test_impossible_arguments(caffe, tmp_path, kw, message):
    with pytest.raises(engine.EngineError, match=message):
        pruning.Run(config(**kw), tmp_path, data=SUBSET, progress=False)


def test_weights_of_another_network(caffe, tmp_path):
    with pytest.raises(engine.EngineError, match=r"holds no weights for layer\(s\) conv1, conv2, ip1, ip2 of the prototxt"):
        pruning.Run(config(weights=str(RESNET)), tmp_path, data=SUBSET, progress=False)


def test_out_dir_with_another_run_is_refused_unless_forced(caffe, tmp_path):
    pruning.Run(config(max_steps=2), tmp_path, data=SUBSET, progress=False).run()
    with pytest.raises(engine.EngineError, match=r"holds a run with a different configuration \(max_steps, seed\)"):
        pruning.Run(config(max_steps=3, seed=9), tmp_path, data=SUBSET, progress=False)
    steps = pruning.Run(config(max_steps=3, seed=9), tmp_path, data=SUBSET, force=True, progress=False).run()
    assert len(steps) == 4 and json.loads((tmp_path / "config.json").read_text())["config"]["seed"] == 9

"""caffe_prune.api: the README's example runs as written, and what it prints is checked against
numbers counted by hand, Caffe's own measurement and the run directory."""
import re

import pytest

from caffe_prune import api, pycaffe
from conftest import REPO


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(r"<!-- api example -->\n```python\n(.*?)```", text, re.S)
    assert found, "README.md has no <!-- api example --> Python block"
    return found.group(1)


def test_the_readme_example_runs_as_written(caffe, tmp_path, monkeypatch, capsys):
    (tmp_path / "examples").symlink_to(REPO / "examples")       # the paths it names, from a clone's root
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(readme_example(), "README.md (api example)", "exec"), namespace)
    printed = capsys.readouterr().out
    groups, entropy, run, report = (namespace[k] for k in ("groups", "entropy", "run", "report"))

    # LeNet-5 on 3x32x32: conv1 5x5 -> 20 maps of 28x28, pool -> 14x14, conv2 5x5 -> 50 maps of 10x10.
    # Group 0 is conv1's channel 0: its filter (3·25) and conv2's input slice (50·25) fall with it;
    # MACs: 75 per position of 28x28, and 50·25 per position of conv2's 10x10.
    assert len(groups) == 70 and groups[0].layers == ("conv1",)
    assert groups[0].theta_c == 3 * 25 + 50 * 25 and groups[0].macs == 75 * 28 * 28 + 50 * 25 * 10 * 10
    assert "70 groups; group 0: ('conv1',) 1325 weights 183800 MACs" in printed

    scores = [score for _, score in entropy.ranking]
    assert scores == sorted(scores) and len(entropy.ranking) == 70 and entropy.images == 128
    gid, score = entropy.ranking[0]
    assert score == min(entropy.channels[c] for c in entropy.channels
                        if c in [(ch[0], ch[1]) for ch in groups[gid].channels])

    assert len(run.pruned) == 3 and run.config["plugins"] == {"entropy": str(REPO / "examples/plugins/entropy.py")}
    session = namespace["session"]
    measured = api.evaluate(session, run.pruned, batches=2)       # the run's 2 test batches, masked
    assert measured["top1"] == run.steps[-1]["test"]["top1"]

    compact = pycaffe.read_prototxt(report["prototxt"])
    widths = {layer.name: layer.convolution_param.num_output for layer in compact.layer if layer.type == "Convolution"}
    assert widths["conv1"] + widths["conv2"] == 70 - 3
    assert report["percent_conv_removed"] == pytest.approx(session.graph.percent_conv_removed(set(run.pruned)), abs=1e-3)
    assert report["max_relative_deviation"] < 1e-5


def test_groups_in_a_pruning_state(caffe):
    """Θ_C of a group changes once a neighbour is pruned (conv2's input slice of a pruned conv1
    channel is gone); a pruned group saves nothing and is not prunable."""
    session = api.open_session("LeNet-5", api.published_weights("LeNet-5"), with_data=False)
    before = {g.id: g for g in api.groups(session)}
    after = {g.id: g for g in api.groups(session, pruned={0})}
    assert after[0].theta_c == 0 and not after[0].prunable and before[0].prunable
    conv2 = next(g for g in before.values() if g.layers == ("conv2",))
    assert after[conv2.id].theta_c == conv2.theta_c - 25          # one input channel fewer x 5x5
    assert all(after[g].theta_c == before[g].theta_c for g in before if g not in (0,) and before[g].layers == ("conv1",))

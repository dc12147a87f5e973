"""Schedules and constraints (caffe_prune.schedule, caffe_prune.constraints) on real runs: N groups a
step are the N least salient of the step's one ranking (recomputed here from the same batches), the
oracle measures max(k, N) candidates and takes the least sensitive, a geometric schedule reaches its
budget in S steps, every constraint holds on every step (widths read off the compact export), the
default decides as Algorithm 1, and every bad schedule argument is one line."""
import random

import pytest

from caffe_prune import cli, export, metrics, pruning
from caffe_prune.graph import build_graph
from caffe_prune.steps import pruned_of
from conftest import PUBLISHED, SUBSET

LENET = PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel"
RESNET = PUBLISHED / "ResNet-20-CIFAR10" / "original.caffemodel"
QUICK = dict(test_size=1, eval_size=1, oracle_eval_size=1, batch_size=64, max_drop=None)


def opened(tmp_path, name="r", **kw):
    base = dict(net="LeNet-5", weights=str(LENET), metric="taylor", data=str(SUBSET), **QUICK)
    return pruning.Run(pruning.Config(**{**base, **kw}), tmp_path / name, progress=False)


def run(tmp_path, name="r", **kw):
    r = opened(tmp_path, name, **kw)
    return r, r.run()


def test_the_state_counts_what_the_graph_counts():
    """graph.State grown and shrunk at random equals graph.costs and graph.prunable of the same set."""
    from caffe_prune import networks
    g = build_graph(networks.train_test("ResNet-20"), (3, 32, 32))
    rng = random.Random(0)
    state, pruned = g.state(set()), set()
    for _ in range(120):
        if pruned and rng.random() < 0.3:
            gid = rng.choice(sorted(pruned))
            state.remove(gid)
            pruned.discard(gid)
        else:
            gid = rng.choice(g.prunable(pruned))
            assert state.fits(gid)
            state.add(gid)
            pruned.add(gid)
        assert state.costs() == g.costs(pruned)
        assert {i for i in range(len(g.groups)) if state.fits(i)} == set(g.prunable(pruned))
        assert all(state.active(layer) == g.active(layer, pruned) for layer in g.producers)


def test_n_groups_a_step_are_the_least_salient_of_one_ranking(caffe, tmp_path):
    r, steps = run(tmp_path, per_step="5", max_steps=3)
    assert [len(s["groups"]) for s in steps] == [0, 5, 5, 5]
    assert steps[2]["proposers"] == [[["taylor", i]] for i in range(5)]
    # the ranking of step 2 recomputed from its batches (the run's own draw) in a fresh session
    fresh = opened(tmp_path, "fresh")
    pruned = set(steps[1]["groups"])
    for gid in pruned:
        fresh.masker.commit(gid)
    batches = fresh._batches(2, 0, 1)
    ranking = metrics.rank(["taylor"], fresh.net, fresh.graph, batches, pruned)["taylor"]
    assert steps[2]["groups"] == ranking[:5]
    fresh.close()
    # and the default run's first step is the first group of the same ranking at step 1
    _, one = run(tmp_path, "one", max_steps=1)
    assert one[1]["groups"] == steps[1]["groups"][:1]


def test_the_oracle_measures_max_k_n_and_takes_the_least_sensitive(caffe, tmp_path):
    r, steps = run(tmp_path, metric=None, oracle=["taylor", "mean_sq_weights"], per_step="20", k=8, max_steps=2)
    for i, s in enumerate(steps[1:], 1):
        sens = {int(g): v for g, v in s["sensitivities"].items()}
        assert len(sens) == 20                                        # k = max(8, N)
        # the least sensitive first, each that may still go (a layer keeps its last channel)
        state, expected = r.graph.state(set(pruned_of(steps[1:i]))), []
        for g in sorted(sens, key=lambda g: (sens[g], g)):
            if state.fits(g):
                state.add(g)
                expected.append(g)
        assert s["groups"] == expected and len(expected) >= 19
    _, steps = run(tmp_path, "k", metric=None, oracle=["taylor", "mean_sq_weights"], per_step="3", k=8, max_steps=1)
    assert len(steps[1]["sensitivities"]) == 8 and len(steps[1]["groups"]) == 3


def test_percent_schedules(caffe, tmp_path):
    r, steps = run(tmp_path, net="CIFAR10", weights=str(PUBLISHED / "CIFAR10-CIFAR10" / "original.caffemodel"),
                   per_step="5%", max_steps=2)
    total = sum(len(g.channels) for g in r.graph.groups)               # 128 channels, one per group
    assert total == 128 and [len(s["groups"]) for s in steps[1:]] == [7, 7]   # ceil(6.4)
    r, steps = run(tmp_path, "macs", net="CIFAR10", weights=str(PUBLISHED / "CIFAR10-CIFAR10" / "original.caffemodel"),
                   per_step="10%macs", max_steps=3)
    for before, after in zip(steps, steps[1:]):
        saved = before["macs"] - after["macs"]
        assert saved >= 0.1 * before["macs"]
        last = r.graph.saved(after["groups"][-1], set(pruned_of(steps[1:steps.index(after) + 1])) - {after["groups"][-1]})
        assert saved - last.macs < 0.1 * before["macs"]                 # the last group was the one that met it


def test_a_geometric_schedule_reaches_its_budget_in_s_steps(caffe, tmp_path):
    cifar = str(PUBLISHED / "CIFAR10-CIFAR10" / "original.caffemodel")
    r, steps = run(tmp_path, net="CIFAR10", weights=cifar, in_steps=4, target={"macs": 0.5})
    original = steps[0]["macs"]
    assert len(steps) == 5                                             # steps 1..4, then within budget
    for i, s in enumerate(steps[1:], 1):
        assert s["macs"] <= 0.5 ** (i / 4) * original
        before = set(pruned_of(steps[1:i + 1])) - {s["groups"][-1]}
        assert r.graph.costs(before).macs > 0.5 ** (i / 4) * original   # no group more than it needed
    assert steps[-1]["macs"] <= 0.5 * original and r.graph.costs(set(pruned_of(steps[1:]))).macs == steps[-1]["macs"]


def test_constraints_hold_on_every_step(caffe, tmp_path):
    r, steps = run(tmp_path, per_step="6", keep=["conv1"], max_steps=3)
    assert all(c[0] != "conv1" for s in steps[1:] for c in s["channels"])
    r, steps = run(tmp_path, "min", per_step="8", min_channels=15, max_steps=6)
    assert all(r.graph.active(layer, set(pruned_of(steps[1:]))) >= 15 for layer in r.graph.producers)
    assert r.graph.active("conv1", set(pruned_of(steps[1:]))) == 15   # conv1 (20) stopped at the floor
    r, steps = run(tmp_path, "frac", per_step="10", max_layer_fraction=0.2, max_steps=3)
    for layer, info in r.graph.producers.items():
        assert info.num_output - r.graph.active(layer, set(pruned_of(steps[1:]))) <= 0.2 * info.num_output


def test_round_to_leaves_multiples_in_the_compact_export(caffe, tmp_path):
    """ResNet-20 (widths 16, 32, 64; residual streams tie four convolutions a group) with --round-to 8:
    after every step each width is a multiple of 8 or the original, read off the exported prototxt."""
    r, steps = run(tmp_path, net="ResNet-20", weights=str(RESNET), per_step="3", round_to=8, max_steps=3)
    for i in range(1, len(steps)):
        pruned = set(pruned_of(steps[1:i + 1]))
        widths = {layer: r.graph.active(layer, pruned) for layer in r.graph.producers}
        assert all(w == r.graph.producers[layer].num_output or w % 8 == 0 for layer, w in widths.items()), widths
        assert any(w != r.graph.producers[layer].num_output for layer, w in widths.items())
    from caffe_prune.session import Session
    session = Session.open("ResNet-20", str(RESNET), None, with_data=False, form="structure")
    report = export.export_session(session, set(pruned_of(steps[1:])), tmp_path / "exp", timing=None)
    assert all(w % 8 == 0 or w == session.graph.producers[layer].num_output for layer, w in report["widths"].items())


@pytest.mark.parametrize("args, message", [
    (["--per-step", "0"], "--per-step 0: a step removes a whole number of groups, at least 1"),
    (["--per-step", "150%"], r"--per-step 150%: the percentage must be in \(0, 100\]"),
    (["--per-step", "lots"], "--per-step 'lots': give N"),
    (["--steps", "4"], "--steps S needs a budget to reach in S steps: add --target KEY=FRACTION"),
    (["--steps", "4", "--per-step", "2", "--target", "macs=0.5"], "give --per-step or --steps, not both"),
    (["--round-to", "0"], "--round-to must be at least 1, got 0"),
    (["--keep", "conv9"], r"--keep conv9: no convolution of the net matches it \(they are conv1, conv2\)"),
    (["--max-layer-fraction", "1.5"], r"--max-layer-fraction must be in \(0, 1\], got 1.5"),
])
def test_bad_schedule_arguments_are_one_line(caffe, tmp_path, capsys, args, message):
    import re
    code = cli.main(["prune", "LeNet-5", str(LENET), "--metric", "taylor", "--data", str(SUBSET), "--quiet",
                     "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "r" / "steps.jsonl").exists()


def test_a_budget_the_constraints_cannot_reach_is_one_line(caffe, tmp_path, capsys):
    code = cli.main(["prune", "LeNet-5", str(LENET), "--metric", "taylor", "--data", str(SUBSET), "--quiet",
                     "--test-size", "1", "--eval-size", "1", "--batch-size", "64", "--no-drop-stop",
                     "--per-step", "10", "--min-channels", "18", "--target", "macs=0.3", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--target macs=0.3 not reached: after step" in err and "(--min-channels 18)" in err
    assert "left of the original: macs 0." in err


def decisions(steps):
    """The records without their timings (a retraining's too)."""
    out = []
    for s in steps:
        record = {k: v for k, v in s.items() if k not in ("seconds", "phase_seconds", "peak_rss_mib")}
        if "retrain" in record:
            record["retrain"] = {k: v for k, v in record["retrain"].items() if k != "seconds"}
        out.append(record)
    return out


@pytest.mark.slow
def test_a_scheduled_prune_retrain_run_resumes_to_the_same_end(caffe, tmp_path):
    """Four groups a step with a 5-iteration masked fine-tune after each, stopped after step 1 and
    resumed: the same records as the run made in one go."""
    kw = dict(per_step="4", retrain_every=1, retrain_iters=5, max_steps=2)
    _, whole = run(tmp_path, "whole", **kw)
    run(tmp_path, "parts", **{**kw, "max_steps": 1})
    _, parts = run(tmp_path, "parts", **kw)
    assert decisions(parts) == decisions(whole) and [len(s["groups"]) for s in whole] == [0, 4, 4]
    assert all("retrain" in s and s["retrain"]["iters"] == 5 for s in whole[1:])

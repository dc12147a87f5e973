"""The fast engine against the naive one (caffe_prune.engines): the same decisions, sensitivities and
test measurements bit for bit, over many steps, both masking semantics, any number of workers;
a test cache that notices parameters changed behind its back; a worker killed mid-probe replaced
without changing the step; a run resumed in the other engine."""
import json
import os
import signal

import pytest

from caffe_prune import engines, evaluate, masking, pruning
from caffe_prune.data.dataset import open_dataset
from caffe_prune.session import Network, Session
from conftest import PUBLISHED, SUBSET

LENET = PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel"
RESNET = PUBLISHED / "ResNet-20-CIFAR10" / "original.caffemodel"


def run(tmp_path, name, **kw):
    base = dict(net="LeNet-5", weights=str(LENET), oracle=["mean_activations", "taylor", "mean_sq_weights"], k=8,
                test_size=3, max_drop=None, data=str(SUBSET))
    config = pruning.Config(**{**base, **kw})
    return pruning.Run(config, tmp_path / name, progress=False)


def decided(steps):
    """Everything a step decided or measured (not its timings)."""
    return [{k: v for k, v in s.items() if k not in ("seconds", "phase_seconds", "peak_rss_mib")} for s in steps]


@pytest.mark.parametrize("semantics", ["zero-downstream", "authors"])
def test_lenet5_fast_equals_naive_for_20_steps(caffe, tmp_path, semantics):
    naive = run(tmp_path, "naive", engine="naive", semantics=semantics, max_steps=20).run()
    fast = run(tmp_path, "fast", engine="fast", semantics=semantics, max_steps=20, workers=2).run()
    assert decided(fast) == decided(naive)
    assert all(s["sensitivities"] for s in fast[1:])


@pytest.mark.slow
@pytest.mark.parametrize("semantics", ["zero-downstream", "authors"])
def test_resnet20_fast_equals_naive_for_20_steps(caffe, tmp_path, semantics):
    # one oracle batch for two workers: the candidates are split between them (LeNet-5's test above
    # splits whole batches)
    kw = dict(net="ResNet-20", weights=str(RESNET), oracle=list(pruning_five()), k=16, batch_size=32,
              test_size=4, eval_size=1, oracle_eval_size=1, semantics=semantics, max_steps=20)
    naive = run(tmp_path, "naive", engine="naive", **kw).run()
    fast = run(tmp_path, "fast", engine="fast", workers=2, cache_mb=64, **kw).run()
    assert decided(fast) == decided(naive)


def pruning_five():
    return ("mean_activations", "taylor", "fisher", "mean_gradients", "mean_sq_weights")


@pytest.fixture(scope="module")
def resnet(caffe):
    network = Network.open("ResNet-20")
    session = Session(network, RESNET, open_dataset(network, str(SUBSET), progress=False), batch_size=32)
    return session


def test_test_cache_notices_changes_behind_its_back(resnet):
    """The cached checkpoints are used while the parameters stand still, and dropped from the first
    layer whose parameters changed, whoever changed them (here: a blob written directly)."""
    session = resnet
    masker = masking.Masker(session.graph, [session.net])
    test = session.dataset.test.head(96)
    x, y = test.x, test.y
    fast = engines.Fast(session, masker, test, workers=1, cache_mb=256)
    assert len(fast.local.checkpoints) >= 2
    reference = session.evaluate(x, y)
    assert fast.test() == reference
    assert fast.test() == reference                     # from the last checkpoint: nothing changed
    weights, first = session.net.params["group2_block1_conv0"][0].data, session.net.params["first_conv"][0].data
    saved, saved_first = weights.copy(), first.copy()
    weights[3] = 0                                      # behind the cache's back: no masker
    try:
        changed = session.evaluate(x, y)
        assert changed != reference and fast.test() == changed
        deep = fast.local.plan.index["group2_block1_conv0"]
        assert fast.local._first_changed() > deep       # remembered: the next measurement resumes late
        first[0, 0, 0, 0] += 1.0                        # the very first layer
        assert fast.local._first_changed() == fast.local.plan.index["first_conv"]
        assert fast.test() == session.evaluate(x, y)
    finally:
        weights[...], first[...] = saved, saved_first
    assert fast.test() == reference
    fast.close()


def test_no_cache_budget_degrades_to_full_forwards(resnet):
    session = resnet
    test = session.dataset.test.head(64)
    x, y = test.x, test.y
    fast = engines.Fast(session, masking.Masker(session.graph, [session.net]), test, workers=1, cache_mb=0)
    assert fast.local.checkpoints == [] and fast.test() == session.evaluate(x, y)


def test_killed_worker_is_replaced_and_the_probes_unchanged(resnet):
    session = resnet
    masker = masking.Masker(session.graph, [session.net])
    val = session.dataset.validation
    batches = [(val.x[i:i + 32], val.y[i:i + 32]) for i in (0, 32)]
    candidates = [0, 17, 120, 300, 447]
    naive = engines.Naive(session, masker, val.head(32))
    want = naive.sensitivities(candidates, batches)
    fast = engines.Fast(session, masker, val.head(32), workers=2, cache_mb=0)
    before = fast.worker_pids()
    killed = []

    def kill_first(requests):
        if requests[0][0] == "probe" and not killed:
            killed.append(fast.remote[0].pid)
            os.kill(fast.remote[0].pid, signal.SIGKILL)
    fast.on_dispatch = kill_first
    try:
        assert fast.sensitivities(candidates, batches) == want
        assert killed == [before[0]] and fast.worker_pids()[0] != before[0] and fast.worker_pids()[1] == before[1]
        fast.commit([17])                               # the new worker follows the run's commits
        assert fast.test() == evaluate.evaluate(session.net, val.x[:32], val.y[:32], 32, progress=False)
    finally:
        fast.close()
        masker.restore_all()


def test_resumed_in_the_other_engine(caffe, tmp_path):
    whole = run(tmp_path, "whole", engine="naive", max_steps=8).run()
    run(tmp_path, "mixed", engine="naive", max_steps=4).run()
    mixed = run(tmp_path, "mixed", engine="fast", workers=2, max_steps=8).run()
    assert decided(mixed) == decided(whole)
    header = json.loads((tmp_path / "mixed" / "config.json").read_text())
    assert header["config"]["engine"] == "fast"


def test_plan_frontier_start_and_flops(resnet):
    """Before a block's conv1 the rest of the net needs the block's conv0 output and the block's
    input (the Eltwise reads it again, through Caffe's Split); a group's start is its earliest
    touched layer; FLOPs as counted by hand."""
    plan, net = engines.Plan(resnet.net, resnet.graph), resnet.net
    i = plan.index["group0_block1_conv1"]
    labels = {b for b in plan.frontier(i) if b.startswith("label_")}    # Caffe's Splits of the label input
    assert set(plan.frontier(i)) - labels == {"group0_block1_conv0", net.bottom_names["group0_block1_sum"][1]}
    assert len(labels) == 3                     # the loss and the two accuracies read them at the end
    group = resnet.graph.group_of("group1_block0_proj", 3)     # tied: group1's residual stream
    assert plan.start(masking.regions(resnet.graph, group)) == plan.index["group1_block0_conv1"]
    # multiply-adds: weights x output positions: first_conv 432 x 1024; group0 six 2304 x 1024; groups
    # 1 and 2: conv0 4608 x 256 / 18432 x 64, five 9216 x 256 / 36864 x 64, proj 512 x 256 / 2048 x 64; fc 640
    macs = 432 * 1024 + 6 * 2304 * 1024 + (4608 + 5 * 9216 + 512) * 256 + (18432 + 5 * 36864 + 2048) * 64 + 640
    assert sum(plan.flops) == 2 * macs

"""Masking and compact export agree: the masked full-width net and the physically smaller export
compute the same logits (zero-downstream semantics), restore is bit-exact, and the authors'
semantics differs exactly where the paper's trap says it does."""
import numpy as np
import pytest

from caffe_prune import export, masking, networks, pycaffe
from caffe_prune.data import cifar10, cifar10_convert
from caffe_prune.session import Network
from conftest import PUBLISHED, SUBSET

WEIGHTS = {"LeNet-5": PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel",
           "ResNet-20": PUBLISHED / "ResNet-20-CIFAR10" / "original.caffemodel"}


class Case:
    """One network: its graph, a full-width structure-form net (published weights or Caffe's
    fillers) and a few real subset images, transformed as its data layer would."""

    def __init__(self, name, tmp_path, images=8):
        self.name, self.tmp = name, tmp_path
        self.network = Network.open(name)
        self.param, self.graph = self.network.param, self.network.graph
        self.net = pycaffe.net_from_param(self.network.structure(), WEIGHTS.get(name))
        x, y = cifar10.read_split("test", SUBSET)
        transform = networks.transform(name)
        self.x = cifar10_convert.caffe_input(x[:images], transform.mean_values, transform.scale)
        self.logits = self.network.head().logits

    def run(self, net):
        net.blobs["data"].reshape(*self.x.shape)
        net.reshape()
        net.blobs["data"].data[...] = self.x
        net.forward()
        return net.blobs[self.logits].data.copy()

    def compact_logits(self, pruned):
        """The compact net's logits (export.compact_net, built without the forked probe: it is
        known valid here), for the every-group loops. Consecutive groups of one layer give the same
        compact prototxt (checked byte for byte): that net is built once and takes each group's
        compact weights (export.compact), as compact_net fills a new one."""
        param, weights = export.compact(self.param, self.graph, pruned, self.net)
        key = param.SerializeToString(deterministic=True)
        if getattr(self, "_compact", (None,))[0] != key:
            _, _, small = export.compact_net(self.param, self.graph, pruned, self.net, networks.IMAGE_SHAPE,
                                             self.name, probe=False)
            self._compact = (key, small)
        small = self._compact[1]
        for layer, arrays in weights.items():
            for blob, array in zip(small.params[layer], arrays, strict=True):
                blob.data[...] = array
        return self.run(small)

    def export_logits(self, pruned):
        done = export.export(self.param, self.graph, pruned, self.net, self.tmp / "export", self.name,
                             networks.IMAGE_SHAPE, self.x)
        compact = self.run(done["net"])
        assert done["deviation"][self.logits] == pytest.approx(
            np.abs(self.run(self.net) - compact).max() / max(np.abs(self.run(self.net)).max(), 1e-12), abs=1e-12)
        return compact, done


def assert_close(a, b, rtol=1e-4):
    scale = max(np.abs(b).max(), 1e-6)
    assert np.abs(a - b).max() <= rtol * scale, f"max deviation {np.abs(a - b).max():.3g} vs scale {scale:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["LeNet-5", "ResNet-20", "CIFAR10", "NIN", "SqueezeNet"])
def test_every_group_masked_equals_export(caffe, tmp_path, name):
    case = Case(name, tmp_path, images=2)
    masker = masking.Masker(case.graph, [case.net])
    full = case.run(case.net)
    for group in case.graph.groups:
        masker.mask(group.id)
        masked = case.run(case.net)
        compact = case.compact_logits({group.id})
        assert_close(masked, compact)
        masker.restore(group.id)
    np.testing.assert_array_equal(case.run(case.net), full)


@pytest.mark.slow
@pytest.mark.parametrize("name, sample", [("AlexNet", 24)])
def test_sampled_groups_masked_equals_export(caffe, tmp_path, name, sample):
    """AlexNet's export copies its 68M InnerProduct weights each time: a seeded sample of groups."""
    case = Case(name, tmp_path, images=2)
    masker = masking.Masker(case.graph, [case.net])
    rng = np.random.default_rng(0)
    for group_id in rng.choice(len(case.graph.groups), size=sample, replace=False):
        masker.mask(int(group_id))
        masked = case.run(case.net)
        compact = case.compact_logits({int(group_id)})
        lrn = sorted(export.touched_lrn(case.graph, {int(group_id)}))
        if lrn:   # AlexNet's norm1/norm2 see other neighbours in the smaller net
            deviation = np.abs(masked - compact).max() / max(np.abs(masked).max(), 1e-12)
            print(f"AlexNet group {group_id}: LRN {lrn}: relative logit deviation {deviation:.3g}")
            assert deviation < 0.05, f"LRN deviation {deviation:.3g} for group {group_id}"
        else:
            assert_close(masked, compact)
        masker.restore(int(group_id))


@pytest.mark.parametrize("name", ["LeNet-5", "ResNet-20"])
def test_random_multistep_pruning_then_export(caffe, tmp_path, name):
    """30% of the groups, committed one by one in seeded random order (each drawn from what is
    still prunable), then exported: same logits, and the export's conv weight count equals the
    graph's count for that pruning state."""
    case = Case(name, tmp_path)
    masker = masking.Masker(case.graph, [case.net])
    rng = np.random.default_rng(1)
    pruned = set()
    for _ in range(int(0.3 * len(case.graph.groups))):
        group_id = int(rng.choice(case.graph.prunable(pruned)))
        masker.commit(group_id)
        pruned.add(group_id)
    compact, done = case.export_logits(pruned)
    assert_close(case.run(case.net), compact)
    small_conv = sum(done["net"].params[l][0].data.size for l in case.graph.producers)
    assert small_conv == case.graph.conv_weights(pruned)


def test_restore_is_bit_exact_with_overlapping_masks(caffe, tmp_path):
    """conv2 of LeNet-5 is the consumer of conv1's groups and the producer of its own: masks
    overlap at W[out, in]; restoring in any order gives back every parameter bit for bit."""
    case = Case("LeNet-5", tmp_path)
    before = {l: [b.data.copy() for b in blobs] for l, blobs in case.net.params.items()}
    a = case.graph.group_of("conv1", 3).id
    b = case.graph.group_of("conv2", 7).id
    masker = masking.Masker(case.graph, [case.net])
    masker.mask(a)
    masker.mask(b)
    assert case.net.params["conv2"][0].data[7, 3].max() == 0
    masker.restore(a)
    assert np.abs(case.net.params["conv2"][0].data[7]).max() == 0      # b is still masked
    assert np.array_equal(case.net.params["conv2"][0].data[6, 3], before["conv2"][0][6, 3])
    masker.restore(b)
    for layer, blobs in case.net.params.items():
        for have, want in zip(blobs, before[layer]):
            np.testing.assert_array_equal(have.data, want)
    with pytest.raises(masking.MaskError, match="is not temporarily masked"):
        masker.restore(a)


def test_authors_semantics_leaks_the_batchnorm_constant(caffe, tmp_path):
    """The trap: with the authors' semantics a ResNet-20 channel still emits BatchNorm/Scale's
    constant (inside a block, and into the residual sums); the default semantics zeroes it. Every
    consumer of that constant has its input slice masked too, so the logits are the same bits under
    both: why the two semantics make identical ResNet-20 runs (README, Faithfulness)."""
    case = Case("ResNet-20", tmp_path)
    for layer in ("group0_block0_conv0", "group2_block0_conv1"):      # in a block; tied residual channel
        group = case.graph.group_of(layer, 2)
        logits = {}
        for semantics, leaks in (("authors", True), ("zero-downstream", False)):
            masker = masking.Masker(case.graph, [case.net], semantics)
            masker.mask(group.id)
            logits[semantics] = case.run(case.net)
            channel = case.net.blobs[layer].data[:, 2]
            assert (np.abs(channel).max() > 0) == leaks
            masker.restore(group.id)
        np.testing.assert_array_equal(logits["authors"], logits["zero-downstream"])
        assert np.abs(logits["authors"] - case.run(case.net)).max() > 1e-3       # the mask did change them
    with pytest.raises(masking.MaskError, match="semantics 'mine' is not one of"):
        masking.Masker(case.graph, [case.net], "mine")

"""The README's measured results are rebuilt from the results committed under experiments/results/
(caffe_prune.report.faithfulness), never typed: the README equals what the committed data gives."""
from caffe_prune import cli
from caffe_prune.report import faithfulness
from conftest import REPO
from test_report import fake_store

RESULTS = REPO / "experiments" / "results"


def test_the_readme_equals_what_the_committed_results_give(capsys):
    outcome = faithfulness.update(REPO / "README.md", RESULTS, check=True)
    assert outcome["changed"] == [], (f"README.md's blocks {outcome['changed']} differ from experiments/results; "
                                      f"rebuild them: caffe-prune report experiments/results --readme README.md")
    assert outcome["missing"] == [] and set(outcome["same"]) == set(faithfulness.BLOCKS)


def test_a_block_is_rebuilt_from_its_archive_and_check_writes_nothing(tmp_path, capsys):
    five = ["mean_activations", "taylor", "fisher", "mean_gradients", "mean_sq_weights"]
    store = fake_store(tmp_path / "sweep", [("ResNet-20", None, s, v, five) for s, v in ((0, 10.0), (1, 12.0))])
    assert cli.main(["results", str(store), "--archive", str(tmp_path / "results" / "resnet-oracle")]) == 0
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:resnet-oracle -->\nold text\n<!-- /results:resnet-oracle -->\nend\n")
    assert cli.main(["report", str(tmp_path / "results"), "--readme", str(readme), "--check"]) == 1
    assert "old text" in readme.read_text()
    assert cli.main(["report", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    # t(0.975, 1) x sd(10, 12) / sqrt(2) = 12.706; Table 2's ResNet-20 oracle: 12 ± 3
    assert "| Myopic Oracle (k=16) | 11.0 ± 12.7 (n=2) | 12 ± 3 |" in text
    assert text.startswith("# x\n\n<!-- results:resnet-oracle -->\n| metric |") and text.endswith(
        "<!-- /results:resnet-oracle -->\nend\n")
    assert cli.main(["report", str(tmp_path / "results"), "--readme", str(readme), "--check"]) == 0
    assert "same: resnet-oracle" in capsys.readouterr().out


def test_the_committed_results_are_what_this_code_computes(caffe, tmp_path):
    """The first steps of a committed run (ResNet-20's oracle over the Table-2 forms, seed 0, made by
    the sweep with an earlier version of the code) replay exactly: the same groups, the same test
    top-1 to the last bit, the same weights removed."""
    import pytest
    from caffe_prune import archive, pruning, published_weights
    run = next(r for r in archive.read(RESULTS / "resnet-oracle") if r["method"] == "oracle (table2 forms)"
               and r["seed"] == 0)
    config = {**run["config"], "weights": str(published_weights.caffemodel("ResNet-20")), "data": None, "max_steps": 2,
              "workers": None}
    steps = pruning.Run(pruning.Config(**config), tmp_path / "run", progress=False).run()
    assert len(steps) == 3
    for mine, committed in zip(steps, run["steps"]):
        assert mine["groups"] == committed["groups"] and len(mine["groups"]) == (mine["step"] > 0)
        assert mine["test"]["top1"] == committed["test"]["top1"]
        assert mine["percent_conv_removed"] == pytest.approx(committed["percent_conv_removed"], abs=0)


def test_the_macs_block_pairs_macs_removed_with_each_scaling(tmp_path):
    """fake_store's runs stop at step 1 (2 points down), where MACs removed are half the weights
    removed: macs_removed (10, 12) -> (5, 6) against none (8, 8) -> (4, 4): differences 1 and 2,
    mean 1.5 ± t(0.975, 1) x 0.7071 / sqrt(2) = 6.35, ahead in both pairs; weights_removed has no
    run, so no row."""
    from caffe_prune import archive
    results = [("LeNet-5", metric, seed, value) for metric, values in
               {"activation/x/l1/macs_removed": (10, 12), "activation/x/l1/none": (8, 8)}.items()
               for seed, value in enumerate(values)]
    assert cli.main(["results", str(fake_store(tmp_path / "sweep", results)), "--archive",
                     str(tmp_path / "macs")]) == 0
    text = faithfulness._macs(archive.read(tmp_path / "macs"))
    assert "| LeNet-5 | none | 2 | +1.5 ± 6.4 | 2 / 0 |" in text
    assert "| LeNet-5 | weights_removed |" not in text
    assert "| activation/x/l1/macs_removed | 5.5 ± 6.4 (n=2) | - |" in text     # the MACs table: (5, 6)

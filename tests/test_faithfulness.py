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
    from caffe_prune import archive, pruning, published
    run = next(r for r in archive.read(RESULTS / "resnet-oracle") if r["method"] == "oracle (table2 forms)"
               and r["seed"] == 0)
    config = {**run["config"], "weights": str(published.caffemodel("ResNet-20")), "data": None, "max_steps": 2,
              "workers": None}
    steps = pruning.Run(pruning.Config(**config), tmp_path / "run", progress=False).run()
    assert len(steps) == 3
    for mine, committed in zip(steps, run["steps"]):
        assert mine["group"] == committed["group"]
        assert mine["test"]["top1"] == committed["test"]["top1"]
        assert mine["percent_conv_removed"] == pytest.approx(committed["percent_conv_removed"], abs=0)

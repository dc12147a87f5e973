"""The README's measured results are rebuilt from the results committed under experiments/results/
(caffe_prune.report.faithfulness), never typed: the README equals what the committed data gives."""
from caffe_prune import cli
from caffe_prune.report import faithfulness, figures
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


def test_the_schedules_rows_are_the_archives_runs(tmp_path, monkeypatch):
    """The schedules block's figures, read straight from the committed CSVs (runs.csv: the final
    top-1, the wall time, the schedule fields of each run's config; steps.csv.gz: a row per step, its
    ;-joined groups, its MACs) and the fine-tune JSONs, equal the block's rows; the plot puts each row's mean
    at (mean steps, mean top-1)."""
    import csv
    import gzip
    import json
    from collections import defaultdict

    import numpy as np
    import pytest
    from matplotlib.axes import Axes

    folder = RESULTS / "schedules"
    steps = defaultdict(list)
    with gzip.open(folder / "steps.csv.gz", "rt") as f:
        for row in csv.DictReader(f):
            steps[row["run_id"]].append(row)
    expected = defaultdict(list)
    for run in csv.DictReader(open(folder / "runs.csv")):
        config = json.loads(run["config"])
        rows = sorted(steps[run["id"]], key=lambda r: int(r["step"]))
        tuned = folder.parent / "schedules-finetune" / f"{run['id'][:16]}.json"
        expected[(run["net"], config.get("per_step"), config.get("in_steps"), bool(config.get("oracle")))].append(
            (len(rows) - 1, np.mean([len(r["group"].split(";")) for r in rows[1:]]), float(run["final_top1"]),
             int(rows[-1]["macs"]) / int(rows[0]["macs"]),
             100 * json.loads(tuned.read_text())["after"]["top1"] if tuned.is_file() else None, float(run["wall_s"])))
    got = faithfulness._schedule_rows(folder)
    assert len(got) == len(expected) == 16 and all(row["runs"] == 2 for row in got)
    names = {None: "1 group a step (Algorithm 1)", "1%": "1% of the channels a step", "5%": "5% of the channels a step"}
    for (net, per_step, in_steps, oracle), runs in expected.items():
        (row,) = [r for r in got if r["net"] == net and ("Oracle" in r["method"]) == oracle
                  and r["schedule"] == (f"{in_steps} steps (geometric)" if in_steps else names[per_step])]
        assert sorted(row["steps"]) == sorted(r[0] for r in runs)
        assert sorted(row["per_step"]) == pytest.approx(sorted(r[1] for r in runs))
        assert sorted(row["top1"]) == pytest.approx(sorted(r[2] for r in runs))
        assert sorted(row["left"]) == pytest.approx(sorted(r[3] for r in runs)) and max(row["left"]) <= 0.5
        assert sorted(row["tuned"]) == pytest.approx(sorted(r[4] for r in runs if r[4] is not None))
        assert sorted(row["wall"]) == pytest.approx(sorted(r[5] for r in runs))
    means = []
    plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, x, y, *a, **kw:
                        (means.append((float(x[0]), float(y[0]), kw.get("mfc"))) if kw.get("ms") == 7 else None)
                        or plot(self, x, y, *a, **kw))
    figures.plot_schedules(got, tmp_path / "schedules.png")
    assert np.allclose(sorted(m[:2] for m in means if m[2] is None),
                       sorted((np.mean(r["steps"]), np.mean(r["top1"])) for r in got))
    assert len([m for m in means if m[2] == "white"]) == len([r for r in got if r["tuned"]])

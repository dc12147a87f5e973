"""The report: the table next to the published values, the figures, the protocol."""
import json
import pytest

from caffe_prune import analysis, pruning, report
from caffe_prune.metrics import methods
from caffe_prune.report import figures, published_figures
from caffe_prune.report import stats as report_stats
from caffe_prune.report.oracle import table
from conftest import PUBLISHED, SHARED, SUBSET


def test_transcribed_table2_matches_the_workplace_reference():
    shared = json.loads((SHARED / "reference" / "published.json").read_text())
    assert published_figures.PUBLISHED_TABLE2 == shared["table2_conv_weights_removed_percent_at_max_5pt_test_drop"]


def test_mean_ci_by_hand():
    mean, half = report.mean_ci([10.0, 12.0, 14.0])
    # t(0.975, 2) = 4.3027; sd = 2; half = 4.3027 * 2 / sqrt(3)
    assert mean == 12.0 and abs(half - 4.3027 * 2 / 3 ** 0.5) < 1e-3
    assert report.mean_ci([5.0]) == (5.0, 0.0)


def test_report_from_two_runs(caffe, tmp_path):
    weights = str(PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel")
    dirs = []
    for method in ("mean_sq_weights", None):
        cfg = pruning.Config(net="LeNet-5", weights=weights, metric=method,
                             oracle=[] if method else ["mean_sq_weights", "taylor"], k=4, test_size=4, max_steps=8)
        out = tmp_path / (method or "oracle")
        steps = pruning.Run(cfg, out, data=SUBSET, progress=False).run()
        dirs.append(out)
        if method:
            expected = analysis.removed_at_drop(steps)
    path = report.write_report(dirs, tmp_path / "report")
    text = path.read_text()
    assert f"| Mean squares of weights | {expected:.1f} ± 0.0 (n=1) | 7 |" in text
    assert "| Myopic Oracle (k=16) |" in text and "30 ± 10" in text
    assert "1017 test images" in text or "5085 train / 1017 test" in text
    for png in ("figure6-LeNet-5.png", "phases-LeNet-5.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# ---- reports from a sweep's results store (hand-made results, numbers checked by hand) -------------

def fake_store(directory, results):
    """A results store holding finished runs: (net, metric or None, seed, removed at the drop[, oracle])."""
    import dataclasses
    from caffe_prune import store
    with store.Store(directory) as s:
        for i, (net, metric, seed, removed, *oracle) in enumerate(results):
            constituents = oracle[0] if oracle else []
            config = dataclasses.asdict(pruning.Config(net=net, weights="w.caffemodel", metric=metric,
                                                       oracle=constituents, seed=seed))
            run = {"id": f"r{i:03d}", "net": net, "method": metric or "oracle", "metric": metric,
                   "oracle": constituents or None, "seed": seed, "config": config, "run_dir": f"runs/r{i:03d}",
                   "report_drop": 5.0}
            s.add_runs([run])
            proposer = [[(constituents or [metric])[seed % len(constituents or [metric])], 0]]
            steps = [{"step": 0, "group": None, "test": {"top1": 0.70, "top5": 0.9, "loss": 1.0},
                      "percent_conv_removed": 0.0, "percent_macs_removed": 0.0},
                     {"step": 1, "group": 3, "proposers": proposer, "test": {"top1": 0.68, "top5": 0.9, "loss": 1.1},
                      "percent_conv_removed": removed, "percent_macs_removed": removed / 2},
                     {"step": 2, "group": 4, "proposers": proposer, "test": {"top1": 0.60, "top5": 0.8, "loss": 1.5},
                      "percent_conv_removed": removed + 1, "percent_macs_removed": removed / 2 + 3}]
            attempt = s.start_attempt(run["id"], "local", "h", 1)
            s.finish(run["id"], attempt, {"steps": steps, "removed_at_drop": removed, "host": "h", "pid": 1,
                                          "wall_s": 1.0, "versions": {}, "protocol": {
                                              "data": "CIFAR-10 subset: 5085 train / 1017 test images",
                                              "validation_images": 1017, "test_images_per_measurement": 1017}})
    return directory


def test_taxonomy_report_ranks_and_decomposes(tmp_path):
    """t(0.975, 1) = 12.706: two seeds give half-width 12.706 * sd / sqrt(2)."""
    results = []
    for metric, values in {"activation/taylor/l1/count": (10, 12),              # = taylor, one of the five
                           "activation/taylor/l1/weights_removed": (20, 22),
                           "activation/x/l1/count": (8, 8),                     # = mean_activations
                           "activation/x/l1/weights_removed": (14, 18)}.items():
        results += [("LeNet-5", metric, seed, v) for seed, v in enumerate(values)]
    (path,) = report.write_reports(fake_store(tmp_path, results), kinds=["taxonomy"])
    text = path.read_text()
    ranked = [line.split("`")[1] for line in text.splitlines() if line.startswith("| 1 |") or line.startswith(
        "| 2 |") or line.startswith("| 3 |") or line.startswith("| 4 |")]
    assert ranked == ["activation/taylor/l1/weights_removed", "activation/x/l1/weights_removed",
                      "activation/taylor/l1/count", "activation/x/l1/count"]
    assert "| 1 | `activation/taylor/l1/weights_removed` | 21.0 ± 12.7 (n=2) |  |" in text
    assert "| 2 | `activation/x/l1/weights_removed` | 16.0 ± 25.4 (n=2) |  |" in text
    assert "| 3 | `activation/taylor/l1/count` | 11.0 ± 12.7 (n=2) | taylor |" in text
    # scaling: contexts (taylor) {count 11, wr 21} and (x) {count 8, wr 16}: effects +5, +4 -> 4.5 ± 6.4
    assert "| scaling | weights_removed | 2 | 18.5 ± 31.8 | +4.5 ± 6.4 | 2 |" in text
    assert "| scaling | count | 2 | 9.5 ± 19.1 | -4.5 ± 6.4 | 2 |" in text
    assert "| pointwise | taylor | 2 | 16.0 ± 63.5 | +2.0 ± 6.4 | 2 |" in text
    assert "| count | 2 | +9.0 ± 12.7 | 2 of 2 |" in text                   # weights_removed - count: 10, 8
    assert ("| LeNet-5 | 4 | `activation/taylor/l1/weights_removed` | 21.0 ± 12.7 (n=2) | taylor "
            "(`activation/taylor/l1/count`) | 11.0 ± 12.7 (n=2) | +10.0 ± 0.0 | "
            "taylor 3, mean_activations 4 |") in text       # paired by seed; the five's ranks of the 4
    assert "more than 300 saliency metrics" in text and "4 distinct metrics" in text
    ranking = (tmp_path / "report" / "taxonomy-LeNet-5.csv").read_text().splitlines()
    assert ranking[1].startswith("1,activation/taylor/l1/weights_removed,activation,taylor,l1,weights_removed,none,,21.0,")
    for png in ("taxonomy-LeNet-5.png", "components-LeNet-5.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_domino_report_differences(tmp_path):
    from scipy import stats
    results = [("AlexNet", "mean_sq_weights", s, v) for s, v in enumerate((30, 32, 34))]
    results += [("AlexNet", "domino-sum:mean_sq_weights", s, v) for s, v in enumerate((36, 39, 42))]
    results += [("NIN", "taylor", s, v) for s, v in ((0, 10), (1, 12))]
    results += [("NIN", "domino-max:taylor", s, v) for s, v in ((2, 11), (3, 15))]     # other seeds: unpaired
    (path,) = report.write_reports(fake_store(tmp_path, results), kinds=["domino"])
    text = path.read_text()
    # paired by seed: differences 6, 7, 8 -> 7 ± t(0.975, 2) / sqrt(3) = 2.48; 7 / 32 = +22%
    assert "## AlexNet (branches: grouped convolutions)" in text
    assert "| `mean_sq_weights` | sum | 32.0 ± 5.0 (n=3) | 39.0 ± 7.5 (n=3) | +7.0 ± 2.5 | +22% |" in text
    assert "the largest improvement is +7.0 points (+22% relative), domino-sum:mean_sq_weights" in text
    assert "up to 25% in AlexNet on CIFAR-10" in text
    # Welch: variances 2/2 and 8/2, df = 25 / 17
    half = stats.t.ppf(0.975, 25 / 17) * 5 ** 0.5
    assert "## NIN (no branches: the control)" in text
    assert f"| `taylor` | max | 11.0 ± 12.7 (n=2) | 13.0 ± 25.4 (n=2) | +2.0 ± {half:.1f} | +18% |" in text
    assert text.index("## AlexNet") < text.index("## NIN")
    assert (tmp_path / "report" / "domino.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_oracle_report_from_a_store(tmp_path):
    five = ["mean_activations", "taylor", "fisher", "mean_gradients", "mean_sq_weights"]
    results = [("LeNet-5", None, s, v, five) for s, v in ((0, 28.0), (1, 32.0))]
    results += [("LeNet-5", "mean_sq_weights", 0, 6.0), ("SqueezeNet", "mean_sq_weights", 0, 9.0)]
    directory = fake_store(tmp_path, results)
    assert report.applicable(report.runs_from_store(directory)) == ["oracle"]
    (path,) = report.write_reports(directory)
    text = path.read_text()
    assert path.name == "oracle.md"
    # t(0.975, 1) * sd(28, 32) / sqrt(2) = 12.706 * 2.828 / 1.414 = 25.4; SqueezeNet has no published column
    assert ("| Myopic Oracle (k=16) | 30.0 ± 25.4 (n=2) | 30 ± 10 | - | - |") in text
    assert "| Mean squares of weights | 6.0 ± 0.0 (n=1) | 7 | 9.0 ± 0.0 (n=1) | - |" in text
    for png in ("figure6-LeNet-5.png", "phases-LeNet-5.png", "figure6-SqueezeNet.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import pytest
    with pytest.raises(ValueError, match="unknown report kind\\(s\\) oracles; one of oracle, taxonomy, domino"):
        report.write_reports(directory, kinds=["oracles"])


def test_figure6_marks_the_retraining_points(tmp_path, monkeypatch):
    """A prune-retrain run (steps carrying "retrain" records, caffe_prune.pruning): one arrow per
    retraining from the top-1 before it to the top-1 after it, and a marker at the after value; the
    same method without retraining is a curve of its own, without marks."""
    from matplotlib.axes import Axes
    arrows, markers = [], []
    annotate, scatter = Axes.annotate, Axes.scatter
    monkeypatch.setattr(Axes, "annotate", lambda self, text, xy, xytext=None, **kw:
                        arrows.append((xytext, xy)) or annotate(self, text, xy, xytext=xytext, **kw))
    monkeypatch.setattr(Axes, "scatter", lambda self, x, y, **kw:
                        markers.append((list(x), list(y), kw.get("label"))) or scatter(self, x, y, **kw))

    def retrain(before, after):
        return {"iters": 500, "before": {"top1": before}, "after": {"top1": after}, "seconds": 1.0}
    steps = [{"step": 0, "test": {"top1": 0.70}, "percent_conv_removed": 0.0},
             {"step": 1, "test": {"top1": 0.66}, "percent_conv_removed": 10.0, "retrain": retrain(0.66, 0.69)},
             {"step": 2, "test": {"top1": 0.67}, "percent_conv_removed": 20.0},
             {"step": 3, "test": {"top1": 0.62}, "percent_conv_removed": 30.0, "retrain": retrain(0.62, 0.68)}]
    retraining = {"retrain_every": 2, "retrain_iters": 500}
    runs = [{"method": "oracle", "config": {"oracle": ["taylor"], "seed": 0, **retraining}, "steps": steps},
            {"method": "oracle", "config": {"oracle": ["taylor"], "seed": 0}, "steps": [steps[0]] + [
                {k: v for k, v in s.items() if k != "retrain"} for s in steps[1:]]},      # the same, not retrained
            {"method": "taylor", "config": {"oracle": [], "seed": 0, **retraining}, "steps": steps[:3]}]
    path = figures.figure6(runs, tmp_path / "figure6.png", "LeNet-5")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expected = [((10.0, 66.0), (10.0, 69.0)), ((30.0, 62.0), (30.0, 68.0)), ((10.0, 66.0), (10.0, 69.0))]
    assert sorted((tuple(map(float, a)), tuple(map(float, b))) for a, b in arrows) == sorted(expected)
    assert {label: (x, y) for x, y, label in markers} == {
        "Myopic Oracle (k=16), retrained every 2 steps: after retraining (500 iterations)": ([10.0, 30.0], [69.0, 68.0]),
        "1st order Taylor, retrained every 2 steps: after retraining (500 iterations)": ([10.0], [69.0])}


def test_printed_equations_share_the_published_rows():
    """eq1..eq5 (the five as printed) and the oracle over them are reported in the paper's rows,
    beside the same published figures; the sweep names that oracle as the report reads it."""
    from caffe_prune.metrics.taxonomy import PAPER_FORMS
    printed, table2 = methods.oracle_of_forms("printed"), methods.oracle_of_forms("table2")
    assert methods.oracle_method(list(PAPER_FORMS["printed"])) == printed
    assert methods.oracle_method(list(PAPER_FORMS["code"])) == methods.ORACLE
    assert methods.oracle_method(list(PAPER_FORMS["table2"])) == table2
    assert PAPER_FORMS["table2"] == ("mean_activations", "taylor", "eq4", "mean_gradients", "mean_sq_weights")
    steps = [{"test": {"top1": 0.70}, "percent_conv_removed": 0}, {"test": {"top1": 0.69}, "percent_conv_removed": 41}]
    runs = [{"method": m, "net": "CIFAR10", "steps": steps} for m in ("fisher", "eq4", printed, table2)]
    rows = {line.split(" | ")[0]: line for line in table(runs).splitlines()}
    assert "| 39 |" in rows["| Fisher information (eq. 4 as printed)"] and "| 39 |" in rows["| Fisher information"]
    assert "| 43 ± 2 |" in rows["| Myopic Oracle (k=16) over eq. 1-5 as printed"]
    assert "| 43 ± 2 |" in rows["| Myopic Oracle (k=16) over the Table-2 forms"]


def test_an_archive_reports_as_its_store(tmp_path, capsys):
    """`results --archive` writes the finished runs as runs.csv + steps.csv.gz; every report made
    from the archive is the report made from the store, word for word, and the steps read back
    equal the store's (the fields the figures read), MACs included."""
    from caffe_prune import archive, cli, store
    five = ["mean_activations", "taylor", "fisher", "mean_gradients", "mean_sq_weights"]
    results = [("LeNet-5", None, s, v, five) for s, v in ((0, 28.25), (1, 32.0))]
    results += [("LeNet-5", m, s, v) for m, base in (("activation/taylor/l1/count", 10.0),
                                                     ("activation/x/l1/weights_removed", 14.0),
                                                     ("domino-sum:activation/x/l1/weights_removed", 17.0))
                for s, v in ((0, base), (1, base + 1 / 3))]
    directory = fake_store(tmp_path / "sweep", results)
    assert cli.main(["results", str(directory), "--archive", str(tmp_path / "archive")]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'archive'}: 8 finished runs (24 steps), 8 of them added from " \
                                      f"{directory}\n"
    assert sorted(p.name for p in (tmp_path / "archive").iterdir()) == ["runs.csv", "steps.csv.gz"]
    from_store = report.write_reports(directory, tmp_path / "a")
    from_archive = report.write_reports(tmp_path / "archive", tmp_path / "b")
    assert [p.name for p in from_store] == [p.name for p in from_archive] == ["oracle.md", "taxonomy.md", "domino.md"]
    for a, b in zip(from_store, from_archive):
        assert a.read_text() == b.read_text()
    by_macs = [report.write_reports(d, tmp_path / o, kinds=["oracle"], x="macs")[0].read_text()
               for d, o in ((directory, "c"), (tmp_path / "archive", "d"))]
    assert by_macs[0] == by_macs[1]
    assert "| Myopic Oracle (k=16) | 15.1 ± 11.9 (n=2) | - |" in by_macs[0]       # the halves: 14.125, 16
    assert "Multiply-accumulates per image removed" in by_macs[0]
    assert "| Myopic Oracle (k=16) | 30.1 ± 23.8 (n=2) |" in from_archive[0].read_text()
    with store.Store(directory) as s:
        stored = {r["id"]: s.steps(r["id"]) for r in s.runs()}
    for run in archive.read(tmp_path / "archive"):
        assert len(run["steps"]) == len(stored[run["id"]]) == 3
        for got, want in zip(run["steps"], stored[run["id"]]):
            assert got["test"] == want["test"] and got["percent_conv_removed"] == want["percent_conv_removed"]
            assert got.get("percent_macs_removed") == want.get("percent_macs_removed")
    with pytest.raises(Exception, match="is not a results archive"):
        archive.read(tmp_path / "a")


def test_plugin_metrics_stay_out_of_the_components_they_lack():
    """A plugin's bare pointwise function has no input, reduction or scaling: the component and
    weights-removed views leave it out of those components rather than comparing None with names."""
    means = {"activation/taylor/l1/count": 10.0, "activation/taylor/l1/weights_removed": 20.0,
             "plugin:entropy": 50.0, "plugin:entropy/weights_removed": 70.0}
    scaling = {row[0]: row[1:3] for row in report_stats.component_effects(means, "scaling")}
    assert scaling == {"count": (1, 10.0), "weights_removed": (2, 45.0)}     # (20 + 70) / 2
    pointwise = {row[0]: row[1] for row in report_stats.component_effects(means, "pointwise")}
    assert pointwise == {"taylor": 2, "plugin:entropy": 2}
    assert report_stats.weights_removed_view(means) == [("count", 1, 10.0, 0.0, 1)]


def test_ties_rank_by_name_and_the_best_table_follows_the_ranking(tmp_path):
    """Equal scores that differ in the last bits (the same groups, summed in another order) tie, and
    break by name; the best of the five and the best constructed metric are the first of the ranking."""
    from caffe_prune.report.taxonomy import best_table
    results = [("LeNet-5", "activation/g/l1/count", 0, 30.000000000000004),        # mean_gradients
               ("LeNet-5", "activation/taylor/l1/count", 0, 29.999999999999996),   # taylor
               ("LeNet-5", "activation/x/l2/count", 0, 35.0),
               ("LeNet-5", "activation/x/l1/weights_removed", 0, 34.99999999999999)]
    runs = report.runs_from_store(fake_store(tmp_path, results))
    assert [m for m, *_ in report_stats.ranking(report_stats.scores_of(runs))] == [
        "activation/x/l1/weights_removed", "activation/x/l2/count", "activation/g/l1/count",
        "activation/taylor/l1/count"]
    assert ("| LeNet-5 | 4 | `activation/x/l1/weights_removed` | 35.0 ± 0.0 (n=1) | mean_gradients "
            "(`activation/g/l1/count`) | 30.0 ± 0.0 (n=1) | +5.0 ± 0.0 | mean_gradients 3, taylor 4 |") in best_table(runs)

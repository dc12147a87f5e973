"""The report: the table next to the published values, the figures, the protocol."""
import json

from caffe_prune import pruning, report
from conftest import PUBLISHED, SHARED, SUBSET


def test_transcribed_table2_matches_the_workplace_reference():
    shared = json.loads((SHARED / "reference" / "published.json").read_text())
    assert report.PUBLISHED_TABLE2 == shared["table2_conv_weights_removed_percent_at_max_5pt_test_drop"]


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
            expected = pruning.removed_at_drop(steps)
    path = report.write_report(dirs, tmp_path / "report")
    text = path.read_text()
    assert f"| Mean squares of weights | {expected:.1f} ± 0.0 (n=1) | 7 |" in text
    assert "| Myopic Oracle (k=16) |" in text and "30 ± 10" in text
    assert "1017 test images" in text or "5085 train / 1017 test" in text
    for png in ("figure6-LeNet-5.png", "phases-LeNet-5.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

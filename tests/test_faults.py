"""Damaged files and full disks: each is one line and exit status 2, nothing lost, files unchanged.

- an LMDB whose data.mdb is cut short (to half, to its two meta pages, to 5000 bytes) used to end
  `evaluate` and `prune` with SIGBUS; caffe_prune.data.lmdb_meta reads the meta pages first;
- a run directory whose config.json is empty or torn is rebuilt only by the command its steps agree
  with; another metric or method is refused and appends nothing;
- `--target` on a net with nothing prunable (an InnerProduct-only net, a convolution whose only
  channel is its last) says the budget cannot be reached;
- `results`/`report` on a zero-length results.sqlite say so and leave it at 0 bytes;
- `data synthetic` onto a full filesystem (a 2 MiB tmpfs) names the path, the bytes it needs and
  the bytes free, and leaves nothing behind.

Every command runs as `python -m caffe_prune` in a child with a deadline, in a temporary directory."""
import hashlib
import json
import os
import re
import subprocess
import sys
import uuid

import pytest

from caffe_prune import pycaffe
from caffe_prune.data import lmdb_meta, synthetic
from caffe_prune.data.synthetic import write_random_lmdb
from caffe_prune.errors import DataError
from conftest import REPO

NET = """name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""
IP_ONLY = """name: "ip_only"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""
ONE_CONV = NET.replace("num_output: 4 kernel_size: 3", "num_output: 1 kernel_size: 3")
PROGRESS = re.compile(r"\d+/\d+ \[|\|.*\[|it/s\]|\?(img|batch|rec|group)/s")     # tqdm's lines on stderr
PRUNE = ["--data", "db", "--val-from", "test", "--batch-size", "8", "--test-size", "1", "--eval-size", "1", "--quiet",
         "--no-drop-stop"]


def cli(argv, cwd, timeout=120):
    """`caffe-prune ARGV` in a child process: (exit status or -signal, stdout, stderr)."""
    env = {**os.environ, "GLOG_minloglevel": "2", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "caffe_prune", *map(str, argv)], cwd=cwd, env=env, timeout=timeout,
                          capture_output=True, text=True, errors="replace")
    return done.returncode, done.stdout, done.stderr


def one_error(status, err) -> str:
    """The one error line of a refused command (notes and progress bars aside)."""
    assert status == 2, f"exit {status}: {err[-800:]}"
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("note: ") and not PROGRESS.search(l)]
    assert len(lines) == 1 and lines[0].startswith("caffe-prune: error: "), err
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_net(tmp, text=NET, name="net"):
    (tmp / f"{name}.prototxt").write_text(text)
    pycaffe.load_net(tmp / f"{name}.prototxt").save(str(tmp / f"{name}.caffemodel"))
    return f"{name}.prototxt", f"{name}.caffemodel"


# ---- LMDBs cut short ----

@pytest.fixture
def lmdbs(caffe, tmp_path):
    """An intact LMDB of 3x8x8 Datums (values inline in leaf pages) and copies cut short."""
    small_net(tmp_path)
    write_random_lmdb(tmp_path / "db", 600, (3, 8, 8), classes=3, progress=False)
    whole = (tmp_path / "db" / "data.mdb").read_bytes()
    meta = lmdb_meta.read(tmp_path / "db" / "data.mdb")
    for name, size in (("half", len(whole) // 2), ("metas", 2 * meta.page_size), ("short", 5000)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.mdb").write_bytes(whole[:size])
    return tmp_path


def test_the_meta_page_says_what_an_intact_lmdb_holds(lmdbs):
    import lmdb
    path = lmdbs / "db" / "data.mdb"
    meta = lmdb_meta.read(path)
    with lmdb.open(str(lmdbs / "db"), readonly=True, lock=False) as env:
        entries, psize = env.stat()["entries"], env.stat()["psize"]
    assert (meta.entries, meta.page_size) == (entries, psize) == (600, os.sysconf("SC_PAGE_SIZE"))
    assert meta.needed_bytes <= path.stat().st_size and meta.needed_bytes > path.stat().st_size - meta.page_size
    assert lmdb_meta.check(lmdbs / "db", "here") == meta
    assert lmdb_meta.check(lmdbs / "nothing-there", "here") is None


@pytest.mark.parametrize("copy", ["half", "metas", "short"])
@pytest.mark.parametrize("command", ["evaluate", "prune"])
def test_a_truncated_lmdb_is_one_line_not_sigbus(lmdbs, copy, command):
    before = sha(lmdbs / copy / "data.mdb")
    argv = ["evaluate", "net.prototxt", "net.caffemodel", "--data", copy] if command == "evaluate" else \
        ["prune", "net.prototxt", "net.caffemodel", *PRUNE, "--metric", "mean_sq_weights", "--max-steps", "1",
         "--out", "run"]
    if command == "prune":
        argv[argv.index("db")] = copy
    status, _, err = cli(argv, lmdbs)
    assert status != -7, "SIGBUS"
    line = one_error(status, err)
    assert f"{copy}/data.mdb is truncated: {(lmdbs / copy / 'data.mdb').stat().st_size:,} bytes" in line
    assert "reading it would fault (SIGBUS)" in line
    assert sha(lmdbs / copy / "data.mdb") == before and sorted(p.name for p in (lmdbs / copy).iterdir()) == ["data.mdb"]


def test_the_intact_lmdb_still_evaluates(lmdbs):
    status, out, err = cli(["evaluate", "net.prototxt", "net.caffemodel", "--data", "db", "--json"], lmdbs)
    assert status == 0, err
    assert json.loads(out.splitlines()[-1])["images"] == 600


# ---- a run header that cannot be lost ----

@pytest.fixture(scope="module")
def metric_run(caffe, tmp_path_factory):
    """A 2-step mean_sq_weights run of the small net (made once; each test copies it)."""
    tmp = tmp_path_factory.mktemp("run")
    small_net(tmp)
    write_random_lmdb(tmp / "db", 64, (3, 8, 8), classes=3, progress=False)
    status, _, err = cli(["prune", "net.prototxt", "net.caffemodel", *PRUNE, "--metric", "mean_sq_weights",
                          "--max-steps", "2", "--out", "run"], tmp)
    assert status == 0, err
    return tmp


@pytest.fixture
def torn(metric_run, tmp_path):
    import shutil
    for name in ("net.prototxt", "net.caffemodel", "db", "run"):
        (shutil.copytree if (metric_run / name).is_dir() else shutil.copy)(metric_run / name, tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("damage", ["empty", "torn"])
@pytest.mark.parametrize("method", [["--metric", "taylor"], ["--oracle", "mean_sq_weights,taylor", "--k", "2"]],
                         ids=["another metric", "an oracle"])
def test_a_torn_header_is_not_rebuilt_by_another_method(torn, damage, method):
    config = torn / "run" / "config.json"
    config.write_bytes(b"" if damage == "empty" else config.read_bytes()[:len(config.read_bytes()) // 2])
    before = {name: sha(torn / "run" / name) for name in ("config.json", "steps.jsonl")}
    status, _, err = cli(["prune", "net.prototxt", "net.caffemodel", *PRUNE, *method, "--max-steps", "4",
                          "--out", "run"], torn)
    line = one_error(status, err)
    assert "run/config.json is empty or torn, and its 2 steps were decided by mean_sq_weights, not by " in line
    assert {name: sha(torn / "run" / name) for name in before} == before      # nothing appended, nothing rebuilt


def test_a_torn_header_is_rebuilt_by_the_runs_own_command(torn):
    (torn / "run" / "config.json").write_bytes(b"")
    status, _, err = cli(["prune", "net.prototxt", "net.caffemodel", *PRUNE, "--metric", "mean_sq_weights",
                          "--max-steps", "3", "--out", "run"], torn)
    assert status == 0, err
    assert json.loads((torn / "run" / "config.json").read_text())["config"]["metric"] == "mean_sq_weights"
    steps = [json.loads(l) for l in (torn / "run" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 1, 2, 3]
    assert {p[0] for s in steps[1:] for group in s["proposers"] for p in group} == {"mean_sq_weights"}


def test_force_starts_a_torn_run_over_with_another_metric(torn):
    (torn / "run" / "config.json").write_bytes(b"{")
    status, _, err = cli(["prune", "net.prototxt", "net.caffemodel", *PRUNE, "--metric", "taylor", "--max-steps", "1",
                          "--force", "--out", "run"], torn)
    assert status == 0, err
    steps = [json.loads(l) for l in (torn / "run" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and steps[1]["proposers"][0][0][0] == "taylor"
    assert json.loads((torn / "run" / "config.json").read_text())["config"]["metric"] == "taylor"


# ---- budgets nothing can reach ----

@pytest.mark.parametrize("text, says", [
    (IP_ONLY, "--target macs=0.5 cannot be reached: ip_only.prototxt has no prunable channel group"),
    (ONE_CONV, "--target macs=0.5 not reached: after step 0 nothing more may be pruned"),
], ids=["InnerProduct only", "one channel"])
def test_a_target_on_a_net_with_nothing_prunable_is_one_line(caffe, tmp_path, text, says):
    name = "ip_only" if text is IP_ONLY else "one_conv"
    net, weights = small_net(tmp_path, text, name)
    write_random_lmdb(tmp_path / "db", 32, (3, 8, 8), classes=3, progress=False)
    status, _, err = cli(["prune", net, weights, *PRUNE, "--metric", "mean_sq_weights", "--target", "macs=0.5",
                          "--out", "run"], tmp_path)
    line = one_error(status, err)
    assert says in line and "left of the original: macs 1.000" in line
    steps = (tmp_path / "run" / "steps.jsonl").read_text().splitlines()
    assert len(steps) == 1 and json.loads(steps[0])["percent_conv_removed"] == 0.0    # step 0 kept


# ---- a results store of zero bytes ----

@pytest.mark.parametrize("argv", [["results", "sweep"], ["results", "sweep/results.sqlite"], ["report", "sweep"]],
                         ids=["results DIR", "results FILE", "report"])
def test_an_empty_results_store_is_one_line_and_stays_empty(tmp_path, argv):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "results.sqlite").write_bytes(b"")
    status, _, err = cli(argv, tmp_path)
    assert "results.sqlite is empty (0 bytes): not a results store" in one_error(status, err)
    assert [(p.name, p.stat().st_size) for p in (tmp_path / "sweep").iterdir()] == [("results.sqlite", 0)]


# ---- a full disk ----

@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs (needs root and a kernel that lets it mount one), unmounted after."""
    where = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(done.stderr or done.stdout).strip() or 'mount failed'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_synthetic_onto_a_full_filesystem_is_one_line(caffe, small_tmpfs):
    status, _, err = cli(["data", "synthetic", small_tmpfs / "db", "--images", "1000", "--shape", "3,32,32"],
                         small_tmpfs.parent)
    line = one_error(status, err)
    needed = synthetic.bytes_needed(1000, 3072 + 12)
    assert f"{small_tmpfs / 'db'}: 1,000 Datums of 3x32x32: the LMDB needs about" in line
    assert "bytes and its filesystem has 2,097,152 free" in line
    assert 4_000_000 < needed < 4_300_000 and f"{needed:,}" in line
    assert list(small_tmpfs.iterdir()) == []


def test_a_write_that_fills_the_disk_anyway_is_one_line(caffe, small_tmpfs, monkeypatch):
    """The estimate said it fits (here: told so), the commit fails: the partial LMDB is removed and
    the error says how much was needed and what is free."""
    real = synthetic._free_bytes
    answers = iter([10 ** 12])
    monkeypatch.setattr(synthetic, "_free_bytes", lambda d: next(answers, None) or real(d))
    with pytest.raises(DataError, match=r"db: writing it failed \(.*\): the LMDB needs about [\d,]+ bytes and its "
                                        r"filesystem has [\d,]+ free"):
        write_random_lmdb(small_tmpfs / "db", 1000, (3, 32, 32), progress=False)
    assert list(small_tmpfs.iterdir()) == []


def test_bytes_needed_matches_what_lmdb_writes(caffe, tmp_path):
    """The estimate against the file liblmdb wrote, for values in leaf pages and in overflow pages."""
    for shape, images in (((3, 8, 8), 600), ((3, 32, 32), 300)):
        out = write_random_lmdb(tmp_path / f"db{shape[1]}", images, shape, classes=10, progress=False)
        written = (tmp_path / f"db{shape[1]}" / "data.mdb").stat().st_size
        datum = pycaffe.caffe_pb2().Datum(channels=shape[0], height=shape[1], width=shape[2], data=bytes(
            shape[0] * shape[1] * shape[2]), label=9)
        estimate = synthetic.bytes_needed(images, datum.ByteSize())
        assert written <= estimate <= 1.5 * written + 4 * 4096, (shape, written, estimate, out)

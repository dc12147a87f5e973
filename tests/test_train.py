"""Training with Caffe's solvers (caffe_prune.train), fine-tuning pruned networks (caffe_prune.finetune)
and prune-retrain schedules (caffe_prune.pruning): it learns, it snapshots and resumes to the same
bits, pruned parameters stay exactly 0 under every solver, a masked and an exported fine-tuning
compute the same net, Caffe's own cifar10_quick trains unchanged, bad input is one line."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from caffe_prune import cli, finetune, masking, pruning, pycaffe, train
from caffe_prune.metrics import methods
from caffe_prune.data import cifar10, cifar10_convert
from caffe_prune.data.dataset import open_dataset
from caffe_prune.session import Network, Session
from caffe_prune.errors import InputError
from caffe_prune.steps import pruned_of
from conftest import PUBLISHED, REPO, SUBSET, evaluation

pytestmark = pytest.mark.xdist_group("test_train")       # one process: its module fixtures are costly

LENET = PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel"
CIFAR10 = PUBLISHED / "CIFAR10-CIFAR10" / "original.caffemodel"
SOURCE = cifar10.CACHE_ROOT / "downloads" / "caffe_1.0.0+git20180821.99bd997.orig.tar.gz"


@pytest.fixture(scope="module")
def data_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    cifar10_convert.prepare(SUBSET, out, progress=False)
    return out


def lenet(data_out, *solver_set):
    return train.recipe("LeNet-5", SUBSET, data_out, solver_set, progress=False)


def run(data_out, out, *solver_set, **kw):
    return train.train(lenet(data_out, *solver_set), out, mode="cpu", progress=False, **kw)


def caffemodel_arrays(path) -> dict:
    """{layer: [arrays]} of a caffemodel, read with protobuf (not through the net that trained it)."""
    model = pycaffe.read_caffemodel(path)
    return {layer.name: [np.asarray(b.data, dtype=np.float32).reshape(tuple(b.shape.dim)) for b in layer.blobs]
            for layer in model.layer if layer.blobs}


# ---- training: learns, snapshots, resumes ----------------------------------------------------------

@pytest.mark.slow
def test_lenet5_from_scratch_beats_chance(caffe, data_out, tmp_path):
    """300 iterations of the published schedule (lr 0.001, momentum 0.9) on 5085 images: measured
    36.5% top-1 on the 1017 test images; chance is 10%. The curve is a PNG beside the run."""
    done = run(data_out, tmp_path, max_iter=300)
    assert done["iterations"] == 300
    scores = evaluation("LeNet-5", done["weights"], None)
    assert scores["top1"] > 0.25
    # the solver's test net (8 batches, wrapping around to 1024 images) agrees with the exact count
    assert done["test_top1_net"] == pytest.approx(scores["top1"], abs=0.03)
    curve = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert [c["iter"] for c in curve] == [0, 100, 200, 300] and curve[-1]["loss"] < curve[1]["loss"]
    assert curve[0]["loss"] is None and curve[0]["test_top1"] < 0.2          # Caffe's test_initialization
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_from_the_snapshot_to_the_same_bits(caffe, data_out, tmp_path):
    """20 iterations, killed-and-resumed at a snapshot (Ctrl-C's path: a snapshot, then --resume
    latest) ends with the bits of 20 uninterrupted iterations: the train net's data layer is
    advanced past the batches already trained on (Caffe's own restore would start them over)."""
    whole = run(data_out, tmp_path / "whole", "display=5", max_iter=20)
    first = run(data_out, tmp_path / "parts", "display=5", max_iter=12)
    assert first["solverstate"].endswith("LeNet-5_iter_12.solverstate")
    more = run(data_out, tmp_path / "parts", "display=5", max_iter=20, resume="latest")
    assert more["iterations"] == 20 and more["solverstate"].endswith("_iter_20.solverstate")
    a, b = caffemodel_arrays(whole["weights"]), caffemodel_arrays(more["weights"])
    for layer in a:
        for x, y in zip(a[layer], b[layer]):
            np.testing.assert_array_equal(x, y)
    curve = [json.loads(line)["iter"] for line in (tmp_path / "parts" / "curve.jsonl").read_text().splitlines()]
    assert curve == [0, 5, 10, 12, 15, 20]
    asked = json.loads((tmp_path / "parts" / "train.json").read_text())
    assert asked["resumed"][0]["from"].endswith("LeNet-5_iter_12.solverstate")
    # every snapshot left is whole: the newest solverstate has its caffemodel; nothing under .writing
    assert train.latest_solverstate(tmp_path / "parts").name == "LeNet-5_iter_20.solverstate"
    assert not list((tmp_path / "parts" / "snapshots" / ".writing").iterdir())
    # a fresh start into a directory with snapshots is refused; --resume of a finished run trains nothing
    with pytest.raises(InputError, match="holds snapshots of an earlier training"):
        run(data_out, tmp_path / "parts", max_iter=20)


def test_impossible_arguments(caffe, data_out, tmp_path):
    with pytest.raises(InputError, match="--iters must be at least 1"):
        run(data_out, tmp_path, max_iter=0)
    with pytest.raises(InputError, match="no .solverstate under"):
        run(data_out, tmp_path / "fresh", max_iter=5, resume="latest")
    with pytest.raises(InputError, match="is neither a prototxt nor one of the built-in networks"):
        train.recipe("LeNet-7", progress=False)
    with pytest.raises(InputError, match="is not KEY=VALUE with a SolverParameter field"):
        lenet(data_out, "learning_rate=0.1")
    with pytest.raises(InputError, match="the run directory decides it"):
        lenet(data_out, "snapshot_prefix=x")
    solver = lenet(data_out, "base_lr=0.01", "lr_policy=step", "stepsize=7", "test_iter=3", "type=Nesterov").solver
    assert (solver.base_lr, solver.lr_policy, solver.stepsize, list(solver.test_iter), solver.type) == \
        (pytest.approx(0.01), "step", 7, [3], "Nesterov")


# ---- parameters held at zero --------------------------------------------------------------------

def history_of(state_path, net) -> list:
    """The solverstate's history blobs, as arrays shaped like the net's learnable params (in order)."""
    proto = pycaffe.caffe_pb2().SolverState()
    proto.ParseFromString(state_path.read_bytes())
    shapes = [blob.data.shape for blobs in net.params.values() for blob in blobs]
    return [np.asarray(h.data, np.float32).reshape(shapes[i % len(shapes)]) for i, h in enumerate(proto.history)]


@pytest.mark.parametrize("kind", ["SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"])
def test_held_zero_is_exact_under_every_solver(caffe, data_out, tmp_path, kind):
    """A third of LeNet-5's groups held at zero for 6 iterations of each Caffe solver type (weight
    decay on): every held weight and every history value (momentum; Adam's m and v) is exactly 0 in
    the saved caffemodel and solverstate, and the other weights did move."""
    session = Session(Network.open("LeNet-5"), str(LENET), None, batch_size=4)
    masker = masking.Masker(session.graph, [session.net])
    groups = list(range(0, len(session.graph.groups), 3))
    held = train.HeldZero.of(masker, groups, "a third of the groups")
    extra = {"AdaGrad": ["momentum=0"], "AdaDelta": ["momentum=0.95", "base_lr=1"], "Adam": ["momentum=0.9"],
             "RMSProp": ["momentum=0", "rms_decay=0.98"]}.get(kind, [])
    done = run(data_out, tmp_path, f"type={kind}", "display=3", *extra, max_iter=6, weights=LENET, held=held)
    assert done["held_zero"] == {"values": held.values, "nonzero_after": 0}
    trained, original = caffemodel_arrays(done["weights"]), caffemodel_arrays(LENET)
    state = train.latest_solverstate(tmp_path)
    history = history_of(state, session.net)
    index = {(layer, b): i for i, (layer, b) in enumerate((l, b) for l, blobs in session.net.params.items()
                                                              for b in range(len(blobs)))}
    for (layer, blob), mask in held.masks.items():
        assert np.count_nonzero(trained[layer][blob][mask]) == 0
        for h in history[index[(layer, blob)]::len(index)]:          # Adam keeps m, then v
            assert np.count_nonzero(h[mask]) == 0
        assert not np.array_equal(trained[layer][blob][~mask], original[layer][blob][~mask])


# ---- fine-tuning a pruned LeNet-5: masked and exported -----------------------------------------

@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """The published LeNet-5 pruned by the oracle until at least 30% of its conv weights are gone
    (measured: step 11, 30.6%, 71.1% -> 64.8% top-1 on the subset's 1017 test images)."""
    out = tmp_path_factory.mktemp("pruned")
    config = pruning.Config(net="LeNet-5", weights=str(LENET), oracle=list(methods.PAPER_FIVE), test_size=8,
                            max_drop=None, max_steps=13, data=str(SUBSET))
    steps = pruning.Run(config, out, progress=False).run()
    step = next(s["step"] for s in steps[1:] if s["percent_conv_removed"] >= 30)
    return out, step, steps


@pytest.mark.slow
def test_finetune_masked_and_exported(caffe, data_out, pruned, tmp_path):
    """Fine-tuning LeNet-5 after the oracle removed 30% of its conv weights, 100 iterations of the
    published schedule: measured 64.80% -> 68.83% top-1 (1017 test images), every pruned value
    exactly 0 in the fine-tuned caffemodel and in the momentum history; the exported compact net,
    fine-tuned on the same iterations, has the surviving weights and the logits of the masked one
    (measured: logits within 2.2e-5 of magnitude 33, the same top-1)."""
    run_dir, step, steps = pruned
    done = finetune.finetune(run_dir, step, iters=100, data=SUBSET, data_out=data_out, out=tmp_path / "masked",
                             mode="cpu", progress=False)
    assert done["before"]["top1"] == pytest.approx(steps[step]["test"]["top1"], abs=1e-6)   # all 1017 = test_size 8
    assert done["after"]["top1"] >= done["before"]["top1"] + 0.02, (done["before"], done["after"])
    assert done["held_zero"]["nonzero_after"] == 0 and done["held_zero"]["values"] > 0.3 * 26500

    # the zeros, checked on the blobs of the saved files against regions computed here
    session = Session(Network.open("LeNet-5"), str(LENET), None, batch_size=4)
    groups = pruned_of(steps[1:step + 1])
    regions = [r for g in groups for r in masking.regions(session.graph, session.graph.groups[g])]
    trained = caffemodel_arrays(done["weights"])
    history = history_of(train.latest_solverstate(tmp_path / "masked"), session.net)
    order = [(l, b) for l, blobs in session.net.params.items() for b in range(len(blobs))]
    for layer, blob, index in regions:
        assert not trained[layer][blob][index].any()
        assert not history[order.index((layer, blob))][index].any()

    # the exported form: the compact net of the same groups, fine-tuned the same way
    assert cli.main(["export", "LeNet-5", str(LENET), "--groups", ",".join(map(str, groups)),
                     "--out", str(tmp_path / "exported")]) == 0
    compact = tmp_path / "exported" / "train_val.prototxt"        # the compact train/test definition
    recipe = train.recipe(compact, SUBSET, data_out, progress=False)
    assert recipe.data["channel_order"] == "bgr"        # its sources are named as the BGR LMDBs
    small = train.train(recipe, tmp_path / "exported-ft", weights=tmp_path / "exported" / "LeNet-5.caffemodel",
                        max_iter=100, mode="cpu", progress=False)
    small_scores = train.score(recipe, small["weights"])
    assert small_scores["top1"] == pytest.approx(done["after"]["top1"], abs=0.002)
    x = open_dataset(Network.open("LeNet-5"), SUBSET, progress=False, holdout=False).test.x[:256]
    masked_logits = Session(Network.open("LeNet-5"), done["weights"], None, input_shape=(3, 32, 32)).logits(x)
    small_logits = Session(Network.open(str(compact), (3, 32, 32)), small["weights"], None,
                           input_shape=(3, 32, 32)).logits(x)
    # 100 SGD iterations of two nets of different shapes amplify their BLAS's rounding differently with
    # the CPU (measured: 2.2e-5 relative on one machine, 7.0e-4 on an AMD EPYC, the same code; the
    # weights below then differ by up to 2e-6 and 2.7e-5); the exports themselves agree within 1e-5
    # (tests/test_export.py)
    assert np.abs(masked_logits - small_logits).max() <= 2e-3 * np.abs(masked_logits).max()
    gone = {"out": {}, "in": {}}            # from the groups' channels and consumers, not their slices
    for group in (session.graph.groups[g] for g in groups):
        for unit in group.channels:
            gone["out"].setdefault(unit.layer, set()).add(unit.index)
        for consumer in group.consumers:
            gone["in"].setdefault(consumer.layer, set()).add(consumer.input_channel)
    compact_arrays = caffemodel_arrays(small["weights"])
    for layer in ("conv1", "conv2"):
        keep_out = [c for c in range(trained[layer][0].shape[0]) if c not in gone["out"].get(layer, set())]
        keep_in = [c for c in range(trained[layer][0].shape[1]) if c not in gone["in"].get(layer, set())]
        np.testing.assert_allclose(trained[layer][0][keep_out][:, keep_in], compact_arrays[layer][0], atol=1e-4)


# ---- Caffe's own example, unchanged -------------------------------------------------------------

CIFAR10_QUICK = ("examples/cifar10/cifar10_quick_solver.prototxt", "examples/cifar10/cifar10_quick_train_test.prototxt")


@pytest.mark.slow
def test_bvlc_cifar10_quick_trains_unchanged(caffe, data_out, tmp_path, monkeypatch, capsys):
    """Caffe's examples/cifar10 quick solver and net, byte for byte from the verified source tarball, run
    from the source root as Caffe's train_quick.sh does: its LMDBs are the project's (linked where
    create_cifar10.sh would write them) and its mean.binaryproto is made by Caffe's compute_image_mean.
    60 iterations of its schedule (lr 0.001, momentum 0.9, weight decay 0.004) from its fillers:
    measured 32.7% top-1 on the 1017 test images (chance 10%)."""
    if not SOURCE.is_file():
        pytest.fail(f"{SOURCE} is missing: `make setup` fetches it (tools/caffe/build.sh)")
    root = tmp_path / "caffe"
    with tarfile.open(SOURCE) as tar:
        tar.extractall(root, members=[m for m in tar.getmembers() if m.name in CIFAR10_QUICK])
    originals = {name: (root / name).read_bytes() for name in CIFAR10_QUICK}
    example = root / "examples" / "cifar10"
    for split in ("train", "test"):
        (example / f"cifar10_{split}_lmdb").symlink_to(data_out / f"cifar10-{split}-lmdb")
    tool = pycaffe.caffe_tool("compute_image_mean")
    assert tool is not None, "the Caffe build has no compute_image_mean"
    subprocess.run([str(tool), "-backend=lmdb", str(example / "cifar10_train_lmdb"), str(example / "mean.binaryproto")],
                   check=True, capture_output=True)
    monkeypatch.chdir(root)
    code = cli.main(["train", CIFAR10_QUICK[0], "--iters", "60", "--out", str(tmp_path / "run"), "--quiet", "--cpu"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert {name: (root / name).read_bytes() for name in CIFAR10_QUICK} == originals
    done = json.loads((tmp_path / "run" / "result.json").read_text())
    asked = json.loads((tmp_path / "run" / "train.json").read_text())
    assert done["iterations"] == 60 and asked["source"]["kind"] == "solver"
    assert asked["source"]["net"] == CIFAR10_QUICK[1]
    used = pycaffe.read_prototxt(tmp_path / "run" / "solver.prototxt", pycaffe.caffe_pb2().SolverParameter())
    assert (used.weight_decay, used.base_lr, list(used.test_iter)) == (pytest.approx(0.004), pytest.approx(0.001), [100])
    assert "solver_mode: GPU; training on the CPU" in printed.err
    scores = json.loads(printed.out[printed.out.index("{"):])["test"]
    assert scores["images"] == 1017 and scores["top1"] > 0.2
    assert (tmp_path / "run" / "curve.png").is_file() and (tmp_path / "run" / "CIFAR10_quick.caffemodel").is_file()


# ---- bad input: one line each ------------------------------------------------------------------

def one_line_error(capsys, argv) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_bad_input_is_one_line(caffe, data_out, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "solver.prototxt").write_text('net: "examples/nope.prototxt"\nbase_lr: 0.01\nmax_iter: 10\n')
    assert "solver.prototxt: its net examples/nope.prototxt does not exist (Caffe reads it relative to the " \
           f"working directory {tmp_path})" in one_line_error(capsys, ["train", "solver.prototxt"])
    assert "holds no weights for any layer of LeNet-5" in one_line_error(
        capsys, ["train", "LeNet-5", "--weights", str(PUBLISHED / "ResNet-20-CIFAR10" / "original.caffemodel"),
                 "--data", str(SUBSET), "--data-out", str(data_out), "--iters", "1", "--out", "a"])
    assert "layer 'conv1' blob 0 has shape (20, 3, 5, 5), the prototxt gives (32, 3, 5, 5)" in one_line_error(
        capsys, ["train", "CIFAR10", "--weights", str(LENET), "--data", str(SUBSET), "--data-out", str(data_out),
                 "--iters", "1", "--out", "b"])
    prune = ["prune", "LeNet-5", str(LENET), "--oracle", "--data", str(SUBSET), "--out", "c"]
    assert one_line_error(capsys, prune + ["--retrain-every", "0", "--retrain-iters", "5"]).endswith(
        "--retrain-every must be at least 1, got 0")
    assert one_line_error(capsys, prune + ["--retrain-every", "2"]).endswith(
        "--retrain-every S and --retrain-iters I go together")
    assert "is not a pruning run directory" in one_line_error(capsys, ["finetune", str(tmp_path)])
    # a run directory of LeNet-5, fine-tuned as CIFAR10
    config = pruning.Config(net="LeNet-5", weights=str(LENET), metric="mean_sq_weights", test_size=1, max_steps=2,
                            data=str(SUBSET))
    pruning.Run(config, tmp_path / "run", progress=False).run()
    assert "--step 5: " in one_line_error(capsys, ["finetune", "run", "--step", "5"])
    error = one_line_error(capsys, ["finetune", "run", "--net", "CIFAR10", "--data-out", str(data_out), "--iters", "1"])
    assert "CIFAR10 does not fit the pruning run run (steps 1..2): layer 'conv" in error and \
        "(a run directory from another network?)" in error
    assert not (tmp_path / "run" / "finetune-2" / "train.json").exists()      # refused before anything trained


# ---- prune-retrain: recorded, resumable, killed during a retraining ----------------------------

RETRAIN = [sys.executable, "-m", "caffe_prune", "prune", "LeNet-5", str(LENET), "--oracle", "--k", "4",
           "--test-size", "2", "--max-steps", "5", "--max-drop", "100", "--retrain-every", "2",
           "--retrain-iters", "40", "--data", str(SUBSET), "--quiet"]


def without_times(steps):
    def clean(step):
        out = {k: v for k, v in step.items() if k not in ("seconds", "phase_seconds", "peak_rss_mib")}
        if "retrain" in out:
            out["retrain"] = {k: v for k, v in out["retrain"].items() if k != "seconds"}
        return out
    return [clean(s) for s in steps]


@pytest.mark.slow
def test_retraining_killed_mid_way_resumes_to_the_same_end(caffe, tmp_path):
    """`prune --retrain-every 2 --retrain-iters 40`: steps 2 and 4 record their retraining (top-1
    before and after; the stop rule reads after). A run SIGKILLed inside the second retraining, just
    after its first snapshot, and restarted with the same command replays steps 1-3 from
    retrained-2.caffemodel, resumes the retraining from retrain-4/'s snapshot, and ends with the
    records and the retrained caffemodels, bit for bit, of an uninterrupted run."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(RETRAIN + ["--out", str(whole)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    steps = [json.loads(line) for line in (whole / "steps.jsonl").read_text().splitlines()]
    assert [("retrain" in s) for s in steps] == [False, False, True, False, True, False]
    for s in (steps[2], steps[4]):
        assert s["retrain"]["iters"] == 40 and s["retrain"]["before"] == s["test"]
        assert s["retrain"]["weights"] == f"retrained-{s['step']}.caffemodel"
    assert steps[2]["retrain"]["after"]["top1"] > steps[2]["retrain"]["before"]["top1"]
    assert (whole / "retrain-4" / "curve.png").is_file()
    assert not list((whole / "retrain-2" / "snapshots").glob("*_iter_*"))    # earlier retrainings' snapshots removed

    proc = subprocess.Popen(RETRAIN + ["--out", str(killed)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list((killed / "retrain-4" / "snapshots").glob("*.solverstate")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len((killed / "steps.jsonl").read_text().splitlines()) == 4          # steps 0..3 complete
    again = subprocess.run(RETRAIN + ["--out", str(killed)], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    resumed = json.loads((killed / "retrain-4" / "train.json").read_text())["resumed"]
    assert len(resumed) == 1 and "/retrain-4/snapshots/LeNet-5_iter_" in resumed[0]["from"]
    assert without_times([json.loads(line) for line in (killed / "steps.jsonl").read_text().splitlines()]) == \
        without_times(steps)
    for step in (2, 4):
        name = f"retrained-{step}.caffemodel"
        assert (killed / name).read_bytes() == (whole / name).read_bytes()

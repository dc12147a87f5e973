"""Algorithm 1 runs: the stop rule, determinism, a killed run resumed to the same end, bad input."""
import json
from pathlib import Path
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from caffe_prune import analysis, pruning, pycaffe
from caffe_prune.errors import InputError
from caffe_prune.steps import pruned_of
from conftest import PUBLISHED, REPO, SUBSET

LENET = PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel"
RESNET = PUBLISHED / "ResNet-20-CIFAR10" / "original.caffemodel"


def config(**kw):
    base = dict(net="LeNet-5", weights=str(LENET), metric="mean_activations", test_size=8)
    return pruning.Config(**{**base, **kw})


def steps_of(run_dir):
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]


DECISIONS = ("step", "groups", "proposers", "percent_conv_removed", "conv_weights", "test")


def decisions(steps):
    return [{k: s.get(k) for k in DECISIONS} for s in steps]


def test_stop_rule_and_counts(caffe, tmp_path):
    """With max_drop 1 point the run ends at the first step more than 1 point down; every record's
    counts match the graph; removed_at_drop is the last step within the drop."""
    run = pruning.Run(config(max_drop=1.0), tmp_path, data=SUBSET, progress=False)
    steps = run.run()
    initial = 100 * steps[0]["test"]["top1"]
    assert all(100 * s["test"]["top1"] >= initial - 1.0 for s in steps[1:-1])
    assert 100 * steps[-1]["test"]["top1"] < initial - 1.0
    pruned = set(pruned_of(steps[1:]))
    assert len(pruned) == len(steps) - 1
    assert steps[-1]["conv_weights"] == run.graph.conv_weights(pruned)
    assert analysis.removed_at_drop(steps, 1.0) == steps[-2]["percent_conv_removed"]


def test_removed_at_drop_by_hand():
    steps = [{"test": {"top1": 0.70}, "percent_conv_removed": 0},
             {"test": {"top1": 0.69}, "percent_conv_removed": 5},
             {"percent_conv_removed": 8},                          # not measured
             {"test": {"top1": 0.66}, "percent_conv_removed": 10},
             {"test": {"top1": 0.64}, "percent_conv_removed": 12},
             {"test": {"top1": 0.68}, "percent_conv_removed": 14}]  # after the drop: does not count
    assert analysis.removed_at_drop(steps, 5.0) == 10


def test_killed_run_resumes_to_the_same_end(caffe, tmp_path):
    """A run killed (SIGKILL) mid-way and restarted with the same command ends with exactly the
    decisions and measurements of an uninterrupted run with the same seed."""
    command = [sys.executable, "-m", "caffe_prune", "prune", "LeNet-5", str(LENET), "--oracle",
               "--k", "8", "--test-size", "2", "--max-steps", "14", "--max-drop", "100", "--seed", "3", "--data", str(SUBSET), "--quiet"]
    whole = tmp_path / "whole"
    subprocess.run(command + ["--out", str(whole)], check=True, cwd=REPO, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command + ["--out", str(killed)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (killed / "steps.jsonl").is_file() and len(steps_of(killed)) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 5 <= len(steps_of(killed)) < 15
    subprocess.run(command + ["--out", str(killed)], check=True, cwd=REPO, capture_output=True)
    assert decisions(steps_of(killed)) == decisions(steps_of(whole))
    assert len(steps_of(whole)) == 15


def test_same_seed_same_decisions_other_seed_other_batches(caffe, tmp_path):
    a = pruning.Run(config(max_steps=6, seed=1), tmp_path / "a", data=SUBSET, progress=False).run()
    b = pruning.Run(config(max_steps=6, seed=1), tmp_path / "b", data=SUBSET, progress=False).run()
    assert decisions(a) == decisions(b)
    run = pruning.Run(config(max_steps=6, seed=2), tmp_path / "c", data=SUBSET, progress=False)
    assert [len(x) for x, _ in run._batches(1, 0, 2)] == [128, 128]
    first = run._batches(1, 0, 2)[0][1]
    other = pruning.Run(config(max_steps=6, seed=1), tmp_path / "a", data=SUBSET, progress=False)._batches(1, 0, 2)[0][1]
    assert (first != other).any()


@pytest.mark.parametrize("kw, message", [
    (dict(metric=None, oracle=["taylor"], k=0), "--k must be at least 1"),
    (dict(metric="taylr"), "taylr"),
    (dict(max_drop=-1.0), "--max-drop must be >= 0"),
    (dict(metric=None, oracle=[]), "give exactly one of --metric M or --oracle"),
])
def test_impossible_arguments(caffe, tmp_path, kw, message):
    with pytest.raises(InputError, match=message):
        pruning.Run(config(**kw), tmp_path, data=SUBSET, progress=False)


def test_weights_of_another_network(caffe, tmp_path):
    with pytest.raises(InputError, match=r"holds no weights for layer\(s\) conv1, conv2, ip1, ip2 of the prototxt"):
        pruning.Run(config(weights=str(RESNET)), tmp_path, data=SUBSET, progress=False)


def test_out_dir_with_another_run_is_refused_unless_forced(caffe, tmp_path):
    pruning.Run(config(max_steps=2), tmp_path, data=SUBSET, progress=False).run()
    with pytest.raises(InputError, match=r"holds a run with a different configuration \(seed\)"):
        pruning.Run(config(max_steps=3, seed=9), tmp_path, data=SUBSET, progress=False)
    steps = pruning.Run(config(max_steps=3, seed=9), tmp_path, data=SUBSET, force=True, progress=False).run()
    assert len(steps) == 4 and json.loads((tmp_path / "config.json").read_text())["config"]["seed"] == 9


# ---- the run directory: atomic writes, torn files, contents not paths, one process at a time ------

def cli_prune(out, *extra, env=None, wait=True):
    command = [sys.executable, "-m", "caffe_prune", "prune", "LeNet-5", str(LENET), "--oracle", "--k", "4",
               "--test-size", "2", "--max-drop", "100", "--seed", "5", "--data", str(SUBSET), "--quiet",
               "--out", str(out), *extra]
    environment = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)


def lines(run_dir):
    path = run_dir / "steps.jsonl"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


@pytest.mark.slow
def test_kills_at_random_moments_and_inside_every_write(caffe, tmp_path):
    """SIGKILL at 20 seeded random moments, then inside each write of the run directory (the writer's
    test hook kills the process after a random number of bytes of its n-th write): every restart
    resumes, no completed step is ever lost (the count of complete lines never goes down), every
    directory stays readable, and the end equals an uninterrupted run's."""
    steps = 10
    whole = tmp_path / "whole"
    done = cli_prune(whole, "--max-steps", str(steps))
    assert done.returncode == 0, done.stderr
    reference = decisions(steps_of(whole))

    rng = np.random.default_rng(7)
    killed, complete = tmp_path / "killed", []
    for delay in rng.uniform(0.3, 4.0, size=20):
        proc = cli_prune(killed, "--max-steps", str(steps), wait=False)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        complete.append(lines(killed))
        assert all(json.loads(line) for line in (killed / "steps.jsonl").read_text().splitlines()[:-1]) \
            if (killed / "steps.jsonl").is_file() else True
    assert complete == sorted(complete)

    # the first process dies inside its first write (config.json); each later one completes one write
    # (the step its predecessor was killed appending) and dies inside the next append
    injected = tmp_path / "injected"
    kills = 0
    while True:
        before = lines(injected)
        line_bytes = int(rng.integers(1, 200))
        nth = 1 if kills == 0 else 2
        result = cli_prune(injected, "--max-steps", "4", env={"CAFFE_PRUNE_KILL_AT_WRITE": f"{nth}:{line_bytes}"})
        if result.returncode == 0:
            break
        assert result.returncode == -signal.SIGKILL, result.stderr
        kills += 1
        assert lines(injected) == before + (kills > 2)   # the torn line is not a complete step
        assert kills < 20
    assert kills == 1 + 5                        # config.json, then each of the 5 appends once
    assert not list(injected.glob(".*.tmp"))

    for run_dir, expected in ((killed, steps), (injected, 4)):
        result = cli_prune(run_dir, "--max-steps", str(expected))
        assert result.returncode == 0, result.stderr
        assert decisions(steps_of(run_dir)) == reference[:expected + 1]


def children(pid) -> list:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def holds(pid, path) -> bool:
    """Whether process ``pid`` has ``path`` open (its descriptor table in /proc)."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    target = str(Path(path).resolve())
    return any(os.path.realpath(fd) == target for fd in fds if fd.exists() or fd.is_symlink())


def alive(pid) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_kill_9_of_the_main_process_then_the_same_command_at_once(caffe, tmp_path):
    """`kill -9` of a run's main process while its fast-engine workers compute (what the OOM killer
    does), then the same command at once: 8 of 8 restarts take the lock and resume (none is refused
    as "in use" by the dead process: its workers never held the lock and die with it), and the run
    ends identical to an uninterrupted one."""
    argv = ("--max-steps", "40", "--k", "8", "--workers", "2")
    whole = tmp_path / "whole"
    assert cli_prune(whole, *argv).returncode == 0
    reference = decisions(steps_of(whole))
    killed, rng = tmp_path / "killed", np.random.default_rng(21)
    proc, with_workers = cli_prune(killed, *argv, wait=False), 0
    for delay in rng.uniform(2.0, 4.0, size=8):
        deadline = time.time() + delay
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, f"a restart did not run: {proc.returncode} {proc.stderr.read()}"
        workers = children(proc.pid)
        with_workers += bool(workers)
        if workers:          # the lock is the main process's alone: no worker inherited its descriptor
            assert holds(proc.pid, killed / ".lock") and not any(holds(w, killed / ".lock") for w in workers)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc = cli_prune(killed, *argv, wait=False)                    # the same command, at once
        deadline = time.time() + 5
        while time.time() < deadline and any(alive(w) for w in workers):
            time.sleep(0.02)
        assert not any(alive(w) for w in workers)                     # the workers died with their parent
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "in use" not in err
    assert with_workers >= 4                  # most kills came while the workers were computing
    assert decisions(steps_of(killed)) == reference


def test_two_processes_on_one_run_directory(caffe, tmp_path):
    """One wins; the other is refused with the holder's PID and exits non-zero; the record is whole."""
    first = cli_prune(tmp_path, "--max-steps", "6", wait=False)
    deadline = time.time() + 60
    while time.time() < deadline and not (tmp_path / "config.json").is_file():
        time.sleep(0.05)
    second = cli_prune(tmp_path, "--max-steps", "6")
    first.wait()
    assert first.returncode == 0, first.stderr
    assert second.returncode == 2
    error = second.stderr.strip().splitlines()
    assert len(error) == 1 and f"is in use by PID {first.pid} on " in error[0] and "Traceback" not in second.stderr
    assert [s["step"] for s in steps_of(tmp_path)] == list(range(7))
    assert cli_prune(tmp_path, "--max-steps", "6").returncode == 0       # the lock of an ended process is free


def test_torn_config_is_rebuilt_and_bad_steps_are_named(caffe, tmp_path):
    run = pruning.Run(config(max_steps=2), tmp_path, data=SUBSET, progress=False)
    run.run()
    (tmp_path / "config.json").write_text("")          # a kill during the first write, before atomic writes
    assert len(pruning.Run(config(max_steps=3), tmp_path, data=SUBSET, progress=False, force=False).run()) == 4
    assert json.loads((tmp_path / "config.json").read_text())["config"]["max_steps"] == 3
    with open(tmp_path / "steps.jsonl", "a") as stream:
        stream.write('{"step": 4, "group"')           # torn: cut off, and the step redone
    assert len(pruning.Run(config(max_steps=4), tmp_path, data=SUBSET, progress=False).run()) == 5
    assert (tmp_path / "steps.jsonl").read_text().endswith("}\n")
    with open(tmp_path / "steps.jsonl", "a") as stream:
        stream.write("{}\n")
    with pytest.raises(InputError, match=r"steps.jsonl:6 is not step 5 of this run; the run directory is damaged"):
        pruning.Run(config(max_steps=5), tmp_path, data=SUBSET, progress=False)
    other = tmp_path / "dir"
    (other / "steps.jsonl").mkdir(parents=True)
    with pytest.raises(InputError, match="steps.jsonl is a directory"):
        pruning.Run(config(max_steps=5), other, data=SUBSET, progress=False)


def test_resume_compares_contents_not_paths(caffe, tmp_path):
    weights = tmp_path / "a.caffemodel"
    weights.write_bytes(LENET.read_bytes())
    run_dir = tmp_path / "run"
    pruning.Run(config(weights=str(weights), max_steps=2), run_dir, data=SUBSET, progress=False).run()
    moved = tmp_path / "b.caffemodel"
    weights.rename(moved)                           # the same contents at another path: resumed
    steps = pruning.Run(config(weights=str(moved), max_steps=3), run_dir, data=SUBSET, progress=False).run()
    assert len(steps) == 4
    model = pycaffe.read_caffemodel(moved)
    model.layer[1].blobs[0].data[0] += 1.0          # other contents at the same path: refused
    moved.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match=r"different configuration \(weights_sha256 contents\)"):
        pruning.Run(config(weights=str(moved), max_steps=3), run_dir, data=SUBSET, progress=False)

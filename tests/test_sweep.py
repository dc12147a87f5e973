"""Sweeps: SPEC expansion and run ids, bad input, a sweep killed twice and resumed, a worker that
dies mid-run, and the Ray executor on a local two-node Ray cluster started here."""
import csv
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from caffe_prune import cli, pruning, store, sweep
from caffe_prune.metrics import taxonomy
from conftest import PUBLISHED, REPO, SUBSET

pytestmark = pytest.mark.xdist_group("test_sweep")       # one process: its module fixtures are costly

LENET = PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel"
ENV = {**os.environ, "CAFFE_PRUNE_DATA": str(SUBSET), "PYTHONUNBUFFERED": "1"}

# the acceptance sweep: LeNet-5, six taxonomy metrics (names, aliases, a glob) and their Domino
# variants, two seeds: 24 runs of 4 steps each
ACCEPTANCE = f"""
name = "acceptance"
data = "{SUBSET}"
seeds = [0, 1]
metrics = ["mean_sq_weights", "taylor", "activation/taylor/abs_sum/weights_removed", "activation/x/l1/*_layer",
           "activation/apoz/sum/count"]
domino = ["sum"]
networks = ["LeNet-5"]

[protocol]
max_steps = 4
test_size = 2
eval_size = 1
"""
# one longer run, for killing its worker: no drop stop, 14 steps
LONG = f"""
name = "long"
data = "{SUBSET}"
seeds = [5]
metrics = ["activation/taylor/l1/count"]
networks = ["LeNet-5"]

[protocol]
stop = "end"
max_steps = 14
test_size = 2
eval_size = 1
"""


def write_spec(tmp_path, text, name="spec.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def command(spec, out, *extra):
    return [sys.executable, "-m", "caffe_prune", "sweep", str(spec), "--out", str(out), "--quiet", *extra]


def start(spec, out, *extra):
    """The sweep as a terminal would run it: its own process group (Ctrl-C reaches the group)."""
    return subprocess.Popen(command(spec, out, *extra), cwd=REPO, env=ENV, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def sql(out, query, default=0):
    """A read of the store while a sweep writes it (plain sqlite3, so the reader never migrates)."""
    path = Path(out) / store.STORE_NAME
    if not path.is_file():
        return default
    try:
        with sqlite3.connect(path, timeout=30) as db:
            return db.execute(query).fetchone()[0]
    except sqlite3.OperationalError:      # tables not created yet
        return default


def done(out):
    return sql(out, "SELECT count(*) FROM runs WHERE status = 'done'")


def wait_until(condition, proc=None, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended (status {proc.returncode}) before the condition:\n"
                                 f"{proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def decisions(out) -> dict:
    """{run id: its step records without the timings} from the store."""
    with store.Store(out, create=False) as s:
        return {r["id"]: [{k: v for k, v in step.items() if k not in ("seconds", "phase_seconds", "peak_rss_mib")}
                          for step in s.steps(r["id"])] for r in s.runs()}


def alive(pid) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def assert_done_exactly_once(out, runs):
    with store.Store(out, create=False) as s:
        rows = s.runs()
        assert len(rows) == runs and {r["status"] for r in rows} == {"done"}
        assert {r["completions"] for r in rows} == {1}
        attempts = s.attempts()
        for r in rows:
            outcomes = [a["outcome"] for a in attempts if a["run_id"] == r["id"]]
            assert outcomes.count("done") == 1 and outcomes[-1] == "done", outcomes
            steps = s.steps(r["id"])
            assert [st["step"] for st in steps] == list(range(len(steps))) == list(range(r["steps"] + 1))
        return attempts


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The acceptance sweep run once without interruption (local executor)."""
    tmp = tmp_path_factory.mktemp("reference")
    spec = write_spec(tmp, ACCEPTANCE)
    done_ = subprocess.run(command(spec, tmp / "sweep"), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done_.returncode == 0, done_.stdout + done_.stderr
    assert "24 runs, 0 done before, 24 to run" in done_.stdout
    return tmp / "sweep", decisions(tmp / "sweep")


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("long")
    spec = write_spec(tmp, LONG)
    subprocess.run(command(spec, tmp / "sweep"), cwd=REPO, env=ENV, check=True, capture_output=True)
    return decisions(tmp / "sweep")


# ---- SPEC, expansion, ids (no pruning) ------------------------------------------------------------

def test_spec_expands_to_runs_with_stable_ids(tmp_path):
    spec = sweep.parse_spec(sweep.load_spec(write_spec(tmp_path, ACCEPTANCE)) | {
        "oracles": ["paper", ["mean_sq_weights", "taylor"]]})
    data = str(SUBSET)
    tasks = sweep.expand(spec, data)
    assert len(tasks) == (6 * 2 + 2) * 2
    methods = list(dict.fromkeys(t["method"] for t in tasks))
    assert methods[:6] == ["mean_sq_weights", "taylor", "activation/taylor/abs_sum/weights_removed",
                           "activation/x/l1/l1_layer", "activation/x/l1/l2_layer", "activation/apoz/sum/count"]
    # "paper" is papers/004's five in the SPEC's forms: the Table-2 forms by default, the code's on request
    assert methods[6] == "domino-sum:mean_sq_weights" and \
        methods[-2:] == ["oracle (table2 forms)", "oracle:mean_sq_weights+taylor"]
    assert [t["oracle"] for t in tasks if t["method"] == "oracle (table2 forms)"][0] == \
        ["mean_activations", "taylor", "eq4", "mean_gradients", "mean_sq_weights"]
    code = sweep.parse_spec({**spec.as_dict(), "oracles": ["paper"], "forms": "code"})
    assert {t["method"] for t in sweep.expand(code, data)} - set(methods[:-2]) == {"oracle"}
    assert len({t["id"] for t in tasks}) == len(tasks)
    # the id is the sha256 of the canonical JSON of the configuration, weights by content; fields added
    # later (pruning.later) are left out while they keep their default
    t = tasks[0]
    weights_sha = hashlib.sha256(LENET.read_bytes()).hexdigest()
    neutral = pruning.Config.neutral()
    identity = {k: v for k, v in {**t["config"], "weights": weights_sha, "data": data}.items()
                if not (k in neutral and v == neutral[k])}
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    assert t["id"] == hashlib.sha256(canonical.encode()).hexdigest() and t["run_dir"] == f"runs/{t['id'][:16]}"
    assert t["config"]["max_steps"] == 4 and t["config"]["max_drop"] == 5.0 and t["config"]["k"] == 16
    # the same weights at another path: the same ids; another seed or protocol: other ids
    elsewhere = tmp_path / "copy.caffemodel"
    shutil.copyfile(LENET, elsewhere)
    moved = sweep.parse_spec({**spec.as_dict(), "networks": {"LeNet-5": str(elsewhere)}})
    assert [x["id"] for x in sweep.expand(moved, data)] == [x["id"] for x in tasks]
    assert [x["id"] for x in sweep.expand(spec, data)] == [x["id"] for x in tasks]
    other = sweep.parse_spec({**spec.as_dict(), "protocol": {**spec.protocol, "test_size": 3}})
    assert not {x["id"] for x in sweep.expand(other, data)} & {x["id"] for x in tasks}
    # staged weights: once per content, inside the sweep directory
    staged = sweep.expand(spec, data, tmp_path / "sweep")
    assert {x["config"]["weights"] for x in staged} == {str(tmp_path / "sweep" / "weights" / f"{weights_sha}.caffemodel")}
    assert [x["id"] for x in staged] == [x["id"] for x in tasks]


def test_globs_match_component_by_component():
    assert len(sweep.match_metrics("activation/*/*/weights_removed")) == 8 * 5
    assert sweep.match_metrics("*/x/l1/count") == ["activation/x/l1/count", "weights/x/l1/count"]
    assert sweep.match_metrics("domino-*:weights/x/l2/count") == [
        f"domino-{agg}:weights/x/l2/count" for agg in taxonomy.DOMINO]
    assert len(sweep.match_metrics("*/*/*/*")) == len(taxonomy.list_metrics()) == 525     # 450 + macs_removed


def test_stop_end_means_no_drop_stop():
    protocol = sweep.parse_protocol({"stop": "end", "floor": 20, "max_steps": 3})
    assert protocol["max_drop"] is None and protocol["floor"] == 20.0 and protocol["report_drop"] == 5.0
    assert sweep.parse_protocol({})["max_drop"] == 5.0


@pytest.mark.parametrize("spec, message", [
    ({"metrics": ["taylr"]}, r"unknown metric: 'taylr' is neither input/pointwise/reduction/scaling nor an alias; "
                             r"aliases: mean_activations, taylor"),
    ({"metrics": ["activation/taylor/l1/counts"]}, r"invalid scaling 'counts' .* valid: none, count, active_count"),
    ({"networks": ["LeNet5"]}, r"unknown network 'LeNet5'; networks: LeNet-5, CIFAR10, ResNet-20, NIN, AlexNet, SqueezeNet"),
    ({"metrics": ["activation/*/median/*"]}, r"metric glob 'activation/\*/median/\*' matches none of the 525 metrics; "
                                             r"components: input activation\|weights"),
    ({"networks": ["AlexNet"]}, r"no published weights for 'AlexNet'.*--weights AlexNet=PATH"),
    ({"protocol": {"k": "16"}}, r"protocol k must be int, got '16'"),
    ({"protocol": {"shortlist": "text"}}, r"protocol shortlist must be one of paper, authors-code"),
    ({"protocol": {"stop": "end", "max_drop": 5}}, r"max_drop applies to stop = \"drop\" only"),
    ({"protocol": {"maxdrop": 5}}, r"unknown protocol key\(s\) maxdrop; valid: .*max_drop"),
    ({"seed": [1]}, r"unknown SPEC key\(s\) seed; valid: name, out, archive, data, networks, metrics"),
    ({"archive": 5}, r"archive must be a folder's path \(the sweep's results archive\), got 5"),
    ({"oracles": [["taylor", "fishr"]]}, r"unknown metric: 'fishr'"),
])
def test_bad_specs_are_one_line_errors(tmp_path, capsys, spec, message):
    base = {"networks": ["LeNet-5"], "metrics": ["taylor"], "data": str(SUBSET)}
    path = tmp_path / "bad.toml"
    path.write_text("\n".join(_toml(k, v) for k, v in {**base, **spec}.items() if not isinstance(v, dict)) + "\n"
                    + "".join(f"[{k}]\n" + "\n".join(_toml(a, b) for a, b in v.items()) + "\n"
                              for k, v in {**base, **spec}.items() if isinstance(v, dict)))
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("caffe-prune: error: ")
    assert re.search(message, err), err


def _toml(key, value):
    return f"{key} = {json.dumps(value)}"


def test_flags_replace_the_spec(tmp_path, capsys):
    spec = write_spec(tmp_path, ACCEPTANCE)
    assert cli.main(["sweep", str(spec), "--out", str(tmp_path / "x"), "--metrics", "activation/x/*/count",
                     "--seeds", "3", "--domino", "", "--max-steps", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("# 15 runs: 15 new")      # 5 reductions x seeds 0, 1, 2
    assert cli.main(["sweep", "--nets", "LeNet-5", "--metrics", "taylor", "--oracle", "paper", "--seeds", "0,7",
                     "--stop", "end", "--floor", "30", "--data", str(SUBSET), "--out", str(tmp_path / "y"),
                     "--dry-run"]) == 0
    assert "# 4 runs: 4 new" in capsys.readouterr().out


def test_a_ray_address_that_does_not_answer(capsys):
    pytest.importorskip("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]        # nothing listens here once the socket closes
    start_ = time.time()
    with pytest.raises(sweep.SweepError, match=rf"no Ray cluster answers at 127.0.0.1:{port} \(.*\); start one "
                                               rf"with `ray start --head --port {port}`"):
        sweep.make_executor("ray", address=f"127.0.0.1:{port}")
    assert time.time() - start_ < 10
    with pytest.raises(sweep.SweepError, match="--address must be HOST:PORT"):
        sweep.make_executor("ray", address="localhost")
    assert cli.main(["sweep", "--nets", "LeNet-5", "--metrics", "taylor", "--executor", "ray"]) == 2
    assert "--executor ray needs --address HOST:PORT" in capsys.readouterr().err
    assert cli.main(["sweep", "--nets", "LeNet-5", "--metrics", "taylor", "--executor", "ray", "--address",
                     f"127.0.0.1:{port}", "--out", "/nonexistent/sweep"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no Ray cluster answers at 127.0.0.1:{port}" in err


# ---- sweeps that run (LeNet-5, tiny runs) ---------------------------------------------------------

@pytest.mark.slow
def test_killed_twice_then_relaunched_ends_as_one_uninterrupted_sweep(reference, tmp_path):
    """Ctrl-C (SIGINT to the process group) once, SIGKILL of the driver once, then the same command:
    every run done exactly once, the same decisions and measurements as the uninterrupted sweep."""
    spec = write_spec(tmp_path, ACCEPTANCE)
    out = tmp_path / "sweep"
    proc = start(spec, out)
    wait_until(lambda: done(out) >= 6, proc)
    os.killpg(proc.pid, signal.SIGINT)
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130 and "interrupted (resumable)" in text, text
    first = done(out)
    assert 6 <= first < 24 and sql(out, "SELECT count(*) FROM runs WHERE status = 'interrupted'") >= 1

    proc = start(spec, out)
    wait_until(lambda: done(out) >= first + 5, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    second = done(out)
    assert first < second < 24
    with store.Store(out) as s:
        workers = [a["pid"] for a in s.attempts() if a["driver"].endswith(f":{proc.pid}")]
    assert workers and wait_until(lambda: not any(alive(p) for p in workers), timeout=10)   # no orphan keeps writing

    final = subprocess.run(command(spec, out), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert final.returncode == 0, final.stdout + final.stderr
    assert f"24 runs, {second} done before" in final.stdout
    attempts = assert_done_exactly_once(out, 24)
    outcomes = {a["outcome"] for a in attempts}
    assert {"interrupted", "lost", "done"} <= outcomes         # runs were cut mid-way both times
    ref_dir, ref = reference
    assert decisions(out) == ref
    with store.Store(out) as a, store.Store(ref_dir) as b:
        assert {r["id"]: r["removed_at_drop"] for r in a.runs()} == {r["id"]: r["removed_at_drop"] for r in b.runs()}


def kill_worker_mid_run(spec, out, *extra):
    """Start the sweep, SIGKILL the worker process of its run after 3 steps, let the sweep finish."""
    proc = start(spec, out, *extra)
    runs = lambda: list((out / "runs").glob("*/steps.jsonl")) if (out / "runs").is_dir() else []   # noqa: E731
    wait_until(lambda: runs() and len(runs()[0].read_text().splitlines()) >= 4, proc)
    steps_file = runs()[0]
    worker = json.loads((steps_file.parent / "attempts.jsonl").read_text().splitlines()[-1])["pid"]
    assert worker != proc.pid
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    threads = [v for v in environ if v.startswith(b"OPENBLAS_NUM_THREADS=")]
    assert threads == [b"OPENBLAS_NUM_THREADS=1"]     # 2 cores: 2 workers x 1 thread; Ray: 1 CPU per task
    os.kill(worker, signal.SIGKILL)
    text = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, text
    assert "given to another worker" in text
    return steps_file.parent


@pytest.mark.slow
def test_a_worker_that_dies_mid_run_is_retried_and_resumed(long_reference, tmp_path):
    spec = write_spec(tmp_path, LONG)
    out = tmp_path / "sweep"
    run_dir = kill_worker_mid_run(spec, out)
    attempts = assert_done_exactly_once(out, 1)
    assert [a["outcome"] for a in attempts] == ["died", "done"]
    assert "killed by signal 9" in attempts[0]["detail"]
    assert len((run_dir / "attempts.jsonl").read_text().splitlines()) == 2      # resumed, not restarted elsewhere
    assert decisions(out) == long_reference
    assert len(next(iter(long_reference.values()))) == 15


@pytest.mark.slow
def test_a_run_that_fails_is_recorded_and_the_others_go_on(tmp_path):
    """CIFAR10 given LeNet-5's weights: that run fails with the engine's one line, the other is done,
    the sweep exits 1; relaunched, only the failed run is tried again."""
    spec = write_spec(tmp_path, LONG.replace('networks = ["LeNet-5"]', "").replace("max_steps = 14", "max_steps = 2")
                      + f'[networks]\n"LeNet-5" = "published"\nCIFAR10 = "{LENET}"\n')
    out = tmp_path / "sweep"
    for attempt in (1, 2):
        done_ = subprocess.run(command(spec, out), cwd=REPO, env=ENV, capture_output=True, text=True)
        assert done_.returncode == 1, done_.stdout + done_.stderr
        assert ("2 runs, 1 done before, 1 to run" if attempt == 2 else "1 of 2 runs done, 1 failed") in done_.stdout
    with store.Store(out) as s:
        failed, = s.runs(status="failed")
        assert failed["net"] == "CIFAR10" and "holds no weights for layer(s)" in failed["error"]
        assert [a["outcome"] for a in s.attempts(failed["id"])] == ["failed", "failed"]
        assert [r["net"] for r in s.runs(status="done")] == ["LeNet-5"]


@pytest.mark.slow
def test_results_and_report_of_a_sweep(reference, tmp_path, capsys):
    ref_dir, _ = reference
    table = tmp_path / "by.csv"
    assert cli.main(["results", str(ref_dir), "--by", "net,scaling,domino", "--csv", str(table)]) == 0
    assert "# runs: 24 done" in capsys.readouterr().out
    rows = list(csv.DictReader(table.open()))
    assert sum(int(r["runs"]) for r in rows) == 24
    assert {(r["scaling"], r["domino"]) for r in rows} == {
        (s, d) for s in ("active_count", "count", "weights_removed", "l1_layer", "l2_layer") for d in ("", "sum")}
    steps = tmp_path / "steps.csv"
    assert cli.main(["results", str(ref_dir), "--metric", "domino-*", "--steps", "--csv", str(steps)]) == 0
    with store.Store(ref_dir) as s:
        expected = sum(r["steps"] + 1 for r in s.runs() if r["method"].startswith("domino-"))
    rows = list(csv.DictReader(steps.open()))
    assert len(rows) == expected and len({r["run_id"] for r in rows}) == 12
    extended = write_spec(tmp_path, ACCEPTANCE.replace("seeds = [0, 1]", "seeds = [0, 1, 2]"))
    assert cli.main(["sweep", str(extended), "--out", str(ref_dir), "--dry-run"]) == 0
    assert "# 36 runs: 24 done, 12 new" in capsys.readouterr().out        # an extended SPEC skips what is done
    assert cli.main(["report", str(ref_dir), "--out", str(tmp_path / "report")]) == 0
    names = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert {"oracle.md", "taxonomy.md", "domino.md", "taxonomy-LeNet-5.csv", "domino.png"} <= set(names)


@pytest.mark.slow
def test_a_sweep_split_over_two_machines_through_its_archive(reference, tmp_path, capsys):
    """Seed 0 on one machine, archived; a fresh directory elsewhere with the archive runs seed 1 only;
    the merged archive is byte for byte the archive of the uninterrupted sweep."""
    ref_dir, _ = reference
    whole = tmp_path / "whole"
    assert cli.main(["results", str(ref_dir), "--archive", str(whole)]) == 0
    shared = tmp_path / "experiments" / "results" / "acceptance"
    first = write_spec(tmp_path, ACCEPTANCE.replace("seeds = [0, 1]", "seeds = [0]"), "first.toml")
    done_ = subprocess.run(command(first, tmp_path / "a"), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done_.returncode == 0 and "12 runs, 0 done before, 12 to run" in done_.stdout, done_.stdout + done_.stderr
    assert cli.main(["results", str(tmp_path / "a"), "--archive", str(shared)]) == 0
    assert "12 finished runs" in capsys.readouterr().out
    spec = write_spec(tmp_path, ACCEPTANCE.replace('name = "acceptance"',
                                                   f'name = "acceptance"\narchive = "{shared}"'), "second.toml")
    assert cli.main(["sweep", str(spec), "--out", str(tmp_path / "b"), "--dry-run"]) == 0
    assert "# 24 runs: 12 archived, 12 new" in capsys.readouterr().out
    done_ = subprocess.run(command(spec, tmp_path / "b"), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done_.returncode == 0, done_.stdout + done_.stderr
    assert f"24 runs, 12 done before (12 in the archive {shared}), 12 to run" in done_.stdout
    with store.Store(tmp_path / "b", create=False) as s:
        assert sorted(r["seed"] for r in s.runs()) == [1] * 12 and {r["status"] for r in s.runs()} == {"done"}
    assert cli.main(["results", str(tmp_path / "b"), "--archive", str(shared)]) == 0
    out = capsys.readouterr().out
    assert "24 finished runs (" in out and "12 of them added" in out, out
    assert (shared / "steps.csv.gz").read_bytes() == (whole / "steps.csv.gz").read_bytes()
    assert without_wall_time(shared) == without_wall_time(whole)       # the runs' results, row for row
    # merged again: nothing changes; a relaunch runs nothing
    before = (shared / "runs.csv").read_bytes()
    assert cli.main(["results", str(tmp_path / "b"), "--archive", str(shared)]) == 0
    assert (shared / "runs.csv").read_bytes() == before
    again = subprocess.run(command(spec, tmp_path / "c"), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert again.returncode == 0 and "24 runs, 24 done before (24 in the archive" in again.stdout, again.stdout


def without_wall_time(folder):
    """runs.csv's rows without their last column (the wall time, which two machines never share)."""
    return [row[:-1] for row in csv.reader((folder / "runs.csv").read_text().splitlines())]


@pytest.mark.slow
def test_a_run_archived_twice_with_different_results_is_refused(reference, tmp_path, capsys):
    ref_dir, _ = reference
    folder = tmp_path / "archive"
    assert cli.main(["results", str(ref_dir), "--archive", str(folder)]) == 0
    capsys.readouterr()
    rows = (folder / "runs.csv").read_text().splitlines()
    cells = rows[1].split(",")
    column = rows[0].split(",").index("removed_at_drop")
    cells[column] = "99.5"
    (folder / "runs.csv").write_text("\n".join([rows[0], ",".join(cells), *rows[2:]]) + "\n")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert cli.main(["results", str(ref_dir), "--archive", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"run {cells[0][:16]} (LeNet-5, " in err
    assert "with different results (removed_at_drop 99.5 vs " in err and "archive into another folder" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before          # nothing written
    # a torn merge (steps replaced, runs.csv not yet): the steps of runs it does not list are ignored
    (folder / "runs.csv").write_text("\n".join(rows[:3]) + "\n")
    assert cli.main(["results", str(ref_dir), "--archive", str(folder)]) == 0
    assert (folder / "runs.csv").read_text().splitlines() == rows


# ---- the Ray executor on a real local cluster -----------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray head on 127.0.0.1 and a second node joined to it (one CPU each), started here and
    stopped by process group (never `ray stop`, which would stop every Ray on the machine)."""
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).parent / "ray"
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")    # Ray's socket paths must stay short
    port = _free_port()
    env = {**ENV, "RAY_TMPDIR": temp, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", str(100 * 2 ** 20),
              "--disable-usage-stats", "--block"]
    logs = open(Path(temp) / "nodes.log", "w")
    nodes = [subprocess.Popen([str(ray_bin), "start", "--head", "--port", str(port), "--include-dashboard", "false",
                               "--temp-dir", temp, *common], env=env, start_new_session=True, stdout=logs,
                              stderr=subprocess.STDOUT)]
    try:
        wait_until(lambda: _answers(port), timeout=60)
        nodes.append(subprocess.Popen([str(ray_bin), "start", "--address", f"127.0.0.1:{port}", *common], env=env,
                                      start_new_session=True, stdout=logs, stderr=subprocess.STDOUT))
        wait_until(lambda: "0.0/2.0 CPU" in subprocess.run(
            [str(ray_bin), "status", "--address", f"127.0.0.1:{port}"], env=env, capture_output=True,
            text=True).stdout, timeout=60)
        yield f"127.0.0.1:{port}"
    finally:
        for node in reversed(nodes):
            os.killpg(node.pid, signal.SIGTERM)
        for node in reversed(nodes):
            try:
                node.wait(5)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.wait()
        logs.close()
        shutil.rmtree(temp, ignore_errors=True)


def _answers(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_ray_executor_gives_the_local_results(reference, ray_cluster, tmp_path):
    spec = write_spec(tmp_path, ACCEPTANCE)
    out = tmp_path / "sweep"
    done_ = subprocess.run(command(spec, out, "--executor", "ray", "--address", ray_cluster), cwd=REPO, env=ENV,
                           capture_output=True, text=True)
    assert done_.returncode == 0, done_.stdout + done_.stderr
    assert "2 CPU(s) in the cluster" in done_.stdout
    attempts = assert_done_exactly_once(out, 24)
    assert {a["executor"] for a in attempts} == {"ray"} and len({a["pid"] for a in attempts}) >= 2
    assert decisions(out) == reference[1]


@pytest.mark.slow
def test_ray_worker_that_dies_mid_run_is_retried_and_resumed(long_reference, ray_cluster, tmp_path):
    spec = write_spec(tmp_path, LONG)
    out = tmp_path / "sweep"
    kill_worker_mid_run(spec, out, "--executor", "ray", "--address", ray_cluster)
    attempts = assert_done_exactly_once(out, 1)
    assert [a["outcome"] for a in attempts] == ["died", "done"]
    assert "WorkerCrashedError" in attempts[0]["detail"] and "last started by" in attempts[0]["detail"]
    assert decisions(out) == long_reference


# ---- a plugin metric in a sweep: staged in the sweep directory, the same results on Ray -----------

PLUGIN_SPEC = f"""
name = "plugin"
data = "{SUBSET}"
seeds = [3]
plugins = ["{REPO / 'examples' / 'plugins' / 'entropy.py'}"]
metrics = ["plugin:entropy", "domino-max:plugin:entropy", "plugin:entropy/weights_removed"]
oracles = [["plugin:entropy", "taylor"]]
networks = ["LeNet-5"]
[protocol]
max_steps = 3
test_size = 2
eval_size = 1
oracle_eval_size = 1
k = 4
"""


@pytest.mark.slow
def test_a_plugin_sweep_on_the_local_pool_and_on_ray(ray_cluster, tmp_path):
    """The plugin is copied once into SWEEP_DIR/plugins/SHA256/ and every run imports that copy;
    its runs' ids and decisions are the same on the local pool and on a local Ray cluster, and the
    report ranks it beside the built-in constituent."""
    spec = write_spec(tmp_path, PLUGIN_SPEC)
    source = REPO / "examples" / "plugins" / "entropy.py"
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    results = {}
    for executor, extra in (("local", ()), ("ray", ("--executor", "ray", "--address", ray_cluster))):
        out = tmp_path / executor
        done_ = subprocess.run(command(spec, out, *extra), cwd=REPO, env=ENV, capture_output=True, text=True)
        assert done_.returncode == 0, done_.stdout + done_.stderr
        assert_done_exactly_once(out, 4)
        staged = out / "plugins" / sha / "entropy.py"
        assert staged.read_bytes() == source.read_bytes()
        with store.Store(out, create=False) as s:
            assert {json.dumps(r["config"]["plugins"]) for r in s.runs()} == {json.dumps({"entropy": str(staged)})}
        results[executor] = decisions(out)
    assert results["local"] == results["ray"] and len(results["local"]) == 4
    assert all(len(steps) == 4 for steps in results["local"].values())
    assert cli.main(["report", str(tmp_path / "local"), "--kind", "taxonomy", "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "taxonomy.md").read_text()
    assert "`plugin:entropy`" in text and "`plugin:entropy/weights_removed`" in text


@pytest.mark.slow
def test_prune_oracle_and_reproduce_oracle_decide_alike(tmp_path, capsys):
    """`prune --oracle` without a list and `reproduce oracle` compose the same constituents (the
    Table-2 forms) and so make the same decisions for the same net and seed."""
    short = ["--max-steps", "3", "--test-size", "2", "--eval-size", "1", "--oracle-eval-size", "1", "--k", "4"]
    assert cli.main(["prune", "LeNet-5", "published", "--oracle", "--seed", "2", "--quiet",
                     "--out", str(tmp_path / "prune"), *short]) == 0
    assert cli.main(["reproduce", "oracle", "--nets", "LeNet-5", "--methods", "oracle", "--runs", "1", "--seed", "2",
                     "--quiet", "--out", str(tmp_path / "reproduce"), *short]) == 0
    pruned = [json.loads(line) for line in (tmp_path / "prune" / "steps.jsonl").read_text().splitlines()]
    header = json.loads((tmp_path / "prune" / "config.json").read_text())
    assert header["config"]["oracle"] == list(taxonomy.PAPER_FORMS["table2"])
    (reproduced,) = decisions(tmp_path / "reproduce").values()
    keys = ("groups", "proposers", "sensitivities", "test", "percent_conv_removed")
    assert [{k: s.get(k) for k in keys} for s in pruned] == [{k: s.get(k) for k in keys} for s in reproduced]
    assert len(pruned) == 4

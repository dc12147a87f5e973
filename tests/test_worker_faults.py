"""Plugin code that ends, crashes or hangs its process, and Ctrl-C: the run ends in one line, at once.

A plugin's reduce that calls os._exit or segfaults kills the process computing it: the fast
engine's worker (or, with one worker, the child caffe_prune.engines runs plugin passes in) dies,
is replaced once, dies again, and the run ends naming the plugin, the step and the exit status or
signal (it used to replace the worker forever). sys.exit in plugin code is an error, never a clean
stop (it used to end a one-worker run with exit 0 and no step). A reduce that returns a dict is one
line; one that sleeps is stopped by --plugin-timeout or its TIMEOUT; one Ctrl-C ends the run and
its workers at once, keeping the finished steps. Every command runs in a child with a deadline."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from caffe_prune import engines, masking, pruning
from caffe_prune.data.synthetic import write_random_lmdb
from caffe_prune.errors import PluginError
from caffe_prune.metrics import plugins
from conftest import REPO
from test_faults import PRUNE, cli, one_error, small_net

BODIES = {
    "os._exit": ("import os; os._exit(3)", "died twice on the same batch (exit status 3)"),
    "segfault": ("import ctypes; ctypes.string_at(0)", "died twice on the same batch (killed by SIGSEGV)"),
    "sys.exit(0)": ("import sys; sys.exit(0)", "reduce called sys.exit(0) on conv (feature maps)"),
    "a dict": ("return {'value': 1.0}", "reduce returned a dict, not an array of numbers, on conv (feature maps)"),
}


def plugin_file(path, body, name="bad", extra=""):
    path.write_text(f'INPUT = "activation"\nNEEDS = "x"\nNAME = "{name}"\n{extra}\n'
                    f"def reduce(x, g, h, axes):\n    {body}\n")
    return path


@pytest.fixture(scope="module")
def small(caffe, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("small")
    small_net(tmp)
    write_random_lmdb(tmp / "db", 64, (3, 8, 8), classes=3, progress=False)
    return tmp


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("what", list(BODIES))
def test_a_plugin_that_ends_its_process_ends_the_run_in_one_line(small, tmp_path, what, workers):
    plugin = plugin_file(tmp_path / "bad.py", BODIES[what][0])
    start = time.monotonic()
    status, _, err = cli(["prune", small / "net.prototxt", small / "net.caffemodel", *PRUNE,
                          "--data", small / "db", "--plugin", plugin, "--metric", "plugin:bad", "--workers", workers,
                          "--max-steps", "2", "--out", tmp_path / "run"], tmp_path, timeout=120)
    line = one_error(status, err)
    assert line.startswith(f"caffe-prune: error: step 1: plugin bad ({plugin}): ") and BODIES[what][1] in line
    assert time.monotonic() - start < 60
    assert len((tmp_path / "run" / "steps.jsonl").read_text().splitlines()) == 1      # step 0 kept, no step appended
    assert "Fatal Python error" not in err


def test_an_oracle_constituent_that_crashes_is_named(small, tmp_path):
    plugin = plugin_file(tmp_path / "bad.py", BODIES["os._exit"][0])
    status, _, err = cli(["prune", small / "net.prototxt", small / "net.caffemodel", *PRUNE, "--data", small / "db",
                          "--plugin", plugin, "--oracle", "mean_sq_weights,plugin:bad", "--k", "2", "--workers", "2",
                          "--out", tmp_path / "run"], tmp_path)
    assert f"step 1: plugin bad ({plugin}): the process computing its saliency died twice" in one_error(status, err)


def test_sys_exit_in_a_plugin_is_an_error_in_the_naive_engine_too(small, tmp_path):
    plugin = plugin_file(tmp_path / "bad.py", BODIES["sys.exit(0)"][0])
    status, _, err = cli(["prune", small / "net.prototxt", small / "net.caffemodel", *PRUNE, "--data", small / "db",
                          "--plugin", plugin, "--metric", "plugin:bad", "--engine", "naive", "--out", tmp_path / "run"],
                         tmp_path)
    assert "step 1: plugin bad" in one_error(status, err) and "called sys.exit(0)" in err


def test_sys_exit_while_a_plugin_is_imported_is_one_line(tmp_path):
    (tmp_path / "quits.py").write_text("import sys\nsys.exit(4)\n")
    status, _, err = cli(["metrics", "list", "--plugin", "quits.py"], tmp_path)
    assert f"plugin {tmp_path / 'quits.py'}: importing it called sys.exit(4)" in one_error(status, err)


def test_a_worker_that_dies_twice_on_a_test_request_ends_the_run(small, monkeypatch):
    """Not plugin code: the fast engine's test measurement, its worker exiting at once (every fork,
    the replacement too): WorkerDied naming the request and the status; every worker is reaped."""
    from caffe_prune.session import Session
    monkeypatch.chdir(small)
    with pytest.warns(UserWarning, match="no transform_param to apply"):
        session = Session.open("net.prototxt", "net.caffemodel", "db", batch_size=8, mode="cpu", holdout=False,
                               progress=False)
    masker = masking.Masker(session.graph, [session.net], "zero-downstream")
    monkeypatch.setattr(engines.Worker, "test", lambda self: os._exit(5))
    engine = engines.make("fast", session, masker, session.dataset.test.head(16), workers=2)
    try:
        with pytest.raises(engines.WorkerDied, match=r"died twice on the same test request \(exit status 5\)"):
            engine.test()
        for remote in engine.remote:
            assert remote.reaped
            with pytest.raises(ChildProcessError):
                os.waitpid(remote.pid, os.WNOHANG)
    finally:
        engine.close()
    with pytest.raises(engines.WorkerDied, match=r"^step 4: a worker died$"):
        with pruning._at_step(4):
            raise engines.WorkerDied("a worker died")


SLEEPY = ("import os, time, pathlib; pathlib.Path(os.environ['MARKS'], f'in-{os.getpid()}').touch(); "
          "time.sleep(60); return x.sum(axis=axes)")


@pytest.mark.parametrize("workers", [1, 2])
def test_one_ctrl_c_stops_the_run_and_its_workers(small, tmp_path, workers):
    plugin = plugin_file(tmp_path / "sleepy.py", SLEEPY, "sleepy")
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "GLOG_minloglevel": "2", "PYTHONPATH": str(REPO), "MARKS": str(marks)}
    child = subprocess.Popen([sys.executable, "-m", "caffe_prune", "prune", small / "net.prototxt",
                              small / "net.caffemodel", *PRUNE, "--data", small / "db", "--plugin", plugin,
                              "--metric", "plugin:sleepy", "--workers", str(workers), "--out", tmp_path / "run"],
                             cwd=tmp_path, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not list(marks.iterdir()) and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        inside = [int(p.name.split("-")[1]) for p in marks.iterdir()]
        assert inside, f"the plugin was never called: {child.stderr.read() if child.poll() is not None else ''}"
        os.killpg(child.pid, signal.SIGINT)       # what a terminal's Ctrl-C does: the whole process group
        start = time.monotonic()
        status = child.wait(timeout=30)
        assert time.monotonic() - start < 15
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    err = child.stderr.read()
    assert status == 130 and "interrupted; what was finished is kept" in err and "Traceback" not in err
    time.sleep(0.2)
    alive = [pid for pid in inside if os.path.exists(f"/proc/{pid}")
             and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == []
    assert len((tmp_path / "run" / "steps.jsonl").read_text().splitlines()) == 1


def test_plugin_timeout_ends_the_run_in_one_line(small, tmp_path):
    plugin = plugin_file(tmp_path / "sleepy.py", SLEEPY, "sleepy")
    (tmp_path / "marks").mkdir()
    start = time.monotonic()
    status, _, err = _with_marks(tmp_path, ["prune", small / "net.prototxt", small / "net.caffemodel", *PRUNE,
                                            "--data", small / "db", "--plugin", plugin, "--metric", "plugin:sleepy",
                                            "--plugin-timeout", "1", "--workers", "1", "--out", tmp_path / "run"])
    assert "reduce took longer than its time limit of 1 s on conv (feature maps)" in one_error(status, err)
    assert time.monotonic() - start < 45
    status, _, err = cli(["metrics", "list", "--plugin-timeout", "0"], tmp_path)
    assert "--plugin-timeout 0.0: give a number of seconds above 0" in one_error(status, err)


def _with_marks(tmp, argv):
    env = {**os.environ, "GLOG_minloglevel": "2", "PYTHONPATH": str(REPO), "MARKS": str(tmp / "marks")}
    done = subprocess.run([sys.executable, "-m", "caffe_prune", *map(str, argv)], cwd=tmp, env=env, timeout=120,
                          capture_output=True, text=True)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def fresh_plugins(monkeypatch):
    monkeypatch.setattr(plugins, "_LOADED", {})
    monkeypatch.setattr(plugins, "_TIMEOUT_S", None)


def test_a_plugins_own_timeout_stops_code_that_swallows_exceptions(fresh_plugins, tmp_path):
    body = "while True:\n        try:\n            time.sleep(10)\n        except Exception:\n            pass"
    plugin = plugins.load(plugin_file(tmp_path / "stubborn.py", body, "stubborn", "import time\nTIMEOUT = 0.3"))
    assert plugin.timeout == 0.3
    x = np.ones((2, 3, 4, 4))
    start = time.monotonic()
    with pytest.raises(PluginError, match=r"^plugin stubborn \(.*stubborn.py\): reduce took longer than its time "
                                          r"limit of 0.3 s on conv1 \(TIMEOUT in the plugin, --plugin-timeout\)$"):
        plugin.values(x, None, None, (2, 3), "conv1")
    assert time.monotonic() - start < 3
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)          # no alarm left behind
    (tmp_path / "bad_timeout.py").write_text(plugin_file(tmp_path / "x.py", "return x", "x").read_text()
                                             + "TIMEOUT = 'soon'\n")
    with pytest.raises(PluginError, match=r"TIMEOUT must be a number of seconds above 0, got 'soon'"):
        plugins.load(tmp_path / "bad_timeout.py")


def test_values_that_are_not_numbers_are_one_line(fresh_plugins, tmp_path):
    plugin = plugins.load(plugin_file(tmp_path / "odd.py", "return x.sum(axis=axes)", "odd",
                                      "def combine(values):\n    return 'all of them'\n"))
    x = np.ones((2, 3, 4, 4))
    values = plugin.values(x, None, None, (2, 3), "conv1")
    assert values.shape == (2, 3) and np.all(values == 16)
    with pytest.raises(PluginError, match=r"combine returned a str, not an array of numbers, on conv1$"):
        plugin.over_samples(values, "conv1")

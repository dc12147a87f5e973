"""Atomic files and the run lock (caffe_prune.fsio): a write killed at any byte leaves the old file
or the new one, a failed block leaves nothing, a torn appended line is cut, a second process is
refused the lock with its owner named and a dead owner's lock is taken over."""
import json
import os
import subprocess
import sys

import pytest

from caffe_prune import fsio
from conftest import REPO


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.json"
    fsio.write_json(path, {"x": 1})
    fsio.write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


@pytest.mark.parametrize("nbytes", [0, 3, 9])
def test_a_write_killed_mid_way_leaves_the_old_file(tmp_path, nbytes):
    """CAFFE_PRUNE_KILL_AT_WRITE=1:B kills the process after B bytes of its first write."""
    path = tmp_path / "a.txt"
    path.write_text("old contents\n")
    code = f"from caffe_prune import fsio; fsio.write_text({str(path)!r}, 'new contents, longer\\n')"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, fsio.KILL_ENV: f"1:{nbytes}"})
    assert done.returncode == -9
    assert path.read_text() == "old contents\n"                    # the target is never torn
    fsio.write_text(path, "next\n")                               # and the next write goes through
    assert path.read_text() == "next\n"


def test_replacing_renames_only_a_finished_block(tmp_path):
    target = tmp_path / "model.caffemodel"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with fsio.replacing(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the writer failed")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.caffemodel"]
    with fsio.replacing(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    folder = tmp_path / "lmdb"
    folder.mkdir()
    (folder / "data.mdb").write_bytes(b"v1")
    with fsio.replacing(folder) as tmp:          # a directory replaces a directory as one
        tmp.mkdir()
        (tmp / "data.mdb").write_bytes(b"v2")
    assert (folder / "data.mdb").read_bytes() == b"v2" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["lmdb", "model.caffemodel"]


def test_complete_lines_cut_a_torn_last_line(tmp_path):
    path = tmp_path / "steps.jsonl"
    fsio.append_line(path, '{"step": 0}')
    fsio.append_line(path, '{"step": 1}')
    with open(path, "ab") as stream:
        stream.write(b'{"step": 2, "gro')                   # a kill during the third append
    assert fsio.complete_lines(path, repair=False) == ['{"step": 0}', '{"step": 1}']
    assert path.read_bytes().endswith(b'"gro')                # a reader leaves the file alone
    assert fsio.complete_lines(path) == ['{"step": 0}', '{"step": 1}']
    assert path.read_bytes() == b'{"step": 0}\n{"step": 1}\n'  # the owner cuts it
    assert fsio.complete_lines(tmp_path / "missing") == []


def test_the_lock_names_its_owner_and_is_taken_over_when_it_dies(tmp_path):
    code = (f"import sys, time; from caffe_prune import fsio; fsio.RunLock({str(tmp_path)!r}).acquire(); "
            f"print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(fsio.InUse, match=rf"run {tmp_path} is in use by PID {holder.pid} on \S+; wait for it"):
            fsio.RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with fsio.RunLock(tmp_path) as lock:                    # the dead owner's lock is simply taken over
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert lock._fd is None


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    lock = fsio.RunLock(tmp_path).acquire()
    pid = os.fork()
    if pid == 0:                      # the child: the parent's lock descriptor was closed at the fork
        os._exit(0 if not fsio._held else 1)
    _, status = os.waitpid(pid, 0)
    lock.release()
    assert os.WEXITSTATUS(status) == 0

"""Every file the toolkit writes, written so that a kill at any moment leaves the old file or the
new one, never a torn one; and the lock that keeps two processes out of one run directory.

- ``write_text``/``write_bytes``: to ``.<name>.<pid>.tmp`` in the same directory, fsync'ed, renamed
  over the target (atomic on POSIX), then the directory fsync'ed so the rename survives a crash.
- ``replacing(path)``: the same for a writer that wants a path (Caffe's ``net.save``, a solver
  snapshot, matplotlib's ``savefig``, an LMDB directory): it writes the temporary path, which is
  renamed over ``path`` only when the block ends without an exception.
- ``append_line``: one line appended and fsync'ed (a run's ``steps.jsonl``); ``complete_lines``
  reads such a file back, truncating a torn last line (a kill during the append) in one call.
- ``RunLock``: ``fcntl.flock`` on ``DIR/.lock``, holding the owner's PID and host. A second
  process gets "DIR is in use by PID N on HOST"; the kernel drops the lock when its owner dies, so
  a stale lock from a killed run is simply taken over. A flock belongs to the open file, which a
  fork shares: so every forked child closes the locks it inherited (``os.register_at_fork``), and
  the toolkit's long-lived children (the fast engine's workers, a sweep's) also
  ``die_with_parent``: a ``kill -9`` of a run frees its lock at once.

Every OSError raised here names the path and what was attempted (the CLI prints it as one line).

Testing hook: ``CAFFE_PRUNE_KILL_AT_WRITE=N:B`` makes the N-th write of this process (counting
``write_*``, ``replacing`` and ``append_line`` calls from 1) stop with SIGKILL after B bytes, so a
test can kill a run inside each of its writes.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
from pathlib import Path

KILL_ENV = "CAFFE_PRUNE_KILL_AT_WRITE"
_writes = 0
_held = set()       # descriptors of the locks this process holds


class FileError(OSError):
    """An OSError whose message is one line naming the path and what was attempted."""


def _fail(what: str, path, exc: OSError):
    raise FileError(exc.errno, f"cannot {what} {os.fsdecode(path)}: {exc.strerror or exc}") from None


def _next_write(path, data: bytes | None = None) -> None:
    """Count writes; with the test hook set, die inside the chosen one."""
    global _writes
    _writes += 1
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    n, _, nbytes = spec.partition(":")
    if int(n) == _writes:
        if data is not None:
            with open(path, "ab") as stream:
                stream.write(data[:int(nbytes or 0)])
                stream.flush()
                os.fsync(stream.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail("create the directory for", path, exc)


def write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    path = Path(path)
    _parent(path)
    tmp = _temporary(path)
    _next_write(tmp, data)
    try:
        with open(tmp, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _fail("write", path, exc)
    _fsync_dir(path.parent)
    return path


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path, value, indent=2) -> Path:
    return write_text(path, json.dumps(value, indent=indent) + "\n")


@contextlib.contextmanager
def replacing(path):
    """Yield a temporary path beside ``path``; rename it over ``path`` when the block succeeds
    (files and directories alike), remove it when the block fails."""
    path = Path(path)
    _parent(path)
    tmp = _temporary(path)
    _remove(tmp)
    _next_write(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    try:
        if tmp.is_file():
            with open(tmp, "rb") as stream:
                os.fsync(stream.fileno())
        if path.is_dir() and not path.is_symlink() and tmp.is_dir():
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        _fail("write", path, exc)
    _fsync_dir(path.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def append_line(path, line: str) -> None:
    """Append one line (a newline is added) and fsync it."""
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode()
    _next_write(path, data)
    try:
        with open(path, "ab") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    except OSError as exc:
        _fail("append to", path, exc)


def complete_lines(path, repair: bool = True) -> list:
    """The complete lines of a file written by ``append_line``; a torn last line (no newline: a
    kill during the append) is cut off the file (``repair``: only the process that owns the file
    may; a reader leaves it, as its writer may be appending right now). A missing file has no lines."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = path.read_bytes()
    except OSError as exc:
        _fail("read", path, exc)
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        try:
            os.truncate(path, end)
        except OSError as exc:
            _fail("truncate the torn last line of", path, exc)
    return data[:end].decode(errors="replace").splitlines()


class InUse(RuntimeError):
    """Another live process holds the lock; the message names it."""


class RunLock:
    """An exclusive lock on a directory for this process's lifetime (or until ``release``)."""

    def __init__(self, directory, what: str = "run"):
        self.directory, self.what = Path(directory), what
        self.path = self.directory / ".lock"
        self._fd = None

    def acquire(self) -> "RunLock":
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            _fail("lock", self.directory, exc)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                owner = {}
            os.close(fd)
            raise InUse(f"{self.what} {os.fsdecode(self.directory)} is in use by PID {owner.get('pid', '?')} on "
                        f"{owner.get('host', '?')}; wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self._fd = fd
        _held.add(fd)
        return self

    def release(self) -> None:
        if self._fd is not None:
            _held.discard(self._fd)
            os.close(self._fd)     # closing drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _close_inherited_locks() -> None:
    """In a forked child: close the lock descriptors of the parent (the flock is the open file's,
    so a child keeping the descriptor would keep the lock after its parent died)."""
    for fd in list(_held):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def die_with_parent(parent: int) -> None:
    """Linux: have the kernel kill this (forked or spawned) child when its parent dies, even by
    SIGKILL (PR_SET_PDEATHSIG), so that no orphan keeps computing for, or writing to, a run that
    the same command resumes; exits at once when the parent is already gone."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)

"""Where a sweep's runs execute: ``execute`` (the one function that calls the pruning engine), a local
pool of worker processes and a Ray cluster, behind one small interface (see caffe_prune.sweep)."""
from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from caffe_prune import analysis, fsio, pycaffe
from caffe_prune.sweep.spec import SweepError

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def execute(task: dict) -> dict:
    """Run (or resume, or just read back) one pruning run in its directory; returns its steps and
    summary. Appends who ran it to the directory's ``attempts.jsonl`` first."""
    from caffe_prune import pruning
    started = time.time()
    run_dir = Path(task["sweep_dir"]) / task["run_dir"]
    run_dir.mkdir(parents=True, exist_ok=True)
    fsio.append_line(run_dir / "attempts.jsonl", json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                             "started": started, "executor": task.get("executor")}))
    # one process per run: the executor runs runs side by side, one per core
    config = pruning.Config(**{k: v for k, v in task["config"].items() if k not in pruning.Config.EXECUTION},
                            workers=1)
    steps = pruning.Run(config, run_dir, data=task["data"], progress=False).run()
    header = json.loads((run_dir / "config.json").read_text())
    macs = analysis.removed_at_drop(steps, task["report_drop"], "percent_macs_removed") \
        if all("percent_macs_removed" in s for s in steps) else None      # runs from before MACs were counted
    return {"id": task["id"], "steps": steps, "removed_at_drop": analysis.removed_at_drop(steps, task["report_drop"]),
            "macs_removed_at_drop": macs,
            "protocol": header.get("protocol"), "versions": header.get("versions"),
            "host": socket.gethostname(), "pid": os.getpid(), "wall_s": round(time.time() - started, 3)}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"


def _classify(message: str) -> str:
    """``busy`` when the engine refused the run directory because another process holds it."""
    return "busy" if " in use by " in message else "failed"


@contextmanager
def _environ(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker_main(conn, parent: int) -> None:
    """A local worker: runs tasks from `conn` one at a time until told to stop. Ctrl-C is the
    driver's to handle (it stops the workers), so the worker ignores SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fsio.die_with_parent(parent)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            reply = ("done", execute(task))
        except Exception as exc:   # the run's own error, reported as one line; the worker lives on
            message = _one_line(exc)
            reply = (_classify(message), message)
        conn.send(reply)


class _Worker:
    def __init__(self, process, conn):
        self.process, self.conn, self.task = process, conn, None


class LocalExecutor:
    """A pool of worker processes on this machine (one per core by default), started with ``spawn``
    (never forked from a process that has imported Caffe or OpenBLAS). A run computes with one BLAS
    thread (caffe_prune.pycaffe.BLAS_THREADS: its bits do not depend on the machine), so the runs
    side by side are the parallelism. A worker that dies is replaced; its run is reported ``died``."""
    name = "local"

    def __init__(self, workers: int | None = None):
        cores = pycaffe.cores()
        self.workers = workers or max(1, cores // pycaffe.BLAS_THREADS)
        self.threads = pycaffe.BLAS_THREADS
        if self.workers < 1:
            raise SweepError(f"--workers must be at least 1, got {self.workers}")
        self.cores = cores
        self.context = multiprocessing.get_context("spawn")
        self.idle, self.busy = [], []

    def describe(self) -> str:
        return (f"local executor: {self.workers} worker(s) x {self.threads} BLAS thread(s) "
                f"on {self.cores} core(s)")

    def capacity(self) -> int:
        return self.workers - len(self.busy)

    def _spawn(self) -> _Worker:
        ours, theirs = self.context.Pipe()
        threads = {v: str(self.threads) for v in BLAS_THREAD_VARIABLES}
        with _environ(threads):        # read by OpenBLAS/OpenMP when the worker loads them
            process = self.context.Process(target=_worker_main, args=(theirs, os.getpid()), daemon=True,
                                           name="caffe-prune-sweep-worker")
            process.start()
        theirs.close()
        return _Worker(process, ours)

    def submit(self, task: dict) -> dict:
        worker = self.idle.pop() if self.idle else self._spawn()
        worker.task = task
        worker.conn.send(task)
        self.busy.append(worker)
        return {"host": socket.gethostname(), "pid": worker.process.pid}

    def events(self, timeout: float) -> list:
        if not self.busy:
            time.sleep(min(timeout, 0.05))
            return []
        handles = [w.conn for w in self.busy] + [w.process.sentinel for w in self.busy]
        ready = set(multiprocessing.connection.wait(handles, timeout))
        out = []
        for worker in list(self.busy):
            if worker.conn not in ready and worker.process.sentinel not in ready:
                continue
            try:
                if worker.conn.poll():
                    kind, payload = worker.conn.recv()
                    self.busy.remove(worker)
                    self.idle.append(worker)
                    out.append((kind, worker.task, payload))
                    continue
            except (EOFError, OSError):
                pass
            worker.process.join(timeout=5)
            if worker.process.exitcode is None:
                continue
            self.busy.remove(worker)
            worker.conn.close()
            code = worker.process.exitcode
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            out.append(("died", worker.task, f"worker {socket.gethostname()}:{worker.process.pid} died ({how})"))
        return out

    def close(self, cancel: bool = False) -> None:
        for worker in self.idle + self.busy:
            try:
                if cancel and worker in self.busy:
                    worker.process.terminate()
                else:
                    worker.conn.send(None)
            except OSError:
                pass
        for worker in self.idle + self.busy:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        self.idle, self.busy = [], []


def _ray_task(task: dict) -> dict:
    return execute(task)


class RayExecutor:
    """The same runs as Ray tasks on an existing cluster (``ray start --head`` on one node,
    ``ray start --address HEAD:PORT`` on the others). Each task needs one CPU (a run computes with
    one BLAS thread); it writes its run directory (the sweep directory must be on storage every
    node mounts at the same path) and returns its summary, which this driver writes to the store.
    Ray does not retry a task itself: a task whose worker or node died is reported ``died`` and the
    driver gives it to a new one, which resumes it from its directory."""
    name = "ray"

    def __init__(self, address: str):
        try:
            import ray
        except ImportError:
            raise SweepError("the Ray executor needs the ray package: pip install 'caffe-prune[ray]' "
                             "(here: .venv/bin/pip install ray)") from None
        self.ray, self.address, self.threads = ray, address, pycaffe.BLAS_THREADS
        if address != "auto":
            check_answers(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        except Exception as exc:          # what ray.init raises depends on the Ray version
            raise SweepError(f"could not join the Ray cluster at {address}: {_one_line(exc)}") from None
        env = {v: str(self.threads) for v in BLAS_THREAD_VARIABLES}
        self.remote = ray.remote(_ray_task).options(num_cpus=self.threads, max_retries=0,
                                                    runtime_env={"env_vars": env})
        self.refs = {}

    def describe(self) -> str:
        cpus = self.ray.cluster_resources().get("CPU", 0)
        return f"ray executor at {self.address}: {cpus:g} CPU(s) in the cluster, {self.threads} per run"

    def capacity(self) -> int:
        cpus = int(self.ray.cluster_resources().get("CPU", 0)) // self.threads
        return max(1, 2 * cpus) - len(self.refs)

    def submit(self, task: dict) -> dict:
        self.refs[self.remote.remote(task)] = task
        return {"host": None, "pid": None}       # known once it starts (attempts.jsonl) or ends

    def events(self, timeout: float) -> list:
        if not self.refs:
            time.sleep(min(timeout, 0.05))
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
        out = []
        for ref in ready:
            task = self.refs.pop(ref)
            try:
                out.append(("done", task, self.ray.get(ref)))
            except self.ray.exceptions.RayTaskError as exc:     # the run itself raised
                message = _one_line(getattr(exc, "cause", None) or exc)
                out.append((_classify(message), task, message))
            except self.ray.exceptions.RayError as exc:         # its worker or node died
                out.append(("died", task, _one_line(exc).split(" Traceback")[0][:300]))
        return out

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for ref in self.refs:
                try:
                    self.ray.cancel(ref, force=True)
                except Exception:
                    pass
        self.refs = {}
        self.ray.shutdown()


def check_answers(address: str, timeout: float = 5.0) -> None:
    """A TCP connection to HOST:PORT, so that a wrong address fails in seconds with a clear line."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise SweepError(f"--address must be HOST:PORT (the head's `ray start --head --port PORT`), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise SweepError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                         f"`ray start --head --port {port}` on the head node, or check --address") from None


def make_executor(kind: str = "local", workers=None, address=None):
    if kind == "local":
        if address:
            raise SweepError("--address is for --executor ray")
        return LocalExecutor(workers)
    if kind == "ray":
        if not address:
            raise SweepError("--executor ray needs --address HOST:PORT (the head node's Ray port), or 'auto'")
        if workers:
            raise SweepError("--workers is for the local executor; a Ray cluster runs as many runs as it has CPUs")
        return RayExecutor(address)
    raise SweepError(f"unknown executor {kind!r}; one of local, ray")


def factory(kind: str = "local", workers=None, address=None):
    """A function making the executor asked for (made once there is work to do); the choice is
    checked now, before anything runs."""
    if kind == "local":
        LocalExecutor(workers)                    # only checks the numbers: starts no process
        if address:
            raise SweepError("--address is for --executor ray")
    elif not address:
        raise SweepError("--executor ray needs --address HOST:PORT (the head node's Ray port), or 'auto'")
    elif address != "auto":
        check_answers(address)                    # seconds, before anything is written
    return lambda: make_executor(kind, workers, address)

"""The sweep driver: expand a SPEC, skip what the store has finished, hand the rest to an executor,
record every outcome, retry a run whose worker died, and stop cleanly on Ctrl-C (see caffe_prune.sweep)."""
from __future__ import annotations

import dataclasses
import json
import signal
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from caffe_prune import archive
from caffe_prune import store as results_store
from caffe_prune.sweep.executors import LocalExecutor
from caffe_prune.sweep.spec import Spec, expand
from caffe_prune.errors import DataError

@dataclasses.dataclass
class Outcome:
    runs: int
    done_before: int               # in the store or the SPEC's archive before this launch
    done: int = 0
    failed: int = 0
    busy: int = 0
    interrupted: int = 0
    sweep_dir: str = ""

    @property
    def complete(self) -> bool:
        return self.done_before + self.done == self.runs


def launch(spec: Spec, executor_factory=None, retries: int = 2, progress: bool = True, log=print) -> Outcome:
    """Expand `spec`, skip the runs its store has finished, and run the rest with the executor
    `executor_factory()` makes (default: local). Resumable: interrupted any way, the same call
    continues. Returns the counts; raises KeyboardInterrupt after recording an interruption."""
    from tqdm import tqdm
    sweep_dir = Path(spec.out).resolve()
    data = resolve_data(spec.data, progress)
    expand(spec, data)                         # every error in the SPEC before anything is written
    tasks = expand(spec, data, sweep_dir)
    archived = archive.ids(spec.archive) if spec.archive else set()
    with results_store.Store(sweep_dir) as store:
        done = {r["id"] for r in store.runs(status="done")}
        archived -= done
        store.add_runs([t for t in tasks if t["id"] not in archived])     # the archive's runs are not run here
        store.set_meta("spec", spec.as_dict())
        todo = [dict(t, sweep_dir=str(sweep_dir)) for t in tasks if t["id"] not in done | archived]
        outcome = Outcome(runs=len(tasks), done_before=len(tasks) - len(todo), sweep_dir=str(sweep_dir))
        in_archive = sum(t["id"] in archived for t in tasks)
        log(f"sweep {spec.name}: {len(tasks)} runs, {outcome.done_before} done before"
            + (f" ({in_archive} in the archive {spec.archive})" if spec.archive else "")
            + f", {len(todo)} to run -> {sweep_dir}")
        if not todo:
            return outcome
        executor = (executor_factory or LocalExecutor)()
        log(executor.describe())
        bar = tqdm(total=len(tasks), initial=outcome.done_before, unit="run", desc=f"sweep {spec.name}",
                   disable=not progress, dynamic_ncols=True)
        queue, inflight, deaths = list(reversed(todo)), {}, defaultdict(int)

        def note(message):
            (bar.write if progress else log)(message)
        try:
            while queue or inflight:
                while queue and executor.capacity() > 0:
                    task = dict(queue.pop(), executor=executor.name)
                    where = executor.submit(task)
                    inflight[task["id"]] = store.start_attempt(task["id"], executor.name, **where)
                for kind, task, payload in executor.events(timeout=0.5):
                    attempt = inflight.pop(task["id"])
                    if kind == "done":
                        store.finish(task["id"], attempt, payload)
                        outcome.done += 1
                        bar.update(1)
                    elif kind == "died":
                        deaths[task["id"]] += 1
                        again = deaths[task["id"]] <= retries
                        store.end_attempt(task["id"], attempt, "died", _with_worker(payload, task),
                                          "retrying" if again else "failed")
                        note(f"{task['run_dir']} ({task['method']}, seed {task['seed']}): {payload}; "
                             + ("given to another worker" if again else f"failed after {retries} retries"))
                        if again:
                            queue.append(task)
                        else:
                            outcome.failed += 1
                    else:          # failed (the run raised) or busy (another process holds its directory)
                        store.end_attempt(task["id"], attempt, kind, payload, "failed" if kind == "failed" else "running")
                        setattr(outcome, kind, getattr(outcome, kind) + 1)
                        note(f"{task['run_dir']} ({task['method']}, seed {task['seed']}): {kind}: {payload}")
                bar.set_postfix(running=len(inflight), failed=outcome.failed, refresh=False)
        except KeyboardInterrupt:
            executor.close(cancel=True)
            for run_id, attempt in inflight.items():
                store.end_attempt(run_id, attempt, "interrupted", "the sweep was interrupted", "interrupted")
            outcome.interrupted = len(inflight)
            bar.close()
            log(f"interrupted: {outcome.done_before + outcome.done} of {len(tasks)} runs done, "
                f"{len(inflight)} interrupted (resumable), {len(queue)} not started; "
                f"the same command continues the sweep")
            raise KeyboardInterrupt from None
        executor.close()
        bar.close()
    log(f"sweep {spec.name}: {outcome.done_before + outcome.done} of {len(tasks)} runs done"
        + (f", {outcome.failed} failed" if outcome.failed else "")
        + (f", {outcome.busy} held by another process" if outcome.busy else "") + f"; store: {store.path}")
    return outcome


def resolve_data(data: str | None, progress: bool = False) -> str | None:
    """The data every run reads, as an absolute local path: CIFAR-10 fetched (downloaded or
    extracted) once here rather than raced by every worker, when that is what `data` names or
    nothing is named; any other source (an LMDB, a list file) as its absolute path."""
    from caffe_prune.data import cifar10
    try:
        return str(Path(cifar10.fetch(None if data == "cifar10" else data, progress=progress)).resolve())
    except DataError:
        if data is not None and Path(data).exists():
            return str(Path(data).resolve())
        raise


def _with_worker(message: str, task: dict) -> str:
    """Add the worker that last started the run (its attempts.jsonl line), when the executor did
    not name it (Ray)."""
    if message.startswith("worker "):
        return message
    try:
        lines = (Path(task["sweep_dir"]) / task["run_dir"] / "attempts.jsonl").read_text().splitlines()
        last = json.loads(lines[-1])
        return f"{message} (last started by {last['host']}:{last['pid']})"
    except (OSError, ValueError, IndexError, KeyError):
        return message


@contextmanager
def sigterm_interrupts():
    """SIGTERM (a scheduler's preemption, `kill`) is handled as Ctrl-C is."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

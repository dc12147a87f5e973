"""The Caffe work of one pruning step (caffe_prune.pruning), done the naive way or the fast way.

A step needs three things from Caffe: the saliency tensors of the validation batches (one forward
and backward each, caffe_prune.metrics.collect), the oracle's probes (the loss on its validation
batches with each short-listed group masked), and the test measurement. Both engines use only
Caffe's own passes (``net._forward(start, end)``, ``net._backward``); they differ in how much they
recompute, and they give the same bits (tests/test_engines.py).

``Naive`` (``--engine naive``): every probe and every measurement is a full forward, as the authors'
scripts did. Kept on purpose, as the reference.

``Fast`` (the default):

- **suffix-only probes**: masking a group changes nothing before the first layer its masks touch
  (``Plan.start``). Per oracle batch the base forward runs in segments, keeping at each candidate's
  start the blobs the rest of the net reads that were written before it (``Plan.frontier``: copied
  as they are at that moment, so in-place layers that overwrite their bottoms later, and Split
  tops sharing memory, come back right); each probe restores them and runs ``_forward(start,
  end)`` only. The frontiers kept for one batch fit the process's share of ``cache_mb`` (the
  latest starts first; a probe whose own frontier was not kept resumes from the latest kept one
  before it, or from the input: the layers before its start are unchanged, so the bits are too).
- **saliency passes without weight gradients**: Caffe's backward in a copy of the net that shares
  its parameters and has lr_mult 0 wherever a weight gradient is not needed to reach the layers
  below (netdef.gradient_form): the blob diffs the metrics read, half the GEMMs.
- **the test measurement, incremental**: the test batches never change, so each keeps copies of the
  frontiers at a few checkpoints (``Plan.checkpoints``: stage boundaries, chosen within
  ``cache_mb``); before measuring, the parameters are compared with those the checkpoints were
  computed under, and every batch resumes from the last checkpoint before the earliest layer that
  changed, whoever changed it. When the budget holds no checkpoint, every measurement is a full
  forward.
- **workers** (CPU only: a CUDA context does not survive a fork): ``workers`` processes forked
  after the net is loaded, each holding a copy of the net with the run's committed masks (applied
  by group id) and its share of the test batches (positions in the test split, each batch read and
  transformed when it is measured: workers hold batches, not the data set) with their checkpoints. The saliency batches, the
  probes (by batch, or by candidate when there are fewer batches than workers) and the test batches
  are spread over them; results are combined in batch order with the same arithmetic as the naive
  engine. A worker that dies is replaced by a new fork of the parent (which holds the same
  committed state) and its request sent again, once: a second death on the same request ends the
  run in one line (``WorkerDied``, or the PluginError of the plugin the pass computed) with the
  signal or exit status. With one worker, a saliency pass that runs plugin code runs in a forked
  child all the same (``_isolated``), so that a plugin's os._exit or segfault is that line too,
  not the silent end of the run. Any error or Ctrl-C in the parent kills the workers at once.

BLAS threads: a pruning run computes with one BLAS thread in every process (pycaffe.BLAS_THREADS:
OpenBLAS's results depend on its thread count), whichever engine and however many cores: the same
seed gives the same bits on any machine. The workers are the parallelism.
"""
from __future__ import annotations

import math
import os
import signal
from multiprocessing.connection import Pipe

import numpy as np

from caffe_prune import evaluate, fsio, metrics, netdef, oracle, pycaffe
from caffe_prune.errors import InputError, PluginError
from caffe_prune.metrics import plugins
from caffe_prune.metrics.collect import Tensors
from caffe_prune.netdef import EVAL_TOPS

ENGINES = ("fast", "naive")


def default_cache_mb() -> int:
    """An eighth of the memory available now, at most 1 GiB: each process's share of it bounds its
    test checkpoints, and, apart, a probe batch's saved frontiers (measured: BVLC AlexNet at batch
    128, 2 workers, 80 test batches: a 2-step metric run peaks at 2.4 GiB per process; raise
    ``--cache-mb`` on a big machine for long test sets)."""
    return int(min(pycaffe.available_bytes() // 2 ** 20 // 8, 1024))


class Plan:
    """Static facts about an evaluation net's layers: where each blob is written and read, the
    frontier before each layer, the first layer a group's masks touch, FLOPs per image (twice the
    multiply-accumulates the channel graph counts, caffe_prune.graph.ChannelGraph.layer_macs)."""

    def __init__(self, net, graph):
        self.names = list(net._layer_names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.bottoms = [list(net.bottom_names[n]) for n in self.names]
        self.tops = [list(net.top_names[n]) for n in self.names]
        self.inputs = set(net.inputs)
        self.end = len(self.names) - 1
        self._frontiers = {}
        macs = graph.layer_macs()
        self.flops = [2 * macs.get(name, 0) for name in self.names]

    def frontier(self, start: int) -> list:
        """The blobs layers start.. read that layers ..start-1 wrote (net inputs excepted: no layer
        writes them): what a forward from ``start`` needs as it was just before ``start``."""
        if start not in self._frontiers:
            written = {b for tops in self.tops[:start] for b in tops}
            read = {b for bottoms in self.bottoms[start:] for b in bottoms}
            self._frontiers[start] = sorted((written & read) - self.inputs)
        return self._frontiers[start]

    def start(self, regions) -> int:
        """The first layer a group's mask regions (masking.regions) touch."""
        return min(self.index[layer] for layer, _, _ in regions)

    def checkpoints(self, shapes, images: int, budget_bytes: int, most: int = 8) -> list:
        """Up to ``most`` layer indices, spread evenly over the forward's FLOPs, whose frontiers for
        ``images`` images fit ``budget_bytes``; positions with a one-blob frontier are preferred."""
        total = sum(self.flops) or 1
        cumulative = np.cumsum([0] + self.flops[:-1]) / total
        size = {s: sum(int(np.prod(shapes[b][1:])) * 4 for b in self.frontier(s)) for s in range(1, self.end)}
        candidates = [s for s in size if size[s] and len(self.frontier(s)) == 1] or list(size)
        chosen = []
        for k in range(1, most + 1):
            target = k / (most + 1)
            best = min(candidates, key=lambda s: (abs(cumulative[s] - target), size[s]), default=None)
            if best is not None and best not in chosen:
                chosen.append(best)
        chosen.sort()
        while chosen and images * sum(size[s] for s in chosen) > budget_bytes:
            chosen.pop(max(range(len(chosen)), key=lambda j: size[chosen[j]]))
        return chosen


def _forward(net, start: int, stop: int) -> None:
    if start <= stop:
        net._forward(start, stop)


def _snapshot(net, blobs) -> dict:
    return {b: net.blobs[b].data.copy() for b in blobs}


def _restore(net, saved: dict) -> None:
    for blob, value in saved.items():
        net.blobs[blob].data[...] = value


def _loss(net) -> float:
    return float(net.blobs[EVAL_TOPS["loss"]].data)


class WorkerDied(InputError):
    """A worker process that died twice on the same request (the message is one line; the run adds
    its step)."""


def _died(request, why: str) -> InputError:
    """The one line for a request whose worker died twice: the plugin's own error when the request
    ran plugin code (a saliency pass of a plugin metric), else WorkerDied naming the request."""
    method, args = request
    used = plugins.names_in(args[1]) if method == "collect" else []
    if used:
        named = [plugins.loaded()[n] for n in used if n in plugins.loaded()]
        return PluginError(f"{', '.join(map(str, named)) or 'plugin ' + ', '.join(used)}: the process computing its "
                           f"saliency died twice on the same batch ({why}); a plugin must return its values, "
                           f"not end or crash its process")
    return WorkerDied(f"a fast-engine worker died twice on the same {method} request ({why}); "
                      f"rerun with --engine naive to see the failure in this process")


class Worker:
    """A net with the run's committed masks: what one process computes for a step."""

    def __init__(self, net, graph, masker, batch_size: int, cache_bytes: int = 0, gradient_net=None):
        self.net, self.graph, self.masker = net, graph, masker
        self._gradient = gradient_net    # a net, or what builds one when a metric first needs a backward
        self.batch_size, self.cache_budget = batch_size, cache_bytes
        self.plan = Plan(net, graph)
        self.shapes = {name: blob.data.shape for name, blob in net.blobs.items()}
        self.test_images = None          # the run's test images (a dataset split, read a batch at a time)
        self.test_ids = []
        self.cache = {}                  # test batch -> {checkpoint: frontier copy}
        self.reference = None            # the parameters the checkpoints were computed under
        self.checkpoints = []

    # ---- state ----

    def commit(self, groups) -> None:
        """Bring the masks up to ``groups`` (the run's committed groups, in order)."""
        for group in groups:
            if group not in self.masker.committed:
                self.masker.commit(group)

    def prepare(self, names) -> None:
        """Build the gradient net now when ``names`` need a backward (before a fork, so that every
        child shares one copy instead of building its own)."""
        if any(metrics.parse(name).needs - {"x"} for name in names) and callable(self._gradient):
            self._gradient = self._gradient()

    def test_share(self, test, ids) -> None:
        """The test batches (ids of batch_size chunks of the split ``test``) this worker measures."""
        self.test_images, self.test_ids = test, list(ids)
        per_image = self.cache_budget // max(1, len(self.test_ids) * self.batch_size)
        self.checkpoints = self.plan.checkpoints(self.shapes, 1, per_image) if self.cache_budget else []

    # ---- the three kinds of work ----

    def collect(self, batches, names, reading) -> Tensors:
        """The metrics' values; a pass with a backward runs in the gradient net (built on first use,
        so that a forward-only metric never holds a second net's blobs: AlexNet's are 0.5 GiB at
        batch 128), a forward-only pass in the net itself (the same forward, the same bits)."""
        backward = any(metrics.parse(name).needs - {"x"} for name in names)
        if backward and callable(self._gradient):
            self._gradient = self._gradient()
        return metrics.collect(self._gradient if backward and self._gradient is not None else self.net,
                               self.graph, batches, names, reading)

    def probe(self, batch, candidates) -> tuple:
        """(base loss, [loss with each candidate masked]) on one batch, each probe a suffix forward
        from the latest saved frontier at or before its first touched layer (the frontiers kept
        fit the worker's budget; without one, a probe is a full forward)."""
        x, y = batch
        evaluate.feed(self.net, x, y)
        starts = {g: self.plan.start(self.masker.group_regions(g)) for g in candidates}
        kept = self.frontiers(sorted(set(starts.values())), len(x))
        saved, done = {0: {}}, 0
        for start in kept:
            _forward(self.net, done, start - 1)
            saved[start] = _snapshot(self.net, self.plan.frontier(start))
            done = start
        _forward(self.net, done, self.plan.end)
        base = _loss(self.net)
        losses = []
        for group in candidates:
            resume = max(s for s in saved if s <= starts[group])   # the layers before its start are unchanged
            self.masker.mask(group)
            try:
                _restore(self.net, saved[resume])
                _forward(self.net, resume, self.plan.end)
                losses.append(_loss(self.net))
            finally:
                self.masker.restore(group)
        return base, losses

    def frontiers(self, starts, images: int) -> list:
        """Of the probes' start layers, those whose frontiers for ``images`` images fit the worker's
        budget together (the latest first: they save the most of a forward)."""
        kept, used = [], 0
        for start in sorted(starts, reverse=True):
            size = images * sum(int(np.prod(self.shapes[b][1:])) * 4 for b in self.plan.frontier(start))
            if start and used + size <= self.cache_budget:
                kept.append(start)
                used += size
        return sorted(kept)

    def test(self) -> list:
        """(images, loss, top1, top5) of each of this worker's test batches, from the checkpoints
        still valid (a full forward where none is)."""
        changed = self._first_changed()
        valid = [c for c in self.checkpoints if c <= changed]
        rows = []
        for batch in self.test_ids:
            lo = batch * self.batch_size
            x, y = self.test_images.batch(np.arange(lo, min(lo + self.batch_size, len(self.test_images))))
            evaluate.feed(self.net, x, y)
            kept = self.cache.get(batch, {})
            resume = max((c for c in valid if c in kept), default=0)
            if resume:
                _restore(self.net, kept[resume])
            fresh, done = {c: kept[c] for c in valid if c in kept and c <= resume}, resume
            for c in self.checkpoints:
                if c > resume:
                    _forward(self.net, done, c - 1)
                    fresh[c], done = _snapshot(self.net, self.plan.frontier(c)), c
            _forward(self.net, done, self.plan.end)
            self.cache[batch] = fresh
            rows.append((len(x), *evaluate.scores(self.net, lo)))
        self._remember()
        return rows

    def cache_bytes(self) -> int:
        return sum(a.nbytes for kept in self.cache.values() for frontier in kept.values() for a in frontier.values())

    def _first_changed(self) -> int:
        """The first layer whose parameters differ from those the checkpoints were computed under
        (the masker is not trusted to say: anything may have written the blobs)."""
        if self.reference is None:
            return 0
        for name, saved in self.reference.items():
            if any(not np.array_equal(blob.data, value) for blob, value in zip(self.net.params[name], saved)):
                return self.plan.index[name]
        return self.plan.end + 1

    def _remember(self) -> None:
        """Copy the parameters the checkpoints now hold (only the layers that changed)."""
        if not self.checkpoints:
            return
        if self.reference is None:
            self.reference = {name: None for name in self.plan.names if name in self.net.params}
        for name, saved in self.reference.items():
            blobs = self.net.params[name]
            if saved is None or any(not np.array_equal(b.data, v) for b, v in zip(blobs, saved)):
                self.reference[name] = [b.data.copy() for b in blobs]


class _Remote:
    """A forked worker process and the pipe to it."""

    def __init__(self, worker: Worker):
        self.conn, child = Pipe()
        parent = os.getpid()
        self.pid, self.reaped = os.fork(), False   # reaped: its pid may now be another process's
        if self.pid == 0:        # (the run's lock is closed in every fork: caffe_prune.fsio)
            self.conn.close()
            fsio.die_with_parent(parent)
            _serve(worker, child)
        child.close()

    def send(self, request) -> None:
        self.conn.send(request)

    def receive(self):
        reply = self.conn.recv()
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def reap(self, wait_s: float = 5.0) -> str:
        """How the worker ended, once its pipe closed: "killed by SIGSEGV", "exit status 3" (a worker
        still there after ``wait_s`` is killed: "stopped answering")."""
        import time
        deadline = time.monotonic() + wait_s
        self.conn.close()
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.reaped = True
                return "gone"
            if pid:
                self.reaped = True
                if os.WIFSIGNALED(status):
                    return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
                return f"exit status {os.WEXITSTATUS(status)}"
            if time.monotonic() > deadline:
                self.kill()
                return "stopped answering; killed"
            time.sleep(0.01)

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.conn.close()
        try:
            if not self.reaped:
                os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self.reaped = True

    def kill(self) -> None:
        try:
            if not self.reaped:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        self.reaped = True
        self.conn.close()


def _serve(worker: Worker, conn) -> None:
    """A worker process's loop: (method, args) in, its result (or the exception) out."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent handles Ctrl-C and stops us
        while True:
            request = conn.recv()
            if request is None:
                break
            method, args = request
            try:
                conn.send(getattr(worker, method)(*args))
            except PluginError as exc:  # a plugin metric's own one line (it names the plugin)
                conn.send(exc)
            except Exception as exc:   # sent back and raised in the parent
                conn.send(InputError(f"worker {os.getpid()}: {type(exc).__name__}: {exc}"))
    except (EOFError, OSError, KeyboardInterrupt):
        code = 1
    finally:
        os._exit(code)


class Naive:
    """Full forwards for every probe and measurement: the reference (and the authors' scripts)."""

    name = "naive"

    def __init__(self, session, masker, test, **_):
        pycaffe.set_blas_threads(pycaffe.BLAS_THREADS)
        self.session, self.masker = session, masker
        self.images = test
        self.workers = 0

    def collect(self, batches, names, reading) -> Tensors:
        return metrics.collect(self.session.net, self.session.graph, batches, names, reading)

    def sensitivities(self, candidates, batches) -> dict:
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        return oracle.sensitivities(candidates, self.masker, lambda: self.session.evaluate(x, y)["loss"])

    def commit(self, groups) -> None:
        """Make the masks of ``groups`` (a step's, in order) permanent."""
        for group in groups:
            self.masker.commit(group)

    def test(self) -> dict:
        return self.session.evaluate(self.images)

    def close(self) -> None:
        pass


class Fast(Naive):
    """Suffix-only probes, incremental test measurements and forked workers (see the module)."""

    name = "fast"

    def __init__(self, session, masker, test, workers: int | None = None, cache_mb: int | None = None):
        super().__init__(session, masker, test)
        # a CUDA context does not survive fork: on a GPU the one process does the work
        self.workers = 1 if pycaffe.on_gpu() else max(1, workers or pycaffe.cores())
        budget = (default_cache_mb() if cache_mb is None else cache_mb) * 2 ** 20 // self.workers
        batch = session.batch_size
        self.test_batches = math.ceil(len(test) / batch)
        shares = np.array_split(np.arange(self.test_batches), self.workers)
        # saliency passes in a copy of the net sharing its parameters (and so its masks) that skips
        # the weight gradients no metric reads (netdef.gradient_form)
        def gradient_net():
            net = pycaffe.net_from_param(netdef.without_fillers(netdef.gradient_form(session.param)),
                                        where=session.network.where)
            net.share_with(session.net)
            return net
        self.local = Worker(session.net, session.graph, masker, batch, budget, gradient_net)
        self.local.test_share(test, shares[0])
        self.shares = [list(share) for share in shares]
        self.committed = list(masker.committed)
        self.remote = []
        self.on_dispatch = None          # a test hook: called with the request before replies are read
        if self.workers > 1:
            self.remote = [self._spawn(i) for i in range(self.workers)]

    def _spawn(self, i) -> _Remote:
        """Worker i: a fork of this process (its net and masks as they are now) with its test share."""
        self.local.test_share(self.images, self.shares[i])
        try:
            return _Remote(self.local)
        finally:
            self.local.test_share(self.images, self.shares[0])

    def _all(self, requests) -> list:
        """Send one request to each worker (None: nothing for it), gather the replies in worker order;
        a worker that died is replaced and asked again, once (_ask). Whatever ends the gathering (an
        error, Ctrl-C) kills every worker first: none is left computing."""
        if not self.remote:
            return [getattr(self.local, m)(*a) if (m, a) != (None, None) else None for m, a in requests]
        try:
            for remote, request in zip(self.remote, requests):
                if request[0] is not None:
                    self._send(remote, request)
            if self.on_dispatch:
                self.on_dispatch(requests)
            replies = []
            for i, request in enumerate(requests):
                if request[0] is None:
                    replies.append(None)
                    continue
                reply, self.remote[i] = self._ask(self.remote[i], request, lambda i=i: self._spawn(i))
                replies.append(reply)
            return replies
        except BaseException:
            for remote in self.remote:
                remote.kill()
            raise

    def _ask(self, remote, request, spawn) -> tuple:
        """(reply, the worker that gave it) to ``request``, already sent to ``remote``: a worker that
        dies is replaced by ``spawn()`` and asked again; a second death raises _died's one line."""
        for attempt in (1, 2):
            try:
                return remote.receive(), remote
            except (EOFError, OSError):
                why = remote.reap()
                if attempt == 2:
                    raise _died(request, why) from None
                remote = spawn()
                self._send(remote, request)

    def _isolated(self, request):
        """The local worker's reply to ``request``, computed in a fork of it (one worker: plugin code
        runs in a child, so that what ends that child is one line, not the end of the run)."""
        self.local.prepare(request[1][1])
        remote = _Remote(self.local)
        try:
            self._send(remote, request)
            reply, remote = self._ask(remote, request, lambda: _Remote(self.local))
        except BaseException:
            remote.kill()
            raise
        remote.stop()
        return reply

    def _send(self, remote, request) -> None:
        method, args = request
        try:
            remote.send((method, args))
        except OSError:
            pass            # a dead worker: found when its reply is read

    def _per_item(self, method, items, args_of) -> list:
        """One request per item (a batch), spread over the workers, the replies in item order."""
        out = []
        for lo in range(0, len(items), self.workers):
            chunk = items[lo:lo + self.workers]
            requests = [(method, args_of(item)) for item in chunk] + [(None, None)] * (self.workers - len(chunk))
            out += [reply for reply in self._all(requests) if reply is not None]
        return out

    def collect(self, batches, names, reading) -> Tensors:
        static = [n for n in names if metrics.parse(n).static]
        dynamic = [n for n in names if n not in static]
        weights_only = self.local.collect([], static, reading)
        if not dynamic:
            return weights_only
        if self.remote:
            parts = self._per_item("collect", batches, lambda batch: ([batch], dynamic, reading))
        elif plugins.names_in(dynamic) and not pycaffe.on_gpu():   # a CUDA context does not survive a fork
            parts = [self._isolated(("collect", (batches, dynamic, reading)))]
        else:
            parts = [self.local.collect(batches, dynamic, reading)]
        return Tensors.merge(weights_only, parts)

    def sensitivities(self, candidates, batches) -> dict:
        candidates = list(candidates)
        if not self.remote:
            results = [self.local.probe(batch, candidates) for batch in batches]
        elif len(batches) >= self.workers:          # whole batches per worker
            results = self._per_item("probe", batches, lambda batch: (batch, candidates))
        else:                                       # every batch, the candidates split over the workers
            split = [[int(g) for g in part] for part in np.array_split(candidates, self.workers)]
            results = []
            for batch in batches:
                parts = [p for p in self._all([("probe", (batch, part)) if part else (None, None) for part in split])
                         if p is not None]
                results.append((parts[0][0], [loss for part in parts for loss in part[1]]))
        sizes = [len(b[1]) for b in batches]
        base = evaluate.combine([(size, loss, 0.0, 0.0) for size, (loss, _) in zip(sizes, results)])["loss"]
        return {group: evaluate.combine([(size, r[1][j], 0.0, 0.0) for size, r in zip(sizes, results)])["loss"] - base
                for j, group in enumerate(candidates)}

    def commit(self, groups) -> None:
        for group in groups:
            self.masker.commit(group)
            self.committed.append(group)
        if self.remote:
            self._all([("commit", (list(self.committed),))] * self.workers)

    def test(self) -> dict:
        if not self.remote:
            return evaluate.combine(self.local.test())
        rows = self._all([("test", ())] * self.workers)
        return evaluate.combine([row for share in rows for row in share])

    def worker_pids(self) -> list:
        return [remote.pid for remote in self.remote]

    def cache_bytes(self) -> int:
        """Memory the test checkpoints hold, over every process."""
        if not self.remote:
            return self.local.cache_bytes()
        return sum(self._all([("cache_bytes", ())] * self.workers))

    def close(self) -> None:
        for remote in self.remote:
            remote.stop()
        self.remote = []


def make(name: str, session, masker, test, workers=None, cache_mb=None):
    """The engine ``name`` for a session, its masker and its test images (a dataset split)."""
    if name not in ENGINES:
        raise InputError(f"--engine {name!r} is not one of {', '.join(ENGINES)}")
    kind = Fast if name == "fast" else Naive
    return kind(session, masker, test, workers=workers, cache_mb=cache_mb)

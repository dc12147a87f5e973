"""`caffe-prune bench`: the same seeded pruning run, step by step, in several engines in one process.

Modes (``--modes``, all by default):

- ``naive``: caffe_prune.engines.Naive, one BLAS thread (the reference whose bits every mode must match);
- ``naive-blas``: the same with every core given to OpenBLAS (Caffe's usual way to use a machine;
  timed beside the others, its decisions compared too: threads change the last bits);
- ``fast-1``: caffe_prune.engines.Fast in this process (suffix-only probes, incremental test);
- ``fast-N``: the same with N worker processes (``--workers``, default one per core).

The modes run interleaved, step after step, so that a busy machine slows them alike, after one
untimed warm-up of a step's work each. Printed per
mode: seconds per step and per phase (saliency, probes, test), the step-throughput ratio to
``naive``, whether every decision, sensitivity and test score equals ``naive``'s (exact float ties
named), CPU cores used (CPU time / wall time, workers included), peak memory (this process, and the
largest worker), and the distance to the machine: a plain forward's GFLOP/s (FLOPs counted from the
net's shapes, caffe_prune.engines.Plan) against the measured single-thread SGEMM rate, and each
mode's effective GFLOP/s (the FLOPs a naive step does, per second of the mode's step).
"""
from __future__ import annotations

import os
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from caffe_prune import engines, evaluate, pruning, pycaffe

PHASES = ("saliency", "probes", "test")


def _cpu_seconds(pids=()) -> float:
    """CPU time of this process and of the given live children (from /proc), in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def _peak_kib(pid) -> int:
    try:
        return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return 0


def sgemm_gflops(size: int = 1024, repeats: int = 5) -> float:
    """The machine's single-thread SGEMM rate (numpy's OpenBLAS, one thread), best of a few."""
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


class Mode:
    """One engine's copy of the run, and what its steps cost."""

    def __init__(self, name, run: pruning.Run):
        self.name, self.run = name, run
        self.records, self.seconds, self.cpu = [], [], []
        self.phases = {phase: [] for phase in PHASES}

    def step(self, step: int, pruned: set) -> dict | None:
        """The run's own step (pruning.Run.advance) from the state ``pruned``, timed; None (and
        nothing recorded) when the run may take no group there."""
        run = self.run
        pids = run.engine.worker_pids() if hasattr(run.engine, "worker_pids") else []
        wall, cpu = time.perf_counter(), _cpu_seconds(pids)
        choice = run.advance(step, set(pruned))
        if choice is None:
            return None
        self.seconds.append(time.perf_counter() - wall)
        self.cpu.append(_cpu_seconds(run.engine.worker_pids() if pids else []) - cpu)
        for phase in PHASES:
            self.phases[phase].append(run.timing.get(phase, 0.0))
        self.records.append(choice)
        return choice

    def unrecord(self) -> None:
        """Forget the last step's figures (another mode could not take it)."""
        for figures in (self.records, self.seconds, self.cpu, *self.phases.values()):
            figures.pop()


def _fill(run: pruning.Run, images: int) -> None:
    """Repeat the test images up to ``images`` (timing the full protocol's 80 batches on a subset)."""
    run.test = run.test.repeated(images)


def bench(config: pruning.Config, steps: int, modes, workers: int | None = None, fill_test: bool = False,
          progress: bool = True) -> dict:
    """Run ``steps`` steps of ``config`` in every mode; the figures as plain data."""
    workers = workers or pycaffe.cores()
    kinds = {"naive": ("naive", None), "naive-blas": ("naive", None), "fast-1": ("fast", 1),
             f"fast-{workers}": ("fast", workers)}
    unknown = [m for m in modes if m not in kinds and m != "fast-N"]
    if unknown:
        raise ValueError(f"--modes: unknown {', '.join(unknown)}; modes are naive, naive-blas, fast-1, fast-N")
    modes = [f"fast-{workers}" if m == "fast-N" else m for m in modes]
    with tempfile.TemporaryDirectory(prefix="caffe-prune-bench-") as tmp:
        runs = {}
        for name in dict.fromkeys(modes):
            kind, count = kinds[name]
            run = pruning.Run(replace(config, engine=kind, workers=count), Path(tmp) / name, progress=False)
            if fill_test:
                run.engine.close()
                _fill(run, config.test_size * config.batch_size)
                run.engine = engines.make(kind, run.session, run.masker, run.test, count, config.cache_mb)
            if name == "naive-blas":
                pycaffe.set_blas_threads(pycaffe.cores())
            runs[name] = Mode(name, run)
        first = next(iter(runs.values())).run
        graph, plan = first.graph, engines.Plan(first.net, first.graph)
        for mode in runs.values():                                # step 0: the unpruned measurement
            _set_threads(mode)
            mode.records.append({"test": mode.run._test()})
            mode.run.decide(1, set())                             # untimed warm-up (first touches of memory)
        pruned = set()
        for step in range(1, steps + 1):
            if not graph.prunable(pruned):
                break
            taken = []
            for mode in runs.values():
                _set_threads(mode)
                taken.append(mode.step(step, pruned))
            if None in taken:           # the constraints allow no group here: every mode ends at the last step
                for mode, choice in zip(runs.values(), taken):
                    if choice is not None:
                        mode.unrecord()
                break
            pruned.update(next(iter(runs.values())).records[-1]["groups"])
            if progress:
                print(f"step {step}: " + "  ".join(f"{m.name} {m.seconds[-1]:.2f}s" for m in runs.values()), flush=True)
        peaks = {name: max([_peak_kib(pid) for pid in mode.run.engine.worker_pids()] or [0])
                 if hasattr(mode.run.engine, "worker_pids") else 0 for name, mode in runs.items()}
        cache = {name: mode.run.engine.cache_bytes() if hasattr(mode.run.engine, "cache_bytes") else 0
                 for name, mode in runs.items()}
        forward = _forward_rate(first, plan)
        for mode in runs.values():
            mode.run.close()
    naive = runs.get("naive")
    peak = sgemm_gflops()
    flops_naive_step = _naive_step_flops(config, plan, len(first.test))
    result = {"net": config.net, "steps": len(next(iter(runs.values())).seconds), "k": config.k,
              "test_images": len(first.test), "batch_size": config.batch_size,
              "input_shape": list(first.session.input_shape), "oracle": bool(config.oracle), "cores": pycaffe.cores(),
              "workers": workers, "sgemm_gflops_1_thread": round(peak, 2),
              "forward_gflops_1_thread": round(forward, 2), "forward_share_of_sgemm": round(forward / peak, 3),
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "modes": {}}
    for name, mode in runs.items():
        per_step = float(np.mean(mode.seconds)) if mode.seconds else float("nan")
        row = {"seconds_per_step": round(per_step, 4),
               "phases": {p: round(float(np.mean(v)), 4) for p, v in mode.phases.items() if v},
               "cores_used": round(float(np.sum(mode.cpu) / max(np.sum(mode.seconds), 1e-9)), 2),
               "worker_peak_rss_mib": round(peaks[name] / 1024, 1), "test_cache_mib": round(cache[name] / 2**20, 1),
               "effective_gflops": round(flops_naive_step / per_step / 1e9, 2) if mode.seconds else None}
        if naive is not None and mode.seconds:
            row["speedup_vs_naive"] = round(float(np.mean(naive.seconds)) / per_step, 2)
            row["same_as_naive"] = _compare(naive.records, mode.records)
            row["phase_speedup"] = {p: round(float(np.mean(naive.phases[p])) / max(float(np.mean(v)), 1e-9), 2)
                                    for p, v in mode.phases.items() if v and naive.phases[p]}
        result["modes"][name] = row
    fast = [n for n in runs if n.startswith("fast-") and n != "fast-1"]
    if "fast-1" in runs and fast:
        one, many = result["modes"]["fast-1"], result["modes"][fast[0]]
        scaling = one["phases"].get("probes", 0) / max(many["phases"].get("probes", 1e-9), 1e-9)
        result["probe_scaling"] = {"workers": workers, "speedup": round(scaling, 2),
                                   "efficiency": round(scaling / workers, 2),
                                   "projected_16_cores": round(min(16, 1 + (16 - 1) * scaling / workers
                                                                   if workers > 1 else 1) , 1)}
    return result


def _set_threads(mode: Mode) -> None:
    pycaffe.set_blas_threads(pycaffe.cores() if mode.name == "naive-blas" else pycaffe.BLAS_THREADS)


def _forward_rate(run: pruning.Run, plan: engines.Plan) -> float:
    """GFLOP/s of one plain forward of a batch (one BLAS thread), best of three."""
    pycaffe.set_blas_threads(pycaffe.BLAS_THREADS)
    x, y = run.validation.batch(np.arange(min(run.config.batch_size, len(run.validation))))
    evaluate.feed(run.net, x, y)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        run.net.forward()
        best = min(best, time.perf_counter() - start)
    return sum(plan.flops) * len(x) / best / 1e9


def _naive_step_flops(config, plan, test_images) -> float:
    """FLOPs of a naive step: saliency forward + backward (~3 forwards) of its batches, k + 1 full
    forwards of the oracle's batches, a full forward of the test images."""
    forward = sum(plan.flops)
    images = config.batch_size
    saliency = 3 * forward * images * config.eval_size
    probes = (config.k + 1) * forward * images * config.oracle_eval_size if config.oracle else 0
    return saliency + probes + forward * test_images


def _compare(reference, records) -> str:
    """'identical', or where the first difference is (a decision, a sensitivity, a test score)."""
    for step, (want, have) in enumerate(zip(reference, records)):
        if want.get("groups") != have.get("groups"):
            sens = want.get("sensitivities", {})
            tie = sens and [sens.get(str(g)) for g in want["groups"]] == [sens.get(str(g)) for g in have["groups"]]
            return f"step {step}: groups {have.get('groups')} instead of {want.get('groups')}" + \
                (" (an exact float tie)" if tie else "")
        if want.get("sensitivities") != have.get("sensitivities"):
            return f"step {step}: same group, sensitivities differ in their last bits"
        if want.get("test") != have.get("test"):
            return f"step {step}: same group, test scores differ in their last bits"
    return "identical"


def format_table(result: dict) -> str:
    lines = [f"{result['net']}: {result['steps']} steps, k={result['k']}, {result['test_images']} test images per "
             f"measurement, {result['cores']} cores, fast-N with {result['workers']} workers",
             f"machine: SGEMM {result['sgemm_gflops_1_thread']} GFLOP/s on one thread; a plain Caffe forward reaches "
             f"{result['forward_gflops_1_thread']} GFLOP/s ({100 * result['forward_share_of_sgemm']:.0f}% of it)",
             f"{'mode':<11} {'s/step':>8} {'saliency':>9} {'probes':>8} {'test':>8} {'x naive':>8} {'cores':>6} "
             f"{'eff. GF/s':>9} {'worker MiB':>10} {'cache MiB':>9}  decisions"]
    for name, row in result["modes"].items():
        p = row["phases"]
        lines.append(f"{name:<11} {row['seconds_per_step']:>8.3f} {p.get('saliency', 0):>9.3f} {p.get('probes', 0):>8.3f} "
                     f"{p.get('test', 0):>8.3f} {row.get('speedup_vs_naive', float('nan')):>8.2f} "
                     f"{row['cores_used']:>6.2f} {row['effective_gflops'] or 0:>9.2f} "
                     f"{row['worker_peak_rss_mib']:>10.1f} {row['test_cache_mib']:>9.1f}  {row.get('same_as_naive', '-')}")
    if "probe_scaling" in result:
        s = result["probe_scaling"]
        lines.append(f"probes: {s['speedup']}x with {s['workers']} workers ({100 * s['efficiency']:.0f}% per worker); "
                     f"projected speedup on 16 cores at that efficiency: {s['projected_16_cores']}x")
    lines.append(f"peak memory of this process: {result['peak_rss_mib']} MiB")
    return "\n".join(lines)

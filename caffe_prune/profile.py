"""Measured forward latency: `caffe-prune profile`, what Caffe's `caffe time` tool reports, from pycaffe.

Pruning is done to make a network cheaper to run, and the counts the graph gives (conv weights
removed, MACs) are proxies: what a deploy sees is the time of Caffe's own forward on the physically
smaller net (caffe_prune.export.compact_net). This module measures it, whole and layer by layer, at
given batch sizes and BLAS thread counts, so that an original and its compact export can be put side
by side (``compare``). MACs are not counted here: they belong to the channel graph; ``profile``
takes them as ``costs`` and copies them into its result.

How it is timed: ``time.perf_counter`` around ``net._forward(0, n - 1)`` for a whole forward, and
around ``net._forward(i, i)`` for layer i, the layers run one at a time in order (what `caffe time`
does with ``Layer::Forward``). Medians and the interquartile range, not means: on a shared machine
background load makes some repeats slow. The whole forward and the layer-by-layer pass alternate,
repeat after repeat, so that load that drifts hits both alike. On the CPU, Caffe's convolutions and
InnerProducts are OpenBLAS GEMMs, so the BLAS thread count (caffe_prune.pycaffe.set_blas_threads) is
part of what is measured; it is restored to ``pycaffe.BLAS_THREADS`` afterwards.

On a GPU, Caffe queues kernels and returns: each timed region therefore ends with a synchronisation,
made by reading the ``.data`` of a small blob the region wrote (pycaffe's ``.data`` copies a blob the
GPU last wrote to the host, which waits for the queued kernels). A whole forward reads its smallest
output (the logits: a copy of a few KiB); a layer reads its smallest top, and that copy is part of
the layer's time (with the copy back when the next layer reads it: pycaffe's ``.data`` marks the
blob as held by the CPU), so on a GPU compare per-layer figures between nets rather than read them
as kernel times. A layer without tops (Silence) has nothing to read and is not synchronised.
"""
from __future__ import annotations

import copy
import os
import time

import numpy as np

from caffe_prune import netdef, pycaffe
from caffe_prune.errors import InputError

THREADS_HELP = "comma-separated BLAS thread counts, whole numbers or 'all' (every core)"


def _sync_blob(net, blob_ids):
    """The smallest of these blobs, read to end a timed region on a GPU (None on the CPU)."""
    blobs = [net._blobs[j] for j in blob_ids]
    return min(blobs, key=lambda b: b.count) if pycaffe.on_gpu() and blobs else None


def latency(net, repeats: int = 20, warmup: int = 3, per_layer: bool = True) -> dict:
    """Forward latency of a built TEST-phase caffe.Net whose inputs are filled (a TRAIN net's
    BatchNorm would update its statistics; a TEST forward changes no parameter).

    ``warmup`` untimed whole forwards, then ``repeats`` timed ones, each followed (``per_layer``) by
    one timed pass over the layers one at a time. On a GPU every timed region ends by reading a
    small blob it wrote, which synchronises (see the module docstring). Returns median_ms, iqr_ms,
    q1_ms, q3_ms, min_ms of the whole forwards; with per_layer, ``layers``: [{name, type, median_ms,
    share}] in net order (share: of layers_sum_ms, the sum of the layer medians)."""
    if repeats < 1 or warmup < 0:
        raise InputError(f"latency: repeats {repeats} must be at least 1 and warmup {warmup} at least 0")
    last = len(net.layers) - 1
    end = _sync_blob(net, list(net._outputs) or list(net._top_ids(last)))
    tops = [_sync_blob(net, net._top_ids(i)) for i in range(last + 1)]
    clock = time.perf_counter
    for _ in range(warmup):
        net._forward(0, last)
        if end is not None:
            end.data
    whole, layers = np.zeros(repeats), np.zeros((repeats, last + 1))
    for r in range(repeats):
        start = clock()
        net._forward(0, last)
        if end is not None:
            end.data
        whole[r] = clock() - start
        for i in range(last + 1) if per_layer else ():
            start = clock()
            net._forward(i, i)
            if tops[i] is not None:
                tops[i].data
            layers[r, i] = clock() - start
    q1, median, q3 = np.percentile(whole * 1e3, [25, 50, 75])
    out = {"repeats": repeats, "warmup": warmup, "median_ms": round(float(median), 4),
           "iqr_ms": round(float(q3 - q1), 4), "q1_ms": round(float(q1), 4), "q3_ms": round(float(q3), 4),
           "min_ms": round(float(whole.min() * 1e3), 4)}
    if per_layer:
        medians = np.median(layers, axis=0) * 1e3
        total = float(medians.sum())
        out["layers_sum_ms"] = round(total, 4)
        out["layers"] = [{"name": name, "type": layer.type, "median_ms": round(float(m), 4),
                          "share": round(float(m) / total, 4) if total else 0.0}
                         for name, layer, m in zip(net._layer_names, net.layers, medians)]
    return out


def thread_counts(threads) -> list:
    """BLAS thread counts from whole numbers and 'all' (pycaffe.cores()), duplicates dropped."""
    counts = []
    for value in threads:
        text = str(value).strip().lower()
        count = pycaffe.cores() if text == "all" else int(text) if text.isdigit() else 0
        if count < 1:
            raise InputError(f"--threads: {str(value)!r} is not a thread count; give {THREADS_HELP}, "
                                     f"e.g. --threads 1,all")
        if count not in counts:
            counts.append(count)
    if not counts:
        raise InputError(f"--threads is empty; give {THREADS_HELP}, e.g. --threads 1,all")
    return counts


def _build(form, weights, where: str):
    """The structure form in Caffe with ``weights``: a caffemodel path, {layer: [arrays]} (as
    export.compact returns), or None (the definition's own fillers: a toy net's random weights)."""
    if weights is None:
        return pycaffe.net_from_param(form, where=where)
    if not isinstance(weights, dict):
        return pycaffe.net_from_param(netdef.without_fillers(form), os.fspath(weights), where=where)
    net = pycaffe.net_from_param(netdef.without_fillers(form), where=where)
    missing = [name for name in net.params if name not in weights]
    if missing:
        raise InputError(f"{where}: the weights given hold no arrays for layer(s) {', '.join(missing[:4])}; "
                                 f"pass the {{layer: [arrays]}} that export.compact returned for this net")
    for name, arrays in weights.items():
        blobs = net.params[name] if name in net.params else []
        if name in net.params and len(arrays) != len(blobs):
            raise InputError(f"{where}: layer {name!r} is given {len(arrays)} arrays, the net has {len(blobs)} blobs")
        for i, (blob, array) in enumerate(zip(blobs, arrays)):
            if tuple(np.shape(array)) != tuple(blob.data.shape):
                raise InputError(f"{where}: layer {name!r} blob {i} is given shape {tuple(np.shape(array))}, "
                                         f"the net has {tuple(blob.data.shape)}; use the weights of this definition")
            blob.data[...] = array
    return net


def profile(net_param, weights, input_shape=None, batch_sizes=(1, 32), threads=(1, "all"), repeats: int = 20,
            warmup: int = 3, per_layer: bool = True, costs: dict | None = None, seed: int = 0,
            where: str | None = None) -> dict:
    """Latency of ``net_param``'s structure form (netdef.structure_form: data layers as one Input
    of ``input_shape``, None: the declared one; label readers dropped) with ``weights`` (see _build),
    for every (batch size, BLAS thread count) pair, on seeded random normal images.

    Returns {net, input_shape, gpu, cores, parameters (the sizes of every parameter blob of the built
    net, BatchNorm's statistics included), costs (as given, e.g. MACs from the channel graph; None),
    runs: [{batch, threads, **latency(...)}], ordered by batch then threads}."""
    where = where or f"net {net_param.name!r}"
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise InputError(f"{where}: batch sizes {list(batch_sizes)} must be whole numbers of at least 1")
    if repeats < 1 or warmup < 0:
        raise InputError(f"{where}: repeats {repeats} must be at least 1 and warmup {warmup} at least 0")
    counts = thread_counts(threads)
    form = netdef.structure_form(net_param, input_shape, where)
    pycaffe.check_net(form, "test", where)
    net = _build(form, weights, where)
    data = net.inputs[0]
    shape = tuple(net.blobs[data].data.shape[1:])
    runs = []
    try:
        for batch in sorted({int(b) for b in batch_sizes}):
            net.blobs[data].reshape(batch, *shape)
            net.reshape()
            net.blobs[data].data[...] = np.random.default_rng(seed).normal(size=(batch, *shape)).astype(np.float32)
            for count in counts:
                pycaffe.set_blas_threads(count)
                runs.append({"batch": batch, "threads": count, **latency(net, repeats, warmup, per_layer)})
    finally:
        pycaffe.set_blas_threads(pycaffe.BLAS_THREADS)
    return {"net": net_param.name or where, "input_shape": list(shape), "gpu": pycaffe.on_gpu(),
            "cores": pycaffe.cores(), "parameters": int(sum(b.data.size for blobs in net.params.values() for b in blobs)),
            "costs": copy.deepcopy(costs), "runs": runs}


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def spread(original: dict, compact: dict) -> list:
    """The speed-up's spread from the quartiles of both timings: [original q1 / compact q3,
    original q3 / compact q1] (the speed-up of a slow original forward against a fast compact one
    and the reverse); a measurement on a busy machine is one number inside it, not a constant."""
    return [_ratio(original["q1_ms"], compact["q3_ms"]), _ratio(original["q3_ms"], compact["q1_ms"])]


def served(prototxt, caffemodel, onnx_path, names, batch_sizes=(1, 32), threads=(1, "all"), repeats: int = 20,
           warmup: int = 3) -> list:
    """The deploy files timed in each runtime of ``names`` (caffe_prune.runtimes: caffe, opencv,
    onnxruntime) at every (batch size, thread count): [{runtime, batch, threads, median_ms, q1_ms,
    q3_ms, images_per_s}]; a runtime that is not installed is one InputError line."""
    from caffe_prune import runtimes
    rows = []
    for name in names:
        for count in thread_counts(threads):
            runner = runtimes.load(name, prototxt, caffemodel, onnx_path, threads=count)
            for batch in sorted({int(b) for b in batch_sizes}):
                rows.append(runtimes.latency(runner, batch, repeats, warmup))
    return rows


def compare_served(original: list, compact: list) -> list:
    """Two ``served`` tables side by side: per (runtime, batch, threads), both medians, the speed-up
    and its spread."""
    theirs = {(r["runtime"], r["batch"], r["threads"]): r for r in compact}
    return [{"runtime": r["runtime"], "batch": r["batch"], "threads": r["threads"], "original_ms": r["median_ms"],
             "compact_ms": theirs[key]["median_ms"], "speedup": _ratio(r["median_ms"], theirs[key]["median_ms"]),
             "speedup_range": spread(r, theirs[key])}
            for r in original if (key := (r["runtime"], r["batch"], r["threads"])) in theirs]


def format_served(rows: list, compared: bool = False) -> str:
    """A ``served`` (or ``compare_served``) table for the terminal."""
    if compared:
        lines = [f"{'runtime':<12} {'batch':>5} {'threads':>7} {'original ms':>12} {'compact ms':>11} "
                 f"{'speed-up (quartile range)':>26}"]
        lines += [f"{r['runtime']:<12} {r['batch']:>5} {r['threads']:>7} {r['original_ms']:>12.3f} "
                  f"{r['compact_ms']:>11.3f} {r['speedup']:>10.2f}x ({r['speedup_range'][0]:.2f}-"
                  f"{r['speedup_range'][1]:.2f})" for r in rows]
        return "\n".join(lines)
    lines = [f"{'runtime':<12} {'batch':>5} {'threads':>7} {'median ms':>10} {'q1-q3 ms':>16} {'images/s':>10}"]
    lines += [f"{r['runtime']:<12} {r['batch']:>5} {r['threads']:>7} {r['median_ms']:>10.3f} "
              f"{r['q1_ms']:>7.3f}-{r['q3_ms']:<8.3f} {r['images_per_s']:>10.1f}" for r in rows]
    return "\n".join(lines)


def compare(original: dict, compact: dict) -> dict:
    """Two profiles side by side: per (batch, threads) pair both measured, the speed-up (original
    median / compact median) and the per-layer table matched by layer name (a layer only one net has
    gets None on the other side)."""
    theirs = {(r["batch"], r["threads"]): r for r in compact["runs"]}
    runs = []
    for run in original["runs"]:
        other = theirs.get((run["batch"], run["threads"]))
        if other is None:
            continue
        row = {"batch": run["batch"], "threads": run["threads"], "original_ms": run["median_ms"],
               "compact_ms": other["median_ms"], "speedup": _ratio(run["median_ms"], other["median_ms"]),
               "speedup_range": spread(run, other)}
        if "layers" in run and "layers" in other:
            mine, small = {l["name"]: l for l in run["layers"]}, {l["name"]: l for l in other["layers"]}
            names = list(mine) + [n for n in small if n not in mine]
            row["layers"] = [{"name": n, "type": (mine.get(n) or small[n])["type"],
                              "original_ms": mine[n]["median_ms"] if n in mine else None,
                              "compact_ms": small[n]["median_ms"] if n in small else None,
                              "speedup": _ratio(mine[n]["median_ms"] if n in mine else None,
                                                small[n]["median_ms"] if n in small else None)} for n in names]
        runs.append(row)
    if not runs:
        raise InputError("compare: the two profiles share no (batch, threads) pair; profile both with "
                                 "the same batch sizes and thread counts")
    costs = {key: {"original": value, "compact": (compact.get("costs") or {}).get(key),
                   "ratio": _ratio(value, (compact.get("costs") or {}).get(key))}
             for key, value in (original.get("costs") or {}).items()}
    return {"original": original["net"], "compact": compact["net"],
            "parameters": {"original": original["parameters"], "compact": compact["parameters"],
                           "ratio": _ratio(original["parameters"], compact["parameters"])}, "costs": costs,
            "runs": runs}


def format_table(result: dict, layers: int = 10) -> str:
    """A profile (or a comparison) for the terminal: the summary per batch size and thread count,
    then the ``layers`` slowest layers, like `caffe time`'s per-layer "forward: ... ms" lines."""
    if "compact" in result:
        return _format_comparison(result, layers)
    runs = result["runs"]
    first = runs[0]
    lines = [f"{result['net']}: input {'x'.join(map(str, result['input_shape']))}, {result['parameters']:,} parameters, "
             f"{'GPU' if result['gpu'] else 'CPU'} ({result['cores']} cores); {first['repeats']} timed forwards after "
             f"{first['warmup']} warm-up, medians"]
    if result.get("costs"):
        lines.append("costs: " + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                                           for k, v in result["costs"].items()))
    lines.append(f"{'batch':>5} {'threads':>7} {'median ms':>10} {'IQR ms':>8} {'images/s':>10} {'layer sum ms':>12}")
    for r in runs:
        lines.append(f"{r['batch']:>5} {r['threads']:>7} {r['median_ms']:>10.3f} {r['iqr_ms']:>8.3f} "
                     f"{1e3 * r['batch'] / r['median_ms'] if r['median_ms'] else float('inf'):>10.1f} "
                     f"{r.get('layers_sum_ms', float('nan')):>12.3f}")
    timed = [r for r in runs if "layers" in r]
    if not timed or layers < 1:
        return "\n".join(lines)
    ref = max(timed, key=lambda r: (r["batch"], -r["threads"]))     # the largest batch, fewest threads
    order = sorted(range(len(ref["layers"])), key=lambda i: -ref["layers"][i]["median_ms"])[:layers]
    width = max(len(ref["layers"][i]["name"]) for i in order) + 1
    heads = [f"b{r['batch']}/t{r['threads']}" for r in timed]
    lines += ["", f"per-layer forward, median ms (b: batch, t: threads), the {len(order)} slowest of "
                  f"{len(ref['layers'])} at batch {ref['batch']}, {ref['threads']} thread(s); share of its layer sum:",
              f"{'layer':<{width}} {'type':<14}" + "".join(f"{h:>11}" for h in heads) + f"{'share':>8}"]
    for i in order:
        row = ref["layers"][i]
        lines.append(f"{row['name']:<{width}} {row['type']:<14}"
                     + "".join(f"{r['layers'][i]['median_ms']:>11.3f}" for r in timed) + f"{100 * row['share']:>7.1f}%")
    return "\n".join(lines)


def _format_comparison(result: dict, layers: int) -> str:
    p = result["parameters"]
    lines = [f"{result['original']} -> {result['compact']}: parameters {p['original']:,} -> {p['compact']:,} "
             f"({p['ratio']}x fewer)"]
    if "macs" in result.get("costs", {}):
        m = result["costs"]["macs"]
        lines.append(f"MACs per image {m['original']:,} -> {m['compact']:,} ({m['ratio']}x fewer)")
    lines.append(f"{'batch':>5} {'threads':>7} {'original ms':>12} {'compact ms':>11} {'speed-up (quartile range)':>26}")
    for r in result["runs"]:
        low, high = r.get("speedup_range") or (None, None)
        lines.append(f"{r['batch']:>5} {r['threads']:>7} {r['original_ms']:>12.3f} {r['compact_ms']:>11.3f} "
                     f"{r['speedup'] or float('nan'):>10.2f}x" + (f" ({low:.2f}-{high:.2f})" if low else ""))
    timed = [r for r in result["runs"] if "layers" in r]
    if timed and layers > 0:
        ref = max(timed, key=lambda r: (r["batch"], -r["threads"]))
        rows = sorted(ref["layers"], key=lambda l: -(l["original_ms"] or 0))[:layers]
        width = max(len(l["name"]) for l in rows) + 1
        lines += ["", f"per-layer forward at batch {ref['batch']}, {ref['threads']} thread(s), median ms:",
                  f"{'layer':<{width}} {'type':<14}{'original':>10}{'compact':>10}{'speed-up':>10}"]
        for l in rows:
            show = [f"{v:>10.3f}" if v is not None else f"{'-':>10}" for v in (l["original_ms"], l["compact_ms"])]
            lines.append(f"{l['name']:<{width}} {l['type']:<14}{''.join(show)}"
                         + (f"{l['speedup']:>9.2f}x" if l["speedup"] else f"{'-':>10}"))
    return "\n".join(lines)

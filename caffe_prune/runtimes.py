"""One deploy network in the runtimes where models are served, so that a figure says what it was
measured on: ``caffe`` (pycaffe, the reference), ``opencv`` (OpenCV's DNN module reading the
prototxt and caffemodel itself) and ``onnxruntime`` (the graph caffe_prune.onnx_export writes).

- ``load(runtime, prototxt, caffemodel, onnx_path=None, threads=1) -> Runner``;
  ``runner.forward(x) -> {output blob: array}`` for float32 NCHW ``x`` of any batch size, the
  outputs Caffe's ``net.outputs`` in every runtime.
- ``latency(runner, batch, repeats, warmup)``: the median and quartiles of ``repeats`` timed
  forwards after ``warmup`` untimed ones, on seeded random images (the spread as the
  interquartile range: a few slow forwards from a busy machine move neither).
- ``compare(a, b)``: per blob, the largest absolute difference and that divided by the largest
  magnitude of ``a`` (the reference), the measure the tests' tolerances are stated in.

Threads are each runtime's own knob, set for the runner's forwards and restored after them:
Caffe's CPU layers are single-threaded except for BLAS, so its threads are OpenBLAS's
(threadpoolctl's ``threadpool_limits``); OpenCV's are ``cv2.setNumThreads`` (a process-wide
setting); ONNX Runtime's are the session's ``intra_op_num_threads``, with one inter-op thread.

Facts about the runtimes (measured, see tests/test_runtimes.py): OpenCV 5 dropped the Caffe
importer (``cv2.dnn.readNetFromCaffe``), so OpenCV 4.x is required; OpenCV's DNN fuses layers and
reorders sums, so its outputs match Caffe's to float32 rounding of a different order, not bit for
bit; and where OpenCV 4 computes something else (``opencv_differs``: an LRN's ``k``, a Pooling's
``round_mode``) the runner refuses the net rather than time a different network. Caffe itself
aborts the process on a prototxt its layer setup CHECKs; the prototxt is parsed here first, so
that a malformed one is a one-line error, not an abort.
"""
from __future__ import annotations

import contextlib
import importlib
import time
from pathlib import Path

import numpy as np

from caffe_prune import onnx_export
from caffe_prune.caffemodel import arrays_of
from caffe_prune.errors import InputError, one_line
from caffe_prune.phases import layers_in_phase
from caffe_prune.pycaffe import load_net, read_prototxt

RUNTIMES = ("caffe", "opencv", "onnxruntime")
# what to install when a runtime is missing (the lower bounds are the first releases with numpy 2
# wheels; OpenCV 5 has no Caffe importer)
INSTALL = {
    "opencv": ("OpenCV's DNN module", "pip install 'opencv-python-headless>=4.10.0.84,<5'"),
    "onnxruntime": ("ONNX Runtime", "pip install 'onnxruntime>=1.19'"),
    "threadpoolctl": ("threadpoolctl", "pip install 'threadpoolctl>=3'"),
}


class NotChecked(InputError):
    """A runtime that cannot check this export here: not installed, or one that computes or names a
    layer otherwise (OpenCV's limits, not the export's). Any other load failure is the export's."""


def _require(module: str, runtime: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        what, pip = INSTALL[runtime]
        raise NotChecked(f"{what} is not installed: {pip}") from None


def _is_file(path, runtime: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{runtime} cannot load {path}: no such file")
    return path


class Runner:
    """One loaded network in one runtime. ``input_name``, ``input_shape`` (C, H, W as the
    prototxt states it) and ``outputs`` (Caffe's net.outputs) are the same in every runtime."""

    runtime = ""

    def __init__(self, prototxt, threads: int):
        if not isinstance(threads, int) or threads < 1:
            raise InputError(f"threads {threads!r}: give a whole number of at least 1 (os.cpu_count() for all cores)")
        self.prototxt, self.threads = Path(prototxt), threads
        net_param = read_prototxt(_is_file(prototxt, self.runtime))
        self.net_param = net_param
        self.input_name, self.input_shape = onnx_export.deploy_input(net_param)
        self.outputs = onnx_export.net_outputs(net_param)

    @contextlib.contextmanager
    def limits(self):
        """The runner's thread setting, for the forwards run inside (restored after)."""
        yield

    def forward(self, x: np.ndarray) -> dict:
        """{output blob: array} for ``x`` (float32 N x C x H x W, any N)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or (self.input_shape and tuple(x.shape[1:]) != tuple(self.input_shape)):
            raise InputError(f"{self.prototxt}: input of shape {tuple(x.shape)}, the net takes "
                             f"(N,) + {tuple(self.input_shape)}")
        with self.limits():
            return self._forward(x)

    def _forward(self, x: np.ndarray) -> dict:
        raise NotImplementedError

    def __repr__(self):
        return f"<{self.runtime} runner of {self.prototxt.name}, {self.threads} thread(s)>"


class CaffeRunner(Runner):
    runtime = "caffe"

    def __init__(self, prototxt, caffemodel, threads=1):
        super().__init__(prototxt, threads)
        _require("threadpoolctl", "threadpoolctl")
        from caffe_prune import pycaffe
        self.net = pycaffe.load_net(self.prototxt, _is_file(caffemodel, self.runtime))    # checked, built in a child first

    @contextlib.contextmanager
    def limits(self):
        from threadpoolctl import threadpool_limits
        with threadpool_limits(limits=self.threads, user_api="blas"):
            yield

    def _forward(self, x):
        blob = self.net.blobs[self.input_name]
        if blob.data.shape != x.shape:
            blob.reshape(*x.shape)
            self.net.reshape()
        blob.data[...] = x
        out = self.net.forward()
        return {name: out[name].copy() for name in self.outputs}


def opencv_differs(layer) -> str | None:
    """Why OpenCV's DNN module (4.x) would not compute this layer as Caffe does, None when it
    would: it reads no ``k`` of an across-channel LRN (it computes k = 1), and a Pooling that sets
    ``round_mode`` (either value) fails its forward (an assertion on the kernel size)."""
    if layer.type == "LRN" and layer.lrn_param.norm_region == 0 and layer.lrn_param.k != 1:
        return f"has k {layer.lrn_param.k:g}, which OpenCV ignores (it computes k = 1)"
    if layer.type == "Pooling" and layer.pooling_param.HasField("round_mode"):
        return ("sets round_mode, which OpenCV's Caffe importer cannot run (drop round_mode: CEIL, "
                "Caffe's default; FLOOR has no OpenCV form)")
    if layer.type == "Clip":      # measured with OpenCV 4.14: "Can't create layer ... of type Clip"
        return "is a Clip, which OpenCV's Caffe importer has no layer for"
    return None


class OpenCVRunner(Runner):
    """OpenCV's DNN module names outputs by layer: each output blob is asked for by the layer
    that last wrote it (an in-place ReLU's name for the blob it rewrote)."""
    runtime = "opencv"

    def __init__(self, prototxt, caffemodel, threads=1):
        super().__init__(prototxt, threads)
        cv2 = _require("cv2", "opencv")
        if not hasattr(getattr(cv2, "dnn", None), "readNetFromCaffe"):
            raise NotChecked(f"OpenCV {cv2.__version__} has no Caffe importer (cv2.dnn.readNetFromCaffe; OpenCV 5 "
                             f"dropped it): {INSTALL['opencv'][1]}")
        self.cv2 = cv2
        caffemodel = _is_file(caffemodel, self.runtime)
        for layer in layers_in_phase(self.net_param, "test"):
            why = opencv_differs(layer)
            if why:
                raise NotChecked(f"opencv: layer {layer.name!r} ({layer.type}) {why} in {self.prototxt}")
        try:
            self.net = cv2.dnn.readNetFromCaffe(str(self.prototxt), str(caffemodel))
        except cv2.error as e:
            raise NotChecked(f"opencv cannot load {self.prototxt} with {caffemodel}: {one_line(e)}") from None
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        writer = {}
        for layer in layers_in_phase(self.net_param, "test"):
            for j, top in enumerate(layer.top):
                writer[top] = (layer.name, j)
        if any(writer[blob][1] for blob in self.outputs):
            blob = next(b for b in self.outputs if writer[b][1])
            raise NotChecked(f"opencv: output blob {blob!r} is top {writer[blob][1]} of layer {writer[blob][0]!r}; "
                             "OpenCV's forward names a layer's first output only")
        self.layer_names = [writer[blob][0] for blob in self.outputs]

    @contextlib.contextmanager
    def limits(self):
        before = self.cv2.getNumThreads()
        self.cv2.setNumThreads(self.threads)
        try:
            yield
        finally:
            self.cv2.setNumThreads(before)

    def _forward(self, x):
        self.net.setInput(x, self.input_name)
        try:
            outs = self.net.forward(self.layer_names)
        except self.cv2.error as e:
            raise InputError(f"opencv cannot run {self.prototxt}: {one_line(e)}") from None
        return {blob: np.array(out, copy=True) for blob, out in zip(self.outputs, outs)}


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime on the CPU, the graph read from ``onnx_path`` or, without one, exported here
    from the prototxt and caffemodel (caffe_prune.onnx_export)."""
    runtime = "onnxruntime"

    def __init__(self, prototxt, caffemodel, onnx_path=None, threads=1):
        super().__init__(prototxt, threads)
        ort = _require("onnxruntime", "onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if onnx_path is None:
            net = load_net(self.prototxt, _is_file(caffemodel, self.runtime))    # checked: no Python layer runs
            model = onnx_export.to_onnx(self.net_param, arrays_of(net), self.input_shape)
            source, self.onnx_path = model.SerializeToString(), None
        else:
            self.onnx_path = _is_file(onnx_path, self.runtime)
            source = str(self.onnx_path)
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as e:      # onnxruntime raises its own (pybind) exception types
            what = self.onnx_path or f"the graph exported from {self.prototxt}"
            raise InputError(f"onnxruntime cannot load {what}: {one_line(e)}") from None
        names = [o.name for o in self.session.get_outputs()]
        missing = [blob for blob in self.outputs if blob not in names]
        if missing:
            raise InputError(f"onnxruntime: {self.onnx_path} has no output {missing[0]!r} of {self.prototxt}; "
                             "export it from this prototxt")
        self.input_name = self.session.get_inputs()[0].name

    def _forward(self, x):
        out = self.session.run(self.outputs, {self.input_name: x})
        return dict(zip(self.outputs, out))


def load(runtime: str, prototxt, caffemodel, onnx_path=None, threads: int = 1) -> Runner:
    """A ``Runner`` of the deploy net ``prototxt`` with weights ``caffemodel`` in ``runtime``
    (one of RUNTIMES); ``onnx_path``: the exported graph for onnxruntime (None: export it now)."""
    if runtime == "caffe":
        return CaffeRunner(prototxt, caffemodel, threads)
    if runtime == "opencv":
        return OpenCVRunner(prototxt, caffemodel, threads)
    if runtime == "onnxruntime":
        return OnnxRuntimeRunner(prototxt, caffemodel, onnx_path, threads)
    raise InputError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")


def latency(runner: Runner, batch: int = 1, repeats: int = 20, warmup: int = 3, seed: int = 0) -> dict:
    """Milliseconds per forward of ``batch`` seeded N(0, 1) images: median and quartiles of
    ``repeats`` timed forwards after ``warmup`` untimed ones (the first also reshapes the net),
    all under the runner's thread setting."""
    if batch < 1 or repeats < 1 or warmup < 0:
        raise InputError(f"latency: batch {batch}, repeats {repeats}, warmup {warmup}: "
                         "batch and repeats at least 1, warmup at least 0")
    x = np.random.default_rng(seed).standard_normal((batch,) + tuple(runner.input_shape)).astype(np.float32)
    runner.forward(x[:1])                       # validates the input once, outside the clock
    times = []
    with runner.limits():
        for _ in range(warmup):
            runner._forward(x)
        for _ in range(repeats):
            start = time.perf_counter()
            runner._forward(x)
            times.append((time.perf_counter() - start) * 1e3)
    q1, median, q3 = (float(v) for v in np.percentile(times, [25, 50, 75]))
    return {"runtime": runner.runtime, "batch": batch, "threads": runner.threads, "median_ms": median,
            "q1_ms": q1, "q3_ms": q3, "repeats": repeats, "images_per_s": batch * 1e3 / median}


def compare(outputs_a: dict, outputs_b: dict) -> dict:
    """{blob: {"max_abs_diff", "max_rel_diff"}} over the blobs of ``outputs_a`` (the reference):
    the largest |a - b| and that divided by max|a| (the deviation relative to the output's
    scale: elementwise ratios explode where a crosses zero)."""
    result = {}
    for blob, a in outputs_a.items():
        if blob not in outputs_b:
            raise InputError(f"compare: blob {blob!r} is missing from the second outputs ({', '.join(outputs_b)})")
        a, b = np.asarray(a, dtype=np.float64), np.asarray(outputs_b[blob], dtype=np.float64)
        if a.shape != b.shape:
            raise InputError(f"compare: blob {blob!r} has shapes {a.shape} and {b.shape}")
        diff = float(np.abs(a - b).max()) if a.size else 0.0
        scale = float(np.abs(a).max()) if a.size else 0.0
        relative = diff / scale if scale else (0.0 if diff == 0 else float("inf"))
        result[blob] = {"max_abs_diff": diff, "max_rel_diff": relative}
    return result


def versions() -> dict:
    """{runtime: version} of the runtimes installed here (the others absent)."""
    out = {}
    for runtime, module in (("opencv", "cv2"), ("onnxruntime", "onnxruntime")):
        try:
            out[runtime] = importlib.import_module(module).__version__
        except ImportError:
            pass
    return out


def check(runtime: str, prototxt, caffemodel, onnx_path, inputs, reference: dict, tolerance: float) -> dict:
    """The deploy files run in ``runtime`` on ``inputs`` beside Caffe's ``reference`` outputs:
    {runtime, version, images, max_relative_deviation, within} (relative to each output's scale,
    ``compare``), or {runtime, skipped: why} when the runtime is not installed here or computes
    one of the net's layers otherwise (``opencv_differs``, ``NotChecked``); any other failure to load
    (ONNX Runtime refusing the graph the export wrote) is raised."""
    try:
        runner = load(runtime, prototxt, caffemodel, onnx_path)
    except NotChecked as exc:
        return {"runtime": runtime, "skipped": one_line(exc)}
    outputs = runner.forward(np.asarray(inputs, dtype=np.float32))
    shared = {blob: value for blob, value in reference.items() if blob in outputs}
    worst = max((d["max_rel_diff"] for d in compare(shared, outputs).values()), default=0.0)
    return {"runtime": runtime, "version": versions().get(runtime), "images": len(inputs),
            "outputs": sorted(shared), "max_relative_deviation": worst, "within": worst <= tolerance}

"""The Caffe engine: stock pycaffe, found, imported, configured and guarded.

Everything the toolkit computes (forward and backward passes, losses, accuracies, solver steps)
comes from Caffe's own layers through pycaffe. This module is the only one that imports ``caffe``:
it finds the build made by ``tools/caffe/build.sh`` (or a conda-forge ``caffe``), quiets glog,
selects CPU or GPU mode, reports versions for ``caffe-prune doctor``, and validates every file it
hands to Caffe. Caffe reports bad input with glog ``CHECK`` failures that abort the whole
interpreter, so the checks here run first and raise :class:`InputError` with one line that names
the file (and line, layer or shape) and what to do.
"""
from __future__ import annotations

import faulthandler
import importlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from caffe_prune import layers as rules
from caffe_prune.layers import effects
from caffe_prune.phases import instantiated_layers, layers_in_phase, phase_value
from caffe_prune.errors import InputError

BUILD_HINT = "run `make setup` (builds stock Caffe into ~/.cache/caffe-prune) " \
             "or, with conda, `conda env create -f environment.yml`"
PYCAFFE_ENV = "CAFFE_PRUNE_PYCAFFE"   # a directory holding the `caffe` package, to use instead
VERBOSE_ENV = "CAFFE_PRUNE_GLOG"      # set to 1 to see Caffe's INFO/WARNING log lines


_caffe = None
_mode = None


def build_info(pycaffe_dir: Path | None = None) -> dict | None:
    """The build-info.json that tools/caffe/build.sh writes at the top of the install prefix whose
    lib/python3/dist-packages holds pycaffe; None for a pycaffe from elsewhere (conda, by hand)."""
    if pycaffe_dir is None:
        spec = _find_spec()
        if spec is None or spec.origin is None:
            return None
        pycaffe_dir = Path(spec.origin).parent.parent
    prefix = Path(pycaffe_dir)
    for candidate in (prefix, prefix.parent, prefix.parent.parent.parent):
        if (candidate / "build-info.json").is_file():
            return json.loads((candidate / "build-info.json").read_text())
    return None


def _find_spec():
    override = os.environ.get(PYCAFFE_ENV)
    if override:
        if not (Path(override) / "caffe" / "__init__.py").is_file():
            raise InputError(f"{PYCAFFE_ENV}={override} holds no caffe/__init__.py; "
                              f"unset it or point it at a pycaffe directory")
        if override not in sys.path:
            sys.path.insert(0, override)
    return importlib.util.find_spec("caffe")


def caffe():
    """Import stock pycaffe once and return the module, with glog quiet unless CAFFE_PRUNE_GLOG=1."""
    global _caffe
    if _caffe is not None:
        return _caffe
    spec = _find_spec()
    if spec is None or spec.origin is None:
        raise InputError(f"pycaffe is not importable from {sys.executable}; {BUILD_HINT}")
    pycaffe_dir = Path(spec.origin).parent.parent
    info = build_info(pycaffe_dir)
    running = "%d.%d" % sys.version_info[:2]
    if info and info.get("python") != running:
        raise InputError(f"pycaffe at {pycaffe_dir} was built for Python {info.get('python')} but this "
                          f"is Python {running} ({sys.executable}); use the project's .venv or rebuild "
                          f"with tools/caffe/build.sh {sys.executable}")
    # glog reads GLOG_minloglevel when libcaffe loads: 2 keeps ERROR and FATAL only.
    os.environ.setdefault("GLOG_minloglevel", "0" if os.environ.get(VERBOSE_ENV) == "1" else "2")
    try:
        _caffe = importlib.import_module("caffe")
    except ImportError as exc:
        raise InputError(f"pycaffe at {pycaffe_dir} failed to import ({exc}); {BUILD_HINT}") from exc
    return _caffe


def caffe_pb2():
    """Caffe's generated protobuf module (NetParameter, SolverParameter, ...)."""
    caffe()
    return importlib.import_module("caffe.proto.caffe_pb2")


def gpu_built() -> bool:
    """Whether this pycaffe was built with CUDA (``make setup GPU=1``, i.e. tools/caffe/build.sh
    --gpu); a CPU_ONLY build aborts on any GPU call. Says nothing about a GPU being present."""
    info = build_info()
    return bool(info) and "CPU_ONLY=OFF" in info.get("options", "")


_cuda_probe = None


def _cuda_devices() -> tuple:
    """(devices, why_none, driver_cuda) from the NVIDIA driver API (libcuda.so.1) through ctypes, asked
    once: nothing here can abort the interpreter (Caffe's CUDA_CHECKs do), and no CUDA context is
    created. devices: [{"index", "name", "memory_gib", "compute_capability"}]; why_none: a reason
    when the list is empty; driver_cuda: the CUDA version the driver supports, e.g. (13, 0)."""
    global _cuda_probe
    if _cuda_probe is not None:
        return _cuda_probe
    import ctypes
    names = {100: "CUDA_ERROR_NO_DEVICE", 999: "CUDA_ERROR_UNKNOWN", 3: "CUDA_ERROR_NOT_INITIALIZED",
             35: "CUDA_ERROR_INSUFFICIENT_DRIVER", 101: "CUDA_ERROR_INVALID_DEVICE",
             46: "CUDA_ERROR_DEVICES_UNAVAILABLE", 304: "CUDA_ERROR_OPERATING_SYSTEM"}
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError:
        _cuda_probe = ([], "no NVIDIA driver (libcuda.so.1 not found)", None)
        return _cuda_probe
    version, count = ctypes.c_int(), ctypes.c_int()
    driver = (version.value // 1000, version.value % 1000 // 10) if cu.cuDriverGetVersion(ctypes.byref(version)) == 0 else None
    err = cu.cuInit(0)
    if err == 0:
        err = cu.cuDeviceGetCount(ctypes.byref(count))
    if err != 0:
        _cuda_probe = ([], f"the NVIDIA driver reports {names.get(err, f'error {err}')}", driver)
        return _cuda_probe
    devices = []
    for i in range(count.value):
        handle, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        name, mem = ctypes.create_string_buffer(256), ctypes.c_size_t()
        if cu.cuDeviceGet(ctypes.byref(handle), i) != 0:
            continue
        cu.cuDeviceGetName(name, 256, handle)
        cu.cuDeviceTotalMem_v2(ctypes.byref(mem), handle)
        cu.cuDeviceGetAttribute(ctypes.byref(major), 75, handle)   # COMPUTE_CAPABILITY_MAJOR
        cu.cuDeviceGetAttribute(ctypes.byref(minor), 76, handle)   # COMPUTE_CAPABILITY_MINOR
        devices.append({"index": i, "name": name.value.decode(errors="replace"),
                        "memory_gib": round(mem.value / 2**30, 1),
                        "compute_capability": (major.value, minor.value)})
    _cuda_probe = (devices, None if devices else "the NVIDIA driver reports no CUDA device", driver)
    return _cuda_probe


def set_mode(mode: str = "auto", device: int = 0) -> str:
    """Select Caffe's mode: 'cpu', 'gpu' (CUDA device `device`), or 'auto' (GPU `device` when this
    build has CUDA and that device is usable, else CPU). Everything Caffe would abort on (a CPU_ONLY
    build, no driver or device, a device id out of range, a GPU older than the compiled
    architectures, a driver older than the toolkit) is checked first and raised as InputError."""
    global _mode
    if mode not in ("auto", "cpu", "gpu"):
        raise InputError(f"mode {mode!r} is not one of auto, cpu, gpu")
    cf = caffe()
    problem = None
    if not gpu_built():
        problem = ("this pycaffe was built CPU_ONLY" if build_info() else
                   "this pycaffe has no build-info.json (not built by tools/caffe/build.sh), so CUDA is not assumed") + \
                  "; build the CUDA one with `make setup GPU=1` (tools/caffe/build.sh PYTHON --gpu) and run on a CUDA machine"
    elif not isinstance(device, int) or isinstance(device, bool) or device < 0:
        problem = f"CUDA device id {device!r} is not a non-negative integer"
    else:
        devices, why, driver = _cuda_devices()
        cuda = (build_info().get("cuda") or {}).get("version", "")
        if not devices:
            problem = f"no usable CUDA device: {why}"
        elif device >= len(devices):
            listed = ", ".join(f"{d['index']}: {d['name']}" for d in devices)
            problem = f"CUDA device {device} is out of range: this machine has {len(devices)} ({listed})"
        elif driver and cuda and driver[0] < int(cuda.split(".")[0]):
            problem = (f"the NVIDIA driver supports CUDA {driver[0]}.{driver[1]}, this build needs CUDA {cuda}: "
                       f"update the driver, or build with a CUDA {driver[0]} toolkit (--cuda-root)")
        else:
            major, minor = devices[device]["compute_capability"]
            archs = (build_info().get("cuda") or {}).get("architectures") or []

            def runs(arch):   # sm_XY runs on X.Z for Z >= Y; compute_XY PTX is JIT-compiled for any later GPU
                kind, _, num = arch.partition("_")
                want = (int(num) // 10, int(num) % 10)
                return want[0] == major and want[1] <= minor if kind == "sm" else want <= (major, minor)
            if archs and not any(runs(a) for a in archs):
                problem = (f"CUDA device {device} ({devices[device]['name']}) has compute capability {major}.{minor}, "
                           f"which this build's code ({' '.join(archs)}) cannot run on; rebuild with "
                           f"tools/caffe/build.sh PYTHON --gpu --cuda-arch \"{major}{minor}\"")
    if mode == "gpu" and problem:
        raise InputError(f"GPU mode asked for, but {problem}")
    if mode != "cpu" and not problem:
        cf.set_device(device)
        cf.set_mode_gpu()
        _mode = f"GPU {device}"
    else:
        cf.set_mode_cpu()
        _mode = "CPU"
    return _mode


# OpenBLAS's results depend on its thread count (measured: LeNet-5's logits move by 1e-5 between 1 and
# 2 threads, enough to change a probe's loss in its last bits), so the toolkit computes with one BLAS
# thread per process (caffe_prune.engines, .train, .sweep): the same seed gives the same bits on any machine
BLAS_THREADS = 1


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_bytes() -> int:
    """The memory this machine can still give (MemAvailable; 4 GiB where /proc/meminfo is absent)."""
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable")) * 1024
    except (OSError, StopIteration, ValueError):
        return 4 * 2 ** 30


def set_blas_threads(threads: int) -> list:
    """The thread count of every BLAS loaded in this process (Caffe's OpenBLAS, numpy's and scipy's,
    through threadpoolctl); returns what they are now."""
    import threadpoolctl
    threadpoolctl.threadpool_limits(limits=int(threads), user_api="blas")
    return [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]


def on_gpu() -> bool:
    """Whether set_mode chose a GPU (forked processes cannot use the parent's CUDA context)."""
    return bool(_mode) and _mode.startswith("GPU")


def versions() -> dict:
    """What `caffe-prune doctor` reports: Caffe, its source and options, BLAS, mode, Python, protobuf."""
    import numpy
    report = {"python": f"{platform.python_version()} ({sys.executable})", "numpy": numpy.__version__}
    try:
        import google.protobuf
        report["protobuf"] = google.protobuf.__version__
    except ImportError:
        report["protobuf"] = None
    cf = caffe()
    info = build_info() or {}
    report.update({
        "caffe": getattr(cf, "__version__", "unknown"),
        "pycaffe": str(Path(cf.__file__).parent),
        "source": info.get("source", "not built by caffe-prune (no build-info.json)"),
        "options": info.get("options", "unknown"),
        "blas": info.get("blas", "unknown"),
        "mode": _mode or set_mode("auto"),
    })
    if gpu_built():
        cuda, cudnn = info.get("cuda") or {}, info.get("cudnn")
        report["cuda"] = f"{cuda.get('version', 'unknown')} ({cuda.get('from', '?')}: {cuda.get('root', '?')}), " \
                         f"code for {' '.join(cuda.get('architectures', [])) or 'unknown architectures'}"
        report["cudnn"] = f"{cudnn['version']} ({cudnn.get('from', '?')})" if cudnn else "not built in (--no-cudnn)"
        tf32 = info.get("math", "unknown")
        if os.environ.get("NVIDIA_TF32_OVERRIDE") == "0":
            tf32 += "; NVIDIA_TF32_OVERRIDE=0 forces TF32 off"
        report["math"] = tf32
        devices, why, driver = _cuda_devices()
        report["driver"] = f"supports CUDA {driver[0]}.{driver[1]}" if driver else "none"
        report["gpu"] = "; ".join(f"{d['index']}: {d['name']}, {d['memory_gib']} GiB, compute "
                                  f"{d['compute_capability'][0]}.{d['compute_capability'][1]}"
                                  for d in devices) if devices else f"none usable ({why})"
    else:
        report["math"] = "fp32 on the CPU (CPU_ONLY build: no CUDA, no TF32)"
    return report


# ---- what is handed to Caffe ---------------------------------------------------------------------

# Fields and layer types of Caffe forks that stock Caffe 1.0 does not know: what a message says.
FORK_FIELDS = {
    "convolution_mask_param": "the myopic-oracle authors' Caffe fork (`caffe-prune import` reads their files)",
    "ceil_mode": "Caffe forks that choose the pooling rounding (stock Caffe rounds up unless round_mode: FLOOR); --fork-layers rewrites it",
    "shuffle_channel_param": "ShuffleNet's Caffe fork (--fork-layers rewrites ShuffleChannel as stock Slice and Concat)",
    "round_mode": "Caffe forks that choose the pooling rounding, e.g. NVIDIA Caffe (stock Caffe 1.0 always rounds up; BVLC master, this build, has it)",
    "bn_param": "forks with a combined BN layer (e.g. yjxiong/caffe); stock Caffe uses BatchNorm then Scale",
}
FORK_TYPES = {
    **{t: "MobileNet ports of a Caffe fork; write it as a stock Convolution with group equal to its input channels, "
          "or pass --fork-layers" for t in ("ConvolutionDepthwise", "DepthwiseConvolution")},
    "ReLU6": "MobileNet v2 ports of a Caffe fork; stock Caffe has Clip (min: 0 max: 6), or pass --fork-layers",
    "ShuffleChannel": "ShuffleNet's Caffe fork; --fork-layers rewrites it as stock Slice and Concat",
    "Axpy": "SE-ResNet's Caffe fork (hujie-frank/SENet); --fork-layers rewrites it as stock Flatten, Scale, Eltwise",
    "BN": "forks with a combined BN layer (e.g. yjxiong/caffe); stock Caffe uses BatchNorm then Scale",
    "Interp": "the PSPNet/DeepLab Caffe forks",
    "Upsample": "the SegNet Caffe fork",
    **{t: "the SSD Caffe fork (weiliu89/caffe)" for t in ("Normalize", "PriorBox", "Permute", "DetectionOutput")},
}
# a convolution or InnerProduct weight beyond this is a corrupt file, not a trained value
SANE_WEIGHT = 1e4


def _existing(path, what: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {os.fsdecode(path)} is a directory, not a file")
    if not path.is_file():
        raise InputError(f"{what} {os.fsdecode(path)} does not exist")
    return path


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what} {os.fsdecode(path)}: {exc.strerror}") from None


def read_prototxt(path, message=None):
    """Parse a text prototxt (NetParameter by default); errors name the file and line, and a
    field or layer type of a Caffe fork says so. A net in Caffe's V1 format (``layers {}``) is
    upgraded in memory by Caffe's own upgrade_net_proto_text, with a note."""
    from google.protobuf import text_format
    path = _existing(path, "prototxt")
    message = message if message is not None else caffe_pb2().NetParameter()
    text = _read(path, "prototxt").decode(errors="replace")
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        line = exc.GetLine() if hasattr(exc, "GetLine") else None
        detail = str(exc).split(" : ", 1)[-1]
        field = re.search(r'has no field named "(\w+)"', detail)
        if field:
            origin = FORK_FIELDS.get(field.group(1))
            detail += (f" (it comes from {origin}); remove it or rewrite the layer with stock Caffe 1.0's fields"
                       if origin else "; stock Caffe 1.0 has no such field (a typo, or a Caffe fork's): fix or "
                                      "remove it")
        raise InputError(f"{os.fsdecode(path)}:{line}: {detail}" if line else f"{os.fsdecode(path)}: {detail}") from None
    if isinstance(message, caffe_pb2().NetParameter) and message.layers:
        return upgrade_v1(path, "text")
    return message


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def read_caffemodel(path, shapes: bool = False):
    """Parse a caffemodel (a NetParameter with blobs); a V1 one is upgraded by Caffe. One that Caffe
    wrote as HDF5 (``snapshot_format: HDF5``: ``NAME.caffemodel.h5``, which Caffe's
    CopyTrainedLayersFrom reads by its signature) holds no definition and is read only for
    ``shapes`` (what checking weights against a net needs): its layers' names and blob shapes;
    otherwise it is refused in one line."""
    from google.protobuf.message import DecodeError
    path = _existing(path, "caffemodel")
    data = _read(path, "caffemodel")
    if data[:8] == HDF5_SIGNATURE:
        if not shapes:
            raise InputError(f"{os.fsdecode(path)} is an HDF5 caffemodel, which holds weights but no network "
                             f"definition; give the net's prototxt as NET and this file as WEIGHTS")
        return _hdf5_caffemodel(path)
    net = caffe_pb2().NetParameter()
    try:
        net.ParseFromString(data)
    except DecodeError as exc:
        raise InputError(f"{os.fsdecode(path)} is not a caffemodel (protobuf: {exc})") from None
    if not net.layer and not net.layers:
        raise InputError(f"{os.fsdecode(path)} holds no layers: not a caffemodel")
    return upgrade_v1(path, "binary") if net.layers else net


def _hdf5_caffemodel(path):
    """The layers (names, blob shapes) of an HDF5 caffemodel: group ``data``, one group per layer
    holding its blobs as datasets "0", "1", ... (Caffe's Net::ToHDF5)."""
    import h5py
    net = caffe_pb2().NetParameter()
    try:
        with h5py.File(path, "r") as f:
            for name, group in f["data"].items():
                layer = net.layer.add(name=name)
                for i in range(len(group)):
                    layer.blobs.add().shape.dim.extend(int(d) for d in group[str(i)].shape)
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{os.fsdecode(path)} is not a caffemodel (HDF5: {' '.join(str(exc).split())})") from None
    if not net.layer:
        raise InputError(f"{os.fsdecode(path)} holds no layers: not a caffemodel")
    return net


def caffe_tool(name: str) -> Path | None:
    """A binary of the Caffe build (upgrade_net_proto_text, convert_imageset, ...), or None."""
    spec = _find_spec()
    if spec is not None and spec.origin is not None:
        prefix = Path(spec.origin).parent.parent
        for candidate in (prefix.parent.parent.parent / "bin" / name, prefix / "bin" / name):
            if candidate.is_file():
                return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def upgrade_v1(path, kind: str):
    """A V1 (``layers {}``) net or caffemodel upgraded by Caffe's upgrade_net_proto_{text,binary}."""
    import tempfile
    import warnings
    tool = caffe_tool(f"upgrade_net_proto_{kind}")
    if tool is None:
        raise InputError(f"{os.fsdecode(path)} uses Caffe's V1 'layers' format and upgrade_net_proto_{kind} is "
                          f"not found; convert it with that Caffe tool and pass the result")
    with tempfile.TemporaryDirectory(prefix="caffe-prune-") as tmp:
        src, out = Path(tmp) / "in", Path(tmp) / "out"
        src.symlink_to(Path(path).resolve())
        done = subprocess.run([str(tool), str(src), str(out)], capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            reason = (done.stderr.strip().splitlines() or ["no message"])[-1].split("] ", 1)[-1]
            raise InputError(f"{os.fsdecode(path)}: Caffe's upgrade_net_proto_{kind} failed: {reason}")
        net = caffe_pb2().NetParameter()
        if kind == "text":
            from google.protobuf import text_format
            text_format.Parse(out.read_text(), net)
        else:
            net.ParseFromString(out.read_bytes())
    warnings.warn(f"{os.fsdecode(path)} uses Caffe's V1 'layers' format; upgraded in memory with Caffe's "
                  f"upgrade_net_proto_{kind} (run it yourself to convert the file for good)", stacklevel=2)
    return net


def check_net(net_param, phase, path, sources: bool = False) -> None:
    """Check what Caffe would otherwise abort on, or run wrongly without a word: unknown layer
    types (a fork's, named), bottoms nobody produced, layers run in place that cannot be, sizes
    Caffe CHECKs (each type's rule, caffe_prune.layers), and (``sources``) data sources that are
    missing; first of all a Python layer not allowed (layers.effects.check_code). ``phase`` None: the
    phase ``instantiated_layers`` chooses."""
    where = os.fsdecode(path)
    effects.check_code(net_param, where)
    known = set(caffe().layer_type_list())
    blobs = set(net_param.input)
    for layer in instantiated_layers(net_param) if phase is None else layers_in_phase(net_param, phase):
        if layer.type not in known:
            origin = FORK_TYPES.get(layer.type)
            raise InputError(f"{where}: layer {layer.name!r} has type {layer.type!r}, unknown to stock Caffe 1.0"
                              + (f" (it comes from {origin})" if origin else ""))
        for bottom in layer.bottom:
            if bottom not in blobs:
                raise InputError(f"{where}: layer {layer.name!r} reads blob {bottom!r} that no earlier layer produces")
        in_place = set(layer.top) & set(layer.bottom)
        if in_place and not rules.rule(layer).in_place:
            raise InputError(f"{where}: layer {layer.name!r} ({layer.type}) reads and writes blob "
                              f"{sorted(in_place)[0]!r} in place, which Caffe's {layer.type} layer cannot do "
                              f"(it would compute garbage silently); give its top another name")
        problem = rules.rule(layer).check(layer)       # what Caffe's setup CHECK-aborts on
        if problem:
            raise InputError(f"{where}: layer {layer.name!r} ({layer.type}): {problem}")
        blobs.update(layer.top)
        source = rules.source(layer)
        if sources and rules.is_reader(layer) and not Path(source).exists():
            raise InputError(f"{where}: data layer {layer.name!r} reads {source}, which does not exist "
                              f"(paths are relative to the working directory {os.getcwd()})")


def check_weights(net, weights_param, weights_path) -> None:
    """Compare every blob shape in a caffemodel with the net's (Caffe CHECK-aborts on a mismatch),
    and refuse a caffemodel lacking weights for some layer (Caffe would silently keep the fillers)."""
    where = os.fsdecode(weights_path)
    have = {layer.name for layer in list(weights_param.layer) + list(weights_param.layers) if layer.blobs}
    missing = [name for name in net.params if name not in have]
    if missing:
        raise InputError(f"{where} holds no weights for layer(s) {', '.join(missing[:4])}"
                          f"{' ...' if len(missing) > 4 else ''} of the prototxt: a caffemodel of another network?")
    for layer in list(weights_param.layer) + list(weights_param.layers):
        if layer.name not in net.params:
            continue
        target = net.params[layer.name]
        if len(layer.blobs) != len(target):
            raise InputError(f"{where}: layer {layer.name!r} has {len(layer.blobs)} blobs, "
                              f"the net expects {len(target)}")
        for i, (blob, have) in enumerate(zip(layer.blobs, target)):
            shape = tuple(blob.shape.dim) if blob.HasField("shape") else \
                tuple(d for d in (blob.num, blob.channels, blob.height, blob.width))
            want = tuple(have.data.shape)
            legacy_match = not blob.HasField("shape") and int_prod(shape) == int_prod(want)
            if shape != want and not legacy_match:
                raise InputError(f"{where}: layer {layer.name!r} blob {i} has shape {shape}, "
                                  f"the prototxt gives {want}; use the caffemodel trained with this prototxt")


def check_values(net, weights_path) -> None:
    """Warn, naming the layer, about parameters that are not finite or that no trained convolution
    or InnerProduct holds (a flipped exponent bit): the net would score silently wrong."""
    import warnings
    import numpy as np
    for name, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            data = blob.data
            if not np.isfinite(data).all():
                bad = int(np.count_nonzero(~np.isfinite(data)))
                warnings.warn(f"{os.fsdecode(weights_path)}: layer {name!r} blob {i} holds {bad} non-finite "
                              f"value(s); the file is corrupt or the training diverged", stacklevel=2)
            elif i == 0 and len(data) and np.abs(data).max() > SANE_WEIGHT and \
                    rules.rule(_layer_type(net, name)).learns:
                warnings.warn(f"{os.fsdecode(weights_path)}: layer {name!r} holds a weight of magnitude "
                              f"{float(np.abs(data).max()):.3g}, beyond any trained value (> {SANE_WEIGHT:g}); "
                              f"the file is likely corrupt", stacklevel=2)


def _layer_type(net, name) -> str:
    return net.layers[list(net._layer_names).index(name)].type


def int_prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _caffe_safe(path: Path, tmp: Path) -> str:
    """A name for ``path`` that pycaffe can take: boost.python encodes str as strict UTF-8, so a
    file whose name is not UTF-8 is reached through a symlink with a plain name."""
    text = os.fsdecode(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        link = tmp / f"link-{len(list(tmp.iterdir()))}{path.suffix}"
        link.symlink_to(Path(path).resolve())
        return str(link)


def probe_construct(prototxt, phase="test", where=None) -> None:
    """Construct the net once in a forked child, so that a CHECK failure in Caffe's shape logic
    (Concat/Eltwise shapes, parameter counts, ...) becomes an InputError carrying glog's message
    instead of aborting this interpreter. The child runs in CPU mode and discards the net."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: stderr into the pipe, build, report by exit status
        os.close(read_fd)
        os.dup2(write_fd, 2)
        faulthandler.disable()   # its own copy of stderr would print the expected abort
        try:
            caffe().set_mode_cpu()
            caffe().Net(str(prototxt), phase_value(phase))
            code = 0
        except BaseException:
            code = 3
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        err = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        fatal = [ln.split("] ", 1)[-1] for ln in err.splitlines() if ln[:1] == "F" and "] " in ln]
        reason = fatal[-1] if fatal else (err.strip().splitlines() or ["no message"])[-1]
        raise InputError(f"{where or prototxt}: Caffe cannot build this net: {reason}")


def net_from_param(net_param, weights=None, phase="test", probe=True, where=None):
    """A caffe.Net for a NetParameter held in memory (Caffe's Python constructor takes a file);
    ``where`` names the user's file in every message (never the temporary copy). The message is
    checked as it is, not parsed back from the file written for Caffe (str(): the text format,
    written by protobuf's C encoder where it has one, floats in their shortest exact form)."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="caffe-prune-") as tmp:
        path = Path(tmp) / "net.prototxt"
        path.write_text(str(net_param))
        return _build(net_param, path, weights, phase, probe, where or f"net {net_param.name!r}")


def load_net(prototxt, weights=None, phase="test", probe=True, where=None):
    """Build a caffe.Net from a prototxt (and caffemodel) after checking both in Python.

    ``probe`` first builds the net in a forked child (see probe_construct); pass False for nets
    already known to be valid (e.g. generated by this package) to skip the second construction."""
    return _build(read_prototxt(prototxt), Path(prototxt), weights, phase, probe, where or os.fsdecode(prototxt))


def _build(net_param, prototxt: Path, weights, phase, probe, where):
    """The caffe.Net of ``prototxt``, whose parsed form is ``net_param``; a layer that would write a
    file when built (HDF5Output) is built as one that writes nothing (layers.effects.inert)."""
    import tempfile
    cf = caffe()
    check_net(net_param, phase, where)
    weights_param = read_caffemodel(weights, shapes=True) if weights is not None else None
    inert, replaced = effects.inert(net_param, where)
    with tempfile.TemporaryDirectory(prefix="caffe-prune-") as tmp:
        if replaced:
            prototxt = Path(tmp) / "inert.prototxt"
            prototxt.write_text(str(inert))
        proto = _caffe_safe(prototxt, Path(tmp))
        if probe:
            probe_construct(proto, phase, where)
        net = cf.Net(proto, phase_value(phase))
        if weights_param is not None:
            check_weights(net, weights_param, weights)
            net.copy_from(_caffe_safe(Path(weights), Path(tmp)))
            check_values(net, weights)
    return net

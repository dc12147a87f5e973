"""The Caffe engine: stock pycaffe, found, imported, configured and guarded.

Everything the toolkit computes (forward and backward passes, losses, accuracies, solver steps)
comes from Caffe's own layers through pycaffe. This module is the only one that imports ``caffe``:
it finds the build made by ``tools/caffe/build.sh`` (or a conda-forge ``caffe``), quiets glog,
selects CPU or GPU mode, reports versions for ``caffe-prune doctor``, and validates every file it
hands to Caffe. Caffe reports bad input with glog ``CHECK`` failures that abort the whole
interpreter, so the checks here run first and raise :class:`EngineError` with one line that names
the file (and line, layer or shape) and what to do.
"""
from __future__ import annotations

import faulthandler
import importlib
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

BUILD_HINT = "run `make setup` (builds stock Caffe into ~/.cache/caffe-prune) " \
             "or, with conda, `conda env create -f environment.yml`"
PYCAFFE_ENV = "CAFFE_PRUNE_PYCAFFE"   # a directory holding the `caffe` package, to use instead
VERBOSE_ENV = "CAFFE_PRUNE_GLOG"      # set to 1 to see Caffe's INFO/WARNING log lines


class EngineError(RuntimeError):
    """A problem with Caffe or with what was about to be handed to it; the message is one line."""


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
            raise EngineError(f"{PYCAFFE_ENV}={override} holds no caffe/__init__.py; "
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
        raise EngineError(f"pycaffe is not importable from {sys.executable}; {BUILD_HINT}")
    pycaffe_dir = Path(spec.origin).parent.parent
    info = build_info(pycaffe_dir)
    running = "%d.%d" % sys.version_info[:2]
    if info and info.get("python") != running:
        raise EngineError(f"pycaffe at {pycaffe_dir} was built for Python {info.get('python')} but this "
                          f"is Python {running} ({sys.executable}); use the project's .venv or rebuild "
                          f"with tools/caffe/build.sh {sys.executable}")
    # glog reads GLOG_minloglevel when libcaffe loads: 2 keeps ERROR and FATAL only.
    os.environ.setdefault("GLOG_minloglevel", "0" if os.environ.get(VERBOSE_ENV) == "1" else "2")
    try:
        _caffe = importlib.import_module("caffe")
    except ImportError as exc:
        raise EngineError(f"pycaffe at {pycaffe_dir} failed to import ({exc}); {BUILD_HINT}") from exc
    return _caffe


def caffe_pb2():
    """Caffe's generated protobuf module (NetParameter, SolverParameter, ...)."""
    caffe()
    return importlib.import_module("caffe.proto.caffe_pb2")


def gpu_built() -> bool:
    """Whether this pycaffe was built with CUDA (a CPU_ONLY build aborts on any GPU call)."""
    info = build_info()
    return bool(info) and "CPU_ONLY=OFF" in info.get("options", "")


def set_mode(mode: str = "auto", device: int = 0) -> str:
    """Select Caffe's mode: 'cpu', 'gpu', or 'auto' (GPU only when this build has CUDA)."""
    global _mode
    if mode not in ("auto", "cpu", "gpu"):
        raise EngineError(f"mode {mode!r} is not one of auto, cpu, gpu")
    cf = caffe()
    use_gpu = mode == "gpu" or (mode == "auto" and gpu_built())
    if use_gpu and not gpu_built():
        raise EngineError("--gpu asked for, but this pycaffe was built CPU_ONLY; "
                          "rebuild with tools/caffe/build.sh PYTHON --gpu on a CUDA machine")
    if use_gpu:
        cf.set_device(device)
        cf.set_mode_gpu()
        _mode = f"GPU {device}"
    else:
        cf.set_mode_cpu()
        _mode = "CPU"
    return _mode


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
    return report


# ---- what is handed to Caffe ---------------------------------------------------------------------

def _existing(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{what} {path} does not exist")
    return path


def read_prototxt(path, message=None):
    """Parse a text prototxt (NetParameter by default); errors name the file and line."""
    from google.protobuf import text_format
    path = _existing(path, "prototxt")
    message = message if message is not None else caffe_pb2().NetParameter()
    try:
        text_format.Parse(path.read_text(), message)
    except text_format.ParseError as exc:
        line = exc.GetLine() if hasattr(exc, "GetLine") else None
        text = str(exc).split(" : ", 1)[-1]
        raise EngineError(f"{path}:{line}: {text}" if line else f"{path}: {text}") from None
    return message


def read_caffemodel(path):
    """Parse a binary caffemodel (a NetParameter with blobs)."""
    from google.protobuf.message import DecodeError
    path = _existing(path, "caffemodel")
    net = caffe_pb2().NetParameter()
    try:
        net.ParseFromString(path.read_bytes())
    except DecodeError as exc:
        raise EngineError(f"{path} is not a caffemodel (protobuf: {exc})") from None
    if not net.layer and not net.layers:
        raise EngineError(f"{path} holds no layers: not a caffemodel")
    return net


def _phase_value(phase) -> int:
    pb2 = caffe_pb2()
    return {"train": pb2.TRAIN, "test": pb2.TEST}[phase] if isinstance(phase, str) else int(phase)


def layers_in_phase(net_param, phase):
    """The layers Caffe instantiates for `phase`, following include/exclude rules (net.cpp FilterNet)."""
    phase = _phase_value(phase)

    def rule_met(rule):
        return not rule.HasField("phase") or rule.phase == phase   # stage/level rules are not used here

    kept = []
    for layer in net_param.layer:
        if layer.include:
            keep = any(rule_met(r) for r in layer.include)
        else:
            keep = not any(rule_met(r) for r in layer.exclude)
        if keep:
            kept.append(layer)
    return kept


def check_net(net_param, phase, path) -> None:
    """Check what Caffe would otherwise abort on: unknown layer types, bottoms nobody produced,
    data sources that are missing (the glog CHECKs of layer_factory, net.cpp and the data layers)."""
    if net_param.layers:
        raise EngineError(f"{path}: uses the V1 'layers' field; upgrade it with Caffe's upgrade_net_proto_text")
    known = set(caffe().layer_type_list())
    blobs = set(net_param.input)
    for layer in layers_in_phase(net_param, phase):
        if layer.type not in known:
            raise EngineError(f"{path}: layer {layer.name!r} has type {layer.type!r}, unknown to stock Caffe")
        for bottom in layer.bottom:
            if bottom not in blobs:
                raise EngineError(f"{path}: layer {layer.name!r} reads blob {bottom!r} that no earlier layer produces")
        blobs.update(layer.top)
        source = {"ImageData": layer.image_data_param.source, "Data": layer.data_param.source,
                  "HDF5Data": layer.hdf5_data_param.source}.get(layer.type)
        if source is not None and not Path(source).exists():
            raise EngineError(f"{path}: data layer {layer.name!r} reads {source}, which does not exist "
                              f"(paths are relative to the working directory {os.getcwd()})")


def check_weights(net, weights_param, weights_path) -> None:
    """Compare every blob shape in a caffemodel with the net's (Caffe CHECK-aborts on a mismatch),
    and refuse a caffemodel lacking weights for some layer (Caffe would silently keep the fillers)."""
    have = {layer.name for layer in list(weights_param.layer) + list(weights_param.layers) if layer.blobs}
    missing = [name for name in net.params if name not in have]
    if missing:
        raise EngineError(f"{weights_path} holds no weights for layer(s) {', '.join(missing[:4])}"
                          f"{' ...' if len(missing) > 4 else ''} of the prototxt: a caffemodel of another network?")
    for layer in list(weights_param.layer) + list(weights_param.layers):
        if layer.name not in net.params:
            continue
        target = net.params[layer.name]
        if len(layer.blobs) != len(target):
            raise EngineError(f"{weights_path}: layer {layer.name!r} has {len(layer.blobs)} blobs, "
                              f"the net expects {len(target)}")
        for i, (blob, have) in enumerate(zip(layer.blobs, target)):
            shape = tuple(blob.shape.dim) if blob.HasField("shape") else \
                tuple(d for d in (blob.num, blob.channels, blob.height, blob.width))
            want = tuple(have.data.shape)
            legacy_match = not blob.HasField("shape") and int_prod(shape) == int_prod(want)
            if shape != want and not legacy_match:
                raise EngineError(f"{weights_path}: layer {layer.name!r} blob {i} has shape {shape}, "
                                  f"the prototxt gives {want}; use the caffemodel trained with this prototxt")


def int_prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def probe_construct(prototxt, phase="test") -> None:
    """Construct the net once in a forked child, so that a CHECK failure in Caffe's shape logic
    (Concat/Eltwise shapes, parameter counts, ...) becomes an EngineError carrying glog's message
    instead of aborting this interpreter. The child runs in CPU mode and discards the net."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: stderr into the pipe, build, report by exit status
        os.close(read_fd)
        os.dup2(write_fd, 2)
        faulthandler.disable()   # its own copy of stderr would print the expected abort
        try:
            caffe().set_mode_cpu()
            caffe().Net(str(prototxt), _phase_value(phase))
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
        raise EngineError(f"{prototxt}: Caffe cannot build this net: {reason}")


def net_from_param(net_param, weights=None, phase="test", probe=True):
    """load_net for a NetParameter held in memory (Caffe's Python constructor takes a file)."""
    import tempfile
    from google.protobuf import text_format
    with tempfile.TemporaryDirectory(prefix="caffe-prune-") as tmp:
        path = Path(tmp) / f"{net_param.name or 'net'}.prototxt"
        path.write_text(text_format.MessageToString(net_param))
        return load_net(path, weights, phase, probe)


def load_net(prototxt, weights=None, phase="test", probe=True):
    """Build a caffe.Net from a prototxt (and caffemodel) after checking both in Python.

    ``probe`` first builds the net in a forked child (see probe_construct); pass False for nets
    already known to be valid (e.g. generated by this package) to skip the second construction."""
    cf = caffe()
    net_param = read_prototxt(prototxt)
    check_net(net_param, phase, prototxt)
    weights_param = read_caffemodel(weights) if weights is not None else None
    if probe:
        probe_construct(prototxt, phase)
    net = cf.Net(str(prototxt), _phase_value(phase))
    if weights_param is not None:
        check_weights(net, weights_param, weights)
        net.copy_from(str(weights))
    return net

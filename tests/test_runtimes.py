"""caffe_prune.runtimes: the three runtimes compute Caffe's outputs (pycaffe's own forward the
reference), time sanely, keep their thread settings to their own forwards, and say in one line
what to install or what they could not load.

Tolerances (``compare``'s max_rel_diff: max|b - caffe| / max|caffe|), on the logits (the nets with
their Softmax removed) and on the probabilities, batch 1 and 3:
- caffe: 0 (the same forward);
- onnxruntime: RUNTIME_TOL = 1e-5; measured up to 4.3e-7 (ResNet-20 logits);
- opencv: RUNTIME_TOL = 1e-5; measured up to 2.8e-6 (ResNet-20 logits: its fused BatchNorm + Scale + ReLU and
  reordered sums round differently).
"""
import sys
import types

import numpy as np
import pytest

import zoo
from caffe_prune import onnx_export, pycaffe, runtimes
from caffe_prune.errors import InputError

pytest.importorskip("cv2", reason="OpenCV is not installed (pip install 'opencv-python-headless<5')")
pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install onnxruntime)")

RUNTIME_TOL = 1e-5
NETS = ("ResNet-20", "SqueezeNet")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{(net, form): (prototxt, caffemodel, onnx)} with random weights, form "prob" (as shipped)
    or "logits" (its Softmax removed, the same weights)."""
    root = tmp_path_factory.mktemp("runtimes")
    made = {}
    for name in NETS:
        net_param = pycaffe.read_prototxt(zoo.builtin(name))
        net = zoo.random_net(zoo.builtin(name))
        caffemodel = root / f"{name}.caffemodel"
        net.save(str(caffemodel))
        for form, param in (("prob", net_param), ("logits", zoo.without_softmax(net_param))):
            prototxt = zoo.write(param, root / f"{name}-{form}.prototxt")
            onnx_path = root / f"{name}-{form}.onnx"
            onnx_export.prototxt_to_onnx(prototxt, caffemodel, onnx_path)
            made[name, form] = (prototxt, caffemodel, onnx_path)
    return made


@pytest.mark.parametrize("form", ["logits", "prob"])
@pytest.mark.parametrize("name", NETS)
def test_runtimes_compute_caffes_outputs(name, form, models):
    import caffe
    prototxt, caffemodel, onnx_path = models[name, form]
    reference_net = caffe.Net(str(prototxt), str(caffemodel), caffe.TEST)
    runners = [runtimes.load("caffe", prototxt, caffemodel), runtimes.load("opencv", prototxt, caffemodel),
               runtimes.load("onnxruntime", prototxt, caffemodel, onnx_path),
               runtimes.load("onnxruntime", prototxt, caffemodel)]       # exported in memory
    for batch in (1, 3):
        x = zoo.images((3, 32, 32), batch, seed=batch)
        reference = zoo.forward(reference_net, x)
        logits = "fc" if name == "ResNet-20" else "ip"
        assert set(reference) == ({logits} if form == "logits" else {"prob"})
        for runner in runners:
            out = runner.forward(x)
            assert list(out) == list(reference_net.outputs)
            deviation = runtimes.compare(reference, out)
            for blob, d in deviation.items():
                assert out[blob].shape == reference[blob].shape
                if runner.runtime == "caffe":
                    assert d["max_abs_diff"] == 0
                assert d["max_rel_diff"] <= RUNTIME_TOL, (runner, blob, d)


def test_latency_is_sane(models):
    prototxt, caffemodel, onnx_path = models["ResNet-20", "prob"]
    for runtime in runtimes.RUNTIMES:
        for batch, threads in ((1, 1), (4, 2)):
            runner = runtimes.load(runtime, prototxt, caffemodel, onnx_path, threads=threads)
            result = runtimes.latency(runner, batch=batch, repeats=5, warmup=1)
            assert set(result) == {"runtime", "batch", "threads", "median_ms", "q1_ms", "q3_ms", "repeats",
                                   "images_per_s"}
            assert (result["runtime"], result["batch"], result["threads"], result["repeats"]) == \
                (runtime, batch, threads, 5)
            assert 0 < result["q1_ms"] <= result["median_ms"] <= result["q3_ms"]
            assert result["images_per_s"] == pytest.approx(batch * 1e3 / result["median_ms"])


def test_threads_are_set_for_the_forwards_and_restored(models):
    import cv2
    from threadpoolctl import threadpool_info
    prototxt, caffemodel, onnx_path = models["ResNet-20", "prob"]

    def blas_threads():
        return sorted({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})

    before = blas_threads()
    runner = runtimes.load("caffe", prototxt, caffemodel, threads=1)
    with runner.limits():
        assert blas_threads() == [1]
    runner.forward(zoo.images((3, 32, 32), 1))
    assert blas_threads() == before
    cv2.setNumThreads(2)
    runner = runtimes.load("opencv", prototxt, caffemodel, threads=1)
    with runner.limits():
        assert cv2.getNumThreads() == 1
    assert cv2.getNumThreads() == 2
    runner = runtimes.load("onnxruntime", prototxt, caffemodel, onnx_path, threads=2)
    options = runner.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)


def test_compare_numbers():
    a = {"x": np.array([1.0, -4.0, 2.0]), "y": np.zeros(2)}
    b = {"x": np.array([1.5, -4.0, 1.0]), "y": np.zeros(2), "z": np.ones(1)}
    assert runtimes.compare(a, b) == {"x": {"max_abs_diff": 1.0, "max_rel_diff": 0.25},
                                      "y": {"max_abs_diff": 0.0, "max_rel_diff": 0.0}}
    with pytest.raises(InputError, match=r"^compare: blob 'z' is missing"):
        runtimes.compare(b, a)


# ---------------------------------------------------------------------------------------------
# one-line errors

@pytest.mark.parametrize("runtime, module, message", [
    ("opencv", "cv2", "OpenCV's DNN module is not installed: pip install 'opencv-python-headless>=4.10.0.84,<5'"),
    ("onnxruntime", "onnxruntime", "ONNX Runtime is not installed: pip install 'onnxruntime>=1.19'"),
])
def test_missing_runtime(runtime, module, message, models, monkeypatch):
    prototxt, caffemodel, _ = models["ResNet-20", "prob"]
    monkeypatch.setitem(sys.modules, module, None)          # `import module` now raises ImportError
    with pytest.raises(InputError) as error:
        runtimes.load(runtime, prototxt, caffemodel)
    assert str(error.value) == message


def test_opencv_5_has_no_caffe_importer(models, monkeypatch):
    prototxt, caffemodel, _ = models["ResNet-20", "prob"]
    monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(__version__="5.1.0", dnn=types.SimpleNamespace()))
    with pytest.raises(InputError, match=r"^OpenCV 5.1.0 has no Caffe importer .*<5'$"):
        runtimes.load("opencv", prototxt, caffemodel)


def test_files_a_runtime_cannot_load(models, tmp_path):
    prototxt, caffemodel, _ = models["ResNet-20", "prob"]
    broken = tmp_path / "broken.bin"
    broken.write_bytes(b"\x08\x96\x01 not a model at all \xff\xfe")
    bad_text = tmp_path / "bad.prototxt"
    bad_text.write_text("layer { name: 'x' type: \n")
    cases = [
        (lambda: runtimes.load("opencv", prototxt, broken), rf"^opencv cannot load {prototxt} with {broken}: OpenCV"),
        (lambda: runtimes.load("onnxruntime", prototxt, caffemodel, broken), rf"^onnxruntime cannot load {broken}: "),
        (lambda: runtimes.load("caffe", prototxt, tmp_path / "absent.caffemodel"),
         rf"^caffe cannot load {tmp_path / 'absent.caffemodel'}: no such file$"),
        (lambda: runtimes.load("caffe", bad_text, caffemodel), rf"^{bad_text}:2: .*Expected string"),
        (lambda: runtimes.load("tensorrt", prototxt, caffemodel),
         r"^runtime 'tensorrt': choose one of caffe, opencv, onnxruntime$"),
        (lambda: runtimes.load("caffe", prototxt, caffemodel, threads=0), r"^threads 0: give a whole number"),
        (lambda: runtimes.load("caffe", prototxt, caffemodel).forward(np.zeros((1, 3, 28, 28))),
         r"input of shape \(1, 3, 28, 28\), the net takes \(N,\) \+ \(3, 32, 32\)$"),
    ]
    for call, pattern in cases:
        with pytest.raises(InputError, match=pattern) as error:
            call()
        assert "\n" not in str(error.value)
    # check (export's): OpenCV's limits and a missing package say what was not checked; a graph ONNX
    # Runtime refuses is the export's failure, raised
    x, reference = np.zeros((1, 3, 32, 32), np.float32), {}
    skipped = runtimes.check("opencv", prototxt, broken, None, x, reference, 1e-4)
    assert skipped["runtime"] == "opencv" and skipped["skipped"].startswith(f"opencv cannot load {prototxt}")
    with pytest.raises(InputError, match=rf"^onnxruntime cannot load {broken}: "):
        runtimes.check("onnxruntime", prototxt, caffemodel, broken, x, reference, 1e-4)


@pytest.mark.parametrize("param, message", [
    ("lrn_param { local_size: 3 k: 2 }", "has k 2, which OpenCV ignores (it computes k = 1)"),
    ("pooling_param { pool: MAX kernel_size: 2 round_mode: CEIL }",
     "sets round_mode, which OpenCV's Caffe importer cannot run"),
])
def test_opencv_refuses_what_it_computes_differently(param, message, tmp_path):
    """OpenCV 4.14 computes an LRN with k = 2 as with k = 1 (measured: 0.44 relative to Caffe's),
    and fails the forward of a Pooling that sets round_mode: refused at load."""
    kind = "LRN" if "lrn" in param else "Pooling"
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text('layer { name: "data" type: "Input" top: "data"\n'
                        '        input_param { shape { dim: 1 dim: 4 dim: 6 dim: 6 } } }\n'
                        f'layer {{ name: "l" type: "{kind}" bottom: "data" top: "l" {param} }}\n')
    net = zoo.random_net(prototxt)
    net.save(str(tmp_path / "net.caffemodel"))
    with pytest.raises(InputError, match=rf"^opencv: layer 'l' \({kind}\) ") as error:
        runtimes.load("opencv", prototxt, tmp_path / "net.caffemodel")
    assert message in str(error.value)

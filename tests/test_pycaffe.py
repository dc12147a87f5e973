"""The engine: real pycaffe passes checked against numpy and finite differences, and the error
paths that would otherwise abort the interpreter or fail obscurely."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from caffe_prune import pycaffe
from caffe_prune.errors import InputError
from conftest import REPO

TINY = """
name: "tiny"
force_backward: true  # so Caffe fills the input blob's diff too
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } shape { dim: 2 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "act" type: "TanH" bottom: "conv" top: "act" }
layer { name: "ip" type: "InnerProduct" bottom: "act" top: "ip"
  inner_product_param { num_output: 5
    weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def numpy_loss(x, labels, w_conv, b_conv, w_ip, b_ip):
    """The tiny net's loss computed independently: correlation, tanh, affine, softmax cross-entropy."""
    n, c, h, wd = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((n, w_conv.shape[0], h, wd))
    for i in range(h):
        for j in range(wd):
            patch = xp[:, :, i:i + 3, j:j + 3]
            conv[:, :, i, j] = np.einsum("nckl,ockl->no", patch, w_conv) + b_conv
    act = np.tanh(conv)
    logits = act.reshape(n, -1) @ w_ip.T + b_ip
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return conv, -logp[np.arange(n), labels.astype(int)].mean()


@pytest.fixture
def tiny(caffe, write_net):
    net = pycaffe.load_net(write_net(TINY))
    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.normal(size=(2, 3, 6, 6))
    net.blobs["label"].data[...] = [1, 3]
    return net


def params(net):
    return [net.params[name][i].data.astype(np.float64) for name in ("conv", "ip") for i in (0, 1)]


def test_forward_matches_numpy(tiny):
    out = tiny.forward()
    conv, loss = numpy_loss(tiny.blobs["data"].data, tiny.blobs["label"].data, *params(tiny))
    np.testing.assert_allclose(tiny.blobs["conv"].data, conv, rtol=1e-5, atol=1e-5)
    assert float(out["loss"]) == pytest.approx(loss, rel=1e-5)


def test_backward_matches_numeric_gradient(tiny):
    """Caffe's backward diffs equal central differences of the numpy loss (float64), for the
    convolution weights, the IP weights and the input data."""
    tiny.forward()
    tiny.backward()
    x = tiny.blobs["data"].data.astype(np.float64)
    labels = tiny.blobs["label"].data.copy()
    p = params(tiny)
    rng = np.random.default_rng(1)
    eps = 1e-5

    def loss_with(which, index, delta):
        args = [x.copy()] + [q.copy() for q in p]
        args[which][index] += delta
        return numpy_loss(args[0], labels, *args[1:])[1]

    caffe_diffs = [tiny.blobs["data"].diff, tiny.params["conv"][0].diff, None, tiny.params["ip"][0].diff]
    for which, diff in ((0, caffe_diffs[0]), (1, caffe_diffs[1]), (3, caffe_diffs[3])):
        for _ in range(8):
            index = tuple(rng.integers(0, s) for s in diff.shape)
            numeric = (loss_with(which, index, eps) - loss_with(which, index, -eps)) / (2 * eps)
            assert diff[index] == pytest.approx(numeric, rel=1e-3, abs=1e-6)


def test_prototxt_parse_error_names_file_and_line(caffe, write_net):
    path = write_net(TINY.replace('kernel_size: 3', 'kernel_size: 3\n    kernal: 2'))
    with pytest.raises(InputError, match=rf"{path.name}:8: .*no field named \"kernal\""):
        pycaffe.load_net(path)


def test_unknown_layer_type_and_missing_bottom(caffe, write_net):
    with pytest.raises(InputError, match=r"layer 'act' has type 'Tanh', unknown to stock Caffe"):
        pycaffe.load_net(write_net(TINY.replace('"TanH"', '"Tanh"')))
    with pytest.raises(InputError, match=r"layer 'ip' reads blob 'actt' that no earlier layer"):
        pycaffe.load_net(write_net(TINY.replace('bottom: "act" top: "ip"', 'bottom: "actt" top: "ip"')))


def test_shape_error_inside_caffe_becomes_exception(caffe, write_net):
    """An Eltwise over blobs of different shapes is a CHECK failure in Caffe; it must surface as
    an exception carrying Caffe's message while this interpreter lives on."""
    bad = TINY.replace('layer { name: "loss"', 'layer { name: "sum" type: "Eltwise" bottom: "conv" '
                       'bottom: "ip" top: "sum" }\nlayer { name: "loss"')
    with pytest.raises(InputError, match=r"Caffe cannot build this net: .*(shape|Check failed)"):
        pycaffe.load_net(write_net(bad))
    assert pycaffe.load_net(write_net(TINY)).blobs["conv"].data.shape == (2, 4, 6, 6)


def test_caffemodel_shape_mismatch_names_layer_and_shapes(caffe, write_net, tmp_path):
    net = pycaffe.load_net(write_net(TINY))
    weights = tmp_path / "w.caffemodel"
    net.save(str(weights))
    wider = write_net(TINY.replace("num_output: 4", "num_output: 6"), "wider.prototxt")
    with pytest.raises(InputError, match=r"layer 'conv' blob 0 has shape \(4, 3, 3, 3\), "
                                                 r"the prototxt gives \(6, 3, 3, 3\)"):
        pycaffe.load_net(wider, weights)
    (tmp_path / "junk.caffemodel").write_bytes(b"\xff\xfe not a protobuf")
    with pytest.raises(InputError, match="junk.caffemodel is not a caffemodel"):
        pycaffe.load_net(write_net(TINY), tmp_path / "junk.caffemodel")
    loaded = pycaffe.load_net(write_net(TINY), weights)   # the right one loads bit-exactly
    np.testing.assert_array_equal(loaded.params["conv"][0].data, net.params["conv"][0].data)


def run_python(code, env=None):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def test_caffe_missing_is_a_clear_error():
    code = ("import sys; sys.path = [p for p in sys.path if 'caffe-' not in p and 'dist-packages' not in p]\n"
            "from caffe_prune import pycaffe\nfrom caffe_prune.errors import InputError\n"
            "try:\n    pycaffe.caffe()\nexcept InputError as e:\n    print('ERR', e)")
    out = run_python(code).stdout
    assert out.startswith("ERR pycaffe is not importable") and "make setup" in out


def test_pycaffe_built_for_another_python_is_refused(tmp_path):
    (tmp_path / "lib" / "caffe").mkdir(parents=True)
    (tmp_path / "lib" / "caffe" / "__init__.py").write_text("raise SystemExit('must not be imported')\n")
    (tmp_path / "build-info.json").write_text(json.dumps({"python": "2.7"}))
    code = ("from caffe_prune import pycaffe\nfrom caffe_prune.errors import InputError\n"
            "try:\n    pycaffe.caffe()\nexcept InputError as e:\n    print('ERR', e)")
    out = run_python(code, {pycaffe.PYCAFFE_ENV: str(tmp_path / "lib")}).stdout
    assert "was built for Python 2.7 but this is Python 3." in out


def test_build_script_refuses_other_python_and_hits_cache(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 3.9\n")
    fake.chmod(0o755)
    refused = subprocess.run(["bash", "tools/caffe/build.sh", str(fake)], capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 1
    assert "Python 3.9" in refused.stderr and "boost-python is for Python 3.11" in refused.stderr
    hit = subprocess.run(["bash", "tools/caffe/build.sh", sys.executable], capture_output=True, text=True, cwd=REPO)
    assert hit.returncode == 0 and "cache hit" in hit.stdout, hit.stderr


def test_doctor_reports_the_stock_build():
    out = subprocess.run([sys.executable, "-m", "caffe_prune", "doctor", "--json"],
                         capture_output=True, text=True, cwd=REPO)
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["problems"] == []
    assert report["report"]["caffe"] == "1.0.0"
    assert "OpenBLAS" in report["report"]["blas"] and report["report"]["mode"] == "CPU"
    assert "caffe=1.0.0+git20180821.99bd997-8" in report["report"]["source"]

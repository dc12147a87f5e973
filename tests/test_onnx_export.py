"""caffe_prune.onnx_export: ONNX Runtime's forward of the exported graph equals Caffe's forward of
the net it came from, on the same seeded random images, at batch 1 and batch 3 (one graph: the
batch is symbolic), for whole networks and for unit nets built around each rule that needed care.

Tolerances: ``max|onnx - caffe| / max|caffe|`` per output blob, Caffe the reference.
- unit nets (a few layers): UNIT_TOL = 1e-6; measured at most 3.3e-7 (float32 rounding, reordered
  sums);
- whole networks: NET_TOL = 1e-4 on the logits and every non-Softmax output; measured on the
  logits 2e-7 to 6e-7 for the six built-in nets and GoogLeNet, 9e-7 for Caffe's AlexNet, 2e-6 to
  4e-6 for DenseNet-121, 6e-6 to 7e-6 for MobileNet v2 and 1.6e-5 (224) to 2.3e-5 (64, width
  1/4) for ResNet-50: each layer's rounding, amplified over 50 layers of random weights;
- a Softmax output is held to what its logits' tolerance implies: |dp_i| <= 2 p_i (1 - p_i)
  max|dz| <= max|dz| / 2, so max|dp| <= NET_TOL * max|logits| / 2.
"""
import numpy as np
import pytest

import zoo
from caffe_prune import onnx_export, onnx_layers, pycaffe
from caffe_prune.errors import InputError

ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install onnxruntime)")
pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")

UNIT_TOL = 1e-6
NET_TOL = 1e-4


def relative(a, b) -> float:
    """max|a - b| / max|b|: the deviation relative to the reference's scale."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def export_and_run(prototxt, shape=None, batches=(1, 3), extra=(), opset=13, seed=0):
    """Caffe's and ONNX Runtime's outputs ({blob: array}, for each batch size) of one random net."""
    net_param = pycaffe.read_prototxt(prototxt)
    net = zoo.random_net(prototxt, seed)
    input_name, stated = onnx_export.deploy_input(net_param)
    shape = tuple(shape or stated)
    model = onnx_export.to_onnx(net_param, zoo.params_of(net), shape, opset, extra_outputs=extra)
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    assert names == list(net.outputs) + [b for b in extra if b not in net.outputs]
    runs = []
    for batch in batches:
        x = zoo.images(shape, batch, seed=batch)
        caffe_out = zoo.forward(net, x, extra)
        onnx_out = dict(zip(names, sess.run(None, {input_name: x})))
        runs.append((caffe_out, onnx_out))
    return net_param, runs


def check_net(prototxt, shape=None, tol=NET_TOL):
    """Every output, and the logits, at batch 1 and 3; returns the worst deviation measured."""
    net_param = pycaffe.read_prototxt(prototxt)
    logits = zoo.logits_blob(net_param)
    softmax_tops = {l.top[0] for l in net_param.layer if l.type == "Softmax"}
    _, runs = export_and_run(prototxt, shape, extra=[logits] if logits else [])
    worst = 0.0
    for caffe_out, onnx_out in runs:
        for blob, reference in caffe_out.items():
            assert np.isfinite(reference).all() and reference.std() > 0, f"{blob}: a degenerate reference"
            if blob in softmax_tops and logits:
                bound = tol * np.abs(caffe_out[logits]).max() / 2
                assert np.abs(onnx_out[blob] - reference).max() <= bound, blob
            else:
                worst = max(worst, relative(onnx_out[blob], reference))
                assert relative(onnx_out[blob], reference) <= tol, blob
    return worst


# ---------------------------------------------------------------------------------------------
# whole networks

@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n == "AlexNet" else [])
                                  for n in zoo.BUILTIN])
def test_builtin_networks(name):
    check_net(zoo.builtin(name))


@pytest.mark.parametrize("relpath", ["models/bvlc_googlenet/deploy.prototxt",
                                     pytest.param("models/bvlc_alexnet/deploy.prototxt", marks=pytest.mark.slow)])
def test_caffe_model_zoo(relpath, tmp_path):
    check_net(zoo.caffe_source(relpath, tmp_path))


SHRUNK = {"ResNet-50": lambda: zoo.resnet50(64, width=0.25),
          "MobileNet-v2": lambda: zoo.mobilenet_v2(64, width=0.5),
          "DenseNet-121": lambda: zoo.densenet121(64, growth=8)}


@pytest.mark.parametrize("name", SHRUNK)
def test_generated_networks_at_64(name, tmp_path):
    check_net(zoo.write(SHRUNK[name](), tmp_path / "deploy.prototxt"))


@pytest.mark.slow
@pytest.mark.parametrize("build", [zoo.resnet50, zoo.mobilenet_v2, zoo.densenet121],
                         ids=["ResNet-50", "MobileNet-v2", "DenseNet-121"])
def test_generated_networks_at_224(build, tmp_path):
    check_net(zoo.write(build(), tmp_path / "deploy.prototxt"))


# learned parameters (BatchNorm's statistics not counted, Scale's gamma and beta counted) as the
# published reference implementations count them: torchvision's resnet50, mobilenet_v2 and
# densenet121 have exactly these (He et al. Table 1 rounds to 25.5M, Sandler et al. to 3.4M)
PARAMETERS = {"ResNet-50": (zoo.resnet50, 25_557_032), "MobileNet-v2": (zoo.mobilenet_v2, 3_504_872),
              "DenseNet-121": (zoo.densenet121, 7_978_856)}


@pytest.mark.parametrize("name", PARAMETERS)
def test_generated_nets_are_the_published_ones(name, tmp_path):
    """The NetSpec nets have the published parameter counts, counted from Caffe's blobs, and
    Caffe's shapes: ResNet-50's ceil-mode pool1 gives 56x56, DenseNet's 57x57 (not 56: its pool1
    has pad 1), then 29, 15, 8 through the transitions."""
    import caffe
    build, count = PARAMETERS[name]
    net = caffe.Net(str(zoo.write(build(), tmp_path / "net.prototxt")), caffe.TEST)
    kinds = dict(zip(net._layer_names, (layer.type for layer in net.layers)))
    assert sum(blob.data.size for layer, blobs in net.params.items() if kinds[layer] != "BatchNorm"
               for blob in blobs) == count
    shapes = {blob: net.blobs[blob].data.shape for blob in net.blobs}
    if name == "ResNet-50":
        assert shapes["pool1"] == (1, 64, 56, 56) and shapes["res5c"] == (1, 2048, 7, 7)
    if name == "DenseNet-121":
        assert [shapes[b][2] for b in ("pool1", "pool2", "pool3", "pool4")] == [57, 29, 15, 8]
    if name == "MobileNet-v2":
        assert shapes["conv_last"] == (1, 1280, 7, 7)


# ---------------------------------------------------------------------------------------------
# unit nets

def net_text(body: str, shape=(1, 4, 7, 9)) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'name: "unit"\nlayer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}\n' + body


def check_unit(tmp_path, body, shape=(1, 4, 7, 9), extra=(), tol=UNIT_TOL, opset=13):
    path = tmp_path / "unit.prototxt"
    path.write_text(net_text(body, shape))
    _, runs = export_and_run(path, extra=extra, opset=opset)
    for caffe_out, onnx_out in runs:
        for blob, reference in caffe_out.items():
            assert relative(onnx_out[blob], reference) <= tol, (blob, relative(onnx_out[blob], reference))
    return runs


def pooling_reference(x, kernel, stride, pad, size, divisor):
    """Average pooling over Caffe's windows (start = o * s - p) of the pooled ``size``, divided by
    ``divisor``: "caffe" (the window clipped at H + pad: padding counts, the ceil extension does
    not), "kernel" (always k_h k_w) or "inside" (only input elements): an independent
    transcription of pooling_layer.cpp's rule and of the two rules ONNX's count_include_pad names."""
    n, c, h, w = x.shape
    out = np.zeros((n, c) + tuple(size))
    for i in range(size[0]):
        for j in range(size[1]):
            h0, w0 = i * stride[0] - pad[0], j * stride[1] - pad[1]
            h1, w1 = min(h0 + kernel[0], h + pad[0]), min(w0 + kernel[1], w + pad[1])
            area = {"caffe": (h1 - h0) * (w1 - w0), "kernel": kernel[0] * kernel[1]}.get(divisor)
            window = x[:, :, max(h0, 0):min(h1, h), max(w0, 0):min(w1, w)]
            out[:, :, i, j] = window.sum(axis=(2, 3)) / (area or window.shape[2] * window.shape[3])
    return out


# (input H, W; kernel; stride; pad; Caffe's pooled size; extra parameters; the divisor rules
# of ONNX's count_include_pad that differ from Caffe's there): ceil adds a window the floor rule
# has not, the pad clip removes one the ceil rule added, a ceil window reaching past the padding
# (where both ONNX rules are wrong), rectangular and floor-mode cases
POOLS = {
    "ceil-adds": ((6, 8), (3, 3), (2, 2), (0, 0), (3, 4), "", ("kernel",)),     # floor: (2, 3)
    "clip-removes": ((5, 7), (2, 2), (2, 2), (1, 1), (3, 4), "", ("inside",)),  # ceil without the clip: (4, 5)
    "ceil-past-pad": ((6, 8), (3, 3), (2, 2), (1, 1), (4, 5), "", ("kernel", "inside")),
    "pad-ceil": ((7, 9), (3, 3), (2, 2), (1, 1), (4, 5), "", ("inside",)),
    "rect": ((7, 9), (3, 2), (2, 3), (1, 1), (4, 4), "", ("inside",)),
    "pad-h-w": ((7, 8), (3, 3), (2, 2), (2, 1), (5, 5), "", ("kernel", "inside")),
    "floor": ((7, 8), (3, 3), (2, 2), (1, 1), (4, 4), "round_mode: FLOOR", ("inside",)),
    "stride-1": ((5, 5), (3, 3), (1, 1), (1, 1), (5, 5), "", ("inside",)),
}


def _pool_param(kernel, stride, pad, extra):
    if kernel[0] == kernel[1] and stride[0] == stride[1] and pad[0] == pad[1]:
        return f"kernel_size: {kernel[0]} stride: {stride[0]} pad: {pad[0]} {extra}"
    return (f"kernel_h: {kernel[0]} kernel_w: {kernel[1]} stride_h: {stride[0]} stride_w: {stride[1]} "
            f"pad_h: {pad[0]} pad_w: {pad[1]} {extra}")


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("case", POOLS)
def test_pooling_sizes_and_divisor(case, method, tmp_path):
    hw, kernel, stride, pad, size, extra, naive_rules = POOLS[case]
    body = (f'layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param {{ pool: {method} '
            f'{_pool_param(kernel, stride, pad, extra)} }} }}')
    runs = check_unit(tmp_path, body, shape=(1, 3) + hw)
    model = onnx_export.to_onnx(pycaffe.read_prototxt(tmp_path / "unit.prototxt"), {}, (3,) + hw)
    # no Pad node: ONNX Runtime 1.19's Pad fusion folds one into the AveragePool wrongly
    assert "Pad" not in {node.op_type for node in model.graph.node}
    for caffe_out, _ in runs:
        assert caffe_out["pool"].shape[2:] == size                   # the case is what it says
    assert onnx_layers.pooled_size(hw[0], kernel[0], stride[0], pad[0], not extra) == size[0]
    if method == "AVE":
        caffe_out, onnx_out = runs[1]
        x = zoo.images((3,) + hw, 3, seed=3)
        reference = pooling_reference(x.astype(np.float64), kernel, stride, pad, size, "caffe")
        assert relative(caffe_out["pool"], reference) <= UNIT_TOL
        assert relative(onnx_out["pool"], reference) <= UNIT_TOL
        for naive in naive_rules:           # the case tells Caffe's divisor from ONNX's
            assert relative(pooling_reference(x.astype(np.float64), kernel, stride, pad, size, naive),
                            reference) > 1e-2, naive


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling(method, tmp_path):
    check_unit(tmp_path, f'layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool" '
                         f'pooling_param {{ pool: {method} global_pooling: true }} }}')


CONVS = {
    "grouped": "num_output: 6 kernel_size: 3 group: 2 pad: 1",
    "depthwise": "num_output: 4 kernel_size: 3 group: 4 stride: 2 pad: 1",
    "multiplier": "num_output: 8 kernel_size: 3 group: 4",
    "dilated": "num_output: 5 kernel_size: 3 dilation: 2 pad: 2",
    "rect": "num_output: 5 kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 bias_term: false",
    "per-axis": "num_output: 5 kernel_size: 3 kernel_size: 2 stride: 1 stride: 2 pad: 0 pad: 1 dilation: 2 dilation: 1",
}


@pytest.mark.parametrize("case", CONVS)
def test_convolution(case, tmp_path):
    check_unit(tmp_path, f'layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv" '
                         f'convolution_param {{ {CONVS[case]} weight_filler {{ type: "gaussian" std: 0.3 }} '
                         f'bias_filler {{ type: "gaussian" std: 0.3 }} }} }}')


@pytest.mark.parametrize("param", ["num_output: 6 kernel_size: 4 stride: 2 pad: 1 group: 2",
                                   "num_output: 4 kernel_size: 3 stride: 2 group: 4 dilation: 2",
                                   "num_output: 3 kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 1 bias_term: false"])
def test_deconvolution(param, tmp_path):
    check_unit(tmp_path, f'layer {{ name: "up" type: "Deconvolution" bottom: "data" top: "up" '
                         f'convolution_param {{ {param} weight_filler {{ type: "gaussian" std: 0.3 }} }} }}')


def test_in_place_chain_names(tmp_path):
    """conv1 rewritten three times in place: the graph output is called conv1 and holds Caffe's
    final conv1; the earlier versions are internal values named after the layer that wrote them."""
    body = '''
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" relu_param { negative_slope: 0.1 } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu2" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "drop" type: "Dropout" bottom: "conv2" top: "conv2" }
'''
    path = tmp_path / "unit.prototxt"
    path.write_text(net_text(body))
    net_param = pycaffe.read_prototxt(path)
    model = onnx_export.to_onnx(net_param, zoo.params_of(zoo.random_net(path)), (4, 7, 9), extra_outputs=["conv1"])
    assert [i.name for i in model.graph.input] == ["data"]
    assert [o.name for o in model.graph.output] == ["conv2", "conv1"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == onnx_export.BATCH
    written = [o for node in model.graph.node for o in node.output]
    assert len(written) == len(set(written))                            # each value written once
    assert {"conv1/conv1_out", "conv1/relu1_out", "conv1/scale1_out", "conv1", "conv2/conv2_out"} <= set(written)
    check_unit(tmp_path, body, extra=["conv1"])


def test_eltwise(tmp_path):
    body = ''.join(f'layer {{ name: "c{i}" type: "Convolution" bottom: "data" top: "c{i}" convolution_param '
                   f'{{ num_output: 3 kernel_size: 1 weight_filler {{ type: "gaussian" std: 1 }} }} }}\n'
                   for i in range(3))
    body += '''
layer { name: "sum" type: "Eltwise" bottom: "c0" bottom: "c1" bottom: "c2" top: "sum"
        eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 } }
layer { name: "prod" type: "Eltwise" bottom: "c0" bottom: "c1" bottom: "c2" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "c0" bottom: "c1" bottom: "c2" top: "max" eltwise_param { operation: MAX } }
'''
    runs = check_unit(tmp_path, body, extra=["c0", "c1", "c2"])
    c = runs[0][0]
    assert relative(c["sum"], c["c0"] - 0.5 * c["c1"] + 2 * c["c2"]) < UNIT_TOL     # the coefficients act


def test_slice_concat_split(tmp_path):
    body = '''
layer { name: "slice" type: "Slice" bottom: "data" top: "a" top: "b" top: "c"
        slice_param { axis: 1 slice_point: 1 slice_point: 3 } }
layer { name: "halves" type: "Slice" bottom: "data" top: "top3" top: "rest" slice_param { axis: 2 slice_point: 3 } }
layer { name: "thirds" type: "Slice" bottom: "data" top: "w0" top: "w1" top: "w2" slice_param { axis: -1 } }
layer { name: "split" type: "Split" bottom: "c" top: "c1" top: "c2" }
layer { name: "cat" type: "Concat" bottom: "c1" bottom: "a" bottom: "b" top: "cat" }
layer { name: "cat_h" type: "Concat" bottom: "rest" bottom: "top3" top: "cat_h" concat_param { axis: 2 } }
layer { name: "cat_w" type: "Concat" bottom: "w2" bottom: "w0" bottom: "w1" top: "cat_w" concat_param { concat_dim: 3 } }
'''
    runs = check_unit(tmp_path, body)
    c = runs[0][0]
    assert c["c2"].shape == (1, 1, 7, 9) and c["cat"].shape == (1, 4, 7, 9) and c["cat_w"].shape == (1, 4, 7, 9)


def test_flatten_reshape_inner_product(tmp_path):
    body = '''
layer { name: "flat" type: "Flatten" bottom: "data" top: "flat" flatten_param { axis: 1 end_axis: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "flat" top: "ip"
        inner_product_param { num_output: 5 axis: 2 weight_filler { type: "gaussian" std: 0.3 }
                              bias_filler { type: "gaussian" std: 1 } } }
layer { name: "ipt" type: "InnerProduct" bottom: "data" top: "ipt"
        inner_product_param { num_output: 6 transpose: true weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "r1" type: "Reshape" bottom: "data" top: "r1" reshape_param { shape { dim: 0 dim: -1 dim: 3 } } }
layer { name: "r2" type: "Reshape" bottom: "data" top: "r2" reshape_param { shape { dim: 2 dim: -1 } axis: 1 num_axes: 1 } }
layer { name: "r3" type: "Reshape" bottom: "data" top: "r3" reshape_param { shape { dim: -1 dim: 252 } } }
layer { name: "r4" type: "Reshape" bottom: "data" top: "r4" reshape_param { shape { dim: 1 dim: 1 } axis: -1 num_axes: 0 } }
'''
    runs = check_unit(tmp_path, body, extra=["flat"])
    shapes = {k: v.shape for k, v in runs[1][0].items()}
    assert shapes == {"flat": (3, 28, 9), "ip": (3, 28, 5), "ipt": (3, 6), "r1": (3, 84, 3), "r2": (3, 2, 2, 7, 9),
                      "r3": (3, 252), "r4": (3, 4, 7, 9, 1, 1)}


@pytest.mark.parametrize("param", ["local_size: 5 alpha: 0.3 beta: 0.75 k: 2",
                                   "local_size: 3 alpha: 1.5 beta: 0.6",
                                   "local_size: 3 alpha: 0.7 beta: 0.75 norm_region: WITHIN_CHANNEL k: 3",
                                   "local_size: 5 alpha: 2 beta: 0.5 norm_region: WITHIN_CHANNEL"])
def test_lrn(param, tmp_path):
    runs = check_unit(tmp_path, f'layer {{ name: "norm" type: "LRN" bottom: "data" top: "norm" lrn_param {{ {param} }} }}')
    x = zoo.images((4, 7, 9), 1, seed=1).astype(np.float64)[0]
    n = int(param.split()[1])
    alpha, beta = float(param.split()[3]), float(param.split()[5])
    half = (n - 1) // 2
    if "WITHIN" in param:     # Caffe's composition: (1 + alpha * mean of an n x n zero-padded window)^-beta
        padded = np.pad(x ** 2, ((0, 0), (half, half), (half, half)))
        window = sum(padded[:, i:i + 7, j:j + 9] for i in range(n) for j in range(n)) / n ** 2
        expected = x * (1 + alpha * window) ** -beta
    else:                     # (k + alpha / n * sum over n channels)^-beta
        k = float(param.split()[7]) if " k: " in param else 1.0
        padded = np.pad(x ** 2, ((half, half), (0, 0), (0, 0)))
        window = sum(padded[i:i + 4] for i in range(n))
        expected = x * (k + alpha / n * window) ** -beta
    assert relative(runs[0][0]["norm"][0], expected) <= UNIT_TOL
    assert relative(runs[0][1]["norm"][0], expected) <= UNIT_TOL


@pytest.mark.parametrize("shared", ["false", "true"])
def test_prelu(shared, tmp_path):
    check_unit(tmp_path, f'layer {{ name: "prelu" type: "PReLU" bottom: "data" top: "prelu" '
                         f'prelu_param {{ channel_shared: {shared} filler {{ type: "uniform" min: -1 max: 1 }} }} }}')


def test_batch_norm_scale_factor(tmp_path):
    """BatchNorm's stored statistics are divided by blob 2; a zero factor zeroes them (x / sqrt(eps))."""
    body = '''
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" batch_norm_param { eps: 0.001 } }
layer { name: "bn0" type: "BatchNorm" bottom: "data" top: "bn0" }
layer { name: "bn_in_place" type: "BatchNorm" bottom: "data" top: "data2" }
layer { name: "bn_again" type: "BatchNorm" bottom: "data2" top: "data2" }
'''
    path = tmp_path / "unit.prototxt"
    path.write_text(net_text(body))
    net = zoo.random_net(path)          # calibrated statistics times a factor in U(5, 1000)
    net.params["bn0"][0].data[...] = 3.0
    net.params["bn0"][2].data[...] = 0.0
    factor = float(net.params["bn"][2].data[0])
    assert factor > 5
    net_param = pycaffe.read_prototxt(path)
    sess = session(onnx_export.to_onnx(net_param, zoo.params_of(net), (4, 7, 9)))
    x = zoo.images((4, 7, 9), 3)
    caffe_out = zoo.forward(net, x)
    onnx_out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"data": x})))
    mean = net.params["bn"][0].data / factor
    var = net.params["bn"][1].data / factor
    expected = (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + 0.001)
    for blob in ("bn", "bn0", "data2"):
        assert relative(onnx_out[blob], caffe_out[blob]) <= UNIT_TOL
    assert relative(caffe_out["bn"], expected) <= UNIT_TOL
    assert relative(caffe_out["bn0"], x / np.sqrt(1e-5)) <= UNIT_TOL


def test_scale_bias_softmax_activations_power(tmp_path):
    body = '''
layer { name: "scale" type: "Scale" bottom: "data" top: "scale" scale_param { axis: 2 num_axes: 2 bias_term: true
        filler { type: "uniform" min: -2 max: 2 } bias_filler { type: "uniform" min: -1 max: 1 } } }
layer { name: "scalar" type: "Scale" bottom: "data" top: "scalar"
        scale_param { num_axes: 0 filler { type: "constant" value: -1.5 } } }
layer { name: "bias" type: "Bias" bottom: "data" top: "bias"
        bias_param { axis: 1 num_axes: -1 filler { type: "uniform" min: -1 max: 1 } } }
layer { name: "sm" type: "Softmax" bottom: "data" top: "sm" }
layer { name: "sm3" type: "Softmax" bottom: "data" top: "sm3" softmax_param { axis: -1 } }
layer { name: "sig" type: "Sigmoid" bottom: "data" top: "sig" }
layer { name: "tanh" type: "TanH" bottom: "data" top: "tanh" }
layer { name: "abs_shift" type: "Power" bottom: "sig" top: "pow" power_param { power: 1.7 scale: 2 shift: 0.5 } }
layer { name: "square" type: "Power" bottom: "data" top: "square" power_param { power: 2 } }
layer { name: "affine" type: "Power" bottom: "data" top: "affine" power_param { scale: -3 shift: 1 } }
'''
    runs = check_unit(tmp_path, body)
    c = runs[0][0]
    assert relative(c["affine"], 1 - 3 * zoo.images((4, 7, 9), 1, seed=1)) < UNIT_TOL


def test_squeeze_excitation_scale(tmp_path):
    """Scale with a second bottom on axis 0: the per-image, per-channel gate of an SE block."""
    body = '''
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "gate" type: "Sigmoid" bottom: "fc" top: "fc" }
layer { name: "excite" type: "Scale" bottom: "data" bottom: "fc" top: "excite" scale_param { axis: 0 } }
layer { name: "shift" type: "Bias" bottom: "data" bottom: "fc" top: "shift" bias_param { axis: 0 } }
'''
    check_unit(tmp_path, body)


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_opsets(opset, tmp_path):
    """Pad, Split, pooling and Softmax read the same from opset 13 to 18 (Split's and Pad's inputs,
    pooling's attributes changed around them)."""
    body = '''
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 } }
layer { name: "slice" type: "Slice" bottom: "pool" top: "a" top: "b" }
layer { name: "sm" type: "Softmax" bottom: "a" top: "sm" }
'''
    check_unit(tmp_path, body, opset=opset)


# ---------------------------------------------------------------------------------------------
# what it refuses, in one line naming the layer

def layer(name, kind, param="", bottoms=("data",), tops=None):
    """One layer's prototxt text."""
    links = " ".join(f'bottom: "{b}"' for b in bottoms) + " " + " ".join(f'top: "{t}"' for t in (tops or [name]))
    return f'layer {{ name: "{name}" type: "{kind}" {links} {param} }}\n'


REFUSED = {
    "stochastic": (layer("pool", "Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 2 }"),
                   "layer 'pool' (Pooling): STOCHASTIC pooling cannot be written to ONNX"),
    "empty-window": (layer("pool", "Pooling", "pooling_param { pool: MAX kernel_size: 1 stride: 3 }"),
                     "layer 'pool' (Pooling): a last window that starts past the input"),
    "concat-batch": (layer("cat", "Concat", "concat_param { axis: 0 }", ("data", "data")),
                     "layer 'cat' (Concat): axis 0 (the batch axis) cannot be written to ONNX"),
    "reshape-batch": (layer("r", "Reshape", "reshape_param { shape { dim: 1 dim: -1 } }"),
                      "layer 'r' (Reshape): a shape [1, -1] that fixes or mixes the batch axis cannot be written"),
    "batch-stats": (layer("bn", "BatchNorm", "batch_norm_param { use_global_stats: false }"),
                    "layer 'bn' (BatchNorm): use_global_stats: false"),
    "two-inputs": (layer("label", "Input", "input_param { shape { dim: 1 } }", ()) +
                   layer("loss", "SoftmaxWithLoss", "", ("data", "label")),
                   "2 input blobs (data, label)"),
    "unknown": (layer("crop", "Crop", "", ("data", "data")),
                "layer 'crop' (Crop): this layer type cannot be written to ONNX; supported: BatchNorm, Bias,"),
    "argmax": (layer("acc", "ArgMax"), "layer 'acc' (ArgMax): this layer type cannot be written to ONNX"),
    "even-lrn": (layer("norm", "LRN", "lrn_param { local_size: 4 }"),
                 "layer 'norm' (LRN): an even local_size 4 cannot be written to ONNX"),
    "se-bias-term": (layer("p", "Pooling", "pooling_param { pool: AVE global_pooling: true }") +
                     layer("f", "Flatten", "", ("p",)) +
                     layer("s", "Scale", "scale_param { axis: 0 bias_term: true }", ("data", "f")),
                     "layer 's' (Scale): bias_term with a second bottom"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refusals_are_one_line(case, tmp_path):
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format
    body, message = REFUSED[case]
    net_param = text_format.Merge(net_text(body), caffe_pb2.NetParameter())
    with pytest.raises(InputError) as error:
        onnx_export.to_onnx(net_param, {}, (4, 7, 9))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_data_layer_says_deploy_form():
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format
    net_param = text_format.Merge(net_text(layer("sm", "SoftmaxWithLoss", "", ("data", "data"), ["l"])),
                                  caffe_pb2.NetParameter())
    with pytest.raises(InputError, match=r"^layer 'sm' \(SoftmaxWithLoss\): this layer type cannot be written to ONNX; "
                                         r"export the deploy form"):
        onnx_export.to_onnx(net_param, {}, (4, 7, 9))


def test_opset_below_13_and_wrong_weights():
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format
    net_param = text_format.Merge(net_text('layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                                           'convolution_param { num_output: 2 kernel_size: 3 } }'), caffe_pb2.NetParameter())
    with pytest.raises(InputError, match=r"^opset 11: export writes ONNX opsets 13 to \d+"):
        onnx_export.to_onnx(net_param, {}, (4, 7, 9), opset=11)
    with pytest.raises(InputError, match=r"^layer 'c' \(Convolution\): blob 0 has shape \(2, 3, 3, 3\), "
                                         r"expected \(2, 4, 3, 3\)"):
        onnx_export.to_onnx(net_param, {"c": [np.zeros((2, 3, 3, 3)), np.zeros(2)]}, (4, 7, 9))


def test_legacy_input_field_and_stated_shape(tmp_path):
    """A deploy prototxt of the older form (``input:`` with ``input_shape``) exports as the Input
    layer form does; without ``input_shape`` the exporter takes the prototxt's own shape."""
    path = tmp_path / "legacy.prototxt"
    path.write_text('name: "legacy"\ninput: "img"\ninput_shape { dim: 1 dim: 2 dim: 5 dim: 5 }\n'
                    'layer { name: "conv" type: "Convolution" bottom: "img" top: "conv" '
                    'convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "gaussian" std: 1 } } }\n'
                    'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }\n')
    net_param = pycaffe.read_prototxt(path)
    assert onnx_export.deploy_input(net_param) == ("img", (2, 5, 5))
    net = zoo.random_net(path)
    model = onnx_export.to_onnx(net_param, zoo.params_of(net), None)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [model.graph.input[0].name] + [d.dim_param or d.dim_value for d in dims] == ["img", "N", 2, 5, 5]
    x = zoo.images((2, 5, 5), 3)
    out = session(model).run(None, {"img": x})[0]
    assert relative(out, zoo.forward(net, x)["conv"]) <= UNIT_TOL

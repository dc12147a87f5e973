"""A Caffe deploy network as an ONNX graph that computes what Caffe's forward computes.

``to_onnx(net_param, params, input_shape)`` writes the graph with ``onnx.helper`` and
``onnx.numpy_helper`` (ONNX operator set 13 or later: from 13 on, Softmax normalises over one axis
as Caffe's does, and Split takes its sizes as an input), one converter per Caffe layer type
(``CONVERTERS``), each a few ONNX nodes whose result is Caffe's, not a near miss. Where Caffe's rules
are not ONNX's, the converter says so; the ones that needed care:

- **Pooling sizes.** Caffe rounds the pooled size up (``round_mode`` CEIL, its default) and, when
  there is padding, drops a last window that would start in the padding
  (caffe/src/caffe/layers/pooling_layer.cpp, Reshape). ONNX's ``ceil_mode`` is not specified
  closely enough to rely on (runtimes disagree on the dropped window), so the converter computes
  Caffe's size here and writes floor-mode pooling with the exact end padding that yields it.
- **Average pooling's divisor.** Caffe clips the window at H + pad for the divisor and at H for the
  sum: zero padding counts, the ceil extension beyond H + pad does not. Neither of ONNX's
  ``count_include_pad`` settings is that rule, so AVE is AveragePool with count_include_pad=0 (sum
  over the input / input elements) times a constant map of (input elements / Caffe's divisor),
  known at export from the sizes (``average_pool``). The other exact construction, a zero ``Pad``
  then AveragePool with end padding only and count_include_pad=0, is fused wrongly by ONNX
  Runtime's graph optimizer in some releases (0.8 relative error measured on 1.19.2), so it is
  not used.
- **In-place layers.** Caffe rewrites a blob in place (ReLU after Convolution, top == bottom); ONNX
  values are written once. Each rewritten blob's earlier versions get fresh names
  (``conv1/conv1_out`` for blob conv1 as layer conv1 wrote it) and its last version keeps the Caffe
  name, so every value named like a Caffe blob holds what ``net.blobs[name]`` holds after Caffe's
  forward, and the graph's input and outputs carry the user's blob names.
- **BatchNorm's scale factor.** Caffe stores mean and variance multiplied by a running factor
  (blob 2) and divides by it at test time, a zero factor making both zero
  (batch_norm_layer.cpp); the converter divides in float32 as Caffe does before writing
  BatchNormalization with unit scale and zero bias.
- **The batch stays symbolic** (``N``): every tensor's axis 0 is the batch, so a layer whose
  parameters reach across it (an axis-0 Concat or InnerProduct, a Reshape that fixes or moves
  the batch) is refused rather than written for one batch size.
- **LRN.** ACROSS_CHANNELS is ONNX's LRN (both divide alpha by local_size; Caffe's ``k`` is ONNX's
  ``bias``). WITHIN_CHANNEL is Caffe's own composition, x * (1 + alpha * avg(x^2))^-beta, with the
  average over a local_size^2 window zero-padded by (local_size - 1) / 2 and the padding counted;
  ``k`` plays no part (lrn_layer.cpp sets the shift to 1); the average is Caffe's (``average_pool``).

A layer type or parameter value with no exact ONNX form raises ``InputError`` in one line,
naming the layer.
"""
from __future__ import annotations

from caffe_prune import fsio, layers as rules
from caffe_prune.caffemodel import arrays_of as caffemodel_arrays
from caffe_prune.errors import InputError
from caffe_prune.onnx_layers import BATCH, CONVERTERS, Builder, Value, refuse
from caffe_prune.phases import layers_in_phase
from caffe_prune.pycaffe import load_net, read_prototxt

MIN_OPSET = 13
ONNX_PIP = "pip install 'onnx>=1.17'"


def _onnx():
    try:
        import onnx
        import onnx.helper
        import onnx.numpy_helper
    except ImportError:
        raise InputError(f"the ONNX package is not installed: {ONNX_PIP}") from None
    return onnx



def deploy_input(net_param) -> tuple[str, tuple | None]:
    """The deploy net's one input blob and its (C, H, W) as the prototxt states it (None when the
    prototxt gives no shape): an ``Input`` layer's top, or the legacy ``input:`` field."""
    names, shapes = list(net_param.input), [tuple(s.dim) for s in net_param.input_shape]
    if not shapes and net_param.input_dim:
        shapes = [tuple(net_param.input_dim[i:i + 4]) for i in range(0, len(net_param.input_dim), 4)]
    for layer in layers_in_phase(net_param, "test"):
        if rules.is_fed(layer):
            names += list(layer.top)
            shapes += [tuple(s.dim) for s in layer.input_param.shape] * (
                len(layer.top) if len(layer.input_param.shape) == 1 else 1)
    if len(names) != 1:
        raise InputError(f"net {net_param.name!r}: {len(names)} input blobs ({', '.join(names) or 'none'}); "
                          "export takes a deploy net with exactly one Input layer top")
    shape = shapes[0][1:] if shapes and len(shapes[0]) > 1 else None
    return names[0], shape


def net_outputs(net_param) -> list[str]:
    """The blobs no later layer consumes, sorted as Caffe's ``net.outputs`` are (it keeps the
    available blobs in a std::set): a blob read and rewritten in place stays available."""
    available = set(net_param.input)
    for layer in layers_in_phase(net_param, "test"):
        available -= set(layer.bottom)
        available |= set(layer.top)
    return sorted(available)


def _top_names(layers, input_name: str) -> dict:
    """The ONNX name of top j of layer i: a blob's last version keeps its Caffe name (the input's
    first version does: it is the graph input), earlier versions are ``blob/layer_out``."""
    last = {}
    for i, layer in enumerate(layers):
        for top in layer.top:
            last[top] = i
    names, taken = {}, {input_name}
    for i, layer in enumerate(layers):
        for j, top in enumerate(layer.top):
            if last[top] == i and top != input_name:
                names[i, j] = top
    taken |= set(names.values())
    for i, layer in enumerate(layers):
        for j, top in enumerate(layer.top):
            if (i, j) not in names:
                name, k = f"{top}/{layer.name}_out", 1
                while name in taken:
                    name, k = f"{top}/{layer.name}_out{k}", k + 1
                names[i, j] = name
                taken.add(name)
    return names


def to_onnx(net_param, params, input_shape=None, opset: int = MIN_OPSET, name: str | None = None,
            extra_outputs=()):
    """The ONNX ModelProto of a deploy ``net_param`` with ``params`` ({layer: [arrays]} as
    ``caffe.Net(...).params[layer][i].data``) for images of ``input_shape`` (C, H, W; None: the
    Input layer's), the batch symbolic. Graph outputs: Caffe's ``net.outputs``, then
    ``extra_outputs`` (any other blobs, e.g. the logits a Softmax reads), each the value Caffe's
    ``net.blobs[name]`` holds after a forward."""
    onnx = _onnx()
    from onnx import helper
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise InputError(f"opset {opset}: export writes ONNX opsets {MIN_OPSET} to "
                          f"{onnx.defs.onnx_opset_version()} (this onnx {onnx.__version__})")
    input_name, stated = deploy_input(net_param)
    shape = tuple(input_shape) if input_shape is not None else stated
    if shape is None or len(shape) < 1 or min(shape) < 1:
        raise InputError(f"net {net_param.name!r}: input shape {shape}; give (C, H, W)")
    layers = [l for l in layers_in_phase(net_param, "test") if not rules.is_fed(l)]
    builder = Builder()
    builder.reserve(input_name)
    tops = _top_names(layers, input_name)
    for onnx_name in tops.values():
        builder.reserve(onnx_name)
    values = {input_name: Value(input_name, (BATCH,) + shape)}
    for i, layer in enumerate(layers):
        convert = CONVERTERS.get(layer.type)
        if convert is None:
            hint = ("export the deploy form: one Input layer, no data, loss or accuracy layers"
                    if rules.rule(layer).kind in ("data", "head") else "supported: " + ", ".join(sorted(CONVERTERS)))
            raise refuse(layer, "this layer type", hint)
        missing = [bottom for bottom in layer.bottom if bottom not in values]
        if missing or not layer.top:
            raise InputError(f"layer {layer.name!r} ({layer.type}): "
                              + (f"bottom {missing[0]!r} is not produced by an earlier layer" if missing
                                 else "no top blob") + "; check the prototxt")
        builder.layer = layer
        outs = [tops[i, j] for j in range(len(layer.top))]
        results = convert(builder, layer, [values[bottom] for bottom in layer.bottom],
                          list(params.get(layer.name, [])), outs)
        for top, value in zip(layer.top, results):
            values[top] = value
    outputs = net_outputs(net_param)
    outputs += [blob for blob in extra_outputs if blob not in outputs]
    for blob in outputs:
        if blob not in values:
            raise InputError(f"net {net_param.name!r}: no blob {blob!r} to output")
    graph = helper.make_graph(
        builder.nodes, name or net_param.name or "caffe",
        [helper.make_tensor_value_info(input_name, onnx.TensorProto.FLOAT, values[input_name].shape)],
        [helper.make_tensor_value_info(values[b].name, onnx.TensorProto.FLOAT, values[b].shape) for b in outputs],
        builder.initializers)
    model = helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", opset)],
                                          producer_name="caffe-prune")
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        message = " ".join(str(e).split())[:300]
        raise InputError(f"net {net_param.name!r}: the ONNX graph written for it fails onnx.checker "
                          f"({message}); please report it") from None
    return model


def prototxt_to_onnx(prototxt, caffemodel, path, input_shape=None, opset: int = MIN_OPSET,
                     extra_outputs=()):
    """Write ``path`` (.onnx) for a deploy prototxt and its caffemodel, the weights read by Caffe."""
    net_param = read_prototxt(prototxt)
    net = load_net(prototxt, caffemodel)          # checked first: no Python layer runs, no file is written
    model = to_onnx(net_param, caffemodel_arrays(net), input_shape, opset, extra_outputs=extra_outputs)
    fsio.write_bytes(path, model.SerializeToString())
    return model

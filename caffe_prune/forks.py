"""The fork layers of public Caffe models, rewritten as stock Caffe layers that compute the same
function (``--fork-layers``; without it they are refused in one line: caffe_prune.pycaffe's
FORK_TYPES and FORK_FIELDS).

``read_prototxt(path)`` parses a prototxt with caffe.proto plus the two fork fields these models
carry (``ceil_mode`` in PoolingParameter; ``shuffle_channel_param { group }`` in LayerParameter, as
ShuffleNet's fork declares it); ``rewrite(net_param, input_shape, where)`` returns (a stock
NetParameter, notes). Each fork layer keeps its name and its top, so the layers after it read the
same blob and a fork's caffemodel loads by name (Caffe copies trained layers by name and blob
shapes, never by type); helper layers and blobs are named ``NAME/...``. Each replacement, and why it
is exact:

- ``ReLU6`` -> ``Clip`` (min 0, max 6), Caffe's max(0, min(6, x)), when this build has Clip (the
  project's BVLC master of 2018-08 has it; Caffe 1.0 has not); else ReLU, then min(r, 6) as
  -max(-r, -6): Power (scale -1), a constant Power (scale 0, shift -6), Eltwise MAX, Power (scale
  -1); a negation, a max and a constant are exact in floating point. Clip's backward reads its
  bottom, so in place it passes every gradient (measured: tests/test_forks.py); an in-place ReLU6
  becomes an out-of-place Clip, and the blob before it takes the name ``NAME/input`` in the layers
  above (the same function, renamed).
- ``ConvolutionDepthwise``, ``DepthwiseConvolution`` -> ``Convolution`` with ``group`` = its input
  channels: the forks' weights are (C, 1, kh, kw) with output c reading input c alone, which is
  stock grouped convolution's layout and arithmetic (a channel multiplier M: output o reads input
  o // M, as stock's).
- ``ShuffleChannel`` (group g) -> a ``Slice`` of the C input channels into single channels and a
  ``Concat`` of them in shuffled order (output j*g + i is input i*(C/g) + j: the fork's
  reshape (g, C/g) and transpose). Copies only; the channel graph follows Slice and Concat.
- ``Axpy`` (a (N, C, 1, 1), x, y: a*x + y, SE-ResNet's fork) -> ``Flatten`` of a to (N, C), a
  two-bottom ``Scale`` of x by it on axis 0 and an ``Eltwise`` SUM with y (two roundings where the
  fork's axpy may fuse one: within an ulp).
- Pooling ``ceil_mode: false`` -> ``round_mode: FLOOR`` when this build's PoolingParameter has it
  (the project's master of 2018-08 does: Caffe's own floor arithmetic); else the ceil-mode pooling
  cropped to the floor size (a ``Crop`` on axes 2 and 3 against a reference Pooling of kernel
  k + s - 1, whose ceil size is the floor size of k): floor mode's windows are ceil mode's first
  ones (the same start, clip and divisor), so MAX and AVE, padded or not, are exact.
  ``ceil_mode: true`` is stock's own rounding and is dropped.

The ShuffleChannel and depthwise rewrites need their inputs' channel counts: they are read from
Caffe's shapes of a provisional rewrite (depthwise as an ungrouped convolution, ShuffleChannel as
a shape-keeping stand-in), built once in its structure form (caffe_prune.netdef).
"""
from __future__ import annotations

from collections import defaultdict
from functools import lru_cache

from caffe_prune import netdef, pycaffe
from caffe_prune.errors import InputError

DEPTHWISE = ("ConvolutionDepthwise", "DepthwiseConvolution")
TYPES = ("ReLU6", *DEPTHWISE, "ShuffleChannel", "Axpy")      # the fork layer types rewritten here
FIELDS = ("ceil_mode", "shuffle_channel_param")               # the fork fields read here


@lru_cache(maxsize=None)
def schema():
    """The NetParameter class of caffe.proto plus the forks' fields, in a descriptor pool of its
    own: PoolingParameter.ceil_mode (bool, default true; number 1013, as synopsys-caffe numbers it:
    13, BVLC pull 3057's, is stock's round_mode) and LayerParameter.shuffle_channel_param
    (ShuffleChannelParameter { uint32 group = 1 [default 1] }, number 164 as ShuffleNet's fork).
    Text is parsed by field names, so the numbers only matter to binaries, which are not read here."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto()
    pycaffe.caffe_pb2().DESCRIPTOR.CopyToProto(proto)
    proto.name = "caffe_prune/forks.proto"
    messages = {m.name: m for m in proto.message_type}
    has = {(m.name, f.name) for m in proto.message_type for f in m.field}     # a fork's pycaffe has them
    if ("PoolingParameter", "ceil_mode") not in has:
        messages["PoolingParameter"].field.add(name="ceil_mode", number=1013, label=field.LABEL_OPTIONAL,
                                               type=field.TYPE_BOOL, default_value="true")
    if ("LayerParameter", "shuffle_channel_param") not in has:
        shuffle = proto.message_type.add(name="ShuffleChannelParameter")
        shuffle.field.add(name="group", number=1, label=field.LABEL_OPTIONAL, type=field.TYPE_UINT32,
                          default_value="1")
        messages["LayerParameter"].field.add(name="shuffle_channel_param", number=164, label=field.LABEL_OPTIONAL,
                                             type=field.TYPE_MESSAGE, type_name=".caffe.ShuffleChannelParameter")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("caffe.NetParameter"))


def read_prototxt(path):
    """A prototxt parsed with the forks' fields (errors as pycaffe.read_prototxt's: file and line);
    a V1 file goes through pycaffe.read_prototxt (Caffe's upgrade tool reads stock fields only)."""
    param = pycaffe.read_prototxt(path, schema()())
    return pycaffe.read_prototxt(path) if param.layers else param


def has_clip() -> bool:
    return "Clip" in pycaffe.caffe().layer_type_list()


def has_round_mode() -> bool:
    return "round_mode" in pycaffe.caffe_pb2().PoolingParameter.DESCRIPTOR.fields_by_name


def rewrite(net_param, input_shape=None, where: str | None = None, *, clip: bool | None = None,
            round_mode: bool | None = None) -> tuple:
    """(stock NetParameter, notes): ``net_param`` (of ``schema()``, or of caffe_pb2 where no fork
    field is set) with every fork layer and field replaced (see the module docstring); notes say
    what became what. ``input_shape`` (C, H, W) is needed only to count channels when the
    prototxt does not state it. ``clip``/``round_mode``: use Clip / round_mode (default: whether
    this build has them; False chooses the other stock construction)."""
    where = where or f"net {net_param.name!r}"
    stock, fields = _stock(net_param)
    choose = {"clip": has_clip() if clip is None else clip,
              "round_mode": has_round_mode() if round_mode is None else round_mode}
    channels = None
    if any(layer.type in DEPTHWISE or layer.type == "ShuffleChannel" for layer in stock.layer):
        provisional, _ = _replace(stock, fields, None, choose, where)
        form = netdef.structure_form(provisional, input_shape, where)
        channels = {blob: shape[1] for blob, shape in netdef.shapes(form, where)["blobs"].items() if len(shape) > 1}
    return _replace(stock, fields, channels, choose, where)


def _stock(net_param) -> tuple:
    """(the stock NetParameter, {layer index: {fork field: value}}): the fork fields read, then
    cleared, and the rest handed over field by field (the same numbers: one caffe.proto)."""
    fields = defaultdict(dict)
    if "shuffle_channel_param" in net_param.DESCRIPTOR.fields_by_name.get("layer").message_type.fields_by_name:
        copy = type(net_param)()
        copy.CopyFrom(net_param)
        for i, layer in enumerate(copy.layer):
            if layer.HasField("shuffle_channel_param"):
                fields[i]["group"] = int(layer.shuffle_channel_param.group)
                layer.ClearField("shuffle_channel_param")
            elif layer.type == "ShuffleChannel":
                fields[i]["group"] = 1        # the fork's default
            if layer.pooling_param.HasField("ceil_mode"):
                fields[i]["ceil_mode"] = bool(layer.pooling_param.ceil_mode)
                layer.pooling_param.ClearField("ceil_mode")
        net_param = copy
    stock = pycaffe.caffe_pb2().NetParameter()
    stock.ParseFromString(net_param.SerializeToString())
    return stock, fields


def _replace(stock, fields, channels, choose, where) -> tuple:
    """One pass over the layers: each fork layer replaced by its stock layers (``channels`` None:
    the provisional form, whose only use is Caffe's shapes)."""
    out = pycaffe.caffe_pb2().NetParameter()
    out.CopyFrom(stock)
    del out.layer[:]
    done = defaultdict(list)
    for i, layer in enumerate(stock.layer):
        if layer.type == "ReLU6":
            new, what = _relu6(out, layer, choose["clip"], where)
        elif layer.type in DEPTHWISE:
            new, what = _depthwise(layer, channels, where)
        elif layer.type == "ShuffleChannel":
            new, what = _shuffle(layer, fields.get(i, {}).get("group"), channels, where)
        elif layer.type == "Axpy":
            new, what = _axpy(out, layer, where)
        elif "ceil_mode" in fields.get(i, {}):
            new, what = _pooling(layer, fields[i]["ceil_mode"], choose["round_mode"], where)
        else:
            new, what = [layer], None
        out.layer.extend(new)
        if what:
            done[what].append(layer.name)
    notes = [f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
             for what, names in done.items()]
    return out, notes


def _copy(layer, type_: str):
    new = pycaffe.caffe_pb2().LayerParameter()
    new.CopyFrom(layer)
    new.type = type_
    return new


def _helper(layer, name: str, type_: str, bottoms, tops):
    """A layer the rewrite adds, in the phases the fork layer is in."""
    new = pycaffe.caffe_pb2().LayerParameter(name=name, type=type_, bottom=list(bottoms), top=list(tops))
    new.include.extend(layer.include)
    new.exclude.extend(layer.exclude)
    if layer.HasField("phase"):
        new.phase = layer.phase
    return new


def _renamed_before(out, blob: str, name: str) -> str:
    """Give ``blob`` the name ``name`` in every layer written so far (and the net's inputs), so that
    a replacement can read its last version and write ``blob`` out of place: the layers after it
    read the same name as before."""
    for layer in out.layer:
        layer.bottom[:] = [name if b == blob else b for b in layer.bottom]
        layer.top[:] = [name if t == blob else t for t in layer.top]
    out.input[:] = [name if b == blob else b for b in out.input]
    return name


def _relu6(out, layer, clip: bool, where: str) -> tuple:
    if len(layer.bottom) != 1 or len(layer.top) != 1:
        raise InputError(f"{where}: layer {layer.name!r} (ReLU6) needs one bottom and one top")
    if layer.relu_param.negative_slope:
        raise InputError(f"{where}: layer {layer.name!r} (ReLU6) has a negative_slope, which no ReLU6 fork computes")
    top = layer.top[0]
    x = _renamed_before(out, top, f"{layer.name}/input") if layer.bottom[0] == top else layer.bottom[0]
    if clip:
        new = _copy(layer, "Clip")
        new.ClearField("relu_param")
        new.bottom[:] = [x]
        new.clip_param.min, new.clip_param.max = 0.0, 6.0
        return [new], "ReLU6 as Clip (min 0, max 6)"
    name = layer.name
    relu = _copy(layer, "ReLU")
    relu.bottom[:], relu.top[:] = [x], [f"{name}/relu"]
    neg = _helper(layer, f"{name}/neg", "Power", [f"{name}/relu"], [f"{name}/neg"])
    neg.power_param.scale = -1.0
    six = _helper(layer, f"{name}/minus6", "Power", [f"{name}/relu"], [f"{name}/minus6"])
    six.power_param.scale, six.power_param.shift = 0.0, -6.0
    most = _helper(layer, f"{name}/max", "Eltwise", [f"{name}/neg", f"{name}/minus6"], [f"{name}/max"])
    most.eltwise_param.operation = most.eltwise_param.MAX
    back = _helper(layer, f"{name}/min6", "Power", [f"{name}/max"], [top])
    back.power_param.scale = -1.0
    return [relu, neg, six, most, back], "ReLU6 as ReLU and -max(-x, -6) (Power, Eltwise MAX)"


def _depthwise(layer, channels, where: str) -> tuple:
    new = _copy(layer, "Convolution")
    cp = new.convolution_param
    if channels is None:              # provisional: any group gives the same shapes
        cp.group = 1
        return [new], None
    c = channels.get(layer.bottom[0])
    if c is None:
        raise InputError(f"{where}: cannot tell the input channels of layer {layer.name!r} ({layer.type}) "
                         f"from its structure form")
    if cp.num_output % c:
        raise InputError(f"{where}: layer {layer.name!r} ({layer.type}) has num_output {cp.num_output} for {c} input "
                         f"channels; a depthwise convolution's outputs are a multiple of its inputs")
    cp.group = c
    return [new], f"{layer.type} as Convolution with group = its input channels"


def _shuffle(layer, group, channels, where: str) -> tuple:
    if group is None:
        raise InputError(f"{where}: layer {layer.name!r} (ShuffleChannel): its group is in shuffle_channel_param, a "
                         f"fork's field this definition does not carry (a caffemodel's?); give the prototxt")
    if len(layer.bottom) != 1 or len(layer.top) != 1:
        raise InputError(f"{where}: layer {layer.name!r} (ShuffleChannel) needs one bottom and one top")
    x, top, name = layer.bottom[0], layer.top[0], layer.name
    if channels is None:              # provisional: a stand-in that keeps the shape (the identity in TEST)
        return [_helper(layer, name, "Dropout", [x], [top])], None
    c = channels.get(x)
    if c is None or group < 1 or c % group:
        raise InputError(f"{where}: layer {layer.name!r} (ShuffleChannel): {c} input channels do not make "
                         f"{group} groups")
    per = c // group
    parts = [f"{name}/c{i}" for i in range(c)]
    split = _helper(layer, f"{name}/slice", "Slice", [x], parts)
    split.slice_param.axis = 1
    order = [parts[i * per + j] for j in range(per) for i in range(group)]
    join = _helper(layer, name, "Concat", order, [top])
    join.concat_param.axis = 1
    return [split, join], "ShuffleChannel as Slice into channels and Concat in shuffled order"


def _axpy(out, layer, where: str) -> tuple:
    if len(layer.bottom) != 3 or len(layer.top) != 1:
        raise InputError(f"{where}: layer {layer.name!r} (Axpy) needs three bottoms (a, x, y) and one top")
    name, top = layer.name, layer.top[0]
    bottoms = list(layer.bottom)
    if top in bottoms:                # the Eltwise writes the top: its last version is read by another name
        renamed = _renamed_before(out, top, f"{name}/input")
        bottoms = [renamed if b == top else b for b in bottoms]
    a, x, y = bottoms
    flat = _helper(layer, f"{name}/flat", "Flatten", [a], [f"{name}/flat"])
    scale = _helper(layer, f"{name}/scale", "Scale", [x, f"{name}/flat"], [f"{name}/scale"])
    scale.scale_param.axis = 0
    add = _helper(layer, name, "Eltwise", [f"{name}/scale", y], [top])
    add.eltwise_param.operation = add.eltwise_param.SUM
    return [flat, scale, add], "Axpy as Flatten, Scale by a second bottom and Eltwise SUM"


def _pooling(layer, ceil_mode: bool, round_mode: bool, where: str) -> tuple:
    pp = layer.pooling_param
    new = _copy(layer, layer.type)
    if ceil_mode or pp.global_pooling:
        return [new], "ceil_mode dropped (stock Caffe's own rounding)"
    if "round_mode" in pp.DESCRIPTOR.fields_by_name and pp.HasField("round_mode"):
        raise InputError(f"{where}: layer {layer.name!r} (Pooling) sets both ceil_mode and round_mode; keep one")
    if round_mode:
        new.pooling_param.round_mode = new.pooling_param.FLOOR
        return [new], "ceil_mode: false as round_mode: FLOOR"
    if len(layer.top) != 1:
        raise InputError(f"{where}: layer {layer.name!r} (Pooling) with ceil_mode: false and a mask top has no "
                         f"stock equivalent in this Caffe build (no round_mode)")
    name, top = layer.name, layer.top[0]
    new.top[:] = [f"{name}/ceil"]
    size = _helper(layer, f"{name}/floor_size", "Pooling", layer.bottom[:1], [f"{name}/floor_size"])
    size.pooling_param.CopyFrom(pp)
    kernel = (pp.kernel_h, pp.kernel_w) if pp.HasField("kernel_h") else (pp.kernel_size,) * 2
    stride = (pp.stride_h, pp.stride_w) if pp.HasField("stride_h") else (pp.stride,) * 2
    size.pooling_param.ClearField("kernel_size")
    size.pooling_param.kernel_h, size.pooling_param.kernel_w = (k + s - 1 for k, s in zip(kernel, stride))
    size.pooling_param.pool = size.pooling_param.MAX
    crop = _helper(layer, f"{name}/floor", "Crop", [f"{name}/ceil", f"{name}/floor_size"], [top])
    crop.crop_param.axis = 2
    return [new, size, crop], "ceil_mode: false as ceil-mode Pooling cropped to the floor size"

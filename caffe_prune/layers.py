"""One registry of per-layer rules: everything the toolkit asks about a Caffe layer *type*.

Every module that must know something about a layer type asks its rule here (``rule(type)``), so
that supporting a new type is one entry in this file (as Torch-Pruning keeps one pruner per op
type, owning both sides of a layer). A rule answers:

- ``kind``: how the channel graph (caffe_prune.graph) follows it: ``data`` (starts tensors),
  ``head`` (losses, accuracy, softmax: the channels reaching it are the classes), ``pass``
  (channel c in, channel c out; per-channel parameters *ride* on the channel), ``conv`` (consumes
  its input's channels and produces new ones), ``fc`` (consumes; its outputs are no longer
  channels), ``eltwise`` (ties channel c of every input), ``concat``, ``slice`` (offsets on the
  channel axis), ``flatten`` (keeps channels only when it flattens C, H, W in order), ``sink``.
  A type with no entry is a **barrier**: the channels reaching it are unprunable, never guessed;
  ``barrier(layer, axis)`` names the parameter settings that make a known type one (a Scale with
  a second bottom, a Concat on another axis, a Reduction over the channels, ...).
- the **slice geometry** (``producer_slices``, ``consumer_slices``, ``rider_slices``): which parts
  of which parameter blobs fall with an output channel, an input channel, a per-channel parameter.
  caffe_prune.graph turns a group into those ``Slice``s once (``group_slices``); masking zeroes
  them, export deletes them along their axis, the weight and MAC counts and held-zero training read
  them. A Convolution's weights are (out, in/group, kh, kw), a Deconvolution's (in, out/group, kh,
  kw): the same questions, the axes swapped, answered here alone.
- what it **costs**: ``learns`` (weights the channel graph cuts: Convolution, Deconvolution,
  InnerProduct), ``macs_per_weight`` (a convolution's weight is used once per output position, a
  deconvolution's once per input position, an InnerProduct's once);
- riders (``rider_blobs``: the parameter blobs holding one entry per channel, which export slices;
  ``zero_blobs``: those whose zero makes a pruned channel's output zero, zeroed by masking's
  zero-downstream semantics: papers/004's constant-map trap for BatchNorm and Scale);
- ``in_place``: Caffe computes the layer correctly with top == bottom. A Convolution, Pooling or
  InnerProduct run in place computes garbage without any error, so the engine refuses it;
- ``check(layer)``: what Caffe's layer setup CHECK-aborts on (one line, or None);
- data layers: the parameter message, ``source``, ``batch_size``, which reader reads the records
  (caffe_prune.data.caffe_reading: ``db``, ``list``, ``hdf5``) and whether ``transform_param`` applies;
- heads: ``role`` (``loss``, ``accuracy``, ``softmax``);
- ``hessian``: OBD's rule for the Hessian diagonal pass (caffe_prune.metrics.hessian):
  ``weighted`` (W∘W in Caffe's backward), ``diagonal`` (d²·h), ``routing`` (Caffe's backward as
  it is), ``pool`` (max: routing; average: divide by the window size first), ``loss`` (h seeded at
  the output; ``seeds`` which bottoms), or None with ``why`` saying why it has no diagonal rule;
  ``hessian_check(layer, bottoms)`` refuses parameter settings the rule does not cover.
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("data", "head", "pass", "conv", "fc", "eltwise", "concat", "slice", "flatten", "sink")
ROLES = ("producer", "consumer", "rider")


@dataclass(frozen=True)
class Slice:
    """The positions [start, stop) along ``axis`` of parameter blob ``blob`` of ``layer`` that fall
    with a channel; ``rows`` (a range of axis 0) restricts an axis-1 slice to one group's outputs
    (a grouped convolution's input slice), and ``zero`` says whether masking zeroes it (a rider
    whose zero would not silence the channel, BatchNorm's variance say, is only sliced on export).
    ``role``: producer (the channel's own filter and bias), consumer (what reads the channel),
    rider (a per-channel parameter of a layer it passes through)."""
    layer: str
    blob: int
    axis: int
    start: int
    stop: int
    role: str = "producer"
    rows: tuple | None = None
    zero: bool = True

    @property
    def index(self) -> tuple:
        """The numpy index of the slice in the blob's array."""
        span = slice(self.start, self.stop)
        if self.axis == 0:
            return (span,)
        return (slice(*self.rows) if self.rows else slice(None),) + (slice(None),) * (self.axis - 1) + (span,)

    @property
    def positions(self) -> range:
        return range(self.start, self.stop)


_NO_DIAGONAL = "its second derivative is not zero, so OBD's diagonal rule would need the gradient too"


@dataclass(frozen=True)
class Rule:
    kind: str
    riders: tuple = ()
    zeroes: tuple = ()
    in_place: bool = False
    hessian: str | None = None
    why: str = ""
    learns: bool = False

    def check(self, layer) -> str | None:
        """What Caffe's setup would CHECK-abort on for this layer's parameters (None: nothing)."""
        return None

    def barrier(self, layer, axis) -> str | None:
        """Why this layer, as parameterised, is a barrier to the channel graph (None: it is not).
        ``axis(value, blob)`` makes a Caffe axis parameter non-negative for a blob."""
        return None

    def rider_blobs(self, layer) -> tuple:
        """The per-channel parameter blobs of a layer instance (sliced by export)."""
        return self.riders

    def zero_blobs(self, layer) -> tuple:
        """Of ``rider_blobs(layer)``, those to zero so that a pruned channel's output is zero."""
        return tuple(b for b in self.zeroes if b in self.rider_blobs(layer))

    def rider_slices(self, name: str, blobs: tuple, zeroed: tuple, channel: int) -> list:
        return [Slice(name, blob, 0, channel, channel + 1, "rider", zero=blob in zeroed) for blob in blobs]

    def couples(self, layer) -> bool:
        """Whether the layer mixes neighbouring channels without parameters (across-channel LRN):
        removing a channel changes its neighbours' values, which export measures."""
        return False

    def hessian_check(self, layer, bottoms: int) -> str | None:
        """Why OBD's rule does not cover this layer as parameterised (None: it does); the text
        follows "layer NAME (TYPE) "."""
        return None

    def buffers(self, layer) -> int:
        """How many top-sized buffers the layer's TEST-phase forward keeps beside its top (Caffe's
        own: BatchNorm's x_norm_ and temp_, an in-place Scale's or PReLU's copy of its input, MAX
        pooling's indices, across-channel LRN's scale_); a net's memory per image counts them."""
        return 0


class Data(Rule):
    """A data layer: its parameter message, source, batch size and reader; ``fed``: its tops are
    filled by the caller (Input), not read by the layer."""

    def __init__(self, param: str | None = None, reader: str | None = None, transforms: bool = True,
                 fed: bool = False):
        super().__init__("data", hessian="routing")
        object.__setattr__(self, "param", param)
        object.__setattr__(self, "reader", reader)
        object.__setattr__(self, "transforms", transforms)
        object.__setattr__(self, "fed", fed)

    def parameters(self, layer):
        return getattr(layer, self.param) if self.param else None

    def source(self, layer) -> str:
        param = self.parameters(layer)
        return getattr(param, "source", "") if param is not None else ""

    def batch_size(self, layer) -> int:
        param = self.parameters(layer)
        return int(getattr(param, "batch_size", 0)) if param is not None else 0

    def check(self, layer):
        param = self.parameters(layer)
        if param is not None and hasattr(param, "batch_size") and param.batch_size < 1:
            return f"batch_size {param.batch_size} must be at least 1"
        return None


class Head(Rule):
    def __init__(self, role: str | None = None, hessian: str | None = None, why: str = "",
                 seeds: str = "first"):
        super().__init__("head", hessian=hessian, why=why or ("" if hessian else
                                                              "only SoftmaxWithLoss and EuclideanLoss seed h"))
        object.__setattr__(self, "role", role)
        object.__setattr__(self, "seeds", seeds)     # loss: h seeded at the first bottom, or at all


class Conv(Rule):
    """Convolution (weights out x in/group x kh x kw) and Deconvolution (``transposed``: in x
    out/group x kh x kw; Caffe's BaseConvolutionLayer with reverse_dimensions). ``info`` is the
    graph's caffe_prune.graph.ProducerInfo of the layer."""

    def __init__(self, transposed: bool = False):
        super().__init__("conv", hessian="weighted", learns=True)
        object.__setattr__(self, "transposed", transposed)

    def check(self, layer):
        cp = layer.convolution_param
        if cp.num_output < 1:
            return f"num_output {cp.num_output} must be at least 1"
        kernels = list(cp.kernel_size) + ([cp.kernel_h, cp.kernel_w] if cp.HasField("kernel_h") else [])
        if not kernels or min(kernels) < 1:
            return "kernel_size (or kernel_h and kernel_w) must be given and at least 1"
        if any(s < 1 for s in list(cp.stride) + ([cp.stride_h, cp.stride_w] if cp.HasField("stride_h") else [])):
            return "stride must be at least 1"
        if cp.group < 1 or cp.num_output % cp.group:
            return f"num_output {cp.num_output} is not a multiple of group {cp.group}"
        if any(d < 1 for d in cp.dilation):
            return "dilation must be at least 1"
        return None

    def barrier(self, layer, axis):
        if len(layer.bottom) != 1 or len(layer.top) != 1 or axis(layer.convolution_param.axis, layer.bottom[0]) != 1:
            return f"{'Deconvolution' if self.transposed else 'Convolution'} with several bottoms or not on axis 1"
        return None

    def weight_shape(self, info) -> tuple:
        """The weight blob's shape with the kernel's axes as one (what the counts need)."""
        per_in, per_out = info.in_channels // info.group, info.num_output // info.group
        return (info.in_channels, per_out, info.kernel_area) if self.transposed else \
            (info.num_output, per_in, info.kernel_area)

    def producer_slices(self, name, info, o) -> list:
        """Output channel o: its filter (a conv's row o; a deconv's column o % (out/g) within its
        group's input rows, or the group's whole input row when depthwise) and its bias."""
        per_in, per_out = info.in_channels // info.group, info.num_output // info.group
        g = o // per_out
        if not self.transposed:
            weight = Slice(name, 0, 0, o, o + 1)
        elif info.depthwise:      # the group's single input row goes with it
            weight = Slice(name, 0, 0, g, g + 1)
        else:
            weight = Slice(name, 0, 1, o % per_out, o % per_out + 1, rows=(g * per_in, (g + 1) * per_in))
        return [weight] + ([Slice(name, 1, 0, o, o + 1)] if info.bias else [])

    def consumer_slices(self, name, info, c) -> list:
        """Input channel c: a conv's column c % (in/g) within its group's output rows (a depthwise
        conv: the group's output rows, which fall with it); a deconv's input row c."""
        per_in, per_out = info.in_channels // info.group, info.num_output // info.group
        if self.transposed:
            return [Slice(name, 0, 0, c, c + 1, "consumer")]
        if info.depthwise:
            return [Slice(name, 0, 0, c * per_out, (c + 1) * per_out, "consumer")]
        g = c // per_in
        return [Slice(name, 0, 1, c % per_in, c % per_in + 1, "consumer", rows=(g * per_out, (g + 1) * per_out))]

    def macs_per_weight(self, bottom_shape, top_shape) -> int:
        """A convolution's weight multiplies once per output position; a deconvolution's once per
        input position."""
        spatial = (bottom_shape if self.transposed else top_shape)[2:]
        out = 1
        for d in spatial:
            out *= int(d)
        return out

    def resize(self, layer, blobs, info) -> None:
        """After export deleted slices from ``blobs``: the layer's num_output (and, for a
        depthwise layer, its group count, one group per input channel left)."""
        cp, w = layer.convolution_param, blobs[0]
        per_out = info.num_output // info.group
        if self.transposed:
            groups = w.shape[0] if info.depthwise else info.group
            cp.num_output = w.shape[1] * groups
        else:
            cp.num_output = w.shape[0]
            groups = w.shape[0] // per_out if info.depthwise else info.group
        cp.group = groups


class InnerProduct(Rule):
    """InnerProduct: weights out x (C·block) (``transpose``: (C·block) x out); ``info`` is the
    graph's caffe_prune.graph.FcInfo."""

    def __init__(self):
        super().__init__("fc", hessian="weighted", learns=True)

    def check(self, layer):
        if layer.inner_product_param.num_output < 1:
            return f"num_output {layer.inner_product_param.num_output} must be at least 1"
        return None

    def barrier(self, layer, axis):
        if axis(layer.inner_product_param.axis, layer.bottom[0]) != 1:
            return "InnerProduct on an axis other than channels"
        return None

    def weight_shape(self, info) -> tuple:
        size = info.block * (info.in_channels or 1)
        return (size, info.num_output) if info.transpose else (info.num_output, size)

    def consumer_slices(self, name, info, c) -> list:
        """Input channel c: its block of H·W columns (rows when transposed)."""
        return [Slice(name, 0, 0 if info.transpose else 1, c * info.block, (c + 1) * info.block, "consumer")]

    def macs_per_weight(self, bottom_shape, top_shape) -> int:
        return 1

    def resize(self, layer, blobs, info) -> None:
        pass


class Pass(Rule):
    def __init__(self, riders=(), zeroes=(), in_place=False, hessian=None, why=""):
        super().__init__("pass", riders, zeroes, in_place, hessian, why)


class ScaleBias(Pass):
    """Scale and Bias: riders on the channel axis; a second bottom (a factor from another blob) or
    another axis makes them a barrier; num_axes 0 (one scalar) rides on nothing."""

    def __init__(self, field: str, riders, zeroes):
        super().__init__(riders, zeroes, in_place=True, hessian="diagonal")
        object.__setattr__(self, "field", field)

    def barrier(self, layer, axis):
        param = getattr(layer, self.field)
        if len(layer.bottom) > 1 or axis(param.axis, layer.bottom[0]) != 1:
            return f"{layer.type} with a second bottom or on an axis other than channels"
        return None

    def rider_blobs(self, layer):
        param = getattr(layer, self.field)
        if param.num_axes == 0:
            return ()
        if self.field == "scale_param" and not param.bias_term:
            return (0,)
        return self.riders

    def hessian_check(self, layer, bottoms):
        if bottoms > 1:
            return f"takes its factor from a second bottom; only a learned {layer.type} is diagonal"
        return None

    def buffers(self, layer):
        return int(self.field == "scale_param" and list(layer.bottom[:1]) == list(layer.top[:1]))


class PReLU(Pass):
    def __init__(self):
        super().__init__(riders=(0,), in_place=True, why="PReLU has no OBD rule here")

    def rider_blobs(self, layer):
        return () if layer.prelu_param.channel_shared else self.riders

    def buffers(self, layer):
        return int(list(layer.bottom[:1]) == list(layer.top[:1]))


class BatchNorm(Pass):
    def __init__(self):
        super().__init__(riders=(0, 1), zeroes=(0,), in_place=True, hessian="diagonal")

    def buffers(self, layer):
        return 2

    def hessian_check(self, layer, bottoms):
        param = layer.batch_norm_param
        test_phase = layer.phase == 1       # caffe.proto Phase: TRAIN = 0, TEST = 1
        global_stats = param.use_global_stats if param.HasField("use_global_stats") else test_phase
        if not global_stats:
            return "normalizes with the mini-batch's statistics, which couples the batch; build the net in the " \
                   "TEST phase"
        return None


class Crop(Pass):
    def __init__(self):
        super().__init__(hessian="routing")

    def barrier(self, layer, axis):
        return "Crop of the channel axis" if axis(layer.crop_param.axis, layer.bottom[0]) < 2 else None


class Pooling(Pass):
    def __init__(self):
        super().__init__(hessian="pool")

    def check(self, layer):
        pp = layer.pooling_param
        if not pp.global_pooling:
            kernels = [pp.kernel_h, pp.kernel_w] if pp.HasField("kernel_h") else [pp.kernel_size]
            if min(kernels) < 1:
                return "kernel_size must be at least 1 (or global_pooling: true)"
        strides = [pp.stride_h, pp.stride_w] if pp.HasField("stride_h") else [pp.stride]
        return "stride must be at least 1" if min(strides) < 1 else None

    def hessian_check(self, layer, bottoms):
        # caffe.proto PoolingParameter.PoolMethod: MAX = 0, AVE = 1, STOCHASTIC = 2
        return None if layer.pooling_param.pool in (0, 1) else "pools by neither MAX nor AVE, the two with a rule"

    @staticmethod
    def averages(layer) -> bool:
        return layer.pooling_param.pool == 1

    def buffers(self, layer):
        return int(layer.pooling_param.pool == 0 and len(layer.top) == 1)


class LRN(Pass):
    def __init__(self):
        super().__init__(why="local response normalization couples neighbouring channels, so its Jacobian "
                             "is not diagonal")

    def check(self, layer):
        size = layer.lrn_param.local_size
        return f"local_size {size} must be odd" if size % 2 == 0 else None

    def couples(self, layer):
        return layer.lrn_param.norm_region == layer.lrn_param.ACROSS_CHANNELS

    def buffers(self, layer):
        # within a channel Caffe builds it from split, square, pooling, power and product layers
        return 1 if self.couples(layer) else 5


class Dropout(Pass):
    def __init__(self):
        super().__init__(in_place=True, hessian="diagonal")

    def check(self, layer):
        ratio = layer.dropout_param.dropout_ratio
        return f"dropout_ratio {ratio} must be in [0, 1)" if not 0 <= ratio < 1 else None


class Reduction(Pass):
    """Reduction over the tail axes from ``axis``: from axis 2 on, each channel to one value (a
    global pooling: a pruned channel's zeros stay zero); over the channels it mixes them."""

    def __init__(self):
        super().__init__(why="no OBD rule here for a reduction")

    def barrier(self, layer, axis):
        where = axis(layer.reduction_param.axis, layer.bottom[0])
        return None if where >= 2 else f"Reduction from axis {where} mixes the channels"


class MVN(Pass):
    """Mean-variance normalisation per channel (a zero map stays zero: (0 - 0) / (0 + eps));
    across channels it normalises the channels together."""

    def __init__(self):
        super().__init__(why="no OBD rule here for a normalisation")

    def barrier(self, layer, axis):
        return "MVN across channels normalises them together" if layer.mvn_param.across_channels else None


class OnChannels(Rule):
    """Concat and Slice: on the channel axis they offset channels (their ``kind``); on another axis
    they are a barrier. ``field`` is the parameter message, ``legacy`` its old axis field, read on
    the blob ``side`` names (Concat's axis is its top's, Slice's its bottom's)."""

    def __init__(self, kind: str, field: str, legacy: str, side: str):
        super().__init__(kind, hessian="routing")
        for name, value in (("field", field), ("legacy", legacy), ("side", side)):
            object.__setattr__(self, name, value)

    def barrier(self, layer, axis):
        param = getattr(layer, self.field)
        blob = getattr(layer, self.side)[0]
        where = getattr(param, self.legacy) if param.HasField(self.legacy) else axis(param.axis, blob)
        return None if where == 1 else f"{layer.type} on axis {where}, not channels"


_DATA_PARAMS = {"Data": ("data_param", "db"), "ImageData": ("image_data_param", "list"),
                "HDF5Data": ("hdf5_data_param", "hdf5"), "MemoryData": ("memory_data_param", None),
                "WindowData": ("window_data_param", None), "DummyData": ("dummy_data_param", None),
                "Input": ("input_param", None)}

RULES = {
    # data layers: where tensors start
    **{t: Data(param, reader, transforms=t != "HDF5Data", fed=t == "Input") for t, (param, reader) in _DATA_PARAMS.items()},
    # heads: their inputs are the classes
    **{t: Head() for t in ("ArgMax", "HingeLoss", "InfogainLoss", "MultinomialLogisticLoss",
                           "SigmoidCrossEntropyLoss", "ContrastiveLoss")},
    "Accuracy": Head("accuracy"),
    "SoftmaxWithLoss": Head("loss", hessian="loss"),
    "EuclideanLoss": Head("loss", hessian="loss", seeds="all"),
    "Softmax": Head("softmax", why="softmax couples the channels it normalizes, so its Jacobian is not diagonal"),
    # channel c in, channel c out
    "ReLU": Pass(in_place=True, hessian="diagonal"),
    "Dropout": Dropout(),
    "BatchNorm": BatchNorm(),
    "Scale": ScaleBias("scale_param", riders=(0, 1), zeroes=(0, 1)),
    "Bias": ScaleBias("bias_param", riders=(0,), zeroes=(0,)),
    "PReLU": PReLU(),
    "ELU": Pass(in_place=True, why=_NO_DIAGONAL),
    "Sigmoid": Pass(in_place=True, why=_NO_DIAGONAL),
    "TanH": Pass(in_place=True, why=_NO_DIAGONAL),
    "Swish": Pass(why=_NO_DIAGONAL),
    "Clip": Pass(in_place=True, why="Clip has no OBD rule here"),
    "Threshold": Pass(in_place=True, why="Threshold has no backward"),
    "Exp": Pass(in_place=True, why=_NO_DIAGONAL),
    "AbsVal": Pass(why="AbsVal has no OBD rule here"),
    "Power": Pass(why=_NO_DIAGONAL),
    "BNLL": Pass(why=_NO_DIAGONAL),
    "Log": Pass(why=_NO_DIAGONAL),
    "Pooling": Pooling(),
    "LRN": LRN(),
    "MVN": MVN(),
    "Reduction": Reduction(),
    "Split": Pass(hessian="routing"),
    "Crop": Crop(),
    # consumers and producers
    "Convolution": Conv(),
    "Deconvolution": Conv(transposed=True),
    "InnerProduct": InnerProduct(),
    # branches
    "Eltwise": Rule("eltwise", hessian="diagonal"),
    "Concat": OnChannels("concat", "concat_param", "concat_dim", "top"),
    "Slice": OnChannels("slice", "slice_param", "slice_dim", "bottom"),
    "Flatten": Rule("flatten", hessian="routing"),
    "Reshape": Rule("flatten", hessian="routing"),
    "Silence": Rule("sink"),
}

BARRIER = Rule("barrier", why="no rule for this layer type")


FC = next(r for r in RULES.values() if r.kind == "fc")      # the one rule of the fc kind


def rule(layer_type: str) -> Rule:
    """The rule of a layer type; a type with no entry is a barrier."""
    return RULES.get(layer_type, BARRIER)


def types(kind: str) -> frozenset:
    """Every layer type of one kind (e.g. all data layers)."""
    return frozenset(t for t, r in RULES.items() if r.kind == kind)


def type_reading(reader: str) -> str:
    """The data layer type whose records the reader ``db``, ``list`` or ``hdf5`` reads."""
    return next(t for t, r in RULES.items() if isinstance(r, Data) and r.reader == reader)


def role(layer_type: str) -> str | None:
    """A head's role (loss, accuracy, softmax), else None."""
    return getattr(rule(layer_type), "role", None)


def rider_blobs(layer) -> tuple:
    return rule(layer.type).rider_blobs(layer)


def zero_blobs(layer) -> tuple:
    return rule(layer.type).zero_blobs(layer)


def is_fed(layer) -> bool:
    """A layer whose tops the caller fills (an Input layer)."""
    return bool(getattr(rule(layer.type), "fed", False))


def reader(layer) -> str | None:
    """Which caffe_prune.data.caffe_reading reader reads the layer's records (db, list, hdf5), or None."""
    return getattr(rule(layer.type), "reader", None)


def transforms(layer) -> bool:
    """Whether the layer applies its transform_param (HDF5Data does not, and refuses one)."""
    return bool(getattr(rule(layer.type), "transforms", False))


def is_reader(layer) -> bool:
    """A data layer whose records caffe_prune.data.caffe_reading reads (Data, ImageData, HDF5Data)."""
    return getattr(rule(layer.type), "reader", None) is not None


def source(layer) -> str:
    """What a Data, ImageData or HDF5Data layer reads (its ``source``); "" for any other layer."""
    r = rule(layer.type)
    return r.source(layer) if isinstance(r, Data) and r.reader else ""


def batch_size(layer) -> int:
    """A data layer's batch_size (0 for a layer without one)."""
    r = rule(layer.type)
    return r.batch_size(layer) if isinstance(r, Data) else 0


DATA_TYPES = types("data")
HEAD_TYPES = types("head")
LOSS_TYPES = frozenset(t for t in HEAD_TYPES if t.endswith("Loss"))
LEARNED_TYPES = frozenset(t for t, r in RULES.items() if r.learns)

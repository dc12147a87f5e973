"""A layer rule: everything the toolkit asks about one Caffe layer type, in one object (see
caffe_prune.layers for the questions and the registry). ``Rule`` is the base every kind refines;
``Slice`` is the geometry a rule states for what falls with a channel."""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("data", "head", "pass", "conv", "fc", "eltwise", "concat", "slice", "flatten", "sink", "barrier")
ROLES = ("producer", "consumer", "rider")
# OBD's Hessian-diagonal strategies (caffe_prune.metrics.hessian implements each): W∘W in Caffe's
# backward, d²·h after it, Caffe's backward as it is, pooling (max routes, average divides by the
# window first), the loss (h seeded at the output)
HESSIAN = ("weighted", "diagonal", "routing", "pool", "loss")


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


NO_DIAGONAL = "its second derivative is not zero, so OBD's diagonal rule would need the gradient too"


@dataclass(frozen=True)
class Rule:
    """The base rule. ``kind`` names how the channel trace follows the layer (``trace``); a rule that
    does not refine ``trace`` is a barrier. ``riders``/``zeroes``: its per-channel parameter blobs
    (sliced on export / zeroed by zero-downstream masking); ``in_place``: Caffe computes it correctly
    with top == bottom; ``hessian``: one of HESSIAN, or None with ``why``; ``learns``: weights the
    channel graph cuts."""
    kind: str
    riders: tuple = ()
    zeroes: tuple = ()
    in_place: bool = False
    hessian: str | None = None
    why: str = ""
    learns: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"a layer rule's kind is one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.hessian is not None and self.hessian not in HESSIAN:
            raise ValueError(f"a layer rule's hessian is None or one of {', '.join(HESSIAN)}, not {self.hessian!r}")

    def trace(self, tracer, layer, bottoms) -> list:
        """How channels go through the layer: the tensors of its tops (caffe_prune.layers.units.Tensor)
        from those of its bottoms, recording ties, consumers, riders and barriers on ``tracer``
        (caffe_prune.channels.Tracer). The base rule is a barrier: nothing reaching it can be pruned."""
        if layer.type == "Python":
            name = f"Python:{layer.python_param.module}.{layer.python_param.layer}"
            why = (f"Python layer {name} has no channel rule (caffe_prune.layers.register({name!r}, rule) gives it "
                   f"one)")
        else:
            why = f"layer type {layer.type!r} is not one the channel graph follows"
        return tracer.barrier(layer, bottoms, why)

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

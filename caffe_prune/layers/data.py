"""Where tensors start (data layers: their source, batch size, reader) and where channels end
(heads: losses, accuracy, softmax, whose inputs are the classes)."""
from __future__ import annotations

from caffe_prune.layers.rule import Rule


class Data(Rule):
    """A data layer: its parameter message, source, batch size and reader; ``fed``: its tops are
    filled by the caller (Input), not read by the layer. Its tops carry no units."""

    def __init__(self, param: str | None = None, reader: str | None = None, transforms: bool = True,
                 fed: bool = False):
        super().__init__("data", hessian="routing")
        object.__setattr__(self, "param", param)
        object.__setattr__(self, "reader", reader)
        object.__setattr__(self, "transforms", transforms)
        object.__setattr__(self, "fed", fed)

    def trace(self, tracer, layer, bottoms):
        return tracer.fresh(layer)

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
    """A loss, an accuracy, a softmax: ``role`` (loss, accuracy, softmax), and for OBD which bottoms
    a loss seeds h at (``seeds``: the first, or all). Units reaching one with no InnerProduct in
    between are the classes, so they stay."""

    def __init__(self, role: str | None = None, hessian: str | None = None, why: str = "",
                 seeds: str = "first"):
        super().__init__("head", hessian=hessian, why=why or ("" if hessian else
                                                              "only SoftmaxWithLoss and EuclideanLoss seed h"))
        object.__setattr__(self, "role", role)
        object.__setattr__(self, "seeds", seeds)     # loss: h seeded at the first bottom, or at all

    def trace(self, tracer, layer, bottoms):
        tracer.pin([u for t in bottoms for s in t.channels for u in s],
                   f"reaches {layer.type} {layer.name!r} with no InnerProduct in between: its channels are the classes")
        return tracer.fresh(layer)

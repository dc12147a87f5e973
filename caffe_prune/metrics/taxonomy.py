"""The taxonomy of saliency metrics: input x pointwise x reduction x scaling, each a small function.

A metric's name is its composition, ``input/pointwise/reduction/scaling`` (the Taxonomy paper's four
components), e.g. ``activation/taylor/abs_sum/count``. For one output channel of a convolution:

1. **input**: which tensor and its gradient(s) the metric reads, per validation sample n:

   - ``activation``: the channel's feature map x (H x W) with g = dL/dx (and h = d²L/dx², OBD's
     diagonal from ``hessian.py``) of that sample's own loss. Which tensor x is exactly is the
     ``reading`` of ``collect`` (the authors' post-ReLU blob, or the convolution's own output).
   - ``weights``: the channel's filter W (C/group x kh x kw) with the per-sample weight gradient
     g_n = dL_n/dW and OBD's h_n = d²L_n/dW² (``inputs.conv_weight_gradients``).

2. **pointwise** f(x, g, h) on every element (``POINTWISE``):
   ``x``; ``g``; ``taylor`` -x·g (first-order change of L when x is set to 0); ``hess_sqgrad``
   ½(x·g)² (second-order term with the Hessian diagonal approximated by g²); ``hess_obd`` ½x²·h
   (with OBD's back-propagated diagonal); ``taylor2_sqgrad`` -x·g + ½(x·g)²; ``taylor2_obd``
   -x·g + ½x²·h; ``apoz`` 1[x > 0] (activations only; see ``apoz``).

3. **reduction** over one sample's elements (H x W of the map, or the filter's elements), then the
   mean over all samples (``REDUCTIONS``): ``sum`` Σs, ``l1`` Σ|s|, ``l2`` Σs², ``abs_sum`` |Σs|,
   ``sqr_sum`` (Σs)².

4. **scaling** across the layer (``SCALINGS``): ``none``; ``count`` (divide by the element count:
   H·W, or the filter's C/group·kh·kw); ``active_count`` (by the elements still present in the
   current pruning state: for weights the filter's active input channels x kernel area; for
   activations H·W, since pruning removes whole feature maps, never part of one; the authors'
   ``l0_normalisation_adjusted`` makes the same choice, so for activations it equals ``count``);
   ``l1_layer`` / ``l2_layer`` (divide by the L1 / L2 norm of the layer's saliencies over its
   channels still present; a zero norm leaves them as they are); ``weights_removed`` (divide by
   Θ_C, the weights removed with the channel's group in the current state, convolution plus
   InnerProduct: the Taxonomy paper's own proposal); ``macs_removed`` (divide by the
   multiply-accumulates per image the group's removal saves in the current state, as the compact
   network would compute them: a deployment variant of every composition, not in the papers).

Every combination is valid except ``apoz`` on weights: ``list_metrics()`` gives all 525 (8 x 5 x 7
for activations, 7 x 5 x 7 for weights), of which 450 are the Taxonomy paper's grid (its six
scalings, ``PAPER_SCALINGS``; ``list_metrics(paper=True)``). Some coincide numerically (a
non-negative pointwise makes ``l1`` and ``abs_sum`` equal ``sum``); they are kept so the grid is
regular, as in the paper.

**Domino** (the Domino paper): ``domino-AGG:BASE`` scores a channel by its whole group, everything
that falls with it: every tied channel's BASE saliency and, for weight inputs, also the consumers'
input slices (a consumer convolution's W[outputs of its group, i], an InnerProduct's block of
columns), aggregated by ``sum``, ``mean`` or ``max`` (``DOMINO``).

**The paper's five** (papers/004 §4.1, equations 1-5) are aliases (``ALIASES``) resolving to the
compositions the authors' release computes (``get_pruning_signals`` in their myopic-oracle
``utils.py``); ``AS_PRINTED`` gives each equation as printed, also usable by name (``eq1``..``eq5``).
Differences (none changes a ranking unless stated):

- ``mean_activations`` = ``activation/x/l1/count``: the authors average |a| over N·H·W. Eq. 2
  averages a itself (``eq2`` = ``activation/x/sum/count``); identical on post-ReLU maps (a >= 0),
  different where no ReLU follows (LeNet-5's convolutions, the ``conv-output`` reading).
- ``taylor`` = ``activation/taylor/l1/count``: the authors average |a·dL/da| element by element.
  Eq. 5 takes the absolute value of the sum (``eq5`` = ``activation/taylor/abs_sum/count``, per
  sample then averaged over samples, as Molchanov et al. define it). Ranking differs.
- ``fisher`` = ``activation/hess_sqgrad/sum/count``: the authors average ½(a·dL/da)² element by
  element. Eq. 4 squares the per-sample sum (``eq4`` = ``activation/taylor/sqr_sum/none``, Theis et
  al.'s per-sample squares averaged; its constant ½ is dropped). Ranking differs.
- ``mean_gradients`` = ``activation/g/l1/count``: the authors average |dL/da|. Eq. 3 takes the
  absolute value of the sum (``eq3`` = ``activation/g/abs_sum/count``). Ranking differs.
- ``mean_sq_weights`` = ``weights/x/l2/active_count``: the authors divide Σw² by the filter's
  *active* input channels x kernel area. Eq. 1 divides by card(W_i) (``eq1`` =
  ``weights/x/l2/count``, the filter as declared); the two agree until an input channel is pruned.
- Gradients here are per-sample (Caffe's diff x N, see ``collect``); the authors used Caffe's diff
  as it is (the batch mean's, 1/N of it), so their values are ours / N (Taylor, gradients) and / N²
  (Fisher): constant factors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from caffe_prune.errors import MetricError
from caffe_prune.metrics import plugins

INPUTS = ("activation", "weights")
DOMINO = ("sum", "mean", "max")
DOMINO_PREFIX = "domino-"


# ---- pointwise: f(x, g, h) on every element, per sample ------------------------------------------

def value(x, g, h):
    """x: the value itself (an activation, or a weight)."""
    return x


def gradient(x, g, h):
    """g: the per-sample gradient dL/dx."""
    return g


def taylor(x, g, h):
    """-x·g: the first-order change of the loss when x is set to 0."""
    return -x * g


def hess_sqgrad(x, g, h):
    """½(x·g)²: the second-order term ½x²·H with the Hessian diagonal approximated by g²."""
    return 0.5 * (x * g) ** 2


def hess_obd(x, g, h):
    """½x²·h with h OBD's back-propagated Hessian diagonal."""
    return 0.5 * x * x * h


def taylor2_sqgrad(x, g, h):
    """-x·g + ½(x·g)²: second-order Taylor, Hessian diagonal approximated by g²."""
    xg = x * g
    return -xg + 0.5 * xg * xg


def taylor2_obd(x, g, h):
    """-x·g + ½x²·h: second-order Taylor with OBD's Hessian diagonal."""
    return -x * g + 0.5 * x * x * h


def apoz(x, g, h):
    """1[x > 0]: with ``sum`` and ``count`` this is 1 - APoZ (Hu et al.'s average percentage of
    zeros), the fraction of positive outputs, as the authors computed it (``data > 0``), so that a
    low value means prunable like every other metric. 1[x > 0] of a convolution's own output is
    1[after ReLU != 0] when a ReLU follows directly, so both readings count the same zeros there."""
    return (x > 0).astype(np.float64)


class Pointwise(NamedTuple):
    fn: Callable
    needs: frozenset          # which of x, g, h it reads
    inputs: tuple             # the inputs it is defined for


POINTWISE = {
    "x": Pointwise(value, frozenset("x"), INPUTS),
    "g": Pointwise(gradient, frozenset("g"), INPUTS),
    "taylor": Pointwise(taylor, frozenset("xg"), INPUTS),
    "hess_sqgrad": Pointwise(hess_sqgrad, frozenset("xg"), INPUTS),
    "hess_obd": Pointwise(hess_obd, frozenset("xh"), INPUTS),
    "taylor2_sqgrad": Pointwise(taylor2_sqgrad, frozenset("xg"), INPUTS),
    "taylor2_obd": Pointwise(taylor2_obd, frozenset("xgh"), INPUTS),
    "apoz": Pointwise(apoz, frozenset("x"), ("activation",)),
}


# ---- reduction over one sample's elements (axes), giving one value per sample and item ------------

def sum_(s, axes):
    """Σs"""
    return s.sum(axis=axes)


def l1(s, axes):
    """Σ|s|"""
    return np.abs(s).sum(axis=axes)


def l2(s, axes):
    """Σs² (the squared L2 norm, as the taxonomy's l2_norm)"""
    return np.square(s).sum(axis=axes)


def abs_sum(s, axes):
    """|Σs|"""
    return np.abs(s.sum(axis=axes))


def sqr_sum(s, axes):
    """(Σs)²"""
    return np.square(s.sum(axis=axes))


REDUCTIONS = {"sum": sum_, "l1": l1, "l2": l2, "abs_sum": abs_sum, "sqr_sum": sqr_sum}


# ---- scaling across a layer's items (channels or input slices) ------------------------------------

class Layer(NamedTuple):
    """What a scaling may divide by, one entry per item of one layer (numpy arrays): ``count``
    elements per item, ``active_count`` elements still present, ``present`` (bool) whether the item
    is still in the net, ``removed`` Θ_C of the item's group and ``macs`` the MACs its removal saves
    (NaN for an unprunable item, and where the scaling does not read them)."""
    count: np.ndarray
    active_count: np.ndarray
    present: np.ndarray
    removed: np.ndarray
    macs: np.ndarray


def none(values, layer: Layer):
    return values


def count(values, layer: Layer):
    return values / layer.count


def active_count(values, layer: Layer):
    return values / np.maximum(layer.active_count, 1)


def l1_layer(values, layer: Layer):
    norm = np.abs(values[layer.present]).sum()
    return values / norm if norm > 0 else values


def l2_layer(values, layer: Layer):
    # the L2 norm itself; the authors' taxonomy scripts divided by its square in one version
    norm = np.sqrt(np.square(values[layer.present]).sum())
    return values / norm if norm > 0 else values


def weights_removed(values, layer: Layer):
    return values / layer.removed


def macs_removed(values, layer: Layer):
    return values / layer.macs


SCALINGS = {"none": none, "count": count, "active_count": active_count, "l1_layer": l1_layer,
            "l2_layer": l2_layer, "weights_removed": weights_removed, "macs_removed": macs_removed}
PAPER_SCALINGS = ("none", "count", "active_count", "l1_layer", "l2_layer", "weights_removed")


# ---- names ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    """One composition, optionally as a Domino variant (``domino`` the aggregation)."""
    input: str
    pointwise: str
    reduction: str
    scaling: str
    domino: str | None = None

    @property
    def base(self) -> "Metric":
        return Metric(self.input, self.pointwise, self.reduction, self.scaling)

    @property
    def key(self) -> tuple:
        """What ``collect`` gathers per sample: (input, pointwise, reduction)."""
        return self.input, self.pointwise, self.reduction

    @property
    def plugin(self):
        """The plugin (caffe_prune.metrics.plugins) whose ``reduce`` is this metric's pointwise and
        reduction, or None for a built-in composition."""
        return plugins.get(plugins.split(self.pointwise)[0]) if self.pointwise.startswith(plugins.PREFIX) else None

    @property
    def needs(self) -> frozenset:
        plugin = self.plugin
        return plugin.needs if plugin else POINTWISE[self.pointwise].needs

    def over_samples(self, values: np.ndarray, where: str) -> np.ndarray:
        """(samples x items) -> one value per item: the mean (a plugin may combine otherwise)."""
        plugin = self.plugin
        return plugin.over_samples(values, where) if plugin else values.mean(axis=0)

    def scale(self, values: np.ndarray, layer: "Layer", where: str) -> np.ndarray:
        """The scaling across one layer's items (a plugin's own ``scale`` for scaling ``plugin``)."""
        if self.scaling == PLUGIN_SCALING:
            return self.plugin.scaled(values, layer, where)
        return SCALINGS[self.scaling](values, layer)

    @property
    def static(self) -> bool:
        """Reads only the weights: no forward or backward pass needed."""
        return self.input == "weights" and self.needs == {"x"}

    def __str__(self):
        if self.pointwise.startswith(plugins.PREFIX):
            name = self.pointwise if self.scaling == PLUGIN_SCALING else f"{self.pointwise}/{self.scaling}"
        else:
            name = f"{self.input}/{self.pointwise}/{self.reduction}/{self.scaling}"
        return f"{DOMINO_PREFIX}{self.domino}:{name}" if self.domino else name


PLUGIN_SCALING = "plugin"        # a plugin metric's own scale(values, layer)


# papers/004's five constituents, as the authors' release computes them (see the module docstring)
ALIASES = {
    "mean_activations": "activation/x/l1/count",
    "taylor": "activation/taylor/l1/count",
    "fisher": "activation/hess_sqgrad/sum/count",
    "mean_gradients": "activation/g/l1/count",
    "mean_sq_weights": "weights/x/l2/active_count",
}
# ... and equations 1-5 as printed
AS_PRINTED = {
    "mean_sq_weights": ("eq1", "weights/x/l2/count"),
    "mean_activations": ("eq2", "activation/x/sum/count"),
    "mean_gradients": ("eq3", "activation/g/abs_sum/count"),
    "fisher": ("eq4", "activation/taylor/sqr_sum/none"),
    "taylor": ("eq5", "activation/taylor/abs_sum/count"),
}
EQUATIONS = dict(AS_PRINTED.values())
# papers/004's five in the paper's order, in three forms (``reproduce oracle --forms``): as the
# authors' code computes them; as equations 1-5 are printed; and the one that reproduces Table 2
# (measured on CIFAR-10: the code's forms, except Fisher, whose Table-2 column is equation 4's as
# printed, the per-sample squared sum; README, Faithfulness)
PAPER_FORMS = {"code": tuple(ALIASES), "printed": tuple(AS_PRINTED[alias][0] for alias in ALIASES),
               "table2": tuple(AS_PRINTED[a][0] if a == "fisher" else a for a in ALIASES)}


def _valid(what, value, choices, name):
    if value not in choices:
        raise MetricError(f"invalid {what} {value!r} in {name!r}; valid: {', '.join(choices)}")


def parse(name: str) -> Metric:
    """A metric name (composition, alias, ``eqN``, or ``domino-AGG:`` any of those) -> Metric.
    Raises MetricError with one line naming the bad component and listing its valid names."""
    if not isinstance(name, str):
        raise MetricError(f"a metric name is a string, not {type(name).__name__}")
    domino, base = None, name.strip()
    if base.startswith(DOMINO_PREFIX):
        head, sep, base = base[len(DOMINO_PREFIX):].partition(":")
        if not sep:
            raise MetricError(f"{name!r}: a Domino metric is domino-AGG:BASE; AGG is one of {', '.join(DOMINO)}")
        _valid("Domino aggregation", head, DOMINO, name)
        domino = head
    base = ALIASES.get(base) or EQUATIONS.get(base) or base
    if base.startswith(plugins.PREFIX):
        return _plugin_metric(name, base, domino)
    parts = base.split("/")
    if len(parts) != 4:
        raise MetricError(f"{name!r} is neither input/pointwise/reduction/scaling nor an alias; aliases: "
                          f"{', '.join(list(ALIASES) + list(EQUATIONS))}")
    inp, pw, red, sc = parts
    _valid("input", inp, INPUTS, name)
    _valid(f"pointwise for {inp}", pw, [p for p, spec in POINTWISE.items() if inp in spec.inputs], name)
    _valid("reduction", red, list(REDUCTIONS), name)
    _valid("scaling", sc, list(SCALINGS), name)
    return Metric(inp, pw, red, sc, domino)


def _plugin_metric(name: str, base: str, domino) -> Metric:
    """``plugin:NAME`` (its own scaling: SCALING, or scale()) or ``plugin:NAME/SCALING``."""
    plugin_name, scaling = plugins.split(base)
    plugin = plugins.get(plugin_name)
    if plugin.input not in INPUTS:
        raise MetricError(f"{plugin}: INPUT must be one of {', '.join(INPUTS)}, got {plugin.input!r}")
    if scaling is not None:
        _valid("scaling", scaling, list(SCALINGS), name)
    elif plugin.scale is None:
        if plugin.scaling not in SCALINGS:
            raise MetricError(f"{plugin}: SCALING must be one of {', '.join(SCALINGS)}, got {plugin.scaling!r}")
        scaling = plugin.scaling
    return Metric(plugin.input, f"{plugins.PREFIX}{plugin_name}", "plugin", scaling or PLUGIN_SCALING, domino)


def components(name: str | None) -> dict | None:
    """The components of a metric name (aliases resolved), None when it does not parse. A plugin
    metric's are read from its name alone (its file need not be loaded): pointwise ``plugin:NAME``,
    its scaling (None for the plugin's own), no input or reduction."""
    if not name:
        return None
    head, _, rest = name.partition(":")
    domino, base = (head[len(DOMINO_PREFIX):], rest) if head.startswith(DOMINO_PREFIX) and rest else (None, name)
    if base.startswith(plugins.PREFIX):
        plugin_name, scaling = plugins.split(base)
        return {"input": None, "pointwise": plugins.PREFIX + plugin_name, "reduction": None, "scaling": scaling,
                "domino": domino}
    try:
        m = parse(name)
    except MetricError:
        return None
    return {"input": m.input, "pointwise": m.pointwise, "reduction": m.reduction, "scaling": m.scaling,
            "domino": m.domino}


def list_metrics(domino: bool = False, paper: bool = False) -> list:
    """Every valid composition (525; with ``paper`` the Taxonomy paper's grid of 450, its six
    scalings), and with ``domino`` also every Domino variant of each."""
    scalings = PAPER_SCALINGS if paper else tuple(SCALINGS)
    names = [f"{inp}/{pw}/{red}/{sc}" for inp in INPUTS for pw, spec in POINTWISE.items() if inp in spec.inputs
             for red in REDUCTIONS for sc in scalings]
    if domino:
        names += [f"{DOMINO_PREFIX}{agg}:{n}" for agg in DOMINO for n in names]
    return names

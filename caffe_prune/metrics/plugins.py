"""Plugin metrics: a researcher's own saliency metric, in a Python file, run as the built-in ones.

A plugin is a Python file (``--plugin FILE`` on every command, ``plugins = [...]`` in a sweep's
SPEC) defining, at module level:

- ``INPUT``: ``"activation"`` (a convolution's feature maps, as ``collect`` reads them) or
  ``"weights"`` (its filters);
- ``NEEDS``: which of ``x`` (the values), ``g`` (per-sample gradients dL/dx) and ``h`` (OBD's
  Hessian diagonal) it reads, e.g. ``"xg"``; what it does not need is not computed (None);
- ``reduce(x, g, h, axes)``: per-sample values -> one number per sample and item, reducing over
  ``axes``: feature maps (N, C, H, W) over (2, 3); filters (N, O, C/group, kh, kw) over (2, 3, 4);
  for Domino on weights also each consumer's input slice. It takes the place of the taxonomy's
  pointwise and reduction components, so the same collection (one forward and one backward per
  validation batch, the fast engine's workers), scaling and Domino aggregation run around it;
- optionally ``combine(values)``: (samples, items) -> (items,), the value over all validation
  samples (default: the mean, as every built-in composition);
- optionally ``SCALING``: the built-in scaling it uses by default (``none`` unless given), or a
  function ``scale(values, layer)`` of its own, with ``layer`` the taxonomy's ``Layer`` (element
  counts, what is present, Θ_C and MACs of each item's group);
- optionally ``NAME`` (default: the file's name without ``.py``).

It is used as ``plugin:NAME`` (its own scaling) or ``plugin:NAME/SCALING`` (a built-in scaling),
alone, as an oracle constituent, or as ``domino-AGG:plugin:NAME``. A run records each plugin's path
(``Config.plugins``) and its source's sha256 (the run's identity): a changed plugin is refused on
resume as changed weights are. A sweep copies each plugin once per content into its directory
(``plugins/SHA256/FILE``), where local and Ray workers import it.

A plugin file may also (or only) define ``LAYER_RULES``: {layer type: caffe_prune.layers Rule}, the
channel rules of layer types the registry does not know (a fork's layer, ``"Python:module.Layer"``
for a Python layer), registered when the file is loaded (caffe_prune.layers.register); a file of
rules only registers them and is no metric.

Errors are one line naming the plugin (``PluginError``): a missing file, an import that raises, a
missing ``reduce`` (in a file without LAYER_RULES), rules that are not Rules, and values of the
wrong shape or not finite.
"""
from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from caffe_prune.errors import PluginError

PREFIX = "plugin:"
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
NEEDS = "xgh"

_LOADED: dict = {}        # name -> Plugin, in this process


@dataclass(frozen=True)
class Plugin:
    """One loaded plugin file."""
    name: str
    path: str
    sha256: str
    input: str
    needs: frozenset
    reduce: Callable
    combine: Callable | None
    scaling: str | None          # the built-in scaling of plain ``plugin:NAME`` (None: ``scale``)
    scale: Callable | None

    def __str__(self):
        return f"plugin {self.name} ({self.path})"

    def values(self, x, g, h, axes, where: str) -> np.ndarray:
        """``reduce`` on one batch, checked: one finite value per sample and item."""
        try:
            out = self.reduce(x, g, h, axes)
        except Exception as exc:
            raise PluginError(f"{self}: reduce raised {type(exc).__name__}: {exc} on {where}") from None
        out = np.asarray(out, dtype=np.float64)
        expected = tuple(n for i, n in enumerate(np.shape(x)) if i not in axes)
        if out.shape != expected:
            raise PluginError(f"{self}: reduce returned shape {out.shape} on {where}; expected {expected}, "
                              f"one value per sample and item (x {tuple(np.shape(x))} reduced over axes {axes})")
        if not np.all(np.isfinite(out)):
            raise PluginError(f"{self}: reduce returned NaN or infinite values on {where}")
        return out

    def over_samples(self, values: np.ndarray, where: str) -> np.ndarray:
        """The value over all samples: ``combine`` (checked) or the mean."""
        if self.combine is None:
            return values.mean(axis=0)
        try:
            out = np.asarray(self.combine(values), dtype=np.float64)
        except Exception as exc:
            raise PluginError(f"{self}: combine raised {type(exc).__name__}: {exc} on {where}") from None
        if out.shape != values.shape[1:]:
            raise PluginError(f"{self}: combine returned shape {out.shape} on {where}; expected {values.shape[1:]}, "
                              f"one value per item")
        if not np.all(np.isfinite(out)):
            raise PluginError(f"{self}: combine returned NaN or infinite values on {where}")
        return out

    def scaled(self, values: np.ndarray, layer, where: str) -> np.ndarray:
        """The plugin's own ``scale``, checked for shape (NaN stays allowed: unprunable items)."""
        try:
            out = np.asarray(self.scale(values, layer), dtype=np.float64)
        except Exception as exc:
            raise PluginError(f"{self}: scale raised {type(exc).__name__}: {exc} on {where}") from None
        if out.shape != values.shape:
            raise PluginError(f"{self}: scale returned shape {out.shape} on {where}; expected {values.shape}")
        return out


def load(path, replace: bool = False) -> Plugin | None:
    """Import a plugin file, register its LAYER_RULES, and register its metric under its name (None
    for a file of layer rules only). The same file with the same contents is imported once; another
    file (or new contents) under a loaded name is refused unless ``replace`` (a run's own plugins,
    which a worker process loads run after run)."""
    location = Path(path).expanduser()
    if not location.is_file():
        raise PluginError(f"plugin {path}: no such file; --plugin takes a Python file defining INPUT, NEEDS "
                          f"and reduce(x, g, h, axes) (README, Your own saliency metric)")
    location = location.resolve()
    source = location.read_bytes()
    sha = hashlib.sha256(source).hexdigest()
    for plugin in _LOADED.values():
        if plugin.path == str(location) and plugin.sha256 == sha:
            return plugin
    module_name = f"caffe_prune_plugin_{sha[:16]}"
    spec = importlib.util.spec_from_file_location(module_name, location)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise PluginError(f"plugin {location}: importing it raised {type(exc).__name__}: {exc}") from None
    sys.modules[module_name] = module
    rules = getattr(module, "LAYER_RULES", None)
    if rules is not None:
        _register_rules(rules, location)
        if getattr(module, "reduce", None) is None:
            return None
    plugin = _plugin(module, location, sha)
    known = _LOADED.get(plugin.name)
    if known is not None and known.sha256 != sha and not replace:
        raise PluginError(f"plugin {plugin.name}: loaded from {known.path} and from {location} with other "
                          f"contents; give each plugin its own NAME")
    _LOADED[plugin.name] = plugin
    return plugin


def _register_rules(rules, location: Path) -> None:
    from caffe_prune import layers
    if not isinstance(rules, dict) or not all(isinstance(k, str) and isinstance(v, layers.Rule) for k, v in rules.items()):
        raise PluginError(f"plugin {location}: LAYER_RULES must map layer types to caffe_prune.layers rules, e.g. "
                          f"{{\"Python:mylayers.Identity\": layers.Pass()}}")
    for layer_type, rule in rules.items():
        layers.register(layer_type, rule)


def _plugin(module, location: Path, sha: str) -> Plugin:
    where = f"plugin {location}"
    name = getattr(module, "NAME", location.stem)
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise PluginError(f"{where}: NAME {name!r} is not a name (letters, digits, _ . -; not starting with a digit)")
    reduce = getattr(module, "reduce", None)
    if not callable(reduce):
        raise PluginError(f"{where}: defines no function reduce(x, g, h, axes)")
    needs = getattr(module, "NEEDS", None)
    if not isinstance(needs, str) or not needs or set(needs) - set(NEEDS):
        raise PluginError(f"{where}: NEEDS must be a string of x, g and/or h (what reduce reads), got {needs!r}")
    combine, scale = getattr(module, "combine", None), getattr(module, "scale", None)
    for fn, what in ((combine, "combine(values)"), (scale, "scale(values, layer)")):
        if fn is not None and not callable(fn):
            raise PluginError(f"{where}: {what.split('(')[0]} must be a function {what}")
    scaling = getattr(module, "SCALING", None if scale else "none")
    if scale is not None and scaling is not None:
        raise PluginError(f"{where}: define SCALING or scale(values, layer), not both")
    return Plugin(name, str(location), sha, getattr(module, "INPUT", None), frozenset(needs), reduce, combine,
                  scaling, scale)


def get(name: str) -> Plugin:
    try:
        return _LOADED[name]
    except KeyError:
        loaded = ", ".join(sorted(_LOADED)) or "none"
        raise PluginError(f"{PREFIX}{name}: no plugin of that name is loaded (loaded: {loaded}); give its file "
                          f"with --plugin FILE (a sweep: plugins = [\"FILE\"])") from None


def loaded() -> dict:
    """{name: Plugin} loaded in this process."""
    return dict(_LOADED)


def split(name: str) -> tuple:
    """``plugin:NAME[/SCALING]`` (no Domino prefix) -> (NAME, SCALING or None)."""
    name, _, scaling = name[len(PREFIX):].partition("/")
    return name, scaling or None


def names_in(metrics) -> list:
    """The plugin names the metric names use (Domino prefixes stripped), each once, in order."""
    out = []
    for metric in metrics or ():
        base = metric.split(":", 1)[1] if metric.startswith("domino-") and ":" in metric else metric
        if base.startswith(PREFIX):
            out.append(split(base)[0])
    return list(dict.fromkeys(out))


def resolve(metrics, given: dict | None) -> dict | None:
    """{name: path} of the plugins ``metrics`` use: loaded from the paths ``given`` (a run's own,
    replacing another version of the same name in this process), or those already loaded here."""
    out = {}
    for name in names_in(metrics):
        if given and name in given:
            plugin = load(given[name], replace=True)
            if plugin.name != name:
                raise PluginError(f"plugin {given[name]}: its NAME is {plugin.name!r}, the run expects {name!r}")
        else:
            plugin = get(name)
        out[name] = plugin.path
    return out or None


def identity(paths: dict | None) -> dict:
    """{name: sha256} of the loaded plugins at ``paths`` (what a run's identity records)."""
    return {name: get(name).sha256 for name in sorted(paths or {})}

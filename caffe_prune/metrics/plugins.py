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
- optionally ``NAME`` (default: the file's name without ``.py``);
- optionally ``TIMEOUT``: the most seconds one call of its functions may take (the run ends in one
  line when a call takes longer).

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
wrong shape, not numbers (a dict, a string) or not finite. ``sys.exit`` in plugin code is an error
too, never a clean stop of the run; a call that takes longer than its time limit (``TIMEOUT``
seconds in the file, or ``--plugin-timeout``: set_timeout; the smaller wins) is stopped by SIGALRM
and is an error. A plugin is code: it runs with the user's rights, like a Python layer.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import re
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from caffe_prune.errors import PluginError

PREFIX = "plugin:"
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
NEEDS = "xgh"

_LOADED: dict = {}        # name -> Plugin, in this process
_TIMEOUT_S = None         # --plugin-timeout: the most seconds one plugin call may take, in this process and its forks


def set_timeout(seconds: float | None) -> None:
    """The most seconds any plugin call may take from now on in this process (None: no limit but the
    plugins' own TIMEOUT)."""
    global _TIMEOUT_S
    if seconds is not None and (isinstance(seconds, bool) or not seconds > 0):
        raise PluginError(f"--plugin-timeout {seconds}: give a number of seconds above 0")
    _TIMEOUT_S = None if seconds is None else float(seconds)


class _TimedOut(BaseException):
    """Raised by SIGALRM inside a plugin call (a BaseException, so the plugin's own ``except
    Exception`` cannot swallow it)."""


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """SIGALRM after ``seconds`` raises _TimedOut in the call (main thread only: signals reach no
    other; there the call runs without a limit). Python code is stopped at once; a call inside C
    (one long numpy operation) is stopped when it returns to Python."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(*_):
        raise _TimedOut()
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


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
    timeout: float | None = None  # TIMEOUT: the most seconds one call may take

    def __str__(self):
        return f"plugin {self.name} ({self.path})"

    def _call(self, what: str, fn, args, where: str):
        """``fn(*args)`` within the time limit; whatever it raises, SystemExit included, is one line."""
        limit = min((t for t in (self.timeout, _TIMEOUT_S) if t), default=None)
        try:
            with _time_limit(limit):
                return fn(*args)
        except _TimedOut:
            raise PluginError(f"{self}: {what} took longer than its time limit of {limit:g} s on {where} "
                              f"(TIMEOUT in the plugin, --plugin-timeout)") from None
        except SystemExit as exc:
            raise PluginError(f"{self}: {what} called sys.exit({exc.code!r}) on {where}; a plugin ends the run "
                              f"only by raising an error") from None
        except Exception as exc:
            raise PluginError(f"{self}: {what} raised {type(exc).__name__}: {exc} on {where}") from None

    def _numbers(self, what: str, out, where: str) -> np.ndarray:
        """What a plugin function returned as float64, or one line saying it is not numbers."""
        try:
            return np.asarray(out, dtype=np.float64)
        except (TypeError, ValueError):
            raise PluginError(f"{self}: {what} returned a {type(out).__name__}, not an array of numbers, on "
                              f"{where}") from None

    def values(self, x, g, h, axes, where: str) -> np.ndarray:
        """``reduce`` on one batch, checked: one finite value per sample and item."""
        out = self._numbers("reduce", self._call("reduce", self.reduce, (x, g, h, axes), where), where)
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
        out = self._numbers("combine", self._call("combine", self.combine, (values,), where), where)
        if out.shape != values.shape[1:]:
            raise PluginError(f"{self}: combine returned shape {out.shape} on {where}; expected {values.shape[1:]}, "
                              f"one value per item")
        if not np.all(np.isfinite(out)):
            raise PluginError(f"{self}: combine returned NaN or infinite values on {where}")
        return out

    def scaled(self, values: np.ndarray, layer, where: str) -> np.ndarray:
        """The plugin's own ``scale``, checked for shape (NaN stays allowed: unprunable items)."""
        out = self._numbers("scale", self._call("scale", self.scale, (values, layer), where), where)
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
    except SystemExit as exc:
        raise PluginError(f"plugin {location}: importing it called sys.exit({exc.code!r})") from None
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
    timeout = getattr(module, "TIMEOUT", None)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
        raise PluginError(f"{where}: TIMEOUT must be a number of seconds above 0, got {timeout!r}")
    return Plugin(name, str(location), sha, getattr(module, "INPUT", None), frozenset(needs), reduce, combine,
                  scaling, scale, timeout)


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
            if plugin is None:
                raise PluginError(f"plugin {given[name]}: it now holds layer rules only, no metric; the run expects "
                                  f"the metric {name!r} from it")
            if plugin.name != name:
                raise PluginError(f"plugin {given[name]}: its NAME is {plugin.name!r}, the run expects {name!r}")
        else:
            plugin = get(name)
        out[name] = plugin.path
    return out or None


def identity(paths: dict | None) -> dict:
    """{name: sha256} of the loaded plugins at ``paths`` (what a run's identity records)."""
    return {name: get(name).sha256 for name in sorted(paths or {})}

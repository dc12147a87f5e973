"""Layer types whose construction in Caffe does more than compute: it runs code or writes a file.

Caffe builds every layer of a net when the net is constructed (``caffe.Net(prototxt, phase)``),
before any forward, so these act as soon as a prototxt is opened:

- ``Python``: layer_factory.cpp (GetPythonLayer) imports ``python_param.module`` with
  ``bp::import``, instantiates ``python_param.layer`` and runs its ``setup``: whatever that module
  does runs with the user's rights, and a downloaded prototxt names the module. ``check_code``
  (which caffe_prune.pycaffe.check_net runs first, before anything is built) refuses such a
  definition unless this process was told to trust it (``allow_python_layers``: the command line's
  ``--allow-python-layers``, a run's ``Config.allow_python_layers``);
- ``HDF5Output``: hdf5_output_layer.cpp creates ``hdf5_output_param.file_name`` in its LayerSetUp
  with ``H5F_ACC_TRUNC``, truncating whatever file is there, and writes to it on every forward.
  The nets caffe_prune builds (``inert``) hold a Silence layer of the same name and bottoms in its
  place: nothing reads its outputs (it has none), so every blob is the same, and the channel graph,
  which is traced from the definition, still sees the layer (a barrier, as a type without a rule).

Of stock Caffe 1.0's 61 layer types these are the only two (WindowData's dump of its windows is
compiled out, ``#if 0``). The data layers open their sources (LMDB's lock.mdb, LevelDB's LOG and
LOCK) and are never built from a user's definition: the forms Caffe runs replace them with one
Input layer (caffe_prune.netdef); training builds them, and a training net's HDF5Output, as the
user's own solver would.
"""
from __future__ import annotations

import warnings

from caffe_prune.errors import InputError

CODE = "Python"                                        # builds by importing user code
WRITERS = {"HDF5Output": "hdf5_output_param"}          # builds by creating a file: its parameter message
INERT = "Silence"                                      # reads its bottoms, does nothing, has no tops


_python_layers_allowed = False        # this process (and its forks) may build Python layers


def allow_python_layers(allowed: bool = True) -> None:
    """Let Caffe build Python layers in this process and its forks from now on (or no longer)."""
    global _python_layers_allowed
    _python_layers_allowed = bool(allowed)


def python_layers_allowed() -> bool:
    return _python_layers_allowed


def check_code(net_param, where: str) -> None:
    """Refuse a definition with a Python layer (in any phase) unless allow_python_layers was called:
    one line naming the layer, the code it would run and the opt-in."""
    found = python_layers(net_param)
    if found and not _python_layers_allowed:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise InputError(f"{where}: layer {found[0].name!r} is a Python layer{more}: building it would import and "
                         f"run {code_of(found[0])} with your rights; pass --allow-python-layers only for a file you "
                         f"trust (in Python: allow_python_layers=True)")


def runs_code(layer) -> bool:
    """Whether building ``layer`` (a LayerParameter) imports and runs a module of Python code."""
    return layer.type == CODE


def code_of(layer) -> str:
    """What a Python layer runs, as its python_param names it: "module.Layer"."""
    return f"{layer.python_param.module}.{layer.python_param.layer}"


def python_layers(net_param) -> list:
    """The Python layers of a definition, in every phase (a TRAIN-only one is built by training)."""
    return [layer for layer in list(net_param.layer) if runs_code(layer)]


def written_file(layer) -> str | None:
    """The file building ``layer`` creates or truncates, or None for a layer that writes none."""
    field = WRITERS.get(layer.type)
    return getattr(layer, field).file_name if field else None


def inert(net_param, where: str):
    """(the definition with every file-writing layer replaced by a Silence layer of the same name and
    bottoms, [(layer name, file it would have written)]), with a note per layer; the definition
    itself when there are none."""
    replaced = [(layer.name, written_file(layer)) for layer in net_param.layer if layer.type in WRITERS]
    if not replaced:
        return net_param, []
    for name, written in replaced:
        warnings.warn(f"{where}: layer {name!r} would create or truncate {written!r} when Caffe builds it; "
                      f"caffe-prune builds it as a layer that writes nothing", stacklevel=4)
    out = type(net_param)()
    out.CopyFrom(net_param)
    for layer in out.layer:
        if layer.type in WRITERS:
            layer.ClearField(WRITERS[layer.type])
            layer.type = INERT
            del layer.top[:]
    return out, replaced

"""Which layers of a definition Caffe instantiates in a phase (net.cpp ``FilterNet``: each layer's
include/exclude rules against the net state ``phase``, level 0, no stages). Plain protobuf, no
Caffe: read by pycaffe's checks, the definitions' forms (caffe_prune.netdef), the channel trace and
the ONNX export alike."""
from __future__ import annotations

from caffe_prune import layers as rules

PHASES = {"train": 0, "test": 1}        # caffe.proto: enum Phase { TRAIN = 0; TEST = 1; }


def phase_value(phase) -> int:
    return PHASES[phase] if isinstance(phase, str) else int(phase)


def _meets(rule, phase: int) -> bool:
    """Caffe's StateMeetsRule for the state (phase, level 0, no stages)."""
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if rule.HasField("min_level") and rule.min_level > 0:
        return False
    if rule.HasField("max_level") and rule.max_level < 0:
        return False
    return not rule.stage                   # a required stage is never met; not_stage always is


def layers_in_phase(net_param, phase) -> list:
    """The layers Caffe instantiates for ``phase`` ("train", "test" or its number), in order."""
    phase = phase_value(phase)
    kept = []
    for layer in net_param.layer:
        if layer.include:
            keep = any(_meets(r, phase) for r in layer.include)
        else:
            keep = not any(_meets(r, phase) for r in layer.exclude)
        if keep:
            kept.append(layer)
    return kept


def instantiated_layers(net_param) -> list:
    """The layers of the TEST phase; those of the TRAIN phase for a definition saved from a TRAIN
    net (a caffemodel whose TEST phase has no data layer while its TRAIN phase has one)."""
    layers = layers_in_phase(net_param, "test")
    if not any(l.type in rules.DATA_TYPES for l in layers):
        train = layers_in_phase(net_param, "train")
        if any(l.type in rules.DATA_TYPES for l in train):
            return train
    return layers

"""What `caffe-prune graph NET` shows: a text summary of the groups and a picture with ties coloured.

The picture is Graphviz (through pydot, as ``caffe.draw`` does): one node per layer, edges along
blobs; convolutions whose channels are tied to other convolutions' (a residual stream, AlexNet's
grouped pairs) share a colour, and barrier layers are red.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from caffe_prune import fsio, phases
from caffe_prune.errors import InputError

PALETTE = ["#8dd3c7", "#ffffb3", "#bebada", "#80b1d3", "#fdb462", "#b3de69", "#fccde5", "#bc80bd",
           "#ccebc5", "#ffed6f"]


BARRIER_COLOUR = "#fb8072"      # a barrier layer in the picture

def tie_clusters(graph) -> dict:
    """Conv layer -> cluster number, for layers whose channels fall together with another layer's."""
    parent = {layer: layer for layer in graph.producers}

    def find(layer):
        while parent[layer] != layer:
            parent[layer] = parent[parent[layer]]
            layer = parent[layer]
        return layer
    for group in graph.groups:
        first, *rest = group.layers
        for other in rest:
            parent[find(other)] = find(first)
    members = defaultdict(list)
    for layer in graph.producers:
        members[find(layer)].append(layer)
    tied = [sorted(m) for m in members.values() if len(m) > 1]
    return {layer: i for i, cluster in enumerate(sorted(tied)) for layer in cluster}


def summary(graph, name: str = "", groups_listed: int = 5) -> str:
    """Groups, their sizes, members and weights removed (nothing pruned yet), barriers."""
    sizes = Counter(len(g.channels) for g in graph.groups)
    costs = graph.costs(set())
    lines = [f"{name}: {len(graph.groups)} prunable groups over {len(graph.producers)} convolutions; "
             f"conv weights {costs.conv_weights:,}, fc weights {costs.fc_weights:,}, "
             f"MACs {costs.macs:,} per image" + (f", parameters {costs.params:,}" if costs.params is not None else ""),
             "group sizes (channels per group): " + ", ".join(f"{n} x {size}" for size, n in sorted(sizes.items()))]
    per_layer = defaultdict(list)
    for group in graph.groups:
        per_layer[group.layers].append(group)
    lines.append("groups by the convolutions they span:")
    for layers, groups in per_layer.items():
        saved = [graph.saved(g.id, set()) for g in groups]
        removed = sorted(c.conv_weights + c.fc_weights for c in saved)
        macs = sorted(c.macs for c in saved)
        lines.append(f"  {' + '.join(layers)}: {len(groups)} groups of {len(groups[0].channels)} channel(s), "
                     f"weights removed each {removed[0]:,}..{removed[-1]:,}, MACs {macs[0]:,}..{macs[-1]:,}")
    for group in graph.groups[:groups_listed]:
        lines.append(group.details())
    if graph.lrn_across:
        lines.append("across-channel LRN (export reports the deviation): " + ", ".join(graph.lrn_across))
    if graph.barriers:
        lines.append("barriers:")
        lines.extend(f"  {layer}: {why}" for layer, why in graph.barriers.items())
    unprunable = defaultdict(list)
    for unit, why in graph.unprunable.items():
        unprunable[(unit.layer, why)].append(unit.index)
    if unprunable:
        lines.append("unprunable channels:")
        lines.extend(f"  {layer} [{len(ix)}]: {why}" for (layer, why), ix in unprunable.items())
    return "\n".join(lines)


def draw(graph, net_param, path) -> Path:
    """Write the layer graph as PNG or SVG (by suffix) with tied convolutions coloured."""
    try:
        import pydot
    except ImportError:
        raise InputError("drawing needs pydot: pip install pydot (and Graphviz: apt-get install "
                                 "graphviz)") from None
    path = Path(path)
    if path.suffix not in (".png", ".svg"):
        raise InputError(f"{path}: the picture must be .png or .svg")
    clusters = tie_clusters(graph)
    dot = pydot.Dot(graph_type="digraph", rankdir="TB", fontname="Helvetica")
    producer_of = {}
    for layer in phases.instantiated_layers(net_param):
        label = f"{layer.name}\\n{layer.type}"
        style = {"shape": "box", "style": "filled", "fillcolor": "#eeeeee"}
        if layer.name in graph.producers:
            info = graph.producers[layer.name]
            label += f" {info.num_output}" + (f" g{info.group}" if info.group > 1 else "")
            style["fillcolor"] = PALETTE[clusters[layer.name] % len(PALETTE)] if layer.name in clusters else "white"
        if layer.name in graph.barriers:
            style["fillcolor"] = BARRIER_COLOUR
        dot.add_node(pydot.Node(f'"{layer.name}"', label=f'"{label}"', **style))
        for bottom in layer.bottom:
            if bottom in producer_of:
                dot.add_edge(pydot.Edge(f'"{producer_of[bottom]}"', f'"{layer.name}"'))
        for top in layer.top:
            producer_of[top] = layer.name
    try:
        with fsio.replacing(path) as tmp:
            (dot.write_png if path.suffix == ".png" else dot.write_svg)(str(tmp))
    except (OSError, FileNotFoundError) as exc:
        raise InputError(f"Graphviz could not draw {path} ({exc}); apt-get install graphviz") from None
    return path

"""The package's shape: the import graph drawn from the source (every import, those inside functions
too) has no circle and never goes from a lower layer (caffe_prune.LAYERS) to a higher one; no module
is over ~600 lines; and outside the layer registry only three modules spell Caffe layer types
(netdef builds its own Input and loss layers, importer reads the authors' format, networks declares
the six networks)."""
import ast
from pathlib import Path

import caffe_prune
from caffe_prune import layers
from conftest import REPO

ROOT = REPO / "caffe_prune"
# and the registry, caffe_prune.layers and its modules; onnx_layers translates each type (one converter per
# type) and runtimes names what OpenCV's importer computes otherwise; forks writes the stock layers that replace
# a Caffe fork's
SPELL_TYPES = {"netdef", "importer", "networks", "onnx_layers", "runtimes", "forks"}


def modules() -> dict:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.with_suffix("").relative_to(ROOT).parts)
        out[name.removesuffix(".__init__") if name != "__init__" else ""] = path
    return out


def imports(name: str, path: Path, known) -> set:
    """The package's modules that ``name`` imports (a module importing its own package excepted)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: max(0, len(package.split(".")) - node.level + 1)]
                base = ".".join(["caffe_prune", *[p for p in parts if p], *([base] if base else [])])
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            short = target.removeprefix("caffe_prune").lstrip(".")
            if target.startswith("caffe_prune") and short in known and short != name \
                    and not name.startswith(short + ".") and short:
                found.add(short)
    return found


def upward(edges: dict, level: dict) -> list:
    """The imports that go from a lower layer to a higher one."""
    return sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets if level[b] > level[a])


def circle(edges: dict) -> list:
    """The nodes left on a circle (empty when a topological order exists)."""
    indegree = {m: 0 for m in edges}
    for targets in edges.values():
        for b in targets:
            indegree[b] += 1
    ready, seen = [m for m, d in indegree.items() if d == 0], 0
    while ready:
        m = ready.pop()
        seen += 1
        for b in edges[m]:
            indegree[b] -= 1
            if indegree[b] == 0:
                ready.append(b)
    return sorted(m for m, d in indegree.items() if d > 0)


def folders(edges: dict) -> dict:
    """The import graph at the folder scale: each module as its top-level package (a top-level
    module is its own folder), imports within a folder left out."""
    top = lambda m: m.split(".")[0]      # noqa: E731
    out = {}
    for a, targets in edges.items():
        out.setdefault(top(a), set()).update(top(b) for b in targets if top(b) != top(a))
    return out


def test_the_checks_see_what_they_look_for(tmp_path):
    """On a made-up package: an upward import, a circle, a folder circle (a.x -> b, b -> a.y) and an
    import inside a function are what the checks report."""
    edges = {"low": {"high"}, "high": set(), "p": {"q"}, "q": {"p"}}
    assert upward(edges, {"low": 0, "high": 1, "p": 0, "q": 0}) == ["low -> high"]
    assert circle(edges) == ["p", "q"] and circle({"a": {"b"}, "b": set()}) == []
    assert circle(folders({"a.x": {"b"}, "b": {"a.y"}, "a.y": set()})) == ["a", "b"]
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from caffe_prune import pycaffe\n    from caffe_prune.data import dataset\n")
    assert imports("m", source, {"pycaffe", "data", "data.dataset"}) == {"pycaffe", "data", "data.dataset"}


def test_every_module_has_a_layer_and_imports_go_down_without_circles():
    found = modules()
    level = {m: i for i, layer in enumerate(caffe_prune.LAYERS) for m in layer}
    assert sorted(m for m in found if m and m not in level) == []          # a new module needs a layer
    assert sorted(m for m in level if m not in found) == []                 # and a layer names only modules
    edges = {m: imports(m, p, found) for m, p in found.items() if m}
    assert upward(edges, level) == []
    assert circle(edges) == []
    # the same at the folder scale: packages import each other in one direction only
    assert circle(folders(edges)) == []


def test_command_code_lives_in_the_commands_package():
    """Only caffe_prune.commands, cli and __main__ parse arguments; no library module imports them."""
    found = modules()
    edges = {m: imports(m, p, found) for m, p in found.items() if m}
    front = {m for m in found if m.split(".")[0] in ("commands", "cli", "__main__")}
    assert sorted(f"{a} -> {b}" for a, targets in edges.items() if a not in front for b in targets if b in front) == []
    parsing = sorted(m for m, p in found.items() if m not in front and "argparse" in p.read_text())
    assert parsing == []


def test_modules_are_of_one_job_size():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


def test_only_the_registry_and_three_modules_spell_layer_types():
    """A string constant naming a Caffe layer type (one the registry knows, or one stock Caffe lists)
    appears only in the registry, netdef, importer and networks."""
    from caffe_prune import pycaffe
    known = set(layers.RULES) | set(pycaffe.caffe().layer_type_list())
    spelled = {}
    for name, path in modules().items():
        if name in SPELL_TYPES or name.split(".")[0] == "layers":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
                spelled.setdefault(name, set()).add(node.value)
    assert spelled == {}
    # the scan sees what it looks for
    assert "Convolution" in known and "Deconvolution" in known and "ImageData" in known

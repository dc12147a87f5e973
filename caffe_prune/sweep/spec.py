"""A sweep's SPEC (see caffe_prune.sweep): parsed and checked into a ``Spec``, expanded into its runs
(net x method x seed), each with a stable id by content."""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import shutil
from hashlib import sha256
from pathlib import Path

from caffe_prune import fsio, oracle, pruning, published_weights
from caffe_prune import networks as known_networks
from caffe_prune.download import digest
from caffe_prune.metrics import methods, plugins, taxonomy
from caffe_prune.analysis import DEFAULT_DROP
from caffe_prune.pruning import Config
from caffe_prune.errors import InputError

RUN_FIELDS = ("net", "weights", "metric", "oracle", "seed", "data", "plugins")   # what a SPEC varies; the rest is protocol


STOPS = ("drop", "end")


SPEC_KEYS = ("name", "out", "archive", "data", "networks", "metrics", "domino", "oracles", "forms", "seeds", "protocol",
             "plugins")


class SweepError(ValueError):
    """A SPEC or a sweep that cannot run; one line, listing what exists where that helps."""


@dataclasses.dataclass
class Spec:
    """A parsed SPEC: what to run (networks -> weights, methods, seeds) and how (protocol)."""
    name: str
    out: str
    data: str | None
    networks: dict                 # {network: "published" | caffemodel path}
    metrics: list                  # names, aliases or globs, as given
    domino: list                   # Domino aggregations whose variants are added
    oracles: list                  # [[constituent, ...], ...]
    seeds: list
    protocol: dict                 # Config fields other than RUN_FIELDS, plus stop and report_drop
    forms: str = methods.DEFAULT_FORMS   # which forms of papers/004's five an oracle "paper" composes
    plugins: list = dataclasses.field(default_factory=list)   # plugin metric files (caffe_prune.metrics.plugins)
    archive: str | None = None     # the sweep's committed results archive (caffe_prune.archive): its runs are skipped

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_defaults() -> dict:
    """pruning.Config's protocol fields and their defaults (the paper's protocol, papers/004 §5)."""
    out = {}
    for f in dataclasses.fields(Config):
        if f.name not in RUN_FIELDS and f.name not in Config.EXECUTION:
            out[f.name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return out


def protocol_keys() -> dict:
    """{key: default} of a SPEC's [protocol] table: Config's fields, the stop rule and the drop at
    which the Table-2 figure is read (report_drop, 5 points unless given)."""
    return {**config_defaults(), "stop": "drop", "report_drop": DEFAULT_DROP}


def load_spec(path) -> dict:
    """A SPEC file as plain data (TOML, read with the standard library's tomllib)."""
    import tomllib
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"no SPEC file {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"{path}: not valid TOML ({exc})") from None
    raw.setdefault("name", path.stem)
    return raw


def parse_spec(raw: dict) -> Spec:
    """Validate plain SPEC data (from TOML or flags) into a Spec; every error is one line."""
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise SweepError(f"unknown SPEC key(s) {', '.join(unknown)}; valid: {', '.join(SPEC_KEYS)}")
    name = str(raw.get("name") or "sweep")
    plugin_files = _strings(raw.get("plugins", []), "plugins")
    for path in plugin_files:        # before the metrics are parsed: they may name them
        plugins.load(path)
    networks = raw.get("networks")
    if not networks:
        raise SweepError("the SPEC names no networks (networks = [\"LeNet-5\"] or a [networks] table)")
    if isinstance(networks, (list, tuple)):
        networks = {n: "published" for n in networks}
    if not isinstance(networks, dict):
        raise SweepError("networks must be a list of names or a table {network = weights}")
    for net in networks:
        if net not in known_networks.NETWORKS and not Path(net).is_file():
            raise SweepError(f"unknown network {net!r}; networks: {', '.join(known_networks.NETWORKS)} (or a prototxt path)")
    metrics, domino = _strings(raw.get("metrics", []), "metrics"), _strings(raw.get("domino", []), "domino")
    for agg in domino:
        if agg not in taxonomy.DOMINO:
            raise SweepError(f"unknown Domino aggregation {agg!r}; valid: {', '.join(taxonomy.DOMINO)}")
    forms = raw.get("forms", methods.DEFAULT_FORMS)
    if forms not in taxonomy.PAPER_FORMS:
        raise SweepError(f"forms must be one of {', '.join(taxonomy.PAPER_FORMS)}, got {forms!r}")
    oracles = []
    for entry in raw.get("oracles", []):
        constituents = list(taxonomy.PAPER_FORMS[forms]) if entry == "paper" \
            else _strings(entry, "an oracle's constituents")
        if not constituents:
            raise SweepError("an oracle needs at least one constituent (or \"paper\" for the paper's five)")
        for m in constituents:
            _check_metric(m)
        oracles.append(constituents)
    if not metrics and not oracles:
        raise SweepError("the SPEC names no metrics and no oracles")
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise SweepError(f"seeds must be a count or a list of integers, got {seeds!r}")
    protocol = parse_protocol(raw.get("protocol", {}))
    return Spec(name=name, out=str(raw.get("out") or Path("runs") / "sweeps" / name), data=raw.get("data"),
                networks={str(k): str(v) for k, v in networks.items()}, metrics=metrics, domino=domino,
                oracles=oracles, seeds=list(dict.fromkeys(seeds)), protocol=protocol, forms=forms,
                plugins=plugin_files, archive=_archive(raw.get("archive")))


def _archive(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise SweepError(f"archive must be a folder's path (the sweep's results archive), got {value!r}")
    if Path(value).exists() and not Path(value).is_dir():
        raise SweepError(f"archive {value} is not a folder; a results archive is a folder of runs.csv and steps.csv.gz")
    return value


def parse_protocol(given: dict) -> dict:
    """The [protocol] table with defaults filled in, its types checked and the stop rule applied:
    ``stop = "drop"`` keeps max_drop; ``stop = "end"`` sets max_drop None (no drop stop: the whole
    Figure-6 curve, until nothing is left, ``floor`` or ``max_steps``)."""
    defaults = protocol_keys()
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise SweepError(f"unknown protocol key(s) {', '.join(unknown)}; valid: {', '.join(defaults)}")
    protocol = dict(defaults)
    for key, value in given.items():
        kind = _kind(key, defaults[key])
        accepted = (int, float) if kind is float else kind
        if isinstance(value, bool) != (kind is bool) or (value is not None and not isinstance(value, accepted)):
            raise SweepError(f"protocol {key} must be {kind.__name__}, got {value!r}")
        protocol[key] = float(value) if kind is float and value is not None else value
    if protocol["stop"] not in STOPS:
        raise SweepError(f"protocol stop must be one of {', '.join(STOPS)}, got {protocol['stop']!r}")
    if protocol["stop"] == "end":
        if given.get("max_drop") is not None:
            raise SweepError("protocol max_drop applies to stop = \"drop\" only; stop = \"end\" has no drop stop")
        protocol["max_drop"] = None
    if protocol["shortlist"] not in oracle.SHORTLISTS:
        raise SweepError(f"protocol shortlist must be one of {', '.join(oracle.SHORTLISTS)}, "
                         f"got {protocol['shortlist']!r}")
    return protocol


_TYPES = {"float": float, "int": int, "str": str, "dict": dict, "list": list, "bool": bool}


def _kind(key, default):
    """A protocol key's type: its default's, or for a None default the first type of Config's
    annotation (``float | None`` -> float)."""
    if default is not None:
        return type(default)
    annotation = {f.name: f.type for f in dataclasses.fields(Config)}.get(key, "str")
    return _TYPES.get(str(annotation).split("|")[0].strip(), str)


def _strings(value, what) -> list:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise SweepError(f"{what} must be a list of names, got {value!r}")
    return list(value)


def _check_metric(name: str) -> None:
    try:
        taxonomy.parse(name)
    except taxonomy.MetricError as exc:
        raise SweepError(f"unknown metric: {exc}") from None


def is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def match_metrics(pattern: str) -> list:
    """The taxonomy's metric names matching `pattern`, component by component (``*`` never crosses
    a ``/``); Domino variants only for a pattern starting with ``domino``."""
    names = taxonomy.list_metrics(domino=pattern.startswith("domino"))
    parts = pattern.split("/")
    found = [n for n in names if len(n.split("/")) == len(parts)
             and all(fnmatch.fnmatchcase(a, b) for a, b in zip(n.split("/"), parts))]
    if not found:
        raise SweepError(f"metric glob {pattern!r} matches none of the {len(names)} metrics; components: "
                         f"input {'|'.join(taxonomy.INPUTS)}, pointwise {'|'.join(taxonomy.POINTWISE)}, "
                         f"reduction {'|'.join(taxonomy.REDUCTIONS)}, scaling {'|'.join(taxonomy.SCALINGS)} "
                         f"(`caffe-prune metrics list --domino` lists them all)")
    return found


def method_names(spec: "Spec") -> list:
    """Every metric the SPEC names (globs expanded, then its Domino variants), in order, once."""
    names = []
    for entry in spec.metrics:
        if is_glob(entry):
            names += match_metrics(entry)
        else:
            _check_metric(entry)
            names.append(entry)
    names = list(dict.fromkeys(names))
    for agg in spec.domino:
        names += [f"{taxonomy.DOMINO_PREFIX}{agg}:{n}" for n in names if not n.startswith(taxonomy.DOMINO_PREFIX)]
    return list(dict.fromkeys(names))


def resolve_weights(net: str, weights: str) -> Path:
    if weights == "published":
        try:
            return Path(published_weights.caffemodel(net))
        except InputError as exc:
            raise SweepError(f"{exc}; give {net}'s weights in the SPEC ([networks] {net} = \"PATH\") "
                             f"or as --weights {net}=PATH") from None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise SweepError(f"{net}: no weights file {path}")
    return path


def stage_weights(path: Path, sweep_dir: Path | None) -> tuple:
    """(path the runs use, sha256): the file once per content in SWEEP_DIR/weights/SHA256.caffemodel
    (a hard link where possible), so that every node of a cluster reads it where it reads the run
    directories. Without a sweep directory (a dry run) nothing is copied."""
    sha = digest(path, "sha256")
    if sweep_dir is None:
        return str(Path(path).resolve()), sha
    target = sweep_dir / "weights" / f"{sha}.caffemodel"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        try:
            os.link(path, partial)
        except OSError:
            shutil.copyfile(path, partial)
        os.replace(partial, target)
    return str(target), sha


def stage_plugins(names, sweep_dir: Path | None) -> tuple:
    """({name: path the runs use}, {name: sha256}) of the plugins the metrics ``names`` use: each
    file once per content in SWEEP_DIR/plugins/SHA256/FILE, where every worker (local or on a
    cluster) imports it. Without a sweep directory (a dry run) the loaded files themselves."""
    paths, shas = {}, {}
    for name, path in (plugins.resolve(names, None) or {}).items():
        plugin = plugins.get(name)
        shas[name] = plugin.sha256
        if sweep_dir is None:
            paths[name] = path
            continue
        target = sweep_dir / "plugins" / plugin.sha256 / Path(path).name
        if not target.is_file():
            fsio.write_bytes(target, Path(path).read_bytes())
        paths[name] = str(target)
    return paths or None, shas


def run_id(config: dict, weights_sha: str, data: str | None, plugin_shas: dict | None = None) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of the run's whole configuration
    (every field of pruning.Config and the data it reads), the weights and plugins by content
    (sha256) instead of by path. A field added to Config after runs were stored (``pruning.later``) is left out while
    it has its default, which behaves as before it existed: the ids of stored runs stay valid."""
    neutral = pruning.Config.neutral()
    identity = {k: v for k, v in {**config, "weights": weights_sha, "data": data,
                                  "plugins": plugin_shas or config.get("plugins")}.items()
                if not (k in neutral and v == neutral[k])}
    return sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def expand(spec: Spec, data: str, sweep_dir: Path | None = None) -> list:
    """The SPEC's runs (net x method x seed), each a task: plain data an executor can ship."""
    protocol = {k: v for k, v in spec.protocol.items() if k not in ("stop", "report_drop")}
    chosen = [(m, None) for m in method_names(spec)] + [(None, c) for c in spec.oracles]
    tasks, seen = [], set()
    for net, weights in spec.networks.items():
        weights_path, sha = stage_weights(resolve_weights(net, weights), sweep_dir)
        for metric, constituents in chosen:
            staged, plugin_shas = stage_plugins([metric] if metric else constituents, sweep_dir)
            for seed in spec.seeds:
                config = dataclasses.asdict(Config(net=net, weights=weights_path, metric=metric,
                                                   oracle=list(constituents or []), seed=seed, plugins=staged,
                                                   **protocol))
                try:
                    Config(**config).check()
                except (InputError, TypeError) as exc:
                    raise SweepError(f"protocol: {exc}") from None
                rid = run_id(config, sha, data, plugin_shas)
                if rid in seen:
                    continue
                seen.add(rid)
                tasks.append({"id": rid, "run_dir": f"runs/{rid[:16]}", "net": net, "seed": seed,
                              "metric": metric, "oracle": list(constituents) if constituents else None,
                              "method": methods.method(metric, constituents, config["shortlist"]), "config": config,
                              "data": data, "report_drop": spec.protocol["report_drop"]})
    return tasks


def weight_pairs(values) -> dict:
    """``--weights NET=PATH`` values as {net: path}."""
    out = {}
    for value in values or []:
        net, sep, path = value.partition("=")
        if not sep or not net or not path:
            raise SweepError(f"--weights takes NET=PATH, got {value!r}")
        out[net] = path
    return out

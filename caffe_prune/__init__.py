"""caffe-prune: channel pruning research on stock BVLC Caffe (pycaffe).

Data flows one way, one module per arrow: prototxt and caffemodel (``pycaffe``) -> data as Caffe
reads it (``data``) -> the channel graph (``graph``: groups, Θ_C, their slices) -> masks on Caffe's
blobs (``masking``) -> saliency metrics from Caffe's passes (``metrics``) -> a decision (a metric or
the ``oracle``) -> a step record (``pruning``, in its ``rundir``) -> reports (``report``) and sweeps
(``sweep``) -> the commands (``commands``, assembled by ``cli``).

``LAYERS`` is that order as data, lowest first: a module imports only from its own layer or lower
ones, and never in a circle (tests/test_layout.py draws the import graph and checks both).
"""
__version__ = "0.1.0"

LAYERS = (
    # foundations, no Caffe: errors, atomic files and locks, the layer registry, downloads, the
    # taxonomy's names, the oracle's choice, run directories, the results store
    ("errors", "fsio", "layers.rule", "layers.units", "layers.data", "layers.weighted", "layers.passing",
     "layers.branches", "layers.effects", "layers", "phases", "download", "oracle", "steps", "schedule", "constraints", "analysis", "metrics.plugins", "metrics.taxonomy",
     "metrics.methods", "rundir", "store", "archive", "report.text", "onnx_layers"),
    # Caffe itself
    ("pycaffe", "caffemodel", "metrics.inputs"),
    # data and weights as Caffe reads them
    ("data", "data.caffe_reading", "data.base_reader", "data.lmdb_meta", "data.db_reader", "data.list_reader", "data.hdf5_reader",
     "data.layer_records", "data.transform", "data.cifar10", "data.validation", "data.cifar10_convert",
     "data.synthetic", "published_weights"),
    # network definitions and datasets (forks: fork layers rewritten as stock ones)
    ("netdef", "forks", "networks", "data.dataset", "metrics.hessian"),
    # the channel graph, and what reads a net's blobs
    ("channels", "graph", "evaluate", "metrics.collect", "metrics.saliency", "metrics"),
    # masks, export, sessions, measured latency
    ("masking", "onnx_export", "runtimes", "export", "graph_view", "importer", "session", "profile"),
    # a step's Caffe work, training
    ("engines", "train", "train.recipe", "train.heldzero", "train.loop", "train.plots", "train.retrain"),
    # Algorithm 1
    ("pruning",),
    # what uses runs: the public API, fine-tuning, the bench, reports, sweeps
    ("api", "finetune", "bench", "report", "report.published_figures", "report.stats", "report.figures", "report.oracle",
     "report.taxonomy", "report.domino", "report.faithfulness", "sweep", "sweep.spec", "sweep.executors", "sweep.driver",
     "sweep.papers"),
    # the command line: options parsed into the objects above, commands that parse and print, the parser
    ("commands", "commands.options", "commands.doctor", "commands.network", "commands.train", "commands.data",
     "commands.profile", "commands.metrics", "commands.prune", "commands.sweep", "commands.report",
     "commands.reproduce", "cli", "__main__"),
)

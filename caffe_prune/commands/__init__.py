"""Every ``caffe-prune X``: its sub-parser (``register(subparsers)``) and its handler (``cmd_X``),
which parses the arguments into the library's objects (``options``), calls the library and prints.
One module per family of commands; no library module imports from here (tests/test_layout.py), and
``caffe_prune.cli`` only assembles the parser and is the error boundary.

- ``options``: the shared options, parsed once into a Network, a Session or a pruning Config;
- ``doctor``; ``network``: graph, init, import, evaluate, export; ``prune``: prune, bench,
  finetune, demo; ``train``; ``profile``; ``metrics``: saliency, metrics list; ``data``;
  ``sweep``: sweep, results; ``report``; ``reproduce``.
"""

"""The toolkit's errors, in one small module every other one can import.

Each carries a one-line message naming the file, layer, record or argument and what to do;
``caffe-prune``'s error boundary (caffe_prune.cli) prints it as one line with exit status 2.

- ``InputError``: a problem with Caffe or with what was about to be handed to it (a prototxt, a
  caffemodel, a pruning state, an option);
- ``DataError``: data that cannot be read or used as given (a data set, a record, a transform);
  a ValueError, as the other input errors are;
- ``MetricError``: an unknown or invalid metric name; ``PluginError``: a plugin metric that cannot
  be loaded or whose values cannot be used (caffe_prune.metrics.plugins), naming the plugin.
"""


class InputError(RuntimeError):
    """A problem with Caffe or with what was about to be handed to it; the message is one line."""


class DataError(ValueError):
    """Data that cannot be read or used as given; the message is one line naming the source."""


class NoDataset(DataError):
    """A network that names no readable dataset (no --data, and its data layers read nothing here)."""


class MetricError(ValueError):
    """An unknown or invalid metric name; the message is one line listing the valid names."""


class PluginError(MetricError):
    """A plugin metric that cannot be loaded, or that raised or returned values that cannot be used;
    the message is one line naming the plugin (and, from a pruning run, the step)."""


def one_line(exc) -> str:
    """An exception's message on one line (what the command line prints)."""
    return " ".join(str(exc).split()) or type(exc).__name__

"""The channel rule of examples/custom_layer/identity_layer.py's Python layer, as a plugin file
(`--plugin examples/custom_layer/rules.py`): channel c in, channel c out, Caffe's backward routes h
as it is (OBD's "routing" strategy), and it may run in place."""
from caffe_prune import layers

LAYER_RULES = {"Python:identity_layer.Identity": layers.Pass(in_place=True, hessian="routing")}

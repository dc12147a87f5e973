"""caffe-prune: channel pruning research on stock BVLC Caffe (pycaffe).

Data flows one way, one module per arrow: engine (pycaffe) -> data (CIFAR-10 as Caffe saw it) ->
graph (groups, Theta_C) -> masking (on Caffe blobs) -> metrics -> oracle -> pruning -> report -> cli.
"""
__version__ = "0.1.0"

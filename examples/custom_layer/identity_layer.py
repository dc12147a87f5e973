"""A user's own Caffe Python layer: top = bottom, channel by channel (a stand-in for any custom layer
that keeps channel c as channel c, e.g. a learned-free normalisation or a logging tap)."""
import caffe


class Identity(caffe.Layer):
    def setup(self, bottom, top):
        if len(bottom) != 1 or len(top) != 1:
            raise Exception("Identity takes one bottom and gives one top")

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff

"""Datasets as the original experiments fed them to Caffe."""

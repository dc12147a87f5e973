"""Saliency metrics."""

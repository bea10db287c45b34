"""Inference: the cached decode path, sampling, generation, text in and out."""

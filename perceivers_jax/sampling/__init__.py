"""Sampling: the cached decoder (decode) and batch sampling to files (sampling)."""

"""Preparing images: every image of a dataset decoded, oriented, fitted to its aspect-ratio
bucket and written at training size (``resize``, ``pixels``, ``buckets``).

Imports the core package and ``loramill.reruns`` (the run-cache) only.
"""

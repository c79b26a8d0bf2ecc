"""Benchmark metrics (and, alongside, the evaluation runner and SAM2 segmenter)."""

"""Benchmarks: synthetic full-size geometries and end-to-end sweeps (card first, JSON last)."""

"""Numerics, numpy only: the solver, quantization grids, ranges, saturation, branch layouts, metrics."""

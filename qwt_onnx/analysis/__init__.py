"""Analyses of a graph or of runs over it that return plain data: blocks, Q/DQ placement, captured fits."""

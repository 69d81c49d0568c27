"""Graph passes: Q/DQ insertion, block discovery, sub-model extraction, capture, splice."""

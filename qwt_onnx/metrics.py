"""Fidelity of a model's outputs to the FP32 reference (numpy only)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def sqnr_db(reference: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray]) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(‖ref‖² / ‖ref − test‖²)``, pooled over outputs."""
    signal = noise = 0.0
    for name, ref in reference.items():
        ref64, test64 = ref.astype(np.float64), np.asarray(test[name], dtype=np.float64)
        signal += float(np.sum(ref64**2))
        noise += float(np.sum((ref64 - test64) ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")


def mean_squared_error(reference: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray]) -> float:
    """Mean squared error over all elements of all outputs."""
    total = count = 0.0
    for name, ref in reference.items():
        diff = ref.astype(np.float64) - np.asarray(test[name], dtype=np.float64)
        total += float(np.sum(diff**2))
        count += diff.size
    return total / max(count, 1)

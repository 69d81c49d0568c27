"""Fidelity of a model's outputs to the FP32 reference (numpy only)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Score:
    """Held-out SQNR to FP32 of each float output; a model counts as good as its worst chosen
    output, so that no output gets worse unseen (a detector's scores beside its boxes)."""

    outputs_db: dict[str, float]
    chosen: tuple[str, ...] = ()  # every output where empty

    @property
    def db(self) -> float:
        scores = [db for name, db in self.outputs_db.items() if not self.chosen or name in self.chosen]
        return min(scores) if scores else float("inf")


def sqnr_db(reference: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray]) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(‖ref‖² / ‖ref − test‖²)``, pooled over float outputs."""
    signal = noise = 0.0
    for name, ref in float_outputs(reference):
        y = _flat(ref)
        signal += _squared_distance(y)
        noise += _squared_distance(y, _flat(test[name]))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")


def sqnr_db_per_output(reference: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Each float output's own SQNR (an output whose reference is all zeros has none)."""
    return sqnr_db_over_batches([(reference, test)])


def sqnr_db_over_batches(batches: Iterable[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]) -> dict[str, float]:
    """:func:`sqnr_db_per_output` over ``(reference, test)`` batches, without keeping them."""
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    for reference, test in batches:
        for name, ref in float_outputs(reference):
            y = _flat(ref)
            signal[name] = signal.get(name, 0.0) + _squared_distance(y)
            noise[name] = noise.get(name, 0.0) + _squared_distance(y, _flat(test[name]))
    return {name: _db(total, noise[name]) for name, total in signal.items() if total > 0}


def _db(signal: float, noise: float) -> float:
    return 10.0 * float(np.log10(signal / noise)) if noise > 0 else float("inf")


def mean_squared_error(reference: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray]) -> float:
    """Mean squared error over all elements of all float outputs."""
    total = count = 0.0
    for name, ref in float_outputs(reference):
        y = _flat(ref)
        total += _squared_distance(y, _flat(test[name]))
        count += y.size
    return total / max(count, 1)


def float_outputs(reference: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """Outputs that carry values: integer ones (token ids, masks passed through) match trivially."""
    return [(name, ref) for name, ref in reference.items() if np.issubdtype(np.asarray(ref).dtype, np.floating)]


def _flat(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32).ravel()


def _squared_distance(x: np.ndarray, y: np.ndarray | None = None, chunk: int = 1 << 16) -> float:
    """``Σ (x − y)²`` (``Σ x²`` without ``y``) of float32 vectors: BLAS dot products per chunk,
    summed in float64; the chunks stay in cache, so no output-sized difference is made."""
    total = 0.0
    for i in range(0, x.size, chunk):
        part = x[i : i + chunk] if y is None else x[i : i + chunk] - y[i : i + chunk]
        total += float(np.dot(part, part))
    return total

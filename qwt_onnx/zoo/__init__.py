"""Real models with real calibration and evaluation data, prepared once into the cache.

``python -m qwt_onnx zoo:NAME out.onnx`` quantizes a zoo model with its own
calibration data. Every model comes from a package on PyPI (never a model
hub); every input is a real photo or real text rendered in a real font, and
calibration and evaluation draw from disjoint sources.
"""

from __future__ import annotations

from qwt_onnx.errors import InputError
from qwt_onnx.zoo import detector, faces, ocr, orientation, saliency, sentences, speech
from qwt_onnx.zoo.registry import CALIBRATION_SAMPLES, Prepared, ZooEntry, load_evaluation
from qwt_onnx.zoo.registry import prepare as _prepare

ENTRIES = {entry.name: entry for entry in (saliency.ENTRY, orientation.ENTRY, ocr.REC, ocr.DET, sentences.ENTRY, detector.ENTRY, faces.ENTRY, speech.ENTRY)}

__all__ = ["CALIBRATION_SAMPLES", "ENTRIES", "Prepared", "ZooEntry", "get", "load_evaluation", "prepare"]


def get(name: str) -> ZooEntry:
    if name not in ENTRIES:
        raise InputError(f"unknown zoo model {name!r}; choose from {', '.join(ENTRIES)}")
    return ENTRIES[name]


def prepare(name: str, samples: int = CALIBRATION_SAMPLES) -> Prepared:
    """The model path and the cached calibration / evaluation files of zoo model ``name``."""
    return _prepare(get(name), samples)

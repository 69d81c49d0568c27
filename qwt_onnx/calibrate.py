"""Run models over the calibration data: activation statistics and held-out outputs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from tqdm.auto import tqdm

from qwt_onnx.calibration import CalibrationSet
from qwt_onnx.ranges import RangeObserver
from qwt_onnx.runtime import Runner, with_outputs


def _progress(calib: CalibrationSet, batch_size: int, indices, description: str, enabled: bool):
    total = calib.num_batches(batch_size, indices)
    return tqdm(calib.batches(batch_size, indices), total=total, desc=description, disable=not enabled, leave=False)


def observe(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    calib: CalibrationSet,
    batch_size: int,
    progress: bool = True,
) -> tuple[dict[str, RangeObserver], dict[str, np.ndarray]]:
    """Range statistics of ``tensors`` over all samples, and the model outputs on the scoring samples."""
    output_names = [o.name for o in model.graph.output]
    runner = Runner(with_outputs(model, list(tensors)))
    observers = {name: RangeObserver() for name in tensors}
    heldout = calib.scoring_mask
    kept: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
    for batch in _progress(calib, batch_size, None, "calibrating ranges", progress):
        values = {**batch.feeds, **runner(batch.feeds)}
        for name, observer in observers.items():
            observer.update(values[name])
        rows = heldout[batch.indices]
        for name in output_names:
            kept[name].append(values[name][rows])
    return observers, {name: np.concatenate(parts) for name, parts in kept.items()}


def heldout_outputs(model: onnx.ModelProto, calib: CalibrationSet, batch_size: int, description: str, progress: bool = True) -> dict[str, np.ndarray]:
    """The model's outputs on the scoring samples (held out from every fit)."""
    runner = Runner(model)
    indices = np.flatnonzero(calib.scoring_mask)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in _progress(calib, batch_size, indices, description, progress):
        for name, value in runner(batch.feeds).items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}

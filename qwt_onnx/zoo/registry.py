"""The zoo's entries and their cached data."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable

import numpy as np

from qwt_onnx.cache import cache_dir
from qwt_onnx.errors import InputError

CALIBRATION_SAMPLES = 512
LABELS = "__labels__"  # the key of the evaluation labels in the cached .npz


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """A real model, how to build its calibration and evaluation data, and how to score it."""

    name: str
    description: str
    locate_model: Callable[[], str]
    calibration: Callable[[int], dict[str, np.ndarray]]
    evaluation: Callable[[], tuple[dict[str, np.ndarray], np.ndarray | None]]
    task_metric: Callable[[np.ndarray, np.ndarray], float] | None = None  # (metric output, labels), higher is better
    metric_name: str = ""
    classifier: bool = False
    outputs: tuple[str, ...] = ()  # what decides (--outputs with zoo:NAME): the parts its task needs; all where empty
    metric_output: str = ""  # the output the task metric and top-1 agreement read; the first where empty

    def metric_input(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """The output of ``outputs`` (by name, in graph order) that the task metric reads."""
        return outputs[self.metric_output] if self.metric_output else next(iter(outputs.values()))


@dataclasses.dataclass(frozen=True)
class Prepared:
    model: str
    calibration: str
    evaluation: str


def decision_f1(ours: np.ndarray, theirs: np.ndarray) -> float:
    """F1 of the samples a model decides for (``ours``, booleans) against those the reference
    decides for: 1 where neither decides for any."""
    total = int(ours.sum() + theirs.sum())
    return 2 * int((ours & theirs).sum()) / total if total else 1.0


def package_file(package: str, relative: str) -> str:
    """A data file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"this zoo model needs the {package} package; pip install -e '.[zoo]'")
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    if not os.path.isfile(path):
        raise InputError(f"{package} does not ship {relative}; reinstall it with pip install -e '.[zoo]'")
    return path


def prepare(entry: ZooEntry, samples: int = CALIBRATION_SAMPLES) -> Prepared:
    """The model path and the cached calibration / evaluation ``.npz`` files, built on first use."""
    folder = os.path.join(cache_dir(), entry.name)
    os.makedirs(folder, exist_ok=True)
    model = entry.locate_model()
    calibration = os.path.join(folder, f"calib-{samples}.npz")
    evaluation = os.path.join(folder, "eval.npz")
    if not os.path.exists(calibration):
        _save(calibration, entry.calibration(samples))
    if not os.path.exists(evaluation):
        inputs, labels = entry.evaluation()
        _save(evaluation, inputs if labels is None else {**inputs, LABELS: labels})
    return Prepared(model, calibration, evaluation)


def load_evaluation(prepared: Prepared) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    with np.load(prepared.evaluation) as data:
        inputs = {k: data[k] for k in data.files if k != LABELS}
        labels = data[LABELS] if LABELS in data.files else None
    return inputs, labels


def _save(path: str, arrays: dict[str, np.ndarray]) -> None:
    partial = path + ".part.npz"  # np.savez appends .npz to names without it
    np.savez(partial, **arrays)
    os.replace(partial, path)

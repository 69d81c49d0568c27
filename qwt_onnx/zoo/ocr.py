"""ocr-rec and ocr-det: rapidocr's PP-OCRv6 recogniser and detector on rendered real text.

Text lines and pages of license text are rendered in DejaVu fonts, then
blurred, noised and JPEG-compressed as a camera would. The recogniser is
scored by character accuracy (1 − edit distance / length, CTC greedy
decoding as rapidocr does it); the detector by the ICDAR-style detection F1:
text regions of its probability map (threshold 0.3) grown back by DBNet's
unclip ratio 1.6, matched one to one to the rendered line boxes at IoU ≥ 0.5.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from qwt_onnx.zoo import text
from qwt_onnx.zoo.registry import ZooEntry, package_file

REC_HEIGHT, REC_WIDTH = 48, 480
DET_SIZE = 320
DET_THRESHOLD = 0.3
UNCLIP_RATIO = 1.6
MIN_REGION_PIXELS = 10
MATCH_IOU = 0.5
EVAL_LINES, EVAL_PAGES = 384, 96
MAX_LINES = 32


def _rec_model() -> str:
    return package_file("rapidocr", "models/PP-OCRv6_rec_small.onnx")


def _det_model() -> str:
    return package_file("rapidocr", "models/PP-OCRv6_det_small.onnx")


def rec_preprocess(image: np.ndarray) -> np.ndarray:
    """rapidocr's: height 48 keeping the aspect ratio, scaled to [-1, 1], zero-padded on the right."""
    from PIL import Image

    h, w = image.shape[:2]
    width = min(REC_WIDTH, int(math.ceil(REC_HEIGHT * w / h)))
    resized = np.asarray(Image.fromarray(image).resize((width, REC_HEIGHT), Image.Resampling.BILINEAR), np.float32)
    out = np.zeros((3, REC_HEIGHT, REC_WIDTH), dtype=np.float32)
    out[:, :, :width] = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def _rec_samples(texts: list[str], count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    fonts = text.fonts()
    lines = text.lines(texts, count, rng)
    batch = [rec_preprocess(text.render_line(line, fonts[i % len(fonts)], int(rng.integers(14, 40)), rng)) for i, line in enumerate(lines)]
    return np.stack(batch), lines


def rec_calibration(samples: int) -> dict[str, np.ndarray]:
    return {"x": _rec_samples(text.split_texts()[0], samples, seed=0)[0]}


def rec_evaluation() -> tuple[dict[str, np.ndarray], np.ndarray]:
    inputs, lines = _rec_samples(text.split_texts()[1], EVAL_LINES, seed=1)
    return {"x": inputs}, np.array(lines)


@functools.lru_cache(maxsize=1)
def _characters() -> list[str]:
    import onnx

    meta = {p.key: p.value for p in onnx.load(_rec_model(), load_external_data=False).metadata_props}
    return ["<blank>", *meta["character"].splitlines(), " "]


def ctc_decode(probabilities: np.ndarray) -> list[str]:
    """Greedy CTC: best class per step, repeats merged, blanks (class 0) dropped."""
    characters = _characters()
    best = probabilities.argmax(axis=-1)
    texts = []
    for row in best:
        keep = np.r_[True, row[1:] != row[:-1]] & (row != 0)
        texts.append("".join(characters[i] for i in row[keep]))
    return texts


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def character_accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    predicted = ctc_decode(outputs)
    errors = sum(edit_distance(p, str(t)) for p, t in zip(predicted, labels))
    return 1.0 - errors / sum(len(str(t)) for t in labels)


def det_preprocess(image: np.ndarray) -> np.ndarray:
    return ((image.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def _det_samples(texts: list[str], count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pages, boxes = [], np.full((count, MAX_LINES, 4), -1, dtype=np.int32)  # padded with -1
    for i in range(count):
        page, lines = text.render_page(texts, (DET_SIZE, DET_SIZE), rng)
        pages.append(det_preprocess(page))
        boxes[i, : len(lines)] = lines[:MAX_LINES]
    return np.stack(pages), boxes


def det_calibration(samples: int) -> dict[str, np.ndarray]:
    return {"x": _det_samples(text.split_texts()[0], samples, seed=0)[0]}


def det_evaluation() -> tuple[dict[str, np.ndarray], np.ndarray]:
    inputs, boxes = _det_samples(text.split_texts()[1], EVAL_PAGES, seed=1)
    return {"x": inputs}, boxes


def detected_boxes(probability: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Text regions of one probability map, each grown by DBNet's unclip offset ``A·r / L``."""
    from scipy import ndimage

    regions, _ = ndimage.label(probability > DET_THRESHOLD)
    boxes = []
    for rows, cols in ndimage.find_objects(regions):
        h, w = rows.stop - rows.start, cols.stop - cols.start
        if h * w < MIN_REGION_PIXELS:
            continue
        grow = int(round(h * w * UNCLIP_RATIO / (2 * (h + w))))
        boxes.append((rows.start - grow, cols.start - grow, rows.stop + grow, cols.stop + grow))
    return boxes


def _iou(a, b) -> float:
    top, left, bottom, right = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, bottom - top) * max(0, right - left)
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def detection_f1(outputs: np.ndarray, boxes: np.ndarray) -> float:
    """F1 of detected regions against the rendered lines, one-to-one matches at IoU ≥ 0.5."""
    matched = detected = truth = 0
    for probability, page_boxes in zip(outputs[:, 0], boxes):
        lines = [tuple(b) for b in page_boxes if b[0] >= 0]
        found = detected_boxes(probability)
        free = set(range(len(lines)))
        for box in found:
            best = max(free, key=lambda j: _iou(box, lines[j]), default=None)
            if best is not None and _iou(box, lines[best]) >= MATCH_IOU:
                free.discard(best)
                matched += 1
        detected, truth = detected + len(found), truth + len(lines)
    precision, recall = matched / max(detected, 1), matched / max(truth, 1)
    return 2 * precision * recall / max(precision + recall, 1e-12)


REC = ZooEntry(
    name="ocr-rec", description="rapidocr PP-OCRv6 text recogniser (SVTR-style, 18 710 classes); rendered license-text lines",
    locate_model=_rec_model, calibration=rec_calibration, evaluation=rec_evaluation,
    task_metric=character_accuracy, metric_name="character accuracy",
)

DET = ZooEntry(
    name="ocr-det", description="rapidocr PP-OCRv6 text detector (DBNet); rendered license-text pages, 320×320",
    locate_model=_det_model, calibration=det_calibration, evaluation=det_evaluation,
    task_metric=detection_f1, metric_name="detection F1",
)

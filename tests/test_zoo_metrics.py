"""The zoo's task metrics on hand-made outputs (no model, no data)."""

import numpy as np

from qwt_onnx.zoo import detector, faces, speech


def _yolo_output(anchors: list[tuple[float, float, float, float, int, float]], classes: int = 18) -> np.ndarray:
    """One image's [4 + classes, anchors] output from (cx, cy, w, h, class, score) rows."""
    output = np.zeros((4 + classes, len(anchors)), dtype=np.float32)
    for i, (cx, cy, w, h, cls, score) in enumerate(anchors):
        output[:4, i] = cx, cy, w, h
        output[4 + cls, i] = score
    return output


FACE, FEET = 1, 7
REFERENCE = np.stack([
    _yolo_output([(50, 50, 20, 20, FACE, 0.9), (52, 50, 20, 20, FACE, 0.6), (200, 200, 40, 30, FEET, 0.5)]),
    _yolo_output([(100, 80, 30, 30, FACE, 0.8), (300, 300, 10, 10, FACE, 0.1), (0, 0, 0, 0, FACE, 0.0)]),
])


def test_detections_are_nms_survivors_above_the_score_threshold():
    found = detector.detections(REFERENCE)
    # image 0: the two overlapping faces become one, the feet stay; image 1: the 0.1 face is
    # dropped, and its second row is padding
    np.testing.assert_array_equal(found[:, :, 0], [[FACE, FEET], [FACE, -1]])
    np.testing.assert_allclose(found[0, 0, 2:], [40, 40, 60, 60])
    assert detector.detection_f1(REFERENCE[1:], found[1:]) == 1.0  # samples and their labels slice together


def test_detection_f1_counts_missed_moved_and_relabelled_boxes():
    labels = detector.detections(REFERENCE)
    assert detector.detection_f1(REFERENCE, labels) == 1.0
    moved = REFERENCE.copy()
    moved[0, 0, :2] += 15  # the face's surviving anchors move by 15 px on a 20 px box: IoU below 0.5
    assert detector.detection_f1(moved, labels) == 2 * 2 / (3 + 3)
    relabelled = REFERENCE.copy()
    relabelled[1, 4 + FEET, 0], relabelled[1, 4 + FACE, 0] = 0.8, 0.0
    assert detector.detection_f1(relabelled, labels) == 2 * 2 / (3 + 3)
    missed = REFERENCE.copy()
    missed[0, 4 + FEET, 2] = 0.1
    assert detector.detection_f1(missed, labels) == 2 * 2 / (2 + 3)


def test_face_f1_compares_the_faces_accepted_at_mtcnns_threshold():
    reference = np.array([0.95, 0.75, 0.2, 0.69])  # the FP32 ONet accepts the first two
    probabilities = lambda face: np.column_stack([1 - np.asarray(face), face])  # noqa: E731 (softmax_2: [not face, face])
    assert faces.face_f1(probabilities([0.9, 0.8, 0.1, 0.5]), reference) == 1.0
    # one face lost (0.75 -> 0.65), one non-face accepted (0.69 -> 0.71): 1 matched of 2 + 2
    assert faces.face_f1(probabilities([0.9, 0.65, 0.1, 0.71]), reference) == 0.5
    assert faces.face_f1(probabilities([0.1, 0.1]), np.array([0.2, 0.3])) == 1.0  # nothing to accept, nothing accepted


def test_speech_f1_compares_the_frames_called_speech_at_silero_vads_threshold():
    reference = np.array([0.9, 0.6, 0.1, 0.45])  # FP32 calls the first two speech
    assert speech.speech_f1(np.array([[0.8], [0.55], [0.2], [0.3]]), reference) == 1.0
    assert speech.speech_f1(np.array([[0.8], [0.4], [0.2], [0.5]]), reference) == 0.5  # one lost, one added

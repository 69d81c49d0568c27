import numpy as np
import pytest
from onnx import TensorProto, helper

from qwt_onnx import quantize_with_report
from qwt_onnx.analysis.parts import output_parts
from qwt_onnx.api import load_fp32
from qwt_onnx.numerics.metrics import parts, sqnr_db_per_output
from qwt_onnx.report import format_summary
from qwt_onnx.runtime import session
from tests import graphs

YOLOX_PARTS = ("output[:, :, 0:4]", "output[:, :, 4:5]", "output[:, :, 5:7]")


def test_a_concat_of_boxes_and_scores_splits_its_output_through_reshapes_and_transposes():
    # per scale Concat(box Conv, objectness Sigmoid, class Sigmoid) on the channels, the scales
    # joined on the anchors, then channels last: each head is a part of the last axis
    assert output_parts(load_fp32(graphs.yolox_head()).graph) == YOLOX_PARTS


@pytest.mark.parametrize("keep_io_types", [False, True])
def test_a_half_precision_output_cast_back_from_float32_keeps_its_parts(keep_io_types):
    assert output_parts(load_fp32(graphs.in_precision(graphs.yolox_head(), np.float16, keep_io_types)).graph) == YOLOX_PARTS


def test_a_concat_of_like_tensors_is_not_split():
    # detector_neck joins its scales' head convs along the anchors: the same quantity each
    assert output_parts(load_fp32(graphs.detector_neck()).graph) == ()
    assert output_parts(load_fp32(graphs.resnet()).graph) == ()


def test_an_output_declared_other_than_its_parts_is_scored_whole():
    model = graphs.yolox_head()
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 6  # the parts add up to 7
    assert output_parts(load_fp32(model).graph) == ()


def test_a_concat_on_the_samples_axis_is_not_split():
    b = graphs.GraphBuilder()
    b.op("Concat", [b.op("Relu", ["x"], "/relu"), b.op("Sigmoid", ["x"], "/sigmoid")], "/join", axis=0)
    b.nodes[-1].output[0] = "y"
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["twice", 4])])
    assert output_parts(load_fp32(model).graph) == ()


def test_each_part_decides_by_default_and_the_user_can_score_the_output_whole():
    model = graphs.yolox_head()
    calib = graphs.samples(model, 40, seed=1)
    fast = dict(qwt=False, calib_method="minmax", bias_correction="off", rounding="nearest", progress=False)
    written, report = quantize_with_report(model, calib, **fast)
    assert report.output_parts == list(YOLOX_PARTS) and report.outputs == list(YOLOX_PARTS)
    heldout = {k: v[4::5] for k, v in calib.items()}
    reference, test = ({"output": session(m).run(None, heldout)[0]} for m in (model, written))
    measured = sqnr_db_per_output(parts(reference, YOLOX_PARTS), parts(test, YOLOX_PARTS))
    assert report.sqnr_ptq_db == pytest.approx(min(measured.values()), abs=1e-3)
    # the objectness is what pooling hides: the whole output reads better than its worst part
    assert sqnr_db_per_output(reference, test)["output"] > report.sqnr_ptq_db + 1.0
    assert "scored part by part" in format_summary(report, "model.onnx")

    _, whole = quantize_with_report(model, calib, outputs=("output",), **fast)
    assert whole.output_parts == [] and whole.sqnr_ptq_db == pytest.approx(sqnr_db_per_output(reference, test)["output"], abs=1e-3)



def _keypoint_head(mask_then_conv: bool = False):
    """A keypoint head, channels last: a Conv's offsets beside a Sigmoid heat map and that map's
    peaks (a max-pool NMS: the map where it equals its 3x3 max, else 0), one Concat; or, with
    ``mask_then_conv``, the peaks' mask applied inside the network, a Conv after it."""
    b = graphs.GraphBuilder(seed=3)
    features = b.op("Relu", [b.op("Conv", ["x", b.weight("c1", (8, 3, 3, 3))], "/c1", pads=[1] * 4)], "/relu")
    heat = b.op("Sigmoid", [b.op("Conv", [features, b.weight("heat", (1, 8, 1, 1))], "/heat")], "/sigmoid")
    pooled = b.op("MaxPool", [heat], "/pool", kernel_shape=[3, 3], pads=[1] * 4, strides=[1, 1])
    peaks = b.op("Mul", [heat, b.op("Cast", [b.op("Equal", [heat, pooled], "/peak")], "/mask", to=TensorProto.FLOAT)], "/nms")
    if mask_then_conv:
        b.op("Conv", [b.op("Mul", [features, peaks], "/gate"), b.weight("out", (2, 8, 1, 1))], "/out")
        channels = 2
    else:
        offsets = b.op("Conv", [features, b.weight("offsets", (2, 8, 1, 1))], "/offsets")
        b.op("Concat", [offsets, heat, peaks], "/join", axis=1)
        channels = 4
    b.op("Transpose", [b.nodes[-1].output[0]], "/nhwc", perm=[0, 2, 3, 1])
    b.nodes[-1].output[0] = "y"
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 8, channels])])


def test_a_part_computed_through_a_max_pool_nms_is_scored_on_the_heat_map_it_reads():
    model = _keypoint_head()
    written, report = quantize_with_report(model, graphs.samples(model, 40, seed=1), qwt=False, calib_method="minmax",
                                           progress=False)
    # the peaks flip with a step in the heat map: the map and its max-pool are scored instead of them
    assert report.output_parts == ["y[:, :, :, 0:2]", "y[:, :, :, 2:3]", "y[:, :, :, 3:4]", "/sigmoid_out", "/pool_out"]
    assert report.outputs == ["y[:, :, :, 0:2]", "y[:, :, :, 2:3]", "/sigmoid_out", "/pool_out"]
    assert any("y[:, :, :, 3:4]: a NonMaxSuppression, or a comparison" in w for w in report.warnings)
    assert [o.name for o in written.graph.output] == ["y"]


def test_a_comparison_that_a_weighted_op_follows_is_part_of_the_network_and_not_a_selection():
    model = _keypoint_head(mask_then_conv=True)
    _, report = quantize_with_report(model, graphs.samples(model, 40, seed=1), qwt=False, calib_method="minmax",
                                     progress=False)
    assert report.outputs == [] and not any("selections" in w for w in report.warnings)  # every output, whole

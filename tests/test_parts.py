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


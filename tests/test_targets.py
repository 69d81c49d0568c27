"""The QDQ graphs each runtime needs, and QwT on top of onnxruntime's own quantizer."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qwt_onnx import quantize, quantize_with_report
from qwt_onnx.numerics.metrics import mean_squared_error
from qwt_onnx.runtime import session
from tests import graphs


def test_trt_target_is_int8_symmetric_with_float_bias():
    model = graphs.resnet()
    out = quantize(model, graphs.samples(model, 40, seed=1), target="trt", calib_method="minmax", progress=False)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point = inits[node.input[2]]
            assert zero_point.dtype == np.int8 and not zero_point.any()
            assert (inits[node.input[1]] > 0).all()
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and not node.name.startswith("qwt/"):
            assert inits[node.input[2]].dtype == np.float32  # bias stays float (the classifier Gemm's too)
    # TensorRT-style placement: no Q/DQ on Conv outputs, so every activation Q feeds a weighted op
    producers = {o: n for n in out.graph.node for o in n.output}
    for node in out.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in producers:
            assert producers[node.input[0]].op_type != "Conv"


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("activations", ["QUInt8", "QInt8"])
def test_qwt_on_top_of_onnxruntime_quantize_static(tmp_path, per_channel, activations):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = graphs.resnet()
    calib = graphs.samples(model, 64, seed=1)
    onnx.save(model, tmp_path / "fp32.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter([{"image": calib["image"][i : i + 8]} for i in range(0, 64, 8)])

        def get_next(self):
            return next(self.rows, None)

    quantize_static(
        str(tmp_path / "fp32.onnx"),
        str(tmp_path / "ort_qdq.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=getattr(QuantType, activations),
        weight_type=QuantType.QInt8,
    )
    compensated, report = quantize_with_report(
        tmp_path / "fp32.onnx", calib, quantized=tmp_path / "ort_qdq.onnx", progress=False
    )
    assert report.method == "given" and report.compensated  # the layer folds, or QwT's branches on them
    assert any("can saturate on x86 CPUs without VNNI" in w for w in report.warnings)  # full-range int8 weights
    test = graphs.samples(model, 48, seed=2)
    reference = session(model).run(None, test)[0]
    ort_error = mean_squared_error({"y": reference}, {"y": session(onnx.load(str(tmp_path / "ort_qdq.onnx"))).run(None, test)[0]})
    qwt_error = mean_squared_error({"y": reference}, {"y": session(compensated).run(None, test)[0]})
    assert qwt_error < ort_error


def test_qwt_on_top_of_our_own_qdq_model_fits_against_its_quantization(tmp_path):
    model = graphs.resnet()
    calib = graphs.samples(model, 96, seed=1)
    ours = quantize(model, calib, tmp_path / "ptq.onnx", qwt=False, calib_method="percentile", progress=False, **graphs.SYSTEMATIC_ERROR)
    compensated, report = quantize_with_report(model, calib, quantized=tmp_path / "ptq.onnx", compensation="branch",
                                               progress=False)
    assert report.method == "given" and report.qwt_applied and not any("saturate" in w for w in report.warnings)
    test = graphs.samples(model, 48, seed=2)
    reference = {"y": session(model).run(None, test)[0]}
    ptq_error = mean_squared_error(reference, {"y": session(ours).run(None, test)[0]})
    qwt_error = mean_squared_error(reference, {"y": session(compensated).run(None, test)[0]})
    assert qwt_error < ptq_error

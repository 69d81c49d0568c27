"""Exact GELUs that read a dequantized tensor are written as one Gelu node, which onnxruntime runs
as one kernel (it cannot fuse them once it has given each reader a DequantizeLinear of its own)."""

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import qwt_onnx
from qwt_onnx.check import check
from qwt_onnx.passes.gelu import FuseDequantizedGeluPass
from qwt_onnx.runtime import session
from tests.graphs import GraphBuilder

SHAPE = ["N", 4, 6, 6]


def _dequantized_gelu(form: str, opset: int = 17, dequantized: bool = True) -> onnx.ModelProto:
    """Q/DQ → one of the exporters' spellings of x · ½(1 + erf(x / √2)) → Q/DQ."""
    b = GraphBuilder(seed=1)
    scale, zero = b.const("s", np.array(0.05, np.float32)), b.const("z", np.array(128, np.uint8))
    x = b.op("DequantizeLinear", [b.op("QuantizeLinear", ["x", scale, zero], "q"), scale, zero], "dq") if dequantized else "x"
    if form == "div":
        scaled = b.op("Div", [x, b.const("root2", np.array(math.sqrt(2), np.float32))], "div")
    else:
        scaled = b.op("Mul", [b.const("inv_root2", np.array(1 / math.sqrt(2), np.float32)), x], "div")
    plus_one = b.op("Add", [b.const("one", np.array(1.0, np.float32)), b.op("Erf", [scaled], "erf")], "add")
    half = b.const("half", np.array(0.5, np.float32))
    if form == "div":  # torch: (x · (1 + erf)) · ½
        y = b.op("Mul", [b.op("Mul", [x, plus_one], "mul"), half], "mul_half")
    elif form == "half_sum":  # x · ((1 + erf) · ½)
        y = b.op("Mul", [x, b.op("Mul", [plus_one, half], "mul_half")], "mul")
    else:  # (x · ½) · (1 + erf)
        y = b.op("Mul", [b.op("Mul", [half, x], "mul_half"), plus_one], "mul")
    b.op("DequantizeLinear", [b.op("QuantizeLinear", [y, scale, zero], "q_out"), scale, zero], "dq_out")
    b.nodes[-1].output[0] = "y"
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)], opset=opset)


def _fused(proto: onnx.ModelProto) -> onnx.ModelProto:
    model = ir.serde.deserialize_model(proto)
    FuseDequantizedGeluPass()(model)
    fused = ir.serde.serialize_model(model)
    onnx.checker.check_model(fused)
    return fused


def _kernels(proto: onnx.ModelProto, tmp_path) -> list[str]:
    """The op types of onnxruntime's optimized graph."""
    options = qwt_onnx.runtime.ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    qwt_onnx.runtime.ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("form", ["div", "mul", "half_sum"])
def test_a_gelu_of_a_dequantized_tensor_becomes_one_kernel_that_computes_the_same(form, tmp_path):
    proto = _dequantized_gelu(form)
    assert "Erf" in _kernels(proto, tmp_path)  # the reason: onnxruntime's fusion misses it
    fused = _fused(proto)
    gelu = [n for n in fused.graph.node if n.op_type == "Gelu"]
    assert len(gelu) == 1 and gelu[0].domain == "com.microsoft" and len(fused.graph.node) == 5
    assert {i.name for i in fused.graph.initializer} == {"s", "z"}  # the GELU's constants went with it
    kernels = _kernels(fused, tmp_path)
    assert "Erf" not in kernels and kernels.count("Gelu") == 1
    x = {"x": np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32) * 3}
    np.testing.assert_allclose(session(fused).run(None, x)[0], session(proto).run(None, x)[0], atol=0.0501)


def test_the_checker_tells_a_spelt_out_gelu_of_a_dequantized_tensor():
    proto = _dequantized_gelu("div")
    assert [f.op_type for f in check(proto).of("unfused")] == ["Erf"]
    assert [f.op_type for f in check(_fused(proto)).of("unfused")] == ["Gelu"]  # one float kernel between Q/DQ, as FP32's
    assert not check(_dequantized_gelu("div", dequantized=False)).of("unfused")


def test_from_opset_20_the_gelu_is_onnx_own():
    gelu = [n for n in _fused(_dequantized_gelu("div", opset=20)).graph.node if n.op_type == "Gelu"]
    assert len(gelu) == 1 and gelu[0].domain == ""


def test_a_gelu_of_a_float_tensor_or_one_whose_parts_are_read_elsewhere_stays():
    read_elsewhere = _dequantized_gelu("div")
    read_elsewhere.graph.output.append(helper.make_tensor_value_info("erf_out", TensorProto.FLOAT, SHAPE))
    for proto in (_dequantized_gelu("div", dequantized=False), read_elsewhere):
        assert [n.op_type for n in _fused(proto).graph.node] == [n.op_type for n in proto.graph.node]


def _conv_gelu_conv() -> onnx.ModelProto:
    b = GraphBuilder(seed=4)
    h = b.op("Conv", ["x", b.weight("w1", (8, 4, 3, 3)), b.const("b1", np.zeros(8, np.float32))], "conv1", pads=[1, 1, 1, 1])
    erf = b.op("Erf", [b.op("Div", [h, b.const("root2", np.array(math.sqrt(2), np.float32))], "div")], "erf")
    plus_one = b.op("Add", [erf, b.const("one", np.array(1.0, np.float32))], "add")
    gelu = b.op("Mul", [b.op("Mul", [h, plus_one], "mul"), b.const("half", np.array(0.5, np.float32))], "mul_half")
    b.op("Conv", [gelu, b.weight("w2", (4, 8, 1, 1))], "conv2")
    b.nodes[-1].output[0] = "y"
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)])


@pytest.mark.parametrize("target, written", [("ort", ["Gelu"]), ("trt", ["Div", "Erf", "Add", "Mul", "Mul"])])
def test_the_written_model_for_onnxruntime_has_one_gelu_between_its_convolutions(target, written):
    # a convolution's output is quantized for onnxruntime's QLinearConv, so its GELU reads a DequantizeLinear
    calib = {"x": np.random.default_rng(1).standard_normal((24, 4, 6, 6)).astype(np.float32)}
    proto = qwt_onnx.quantize(_conv_gelu_conv(), calib, target=target, qwt=False, progress=False)
    computed = [n.op_type for n in proto.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Conv")]
    assert computed == written

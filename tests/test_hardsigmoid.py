"""Hard-swish in its three spellings becomes ``x · HardSigmoid(x)``, and a quantized HardSigmoid
becomes the Add that onnxruntime runs on uint8 (QLinearAdd), computing the same."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import qwt_onnx
from qwt_onnx.check import check
from qwt_onnx.graph import prepare
from qwt_onnx.passes.hardsigmoid import FuseDequantizedHardSwishPass, HardSwishAsProductPass, IntegerHardSigmoidPass
from qwt_onnx.runtime import session
from tests.graphs import GraphBuilder

SHAPE = ["N", 4, 6, 6]
X = {"x": np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32) * 4}


def _io(b: GraphBuilder, opset: int = 17) -> onnx.ModelProto:
    b.nodes[-1].output[0] = "y"
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)], opset=opset)


def _hard_swish(form: str) -> onnx.ModelProto:
    b = GraphBuilder()
    if form == "op":
        b.op("HardSwish", ["x"], "hswish")
        return _io(b, opset=14)
    clip = b.op("Clip", [b.op("Add", ["x", b.const("three", np.float32(3))], "add"),
                         b.const("zero", np.float32(0)), b.const("six", np.float32(6))], "relu6")
    if form == "paddle":  # (x · clip(x + 3, 0, 6)) / 6
        b.op("Div", [b.op("Mul", ["x", clip], "mul"), b.const("div6", np.float32(6))], "div")
    elif form == "gate_first":  # x · (clip(x + 3, 0, 6) · 1/6)
        b.op("Mul", [b.op("Mul", [clip, b.const("sixth", np.float32(1 / 6))], "scale"), "x"], "mul")
    else:  # the gate alone, clip(x + 3, 0, 6) / 6
        b.op("Div", [clip, b.const("div6", np.float32(6))], "div")
    return _io(b)


def _rewritten(proto: onnx.ModelProto, rewrite: ir.passes.InPlacePass) -> onnx.ModelProto:
    model = ir.serde.deserialize_model(proto)
    rewrite(model)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    return out


@pytest.mark.parametrize("form, written", [("op", ["HardSigmoid", "Mul"]), ("paddle", ["HardSigmoid", "Mul"]),
                                           ("gate_first", ["HardSigmoid", "Mul"]), ("gate", ["HardSigmoid"])])
def test_every_spelling_of_hard_swish_becomes_a_gated_product(form, written):
    proto = _hard_swish(form)
    out = _rewritten(proto, HardSwishAsProductPass())
    assert [n.op_type for n in out.graph.node] == written and out.graph.node[-1].output[0] == "y"
    gate = out.graph.node[0]
    assert gate.input[0] == "x" and (len(written) == 1 or set(out.graph.node[1].input) == {"x", gate.output[0]})
    np.testing.assert_allclose(session(out).run(None, X)[0], session(proto).run(None, X)[0], rtol=1e-6, atol=1e-6)


def test_a_clip_that_is_no_hard_sigmoid_stays():
    b = GraphBuilder()
    clip = b.op("Clip", [b.op("Add", ["x", b.const("three", np.float32(3))], "add"),
                         b.const("zero", np.float32(0)), b.const("six", np.float32(6))], "relu6")
    b.op("Div", [clip, b.const("three_again", np.float32(3))], "div")  # reaches 2, not 1
    proto = _io(b)
    assert [n.op_type for n in _rewritten(proto, HardSwishAsProductPass()).graph.node] == ["Add", "Clip", "Div"]


def _quantized_hard_sigmoid(scale: float = 1 / 255, zero_point: int = 0, beta: float = 0.5) -> onnx.ModelProto:
    """Q/DQ → HardSigmoid → Q/DQ on a grid from ``zero_point``, ``scale`` a step."""
    b = GraphBuilder()
    s, z = b.const("s", np.float32(0.0437)), b.const("z", np.uint8(128))  # a step that makes few ties on the gate's grid
    x = b.op("DequantizeLinear", [b.op("QuantizeLinear", ["x", s, z], "q"), s, z], "dq")
    gate = b.op("HardSigmoid", [x], "hard_sigmoid", alpha=1 / 6, beta=beta)
    gs, gz = b.const("gs", np.float32(scale)), b.const("gz", np.uint8(zero_point))
    b.op("DequantizeLinear", [b.op("QuantizeLinear", [gate, gs, gz], "q_gate"), gs, gz], "dq_gate")
    return _io(b)


def _kernels(proto: onnx.ModelProto, tmp_path) -> list[str]:
    options = qwt_onnx.runtime.ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    qwt_onnx.runtime.ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("beta", [0.5, -0.25])
def test_a_quantized_hard_sigmoid_runs_as_qlinearadd_and_computes_the_same(beta, tmp_path):
    proto = _quantized_hard_sigmoid(beta=beta)
    assert "HardSigmoid" in _kernels(proto, tmp_path)  # the reason: no integer kernel for it
    out = _rewritten(proto, IntegerHardSigmoidPass())
    assert "HardSigmoid" not in [n.op_type for n in out.graph.node]
    assert "QLinearAdd" in _kernels(out, tmp_path) and "HardSigmoid" not in _kernels(out, tmp_path)
    # the QuantizeLinear's saturation clips at 0 and 1; the values are the same up to float rounding
    np.testing.assert_allclose(session(out).run(None, X)[0], session(proto).run(None, X)[0], atol=1 / 255 + 1e-6)
    assert np.mean(session(out).run(None, X)[0] == session(proto).run(None, X)[0]) > 0.98


def test_a_float_hard_swish_of_a_dequantized_tensor_is_one_node_again_from_opset_14():
    for opset, written in ((14, ["HardSwish"]), (13, ["HardSigmoid", "Mul"])):
        b = GraphBuilder()
        s, z = b.const("s", np.float32(0.05)), b.const("z", np.uint8(128))
        x = b.op("DequantizeLinear", [b.op("QuantizeLinear", ["x", s, z], "q"), s, z], "dq")
        b.op("Mul", [x, b.op("HardSigmoid", [x], "gate", alpha=1 / 6)], "hard_swish")
        proto = _io(b, opset=opset)
        out = _rewritten(proto, FuseDequantizedHardSwishPass())
        assert [n.op_type for n in out.graph.node][2:] == written and out.graph.node[-1].output[0] == "y"
        np.testing.assert_allclose(session(out).run(None, X)[0], session(proto).run(None, X)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale, zero_point", [(2 / 255, 0), (1 / 255, 10)])
def test_a_hard_sigmoid_whose_grid_does_not_clip_at_0_and_1_stays(scale, zero_point):
    proto = _quantized_hard_sigmoid(scale, zero_point)
    assert "HardSigmoid" in [n.op_type for n in _rewritten(proto, IntegerHardSigmoidPass()).graph.node]


def _conv_hard_swish_conv() -> onnx.ModelProto:
    b = GraphBuilder(seed=4)
    h = b.op("Conv", ["x", b.weight("w1", (8, 4, 3, 3)), b.const("b1", np.zeros(8, np.float32))], "conv1", pads=[1, 1, 1, 1])
    b.op("Conv", [b.op("HardSwish", [h], "hswish"), b.weight("w2", (4, 8, 1, 1))], "conv2")
    return _io(b, opset=14)


@pytest.mark.parametrize("target, residuals, computed", [("ort", "int8", ["Add", "Mul"]), ("ort", "float", ["HardSwish"]),
                                                         ("trt", "int8", ["HardSigmoid", "Mul"])])
def test_a_hard_swish_between_convolutions_runs_on_uint8_for_onnxruntime(target, residuals, computed, tmp_path):
    # left float, it is one HardSwish again for onnxruntime, which dequantizes the map once for it (twice for a
    # HardSigmoid and a Mul that both read it)
    calib = {"x": np.random.default_rng(1).standard_normal((24, 4, 6, 6)).astype(np.float32)}
    proto = qwt_onnx.quantize(_conv_hard_swish_conv(), calib, target=target, residuals=residuals, qwt=False, progress=False)
    assert [n.op_type for n in proto.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Conv")] == computed
    if computed[0] == "Add":
        found = check(proto)
        assert found.integer_kernels["QLinearAdd"] == found.integer_kernels["QLinearMul"] == 1
        assert not [f for f in found.of("unfused") if f.op_type != "Conv"]  # (the last one's output is the graph's)
        fp = _conv_hard_swish_conv()
        x = {"x": np.random.default_rng(2).standard_normal((4, 4, 6, 6)).astype(np.float32)}
        reference, quantized = session(fp).run(None, x)[0], session(proto).run(None, x)[0]
        assert 10 * np.log10(np.sum(reference**2) / np.sum((quantized - reference) ** 2)) > 25
    if computed == ["HardSwish"]:
        # one for the HardSwish's input (where a HardSigmoid and a Mul would read a copy each), conv2's input and weights
        assert _kernels(proto, tmp_path).count("DequantizeLinear") == 3
    prepared = prepare.prepare(ir.serde.deserialize_model(_conv_hard_swish_conv()))
    assert "HardSwish" not in [n.op_type for n in prepared.graph]


def test_a_squeeze_excitation_after_a_hard_swish_runs_on_uint8_too():
    # MobileNetV3's block: conv, hard-swish, then a squeeze-excitation that scales the hard-swish's product
    b = GraphBuilder(seed=5)
    h = b.op("Conv", ["x", b.weight("w1", (8, 4, 3, 3))], "conv1", pads=[1, 1, 1, 1])
    act = b.op("Mul", [h, b.op("HardSigmoid", [h], "hsig", alpha=1 / 6)], "hswish")
    squeezed = b.op("Relu", [b.op("Conv", [b.op("GlobalAveragePool", [act], "pool"), b.weight("w2", (4, 8, 1, 1))], "reduce")],
                    "relu")
    gate = b.op("HardSigmoid", [b.op("Conv", [squeezed, b.weight("w3", (8, 4, 1, 1))], "expand")], "gate", alpha=1 / 6)
    b.op("Conv", [b.op("Mul", [act, gate], "scale"), b.weight("w4", (4, 8, 1, 1))], "project")
    fp = _io(b)
    calib = {"x": np.random.default_rng(1).standard_normal((24, 4, 6, 6)).astype(np.float32)}
    from qwt_onnx.api import quantize_with_report

    proto, told = quantize_with_report(fp, calib, residuals="int8", qwt=False, progress=False)
    assert (told.int8_hard_swishes, told.int8_silu_gates) == (1, 1)  # the gate after the hard-swish counted as a gate
    found = check(proto)
    assert found.integer_kernels["QLinearMul"] == 2 and found.integer_kernels["QLinearAdd"] == 2  # each HardSigmoid an Add
    assert not [f for f in found.of("unfused") if f.op_type != "Conv"]
    x = {"x": np.random.default_rng(2).standard_normal((4, 4, 6, 6)).astype(np.float32)}
    reference, quantized = session(fp).run(None, x)[0], session(proto).run(None, x)[0]
    assert 10 * np.log10(np.sum(reference**2) / np.sum((quantized - reference) ** 2)) > 20


def _squeeze_excitation_and_hard_swish() -> onnx.ModelProto:
    # PP-LCNetV3's block: a squeeze-excitation on a convolution's output, then a convolution and its hard-swish
    b = GraphBuilder(seed=5)
    h = b.op("Conv", ["x", b.weight("w1", (8, 4, 3, 3))], "conv1", pads=[1, 1, 1, 1])
    squeezed = b.op("Relu", [b.op("Conv", [b.op("GlobalAveragePool", [h], "pool"), b.weight("w2", (4, 8, 1, 1))], "reduce")],
                    "relu")
    gate = b.op("Sigmoid", [b.op("Conv", [squeezed, b.weight("w3", (8, 4, 1, 1))], "expand")], "gate")
    h2 = b.op("Conv", [b.op("Mul", [h, gate], "scale"), b.weight("w4", (8, 8, 1, 1))], "pointwise")
    b.op("Conv", [b.op("HardSwish", [h2], "hswish"), b.weight("w5", (4, 8, 1, 1))], "project")
    return _io(b, opset=14)


def test_hard_swishes_can_stay_float_while_the_gates_run_on_uint8_and_the_summary_counts_them_apart():
    from qwt_onnx.analysis.placement import place
    from qwt_onnx.api import quantize_with_report
    from qwt_onnx.report import format_summary

    prepared = prepare.prepare(ir.serde.deserialize_model(_squeeze_excitation_and_hard_swish()))
    all_gated = set(place(prepared.graph, "ort", int8_silus=True).observed_names)
    but_hard_swishes = set(place(prepared.graph, "ort", int8_silus=True, float_hard_swishes=True).observed_names)
    assert {"gate_out", "scale_out"} <= but_hard_swishes and all_gated - but_hard_swishes == {"hswish_out_gate"}
    calib = {"x": np.random.default_rng(1).standard_normal((24, 4, 6, 6)).astype(np.float32)}
    options = {"qwt": False, "progress": False, "calib_method": "minmax", "rounding": "nearest", "equalization": "off"}
    told = {r: quantize_with_report(_squeeze_excitation_and_hard_swish(), calib, residuals=r, **options)[1]
            for r in ("float", "int8")}
    assert (told["int8"].int8_silu_gates, told["int8"].int8_hard_swishes, told["int8"].float_hard_swishes) == (1, 1, 0)
    assert (told["float"].float_silu_gates, told["float"].float_hard_swishes, told["float"].int8_hard_swishes) == (1, 1, 0)
    assert "hard-swishes with their gates and products quantized, in integer kernels: 1" in format_summary(told["int8"], "m")
    assert ("hard-swishes in float between integer convolutions, as --residuals float asks: 1"
            in format_summary(told["float"], "m"))

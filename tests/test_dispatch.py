"""A model that is one If on what it is fed (Silero VAD v4 on its sample rate): quantized in the branch calibration takes."""

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwt_onnx.api import quantize_with_report
from qwt_onnx.runtime import session
from tests import graphs


def _branch(name: str, seed: int) -> onnx.GraphProto:
    """Conv → Relu → Conv, plus the input: a residual block reading the main graph's ``x``."""
    b = graphs.GraphBuilder(seed)
    h = b.op("Relu", [b.op("Conv", ["x", b.weight(f"{name}/w1", (8, 8, 3, 3)), b.const(f"{name}/b1", np.zeros(8, np.float32))],
                          f"{name}/conv1", pads=[1, 1, 1, 1])], f"{name}/relu")
    h = b.op("Conv", [h, b.weight(f"{name}/w2", (8, 8, 3, 3)), b.const(f"{name}/b2", np.zeros(8, np.float32))], f"{name}/conv2",
             pads=[1, 1, 1, 1])
    y = b.op("Add", [h, "x"], f"{name}/add")
    echo = b.op("Identity", ["x"], f"{name}/echo")  # an output that is an input as it is
    outputs = [helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in (y, echo)]
    return helper.make_graph(b.nodes, name, [], outputs, b.initializers)


def dispatch_model() -> onnx.ModelProto:
    """``y = rate == 16000 ? block_a(x) : block_b(x)``: every op but the condition inside the If."""
    rate = numpy_helper.from_array(np.array(16000, np.int64), "expected_rate")
    nodes = [helper.make_node("Equal", ["rate", "expected_rate"], ["is_16k"], name="equal"),
             helper.make_node("If", ["is_16k"], ["y", "echo"], name="dispatch", then_branch=_branch("a", 0),
                              else_branch=_branch("b", 1))]
    graph = helper.make_graph(nodes, "dispatch", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 8, 8]),
                                                  helper.make_tensor_value_info("rate", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info(v, TensorProto.FLOAT, ["n", 8, 8, 8]) for v in ("y", "echo")], [rate])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray, rate: int) -> list[np.ndarray]:
    return session(model).run(None, {"x": x, "rate": np.array(rate, np.int64)})


@pytest.mark.parametrize("rate, quantized, kept", [(16000, "then_branch", "else_branch"), (8000, "else_branch", "then_branch")])
def test_the_branch_the_calibration_samples_take_is_quantized_and_the_other_kept_as_it_was(rate, quantized, kept):
    model = dispatch_model()
    x = np.random.default_rng(0).normal(size=(160, 8, 8, 8)).astype(np.float32)
    written, report = quantize_with_report(model, {"x": x, "rate": np.array(rate)}, qwt=False, progress=False)
    onnx.checker.check_model(written, full_check=True)
    assert [n.op_type for n in written.graph.node] == ["Equal", "If"]
    assert [v.name for v in written.graph.input] == ["x", "rate"] and [v.name for v in written.graph.output] == ["y", "echo"]
    branches = {a.name: a.g for a in written.graph.node[1].attribute}
    original = {a.name: a.g for a in model.graph.node[1].attribute}
    assert Counter(n.op_type for n in branches[quantized].node)["QuantizeLinear"] >= 3
    assert [n.op_type for n in branches[kept].node] == [n.op_type for n in original[kept].node]  # no Q/DQ
    assert any(f"every calibration sample takes its {quantized}" in w for w in report.warnings), report.warnings
    # the branch taken runs quantized; fed what calibration never showed, the model computes the other in float
    (reference, echo), other = _run(model, x, rate), 24000 - rate
    (y, echoed) = _run(written, x, rate)
    assert 0 < np.mean((y - reference) ** 2) < 1e-3 * np.mean(reference**2)
    np.testing.assert_array_equal(echoed, echo)
    for computed, expected in zip(_run(written, x, other), _run(model, x, other)):
        np.testing.assert_array_equal(computed, expected)


def test_a_model_that_is_not_only_an_if_on_its_inputs_still_says_what_stays_float():
    model = dispatch_model()
    model.graph.node.append(helper.make_node("Relu", ["y"], ["z"], name="after"))  # an op beside the If
    model.graph.output[0].name = "z"
    x = np.random.default_rng(0).normal(size=(32, 8, 8, 8)).astype(np.float32)
    with pytest.raises(Exception, match="inside If, Loop or Scan bodies"):
        quantize_with_report(model, {"x": x, "rate": np.array(16000)}, qwt=False, progress=False)


def test_a_subgraph_reads_a_dequantized_tensor_that_a_transpose_moves_through_its_own_quantizer():
    # onnxruntime 1.32 moves a DequantizeLinear forward past a Transpose and aborts where it meets an If
    # branch's read of the Transpose output (Silero VAD v4's LSTM branch, transposed encoder output)
    b = graphs.GraphBuilder(0)
    h = b.op("Conv", ["x", b.weight("w", (8, 8, 1, 1)), b.const("bias", np.zeros(8, np.float32))], "conv")
    h = b.op("Conv", [h, b.weight("w2", (8, 8, 1, 1)), b.const("bias2", np.zeros(8, np.float32))], "conv2")
    t = b.op("Transpose", [h], "transpose", perm=[0, 2, 3, 1])
    reads = [helper.make_node("Relu", [t], ["read"], name="read")]
    copy = [helper.make_node("Identity", [t], ["copied"], name="copy")]
    branch = lambda nodes, out: helper.make_graph(  # noqa: E731
        nodes, out, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    b.nodes.append(helper.make_node("If", ["flag"], ["y"], name="if", then_branch=branch(reads, "read"),
                                    else_branch=branch(copy, "copied")))
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 4, 4]),
                     helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 4, 8])])
    x = np.random.default_rng(0).normal(size=(32, 8, 4, 4)).astype(np.float32)
    # the run scores the models it builds in onnxruntime sessions: without the pair it aborts there
    written, _ = quantize_with_report(model, {"x": x, "flag": np.array(True)}, qwt=False, progress=False)
    producers = {o: n for n in written.graph.node for o in n.output}
    read = next(a.g for a in next(n for n in written.graph.node if n.op_type == "If").attribute if a.name == "then_branch")
    dq = producers[read.node[0].input[0]]
    assert dq.op_type == "DequantizeLinear" and producers[producers[dq.input[0]].input[0]].op_type == "Transpose"
    session(written)

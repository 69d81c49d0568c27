import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwt_onnx import quantization as qm
from qwt_onnx.passes import prepare, qdq
from qwt_onnx.runtime import session
from tests.graphs import GraphBuilder


def _single_op(op_type: str, weight_shape, x_shape, **attrs) -> onnx.ModelProto:
    b = GraphBuilder(seed=7)
    inputs = ["x", b.weight("w", weight_shape)]
    b.op(op_type, inputs, "op", **attrs)
    b.nodes[-1].output[0] = "y"
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(x_shape))])


CASES = [
    ("Conv", (8, 4, 3, 3), ["N", 4, 6, 6], {}, 0),
    ("MatMul", (4, 8), ["N", 5, 4], {}, 1),
    ("Gemm", (4, 8), ["N", 4], {"transB": 0}, 1),
    ("Gemm", (8, 4), ["N", 4], {"transB": 1}, 0),
]


@pytest.mark.parametrize("op_type, weight_shape, x_shape, attrs, axis", CASES)
@pytest.mark.parametrize("target", ["ort", "trt"])
def test_weights_are_quantized_per_output_channel_on_the_right_axis(op_type, weight_shape, x_shape, attrs, axis, target):
    proto = _single_op(op_type, weight_shape, x_shape, **attrs)
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    placement = qdq.place(model.graph, target)
    qdq.InsertQdqPass({name: (-2.0, 3.0) for name in placement.observed_names}, target)(model)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w_quantized")
    assert helper.get_attribute_value(next(a for a in dq.attribute if a.name == "axis")) == axis
    w = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "w"))
    scale = inits["w_scale"]
    assert scale.shape == (weight_shape[axis],)
    expected = qm.symmetric_weight_params(w, axis)
    np.testing.assert_allclose(scale, expected.scale)
    assert inits["w_quantized"].dtype == np.int8 and not inits["w_zero_point"].any()
    assert "w" not in inits  # the float weight is gone

    # onnxruntime's DequantizeLinear gives back numpy's reference arithmetic
    probe = onnx.ModelProto()
    probe.CopyFrom(out)
    probe.graph.output.append(onnx.ValueInfoProto(name=dq.output[0]))
    feeds = {"x": np.zeros([d if isinstance(d, int) else 2 for d in x_shape], np.float32)}
    got = session(probe).run([dq.output[0]], feeds)[0]
    np.testing.assert_array_equal(got, qm.dequantize(inits["w_quantized"], expected, axis))


@pytest.mark.parametrize("target, dtype", [("ort", np.uint8), ("trt", np.int8)])
def test_activations_are_quantized_per_tensor_with_the_target_zero_point(target, dtype):
    proto = _single_op("MatMul", (4, 8), ["N", 5, 4])
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    qdq.InsertQdqPass({"x": (-1.0, 3.0)}, target)(model)
    out = ir.serde.serialize_model(model)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert inits["x_scale"].shape == () and inits["x_zero_point"].dtype == dtype
    if target == "trt":
        assert inits["x_zero_point"] == 0
    matmul = next(n for n in out.graph.node if n.op_type == "MatMul")
    assert matmul.input[0] == "x_dequantized"


def test_ort_target_quantizes_conv_outputs_and_absorbs_a_following_relu():
    b = GraphBuilder()
    h = b.op("Relu", [b.op("Conv", ["x", b.weight("w1", (8, 4, 1, 1))], "conv1")], "relu1")
    b.op("Conv", [h, b.weight("w2", (8, 8, 1, 1))], "conv2")
    b.nodes[-1].output[0] = "y"
    proto = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3, 3])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)])
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    placement = qdq.place(model.graph, "ort")
    assert sorted(placement.observed_names) == ["relu1_out", "x"]
    qdq.InsertQdqPass({"relu1_out": (0.0, 5.0), "x": (-5.0, 5.0)}, "ort")(model)
    ops = [n.op_type for n in model.graph]
    assert "Relu" not in ops and ops.count("QuantizeLinear") == 2
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 3)).astype(np.float32)
    reference = session(proto).run(None, {"x": x})[0]
    quantized = session(ir.serde.serialize_model(model)).run(None, {"x": x})[0]
    assert np.abs(quantized - reference).max() < 0.05 * np.abs(reference).max()


def test_excluded_nodes_and_op_types_keep_float_weights_and_inputs():
    from tests import graphs

    model = prepare.prepare(ir.serde.deserialize_model(graphs.resnet()))
    everything = qdq.place(model.graph, "ort")
    excluded = qdq.Exclusions(nodes=(r"/stem/.*",), op_types=("Gemm",))
    placement = qdq.place(model.graph, "ort", excluded)
    readers = {node.name for site in placement.weights for node, _ in site.readers}
    assert readers and not any(name.startswith("/stem/") for name in readers)
    assert all(node.op_type != "Gemm" for site in placement.weights for node, _ in site.readers)
    assert len(placement.weights) == len(everything.weights) - 2  # the stem conv and the classifier
    qdq.InsertQdqPass({name: (-2.0, 3.0) for name in placement.observed_names}, "ort", excluded)(model)
    stem = next(n for n in model.graph if n.name.startswith("/stem/") and n.op_type == "Conv")
    assert stem.inputs[0].producer() is None and stem.inputs[1].const_value is not None  # float input and weight
    assert excluded.unmatched(model.graph) == []
    assert qdq.Exclusions(nodes=("/no/such/node",)).unmatched(model.graph) == ["/no/such/node"]

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from qwt_onnx import quantize_with_report
from qwt_onnx.graph import extract, prepare
from qwt_onnx.runtime import Runner, session
from tests import graphs
from tests.graphs import GraphBuilder


def _model_with_a_shape_taken_before_the_cut():
    b = GraphBuilder()
    a = b.op("Add", ["x", b.const("one", np.float32(1.0))], "pre")
    shape = b.op("Shape", ["x"], "shape_of_x")  # computed outside the block, from the graph input
    flat = b.op("Reshape", [b.op("Mul", [a, b.const("two", np.float32(2.0))], "mul"), shape], "reshape")
    b.op("Relu", [flat], "relu")
    b.nodes[-1].output[0] = "y"
    return b.model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )


def test_values_computed_before_the_cut_become_context_inputs():
    model = prepare.prepare(ir.serde.deserialize_model(_model_with_a_shape_taken_before_the_cut()))
    sub = extract.extract(model, ["pre_out"], ["y"])
    assert sub.inputs == ("pre_out",) and sub.context == ("shape_of_x_out",) and sub.graph_inputs == ()
    assert [n.op_type for n in sub.proto.graph.node] == ["Mul", "Reshape", "Relu"]
    context = Runner(extract.context_model(model, list(sub.context)).proto)({"x": np.zeros((3, 4), np.float32)})
    out = Runner(sub.proto)({"pre_out": np.full((3, 4), -1.0, np.float32), **context})
    np.testing.assert_array_equal(out["y"], np.zeros((3, 4), np.float32))


def test_only_the_cut_values_the_outputs_are_computed_from_are_fed_where_asked():
    model = prepare.prepare(ir.serde.deserialize_model(_model_with_a_shape_taken_before_the_cut()))
    assert extract.extract(model, ["x", "pre_out"], ["y"]).inputs == ("x", "pre_out")
    # y reads pre_out, and x only through the shape, which the cut at pre_out does not stop
    assert extract.extract(model, ["x", "pre_out"], ["y"], only_read=True).inputs == ("x", "pre_out")
    assert extract.extract(model, ["pre_out", "x"], ["mul_out"], only_read=True).inputs == ("pre_out",)
    assert extract.extract(model, ["mul_out", "pre_out"], ["mul_out"], only_read=True).inputs == ("mul_out",)  # an output cut
    assert extract.extract(model, ["y", "pre_out"], ["shape_of_x_out"], only_read=True).inputs == ("y",)  # none: the first


def test_a_model_without_blocks_is_written_as_ptq_with_a_warning(caplog):
    b = GraphBuilder()  # one chain block that changes rank: no linear branch maps its input to its output
    fc = b.op("MatMul", ["x", b.weight("w1", (4, 4))], "fc1")
    b.op("Relu", [b.op("ReduceMean", [fc], "pool", axes=[1], keepdims=0)], "act")
    b.nodes[-1].output[0] = "y"
    model = b.model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    out, report = quantize_with_report(model, graphs.samples(model, 20, seed=0), calib_method="minmax", progress=False)
    assert not report.qwt_applied and any("no residual or transformer blocks" in w for w in report.warnings)
    assert not any(n.name.startswith("qwt/") for n in out.graph.node)
    session(out).run(None, graphs.samples(model, 3, seed=1))

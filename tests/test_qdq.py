import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwt_onnx import observe
from qwt_onnx.analysis.placement import Exclusions, log_front_end, place
from qwt_onnx.calibration import CalibrationSet
from qwt_onnx.check import check
from qwt_onnx.graph import prepare
from qwt_onnx.graph import query as g
from qwt_onnx.numerics import quantization as qm
from qwt_onnx.numerics import saturation
from qwt_onnx.numerics.ranges import compute_range
from qwt_onnx.passes import qdq
from qwt_onnx.passes.hardsigmoid import IntegerHardSigmoidPass
from qwt_onnx.runtime import session
from tests import graphs
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
    placement = place(model.graph, target)
    qdq.InsertQdqPass({name: (-2.0, 3.0) for name in placement.observed_names}, target)(model)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w_quantized")
    assert helper.get_attribute_value(next(a for a in dq.attribute if a.name == "axis")) == axis
    w = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "w"))
    scale = inits["w_scale"]
    assert scale.shape == (weight_shape[axis],)
    # the Q/DQ pass's default weight range is portable; the tests below give it per target
    expected = qm.symmetric_weight_params(w, axis, pair_safe=True)
    np.testing.assert_allclose(scale, expected.scale)
    assert inits["w_quantized"].dtype == np.int8 and not inits["w_zero_point"].any()
    assert not saturation.overflowing_pairs(inits["w_quantized"], axis).any()
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
    placement = place(model.graph, "ort")
    assert sorted(placement.observed_names) == ["relu1_out", "x"]
    qdq.InsertQdqPass({"relu1_out": (0.0, 5.0), "x": (-5.0, 5.0)}, "ort")(model)
    ops = [n.op_type for n in model.graph]
    assert "Relu" not in ops and ops.count("QuantizeLinear") == 2
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 3)).astype(np.float32)
    reference = session(proto).run(None, {"x": x})[0]
    quantized = session(ir.serde.serialize_model(model)).run(None, {"x": x})[0]
    assert np.abs(quantized - reference).max() < 0.05 * np.abs(reference).max()


def _relu_output_fed_on(input_dims: list, output_dims: list) -> onnx.ModelProto:
    """x -> Conv -> Relu, whose output ``features`` is a graph output and read by a second Conv
    (``y``), as DeepFilterNet's encoder returns each conv stage's Relu output and feeds it on."""
    b = GraphBuilder()
    b.op("Relu", [b.op("Conv", ["x", b.weight("w1", (8, 4, 1, 1))], "conv1")], "relu1")
    b.nodes[-1].output[0] = "features"
    b.op("Conv", ["features", b.weight("w2", (8, 8, 1, 1))], "conv2")
    b.nodes[-1].output[0] = "y"
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, input_dims)],
                   [helper.make_tensor_value_info(name, TensorProto.FLOAT, output_dims) for name in ("features", "y")])


def test_a_relu_whose_output_is_a_graph_output_is_absorbed_and_the_output_is_dequantized_once():
    # left in float, the Relu ran between a DequantizeLinear and a second QuantizeLinear of the
    # same values, with the layout transposes around it, as onnxruntime's quantize_static does not
    proto = _relu_output_fed_on(["N", 4, 3, 3], [None] * 4)
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    assert sorted(place(model.graph, "ort").observed_names) == ["features", "x"]
    qdq.InsertQdqPass({"features": (0.0, 5.0), "x": (-5.0, 5.0)}, "ort")(model)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    producer = {name: n for n in out.graph.node for name in n.output}
    assert [o.name for o in out.graph.output] == ["features", "y"]
    assert producer["features"].op_type == "DequantizeLinear"
    ops = [n.op_type for n in out.graph.node]
    assert "Relu" not in ops and ops.count("QuantizeLinear") == 2
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 3)).astype(np.float32)
    reference = session(proto).run(None, {"x": x})
    quantized = session(out).run(None, {"x": x})
    for ref, got in zip(reference, quantized):
        assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_a_graph_output_whose_relu_is_absorbed_keeps_its_declared_shape():
    # it took the shape inferred for the Conv output before the Relu: DeepFilterNet3's written
    # encoder declared e0 as [unk__0, 64, unk__4, unk__5], not the [Relue0_dim_0, 64, S, ...] it was given
    declared = ["N", 8, "frames", "bands"]
    model = prepare.prepare(ir.serde.deserialize_model(_relu_output_fed_on(["N", 4, "T", "F"], declared)))
    qdq.InsertQdqPass({"features": (0.0, 5.0), "x": (-5.0, 5.0)}, "ort")(model)
    out = ir.serde.serialize_model(model)
    assert "Relu" not in [n.op_type for n in out.graph.node]
    assert [d.dim_param or d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim] == declared


def test_a_head_conv_whose_output_only_moves_to_a_graph_output_keeps_a_float_output():
    # an SSD-style detector (BlazeFace from mediapipe via tf2onnx): each scale's score conv is
    # reshaped into anchors and concatenated into the output; quantized there, the raw logits'
    # far tail (down to -2000) set a step of 8 on the logits near 0 that decide a face
    b = GraphBuilder()
    h = b.op("Relu", [b.op("Conv", ["x", b.weight("w1", (8, 4, 1, 1))], "stem")], "stem_relu")
    coarse = b.op("Relu", [b.op("Conv", [h, b.weight("w2", (8, 8, 1, 1))], "down")], "down_relu")
    shape = b.const("anchors", np.array([0, -1, 1], np.int64))
    fine = b.op("Reshape", [b.op("Transpose", [b.op("Conv", [h, b.weight("w3", (2, 8, 1, 1))], "score_fine")], "t_fine",
                                               perm=[0, 2, 3, 1]), shape], "r_fine")
    coarse_scores = b.op("Conv", [coarse, b.weight("w4", (2, 8, 1, 1))], "score_coarse")
    b.op("Concat", [fine, b.op("Reshape", [coarse_scores, shape], "r_coarse")], "scores", axis=1)
    b.nodes[-1].output[0] = "scores"
    b.op("Sigmoid", [b.op("Conv", [coarse, b.weight("w5", (2, 8, 1, 1))], "gate")], "gate_sigmoid")
    b.nodes[-1].output[0] = "gates"
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None] * 3),
               helper.make_tensor_value_info("gates", TensorProto.FLOAT, [None] * 4)]
    proto = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3, 3])], outputs)
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    observed = set(place(model.graph, "ort").observed_names)
    assert {"x", "stem_relu_out", "down_relu_out", "gate_out"} <= observed  # the Sigmoid's input is no mere move
    assert not observed & {"score_fine_out", "score_coarse_out"}


def test_int8_residuals_quantize_a_stream_for_every_reader_through_its_shortcut():
    # a BlazeFace block: y = Relu(conv(x) + Pad(MaxPool(x))); y feeds the next conv and the next shortcut
    b = GraphBuilder()
    x = b.op("Relu", [b.op("Conv", ["image", b.weight("w0", (8, 4, 1, 1))], "stem")], "stem_relu")
    pooled = b.op("MaxPool", [x], "pool", kernel_shape=[2, 2], strides=[2, 2])
    padded = b.op("Pad", [pooled, b.const("pads", np.array([0, 0, 0, 0, 0, 8, 0, 0], np.int64))], "pad")
    body = b.op("Conv", [x, b.weight("w1", (16, 8, 2, 2))], "body", strides=[2, 2])
    y = b.op("Relu", [b.op("Add", [body, padded], "add")], "relu")
    shortcut = b.op("Add", [b.op("Conv", [y, b.weight("w2", (16, 16, 1, 1))], "next"), y], "next_add")
    b.op("Conv", [shortcut, b.weight("w3", (2, 16, 1, 1))], "head")
    b.nodes[-1].output[0] = "out"
    proto = b.model([helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 4, 4, 4])],
                    [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None] * 4)])
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    plain = {site.observed.name: site for site in place(model.graph, "ort").activations}
    assert [node.name for node, _ in plain["relu_out"].readers] == ["next"]  # the shortcut reads the float stream
    sites = place(model.graph, "ort", int8_residuals=True).activations
    stream = next(site for site in sites if site.observed.name == "relu_out" and site.absorbed is not None)
    assert stream.value.name == "add_out" and stream.absorbed.name == "relu"
    assert {node.name for node, _ in stream.readers} == {"next", "next_add"}
    moved = {site.value.name for site in sites if site.observed.name == "stem_relu_out" and site.value.name != "stem_out"}
    assert moved == {"pool_out", "pad_out"}  # the shortcut carried on the stream's own range
    ranges = {"image": (-3.0, 3.0), "stem_relu_out": (0.0, 4.0), "body_out": (-6.0, 6.0), "relu_out": (0.0, 8.0),
              "next_out": (-8.0, 8.0), "next_add_out": (-8.0, 16.0)}
    qdq.InsertQdqPass(ranges, "ort", int8_residuals=True)(model)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    assert "Relu" not in {n.op_type for n in out.graph.node}
    image = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
    reference, quantized = session(proto).run(None, {"image": image})[0], session(out).run(None, {"image": image})[0]
    assert np.abs(quantized - reference).max() < 0.1 * np.abs(reference).max()


def test_int8_silus_run_on_uint8_in_onnxruntime():
    proto = graphs.detector_neck()
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    gates = {f"{name}/{part}_out" for name in ("/stem", "/down", "/neck") for part in ("sigmoid", "act")}
    placement = place(model.graph, "ort", int8_silus=True)
    assert gates <= set(placement.observed_names)
    sigmoids = {name for name in gates if "sigmoid" in name}
    assert not sigmoids & set(place(model.graph, "ort", int8_residuals=True).observed_names)
    assert not sigmoids & set(place(model.graph, "trt", int8_silus=True).observed_names)  # TensorRT fuses SiLU into its Conv
    calib = CalibrationSet(graphs.samples(proto, 8, seed=0), prepare.input_specs(model))
    seen = observe.observe(prepare.to_proto(model), placement.observed_names, calib, 8)
    ranges = {name: compute_range(observer, "minmax") for name, observer in seen.ranges.items()}
    qdq.InsertQdqPass(ranges, "ort", int8_silus=True)(model)
    out = ir.serde.serialize_model(model)
    found = check(out)
    assert found.integer_kernels["QLinearSigmoid"] == found.integer_kernels["QLinearMul"] == 3
    assert not [f for f in found.of("unfused") if f.op_type in ("Sigmoid", "Mul")]  # none left in float
    image = graphs.samples(proto, 4, seed=1)["image"]
    reference, quantized = session(proto).run(None, {"image": image})[0], session(out).run(None, {"image": image})[0]
    assert 10 * np.log10(np.sum(reference**2) / np.sum((quantized - reference) ** 2)) > 25
    # a Sigmoid whose output the graph gives out too is left float
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    exposed.graph.output.append(helper.make_tensor_value_info("/neck/sigmoid_out", TensorProto.FLOAT, None))
    observed = place(prepare.prepare(ir.serde.deserialize_model(exposed)).graph, "ort", int8_silus=True).observed_names
    assert "/down/sigmoid_out" in observed and "/neck/sigmoid_out" not in observed


@pytest.mark.parametrize("gate_op", ["HardSigmoid", "Sigmoid"])
def test_int8_silus_run_a_squeeze_excitation_gate_and_a_hard_swish_as_qlinearmul(gate_op):
    # PP-LCNet's and PP-OCRv6's SE block: x · HardSigmoid(conv(relu(conv(pool(x))))), one gate per channel, then a
    # residual Add; after it a hard-swish, x · HardSigmoid(x), whose HardSigmoid then runs as QLinearAdd
    b = GraphBuilder(seed=7)
    x = b.op("Conv", ["image", b.weight("w0", (8, 4, 3, 3))], "dw", pads=[1, 1, 1, 1])
    squeezed = b.op("Relu", [b.op("Conv", [b.op("GlobalAveragePool", [x], "pool"), b.weight("w1", (4, 8, 1, 1))], "reduce")],
                    "relu")
    gate = b.op(gate_op, [b.op("Conv", [squeezed, b.weight("w2", (8, 4, 1, 1))], "expand")], "gate")
    scaled = b.op("Mul", [x, gate], "scale")
    y = b.op("Add", [b.op("Conv", [scaled, b.weight("w3", (8, 8, 1, 1))], "pw"), scaled], "residual")
    h = b.op("Conv", [y, b.weight("w4", (8, 8, 1, 1))], "next")
    b.op("Conv", [b.op("Mul", [h, b.op("HardSigmoid", [h], "hard_sigmoid")], "hard_swish"), b.weight("w5", (2, 8, 1, 1))],
         "head")
    b.nodes[-1].output[0] = "out"
    proto = b.model([helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 4, 6, 6])],
                    [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2, 6, 6])])
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    placement = place(model.graph, "ort", int8_residuals=True, int8_silus=True)
    assert {"gate_out", "scale_out", "hard_sigmoid_out", "hard_swish_out"} <= set(placement.observed_names)
    assert "gate_out" not in place(model.graph, "ort", int8_residuals=True).observed_names
    calib = CalibrationSet(graphs.samples(proto, 8, seed=0), prepare.input_specs(model))
    seen = observe.observe(prepare.to_proto(model), placement.observed_names, calib, 8)
    ranges = {name: compute_range(observer, "minmax") for name, observer in seen.ranges.items()}
    qdq.InsertQdqPass(ranges, "ort", int8_residuals=True, int8_silus=True)(model)
    IntegerHardSigmoidPass()(model)
    out = ir.serde.serialize_model(model)
    found = check(out)
    # QLinearAdds: the residual, the hard-swish's HardSigmoid, and the SE gate where it is a HardSigmoid too
    assert found.integer_kernels["QLinearMul"] == 2 and found.integer_kernels["QLinearAdd"] == 2 + (gate_op == "HardSigmoid")
    assert not [f for f in found.of("unfused") if f.node in ("scale", "hard_swish", "hard_sigmoid")]
    image = graphs.samples(proto, 4, seed=1)["image"]
    reference, quantized = session(proto).run(None, {"image": image})[0], session(out).run(None, {"image": image})[0]
    assert 10 * np.log10(np.sum(reference**2) / np.sum((quantized - reference) ** 2)) > 20


def test_a_split_of_a_quantized_silu_runs_on_its_uint8_values(tmp_path):
    # YOLOv8's C2f: a SiLU's product split in two, one part through a conv and SiLU, all three joined
    import onnxruntime as ort

    b = GraphBuilder()

    def silu(x: str, name: str) -> str:
        return b.op("Mul", [x, b.op("Sigmoid", [x], f"{name}/sigmoid")], f"{name}/act")

    x = silu(b.op("Conv", ["image", b.weight("w0", (8, 4, 1, 1))], "cv1"), "cv1")
    b.op("Split", [x, b.const("halves", np.array([4, 4], np.int64))], "split", axis=1)
    b.nodes[-1].output[:] = ["part0", "part1"]
    y = silu(b.op("Conv", ["part1", b.weight("w1", (4, 4, 3, 3))], "m", pads=[1, 1, 1, 1]), "m")
    b.op("Conv", [b.op("Concat", ["part0", "part1", y], "concat", axis=1), b.weight("w2", (2, 12, 1, 1))], "cv2")
    b.nodes[-1].output[0] = "out"
    proto = b.model([helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 4, 6, 6])],
                    [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None] * 4)])
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    placement = place(model.graph, "ort", int8_silus=True)
    parts = {site.value.name: site.observed.name for site in placement.activations if site.value.name.startswith("part")}
    assert parts == {"part0": "cv1/act_out", "part1": "cv1/act_out"}  # on the product's own grid: no second rounding
    calib = CalibrationSet(graphs.samples(proto, 8, seed=0), prepare.input_specs(model))
    seen = observe.observe(prepare.to_proto(model), placement.observed_names, calib, 8)
    ranges = {name: compute_range(observer, "minmax") for name, observer in seen.ranges.items()}
    qdq.InsertQdqPass(ranges, "ort", int8_silus=True)(model)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    producers = {o: n.op_type for n in optimized for o in n.output}
    split = next(n for n in optimized if n.op_type == "Split")
    assert producers[split.input[0]] != "DequantizeLinear"  # it splits the uint8 product
    assert [n.op_type for n in optimized].count("QLinearConcat") == 1


def test_a_concat_joins_its_float_inputs_on_uint8_and_every_reader_reads_what_it_read(tmp_path, monkeypatch):
    # a bottleneck's Add that only the Concat reads, a coarse map upsampled, a pool of a quantized map
    import onnxruntime as ort

    from qwt_onnx.analysis import placement as placement_module

    b = GraphBuilder()
    x = b.op("Relu", [b.op("Conv", ["image", b.weight("w0", (8, 4, 1, 1))], "stem")], "stem_relu")
    branches = [b.op("Conv", [x, b.weight(f"w{i}", (8, 8, 1, 1))], name) for i, name in ((1, "a"), (2, "b"))]
    added = b.op("Add", branches, "add")
    coarse = b.op("Conv", [x, b.weight("w3", (8, 8, 2, 2))], "coarse", strides=[2, 2])
    up = b.op("Resize", [coarse, "", b.const("scales", np.array([1, 1, 2, 2], np.float32))], "up", mode="nearest")
    pooled = b.op("MaxPool", [b.op("Conv", [x, b.weight("w4", (8, 8, 1, 1))], "c")], "pool", kernel_shape=[3, 3], pads=[1] * 4)
    b.op("Conv", [b.op("Concat", [added, up, pooled, x], "concat", axis=1), b.weight("w5", (2, 32, 1, 1))], "head")
    b.nodes[-1].output[0] = "out"
    proto = b.model([helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 4, 6, 6])],
                    [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None] * 4)])

    def written(joins: bool) -> onnx.ModelProto:
        model = prepare.prepare(ir.serde.deserialize_model(proto))
        if not joins:
            monkeypatch.setattr(placement_module, "_concat_joins", lambda sites: {})
        placement = place(model.graph, "ort")
        joined_inputs = ("add_out", "up_out", "pool_out")
        grids = {site.value.name: site.observed.name for site in placement.activations if site.value.name in joined_inputs}
        # on the Concat's grid, the pool on its input's
        assert grids == ({"add_out": "concat_out", "up_out": "concat_out", "pool_out": "c_out"} if joins else {})
        calib = CalibrationSet(graphs.samples(proto, 8, seed=0), prepare.input_specs(model))
        seen = observe.observe(prepare.to_proto(model), placement.observed_names, calib, 8)
        qdq.InsertQdqPass({name: compute_range(observer, "minmax") for name, observer in seen.ranges.items()}, "ort")(model)
        monkeypatch.undo()
        return ir.serde.serialize_model(model)

    joined, before = written(joins=True), written(joins=False)
    found = check(joined)
    assert found.integer_kernels["QLinearConcat"] == found.integer_kernels["QLinearAdd"] == 1
    # only the head's Conv is left: its output is a graph output
    assert not [f for f in found.of("unfused") if f.op_type in ("Concat", "Add", "MaxPool")]
    assert "Concat" in {f.op_type for f in check(before).of("unfused")}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(joined.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    producers = {o: n.op_type for n in optimized for o in n.output}
    pool = next(n for n in optimized if "MaxPool" in n.op_type)
    assert producers[pool.input[0]] != "DequantizeLinear"  # it pools the uint8 map
    # in exact QDQ arithmetic the model computes what it computed with a float Concat
    exact = ort.SessionOptions()
    exact.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    image = graphs.samples(proto, 4, seed=1)
    outputs = [ort.InferenceSession(m.SerializeToString(), exact, providers=["CPUExecutionProvider"]).run(None, image)[0]
               for m in (joined, before)]
    np.testing.assert_array_equal(*outputs)
    # where every input is a float op's (float SiLUs, one upsampled), joining would only move the QuantizeLinear
    neck = prepare.prepare(ir.serde.deserialize_model(graphs.detector_neck())).graph
    read = {node.op_type for site in place(neck, "ort").activations for node, _ in site.readers}
    assert "Concat" not in read and "Resize" not in read
    # nor where every input is upsampled from a quantized map: a float Resize either way
    b = GraphBuilder()
    maps = [b.op("Conv", ["image", b.weight(f"w{i}", (8, 4, 1, 1))], f"c{i}", strides=[2, 2]) for i in range(2)]
    scales = b.const("scales", np.array([1, 1, 2, 2], np.float32))
    ups = [b.op("Resize", [m, "", scales], f"up{i}", mode="nearest") for i, m in enumerate(maps)]
    b.op("Conv", [b.op("Concat", ups, "concat", axis=1), b.weight("w2", (2, 16, 1, 1))], "head")
    upsampled = b.model([helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 4, 6, 6])],
                        [helper.make_tensor_value_info("head_out", TensorProto.FLOAT, [None] * 4)])
    graph = prepare.prepare(ir.serde.deserialize_model(upsampled)).graph
    assert not {"up0_out", "up1_out"} & {site.value.name for site in place(graph, "ort").activations}


def test_excluded_nodes_and_op_types_keep_float_weights_and_inputs():
    from tests import graphs

    model = prepare.prepare(ir.serde.deserialize_model(graphs.resnet()))
    everything = place(model.graph, "ort")
    excluded = Exclusions(nodes=(r"/stem/.*",), op_types=("Gemm",))
    placement = place(model.graph, "ort", excluded)
    readers = {node.name for site in placement.weights for node, _ in site.readers}
    assert readers and not any(name.startswith("/stem/") for name in readers)
    assert all(node.op_type != "Gemm" for site in placement.weights for node, _ in site.readers)
    assert len(placement.weights) == len(everything.weights) - 2  # the stem conv and the classifier
    qdq.InsertQdqPass({name: (-2.0, 3.0) for name in placement.observed_names}, "ort", excluded)(model)
    stem = next(n for n in model.graph if n.name.startswith("/stem/") and n.op_type == "Conv")
    assert stem.inputs[0].producer() is None and stem.inputs[1].const_value is not None  # float input and weight
    assert excluded.unmatched(model.graph) == []
    assert Exclusions(nodes=("/no/such/node",)).unmatched(model.graph) == ["/no/such/node"]


@pytest.mark.parametrize("group", [1, 2, 8])
def test_rounding_bias_is_the_mean_output_error_of_the_rounded_weight(group):
    rng = np.random.default_rng(group)
    error = rng.standard_normal((8, 8 // group, 3, 3)).astype(np.float32)  # [C_out, C_in / group, k, k]
    mean = rng.standard_normal(8).astype(np.float32)
    b = GraphBuilder()
    b.op("Conv", ["x", b.const("w", error)], "conv", group=group)
    b.nodes[-1].output[0] = "y"
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 3, 3])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 1, 1])])
    constant_input = np.broadcast_to(mean[None, :, None, None], (1, 8, 3, 3)).astype(np.float32)
    expected = session(model).run(None, {"x": constant_input})[0].ravel()
    np.testing.assert_allclose(qm.rounding_bias(error, 0, mean, group), expected, rtol=1e-4, atol=1e-5)
    matmul_error = rng.standard_normal((5, 3))  # [K, N]
    np.testing.assert_allclose(qm.rounding_bias(matmul_error, 1, mean[:5]), mean[:5] @ matmul_error)
    np.testing.assert_allclose(qm.rounding_bias(matmul_error.T, 0, mean[:5]), mean[:5] @ matmul_error)


def test_bias_correction_moves_each_ops_mean_rounding_error_into_its_bias():
    b = GraphBuilder(seed=3)
    h = b.op("Conv", ["x", b.weight("c.weight", (6, 4, 3, 3)), b.const("c.bias", np.ones(6, np.float32))], "conv", pads=[1, 1, 1, 1])
    h = b.op("Conv", [h, b.weight("nobias.weight", (6, 6, 1, 1))], "nobias")
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h], "pool")], "flatten")
    h = b.op("Add", [b.op("MatMul", [h, b.weight("mm.weight", (6, 5))], "mm"), b.const("mm.bias", np.zeros(5, np.float32))], "mm_add")
    b.op("Gemm", [h, b.weight("fc.weight", (3, 5))], "fc", transB=1, beta=2.0)
    b.nodes[-1].output[0] = "y"
    proto = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    placement = place(model.graph, "ort")
    axes = placement.channel_axes()
    assert axes == {"x": 1, "conv_out": 1, "flatten_out": 1, "mm_add_out": 1}  # the MatMul and its Add are a Gemm now
    means = {name: np.linspace(-1, 2, 6 if name != "x" else 4)[: 5 if name == "mm_add_out" else None] for name in axes}
    qdq.InsertQdqPass({n: (-3.0, 3.0) for n in placement.observed_names}, "ort", input_means=means)(model)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = {n.name: n for n in out.graph.node}

    def error(name, axis):
        w = weights[name]
        params = qm.symmetric_weight_params(w, axis, pair_safe=True)
        return w - qm.dequantize(qm.quantize(w, params, axis), params, axis)

    producers = {o: n for n in out.graph.node for o in n.output}

    def int32_bias(gemm):  # a Gemm's bias is int32 for onnxruntime's QGemm: its value and its rounding step
        dq = producers[nodes[gemm].input[2]]
        assert inits[dq.input[0]].dtype == np.int32
        return inits[dq.input[0]] * inits[dq.input[1]], inits[dq.input[1]]

    np.testing.assert_allclose(inits[nodes["conv"].input[2]], 1 + qm.rounding_bias(error("c.weight", 0), 0, means["x"]), rtol=1e-5)
    np.testing.assert_allclose(inits[nodes["nobias"].input[2]], qm.rounding_bias(error("nobias.weight", 0), 0, means["conv_out"]), rtol=1e-5, atol=1e-7)
    for gemm, expected in (("mm", qm.rounding_bias(error("mm.weight", 1), 1, means["flatten_out"])),
                           ("fc", qm.rounding_bias(error("fc.weight", 0), 0, means["mm_add_out"]))):  # beta 2 folded in
        bias, step = int32_bias(gemm)
        assert np.all(np.abs(bias - expected) <= step / 2 + 1e-7) and np.abs(expected).max() > 10 * step.max()
        assert helper.get_attribute_value(next(a for a in nodes[gemm].attribute if a.name == "beta")) == 1.0
    assert "c.bias" not in inits and "mm.bias" not in inits  # replaced, not left behind


def test_an_int32_bias_is_within_half_an_accumulator_step_and_a_bias_too_large_for_it_gets_a_scale_it_fits():
    bias = np.array([0.0, 0.3, -1.7, 1e4], np.float32)
    weight_scale = np.array([1e-2, 2e-3, 5e-3, 1e-7], np.float32)
    quantized, params = qm.int32_bias(bias, np.float32(0.02), weight_scale)
    assert quantized.dtype == np.int32 and params.zero_point.dtype == np.int32 and not params.zero_point.any()
    np.testing.assert_allclose(params.scale[:3], 0.02 * weight_scale[:3], rtol=1e-6)
    restored = quantized * params.scale.astype(np.float64)
    assert np.all(np.abs(restored[:3] - bias[:3]) <= params.scale[:3] / 2 * (1 + 1e-6))
    # 1e4 / 2e-9 is past the int32 range (onnxruntime's own quantization wraps it): a wider scale
    assert params.scale[3] > 0.02 * weight_scale[3] and abs(restored[3] - 1e4) < 1e-3
    assert qm.int32_bias_overflows(bias, np.float32(0.02), weight_scale)
    assert not qm.int32_bias_overflows(bias[:3], np.float32(0.02), weight_scale[:3])


def _log_of_softmax() -> onnx.ModelProto:
    """Class log-probabilities as ``Log(Softmax(Gemm(x)))``: a Log with no linear front end."""
    b = graphs.GraphBuilder(7)
    logits = b.op("Gemm", ["x", b.weight("w", (16, 4))], "head")
    b.op("Log", [b.op("Softmax", [logits], "softmax", axis=-1)], "log")
    b.nodes[-1].output[0] = "logprobs"
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                   [helper.make_tensor_value_info("logprobs", TensorProto.FLOAT, ["batch", 4])])


def test_the_weighted_ops_a_log_reads_through_linear_and_polynomial_ops_are_its_front_end():
    spectrogram = ir.serde.deserialize_model(graphs.spectrogram_classifier())
    assert [n.name for n in log_front_end(spectrogram.graph)] == ["/stft/real", "/stft/imag", "/mel"]
    assert log_front_end(ir.serde.deserialize_model(_log_of_softmax()).graph) == []


@pytest.mark.slow
def test_a_spectrogram_front_end_stays_float_where_quantizing_it_ruins_the_model(monkeypatch):
    import qwt_onnx.api as api

    model = graphs.spectrogram_classifier()
    calib, test = graphs.tones(160, seed=0), graphs.tones(64, seed=1)
    kept, report = api.quantize_with_report(model, calib, qwt=False, progress=False)
    monkeypatch.setattr("qwt_onnx.run.log_front_end", lambda graph: [])
    quantized = api.quantize(model, calib, qwt=False, progress=False)
    assert report.log_front_end == ["/stft/real", "/stft/imag", "/mel"]
    float_weights = {t.name for t in kept.graph.initializer if t.data_type == TensorProto.FLOAT}
    assert {"/stft/cos", "/stft/sin", "/mel/filterbank"} <= float_weights
    assert any(n.op_type == "DequantizeLinear" and n.input[0].startswith("/conv.weight") for n in kept.graph.node)
    reference = session(model).run(None, test)[0]
    sqnr = lambda m: 10 * np.log10((reference**2).sum() / ((reference - session(m).run(None, test)[0]) ** 2).sum())  # noqa: E731
    assert sqnr(kept) > 30.0 and sqnr(kept) > sqnr(quantized) + 20.0


def test_multiply_accumulates_of_each_compute_op_follow_from_its_shapes():
    def node(op_type, weight_shape=None, **attrs):
        inputs = [ir.Value(name="x")]
        if weight_shape:
            inputs.append(ir.Value(name="w", const_value=ir.tensor(np.zeros(weight_shape, np.float32))))
        attributes = [ir.AttrInt64(k, v) if isinstance(v, int) else ir.AttrString(k, v) for k, v in attrs.items()]
        return ir.Node("", op_type, inputs, attributes)

    # a bidirectional GRU, batch-first: 2 directions x 3 gates x 8 units x (5 inputs + 8 recurrent) per step
    gru = node("GRU", hidden_size=8, direction="bidirectional", layout=1)
    assert g.multiply_accumulates(gru, (2, 7, 5), None) == 2 * 7 * 2 * 3 * 8 * 13
    assert g.multiply_accumulates(node("LSTM", hidden_size=8), (7, 2, 5), (7, 1, 2, 8)) == 7 * 2 * 4 * 8 * 13
    # ConvTranspose: each input value meets C_out / group x kernel weights; Conv: each output value C_in / group x kernel
    assert g.multiply_accumulates(node("ConvTranspose", (4, 3, 2, 2)), (1, 4, 5, 5), (1, 3, 10, 10)) == 4 * 25 * 3 * 4
    assert g.multiply_accumulates(node("Conv", (3, 4, 3, 3)), (1, 4, 5, 5), (1, 3, 3, 3)) == 27 * 36
    assert g.multiply_accumulates(node("Gemm", transA=1), (6, 2), (2, 9)) == 18 * 6
    assert g.multiply_accumulates(node("MatMul"), (2, 4, 6), (2, 4, 9)) == 72 * 6
    assert g.multiply_accumulates(node("Conv"), (1, 4, 5, 5), (1, 3, 3, 3)) == 0  # a weight computed in the graph: not told

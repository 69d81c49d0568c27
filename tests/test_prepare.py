import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from qwt_onnx.errors import InputError
from qwt_onnx.graph import prepare
from qwt_onnx.runtime import session
from tests.graphs import GraphBuilder


def _conv_bn_relu(opset: int, op_type: str = "Conv", shared_weight: bool = False):
    b = GraphBuilder(seed=3)
    if op_type == "Gemm":
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
        conv = b.op("Gemm", ["x", b.weight("w", (6, 3))], "conv", transB=1)
    else:
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])
        shape = (3, 6, 1, 1) if op_type == "ConvTranspose" else (6, 3, 3, 3)
        conv = b.op(op_type, ["x", b.weight("w", shape)], "conv", pads=[1, 1, 1, 1] if op_type == "Conv" else [0, 0, 0, 0])
    stats = [b.const(n, np.random.default_rng(i).uniform(0.5, 1.5, 6).astype(np.float32)) for i, n in enumerate(("gamma", "beta", "mean", "var"))]
    bn = b.op("BatchNormalization", [conv, *stats], "bn", epsilon=1e-3)
    b.op("Relu", [bn], "relu")
    b.nodes[-1].output[0] = "y"
    dims = ["N", 6] if op_type == "Gemm" else ["N", 6, "H", "W"]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)]
    if shared_weight:  # a second reader of the weight: folding would change its function too
        b.op("Gemm" if op_type == "Gemm" else op_type, ["x", "w"], "other", **({"transB": 1} if op_type == "Gemm" else {}))
        outputs.append(helper.make_tensor_value_info("other_out", TensorProto.FLOAT, dims))
    return b.model([x_info], outputs, opset=opset)


@pytest.mark.parametrize("op_type", ["Conv", "ConvTranspose", "Gemm"])
def test_batch_norm_is_folded_into_the_op_before_it_and_the_function_kept(op_type):
    proto = _conv_bn_relu(opset=17, op_type=op_type)
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    ops = [n.op_type for n in model.graph]
    assert ops == [op_type, "Relu"]
    conv = model.graph[0]
    assert conv.outputs[0].name == "bn_out"  # the folded op takes the BatchNormalization's output name
    assert conv.name == "conv"  # and keeps its own: --exclude-nodes names what the user sees
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 5) if op_type != "Gemm" else (2, 3)).astype(np.float32)
    expected = session(proto).run(None, {"x": x})[0]
    got = session(prepare.to_proto(model)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert len(model.graph.initializers) == 2  # the folded weight and bias; the statistics are dropped


def test_batch_norm_after_an_op_whose_weight_is_shared_stays():
    proto = _conv_bn_relu(opset=17, shared_weight=True)
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    assert "BatchNormalization" in [n.op_type for n in model.graph]


def test_models_older_than_opset_13_are_converted():
    proto = _conv_bn_relu(opset=11)
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    assert model.opset_imports[""] == 13
    x = np.random.default_rng(1).standard_normal((1, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(
        session(prepare.to_proto(model)).run(None, {"x": x})[0], session(proto).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5
    )


def _conv_bias_add(constant: np.ndarray, identity: bool = False):
    b = GraphBuilder(seed=4)
    conv = b.op("Conv", ["x", b.weight("w", (6, 3, 3, 3))], "conv", pads=[1, 1, 1, 1])
    if identity:
        conv = b.op("Identity", [conv], "identity")
    b.op("Add", [b.const("shift", constant), conv], "add")
    b.nodes[-1].output[0] = "y"
    return b.model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 5, 5])],
    )


def _same_function(proto, model, shape=(2, 3, 5, 5)):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(session(prepare.to_proto(model)).run(None, {"x": x})[0],
                               session(proto).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_a_per_channel_bias_add_is_folded_into_the_conv_through_an_identity():
    shift = np.arange(6, dtype=np.float32).reshape(1, 6, 1, 1)
    proto = _conv_bias_add(shift, identity=True)
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    assert [n.op_type for n in model.graph] == ["Conv"]
    assert model.graph[0].outputs[0].name == "y"
    _same_function(proto, model)


def test_an_add_that_is_not_per_channel_stays():
    for shift in (np.ones((1, 6, 5, 5), np.float32), np.ones((5,), np.float32)):  # per pixel; along the last axis
        proto = _conv_bias_add(shift)
        model = prepare.prepare(ir.serde.deserialize_model(proto))
        assert [n.op_type for n in model.graph] == ["Conv", "Add"]
        _same_function(proto, model)


def test_a_conv_folded_with_its_batch_norm_is_excluded_by_its_own_name():
    from qwt_onnx import quantize_with_report

    proto = _conv_bn_relu(opset=17)
    calib = {"x": np.random.default_rng(1).standard_normal((20, 3, 5, 5)).astype(np.float32)}
    with pytest.raises(InputError, match="stays float .1: --exclude-nodes / --exclude-op-types.; exclude fewer"):  # it matched
        quantize_with_report(proto, calib, qwt=False, exclude_nodes="conv", progress=False)


def test_a_model_whose_compute_ops_all_stay_float_is_refused_with_their_reason():
    from qwt_onnx import quantize_with_report

    proto = _conv_bn_relu(opset=17, op_type="ConvTranspose")  # onnxruntime's CPU provider has no INT8 ConvTranspose
    calib = {"x": np.random.default_rng(1).standard_normal((20, 3, 5, 5)).astype(np.float32)}
    with pytest.raises(InputError, match=r"stays float \(1: onnxruntime's CPU provider has no INT8 ConvTranspose kernel\)"):
        quantize_with_report(proto, calib, qwt=False, progress=False)


def _fixed_batch_mlp(batch: int, reshape_to_batch: bool = False):
    """A dense classifier exported as a tracer without dynamic axes writes it: every dimension
    static, the traced batch too, and (with ``reshape_to_batch``) a Reshape that holds it."""
    b = GraphBuilder(seed=4)
    x = b.op("Reshape", ["x", b.const("shape", np.array([batch, 8], np.int64))], "flatten") if reshape_to_batch else "x"
    h = b.op("Gemm", [x, b.weight("w1", (16, 8)), b.const("b1", np.zeros(16, np.float32))], "fc1", transB=1)
    h = b.op("Relu", [h], "relu")
    b.op("Gemm", [h, b.weight("w2", (4, 16))], "fc2", transB=1)
    b.nodes[-1].output[0] = "y"
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2, 4] if reshape_to_batch else [batch, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])])


def test_a_batch_fixed_over_one_is_run_at_any_size_and_given_back_to_the_written_model():
    from qwt_onnx import quantize_with_report

    calib = {"x": np.random.default_rng(2).standard_normal((42, 8)).astype(np.float32)}  # 42 = 10 x 4 + 2
    written, _ = quantize_with_report(_fixed_batch_mlp(4), calib, qwt=False, progress=False)
    assert [d.dim_value for d in written.graph.input[0].type.tensor_type.shape.dim] == [4, 8]
    assert [d.dim_value for d in written.graph.output[0].type.tensor_type.shape.dim] == [4, 4]
    assert session(written).run(None, {"x": calib["x"][:4]})[0].shape == (4, 4)


def test_a_batch_fixed_to_one_is_calibrated_several_samples_at_a_time_and_given_back():
    # PyTorch's exporter fixes the batch it traced at, 1 most often; fed one sample a run, the
    # calibration of DeepFilterNet3's encoder took 76 s, 48 s at 16 (its outputs the same bit for bit)
    from qwt_onnx import quantize_with_report

    calib = {"x": np.random.default_rng(2).standard_normal((42, 8)).astype(np.float32)}
    written, report = quantize_with_report(_fixed_batch_mlp(1), calib, qwt=False, progress=False)
    assert report.batch_size == 16 and not any("batch" in w for w in report.warnings)
    assert [d.dim_value for d in written.graph.input[0].type.tensor_type.shape.dim] == [1, 8]
    assert [d.dim_value for d in written.graph.output[0].type.tensor_type.shape.dim] == [1, 4]
    inside = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in written.graph.value_info}
    assert inside["relu_out"] == [1, 16] and not any("batch" in dims for dims in inside.values())
    assert session(written).run(None, {"x": calib["x"][:1]})[0].shape == (1, 4)


def test_a_batch_fixed_to_one_in_the_graph_itself_is_run_one_sample_at_a_time_without_a_warning():
    from qwt_onnx import quantize_with_report

    calib = {"x": np.random.default_rng(2).standard_normal((40, 2, 4)).astype(np.float32)}
    written, report = quantize_with_report(_fixed_batch_mlp(1, reshape_to_batch=True), calib, qwt=False, progress=False)
    assert report.batch_size == 1 and not any("batch" in w for w in report.warnings) and report.sqnr_ptq_db > 20
    assert [d.dim_value for d in written.graph.input[0].type.tensor_type.shape.dim] == [1, 2, 4]


def test_a_batch_fixed_in_the_graph_itself_is_refused_with_the_export_fix():
    from qwt_onnx import quantize_with_report

    calib = {"x": np.random.default_rng(2).standard_normal((40, 2, 4)).astype(np.float32)}
    with pytest.raises(InputError, match="batch dimension is fixed to 4 and its graph computes with that size .*dynamic_axes"):
        quantize_with_report(_fixed_batch_mlp(4, reshape_to_batch=True), calib, qwt=False, progress=False)


def _dense(input_dims: list, bias: np.ndarray, second_reader: bool = False):
    """x @ w + bias, as Keras and TensorFlow export a dense layer."""
    b = GraphBuilder(seed=5)
    y = b.op("MatMul", ["x", b.weight("w", (3, 4))], "dense")
    b.op("Add", [y, b.const("bias", bias)], "add")
    b.nodes[-1].output[0] = "y"
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*input_dims[:-1], 4])]
    if second_reader:
        b.op("Relu", [y], "relu")
        b.nodes[-1].output[0] = "r"
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [*input_dims[:-1], 4]))
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, input_dims)], outputs)


@pytest.mark.parametrize("bias", [np.arange(4, dtype=np.float32), np.float32(0.5), np.ones((1, 4), np.float32)])
def test_a_dense_layer_becomes_one_gemm_named_as_its_matmul(bias):
    proto = _dense(["N", 3], bias)
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    assert [(n.op_type, n.name) for n in model.graph] == [("Gemm", "dense")]
    assert model.graph[0].outputs[0].name == "y"
    _same_function(proto, model, shape=(2, 3))


def test_a_dense_layer_after_a_flatten_computed_from_the_input_shape_becomes_a_gemm():
    # Paddle's classifier head: Reshape(pool, Concat(Slice(Shape(pool), 0, 1), [-1])), its dims declared -1, where
    # onnx's inference leaves the Reshape's rank unknown (ppocr's text direction classifier)
    b = GraphBuilder(seed=5)
    pooled = b.op("GlobalAveragePool", ["x"], "pool")
    batch = b.op("Slice", [b.op("Shape", [pooled], "shape"), b.const("start", np.array([0])), b.const("end", np.array([1]))],
                 "batch")
    flat = b.op("Reshape", [pooled, b.op("Concat", [batch, b.const("rest", np.array([-1]))], "target", axis=0)], "flatten")
    b.op("Add", [b.op("MatMul", [flat, b.weight("w", (3, 4))], "dense"), b.const("bias", np.arange(4, dtype=np.float32))], "add")
    b.nodes[-1].output[0] = "y"
    proto = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, -1, -1])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4])])
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    assert [(n.op_type, n.name) for n in model.graph if n.op_type in ("MatMul", "Gemm", "Add")] == [("Gemm", "dense")]
    _same_function(proto, model, shape=(2, 3, 5, 5))


def test_a_dense_layer_whose_output_is_read_twice_becomes_a_gemm_before_its_add_and_one_on_tokens_stays():
    proto = _dense(["N", 3], np.arange(4, dtype=np.float32), second_reader=True)
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    assert sorted(n.op_type for n in model.graph) == ["Add", "Gemm", "Relu"]
    _same_function(proto, model, shape=(2, 3))
    proto = _dense(["N", 5, 3], np.arange(4, dtype=np.float32))
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    assert [n.op_type for n in model.graph] == ["MatMul", "Add"]
    _same_function(proto, model, shape=(2, 5, 3))


@pytest.mark.parametrize("readers, folded", [(("Conv", "Add"), True), (("Conv", "Add 3"), False), (("Div", "Mul"), False),
                                             (("Gelu",), True), (("ReduceMean", "Mul"), True), (("Sigmoid", "Mul"), True),
                                             (("Add 3", "Clip", "Mul", "Div"), False)])
def test_a_bias_add_read_twice_is_folded_only_where_each_reader_reads_a_quantized_tensor_in_an_integer_kernel(readers, folded):
    # PP-OCR's depthwise conv, its bias Add read by the next conv and a residual Add; a Div and a Mul keep one float
    # tensor to share (each reader of a dequantized one gets a DequantizeLinear of its own, which keeps onnxruntime
    # from fusing them), but not a GELU's, which is written as one node (passes.gelu), nor a squeeze-excitation's or a
    # SiLU's, whose product runs on uint8 once it scales a convolution's output; a hard-swish's stays (passes.fold)
    b = GraphBuilder(seed=5)
    conv = b.op("Conv", ["x", b.weight("w", (3, 3, 3, 3))], "conv", pads=[1, 1, 1, 1])
    biased = b.op("Add", [conv, b.const("shift", np.arange(3, dtype=np.float32).reshape(1, 3, 1, 1))], "bias")
    if readers == ("Conv", "Add"):
        b.op("Add", [b.op("Conv", [biased, b.weight("w2", (3, 3, 1, 1))], "next"), biased], "residual")
    elif readers == ("Conv", "Add 3"):  # an Add of a constant runs in float
        b.op("Add", [b.op("Conv", [biased, b.weight("w2", (3, 3, 1, 1))], "next"),
                     b.op("Add", [biased, b.const("three", np.array(3.0, np.float32))], "plus3")], "sum")
    elif readers == ("Div", "Mul"):
        b.op("Mul", [biased, b.op("Div", [biased, b.const("two", np.array(2.0, np.float32))], "half")], "product")
    elif readers == ("ReduceMean", "Mul"):  # PP-OCRv6's SE block, its pool a ReduceMean over H and W
        squeezed = b.op("ReduceMean", [biased], "squeeze", axes=[2, 3], keepdims=1)
        gate = b.op("HardSigmoid", [b.op("Conv", [squeezed, b.weight("w2", (3, 3, 1, 1))], "excite")], "gate")
        b.op("Mul", [biased, gate], "scale")
    elif readers == ("Sigmoid", "Mul"):
        b.op("Mul", [biased, b.op("Sigmoid", [biased], "sigmoid")], "silu")
    elif readers == ("Add 3", "Clip", "Mul", "Div"):  # Paddle's hard-swish, x · clip(x + 3, 0, 6) / 6
        clipped = b.op("Clip", [b.op("Add", [biased, b.const("three", np.float32(3))], "plus3"), b.const("zero", np.float32(0)),
                                b.const("six", np.float32(6))], "relu6")
        b.op("Div", [b.op("Mul", [biased, clipped], "product"), b.const("six_again", np.float32(6))], "hard_swish")
    else:
        erf = b.op("Erf", [b.op("Div", [biased, b.const("root2", np.array(np.sqrt(2), np.float32))], "scaled")], "erf")
        plus_one = b.op("Add", [erf, b.const("one", np.array(1.0, np.float32))], "plus_one")
        b.op("Mul", [b.op("Mul", [biased, plus_one], "product"), b.const("half", np.array(0.5, np.float32))], "gelu")
    b.nodes[-1].output[0] = "y"
    proto = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 5, 5])])
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    assert ("bias" in [n.name for n in model.graph]) is not folded
    _same_function(proto, model)


def _prepared_as_conv_and_relu(b: GraphBuilder) -> onnx.ModelProto:
    """The model ``b`` built, of an N×3×5×5 input and an N×6×5×5 output, checked to prepare into
    a Conv and a Relu that compute the same; the model."""
    b.nodes[-1].output[0] = "y"
    proto = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 5, 5])])
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    assert [n.op_type for n in model.graph] == ["Conv", "Relu"]
    _same_function(proto, model)
    return proto


def test_a_batch_norm_exported_as_a_per_channel_mul_and_add_is_folded_into_the_conv():
    b = GraphBuilder(seed=6)
    conv = b.op("Conv", ["x", b.weight("w", (6, 3, 3, 3)), b.const("b", np.linspace(-1, 1, 6).astype(np.float32))], "conv",
                pads=[1, 1, 1, 1])
    scaled = b.op("Mul", [b.const("scale", np.linspace(-2, 2, 6).astype(np.float32).reshape(6, 1, 1)), conv], "scale")
    b.op("Relu", [b.op("Add", [scaled, b.const("shift", np.arange(6, dtype=np.float32).reshape(1, 6, 1, 1))], "shift")], "relu")
    proto = _prepared_as_conv_and_relu(b)
    # a scale along the last axis (per pixel column) is no per-channel one
    proto.graph.initializer[[t.name for t in proto.graph.initializer].index("scale")].CopyFrom(
        onnx.numpy_helper.from_array(np.linspace(-2, 2, 5).astype(np.float32), "scale"))
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    assert [n.op_type for n in model.graph] == ["Conv", "Mul", "Add", "Relu"]
    _same_function(proto, model)


def test_weights_computed_from_constants_alone_become_initializers_and_random_ones_stay():
    # torch.onnx.export(..., do_constant_folding=False) of a weight-normalized conv: w = g · v / ‖v‖ in the graph
    b = GraphBuilder(seed=5)
    v, gain = b.weight("v", (6, 3, 3, 3)), b.const("g", np.linspace(0.5, 2.0, 6, dtype=np.float32).reshape(6, 1, 1, 1))
    direction = b.op("Div", [v, b.op("ReduceL2", [v], "norm", axes=[1, 2, 3], keepdims=1)], "direction")
    h = b.op("Conv", ["x", b.op("Mul", [gain, direction], "weight")], "conv", pads=[1, 1, 1, 1])
    noisy = b.op("Add", [b.weight("u", (6, 6, 1, 1)), b.op("RandomNormal", [], "noise", shape=[6, 6, 1, 1], scale=0.01)], "drawn")
    h = b.op("Conv", [h, noisy], "mixer")
    int8 = b.const("q", np.ones((6, 6, 1, 1), np.int8))  # a QDQ model's weight: its kernels read the int8 values
    b.op("Conv", [h, b.op("DequantizeLinear", [int8, b.const("scale", np.float32(0.1))], "dequantized")], "quantized")
    b.nodes[-1].output[0] = "y"
    proto = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 5, 5])], opset=17)
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    conv, mixer, quantized = (next(n for n in model.graph if n.name == name) for name in ("conv", "mixer", "quantized"))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    expected = weights["g"] * weights["v"] / np.sqrt((weights["v"] ** 2).sum(axis=(1, 2, 3), keepdims=True))
    np.testing.assert_allclose(conv.inputs[1].const_value.numpy(), expected, rtol=1e-6)
    assert mixer.inputs[1].const_value is None  # drawn anew on every run: no constant
    assert quantized.inputs[1].producer().op_type == "DequantizeLinear"
    assert not {"ReduceL2", "Div", "Mul"} & {n.op_type for n in model.graph}


def test_a_bias_reshaped_at_run_time_is_folded_into_its_convolution():
    # Paddle's squeeze-excitation convs: Add(Conv(x, w), Reshape(bias, [1, C, 1, 1])), the Reshape left in the graph
    b = GraphBuilder(seed=5)
    bias = b.op("Reshape", [b.const("b", np.arange(6, dtype=np.float32)), b.const("to", np.array([1, 6, 1, 1]))], "shaped")
    b.op("Relu", [b.op("Add", [b.op("Conv", ["x", b.weight("w", (6, 3, 1, 1))], "conv"), bias], "bias")], "relu")
    _prepared_as_conv_and_relu(b)


@pytest.mark.parametrize("axes, rank, pooled", [((2, 3), 4, True), ((-1, -2), 4, True), ((1, 2), 4, False), ((2,), 4, False),
                                                ((-1,), 3, False)])
def test_a_mean_over_every_spatial_axis_of_a_feature_map_becomes_a_global_average_pool(axes, rank, pooled):
    # a squeeze-and-excitation block's pooling; not a Keras NHWC map's mean over (1, 2), nor a LayerNorm's over tokens' last axis
    b = GraphBuilder(seed=2)
    shape = ["N", 3, 5, 5][:rank]
    b.op("ReduceMean", ["x"], "squeeze", axes=list(axes), keepdims=1)
    b.nodes[-1].output[0] = "y"
    reduced = [1 if i in [a % rank for a in axes] else d for i, d in enumerate(shape)]
    proto = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, reduced)], opset=17)
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    assert [n.op_type for n in model.graph] == ["GlobalAveragePool" if pooled else "ReduceMean"]
    assert model.graph[0].name == "squeeze" and model.graph.outputs[0].name == "y"
    _same_function(proto, model, shape=(2, 3, 5, 5)[:rank])


def test_a_spatial_mean_with_axes_as_an_input_becomes_a_pool_too():
    b = GraphBuilder(seed=2)
    b.op("ReduceMean", ["x", b.const("axes", np.array([2, 3], np.int64))], "squeeze")
    b.nodes[-1].output[0] = "y"
    proto = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 1, 1])], opset=18)
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    assert [n.op_type for n in model.graph] == ["GlobalAveragePool"] and not model.graph.initializers
    _same_function(proto, model)


def _learning_phase_batch_norm(learning_phase: np.ndarray | None) -> onnx.ModelProto:
    """A Conv -> BatchNormalization as a TensorFlow 1 Keras export writes it (tf2onnx): the batch
    statistics of the training form computed in the main graph, and an If on the learning phase
    between the training form (then) and the inference form (else), which is a graph output
    (each branch's node named as the main graph's convolution: names are unique per graph);
    ``learning_phase`` a constant, or None for an input that the caller feeds."""
    b = GraphBuilder(seed=5)
    conv = b.op("Conv", ["x", b.weight("w", (6, 3, 3, 3))], "conv", pads=[1, 1, 1, 1])
    batch_mean = b.op("ReduceMean", [conv], "batch_mean", axes=[0, 2, 3], keepdims=0)
    stats = [b.const(n, np.random.default_rng(i).uniform(0.5, 1.5, 6).astype(np.float32))
             for i, n in enumerate(("gamma", "beta", "mean", "var"))]
    then_branch = helper.make_graph(
        [helper.make_node("BatchNormalization", [conv, "gamma", "beta", batch_mean, "var"], ["trained"], "conv", epsilon=1e-3)],
        "training", [], [helper.make_tensor_value_info("trained", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph(
        [helper.make_node("BatchNormalization", [conv, *stats], ["inferred"], "conv", epsilon=1e-3)],
        "inference", [], [helper.make_tensor_value_info("inferred", TensorProto.FLOAT, None)])
    phase = "phase" if learning_phase is None else b.const("phase", learning_phase)
    b.op("If", [phase], "bn/cond", then_branch=then_branch, else_branch=else_branch)
    b.nodes[-1].output[0] = "y"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])]
    if learning_phase is None:
        inputs.append(helper.make_tensor_value_info("phase", TensorProto.BOOL, []))
    return b.model(inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 5, 5])])


@pytest.mark.parametrize("learning_phase", [np.array(False), np.array([True])])
def test_an_if_on_a_constant_is_replaced_by_its_branch_and_what_only_the_other_read_goes(learning_phase):
    proto = _learning_phase_batch_norm(learning_phase)
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    ops = [n.op_type for n in model.graph]
    # inference: the normalization follows the convolution alone and folds into it, the batch mean is gone
    assert ops == (["Conv"] if not learning_phase.any() else ["Conv", "ReduceMean", "BatchNormalization"])
    assert len({n.name for n in model.graph}) == len(ops)
    assert [v.name for v in model.graph.outputs] == ["y"]
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float32)
    expected = session(proto).run(None, {"x": x})[0]
    np.testing.assert_allclose(session(prepare.to_proto(model)).run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


def test_an_if_on_an_input_stays():
    model = prepare.prepare(ir.serde.deserialize_model(_learning_phase_batch_norm(None)))
    assert "If" in [n.op_type for n in model.graph]


def test_a_taken_branch_that_gives_a_constant_gives_it_the_if_output_name():
    # the branch's Constant becomes an initializer of the branch before the If is replaced
    b = GraphBuilder(seed=6)
    relu = b.op("Relu", ["x"], "relu")
    constant = helper.make_tensor("c", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    given = helper.make_graph([helper.make_node("Constant", [], ["c"], value=constant)], "given", [],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", [relu], ["negated"])], "other", [],
                              [helper.make_tensor_value_info("negated", TensorProto.FLOAT, None)])
    b.op("If", [b.const("cond", np.array(True))], "if", then_branch=given, else_branch=other)
    b.nodes[-1].output[0] = "y"
    b.op("Add", [relu, "y"], "add")
    proto = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4]),
                     helper.make_tensor_value_info("add_out", TensorProto.FLOAT, ["N", 4])])
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    assert "If" not in [n.op_type for n in model.graph] and [v.name for v in model.graph.outputs] == ["y", "add_out"]
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    for got, wanted in zip(session(prepare.to_proto(model)).run(None, {"x": x}), session(proto).run(None, {"x": x})):
        np.testing.assert_array_equal(got, wanted)


def test_an_if_on_a_constant_inside_a_loop_body_is_replaced_there():
    # a Loop whose body doubles its carried value through an If on a constant of the main graph
    then_branch = helper.make_graph([helper.make_node("Add", ["v_in", "v_in"], ["doubled"])], "then", [],
                                    [helper.make_tensor_value_info("doubled", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph([helper.make_node("Neg", ["v_in"], ["negated"])], "else", [],
                                    [helper.make_tensor_value_info("negated", TensorProto.FLOAT, None)])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("If", ["flag"], ["v_out"], then_branch=then_branch, else_branch=else_branch)],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
    graph = helper.make_graph([helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [onnx.numpy_helper.from_array(np.array(3, np.int64), "trips"),
                               onnx.numpy_helper.from_array(np.array(True), "flag")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    assert [n.op_type for n in model.graph[0].attributes["body"].as_graph()] == ["Identity", "Add"]
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(session(prepare.to_proto(model)).run(None, {"x": x})[0], 8 * x)

"""Models as exporters write them: Constant-node weights, shared weights, external data, opsets 9 to 21,
weights listed among the graph inputs."""

import hashlib
import logging
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qwt_onnx import calibration, check, inputs, quantize, quantize_with_report
from qwt_onnx.calibration import CalibrationSet, InputSpec
from qwt_onnx.errors import InputError
from qwt_onnx.graph import prepare
from qwt_onnx.numerics.metrics import mean_squared_error
from qwt_onnx.passes import samples_axis
from qwt_onnx.report import format_summary
from qwt_onnx.runtime import batching_fault, run_in_batches, session
from tests import graphs


def _errors(model, quantized_models, seed=2):
    test = graphs.samples(model, 48, seed=seed)
    reference = {"y": session(model).run(None, test)[0]}
    return [mean_squared_error(reference, {"y": session(q).run(None, test)[0]}) for q in quantized_models]


def _weight_dequantizers(model):
    inits = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and "weight" in n.input[0] and not n.input[0].startswith("qwt/")]


def test_weights_in_constant_nodes_are_quantized_per_channel_and_compensated():
    model = graphs.with_constant_nodes(graphs.resnet())
    assert not model.graph.initializer
    calib = graphs.samples(model, 96, seed=1)
    ptq = quantize(model, calib, qwt=False, calib_method="percentile", progress=False, **graphs.SYSTEMATIC_ERROR)
    qwt, report = quantize_with_report(model, calib, calib_method="percentile", compensation="branch", progress=False,
                                       **graphs.SYSTEMATIC_ERROR)
    dequantizers = _weight_dequantizers(qwt)
    assert len(dequantizers) == 9  # eight Convs and the Gemm
    inits = {t.name: numpy_helper.to_array(t) for t in qwt.graph.initializer}
    assert all(inits[n.input[1]].size > 1 for n in dequantizers)  # one scale per output channel
    assert report.qwt_applied
    ptq_error, qwt_error = _errors(model, [ptq, qwt])
    assert qwt_error < ptq_error


def test_a_weight_shared_by_several_nodes_is_quantized_once_and_the_model_runs():
    model = graphs.transformer(layers=2)
    renamed = {}
    for node in model.graph.node:
        if node.name.startswith("/encoder/layer.1/mlp/fc") and node.op_type == "MatMul":
            renamed[node.input[1]] = node.input[1].replace("layer.1", "layer.0")
            node.input[1] = renamed[node.input[1]]
    kept = [t for t in model.graph.initializer if t.name not in renamed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    calib = graphs.samples(model, 96, seed=1)
    qwt, report = quantize_with_report(model, calib, calib_method="entropy", progress=False, **graphs.ANY_RUN_TIME)
    onnx.checker.check_model(qwt, full_check=True)
    shared = [n for n in qwt.graph.node if n.op_type == "MatMul" and "mlp/fc1" in n.name]
    assert len(shared) == 2 and shared[0].input[1] == shared[1].input[1]  # both read one DequantizeLinear
    assert report.qwt_applied
    session(qwt).run(None, graphs.samples(model, 3, seed=4))


def _digest(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


def test_external_data_is_read_and_written_and_the_input_is_untouched(tmp_path, monkeypatch):
    source = tmp_path / "in"
    source.mkdir()
    model = graphs.resnet()
    onnx.save_model(model, source / "model.onnx", save_as_external_data=True, location="model.weights", size_threshold=0)
    before = _digest(source)
    calib = graphs.samples(model, 64, seed=1)
    out = tmp_path / "out.onnx"
    monkeypatch.setattr(prepare, "EXTERNAL_DATA_THRESHOLD", 1024)  # force external data for this small model
    written, report = quantize_with_report(
        source / "model.onnx", calib, out, calib_method="percentile", compensation="branch", progress=False,
        **graphs.SYSTEMATIC_ERROR
    )
    assert _digest(source) == before
    assert sorted(os.listdir(tmp_path)) == ["in", "out.onnx", "out.onnx.data"]  # no staging folder left behind
    assert os.path.getsize(out) < os.path.getsize(tmp_path / "out.onnx.data")
    onnx.checker.check_model(str(out))
    test = graphs.samples(model, 5, seed=2)
    np.testing.assert_allclose(session(str(out)).run(None, test)[0], session(written).run(None, test)[0], rtol=1e-5, atol=1e-5)
    assert report.qwt_applied


def test_models_over_two_gigabytes_are_refused_with_the_reason(tmp_path, monkeypatch):
    model = graphs.resnet()
    onnx.save_model(model, tmp_path / "model.onnx", save_as_external_data=True, location="model.weights", size_threshold=0)
    monkeypatch.setattr(prepare, "PROTOBUF_LIMIT", 1024)
    with pytest.raises(InputError, match="over 2 GiB are not supported"):
        quantize(tmp_path / "model.onnx", graphs.samples(model, 8, seed=1), progress=False)


@pytest.mark.parametrize("opset", [13, 15, 17, 19, 21])
def test_opsets_13_to_21(opset):
    model = graphs.resnet(opset=opset)
    calib = graphs.samples(model, 64, seed=1)
    ptq = quantize(model, calib, qwt=False, calib_method="percentile", progress=False, **graphs.SYSTEMATIC_ERROR)
    qwt, report = quantize_with_report(model, calib, calib_method="percentile", compensation="branch", progress=False,
                                       **graphs.SYSTEMATIC_ERROR)
    for quantized in (ptq, qwt):
        onnx.checker.check_model(quantized, full_check=True)
        assert next(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")) == opset
    assert report.qwt_applied
    ptq_error, qwt_error = _errors(model, [ptq, qwt])
    assert qwt_error < ptq_error


def test_dimensions_written_as_minus_one_are_dynamic():
    # Paddle's exporter writes dynamic dimensions as -1 (PP-OCR's cls model: [-1, 3, -1, -1]);
    # read as a fixed batch of -1 they made the calibration pass see no batch at all.
    model = graphs.resnet()
    for axis in (0, 2, 3):
        model.graph.input[0].type.tensor_type.shape.dim[axis].dim_value = -1
    calib = graphs.samples(graphs.resnet(), 24, seed=1)
    quantized, report = quantize_with_report(model, calib, qwt=False, progress=False)
    assert report.sqnr_ptq_db is not None and report.sqnr_ptq_db > 10
    session(quantized).run(None, graphs.samples(graphs.resnet(), 3, seed=2))


@pytest.mark.parametrize("shape", [[1, -1], [1, 10]], ids=["batch merged into an axis", "batch of one fixed inside"])
def test_a_declared_dynamic_batch_the_graph_does_not_keep_is_run_one_sample_at_a_time(shape):
    # A TFLite conversion fixes a batch of one; a user who makes its input dynamic gets a graph
    # whose Reshape to [1, -1, 16] merges the batch into the anchors (BlazeFace: outputs [1, 896N, 16])
    # or fails on two samples: either way the calibration runs must feed one sample at a time.
    model = graphs.resnet()
    model.graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), "/flat_shape"))
    model.graph.node.append(onnx.helper.make_node("Reshape", ["logits", "/flat_shape"], ["flat"]))
    model.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info("flat", onnx.TensorProto.FLOAT, [1, "n"]))
    calib = graphs.samples(model, 24, seed=1)
    quantized, report = quantize_with_report(model, calib, qwt=False, progress=False)
    assert any("does not batch samples" in w and "running one sample at a time" in w for w in report.warnings)
    assert report.sqnr_ptq_db is not None and report.sqnr_ptq_db > 10
    one = graphs.samples(model, 1, seed=2)
    assert session(quantized).run(None, one)[0].shape == (1, 10)


def test_a_declared_dynamic_batch_whose_samples_mix_is_run_one_sample_at_a_time():
    # every output one row per sample, as a batch should give them, but each row depends on the
    # other samples of its batch (here less their mean): only the rows' values tell
    model = graphs.resnet()
    model.graph.node.append(onnx.helper.make_node("ReduceMean", ["logits"], ["batch_mean"], axes=[0], keepdims=1))
    model.graph.node.append(onnx.helper.make_node("Sub", ["logits", "batch_mean"], ["centred"]))
    model.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info("centred", onnx.TensorProto.FLOAT, ["n", 10]))
    calib = graphs.samples(model, 24, seed=1)
    _, report = quantize_with_report(model, calib, qwt=False, progress=False)
    assert report.batch_size == 1
    assert any("output 'centred' of two samples at once is not what each gives alone" in w for w in report.warnings)


class _Outputs:
    """A runner that gives ``double`` for two samples at once."""

    output_names = ["y"]

    def __init__(self, double):
        self.double = double

    def __call__(self, feeds):
        return {"y": self.double}


def test_a_batched_output_is_checked_row_by_row_against_each_sample_alone():
    alone = [np.array([[1.0, 2.0, 3.0]]), np.array([[4.0, 5.0]])]  # the second sequence ends sooner
    assert batching_fault(_Outputs(np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 9.0]])), [{"y": a} for a in alone], {}) is None
    mixed = np.array([[1.0, 2.0, 3.0], [4.0, 5.5, 9.0]])
    assert "is not what each gives alone" in batching_fault(_Outputs(mixed), [{"y": a} for a in alone], {})
    assert batching_fault(_Outputs(np.array([[1.0, 2.0, 3.0], [4.0, 5.0 + 1e-4, 9.0]])), [{"y": a} for a in alone], {}) is None


def test_batches_shrink_until_a_batch_of_the_largest_activation_fits_the_memory_bound(monkeypatch, caplog):
    # DNSMOS's 128 x 900 x 161 feature maps (71 MiB a sample) took the capture past 24 GB, and the
    # process killed, at 16 samples a batch. Here the largest activation, the stem's 16 x 16 x 16
    # map, takes 16 KiB a sample: a bound of five of them makes batches of five, everywhere.
    model = graphs.resnet()
    calib = graphs.samples(model, 24, seed=1)
    monkeypatch.setattr(inputs, "BATCH_ACTIVATION_BYTES", 5 * 16 * 16 * 16 * 4)
    sizes, batches = [], CalibrationSet.batches
    monkeypatch.setattr(CalibrationSet, "batches", lambda self, size, *a, **k: sizes.append(size) or batches(self, size, *a, **k))
    with caplog.at_level(logging.INFO, logger="qwt_onnx"):
        _, report = quantize_with_report(model, calib, compensation="branch", progress=False, **graphs.SYSTEMATIC_ERROR)
    assert "using batches of 5" in caplog.text
    assert max(sizes) == 5 and sizes.count(5) > 10  # the observation, the evaluations and the capture
    assert report.qwt_applied and report.batch_size == 5 and "24 samples, 4 held out, 5 a batch)" in format_summary(report, "m")


def test_a_detector_with_non_max_suppression_inside_is_scored_on_what_it_reads_one_image_at_a_time():
    # NonMaxSuppression picks across the batch: its [K, 3] selections hold no axis for the
    # samples, and the boxes it gathers are [N, K_total, 4] (internal errors before)
    rng = np.random.default_rng(0)
    h = onnx.helper
    weights = {"c1": (16, 3, 3, 3), "c2": (16, 16, 3, 3), "cb": (4, 16, 1, 1), "cs": (1, 16, 1, 1)}
    constants = {"boxes_shape": [0, 4, -1], "scores_shape": [0, 1, -1], "most": [1], "two": [2], "three": [3], "one": [1]}
    initializers = [numpy_helper.from_array((0.2 * rng.standard_normal(shape)).astype(np.float32), name)
                    for name, shape in weights.items()]
    initializers += [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in constants.items()]
    initializers += [numpy_helper.from_array(np.array([v], np.float32), name) for name, v in (("iou", 0.5), ("least", 0.5))]
    nodes = [
        h.make_node("Conv", ["image", "c1"], ["a"], pads=[1] * 4, strides=[2, 2]), h.make_node("Relu", ["a"], ["a_relu"]),
        h.make_node("Conv", ["a_relu", "c2"], ["b"], pads=[1] * 4, strides=[2, 2]), h.make_node("Relu", ["b"], ["b_relu"]),
        h.make_node("Conv", ["b_relu", "cb"], ["box"]), h.make_node("Conv", ["b_relu", "cs"], ["logit"]),
        h.make_node("Reshape", ["box", "boxes_shape"], ["box_rows"]),
        h.make_node("Transpose", ["box_rows"], ["boxes"], perm=[0, 2, 1]),
        h.make_node("Reshape", ["logit", "scores_shape"], ["logits"]), h.make_node("Sigmoid", ["logits"], ["scores"]),
        h.make_node("NonMaxSuppression", ["boxes", "scores", "most", "iou", "least"], ["selected"]),
        h.make_node("Slice", ["selected", "two", "three", "one"], ["column"]),
        h.make_node("Squeeze", ["column", "one"], ["anchor"]),
        h.make_node("Gather", ["boxes", "anchor"], ["picked"], axis=1),
    ]
    outputs = [h.make_tensor_value_info("picked", onnx.TensorProto.FLOAT, ["N", "K", 4]),
               h.make_tensor_value_info("selected", onnx.TensorProto.INT64, ["K", 3])]
    graph = h.make_graph(nodes, "detector", [h.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 3, 32, 32])],
                         outputs, initializers)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    calib = {"image": rng.random((48, 3, 32, 32)).astype(np.float32)}
    kept = {session(model).run(["selected"], {"image": calib["image"][k : k + 1]})[0].shape for k in range(48)}
    assert kept == {(0, 3), (1, 3)}  # a box or none: [1, 3] looks like one sample's row, [0, 3] holds none
    quantized, report = quantize_with_report(model, calib, qwt=False, progress=False)
    assert any("running one sample at a time" in w for w in report.warnings) and report.sqnr_ptq_db is not None
    # scored on what NonMaxSuppression reads, which the written model does not output
    assert report.outputs == ["boxes", "scores"] and set(report.output_sqnr_ptq_db) == {"picked", "scores", "boxes"}
    assert [o.name for o in quantized.graph.output] == ["picked", "selected"]
    session(quantized).run(None, {"image": rng.random((1, 3, 32, 32)).astype(np.float32)})


def test_calibration_data_the_model_cannot_run_is_refused_in_one_line():
    # token ids beyond the vocabulary (another tokenizer's): onnxruntime's Gather fails on them
    rng = np.random.default_rng(0)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["table", "ids"], ["embedded"]),
         onnx.helper.make_node("MatMul", ["embedded", "w"], ["y"])],
        "tokens", [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4, 4])],
        [numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "table"),
         numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    refused = "cannot run the model on the first calibration samples .*Gather.*matches the model's inputs"
    with pytest.raises(InputError, match=refused):
        quantize(model, {"ids": rng.integers(0, 50, size=(32, 4))}, progress=False)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("keep_io_types", [False, True], ids=["inputs and outputs in it", "float32 inputs and outputs"])
def test_half_and_double_precision_models_are_quantized_from_float32_and_keep_their_interface(dtype, keep_io_types):
    # onnxruntime runs no float64 Conv at all, nor a float16 QuantizeLinear at opset 17
    model = graphs.resnet()
    half = graphs.in_precision(model, dtype, keep_io_types)
    io_type = np.float32 if keep_io_types else dtype
    calib = {name: array.astype(io_type) for name, array in graphs.samples(model, 96, seed=1).items()}
    quantized, report = quantize_with_report(half, calib, qwt=False, progress=False)
    assert [(v.name, v.type.tensor_type.elem_type) for v in (*quantized.graph.input, *quantized.graph.output)] == \
        [(v.name, v.type.tensor_type.elem_type) for v in (*half.graph.input, *half.graph.output)]
    kernels = check.check(quantized).integer_kernels
    assert kernels.get("QLinearConv") == 8 and kernels.get("QGemm") == 1  # fused as the float32 model's are
    test = {name: array.astype(io_type) for name, array in graphs.samples(model, 32, seed=2).items()}
    reference = session(model).run(None, {k: v.astype(np.float32) for k, v in test.items()})[0]
    written = session(quantized).run(None, test)[0]
    assert written.dtype == io_type
    assert mean_squared_error({"y": reference}, {"y": written.astype(np.float32)}) < 1e-3 * np.mean(reference**2)


@pytest.mark.parametrize("opset", [9, 11])
def test_old_exports_that_list_their_weights_among_the_graph_inputs(opset):
    # Exporters before IR version 4 list every initializer as a graph input too; the quantized
    # weights replaced the float ones and left inputs no one fed (a KeyError on a weight name).
    model = graphs.resnet(opset=opset)
    model.ir_version = 3  # as Caffe2 and early PyTorch exports: every weight an input too
    model.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer
    )
    onnx.checker.check_model(model)
    before = model.SerializeToString()
    calib = graphs.samples(graphs.resnet(), 64, seed=1)
    options = dict(calib_method="percentile", progress=False, **graphs.SYSTEMATIC_ERROR)
    ptq = quantize(model, calib, qwt=False, **options)
    qwt, report = quantize_with_report(model, calib, compensation="branch", **options)
    assert model.SerializeToString() == before
    for quantized in (ptq, qwt):
        onnx.checker.check_model(quantized, full_check=True)
        assert [i.name for i in quantized.graph.input] == ["image"]
    assert report.qwt_applied
    ptq_error, qwt_error = _errors(graphs.resnet(), [ptq, qwt])
    assert qwt_error < ptq_error


def test_a_streaming_model_with_its_state_on_axis_1_a_scalar_input_and_if_branches():
    # silero-vad's exports: a state input [2, batch, C] holds the samples on axis 1, the sample
    # rate is one scalar for every batch, and If branches read a main-graph value (onnx_ir's
    # Identity elimination failed on them, and the data path ended at the If)
    model = graphs.streaming_vad()
    specs = prepare.input_specs(prepare.prepare(prepare.ir.serde.deserialize_model(model)))
    assert [(s.name, s.samples_axis) for s in specs] == [("audio", 0), ("state", 1), ("sr", None)]
    rng = np.random.default_rng(1)
    calib = {"audio": rng.standard_normal((96, 32)).astype(np.float32),
             "state": rng.standard_normal((2, 96, 8)).astype(np.float32), "sr": np.array(16000)}
    quantized, report = quantize_with_report(model, calib, calib_method="minmax", progress=False)
    # the head after the If is a path of its own past the recurrent step: a block of its own
    assert [(b.input, b.output) for b in report.blocks] == [("/to_channels_out", "/relu0_out"), ("/rate_out", "prob")]
    assert {"prob", "stateN"} == set(report.output_sqnr_ptq_db) and min(report.output_sqnr_ptq_db.values()) > 30
    dequantized = {n.input[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    # every weighted op is quantized, the head after the If too, on the If's output
    assert {"/conv0.weight_quantized", "/conv1.weight_quantized", "/head.weight_quantized", "/rate_out_quantized"} <= dequantized
    test = {"audio": calib["audio"][:10], "state": calib["state"][:, :10], "sr": np.array(16000)}
    reference, written = run_in_batches(model, test, 4), run_in_batches(quantized, test, 4)  # batches cut and joined on axis 1
    assert {k: v.shape for k, v in written.items()} == {"prob": (10, 1), "stateN": (2, 10, 8)}
    np.testing.assert_array_equal(reference["stateN"], session(model).run(["stateN"], test)[0])
    assert all(np.allclose(reference[k], written[k], atol=0.1) for k in reference)


def test_a_fully_static_initial_state_beside_a_dynamic_batch_is_fed_whole_with_every_batch():
    # speechmos's AECMOS (torch.onnx): input [batch_size, 3, frames, 160] and a GRU's initial
    # state h0 [4, 1, 64], which its users feed as one zero array. h0's rows were read as four
    # samples against the input's 192 ("different sample counts"); the GRU then runs only one
    # sample at a time, which the batch probe finds
    h = onnx.helper
    rng = np.random.default_rng(0)
    features, hidden = 6, 8
    weights = {"w_in": (features, features), "gru_w": (1, 3 * hidden, features), "gru_r": (1, 3 * hidden, hidden),
               "w_out": (hidden, 2)}
    initializers = [numpy_helper.from_array((0.4 * rng.standard_normal(shape)).astype(np.float32), name)
                    for name, shape in weights.items()]
    nodes = [h.make_node("MatMul", ["x", "w_in"], ["mixed"]), h.make_node("Relu", ["mixed"], ["mixed_relu"]),
             h.make_node("Transpose", ["mixed_relu"], ["time_major"], perm=[1, 0, 2]),
             h.make_node("GRU", ["time_major", "gru_w", "gru_r", "", "", "h0"], ["", "last"], hidden_size=hidden),
             h.make_node("Squeeze", ["last", "zero"], ["state"]), h.make_node("MatMul", ["state", "w_out"], ["scores"])]
    initializers.append(numpy_helper.from_array(np.array([0], np.int64), "zero"))
    graph = h.make_graph(nodes, "static_state", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 5, features]),
                                                 h.make_tensor_value_info("h0", onnx.TensorProto.FLOAT, [1, 1, hidden])],
                         [h.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["batch", 2])], initializers)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    specs = prepare.input_specs(prepare.prepare(prepare.ir.serde.deserialize_model(model)))
    assert [(s.name, s.samples_axis) for s in specs] == [("x", 0), ("h0", None)]
    calib = {"x": rng.standard_normal((40, 5, features)).astype(np.float32), "h0": np.zeros((1, 1, hidden), np.float32)}
    quantized, report = quantize_with_report(model, calib, qwt=False, progress=False)
    assert any("running one sample at a time" in w for w in report.warnings)
    one = {"x": calib["x"][:1], "h0": calib["h0"]}
    assert np.allclose(session(quantized).run(None, one)[0], session(model).run(None, one)[0], atol=0.05)


def test_a_conv_head_after_an_if_of_unknown_output_shape_gets_its_branch():
    # silero-vad 5's decoder: no shape of the If's output is inferred, and a 1x1 Conv1d reads it unsqueezed
    model = graphs.streaming_vad(conv_head=True)
    rng = np.random.default_rng(1)
    calib = {"audio": rng.standard_normal((96, 32)).astype(np.float32),
             "state": rng.standard_normal((2, 96, 8)).astype(np.float32), "sr": np.array(16000)}
    _, report = quantize_with_report(model, calib, calib_method="minmax", min_gain=0.0, progress=False, **graphs.ANY_RUN_TIME)
    head = report.blocks[-1]
    assert (head.input, head.output) == ("/to_frames_out", "prob") and head.r2_heldout is not None, head.note


def test_a_waveform_whose_length_holds_the_features_gets_no_branch_and_runs_at_any_length():
    # onnx_asr's resample_8_16: [batch, N] in, [batch, 2N] out; a dense branch over N would fit
    # one length only (at 8000 samples it ran 18 CPU-minutes, 9.8 GB, and was stopped)
    model = graphs.resampler()
    calib = {"waveform": graphs.tones(64, 256)["audio"]}
    written, report = quantize_with_report(model, calib, compensation="branch", min_gain=0.0, progress=False)
    (block,) = [b for b in report.blocks if b.output == "resampled"]
    assert block.r2_heldout is None and "dynamic axis 'N'" in block.note, block.note
    longer = {"waveform": graphs.tones(8, 384, seed=3)["audio"]}
    reference, quantized = (session(m).run(None, longer)[0] for m in (model, written))
    assert quantized.shape == (8, 768) and 10 * np.log10((reference**2).sum() / ((reference - quantized) ** 2).sum()) > 20


def test_a_branch_costing_more_than_the_whole_model_is_not_fitted():
    # the same resampler exported for one length: its samples are static "features" now, and a
    # dense branch over them would cost 256 x 512 multiply-accumulates against the filters' 2 x 9 x 256
    model = graphs.resampler(length=256)
    calib = {"waveform": graphs.tones(64, 256)["audio"]}
    _, report = quantize_with_report(model, calib, compensation="branch", min_gain=0.0, progress=False)
    (block,) = [b for b in report.blocks if b.output == "resampled"]
    assert block.r2_heldout is None and "more than the whole model's 4,608" in block.note, block.note


def test_feature_maps_that_hold_one_whole_inputs_frames_on_their_batch_axis_get_branches():
    # Silero VAD's sequence export: one recording a run, its frames the convolutions' batch
    model = graphs.framed_encoder()
    recordings = graphs.tones(64 * 12, 32, seed=1)["audio"].reshape(64, 12, 32)  # [recording, frame, sample]
    _, report = quantize_with_report(model, {"frames": recordings}, compensation="branch", min_gain=0.0, progress=False)
    maps = [b for b in report.blocks if b.input.startswith("/relu")]  # the first reads the frames, not a map
    assert maps and all(b.r2_heldout is not None for b in maps), [b.note for b in maps]
    # and the layer folds are fitted on the convolutions' outputs too (only the head's was, before)
    _, folded = quantize_with_report(model, {"frames": recordings}, compensation="affine", progress=False)
    assert folded.layer_fold_layers == 4 and folded.layer_folds_gained >= 3, folded.warnings


def test_a_model_fed_one_whole_sequence_is_calibrated_on_sequences_stacked_on_a_new_axis():
    # madmom's beat trackers take one spectrogram [T, F] and no batch: their sequences come stacked
    # [N, T, F], each fed whole (frames as samples would cut them into batches of frames)
    model = graphs.unbatched_tagger()
    rng = np.random.default_rng(0)
    sequences = (rng.standard_normal((60, 24, 8)) * np.linspace(0.5, 2.0, 8)).astype(np.float32)
    quantized, report = quantize_with_report(model, {"frames": sequences}, calib_method="minmax", compensation="branch",
                                             progress=False, **graphs.SYSTEMATIC_ERROR, **graphs.ANY_RUN_TIME)
    assert report.batch_size == 1 and report.samples == 60
    interface = [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                 for v in [*quantized.graph.input, *quantized.graph.output]]
    assert interface == [("frames", ["T", 8]), ("scores", ["T", 4]), ("summary", [4])]
    assert not any(n.name.startswith(samples_axis.PREFIX) for n in quantized.graph.node)
    # the residual block's tokens [T, C] have no samples axis; fitted as one sample's [1, T, C]
    assert any(b.kept for b in report.blocks) and not any("no common axis" in b.note for b in report.blocks)
    with pytest.raises(InputError, match="frames stack whole inputs .* but state does not; stack every input's samples the same way"):
        calibration.stacks_whole_inputs({"frames": sequences, "state": np.zeros(4, np.float32)},
                                        [InputSpec("frames", np.dtype(np.float32), (None, 8)),
                                         InputSpec("state", np.dtype(np.float32), (4,), None)])
    # AECMOS: features batched [N, 3, T, 160] beside a GRU state [4, 1, 64] stacked per sample, all zeros
    specs = [InputSpec("input", np.dtype(np.float32), (None, 3, 290, 160)),
             InputSpec("h0", np.dtype(np.float32), (4, 1, 64), None)]
    features = np.zeros((5, 3, 290, 160), np.float32)
    with pytest.raises(InputError, match=r"h0 holds one value for every sample: save that value once, shaped as the model "
                                         r"input \(\[4, 1, 64\]\), and it is fed with every batch"):
        calibration.stacks_whole_inputs({"input": features, "h0": np.zeros((5, 4, 1, 64), np.float32)}, specs)
    with pytest.raises(InputError, match="stack every input's samples the same way"):  # states that differ: no one value
        calibration.stacks_whole_inputs({"input": features, "h0": rng.standard_normal((5, 4, 1, 64))}, specs)
    assert not calibration.stacks_whole_inputs({"input": features, "h0": np.zeros((4, 1, 64), np.float32)}, specs)
    for length in (24, 37):  # any length, as the FP32 model takes
        test = (rng.standard_normal((length, 8)) * np.linspace(0.5, 2.0, 8)).astype(np.float32)
        reference, written = session(model).run(None, {"frames": test}), session(quantized).run(None, {"frames": test})
        assert [w.shape for w in written] == [(length, 4), (4,)]
        assert all(np.allclose(r, w, atol=0.1) for r, w in zip(reference, written))


def test_the_samples_axis_given_to_a_model_fed_whole_inputs_is_taken_out_around_what_the_passes_added():
    model = prepare.ir.serde.deserialize_model(graphs.unbatched_tagger())
    shapes = samples_axis.shapes(model)
    samples_axis.AddSamplesAxisPass()(model)
    frames = model.graph.inputs[0]
    assert list(frames.shape) == [1, "T", 8] and [list(v.shape) for v in model.graph.outputs] == [["T", 4], [4]]
    doubled = prepare.ir.node("Add", [frames, frames], name="/doubled")  # a pass's reader of the input as fed to it
    doubled.outputs[0].name, doubled.outputs[0].dtype, doubled.outputs[0].shape = "frames_doubled", frames.dtype, frames.shape
    model.graph.insert_before(model.graph[0], doubled)
    model.graph.outputs.append(doubled.outputs[0])
    samples_axis.RemoveSamplesAxisPass(shapes)(model)
    written = prepare.to_proto(model)
    onnx.checker.check_model(written)
    assert [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in written.graph.input] == [["T", 8]]
    test = {"frames": np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)}
    scores, summary, doubled = session(written).run(None, test)
    reference = session(graphs.unbatched_tagger()).run(None, test)
    np.testing.assert_allclose(scores, reference[0], rtol=1e-5)
    np.testing.assert_allclose(summary, reference[1], rtol=1e-5)
    np.testing.assert_allclose(doubled, 2 * test["frames"][np.newaxis], rtol=1e-6)

"""Unattended use: nothing half-written, the same bytes every time, and no crash on odd input."""

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from qwt_onnx import quantize, quantize_with_report
from qwt_onnx.errors import InputError
from qwt_onnx.runtime import session
from tests import graphs
from tests.graphs import GraphBuilder


def test_a_failed_write_leaves_no_partial_output_and_keeps_an_earlier_one(tmp_path, monkeypatch):
    model = graphs.resnet()
    calib = graphs.samples(model, 32, seed=1)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"an earlier result")

    def failing_save(model, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        quantize(model, calib, out, calib_method="minmax", progress=False)
    assert out.read_bytes() == b"an earlier result"
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]  # no staging folder left behind


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if mode == os.W_OK else real_access(path, mode))
    model = graphs.resnet()
    with pytest.raises(InputError, match="is not writable"):
        quantize(model, graphs.samples(model, 8, seed=1), tmp_path / "out.onnx", progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("build", [graphs.resnet, graphs.bert])
def test_the_same_inputs_give_a_byte_identical_model(tmp_path, build):
    model = build()
    calib = graphs.samples(model, 64, seed=1)
    for name in ("a.onnx", "b.onnx"):
        quantize(model, calib, tmp_path / name, progress=False)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


# Random small graphs: a stack of Conv / MatMul layers with optional residual adds and
# activations, fed random calibration arrays, some of them broken on purpose.
LAYER = st.tuples(st.sampled_from(["conv", "matmul"]), st.booleans(), st.sampled_from(["Relu", "Sigmoid", None]))


def _random_model(layers, channels, tokens, seed):
    b = GraphBuilder(seed)
    x = "x"
    for i, (kind, residual, activation) in enumerate(layers):
        if kind == "conv":
            shape = b.op("Reshape", [x, b.const(f"s{i}", np.array([0, channels, tokens, 1]))], f"to_map{i}")
            y = b.op("Conv", [shape, b.weight(f"w{i}", (channels, channels, 1, 1))], f"conv{i}")
            y = b.op("Reshape", [y, b.const(f"t{i}", np.array([0, channels, tokens]))], f"to_tokens{i}")
        else:
            y = b.op("MatMul", [x, b.weight(f"w{i}", (tokens, tokens))], f"matmul{i}")
        if activation:
            y = b.op(activation, [y], f"act{i}")
        x = b.op("Add", [x, y], f"add{i}") if residual else y
    b.nodes[-1].output[0] = "y"
    shape = ["batch", channels, tokens]
    return b.model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )


CORRUPTIONS = st.sampled_from([None, None, None, "nan", "rank", "dtype", "empty", "constant"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.lists(LAYER, min_size=1, max_size=4),
    channels=st.integers(1, 6),
    tokens=st.integers(1, 5),
    samples=st.integers(1, 24),
    corruption=CORRUPTIONS,
    method=st.sampled_from(["auto", "minmax", "percentile", "entropy"]),
    target=st.sampled_from(["ort", "trt"]),
    seed=st.integers(0, 2**16),
)
def test_random_graphs_either_quantize_to_a_runnable_model_or_fail_with_input_error(
    layers, channels, tokens, samples, corruption, method, target, seed
):
    model = _random_model(layers, channels, tokens, seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, channels, tokens)).astype(np.float32) * rng.uniform(0.01, 100)
    if corruption == "nan":
        x[rng.integers(samples)] = np.nan
    elif corruption == "rank":
        x = x[..., 0]
    elif corruption == "dtype":
        x = x.astype(np.float64) + 1j
    elif corruption == "empty":
        x = x[:0]
    elif corruption == "constant":
        x[:] = 3.0
    try:
        out = quantize(model, {"x": x}, calib_method=method, target=target, batch_size=int(rng.integers(1, 9)), progress=False)
    except InputError as exc:
        assert corruption not in (None, "constant"), f"valid input refused: {exc}"
        assert "\n" not in str(exc)
        return
    assert corruption in (None, "constant"), "broken calibration data was accepted"
    onnx.checker.check_model(out, full_check=True)
    test = rng.standard_normal((3, channels, tokens)).astype(np.float32)
    result = session(out).run(None, {"x": test})[0]
    assert result.shape == (3, channels, tokens) and np.isfinite(result).all()


def test_a_time_major_output_is_scored_per_sample_and_its_blocks_are_fitted_holding_samples_out():
    # A recurrent model's layout: [batch, T, C] in, [T, batch, C] out (T differs from the batch).
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((24, 24)).astype(np.float32) / 5 for _ in range(2))
    nodes = [
        helper.make_node("Transpose", ["x"], ["tm"], perm=[1, 0, 2]),
        helper.make_node("MatMul", ["tm", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Add", ["r", "tm"], ["res"]),
        helper.make_node("MatMul", ["res", "w2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "time_major",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 7, 24])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [7, "batch", 24])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = {"x": rng.standard_normal((40, 7, 24)).astype(np.float32)}
    written, report = quantize_with_report(model, calib, batch_size=16, min_gain=0.0, progress=False)
    assert report.sqnr_ptq_db is not None and report.sqnr_ptq_db > 20  # one SQNR per sample, not per time step
    assert report.blocks and all(b.r2_heldout is not None for b in report.blocks)  # samples held out along axis 1
    session(written).run(None, {"x": calib["x"][:3]})

"""Portable INT8 on an emulated AVX2-only CPU (qemu-x86_64 -cpu Haswell): no VNNI, so
onnxruntime's uint8 × int8 kernels add weight pairs in int16 with saturation.

These tests need qemu-user (.ci/run installs it). Without it they are skipped, unless
QWT_REQUIRE_EMULATION=1 (set by .ci/run) makes that a failure.
"""

import os

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwt_onnx import emulation, quantize
from qwt_onnx.numerics import quantization as qm
from qwt_onnx.numerics import saturation
from qwt_onnx.numerics.metrics import sqnr_db
from tests import graphs

pytestmark = pytest.mark.slow

if not emulation.available():
    if os.environ.get("QWT_REQUIRE_EMULATION") == "1":
        raise RuntimeError("QWT_REQUIRE_EMULATION=1 but qemu-x86_64 is missing: apt-get install qemu-user")
    pytest.skip("qemu-x86_64 is not installed (apt-get install qemu-user)", allow_module_level=True)

# op, input shape, weight shape, attributes: every path of onnxruntime's integer kernels
KERNELS = {
    "matmul": ("MatMul", [4, 16, 64], (64, 48), {}),
    "matmul-gemv": ("MatMul", [1, 1, 64], (64, 48), {}),
    "matmul-odd-k": ("MatMul", [4, 16, 37], (37, 48), {}),
    "gemm": ("Gemm", [8, 64], (64, 32), {}),
    "gemm-transb": ("Gemm", [8, 64], (32, 64), {"transB": 1}),
    "conv-sym-3x3": ("Conv", [2, 32, 8, 8], (32, 32, 3, 3), {"pads": [1, 1, 1, 1]}),
    "conv-sym-1x1": ("Conv", [2, 32, 8, 8], (32, 32, 1, 1), {}),
    "conv-3-channels": ("Conv", [2, 3, 9, 9], (16, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    "conv-6-channels": ("Conv", [2, 6, 8, 8], (12, 6, 3, 3), {"pads": [1, 1, 1, 1]}),
    "conv-grouped": ("Conv", [2, 32, 8, 8], (32, 8, 3, 3), {"pads": [1, 1, 1, 1], "group": 4}),
    "depthwise-3x3": ("Conv", [2, 32, 8, 8], (32, 1, 3, 3), {"pads": [1, 1, 1, 1], "group": 32}),
    "depthwise-5x5": ("Conv", [2, 8, 8, 8], (8, 1, 5, 5), {"pads": [2, 2, 2, 2], "group": 8}),
}


def _axis(op, attrs):
    return 0 if op == "Conv" or attrs.get("transB") else 1


def _qdq_model(op, x_shape, weight_q, attrs, y_scale):
    """x → Q/DQ (uint8) → op with int8 per-channel weights → Q/DQ, as onnxruntime fuses it."""
    axis = _axis(op, attrs)
    channels = weight_q.shape[axis]
    inits = [
        numpy_helper.from_array(weight_q.astype(np.int8), "wq"),
        numpy_helper.from_array(np.full(channels, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(channels, np.int8), "wz"),
        numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        numpy_helper.from_array(np.array(y_scale, np.float32), "ys"),
        numpy_helper.from_array(np.array(128, np.uint8), "yz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=axis),
        helper.make_node(op, ["xd", "wd"], ["y0"], **attrs),
        helper.make_node("QuantizeLinear", ["y0", "ys", "yz"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"]),
    ]
    graph = helper.make_graph(nodes, op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _in_reduction_order(rows, weight_shape, axis):
    """The weight whose ``saturation.reduction_rows`` are ``rows`` ([channels, K])."""
    if len(weight_shape) > 2:  # [C_out, *k, C_in] -> [C_out, C_in, *k]
        return np.moveaxis(rows.reshape(weight_shape[0], *weight_shape[2:], weight_shape[1]), -1, 1)
    return rows if axis == 0 else rows.T


def _weights(op, weight_shape, attrs, rng):
    """Full-range int8 weights, the same rounded pair-safe, and full-magnitude weights that only
    our pairing keeps safe: +127, -127, -127, +127, ... in reduction order (every pair mixed in
    sign, while any other pairing of neighbours, shifted or in ONNX's own layout, has equal signs)."""
    axis = _axis(op, attrs)
    w = rng.standard_normal(weight_shape)
    full = qm.quantize(w, qm.symmetric_weight_params(w, axis), axis)
    safe = qm.quantize(w, qm.symmetric_weight_params(w, axis, pair_safe=True), axis)
    rows = saturation.reduction_rows(full, axis).reshape(weight_shape[axis], -1)
    pattern = np.resize([127, -127, -127, 127], rows.shape[1])
    ordered = _in_reduction_order(np.tile(pattern, (rows.shape[0], 1)), weight_shape, axis)
    return {"full": full, "pair-safe": safe, "ordered": ordered}


def _outputs(model, feeds, level):
    """``model``'s outputs (a path or a ModelProto) on onnxruntime's CPU provider at ``level``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _run(model, x, level):
    return _outputs(model, {"x": x}, level)["y"]


@pytest.fixture(scope="module")
def kernel_runs(tmp_path_factory):
    """Per kernel and weight kind: the emulated fused output, the exact one and the output step."""
    folder = tmp_path_factory.mktemp("kernels")
    rng = np.random.default_rng(0)
    cases, paths = [], []
    for name, (op, x_shape, weight_shape, attrs) in KERNELS.items():
        # inputs at both ends of the uint8 range: every pair of products at its extreme
        x = (rng.choice([-1.0, 1.0], size=x_shape) * 5).astype(np.float32)
        for kind, weight in _weights(op, weight_shape, attrs, rng).items():
            probe = _qdq_model(op, x_shape, weight, attrs, 1.0)
            y_scale = float(np.abs(_run(probe, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)).max() / 100)
            model = _qdq_model(op, x_shape, weight, attrs, y_scale)
            exact = _run(model, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)  # DequantizeLinear + float op
            path = folder / f"{name}-{kind}.onnx"
            path.write_bytes(model.SerializeToString())
            cases.append((name, kind, x, exact, y_scale))
            paths.append(str(path))
    outputs = emulation.run(paths, [{"x": x} for _, _, x, _, _ in cases])
    return {(name, kind): (out["y"], exact, y_scale) for (name, kind, _, exact, y_scale), out in zip(cases, outputs)}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_the_pair_model_predicts_which_weights_saturate_onnxruntime_kernels(name, kernel_runs):
    """Full-range weights saturate every kernel but the depthwise one; weights kept pair-safe in
    saturation's reduction order never do, even at full magnitude."""
    steps = {}
    for kind in ("full", "pair-safe", "ordered"):
        fused, exact, y_scale = kernel_runs[(name, kind)]
        steps[kind] = np.abs(fused - exact).max() / y_scale  # in output quantization steps
    depthwise = name.startswith("depthwise")
    assert steps["pair-safe"] <= 1.01 and steps["ordered"] <= 1.01, steps  # at most a rounding tie apart
    if depthwise:
        assert steps["full"] <= 1.01, steps
    else:
        assert steps["full"] > 3, steps


def test_written_models_compute_the_same_on_an_avx2_cpu(tmp_path):
    """The models qwt_onnx writes by default give the native outputs on an AVX2-only CPU; with
    full-range weights the same transformer drifts far from exact integer math there."""
    paths, feeds = {}, {}
    for name, build in (("resnet", graphs.resnet), ("transformer", graphs.transformer)):
        model = build()
        calib, feeds[name] = graphs.samples(model, 64, seed=1), graphs.samples(model, 16, seed=2)
        for weight_range in ("portable", "full"):
            paths[name, weight_range] = str(tmp_path / f"{name}-{weight_range}.onnx")
            quantize(model, calib, paths[name, weight_range], weight_range=weight_range, min_gain=0.0, progress=False)
    emulated = dict(zip(paths, emulation.run(list(paths.values()), [feeds[name] for name, _ in paths])))
    for name in feeds:
        native = _outputs(paths[name, "portable"], feeds[name], ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        assert sqnr_db(native, emulated[name, "portable"]) > 60, name
    # no requantized outputs in the transformer: exact integer math is the reference
    exact = _outputs(paths["transformer", "full"], feeds["transformer"], ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert sqnr_db(exact, emulated["transformer", "full"]) < 20

"""The values a tensor's readers can tell apart, and quantizer ranges that stop there."""

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from qwt_onnx import api
from qwt_onnx.analysis.placement import Placement, place
from qwt_onnx.analysis.readable import UNBOUNDED, readable_interval_at
from qwt_onnx.graph import prepare
from qwt_onnx.numerics.ranges import RangeObserver, compute_range
from qwt_onnx.report import format_summary
from qwt_onnx.runtime import session
from tests import graphs
from tests.graphs import GraphBuilder


def _hard_swish(b: GraphBuilder, x: str, spelling: str) -> str:
    """``x · clip(x + 3, 0, 6) / 6`` as exporters write it."""
    if spelling == "op":
        return b.op("HardSwish", [x], "hswish")
    if spelling == "hardsigmoid":  # torch before opset 14
        return b.op("Mul", [x, b.op("HardSigmoid", [x], "hsig", alpha=1 / 6, beta=0.5)], "hswish")
    if spelling == "paddle":  # Add, Clip, Mul, Div
        gate = b.op("Clip", [b.op("Add", [x, b.const("three", np.float32(3))], "add3"), b.const("lo", np.float32(0)),
                             b.const("hi", np.float32(6))], "relu6")
        return b.op("Div", [b.op("Mul", [x, gate], "mul"), b.const("six", np.float32(6))], "hswish")
    if spelling == "keras":  # x * relu6(x + 3) * (1/6), the gate scaled before the product
        gate = b.op("Clip", [b.op("Add", [x, b.const("three", np.float32(3))], "add3"), b.const("lo", np.float32(0)),
                             b.const("hi", np.float32(6))], "relu6")
        return b.op("Mul", [x, b.op("Mul", [gate, b.const("sixth", np.float32(1 / 6))], "scale")], "hswish")
    raise ValueError(spelling)


def _conv_then(reader, channels: int = 8, size: int = 8, seed: int = 0, weight_scale: float | None = None) -> onnx.ModelProto:
    """A Conv whose output ``reader(b, x)`` reads, then a 1×1 Conv: ``image`` to ``y``."""
    b = GraphBuilder(seed)
    x = b.op("Conv", ["image", b.weight("w1", (channels, 3, 3, 3), weight_scale), b.const("b1", np.zeros(channels, np.float32))],
             "conv1", pads=[1, 1, 1, 1])
    h = reader(b, x)
    b.op("Conv", [h, b.weight("w2", (channels, channels, 1, 1)), b.const("b2", np.zeros(channels, np.float32))], "conv2")
    b.nodes[-1].output[0] = "y"
    return b.model([helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, size, size])])


def _interval_of_conv1(proto: onnx.ModelProto) -> tuple[float, float]:
    model = ir.serde.deserialize_model(proto)
    return readable_interval_at(next(n for n in model.graph if n.name == "conv1").outputs[0])


@pytest.mark.parametrize("spelling", ["op", "hardsigmoid", "paddle", "keras"])
def test_a_hard_swish_reads_every_value_below_minus_three_as_zero(spelling):
    low, high = _interval_of_conv1(_conv_then(lambda b, x: _hard_swish(b, x, spelling)))
    assert low == pytest.approx(-3.0, abs=1e-5) and high == math.inf


@pytest.mark.parametrize("reader, expected", [
    (lambda b, x: b.op("Clip", [x, b.const("lo", np.float32(-1)), b.const("hi", np.float32(2))], "clip"), (-1.0, 2.0)),
    (lambda b, x: b.op("HardSigmoid", [x], "hsig", alpha=0.25, beta=0.5), (-2.0, 2.0)),
    (lambda b, x: b.op("Relu", [b.op("Sub", [x, b.const("c", np.float32(1))], "sub")], "relu"), (1.0, math.inf)),
    (lambda b, x: b.op("Relu", [b.op("Mul", [x, b.const("k", np.float32(-2))], "neg")], "relu"), (-math.inf, 0.0)),
    # a Relu beside a reader that sees every value; x · sigmoid(x) never stops changing
    (lambda b, x: b.op("Add", [b.op("Relu", [x], "relu"), x], "add"), UNBOUNDED),
    (lambda b, x: b.op("Mul", [x, b.op("Sigmoid", [x], "sig")], "silu"), UNBOUNDED),
    (lambda b, x: b.op("Relu", [b.op("Add", [x, x], "double")], "relu"), UNBOUNDED),
    # soft saturation: σ(±6.23) is within half an 8-bit level of 0 and 1, tanh(±3.11) of ±1;
    # not where a Log or a division magnifies what lies near the limits
    (lambda b, x: b.op("Sigmoid", [x], "sig"), (-math.log(509), math.log(509))),
    (lambda b, x: b.op("Tanh", [x], "tanh"), (-math.log(509) / 2, math.log(509) / 2)),
    (lambda b, x: b.op("Log", [b.op("Sigmoid", [x], "sig")], "log"), UNBOUNDED),
    (lambda b, x: b.op("Div", [b.const("one", np.float32(1)), b.op("Sigmoid", [x], "sig")], "inverse"), UNBOUNDED),
    (lambda b, x: b.op("Div", [b.op("Sigmoid", [x], "sig"), b.const("two", np.float32(2))], "half"), (-math.log(509), math.log(509))),
])
def test_the_interval_follows_each_reader_and_affine_steps_to_where_it_saturates(reader, expected):
    low, high = _interval_of_conv1(_conv_then(reader))
    assert (low, high) == pytest.approx(expected)


def test_a_sigmoid_saturates_further_out_at_sixteen_bits():
    model = ir.serde.deserialize_model(_conv_then(lambda b, x: b.op("Sigmoid", [x], "sig")))
    conv1 = next(n for n in model.graph if n.name == "conv1").outputs[0]
    assert readable_interval_at(conv1, bits=16) == pytest.approx((-math.log(2**17 - 3), math.log(2**17 - 3)))


def test_a_graph_output_is_read_everywhere():
    b = GraphBuilder(0)
    shifted = b.op("Add", ["x", b.const("c", np.float32(3))], "add")
    b.op("Clip", [shifted, b.const("lo", np.float32(0)), b.const("hi", np.float32(6))], "clip")
    proto = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                    [helper.make_tensor_value_info("clip_out", TensorProto.FLOAT, ["N", 4]),
                     helper.make_tensor_value_info("add_out", TensorProto.FLOAT, ["N", 4])])
    model = ir.serde.deserialize_model(proto)
    assert readable_interval_at(model.graph.inputs[0]) == UNBOUNDED


@pytest.mark.parametrize("start", [-3.0, -1 / np.float32(1 / 6) * 0.5])  # -2.99999937: HardSigmoid(1/6, 0.5) in float32
def test_an_observer_clamped_to_its_interval_has_a_level_at_or_below_its_end_for_every_method(start):
    rng = np.random.default_rng(0)
    # an SE gate's input: 30% far below the HardSigmoid's end, the rest small (entropy clips inside -3)
    x = np.concatenate([start - np.abs(rng.normal(0, 5, 30_000)), rng.normal(0, 0.3, 70_000)]).astype(np.float32)
    clamped, plain = RangeObserver(readable=(float(start), math.inf)), RangeObserver()
    clamped.update(x)
    plain.update(x)
    for method in ("minmax", "percentile", "mse", "entropy"):
        low, high = compute_range(clamped, method)
        scale = (high - low) / 255
        zero_point = round(-low / scale)
        # the lowest level at most 1.5 steps below the end, never above it: a clipping method
        # would move the clamped mass to where the reader tells it apart
        assert start - 1.5 * scale <= -zero_point * scale <= start, method
        assert high - low < np.subtract(*compute_range(plain, method)[::-1]), method  # the levels go to the values read


def test_an_end_at_zero_is_exact_on_every_grid_and_is_not_widened():
    observer = RangeObserver(readable=(0.0, math.inf))
    observer.update(np.linspace(-5, 5, 1001, dtype=np.float32))
    assert compute_range(observer, "minmax") == (0.0, 5.0)


def test_a_hard_swish_convs_quantizer_spends_its_levels_above_minus_three_and_tracks_fp32_closer(monkeypatch):
    # large first-layer weights: pre-activations reach far below -3, where the hard-swish reads 0
    proto = _conv_then(lambda b, x: _hard_swish(b, x, "paddle"), channels=16, size=12, weight_scale=2.0)
    calib, evaluation = graphs.samples(proto, 48, seed=1), graphs.samples(proto, 16, seed=2)
    model = prepare.prepare(ir.serde.deserialize_model(proto))
    conv1 = next(n for n in model.graph if n.name == "conv1").outputs[0].name
    assert place(model.graph, "ort").readable_intervals() == {conv1: pytest.approx((-3.0, math.inf))}
    reference = session(proto).run(None, evaluation)[0]

    def quantized_error() -> tuple[float, float, float]:
        quantized = api.quantize(proto, calib, qwt=False, progress=False, calib_method="minmax", bias_correction="off",
                                 rounding="nearest", equalization="off")
        dq = next(n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.output[0].startswith(conv1))
        scale, zero_point = (float(onnx.numpy_helper.to_array(next(i for i in quantized.graph.initializer if i.name == name)))
                             for name in dq.input[1:3])
        error = np.mean((session(quantized).run(None, evaluation)[0] - reference) ** 2) / np.mean(reference**2)
        return -zero_point * scale, scale, error

    lowest, scale, error = quantized_error()
    assert -3.0 - 1.5 * scale <= lowest <= -3.0
    _, report = api.quantize_with_report(proto, calib, qwt=False, progress=False, calib_method="minmax")
    assert report.readable_ranges == 1
    assert "ranges stop where the readers saturate: 1 tensor read only" in format_summary(report, "model.onnx")
    monkeypatch.setattr(Placement, "readable_intervals", lambda self, bits=8: {})
    lowest_plain, scale_plain, error_plain = quantized_error()
    assert lowest_plain < -20.0 and scale < 0.6 * scale_plain
    assert error < 0.8 * error_plain  # 0.69: the other quantizers' error is unchanged

"""Error-feedback (GPTQ) weight rounding: the numerics, the input statistics it needs, the pass and the option."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from qwt_onnx import check
from qwt_onnx.api import quantize_with_report
from qwt_onnx.numerics import rounding, saturation
from qwt_onnx.numerics.hessian import InputGeometry, SecondMoments, input_rows
from qwt_onnx.runtime import session
from tests import graphs


def _correlated_inputs(rng: np.random.Generator, rows: int, width: int) -> np.ndarray:
    return rng.standard_normal((rows, 16)) @ rng.standard_normal((16, width)) + 0.3 * rng.standard_normal((rows, width))


def _output_error(weight: np.ndarray, integers: np.ndarray, step: np.ndarray, x: np.ndarray) -> float:
    return float(np.mean(np.square((weight - integers * step) @ x.T)))


@pytest.mark.parametrize("top", [7, 127])
def test_error_feedback_leaves_less_output_error_than_nearest_on_the_same_grid(top):
    rng = np.random.default_rng(0)
    x = _correlated_inputs(rng, 2048, 96)
    weight = 0.1 * rng.standard_normal((32, 96))
    step = np.abs(weight).max(axis=1, keepdims=True) / top
    nearest = np.clip(np.rint(weight / step), -top, top)
    fed_back = rounding.error_feedback_rounding(weight[None], rounding.feedback((x.T @ x / len(x))[None]), step[None], top)[0]
    assert np.abs(fed_back).max() <= top
    assert _output_error(weight, fed_back, step, x) < 0.5 * _output_error(weight, nearest, step, x)


@pytest.mark.parametrize("width", [20, 300])  # one block, and blocks inverted by halves
def test_the_feedback_factor_is_the_upper_cholesky_factor_of_the_damped_inverse(width):
    rng = np.random.default_rng(width)
    x = _correlated_inputs(rng, 4 * width, width)
    hessian = np.stack([x.T @ x, np.diag(rng.uniform(1, 2, width))]) / len(x)
    fed_back = rounding.feedback(hessian)
    for h, order, factor in zip(hessian, fed_back.order, fed_back.factor.astype(np.float64)):
        ordered = h[np.ix_(order, order)]
        damped = ordered + rounding.DAMPING * np.mean(np.diag(ordered)) * np.eye(width)
        assert np.array_equal(factor, np.triu(factor))
        np.testing.assert_allclose(factor.T @ factor @ damped, np.eye(width), atol=1e-4)


def test_the_same_weights_on_the_same_grid_are_rounded_once():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((256, 12)) @ rng.standard_normal((12, 12))
    rows = rng.standard_normal((1, 5, 12)).astype(np.float32)
    step = np.abs(rows).max(axis=2, keepdims=True) / 127
    moments = (x.T @ x / 256)[None]
    fed_back = rounding.feedback(moments)
    first = rounding.error_feedback_rounding(rows, fed_back, step, 127)
    first[0, 0, 0] += 1  # the caller's copy: the remembered rounding is not touched
    again = rounding.error_feedback_rounding(rows, fed_back, step, 127)
    np.testing.assert_array_equal(again, rounding.error_feedback_rounding(rows, rounding.feedback(moments), step, 127))
    assert again.dtype == np.int32 and len(fed_back.rounded) == 1
    rounding.error_feedback_rounding(rows, fed_back, step * 2, 127)  # another grid: rounded anew
    assert len(fed_back.rounded) == 2


def test_uncorrelated_inputs_leave_nothing_to_feed_back():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((8, 40))
    step = np.abs(weight).max(axis=1, keepdims=True) / 7
    hessian = np.diag(rng.uniform(0.5, 2.0, 40))[None]
    fed_back = rounding.error_feedback_rounding(weight[None], rounding.feedback(hessian), step[None], 7)[0]
    np.testing.assert_array_equal(fed_back, np.clip(np.rint(weight / step), -7, 7))


def test_inputs_never_seen_are_rounded_without_breaking_the_factorisation():
    rng = np.random.default_rng(2)
    x = _correlated_inputs(rng, 512, 24)
    x[:, 5] = 0.0  # a channel that is always zero (a dead ReLU)
    weight = rng.standard_normal((4, 24))
    step = np.abs(weight).max(axis=1, keepdims=True) / 127
    fed_back = rounding.error_feedback_rounding(weight[None], rounding.feedback((x.T @ x)[None]), step[None], 127)[0]
    assert np.all(np.isfinite(fed_back)) and np.abs(fed_back).max() <= 127


@pytest.mark.parametrize("case", ["indefinite", "not finite", "constant input"])
def test_moments_short_of_positive_definite_still_round(case):
    rng = np.random.default_rng(7)
    if case == "constant input":  # a centred constant leaves rounding noise, as streamed float32 sums do
        moments = SecondMoments(InputGeometry(), batches=1)
        moments.update(np.full((64, 12), 3.0, np.float32) + rng.normal(0, 1e-6, (64, 12)).astype(np.float32))
        hessian = moments.hessian(centered=True)
    else:
        a = rng.standard_normal((1, 12, 12))
        hessian = a + a.transpose(0, 2, 1)  # symmetric, eigenvalues of both signs
        if case == "not finite":
            hessian[0, 3, 4] = np.nan
    weight = rng.standard_normal((5, 12))
    step = np.abs(weight).max(axis=1, keepdims=True) / 7
    integers = rounding.error_feedback_rounding(weight[None], rounding.feedback(hessian), step[None], 7)[0]
    assert np.abs(integers).max() <= 7 and np.abs(integers * step - weight).max() <= 7 * step.max()


def test_pair_safe_weights_stay_pair_safe():
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    step = (np.abs(weight).reshape(16, -1).max(axis=1) / 127 * 0.5).reshape(1, 16, 1)  # a grid on which pairs overflow
    rows = rounding.weight_rows(weight, 0)
    x = _correlated_inputs(rng, 1024, rows.shape[-1])
    nearest = rounding.rows_to_weight(np.clip(np.rint(rows / step), -127, 127), weight.shape, 0)
    assert saturation.overflowing_pairs(nearest, 0).sum() > 0
    integers = rounding.error_feedback_rounding(rows, rounding.feedback((x.T @ x)[None]), step, 127, saturation.PAIR_LIMIT,
                                                rounding.pair_partners(weight.shape, 0))
    assert saturation.overflowing_pairs(rounding.rows_to_weight(integers, weight.shape, 0), 0).sum() == 0


@pytest.mark.parametrize("shape, axis", [((6, 4, 3, 3), 0), ((10, 6), 1), ((6, 10), 0), ((7, 6), 1), ((4, 3, 1, 3), 0)])
def test_pair_partners_are_the_pairs_the_kernels_add(shape, axis):
    weight = np.random.default_rng(6).standard_normal(shape)
    rows = rounding.weight_rows(weight, axis)[0]
    partners = rounding.pair_partners(shape, axis)
    sums = []
    for i, p in enumerate(partners):
        if p < i and p >= 0:
            continue  # each pair once
        pair = rows[:, [i, p]] if p >= 0 else rows[:, [i]]
        sums.append(np.maximum(np.clip(pair, 0, None).sum(axis=1), np.clip(-pair, 0, None).sum(axis=1)))
    np.testing.assert_allclose(np.sort(np.stack(sums, axis=1), axis=1), np.sort(saturation.pair_sums(weight, axis), axis=1))
    np.testing.assert_array_equal(rounding.rows_to_weight(rounding.weight_rows(weight, axis), shape, axis), weight)


def _conv_model(weight: np.ndarray, **attributes) -> onnx.ModelProto:
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attributes)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CONVOLUTIONS = [
    ((2, 4, 9, 8), (3, 3), dict(strides=[2, 2], pads=[1, 0, 1, 1])),
    ((2, 4, 8, 7), (3, 3), dict(strides=[2, 2], group=2, auto_pad="SAME_UPPER")),
    ((2, 4, 7, 7), (3, 3), dict(pads=[2, 2, 2, 2], dilations=[2, 2])),
    ((3, 8, 11), (5,), dict(strides=[2], group=4, auto_pad="SAME_LOWER")),
    ((1, 3, 8, 8), (3, 3), dict(strides=[2, 2], auto_pad="VALID")),
    ((2, 6, 5, 5), (3, 3), dict(group=6, pads=[1, 1, 1, 1])),  # depthwise
]


@pytest.mark.parametrize("shape, kernel, attributes", CONVOLUTIONS)
def test_patches_times_the_weight_rows_are_the_convolution(shape, kernel, attributes):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(np.float32)
    group = attributes.get("group", 1)
    weight = rng.standard_normal((6 if group == 6 else 4, shape[1] // group, *kernel)).astype(np.float32)
    expected = session(_conv_model(weight, **attributes)).run(None, {"x": x})[0]
    geometry = InputGeometry(kernel, tuple(attributes.get("strides", ())), tuple(attributes.get("pads", ())),
                             tuple(attributes.get("dilations", ())), group, attributes.get("auto_pad", "NOTSET"))
    patches = input_rows(x, geometry, 10**6, np.random.default_rng(0))  # every position, in order
    rows = rounding.weight_rows(weight, 0, group)
    computed = np.einsum("grd,gnd->rgn", patches, rows).reshape(patches.shape[1], -1)
    np.testing.assert_allclose(computed, np.moveaxis(expected, 1, -1).reshape(-1, weight.shape[0]), atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 6, 5, 5), (4, 3, 40, 40)])  # the second reads few of its positions
def test_sampled_patches_and_their_moments_are_the_patches_at_the_sampled_positions(shape):
    x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    geometry = InputGeometry((3, 3), pads=(1, 1, 1, 1), group=3 if shape[1] == 6 else 1)
    every = input_rows(x, geometry, 10**6, np.random.default_rng(0))  # every position, in order
    positions = every.shape[1]
    picked = np.random.default_rng(1).choice(positions, 9, replace=False)
    sampled = input_rows(x, geometry, 9, np.random.default_rng(1))
    np.testing.assert_array_equal(sampled, every[:, picked])
    moments = SecondMoments(geometry, batches=32768 // 9 + 1)  # nine rows per update
    moments._rng = np.random.default_rng(1)
    moments.update(x)
    rows = every[:, picked].astype(np.float64)
    np.testing.assert_allclose(moments.hessian(centered=False), rows.transpose(0, 2, 1) @ rows / 9, rtol=1e-5, atol=1e-6)


def test_second_moments_stream_sampled_rows():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 5, 12)).astype(np.float32) + 1.0
    everything = SecondMoments(InputGeometry(), batches=1)  # more rows wanted than there are
    sampled = SecondMoments(InputGeometry(), batches=4096)  # 32,768 rows over 4,096 batches: 8 per batch
    for part in np.split(x, 3):
        everything.update(part)
        sampled.update(part)
    rows = x.reshape(-1, 12).astype(np.float64)
    np.testing.assert_allclose(everything.hessian(centered=False)[0], rows.T @ rows / len(rows), rtol=1e-5)
    np.testing.assert_allclose(everything.hessian(centered=True)[0], np.cov(rows.T, bias=True), rtol=1e-4, atol=1e-5)
    assert sampled.count == 24 and sampled.hessian(centered=False).shape == (1, 12, 12)
    transposed = input_rows(x[0].T.copy(), InputGeometry(transposed=True), 100, rng)  # Gemm with transA reads [K, M]
    np.testing.assert_array_equal(transposed[0], x[0])


def _pipeline(model, rounding_mode: str, weight_bits: int = 8):
    calib = graphs.samples(model, 96, seed=1)
    return quantize_with_report(model, calib, qwt=False, progress=False, rounding=rounding_mode, weight_bits=weight_bits,
                                calib_method="minmax", bias_correction="off", float_stem=0)


def test_gptq_rounding_writes_the_same_graph_closer_to_fp32():
    model = graphs.resnet(seed=0)
    nearest, nearest_report = _pipeline(model, "nearest", weight_bits=4)
    fed_back, report = _pipeline(model, "gptq", weight_bits=4)
    assert [n.op_type for n in nearest.graph.node] == [n.op_type for n in fed_back.graph.node]
    assert report.gptq == {"minmax": True} and nearest_report.gptq == {"minmax": False}
    assert report.sqnr_ptq_db > nearest_report.sqnr_ptq_db + 1.0


def test_gptq_rounding_keeps_portable_weights_pair_safe():
    fed_back, report = _pipeline(graphs.resnet(seed=1), "gptq")
    assert report.gptq == {"minmax": True}
    assert not check.check(fed_back).of("saturation")


def test_auto_rounding_reports_the_held_out_gain_of_either_choice():
    model = graphs.bert()
    proto, report = quantize_with_report(model, graphs.samples(model, 96, seed=2), qwt=False, progress=False, calib_method="minmax")
    assert set(report.gptq_gain_db) == {"minmax"}
    assert report.gptq["minmax"] == (report.gptq_gain_db["minmax"] > 0)

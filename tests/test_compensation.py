"""Feature-map branches: the numpy layout the solver fits is the convolution the splice writes."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwt_onnx.numerics import quantization as qm
from qwt_onnx.numerics import saturation
from qwt_onnx.numerics.compensation import Layout, infer_layout
from qwt_onnx.numerics.solver import LinearMap, NormalEquations
from qwt_onnx.runtime import session


@pytest.mark.parametrize("kernel, stride, groups, crop", [
    (1, 1, 1, (0, 0)), (1, 2, 4, (0, 0)), (3, 1, 1, (0, 0)), (3, 2, 2, (0, 0)),
    (1, 1, 1, (1, 1)), (1, 2, 2, (1, 1)), (3, 2, 1, (0, 1)),  # after an unpadded 3×3 (or 2×2) block
    (1, (2, 1), 1, (0, 0)), (3, (1, 2), 2, (1, 1)),  # a stride per axis
    (1, 1, 1, ((1, 1), (0, 0))), (1, 2, 2, ((0, 0), (2, 2))),  # a crop per axis
])
def test_the_spliced_convolution_computes_the_fitted_map(kernel, stride, groups, crop):
    rng = np.random.default_rng(kernel + groups)
    c_in, c_out, size = 8, 12, (7, 10)  # odd and even sizes: the output is ceil((size - crop) / stride)
    layout = Layout(channels_first=True, stride=stride, spatial_rank=2, kernel=kernel, groups=groups, crop=crop)
    weight = np.zeros((c_in * kernel * kernel, c_out), np.float32)
    for features, targets in layout.group_slices(*weight.shape):
        weight[features, targets] = rng.standard_normal((features.stop - features.start, targets.stop - targets.start))
    fit = LinearMap(weight, rng.standard_normal(c_out).astype(np.float32))
    x = rng.standard_normal((2, c_in, *size)).astype(np.float32)

    cropping = helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["cropped"])
    node = helper.make_node(
        "Conv", ["cropped", "w", "b"], ["y"], kernel_shape=[kernel] * 2, strides=list(layout.strides), pads=[kernel // 2] * 4,
        group=groups,
    )
    crops = layout.crops
    bounds = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("starts", [c[0] for c in crops]), ("ends", [s - c[1] for s, c in zip(size, crops)]), ("axes", [2, 3]))]
    graph = helper.make_graph(
        [cropping, node],
        "branch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c_in, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", c_out, "h2", "w2"])],
        [numpy_helper.from_array(layout.op_weight(weight), "w"), numpy_helper.from_array(fit.bias, "b"), *bounds],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    expected = session(model).run(None, {"x": x})[0]
    assert expected.shape == (2, c_out, *[-(-(s - sum(c)) // step) for s, c, step in zip(size, crops, layout.strides)])
    np.testing.assert_allclose(layout.apply(fit, x), expected, rtol=1e-4, atol=1e-4)
    assert layout.rows(x).shape == (expected.size // c_out, c_in * kernel * kernel)
    np.testing.assert_array_equal(layout.map_of(layout.op_weight(weight)), weight)


@pytest.mark.parametrize(
    "c_in, c_out, factor, groups",
    [(128, 256, 64, 2), (512, 512, 64, 8), (32, 64, 64, 1), (96, 40, 32, 2), (128, 128, 0, 1)],
)
def test_groups_are_input_channels_over_the_factor_dividing_both_counts(c_in, c_out, factor, groups):
    layout = infer_layout((2, c_in, 8, 8), (2, c_out, 4, 4), channels_first=True, groups_factor=factor)
    assert layout.groups == groups and layout.stride == 2


@pytest.mark.parametrize("x_shape, y_shape, stride, crop", [
    ((2, 3, 48, 48), (2, 32, 23, 23), 2, (1, 1)),  # a Keras 3×3 / 2 convolution, valid padding
    ((2, 8, 9, 9), (2, 8, 7, 7), 1, (1, 1)),
    ((2, 8, 9, 12), (2, 16, 5, 8), 1, (2, 2)),  # 5×5
    ((2, 8, 7, 7), (2, 8, 3, 3), 2, (1, 1)),  # an unpadded 3×3 / 2 pool on an odd size
    ((2, 8, 9, 9), (2, 8, 8, 8), 1, (0, 1)),  # 2×2
    ((2, 8, 24, 96), (2, 8, 12, 96), (2, 1), (0, 0)),  # a text recogniser's stride (2, 1), padded
    ((2, 8, 25, 96), (2, 8, 12, 94), (2, 1), (1, 1)),  # ... and unpadded
    ((2, 64, 2), (2, 64, 1), 2, (0, 0)),  # silero-vad's last encoder conv: stride 2 on a length of 2
    # a TensorFlow export's 3×3 convolution, valid in time and same in frequency (openWakeWord's
    # speech embedding), and the 3×3 / 2 pool after one
    ((2, 48, 36, 16), (2, 48, 34, 16), 1, ((1, 1), (0, 0))),
    ((2, 24, 74, 32), (2, 24, 36, 16), 2, ((1, 1), (0, 0))),
])
def test_blocks_of_unpadded_or_unevenly_strided_convolutions_get_a_branch_on_the_window_centres(x_shape, y_shape, stride, crop):
    layout = infer_layout(x_shape, y_shape, channels_first=True, groups_factor=0)
    assert (layout.stride, layout.crop, layout.kernel) == (stride, crop, 1)
    fit = LinearMap.zeros(x_shape[1], y_shape[1])
    assert layout.apply(fit, np.zeros(x_shape, np.float32)).shape == y_shape


def test_feature_maps_around_a_block_that_is_not_convolutional_get_a_pixelwise_branch():
    # PP-OCRv6 rec's SVTR neck: a transformer between Reshapes, NCHW maps in and out
    layout = infer_layout((2, 384, 1, 60), (2, 120, 1, 60), channels_first=False, kernel=3)
    assert layout.channels_first and layout.kernel == 1 and layout.stride == 1 and not layout.cropping
    assert infer_layout((2, 384, 1, 60), (2, 120, 1, 30), channels_first=False) is None  # no guessing at strides there


def test_no_layout_where_no_linear_branch_fits():
    assert infer_layout((2, 8, 8, 8), (2, 16), channels_first=True) is None
    assert infer_layout((2, 8, 9, 8), (2, 8, 4, 10), channels_first=True) is None  # no window grows an axis
    assert infer_layout((2, 5, 16), (2, 6, 16), channels_first=False) is None  # tokens must keep their count
    assert infer_layout((2, 8, 7, 7), (2, 8, 1, 1), channels_first=True) is None  # global pooling


@pytest.mark.parametrize("layout, shape", [
    (Layout(channels_first=False), (48, 32)),
    (Layout(channels_first=True, spatial_rank=2, kernel=3, groups=2), (8 * 9, 12)),
    (Layout(channels_first=True, spatial_rank=2, groups=8), (8, 8)),  # one channel per group: depthwise
])
def test_int8_branch_weights_are_exactly_what_the_splice_stores(layout, shape):
    rng = np.random.default_rng(0)
    weight = np.zeros(shape, np.float32)
    for features, targets in layout.group_slices(*shape):
        weight[features, targets] = rng.standard_normal((features.stop - features.start, targets.stop - targets.start))
    rounded, scale = layout.int8_rounded(weight, pair_safe=True)
    op_weight, axis = layout.op_weight(rounded), layout.op_weight_axis
    params = qm.QuantParams(scale, np.zeros(scale.shape, np.int8))
    stored = qm.quantize(op_weight, params, axis)  # what the splice writes, with these scales
    np.testing.assert_array_equal(qm.dequantize(stored, params, axis), op_weight)
    depthwise = op_weight.ndim > 2 and not saturation.kernel_pairs_products(op_weight.shape, layout.groups)
    if depthwise:  # its kernel never pairs products: the full int8 range
        np.testing.assert_array_equal(np.abs(stored).max(axis=(1, 2, 3)), 127)
    else:
        assert not saturation.overflowing_pairs(stored, axis).any()


@pytest.mark.parametrize("layout, x_shape, y_shape", [
    (Layout(channels_first=True, stride=2, spatial_rank=2, groups=2), (3, 4, 7, 6), (3, 6, 4, 3)),
    (Layout(channels_first=True, spatial_rank=1, kernel=3), (2, 3, 9), (2, 5, 9)),
    (Layout(channels_first=False), (2, 7, 5), (2, 7, 3)),
])
def test_accumulated_statistics_are_those_of_the_rows(layout, x_shape, y_shape):
    """Feature maps are added to the normal equations without their transposed rows; the
    statistics are those of the rows the branch maps."""
    rng = np.random.default_rng(3)
    x, r = rng.standard_normal(x_shape).astype(np.float32), rng.standard_normal(y_shape).astype(np.float32)
    x_rows, r_rows = layout.rows(x), layout.target_rows(r)
    slices = layout.group_slices(x_rows.shape[1], r_rows.shape[1])
    accumulated = [NormalEquations(f.stop - f.start, t.stop - t.start, np.zeros(f.stop - f.start, np.float32)) for f, t in slices]
    layout.accumulate(accumulated, x, r)
    for equations, (f, t) in zip(accumulated, slices):
        expected = NormalEquations(f.stop - f.start, t.stop - t.start, np.zeros(f.stop - f.start, np.float32))
        expected.update(x_rows[:, f], r_rows[:, t])
        assert equations.count == expected.count
        for name in ("sum_x", "sum_r", "sum_r2", "xtx", "xtr"):
            np.testing.assert_allclose(getattr(equations, name), getattr(expected, name), rtol=1e-5, atol=1e-4)

"""Pair-safe int8 weights: the numerics, without onnxruntime (tests/test_portable.py runs them)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwt_onnx.numerics import quantization as qm
from qwt_onnx.numerics import saturation


def test_reduction_rows_follow_the_kernels_order():
    conv = np.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)  # [C_out, C_in, kh, kw]
    rows = saturation.reduction_rows(conv, axis=0)
    # output channel 0: kernel position (0, 0) for input channels 0, 1, 2, then position (0, 1), ...
    assert rows.shape == (2, 1, 12) and list(rows[0, 0, :4]) == [0, 4, 8, 1]
    matmul = np.arange(3 * 4).reshape(3, 4)  # [K, N]
    assert list(saturation.reduction_rows(matmul, axis=1)[1, 0]) == [1, 5, 9]
    assert list(saturation.reduction_rows(matmul.T, axis=0)[1, 0]) == [1, 5, 9]  # Gemm with transB
    batched = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # [B, K, N]: one run of K per batch index
    assert saturation.reduction_rows(batched, axis=2).shape == (4, 2, 3)


def test_pairs_of_the_same_sign_are_what_can_overflow():
    weight = np.array([[127, 2, 100, -100, -64, -64, 5]], np.int8)  # [N=1, K=7] as a Gemm with transB
    assert saturation.pair_sums(weight, axis=0).tolist() == [[129, 100, 128, 5]]  # K padded with a zero
    assert saturation.overflowing_pairs(weight, axis=0).tolist() == [1]


@settings(max_examples=60, deadline=None)
@given(
    # convolutions, Gemm with and without transB, MatMul with an odd K, a batched MatMul
    shape_axis=st.sampled_from([((16, 8, 3, 3), 0), ((8, 3, 3, 3), 0), ((32, 48), 0), ((32, 48), 1), ((37, 5), 1), ((4, 17, 9), 2)]),
    scale=st.floats(1e-3, 1e3),
    heavy_tails=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_pair_safe_weights_never_overflow_and_cost_at_most_one_bit(shape_axis, scale, heavy_tails, seed):
    shape, axis = shape_axis
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(2, shape) if heavy_tails else rng.standard_normal(shape)).astype(np.float32) * scale
    safe = qm.symmetric_weight_params(w, axis, pair_safe=True)
    full = qm.symmetric_weight_params(w, axis)
    q = qm.quantize(w, safe, axis)
    assert not saturation.overflowing_pairs(q, axis).any()
    assert np.all(safe.scale >= full.scale) and np.all(safe.scale <= 2 * full.scale * 1.0001)


def test_pair_safe_rounding_costs_far_less_than_seven_bit_weights():
    w = np.random.default_rng(0).standard_normal((256, 384)).astype(np.float32)

    def sqnr(params):
        error = w - qm.dequantize(qm.quantize(w, params, 0), params, 0)
        return 10 * np.log10((w**2).sum() / (error**2).sum())

    full = qm.symmetric_weight_params(w, 0)
    seven_bit = qm.QuantParams(full.scale * 127 / 64, full.zero_point)
    safe = sqnr(qm.symmetric_weight_params(w, 0, pair_safe=True))
    assert sqnr(full) - 3 < safe and safe > sqnr(seven_bit) + 3
    assert saturation.overflowing_pairs(qm.quantize(w, full, 0), 0).any()  # full range does overflow


@pytest.mark.parametrize(
    "shape, group, pairs",
    [((32, 1, 3, 3), 32, False), ((64, 1, 3, 3), 32, True), ((32, 8, 3, 3), 4, True), ((32, 32, 1, 1), 1, True), ((64, 32), 1, True)],
)
def test_only_depthwise_kernels_leave_products_unpaired(shape, group, pairs):
    assert saturation.kernel_pairs_products(shape, group) is pairs

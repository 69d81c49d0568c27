import numpy as np
import pytest

from qwt_onnx.numerics import quantization as qm
from qwt_onnx.numerics import ranges
from qwt_onnx.numerics.ranges import RangeObserver, compute_range


def _observe(*chunks):
    observer = RangeObserver()
    for chunk in chunks:
        observer.update(chunk)
    return observer


def test_minmax_is_exact_and_histogram_keeps_every_count_when_the_range_grows():
    rng = np.random.default_rng(0)
    small = (rng.standard_normal(10_000) * 0.1).astype(np.float32)
    large = (rng.standard_normal(10_000) * 50).astype(np.float32)
    observer = _observe(small, large)
    assert compute_range(observer, "minmax") == (min(small.min(), large.min()), max(small.max(), large.max()))
    assert observer.histogram.sum() == 20_000
    assert observer.extent > np.abs(large).max()


def test_percentile_clips_at_the_requested_quantile():
    x = np.random.default_rng(1).standard_normal(1_000_000)
    low, high = compute_range(_observe(x), "percentile")
    expected = np.quantile(np.abs(x), 0.9999)
    assert high == pytest.approx(expected, rel=0.02) and low == -high


def test_histogram_sample_sees_every_channel_of_a_hidden_vector(monkeypatch):
    # Tokens of width 384 sampled with a stride of 12 would only ever see every twelfth channel;
    # channel 5 holds the outliers (0.26% of the values) that the 99.99th percentile must keep.
    monkeypatch.setattr(ranges, "HISTOGRAM_SAMPLE", 1 << 16)
    x = np.random.default_rng(0).normal(size=(16, 128, 384)).astype(np.float32)
    x[..., 5] = 100.0
    observer = RangeObserver()
    observer.update(x)
    assert observer.histogram.sum() < x.size // 8  # sampled
    assert compute_range(observer, "percentile")[1] >= 99.0


def test_entropy_keeps_the_bulk_of_a_gaussian_and_clips_its_outliers():
    x = np.random.default_rng(2).standard_normal(1_000_000)
    low, high = compute_range(_observe(x), "entropy")
    assert 3.0 < high < 4.5 and low == -high
    # the smallest threshold the 2048-bin histogram can propose is 1/16 of its extent
    low, high = compute_range(_observe(np.concatenate([x, [20.0, -15.0]])), "entropy")
    assert 3.0 < high < 5.0 and low == -high


def _kl_by_definition(hist: np.ndarray, end: int, levels: int = 128, eps: float = 1e-4) -> float:
    """TensorRT's KL for one threshold, bin by bin, as its reference code computes it."""
    p = hist[:end].copy()
    p[-1] += hist[end:].sum()
    edges = np.linspace(0, end, levels + 1).astype(int)
    q = np.zeros(end)
    for lo, hi in zip(edges[:-1], edges[1:]):
        nonzero = hist[lo:hi] > 0
        if nonzero.any():
            q[lo:hi][nonzero] = hist[lo:hi].sum() / nonzero.sum()

    def smooth(d):
        d = d / d.sum()
        zeros = d == 0
        return np.where(zeros, eps, d * (1 - eps * zeros.sum()))

    p, q = smooth(p), smooth(q)
    return float(np.sum(p * np.log(p / q)))


@pytest.mark.parametrize("shape", ["heavy tail", "relu with gaps", "few values"])
def test_entropy_scores_every_threshold_as_the_definition_does(shape):
    rng = np.random.default_rng(7)
    x = {"heavy tail": rng.standard_t(3, 200_000), "relu with gaps": np.maximum(rng.standard_normal(50_000), 0) ** 3,
         "few values": rng.integers(0, 6, 50_000).astype(float)}[shape]
    hist = _observe(x.astype(np.float32)).histogram.astype(np.float64)
    ends = np.arange(128, int(np.flatnonzero(hist)[-1]) + 2, 7)
    expected = [_kl_by_definition(hist, end) for end in ends]
    np.testing.assert_allclose(ranges._kl_divergences(hist, ends, 128), expected, rtol=1e-9, atol=1e-12)


def _quantization_mse(x: np.ndarray, low: float, high: float, symmetric: bool) -> float:
    params = qm.activation_params(low, high, symmetric)
    return float(np.mean((qm.fake_quantize(x, params) - x) ** 2))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape", ["gaussian", "heavy tail", "relu", "uniform"])
def test_mse_range_is_as_good_as_the_best_clipping_found_by_trying(shape, symmetric):
    rng = np.random.default_rng(11)
    x = {"gaussian": rng.standard_normal(400_000), "heavy tail": rng.standard_t(2, 400_000),
         "relu": np.maximum(rng.standard_normal(400_000), 0.0), "uniform": rng.uniform(-1, 3, 400_000)}[shape]
    x = x.astype(np.float32)
    observer = _observe(x)
    low, high = compute_range(observer, "mse", symmetric)
    amax = float(np.abs(x).max())
    tried = [_quantization_mse(x, *ranges.clip_range(observer, t), symmetric) for t in np.geomspace(amax / 64, amax, 200)]
    assert _quantization_mse(x, low, high, symmetric) <= 1.02 * min(tried)
    if shape == "uniform":  # nothing worth clipping
        assert (low, high) == pytest.approx((x.min(), x.max()), rel=0.01)
    if shape == "heavy tail":  # min-max would spend the steps on a few outliers
        assert high < x.max() and _quantization_mse(x, low, high, symmetric) < 0.9 * _quantization_mse(x, x.min(), x.max(), symmetric)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown calibration method"):
        compute_range(_observe(np.ones(4)), "kl")


def test_weight_quantization_matches_reference_arithmetic():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    params = qm.symmetric_weight_params(w, axis=0)
    np.testing.assert_allclose(params.scale, np.abs(w).reshape(6, -1).max(axis=1) / 127, rtol=1e-6)
    q = qm.quantize(w, params, axis=0)
    reference = np.clip(np.rint(w / params.scale[:, None, None, None]), -128, 127).astype(np.int8)
    np.testing.assert_array_equal(q, reference)
    assert np.abs(q).max() == 127
    back = qm.dequantize(q, params, axis=0)
    assert np.abs(back - w).max() <= params.scale.max() / 2 + 1e-7


def test_activation_parameters_for_both_targets():
    symmetric = qm.activation_params(-1.0, 3.0, symmetric=True)
    assert symmetric.zero_point.dtype == np.int8 and symmetric.zero_point == 0
    assert symmetric.scale == pytest.approx(3.0 / 127)
    asymmetric = qm.activation_params(-1.0, 3.0, symmetric=False)
    assert asymmetric.zero_point.dtype == np.uint8
    assert qm.dequantize(qm.quantize(np.array([0.0], np.float32), asymmetric), asymmetric)[0] == 0.0
    relu = qm.activation_params(0.0, 6.0, symmetric=False)
    assert relu.zero_point == 0  # a zero point at 0 clamps negatives exactly like Relu

"""Activation range calibration: min-max, percentile, entropy and MSE (numpy only).

One streaming observer per tensor keeps its minimum, maximum and a
histogram of ``|x|``. The histogram's range grows by doubling (merging bins
pairwise), so one pass over the calibration data serves every method.
A tensor whose readers cannot tell apart values beyond an interval (a hard-swish
reads every ``x ≤ -3`` as 0) is observed clamped to it: each method then spends the
quantizer's levels on the values that matter.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from qwt_onnx.numerics.quantization import integer_range

METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_PERCENTILE = 99.99
HISTOGRAM_BINS = 2048
HISTOGRAM_SAMPLE = 1 << 20  # elements of each batch that enter the histogram; min and max see all
ENTROPY_LEVELS = 128  # positive int8 levels the distribution is quantized to (2^(bits-1) at other widths)
ENTROPY_CANDIDATES = 480  # thresholds tried at most
MSE_CANDIDATES = 256  # thresholds tried at most, spaced geometrically
MSE_GROUPS = 8  # of thresholds, each group computed over the bins below its largest only
UNBOUNDED = (-np.inf, np.inf)  # an observer's readable interval where its readers read every value


@dataclasses.dataclass
class RangeObserver:
    """Streaming statistics of one tensor."""

    bins: int = HISTOGRAM_BINS
    readable: tuple[float, float] = UNBOUNDED  # values beyond are read as the ends: observed clamped
    clamped: tuple[bool, bool] = (False, False)  # whether values lay below, above the readable interval
    low: float = np.inf
    high: float = -np.inf
    extent: float = 0.0  # the histogram covers |x| in [0, extent)
    histogram: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        shape, x = x.shape, x.ravel()
        if x.size == 0:
            return
        low, high = float(x.min()), float(x.max())
        if self.readable != UNBOUNDED:
            start, end = self.readable
            self.clamped = (self.clamped[0] or low < start, self.clamped[1] or high > end)
            x = np.clip(x, start, end)
            low, high = max(low, start), min(high, end)
        self.low, self.high = min(self.low, low), max(self.high, high)
        amax = max(-self.low, self.high)
        if self.histogram is None:
            self.histogram = np.zeros(self.bins, dtype=np.int64)
            self.extent = float(2.0 ** np.ceil(np.log2(amax))) if amax > 0 else 1.0
        while amax >= self.extent:
            self._double_extent()
        if x.size > HISTOGRAM_SAMPLE:  # a strided subset is plenty for the histogram's shape
            x = x[:: sampling_stride(x.size // HISTOGRAM_SAMPLE, shape)]
        position = np.abs(x)
        position *= self.bins / self.extent
        # |x| < extent, but the product can round up to the bins' end: one more bin takes those
        counts = np.bincount(position.astype(np.intp), minlength=self.bins + 1)
        counts[self.bins - 1] += counts[self.bins]
        self.histogram += counts[: self.bins]

    def _double_extent(self) -> None:
        merged = self.histogram.reshape(-1, 2).sum(axis=1)
        self.histogram = np.concatenate([merged, np.zeros_like(merged)])
        self.extent *= 2.0

    @property
    def bin_width(self) -> float:
        return self.extent / self.bins


def sampling_stride(least: int, shape: tuple[int, ...]) -> int:
    """The smallest prime stride from ``least`` that divides no axis of ``shape``: every element
    it steps over lies at another position along each axis (a stride of 12 over hidden
    vectors of 384 would only see every twelfth channel, and miss the outlier ones)."""
    if least <= 1:
        return 1
    stride = least
    while any(stride % k == 0 for k in range(2, math.isqrt(stride) + 1)) or any(d % stride == 0 for d in shape):
        stride += 1
    return stride


def value_range(x: np.ndarray, previous: tuple[float, float] | None = None) -> tuple[float, float]:
    """``[min, max]`` of ``x``, widened to include ``previous``."""
    low, high = float(x.min()), float(x.max())
    return (low, high) if previous is None else (min(low, previous[0]), max(high, previous[1]))


def clip_range(observer: RangeObserver, threshold: float) -> tuple[float, float]:
    """The observed range clipped to ``[-threshold, threshold]``."""
    return max(observer.low, -threshold), min(observer.high, threshold)


def minmax_range(observer: RangeObserver) -> tuple[float, float]:
    return observer.low, observer.high


def percentile_range(
    observer: RangeObserver, percentile: float = DEFAULT_PERCENTILE
) -> tuple[float, float]:
    """Clip ``|x|`` at the given percentile of its distribution."""
    cdf = np.cumsum(observer.histogram) / max(observer.histogram.sum(), 1)
    index = int(np.searchsorted(cdf, percentile / 100.0))
    return clip_range(observer, (index + 1) * observer.bin_width)


def entropy_range(observer: RangeObserver, levels: int = ENTROPY_LEVELS) -> tuple[float, float]:
    """Clip ``|x|`` where the KL divergence to its quantized histogram is smallest.

    The TensorRT calibration algorithm: for each candidate threshold, the
    reference P is the histogram up to it with the outliers folded into its
    last bin; the candidate Q is the same histogram without the outliers,
    merged into ``levels`` levels and spread back over its non-empty bins.
    """
    hist = observer.histogram.astype(np.float64)
    last = int(np.flatnonzero(hist)[-1]) + 1 if hist.any() else 0
    if last <= levels:
        return minmax_range(observer)
    step = max(1, (last - levels) // ENTROPY_CANDIDATES)  # the KL curve is smooth: a few hundred thresholds suffice
    ends = np.arange(levels, last + 1, step)
    kl = _kl_divergences(hist, ends, levels)
    return clip_range(observer, ends[int(np.argmin(kl))] * observer.bin_width)


def _kl_divergences(hist: np.ndarray, ends: np.ndarray, levels: int, eps: float = 1e-4) -> np.ndarray:
    """KL(P ‖ Q) for each threshold in ``ends`` (P and Q as in :func:`entropy_range`), after
    moving ``eps`` of mass onto empty bins as TensorRT's reference code does.

    Computed from prefix sums in O(levels) per threshold. A bin empty in both P and Q adds
    nothing (both hold ``eps``); a non-empty bin i of chunk j adds ``p_i·log(p_i/q_i)`` with
    ``p_i = a·h_i/H`` and ``q_i = b·m_j/(s_j·S)`` (H: all mass, S: mass below the threshold,
    m_j and s_j: chunk j's mass and non-empty bins, a and b the smoothing factors), so the
    non-empty bins below the last sum to ``(a/H)·[Σ h log h + W·log(a/H) − Σ_j m'_j log(m_j/s_j) − W·log(b/S)]``,
    W and m'_j their mass; the last bin, which holds the outliers in P, is added on its own.
    """
    prefix = np.concatenate([[0.0], np.cumsum(hist)])
    prefix_hlogh = np.concatenate([[0.0], np.cumsum(hist * np.log(np.where(hist > 0, hist, 1.0)))])
    prefix_nonzero = np.concatenate([[0], np.cumsum(hist > 0)])
    total = prefix[-1]
    below = prefix[ends]  # S
    last_bin = hist[ends - 1]
    outliers = total - below
    tail = last_bin + outliers  # P's last bin
    empty_q = ends - prefix_nonzero[ends]  # Q is empty exactly where the histogram is
    empty_p = empty_q - ((last_bin == 0) & (tail > 0))
    a, b = 1.0 - eps * empty_p, 1.0 - eps * empty_q

    edges = (np.arange(levels + 1) * ends[:, None]) // levels  # [threshold, chunk edge]
    mass = np.diff(prefix[edges], axis=1)
    support = np.diff(prefix_nonzero[edges], axis=1)
    density = np.divide(mass, support, out=np.ones_like(mass), where=support > 0)  # m_j / s_j, 1 where empty
    mass_log_density = (mass * np.log(density)).sum(axis=1)
    last_density = density[:, -1]
    kept = below - last_bin  # W: the non-empty bins below the last
    with np.errstate(divide="ignore", invalid="ignore"):  # thresholds with no mass below are infinite
        body = (a / total) * (
            prefix_hlogh[ends - 1] + kept * np.log(a / total)
            - (mass_log_density - last_bin * np.log(last_density)) - kept * np.log(b / below)
        )
        p_last = np.where(tail > 0, a * tail / total, eps)
        q_last = np.where(last_bin > 0, b * last_density / below, eps)
        return np.where(below > 0, body + p_last * np.log(p_last / q_last), np.inf)


def mse_range(observer: RangeObserver, symmetric: bool = False, candidates: int = MSE_CANDIDATES,
              bits: int = 8) -> tuple[float, float]:
    """Clip ``|x|`` where the tensor's expected squared quantization error is smallest.

    Per threshold ``t`` the error is the clipping error of ``|x| > t`` plus the
    rounding error of the rest on the grid of the signed (``symmetric``) or unsigned
    quantizer of ``bits`` that :func:`~qwt_onnx.numerics.quantization.activation_params`
    makes of the clipped range, both exact for values spread evenly within each
    histogram bin (a step of a few bins is common at 8 bits where outliers set
    the range, so ``step²/12`` would not do). Thresholds from one bin up to the
    maximum are tried, min-max among them.
    """
    hist = observer.histogram.astype(np.float64)
    if not hist.any():
        return minmax_range(observer)
    width = observer.bin_width
    last = int(np.flatnonzero(hist)[-1]) + 1
    hist = hist[:last]
    ends = np.unique(np.rint(np.geomspace(1, last, candidates)).astype(np.intp))  # bins kept below each threshold
    thresholds = ends * width
    thresholds[-1] = max(-observer.low, observer.high)  # the last bin's edge may lie beyond the maximum
    low = np.minimum(np.maximum(observer.low, -thresholds), 0.0)
    high = np.maximum(np.minimum(observer.high, thresholds), 0.0)
    levels = integer_range(bits, signed=symmetric)[1]
    step = np.maximum(-low, high) / levels if symmetric else (high - low) / levels
    step = np.maximum(step, np.finfo(np.float32).tiny)[:, None]

    # thresholds in groups of a similar number of bins below them: a few bins each for most of
    # them, as they are spaced geometrically (a fifth of the work of all bins for every threshold)
    groups = np.array_split(np.arange(len(ends)), min(MSE_GROUPS, len(ends)))
    rounding = np.concatenate([_rounding_errors(hist, width, step[group], ends[group]) for group in groups])

    centers = (np.arange(last) + 0.5) * width
    beyond = [np.concatenate([np.cumsum((hist * centers**p)[::-1])[::-1], [0.0]])[ends] for p in range(3)]
    clipping = beyond[2] - 2.0 * thresholds * beyond[1] + (thresholds**2 + width**2 / 12.0) * beyond[0]
    return clip_range(observer, float(thresholds[int(np.argmin(rounding + clipping))]))


def _rounding_errors(hist: np.ndarray, width: float, step: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Per threshold (its quantization ``step`` [T, 1], its bins below ``ends``), the rounding
    error of the values in those bins, each bin's count times its mean squared error."""
    # ∫ (x - round(x/step)·step)² dx from -step/2 to each bin edge, per threshold
    u = np.arange(ends.max() + 1) * width / step + 0.5
    whole = np.floor(u)
    integral = step**3 * (whole / 12.0 + ((u - whole - 0.5) ** 3 + 0.125) / 3.0)
    per_bin = hist[: ends.max()] * np.diff(integral, axis=1) / width
    return np.take_along_axis(np.cumsum(per_bin, axis=1), ends[:, None] - 1, axis=1)[:, 0]


def compute_range(observer: RangeObserver, method: str, symmetric: bool = False, bits: int = 8) -> tuple[float, float]:
    """The ``[low, high]`` range ``method`` chooses for the observed tensor, for a quantizer of
    ``bits`` (``symmetric``: signed with zero point 0); MSE and entropy take those into account."""
    if observer.histogram is None:
        raise ValueError("the observer has seen no data")
    if method == "mse":
        low, high = mse_range(observer, symmetric, bits=bits)
    elif method == "minmax":
        low, high = minmax_range(observer)
    elif method == "percentile":
        low, high = percentile_range(observer)
    elif method == "entropy":
        low, high = entropy_range(observer, levels=1 << (bits - 1))
    else:
        raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    return past_readable_ends(low, high, observer, bits)


def past_readable_ends(low: float, high: float, observer: RangeObserver, bits: int = 8) -> tuple[float, float]:
    """``[low, high]`` reaching one quantization step past each end of the readable interval
    that the observed values were clamped at, so that a level lies at or beyond that end
    whatever the zero point's rounding. A clipping method (MSE, percentile) sees the clamped
    values as one mass at the end and may clip it a little, but the readers do not read it
    alike: a HardSigmoid reads -2.99 as 0.002, not 0, and an SE gate that FP32 shuts lets that
    much of its channel through (PP-OCRv6 rec lost 2.4 dB so). An end at 0 needs no step:
    every grid holds 0 exactly."""
    (start, end), (below, above) = observer.readable, observer.clamped
    low, high = min(low, start) if below else low, max(high, end) if above else high
    step = (high - low) / ((1 << bits) - 1)
    if below and start != 0.0:
        low = start - step
    if above and end != 0.0:
        high = end + step
    return low, high

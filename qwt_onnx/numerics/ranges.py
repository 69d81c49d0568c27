"""Activation range calibration: min-max, percentile and entropy (numpy only).

One streaming observer per tensor keeps its minimum, maximum and a
histogram of ``|x|``. The histogram's range grows by doubling (merging bins
pairwise), so one pass over the calibration data serves all three methods.
"""

from __future__ import annotations

import dataclasses

import numpy as np

METHODS = ("minmax", "percentile", "entropy")
DEFAULT_PERCENTILE = 99.99
HISTOGRAM_BINS = 2048
HISTOGRAM_SAMPLE = 1 << 20  # elements of each batch that enter the histogram; min and max see all
ENTROPY_LEVELS = 128  # positive int8 levels the distribution is quantized to
ENTROPY_CANDIDATES = 480  # thresholds tried at most


@dataclasses.dataclass
class RangeObserver:
    """Streaming statistics of one tensor."""

    bins: int = HISTOGRAM_BINS
    low: float = np.inf
    high: float = -np.inf
    extent: float = 0.0  # the histogram covers |x| in [0, extent)
    histogram: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if x.size == 0:
            return
        self.low = min(self.low, float(x.min()))
        self.high = max(self.high, float(x.max()))
        amax = max(-self.low, self.high)
        if self.histogram is None:
            self.histogram = np.zeros(self.bins, dtype=np.int64)
            self.extent = float(2.0 ** np.ceil(np.log2(amax))) if amax > 0 else 1.0
        while amax >= self.extent:
            self._double_extent()
        if x.size > HISTOGRAM_SAMPLE:  # a strided subset is plenty for the histogram's shape
            x = x[:: x.size // HISTOGRAM_SAMPLE]
        position = np.abs(x)
        position *= self.bins / self.extent
        np.minimum(position, self.bins - 1, out=position)
        self.histogram += np.bincount(position.astype(np.intp), minlength=self.bins)

    def _double_extent(self) -> None:
        merged = self.histogram.reshape(-1, 2).sum(axis=1)
        self.histogram = np.concatenate([merged, np.zeros_like(merged)])
        self.extent *= 2.0

    @property
    def bin_width(self) -> float:
        return self.extent / self.bins


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
    tail = np.cumsum(hist[::-1])[::-1]  # tail[i] = sum(hist[i:])
    best_kl, best_end = np.inf, last
    step = max(1, (last - levels) // ENTROPY_CANDIDATES)  # the KL curve is smooth: a few hundred thresholds suffice
    for end in range(levels, last + 1, step):
        sliced = hist[:end]
        p = sliced.copy()
        if end < hist.size:
            p[-1] += tail[end]
        kl = _kl_divergence(p, _quantized(sliced, levels))
        if kl < best_kl:
            best_kl, best_end = kl, end
    return clip_range(observer, best_end * observer.bin_width)


def _quantized(sliced: np.ndarray, levels: int) -> np.ndarray:
    """``sliced`` merged into ``levels`` chunks, each chunk's mass spread over its non-empty bins."""
    edges = np.linspace(0, sliced.size, levels + 1).astype(np.int64)
    nonzero = sliced > 0
    mass = np.add.reduceat(sliced, edges[:-1])
    support = np.add.reduceat(nonzero.astype(np.float64), edges[:-1])
    per_bin = np.divide(mass, support, out=np.zeros_like(mass), where=support > 0)
    return np.repeat(per_bin, np.diff(edges)) * nonzero


def _kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    """KL(P ‖ Q) after moving ``eps`` of mass onto empty bins, as TensorRT's reference code does."""
    p, q = _smooth(p, eps), _smooth(q, eps)
    if p is None or q is None:
        return np.inf
    keep = p > 0
    return float(np.sum(p[keep] * np.log(p[keep] / q[keep])))


def _smooth(distribution: np.ndarray, eps: float) -> np.ndarray | None:
    """Normalise, then give each empty bin ``eps``, taken proportionally from the others."""
    total = distribution.sum()
    if total <= 0:
        return None
    d = distribution / total
    zeros = d == 0
    return np.where(zeros, eps, d * (1.0 - eps * zeros.sum()))


def compute_range(observer: RangeObserver, method: str) -> tuple[float, float]:
    """The ``[low, high]`` range ``method`` chooses for the observed tensor."""
    if observer.histogram is None:
        raise ValueError("the observer has seen no data")
    if method == "minmax":
        return minmax_range(observer)
    if method == "percentile":
        return percentile_range(observer)
    if method == "entropy":
        return entropy_range(observer)
    raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")

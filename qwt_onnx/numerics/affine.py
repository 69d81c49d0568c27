"""Channel-wise affine compensation, fitted in closed form (numpy only).

QwT-v2's alternative to a branch (arXiv 2505.20932): a block that ends in a
weighted op ``z`` (a Conv, Gemm or MatMul, its output added to the residual
stream or given as the block output) is compensated by ``z' = a ⊙ z + b``,
one scale and one shift per output channel, which fold into the op's
per-channel weight scales and its bias: the written graph keeps the PTQ
graph's nodes. The residual ``r = f(x) - f_q(x)`` of the block is regressed
per channel on ``z``: ``r ≈ (a - 1) z + b``. Where an activation ``σ`` reads ``z``
element by element, what matters is the error after it, ``σ(z') - σ(z_fp)``: each element
is weighed by the share of its error that ``σ`` passes on (:func:`passed_share`; nothing
where a Relu zeroes both, what a GELU passes of its slope), a weighted least squares linearized
at the unfolded output. The statistics are six sums per channel, so the capture's memory does
not grow with the samples.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# The slope's ridge, relative to the channel's variance: only keeps a constant channel finite.
RIDGE = 1e-6
UPDATE_CHUNK = 1 << 16  # elements of z converted to float64 at a time


@dataclasses.dataclass
class ChannelStatistics:
    """Per-channel weighted sums of the regressor ``z`` and the target ``r`` over rows: ``sums``
    holds Σw, Σwz, Σwr, Σwz², Σwzr and Σwr², one row each (every weight 1 where none is given)."""

    channels: int
    sums: np.ndarray | None = None  # [6, channels]

    def __post_init__(self) -> None:
        if self.sums is None:
            self.sums = np.zeros((6, self.channels))

    def update(self, z: np.ndarray, r: np.ndarray, axis: int, weight: np.ndarray | None = None) -> None:
        """Add every element of ``z`` and ``r`` (same shape), channels on ``axis``, each counted
        ``weight`` times (an array of their shape) where a weight is given."""
        if z.shape != r.shape or (weight is not None and weight.shape != z.shape):
            raise ValueError(f"z, r and the weight must have one shape, got {z.shape}, {r.shape}"
                             f"{'' if weight is None else f' and {weight.shape}'}")
        if z.size == 0:
            return
        rows = int(np.prod(z.shape[: axis % z.ndim]))
        arrays = [x.reshape(rows, self.channels, -1) for x in (z, r) + (() if weight is None else (weight,))]  # views
        # in float64, a few rows at a time: the copies stay in cache (3x faster on a feature map than one copy of all)
        step = max(1, UPDATE_CHUNK // (self.channels * arrays[0].shape[2]))
        with np.errstate(invalid="ignore", over="ignore"):  # NaN / Inf are caught when fitting
            for start in range(0, rows, step):
                a, b, *w = (x[start : start + step].astype(np.float64) for x in arrays)
                total = w[0].sum(axis=(0, 2)) if w else np.full(self.channels, float(a.shape[0] * a.shape[2]))
                wa, wb = (w[0] * a, w[0] * b) if w else (a, b)
                self.sums += np.stack([total, wa.sum(axis=(0, 2)), wb.sum(axis=(0, 2)),
                                       *(np.einsum("ncp,ncp->c", x, y) for x, y in ((wa, a), (wa, b), (wb, b)))])

    def without(self, other: ChannelStatistics) -> ChannelStatistics:
        """These rows less ``other``'s, a subset of them."""
        return ChannelStatistics(self.channels, self.sums - other.sums)

    def squared_error(self, slope: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """Per channel, ``Σ w (r - slope·z - shift)²``."""
        w, z, r, zz, zr, rr = self.sums
        return rr - 2 * slope * zr - 2 * shift * r + slope**2 * zz + 2 * slope * shift * z + w * shift**2

    def finite(self) -> bool:
        return bool(np.isfinite(self.sums).all())


@dataclasses.dataclass(frozen=True)
class AffineFit:
    """``z' = scale ⊙ z + shift`` per channel (scale 1, shift 0 where a channel is not kept)."""

    scale: np.ndarray
    shift: np.ndarray
    r2_train: float
    r2_heldout: float
    error_ratio_heldout: float
    error_ratio_train: float
    kept_targets: int  # channels whose compensation lowers the held-out error
    not_finite: bool = False

    @property
    def kept(self) -> bool:
        return self.kept_targets > 0

    @property
    def reason(self) -> str:
        if self.not_finite:
            return "NaN or Inf in its statistics: not folded"
        return "" if self.kept else "no gain on held-out samples"


def passed_share(z: np.ndarray, reference: np.ndarray, f_z: np.ndarray, f_reference: np.ndarray) -> np.ndarray:
    """Per element, the squared secant slope of an elementwise function ``f`` between ``z`` and
    ``reference``: the share of the squared error ``(z - reference)²`` that reaches ``f``'s output
    (0 where a Relu clips both, 1 where it passes both). Where ``z`` is within rounding of
    ``reference``, 1: the slope is not resolved there, and such an element's error is nil anyway."""
    step = z - reference
    resolved = np.abs(step) > 1e-3 * np.sqrt(np.mean(np.square(step, dtype=np.float64)))
    slope = np.divide(f_z - f_reference, step, out=np.ones_like(step), where=resolved)
    return np.square(slope)


def fold_suffices(fold_gain: float, branch_gain: float, min_gain: float, tolerance: float) -> bool:
    """Whether a fold that removes ``fold_gain`` of its block's held-out error takes the place of
    a branch that would remove ``branch_gain``: it removes at least ``min_gain`` (smaller gains
    at a block did not carry to the model's outputs) and all but ``tolerance`` of the branch's."""
    return fold_gain >= min_gain and fold_gain >= (1.0 - tolerance) * branch_gain


def least_squares(stats: ChannelStatistics) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the slope and shift minimising ``Σ (r - slope·z - shift)²``."""
    w = stats.sums[0]
    z, r, zz, zr, _ = stats.sums[1:] / np.where(w > 0, w, 1.0)
    variance, covariance = zz - z**2, zr - z * r
    slope = np.where(variance > 0, covariance / (variance * (1 + RIDGE) + np.finfo(float).tiny), 0.0)
    return slope, r - slope * z


def fit_channel_affine(train: ChannelStatistics, heldout: ChannelStatistics) -> AffineFit:
    """Fit on ``train``; keep the channels whose ``heldout`` error falls. Not refitted on both:
    the fold is then judged exactly as it runs on held-out rows it has not seen (two numbers per
    channel lose nothing measurable to a fifth fewer rows)."""
    identity, nothing = np.ones(train.channels), np.zeros(train.channels)
    if not (train.finite() and heldout.finite()):
        return AffineFit(identity, nothing, 0.0, 0.0, 1.0, 1.0, 0, not_finite=True)
    slope, shift = least_squares(train)
    before_held = heldout.squared_error(nothing, nothing)
    # a scale must stay positive: it multiplies a quantizer's scale
    keep = (heldout.squared_error(slope, shift) < before_held) & (1 + slope > 0)
    slope, shift = slope * keep, shift * keep
    before_train = train.squared_error(nothing, nothing)
    scores = (_r2(train, slope, shift), _r2(heldout, slope, shift), _ratio(heldout.squared_error(slope, shift), before_held),
              _ratio(train.squared_error(slope, shift), before_train))
    if not keep.any():
        return AffineFit(identity, nothing, *scores, 0)
    return AffineFit(1 + slope, shift, *scores, int(keep.sum()))


def _r2(stats: ChannelStatistics, slope: np.ndarray, shift: np.ndarray) -> float:
    w, _, r, _, _, rr = stats.sums
    total = rr - r**2 / np.where(w > 0, w, 1.0)
    return 1.0 - _ratio(stats.squared_error(slope, shift), total)


def _ratio(error: np.ndarray, reference: np.ndarray) -> float:
    reference = float(reference.sum())
    return float(error.sum()) / reference if reference > 0 else 1.0

"""Closed-form ridge regression on streamed normal equations (numpy only).

QwT fits, per block, a linear map ``c(x) = x @ W + b`` to the residual
``r = f(x) - f_q(x)`` between the full-precision and the quantized block.
Everything the fit and its evaluation need is a handful of sufficient
statistics (``n, Σx, Σr, XᵀX, XᵀR, Σr²``), accumulated in float64 batch by
batch, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import dataclasses

import numpy as np

#: Ridge strengths tried, relative to the mean variance of the input features.
DEFAULT_ALPHAS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def without_subnormals(a: np.ndarray) -> np.ndarray:
    """``a`` with its subnormal values set to zero, in ``a``'s memory order.

    Products of subnormals take the CPU's slow path: where PP-OCRv6 det's features had
    underflowed (64% of one 1x1 convolution's inputs), their ``XᵀX`` ran a hundred times slower,
    and what they add to it is below float32's smallest normal number anyway. Where every
    sixteenth entry along its longest axis (its rows: every channel is probed) is normal or
    zero, ``a`` is returned as it is: a few subnormals do not slow a product measurably."""
    tiny = np.finfo(a.dtype).tiny
    longest = int(np.argmax(a.shape)) if a.ndim else 0
    probe = np.abs(a[(slice(None),) * longest + (slice(None, None, 16),)])
    if not np.any((probe < tiny) & (probe > 0)):
        return a
    return np.where(np.abs(a) < tiny, np.zeros((), a.dtype), a)


@dataclasses.dataclass
class NormalEquations:
    """Sufficient statistics of rows ``x`` (features) and ``r`` (targets).

    The products are taken in float32 on ``x - shift`` and summed in float64:
    shifting by a typical row (the mean of the first batch unless given)
    removes the large common offset that would otherwise cost precision.
    """

    n_features: int
    n_targets: int
    shift: np.ndarray | None = None
    count: int = 0
    sum_x: np.ndarray = dataclasses.field(init=False)
    sum_r: np.ndarray = dataclasses.field(init=False)
    sum_r2: np.ndarray = dataclasses.field(init=False)
    xtx: np.ndarray = dataclasses.field(init=False)
    xtr: np.ndarray = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        d, m = self.n_features, self.n_targets
        self.sum_x = np.zeros(d)
        self.sum_r = np.zeros(m)
        self.sum_r2 = np.zeros(m)
        self.xtx = np.zeros((d, d))
        self.xtr = np.zeros((d, m))

    def update(self, x: np.ndarray, r: np.ndarray) -> None:
        """Add rows ``x`` [n, d] and their targets ``r`` [n, m]."""
        x = np.asarray(x, dtype=np.float32)
        r = np.asarray(r, dtype=np.float32)
        if x.ndim != 2 or r.ndim != 2 or x.shape[0] != r.shape[0]:
            raise ValueError(f"expected rows x [n, d] and r [n, m], got {x.shape} and {r.shape}")
        if x.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        xs, r = without_subnormals(x - self.shift), without_subnormals(r)
        self.count += x.shape[0]
        with np.errstate(invalid="ignore", over="ignore"):  # NaN / Inf are caught when fitting
            self.sum_x += xs.sum(axis=0, dtype=np.float64)
            self.sum_r += r.sum(axis=0, dtype=np.float64)
            self.sum_r2 += np.square(r).sum(axis=0, dtype=np.float64)
            self.xtx += xs.T @ xs
            self.xtr += xs.T @ r

    def update_columns(self, x: np.ndarray, r: np.ndarray) -> None:
        """Add the rows of ``b`` items stored features-first, ``x`` [b, d, p] and ``r`` [b, m, p]:
        one row per item and position, as a feature map [N, C, H·W] holds them, so that no
        transposed copy is made."""
        x = np.asarray(x, dtype=np.float32)
        r = np.asarray(r, dtype=np.float32)
        if x.ndim != 3 or r.ndim != 3 or x.shape[0] != r.shape[0] or x.shape[2] != r.shape[2]:
            raise ValueError(f"expected x [b, d, p] and r [b, m, p], got {x.shape} and {r.shape}")
        if x.shape[0] * x.shape[2] == 0:
            return
        if self.shift is None:
            self.shift = x.mean(axis=(0, 2), dtype=np.float64).astype(np.float32)
        xs, r = without_subnormals(x - self.shift[:, None]), without_subnormals(r)
        self.count += x.shape[0] * x.shape[2]
        # float32 within an item (pairwise along the positions), float64 across items and batches
        with np.errstate(invalid="ignore", over="ignore"):  # NaN / Inf are caught when fitting
            self.sum_x += xs.sum(axis=2).sum(axis=0, dtype=np.float64)
            self.sum_r += r.sum(axis=2).sum(axis=0, dtype=np.float64)
            self.sum_r2 += np.einsum("bmp,bmp->bm", r, r).sum(axis=0, dtype=np.float64)
            self.xtx += np.matmul(xs, xs.transpose(0, 2, 1)).sum(axis=0, dtype=np.float64)
            self.xtr += np.matmul(xs, r.transpose(0, 2, 1)).sum(axis=0, dtype=np.float64)

    def merged(self, other: NormalEquations) -> NormalEquations:
        """The statistics of both sets of rows together (they must share the shift)."""
        return self._combined(other, 1.0)

    def without(self, other: NormalEquations) -> NormalEquations:
        """The statistics of these rows less ``other``'s, a subset of them with the same shift
        (the training rows of a batch are its rows less its held-out ones)."""
        return self._combined(other, -1.0)

    def _combined(self, other: NormalEquations, sign: float) -> NormalEquations:
        if other.count and self.count and not np.array_equal(self.shift, other.shift):
            raise ValueError("normal equations with different shifts cannot be combined")
        total = NormalEquations(self.n_features, self.n_targets, self.shift if self.count else other.shift)
        for name in ("count", "sum_x", "sum_r", "sum_r2", "xtx", "xtr"):
            setattr(total, name, getattr(self, name) + sign * getattr(other, name))
        total.count = int(total.count)
        return total

    @property
    def offset(self) -> np.ndarray:
        return np.zeros(self.n_features) if self.shift is None else self.shift.astype(np.float64)

    def covariance(self) -> np.ndarray:
        """The features' centred sum of squares ``Σ (x - mean x)(x - mean x)ᵀ``."""
        mean_x = self.sum_x / self.count
        return self.xtx - self.count * np.outer(mean_x, mean_x)

    def projected(self, down: np.ndarray) -> NormalEquations:
        """The statistics of the rows ``x @ down`` (``down`` [d, k]) with the same targets: what a
        map that reads only those ``k`` features is fitted and scored on."""
        down = np.asarray(down, dtype=np.float64)
        projected = NormalEquations(down.shape[1], self.n_targets, self.offset @ down)
        projected.count, projected.sum_r, projected.sum_r2, projected.xtr = self.count, self.sum_r, self.sum_r2, down.T @ self.xtr
        projected.sum_x, projected.xtx = self.sum_x @ down, down.T @ self.xtx @ down
        return projected


@dataclasses.dataclass(frozen=True)
class LinearMap:
    """``c(x) = x @ weight + bias`` with weight [d, m] and bias [m]."""

    weight: np.ndarray
    bias: np.ndarray

    @classmethod
    def zeros(cls, n_features: int, n_targets: int) -> LinearMap:
        return cls(np.zeros((n_features, n_targets)), np.zeros(n_targets))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight + self.bias

    def is_finite(self) -> bool:
        return bool(np.isfinite(self.weight).all() and np.isfinite(self.bias).all())


def fit_ridge(eq: NormalEquations, alpha: float | np.ndarray) -> LinearMap:
    """Ridge regression with an unpenalised bias.

    The penalty is ``λ = alpha · trace(C) / d`` with ``C`` the centred input
    covariance, so ``alpha`` does not depend on the scale of the activations.
    ``alpha`` may also be one value per target.
    """
    n = eq.count
    if n == 0:
        raise ValueError("no rows were accumulated")
    mean_x = eq.sum_x / n
    mean_r = eq.sum_r / n
    cov = eq.covariance()
    cross = eq.xtr - n * np.outer(mean_x, mean_r)
    scale = np.trace(cov) / eq.n_features
    if not np.isfinite(scale) or scale <= 0:  # constant inputs: only the bias can help
        return LinearMap(np.zeros_like(cross), mean_r)
    alphas = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (eq.n_targets,))
    weight = np.zeros_like(cross)
    for value in np.unique(alphas):
        columns = alphas == value
        weight[:, columns] = _solve(cov + (value * scale) * np.eye(eq.n_features), cross[:, columns])
    return LinearMap(weight, mean_r - (mean_x + eq.offset) @ weight)


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]


def sum_squared_error(eq: NormalEquations, fit: LinearMap) -> np.ndarray:
    """Per-target ``Σ (r - c(x))²`` over the rows summarised by ``eq``."""
    w = fit.weight
    b = fit.bias + eq.offset @ w  # the same map on shifted rows
    sse = (
        eq.sum_r2
        - 2.0 * np.einsum("dm,dm->m", w, eq.xtr)
        - 2.0 * b * eq.sum_r
        + np.einsum("dm,dm->m", w, eq.xtx @ w)
        + 2.0 * b * (eq.sum_x @ w)
        + eq.count * b * b
    )
    return np.maximum(sse, 0.0)


def total_sum_of_squares(eq: NormalEquations) -> np.ndarray:
    """Per-target ``Σ (r - mean r)²``."""
    return np.maximum(eq.sum_r2 - eq.sum_r**2 / max(eq.count, 1), 0.0)


def r2_score(eq: NormalEquations, fit: LinearMap) -> float:
    """Coefficient of determination of ``fit`` on the rows of ``eq``, pooled over targets."""
    sst = total_sum_of_squares(eq).sum()
    if sst <= 0:
        return 0.0
    return float(1.0 - sum_squared_error(eq, fit).sum() / sst)


def error_ratio(eq: NormalEquations, fit: LinearMap) -> float:
    """``‖r - c(x)‖² / ‖r‖²``: below 1 when the compensation reduces the error."""
    before = eq.sum_r2.sum()
    if before <= 0:
        return 1.0
    return float(sum_squared_error(eq, fit).sum() / before)


@dataclasses.dataclass(frozen=True)
class CompensationFit:
    """The outcome of fitting one block."""

    fit: LinearMap
    r2_train: float
    r2_heldout: float
    error_ratio_heldout: float
    error_ratio_train: float  # below the held-out ratio by about twice the fit's optimism
    kept_targets: int  # output channels whose compensation lowers the held-out error
    alphas: np.ndarray  # the ridge strength chosen per output channel, NaN where none is kept
    not_finite: bool = False  # the statistics or the solution held NaN or Inf: dropped
    validated: LinearMap | None = None  # fitted on the training rows alone: what the scores measure

    @property
    def kept(self) -> bool:
        return self.kept_targets > 0

    @property
    def kept_mask(self) -> np.ndarray:
        return np.isfinite(self.alphas)

    @property
    def reason(self) -> str:
        if self.not_finite:
            return "NaN or Inf in the fit: those channels dropped"
        return "" if self.kept else "no gain on held-out samples"


def fit_compensation(
    train: NormalEquations,
    heldout: NormalEquations,
    alphas: tuple[float, ...] = DEFAULT_ALPHAS,
) -> CompensationFit:
    """Fit on ``train``, choose per output channel on ``heldout``, refit on both.

    Each output channel gets the ridge strength with the lowest held-out
    error, and is compensated only where that error is lower than without
    compensation; the kept channels are then refit on all rows.
    """
    zero = LinearMap.zeros(train.n_features, train.n_targets)
    if not (_finite_statistics(train) and _finite_statistics(heldout)):
        return CompensationFit(zero, 0.0, 0.0, 1.0, 1.0, 0, np.full(train.n_targets, np.nan), not_finite=True, validated=zero)
    fits = [fit_ridge(train, alpha) for alpha in alphas]
    errors = np.stack(
        [sum_squared_error(heldout, f) if f.is_finite() else np.full(train.n_targets, np.inf) for f in fits]
        + [sum_squared_error(heldout, zero)]
    )
    best = np.argmin(errors, axis=0)  # index len(alphas) means: no compensation
    keep = best < len(alphas)
    chosen = np.where(keep, np.asarray(alphas)[np.minimum(best, len(alphas) - 1)], np.nan)
    validated = _select_columns(fits, best, keep, zero)
    scores = (r2_score(train, validated), r2_score(heldout, validated),
              error_ratio(heldout, validated), error_ratio(train, validated))
    if not keep.any():
        return CompensationFit(zero, *scores, 0, chosen, validated=validated)
    final = fit_ridge(train.merged(heldout), np.where(keep, chosen, 1.0))
    final = LinearMap(final.weight * keep, final.bias * keep)
    if not final.is_finite():
        return CompensationFit(zero, *scores, 0, chosen, not_finite=True, validated=zero)
    return CompensationFit(final, *scores, int(keep.sum()), chosen, validated=validated)


def _finite_statistics(eq: NormalEquations) -> bool:
    return all(np.isfinite(a).all() for a in (eq.sum_x, eq.sum_r, eq.sum_r2, eq.xtx, eq.xtr))


def _select_columns(fits: list[LinearMap], best: np.ndarray, keep: np.ndarray, zero: LinearMap) -> LinearMap:
    weight, bias = zero.weight.copy(), zero.bias.copy()
    for index, fit in enumerate(fits):
        columns = keep & (best == index)
        weight[:, columns], bias[columns] = fit.weight[:, columns], fit.bias[columns]
    return LinearMap(weight, bias)


def fit_grouped_compensation(
    groups: list[tuple[NormalEquations, NormalEquations]],
    slices: list[tuple[slice, slice]],
    alphas: tuple[float, ...] = DEFAULT_ALPHAS,
) -> CompensationFit:
    """:func:`fit_compensation` per group of ``(train, heldout)`` statistics, one block-diagonal map.

    Group ``i`` maps the input features ``slices[i][0]`` to the targets
    ``slices[i][1]``; the scores are pooled over all targets.
    """
    fits = [fit_compensation(train, held, alphas) for train, held in groups]
    final, validated = (_block_diagonal([getattr(f, which) for f in fits], slices) for which in ("fit", "validated"))
    return CompensationFit(
        final,
        *_pooled_scores(groups, slices, validated),
        kept_targets=sum(f.kept_targets for f in fits),
        alphas=np.concatenate([f.alphas for f in fits]),
        not_finite=any(f.not_finite for f in fits),
        validated=validated,
    )


def with_stored_weights(
    fit: CompensationFit,
    groups: list[tuple[NormalEquations, NormalEquations]],
    slices: list[tuple[slice, slice]],
    validated_weight: np.ndarray,
    final_weight: np.ndarray,
) -> CompensationFit:
    """``fit`` restated for its weights as they will be stored (rounded to int8, say), given
    for its validated and its final map: each kept channel's bias is refit to its stored
    weights, a channel whose stored weights no longer lower its held-out error is dropped,
    and the scores are those of the stored weights."""
    keep = fit.kept_mask.copy()
    for (train, held), (features, targets) in zip(groups, slices):
        stored = _refit_bias(train, validated_weight[features, targets], keep[targets])
        keep[targets] &= sum_squared_error(held, stored) < held.sum_r2
    validated = _block_diagonal(
        [_refit_bias(train, validated_weight[f, t], keep[t]) for (train, _), (f, t) in zip(groups, slices)], slices
    )
    final = _block_diagonal(
        [_refit_bias(train.merged(held), final_weight[f, t], keep[t]) for (train, held), (f, t) in zip(groups, slices)],
        slices,
    )
    alphas = np.where(keep, fit.alphas, np.nan)
    return dataclasses.replace(
        fit, fit=final, validated=validated, alphas=alphas, kept_targets=int(keep.sum()),
        **dict(zip(_SCORES, _pooled_scores(groups, slices, validated))),
    )


def _refit_bias(eq: NormalEquations, weight: np.ndarray, keep: np.ndarray) -> LinearMap:
    """``weight`` with the bias that is best for it on ``eq``'s rows, on the ``keep`` columns; zero elsewhere."""
    bias = (eq.sum_r - (eq.sum_x + eq.count * eq.offset) @ weight) / max(eq.count, 1)
    return LinearMap(weight * keep, bias * keep)


def _block_diagonal(maps: list[LinearMap], slices: list[tuple[slice, slice]]) -> LinearMap:
    """One map from group ``i``'s map from features ``slices[i][0]`` to targets ``slices[i][1]``."""
    weight = np.zeros((max(f.stop for f, _ in slices), max(t.stop for _, t in slices)))
    bias = np.zeros(weight.shape[1])
    for mapping, (features, targets) in zip(maps, slices):
        weight[features, targets], bias[targets] = mapping.weight, mapping.bias
    return LinearMap(weight, bias)


_SCORES = ("r2_train", "r2_heldout", "error_ratio_heldout", "error_ratio_train")


def _pooled_scores(
    groups: list[tuple[NormalEquations, NormalEquations]], slices: list[tuple[slice, slice]], mapping: LinearMap
) -> tuple[float, float, float, float]:
    """R² on the training and the held-out rows and the held-out and training error ratios of
    ``mapping`` (:data:`_SCORES`), pooled over the groups by each group's sum of squares."""
    scores = []
    for (train, held), (features, targets) in zip(groups, slices):
        part = LinearMap(mapping.weight[features, targets], mapping.bias[targets])
        scores.append((r2_score(train, part), r2_score(held, part), error_ratio(held, part), error_ratio(train, part)))
    r2_train, r2_heldout, ratio_held, ratio_train = zip(*scores)
    return (
        _weighted_mean(r2_train, [total_sum_of_squares(train).sum() for train, _ in groups], empty=0.0),
        _weighted_mean(r2_heldout, [total_sum_of_squares(held).sum() for _, held in groups], empty=0.0),
        _weighted_mean(ratio_held, [held.sum_r2.sum() for _, held in groups], empty=1.0),
        _weighted_mean(ratio_train, [train.sum_r2.sum() for train, _ in groups], empty=1.0),
    )


def _weighted_mean(values: list[float], weights: list[float], empty: float) -> float:
    """Per-group scores pooled by each group's sum of squares (``empty`` when all are zero)."""
    total = sum(weights)
    return empty if total <= 0 else sum(v * w for v, w in zip(values, weights)) / total

"""Low-rank compensation: a branch that reads its input through a few directions (numpy only).

A full branch costs ``d·m`` multiply-adds per row; one of rank ``k``, ``x @ down @ up``,
costs ``k·(d + m)``. The down projection is reduced-rank regression's (Izenman, 1975): the
full fit's weight times the ``k`` target directions that carry most of its output's variance
on the training rows. The up projection is then fitted in closed form, per output channel as
the full fit is (:func:`~qwt_onnx.numerics.solver.fit_compensation`), on the statistics of the
projected rows, for the down projection as it is stored: what is scored is what runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from qwt_onnx.numerics.solver import CompensationFit, LinearMap, NormalEquations, fit_compensation

#: How much of the full branch's held-out error reduction a low-rank one may give up.
TOLERANCE = 0.05

#: Rounds a down projection as it will be stored; returns it and its scales (None: stored as is).
Store = Callable[[np.ndarray], tuple[np.ndarray, "np.ndarray | None"]]


@dataclasses.dataclass(frozen=True)
class LowRankFit:
    """A compensation of rank ``k``: ``fit``'s maps are ``x @ (down @ up) + bias``."""

    fit: CompensationFit
    down: np.ndarray  # [d, k], as stored
    up: np.ndarray  # [k, m], of the final fit
    down_scale: np.ndarray | None = None  # the scales ``down`` was stored with

    @property
    def rank(self) -> int:
        return self.down.shape[1]


def principal_directions(eq: NormalEquations, mapping: LinearMap, rank: int) -> np.ndarray:
    """``[m, rank]``: the orthonormal target directions holding most of the variance of
    ``mapping``'s output on ``eq``'s rows: the eigenvectors of its covariance ``Wᵀ C W``, m × m,
    decomposed where m is the smaller side."""
    covariance, weight = eq.covariance(), mapping.weight
    if weight.shape[1] < weight.shape[0]:  # a 3264-feature input mapped to 128 channels: 128², not 3264²
        _, vectors = np.linalg.eigh(weight.T @ covariance @ weight)
        return vectors[:, ::-1][:, :rank]
    # m can be a vocabulary (a text recogniser's head: thousands): as Bᵀ B with B = C^½ W
    # (d × m), its eigenvectors are B's right singular vectors, which cost d·m·min(d, m) rather than m³.
    values, vectors = np.linalg.eigh(covariance)
    b = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T @ weight
    _, _, right = np.linalg.svd(b, full_matrices=False)  # singular values descending
    return right[:rank].T


def fit_low_rank(train: NormalEquations, heldout: NormalEquations, full: LinearMap, rank: int,
                 store: Store | None = None, directions: np.ndarray | None = None) -> LowRankFit:
    """The rank-``rank`` compensation whose down projection reduces ``full`` (fitted on ``train``);
    ``directions``, where given, are :func:`principal_directions` of at least that rank."""
    if directions is None:
        directions = principal_directions(train, full, rank)
    down = full.weight @ directions[:, :rank]
    down, scale = store(down) if store is not None else (down, None)
    fit = fit_compensation(train.projected(down), heldout.projected(down))
    expanded = dataclasses.replace(fit, fit=_through(down, fit.fit), validated=_through(down, fit.validated))
    return LowRankFit(expanded, down, fit.fit.weight, scale)


def _through(down: np.ndarray, mapping: LinearMap | None) -> LinearMap | None:
    return None if mapping is None else LinearMap(down @ mapping.weight, mapping.bias)


def pays(rank: int, n_features: int, n_targets: int) -> bool:
    """Whether a branch of this rank costs at most half a full one: less would not pay for its
    second op."""
    return 2 * rank * (n_features + n_targets) <= n_features * n_targets


def cheaper_ranks(n_features: int, n_targets: int) -> list[int]:
    """The ranks tried: powers of two from 4 that pay (:func:`pays`)."""
    ranks, rank = [], 4
    while pays(rank, n_features, n_targets):
        ranks.append(rank)
        rank *= 2
    return ranks


def lowest_sufficient_rank(train: NormalEquations, heldout: NormalEquations, full: CompensationFit,
                           store: Store | None = None, tolerance: float = TOLERANCE) -> LowRankFit | None:
    """The compensation of the lowest rank tried whose held-out error reduction is at least
    ``1 - tolerance`` of ``full``'s; None where none is (or ``full`` removes nothing)."""
    needed = (1.0 - full.error_ratio_heldout) * (1.0 - tolerance)
    ranks = cheaper_ranks(train.n_features, train.n_targets)
    if needed <= 0.0 or full.validated is None or not ranks:
        return None
    directions = principal_directions(train, full.validated, ranks[-1])  # one decomposition serves every rank
    for rank in ranks:
        low = fit_low_rank(train, heldout, full.validated, rank, store, directions)
        if low.fit.kept and 1.0 - low.fit.error_ratio_heldout >= needed:
            return low
    return None

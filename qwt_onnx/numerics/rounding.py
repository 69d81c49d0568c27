"""Weight rounding with error feedback (GPTQ), numpy only.

Rounding each weight to its nearest grid point minimises the weight's own error; what matters
is the output's, ``‖(W − Q) X‖²`` over the calibration inputs ``X``. With the inputs' second
moments ``H = X Xᵀ`` that is a quadratic in each output channel's row, and GPTQ (Frantar et
al., 2023, after Optimal Brain Quantization) minimises it greedily: round one input column,
then move the columns not yet rounded by the least-squares correction of that column's error
(``H⁻¹``'s Cholesky factor gives every step's correction at once). The grid (each channel's
scale, found before) is kept; only which grid point each weight rounds to changes. Columns go
in order of decreasing ``H`` diagonal (largest inputs first), as GPTQ's ``act_order``.

Weights are handled as ``[groups, rows, inputs]``: a convolution ``[C_out, C_in / g, *k]``
is ``g`` groups of ``C_out / g`` rows over ``C_in / g · prod(k)`` inputs (one ``H`` per
group); a ``[K, N]`` MatMul weight is one group of N rows over K inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

DAMPING = 0.01  # of the mean diagonal added to H, as GPTQ: keeps H⁻¹ stable where inputs are correlated
DAMPING_GROWTH = (1, 10, 100, 1000, 10_000, 100_000, 1_000_000)  # tried in turn where H is not positive definite
DEAD_INPUT = 1e-9  # of the largest diagonal: an input whose variance is rounding noise
COLUMN_BLOCK = 128  # columns whose corrections are applied lazily, as one matrix product


def weight_rows(weight: np.ndarray, axis: int, group: int = 1) -> np.ndarray:
    """``weight`` as ``[groups, rows, inputs]`` (see the module docstring), output channels on ``axis``."""
    if weight.ndim > 2:
        return weight.reshape(group, weight.shape[0] // group, -1)
    return (weight if axis == 0 else weight.T)[None]


def rows_to_weight(rows: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """The inverse of :func:`weight_rows`."""
    if len(shape) > 2:
        return rows.reshape(shape)
    return rows[0] if axis == 0 else rows[0].T


def pair_partners(shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Per input of a row (:func:`weight_rows`), the input whose product the kernels without VNNI
    add to its own in int16 (see :mod:`qwt_onnx.numerics.saturation`), -1 where none."""
    if len(shape) > 2:  # [C_out, C_in / g, *k], reduced NHWC: kernel positions, input channels innermost
        order = np.moveaxis(np.arange(int(np.prod(shape[1:]))).reshape(shape[1:]), 0, -1).reshape(-1)
    else:
        order = np.arange(shape[1] if axis == 0 else shape[0])
    partners = np.full(order.size, -1)
    even = order[: order.size // 2 * 2].reshape(-1, 2)
    partners[even[:, 0]], partners[even[:, 1]] = even[:, 1], even[:, 0]
    return partners


@dataclasses.dataclass(frozen=True)
class Feedback:
    """What error feedback needs of the inputs' second moments ``H`` (per group), whatever the
    grid: the rounding order (largest diagonal first) and, in that order, the upper Cholesky
    factor of the damped ``H⁻¹``, whose row i says how the columns after i move when column
    i's error is fed forward (its diagonal normalises that error)."""

    order: np.ndarray  # [G, d]
    factor: np.ndarray  # [G, d, d], float32 as GPTQ keeps it: half the memory of a model's worth
    # what error_feedback_rounding returned, by a digest of its arguments: the PTQ candidates
    # that differ only in activation ranges or float stem round the same weights the same way
    rounded: dict[bytes, np.ndarray] = dataclasses.field(default_factory=dict, compare=False, repr=False)


def feedback(hessian: np.ndarray, damping: float = DAMPING) -> Feedback:
    """The :class:`Feedback` of second moments ``hessian`` ``[G, d, d]``. Inputs never seen (a
    diagonal at rounding-noise level, as a centred constant input leaves) are cut loose: their
    weights move nothing. Where streamed sums leave ``H`` short of positive definite, the damping
    grows tenfold, up to a millionfold; past that, no feedback (rounding to nearest)."""
    hessian = hessian.astype(np.float64)
    hessian = (hessian + hessian.transpose(0, 2, 1)) / 2
    diagonal = np.einsum("gii->gi", hessian)
    order = np.argsort(-diagonal, axis=1, kind="stable")
    nearest = Feedback(order, np.broadcast_to(np.eye(hessian.shape[1], dtype=np.float32), hessian.shape).copy())
    if not np.isfinite(hessian).all():
        return nearest
    hessian = np.take_along_axis(np.take_along_axis(hessian, order[:, :, None], axis=1), order[:, None, :], axis=2)
    diagonal = np.einsum("gii->gi", hessian).copy()
    dead = diagonal <= DEAD_INPUT * np.maximum(diagonal.max(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    hessian[np.broadcast_to(dead[:, :, None], hessian.shape) | np.broadcast_to(dead[:, None, :], hessian.shape)] = 0.0
    diagonal = np.where(dead, 1.0, diagonal)
    alive_mean = np.where(dead, 0.0, diagonal).sum(axis=1) / np.maximum((~dead).sum(axis=1), 1)
    identity = np.eye(hessian.shape[1], dtype=bool)
    for growth in DAMPING_GROWTH:
        damped = np.where(identity, (diagonal + damping * growth * alive_mean[:, None])[:, :, None], hessian)
        try:
            # H = V Vᵀ with V upper triangular (the lower Cholesky factor of H reversed end to end)
            # makes H⁻¹ = (V⁻¹)ᵀ V⁻¹: V⁻¹ is the upper factor wanted, for one factorisation and one inverse
            reverse = slice(None, None, -1)
            upper = np.linalg.cholesky(damped[:, reverse, reverse])[:, reverse, reverse]
            return Feedback(order, _upper_triangular_inverse(upper).astype(np.float32))
        except np.linalg.LinAlgError:
            continue
    return nearest


def _upper_triangular_inverse(upper: np.ndarray) -> np.ndarray:
    """The inverses of upper triangular ``upper`` ``[G, d, d]``, by halves: ``[[A, B], [0, D]]⁻¹`` is
    ``[[A⁻¹, -A⁻¹ B D⁻¹], [0, D⁻¹]]``. Matrix products where a general inverse would factorise the
    matrix again: 3.5x faster at d = 1152 (a 3x3 Conv of 128 channels), the same to 1e-16."""
    width = upper.shape[-1]
    if width <= COLUMN_BLOCK:
        return np.linalg.inv(upper)
    half = width // 2
    first, second = _upper_triangular_inverse(upper[:, :half, :half]), _upper_triangular_inverse(upper[:, half:, half:])
    inverse = np.zeros_like(upper)
    inverse[:, :half, :half], inverse[:, half:, half:] = first, second
    inverse[:, :half, half:] = -(first @ upper[:, :half, half:]) @ second
    return inverse


def error_feedback_rounding(
    rows: np.ndarray,
    fed_back: Feedback,
    step: np.ndarray,
    top: int,
    pair_limit: int | None = None,
    partners: np.ndarray | None = None,
) -> np.ndarray:
    """Integers in ``[-top, top]`` for ``rows`` ``[G, N, d]`` on the grid ``step`` (broadcast to
    ``rows``) that leave the least output error for inputs whose second moments gave
    ``fed_back`` (:func:`feedback`), greedily (GPTQ).

    With ``pair_limit``, an input and its partner in ``partners`` (:func:`pair_partners`) are
    rounded so that their same-sign magnitudes add to at most ``pair_limit``: the second of the
    two to be rounded is clamped, and its error fed forward like any other.
    """
    key = _digest(rows, step, top, pair_limit, partners)
    if key not in fed_back.rounded:  # kept as int8 where |q| <= top fits: a quarter of int32's memory
        rounded = _error_feedback_rounding(rows, fed_back, step, top, pair_limit, partners)
        fed_back.rounded[key] = rounded.astype(np.int8 if top <= 127 else np.int32)
    return fed_back.rounded[key].astype(np.int32)


def _digest(*arguments) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for argument in arguments:
        array = np.ascontiguousarray(argument if argument is not None else np.empty(0))
        digest.update(repr((array.dtype.str, array.shape)).encode())
        digest.update(array.tobytes())
    return digest.digest()


def _error_feedback_rounding(rows: np.ndarray, fed_back: Feedback, step: np.ndarray, top: int, pair_limit: int | None,
                             partners: np.ndarray | None) -> np.ndarray:
    groups, count, width = rows.shape
    order, factor = fed_back.order, fed_back.factor
    weights = np.take_along_axis(rows.astype(np.float64), order[:, None, :], axis=2)
    steps = np.take_along_axis(np.broadcast_to(step, rows.shape).astype(np.float64), order[:, None, :], axis=2)
    partner_at = _partner_positions(order, partners) if pair_limit is not None and partners is not None else None

    quantized = np.zeros(rows.shape, np.int32)
    for start in range(0, width, COLUMN_BLOCK):
        stop = min(start + COLUMN_BLOCK, width)
        block = weights[:, :, start:stop].copy()
        errors = np.zeros_like(block)
        corrections = factor[:, start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            low, high = _bounds(quantized, partner_at, column, top, pair_limit)
            q = np.clip(np.rint(block[:, :, i] / steps[:, :, column]), low, high)
            quantized[:, :, column] = q
            error = (block[:, :, i] - q * steps[:, :, column]) / corrections[:, i, i][:, None]
            block[:, :, i:] -= error[:, :, None] * corrections[:, i, None, i:]
            errors[:, :, i] = error
        weights[:, :, stop:] -= errors @ factor[:, start:stop, stop:]
    restored = np.empty_like(quantized)
    np.put_along_axis(restored, order[:, None, :].repeat(count, axis=1), quantized, axis=2)
    return restored


def _partner_positions(order: np.ndarray, partners: np.ndarray) -> np.ndarray:
    """Per group and rounding position, the position at which the partner is rounded (-1: none)."""
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(order.shape[1])[None].repeat(order.shape[0], axis=0), axis=1)
    partner = partners[order]  # [G, d]: the original index of each position's partner
    return np.where(partner >= 0, np.take_along_axis(position, np.maximum(partner, 0), axis=1), -1)


def _bounds(quantized: np.ndarray, partner_at: np.ndarray | None, column: int, top: int,
            pair_limit: int | None) -> tuple[np.ndarray | int, np.ndarray | int]:
    """The integers column ``column`` may take: ``[-top, top]``, and where its partner is already
    rounded, no further than leaves their same-sign sum within ``pair_limit``."""
    if partner_at is None:
        return -top, top
    at = partner_at[:, column]  # [G]
    done = (at >= 0) & (at < column)
    if not done.any():
        return -top, top
    partner = np.take_along_axis(quantized, np.maximum(at, 0)[:, None, None], axis=2)[:, :, 0]  # [G, N]
    partner = np.where(done[:, None], partner, 0)
    high = np.where(partner > 0, np.minimum(top, pair_limit - partner), top)
    low = np.where(partner < 0, np.maximum(-top, -pair_limit - partner), -top)
    return low, high

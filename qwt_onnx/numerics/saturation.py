"""Int8 weights that onnxruntime's x86 kernels without VNNI compute exactly (numpy only).

On x86 CPUs without VNNI (AVX2, or AVX-512 without VNNI), onnxruntime's uint8 ×
int8 kernels (QLinearConv, QGemm, MatMulIntegerToFloat, ...) multiply with
VPMADDUBSW: it adds the products of two adjacent weights along the reduction
axis in int16, with saturation. int8 activations are shifted to uint8 first, so
every activation code reaches 255, and a pair of same-sign weights whose
magnitudes add up to more than 128 can overflow (255 · 129 > 32767).

Adjacent means adjacent in the order the kernels reduce: a MatMul's or Gemm's
K axis as stored; a convolution's kernel positions, input channels innermost
(onnxruntime packs the filter NHWC, ``[C_out, *k, C_in / groups]``). Depthwise
convolutions run in a kernel that widens to int32 first and never saturate.
Measured on every path (ConvSym, im2col GEMM with odd channel counts, grouped,
GEMV, QGemm with and without transB) under ``qemu-x86_64 -cpu Haswell``:
tests/test_portable.py keeps that true for the installed onnxruntime. AVX-512
without VNNI, which QEMU cannot emulate, swaps only the kernel and keeps the
AVX2 packing (MLAS's platform.cpp and convsym.cpp), hence the same pairs.

A per-channel scale that maps each channel's largest same-sign pair to at most
127.5 makes every rounded pair fit (two roundings add at most 1), at a small
cost: about 1.4 dB of weight SQNR on ViT-S and MiniLM, against 6 dB for
halving the range (7-bit weights).
"""

from __future__ import annotations

import numpy as np

PAIR_LIMIT = 128  # the most |w_a| + |w_b| of a same-sign pair: 255 · 128 = 32640 ≤ 32767
PAIR_SCALE_BOUND = PAIR_LIMIT - 0.5  # a pair at most this far (in steps) rounds to at most PAIR_LIMIT


def reduction_rows(weight: np.ndarray, axis: int) -> np.ndarray:
    """``[channels, runs, K]``: each output channel's weights in the order the kernels reduce them.

    ``axis`` is the output-channel axis: 0 for a convolution ``[C_out, C_in, *k]`` (reduced
    over ``*k`` then ``C_in``) or a Gemm with transB ``[N, K]``; the last axis for a MatMul
    ``[..., K, N]`` or a Gemm ``[K, N]`` (reduced over K, once per leading batch index).
    """
    if weight.ndim > 2 and axis == 0:  # convolution: NHWC filter order
        rows = np.moveaxis(weight, 1, -1).reshape(weight.shape[0], 1, -1)
    elif axis == weight.ndim - 1:  # [..., K, N]
        rows = np.moveaxis(weight, -1, 0)
        rows = rows.reshape(rows.shape[0], -1, rows.shape[-1])
    elif weight.ndim == 2 and axis == 0:
        rows = weight[:, None, :]
    else:
        raise ValueError(f"no reduction order for a weight of shape {weight.shape} with channels on axis {axis}")
    return rows


def pair_sums(weight: np.ndarray, axis: int) -> np.ndarray:
    """``[channels, pairs]``: the larger of each adjacent pair's positive and negative magnitude sums."""
    rows = reduction_rows(weight, axis)
    if rows.shape[-1] % 2:  # the kernels pad K with zeros
        rows = np.concatenate([rows, np.zeros(rows.shape[:-1] + (1,), rows.dtype)], axis=-1)
    pairs = rows.reshape(rows.shape[0], -1, 2).astype(np.float64)
    positive = np.clip(pairs, 0, None).sum(-1)
    negative = np.clip(-pairs, 0, None).sum(-1)
    return np.maximum(positive, negative)


def pair_peak(weight: np.ndarray, axis: int) -> np.ndarray:
    """Per output channel, the largest same-sign magnitude sum of an adjacent pair."""
    sums = pair_sums(weight, axis)
    return sums.max(axis=1) if sums.shape[1] else np.zeros(sums.shape[0])


def overflowing_pairs(quantized: np.ndarray, axis: int) -> np.ndarray:
    """Per output channel, how many adjacent pairs of an int8 weight can overflow int16."""
    return (pair_sums(quantized, axis) > PAIR_LIMIT).sum(axis=1)


def kernel_pairs_products(weight_shape: tuple[int, ...], group: int = 1) -> bool:
    """Whether onnxruntime's kernel for this weight adds products in pairs: all but depthwise convolutions."""
    depthwise = len(weight_shape) > 2 and weight_shape[1] == 1 and weight_shape[0] == group
    return not depthwise

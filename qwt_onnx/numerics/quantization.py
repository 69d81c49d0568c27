"""Reference integer quantization arithmetic (numpy only).

The same arithmetic as ONNX QuantizeLinear / DequantizeLinear: scale, round
half to even, add the zero point, saturate.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwt_onnx.numerics import saturation

INT8_MAX = 127
SMALLEST_SCALE = float(np.finfo(np.float32).tiny)  # below it, x / scale overflows


@dataclasses.dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of a per-tensor (0-d) or per-channel (1-d) quantizer."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # int8 or uint8, same shape as scale

    @property
    def dtype(self) -> np.dtype:
        return self.zero_point.dtype


def _broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if param.ndim == 0 or axis is None:
        return param
    shape = [1] * ndim
    shape[axis] = param.size
    return param.reshape(shape)


def quantize(x: np.ndarray, params: QuantParams, axis: int | None = None) -> np.ndarray:
    """``saturate(round_half_even(x / scale) + zero_point)``, as QuantizeLinear."""
    info = np.iinfo(params.dtype)
    scale = _broadcast(params.scale.astype(np.float32), x.ndim, axis)
    zero_point = _broadcast(params.zero_point.astype(np.int32), x.ndim, axis)
    q = np.rint(x.astype(np.float32) / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(params.dtype)


def dequantize(q: np.ndarray, params: QuantParams, axis: int | None = None) -> np.ndarray:
    """``(q - zero_point) * scale``, as DequantizeLinear."""
    scale = _broadcast(params.scale.astype(np.float32), q.ndim, axis)
    zero_point = _broadcast(params.zero_point.astype(np.int32), q.ndim, axis)
    return ((q.astype(np.int32) - zero_point) * scale).astype(np.float32)


def fake_quantize(x: np.ndarray, params: QuantParams, axis: int | None = None) -> np.ndarray:
    """``x`` through QuantizeLinear and DequantizeLinear with ``params``."""
    return dequantize(quantize(x, params, axis), params, axis)


def symmetric_weight_params(weight: np.ndarray, axis: int, pair_safe: bool = False) -> QuantParams:
    """Per-channel symmetric int8 parameters along ``axis``: ``scale = max|w| / 127``.

    ``pair_safe``: at least ``peak / 127.5`` too, where ``peak`` is the channel's largest
    same-sign sum of two weights that x86 kernels without VNNI add in int16, so that no
    rounded pair can overflow (see :mod:`qwt_onnx.numerics.saturation`).
    """
    axis %= weight.ndim
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
    amax = np.abs(weight).max(axis=reduce_axes) if reduce_axes else np.abs(weight)
    bound = amax / INT8_MAX
    if pair_safe:
        bound = np.maximum(bound, saturation.pair_peak(weight, axis) / saturation.PAIR_SCALE_BOUND)
    scale = np.where(amax > 0, bound, 1.0).astype(np.float32)
    return QuantParams(scale, np.zeros(scale.shape, dtype=np.int8))


def rounding_bias(error: np.ndarray, axis: int, input_mean: np.ndarray, group: int = 1) -> np.ndarray:
    """The mean output error that a weight's rounding ``error`` (float minus rounded) causes,
    per output channel, for inputs with per-channel means ``input_mean``: what adding to the
    bias cancels (bias correction). ``error`` is a convolution's ``[C_out, C_in / group, *k]``
    (zero padding at the borders ignored) or a 2-D ``[K, N]`` / ``[N, K]`` weight with output
    channels on ``axis``."""
    if error.ndim > 2:
        per_input = error.reshape(error.shape[0], error.shape[1], -1).sum(axis=-1)  # [C_out, C_in / group]
        group_of = np.arange(error.shape[0]) // (error.shape[0] // group)
        return (per_input * input_mean.reshape(group, -1)[group_of]).sum(axis=1)
    rows = error if axis == 0 else error.T  # [N, K]
    return rows @ input_mean


def activation_params(low: float, high: float, symmetric: bool) -> QuantParams:
    """Per-tensor parameters covering ``[low, high]``.

    Symmetric: int8 with zero point 0 (TensorRT). Asymmetric: uint8 with the
    range widened to include 0 so that zero is exactly representable.
    """
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if symmetric:
        scale = max(-low, high) / INT8_MAX
        if scale < SMALLEST_SCALE:
            scale = 1.0
        return QuantParams(np.array(scale, np.float32), np.array(0, np.int8))
    scale = (high - low) / 255.0
    if scale < SMALLEST_SCALE:  # a tensor that is practically zero: onnxruntime's rule
        return QuantParams(np.array(1.0, np.float32), np.array(0, np.uint8))
    zero_point = int(np.clip(np.rint(-low / scale), 0, 255))
    return QuantParams(np.array(scale, np.float32), np.array(zero_point, np.uint8))


def int32_bias(bias: np.ndarray, input_scale: np.ndarray, weight_scale: np.ndarray) -> tuple[np.ndarray, QuantParams]:
    """``bias`` as int32 with the scale ``input_scale * weight_scale`` (per output channel), the
    integer kernels' accumulator scale, and its parameters: what a quantized Gemm or Conv adds
    to its int32 accumulator. Saturated at the int32 range, which only a bias 2^31 steps of the
    accumulator large reaches."""
    scale = np.broadcast_to(np.asarray(input_scale, np.float32) * np.asarray(weight_scale, np.float32), bias.shape)
    scale = np.maximum(scale, SMALLEST_SCALE).astype(np.float32)
    info = np.iinfo(np.int32)
    quantized = np.clip(np.rint(bias.astype(np.float64) / scale), info.min, info.max).astype(np.int32)
    return quantized, QuantParams(scale, np.zeros(scale.shape, np.int32))


def fake_quantize_weight(weight: np.ndarray, axis: int, pair_safe: bool = False) -> tuple[np.ndarray, QuantParams]:
    """``weight`` after int8 per-channel quantization along ``axis`` and back (float32), and its parameters."""
    params = symmetric_weight_params(weight, axis, pair_safe)
    return fake_quantize(weight, params, axis), params

"""Reference integer quantization arithmetic (numpy only).

The same arithmetic as ONNX QuantizeLinear / DequantizeLinear: scale, round
half to even, add the zero point, saturate.
"""

from __future__ import annotations

import dataclasses

import numpy as np

INT8_MAX = 127


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


def symmetric_weight_params(weight: np.ndarray, axis: int) -> QuantParams:
    """Per-channel symmetric int8 parameters along ``axis``: ``scale = max|w| / 127``."""
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis % weight.ndim)
    amax = np.abs(weight).max(axis=reduce_axes) if reduce_axes else np.abs(weight)
    scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
    return QuantParams(scale, np.zeros(scale.shape, dtype=np.int8))


def activation_params(low: float, high: float, symmetric: bool) -> QuantParams:
    """Per-tensor parameters covering ``[low, high]``.

    Symmetric: int8 with zero point 0 (TensorRT). Asymmetric: uint8 with the
    range widened to include 0 so that zero is exactly representable.
    """
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if symmetric:
        amax = max(-low, high)
        scale = amax / INT8_MAX if amax > 0 else 1.0
        return QuantParams(np.array(scale, np.float32), np.array(0, np.int8))
    scale = (high - low) / 255.0 if high > low else 1.0
    zero_point = int(np.clip(np.rint(-low / scale), 0, 255))
    return QuantParams(np.array(scale, np.float32), np.array(zero_point, np.uint8))


def fake_quantize_weight(weight: np.ndarray, axis: int) -> np.ndarray:
    """``weight`` after int8 per-channel quantization along ``axis`` and back, in its dtype."""
    params = symmetric_weight_params(weight, axis)
    return dequantize(quantize(weight, params, axis), params, axis).astype(weight.dtype)


def value_range(x: np.ndarray, previous: tuple[float, float] | None = None) -> tuple[float, float]:
    """``[min, max]`` of ``x``, widened to include ``previous``."""
    low, high = float(x.min()), float(x.max())
    return (low, high) if previous is None else (min(low, previous[0]), max(high, previous[1]))

"""Reference integer quantization arithmetic (numpy only).

The same arithmetic as ONNX QuantizeLinear / DequantizeLinear: scale, round
half to even, add the zero point, saturate. A quantizer of ``bits`` below its
container's (int4 held in numpy's int8, a 6-bit grid in uint8) saturates at
its own range.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwt_onnx.numerics import saturation

SMALLEST_SCALE = float(np.finfo(np.float32).tiny)  # below it, x / scale overflows
INT32_BIAS_LIMIT = float(1 << 30)  # the largest int32 bias written: half the range, headroom for float32 rounding


@dataclasses.dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of a per-tensor (0-d) or per-channel (1-d) quantizer of ``bits``
    (its container's, the zero point's dtype, where None); ``narrow``: signed and symmetric
    about zero (-7..7 at 4 bits), as weights are rounded."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # int8, uint8, int16 or uint16 (int32 for biases), same shape as scale
    bits: int | None = None
    narrow: bool = False

    @property
    def dtype(self) -> np.dtype:
        return self.zero_point.dtype

    @property
    def width(self) -> int:
        return self.bits or self.dtype.itemsize * 8

    @property
    def limits(self) -> tuple[int, int]:
        """The integers the quantizer can hold."""
        low, high = integer_range(self.width, signed=np.issubdtype(self.dtype, np.signedinteger))
        return (-high, high) if self.narrow else (low, high)


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def container(bits: int, signed: bool) -> np.dtype:
    """The numpy dtype that holds a ``bits`` integer (int4 in int8, as onnx_ir unpacks it)."""
    size = 8 if bits <= 8 else 16 if bits <= 16 else 32
    return np.dtype(f"{'' if signed else 'u'}int{size}")


def _broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if param.ndim == 0 or axis is None:
        return param
    shape = [1] * ndim
    shape[axis] = param.size
    return param.reshape(shape)


def quantize(x: np.ndarray, params: QuantParams, axis: int | None = None) -> np.ndarray:
    """``saturate(round_half_even(x / scale) + zero_point)``, as QuantizeLinear."""
    low, high = params.limits
    scale = _broadcast(params.scale.astype(np.float32), x.ndim, axis)
    zero_point = _broadcast(params.zero_point.astype(np.int32), x.ndim, axis)
    q = np.rint(x.astype(np.float32) / scale) + zero_point
    return np.clip(q, low, high).astype(params.dtype)


def dequantize(q: np.ndarray, params: QuantParams, axis: int | None = None) -> np.ndarray:
    """``(q - zero_point) * scale``, as DequantizeLinear."""
    scale = _broadcast(params.scale.astype(np.float32), q.ndim, axis)
    zero_point = _broadcast(params.zero_point.astype(np.int32), q.ndim, axis)
    return ((q.astype(np.int32) - zero_point) * scale).astype(np.float32)


def fake_quantize(x: np.ndarray, params: QuantParams, axis: int | None = None) -> np.ndarray:
    """``x`` through QuantizeLinear and DequantizeLinear with ``params``."""
    return dequantize(quantize(x, params, axis), params, axis)


def symmetric_weight_params(weight: np.ndarray, axis: int, pair_safe: bool = False, bits: int = 8,
                            importance: np.ndarray | None = None) -> QuantParams:
    """Per-channel symmetric parameters of ``bits`` along ``axis``: ``scale = max|w| / 127``
    at 8 bits; below, each channel's clipping searched for the least squared error of its
    output: each weight's rounding error weighted by ``importance`` (broadcast to ``weight``:
    the mean square of the input it multiplies, see :func:`input_importance`; 1 where None).

    ``pair_safe`` (8 bits): at least ``peak / 127.5`` too, where ``peak`` is the channel's largest
    same-sign sum of two weights that x86 kernels without VNNI add in int16, so that no
    rounded pair can overflow (see :mod:`qwt_onnx.numerics.saturation`).
    """
    axis %= weight.ndim
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
    amax = np.abs(weight).max(axis=reduce_axes) if reduce_axes else np.abs(weight)
    top = integer_range(bits, signed=True)[1]  # narrow: -top..top, so that the grid is symmetric
    bound = amax / top if bits >= 8 else amax * _least_error_clipping(weight, axis, amax, top, importance) / top
    if pair_safe and bits == 8:
        bound = np.maximum(bound, saturation.pair_peak(weight, axis) / saturation.PAIR_SCALE_BOUND)
    scale = np.where(amax > 0, bound, 1.0).astype(np.float32)
    return QuantParams(scale, np.zeros(scale.shape, dtype=np.int8), bits if bits != 8 else None, narrow=True)


def blocked_weight_params(weight: np.ndarray, block: int, bits: int, importance: np.ndarray | None = None) -> QuantParams:
    """Symmetric parameters of a 2-D ``[K, N]`` weight with one scale per ``block`` rows of K and
    column: scale and zero point ``[K / block, N]`` (K a multiple of ``block``), each block's
    clipping searched as :func:`symmetric_weight_params` searches a channel's."""
    k, n = weight.shape
    as_channels = weight.reshape(k // block, block, n).transpose(0, 2, 1).reshape(-1, block)  # [blocks · N, block]
    weights = None
    if importance is not None:
        weights = np.broadcast_to(importance, weight.shape).reshape(k // block, block, n).transpose(0, 2, 1).reshape(-1, block)
    params = symmetric_weight_params(as_channels, 0, bits=bits, importance=weights)
    shape = (k // block, n)
    return QuantParams(params.scale.reshape(shape), params.zero_point.reshape(shape), params.bits, params.narrow)


def expand_blocks(params: QuantParams, block: int) -> QuantParams:
    """Blocked parameters repeated to their weight's shape, for element-wise (de)quantization."""
    return dataclasses.replace(params, scale=np.repeat(params.scale, block, axis=0), zero_point=np.repeat(params.zero_point, block, axis=0))


CLIPPING_RATIOS = np.linspace(0.3, 1.0, 36)  # of each channel's max |w|, tried below 8 bits


def _least_error_clipping(weight: np.ndarray, axis: int, amax: np.ndarray, top: int,
                          importance: np.ndarray | None) -> np.ndarray:
    """Per channel, the ratio of ``max |w|`` whose clipped grid rounds ``weight`` with the least
    (``importance``-weighted) squared error: at 4 bits the few largest weights would otherwise
    spend the grid's 15 levels."""
    rows = np.moveaxis(weight, axis, 0).reshape(amax.size, -1).astype(np.float32)
    weights = 1.0 if importance is None else np.moveaxis(np.broadcast_to(importance, weight.shape), axis, 0).reshape(rows.shape)
    best, best_error = np.ones(amax.size), np.full(amax.size, np.inf)
    for ratio in CLIPPING_RATIOS:
        step = np.maximum(amax * ratio / top, np.finfo(np.float32).tiny)[:, None]
        error = (weights * np.square(rows - np.clip(np.rint(rows / step), -top, top) * step)).sum(axis=1)
        better = error < best_error
        best, best_error = np.where(better, ratio, best), np.where(better, error, best_error)
    return best


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


def input_importance(weight_shape: tuple[int, ...], axis: int, input_power: np.ndarray, group: int = 1) -> np.ndarray:
    """The mean square of the input each weight multiplies, shaped to broadcast against the
    weight: a convolution's ``[C_out, C_in / group, *k]`` (grouped inputs mapped to their
    output channels) or a 2-D ``[K, N]`` / ``[N, K]`` weight with output channels on ``axis``."""
    power = np.asarray(input_power, np.float32)
    if len(weight_shape) > 2:
        group_of = np.arange(weight_shape[0]) // (weight_shape[0] // group)
        per_output = power.reshape(group, -1)[group_of]  # [C_out, C_in / group]
        return per_output.reshape(*per_output.shape, *([1] * (len(weight_shape) - 2)))
    return power[None, :] if axis == 0 else power[:, None]


def activation_params(low: float, high: float, symmetric: bool, bits: int = 8) -> QuantParams:
    """Per-tensor parameters of ``bits`` covering ``[low, high]``.

    Symmetric: signed with zero point 0 and the narrow range (int8: -127..127; TensorRT).
    Asymmetric: unsigned with the range widened to include 0 so that zero is exactly
    representable.
    """
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    dtype, exact = container(bits, signed=symmetric), None if bits in (8, 16) else bits
    if symmetric:
        scale = max(-low, high) / integer_range(bits, signed=True)[1]
        if scale < SMALLEST_SCALE:
            scale = 1.0
        return QuantParams(np.array(scale, np.float32), np.array(0, dtype), exact)
    top = integer_range(bits, signed=False)[1]
    scale = (high - low) / top
    if scale < SMALLEST_SCALE:  # a tensor that is practically zero: onnxruntime's rule
        return QuantParams(np.array(1.0, np.float32), np.array(0, dtype), exact)
    zero_point = int(np.clip(np.rint(-low / scale), 0, top))
    return QuantParams(np.array(scale, np.float32), np.array(zero_point, dtype), exact)


def int32_bias(bias: np.ndarray, input_scale: np.ndarray, weight_scale: np.ndarray) -> tuple[np.ndarray, QuantParams]:
    """``bias`` as int32 with the scale ``input_scale * weight_scale`` (per output channel), the
    integer kernels' accumulator scale, and its parameters: what a quantized Gemm or Conv adds
    to its int32 accumulator. A channel whose bias would not fit in int32 on that scale (16-bit
    activations make it tiny) gets the least scale on which it does: no integer kernel takes
    that bias, and the float op reads it dequantized, as exactly as float32 holds it."""
    scale = np.broadcast_to(np.asarray(input_scale, np.float32) * np.asarray(weight_scale, np.float32), bias.shape)
    fitting = np.abs(bias.astype(np.float64)) / INT32_BIAS_LIMIT
    scale = np.maximum(np.maximum(scale, fitting), SMALLEST_SCALE).astype(np.float32)
    info = np.iinfo(np.int32)
    quantized = np.clip(np.rint(bias.astype(np.float64) / scale), info.min, info.max).astype(np.int32)
    return quantized, QuantParams(scale, np.zeros(scale.shape, np.int32))


def int32_bias_overflows(bias: np.ndarray, input_scale: np.ndarray, weight_scale: np.ndarray) -> bool:
    """Whether ``bias`` on the accumulator's scale ``input_scale * weight_scale`` exceeds int32's
    safe range: where onnxruntime's own bias quantization (of a float bias) would overflow."""
    scale = np.asarray(input_scale, np.float64) * np.asarray(weight_scale, np.float64)
    return bool(np.any(np.abs(bias.astype(np.float64)) > INT32_BIAS_LIMIT * scale))


def fake_quantize_weight(weight: np.ndarray, axis: int, pair_safe: bool = False) -> tuple[np.ndarray, QuantParams]:
    """``weight`` after int8 per-channel quantization along ``axis`` and back (float32), and its parameters."""
    params = symmetric_weight_params(weight, axis, pair_safe)
    return fake_quantize(weight, params, axis), params

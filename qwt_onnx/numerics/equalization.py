"""Channel equalization in closed form: how far to move each activation channel's scale into
the weights that read it (SmoothQuant, Xiao et al., 2023; cross-layer equalization, Nagel et
al., 2019), numpy only.

Dividing channel k of an activation by s_k and multiplying the weights that read it by s_k
leaves their product as it was and moves quantization difficulty between the two: one channel
that reaches far beyond the others widens the per-tensor activation step for all of them (the
small channels round to zero), and scaling it down widens instead the steps of the weight rows
it feeds (per output channel). The scales come from SmoothQuant's family ``s_k = a_k^α /
w_k^(1-α)`` (``a_k``: the channel's largest magnitude, ``w_k``: the largest weight that reads
it); α, or no scaling at all, is chosen per activation by the consumers' output error
(:func:`output_error`): the activation, sampled, quantized on the range the calibration method
gives the scaled tensor, and the scaled weights rounded per output channel. The scale reaches
every tensor between the op that takes 1/s and the consumers, and each of those that is
quantized (onnxruntime's QLinearConv output before a PReLU, say) counts: its error is taken to
pass on to the consumers' input as it is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from qwt_onnx.numerics import quantization as qm
from qwt_onnx.numerics.ranges import RangeObserver

ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # 0.5 is SmoothQuant's default, 0.75-0.85 its choice for the largest LLMs
FLOOR = 1e-5  # of the largest: magnitudes below it (dead channels) are taken as it

RangeOf = Callable[[RangeObserver], tuple[float, float]]  # a calibration method


@dataclasses.dataclass(frozen=True)
class QuantizedActivation:
    """An activation that carries the scales and is quantized per tensor: per channel its
    smallest and largest value over all calibration samples, and ``sample`` [rows, channels]
    of its values."""

    low: np.ndarray
    high: np.ndarray
    sample: np.ndarray

    @property
    def magnitude(self) -> np.ndarray:
        return np.maximum(np.abs(self.low), np.abs(self.high)).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class ConsumerWeight:
    """A weight that reads the activation: ``weight`` [output channels, inputs read, taps],
    ``channel`` [output channels, inputs read], the activation channel each input is, and
    ``paired``: whether its kernel adds products in int16 pairs (see :mod:`saturation`)."""

    weight: np.ndarray
    channel: np.ndarray
    paired: bool = False


@dataclasses.dataclass(frozen=True)
class Equalization:
    """The scales chosen for one activation (all ones where none helps), the α they came from
    and the expected output error's reduction over no scaling, in dB."""

    scales: np.ndarray
    alpha: float | None
    gain_db: float

    @property
    def scaled(self) -> bool:
        return self.alpha is not None


def smoothing_scales(activations: list[QuantizedActivation], consumers: list[ConsumerWeight], alpha: float) -> np.ndarray:
    """SmoothQuant's ``a_k^α / w_k^(1-α)``, ``a_k`` the largest magnitude of channel k on any of
    the ``activations``, normalized to a geometric mean of 1."""
    magnitude = np.max([a.magnitude for a in activations], axis=0)
    weight = np.zeros_like(magnitude)
    for c in consumers:
        peaks = np.abs(c.weight).max(axis=2)
        np.maximum.at(weight, c.channel.ravel(), peaks.ravel())
    magnitude, weight = _floored(magnitude), _floored(weight)
    log_scales = alpha * np.log(magnitude) - (1.0 - alpha) * np.log(weight)
    return np.exp(log_scales - log_scales.mean())


def output_error(
    scales: np.ndarray, activations: list[QuantizedActivation], input_power: np.ndarray, consumers: list[ConsumerWeight],
    range_of: RangeOf, weight_bits: int = 8, activation_bits: int = 8, symmetric: bool = False, portable: bool = False,
) -> float:
    """The consumers' squared output error per output position, summed over output channels,
    with the ``activations`` divided by ``scales`` and the weights multiplied by them: each
    activation's mean squared quantization error per channel, from its sample on the range
    ``range_of`` gives it (clipping included), through the squared scaled weights, plus each
    scaled weight's rounding error (per output channel, pair-safe where ``portable``) times the
    mean square of its input (``input_power`` per channel, unscaled). Errors are taken as
    uncorrelated across inputs, and an activation's before the consumers' input as passed on to
    it unchanged."""
    activation_error = np.zeros(scales.shape)
    for activation in activations:
        activation_error += _quantization_error(activation, scales, range_of, activation_bits, symmetric)
    input_power = input_power / np.square(scales)
    error = 0.0
    for c in consumers:
        weight = (c.weight * scales[c.channel][:, :, None]).astype(np.float32)
        params = qm.symmetric_weight_params(weight, 0, portable and c.paired, weight_bits)  # [N, K, T]: pairs as the kernels add them
        rounded = qm.fake_quantize(weight, params, axis=0)
        error += float((activation_error[c.channel][:, :, None] * np.square(weight)).sum())
        error += float((input_power[c.channel][:, :, None] * np.square(rounded - weight)).sum())
    return error


def _quantization_error(tensor: QuantizedActivation, scales: np.ndarray, range_of: RangeOf, bits: int, symmetric: bool) -> np.ndarray:
    """The mean squared error per channel of quantizing the sampled tensor divided by ``scales``
    per tensor, on the range ``range_of`` gives it."""
    scaled = tensor.sample / scales
    observer = RangeObserver()
    observer.update(np.concatenate([scaled.ravel(), tensor.low / scales, tensor.high / scales]))  # the extremes: exact min-max
    params = qm.activation_params(*range_of(observer), symmetric, bits)
    return np.square(qm.fake_quantize(scaled, params) - scaled).mean(axis=0)


def equalize(
    activations: list[QuantizedActivation], input_power: np.ndarray, consumers: list[ConsumerWeight], range_of: RangeOf,
    weight_bits: int = 8, activation_bits: int = 8, symmetric: bool = False, portable: bool = False,
    alphas: tuple[float, ...] = ALPHAS,
) -> Equalization:
    """The α of :data:`ALPHAS` whose scales have the least :func:`output_error`, or no scaling
    where none has less than the activations as they are."""
    error_of = dict(activations=activations, input_power=input_power, consumers=consumers, range_of=range_of, weight_bits=weight_bits,
                    activation_bits=activation_bits, symmetric=symmetric, portable=portable)
    unscaled = np.ones_like(input_power, dtype=np.float64)
    best = Equalization(unscaled, None, 0.0)
    baseline = least = output_error(unscaled, **error_of)
    for alpha in alphas:
        scales = smoothing_scales(activations, consumers, alpha)
        error = output_error(scales, **error_of)
        if math.isfinite(error) and error < least:
            least, best = error, Equalization(scales, alpha, 10.0 * math.log10(baseline / error))
    return best


def _floored(magnitude: np.ndarray) -> np.ndarray:
    top = float(magnitude.max()) if magnitude.size else 0.0
    return np.maximum(magnitude, FLOOR * top if top > 0 else 1.0)

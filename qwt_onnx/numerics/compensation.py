"""How a compensation branch maps a block's input tensor to its output (numpy only).

Tokens ``[..., D_in] -> [..., D_out]``: one ``D_in × D_out`` matrix applied to
every token. Feature maps ``[N, C_in, *S] -> [N, C_out, *S']``: a ``k×k``
convolution (1×1 by default) padded to keep the size, with stride ``s`` when
the block shrinks the spatial size (``S' = ceil(S / s)``, ``s`` per axis where the
block shrinks one axis only, as text recognisers do). Where the block's own
convolutions are unpadded ("valid", as Keras and TensorFlow export them:
``S' = floor((S - k) / s) + 1``), the input is first cropped by the ``k - 1``
border pixels, so that each output pixel reads the pixel at the centre of the
block's window; on the axes that shrink so only, where a block pads one axis and
not the other (a TensorFlow export's valid convolution in time, same in frequency). Optionally grouped: ``groups`` independent maps from ``C_in / groups`` input channels to
``C_out / groups`` output channels. Either way the solver sees one row per
token or per output pixel, sample-major, its features ordered as the
convolution's weight ``[C_out, C_in / groups, k, k]`` flattens them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwt_onnx.numerics import quantization as qm
from qwt_onnx.numerics import saturation
from qwt_onnx.numerics.solver import LinearMap, NormalEquations


@dataclasses.dataclass(frozen=True)
class Layout:
    channels_first: bool  # features on axis 1 (feature maps) rather than the last axis
    matrix: bool = False  # tokens that are the rows of a 2-D tensor (a dense layer's input and output)
    stride: int | tuple[int, ...] = 1  # feature maps: one for every spatial axis, or one per axis
    spatial_rank: int = 0
    kernel: int = 1  # odd; feature maps only
    groups: int = 1  # feature maps only
    # feature maps: border pixels dropped before and after, on every spatial axis or per axis
    crop: tuple[int, int] | tuple[tuple[int, int], ...] = (0, 0)

    @property
    def strides(self) -> tuple[int, ...]:
        return self.stride if isinstance(self.stride, tuple) else (self.stride,) * self.spatial_rank

    @property
    def crops(self) -> tuple[tuple[int, int], ...]:
        """``(before, after)`` per spatial axis."""
        return self.crop if isinstance(self.crop[0], tuple) else (self.crop,) * self.spatial_rank

    @property
    def cropping(self) -> bool:
        return any(before or after for before, after in self.crops)

    def output_shape(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """The block output's spatial sizes: the input's, cropped and strided."""
        return tuple(-(-(size - sum(crop)) // stride) for size, crop, stride in zip(spatial, self.crops, self.strides))

    def _strided(self, x: np.ndarray) -> np.ndarray:
        """Every stride-th pixel of a feature map (a view)."""
        return x[(slice(None), slice(None)) + tuple(slice(None, None, stride) for stride in self.strides)]

    @property
    def feature_axis(self) -> int:
        return 1 if self.channels_first else -1

    @property
    def taps(self) -> int:
        """Input features per input channel: the kernel's spatial size."""
        return self.kernel**self.spatial_rank if self.channels_first else 1

    def rows(self, x: np.ndarray) -> np.ndarray:
        """Block input ``x`` as rows of features, one per token or output pixel."""
        if not self.channels_first:
            return x.reshape(-1, x.shape[-1])
        x = self.cropped(x)
        if self.kernel > 1:
            return self._patches(x)
        return self.target_rows(self._strided(x))

    def columns(self, x: np.ndarray) -> np.ndarray:
        """Feature map ``x`` as ``[N, C, pixels]``, the cropped and strided pixels that a 1×1
        branch reads: features-first already, so no transposed copy is made."""
        x = self._strided(self.cropped(x))
        return x.reshape(*x.shape[:2], -1)

    def cropped(self, x: np.ndarray) -> np.ndarray:
        """A feature map without its cropped border (a view)."""
        if not self.cropping:
            return x
        return x[(slice(None), slice(None)) + tuple(slice(before, size - after) for size, (before, after) in zip(x.shape[2:], self.crops))]

    def _patches(self, x: np.ndarray) -> np.ndarray:
        """``[rows, C·k^r]``: the zero-padded k×k neighbourhood of every (strided) pixel."""
        rank, pad = self.spatial_rank, self.kernel // 2
        padded = np.pad(x, [(0, 0), (0, 0)] + [(pad, pad)] * rank)
        axes = tuple(range(2, 2 + rank))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (self.kernel,) * rank, axis=axes)
        windows = self._strided(windows)
        # [N, C, *S', *k] -> [N, *S', C, *k] -> rows
        order = (0, *range(2, 2 + rank), 1, *range(2 + rank, 2 + 2 * rank))
        return np.ascontiguousarray(windows.transpose(order)).reshape(-1, x.shape[1] * self.taps)

    def target_rows(self, y: np.ndarray) -> np.ndarray:
        """Block output ``y`` as rows, in the same order as :meth:`rows` of the input."""
        if not self.channels_first:
            return y.reshape(-1, y.shape[-1])
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])

    def accumulate(self, groups: list[NormalEquations], x: np.ndarray, residual: np.ndarray) -> None:
        """Add block input ``x`` and the ``residual`` (shaped like the block output) to the normal
        equations of each group."""
        slices = self.group_slices(groups[0].n_features * len(groups), residual.shape[self.feature_axis])
        if self.channels_first and self.kernel == 1:
            x_cols = self.columns(x)
            r_cols = residual.reshape(*residual.shape[:2], -1)
            for equations, (f, t) in zip(groups, slices):
                equations.update_columns(x_cols[:, f], r_cols[:, t])
            return
        x_rows, r_rows = self.rows(x), self.target_rows(residual)
        for equations, (f, t) in zip(groups, slices):
            equations.update(x_rows[:, f], r_rows[:, t])

    def group_slices(self, n_features: int, n_targets: int) -> list[tuple[slice, slice]]:
        """``(features, targets)`` of each group: contiguous, equal parts."""
        f, t = n_features // self.groups, n_targets // self.groups
        return [(slice(i * f, (i + 1) * f), slice(i * t, (i + 1) * t)) for i in range(self.groups)]

    @property
    def op_weight_axis(self) -> int:
        """The output-channel axis of :meth:`op_weight`: a Conv's 0, a MatMul's 1."""
        return 0 if self.channels_first else 1

    def op_weight(self, weight: np.ndarray) -> np.ndarray:
        """The spliced op's weight for a ``[d_in, d_out]`` map: as is for a MatMul; for a Conv the
        ``[C_out, C_in / groups, k, ...]`` kernel of its block-diagonal groups."""
        if not self.channels_first:
            return weight
        blocks = [weight[f, t].T for f, t in self.group_slices(*weight.shape)]
        return np.concatenate(blocks).reshape(weight.shape[1], -1, *([self.kernel] * self.spatial_rank))

    def map_of(self, op_weight: np.ndarray) -> np.ndarray:
        """The ``[d_in, d_out]`` map of a spliced op's weight: the inverse of :meth:`op_weight`."""
        if not self.channels_first:
            return op_weight
        c_out, per_group = op_weight.shape[0], op_weight[0].size
        weight = np.zeros((per_group * self.groups, c_out), op_weight.dtype)
        flat = op_weight.reshape(c_out, per_group)
        for f, t in self.group_slices(*weight.shape):
            weight[f, t] = flat[t].T
        return weight

    def int8_rounded(self, weight: np.ndarray, pair_safe: bool) -> tuple[np.ndarray, np.ndarray]:
        """The map with its op's weight rounded to int8 per output channel (pair-safe where the
        op's kernel pairs products), and the scales, so that the map is exactly what will run."""
        op_weight = self.op_weight(weight)
        pair_safe = pair_safe and saturation.kernel_pairs_products(op_weight.shape, self.groups)
        rounded, params = qm.fake_quantize_weight(op_weight, self.op_weight_axis, pair_safe)
        return self.map_of(rounded), params.scale

    def apply(self, fit: LinearMap, x: np.ndarray) -> np.ndarray:
        """The branch output ``c(x)`` in float32, as the spliced branch computes it, shaped like the block output."""
        weight = fit.weight.astype(np.float32)
        if self.channels_first and self.kernel == 1:  # written channels-first, as the block output is
            cols = self.columns(x).astype(np.float32, copy=False)
            out = np.empty((x.shape[0], weight.shape[1], cols.shape[2]), np.float32)
            for features, targets in self.group_slices(*weight.shape):
                np.matmul(weight[features, targets].T, cols[:, features], out=out[:, targets])
            out += fit.bias.astype(np.float32)[:, None]
            return out.reshape(x.shape[0], weight.shape[1], *self.output_shape(x.shape[2:]))
        rows = self.rows(x).astype(np.float32, copy=False)
        out = np.empty((rows.shape[0], weight.shape[1]), np.float32)
        for features, targets in self.group_slices(*weight.shape):  # block-diagonal: one product per group
            np.matmul(rows[:, features], weight[features, targets], out=out[:, targets])
        out += fit.bias.astype(np.float32)
        if not self.channels_first:
            return out.reshape(*x.shape[:-1], out.shape[-1])
        spatial = self.output_shape(x.shape[2:])
        return np.moveaxis(out.reshape(x.shape[0], *spatial, out.shape[-1]), -1, 1)


def infer_layout(
    x_shape: tuple[int, ...],
    y_shape: tuple[int, ...],
    channels_first: bool,
    kernel: int = 1,
    groups_factor: int = 0,
) -> Layout | None:
    """The layout mapping block input ``x_shape`` to output ``y_shape``, None if no linear branch fits.

    Feature maps get a ``kernel``-sized convolution with ``C_in // groups_factor``
    groups, reduced to the nearest count that divides both channel counts
    (``groups_factor`` 0: one group).
    """
    if len(x_shape) != len(y_shape) or len(x_shape) < 2 or x_shape[0] != y_shape[0]:
        return None
    if len(x_shape) == 2:
        return Layout(channels_first=False, matrix=True)
    if not channels_first:
        if x_shape[:-1] == y_shape[:-1]:
            return Layout(channels_first=False)
        if len(x_shape) < 4 or x_shape[2:] != y_shape[2:]:
            return None
        # Feature maps in and out of a block that is not convolutional (an SVTR mixer between
        # Reshapes, say): the branch maps the channels at each pixel, a 1×1 convolution. Not
        # for [N, T, D]: there axis 1 holds tokens, which a branch must not mix.
        kernel = 1
    spatial_in, spatial_out = x_shape[2:], y_shape[2:]
    if min(spatial_out) <= 0:
        return None
    if max(spatial_out) == 1 < max(spatial_in) and max(spatial_in) > MAX_VALID_STRIDE:
        return None  # global pooling: no strided pixel stands for the mean (a stride-2 conv from 2 to 1 is no pool)
    groups = _groups(x_shape[1], y_shape[1], groups_factor)
    same = Layout(channels_first=True, spatial_rank=len(spatial_in), kernel=kernel, groups=groups)
    # Padded, or else an unpadded k×k window: the smallest window, odd ones (convolutions) before
    # even ones (pools), which the sizes alone cannot tell apart; per axis the stride nearest the
    # size ratio (7 -> 3 is a 3×3 window every 2 pixels, not a 5×5 one every pixel). The same
    # window on every axis where one fits them all; else one per axis (a block padded on one
    # axis only).
    windows = sorted(range(2, MAX_VALID_WINDOW + 1), key=lambda k: (k % 2 == 0, k))
    crops = [(0, 0)] + [((k - 1) // 2, k // 2) for k in windows]
    for crop in crops:
        strides = [_stride(a - sum(crop), b, padded=crop == (0, 0)) for a, b in zip(spatial_in, spatial_out)]
        if None not in strides:
            return dataclasses.replace(same, stride=_one_or_each(strides), crop=crop)
    per_axis = [next(((c, s) for c in crops if (s := _stride(a - sum(c), b, padded=c == (0, 0)))), None)
                for a, b in zip(spatial_in, spatial_out)]
    if None in per_axis:
        return None
    return dataclasses.replace(same, stride=_one_or_each([s for _, s in per_axis]), crop=tuple(c for c, _ in per_axis))


def _one_or_each(values: list[int]) -> int | tuple[int, ...]:
    return values[0] if len(set(values)) == 1 else tuple(values)


def _stride(size: int, target: int, padded: bool) -> int | None:
    """The stride that takes ``size`` pixels to ``target`` (ceil(size / s)): a padded block's is
    the size ratio (a ViT's 16×16 patches: 16); an unpadded window's the one of 1 to
    MAX_VALID_STRIDE nearest the ratio."""
    if target < 1 or size < target:
        return None
    ratio = size / target
    candidates = [max(1, round(ratio))] if padded else sorted(range(1, MAX_VALID_STRIDE + 1), key=lambda s: abs(s - ratio))
    return next((s for s in candidates if -(-size // s) == target), None)


MAX_VALID_WINDOW, MAX_VALID_STRIDE = 7, 4  # the unpadded block windows a branch is aligned to


def _groups(c_in: int, c_out: int, groups_factor: int) -> int:
    if groups_factor <= 0:
        return 1
    groups = max(1, c_in // groups_factor)
    while c_in % groups or c_out % groups:
        groups -= 1
    return groups

"""How a compensation branch maps a block's input tensor to its output (numpy only).

Tokens ``[..., D_in] -> [..., D_out]``: one ``D_in × D_out`` matrix applied to
every token. Feature maps ``[N, C_in, *S] -> [N, C_out, *S']``: a 1×1
convolution, with stride ``s`` when the block shrinks the spatial size
(``S' = ceil(S / s)``). Either way the solver sees one row per token or per
output pixel, sample-major.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from qwt_onnx.solver import LinearMap


@dataclasses.dataclass(frozen=True)
class Layout:
    channels_first: bool  # features on axis 1 (feature maps) rather than the last axis
    stride: int = 1
    spatial_rank: int = 0

    @property
    def feature_axis(self) -> int:
        return 1 if self.channels_first else -1

    def rows(self, x: np.ndarray) -> np.ndarray:
        """Block input ``x`` as rows of features, one per token or (strided) pixel."""
        if self.channels_first and self.stride > 1:
            x = x[(slice(None), slice(None)) + (slice(None, None, self.stride),) * self.spatial_rank]
        return self.target_rows(x)

    def target_rows(self, y: np.ndarray) -> np.ndarray:
        """Block output ``y`` as rows, in the same order as :meth:`rows` of the input."""
        if not self.channels_first:
            return y.reshape(-1, y.shape[-1])
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])

    def apply(self, fit: LinearMap, x: np.ndarray) -> np.ndarray:
        """The branch output ``c(x)`` in float32, as the spliced branch computes it, shaped like the block output."""
        rows = self.rows(x).astype(np.float32, copy=False)
        out = rows @ fit.weight.astype(np.float32) + fit.bias.astype(np.float32)
        if not self.channels_first:
            return out.reshape(*x.shape[:-1], out.shape[-1])
        spatial = [math.ceil(d / self.stride) for d in x.shape[2:]]
        return np.moveaxis(out.reshape(x.shape[0], *spatial, out.shape[-1]), -1, 1)


def infer_layout(x_shape: tuple[int, ...], y_shape: tuple[int, ...], channels_first: bool) -> Layout | None:
    """The layout mapping block input ``x_shape`` to output ``y_shape``, None if no linear branch fits."""
    if len(x_shape) != len(y_shape) or len(x_shape) < 2 or x_shape[0] != y_shape[0]:
        return None
    if len(x_shape) == 2:
        return Layout(channels_first=False)
    if not channels_first:
        return Layout(channels_first=False) if x_shape[:-1] == y_shape[:-1] else None
    spatial_in, spatial_out = x_shape[2:], y_shape[2:]
    if min(spatial_out) <= 0:
        return None
    stride = max(1, round(spatial_in[0] / spatial_out[0]))
    if all(math.ceil(a / stride) == b for a, b in zip(spatial_in, spatial_out)):
        return Layout(channels_first=True, stride=stride, spatial_rank=len(spatial_in))
    return None

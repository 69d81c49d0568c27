"""The second moments ``X Xᵀ`` of what a weighted op multiplies its weight by, streamed (numpy only).

A MatMul or Gemm multiplies each row of its input by the weight: those rows are ``X``. A
convolution multiplies each patch of its input (one per output position, ``C_in / g · prod(k)``
values per group, zero padding included): the patches are ``X``, one set per group. Rows are
sampled (a fixed number per batch, seeded) so that the cost stays flat in the feature map's
size; the moments need many more rows than inputs, not every position.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from qwt_onnx.numerics.solver import without_subnormals

# Rows sampled per op over all samples: the moments' relative error goes as sqrt(inputs / rows),
# and this is 14 times the inputs of a 3x3 convolution over 256 channels. Fewer for small ops
# cost little time and lost fidelity (16 rows per input: PP-OCRv6 rec W8A8 0.36 dB less gain).
ROWS = 32768


@dataclasses.dataclass(frozen=True)
class InputGeometry:
    """How a weighted op reads its input: a dense op's rows, or a convolution's patches."""

    kernel: tuple[int, ...] = ()  # () for MatMul / Gemm
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # begins then ends, as ONNX writes them
    dilations: tuple[int, ...] = ()
    group: int = 1
    auto_pad: str = "NOTSET"
    transposed: bool = False  # Gemm with transA: the input is [K, M]

    @property
    def is_convolution(self) -> bool:
        return bool(self.kernel)


def input_rows(x: np.ndarray, geometry: InputGeometry, count: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``count`` rows of what the op multiplies its weight by, ``[groups, rows, inputs]``,
    drawn without replacement (float32; a convolution's a transposed view of ``[groups, inputs, rows]``)."""
    if not geometry.is_convolution:
        rows = (x.T if geometry.transposed else x).reshape(-1, x.shape[0] if geometry.transposed else x.shape[-1])
        picked = rng.choice(rows.shape[0], min(count, rows.shape[0]), replace=False) if rows.shape[0] > count else slice(None)
        return np.asarray(rows[picked], np.float32)[None]
    return _patches(x, geometry, count, rng)


def _patches(x: np.ndarray, geometry: InputGeometry, count: int, rng: np.random.Generator) -> np.ndarray:
    spatial = x.shape[2:]
    rank = len(spatial)
    strides = geometry.strides or (1,) * rank
    dilations = geometry.dilations or (1,) * rank
    begins, outputs = _begins_and_outputs(spatial, geometry.kernel, strides, dilations, geometry.pads, geometry.auto_pad)
    positions = x.shape[0] * math.prod(outputs)
    picked = rng.choice(positions, min(count, positions), replace=False) if positions > count else np.arange(positions)
    sample, *out = np.unravel_index(picked, (x.shape[0], *outputs))
    offsets = np.unravel_index(np.arange(math.prod(geometry.kernel)), geometry.kernel)  # kernel positions, C order
    flat, inside = sample[None, :], np.ones((len(offsets[0]), picked.size), bool)  # [P, R]: where each patch entry is read
    for axis in range(rank):
        at = offsets[axis][:, None] * dilations[axis] + out[axis][None] * strides[axis] - begins[axis]
        inside &= (at >= 0) & (at < spatial[axis])
        flat = flat * spatial[axis] + np.clip(at, 0, spatial[axis] - 1)
    # Gathered channel-major, [C, P, R], each group's rows are one contiguous [C/g · P, R] block whose
    # product with its transpose BLAS computes at full speed; row-major [R, P, C] patches, transposed
    # into the weight's order, took numpy's strided loop, eight times slower on a depthwise convolution.
    if x.size <= x.shape[1] * flat.size:  # the whole batch channel-major is no larger than the patches
        channels = np.ascontiguousarray(np.moveaxis(x, 1, 0), dtype=np.float32).reshape(x.shape[1], -1)
        values = np.take(channels, flat, axis=1)
    else:  # a large feature map: only the entries read, by their index in x
        size = math.prod(spatial)
        sample_start = (flat // size) * (x.shape[1] * size) + flat % size
        values = np.take(x.reshape(-1), np.arange(x.shape[1])[:, None, None] * size + sample_start).astype(np.float32, copy=False)
    values *= inside
    per_group = x.shape[1] // geometry.group  # each row ordered like the weight's [C_in / g, *k]
    return values.reshape(geometry.group, per_group * flat.shape[0], picked.size).transpose(0, 2, 1)


def _begins_and_outputs(spatial, kernel, strides, dilations, pads, auto_pad) -> tuple[list[int], list[int]]:
    """Each spatial axis's padding at the beginning and output size, with ONNX's auto_pad rules."""
    rank = len(spatial)
    begins, outputs = [], []
    for axis in range(rank):
        extent = dilations[axis] * (kernel[axis] - 1) + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            size = -(-spatial[axis] // strides[axis])
            total = max(0, (size - 1) * strides[axis] + extent - spatial[axis])
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        else:
            begin, end = (0, 0) if auto_pad == "VALID" or not pads else (pads[axis], pads[axis + rank])
            size = (spatial[axis] + begin + end - extent) // strides[axis] + 1
        begins.append(begin)
        outputs.append(size)
    return begins, outputs


@dataclasses.dataclass
class SecondMoments:
    """Streaming ``Σ x xᵀ`` and ``Σ x`` of an op's input rows, per group (float32: a sum of a few
    dozen batches' products, far more exact than the rows sampled)."""

    geometry: InputGeometry
    batches: int  # the updates to come: each samples its share of the rows
    seed: int = 0
    products: np.ndarray | None = None  # [G, d, d], float32
    sums: np.ndarray | None = None  # [G, d]
    count: int = 0
    _rng: np.random.Generator | None = None

    def update(self, x: np.ndarray) -> None:
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        rows = input_rows(x, self.geometry, -(-ROWS // max(self.batches, 1)), self._rng)
        columns = without_subnormals(rows.transpose(0, 2, 1))  # [G, d, R]: BLAS takes it and its transpose as they are
        products = np.matmul(columns, columns.transpose(0, 2, 1))
        sums = columns.sum(axis=2, dtype=np.float64)
        self.products = products if self.products is None else self.products + products
        self.sums = sums if self.sums is None else self.sums + sums
        self.count += columns.shape[2]

    def rescaled(self, scales: np.ndarray) -> SecondMoments:
        """The moments of the same rows with input channel k divided by ``scales[k]`` (rows
        ordered like the weight's ``[C_in / g, *k]``: a patch entry's channel is its index over
        ``prod(k)``, offset by its group's channels)."""
        taps = math.prod(self.geometry.kernel)
        groups, width = self.sums.shape
        channel = np.arange(groups)[:, None] * (width // taps) + np.arange(width)[None, :] // taps
        factor = 1.0 / np.asarray(scales, dtype=np.float64)[channel]  # [G, d]
        products = (self.products * (factor[:, :, None] * factor[:, None, :])).astype(self.products.dtype)
        return dataclasses.replace(self, products=products, sums=self.sums * factor)

    def hessian(self, centered: bool) -> np.ndarray:
        """``E[x xᵀ]``, or with ``centered`` the covariance ``E[(x − μ)(x − μ)ᵀ]``: what is left of
        the output error once bias correction has removed its mean."""
        count = max(self.count, 1)
        moments = self.products.astype(np.float64) / count
        if centered:
            mean = self.sums / count
            moments = moments - mean[:, :, None] * mean[:, None, :]
        return moments

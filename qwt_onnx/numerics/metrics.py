"""Fidelity of a model's outputs to the FP32 reference (numpy only)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class SampleEnergies:
    """One output's ``Σ ref²`` and ``Σ (ref − test)²`` per scored sample."""

    signal: np.ndarray
    noise: np.ndarray


@dataclasses.dataclass(frozen=True)
class Score:
    """Held-out SQNR to FP32 of each float output; a model counts as good as its worst chosen
    output, so that no output gets worse unseen (a detector's scores beside its boxes)."""

    outputs_db: dict[str, float]
    chosen: tuple[str, ...] = ()  # every output where empty
    # Per scored sample, where known: what the interval of a difference between two scores is drawn from.
    energies: dict[str, SampleEnergies] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def db(self) -> float:
        scores = self._decisive(self.outputs_db).values()
        return min(scores) if scores else float("inf")

    def _decisive(self, per_output: dict) -> dict:
        return {name: v for name, v in per_output.items() if not self.chosen or name in self.chosen}


def where_they_differ(new: Score, old: Score) -> tuple[Score, Score]:
    """``new`` and ``old`` judged on the chosen outputs where they differ: an output that is the
    same in both (no branch reaches it) cannot have got worse, and as the worst of both it would
    hide what changed elsewhere (a decoder's recurrent state beside its log-probabilities). Both
    as they are where they differ on every chosen output, or on none."""
    decisive = [name for name in new._decisive(new.outputs_db) if name in old.outputs_db]
    differing = tuple(name for name in decisive if not _same_output(new, old, name))
    if not differing or len(differing) == len(decisive):
        return new, old
    return dataclasses.replace(new, chosen=differing), dataclasses.replace(old, chosen=differing)


def _same_output(a: Score, b: Score, name: str) -> bool:
    if name in a.energies and name in b.energies:
        return np.array_equal(a.energies[name].noise, b.energies[name].noise)
    return a.outputs_db[name] == b.outputs_db[name]


def score(reference: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray], chosen: tuple[str, ...] = ()) -> Score:
    """The :class:`Score` of ``test`` (samples on axis 0, as in ``reference``), with its per-sample
    energies; a chosen part of an output (:func:`parts`) is scored beside the whole."""
    return score_of([sample_energies(reference, test, chosen)], chosen)


def sample_energies(reference: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray],
                    chosen: tuple[str, ...] = ()) -> dict[str, SampleEnergies]:
    """Each float output's (and chosen part's) energies per sample of ``test`` against ``reference``."""
    labels = (*reference, *chosen)
    reference, test = parts(reference, labels), parts(test, labels)
    return {name: _sample_energies(ref, test[name]) for name, ref in float_outputs(reference)}


def score_of(batches: Sequence[Mapping[str, SampleEnergies]], chosen: tuple[str, ...] = ()) -> Score:
    """The :class:`Score` of the samples of ``batches`` (:func:`sample_energies` of each) together."""
    energies = {name: _joined([b[name] for b in batches]) for name in batches[0]}
    outputs_db = {name: _db(e.signal.sum(), e.noise.sum()) for name, e in energies.items() if e.signal.sum() > 0}
    return Score(outputs_db, chosen, {name: energies[name] for name in outputs_db})


def _joined(parts: Sequence[SampleEnergies]) -> SampleEnergies:
    return SampleEnergies(np.concatenate([p.signal for p in parts]), np.concatenate([p.noise for p in parts]))


def db_gain(new: float, old: float) -> float:
    """``new - old`` in dB; 0 where they are equal, as two exact outputs are (inf - inf)."""
    return 0.0 if new == old else new - old


def gain_interval(new: Score, old: Score, confidence: float = 0.95, resamples: int = 2000) -> tuple[float, float] | None:
    """Paired bootstrap interval of ``new.db − old.db``: the scored samples are drawn with
    replacement, the same draw for both models, so what is measured is how much the gain depends
    on which samples happened to be held out. None where either score lacks per-sample energies.

    Output errors are heavy-tailed (a handful of samples near a softmax's decision boundary can
    carry most of the error), so gains of a few tenths of a dB on a hundred samples are often
    noise; this says how much."""
    paired = _bootstrap_db(new, old, resamples)
    if paired is None:
        return None
    _, new_db, old_db = paired
    with np.errstate(invalid="ignore"):
        gains = np.min(new_db, axis=0) - np.min(old_db, axis=0)
    return _interval(gains, confidence) if np.all(np.isfinite(gains)) else None


def output_gain_intervals(new: Score, old: Score, confidence: float = 0.95,
                          resamples: int = 2000) -> dict[str, tuple[float, float]]:
    """:func:`gain_interval` of each chosen output on its own: whether one that is not the worst
    got worse beyond noise (a detector's boxes, while its objectness gains)."""
    paired = _bootstrap_db(new, old, resamples)
    if paired is None:
        return {}
    names, new_db, old_db = paired
    with np.errstate(invalid="ignore"):
        gains = new_db - old_db
    return {name: _interval(gains[k], confidence) for k, name in enumerate(names) if np.all(np.isfinite(gains[k]))}


def outputs_worse(new: Score, old: Score) -> dict[str, tuple[float, float]]:
    """The chosen outputs that ``new`` makes worse than ``old`` beyond noise (the upper end of
    their gain's 95% interval below zero), with those intervals."""
    return {name: (low, high) for name, (low, high) in output_gain_intervals(new, old).items() if high < 0.0}


def _bootstrap_db(new: Score, old: Score, resamples: int) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """The chosen outputs both scores have, and per output (rows) and bootstrap draw (columns)
    the dB of ``new`` and of ``old`` on the same draws; None where they cannot be paired."""
    names = sorted(set(new._decisive(new.energies)) & set(old._decisive(old.energies)))
    if not names:
        return None
    count = new.energies[names[0]].signal.size
    if any(s.energies[n].signal.size != count for s in (new, old) for n in names):
        return None
    draws = np.random.default_rng(0).integers(0, count, size=(resamples, count))

    def per_output_db(s: Score) -> np.ndarray:
        rows = []
        for name in names:
            e = s.energies[name]
            signal, noise = e.signal[draws].sum(axis=1), e.noise[draws].sum(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                rows.append(10.0 * np.log10(signal / noise))
        return np.array(rows)

    return names, per_output_db(new), per_output_db(old)


def _interval(gains: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(gains, [tail, 100.0 - tail])
    return float(low), float(high)


def sqnr_db(reference: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray]) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(‖ref‖² / ‖ref − test‖²)``, pooled over float outputs."""
    signal = noise = 0.0
    for name, ref in float_outputs(reference):
        ref, out = aligned(ref, test[name])
        y = _flat(ref)
        signal += _squared_distance(y)
        noise += _squared_distance(y, _flat(out))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")


def sqnr_db_per_output(reference: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Each float output's own SQNR (an output whose reference is all zeros has none)."""
    return sqnr_db_over_batches([(reference, test)])


def sqnr_db_over_batches(batches: Iterable[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]) -> dict[str, float]:
    """:func:`sqnr_db_per_output` over ``(reference, test)`` batches, without keeping them."""
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    for reference, test in batches:
        for name, ref in float_outputs(reference):
            ref, out = aligned(ref, test[name])
            y = _flat(ref)
            signal[name] = signal.get(name, 0.0) + _squared_distance(y)
            noise[name] = noise.get(name, 0.0) + _squared_distance(y, _flat(out))
    return {name: _db(total, noise[name]) for name, total in signal.items() if total > 0}


def _db(signal: float, noise: float) -> float:
    return 10.0 * float(np.log10(signal / noise)) if noise > 0 else float("inf")


def mean_squared_error(reference: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray]) -> float:
    """Mean squared error over all elements of all float outputs."""
    total = count = 0.0
    for name, ref in float_outputs(reference):
        ref, out = aligned(ref, test[name])
        y = _flat(ref)
        total += _squared_distance(y, _flat(out))
        count += y.size
    return total / max(count, 1)


def part_of(label: str) -> tuple[str, tuple[slice | int, ...] | None]:
    """``NAME[INDEX]`` as the output's name and a numpy basic index (integers and slices, the
    samples' axis first: ``output0[:, 4:]``); a plain name as itself and None."""
    match = re.fullmatch(r"(.+)\[([-\d:, ]*)\]", label)
    if match is None:
        return label, None

    def axis(text: str) -> slice | int:
        bounds = [int(b) if b.strip() else None for b in text.split(":")]
        if len(bounds) == 1 and bounds[0] is not None:
            return bounds[0]
        if len(bounds) in (2, 3) and bounds[2:] != [0]:
            return slice(*bounds)
        raise ValueError(f"{text!r} in {label!r} is neither an integer nor a slice start:stop[:step]")

    index = tuple(axis(text) for text in match.group(2).split(","))
    if index[0] != slice(None):
        raise ValueError(f"{label!r} must keep every sample: begin its index with ':' (the samples' axis)")
    return match.group(1), index


def parts(outputs: Mapping[str, np.ndarray], labels: Iterable[str]) -> dict[str, np.ndarray]:
    """``outputs`` by label: an output's own name, or :func:`part_of` one (a detector's class
    scores beside its boxes in one tensor). Labels of absent outputs are left out."""
    found = {}
    for label in labels:
        name, index = part_of(label)
        if name in outputs:
            found[label] = outputs[name] if index is None else outputs[name][index]
    return found


def float_outputs(reference: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """Outputs that carry values: integer ones (token ids, masks passed through) match trivially."""
    return [(name, ref) for name, ref in reference.items() if np.issubdtype(np.asarray(ref).dtype, np.floating)]


def aligned(reference: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``reference`` and ``test`` zero-padded at the end of each axis to the larger of the two,
    where their shapes differ (a quantized decoder that ran more or fewer steps than the FP32
    one): what one computes and the other does not counts as error against zeros."""
    if reference.shape == test.shape or reference.ndim != test.ndim:
        return reference, test
    shape = np.maximum(reference.shape, test.shape)
    return zero_padded(reference, shape), zero_padded(test, shape)


def zero_padded(array: np.ndarray, shape) -> np.ndarray:
    """``array`` zero-padded at the end of each axis to ``shape`` (no smaller than its own)."""
    return np.pad(array, [(0, int(n) - size) for n, size in zip(shape, array.shape)])


def _sample_energies(reference: np.ndarray, test: np.ndarray) -> SampleEnergies:
    reference, test = aligned(reference, test)
    rows = len(reference)
    ref, out = np.reshape(reference, (rows, -1)), np.reshape(test, (rows, -1))
    signal = np.array([_squared_distance(_flat(ref[i])) for i in range(rows)])
    noise = np.array([_squared_distance(_flat(ref[i]), _flat(out[i])) for i in range(rows)])
    return SampleEnergies(signal, noise)


def _flat(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32).ravel()


def _squared_distance(x: np.ndarray, y: np.ndarray | None = None, chunk: int = 1 << 16) -> float:
    """``Σ (x − y)²`` (``Σ x²`` without ``y``) of float32 vectors: BLAS dot products per chunk,
    summed in float64; the chunks stay in cache, so no output-sized difference is made."""
    total = 0.0
    for i in range(0, x.size, chunk):
        part = x[i : i + chunk] if y is None else x[i : i + chunk] - y[i : i + chunk]
        total += float(np.dot(part, part))
    return total

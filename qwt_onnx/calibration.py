"""Calibration data: load, validate against the model's inputs, split and batch."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import mmap
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from qwt_onnx import progress
from qwt_onnx.errors import InputError, some_names

HELDOUT_EVERY = 5  # every fifth sample is held out to validate the fits
KEY_DIGITS = 12  # significant digits of the moments that tell samples apart (float64 sums differ past them by order)
SCORING_SAMPLES = 256  # held-out samples whose outputs are kept to score whole models
CHECK_ROWS = 64  # samples scanned at a time for NaN / Inf


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What the model expects of one graph input: dtype and shape (None: dynamic), and the axis
    that holds the samples (None: one value fed with every batch, such as a sample rate)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]
    samples_axis: int | None = 0

    def rows(self, array: np.ndarray, indices: np.ndarray | slice) -> np.ndarray:
        return samples_of(array, self.samples_axis, indices)


def samples_of(array: np.ndarray, axis: int | None, indices: np.ndarray | slice) -> np.ndarray:
    """The samples ``indices`` of ``array``, whose samples are on ``axis`` (all of it where None)."""
    if axis is None:
        return array
    if axis == 0:
        return array[indices]
    if isinstance(indices, slice):
        return array[(slice(None),) * axis + (indices,)]
    return np.take(array, indices, axis=axis)


Dims = Sequence[int | str | None]  # a shape: static sizes, names of dynamic ones, None for unnamed dynamic ones


def leading_batch(input_shapes: Sequence[Dims]) -> int | str | None:
    """The batch dimension that leads the model's inputs: the first that starts with a named
    dynamic dimension or a static 1."""
    return next((dims[0] for dims in input_shapes if dims and (isinstance(dims[0], str) or dims[0] == 1)), None)


def samples_axis(dims: Dims, batch: int | str | None) -> int | None:
    """Where a tensor of shape ``dims`` holds its samples, given the :func:`leading_batch`: the
    axis of that name, or where the batch is a static 1 the first axis of size 1 (a recurrent
    state [layers, batch, C] holds them on axis 1); where the batch is not found so, a tensor
    that starts with a static size and has one dynamic dimension holds them there (the same
    state exported with its dimensions unnamed, [2, ?, 128]); else axis 0. None, one value fed
    with every batch, for a scalar (a sample rate) and for a fully static tensor beside a named
    batch (an initial recurrent state [4, 1, 64] that a model with a dynamic batch declares)."""
    if not dims or (isinstance(batch, str) and all(isinstance(d, int) and d > 0 for d in dims)):
        return None
    if batch is not None and any(d == batch for d in dims):
        return list(dims).index(batch)
    dynamic = [axis for axis, d in enumerate(dims) if not (isinstance(d, int) and d > 0)]
    return dynamic[0] if isinstance(dims[0], int) and dims[0] > 1 and len(dynamic) == 1 else 0


@dataclasses.dataclass(frozen=True)
class Batch:
    """Rows ``indices`` of the calibration set, as feeds for onnxruntime."""

    indices: np.ndarray
    feeds: dict[str, np.ndarray]

    @property
    def size(self) -> int:
        return len(self.indices)


class CalibrationSet:
    """Calibration samples, one array per model input with the samples on its samples axis
    (axis 0, or where the model's batch dimension is: a recurrent state's [layers, batch, C])."""

    def __init__(self, arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec]):
        self.arrays = dict(arrays)
        self.specs = list(specs)
        self.num_samples = _validate(self.arrays, self.specs)

    @classmethod
    def load(
        cls, source: str | os.PathLike | Mapping[str, np.ndarray], specs: Sequence[InputSpec], num_samples: int | None = None
    ) -> CalibrationSet:
        """The first ``num_samples`` samples (default: all) of a ``.npz`` (keys are input names), a
        ``.npy`` (single input) or a dict; only those are read and checked for NaN and Inf."""
        return cls(_first(read_arrays(source, specs), num_samples, specs), specs)

    @property
    def unscaled(self) -> list[str]:
        """The float inputs given integer arrays (image bytes, 0..255): fed as they are, which the
        model may not expect."""
        return [spec.name for spec in self.specs
                if np.issubdtype(spec.dtype, np.floating) and self.arrays[spec.name].dtype.kind in "biu"]

    def take(self, num_samples: int) -> CalibrationSet:
        """The first ``num_samples`` samples (all of them if there are fewer)."""
        return CalibrationSet(_first(self.arrays, min(num_samples, self.num_samples), self.specs), self.specs)

    @property
    def heldout_mask(self) -> np.ndarray:
        """Samples held out to validate fits: every fifth, each with the later samples that
        repeat it (:attr:`repeats`), at least one when there are two or more. A held-out mirror
        image of a fitted sample would vouch for choices that only fit the calibration set; and
        a repeat moves no other sample to the other side (where repeats come in runs that leave
        under half of every fifth group held out, every fifth group is)."""
        return self._heldout.copy()

    @functools.cached_property
    def _heldout(self) -> np.ndarray:
        groups = self.repeats
        first = np.unique(groups, return_index=True)[1]  # each group's first sample
        held_groups = first % HELDOUT_EVERY == HELDOUT_EVERY - 1
        if held_groups.sum() < len(first) // HELDOUT_EVERY / 2:
            held_groups = np.arange(len(first)) % HELDOUT_EVERY == HELDOUT_EVERY - 1
        mask = held_groups[groups]
        if not mask.any() and self.num_samples >= 2:
            mask[-1] = True
        return mask

    @functools.cached_property
    def repeats(self) -> np.ndarray:
        """Per sample, its group: samples holding the same values in any arrangement (a
        duplicate, a mirror image, a rotation: data augmentation) share one; groups are numbered
        in order of their first sample, so that the first samples' groups are the whole set's."""
        keys = zip(*(_moments(array, spec.samples_axis, self.num_samples) for array, spec in self._sampled()))
        first: dict[tuple, int] = {}
        return np.array([first.setdefault(key, len(first)) for key in keys], dtype=np.int64)

    def _sampled(self) -> list[tuple[np.ndarray, InputSpec]]:
        return [(self.arrays[spec.name], spec) for spec in self.specs if spec.samples_axis is not None]

    @property
    def scoring_mask(self) -> np.ndarray:
        """The first ``SCORING_SAMPLES`` held-out samples: whole-model outputs are compared on these,
        so the outputs kept in memory do not grow with the calibration set."""
        mask = self.heldout_mask
        mask[np.flatnonzero(mask)[SCORING_SAMPLES:]] = False
        return mask

    def batches(self, batch_size: int, indices: np.ndarray | None = None, description: str | None = None) -> Iterator[Batch]:
        """Feeds of ``batch_size`` samples, in order, optionally restricted to ``indices``; with a
        progress bar where a ``description`` is given."""
        if description is not None:
            yield from progress.bar(self.batches(batch_size, indices), description, self.num_batches(batch_size, indices))
            return
        indices = np.arange(self.num_samples) if indices is None else np.asarray(indices)
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            feeds = {spec.name: np.asarray(spec.rows(self.arrays[spec.name], chunk), dtype=spec.dtype, order="C") for spec in self.specs}
            for array in self.arrays.values():
                _release(array)
            yield Batch(chunk, feeds)

    def num_batches(self, batch_size: int, indices: np.ndarray | None = None) -> int:
        count = self.num_samples if indices is None else len(indices)
        return -(-count // batch_size)


def read_arrays(source: str | os.PathLike | Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` (keys are input names) or a ``.npy`` (single input), memory-mapped
    where stored uncompressed (:func:`_map_file`), or of a dict, keyed by input name."""
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise InputError(f"calibration file {path} does not exist; pass --calib an existing .npz or .npy file")
    try:
        arrays = _map_file(path)
    except _PythonObjects as exc:
        raise InputError(
            f"calibration file {path}: {exc} holds Python objects, as numpy saves samples of different shapes; save "
            "each input's samples as one numeric array, stacked on axis 0 at one shape (resize or pad them to it)"
        ) from None
    except Exception as exc:  # numpy and zipfile raise several types for unreadable files
        raise InputError(f"cannot read calibration file {path} ({exc}); write it with numpy.savez or numpy.save") from None
    if isinstance(arrays, np.ndarray):
        if len(specs) != 1:
            names = ", ".join(s.name for s in specs)
            raise InputError(
                f"{path} holds one array but the model has {len(specs)} inputs ({names}); "
                "save a .npz with one key per input"
            )
        arrays = {specs[0].name: arrays}
    return arrays


def stacks_whole_inputs(arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> bool:
    """Whether every input's array has one axis more than the input: whole inputs stacked on a
    new axis 0, for a model whose inputs hold one sample each (a sequence [T, F] and no batch).
    Where some are stacked so and others not, the calibration data is refused, naming both."""
    stacked = [spec.name for spec in specs
               if isinstance(arrays.get(spec.name), np.ndarray) and arrays[spec.name].ndim == len(spec.shape) + 1]
    if stacked and len(stacked) < len(specs):
        others = [spec.name for spec in specs if spec.name not in stacked]
        raise InputError(
            f"calibration arrays {some_names(stacked)} stack whole inputs on a new axis 0 (one axis more than the model input) "
            f"but {some_names(others)} {'does' if len(others) == 1 else 'do'} not; {_fix_for_stacking(arrays, specs, stacked)}"
        )
    return bool(stacked)


def _fix_for_stacking(arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec], stacked: list[str]) -> str:
    """How to feed arrays where ``stacked`` ones stack whole inputs and the others do not: where
    each stacked one repeats one value (a recurrent model's zero initial state beside its batched
    features), that value once, fed with every batch."""
    if not all(_one_value(arrays[name]) for name in stacked):
        return "stack every input's samples the same way"
    shapes = ", ".join(_format_shape(spec.shape) for spec in specs if spec.name in stacked)
    holds = "holds" if len(stacked) == 1 else "each hold"
    return (f"{some_names(stacked)} {holds} one value for every sample: save that value once, shaped as the model input "
            f"({shapes}), and it is fed with every batch")


def _one_value(stacked: np.ndarray) -> bool:
    """Whether every sample of ``stacked`` (on axis 0) equals the first, read until one does not."""
    return len(stacked) > 0 and all(np.array_equal(stacked[i], stacked[0]) for i in range(1, len(stacked)))


def _moments(array: np.ndarray, axis: int, num_samples: int, chunk: int = 64) -> list[tuple[float, ...]]:
    """Per sample, moments of its values that no rearrangement changes (their sum and sum of
    squares), to :data:`KEY_DIGITS` significant digits."""
    keys = []
    for start in range(0, num_samples, chunk):
        rows = np.moveaxis(samples_of(array, axis, slice(start, start + chunk)), axis, 0)
        rows = rows.reshape(len(rows), -1)
        if not np.issubdtype(rows.dtype, np.floating):
            rows = rows.astype(np.float64)
        moments = np.stack([rows.sum(1, dtype=np.float64), np.square(rows).sum(1, dtype=np.float64)], 1)
        keys.extend(map(tuple, _significant(moments).tolist()))
    return keys


def _significant(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to :data:`KEY_DIGITS` significant digits."""
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log10(np.abs(values)))
    scale = 10.0 ** np.where(np.isfinite(exponent), KEY_DIGITS - 1 - exponent, 0)
    return np.round(values * scale) / scale


def _first(arrays: Mapping[str, np.ndarray], num_samples: int | None, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """The first ``num_samples`` of each array that has its input's samples axis (the rest as given, for validation)."""
    spec_of = {spec.name: spec for spec in specs}
    first = {}
    for name, array in arrays.items():
        spec = spec_of.get(name)
        has_axis = spec is not None and spec.samples_axis is not None and isinstance(array, np.ndarray) and array.ndim > spec.samples_axis
        first[name] = spec.rows(array, slice(None, num_samples)) if has_axis else array
    return first


def _validate(arrays: dict[str, np.ndarray], specs: Sequence[InputSpec]) -> int:
    """Check the arrays against the model's inputs; the number of samples."""
    expected = {spec.name for spec in specs}
    missing = [spec.name for spec in specs if spec.name not in arrays]
    if missing:
        raise InputError(
            f"calibration data has no array for model input(s) {', '.join(missing)}; "
            f"save one array per input under the keys {', '.join(sorted(expected))}"
        )
    extra = sorted(set(arrays) - expected)
    if extra:
        raise InputError(
            f"calibration data has key(s) {', '.join(extra)} that are not model inputs; "
            f"use the keys {', '.join(sorted(expected))}"
        )
    counts = {}
    for spec in specs:
        array = arrays[spec.name]
        _validate_array(spec, array)
        if spec.samples_axis is not None:
            counts[spec.name] = array.shape[spec.samples_axis]
    if not counts:
        raise InputError("every model input is a scalar, so no calibration array holds samples; export the model with a batch axis")
    if len(set(counts.values())) > 1:
        raise InputError(
            f"calibration arrays have different sample counts ({', '.join(f'{k}: {n}' for k, n in counts.items())}); "
            "give every input the same number of samples on its samples axis"
        )
    return next(iter(counts.values()))


def _validate_array(spec: InputSpec, array: np.ndarray) -> None:
    if not isinstance(array, np.ndarray) or array.dtype == object:
        raise InputError(f"calibration array {spec.name!r} is not a numeric array; save plain numpy arrays")
    if array.ndim != len(spec.shape):
        where = "as the value fed with every batch" if spec.samples_axis is None else f"with the samples on axis {spec.samples_axis}"
        raise InputError(
            f"calibration array {spec.name!r} has rank {array.ndim} but the model input has rank {len(spec.shape)} "
            f"(shape {_format_shape(spec.shape)}); save an array of that shape {where}"
        )
    if spec.samples_axis is not None and array.shape[spec.samples_axis] == 0:
        raise InputError(f"calibration array {spec.name!r} is empty; give at least one sample")
    for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
        if axis != spec.samples_axis and want is not None and got != want:
            fix = _fix_for_shape(array.shape, spec)
            raise InputError(
                f"calibration array {spec.name!r} has shape {array.shape} but the model input is "
                f"{_format_shape(spec.shape)} (axis {axis}); {fix}"
            )
    if array.dtype != spec.dtype:
        if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
            raise InputError(
                f"calibration array {spec.name!r} has dtype {array.dtype} but the model input is {spec.dtype}; convert it"
            )
    if np.issubdtype(array.dtype, np.floating):
        chunks = (array[start : start + CHECK_ROWS] for start in range(0, len(array), CHECK_ROWS)) if array.ndim else (array,)
        for chunk in chunks:
            finite = np.isfinite(chunk).all()
            _release(array)
            if not finite:
                raise InputError(f"calibration array {spec.name!r} contains NaN or Inf; remove or fix those samples")


def _fix_for_shape(shape: tuple[int, ...], spec: InputSpec) -> str:
    """How to make an array of ``shape`` fit ``spec``: the transposition that does (a channels-first
    array for a channels-last model; a recurrent state saved as onnxruntime's GRU holds it,
    ``[layers, samples, hidden]``, for an input with its batch first), or a resize."""
    order = _transposition(shape, spec, samples_kept=True)
    if order:
        return f"save np.transpose(samples, {order}): its axes are in another order"
    order = _transposition(shape, spec, samples_kept=False)
    if order:
        wanted = tuple(shape[a] for a in order)
        return (f"its samples look to be on axis {order[spec.samples_axis]}: save np.transpose(samples, {order}), shaped "
                f"{wanted}, with the samples on axis {spec.samples_axis}")
    return "resize the samples to match"


def _transposition(shape: tuple[int, ...], spec: InputSpec, samples_kept: bool) -> tuple[int, ...] | None:
    """The first order of ``shape``'s axes that fits ``spec``, the samples axis kept in place or
    taken from any axis, None where there is none."""
    if len(shape) > 6:  # 720 orders
        return None
    for order in itertools.permutations(range(len(shape))):
        if spec.samples_axis is not None and (order[spec.samples_axis] == spec.samples_axis) != samples_kept:
            continue
        if all(want is None or axis == spec.samples_axis or shape[order[axis]] == want for axis, want in enumerate(spec.shape)):
            return order
    return None


def _map_file(path: str) -> np.ndarray | dict[str, np.ndarray]:
    """A ``.npy`` array, or a ``.npz`` file's arrays, memory-mapped where they are stored uncompressed.

    Samples are then read from disk batch by batch, so a large calibration set
    costs page cache, not this process's memory.
    """
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as raw:
            _numeric_header(raw, "the array")
        return np.load(path, mmap_mode="r", allow_pickle=False)
    arrays = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            key = info.filename[: -len(".npy")] if info.filename.endswith(".npy") else info.filename
            if info.compress_type == zipfile.ZIP_STORED:
                arrays[key] = _map_member(path, raw, info, key)
            else:  # np.savez_compressed: read it whole
                with archive.open(info) as member:
                    arrays[key] = _read_whole(member, repr(key))
    return arrays


class _PythonObjects(ValueError):
    """An array of Python objects (named by the message), which numpy writes for a list of
    samples of different shapes and which is not read without unpickling."""


def _numeric_header(stream, name: str) -> tuple:
    """The ``.npy`` header at ``stream``'s position, ``(shape, fortran_order, dtype)``; raises
    :class:`_PythonObjects` where the array holds Python objects."""
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    header = read_header(stream)
    if header[2].hasobject:
        raise _PythonObjects(name)
    return header


def _read_whole(stream, name: str) -> np.ndarray:
    """The numeric ``.npy`` array at ``stream``'s position, read in one pass (a compressed member
    decompresses as it is read, so its header is not read twice)."""
    shape, fortran_order, dtype = _numeric_header(stream, name)
    data = np.frombuffer(stream.read(), dtype=dtype, count=math.prod(shape))
    return data.reshape(shape, order="F" if fortran_order else "C")


def _map_member(path: str, raw, info: zipfile.ZipInfo, key: str) -> np.ndarray:
    raw.seek(info.header_offset)
    header = raw.read(30)  # the local file header: name and extra field lengths at bytes 26..29
    raw.seek(info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little"))
    shape, fortran_order, dtype = _numeric_header(raw, repr(key))
    if 0 in shape:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=raw.tell(), shape=shape, order="F" if fortran_order else "C")


def _release(array: np.ndarray) -> None:
    """Drop a memory-mapped array's pages from this process (the OS keeps them cached)."""
    while isinstance(array, np.ndarray):
        array = array.base
    if isinstance(array, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        array.madvise(mmap.MADV_DONTNEED)


def _format_shape(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"

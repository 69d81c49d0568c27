"""onnxruntime sessions, as deployment runs them (CPU, all graph optimizations)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from qwt_onnx.calibration import leading_batch, samples_axis, samples_of
from qwt_onnx.numerics.metrics import zero_padded


def session(model: onnx.ModelProto | bytes | str, optimized_model: str | None = None, quiet: bool = False,
            profile_prefix: str | None = None, **config: str) -> ort.InferenceSession:
    """A CPU session with ORT_ENABLE_ALL, so quantized ops run in onnxruntime's INT8 kernels;
    ``optimized_model``: where to write the graph it runs; ``quiet``: no error logs (a run that
    may fail by design); ``profile_prefix``: profile its runs into a file named so; ``config``:
    session config entries."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4 if quiet else 3
    # Between runs numpy does the solver's work on the same cores; spinning ORT threads would
    # starve it (and it them): measured 1.7x slower block runs with spinning on 2 cores.
    for key, value in {"session.intra_op.allow_spinning": "0", **config}.items():
        options.add_session_config_entry(key, value)
    if optimized_model is not None:
        options.optimized_model_filepath = optimized_model
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class Runner:
    """A session that takes its feeds from a pool of named arrays."""

    def __init__(self, model: onnx.ModelProto | bytes | str, quiet: bool = False):
        self.session = session(model, quiet=quiet)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, pool: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: pool[name] for name in self.input_names}
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))


def samples_axes(model: onnx.ModelProto | bytes | str) -> tuple[dict[str, int | None], dict[str, int]]:
    """Where each graph input and output holds its samples (:func:`qwt_onnx.calibration.samples_axis`:
    axis 1 of a recurrent state [layers, batch, C], none for a scalar input); ``model`` a proto,
    its bytes or its path (read without its external data)."""
    if isinstance(model, str):
        model = onnx.load(model, load_external_data=False)
    elif isinstance(model, bytes):
        model = onnx.load_from_string(model)

    def dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
        return [d.dim_value or d.dim_param or None for d in value.type.tensor_type.shape.dim]

    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    batch = leading_batch([dims(i) for i in inputs])
    return ({i.name: samples_axis(dims(i), batch) for i in inputs},
            {o.name: samples_axis(dims(o), batch) or 0 for o in model.graph.output})


def move_samples(array: np.ndarray, declared: int, count: int, to: int = 0) -> np.ndarray:
    """``array``, an output of a run on ``count`` samples, with its samples moved to axis ``to``.
    They are on its ``declared`` axis where that has ``count`` entries, else on its first axis that
    has: exports do not always declare what they write (ddddocr's recogniser declares
    [1, seqlen] and writes [T, 1, C]). One sample's output that has no such axis gets one."""
    axis = declared
    if not (declared < array.ndim and array.shape[declared] == count):
        axis = next((a for a, size in enumerate(array.shape) if size == count), None)
        if axis is None and count == 1:  # one sample's output with no axis for it: a NonMaxSuppression's [K, 3]
            return np.expand_dims(array, to)
        axis = declared if axis is None else axis
    return np.moveaxis(array, axis, to)


def take(feeds: Mapping[str, np.ndarray], axes: Mapping[str, int | None], indices: np.ndarray | slice) -> dict[str, np.ndarray]:
    """Samples ``indices`` of every feed, on its samples axis (``axes``; 0 for names it lacks)."""
    return {name: samples_of(array, axes.get(name, 0), indices) for name, array in feeds.items()}


def count_samples(feeds: Mapping[str, np.ndarray], axes: Mapping[str, int | None]) -> int:
    return next(array.shape[axes.get(name, 0)] for name, array in feeds.items() if axes.get(name, 0) is not None)


# Two samples run at once must give each output row as run alone to within this share of the
# output's largest magnitude: kernels blocked for another batch size round differently (float32),
# while samples mixed in a batch (a mean over it) differ by the size of the signal.
BATCHED_ROWS_TOLERANCE = 1e-3


def batching_fault(runner: Runner, singles: Sequence[Mapping[str, np.ndarray]], two: Mapping[str, np.ndarray]) -> str | None:
    """Why ``runner``'s model cannot run several samples at once, from its outputs on each of two
    samples alone (``singles``) and on the feeds of both (``two``): None where each output holds one
    row per sample (one axis going from 1 to 2, the others unchanged), the row each sample gives
    alone. A declared dynamic batch does not say it: a graph can fix a batch of one inside (a
    Reshape to [1, -1]), merge the batch into another axis, or mix the samples at the right shapes."""
    try:
        double = runner(two)
    except Exception as exc:  # onnxruntime raises its own Fail, InvalidArgument, RuntimeException
        node = re.search(r"running (\w+) node", str(exc))
        return f"onnxruntime fails on two samples at once{f', in a {node.group(1)} node' if node else ''}"
    for name in runner.output_names:
        a, b = singles[0][name].shape, double[name].shape
        changed = [axis for axis in range(len(a)) if len(a) == len(b) and a[axis] != b[axis]]
        if len(a) != len(b) or len(changed) != 1 or (a[changed[0]], b[changed[0]]) != (1, 2):
            return f"output {name!r} is {list(a)} for one sample and {list(b)} for two"
        rows = np.split(double[name], 2, axis=changed[0])
        if not all(_same_rows(row, single[name]) for row, single in zip(rows, singles)):
            return f"output {name!r} of two samples at once is not what each gives alone"
    return None


def _same_rows(batched: np.ndarray, alone: np.ndarray) -> bool:
    """Whether a sample's rows of a batched output are what it gives alone, where it gives any: a
    decoder that runs until every sequence of its batch has ended writes the shorter one's steps
    and then more."""
    if batched.ndim != alone.ndim or any(a > b for a, b in zip(alone.shape, batched.shape)):
        return False
    batched = batched[tuple(slice(0, size) for size in alone.shape)]
    if not np.issubdtype(alone.dtype, np.floating):
        return bool(np.array_equal(batched, alone))
    finite = np.abs(alone[np.isfinite(alone)])
    scale = float(finite.max()) if finite.size else 0.0
    return bool(np.allclose(batched, alone, rtol=0.0, atol=BATCHED_ROWS_TOLERANCE * scale, equal_nan=True))


def concatenate_samples(chunks: list[np.ndarray], axis: int = 0) -> np.ndarray:
    """Per-batch outputs joined along their samples ``axis``. Where their other axes differ (a
    decoder that runs until every sequence of its batch has ended writes as many steps as the
    batch's longest), each is zero-padded at the end of those axes to the largest."""
    if len({c.shape[:axis] + c.shape[axis + 1 :] for c in chunks}) > 1:
        largest = np.max([c.shape for c in chunks], axis=0)
        chunks = [zero_padded(c, [*largest[:axis], c.shape[axis], *largest[axis + 1 :]]) for c in chunks]
    return np.concatenate(chunks, axis=axis)


def run_in_batches(model: onnx.ModelProto | bytes | str, feeds: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """``model``'s outputs on ``feeds``, run ``batch_size`` samples at a time and concatenated,
    every input and output on its samples axis (:func:`samples_axes`)."""
    inputs, outputs = samples_axes(model)
    runner = Runner(model)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, count_samples(feeds, inputs), batch_size):
        batch = take(feeds, inputs, slice(start, start + batch_size))
        count = count_samples(batch, inputs)
        for name, value in runner(batch).items():
            parts.setdefault(name, []).append(move_samples(value, outputs[name], count, to=outputs[name]))
    return {name: concatenate_samples(chunks, axis=outputs[name]) for name, chunks in parts.items()}


def largest_value_bytes(model: onnx.ModelProto, pool: Mapping[str, np.ndarray]) -> int:
    """Bytes of the largest value that ``model``'s nodes compute on the feeds in ``pool``."""
    computed = [name for node in model.graph.node for name in node.output if name]
    values = Runner(with_outputs(model, computed), quiet=True)(pool).values()
    return max((v.nbytes for v in values if isinstance(v, np.ndarray)), default=0)


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the intermediate values ``names``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output} | {i.name for i in copy.graph.input}
    for name in names:
        if name not in present:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return copy

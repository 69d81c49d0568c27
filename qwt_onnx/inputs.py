"""The user's inputs checked and loaded: the models, the output path, ``--outputs``, and the
batch size the model can be run at."""

from __future__ import annotations

import logging
import os

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common

from qwt_onnx.analysis import parts
from qwt_onnx.calibration import CalibrationSet, InputSpec
from qwt_onnx.errors import InputError
from qwt_onnx.graph import prepare
from qwt_onnx.graph import query as g
from qwt_onnx.numerics import metrics
from qwt_onnx.passes import dispatch
from qwt_onnx.run import Warnings
from qwt_onnx.runtime import Runner, batching_fault, largest_value_bytes

logger = logging.getLogger("qwt_onnx")

# A batch's largest activation (one tensor, all the batch's samples) takes at most this many bytes:
# the capture and the solver hold several tensors of that size per batch, float64 copies among
# them. DNSMOS's 128 x 900 x 161 feature maps (71 MiB a sample) took the capture past 24 GB, and the
# process killed, at 16 samples a batch; the zoo's largest (4.7 MiB, PP-OCRv6 det) stay at 16.
BATCH_ACTIVATION_BYTES = 1 << 28

ModelLike = str | os.PathLike | onnx.ModelProto


def load_fp32(model: ModelLike) -> ir.Model:
    """The FP32 model, prepared for the passes (:func:`_prepared`)."""
    fp = _prepared(model, "input model")
    kernels = g.integer_kernels(fp.graph)
    if kernels:  # quantize_dynamic's or quantize_static's QOperator output: --quantized cannot take it either
        raise InputError(f"the input model is already quantized, in onnxruntime's QOperator format ({', '.join(kernels[:3])}); "
                         "pass the FP32 model it was made from")
    if g.is_quantized(fp.graph):
        raise InputError("the input model is already quantized; pass the FP32 model as input and this one with --quantized")
    return fp


def load_quantized(quantized: ModelLike) -> ir.Model:
    """The user's QDQ model (``--quantized``), prepared for the passes as the FP32 model is."""
    q = _prepared(quantized, "quantized model")
    if not g.is_quantized(q.graph):
        raise InputError("the --quantized model has no QuantizeLinear/DequantizeLinear nodes; pass a QDQ model")
    kernels = g.integer_kernels(q.graph)
    if kernels:
        raise InputError(f"the --quantized model is in onnxruntime's QOperator format ({', '.join(kernels[:3])}); pass a "
                         "QDQ model of the same FP32 model (quantize_static with quant_format=QuantFormat.QDQ)")
    return q


def _prepared(model: ModelLike, role: str) -> ir.Model:
    """``model`` loaded and prepared for the passes (see :func:`prepare.prepare`); a batch dimension
    fixed over 1 made dynamic, its size kept in ``meta["fixed_batch"]`` (:func:`prepare.free_fixed_batch`)."""
    loaded = _load(model, role)
    fixed_batch = prepare.free_fixed_batch(loaded)
    prepared = prepare.prepare(loaded)
    prepared.meta["fixed_batch"] = fixed_batch
    return prepared


def expose_what_selections_read(fp: ir.Model) -> tuple[list[str], list[str]]:
    """A detector's outputs after its selections (a NonMaxSuppression's boxes, a max-pool NMS's
    peaks, an atan2's angle) flip with a step in what they read: the tensors the selecting ops
    read (boxes, scores, the peaks' heat map) are made outputs of ``fp`` to be scored instead,
    and taken out of the written model. Their names, and the labels of the outputs and parts
    (:mod:`qwt_onnx.analysis.parts`) computed from the selections."""
    read, selecting = g.selections(fp.graph)
    selected = parts.labels_computed_from(fp.graph, [v for node in selecting for v in node.outputs])
    if not selected:
        return [], []
    present = {v.name for v in fp.graph.outputs}
    exposed = [v for v in read if v.name not in present]
    fp.graph.outputs.extend(exposed)
    return [v.name for v in exposed], selected


def unselected(fp: ir.Model, output_parts: tuple[str, ...], selected: list[str]) -> tuple[str, ...]:
    """The labels to score where some outputs or parts are selections: every float output or
    part but those; () where there are none."""
    if not selected:
        return ()
    labels = output_parts or tuple(v.name for v in fp.graph.outputs if v.dtype is not None and v.dtype.is_floating_point())
    return tuple(label for label in labels if label not in selected and metrics.part_of(label)[0] not in selected)


def check_outputs(fp: ir.Model, chosen: tuple[str, ...]) -> None:
    floats = {v.name: v for v in fp.graph.outputs if v.dtype is not None and v.dtype.is_floating_point()}
    for label in chosen:
        try:
            name, index = metrics.part_of(label)
        except ValueError as exc:
            raise InputError(f"--outputs: {exc}; write a part of an output as NAME[:, START:STOP]") from None
        if name not in floats:
            looks_like_part = "[" in name and name.endswith("]")  # but its index did not parse
            hint = " (a part's index takes integers and slices: NAME[:, 4:])" if looks_like_part else ""
            raise InputError(f"--outputs: the model has no float output {name!r}{hint}; choose from {', '.join(floats)}")
        shape = floats[name].shape
        if index is None or shape is None:
            continue
        if len(index) > len(shape):
            raise InputError(f"--outputs: {label!r} indexes {len(index)} axes of {name}, which has {len(shape)}; index fewer")
        for axis, (item, dim) in enumerate(zip(index, shape)):
            if isinstance(dim, int) and (not -dim <= item < dim if isinstance(item, int) else not range(dim)[item]):
                raise InputError(f"--outputs: {label!r} selects nothing of axis {axis} of {name}, which has {dim}; fix the index")


def check_output(model: ModelLike, output: str | os.PathLike | None) -> None:
    if output is None:
        return
    folder = os.path.dirname(os.path.abspath(os.fspath(output)))
    if not os.path.isdir(folder):
        raise InputError(f"output folder {folder} does not exist; create it or choose another output path")
    if not os.access(folder, os.W_OK):
        raise InputError(f"output folder {folder} is not writable; choose another output path")
    if isinstance(model, (str, os.PathLike)) and os.path.abspath(os.fspath(model)) == os.path.abspath(os.fspath(output)):
        raise InputError("the output path is the input model; choose another output path so the input is kept")


def _load(model: ModelLike, role: str) -> ir.Model:
    if isinstance(model, onnx.ModelProto):
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise InputError(f"{role} is not a valid ONNX model ({str(exc).splitlines()[0]}); re-export it") from None
        return prepare.deserialize(model, role)
    return prepare.load_model(model, role)


def effective_batch_size(model: ir.Model, batch_size: int, calib: CalibrationSet, warnings: Warnings) -> int:
    """Models whose outputs do not hold one row per sample of a batch, the row each sample gives
    alone (:func:`batching_fault`), are fed one sample at a time, as are those exported with a
    batch dimension fixed to 1 that their graph holds (a fixed batch was freed by :func:`load_fp32`);
    others at most as many as keep a batch's largest activation within :data:`BATCH_ACTIVATION_BYTES`.
    A model that onnxruntime cannot load, or run on the first calibration samples, is refused."""
    specs = [spec for spec in prepare.input_specs(model) if spec.samples_axis is not None]
    fixed = {spec.shape[spec.samples_axis] for spec in specs if spec.shape[spec.samples_axis] is not None}
    only = fixed.pop() if len(fixed) == 1 else None
    try:
        proto = prepare.to_proto(model)
        runner = Runner(proto, quiet=True)
    except Exception as exc:  # onnxruntime's own exception types
        raise InputError(f"onnxruntime cannot load the model ({_first_line(exc)}); quantize a model that onnxruntime's CPU "
                         "provider runs") from None
    first = next(calib.batches(min(only or 1, calib.num_samples))).feeds
    try:
        outputs = runner(first)
    except Exception as exc:
        freed = model.meta.get("fixed_batch")
        if freed:  # run one sample at a time, the model runs none: its graph holds the size
            raise InputError(f"the model's batch dimension is fixed to {freed} and its graph computes with that size "
                             f"({_first_line(exc)}); export it with a dynamic batch dimension (torch.onnx.export's "
                             "dynamic_axes) to quantize it") from None
        raise InputError(f"onnxruntime cannot run the model on the first calibration samples ({_first_line(exc)}); "
                         "check that the calibration data matches the model's inputs") from None
    if only is not None:
        if only != batch_size:
            logger.info("the model's batch dimension is fixed to %d; using batches of %d", only, only)
        return only
    if batch_size == 1 or calib.num_samples < 2:
        return batch_size
    second = runner(next(calib.batches(1, indices=[1])).feeds)
    fault = batching_fault(runner, [outputs, second], next(calib.batches(2)).feeds)
    if fault is not None:
        if model.meta.get("fixed_batch") == 1:  # as exported: no warning
            logger.info("the model's batch dimension is fixed to 1 and its graph runs one sample at a time (%s)", fault)
        else:
            warnings.warn(f"the model declares a dynamic batch but does not batch samples ({fault}); running one sample at a time")
        return 1
    per_sample = largest_value_bytes(proto, first)
    fitting = max(1, BATCH_ACTIVATION_BYTES // max(per_sample, 1))
    if fitting < batch_size:
        logger.info("a sample's largest activation takes %.0f MiB; using batches of %d", per_sample / 2**20, fitting)
        return fitting
    return batch_size


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__


def dispatched_branch(fp: ir.Model, arrays: dict[str, np.ndarray], specs: list[InputSpec]) -> bool | None:
    """Where ``fp`` is one If on its inputs (:mod:`qwt_onnx.passes.dispatch`) and every calibration
    sample feeds its condition the same values: whether they take its then branch. None for any
    other model, or samples that take different branches."""
    node = dispatch.dispatch_if(fp.graph)
    if node is None:
        return None
    condition, read = node.inputs[0], set(dispatch.condition_inputs(node))
    feeds = {spec.name: _fed_alike(arrays[spec.name], spec) for spec in specs if spec.name in read and spec.name in arrays}
    if len(feeds) != len(read) or any(value is None for value in feeds.values()):
        return None
    if condition.is_graph_input():
        return bool(feeds[condition.name].reshape(-1)[0])
    computing = fp.clone()  # the condition's computation alone
    computing.graph.outputs[:] = [g.values_by_name(computing.graph)[condition.name]]
    computing.graph.inputs[:] = [v for v in computing.graph.inputs if v.name in read]
    common.RemoveUnusedNodesPass()(computing)
    return bool(Runner(prepare.to_proto(computing))(feeds)[condition.name].reshape(-1)[0])


def specialized(fp: ir.Model, taken: bool) -> ir.Model:
    """``fp``, a dispatch (:func:`dispatched_branch`), as the branch ``taken`` alone, prepared."""
    branch = fp.clone()
    dispatch.SpecializeDispatchPass(taken)(branch)
    prepared = prepare.prepare(branch)
    prepared.meta["fixed_batch"] = fp.meta.get("fixed_batch")
    return prepared


def _fed_alike(array: np.ndarray, spec: InputSpec) -> np.ndarray | None:
    """What every sample feeds ``spec``'s input: ``array`` where it is fed whole with every batch,
    else its first sample where all samples are alike; None where they differ."""
    if spec.samples_axis is None and array.ndim == len(spec.shape):
        return array
    batched = array.ndim == len(spec.shape)  # samples on the input's own axis, else stacked on a new axis 0
    first = np.take(array, [0], axis=spec.samples_axis if batched else 0)
    if not (array == first).all():
        return None
    return first if batched else first[0]

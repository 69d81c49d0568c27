"""Load, check, normalise and save models."""

from __future__ import annotations

import os
import re
import tempfile

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
from onnx_ir.passes import common

from qwt_onnx.calibration import InputSpec, leading_batch, samples_axis
from qwt_onnx.errors import InputError
from qwt_onnx.graph import query as g
from qwt_onnx.passes.constants import FoldComputedWeightsPass
from qwt_onnx.passes.control_flow import InlineConstantIfPass
from qwt_onnx.passes.fold import DenseAsGemmPass, FoldBatchNormPass, FoldChannelAffinePass
from qwt_onnx.passes.hardsigmoid import HardSwishAsProductPass
from qwt_onnx.passes.pool import SpatialMeanAsGlobalPoolPass
from qwt_onnx.passes.upcast import ComputeInFloat32Pass


def load_model(path: str | os.PathLike, role: str = "input model") -> ir.Model:
    """Read and check an ONNX file, raising InputError with the fix when it is not usable."""
    path = check_file(path, role)
    model = read(path, f"{role} {path}")
    _load_external_data(model, path, role)
    return model


def read(path: str, role: str) -> ir.Model:
    """``ir.load(path)``, raising InputError with the fix where onnx_ir cannot read the model."""
    try:
        return ir.load(path)
    except ir.serde.SerdeError as exc:
        raise _unreadable(onnx.load(path, load_external_data=False), role, exc) from None


def deserialize(proto: onnx.ModelProto, role: str = "input model") -> ir.Model:
    """``proto`` as an onnx_ir model, raising InputError with the fix where onnx_ir cannot read it."""
    try:
        return ir.serde.deserialize_model(proto)
    except ir.serde.SerdeError as exc:
        raise _unreadable(proto, role, exc) from None


def _unreadable(proto: onnx.ModelProto, role: str, error: Exception) -> InputError:
    """Why onnx_ir, the graph library the passes are built on, cannot read ``proto``: map types
    (skl2onnx's ZipMap gives a classifier's probabilities as a sequence of maps), or the reason it gives."""
    graph = proto.graph
    mapped = next((v.name for v in [*graph.input, *graph.output, *graph.value_info] if _holds_map(v.type)), None)
    if mapped is not None:
        return InputError(f"{role}: {mapped!r} is a map or a sequence of maps (skl2onnx gives a classifier's probabilities "
                          "so, through ZipMap), which onnx_ir, the graph library of qwt_onnx, cannot read; export the model "
                          "without it (skl2onnx: options={id(model): {'zipmap': False}})")
    while error.__cause__ is not None:
        error = error.__cause__
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return InputError(f"{role}: onnx_ir, the graph library of qwt_onnx, cannot read it ({reason}); re-export it without that")


def _holds_map(value_type: onnx.TypeProto) -> bool:
    kind = value_type.WhichOneof("value")
    if kind == "map_type":
        return True
    if kind in ("sequence_type", "optional_type"):
        return _holds_map(getattr(value_type, kind).elem_type)
    return False


def check_file(path: str | os.PathLike, role: str) -> str:
    """``path`` as a string, if it names a valid ONNX file; else InputError with the fix."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{role} {path} does not exist; pass the path of an .onnx file")
    try:
        onnx.checker.check_model(path)
    except Exception as exc:  # onnx raises ValidationError, DecodeError or OSError variants
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{role} {path} is not a valid ONNX model ({reason}); {_fix(reason)}") from None
    return path


def _fix(reason: str) -> str:
    """What to do about the checker's ``reason``: an op that the model's opset lacks is either
    newer than the opset its exporter declared or no ONNX op at all (a converter's own op: tf2onnx
    1.17 writes TensorFlow's Erfc for Keras' exact GELU)."""
    if re.search(r"Unrecognized attribute: axis for operator (Quantize|Dequantize)Linear", reason):
        return ("per-channel QuantizeLinear and DequantizeLinear (their axis) need opset 13 or later, which onnxruntime's "
                "quantize_static does not raise the model to: convert the FP32 model first "
                "(onnx.version_converter.convert_version(model, 13)) and quantize that")
    unknown = re.search(r"No Op registered for (\S+) with domain_version of (\d+)", reason)
    if unknown is None:
        return "re-export it"
    op, version = unknown.groups()
    introduced = min((s.since_version for s in onnx.defs.get_all_schemas_with_history() if s.name == op and not s.domain),
                     default=None)
    if introduced is None:
        return (f"{op} is no ONNX op (its exporter's own, or a custom op): replace it with ONNX ops, or re-export with "
                "an option that avoids it")
    return f"{op} is an op of opset {introduced} and later, the model declares {version}: re-export at opset {introduced}"


class _IdentityEliminationPass(common.IdentityEliminationPass):
    """onnx_ir's, less the Identity nodes that give a graph an output that is already an output
    of another graph or is computed in an enclosing one (as in the If branches of silero-vad's
    exports): onnx_ir 1.1 cannot move such a value and fails on the whole model."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        source, result = node.inputs[0] if node.inputs else None, node.outputs[0] if node.outputs else None
        if source is not None and result is not None and result.is_graph_output():
            if source.is_graph_output() or source.graph is not node.graph:
                return False
        return super()._try_eliminate_identity_node(node)


PROTOBUF_LIMIT = 2**31 - 1  # the pipeline runs sub-models from serialized protobufs
EXTERNAL_DATA_THRESHOLD = 1 << 30  # weights beyond this many bytes are written to OUT.onnx.data


def _load_external_data(model: ir.Model, path: str, role: str) -> None:
    """Read weights stored in external data files into memory, refusing what cannot fit."""
    external = [v.const_value for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    if not external:
        return
    size = sum(t.nbytes for t in external)
    if size >= PROTOBUF_LIMIT:
        raise InputError(
            f"{role} {path} holds {size / 2**30:.1f} GiB of weights; models over 2 GiB are not supported yet, "
            "quantize a smaller export (for example one part of the model at a time)"
        )
    available = _available_memory()
    if available is not None and 3 * size > available:
        raise InputError(
            f"{role} {path} holds {size / 2**30:.1f} GiB of weights in external data, more than a third of the "
            f"{available / 2**30:.1f} GiB of free memory; free memory or use a larger machine"
        )
    ir.external_data.load_to_model(model)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


MIN_OPSET = 13  # per-channel DequantizeLinear (the axis attribute) needs opset 13
MIN_IR_VERSION = 7  # opset 13's; before 4 every initializer had to be listed among the inputs too
LOW_BIT_OPSET = 21  # int4, uint4, int16 and uint16 QuantizeLinear / DequantizeLinear
IR_VERSION_OF_OPSET = {21: 10}


def prepare(model: ir.Model) -> ir.Model:
    """Every node and value named, at least opset 13, weights no longer listed among the graph
    inputs, constants as initializers, If nodes on a constant replaced by their branch, half and
    double precision computed in float32, Identity dropped, BatchNorm, per-channel scales and
    bias Adds folded into convolutions and dense layers, spatial means written as global pools,
    hard-swishes as ``x · HardSigmoid(x)``, shapes inferred, sorted."""
    model = upgrade_opset(model)
    model.ir_version = max(model.ir_version, MIN_IR_VERSION)
    passes = ir.passes.PassManager(
        [
            # Every node named, once: the passes after this one find the ops they rewrite by name.
            common.NameFixPass(),
            # Exporters before IR version 4 list every weight as a graph input too (a default a
            # caller could override): a quantizer takes the weights as the constants they are.
            common.RemoveInitializersFromInputsPass(),
            common.LiftConstantsToInitializersPass(size_limit=0),
            # A TensorFlow 1 Keras export's learning phase, a constant, picks each BatchNorm's
            # inference form in an If; what only the other branch read goes with it, so that the
            # normalization follows its convolution alone and folds into it.
            InlineConstantIfPass(),
            common.RemoveUnusedNodesPass(),
            ComputeInFloat32Pass(),
            FoldComputedWeightsPass(),
            _IdentityEliminationPass(),
            # Quantizing an op whose output a BatchNormalization rescales per channel wastes the
            # quantizer's range and keeps onnxruntime from fusing the op: every PTQ tool folds first.
            FoldBatchNormPass(),
            common.ShapeInferencePass(strict_mode=False),
            SpatialMeanAsGlobalPoolPass(),  # after shape inference: it needs the rank of a ReduceMean's input
            HardSwishAsProductPass(),
            FoldChannelAffinePass(),  # after it: a squeeze-excitation's pool is among the readers it weighs
            DenseAsGemmPass(),  # it needs the rank of a MatMul's input
            common.RemoveUnusedNodesPass(),
            common.TopologicalSortPass(),
        ]
    )
    return passes(model).model


FREED_BATCH = "batch"  # the name a fixed batch dimension takes while the passes run


def free_fixed_batch(model: ir.Model) -> int | None:
    """Where every fed input leads with one static batch size (an export traced at that batch
    without dynamic axes), that dimension made dynamic on the inputs and on the outputs that lead
    with it, and the shapes declared between them dropped for shape inference to redo:
    calibration runs batches of any size, a last or held-out batch partial (a batch of 1 where
    the graph runs several samples at once, as :func:`qwt_onnx.runtime.batching_fault` checks).
    Returns the size, for :func:`fix_batch` to give back to the written model; None where it is
    not so fixed."""
    graph = model.graph
    inputs = g.fed_inputs(graph)
    leading = {dims(v)[0] if dims(v) else None for v in inputs}
    size = leading.pop() if len(leading) == 1 else None
    if not isinstance(size, int) or size < 1:
        return None
    for value in [*inputs, *(v for v in graph.outputs if dims(v)[:1] == [size])]:
        value.shape = ir.Shape([ir.SymbolicDim(FREED_BATCH), *value.shape[1:]])
    for node in graph:
        for value in node.outputs:
            if not value.is_graph_output():
                value.shape = None
    return size


def fix_batch(model: ir.Model, size: int) -> None:
    """Give the dimension that :func:`free_fixed_batch` freed its static ``size`` back, on the inputs
    and outputs and on every shape that shape inference carried it to."""
    graph = model.graph
    computed = (value for node in ir.traversal.RecursiveGraphIterator(graph) for value in node.outputs)
    for value in [*graph.inputs, *graph.outputs, *computed]:
        if FREED_BATCH in dims(value):
            value.shape = ir.Shape([size if d == FREED_BATCH else d for d in value.shape])


def upgrade_opset(model: ir.Model, minimum: int = MIN_OPSET, why: str = "") -> ir.Model:
    """The model converted to opset ``minimum`` when it is older (onnx's version converter);
    ``why``: what needs that opset, for the error where it cannot be converted."""
    version = g.opset(model, default=minimum)
    if version >= minimum:
        return model
    try:
        converted = onnx.version_converter.convert_version(ir.serde.serialize_model(model), minimum)
        converted.ir_version = max(converted.ir_version, IR_VERSION_OF_OPSET.get(minimum, MIN_IR_VERSION))
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises RuntimeError or ValidationError variants
        raise InputError(
            f"the model uses opset {version} and could not be converted to opset {minimum}{why} "
            f"({str(exc).strip().splitlines()[0]}); re-export it with opset {minimum} or newer"
        ) from None
    return ir.serde.deserialize_model(converted)


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The graph inputs that must be fed (initializers listed as inputs excluded), each with its
    samples axis (:func:`qwt_onnx.calibration.samples_axis`)."""
    inputs = g.fed_inputs(model.graph)
    batch = leading_batch([dims(v) for v in inputs])
    specs = []
    for value in inputs:
        if value.dtype is None:
            raise InputError(f"model input {value.name!r} has no element type; re-export the model with typed inputs")
        fixed = tuple(d if isinstance(d, int) else None for d in dims(value))
        specs.append(InputSpec(value.name, np.dtype(value.dtype.numpy()), fixed, samples_axis(dims(value), batch)))
    return specs


def dims(value: ir.Value) -> list[int | str | None]:
    """``value``'s shape: static sizes, names of dynamic dimensions, None for unnamed ones.
    Paddle's exporter writes a dynamic dimension as -1: only a positive size is fixed."""
    return [d if isinstance(d, int) and d > 0 else d.value if isinstance(d, ir.SymbolicDim) else None for d in value.shape or ()]


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def save_atomically(model: ir.Model, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` through a staging folder beside it, so no partial file is left.

    Weights beyond ``EXTERNAL_DATA_THRESHOLD`` bytes go to ``path + ".data"``,
    which is moved into place before the model that refers to it.
    """
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".qwt-") as staging:
        staged = os.path.join(staging, name)
        if weights > EXTERNAL_DATA_THRESHOLD:
            ir.save(model, staged, external_data=name + ".data")
            os.replace(staged + ".data", path + ".data")
        else:
            ir.save(model, staged)
        os.replace(staged, path)

"""Load, check, normalise and save models."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
from onnx_ir.passes import common

from qwt_onnx.calibration import InputSpec
from qwt_onnx.errors import InputError
from qwt_onnx.passes.fold import FoldBatchNormPass


def load_model(path: str | os.PathLike, role: str = "input model") -> ir.Model:
    """Read and check an ONNX file, raising InputError with the fix when it is not usable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{role} {path} does not exist; pass the path of an .onnx file")
    try:
        onnx.checker.check_model(path)
    except Exception as exc:  # onnx raises ValidationError, DecodeError or OSError variants
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{role} {path} is not a valid ONNX model ({reason}); re-export it") from None
    return ir.load(path)


MIN_OPSET = 13  # per-channel DequantizeLinear (the axis attribute) needs opset 13


def prepare(model: ir.Model) -> ir.Model:
    """At least opset 13, constants as initializers, BatchNorm folded, shapes inferred, sorted."""
    model = upgrade_opset(model)
    passes = ir.passes.PassManager(
        [
            common.LiftConstantsToInitializersPass(size_limit=0),
            FoldBatchNormPass(),
            common.RemoveUnusedNodesPass(),
            common.ShapeInferencePass(strict_mode=False),
            common.TopologicalSortPass(),
        ]
    )
    return passes(model).model


def upgrade_opset(model: ir.Model) -> ir.Model:
    """The model converted to opset 13 when it is older (onnx's version converter)."""
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx", MIN_OPSET))
    if version >= MIN_OPSET:
        return model
    try:
        converted = onnx.version_converter.convert_version(ir.serde.serialize_model(model), MIN_OPSET)
    except Exception as exc:  # the converter raises RuntimeError or ValidationError variants
        raise InputError(
            f"the model uses opset {version} and could not be converted to opset {MIN_OPSET} ({exc}); "
            f"re-export it with opset {MIN_OPSET} or newer"
        ) from None
    return ir.serde.deserialize_model(converted)


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The graph inputs that must be fed (initializers listed as inputs excluded)."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.dtype is None:
            raise InputError(f"model input {value.name!r} has no element type; re-export the model with typed inputs")
        dims = tuple(d if isinstance(d, int) else None for d in (value.shape or ()))
        specs.append(InputSpec(value.name, np.dtype(value.dtype.numpy()), dims))
    return specs


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def save_atomically(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` next to ``path`` and rename it into place, so no partial file is left."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".qwt-", suffix=".onnx.tmp")
    os.close(fd)
    try:
        onnx.save_model(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

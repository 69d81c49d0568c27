"""Fold channel-wise affine compensations into the quantized ops that end their blocks.

A block whose output is its last weighted op's output ``z``, or ``z`` added to
the residual stream, can be compensated by ``z' = a ⊙ z + b`` per output
channel (QwT-v2's CWAC). The op computes ``z = W x + c`` with ``W`` dequantized
per output channel from int8, so ``a`` multiplies the weight's DequantizeLinear
scale (the int8 weights stay as they are; a per-tensor scale becomes
per-channel) and the bias becomes ``a ⊙ c + b``: a Conv's, ConvTranspose's or
Gemm's own (given one where it has none, to a quantized Gemm on int32 behind a
DequantizeLinear as the Q/DQ pass gives one, unless the target takes float biases; an
int32 bias keeps the accumulator's scale, multiplied by ``a`` too), or a
MatMul's bias Add (an Add is added only where a MatMul has none). A block that
ends in a normalization (post-LN transformers, a BatchNormalization left unfused)
folds into its per-channel scale and shift instead: ``a ⊙ (γ ⊙ n + β) + b =
(a ⊙ γ) ⊙ n + (a ⊙ β + b)``. The graph keeps its ops and its fusions.

:func:`fold_site` finds the op; where a block has none, it says why.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qwt_onnx.graph import query as g
from qwt_onnx.numerics import quantization as qm
from qwt_onnx.passes.qdq import int32_bias_dequantizer

FOLDABLE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# Normalizations ending in a per-channel scale (input 1) and shift (input 2), and their channels' axis.
NORMALIZATIONS = {"LayerNormalization": -1, "BatchNormalization": 1, "InstanceNormalization": 1}
# Ops between the fold site and the block output that leave each channel's compensation in
# place: its output quantizer (Q, a Clip where its range is narrowed, DQ), a residual Add, an
# activation after the sum. A Relu or Clip is not linear, but the fold is judged on the block's
# exact output.
PASSED_OPS = {"Add", "Relu", "QuantizeLinear", "Clip", "DequantizeLinear"}


@dataclasses.dataclass(frozen=True)
class FoldSite:
    """Where a block's affine compensation folds: the weighted ``node``, and ``output``, the
    tensor ``g ⊙ z`` it compensates: the node's output ``z`` (or its bias Add's), times the
    per-channel constant ``gain`` of a layer scale after it (ones where there is none)."""

    node: str
    output: str
    axis: int  # channels' axis of ``output``; negative counts from the end
    gain: np.ndarray  # [channels]
    bias_inside: bool = True  # ``z`` holds the op's bias (not so a MatMul's output before its bias Add)

    @property
    def channels(self) -> int:
        return self.gain.size


@dataclasses.dataclass(frozen=True)
class ChannelAffine:
    """A fitted ``y' = scale ⊙ y + shift`` of the site's output ``y``, per channel."""

    site: FoldSite
    scale: np.ndarray
    shift: np.ndarray


def fold_site(output: ir.Value) -> FoldSite | str:
    """The weighted op whose output the block ``output`` adds up, or why there is none."""
    found = _site_before(output)
    return found if isinstance(found, FoldSite) else f"not folded: {found}"


def _site_before(value: ir.Value) -> FoldSite | str:
    node = value.producer()
    if node is None:
        return "the block output is a graph input"
    if _foldable(node):
        site = _weighted_site(node, node.outputs[0])
        outside = node.op_type == "MatMul" and _bias_of(node) is not None  # in the Add after it
        return dataclasses.replace(site, bias_inside=False) if outside and isinstance(site, FoldSite) else site
    if g.is_default_domain(node) and node.op_type in FOLDABLE_OPS:
        return (f"the block ends in {node.op_type} {node.name}, whose weight has no DequantizeLinear of its own "
                "(left float, or shared)")
    if node.op_type in NORMALIZATIONS and g.is_default_domain(node):
        return _normalization_site(node)
    if _bias_add(node) is not None:
        return _weighted_site(_bias_add(node), node.outputs[0])
    if node.op_type == "Mul" and g.is_default_domain(node):
        return _scaled_site(node)
    if not g.is_default_domain(node) or node.op_type not in PASSED_OPS:
        return f"the block ends in {node.op_type}, not in a Conv, Gemm, MatMul or normalization whose scales could hold it"
    reasons = []
    for operand in node.inputs[:1] if node.op_type != "Add" else node.inputs:
        if operand is None or g.is_constant(operand):
            continue
        found = _site_before(operand) if _read_once(operand) else f"{operand.name} is read elsewhere too"
        if isinstance(found, FoldSite):
            return found
        reasons.append(found)
    return reasons[0] if reasons else f"the block ends in {node.op_type} of constants"


def _read_once(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


def _scaled_site(mul: ir.Node) -> FoldSite | str:
    """The site behind a layer scale ``mul`` (a constant per channel, or one for all), which the
    compensation of its output passes through: ``a ⊙ (g ⊙ z) + b = g ⊙ (a ⊙ z + b / g)``."""
    constants = [v for v in mul.inputs if g.is_constant(v)]
    operands = [v for v in mul.inputs if not g.is_constant(v)]
    if len(constants) != 1 or len(operands) != 1:
        if any(g.gate_of(mul, x) is not None for x in operands):
            return "the block ends in a SiLU, hard-swish or channel gate (x · gate): a shift after it cannot move before it"
        return "the block ends in a Mul of two computed tensors"
    if not _read_once(operands[0]):
        return f"{operands[0].name} is read elsewhere too"
    site = _site_before(operands[0])
    if isinstance(site, str):
        return site
    gain = _const(constants[0])
    if gain is None or gain.size not in (1, site.channels) or not np.all(gain != 0):
        return f"{mul.name} scales by a constant that is not one nonzero value per channel"
    if gain.size > 1 and not _along_axis(gain.shape, site.axis, mul.outputs[0].shape):
        return f"{mul.name} scales along another axis than the channels of {site.node}"
    return dataclasses.replace(site, output=mul.outputs[0].name, gain=site.gain * gain.reshape(-1).astype(np.float32))


def _along_axis(shape: tuple[int, ...], axis: int, output_shape: ir.Shape | None) -> bool:
    """Whether a constant of ``shape`` (not one value) broadcasts along ``axis`` of the output alone."""
    if axis >= 0:  # counted from the front: the output's rank places it
        if output_shape is None:
            return False
        axis -= len(output_shape)
    return len(shape) >= -axis and sum(d != 1 for d in shape) == 1 and shape[axis] != 1


def _foldable(node: ir.Node) -> bool:
    return g.is_default_domain(node) and node.op_type in FOLDABLE_OPS and _weight_dequantizer(node) is not None


def _weight_dequantizer(node: ir.Node) -> ir.Node | None:
    """The DequantizeLinear of ``node``'s constant weight, where only ``node`` reads it."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    dq = g.dequantizer(weight)
    if dq is None or len(weight.uses()) != 1 or not g.is_constant(dq.inputs[0]) or len(dq.inputs) < 2:
        return None
    return dq if g.is_constant(dq.inputs[1]) and "block_size" not in dq.attributes else None


def _bias_add(add: ir.Node) -> ir.Node | None:
    """The MatMul whose bias ``add`` adds (a constant, per output channel), where only it reads the MatMul."""
    if add.op_type != "Add" or not g.is_default_domain(add):
        return None
    for index in (0, 1):
        matmul, bias = add.inputs[index].producer(), add.inputs[1 - index]
        if matmul is not None and matmul.op_type == "MatMul" and _foldable(matmul) and _constant_vector(bias) is not None \
                and _read_once(matmul.outputs[0]):
            return matmul
    return None


def _constant_vector(value: ir.Value | None) -> np.ndarray | None:
    """A constant that holds one value or one per channel (along the last axis), float or int32 behind a DequantizeLinear."""
    if value is None:
        return None
    dq = g.dequantizer(value)
    array = _dequantized(dq) if dq is not None else _const(value)
    if array is None or array.size != max(array.shape[-1:] or (1,)):
        return None
    return array.reshape(-1)


def _weighted_site(node: ir.Node, output: ir.Value) -> FoldSite | str:
    dq = _weight_dequantizer(node)
    weight = _const(dq.inputs[0])
    axis = _weight_channel_axis(node, weight.ndim)
    if axis is None:
        return f"{node.name} has no output-channel axis its weight scales could hold (group or batched weights)"
    scale = _const(dq.inputs[1])
    rank_axis = dq.attributes.get_int("axis", 1) % weight.ndim
    if scale.size != 1 and (scale.ndim != 1 or rank_axis != axis):
        return f"{node.name}'s weight scales are not per output channel"
    bias = _bias_of(node)
    if bias is not None and _constant_vector(bias) is None:
        return f"{node.name}'s bias is not a constant per channel"
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0) not in (0, 1):
        return f"{node.name} is an unusual Gemm"
    channels_axis = 1 if node.op_type in ("Conv", "ConvTranspose") else -1
    return FoldSite(node.name, output.name, channels_axis, np.ones(weight.shape[axis], np.float32))


def _normalization_site(node: ir.Node) -> FoldSite | str:
    """The site of a normalization whose scale and shift are constants, one per channel."""
    if node.op_type == "LayerNormalization":
        rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else None
        if node.attributes.get_int("axis", -1) not in (-1, rank - 1 if rank else -1):
            return f"{node.name} normalizes over several axes, its scale is not one per channel"
    if any(v.uses() for v in node.outputs[1:]):
        return f"{node.name} computes training statistics too"
    scale = _const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if scale is None or scale.ndim != 1:
        return f"{node.name}'s scale is not a constant vector (one per channel)"
    shift = node.inputs[2] if len(node.inputs) > 2 else None
    if shift is not None and (_const(shift) is None or _const(shift).shape != scale.shape):
        return f"{node.name}'s shift is not a constant vector (one per channel)"
    return FoldSite(node.name, node.outputs[0].name, NORMALIZATIONS[node.op_type], np.ones(scale.size, np.float32))


def _weight_channel_axis(node: ir.Node, rank: int) -> int | None:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if node.attributes.get_int("group", 1) == 1 else None
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return rank - 1 if rank == 2 else None  # a MatMul's [K, N] weight


def _bias_of(node: ir.Node) -> ir.Value | None:
    if node.op_type == "MatMul":
        add = node.outputs[0].consumers()[0] if len(node.outputs[0].uses()) == 1 else None
        return next((v for v in add.inputs if v is not node.outputs[0]), None) if add is not None and _bias_add(add) else None
    return node.inputs[2] if len(node.inputs) > 2 else None


class FoldAffinePass(ir.passes.InPlacePass):
    """Fold each fitted :class:`ChannelAffine` into its op's weight scales and bias;
    ``int32_biases``: a quantized Gemm given a bias gets it on int32 (onnxruntime fuses a QDQ
    Gemm into QGemm only so; TensorRT takes a float one)."""

    def __init__(self, folds: list[ChannelAffine], int32_biases: bool = True):
        super().__init__()
        self.folds = folds
        self.int32_biases = int32_biases

    def requires(self, model: ir.Model) -> None:
        nodes = {n.name for n in model.graph}
        missing = [f.site.node for f in self.folds if f.site.node not in nodes]
        if missing:
            raise ir.passes.PreconditionError(f"the graph has no node {', '.join(missing[:3])} to fold a compensation into")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = g.NameScope(graph)
        nodes = {n.name: n for n in graph}
        for fold in self.folds:
            node = nodes[fold.site.node]
            scale, shift = fold.scale.astype(np.float32), (fold.shift / fold.site.gain).astype(np.float32)
            if node.op_type in NORMALIZATIONS:
                _fold_into_normalization(graph, names, node, scale, shift)
                continue
            _scale_weight(graph, names, node, scale)
            _shift_bias(graph, names, node, scale, shift, fold.site.bias_inside)
            if node.op_type == "Gemm" and self.int32_biases and g.dequantizer(node.inputs[2]) is None:
                dq = int32_bias_dequantizer(graph, names, node)
                if dq is not None:
                    graph.insert_before(node, dq)
        return ir.passes.PassResult(model, modified=bool(self.folds))


def _scale_weight(graph: ir.Graph, names: g.NameScope, node: ir.Node, scale: np.ndarray) -> None:
    """Multiply the weight's dequantization scale of each output channel by ``scale``."""
    dq = _weight_dequantizer(node)
    rank = len(dq.inputs[0].shape)
    axis = _weight_channel_axis(node, rank)
    old = _const(dq.inputs[1]).reshape(-1)
    inputs = [dq.inputs[0], names.initializer(f"{dq.inputs[1].name}_compensated", (old * scale).astype(np.float32))]
    if len(dq.inputs) > 2 and dq.inputs[2] is not None:
        zero_point = _const(dq.inputs[2]).reshape(-1)
        inputs.append(names.initializer(f"{dq.inputs[2].name}_compensated", np.broadcast_to(zero_point, scale.shape).copy()))
    _rewire(graph, dq, inputs, axis=axis)


def _shift_bias(graph: ir.Graph, names: g.NameScope, node: ir.Node, scale: np.ndarray, shift: np.ndarray,
                bias_inside: bool = True) -> None:
    """Make the op's bias ``scale ⊙ bias + shift`` (``bias + shift`` where the compensated output
    did not hold it), in the form it has (float, or int32 behind a DequantizeLinear)."""
    bias = _bias_of(node)
    if node.op_type == "MatMul":
        if bias is None:  # the one node a fold adds; it takes over the MatMul output's name
            z = node.outputs[0]
            add = names.node("Add", [z, names.initializer(f"{node.name}_compensation_bias", shift)], f"{z.name}_compensated")
            add.outputs[0].dtype, add.outputs[0].shape = z.dtype, z.shape
            z.replace_all_uses_with(add.outputs[0], replace_graph_outputs=True)
            add.replace_input_with(0, z)
            z.name, add.outputs[0].name = add.outputs[0].name, z.name
            graph.insert_after(node, add)
            return
        holder = node.outputs[0].consumers()[0]
        slot = next(i for i, v in enumerate(holder.inputs) if v is bias)
    else:
        holder, slot = node, 2
    beta = node.attributes.get_float("beta", 1.0) if node.op_type == "Gemm" else 1.0
    old = beta * _constant_vector(bias) if bias is not None else np.zeros(shift.shape, np.float32)
    new = ((scale * old if bias_inside else old) + shift).astype(np.float32)
    dq = g.dequantizer(bias)
    if dq is not None:  # int32 on the accumulator's scale, which the weight's scale carries
        bias_scale = np.broadcast_to(_const(dq.inputs[1]).reshape(-1), scale.shape) * scale
        quantized, params = qm.int32_bias(new, np.float32(1.0), bias_scale)
        inputs = [names.initializer(f"{dq.inputs[0].name}_compensated", quantized),
                  names.initializer(f"{dq.inputs[1].name}_compensated", params.scale)]
        if len(dq.inputs) > 2 and dq.inputs[2] is not None:
            inputs.append(names.initializer(f"{dq.inputs[2].name}_compensated", params.zero_point))
        _rewire(graph, dq, inputs, axis=0)
    else:
        if slot >= len(holder.inputs):
            holder.resize_inputs(slot + 1)
        holder.replace_input_with(slot, names.initializer(f"{bias.name if bias is not None else node.name + '_bias'}_compensated", new))
        g.drop_if_unused(graph, bias)
    if node.op_type == "Gemm":
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)


def _fold_into_normalization(graph: ir.Graph, names: g.NameScope, node: ir.Node, scale: np.ndarray, shift: np.ndarray) -> None:
    """Make the normalization's scale ``scale ⊙ γ`` and its shift ``scale ⊙ β + shift`` (it gets one where it has none)."""
    gamma = node.inputs[1]
    beta = node.inputs[2] if len(node.inputs) > 2 else None
    old_scale = _const(gamma)
    old_shift = _const(beta) if beta is not None else np.zeros_like(shift)
    dtype = old_scale.dtype
    node.replace_input_with(1, names.initializer(f"{gamma.name}_compensated", (old_scale * scale).astype(dtype)))
    if beta is None:
        node.resize_inputs(3)
    new_shift = (scale * old_shift + shift).astype(dtype)
    node.replace_input_with(2, names.initializer(f"{beta.name if beta is not None else node.name + '_shift'}_compensated", new_shift))
    g.drop_if_unused(graph, gamma)
    g.drop_if_unused(graph, beta)


def _rewire(graph: ir.Graph, dq: ir.Node, inputs: list[ir.Value], axis: int) -> None:
    """Give the DequantizeLinear ``dq`` new constant inputs and ``axis`` (its old constants dropped where unused)."""
    old = list(dq.inputs)
    for index, value in enumerate(inputs):
        dq.replace_input_with(index, value)
    dq.attributes["axis"] = ir.AttrInt64("axis", axis)
    for value in old[1:]:
        g.drop_if_unused(graph, value)
    if old[0] is not inputs[0]:
        g.drop_if_unused(graph, old[0])


def _const(value: ir.Value) -> np.ndarray | None:
    tensor = ir.convenience.get_const_tensor(value)
    return tensor.numpy() if tensor is not None else None


def _dequantized(dq: ir.Node) -> np.ndarray | None:
    arrays = [_const(v) if v is not None else None for v in dq.inputs[:3]]
    if arrays[0] is None or arrays[1] is None:
        return None
    zero_point = arrays[2] if len(arrays) > 2 and arrays[2] is not None else np.zeros_like(arrays[1])
    axis = dq.attributes.get_int("axis", 1) if arrays[1].size > 1 else None
    return qm.dequantize(arrays[0], qm.QuantParams(arrays[1], zero_point), axis % arrays[0].ndim if axis is not None else None)

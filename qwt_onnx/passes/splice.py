"""Splice fitted compensation branches into the quantized graph.

Each branch reads the block input (after its DequantizeLinear where there is
one, so the quantized ops around it keep their fusions) and is added to the
block output; every reader of the block output then reads the sum. Where the
block output is quantized (a DequantizeLinear output, or a Conv output read
only through Q/DQ), the branch is added after the DequantizeLinear and the sum
goes through the same quantizer again, so the INT8 ops on both sides stay
fused (with an int8 branch the Add itself runs as a QLinearAdd). Tokens get
``MatMul + Add``, or a ``Gemm`` where they are rows of a 2-D tensor (a dense
layer's output: onnxruntime would make that Gemm itself and fuse it into QGemm
only with an int32 bias, which an int8 branch gets); feature maps a (grouped)
``Conv`` with the block's stride, after a ``Slice`` of the border where the
block's own convolutions are unpadded (of the quantized tensor, dequantized
again, so that the Conv stays fused).
All names start with ``qwt/``.

An int8 branch is a QDQ op of its own, so that onnxruntime runs it in its
integer kernels: int8 per-output-channel weights behind a DequantizeLinear;
its input read through the block input's DequantizeLinear, or through a new
quantizer over the input's calibrated range; a feature-map branch's output
quantized over its calibrated range as well for onnxruntime, whose
QLinearConv needs it (a token branch fuses into MatMulIntegerToFloat without
one; TensorRT needs Q/DQ on inputs only).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qwt_onnx.graph import query as g
from qwt_onnx.numerics import quantization as qm
from qwt_onnx.numerics.compensation import Layout
from qwt_onnx.options import Target
from qwt_onnx.passes import qdq

PREFIX = "qwt/"


@dataclasses.dataclass(frozen=True)
class Branch:
    """A fitted branch ``output += input @ weight + bias`` laid out as ``layout``."""

    name: str
    input: str
    output: str
    weight: np.ndarray  # [d_in, d_out]
    bias: np.ndarray  # [d_out]
    layout: Layout
    int8_scale: np.ndarray | None = None  # int8 weights: the per-output-channel scales ``weight`` was rounded with
    target: Target = Target.ORT  # as for the Q/DQ pass: ort quantizes a feature-map branch's output too
    input_range: tuple[float, float] | None = None  # for an input quantizer where the input has none
    output_range: tuple[float, float] | None = None
    activation_bits: int = 8  # of those quantizers, as the Q/DQ pass quantizes activations
    up: np.ndarray | None = None  # [k, d_out], float: a token branch of rank k, ``weight`` its [d_in, k] down projection

    @property
    def rank(self) -> int | None:
        return None if self.up is None else self.up.shape[0]

    @property
    def int8(self) -> bool:
        return self.int8_scale is not None

    @property
    def num_parameters(self) -> int:
        """Stored parameters: a grouped branch stores only its diagonal blocks."""
        return self.weight.size // self.layout.groups + self.bias.size + (0 if self.up is None else self.up.size)


def name_prefix(branch: Branch) -> str:
    """The prefix of the names of every node the branch adds."""
    return f"{PREFIX}{branch.name}/"


class SpliceCompensationPass(ir.passes.InPlacePass):
    """Add each branch in parallel to its block."""

    def __init__(self, branches: list[Branch]):
        super().__init__()
        self.branches = branches

    def requires(self, model: ir.Model) -> None:
        values = g.values_by_name(model.graph)
        missing = sorted({name for b in self.branches for name in (b.input, b.output)} - set(values))
        if missing:
            raise ir.passes.PreconditionError(f"the graph has no tensor {', '.join(missing[:3])} that a branch reads or adds to")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = g.NameScope(graph)
        for branch in self.branches:
            values = g.values_by_name(graph)  # afresh: each splice hands names over to new tensors
            target = values[branch.output]
            # Read only through Q/DQ (a Conv output that QLinearConv will absorb): the branch is
            # added after the DQ, so the Conv keeps its quantizer and its fusion.
            target = g.quantized_only_view(target) or target
            _splice(graph, names, values[branch.input], target, branch)
        return ir.passes.PassResult(model, modified=bool(self.branches))


def _splice(graph: ir.Graph, names: g.NameScope, x: ir.Value, y: ir.Value, branch: Branch) -> None:
    scope = PREFIX + branch.name
    # a token branch's bias joins a constant the block output already adds where there is one: a kernel less
    tokens = not branch.layout.channels_first and not branch.layout.matrix
    absorbed = tokens and _bias_absorbed(graph, names, y, branch.bias, scope)
    bias = None if absorbed else names.initializer(f"{scope}/bias", branch.bias.astype(np.float32))
    nodes: list[ir.Node] = []
    if branch.int8 and g.dequantizer(x) is None:
        nodes += _quantizer(names, x, branch.input_range, branch, f"{scope}/input")
        x = nodes[-1].outputs[0]
    layout = branch.layout
    if layout.channels_first:
        if layout.cropping:
            x = _cropped(names, x, layout, f"{scope}/crop", nodes)
        rank, pad = layout.spatial_rank, layout.kernel // 2
        weight = _weight(names, branch, scope, nodes)
        conv = names.node(
            "Conv",
            [x, weight, bias],
            f"{scope}/branch",
            kernel_shape=[layout.kernel] * rank,
            strides=list(layout.strides),
            pads=[pad] * (2 * rank),
            group=layout.groups,
        )
        # onnxruntime quantizes a float bias on the accumulator's scale, which 16-bit inputs can overflow
        dq = qdq.int32_bias_dequantizer(graph, names, conv, only_overflowing=True) if branch.int8 and branch.target == Target.ORT else None
        nodes += [conv] if dq is None else [dq, conv]
        _typed_like(conv.outputs[0], y)
        if branch.output_range is not None:  # onnxruntime fuses QLinearConv only with it
            nodes += _quantizer(names, conv.outputs[0], branch.output_range, branch, f"{scope}/branch")
    else:
        weight = _weight(names, branch, scope, nodes)
        if branch.up is not None:
            nodes += _low_rank(names, x, weight, bias, y, branch, scope)
        elif layout.matrix:  # a dense layer's: onnxruntime would make the Gemm itself
            gemm = names.node("Gemm", [x, weight, bias], f"{scope}/branch")
            dq = qdq.int32_bias_dequantizer(graph, names, gemm) if branch.int8 and branch.target == Target.ORT else None
            nodes += [gemm] if dq is None else [dq, gemm]
            _typed_like(gemm.outputs[0], y)
        else:
            nodes.append(names.node("MatMul", [x, weight], f"{scope}/matmul"))
            if bias is not None:
                nodes.append(names.node("Add", [nodes[-1].outputs[0], bias], f"{scope}/branch"))
            for node in nodes[-2:] if bias is not None else nodes[-1:]:
                _typed_like(node.outputs[0], y)

    readers = list(y.uses())
    total = names.node("Add", [y, nodes[-1].outputs[0]], f"{scope}/output")
    total.outputs[0].type, total.outputs[0].shape = y.type, y.shape
    added = [*nodes, total]
    result = total.outputs[0]
    # Where the block output is a DQ output, the sum goes through the same quantizer again, so
    # that the quantized ops that read it still read a DequantizeLinear and stay fused.
    q = g.requantizer(y)
    if q is not None:
        dq = y.producer()
        again = names.node("QuantizeLinear", [result, *q.inputs[1:]], f"{scope}/requantized", **_attributes(q))
        again.outputs[0].dtype = q.outputs[0].dtype
        integers = [again]
        clip = g.narrowing(q)
        if clip is not None:
            integers.append(names.node("Clip", [again.outputs[0], *clip.inputs[1:]], f"{scope}/narrowed"))
            integers[-1].outputs[0].dtype = q.outputs[0].dtype
        back = names.node("DequantizeLinear", [integers[-1].outputs[0], *dq.inputs[1:]], f"{scope}/dequantized", **_attributes(dq))
        back.outputs[0].type, back.outputs[0].shape = y.type, y.shape
        added += [*integers, back]
        result = back.outputs[0]
    graph.insert_after(y.producer(), added)
    for node, index in readers:
        node.replace_input_with(index, result)
    # The compensated tensor takes over the name (and graph-output slot) of the one it replaces,
    # so that later branches and the model's users find it where they expect it.
    g.replace_graph_output(graph, y, result)
    original = y.name
    y.name = names.fresh(f"{scope}/uncompensated")
    result.name = original


def _low_rank(names: g.NameScope, x: ir.Value, down: ir.Value, bias: ir.Value | None, y: ir.Value, branch: Branch,
              scope: str) -> list[ir.Node]:
    """``(x @ down) @ up + bias``: the down projection in the branch's precision (an int8 one
    fuses into MatMulIntegerToFloat), the small up projection in float, which needs no quantizer
    for its input."""
    projected = names.node("MatMul", [x, down], f"{scope}/down")
    up = names.node("MatMul", [projected.outputs[0], names.initializer(f"{scope}/up_weight", branch.up.astype(np.float32))], f"{scope}/up")
    nodes = [projected, up] + ([names.node("Add", [up.outputs[0], bias], f"{scope}/branch")] if bias is not None else [])
    for node in nodes:
        _typed_like(node.outputs[0], y)
    return nodes


def _bias_absorbed(graph: ir.Graph, names: g.NameScope, y: ir.Value, bias: np.ndarray, scope: str) -> bool:
    """Whether ``bias`` (along the last axis) was added to a constant that ``y`` sums: the bias
    of the LayerNormalization or Add that computes it, or of one reached through Adds and through
    multiplications by constants, each read by nothing else (a transformer layer's ``x + λ ⊙
    (h @ W + c)``: ``c`` takes ``bias / λ``)."""
    found = _bias_slot(y, np.ones_like(bias, dtype=np.float64))
    if found is None:
        return False
    node, index, scale = found
    old = node.inputs[index]
    constant = ir.convenience.get_const_tensor(old).numpy()
    summed = (constant.astype(np.float64) + (bias * scale).reshape(constant.shape)).astype(constant.dtype)
    node.replace_input_with(index, names.initializer(f"{scope}/absorbed_bias", summed))
    g.drop_if_unused(graph, old)
    return True


def _bias_slot(value: ir.Value, scale: np.ndarray) -> tuple[ir.Node, int, np.ndarray] | None:
    """The node and input index of a constant that adds ``scale ⊙ bias`` to ``value`` when the
    bias is added to it, where there is one (see :func:`_bias_absorbed`)."""
    node, size = value.producer(), scale.size
    if node is None or not g.is_default_domain(node):
        return None
    constants = {i: ir.convenience.get_const_tensor(v) for i, v in enumerate(node.inputs) if g.is_constant(v)}
    along_last = {i: c for i, c in constants.items()
                  if c is not None and c.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16) and c.shape[-1:] == (size,)
                  and c.size == size}
    if node.op_type == "LayerNormalization" and len(node.inputs) == 3 and 2 in along_last:
        axis = node.attributes.get_int("axis", -1)
        rank = g.rank(node.inputs[0])
        return (node, 2, scale) if axis == -1 or (rank is not None and axis == rank - 1) else None
    if node.op_type == "Add" and along_last:
        return node, next(iter(along_last)), scale
    if node.op_type == "Mul" and len(constants) == 1:
        (i, factor), = constants.items()
        if factor is None or not (factor.size == 1 or i in along_last):
            return None
        factor = factor.numpy().astype(np.float64).reshape(-1)
        return _bias_slot_through(node.inputs[1 - i], node, scale / factor) if np.all(factor != 0) else None
    if node.op_type == "Add" and not constants:
        return next((slot for operand in node.inputs if (slot := _bias_slot_through(operand, node, scale))), None)
    return None


def _bias_slot_through(operand: ir.Value, reader: ir.Node, scale: np.ndarray) -> tuple[ir.Node, int, np.ndarray] | None:
    """:func:`_bias_slot` of ``operand``, where ``reader`` is all that reads it."""
    return _bias_slot(operand, scale) if g.only_reader(operand) is reader else None


def _cropped(names: g.NameScope, x: ir.Value, layout: Layout, base: str, nodes: list[ir.Node]) -> ir.Value:
    """``x`` without the layout's border (nodes appended to ``nodes``): the slice is taken of the
    quantized tensor behind ``x``'s DequantizeLinear, so that the branch still reads a DQ output."""
    cut = [(axis, before, after) for axis, (before, after) in enumerate(layout.crops, start=2) if before or after]
    dq = g.dequantizer(x)
    source = dq.inputs[0] if dq is not None else x
    if dq in nodes:  # the branch's own input quantizer: its DQ is replaced by the one after the slice
        nodes.remove(dq)
    bounds = [
        names.initializer(f"{base}/starts", np.array([before for _, before, _ in cut], np.int64)),
        names.initializer(f"{base}/ends", np.array([-after if after else np.iinfo(np.int64).max for *_, after in cut], np.int64)),
        names.initializer(f"{base}/axes", np.array([axis for axis, *_ in cut], np.int64)),
    ]
    crop = names.node("Slice", [source, *bounds], base)
    nodes.append(crop)
    if dq is None:
        return crop.outputs[0]
    again = names.node("DequantizeLinear", [crop.outputs[0], *dq.inputs[1:]], f"{base}/dequantized", **_attributes(dq))
    nodes.append(again)
    return again.outputs[0]


def _typed_like(value: ir.Value, model: ir.Value) -> None:
    """``value`` of ``model``'s element type. Its shape is left to onnxruntime's inference: an
    exporter's declared shapes can be wrong (a graph output declared [1, seqlen] that is
    [T, 1, classes]), and a rank copied from one decides onnxruntime's fusions wrongly."""
    value.type = model.type


def _weight(names: g.NameScope, branch: Branch, scope: str, nodes: list[ir.Node]) -> ir.Value:
    """The branch op's weight as a float initializer, or as int8 with the branch's scales behind
    a DequantizeLinear (appended to ``nodes``)."""
    layout = branch.layout
    weight = layout.op_weight(branch.weight.astype(np.float32))
    if not branch.int8:
        return names.initializer(f"{scope}/weight", weight)
    params = qm.QuantParams(branch.int8_scale, np.zeros(branch.int8_scale.shape, np.int8))
    nodes.append(qdq.dequantized_weight(names, weight, layout.op_weight_axis, f"{scope}/weight", params))
    return nodes[-1].outputs[0]


def _quantizer(names: g.NameScope, value: ir.Value, value_range: tuple[float, float], branch: Branch,
               base: str) -> list[ir.Node]:
    """QuantizeLinear → DequantizeLinear over ``value_range``, as the Q/DQ pass quantizes for the branch's target."""
    params = qm.activation_params(*value_range, branch.target == Target.TRT, branch.activation_bits)
    return list(qdq.quantize_dequantize(names, value, params, base))


def _attributes(node: ir.Node) -> dict:
    return {name: attr.value for name, attr in node.attributes.items()}

"""Q/DQ insertion: int8 per-channel weights, per-tensor activations.

Where the pairs go is :mod:`qwt_onnx.analysis.placement`'s ``place``.

Other widths are standard ONNX too: 6-bit weights are int8 holding -31..31, 4-bit
ones int4 (opset 21), each channel's clipping searched for the least rounding
error; 16-bit activations are uint16 (int16 for TensorRT's symmetric form, opset
21), and 4- or 6-bit ones uint8 (int8) narrowed by a Clip between the
QuantizeLinear and the DequantizeLinear.

Weight ranges: ``portable`` scales each output channel so that no two weights
that onnxruntime's x86 kernels without VNNI add in int16 can overflow it (all
but depthwise convolutions; see :mod:`qwt_onnx.numerics.saturation`); ``full`` uses
[-127, 127], exact only where the kernels accumulate in int32 (x86 with VNNI,
ARM, GPUs).

Bias correction: given the per-channel means of the weighted ops' inputs, the
mean output error of each weight's rounding is subtracted in the op's bias (a
Conv's or Gemm's own, a MatMul's following Add), so rounding adds noise but no
offset (Nagel et al., "Data-Free Quantization", 2019).

Rounding: to the nearest grid point, or, given the second moments of a weight's
inputs, with error feedback (GPTQ, :mod:`qwt_onnx.numerics.rounding`) on the same
grid, pair-safe weights kept pair-safe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qwt_onnx.analysis.placement import ActivationSite, Exclusions, WeightSite, place
from qwt_onnx.graph import query as g
from qwt_onnx.numerics import quantization as qm
from qwt_onnx.numerics import rounding, saturation
from qwt_onnx.options import Target, WeightRange


class InsertQdqPass(ir.passes.InPlacePass):
    """Insert QuantizeLinear/DequantizeLinear pairs with calibrated ranges."""

    def __init__(
        self,
        ranges: Mapping[str, tuple[float, float]],
        target: Target = Target.ORT,
        excluded: Exclusions = Exclusions(),
        weight_range: WeightRange = WeightRange.PORTABLE,
        input_means: Mapping[str, np.ndarray] | None = None,
        weight_bits: int = 8,
        activation_bits: int = 8,
        input_powers: Mapping[str, np.ndarray] | None = None,
        block_size: int = 0,
        feedback: Mapping[str, rounding.Feedback] | None = None,
        int8_residuals: bool = False,
        int8_silus: bool = False,
        float_hard_swishes: bool = False,
    ):
        super().__init__()
        self.ranges = ranges
        self.target = target
        self.excluded = excluded
        self.portable = weight_range == WeightRange.PORTABLE
        self.input_means = input_means or {}  # per-channel means of weighted ops' inputs, for bias correction
        self.weight_bits, self.activation_bits = weight_bits, activation_bits
        self.input_powers = input_powers or {}  # per-channel mean squares of their inputs: low-bit clipping weighs by them
        self.block_size = block_size  # of 4-bit MatMul weights, along K; 0: per output channel
        self.feedback = feedback or {}  # by weight, from its op's input second moments: rounding with error feedback
        self.int8_residuals = int8_residuals  # residual streams quantized for every reader (analysis.placement)
        self.int8_silus = int8_silus  # and the gates and products of SiLUs, hard-swishes and channel gates
        self.float_hard_swishes = float_hard_swishes  # ... but for the hard-swishes

    def requires(self, model: ir.Model) -> None:
        observed = place(model.graph, self.target, self.excluded, self.int8_residuals, self.int8_silus,
                         self.float_hard_swishes).observed_names
        missing = sorted(set(observed) - set(self.ranges))
        if missing:
            raise ir.passes.PreconditionError(f"no calibrated range for {len(missing)} tensor(s) to quantize: {', '.join(missing[:3])}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        placement = place(graph, self.target, self.excluded, self.int8_residuals, self.int8_silus, self.float_hard_swishes)
        names = g.NameScope(graph)
        # onnxruntime fuses a blocked int4 weight's DequantizeLinear and its MatMul into MatMulNBits,
        # which quantizes its input itself, and only where that input is float: weight-only
        blocked = {node for site in placement.weights if self._blocked(site) for node, _ in site.readers}
        for site in placement.weights:
            self._quantize_weight(graph, names, site)
        for site in placement.activations:
            site = dataclasses.replace(site, readers=[(node, i) for node, i in site.readers if node not in blocked])
            if site.readers:
                self._quantize_activation(graph, names, site)
        _requantize_reads_in_subgraphs(graph, names)
        if self.target == Target.ORT:
            for node in dict.fromkeys(node for site in placement.weights for node, _ in site.readers):
                if node.op_type in ("Gemm", "Conv"):  # a Conv's float bias onnxruntime quantizes itself, where it can
                    _quantize_bias(graph, names, node, only_overflowing=node.op_type == "Conv")
        modified = bool(placement.weights or placement.activations)
        return ir.passes.PassResult(model, modified=modified)

    def _quantize_weight(self, graph: ir.Graph, names: g.NameScope, site: WeightSite) -> None:
        array = site.weight.const_value.numpy().astype(np.float32)
        reader = site.readers[0][0]
        power = self.input_powers.get(reader.inputs[0].name)
        group = reader.attributes.get_int("group", 1) if reader.op_type == "Conv" else 1
        low_bit = power is not None and self.weight_bits < 8
        importance = qm.input_importance(array.shape, site.axis, power, group) if low_bit else None
        fed_back = self.feedback.get(site.weight.name)
        if self._blocked(site):
            params = qm.blocked_weight_params(array, self.block_size, self.weight_bits, importance)
            expanded = qm.expand_blocks(params, self.block_size)  # a step per weight, [K, N]
            rounded = self._rounded(array, 1, group, expanded.scale.T[None], fed_back, pair_safe=False)
            dq = dequantized_weight(names, array, 0, site.weight.name, params, self.block_size, rounded)
            error = array - qm.dequantize(dq.inputs[0].const_value.numpy(), expanded)
        else:
            pair_safe = self.portable and site.paired
            params = qm.symmetric_weight_params(array, site.axis, pair_safe, self.weight_bits, importance)
            steps = params.scale.reshape(group, -1, 1)  # a step per output channel, as weight_rows lays them out
            rounded = self._rounded(array, site.axis, group, steps, fed_back, pair_safe and self.weight_bits == 8)
            dq = dequantized_weight(names, array, site.axis, site.weight.name, params, quantized=rounded)
            error = array - qm.dequantize(dq.inputs[0].const_value.numpy(), params, site.axis)
        for node, _ in site.readers:
            mean = self.input_means.get(node.inputs[0].name)
            if mean is not None:
                group = node.attributes.get_int("group", 1) if node.op_type == "Conv" else 1
                _add_to_bias(graph, names, node, qm.rounding_bias(error, site.axis, mean, group))
        graph.insert_before(site.readers[0][0], dq)
        for node, index in site.readers:
            node.replace_input_with(index, dq.outputs[0])
        if not site.weight.uses() and site.weight.name in graph.initializers:
            graph.initializers.pop(site.weight.name)

    def _rounded(self, array: np.ndarray, axis: int, group: int, steps: np.ndarray, fed_back: rounding.Feedback | None,
                 pair_safe: bool) -> np.ndarray | None:
        """``array`` rounded with error feedback on the grid ``steps`` (``[groups, rows, 1 or inputs]``),
        or None (nearest) where its inputs' second moments were not taken."""
        if fed_back is None:
            return None
        top = qm.integer_range(self.weight_bits, signed=True)[1]
        rows = rounding.weight_rows(array, axis, group)
        partners = rounding.pair_partners(array.shape, axis) if pair_safe else None
        limit = saturation.PAIR_LIMIT if pair_safe else None
        return rounding.rows_to_weight(rounding.error_feedback_rounding(rows, fed_back, steps, top, limit, partners), array.shape, axis)

    def _blocked(self, site: WeightSite) -> bool:
        """Whether ``site`` takes blocked scales: a MatMul's [K, N] weight whose K the blocks divide."""
        shape = site.weight.const_value.shape
        return (self.block_size > 0 and len(shape) == 2 and site.axis == 1 and shape[0] % self.block_size == 0
                and all(node.op_type == "MatMul" for node, _ in site.readers))

    def _quantize_activation(self, graph: ir.Graph, names: g.NameScope, site: ActivationSite) -> None:
        low, high = self.ranges[site.observed.name]
        params = qm.activation_params(low, high, self.target == Target.TRT, self.activation_bits)
        nodes = quantize_dequantize(names, site.value, params, site.observed.name)
        dq = nodes[-1]
        g.insert_after_producer(graph, site.value, nodes)
        for node, index in site.readers:
            node.replace_input_with(index, dq.outputs[0])
        if site.absorbed is not None:
            g.replace_graph_output(graph, site.observed, dq.outputs[0])
            graph.remove(site.absorbed, safe=True)
            # the tensor keeps its name and its declared shape (a graph output's: the user's interface), now quantized
            dq.outputs[0].name, dq.outputs[0].shape = site.observed.name, site.observed.shape


# The ops that onnxruntime's QDQPropagationTransformer moves a DequantizeLinear past, as it moves
# the op into the integer domain.
_PROPAGATED_PAST = frozenset({"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice"})


def _requantize_reads_in_subgraphs(graph: ir.Graph, names: g.NameScope) -> None:
    """Where a dequantized tensor reaches a subgraph (an If's branch, a Loop's body) through ops
    that only move its values (a Transpose, a Reshape, ...), the subgraph reads those ops' output
    through a QuantizeLinear/DequantizeLinear pair of the same parameters, lossless. onnxruntime
    (1.32) moves a DequantizeLinear forward past such ops until it meets a QuantizeLinear, and
    where it meets a subgraph's read instead it aborts the process (Silero VAD v4's LSTM branch
    reads its encoder's last convolution output, transposed)."""
    for dq in [node for node in graph if node.op_type == "DequantizeLinear" and _per_tensor(node)]:  # as onnxruntime moves
        pending = [dq.outputs[0]]
        while pending:
            value = pending.pop()
            moved = [use.node for use in value.uses() if use.node.graph is graph and use.node.op_type in _PROPAGATED_PAST
                     and use.idx == 0 and g.is_default_domain(use.node)]
            for node in moved:
                output = node.outputs[0]
                inside = [(use.node, use.idx) for use in output.uses() if use.node.graph is not graph]
                if inside:
                    base = names.fresh(f"{output.name}_requantized")
                    q = names.node("QuantizeLinear", [output, *dq.inputs[1:]], f"{base}_quantized")
                    again = names.node("DequantizeLinear", [q.outputs[0], *dq.inputs[1:]], f"{base}_dequantized")
                    q.outputs[0].dtype, again.outputs[0].dtype = dq.inputs[0].dtype, output.dtype
                    graph.insert_after(node, [q, again])
                    for reader, index in inside:
                        reader.replace_input_with(index, again.outputs[0])
                pending.append(output)


def _per_tensor(dq: ir.Node) -> bool:
    scale = dq.inputs[1] if len(dq.inputs) > 1 else None
    return scale is not None and scale.const_value is not None and scale.const_value.size == 1


def _add_to_bias(graph: ir.Graph, names: g.NameScope, node: ir.Node, delta: np.ndarray) -> None:
    """Add the per-output-channel ``delta`` to ``node``'s bias: a Conv's or Gemm's own (given one
    where it has none), or the constant of the Add that alone reads a MatMul's output; nothing
    where there is no such constant."""
    holder, slot = node, 2
    if node.op_type == "MatMul":
        uses = list(node.outputs[0].uses())
        if len(uses) != 1 or node.outputs[0].is_graph_output() or uses[0][0].op_type != "Add":
            return
        holder, slot = uses[0][0], 1 - uses[0][1]
    elif node.op_type == "Gemm":
        delta = delta / node.attributes.get_float("beta", 1.0)
    bias = holder.inputs[slot] if slot < len(holder.inputs) else None
    if bias is not None and (bias.const_value is None or bias.const_value.shape[-1:] not in ((), (1,), (delta.size,))):
        return
    base = bias.const_value.numpy() if bias is not None else np.zeros(delta.shape, np.float32)
    corrected = names.initializer(f"{bias.name if bias is not None else node.name + '_bias'}_corrected", (base + delta).astype(base.dtype))
    if slot >= len(holder.inputs):
        holder.resize_inputs(slot + 1)
    holder.replace_input_with(slot, corrected)
    if bias is not None and not bias.uses() and bias.name in graph.initializers:
        graph.initializers.pop(bias.name)


def _quantize_bias(graph: ir.Graph, names: g.NameScope, node: ir.Node, only_overflowing: bool = False) -> None:
    dq = int32_bias_dequantizer(graph, names, node, only_overflowing)
    if dq is not None:
        graph.insert_before(node, dq)


def int32_bias_dequantizer(graph: ir.Graph, names: g.NameScope, node: ir.Node, only_overflowing: bool = False) -> ir.Node | None:
    """A DequantizeLinear of a Gemm's or Conv's float bias stored as int32, wired in as its bias
    in place of the float one (the caller inserts the node), where its input and weight are
    dequantized; None where they are not. onnxruntime fuses a QDQ Gemm into QGemm only with
    every input quantized (quantize_static writes biases so too); it gives the bias that form
    itself only to a Gemm whose output it quantizes, and a dense layer's output is left float.
    ``only_overflowing``: only where onnxruntime's own quantization of the float bias (at the
    accumulator's scale, which it does not check) would overflow int32."""
    x, w = g.dequantizer(node.inputs[0]), g.dequantizer(node.inputs[1])
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if x is None or w is None or bias is None or bias.const_value is None or node.attributes.get_float("alpha", 1.0) != 1.0:
        return None
    input_scale, weight_scale = (ir.convenience.get_const_tensor(dq.inputs[1]) for dq in (x, w))
    array = bias.const_value.numpy()
    if input_scale is None or weight_scale is None or input_scale.size != 1 or array.ndim != 1:
        return None
    if weight_scale.size not in (1, array.size):
        return None
    beta = node.attributes.get_float("beta", 1.0) if node.op_type == "Gemm" else 1.0
    input_scale = input_scale.numpy().reshape(())
    if only_overflowing and not qm.int32_bias_overflows(beta * array, input_scale, weight_scale.numpy()):
        return None
    quantized, params = qm.int32_bias(beta * array, input_scale, weight_scale.numpy())
    inputs = [names.initializer(f"{bias.name}_quantized", quantized), names.initializer(f"{bias.name}_scale", params.scale)]
    dq = names.node("DequantizeLinear", inputs, f"{bias.name}_dequantized", axis=0)
    dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(array.shape)
    node.replace_input_with(2, dq.outputs[0])
    if node.op_type == "Gemm":
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    if not bias.uses() and bias.name in graph.initializers:
        graph.initializers.pop(bias.name)
    return dq


def storage_type(params: qm.QuantParams) -> ir.DataType | None:
    """The ONNX type of ``params``' integers where numpy's differs: INT4 / UINT4 at 4 bits."""
    if params.bits != 4:
        return None
    return ir.DataType.INT4 if np.issubdtype(params.dtype, np.signedinteger) else ir.DataType.UINT4


def dequantized_weight(names: g.NameScope, array: np.ndarray, axis: int, base: str, params: qm.QuantParams,
                       block_size: int = 0, quantized: np.ndarray | None = None) -> ir.Node:
    """A DequantizeLinear of ``array`` stored as int8 (int4 at 4 bits) with per-channel ``params``
    along ``axis``, or with ``block_size``, blocked ones along ``axis``; rounded to nearest, or
    the integers ``quantized`` where given."""
    stored = storage_type(params)
    if quantized is not None:
        quantized = quantized.astype(params.dtype)
    elif block_size:
        quantized = qm.quantize(array, qm.expand_blocks(params, block_size))
    else:
        quantized = qm.quantize(array, params, axis)
    inputs = [
        names.initializer(f"{base}_quantized", quantized, stored),
        names.initializer(f"{base}_scale", params.scale),
        names.initializer(f"{base}_zero_point", params.zero_point, stored),
    ]
    blocks = {"block_size": block_size} if block_size else {}
    dq = names.node("DequantizeLinear", inputs, f"{base}_dequantized", axis=axis, **blocks)
    dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(array.shape)
    return dq


def quantize_dequantize(names: g.NameScope, value: ir.Value, params: qm.QuantParams, base: str) -> list[ir.Node]:
    """QuantizeLinear → DequantizeLinear of ``value`` with ``params`` (not yet in the graph); where
    ``params`` are narrower than their type (4 or 6 bits held in 8), a Clip between them saturates
    at their range, as PyTorch's exporter writes a reduced range (onnxruntime cannot run uint4
    activations through its graph optimisations: it moves the DequantizeLinear past a MaxPool
    that has no uint4 kernel)."""
    scale = names.initializer(f"{base}_scale", params.scale)
    zero_point = names.initializer(f"{base}_zero_point", params.zero_point)
    q = names.node("QuantizeLinear", [value, scale, zero_point], f"{base}_quantized")
    q.outputs[0].dtype = zero_point.dtype
    nodes = [q]
    if params.bits is not None and params.bits < params.dtype.itemsize * 8:
        bounds = [names.initializer(f"{base}_{end}", np.array(limit, params.dtype)) for end, limit in zip(("low", "high"), params.limits)]
        clip = names.node("Clip", [q.outputs[0], *bounds], f"{base}_narrowed")
        clip.outputs[0].dtype = zero_point.dtype
        nodes.append(clip)
    dq = names.node("DequantizeLinear", [nodes[-1].outputs[0], scale, zero_point], f"{base}_dequantized")
    for node in nodes:
        node.outputs[0].shape = value.shape
    dq.outputs[0].shape, dq.outputs[0].dtype = value.shape, value.dtype
    return [*nodes, dq]

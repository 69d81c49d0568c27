"""Q/DQ insertion: int8 per-channel weights, per-tensor activations.

Placement, per target:

* weights of Conv (axis 0), MatMul (last axis) and Gemm (axis 0 with transB,
  else 1): int8 symmetric per output channel, stored as int8 initializers
  behind a DequantizeLinear;
* the data input of each of those ops: per-tensor Q/DQ, shared by all the
  weighted ops that read the tensor (other readers keep the float tensor);
* ``ort`` only: the outputs of Conv and Gemm, so that onnxruntime fuses them
  into QLinearConv / QGemm (MatMul fuses into MatMulIntegerToFloat without
  it). A Relu that is the sole reader of such an output is absorbed into the
  quantizer (zero point at 0 clamps exactly like Relu), as onnxruntime's own
  quantizer does. Residual Adds, pools and Concats whose inputs are such
  outputs and whose output feeds a quantizer then fuse into QLinearAdd,
  QLinearGlobalAveragePool and QLinearConcat without quantizers of their own.

Nothing else is quantized: LayerNorm, Softmax, GELU and attention-score
MatMuls (two activations) stay float. Quantizing them is what onnxruntime's
quantize_static does, and on MiniLM it costs 20 dB of fidelity (4.3 against
24.5 dB) and runs no faster (docs/BENCHMARKS.md).

``ort`` uses uint8 asymmetric activations; ``trt`` int8 symmetric ones with
zero point 0 and leaves biases in float, as TensorRT's parser requires.
Weighted ops matched by an ``Exclusions`` keep float weights and inputs.

Weight ranges: ``portable`` scales each output channel so that no two weights
that onnxruntime's x86 kernels without VNNI add in int16 can overflow it (all
but depthwise convolutions; see :mod:`qwt_onnx.saturation`); ``full`` uses
[-127, 127], exact only where the kernels accumulate in int32 (x86 with VNNI,
ARM, GPUs).

Bias correction: given the per-channel means of the weighted ops' inputs, the
mean output error of each weight's rounding is subtracted in the op's bias (a
Conv's or Gemm's own, a MatMul's following Add), so rounding adds noise but no
offset (Nagel et al., "Data-Free Quantization", 2019).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qwt_onnx import quantization as qm
from qwt_onnx import saturation
from qwt_onnx.options import Target, WeightRange
from qwt_onnx.passes import graph as g


@dataclasses.dataclass
class ActivationSite:
    """One activation quantizer: ``value`` is quantized, its ``readers`` read the DQ output."""

    value: ir.Value
    observed: ir.Value  # the tensor whose range is calibrated
    readers: list[tuple[ir.Node, int]]
    absorbed: ir.Node | None = None  # a Relu replaced by the quantizer's clamp


@dataclasses.dataclass
class WeightSite:
    weight: ir.Value
    axis: int
    readers: list[tuple[ir.Node, int]]
    paired: bool = False  # some reader's kernel adds products in int16 pairs (not depthwise)


@dataclasses.dataclass
class Placement:
    weights: list[WeightSite]
    activations: list[ActivationSite]

    @property
    def observed_names(self) -> list[str]:
        return [site.observed.name for site in self.activations]

    def channel_axes(self) -> dict[str, int]:
        """The data input of every op with a quantized weight, and its channel axis: whose mean
        bias correction needs."""
        axes = {}
        for site in self.weights:
            for node, _ in site.readers:
                axis = _input_channel_axis(node)
                if axis is not None:
                    axes[node.inputs[0].name] = axis
        return axes


@dataclasses.dataclass(frozen=True)
class Exclusions:
    """Weighted ops to leave in float: node names and op types, each a regular expression
    that must match the whole name (a plain name matches itself)."""

    nodes: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ()

    def excludes(self, node: ir.Node) -> bool:
        return any(re.fullmatch(p, node.name or "") for p in self.nodes) or any(
            re.fullmatch(p, node.op_type) for p in self.op_types
        )

    def unmatched(self, graph: ir.Graph) -> list[str]:
        """The patterns that match no weighted op of ``graph`` (most likely typos)."""
        weighted = [n for n in graph if g.is_weighted(n)]
        return [p for p in self.nodes if not any(re.fullmatch(p, n.name or "") for n in weighted)] + [
            p for p in self.op_types if not any(re.fullmatch(p, n.op_type) for n in weighted)
        ]


def weight_axis(node: ir.Node, weight: ir.Value) -> int | None:
    """The output-channel axis of a weighted op's weight, None where there is none."""
    rank = len(weight.const_value.shape)
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = node.attributes.get_int("transB", 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul" and rank >= 2:
        return rank - 1
    return None


def place(graph: ir.Graph, target: Target, excluded: Exclusions = Exclusions()) -> Placement:
    """Where the quantizers go in ``graph`` for ``target``."""
    weighted = [n for n in graph if g.is_weighted(n) and not excluded.excludes(n)]
    weights: dict[ir.Value, WeightSite] = {}
    for node in weighted:
        weight = g.weight_input(node)
        axis = weight_axis(node, weight)
        if axis is None:
            continue
        site = weights.setdefault(weight, WeightSite(weight, axis, []))
        if site.axis == axis:  # a weight shared along another axis stays float for that reader
            site.readers.append((node, g.WEIGHTED_OPS[node.op_type]))
            group = node.attributes.get_int("group", 1) if node.op_type == "Conv" else 1
            site.paired |= saturation.kernel_pairs_products(weight.const_value.shape, group)

    sites: dict[ir.Value, ActivationSite] = {}
    dequantized: set[ir.Value] = set()  # values whose readers will all read a DQ output
    if target == Target.ORT:
        for node in weighted:
            if node.op_type in ("Conv", "Gemm") and not node.outputs[0].is_graph_output():
                site = _output_site(node.outputs[0])
                sites[site.value] = site
                dequantized.add(site.observed)
    for node in weighted:
        x = node.inputs[0]
        if x in dequantized or g.dequantizer(x) is not None:
            continue
        sites.setdefault(x, ActivationSite(x, x, [])).readers.append((node, 0))
    return Placement(list(weights.values()), list(sites.values()))


def _input_channel_axis(node: ir.Node) -> int | None:
    """The axis of ``node``'s data input that its weight reduces over, None for batched weights."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transA", 0) else 1
    return -1 if len(g.weight_input(node).const_value.shape) == 2 else None


def _output_site(value: ir.Value) -> ActivationSite:
    consumers = value.consumers()
    if len(consumers) == 1 and consumers[0].op_type == "Relu" and g.is_default_domain(consumers[0]):
        relu = consumers[0]
        if not relu.outputs[0].is_graph_output():
            return ActivationSite(value, relu.outputs[0], list(relu.outputs[0].uses()), absorbed=relu)
    return ActivationSite(value, value, list(value.uses()))


class InsertQdqPass(ir.passes.InPlacePass):
    """Insert QuantizeLinear/DequantizeLinear pairs with calibrated ranges."""

    def __init__(
        self,
        ranges: Mapping[str, tuple[float, float]],
        target: Target = Target.ORT,
        excluded: Exclusions = Exclusions(),
        weight_range: WeightRange = WeightRange.PORTABLE,
        input_means: Mapping[str, np.ndarray] | None = None,
    ):
        super().__init__()
        self.ranges = ranges
        self.target = target
        self.excluded = excluded
        self.portable = weight_range == WeightRange.PORTABLE
        self.input_means = input_means or {}  # per-channel means of weighted ops' inputs, for bias correction

    def requires(self, model: ir.Model) -> None:
        missing = sorted(set(place(model.graph, self.target, self.excluded).observed_names) - set(self.ranges))
        if missing:
            raise ir.passes.PreconditionError(f"no calibrated range for {len(missing)} tensor(s) to quantize: {', '.join(missing[:3])}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        placement = place(graph, self.target, self.excluded)
        names = g.NameScope(graph)
        for site in placement.weights:
            self._quantize_weight(graph, names, site)
        for site in placement.activations:
            self._quantize_activation(graph, names, site)
        modified = bool(placement.weights or placement.activations)
        return ir.passes.PassResult(model, modified=modified)

    def _quantize_weight(self, graph: ir.Graph, names: g.NameScope, site: WeightSite) -> None:
        array = site.weight.const_value.numpy().astype(np.float32)
        params = qm.symmetric_weight_params(array, site.axis, pair_safe=self.portable and site.paired)
        dq = dequantized_weight(names, array, site.axis, site.weight.name, params)
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

    def _quantize_activation(self, graph: ir.Graph, names: g.NameScope, site: ActivationSite) -> None:
        low, high = self.ranges[site.observed.name]
        params = qm.activation_params(low, high, symmetric=self.target == Target.TRT)
        q, dq = quantize_dequantize(names, site.value, params, site.observed.name)
        g.insert_after_producer(graph, site.value, [q, dq])
        for node, index in site.readers:
            node.replace_input_with(index, dq.outputs[0])
        if site.absorbed is not None:
            graph.remove(site.absorbed, safe=True)
            dq.outputs[0].name = site.observed.name  # the tensor keeps its name, now quantized


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


def dequantized_weight(names: g.NameScope, array: np.ndarray, axis: int, base: str, params: qm.QuantParams) -> ir.Node:
    """A DequantizeLinear of ``array`` stored as int8 with per-channel ``params`` along ``axis``."""
    inputs = [
        names.initializer(f"{base}_quantized", qm.quantize(array, params, axis)),
        names.initializer(f"{base}_scale", params.scale),
        names.initializer(f"{base}_zero_point", params.zero_point),
    ]
    dq = names.node("DequantizeLinear", inputs, f"{base}_dequantized", axis=axis)
    dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(array.shape)
    return dq


def quantize_dequantize(names: g.NameScope, value: ir.Value, params: qm.QuantParams, base: str) -> tuple[ir.Node, ir.Node]:
    """QuantizeLinear → DequantizeLinear of ``value`` with ``params`` (not yet in the graph)."""
    scale = names.initializer(f"{base}_scale", params.scale)
    zero_point = names.initializer(f"{base}_zero_point", params.zero_point)
    q = names.node("QuantizeLinear", [value, scale, zero_point], f"{base}_quantized")
    dq = names.node("DequantizeLinear", [q.outputs[0], scale, zero_point], f"{base}_dequantized")
    q.outputs[0].dtype = ir.DataType.from_numpy(params.zero_point.dtype)
    q.outputs[0].shape = dq.outputs[0].shape = value.shape
    dq.outputs[0].dtype = value.dtype
    return q, dq

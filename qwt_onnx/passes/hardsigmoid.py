"""Hard-swish as ``x · HardSigmoid(x)``, and a quantized HardSigmoid written as the Add that
onnxruntime runs on uint8.

Exporters write hard-swish three ways: ONNX's HardSwish (opset 14; onnxruntime expands it
into HardSigmoid and Mul), HardSigmoid and Mul, or spelt out as ``x · clip(x + 3, 0, 6) / 6``
(Paddle's exports: an Add, a Clip, a Mul and a Div). :class:`HardSwishAsProductPass` writes
all three as the second, so that one placement rule (a gated product,
:func:`~qwt_onnx.graph.query.gate_of`) sees them.

``HardSigmoid(x) = clip(α·x + β, 0, 1)``. Where ``x`` is a dequantized tensor and the
output is quantized on a grid whose lowest integer is 0 and whose highest is at most 1,
the QuantizeLinear saturates exactly where the clip would, so the op is an Add:
``Q(DQ'(x_q) + β)``, with ``DQ'`` reading ``x_q`` on the scale ``α·s``. onnxruntime has no
integer HardSigmoid (it runs DequantizeLinear, HardSigmoid and QuantizeLinear over the whole
map) but fuses that Add into QLinearAdd. Hard-swish, ``x · HardSigmoid(x)`` with its gate and
product quantized (``--residuals int8``), then runs as QLinearAdd and QLinearMul: on a
16×64×80×80 map 1.0 ms against 11.3 in float (HardSigmoid and Mul between a DequantizeLinear
and a QuantizeLinear) and 8.8 as one HardSwish, within one integer step of the float result.
The values are those of the graph before, up to float rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwt_onnx.graph import query as g

_TOLERANCE = 1e-6  # relative, on the top of the output grid (1/255 in float32 times 255)
_CONSTANT_TOLERANCE = 1e-4  # relative, on an exporter's constants (1/6 written to float32 precision)
HARD_SWISH = (1 / 6, 0.5)  # HardSwish's HardSigmoid: alpha, beta
HARD_SWISH_OPSET = 14


class HardSwishAsProductPass(ir.passes.InPlacePass):
    """Each HardSwish, and each ``clip(x + b, 0, c) / c`` (a Div by ``c`` or a Mul by ``1/c``,
    before or after a Mul by ``x``), written as ``x · HardSigmoid(x)`` or ``HardSigmoid(x)``
    with ``α = 1/c``, ``β = b/c``; the last node's output keeps its name."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = g.NameScope(graph)
        found = [match for node in graph if (match := _hard_swish(node) or _spelt_hard_sigmoid(node)) is not None]
        for x, nodes, product, (alpha, beta) in found:
            gate = names.node("HardSigmoid", [x], f"{nodes[-1].outputs[0].name}_gate", alpha=alpha, beta=beta)
            gate.outputs[0].shape, gate.outputs[0].type = x.shape, x.type
            new = [gate, ir.node("Mul", [x, gate.outputs[0]], name=nodes[-1].name)] if product else [gate]
            ir.convenience.replace_nodes_and_values(graph, nodes[-1], nodes, new, nodes[-1].outputs, new[-1].outputs)
        return ir.passes.PassResult(model, modified=bool(found))


Match = tuple[ir.Value, list[ir.Node], bool, tuple[float, float]]  # x, the nodes, whether x multiplies, (α, β)


def _hard_swish(node: ir.Node) -> Match | None:
    if node.op_type != "HardSwish" or not g.is_default_domain(node):
        return None
    return node.inputs[0], [node], True, HARD_SWISH


def _spelt_hard_sigmoid(clip: ir.Node) -> Match | None:
    """``clip(x + b, 0, c)`` read only by a division by ``c``, or by ``x · `` and then that division."""
    if clip.op_type != "Clip" or not g.is_default_domain(clip) or len(clip.inputs) != 3:
        return None
    low, high = (g.scalar(v) for v in clip.inputs[1:])
    add = clip.inputs[0].producer()
    if low != 0 or high is None or high <= 0 or add is None or add.op_type != "Add" or not g.is_default_domain(add):
        return None
    offsets = [g.scalar(v) for v in add.inputs]
    if len(add.inputs) != 2 or sum(b is not None for b in offsets) != 1 or g.only_reader(add.outputs[0]) is not clip:
        return None
    x, offset = (add.inputs[0], offsets[1]) if offsets[1] is not None else (add.inputs[1], offsets[0])
    gate = (1 / high, offset / high)
    reader = g.only_reader(clip.outputs[0])
    if _divides_by(reader, clip.outputs[0], high):
        return x, [add, clip, reader], False, gate
    if reader is None or reader.op_type != "Mul" or not g.is_default_domain(reader) or list(reader.inputs).count(x) != 1:
        return None
    last = g.only_reader(reader.outputs[0])
    return (x, [add, clip, reader, last], True, gate) if _divides_by(last, reader.outputs[0], high) else None


def _divides_by(node: ir.Node | None, value: ir.Value, c: float) -> bool:
    """Whether ``node`` computes ``value / c`` (a Div, or a Mul by ``1/c``)."""
    if node is None or not g.is_default_domain(node) or len(node.inputs) != 2:
        return False
    if node.op_type == "Div":
        return node.inputs[0] is value and _near(g.scalar(node.inputs[1]), c)
    other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
    return node.op_type == "Mul" and value in node.inputs and _near(g.scalar(other), 1 / c)


def _near(value: float | None, target: float) -> bool:
    return value is not None and abs(value - target) <= _CONSTANT_TOLERANCE * abs(target)



class FuseDequantizedHardSwishPass(ir.passes.InPlacePass):
    """Each ``x · HardSigmoid(x)`` of HardSwish's constants whose gate is float (left so by
    ``--residuals``) and whose ``x`` is a DequantizeLinear's output written back as one HardSwish
    node (from opset 14), its output keeping the Mul's name. onnxruntime gives each reader of a
    DequantizeLinear a copy of its own before it fuses anything: the HardSigmoid and the Mul
    would each dequantize the map, where a HardSwish, which onnxruntime expands only after, does
    it once (PP-OCRv5's recogniser: 28 DequantizeLinears more)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if g.opset(model) < HARD_SWISH_OPSET:
            return ir.passes.PassResult(model, False)
        graph = model.graph
        found = [(node, gate) for node in graph if (gate := _dequantized_hard_swish_gate(node)) is not None]
        for mul, gate in found:
            fused = ir.node("HardSwish", [gate.inputs[0]], name=mul.name)
            ir.convenience.replace_nodes_and_values(graph, mul, [gate, mul], [fused], mul.outputs, fused.outputs)
        return ir.passes.PassResult(model, modified=bool(found))


def _dequantized_hard_swish_gate(mul: ir.Node) -> ir.Node | None:
    """The HardSigmoid of ``mul = x · HardSigmoid(x)`` with HardSwish's constants, read by ``mul``
    alone, where ``x`` is dequantized; else None."""
    if mul.op_type != "Mul" or not g.is_default_domain(mul) or len(mul.inputs) != 2:
        return None
    for x, gate in (mul.inputs, mul.inputs[::-1]):
        node = gate.producer() if gate is not None else None
        if node is None or node.op_type != "HardSigmoid" or not g.is_default_domain(node) or node.inputs[0] is not x:
            continue
        constants = (node.attributes.get_float("alpha", 0.2), node.attributes.get_float("beta", 0.5))
        if all(map(_near, constants, HARD_SWISH)) and g.only_reader(gate) is mul and g.dequantizer(x) is not None:
            return node
    return None


class IntegerHardSigmoidPass(ir.passes.InPlacePass):
    """Each HardSigmoid between a per-tensor DequantizeLinear and a QuantizeLinear that
    clips at 0 and 1 (and that alone reads it) replaced by an Add of ``β`` to ``x_q``
    dequantized on ``α`` times its scale."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        found = [node for node in graph if _written_as_add(node)]
        names = g.NameScope(graph)
        for node in found:
            _replace_by_add(graph, node, names)
        return ir.passes.PassResult(model, modified=bool(found))


def _written_as_add(node: ir.Node) -> bool:
    if node.op_type != "HardSigmoid" or not g.is_default_domain(node) or node.attributes.get_float("alpha", 0.2) <= 0:
        return False
    if node.attributes.get_float("beta", 0.5) == 0:  # nothing to add: a rescaling, which no integer kernel runs
        return False
    dq, q = g.dequantizer(node.inputs[0]), g.only_reader(node.outputs[0])
    read = _per_tensor(dq) if dq is not None else None
    if read is None or q is None:
        return False
    params = g.quantizer_params(q) if q.op_type == "QuantizeLinear" else None
    if params is None or params.dtype != read[2]:  # onnxruntime adds two tensors of one type
        return False
    low, high = params.limits
    return int(params.zero_point) == low and (high - low) * float(params.scale) <= 1 + _TOLERANCE


def _per_tensor(dq: ir.Node) -> tuple[np.ndarray, ir.Value | None, np.dtype] | None:
    """The constant scalar scale of ``dq``, its zero point input and the integers' type; None
    where it is per channel."""
    scale = ir.convenience.get_const_tensor(dq.inputs[1]) if g.is_constant(dq.inputs[1]) else None
    zero_point = dq.inputs[2] if len(dq.inputs) > 2 else None
    if zero_point is None:
        return (scale.numpy().reshape(()), None, np.dtype(np.uint8)) if scale is not None and scale.size == 1 else None
    zero = ir.convenience.get_const_tensor(zero_point) if g.is_constant(zero_point) else None
    if scale is None or scale.size != 1 or zero is None:
        return None
    return scale.numpy().reshape(()), zero_point, zero.numpy().dtype


def _replace_by_add(graph: ir.Graph, node: ir.Node, names: g.NameScope) -> None:
    alpha, beta = node.attributes.get_float("alpha", 0.2), node.attributes.get_float("beta", 0.5)
    dq = g.dequantizer(node.inputs[0])
    scale, zero_point, dtype = _per_tensor(dq)
    x_q = dq.inputs[0]
    scaled_scale = names.initializer(f"{x_q.name}_scale_x_alpha", np.asarray(scale * np.float32(alpha), np.float32))
    scaled = names.node("DequantizeLinear", [x_q, scaled_scale, zero_point], f"{x_q.name}_x_alpha")
    offset = names.node("DequantizeLinear", _exact_scalar(beta, dtype, names, node.name), f"{node.name}_beta")
    add = ir.node("Add", [scaled.outputs[0], offset.outputs[0]], name=node.name)
    ir.convenience.replace_nodes_and_values(graph, node, [node], [scaled, offset, add], node.outputs, add.outputs)


def _exact_scalar(value: float, dtype: np.dtype, names: g.NameScope, base: str) -> list[ir.Value]:
    """A DequantizeLinear's inputs that give ``value`` exactly: one step of ``|value|`` from the
    zero point, in ``dtype`` (an Add that onnxruntime fuses reads both operands in one type)."""
    signed = np.issubdtype(dtype, np.signedinteger)
    integer, zero_point = (np.sign(value), 0) if signed or value > 0 else (0, 1)
    return [names.initializer(f"{base}_beta_q", np.asarray(integer, dtype)),
            names.initializer(f"{base}_beta_scale", np.asarray(abs(value), np.float32)),
            names.initializer(f"{base}_beta_zero_point", np.asarray(zero_point, dtype))]

"""Exact GELUs that read a dequantized tensor, written as the one Gelu node onnxruntime would fuse.

An exporter below opset 20 spells GELU out: ``x · ½(1 + erf(x / √2))`` in a Div (or Mul),
an Erf, an Add and two Muls, with ``x`` read twice. onnxruntime fuses them into one Gelu
kernel in an FP32 model, but before fusing a QDQ model it gives each reader of a
DequantizeLinear a copy of its own (its EnsureUniqueDQForNodeUnit transformer): the Div and
the Mul then read two tensors, the fusion no longer matches, and the five ops run as five
float kernels. On PP-OCRv6's tiny detector, whose convolutions feed their GELUs directly,
its INT8 model ran at 1.22x FP32's latency at batch 1, and at 1.00x with each GELU one node,
which runs as FP32's does, between the DequantizeLinear and the QuantizeLinear.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from qwt_onnx.graph import query as g

GELU_OPSET = 20  # ONNX's Gelu; before it, onnxruntime's own (com.microsoft), which its fusion writes
MS_DOMAIN = "com.microsoft"
_TOLERANCE = 1e-4  # relative, on the constants (exporters write √2 and 1/√2 to float32 precision)


class FuseDequantizedGeluPass(ir.passes.InPlacePass):
    """Each exact GELU whose input is a DequantizeLinear's output replaced by one Gelu node,
    its output keeping the name the last Mul gave it."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        found = [gelu for node in graph if node.op_type == "Erf" and (gelu := _exact_gelu(node)) is not None]
        found = [(x, nodes, y) for x, nodes, y in found if g.dequantizer(x) is not None]
        if not found:
            return ir.passes.PassResult(model, False)
        domain = "" if g.opset(model) >= GELU_OPSET else MS_DOMAIN
        if domain == MS_DOMAIN:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        for x, nodes, y in found:
            constants = [v for node in nodes for v in node.inputs if v.is_initializer()]
            gelu = ir.node("Gelu", [x], domain=domain, name=nodes[-1].name)
            ir.convenience.replace_nodes_and_values(graph, nodes[-1], nodes, [gelu], [y], gelu.outputs)
            for value in constants:
                if not value.uses() and value.name in graph.initializers and not value.is_graph_input():
                    graph.initializers.pop(value.name)
        return ir.passes.PassResult(model, True)


def exact_gelu_of(value: ir.Value) -> list[ir.Node] | None:
    """The nodes of the exact GELU of ``value`` where they are all that read it, else None."""
    if value.is_graph_output():
        return None
    readers = {node for node, _ in value.uses()}
    for scaling in readers:
        erf = g.only_reader(scaling.outputs[0]) if scaling.outputs else None
        found = _exact_gelu(erf) if erf is not None and erf.op_type == "Erf" else None
        if found is not None and found[0] is value and readers <= set(found[1]):
            return found[1]
    return None


def _exact_gelu(erf: ir.Node) -> tuple[ir.Value, list[ir.Node], ir.Value] | None:
    """``(x, nodes, y)`` where ``erf`` is part of ``y = x · ½(1 + erf(x / √2))`` computed by
    ``nodes`` (in graph order) and read elsewhere only through ``y``; else None. The ½ may
    multiply the product, the sum or ``x``."""
    scaling = erf.inputs[0].producer()
    x = _scaled_input(scaling)
    plus_one = g.only_reader(erf.outputs[0])
    if x is None or g.only_reader(scaling.outputs[0]) is not erf or not _is_binary(plus_one, "Add", 1.0):
        return None
    product = g.only_reader(plus_one.outputs[0])
    if not _is_binary(product, "Mul"):
        return None
    other = _operand_beside(product, plus_one.outputs[0])
    if other is x:  # (x · (1 + erf)) · ½
        half = g.only_reader(product.outputs[0])
        return (x, [scaling, erf, plus_one, product, half], half.outputs[0]) if _is_binary(half, "Mul", 0.5) else None
    if _equals(other, 0.5):  # x · ((1 + erf) · ½)
        last = g.only_reader(product.outputs[0])
        if _is_binary(last, "Mul") and _operand_beside(last, product.outputs[0]) is x:
            return x, [scaling, erf, plus_one, product, last], last.outputs[0]
        return None
    halving = other.producer()  # (x · ½) · (1 + erf)
    if _is_binary(halving, "Mul", 0.5) and x in halving.inputs and g.only_reader(other) is product:
        return x, [scaling, erf, plus_one, halving, product], product.outputs[0]
    return None


def _scaled_input(node: ir.Node | None) -> ir.Value | None:
    """``x`` where ``node`` computes ``x / √2`` (a Div, or a Mul by 1/√2)."""
    if _is_binary(node, "Div") and _equals(node.inputs[1], math.sqrt(2)):
        return node.inputs[0]
    if _is_binary(node, "Mul", 1 / math.sqrt(2)):
        return next(v for v in node.inputs if not g.is_constant(v))
    return None


def _is_binary(node: ir.Node | None, op_type: str, constant: float | None = None) -> bool:
    """``node`` is an ONNX ``op_type`` of two inputs, one of them the scalar ``constant`` where one is given."""
    if node is None or node.op_type != op_type or not g.is_default_domain(node) or len(node.inputs) != 2:
        return False
    return constant is None or sum(_equals(v, constant) for v in node.inputs) == 1


def _equals(value: ir.Value | None, target: float) -> bool:
    number = g.scalar(value)
    return number is not None and abs(number - target) <= _TOLERANCE * abs(target)


def _operand_beside(node: ir.Node, value: ir.Value) -> ir.Value | None:
    return node.inputs[1] if node.inputs[0] is value else node.inputs[0]


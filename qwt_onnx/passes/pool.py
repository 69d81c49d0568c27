"""A mean over every spatial axis of a feature map, written as the GlobalAveragePool it is.

Paddle and some PyTorch exports write a squeeze-and-excitation block's pooling as
``ReduceMean(axes=[2, 3], keepdims=1)``. onnxruntime has an integer kernel for
GlobalAveragePool (QLinearGlobalAveragePool) and none for ReduceMean: on PP-OCRv6's tiny
detector each such mean ran in float between a DequantizeLinear and a QuantizeLinear.
"""

from __future__ import annotations

import onnx_ir as ir

from qwt_onnx.graph import query as g


class SpatialMeanAsGlobalPoolPass(ir.passes.InPlacePass):
    """Each ReduceMean of an N×C×H×W (or N×C×D×H×W) tensor over exactly its spatial axes,
    keeping its dimensions, replaced by a GlobalAveragePool of the same name and output. Not of
    a 3-D tensor: a mean over the last axis of N×T×C tokens is a LayerNorm's, which
    onnxruntime fuses as a ReduceMean only."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        means = [node for node in graph if _is_spatial_mean(node)]
        for mean in means:
            pool = ir.node("GlobalAveragePool", [mean.inputs[0]], name=mean.name)
            ir.convenience.replace_nodes_and_values(graph, mean, [mean], [pool], mean.outputs, pool.outputs)
        return ir.passes.PassResult(model, modified=bool(means))


def _is_spatial_mean(node: ir.Node) -> bool:
    if node.op_type != "ReduceMean" or not g.is_default_domain(node) or not node.inputs or node.inputs[0] is None:
        return False
    shape = node.inputs[0].shape
    if shape is None or len(shape) < 4 or node.attributes.get_int("keepdims", 1) != 1:
        return False
    axes = _axes(node)
    return axes is not None and sorted(a % len(shape) for a in axes) == list(range(2, len(shape)))


def _axes(node: ir.Node) -> list[int] | None:
    """The reduced axes, from the attribute (before opset 18) or the constant second input; None
    where they are computed or absent (all axes, or none with ``noop_with_empty_axes``)."""
    if "axes" in node.attributes:
        return list(node.attributes.get_ints("axes"))
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        tensor = ir.convenience.get_const_tensor(node.inputs[1]) if g.is_constant(node.inputs[1]) else None
        return [int(a) for a in tensor.numpy().reshape(-1)] if tensor is not None else None
    return None

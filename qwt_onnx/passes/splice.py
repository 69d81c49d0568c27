"""Splice fitted compensation branches into the quantized graph.

Each branch reads the block input (after its DequantizeLinear where there is
one, so the quantized ops around it keep their fusions) and is added to the
block output; every reader of the block output then reads the sum.
Tokens get ``MatMul + Add``; feature maps a 1×1 ``Conv`` with the block's
stride. All names start with ``qwt/``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qwt_onnx.compensation import Layout
from qwt_onnx.passes import graph as g

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
    requantize: bool = False  # the output is only read through Q/DQ: add after the DQ, quantize again

    @property
    def num_parameters(self) -> int:
        return self.weight.size + self.bias.size


class SpliceCompensationPass(ir.passes.InPlacePass):
    """Add each branch in parallel to its block."""

    def __init__(self, branches: list[Branch]):
        super().__init__()
        self.branches = branches

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = g.NameScope(graph)
        for branch in self.branches:
            values = g.values_by_name(graph)  # afresh: each splice hands names over to new tensors
            target = values[branch.output]
            if branch.requantize:
                target = g.dequantized_view(target)
            _splice(graph, names, values[branch.input], target, branch)
        ir.passes.common.TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=bool(self.branches))


def _splice(graph: ir.Graph, names: g.NameScope, x: ir.Value, y: ir.Value, branch: Branch) -> None:
    scope = PREFIX + branch.name
    weight = branch.weight.astype(np.float32)
    bias = branch.bias.astype(np.float32)
    if branch.layout.channels_first:
        layout = branch.layout
        rank, pad = layout.spatial_rank, layout.kernel // 2
        kernel = names.initializer(f"{scope}/weight", conv_weight(weight, layout))
        nodes = [
            names.node(
                "Conv",
                [x, kernel, names.initializer(f"{scope}/bias", bias)],
                f"{scope}/branch",
                kernel_shape=[layout.kernel] * rank,
                strides=[layout.stride] * rank,
                pads=[pad] * (2 * rank),
                group=layout.groups,
            )
        ]
    else:
        matmul = names.node("MatMul", [x, names.initializer(f"{scope}/weight", weight)], f"{scope}/matmul")
        nodes = [matmul, names.node("Add", [matmul.outputs[0], names.initializer(f"{scope}/bias", bias)], f"{scope}/branch")]

    for node in nodes:  # the branch computes a tensor shaped like the block output
        node.outputs[0].type, node.outputs[0].shape = y.type, y.shape
    readers = list(y.uses())
    total = names.node("Add", [y, nodes[-1].outputs[0]], f"{scope}/output")
    total.outputs[0].type, total.outputs[0].shape = y.type, y.shape
    added = [*nodes, total]
    result = total.outputs[0]
    if branch.requantize:  # the same quantizer again, so what follows still reads a DQ and stays fused
        dq = y.producer()
        q = dq.inputs[0].producer()
        again = names.node("QuantizeLinear", [result, *q.inputs[1:]], f"{scope}/requantized", **_attributes(q))
        back = names.node("DequantizeLinear", [again.outputs[0], *dq.inputs[1:]], f"{scope}/dequantized", **_attributes(dq))
        back.outputs[0].type, back.outputs[0].shape = y.type, y.shape
        added += [again, back]
        result = back.outputs[0]
    graph.insert_after(y.producer(), added)
    for node, index in readers:
        node.replace_input_with(index, result)
    # The compensated tensor takes over the name (and graph-output slot) of the one it replaces,
    # so that later branches and the model's users find it where they expect it.
    output_index = next((i for i, v in enumerate(graph.outputs) if v is y), None)
    original = y.name
    y.name = names.fresh(f"{scope}/uncompensated")
    result.name = original
    if output_index is not None:
        graph.outputs[output_index] = result


def conv_weight(weight: np.ndarray, layout: Layout) -> np.ndarray:
    """The ``[C_out, C_in / groups, k, ...]`` kernel of a block-diagonal ``[C_in · k^r, C_out]`` map."""
    blocks = [weight[f, t].T for f, t in layout.group_slices(*weight.shape)]
    return np.concatenate(blocks).reshape(weight.shape[1], -1, *([layout.kernel] * layout.spatial_rank))


def _attributes(node: ir.Node) -> dict:
    return {name: attr.value for name, attr in node.attributes.items()}

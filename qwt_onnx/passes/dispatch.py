"""A model that is one If on what it is fed (Silero VAD v4 on its sample rate): quantized in the
branch that the calibration data takes, the other branch kept as it is.

Q/DQ is placed in the main graph only, and such a model's main graph holds nothing but the If and
the ops computing its condition. While the passes run the model is specialized to the branch the
calibration samples take (:class:`SpecializeDispatchPass`, then ``prepare``'s
InlineConstantIfPass); the quantized model is then made that branch of the same If again
(:func:`redispatch`), so the written model takes the same inputs and still computes the other
branch, in float, where it is fed what calibration never showed.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwt_onnx.graph import query as g
from qwt_onnx.passes.control_flow import branch_name


def dispatch_if(graph: ir.Graph) -> ir.Node | None:
    """The If that ``graph`` dispatches to: its outputs are the graph's outputs and every other
    node computes its condition from the graph's inputs; None for any other graph."""
    ifs = [node for node in graph if node.op_type == "If" and g.is_default_domain(node)]
    if len(ifs) != 1 or len(graph.outputs) != len(ifs[0].outputs) or set(graph.outputs) != set(ifs[0].outputs):
        return None
    node = ifs[0]
    return node if set(graph) == {node, *condition_nodes(node)} else None


def condition_nodes(node: ir.Node) -> list[ir.Node]:
    """The nodes of ``node``'s graph that its condition is computed by, in graph order."""
    found, pending = set(), [node.inputs[0]]
    while pending:
        producer = pending.pop().producer()
        if producer is not None and producer not in found:
            found.add(producer)
            pending.extend(v for v in producer.inputs if v is not None)
    return [n for n in node.graph if n in found]


def condition_inputs(node: ir.Node) -> list[str]:
    """The names of the graph inputs that ``node``'s condition is computed from."""
    read = [node.inputs[0], *(v for n in condition_nodes(node) for v in n.inputs)]
    return list(dict.fromkeys(v.name for v in read if v is not None and v.is_graph_input()))


class SpecializeDispatchPass(ir.passes.InPlacePass):
    """The dispatch If's condition replaced by the constant ``taken``: ``prepare`` then replaces
    the If by that branch, and drops what computed the condition."""

    def __init__(self, taken: bool):
        super().__init__()
        self.taken = taken

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        node = dispatch_if(model.graph)
        if node is None:
            return ir.passes.PassResult(model, False)
        node.replace_input_with(0, g.NameScope(model.graph).initializer(f"{node.name}/taken", np.array(self.taken)))
        return ir.passes.PassResult(model, True)


def redispatch(written: ir.Model, dispatcher: ir.Model, taken: bool) -> None:
    """Make ``written``, which computes the ``taken`` branch of ``dispatcher``'s dispatch If, that
    branch of the If again: the If, its condition and its other branch as ``dispatcher`` (not
    modified) has them, reading ``written``'s inputs."""
    graph, source = written.graph, dispatcher.clone()
    node = dispatch_if(source.graph)
    names = g.NameScope(graph)
    outputs = list(graph.outputs)
    graph.outputs.clear()
    for value in outputs:  # the If's outputs take the names; a branch's values are named apart from the main graph's
        value.name = names.fresh(f"{value.name}/{branch_name(taken)}")
    body = list(graph)
    graph.remove(body)
    weights = [graph.initializers.pop(name) for name in list(graph.initializers)]
    branch = ir.Graph((), outputs, nodes=body, initializers=weights, name=f"{node.name}/{branch_name(taken)}")

    moved = [*condition_nodes(node), node]
    source.graph.outputs.clear()
    source.graph.remove(moved)
    inputs = {value.name: value for value in graph.inputs}
    for each in [*moved, *ir.traversal.RecursiveGraphIterator(node.attributes[branch_name(not taken)].as_graph())]:
        for i, value in enumerate(each.inputs):
            if value is not None and value.is_graph_input() and value.graph is source.graph:
                each.replace_input_with(i, inputs[value.name])
            elif value is not None and value.is_initializer() and value.graph is source.graph:
                source.graph.initializers.pop(value.name)
                value.name = names.fresh(value.name)
                graph.register_initializer(value)
    node.attributes[branch_name(taken)] = ir.AttrGraph(branch_name(taken), branch)
    graph.extend(moved)
    graph.outputs.extend(node.outputs)

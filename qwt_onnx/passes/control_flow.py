"""If nodes whose condition is a constant, replaced by the branch they always take."""

from __future__ import annotations

import onnx_ir as ir

from qwt_onnx.graph import query as g


class InlineConstantIfPass(ir.passes.InPlacePass):
    """Each If whose condition is a constant replaced by the nodes of the branch it takes.

    TensorFlow 1 Keras exports carry the learning phase as a constant False, and every
    BatchNormalization as an If between its inference and training forms, with
    the training form's batch statistics computed in the main graph: kept, the If stands
    between each convolution and its normalization, so nothing folds, the batch statistics run
    on every inference, and the convolution's output is read in float.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        while (node := _constant_if(model.graph)) is not None:
            _inline(node)
            modified = True
        return ir.passes.PassResult(model, modified)


def _constant_if(graph: ir.Graph) -> ir.Node | None:
    """The first If, in ``graph`` or a subgraph of it, whose condition is a constant."""
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.op_type == "If" and g.is_default_domain(node) and _condition(node) is not None:
            return node
    return None


def _condition(node: ir.Node) -> bool | None:
    """The If's condition where it is a constant; None where it is computed or fed."""
    cond = node.inputs[0] if node.inputs else None
    if cond is None or cond.const_value is None or cond.is_graph_input() or cond.const_value.size != 1:
        return None
    return bool(cond.const_value.numpy().reshape(-1)[0])


def branch_name(taken: bool) -> str:
    """The If attribute holding the branch taken where its condition is ``taken``."""
    return "then_branch" if taken else "else_branch"


def _inline(node: ir.Node) -> None:
    """Move the taken branch's initializers and nodes before ``node``; its outputs take the place,
    names and readers of ``node``'s; ``node`` is removed."""
    condition = _condition(node)
    taken, dropped = branch_name(condition), branch_name(not condition)
    graph, branch = node.graph, node.attributes[taken].as_graph()
    _detach(node.attributes[dropped].as_graph())
    names = g.NameScope(graph)  # node names are unique within a graph only
    for name in list(branch.initializers):
        initializer = branch.initializers.pop(name)
        if initializer.name in graph.initializers:
            initializer.name = names.fresh(initializer.name)
        graph.register_initializer(initializer)
    results = list(branch.outputs)
    branch.outputs.clear()
    nodes = list(branch)
    branch.remove(nodes)
    for moved in nodes:
        if moved.name in names.taken:
            moved.name = names.fresh(moved.name)
    graph.insert_before(node, nodes)
    for result, output in zip(results, node.outputs):  # each the branch's own (onnxruntime refuses an enclosing graph's value)
        name = output.name
        result.type, result.shape = result.type or output.type, result.shape or output.shape
        output.replace_all_uses_with(result, replace_graph_outputs=True)
        output.name, result.name = None, name
    graph.remove(node, safe=True)


def _detach(branch: ir.Graph) -> None:
    """The branch's nodes, its subgraphs' too, no longer readers of the values they read: what
    only they read is then unused."""
    for node in ir.traversal.RecursiveGraphIterator(branch):
        for i in range(len(node.inputs)):
            node.replace_input_with(i, None)

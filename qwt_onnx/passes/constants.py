"""Weights that the graph computes from constants alone, stored as the constants they are."""

from __future__ import annotations

import onnx_ir as ir

from qwt_onnx.graph import extract
from qwt_onnx.graph import query as g
from qwt_onnx.runtime import Runner

# The inputs of each op that hold its weights, bias or per-channel parameters: an Add's or Mul's,
# a bias or scale after a weighted op, which the channel fold takes only as a constant (Paddle
# reshapes each squeeze-excitation conv's bias at run time).
WEIGHT_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "BatchNormalization": (1, 2, 3, 4),
                 "Add": (0, 1), "Mul": (0, 1)}
# Ops a weight computed through stays computed: drawn anew on every run, or quantized already (a
# QDQ model's int8 weight behind its DequantizeLinear, which the quantized kernels read as such).
KEPT_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
            *g.QDQ_OPS}


class FoldComputedWeightsPass(ir.passes.InPlacePass):
    """Each weight, bias or normalization parameter that the graph computes from constants alone
    (a weight-normalized convolution's ``g · v / ‖v‖`` in a model exported without constant
    folding, a weight or bias transposed or reshaped at run time) replaced by an initializer holding its
    value, as onnxruntime computes it: quantizers, BatchNorm folding and the branches' fits take
    weights as constants, and would leave such ops in float. Weights behind a random op or a
    Q/DQ pair (a given QDQ model's) stay as they are."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        computed = _computed_weights(model.graph)
        if not computed:
            return ir.passes.PassResult(model, False)
        try:
            values = Runner(extract.extract(model, [], [v.name for v in computed]).proto, quiet=True)({})
        except Exception:  # onnxruntime raises several types: what it cannot compute stays computed in the graph
            return ir.passes.PassResult(model, False)
        for value in computed:
            name, value.name = value.name, f"{value.name}/computed"
            tensor = ir.tensor(values[name], name=name)
            folded = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
            model.graph.register_initializer(folded)
            value.replace_all_uses_with(folded)
        return ir.passes.PassResult(model, True)


def _computed_weights(graph: ir.Graph) -> list[ir.Value]:
    """The weight inputs of ``graph``'s ops that it computes from initializers alone, through no :data:`KEPT_OPS`."""
    static = g.static_values(graph)
    found = {}
    for node in (n for n in graph if g.is_default_domain(n)):
        for value in (node.inputs[i] for i in WEIGHT_INPUTS.get(node.op_type, ()) if i < len(node.inputs)):
            if value in static and value.const_value is None and not value.is_graph_output() and not _through_kept_op(value):
                found[value] = None
    return list(found)


def _through_kept_op(value: ir.Value) -> bool:
    """Whether one of the :data:`KEPT_OPS` contributes to ``value``."""
    stack, seen = [value], set()
    while stack:
        node = stack.pop().producer()
        if node is None or node in seen:
            continue
        if node.op_type in KEPT_OPS:
            return True
        seen.add(node)
        stack += [v for v in node.inputs if v is not None]
    return False

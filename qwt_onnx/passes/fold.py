"""Fold inference-mode BatchNormalization into the convolution before it.

Quantizing a convolution whose output a BatchNormalization rescales per
channel wastes the quantizer's range and keeps onnxruntime from fusing the
convolution; folding first is what every PTQ tool does. The result computes
the same function up to float rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwt_onnx.passes import graph as g


def folded_conv_parameters(weight, bias, scale, shift, mean, variance, epsilon):
    """``W' = W·s`` and ``b' = (b − μ)·s + β`` with ``s = γ / sqrt(σ² + ε)`` per output channel."""
    factor = scale / np.sqrt(variance + epsilon)
    new_weight = weight * factor.reshape(-1, *([1] * (weight.ndim - 1)))
    return new_weight.astype(weight.dtype), ((bias - mean) * factor + shift).astype(weight.dtype)


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Conv → BatchNormalization (its only reader, one output) becomes one Conv."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = g.NameScope(graph)
        folded = 0
        for bn in [n for n in graph if n.op_type == "BatchNormalization" and g.is_default_domain(n)]:
            conv = bn.inputs[0].producer()
            if not _foldable(conv, bn):
                continue
            weight = conv.inputs[1].const_value.numpy()
            bias = conv.inputs[2].const_value.numpy() if len(conv.inputs) > 2 and conv.inputs[2] is not None else 0.0
            scale, shift, mean, variance = (v.const_value.numpy() for v in bn.inputs[1:5])
            epsilon = bn.attributes.get_float("epsilon", 1e-5)
            new_weight, new_bias = folded_conv_parameters(weight, bias, scale, shift, mean, variance, epsilon)
            conv.replace_input_with(1, names.initializer(f"{conv.inputs[1].name}_folded", new_weight))
            if len(conv.inputs) < 3:
                conv.resize_inputs(3)
            conv.replace_input_with(2, names.initializer(f"{conv.name or 'conv'}.bias_folded", new_bias))
            # the convolution's output takes the BatchNormalization output's place and name
            output = bn.outputs[0]
            output.replace_all_uses_with(conv.outputs[0], replace_graph_outputs=True)
            old_name, conv.outputs[0].name = conv.outputs[0].name, output.name
            output.name = names.fresh(f"{old_name}_unfolded")
            graph.remove(bn, safe=True)
            folded += 1
        return ir.passes.PassResult(model, modified=bool(folded))


def _foldable(conv: ir.Node | None, bn: ir.Node) -> bool:
    if conv is None or conv.op_type != "Conv" or not g.is_default_domain(conv):
        return False
    if len(bn.outputs) != 1 or len(conv.outputs[0].uses()) != 1 or conv.outputs[0].is_graph_output():
        return False
    constants = [conv.inputs[1], *bn.inputs[1:5]]
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        constants.append(conv.inputs[2])
    return all(v is not None and v.const_value is not None for v in constants)

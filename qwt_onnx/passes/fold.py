"""Fold per-channel scales and bias Adds into the convolution or dense layer before them.

A bias exported as a separate Add (Paddle exports do this for every conv) keeps
onnxruntime from fusing the quantized convolution: left alone, each QLinearConv
is followed by a dequantize, a float Add and a requantize (measured on PP-OCRv6
det: 75 such Adds, a quarter of the INT8 model's time at batch 1). The result
computes the same function up to float rounding. BatchNormalization is folded
by onnxscript's rewriter rules, wrapped so that the folded op keeps its name.

A dense layer exported as a 2-D MatMul and a bias Add (Keras, TensorFlow and
older PyTorch exports after a Flatten) becomes a Gemm: onnxruntime makes the
same Gemm itself before its QDQ fusions, and a Gemm whose bias is not
quantized fuses into no integer kernel (measured on MTCNN's ONet: its four
dense layers ran in float on weights dequantized on every run, and its INT8
model at 2.8× the FP32 one's latency at batch 1).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewritePass
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
)

from qwt_onnx.graph import query as g
from qwt_onnx.passes.gelu import exact_gelu_of

FOLDS_BATCH_NORM = ("Conv", "ConvTranspose", "Gemm")


class FoldBatchNormPass(ir.passes.InPlacePass):
    """BatchNormalization folded into the Conv, ConvTranspose or Gemm before it (onnxscript's
    rules), the folded op keeping the name it had: ``--exclude-nodes`` and the reports name
    the ops the user sees in the model, not the rewriter's ``node_Conv_0``."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # the folded op takes the BatchNormalization's output, whose name the rewriter keeps
        names = {}
        for node in model.graph:
            producer = node.inputs[0].producer() if node.op_type == "BatchNormalization" and node.inputs else None
            if producer is not None and producer.op_type in FOLDS_BATCH_NORM and producer.name:
                names[node.outputs[0].name] = producer.name
        result = RewritePass([fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule,
                              fuse_batchnorm_into_gemm_rule])(model)
        for node in model.graph:
            if node.op_type in FOLDS_BATCH_NORM and node.outputs and node.outputs[0].name in names:
                node.name = names[node.outputs[0].name]
        return ir.passes.PassResult(result.model, modified=result.modified)


class FoldChannelAffinePass(ir.passes.InPlacePass):
    """Conv → Mul or Add of a per-channel constant (its only reader) becomes one Conv: a scale
    multiplies each output channel's weights and bias, a shift adds to its bias. Paddle
    exports a separate Add per conv bias, and some exporters write an inference-mode
    BatchNormalization as a Mul and an Add (captcha-whisperer's CRNN).

    A Mul or Add whose output several nodes read stays, unless every reader is a weighted op or
    an Add of computed tensors, which read a quantized tensor in integer kernels, or the readers
    are an exact GELU's, which is written as one node where it reads a quantized tensor
    (:mod:`qwt_onnx.passes.gelu`), or a SiLU's or squeeze-excitation's, whose product runs on
    uint8 once it scales a convolution's output: elsewhere the convolution's output will be
    quantized, and onnxruntime gives each reader of a dequantized tensor a DequantizeLinear of
    its own, which keeps it from fusing the readers into one kernel; the folded op's output is
    the one float tensor they share.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = g.NameScope(graph)
        folded = 0
        for node in [n for n in graph if n.op_type in ("Mul", "Add") and g.is_default_domain(n)]:
            if len(node.outputs[0].uses()) > 1 and not _readers_take_quantized(node.outputs[0]):
                continue
            for side in (0, 1):
                conv, constant = node.inputs[side].producer(), node.inputs[1 - side]
                if not _foldable(conv, node, [constant]):
                    continue
                weight = conv.inputs[1].const_value.numpy()  # (C_out, C_in/groups, *kernel)
                per_channel = _per_channel(constant.const_value.numpy(), weight.shape[0], weight.ndim)
                if per_channel is None:
                    continue
                base = conv.name or "conv"
                if node.op_type == "Mul":
                    scaled = weight * per_channel.reshape((-1,) + (1,) * (weight.ndim - 1))
                    conv.replace_input_with(1, names.initializer(f"{base}.weight_scaled", scaled.astype(weight.dtype)))
                    bias = _bias(conv) * per_channel
                else:
                    bias = _bias(conv) + per_channel
                _set_bias(conv, names.initializer(f"{base}.bias_{'scaled' if node.op_type == 'Mul' else 'added'}",
                                                  np.broadcast_to(bias, per_channel.shape).astype(weight.dtype)))
                _take_place(graph, names, conv, node)
                folded += 1
                break
        return ir.passes.PassResult(model, modified=bool(folded))


class DenseAsGemmPass(ir.passes.InPlacePass):
    """A dense layer, a MatMul of a 2-D input and a constant [K, N] weight, becomes a Gemm named
    as the MatMul, with the Add of a constant of N or 1 values that alone reads it folded in as
    its bias.

    onnxruntime fuses a 2-D MatMul and any Add after it (a bias, a residual, a QwT branch) into
    a Gemm before its QDQ fusions, and a Gemm whose third input is not quantized fuses into no
    integer kernel; as a Gemm from the start, the layer gets an int32 bias from the Q/DQ pass
    and an Add after it stays an Add."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = g.NameScope(graph)
        dense = [n for n in graph if _is_dense(n)]
        for matmul in dense:
            uses = list(matmul.outputs[0].uses())
            add = uses[0][0] if len(uses) == 1 and not matmul.outputs[0].is_graph_output() else None
            bias = _dense_bias(matmul, add) if add is not None else None
            inputs = [matmul.inputs[0], matmul.inputs[1]]
            if bias is not None:
                inputs.append(names.initializer(f"{matmul.name or 'dense'}.bias", bias))
            gemm = ir.node("Gemm", inputs, name=matmul.name, outputs=[ir.val(names.fresh(f"{matmul.name or 'dense'}_gemm"))])
            gemm.outputs[0].type, gemm.outputs[0].shape = matmul.outputs[0].type, matmul.outputs[0].shape
            graph.insert_before(matmul, gemm)
            _take_place(graph, names, gemm, matmul)
            if bias is not None:
                _take_place(graph, names, gemm, add)
        return ir.passes.PassResult(model, modified=bool(dense))


def _is_dense(node: ir.Node) -> bool:
    if node.op_type != "MatMul" or not g.is_default_domain(node):
        return False
    x, weight = node.inputs
    if x is None or x.const_value is not None or g.rank(x) != 2:
        return False
    return weight is not None and weight.const_value is not None and weight.const_value.dtype == ir.DataType.FLOAT \
        and len(weight.const_value.shape) == 2


def _dense_bias(matmul: ir.Node, add: ir.Node) -> np.ndarray | None:
    """The bias of N values that ``add`` adds to the dense ``matmul``'s [M, N] output, None where
    it is no Add of a constant."""
    if add.op_type != "Add" or not g.is_default_domain(add) or len(add.inputs) != 2:
        return None
    constant = add.inputs[1] if add.inputs[0] is matmul.outputs[0] else add.inputs[0]
    if constant is None or constant.const_value is None:
        return None
    array = constant.const_value.numpy()
    channels = matmul.inputs[1].const_value.shape[1]
    if array.ndim > 2 or array.size not in (1, channels) or (array.ndim == 2 and array.shape[0] != 1):
        return None
    return np.broadcast_to(array.reshape(-1), (channels,)).astype(matmul.inputs[1].const_value.numpy().dtype)


def _readers_take_quantized(value: ir.Value) -> bool:
    """Whether the readers of ``value`` lose nothing by reading it quantized instead: each reads it
    in an integer kernel (:func:`_reads_quantized`), or they are an exact GELU's (written as one
    node) or a gated product's (:func:`_gated_product_reads`)."""
    readers = [reader for reader, _ in value.uses()]
    return all(map(_reads_quantized, readers)) or exact_gelu_of(value) is not None or _gated_product_reads(value)


def _gated_product_reads(value: ir.Value) -> bool:
    """Whether the two readers of ``value`` are the Mul of a gated product of it
    (:func:`~qwt_onnx.graph.query.gate_of`, as ``--residuals`` takes them) and that SiLU's Sigmoid,
    or the squeeze-excitation's pool the gate is computed from: the products that run on uint8
    where they scale a quantized convolution output (PP-OCRv6 det and rec: five such bias sums
    each). Not a hard-swish's: rapidocr's PP-OCRv4 recogniser lost 2.4 dB on unseen lines with its
    28 biases folded before its hard-swishes (which `--residuals auto` then left float; its
    detector gained 0.24 dB and 13% of its kernels)."""
    readers = [node for node, _ in value.uses()]
    if len(readers) != 2 or value.is_graph_output() or not all(map(g.is_default_domain, readers)):
        return False
    for mul, other in (readers, readers[::-1]):
        gate = g.gate_of(mul, value)
        if gate is None:
            continue
        if other is gate.producer():  # a SiLU, or a hard-swish (not folded, above)
            return gate.producer().op_type == "Sigmoid"
        return other.op_type == "GlobalAveragePool" and mul in g.downstream_nodes(other.outputs)
    return False


def _reads_quantized(node: ir.Node) -> bool:
    """A weighted op, or an Add of computed tensors: where its input is quantized, onnxruntime reads
    it in an integer kernel (an Add of a constant runs in float)."""
    return g.is_default_domain(node) and (g.is_weighted(node) or g.adds_computed(node))


def _per_channel(array: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``array`` as one value per channel of an N×C×... tensor of ``rank``, None if it is not one."""
    if array.ndim > rank:
        return None
    padded = array.reshape((1,) * (rank - array.ndim) + array.shape)
    if any(d != 1 for i, d in enumerate(padded.shape) if i != 1) or padded.shape[1] not in (1, channels):
        return None
    return np.broadcast_to(padded.reshape(-1), (channels,)).copy()


def _bias(conv: ir.Node) -> np.ndarray | float:
    """The convolution's bias, 0 where it has none."""
    return conv.inputs[2].const_value.numpy() if len(conv.inputs) > 2 and conv.inputs[2] is not None else 0.0


def _set_bias(conv: ir.Node, bias: ir.Value) -> None:
    if len(conv.inputs) < 3:
        conv.resize_inputs(3)
    conv.replace_input_with(2, bias)


def _take_place(graph: ir.Graph, names: g.NameScope, conv: ir.Node, folded: ir.Node) -> None:
    """The convolution's output takes the folded node's output: its readers and its name."""
    output = folded.outputs[0]
    output.replace_all_uses_with(conv.outputs[0], replace_graph_outputs=True)
    old_name, conv.outputs[0].name = conv.outputs[0].name, output.name
    output.name = names.fresh(f"{old_name}_unfolded")
    graph.remove(folded, safe=True)


def _foldable(conv: ir.Node | None, folded: ir.Node, constants: list[ir.Value | None]) -> bool:
    """``conv`` is a plain Conv with constant weights whose only reader is ``folded``."""
    if conv is None or conv.op_type != "Conv" or not g.is_default_domain(conv):
        return False
    if len(folded.outputs) != 1 or len(conv.outputs[0].uses()) != 1 or conv.outputs[0].is_graph_output():
        return False
    constants = [conv.inputs[1], *constants]
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        constants.append(conv.inputs[2])
    return all(v is not None and v.const_value is not None for v in constants)

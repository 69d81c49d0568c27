"""Where a per-channel scale can move from an activation into the weights that read it, the
model computing the same function (an analysis that returns plain data: :class:`ChannelGroup`).

A *producer* whose output channel k can be divided by s_k through its constants (a Conv's or a
dense layer's output channel and bias, a LayerNormalization's or a normalization's scale and
bias, a per-channel Mul's factor), then a chain of ops that commute with a positive per-channel
scale (ReLU, PReLU, LeakyReLU, pools, a per-channel Add or Mul of a constant), ends at a tensor
that only weighted ops read, as an input channel: each multiplies its weight's input channel k
by s_k. Every value on the way is read by the next op alone and is no graph output, so nothing
else sees the scale. SmoothQuant (LayerNorm → Q/K/V) and cross-layer equalization (Conv →
ReLU → Conv) are both such groups; which scales to move is the numerics'
(:mod:`qwt_onnx.numerics.equalization`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qwt_onnx.graph import query as g
from qwt_onnx.numerics import saturation
from qwt_onnx.numerics.equalization import ConsumerWeight

# Ops of one computed input that commute with a positive scale per channel, keeping the channel axis
HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}


@dataclasses.dataclass(frozen=True)
class ScaledConstant:
    """A constant whose entries for channel k are multiplied by ``s_k ** power`` (−1: divided):
    its entries along ``axis`` are the channels, or for a grouped Conv's weight (``group`` > 1,
    axis 1) the channels of each output channel's group."""

    value: ir.Value
    axis: int
    power: int
    group: int = 1

    def channel_of_entries(self) -> np.ndarray:
        """The channel each entry belongs to, broadcastable to the constant's shape."""
        shape = tuple(self.value.const_value.shape)
        if self.group == 1:
            index = np.arange(shape[self.axis])
            return index.reshape([-1 if i == self.axis else 1 for i in range(len(shape))])
        outputs, per_group = shape[0], shape[1]
        index = (np.arange(outputs)[:, None] // (outputs // self.group)) * per_group + np.arange(per_group)[None, :]
        return index.reshape(index.shape + (1,) * (len(shape) - 2))


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """``tensor``'s channels (on ``axis``, negative) can be divided by s and ``consumers`` keep
    their outputs by scaling the ``constants``: the producer's and the chain's by 1/s, the
    consumers' weights by s."""

    producer: ir.Node
    tensor: ir.Value
    chain: tuple[ir.Value, ...]  # every value that carries the scale: the producer's output, ..., ``tensor``
    axis: int
    channels: int
    consumers: tuple[ir.Node, ...]
    constants: tuple[ScaledConstant, ...]

    @property
    def consumer_weights(self) -> tuple[ScaledConstant, ...]:
        return tuple(c for c in self.constants if c.power == 1)


def channel_groups(graph: ir.Graph) -> list[ChannelGroup]:
    """Every group of ``graph``, in graph order of producers. A constant can be in two (a Conv
    between two others is the first's consumer and the second's producer): their scales multiply."""
    groups = []
    for node in graph:
        found = _group_from(node, graph)
        if found is not None:
            groups.append(found)
    return groups


def _group_from(producer: ir.Node, graph: ir.Graph) -> ChannelGroup | None:
    start = _producer_constants(producer)
    if start is None:
        return None
    constants, axis, channels = start
    value, constants = producer.outputs[0], list(constants)
    chain = [value]
    while True:
        if value.is_graph_output() or any(user.graph is not graph for user, _ in value.uses()):
            return None
        readers = [user for user, _ in value.uses()]
        if not readers:
            return None
        weights = [_consumer_weight(user, index, value, axis, channels) for user, index in value.uses()]
        if all(w is not None for w in weights):
            break
        if len(readers) != 1:
            return None
        step = _pass_through(readers[0], value, axis, channels)
        if step is None:
            return None
        constants += step
        value = readers[0].outputs[0]
        chain.append(value)
    constants += weights
    if len({c.value for c in constants}) != len(constants) or any(not _only_reader_is(c.value, graph) for c in constants):
        return None  # a constant scaled twice, or one that another op reads as it is
    return ChannelGroup(producer, value, tuple(chain), axis, channels, tuple(readers), tuple(constants))


def _producer_constants(node: ir.Node) -> tuple[list[ScaledConstant], int, int] | None:
    """The constants that divide ``node``'s output channel k by s_k, its output's channel axis
    (negative) and its channel count; None where it has no such constants."""
    if not g.is_default_domain(node) or any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        return None
    rank = _rank(node.outputs[0])
    weight = g.weight_input(node)
    if node.op_type == "Conv" and weight is not None and rank is not None:
        channels = weight.const_value.shape[0]
        constants = [ScaledConstant(weight, 0, -1), *_optional_vector(node, 2, channels)]
        return (constants, 1 - rank, channels) if None not in constants else None
    if node.op_type in ("Gemm", "MatMul") and weight is not None and len(weight.const_value.shape) == 2:
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            return None
        axis = 0 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 1
        channels = weight.const_value.shape[axis]
        bias = _optional_vector(node, 2, channels) if node.op_type == "Gemm" else []
        constants = [ScaledConstant(weight, axis, -1), *bias]
        return (constants, -1, channels) if None not in constants else None
    if node.op_type == "LayerNormalization" and node.attributes.get_int("axis", -1) in (-1, (rank or 0) - 1):
        return _scale_and_bias(node, -1)
    if node.op_type in ("BatchNormalization", "InstanceNormalization") and rank is not None:
        return _scale_and_bias(node, 1 - rank)
    if node.op_type == "Mul" and len(node.inputs) == 2:
        constant = next((v for v in node.inputs if v is not None and v.const_value is not None), None)
        if constant is None or all(v is constant for v in node.inputs):
            return None
        shape = tuple(constant.const_value.shape)
        wide = [i for i, d in enumerate(shape) if d != 1]
        if len(wide) != 1:
            return None
        return [ScaledConstant(constant, wide[0], -1)], wide[0] - len(shape), shape[wide[0]]
    return None


def _scale_and_bias(node: ir.Node, axis: int) -> tuple[list[ScaledConstant], int, int] | None:
    """A normalization's scale (input 1) and optional bias (input 2), both vectors of its channels."""
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    if scale is None or scale.const_value is None or len(scale.const_value.shape) != 1:
        return None
    channels = scale.const_value.shape[0]
    constants = [ScaledConstant(scale, 0, -1), *_optional_vector(node, 2, channels)]
    return (constants, axis, channels) if None not in constants else None


def _optional_vector(node: ir.Node, index: int, channels: int) -> list[ScaledConstant | None]:
    """Input ``index`` as a constant vector of ``channels`` ([] where absent, [None] where it is
    something else: a computed bias, a scalar)."""
    value = node.inputs[index] if len(node.inputs) > index else None
    if value is None:
        return []
    shape = value.const_value.shape if value.const_value is not None else None
    return [ScaledConstant(value, 0, -1)] if shape is not None and tuple(shape) == (channels,) else [None]


def _pass_through(node: ir.Node, value: ir.Value, axis: int, channels: int) -> list[ScaledConstant] | None:
    """The constants ``node`` scales by 1/s to pass a per-channel scale of ``value`` on to its
    output ([] where none), None where it cannot."""
    if not g.is_default_domain(node) or len(node.outputs) != 1 or node.inputs[0] is not value:
        return None
    others = node.inputs[1:]
    if node.op_type in HOMOGENEOUS:  # a PReLU's slope, a pool's nothing
        return [] if all(v is None or v.const_value is not None for v in others) else None
    if node.op_type not in ("Add", "Sub", "Mul", "Div") or len(others) != 1 or others[0].const_value is None:
        return None
    shape = tuple(others[0].const_value.shape)
    entries = _channel_entries(shape, axis, channels)
    if node.op_type in ("Mul", "Div"):  # (x / s) · c = (x · c) / s
        return [] if entries is not None or all(d == 1 for d in shape) else None
    # (x / s) + c / s = (x + c) / s; an added scalar would have to become a vector: left alone
    return [ScaledConstant(others[0], entries, -1)] if entries is not None else None


def _channel_entries(shape: tuple[int, ...], axis: int, channels: int) -> int | None:
    """The axis of a constant of ``shape`` that holds one entry per channel of the tensor it is
    broadcast against (whose channels are on ``axis``, negative); None if it holds anything else."""
    k = len(shape) + axis
    if k < 0 or shape[k] != channels or any(d != 1 for i, d in enumerate(shape) if i != k):
        return None
    return k


def _consumer_weight(node: ir.Node, index: int, value: ir.Value, axis: int, channels: int) -> ScaledConstant | None:
    """The weight of a Conv, MatMul or Gemm reading ``value`` as its data input, with channels
    on ``axis``, along its input-channel axis; None for any other reader."""
    weight = g.weight_input(node)
    if weight is None or index != 0:
        return None
    shape = weight.const_value.shape
    if node.op_type == "Conv":
        group, rank = node.attributes.get_int("group", 1), _rank(value)
        fits = rank is not None and axis == 1 - rank and shape[1] * group == channels and shape[0] % group == 0
        return ScaledConstant(weight, 1, 1, group) if fits else None
    if len(shape) != 2 or axis != -1 or (node.op_type == "Gemm" and node.attributes.get_int("transA", 0)):
        return None
    weight_axis = 1 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 0
    return ScaledConstant(weight, weight_axis, 1) if shape[weight_axis] == channels else None


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _only_reader_is(value: ir.Value, graph: ir.Graph) -> bool:
    """``value`` is an initializer of ``graph`` read by one op."""
    return value.name in graph.initializers and len(value.uses()) == 1 and not value.is_graph_output()


def consumer_weights(group: ChannelGroup) -> list[ConsumerWeight]:
    """Each consumer's weight by output channel, input read and tap, with the channel of
    ``group.tensor`` each input is: what the numerics weigh a choice of scales by."""
    weights = []
    for constant in group.consumer_weights:
        w = constant.value.const_value.numpy()
        paired = saturation.kernel_pairs_products(w.shape, constant.group)
        if w.ndim == 2:  # [K, N] (MatMul, Gemm) or [N, K] (Gemm with transB)
            w = (w.T if constant.axis == 0 else w)[:, :, None]
            weights.append(ConsumerWeight(w, np.broadcast_to(np.arange(w.shape[1]), w.shape[:2]), paired))
        else:  # Conv [O, C / group, *kernel]
            channel = np.broadcast_to(constant.channel_of_entries(), w.shape).reshape(w.shape[0], w.shape[1], -1)[:, :, 0]
            weights.append(ConsumerWeight(w.reshape(w.shape[0], w.shape[1], -1), channel, paired))
    return weights

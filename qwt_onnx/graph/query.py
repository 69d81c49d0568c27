"""Small queries on an onnx_ir graph shared by the passes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from qwt_onnx.numerics import quantization as qm

#: Ops with a constant weight that the QDQ pass quantizes, and the index of that weight.
WEIGHTED_OPS = {"Conv": 1, "MatMul": 1, "Gemm": 1}

#: Ops whose output depends only on the shape of their input, never on its values.
SHAPE_OPS = {"Shape", "Size"}

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def opset(model: ir.Model, default: int = 1) -> int:
    """The version of the default ONNX domain that ``model`` imports."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", default))


def is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def is_constant(value: ir.Value | None) -> bool:
    """An initializer or the output of a Constant node (not evaluated: ``ir.convenience.get_const_tensor``
    would, and raises on a malformed Constant in a user's model)."""
    if value is None:
        return False
    if value.const_value is not None or value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and is_default_domain(producer)


def scalar(value: ir.Value | None) -> float | None:
    """The one finite number a constant holds; None for anything else."""
    if value is None:
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:  # a malformed Constant node: not a number we can rely on
        return None
    if tensor is None or tensor.size != 1:
        return None
    number = float(tensor.numpy().reshape(()))
    return number if math.isfinite(number) else None


def only_reader(value: ir.Value) -> ir.Node | None:
    """The one node that reads ``value``, once, where nothing else (a graph output) does."""
    uses = list(value.uses())
    return uses[0][0] if len(uses) == 1 and not value.is_graph_output() else None


def weight_input(node: ir.Node, dequantized: bool = False) -> ir.Value | None:
    """The constant weight of a Conv / MatMul / Gemm whose other operand is computed, else None;
    with ``dequantized``, also a weight that a DequantizeLinear of a constant gives."""
    if not is_default_domain(node) or node.op_type not in WEIGHTED_OPS:
        return None
    index = WEIGHTED_OPS[node.op_type]
    if len(node.inputs) <= index:
        return None
    data, weight = node.inputs[0], node.inputs[index]
    if weight is None or is_constant(data):
        return None
    dq = dequantizer(weight) if dequantized else None
    return weight if weight.const_value is not None or (dq is not None and dq.inputs[0].const_value is not None) else None


def is_weighted(node: ir.Node) -> bool:
    return weight_input(node) is not None


def adds_computed(node: ir.Node) -> bool:
    """An Add of computed tensors only (a residual sum), not of a constant (a bias, hard-swish's ``x + 3``)."""
    return node.op_type == "Add" and not any(is_constant(v) for v in node.inputs)


GATE_OPS = ("Sigmoid", "HardSigmoid")


def gate_of(mul: ir.Node, x: ir.Value) -> ir.Value | None:
    """The gate where ``mul`` computes ``x · gate``, read by ``mul`` alone, and the gate is a SiLU's
    (``Sigmoid(x)``), a hard-swish's (``HardSigmoid(x)``) or a channel gate (a Sigmoid or
    HardSigmoid of fewer values that broadcast over ``x``: a squeeze-excitation's, one per
    channel); else None."""
    if mul.op_type != "Mul" or not is_default_domain(mul) or len(mul.inputs) != 2 or x not in mul.inputs:
        return None
    gate = mul.inputs[1] if mul.inputs[0] is x else mul.inputs[0]
    sigma = gate.producer() if gate is not None else None
    if sigma is None or not is_default_domain(sigma) or sigma.graph is not mul.graph or sigma.op_type not in GATE_OPS:
        return None
    if not (sigma.inputs[0] is x or _broadcasts_over(gate, x)) or len(gate.uses()) != 1 or gate.is_graph_output():
        return None
    return gate


def is_hard_swish_gate(gate: ir.Value) -> bool:
    """Whether ``gate`` is a hard-swish's, ``HardSigmoid(x)`` read by a Mul of ``x`` and it."""
    sigma, readers = gate.producer(), [node for node, _ in gate.uses()]
    return sigma is not None and sigma.op_type == "HardSigmoid" and any(sigma.inputs[0] in mul.inputs for mul in readers)


def _broadcasts_over(gate: ir.Value, x: ir.Value) -> bool:
    """Whether ``gate`` has ``x``'s rank and, on each axis, ``x``'s size or 1, and 1 on some axis
    where ``x`` has more (an N×C×1×1 gate of an N×C×H×W map, or N×1×1×C of an NHWC one)."""
    if gate.shape is None or x.shape is None or len(gate.shape) != len(x.shape):
        return False
    broadcast = False
    for ours, theirs in zip(gate.shape, x.shape):
        if ours == 1 and theirs != 1:
            broadcast = True
        elif ours != theirs:
            return False
    return broadcast


def rank(value: ir.Value) -> int | None:
    """``value``'s rank: its shape's, or where shape inference left it unknown, a Reshape's, from
    the length of its shape input (a classifier's flatten that Paddle computes from the input's
    Shape, which onnx's inference does not follow); None where it is not known."""
    if value.shape is not None:
        return len(value.shape)
    producer = value.producer()
    if producer is not None and producer.op_type == "Reshape" and is_default_domain(producer) and len(producer.inputs) == 2:
        target = producer.inputs[1].shape if producer.inputs[1] is not None else None
        if target is not None and len(target) == 1 and isinstance(target[0], int):
            return target[0]
    return None


def static_values(graph: ir.Graph) -> set[ir.Value]:
    """Values computable from initializers and Constant nodes alone."""
    static = {v for v in graph.initializers.values()}
    for node in graph:
        if all(v in static or v.const_value is not None for v in reads(node)):
            static.update(node.outputs)
    return static


def reads(node: ir.Node) -> list[ir.Value]:
    """The values ``node`` reads: its inputs and, for If, Loop and Scan, the values of its own
    graph that its subgraphs read (they take them by name, not as inputs)."""
    captured = [v for inner in nested_nodes(node) for v in inner.inputs if v is not None and v.graph is node.graph]
    return [v for v in node.inputs if v is not None] + captured


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The graphs of an If, Loop or Scan node's attributes (none for other ops)."""
    found = []
    for attribute in node.attributes.values():
        if attribute.type == ir.AttributeType.GRAPH:
            found.append(attribute.value)
        elif attribute.type == ir.AttributeType.GRAPHS:
            found.extend(attribute.value)
    return found


def nested_nodes(node: ir.Node) -> list[ir.Node]:
    """The nodes of an If, Loop or Scan node's subgraphs, at any depth."""
    return [inner for sub in subgraphs(node) for inner in ir.traversal.RecursiveGraphIterator(sub)]


def downstream_nodes(values: Iterable[ir.Value]) -> set[ir.Node]:
    """Every node that reads, directly or not, one of ``values`` (an If, Loop or Scan whose
    subgraphs read it counts as reading it)."""
    seen: set[ir.Node] = set()
    owners: dict[ir.Node, ir.Node] = {}  # nested nodes -> the node of an outer graph that holds them
    frontier = list(values)
    while frontier:
        value = frontier.pop()
        for consumer in value.consumers():
            if consumer.graph is not value.graph and value.graph is not None:
                if consumer not in owners:
                    owners.update({inner: n for n in value.graph for inner in nested_nodes(n)})
                consumer = owners.get(consumer, consumer)
            if consumer not in seen:
                seen.add(consumer)
                frontier.extend(consumer.outputs)
    return seen


def outputs_reached(graph: ir.Graph, value: ir.Value) -> list[str]:
    """The names of the graph outputs that ``value`` is, or that are computed from it."""
    downstream = downstream_nodes([value])
    return [o.name for o in graph.outputs if o is value or o.producer() in downstream]


# Ops that map each element on its own (given constants or values of the same unit): an
# activation after a weighted op, however the exporter spells it (SiLU as Sigmoid and Mul, a
# ReLU6 as Max and Min, Mish as one op from opset 18).
ELEMENTWISE_OPS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "ThresholdedRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Clip", "Max", "Min", "Mul", "Add", "Sub", "Div", "Neg", "Abs", "Exp",
    "Log", "Sqrt", "Reciprocal", "Pow", "Identity", "BatchNormalization",
})


def is_elementwise_of(source: ir.Value, value: ir.Value) -> bool:
    """Whether ``value`` is computed from ``source`` element by element: through
    :data:`ELEMENTWISE_OPS` alone, each reading only ``source``, what it computes, and constants
    of no higher rank (a SiLU, ``x · Sigmoid(x)``, is; a residual sum or a LayerNorm is not)."""
    if value is source:
        return False
    frontier, seen = [value], set()
    while frontier:
        v = frontier.pop()
        if v is source or v in seen or is_constant(v):
            continue
        seen.add(v)
        node = v.producer()
        if node is None or not is_default_domain(node) or node.op_type not in ELEMENTWISE_OPS:
            return False
        for operand in filter(None, node.inputs):
            if is_constant(operand) and (rank(operand) or 0) > (rank(source) or 0):
                return False
            frontier.append(operand)
    return True


# Ops whose output steps as what they read crosses a value: an output computed from them flips
# with a small change there (a max-pool NMS's mask, where x == MaxPool(x); atan2's quadrant).
STEP_OPS = frozenset({"Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Sign"})


def selections(graph: ir.Graph) -> tuple[list[ir.Value], list[ir.Node]]:
    """The computed float tensors that the model's selections read, and the selecting nodes: a
    NonMaxSuppression (the boxes and scores it reads), and a comparison or Sign of a computed
    float tensor after the last weighted op (the head's post-processing: a max-pool NMS, an
    atan2). Where a weighted op follows, the step is part of the network (a mask it computes
    with), and what the outputs read of it is scored as they are. ([], []) where none selects."""
    read, selecting = [], []
    for node in graph:
        if not is_default_domain(node):
            continue
        if node.op_type == "NonMaxSuppression":
            inputs = node.inputs[:2]
        elif node.op_type in STEP_OPS and not any(n.op_type in WEIGHTED_OPS for n in downstream_nodes(node.outputs)):
            inputs = node.inputs
        else:
            continue
        floats = [v for v in inputs if v is not None and not is_constant(v) and v.producer() is not None
                  and v.dtype is not None and v.dtype.is_floating_point()]
        if floats:
            read += floats
            selecting.append(node)
    return list(dict.fromkeys(read)), selecting


def fed_inputs(graph: ir.Graph) -> list[ir.Value]:
    """The graph inputs that are fed (not initializers listed among them, as old exports list their weights)."""
    return [v for v in graph.inputs if v.name not in graph.initializers]


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """All named values of the main graph: inputs, initializers and node outputs."""
    return ir.convenience.create_value_mapping(graph, include_subgraphs=False)


def is_quantized(graph: ir.Graph) -> bool:
    """Whether the graph already holds quantization ops (QDQ or QOperator format)."""
    return any(node.op_type in QDQ_OPS for node in graph) or bool(integer_kernels(graph))


def integer_kernels(graph: ir.Graph) -> list[str]:
    """The op types of integer kernels in the graph (onnxruntime's QOperator format: QLinearConv,
    ConvInteger, QGemm, ...), where a QDQ graph has float ops between Q/DQ pairs."""
    return sorted({node.op_type for node in graph if node.op_type.startswith("QLinear") or node.op_type in _INTEGER_OPS})


_INTEGER_OPS = frozenset({"ConvInteger", "MatMulInteger", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention",
                          "DynamicQuantizeLSTM"})


def dequantized_view(value: ir.Value) -> ir.Value | None:
    """The output of ``DequantizeLinear(QuantizeLinear(value))`` when the graph has one."""
    for q in value.consumers():
        if q.op_type != "QuantizeLinear" or q.inputs[0] is not value:
            continue
        clip = narrowing(q)
        for dq in (clip or q).outputs[0].consumers():
            if dq.op_type == "DequantizeLinear":
                return dq.outputs[0]
    return None


def narrowing(q: ir.Node) -> ir.Node | None:
    """The Clip of constant bounds between QuantizeLinear ``q`` and its DequantizeLinear that
    narrows the integers below their type's range (a 4-bit grid held in uint8), if any."""
    for clip in q.outputs[0].consumers():
        if clip.op_type == "Clip" and is_default_domain(clip) and all(is_constant(v) for v in clip.inputs[1:] if v is not None):
            return clip
    return None


def quantized_only_view(value: ir.Value) -> ir.Value | None:
    """``dequantized_view(value)`` where quantizers are all that read ``value`` (and it is no
    graph output), else None."""
    view = dequantized_view(value)
    if view is not None and not value.is_graph_output() and all(c.op_type == "QuantizeLinear" for c in value.consumers()):
        return view
    return None


def next_reads(value: ir.Value) -> list[tuple[ir.Value, ir.Value]]:
    """Where the next ops read what ``value`` computes: walking forward through ops that neither
    quantize nor weigh it, each tensor a quantizer reads, as its DequantizeLinear view (the walk
    goes no further there), and each one a weighted op, a subgraph or the graph outputs read, or
    an op that joins it with what later weighted ops computed from ``value`` (a pre-LN
    transformer's next residual sum: past it, the walk would follow the residual stream through
    every later block); each paired with the tensor it views (itself where it is no quantizer's)."""
    weighted = {node for node in downstream_nodes([value]) if weight_input(node, dequantized=True) is not None}
    weighed_later = weighted | downstream_nodes([out for node in weighted for out in node.outputs])
    found: list[tuple[ir.Value, ir.Value]] = []
    seen: set[ir.Value] = set()
    frontier = [value]
    while frontier:
        v = frontier.pop(0)
        if v in seen:
            continue
        seen.add(v)
        view = dequantized_view(v)
        if view is not None:
            found.append((view, v))
            continue
        passed = [reader for reader in v.consumers() if not _read_as_a_layer_reads(reader, v, weighted, weighed_later)]
        if v.is_graph_output() or len(passed) < len(v.consumers()):
            found.append((v, v))
        frontier.extend(out for reader in passed for out in reader.outputs)
    return found


def _read_as_a_layer_reads(node: ir.Node, value: ir.Value, weighted: set[ir.Node], weighed_later: set[ir.Node]) -> bool:
    """Whether ``node`` reads ``value`` as a next layer does: as the data of one of the ``weighted``
    ops, in a subgraph, or joined with a tensor that ``weighed_later`` ops computed."""
    if node.graph is not value.graph or (node in weighted and node.inputs[0] is value):
        return True
    return any(other is not value and other.producer() in weighed_later for other in reads(node))


def dequantizer(value: ir.Value | None) -> ir.Node | None:
    """The DequantizeLinear that produces ``value``, if one does."""
    producer = value.producer() if value is not None else None
    return producer if producer is not None and producer.op_type == "DequantizeLinear" else None


def requantizer(value: ir.Value) -> ir.Node | None:
    """The QuantizeLinear of ``value`` when ``value`` is the output of DequantizeLinear(QuantizeLinear(...)),
    a narrowing Clip between them or not."""
    dq = dequantizer(value)
    if dq is None:
        return None
    q = dq.inputs[0].producer()
    if q is not None and q.op_type == "Clip" and len(q.inputs) and q.inputs[0].producer() is not None:
        q = q.inputs[0].producer() if narrowing(q.inputs[0].producer()) is q else None
    return q if q is not None and q.op_type == "QuantizeLinear" else None


def quantizer_params(q: ir.Node | None) -> qm.QuantParams | None:
    """A per-tensor QuantizeLinear's constant scale and zero point (None for any other), and
    its width where it is not its type's (int4, or a narrowing Clip's range)."""
    if q is None or len(q.inputs) < 3 or q.inputs[2] is None:
        return None
    constants = [ir.convenience.get_const_tensor(v) for v in q.inputs[1:3]]
    if any(c is None or c.size != 1 for c in constants):
        return None
    scale, zero_point = (c.numpy().reshape(()) for c in constants)
    bits = 4 if constants[1].dtype in (ir.DataType.INT4, ir.DataType.UINT4) else None
    clip = narrowing(q)
    if clip is not None:
        low, high = (int(ir.convenience.get_const_tensor(v).numpy().reshape(())) for v in clip.inputs[1:3])
        bits = (high - low + 1).bit_length() - 1
    return qm.QuantParams(scale.astype(np.float32), zero_point, bits)


class NameScope:
    """Hands out value and node names that are not yet taken in a graph."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.taken = set(values_by_name(graph)) | {n.name for n in graph if n.name}

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def initializer(self, base: str, array, dtype: ir.DataType | None = None) -> ir.Value:
        """Register ``array`` as a new initializer named after ``base`` (of ``dtype`` where numpy's is not it)."""
        name = self.fresh(base)
        value = ir.val(name, const_value=ir.tensor(array, dtype=dtype, name=name))
        self.graph.register_initializer(value)
        return value

    def node(self, op_type: str, inputs, output: str, **attributes) -> ir.Node:
        """A one-output node named after its output."""
        out = ir.val(self.fresh(output))
        return ir.node(op_type, inputs, attributes or None, outputs=[out], name=self.fresh(out.name + "/" + op_type))


def drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove ``value`` from the graph's initializers where nothing reads it any more."""
    if value is not None and not value.uses() and value.name in graph.initializers:
        graph.initializers.pop(value.name)


def replace_graph_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Where ``old`` is a graph output, ``new`` takes its slot (its name is the caller's to give)."""
    for i, value in enumerate(graph.outputs):
        if value is old:
            graph.outputs[i] = new


def insert_after_producer(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node]) -> None:
    """Insert ``nodes`` where ``value`` becomes available: after its producer, or first."""
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, nodes)
    elif len(graph) > 0:
        graph.insert_before(graph[0], nodes)
    else:
        graph.extend(nodes)


#: Gates per hidden unit of the recurrent ops: their weights are [directions, gates · hidden, width].
RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}

#: The ops that do a model's multiply-accumulates.
COMPUTE_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", *RECURRENT_GATES}


def multiply_accumulates(node: ir.Node, x_shape: Sequence[int] | None, y_shape: Sequence[int] | None) -> int:
    """Multiply-accumulates of one run of a :data:`COMPUTE_OPS` node, from the shapes of its first
    input and first output (None: not known); 0 where they do not tell."""
    op, a = node.op_type, node.attributes
    if x_shape is None or (y_shape is None and op not in RECURRENT_GATES):
        return 0
    if op in RECURRENT_GATES:
        steps, batch, width = x_shape if a.get_int("layout", 0) == 0 else (x_shape[1], x_shape[0], x_shape[2])
        hidden = a.get_int("hidden_size", 0)
        directions = 2 if a.get_string("direction", "forward") == "bidirectional" else 1
        return steps * batch * directions * RECURRENT_GATES[op] * hidden * (width + hidden)
    if op in ("Conv", "ConvTranspose"):
        weight = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if weight is None:
            return 0
        per_element = math.prod(weight.shape[1:])  # Conv: C_in / group · kernel per output; ConvTranspose: per input
        return math.prod(y_shape if op == "Conv" else x_shape) * per_element
    if op == "Gemm":
        return math.prod(y_shape) * x_shape[0 if a.get_int("transA", 0) else 1]
    return math.prod(y_shape) * x_shape[-1]  # MatMul

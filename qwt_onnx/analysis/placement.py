"""Where the Q/DQ pairs go, per target: an analysis that returns plain data (:class:`Placement`).

Placement, per target:

* weights of Conv (axis 0), MatMul (last axis) and Gemm (axis 0 with transB,
  else 1): int8 symmetric per output channel, stored as int8 initializers
  behind a DequantizeLinear;
* the data input of each of those ops: per-tensor Q/DQ, shared by all the
  weighted ops that read the tensor (other readers keep the float tensor);
* ``ort`` only: the outputs of Conv, so that onnxruntime fuses them into
  QLinearConv (MatMul fuses into MatMulIntegerToFloat without one, and Gemm
  into QGemm with a float output once its bias is int32, which the Q/DQ pass
  writes), except where a Conv's output reaches the graph outputs only through
  ops that move values (a detector's heads: Reshape, Transpose, Concat), as a
  graph output itself would. A Relu or a Clip from 0 (ReLU6) that is the sole reader of such an
  output is absorbed into the quantizer (zero point at 0 clamps exactly like
  them), as onnxruntime's own quantizer does; where its output is a graph output,
  that output is the DequantizeLinear's (a feature encoder's stages). Residual Adds, pools and Concats
  whose inputs are such outputs and whose output feeds a quantizer then fuse
  into QLinearAdd, QLinearGlobalAveragePool and QLinearConcat without
  quantizers of their own; a Concat that reads a float tensor beside them gets
  that tensor quantized on its own grid, for it alone, which changes no value
  (:func:`_concat_joins`). A residual Add whose output some reader takes in
  float (the next block's shortcut) stays float: quantized for every reader,
  as quantize_static does, captcha-whisperer's CRNN ran 9% faster at batch 16
  but lost 0.9 dB of fidelity, and a small ResNet's QwT gain fell from 6.3 to
  3.2 dB, the requantized sums rounding the branches' corrections away. A SiLU
  (Sigmoid and Mul) after such an output likewise runs in float between a
  DequantizeLinear and a QuantizeLinear unless its Sigmoid's output and its
  product are quantized too, for every reader: then as QLinearSigmoid and
  QLinearMul (``int8_silus``): on EfficientWord-Net's EfficientNet embedder that
  took the INT8 model from 1.43x to 0.99x FP32's latency at batch 16 for 0.2 dB
  (1.80x to 1.11x in another run), but it cost ddddocr's YOLOX detector 1.3 dB
  of objectness, the products rounded where they were not. A hard-swish
  (HardSigmoid and Mul, its HardSigmoid then written as an Add, QLinearAdd) and a
  squeeze-excitation's channel gate (a Sigmoid or HardSigmoid of one value per
  channel) go with them.

Nothing else is quantized: LayerNorm, Softmax, GELU and attention-score
MatMuls (two activations) stay float. Quantizing them is what onnxruntime's
quantize_static does, and on MiniLM it costs 20 dB of fidelity (4.3 against
24.5 dB) and runs no faster (docs/BENCHMARKS.md).

``ort`` uses uint8 asymmetric activations; ``trt`` int8 symmetric ones with
zero point 0 and leaves biases in float, as TensorRT's parser requires.
Weighted ops matched by an ``Exclusions`` keep float weights and inputs, and so
do those of a Log's linear front end (:func:`log_front_end`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Container

import onnx_ir as ir

from qwt_onnx.analysis.blocks import LAYOUT_OPS
from qwt_onnx.analysis.readable import UNBOUNDED, readable_interval
from qwt_onnx.graph import query as g
from qwt_onnx.numerics import saturation
from qwt_onnx.numerics.hessian import InputGeometry
from qwt_onnx.options import Target


@dataclasses.dataclass
class ActivationSite:
    """One activation quantizer: ``value`` is quantized, its ``readers`` read the DQ output."""

    value: ir.Value
    observed: ir.Value  # the tensor whose range is calibrated
    readers: list[tuple[ir.Node, int]]
    absorbed: ir.Node | None = None  # a Relu or Clip replaced by the quantizer's clamp


@dataclasses.dataclass
class WeightSite:
    weight: ir.Value
    axis: int
    readers: list[tuple[ir.Node, int]]
    paired: bool = False  # some reader's kernel adds products in int16 pairs (not depthwise)


@dataclasses.dataclass
class Placement:
    weights: list[WeightSite]
    activations: list[ActivationSite]

    @property
    def observed_names(self) -> list[str]:
        """The tensors whose ranges are calibrated, once each (a stream's movers share its range)."""
        return list(dict.fromkeys(site.observed.name for site in self.activations))

    def readable_intervals(self, bits: int = 8) -> dict[str, tuple[float, float]]:
        """Per observed tensor whose readers all saturate, the values they can tell apart at
        ``bits`` (:mod:`qwt_onnx.analysis.readable`): its range need reach no further."""
        readers: dict[str, list[tuple[ir.Node, int]]] = {}
        for site in self.activations:
            readers.setdefault(site.observed.name, []).extend(site.readers)
        intervals = {name: readable_interval(found, bits) for name, found in readers.items()}
        return {name: interval for name, interval in intervals.items() if interval != UNBOUNDED}

    def stem(self, graph: ir.Graph, depth: int) -> list[str]:
        """The names of the quantized weighted ops nearest the graph inputs: those with at most
        ``depth`` quantized weighted ops, themselves included, on any path from an input."""
        quantized = {node for site in self.weights for node, _ in site.readers}
        level: dict[ir.Value, int] = {}  # quantized weighted ops on the longest path to a value
        found = []
        for node in graph:  # in topological order
            here = max((level.get(v, 0) for v in g.reads(node)), default=0) + (node in quantized)
            if node in quantized and here <= depth:
                found.append(node.name)
            level.update((v, here) for v in node.outputs)
        return found

    def channel_axes(self) -> dict[str, int]:
        """The data input of every op with a quantized weight, and its channel axis: whose mean
        bias correction needs."""
        axes = {}
        for site in self.weights:
            for node, _ in site.readers:
                axis = _input_channel_axis(node)
                if axis is not None:
                    axes[node.inputs[0].name] = axis
        return axes

    def hessian_inputs(self, most: int) -> dict[str, tuple[str, InputGeometry]]:
        """Per weight read by one op that multiplies it by its input's rows or patches (a 2-D
        MatMul / Gemm weight, a convolution's) of at most ``most`` values, that input and how the
        op reads it: whose second moments error-feedback rounding needs."""
        inputs = {}
        for site in self.weights:
            if len(site.readers) != 1:
                continue
            node = site.readers[0][0]
            geometry = input_geometry(node)
            shape = site.weight.const_value.shape
            width = math.prod(shape[1:]) if len(shape) > 2 else shape[1 - site.axis]
            if geometry is not None and width <= most:
                inputs[site.weight.name] = (node.inputs[0].name, geometry)
        return inputs


def input_geometry(node: ir.Node) -> InputGeometry | None:
    """How ``node`` reads its data input against its weight; None for a weight of another rank."""
    shape = g.weight_input(node).const_value.shape
    if node.op_type == "Conv" and len(shape) > 2:
        a = node.attributes
        return InputGeometry(
            kernel=tuple(shape[2:]),
            strides=tuple(a.get_ints("strides", ())),
            pads=tuple(a.get_ints("pads", ())),
            dilations=tuple(a.get_ints("dilations", ())),
            group=a.get_int("group", 1),
            auto_pad=a.get_string("auto_pad", "NOTSET"),
        )
    if node.op_type in ("MatMul", "Gemm") and len(shape) == 2:
        return InputGeometry(transposed=node.op_type == "Gemm" and bool(node.attributes.get_int("transA", 0)))
    return None


@dataclasses.dataclass(frozen=True)
class Exclusions:
    """Weighted ops to leave in float: node names and op types, each a regular expression
    that must match the whole name (a plain name matches itself); and ``kept_float``, nodes
    left in float by name (a Log's front end)."""

    nodes: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ()
    kept_float: frozenset[str] = frozenset()

    def excludes(self, node: ir.Node) -> bool:
        return node.name in self.kept_float or any(re.fullmatch(p, node.name or "") for p in self.nodes) or any(
            re.fullmatch(p, node.op_type) for p in self.op_types
        )

    def unmatched(self, graph: ir.Graph) -> list[str]:
        """The patterns that match no weighted op of ``graph`` (most likely typos)."""
        weighted = [n for n in graph if g.is_weighted(n)]
        return [p for p in self.nodes if not any(re.fullmatch(p, n.name or "") for n in weighted)] + [
            p for p in self.op_types if not any(re.fullmatch(p, n.op_type) for n in weighted)
        ]


# Ops that carry a value forward linearly, as a polynomial or by moving it about: a chain of
# them and of weighted ops from the graph input to a Log is a spectrogram (STFT or CQT as
# convolutions, squared magnitudes, a mel filterbank as a MatMul, a floor against log(0)).
_FRONT_END_OPS = {
    "Add", "Sub", "Mul", "Div", "Neg", "Pow", "Sqrt", "Abs", "Max", "Clip", "ReduceSum", "ReduceMean",
    "ReduceSumSquare", "ReduceL2", "Reshape", "Transpose", "Concat", "Slice", "Pad", "Unsqueeze", "Squeeze",
    "Flatten", "Gather", "Split", "Identity", "Cast", "Expand", "Tile", *g.WEIGHTED_OPS,
}


def log_front_end(graph: ir.Graph) -> list[ir.Node]:
    """The weighted ops that compute what a Log reads through linear and polynomial ops only
    (an audio model's spectrogram, in the graph). Quantized, they add an absolute error that the
    Log turns into a relative one, without bound where the spectrum is near zero: quantizing the
    constant-Q transform of Basic Pitch (Spotify's tf2onnx export) cost 7.6 against 37.3 dB
    at its onset output. The ops after the Log quantize well; a Log behind any other op (a Softmax,
    an activation) has no such front end."""
    found: dict[ir.Node, None] = {}
    seen: set[ir.Node] = set()
    stack = [n.inputs[0] for n in graph if n.op_type == "Log" and g.is_default_domain(n)]
    while stack:
        node = stack.pop().producer()
        if node is None or node in seen or not g.is_default_domain(node) or node.op_type not in _FRONT_END_OPS:
            continue
        seen.add(node)
        if g.is_weighted(node):
            found[node] = None
        stack += [v for v in node.inputs if v is not None and not g.is_constant(v)]
    return [n for n in graph if n in found]  # in graph order


def weight_axis(node: ir.Node, weight: ir.Value) -> int | None:
    """The output-channel axis of a weighted op's weight, None where there is none."""
    rank = len(weight.const_value.shape)
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = node.attributes.get_int("transB", 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul" and rank >= 2:
        return rank - 1
    return None


def place(graph: ir.Graph, target: Target, excluded: Exclusions = Exclusions(), int8_residuals: bool = False,
          int8_silus: bool = False, float_hard_swishes: bool = False) -> Placement:
    """Where the quantizers go in ``graph`` for ``target``; with ``int8_residuals``, residual
    streams are quantized for every reader (:func:`_residual_streams`), with ``int8_silus`` and
    ``ort`` the SiLUs, hard-swishes (not with ``float_hard_swishes``) and channel gates of quantized
    Conv outputs (:func:`_gated_products`)."""
    weighted = [n for n in graph if g.is_weighted(n) and not excluded.excludes(n)]
    weights: dict[ir.Value, WeightSite] = {}
    for node in weighted:
        weight = g.weight_input(node)
        axis = weight_axis(node, weight)
        if axis is None:
            continue
        site = weights.setdefault(weight, WeightSite(weight, axis, []))
        if site.axis == axis:  # a weight shared along another axis stays float for that reader
            site.readers.append((node, g.WEIGHTED_OPS[node.op_type]))
            group = node.attributes.get_int("group", 1) if node.op_type == "Conv" else 1
            site.paired |= saturation.kernel_pairs_products(weight.const_value.shape, group)

    sites: dict[ir.Value, ActivationSite] = {}
    dequantized: set[ir.Value] = set()  # values whose readers will all read a DQ output
    if target == Target.ORT:
        for node in weighted:
            if node.op_type == "Conv" and not _moved_to_outputs(node.outputs[0]):
                site = _output_site(node.outputs[0])
                sites[site.value] = site
                dequantized.add(site.observed)
        gated = [s.observed for s in sites.values()] if int8_silus else []
        while gated:  # a product gated again (MobileNetV3's squeeze-excitation scales a hard-swish's product)
            found = [site for site in _gated_products(gated, float_hard_swishes) if site.value not in sites]
            sites.update((site.value, site) for site in found)
            dequantized.update(site.value for site in found)
            gated = [site.value for site in found if site.value.producer().op_type == "Mul"]
    for node in weighted:
        x = node.inputs[0]
        if x in dequantized or g.dequantizer(x) is not None:
            continue
        sites.setdefault(x, ActivationSite(x, x, [])).readers.append((node, 0))
    if int8_residuals:
        sites = _residual_streams(sites, absorb=target == Target.ORT)
    if target == Target.ORT:
        sites.update(_concat_joins(sites))
    return Placement(list(weights.values()), list(sites.values()))


def _concat_joins(sites: dict[ir.Value, ActivationSite]) -> dict[ir.Value, ActivationSite]:
    """Quantizers for the float inputs of each Concat whose output ``sites`` quantize for every
    reader, for the Concat alone: on that output's range, as ``Q(Concat(a, b))`` is
    ``Concat(Q(a), Q(b))`` on one grid, or where a :data:`_STREAM_MOVERS` op moved the input from
    a quantized tensor (a MaxPool of one), on that tensor's range, which rounds nothing.
    Every reader reads what it read before; onnxruntime then joins uint8 maps in QLinearConcat,
    moves them on uint8, and runs an Add that only the Concat reads (the last bottleneck of
    YOLOv8's C2f) as QLinearAdd, where it ran DequantizeLinears, float ops and QuantizeLinears.
    Only where that takes a DequantizeLinear away (:func:`_joining_pays`)."""
    source = {reader: site for site in sites.values() for reader in site.readers}  # the quantizer each edge reads
    joins: dict[ir.Value, ActivationSite] = {}
    pending = list(sites.values())
    while pending:
        site = pending.pop()
        concat = site.value.producer()
        if concat is None or concat.op_type != "Concat" or not g.is_default_domain(concat) or not _read_only_quantized(site):
            continue
        if not _joining_pays(concat, source):
            continue
        for index, x in enumerate(concat.inputs):
            if (concat, index) in source or x in sites or g.is_constant(x):
                continue
            mover = x.producer()
            moved = source.get((mover, 0)) if mover is not None and _moves_stream(mover) else None
            grid = moved.observed if moved is not None else site.observed
            join = joins.setdefault(x, ActivationSite(x, grid, []))
            if join.observed is grid:  # a tensor that two Concats join on two grids stays float for the second
                join.readers.append((concat, index))
                source[(concat, index)] = join
        pending += [joins[x] for x in concat.inputs if x in joins]  # a Concat of Concats
    return joins


def _joining_pays(concat: ir.Node, taken: Container[tuple[ir.Node, int]]) -> bool:
    """Whether some input of ``concat`` is read through a quantizer already, or made from such
    inputs by an op that then runs on integers (:data:`_INTEGER_WITH_QUANTIZED_OUTPUT`, or one of
    :data:`_STREAM_MOVERS`, which moves the uint8 values). Where every input is a float op's (PP-OCR's
    FPN joins Adds of upsampled maps), the join only moves the one QuantizeLinear onto each input:
    measured no faster on onnxruntime (130 against 133 ms at batch 16)."""
    for index, x in enumerate(concat.inputs):
        producer = x.producer()
        if (concat, index) in taken:
            return True
        if producer is None or not (producer.op_type in _INTEGER_WITH_QUANTIZED_OUTPUT and g.is_default_domain(producer)
                                    or _moves_stream(producer)):
            continue
        computed = [i for i, v in enumerate(producer.inputs) if v is not None and not g.is_constant(v)]
        if computed and all((producer, i) in taken for i in computed):
            return True
    return False


# What onnxruntime's CPU provider runs on uint8 once its inputs and output are quantized, whatever
# their scales: QLinearAdd, QLinearMul, QLinearConcat. Not a Resize: onnxruntime upsamples uint8 only
# on one scale, and a join quantizes its output on the Concat's.
_INTEGER_WITH_QUANTIZED_OUTPUT = {"Add", "Mul", "Concat"}


def _read_only_quantized(site: ActivationSite) -> bool:
    """Whether every reader of ``site.value`` reads it through the site's quantizer."""
    return not site.value.is_graph_output() and set(site.value.uses()) <= set(site.readers)


def _gated_products(quantized: list[ir.Value], float_hard_swishes: bool = False) -> list[ActivationSite]:
    """Quantizers for each gated product of a tensor ``x`` in ``quantized`` (a Conv output, or
    such a product): a SiLU, ``x · Sigmoid(x)``, a hard-swish, ``x · HardSigmoid(x)``, or a
    channel gate, ``x · σ(z)`` with a Sigmoid or HardSigmoid of fewer values that broadcast over
    ``x`` (a squeeze-excitation's, one per channel;
    :func:`~qwt_onnx.graph.query.gate_of`): on the gate and, for every reader, on the product
    (carried through :data:`_STREAM_MOVERS` on its range). onnxruntime then runs the product as
    QLinearMul on uint8 maps, where in float it is three passes over a float map
    (DequantizeLinear, Mul, QuantizeLinear), a SiLU's Sigmoid as QLinearSigmoid, and a
    hard-swish's HardSigmoid, ``x · HardSigmoid(x)``, as QLinearAdd once written as an Add
    (:mod:`qwt_onnx.passes.hardsigmoid`); a channel gate's HardSigmoid runs in float on its few
    values."""
    found = []
    for x in quantized:
        for mul in dict.fromkeys(x.consumers()):
            gate = g.gate_of(mul, x)
            if gate is None or _moved_to_outputs(mul.outputs[0]) or float_hard_swishes and g.is_hard_swish_gate(gate):
                continue
            product = mul.outputs[0]
            carried = ActivationSite(product, product, list(product.uses()))
            found += [ActivationSite(gate, gate, list(gate.uses())), carried, *_moved_on(carried)]
    return found


# Ops that carry a stream's values on, on the stream's own scale: a pool of maxima, a padding with
# zeros (more channels for the shortcut of a wider block), layout moves, a Split's parts (YOLOv8's
# C2f splits a SiLU's product). Quantized on the stream's range, their outputs are exactly the
# values they read: onnxruntime moves the uint8 values, and nothing is rounded twice. Not a nearest
# Resize: onnxruntime upsamples uint8 maps slower than float ones, and whatever reads the larger
# map in float then dequantizes four times the values (PP-OCR's FPN: 6.7 -> 12.6 ms for its
# Resizes, 17 -> 27 ms for its DequantizeLinears at batch 16).
_STREAM_MOVERS = {"MaxPool", "Pad", "Transpose", "Reshape", "Identity", "Split"}


def _moves_stream(node: ir.Node) -> bool:
    """A :data:`_STREAM_MOVERS` op; a constant Pad only with zeros (an attribute before opset 11)."""
    if not g.is_default_domain(node) or node.op_type not in _STREAM_MOVERS:
        return False
    if node.op_type != "Pad" or node.attributes.get_string("mode", "constant") != "constant":
        return True
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        fill = ir.convenience.get_const_tensor(node.inputs[2])
        return fill is not None and fill.size == 1 and float(fill.numpy().reshape(())) == 0.0
    return node.attributes.get_float("value", 0.0) == 0.0


def _residual_streams(sites: dict[ir.Value, ActivationSite], absorb: bool) -> dict[ir.Value, ActivationSite]:
    """``sites`` with each residual stream that weighted ops read (the output of an Add of two
    computed tensors, or of a Relu or Clip from 0 that alone reads one) quantized for every reader,
    and where such a stream or a Conv output goes on through :data:`_STREAM_MOVERS` (a shortcut's
    MaxPool and channel Pad), their outputs quantized on its range: the residual Adds then read
    dequantized inputs only, and onnxruntime runs them as QLinearAdd. With ``absorb`` (uint8 with
    zero point 0 at the bottom) the Relu is taken into the Add's quantizer, as after a Conv."""
    streams = dict(sites)
    for x, site in sites.items():
        if site.value is not site.observed or x.is_graph_input() or x.is_graph_output():
            continue
        producer, clamp = x.producer(), None
        if producer is not None and _clamps_at_zero(producer) and len(producer.inputs[0].uses()) == 1:
            producer, clamp = producer.inputs[0].producer(), producer
        if producer is None or not g.adds_computed(producer):
            continue
        absorbed = clamp if absorb and clamp is not None and not producer.outputs[0].is_graph_output() else None
        streams[x] = ActivationSite(producer.outputs[0] if absorbed else x, x, list(x.uses()), absorbed=absorbed)
    for site in list(streams.values()):  # the streams, and the Conv outputs quantized for every reader
        if {node for node, _ in site.readers} != {node for node, _ in site.observed.uses()}:
            continue
        streams.update((moved.value, moved) for moved in _moved_on(site, streams))
    return streams


def _moved_on(site: ActivationSite, taken: Container[ir.Value] = ()) -> list[ActivationSite]:
    """Quantizers on ``site``'s range for the outputs of the :data:`_STREAM_MOVERS` that carry
    its value on (a shortcut's MaxPool and channel Pad, an SPPF's pools), up to those ``taken``."""
    found, movers = [], [node for node, _ in site.readers if _moves_stream(node)]
    while movers:
        for moved in movers.pop().outputs:  # a Split's every part
            if moved not in taken and not moved.is_graph_output():
                found.append(ActivationSite(moved, site.observed, list(moved.uses())))
                movers += [node for node, _ in moved.uses() if _moves_stream(node)]
    return found


def left_float(graph: ir.Graph, placement: Placement, excluded: Exclusions, stem: list[str]) -> dict[ir.Node, str]:
    """The compute ops (:data:`~qwt_onnx.graph.query.COMPUTE_OPS`) of ``graph`` that stay float
    when ``placement`` is written without the weighted ops named in ``stem``, each with why:
    "control flow", "recurrent", "ConvTranspose", "two activations", "float stem", "excluded",
    "spectrogram", "computed weight" or "weight layout" (the summary words them)."""
    stem_names = set(stem)
    quantized = {node for site in placement.weights for node, _ in site.readers if node.name not in stem_names}
    found = {}
    for node in graph:
        if node.op_type in g.COMPUTE_OPS and g.is_default_domain(node) and node not in quantized:
            found[node] = _why_float(node, excluded, stem_names)
        found.update((inner, "control flow") for inner in g.nested_nodes(node) if inner.op_type in g.COMPUTE_OPS)
    return found


def _why_float(node: ir.Node, excluded: Exclusions, stem: set[str]) -> str:
    if node.name in stem:
        return "float stem"
    if node.name in excluded.kept_float:
        return "spectrogram"
    if excluded.excludes(node):
        return "excluded"
    if node.op_type in g.RECURRENT_GATES:
        return "recurrent"
    if node.op_type == "ConvTranspose":
        return "ConvTranspose"
    if g.is_weighted(node):
        return "weight layout"
    computed = [v for v in node.inputs[:2] if v is not None and not g.is_constant(v)]
    return "two activations" if node.op_type in ("MatMul", "Gemm") and len(computed) == 2 else "computed weight"


def _input_channel_axis(node: ir.Node) -> int | None:
    """The axis of ``node``'s data input that its weight reduces over, None for batched weights."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transA", 0) else 1
    return -1 if len(g.weight_input(node).const_value.shape) == 2 else None


# Ops that only move or gather values: what they output is what they read.
_MOVING_OPS = {*LAYOUT_OPS, "Concat"}


def _moved_to_outputs(value: ir.Value) -> bool:
    """Whether every path from ``value`` reaches a graph output through ops that only move values
    (a detector's box and score head: Conv, Reshape, Concat of the anchors of every scale). Its
    quantizer's error would reach the output untouched, and its range is the raw output's, whose
    far tail (BlazeFace's logits of anchors far from any face, down to -2000) sets the step
    for the values that decide (the logits near 0)."""
    if value.is_graph_output():
        return True
    uses = [node for node, _ in value.uses()]
    return bool(uses) and all(g.is_default_domain(n) and _moves(n) and all(_moved_to_outputs(v) for v in n.outputs) for n in uses)


def _moves(node: ir.Node) -> bool:
    """Whether ``node`` only moves values: a layout op, a Concat, or a Cast to another float type
    (a half-precision model's outputs, computed in float32: passes.upcast)."""
    if node.op_type == "Cast":
        return ir.DataType(node.attributes.get_int("to")).is_floating_point()
    return node.op_type in _MOVING_OPS


def _output_site(value: ir.Value) -> ActivationSite:
    consumers = value.consumers()
    if len(consumers) == 1 and _clamps_at_zero(consumers[0]):
        clamp = consumers[0]
        return ActivationSite(value, clamp.outputs[0], list(clamp.outputs[0].uses()), absorbed=clamp)
    return ActivationSite(value, value, list(value.uses()))


def _clamps_at_zero(node: ir.Node) -> bool:
    """A Relu, or a Clip from 0 (ReLU6 and the like): a uint8 quantizer of its output's range
    clamps exactly like it, zero point 0 at the bottom and the range's top at or below the
    Clip's maximum."""
    if not g.is_default_domain(node):
        return False
    if node.op_type == "Relu":
        return True
    if node.op_type != "Clip" or len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    low = ir.convenience.get_const_tensor(node.inputs[1])
    high = node.inputs[2] if len(node.inputs) > 2 else None
    at_zero = low is not None and low.size == 1 and float(low.numpy().reshape(())) == 0.0
    return at_zero and (high is None or g.is_constant(high))

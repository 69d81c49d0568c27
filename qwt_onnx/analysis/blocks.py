"""Block discovery: residual and transformer blocks of any exported graph.

The rule, framework-agnostic:

1. The *data path* is every value that depends on the values of the primary
   input (the graph input that feeds the most weighted ops). Outputs of
   Shape/Size, and whatever only they and constants compute, are not on it;
   nor are values computed from side inputs alone (attention masks, position
   ids), which blocks receive as extra inputs.
2. The *boundaries* are the data values that every path from the primary
   input to the outputs must cross: the dominators of the outputs.
3. Consecutive boundaries delimit *segments*. A segment with more than one
   node is a fork-join, i.e. a residual connection (or a squeeze-excitation
   gate); one that also holds a weighted op (Conv/MatMul/Gemm with a constant
   weight) is a *residual block*.
4. A residual block absorbs the parameter-free segments right after it while
   they keep its output shape (the Relu after a ResNet add, the LayerNorm of a
   post-LN transformer).
5. The single-node segments left between residual blocks form *chains* (a
   stem, the downsampling blocks of a MobileNet, a whole PP-LCNet). A chain is
   cut into *chain blocks*, each ending with a dense weighted op (a Conv with
   one group, a MatMul or Gemm) and the parameter-free ops up to the next
   weighted op: one depthwise-separable unit, one conv with its activation.
   Layout ops between two weighted ops open the block of the second; an If,
   Loop or Scan node ends one and belongs to none. A
   Transpose at either end of a chain block (the one from NHWC that Keras and
   TensorFlow exports start with, the one back before a Flatten), a global pool
   at its end, and the layout ops at its ends that keep its input and output at
   different ranks (a Flatten before dense layers) are left outside it: they
   carry the block's correction along, and the branch maps the layout its
   weighted ops read and write, at a size it can map. A chain
   block whose input and output still differ in rank (a patch embedding, a
   classifier head) is left out: no linear branch maps one onto the other.
6. With ``granularity="layer"``, runs of token blocks (not convolutions) that
   repeat with a period of 2 to 4 (attention, MLP, attention, MLP, ...) are
   grouped, one block per transformer layer. Convolutional blocks stay single.
7. With ``units``, a block whose output no linear branch can map from its input (of another
   rank: a detector's multi-scale neck flattened into its head; or grown by
   upsampling: a segmentation head) is cut into its *weighted units* instead:
   each weighted op with the elementwise ops after it that read nothing else
   (its activation), whose input dominates its output by construction. The
   units of one span need not follow each other: the capture carries every
   compensated unit output that a later unit's input is computed from.
8. Past the last boundary, where the outputs part ways (a detector's output per scale, a
   state output beside a prediction), each output's own dominators delimit segments as in
   rule 3, and each path from where paths part to its output (or to where it parts again) is
   cut into blocks by rules 3-6: a head per scale. A segment holds only the nodes its end is
   computed from: a value on one path may also feed another (a coarse map upsampled into the
   neck of a finer scale). The nodes on no single path, the joins between paths (a
   multi-scale neck), get no block; with ``units``, their weighted units.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence

import onnx_ir as ir

from qwt_onnx.errors import InputError
from qwt_onnx.graph import query as g
from qwt_onnx.options import Granularity

RESHAPING_OPS = {
    "Slice", "Gather", "GatherElements", "GatherND", "Reshape", "Transpose", "Concat", "Split", "Squeeze",
    "Unsqueeze", "Flatten", "Pad", "Resize", "Upsample", "Expand", "Tile", "DepthToSpace", "SpaceToDepth",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
}
# Ops that only move elements: a correction added before them is carried through unchanged.
LAYOUT_OPS = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool"}
RANK_OPS = {"Squeeze", "Unsqueeze", "Flatten"}  # layout ops that add or remove axes
MAX_PERIOD = 4
UPSAMPLING_OPS = {"Resize", "Upsample", "ConvTranspose", "DepthToSpace"}


@dataclasses.dataclass(frozen=True)
class Block:
    """A span of the data path from boundary ``input`` to boundary ``output``."""

    name: str
    input: str
    output: str
    channels_first: bool  # its weighted ops are convolutions: features on axis 1
    divisible: bool = False  # no linear branch maps it, and rule 7 would cut it into weighted units
    # one weighted op, compensated where it computes its output: before the quantizer that may follow
    layer: bool = False


@dataclasses.dataclass(frozen=True)
class _Segment:
    start: ir.Value
    end: ir.Value
    nodes: tuple[ir.Node, ...]

    @property
    def weighted(self) -> list[ir.Node]:
        return [n for n in self.nodes if g.is_weighted(n)]


@dataclasses.dataclass
class DataPath:
    """The data path of a graph and its boundaries (dominators of the outputs)."""

    graph: ir.Graph
    primary_input: ir.Value
    values: set[ir.Value]
    boundaries: list[ir.Value]
    idom: dict[ir.Value, ir.Value | None]
    outputs: list[ir.Value]  # the data outputs that some weighted op computes

    @classmethod
    def analyze(cls, graph: ir.Graph, primary_input: ir.Value | None = None) -> DataPath:
        primary = primary_input or choose_primary_input(graph)
        values = _data_values(graph, primary)
        idom, depth = _dominators(graph, primary, values)
        outputs = _computed_outputs(graph, primary, values)
        if not outputs:
            raise InputError(
                f"no graph output depends on the values of input {primary.name!r}; "
                "check that the model computes its outputs from its inputs"
            )
        dominator = _lca_all(outputs, idom, depth)
        chain = []
        while dominator is not None:
            chain.append(dominator)
            dominator = idom[dominator]
        return cls(graph, primary, values, chain[::-1], idom, outputs)

    def segments(self, members: dict[ir.Value, list[ir.Node]] | None = None) -> list[_Segment]:
        """The data nodes between consecutive boundaries, in graph order."""
        members = members or self._members(set(self.boundaries))
        return [_Segment(a, b, tuple(members[a])) for a, b in zip(self.boundaries[:-1], self.boundaries[1:])]

    def runs(self) -> tuple[list[list[_Segment]], list[ir.Node]]:
        """The runs of segments to cut into blocks: :meth:`segments`, then past the last
        boundary, where the outputs part ways (rule 8), the segments between consecutive
        dominators of some outputs, a run from where paths part to the next parting or an
        output; and the nodes on none of them (the joins between paths: a detector's neck), in
        graph order."""
        last = self.boundaries[-1]
        children: dict[ir.Value, list[ir.Value]] = collections.defaultdict(list)
        for output in self.outputs:
            value = output
            while value is not last:
                parent = self.idom[value]
                if value in children[parent]:
                    break  # its dominators from here on are in already
                children[parent].append(value)
                value = parent
        past_last = {last, *(c for cs in children.values() for c in cs)}  # the dominators of some outputs
        # past_last lies past every boundary: it takes no node from between two of them
        members = self._members({*self.boundaries, *past_last})
        runs = [self.segments(members)]
        stack: list[tuple[ir.Value, list[_Segment]]] = [(last, [])]
        while stack:
            value, run = stack.pop()
            while len(children[value]) == 1:
                run.append(self._segment(value, children[value][0], members))
                value = children[value][0]
            runs += [run] if run else []
            stack += self._openings(value, children[value], members)  # where paths part, each starts a run
        on_runs = {n for run in runs[1:] for s in run for n in s.nodes}
        joins = {n for value in past_last for n in members[value]} - on_runs
        return runs, [n for n in self.graph if n in joins]

    def _openings(self, parting: ir.Value, paths: list[ir.Value], members) -> list[tuple[ir.Value, list[_Segment]]]:
        """Each path from ``parting`` with the segment that leads to its first value, where that
        reads ``parting`` alone and shares no node with another path (a head's first conv);
        else without it: those nodes join paths."""
        segments = [self._segment(parting, first, members) for first in paths]
        shared = collections.Counter(n for s in segments for n in s.nodes)

        def own(segment: _Segment) -> bool:
            inside = set(segment.nodes)
            reads = [v for n in segment.nodes for v in g.reads(n) if v in self.values]
            return all(shared[n] == 1 for n in inside) and all(v is parting or v.producer() in inside for v in reads)

        return [(first, [s] if own(s) else []) for first, s in zip(paths, segments)]

    def _segment(self, start: ir.Value, end: ir.Value, members: dict[ir.Value, list[ir.Node]]) -> _Segment:
        """The nodes dominated by ``start`` (and by no nearer boundary) that ``end`` is computed
        from: past the last boundary ``start`` may also lead to paths that ``end`` is not on."""
        region, kept, stack = set(members[start]), set(), [end.producer()]
        while stack:
            node = stack.pop()
            if node in region and node not in kept:
                kept.add(node)
                stack += [v.producer() for v in g.reads(node) if v in self.values]
        return _Segment(start, end, tuple(n for n in members[start] if n in kept))

    def _members(self, boundaries: set[ir.Value]) -> dict[ir.Value, list[ir.Node]]:
        """The data nodes from which an output can be reached, by the nearest of ``boundaries``
        that dominates them, in graph order."""
        reaching = _reaching_outputs(self.graph, self.values)
        members: dict[ir.Value, list[ir.Node]] = collections.defaultdict(list)
        nearest: dict[ir.Value, ir.Value] = {}
        for node in self.graph:
            outputs = [v for v in node.outputs if v in self.values]
            if not outputs or node not in reaching:
                continue
            members[self._enclosing_boundary(self.idom[outputs[0]], boundaries, nearest)].append(node)
        return members

    def _enclosing_boundary(self, value: ir.Value, boundaries: set[ir.Value], nearest: dict) -> ir.Value:
        path = []
        while value not in boundaries and value not in nearest:
            path.append(value)
            value = self.idom[value]
        found = value if value in boundaries else nearest[value]
        for v in path:
            nearest[v] = found
        return found


def choose_primary_input(graph: ir.Graph) -> ir.Value:
    """The graph input that the most weighted ops depend on (the first on ties)."""
    if not graph.inputs:
        raise InputError("the model has no inputs; export it with its inputs as graph inputs")
    initializers = set(graph.initializers.values())
    candidates = [v for v in graph.inputs if v not in initializers] or list(graph.inputs)

    def weighted_reach(value: ir.Value) -> int:
        return sum(1 for n in g.downstream_nodes([value]) if g.is_weighted(n))

    return max(candidates, key=weighted_reach)


def find_blocks(model: ir.Model, granularity: Granularity = Granularity.LAYER, units: bool = False) -> list[Block]:
    """The blocks of ``model`` by the rules in this module's docstring (rule 7 only with ``units``)."""
    path = DataPath.analyze(model.graph)
    runs, joins = path.runs()
    spans = []
    for run in runs:
        run_spans = _residual_and_chain_blocks(run)
        spans += _group_token_runs(run_spans) if granularity == Granularity.LAYER else run_spans
    found = []
    for segments in spans:
        pieces = _weighted_units([n for s in segments for n in s.nodes]) if _unmappable(segments) else []
        found += pieces if units and pieces else [_make_block(segments, divisible=bool(pieces))]
    found += _weighted_units(joins) if units else []
    position = {v.name: i for i, node in enumerate(model.graph) for v in node.outputs}
    return _named_apart(sorted(found, key=lambda b: position.get(b.output, -1)))


def weighted_layers(model: ir.Model) -> list[Block]:
    """Every weighted op of ``model`` (a Conv, Gemm or MatMul with a constant weight), in graph
    order, as a block of its own from its data input to its output: where QwT-v2 compensates a
    quantized model, layer by layer."""
    layers = [
        Block(node.name or node.outputs[0].name, node.inputs[0].name, _layer_output(node).name,
              node.op_type == "Conv", layer=True)
        for node in model.graph if g.is_weighted(node)
    ]
    return _named_apart(layers)


def _layer_output(node: ir.Node) -> ir.Value:
    """A weighted op's output; a MatMul's, its bias Add's where only that reads it: the layer as
    a Linear computes it, its bias being where a fold's shift goes."""
    reader = g.only_reader(node.outputs[0])
    if node.op_type == "MatMul" and reader is not None and reader.op_type == "Add" and g.is_default_domain(reader) \
            and any(g.is_constant(v) for v in reader.inputs):
        return reader.outputs[0]
    return node.outputs[0]


def _named_apart(blocks: list[Block]) -> list[Block]:
    """``blocks``, those whose module path others share too (a TensorFlow export's every node in
    ``model_1/model``) named by their output instead: of a TFLite conversion's fused names
    (``.../p_re_lu_3/add;.../p_re_lu_3/Relu;...``), the first."""
    counts = collections.Counter(b.name for b in blocks)
    return [dataclasses.replace(b, name=b.output.split(";")[0]) if counts[b.name] > 1 else b for b in blocks]


def blocks_from_boundaries(model: ir.Model, spec: Sequence[str]) -> list[Block]:
    """Blocks named by the user: ``["a:b", "c:d"]`` pairs or a chain ``["t1", "t2", "t3"]``."""
    path = DataPath.analyze(model.graph)
    by_name = g.values_by_name(model.graph)
    position = {v: i for i, v in enumerate(path.boundaries)}
    if all(":" in item for item in spec):
        pairs = [tuple(item.split(":", 1)) for item in spec]
    elif any(":" in item for item in spec):
        raise InputError("--blocks mixes 'input:output' pairs and plain names; use one form")
    else:
        if len(spec) < 2:
            raise InputError("--blocks needs at least two boundary tensors (or 'input:output' pairs)")
        pairs = list(zip(spec[:-1], spec[1:]))
    segments = {(s.start, s.end): s for s in path.segments()}
    blocks = []
    for start_name, end_name in pairs:
        start, end = (_boundary(name, by_name, position) for name in (start_name, end_name))
        if position[start] >= position[end]:
            raise InputError(f"--blocks: {start_name!r} must come before {end_name!r} on the data path")
        chain = path.boundaries[position[start] : position[end] + 1]
        blocks.append(_make_block([segments[(a, b)] for a, b in zip(chain[:-1], chain[1:])]))
    return blocks


def _boundary(name: str, by_name: dict[str, ir.Value], position: dict[ir.Value, int]) -> ir.Value:
    value = by_name.get(name)
    if value is None:
        raise InputError(f"--blocks names tensor {name!r}, which is not in the model; use tensor names from the model")
    if value not in position:
        raise InputError(
            f"--blocks names tensor {name!r}, which is not a block boundary (some path from the input bypasses it); "
            "name tensors that every path crosses, such as the outputs of residual adds"
        )
    return value


def _computed_outputs(graph: ir.Graph, primary: ir.Value, data: set[ir.Value]) -> list[ir.Value]:
    """The data outputs that some weighted op computes: token ids or masks passed through have no say."""
    weighted = [n for n in g.downstream_nodes([primary]) if g.is_weighted(n)]
    if not weighted:
        return [v for v in graph.outputs if v in data]
    nodes = g.downstream_nodes([v for n in weighted for v in n.outputs]) | set(weighted)
    computed = {v for n in nodes for v in n.outputs}
    return [v for v in graph.outputs if v in data and v in computed]


def _data_values(graph: ir.Graph, primary: ir.Value) -> set[ir.Value]:
    data = {primary}
    for node in graph:
        if node.op_type in g.SHAPE_OPS and g.is_default_domain(node):
            continue
        if any(v in data for v in g.reads(node)):
            data.update(node.outputs)
    return data


def _dominators(graph: ir.Graph, source: ir.Value, data: set[ir.Value]):
    """Immediate dominators on the value DAG, one sweep in topological order."""
    idom: dict[ir.Value, ir.Value | None] = {source: None}
    depth = {source: 0}
    for node in graph:
        preds = [v for v in g.reads(node) if v in idom]
        if not preds or (node.op_type in g.SHAPE_OPS and g.is_default_domain(node)):
            continue
        dominator = _lca_all(preds, idom, depth)
        for out in node.outputs:
            if out in data:
                idom[out], depth[out] = dominator, depth[dominator] + 1
    return idom, depth


def _lca_all(values: Sequence[ir.Value], idom: dict, depth: dict) -> ir.Value:
    result = values[0]
    for value in values[1:]:
        a, b = result, value
        while a is not b:
            if depth[a] >= depth[b]:
                a = idom[a]
            else:
                b = idom[b]
        result = a
    return result


def _reaching_outputs(graph: ir.Graph, data: set[ir.Value]) -> set[ir.Node]:
    """Data nodes from which some graph output can be reached."""
    reaching: set[ir.Node] = set()
    live = {v for v in graph.outputs if v in data}
    for node in reversed(list(graph)):
        if any(v in live for v in node.outputs):
            reaching.add(node)
            live.update(v for v in g.reads(node) if v in data)
    return reaching


def _residual_and_chain_blocks(segments: list[_Segment]) -> list[list[_Segment]]:
    blocks: list[list[_Segment]] = []
    chain: list[_Segment] = []
    for segment in segments:
        if len(segment.nodes) > 1 and segment.weighted:
            blocks += _chain_blocks(chain)
            chain = []
            blocks.append([segment])
        elif not chain and blocks and blocks[-1][-1].end is segment.start and _keeps_shape(blocks[-1][-1], segment):
            blocks[-1].append(segment)
        else:
            chain.append(segment)
    return blocks + _chain_blocks(chain)


def _chain_blocks(chain: list[_Segment]) -> list[list[_Segment]]:
    """Cut a chain after each dense weighted op and the parameter-free ops that follow it, less
    the layout ops right before the next weighted op, which open its piece."""
    pieces: list[list[_Segment]] = []
    current: list[_Segment] = []
    closed = False
    for segment in chain:
        if any(g.subgraphs(n) for n in segment.nodes):  # control flow ends a block: its ops stay float, outside any
            pieces.append(current)
            current, closed = [], False
            continue
        if closed and segment.weighted:
            opening = len(current)
            while _only(LAYOUT_OPS, current[opening - 1]):
                opening -= 1
            pieces.append(current[:opening])
            current, closed = current[opening:], False
        current.append(segment)
        closed = closed or any(_is_dense(n) for n in segment.weighted)
    pieces.append(current)
    pieces = [_trimmed(p) for p in pieces if any(s.weighted for s in p)]
    return [p for p in pieces if _same_rank(p[0].start, p[-1].end)]


def _trimmed(piece: list[_Segment]) -> list[_Segment]:
    """``piece`` without a Transpose at either end or a global pool at its end, and without the
    layout ops at its ends that keep its input and output at different ranks (a Flatten before
    dense layers; tf2onnx's reshapes around each MatMul keep the rank, and stay)."""
    first, last = 0, len(piece) - 1
    while True:  # a weighted segment stops both ends
        ranks_differ = not _same_rank(piece[first].start, piece[last].end)
        if _only({"Transpose"}, piece[first]) or _changes_rank(piece[first], ranks_differ):
            first += 1
        elif _only({"Transpose"} | GLOBAL_POOLS, piece[last]) or _changes_rank(piece[last], ranks_differ):
            last -= 1
        else:
            return piece[first : last + 1]


def _changes_rank(segment: _Segment, ranks_differ: bool) -> bool:
    """Whether ``segment``, at an end of a piece whose ends have ``ranks_differ``, moves elements
    only and is where the rank changes: so when its ops are layout ops, or, where a shape at
    either end is unknown (the output of an If), when they add or remove axes."""
    unknown = segment.start.shape is None or segment.end.shape is None
    return _only(LAYOUT_OPS, segment) and (ranks_differ or (unknown and _only(RANK_OPS, segment)))


def _only(ops: set[str], segment: _Segment) -> bool:
    return all(n.op_type in ops and g.is_default_domain(n) for n in segment.nodes)


def _is_dense(node: ir.Node) -> bool:
    return node.op_type != "Conv" or node.attributes.get_int("group", 1) == 1


def _same_rank(a: ir.Value, b: ir.Value) -> bool:
    return a.shape is None or b.shape is None or len(a.shape) == len(b.shape)


def _keeps_shape(previous: _Segment, segment: _Segment) -> bool:
    """Whether a parameter-free segment ends with the shape it starts from.

    Static dims must be equal. Exporters name the same dynamic dim apart after
    some ops (LayerNormalization), so differently named dynamic dims count as
    equal unless the segment holds an op that can change them (Slice, Reshape, ...).
    """
    if segment.weighted or not segment.nodes:
        return False
    a, b = previous.end.shape, segment.end.shape
    if a is None or b is None or len(a) != len(b):
        return False
    reshapes = any(n.op_type in RESHAPING_OPS for n in segment.nodes)
    for x, y in zip(a, b):
        if isinstance(x, int) or isinstance(y, int) or reshapes:
            if x != y:
                return False
    return True


def _signature(segments: list[_Segment]) -> tuple:
    ops = collections.Counter(
        n.op_type for s in segments for n in s.nodes if g.is_weighted(n) or n.op_type == "Softmax"
    )
    return tuple(sorted(ops.items()))


def _group_token_runs(blocks: list[list[_Segment]]) -> list[list[_Segment]]:
    """:func:`_group_repeating` on each run of consecutive token blocks; convolutional blocks stay single."""
    grouped: list[list[_Segment]] = []
    run: list[list[_Segment]] = []
    for block in blocks:
        if _convolutional(block):
            grouped += _group_repeating(run) + [block]
            run = []
        else:
            run.append(block)
    return grouped + _group_repeating(run)


def _convolutional(segments: list[_Segment]) -> bool:
    weighted = [n for s in segments for n in s.weighted]
    return bool(weighted) and all(n.op_type == "Conv" for n in weighted)


def _channels_last(first: ir.Node, start: ir.Value) -> bool:
    """Whether the input ``start`` of a convolutional block whose first weighted op is ``first``
    holds its channels last (NHWC, as TensorFlow exports do).

    Its branch is then a MatMul over the last axis, a 1×1 convolution in NHWC.
    """
    shape, weight = start.shape, first.inputs[1].const_value
    if shape is None or weight is None or len(shape) < 3:
        return False
    channels = weight.shape[1] * first.attributes.get_int("group", 1)
    return shape[1] != channels and shape[-1] == channels


def _group_repeating(blocks: list[list[_Segment]]) -> list[list[_Segment]]:
    """Group runs that repeat with the smallest period p in 2..4 (transformer layers)."""
    signatures = [_signature(b) for b in blocks]
    n = len(blocks)
    for period in range(1, MAX_PERIOD + 1):
        if n < 2 * period:
            break
        matches = sum(signatures[i] == signatures[i + period] for i in range(n - period))
        if matches < 0.75 * (n - period):
            continue
        if period == 1:
            return blocks
        return _chunk(blocks, signatures, period)
    return blocks


def _chunk(blocks, signatures, period):
    def chunks(offset):
        return [list(range(i, min(i + period, len(blocks)))) for i in range(offset, len(blocks), period)]

    def contiguous(idx):
        return all(blocks[a][-1].end is blocks[b][0].start for a, b in zip(idx[:-1], idx[1:]))

    def score(offset):
        keys = [tuple(signatures[i] for i in c) for c in chunks(offset) if len(c) == period and contiguous(c)]
        return max(collections.Counter(keys).values(), default=0), keys

    offset = max(range(period), key=lambda o: (score(o)[0], -o))
    counts = collections.Counter(score(offset)[1])
    common = counts.most_common(1)[0][0] if counts else None
    grouped = [blocks[i] for i in range(offset)]
    for c in chunks(offset):
        key = tuple(signatures[i] for i in c)
        if len(c) == period and contiguous(c) and key == common:
            grouped.append([s for i in c for s in blocks[i]])
        else:
            grouped.extend(blocks[i] for i in c)
    return grouped


def _unmappable(segments: list[_Segment]) -> bool:
    """Whether the span's output has another rank than its input, or other spatial sizes after an upsampling op."""
    a, b = segments[0].start.shape, segments[-1].end.shape
    if a is None or b is None:
        return False
    if len(a) != len(b):
        return True
    grows = any(n.op_type in UPSAMPLING_OPS for s in segments for n in s.nodes)
    return grows and list(a)[2:] != list(b)[2:]


def _weighted_units(nodes: list[ir.Node]) -> list[Block]:
    """Rule 7: a block per weighted op of ``nodes``, with its activation, in graph order."""
    units, within = [], set(nodes)
    for node in (n for n in nodes if g.is_weighted(n)):
        x, y = node.inputs[0], _activation_end(node, within)
        if _same_rank(x, y):
            units.append(Block(node.name or y.name, x.name, y.name, node.op_type == "Conv" and not _channels_last(node, x)))
    return units


def _activation_end(node: ir.Node, within: set[ir.Node]) -> ir.Value:
    """The output of the elementwise ops of ``within`` after ``node`` that read only its output,
    each other and constants, where that is the one of their values read elsewhere; else
    ``node``'s own output."""
    start = node.outputs[0]
    values, absorbed = {start}, set()
    changed = True
    while changed:
        changed = False
        for value in list(values):
            for reader in value.consumers():
                elementwise = reader.op_type in g.ELEMENTWISE_OPS and g.is_default_domain(reader)
                if reader in absorbed or reader not in within or not elementwise:
                    continue
                if all(v is None or v in values or g.is_constant(v) for v in reader.inputs):
                    absorbed.add(reader)
                    values.update(reader.outputs)
                    changed = True
    read_elsewhere = [v for v in values if v.is_graph_output() or any(c not in absorbed for c in v.consumers())]
    return read_elsewhere[0] if len(read_elsewhere) == 1 else start


def _make_block(segments: list[_Segment], divisible: bool = False) -> Block:
    scoped = [n.name or "" for s in segments if s.weighted for n in s.nodes]
    first_weighted = next((n for s in segments for n in s.weighted), None)
    return Block(
        name=_common_scope(scoped) or segments[-1].end.name,
        input=segments[0].start.name,
        output=segments[-1].end.name,
        channels_first=_convolutional(segments) and not _channels_last(first_weighted, segments[0].start),
        divisible=divisible,
    )


def _common_scope(names: list[str]) -> str:
    """The module path the nodes share (``/encoder/layer.3``), or "" for flat names. Of a TFLite
    conversion's fused names (``.../re_lu_30/Relu6;.../conv2d_30/Conv2D``) the first is the op's."""
    prefix = os.path.commonprefix([name.split(";")[0] for name in names])
    return prefix[: prefix.rfind("/")] if "/" in prefix else ""

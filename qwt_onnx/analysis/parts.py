"""The parts a Concat assembles an output from: a detector's boxes beside its scores.

One output tensor often holds quantities of different scales: YOLO-style heads
concatenate box coordinates in pixels (or log sizes), an objectness and class
scores in 0..1 along one axis. Its pooled SQNR is then the largest part's, and
a quantizer can wreck the small one (the objectness a detector thresholds)
unseen. The graph says where the parts are: an output that is, through
shape-only ops, a Concat of tensors made by different ops (a Conv's box
regression, a Sigmoid's scores) is scored part by part, each input of that
Concat one part. A Concat of like tensors (a head's levels, one per scale) is
not split; where each of its inputs is split the same way, the output is split
that way (a YOLOX head: per level a Concat of box Conv, objectness and class
Sigmoids, the levels concatenated).

Part labels are ``NAME[:, START:STOP]`` as ``--outputs`` takes them
(:func:`qwt_onnx.numerics.metrics.part_of`).
"""

from __future__ import annotations

import math

import onnx_ir as ir

from qwt_onnx.graph import prepare
from qwt_onnx.graph import query as g

# Cast too: a half-precision model's outputs are cast back from the float32 they are computed in (passes.upcast)
SHAPE_ONLY = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast"})

Split = tuple[int, tuple[tuple[int, int], ...]]  # an axis, and the [start, stop) of each part along it


def output_parts(graph: ir.Graph) -> tuple[str, ...]:
    """Labels of every float graph output, an output that a Concat assembles from different
    parts as one label per part; () where no output has parts (every output scored whole)."""
    labels, split_any = [], False
    for value in graph.outputs:
        if value.dtype is None or not value.dtype.is_floating_point():
            continue
        split = split_of(value)
        if split is not None and not _holds(value, split):  # a declared shape the parts contradict: trust neither
            split = None
        if split is None:
            labels.append(value.name)
            continue
        axis, bounds = split
        split_any = True
        labels += [_label(value.name, axis, start, stop) for start, stop in bounds]
    return tuple(labels) if split_any else ()


def labels_computed_from(graph: ir.Graph, values: list[ir.Value]) -> list[str]:
    """The float outputs computed from any of ``values``, and of an output with parts (as
    :func:`output_parts` labels them) the parts: those of its parts computed from them."""
    downstream = g.downstream_nodes(values)

    def reached(value: ir.Value) -> bool:
        return value in values or value.producer() in downstream

    labels = []
    for output in graph.outputs:
        if output.dtype is None or not output.dtype.is_floating_point() or not reached(output):
            continue
        split = split_of(output)
        if split is None:
            labels.append(output.name)
            continue
        axis, bounds = split
        labels += [_label(output.name, axis, start, stop)
                   for (start, stop), made_of in zip(bounds, _part_sources(output)) if any(reached(v) for v in made_of)]
    return labels


def _label(name: str, axis: int, start: int, stop: int) -> str:
    return f"{name}[{', '.join([':'] * axis + [f'{start}:{stop}'])}]"


def _part_sources(value: ir.Value) -> list[list[ir.Value]]:
    """Per part of ``value`` (which :func:`split_of` splits), the tensors it is made of: a Concat's
    input, or that input of each of several Concats split alike (a head's levels)."""
    node = value.producer()
    if node.op_type in SHAPE_ONLY:
        return _part_sources(node.inputs[0])
    if len({_maker(x) for x in node.inputs}) > 1:
        return [[x] for x in node.inputs]
    inner = [_part_sources(x) for x in node.inputs]
    return [[v for parts in inner for v in parts[k]] for k in range(len(inner[0]))]


def split_of(value: ir.Value) -> Split | None:
    """How ``value`` divides into parts along one axis (not the samples' axis 0), or None."""
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Concat":
        split = _concat_split(node)
    elif node.op_type in SHAPE_ONLY and node.inputs and node.inputs[0] is not None:
        inner = split_of(node.inputs[0])
        axis = None if inner is None else _mapped_axis(node, inner[0])
        split = None if axis is None else (axis, inner[1])
    else:
        split = None
    return split if split is not None and split[0] > 0 else None


def _holds(value: ir.Value, split: Split) -> bool:
    """Whether ``value``'s shape, where known, has the parts' length along their axis."""
    axis, bounds = split
    if value.shape is None or axis >= len(value.shape):
        return value.shape is None
    size = value.shape[axis]
    return not isinstance(size, int) or size == bounds[-1][1]


def _concat_split(node: ir.Node) -> Split | None:
    rank = _rank(node.outputs[0]) or _rank(node.inputs[0])
    if rank is None:
        return None
    axis = node.attributes["axis"].as_int() % rank
    if len({_maker(x) for x in node.inputs}) > 1:
        sizes = [_static(x, axis) for x in node.inputs]
        if any(size is None for size in sizes):
            return None
        stops = [sum(sizes[: k + 1]) for k in range(len(sizes))]
        return axis, tuple(zip([0, *stops[:-1]], stops))
    inner = [split_of(x) for x in node.inputs]
    if inner[0] is not None and inner[0][0] != axis and all(split == inner[0] for split in inner):
        return inner[0]
    return None


def _maker(value: ir.Value) -> str | None:
    """The op that made ``value``, looking through shape-only ops."""
    node = value.producer()
    while node is not None and node.op_type in SHAPE_ONLY and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    return None if node is None else node.op_type


def _mapped_axis(node: ir.Node, axis: int) -> int | None:
    """Where ``axis`` of a shape-only op's input lies in its output: the same sizes before it
    and the axis whole (not merged with another), else None."""
    if node.op_type in ("Identity", "Cast"):
        return axis
    if node.op_type == "Transpose":
        perm = node.attributes.get("perm")
        return None if perm is None else list(perm.as_ints()).index(axis)
    if node.inputs[0].shape is None or node.outputs[0].shape is None:
        return None
    before, after = prepare.dims(node.inputs[0]), prepare.dims(node.outputs[0])
    for candidate, size in enumerate(after):
        if size is not None and size == before[axis] and _same_product(after[:candidate], before[:axis]):
            return candidate
    return None


def _same_product(a: list[int | str | None], b: list[int | str | None]) -> bool:
    """Whether two runs of dims hold as many elements: equal static products and the same named dims."""
    if None in a or None in b:
        return False
    return (math.prod(d for d in a if isinstance(d, int)) == math.prod(d for d in b if isinstance(d, int))
            and sorted(d for d in a if isinstance(d, str)) == sorted(d for d in b if isinstance(d, str)))


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _static(value: ir.Value, axis: int) -> int | None:
    dims = prepare.dims(value)
    size = dims[axis] if axis < len(dims) else None
    return size if isinstance(size, int) else None

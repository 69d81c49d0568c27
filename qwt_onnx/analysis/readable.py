"""The values of a tensor that its readers can tell apart: an interval outside which every
reader computes what it computes at the interval's ends (graph analysis; plain data out).

A quantizer whose range reaches beyond that interval spends its levels on differences that no
reader sees. The convolution output a hard-swish reads, ``x · clip(x + 3, 0, 6) / 6`` however
an exporter writes it (a HardSwish op, ``x · HardSigmoid(x)``, Add-Clip-Mul-Div), is 0 for
every ``x ≤ -3``: its quantizer may clamp there, and the levels it spent on ``[-60, -3]`` go to
the values that matter. The same holds for a Relu, a Clip or a HardSigmoid that is not absorbed
into the quantizer (:mod:`qwt_onnx.analysis.placement` absorbs a Relu or a Clip from 0 that is
a tensor's only reader), and through an affine step (``x + c``, ``x · k``) to any of them.

A Sigmoid or a Tanh saturates only softly: past ``|x| = ln(2^(b+1) - 3)`` (6.2 at 8 bits) a
Sigmoid is within half a level of a ``b``-bit quantizer of its output range of 0 or 1, a Tanh
past half that of ±1, a difference that its output, quantized as the model's activations are,
could not hold. A detector's objectness logits reach -40 where nothing is found; the levels
spent there go to the scores near a detection. Not where a reader of its output within a few
ops magnifies values near the limits (a Log, a reciprocal): there they matter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import onnx_ir as ir

from qwt_onnx.graph import query as g
from qwt_onnx.numerics.ranges import UNBOUNDED

Interval = tuple[float, float]
_DEPTH = 8  # affine steps followed at most (a hard-swish needs two); ops searched past a soft saturation
# Ops that magnify an error near a Sigmoid's or Tanh's limits (or in a divisor, any input but the first)
_MAGNIFYING = frozenset({"Log", "Reciprocal", "Pow", "Sqrt", "Div", "Softplus", "Atanh", "Acosh"})


def readable_interval(readers: Iterable[tuple[ir.Node, int]], bits: int = 8) -> Interval:
    """The hull of the intervals on which each ``(node, input index)`` reader's outputs depend
    on that input: :data:`UNBOUNDED` unless every reader saturates; ``bits``: of the model's
    activations, the precision a soft saturation is judged at."""
    return _hull(_reader_interval(node, index, _DEPTH, bits) for node, index in readers)


def _hull(intervals: Iterable[Interval]) -> Interval:
    low, high = math.inf, -math.inf
    for lo, hi in intervals:
        low, high = min(low, lo), max(high, hi)
        if (low, high) == UNBOUNDED:
            break
    return UNBOUNDED if low > high else (low, high)  # no readers: nothing known


def _value_interval(value: ir.Value, depth: int, bits: int) -> Interval:
    if depth <= 0 or value.is_graph_output():
        return UNBOUNDED
    return readable_interval_at(value, depth, bits)


def readable_interval_at(value: ir.Value, depth: int = _DEPTH, bits: int = 8) -> Interval:
    """:func:`readable_interval` of all of ``value``'s readers."""
    return _hull(_reader_interval(node, index, depth, bits) for node, index in value.uses())


def soft_limit(bits: int) -> float:
    """The ``L`` past which a Sigmoid is within half a level of a ``bits``-bit quantizer of [0, 1]
    of its limit: ``σ(-L) = 1 / (2 (2^bits - 1))``."""
    return math.log(2.0 ** (bits + 1) - 3.0)


def _reader_interval(node: ir.Node, index: int, depth: int, bits: int) -> Interval:
    if not g.is_default_domain(node):
        return UNBOUNDED
    op = node.op_type
    if op in ("Sigmoid", "Tanh") and not _magnified(node.outputs[0], _DEPTH):
        limit = soft_limit(bits) / (2.0 if op == "Tanh" else 1.0)  # tanh(x) = 2σ(2x) - 1
        return -limit, limit
    if op == "Relu":
        return 0.0, math.inf
    if op == "HardSwish":
        return -3.0, math.inf
    if op == "HardSigmoid":
        alpha, beta = node.attributes.get_float("alpha", 0.2), node.attributes.get_float("beta", 0.5)
        return (-beta / alpha, (1.0 - beta) / alpha) if alpha > 0 else UNBOUNDED
    if op == "Clip" and index == 0:
        return _clip_bounds(node)
    if op in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2:
        other = g.scalar(node.inputs[1 - index])
        if other is not None:
            return _through_affine(op, index, other, _value_interval(node.outputs[0], depth - 1, bits))
        if op == "Mul":
            threshold = _zero_below(node.inputs[1 - index], node.inputs[index], depth - 1)
            if threshold is not None:  # x · gate(x), the gate 0 below the threshold: a hard-swish
                return threshold, math.inf
    return UNBOUNDED


def _magnified(value: ir.Value, depth: int) -> bool:
    """Whether an op within ``depth`` ops after ``value`` magnifies errors near 0 (a Log, a divisor).
    Searched level by level, each value once: paths that fan out and meet again are not walked twice."""
    frontier, seen = [value], {value}
    for _ in range(depth):
        following = []
        for node, index in (use for v in frontier for use in v.uses()):
            if node.op_type in _MAGNIFYING and (node.op_type != "Div" or index == 1):
                return True
            following += [out for out in node.outputs if out not in seen]
            seen.update(node.outputs)
        frontier = following
    return False


def _through_affine(op: str, index: int, c: float, out: Interval) -> Interval:
    """The ``x`` interval that maps onto ``out`` through ``x + c``, ``x - c``, ``c - x``,
    ``x · c``, ``x / c`` or ``c / x`` (the last: unbounded)."""
    lo, hi = out
    if op == "Add":
        return lo - c, hi - c
    if op == "Sub":
        return (lo + c, hi + c) if index == 0 else (c - hi, c - lo)
    if op == "Mul" or (op == "Div" and index == 0):
        k = c if op == "Mul" else 1.0 / c if c != 0 else 0.0
        if k == 0 or not math.isfinite(k):
            return UNBOUNDED
        ends = sorted((lo / k, hi / k))
        return ends[0], ends[1]
    return UNBOUNDED


def _zero_below(gate: ir.Value, x: ir.Value, depth: int) -> float | None:
    """The ``t`` below which ``gate``, a function of ``x``, is exactly 0 (a Relu, a HardSigmoid,
    a Clip from 0, of ``x`` or ``x ± c``, scaled by a positive constant); None where it is not."""
    node = gate.producer()
    if node is None or depth <= 0 or not g.is_default_domain(node) or not node.inputs:
        return None
    if node.op_type in ("Mul", "Div") and len(node.inputs) == 2:  # clip(x + 3, 0, 6) / 6
        k = g.scalar(node.inputs[1])
        return _zero_below(node.inputs[0], x, depth - 1) if k is not None and k > 0 else None
    if node.op_type == "Relu":
        threshold = 0.0
    elif node.op_type == "Clip" and _clip_bounds(node)[0] == 0.0:
        threshold = 0.0
    elif node.op_type == "HardSigmoid" and node.attributes.get_float("alpha", 0.2) > 0:
        threshold = -node.attributes.get_float("beta", 0.5) / node.attributes.get_float("alpha", 0.2)
    else:
        return None
    source = node.inputs[0]
    if source is x:
        return threshold
    shift = source.producer()
    if shift is None or not g.is_default_domain(shift) or shift.op_type not in ("Add", "Sub") or len(shift.inputs) != 2:
        return None
    if shift.inputs[0] is x or (shift.op_type == "Add" and shift.inputs[1] is x):
        c = g.scalar(shift.inputs[1] if shift.inputs[0] is x else shift.inputs[0])
        if c is not None:
            return threshold - c if shift.op_type == "Add" else threshold + c
    return None


def _clip_bounds(node: ir.Node) -> Interval:
    """A Clip's constant bounds (attributes before opset 11, inputs after); unbounded where computed."""
    if "min" in node.attributes or "max" in node.attributes:
        return node.attributes.get_float("min", -math.inf), node.attributes.get_float("max", math.inf)
    bounds = []
    for position, default in ((1, -math.inf), (2, math.inf)):
        value = node.inputs[position] if len(node.inputs) > position else None
        bound = default if value is None else g.scalar(value)
        if bound is None:
            return UNBOUNDED
        bounds.append(bound)
    return bounds[0], bounds[1]



"""A samples axis for models whose inputs hold one sample each, while they are quantized.

madmom's beat trackers take one whole spectrogram [T, F] and no batch: the calibration set
stacks such inputs on a new axis 0. Every pass and run of qwt_onnx feeds samples in batches on
a samples axis, so the model is given one of size 1 (fed one sample at a time, as a model
exported with a fixed batch of 1 is), and the written model gets its own interface back.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwt_onnx.graph import query as g

PREFIX = "qwt_onnx/one_sample/"  # the nodes and the axes constant these passes add


class AddSamplesAxisPass(ir.passes.InPlacePass):
    """Every fed input of the graph given a leading axis of size 1, squeezed out again before
    the graph reads it. The outputs stay as they are: a run's outputs that have no axis for its
    one sample are given one where they are joined (:func:`qwt_onnx.runtime.move_samples`), and
    a block that ends at an output keeps its shape."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        axes = _axes(graph)
        for value in g.fed_inputs(graph):
            one = ir.node("Squeeze", [value, axes], name=PREFIX + value.name)
            one.outputs[0].name, one.outputs[0].dtype, one.outputs[0].shape = f"{value.name}/one_sample", value.dtype, value.shape
            for node, index in list(value.uses()):
                if node is not one:
                    node.replace_input_with(index, one.outputs[0])
            value.shape = ir.Shape([1, *value.shape]) if value.shape is not None else None
            graph.insert_before(graph[0], one)
        return ir.passes.PassResult(model, True)


class RemoveSamplesAxisPass(ir.passes.InPlacePass):
    """The inputs that :class:`AddSamplesAxisPass` changed given back as they were (``shapes``,
    by name), its Squeezes taken out; where a pass put another reader on such an input, that
    reader reads it given the axis again."""

    def __init__(self, shapes: dict[str, ir.Shape | None]):
        super().__init__()
        self.shapes = shapes

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for value in [v for v in graph.inputs if v.name in self.shapes]:
            readers = list(value.uses())
            others = [(node, index) for node, index in readers if not node.name.startswith(PREFIX)]
            if others:
                one = ir.node("Unsqueeze", [value, _axes(graph)], name=f"{PREFIX}{value.name}/as_fed")
                for node, index in others:
                    node.replace_input_with(index, one.outputs[0])
                graph.insert_before(graph[0], one)
            for node, _ in readers:
                if node.name.startswith(PREFIX) and node.op_type == "Squeeze":
                    ir.convenience.replace_all_uses_with(node.outputs[0], value)
                    graph.remove(node, safe=True)
            value.shape = self.shapes[value.name].copy() if self.shapes[value.name] is not None else None
        axes = graph.initializers.get(f"{PREFIX}axes")
        if axes is not None and not axes.uses():
            graph.initializers.pop(axes.name)
        return ir.passes.PassResult(model, True)


def shapes(model: ir.Model) -> dict[str, ir.Shape | None]:
    """The fed inputs' shapes by name, for :class:`RemoveSamplesAxisPass` to give back."""
    return {v.name: v.shape.copy() if v.shape is not None else None for v in g.fed_inputs(model.graph)}


def _axes(graph: ir.Graph) -> ir.Value:
    name = f"{PREFIX}axes"
    if name in graph.initializers:
        return graph.initializers[name]
    return g.NameScope(graph).initializer(name, np.array([0], dtype=np.int64))

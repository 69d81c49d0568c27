"""Cut a sub-model out of a graph so onnxruntime can run one block on its own."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import onnx
import onnx_ir as ir

from qwt_onnx.errors import InputError
from qwt_onnx.graph import query as g


@dataclasses.dataclass(frozen=True)
class SubModel:
    """A runnable piece of a graph and what must be fed to it."""

    proto: onnx.ModelProto
    inputs: tuple[str, ...]  # the values it was cut at
    graph_inputs: tuple[str, ...]  # inputs of the full model it also reads
    context: tuple[str, ...]  # values computed outside it, from neither of the above
    outputs: tuple[str, ...]


def extract(model: ir.Model, inputs: Sequence[str], outputs: Sequence[str], only_read: bool = False) -> SubModel:
    """The nodes that compute ``outputs`` from ``inputs``.

    Walking back from the outputs, a value is computed inside when its producer
    reads (directly or not) one of ``inputs`` or only constants. Graph inputs it
    reaches are fed as they are; any other value computed outside (for example
    a shape taken before the cut) becomes a *context* input, supplied by
    :func:`context_model`. With ``only_read``, only the ``inputs`` that the walk
    reaches are fed (the first one where it reaches none). Several cuts of one
    model: :class:`Extractor`.
    """
    return Extractor(model)(inputs, outputs, only_read)


class Extractor:
    """Cuts sub-models out of one model, whose graph is analysed once (its values by name, those
    computable from constants alone, its node order): it must not change while this is used. A
    block's capture cuts several sub-models per block, and analysing a YOLOv8n detector's graph
    again for each of its 492 cuts took 5 of the 7 seconds they took."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.values = g.values_by_name(model.graph)
        self._static = g.static_values(model.graph)
        self._order = {node: index for index, node in enumerate(model.graph)}

    def __call__(self, inputs: Sequence[str], outputs: Sequence[str], only_read: bool = False) -> SubModel:
        """The nodes that compute ``outputs`` from ``inputs``: :func:`extract`."""
        model, graph, by_name = self.model, self.model.graph, self.values
        missing = [n for n in (*inputs, *outputs) if n not in by_name]
        if missing:
            raise InputError(f"tensor(s) {', '.join(missing)} are not in the model; check the names")
        cut = {by_name[n] for n in inputs}
        inside = g.downstream_nodes(cut)

        nodes: set[ir.Node] = set()
        initializers: dict[str, ir.Value] = {}
        graph_inputs: list[ir.Value] = []
        context: list[ir.Value] = []
        seen: set[ir.Value] = set()
        reached: set[ir.Value] = set()  # of the cut values
        frontier = [by_name[n] for n in outputs]
        while frontier:
            value = frontier.pop()
            if value in cut:
                reached.add(value)
                continue
            if value in seen:
                continue
            seen.add(value)
            producer = value.producer()
            if value.name in graph.initializers:
                initializers[value.name] = value
            elif value.is_graph_input():
                graph_inputs.append(value)
            elif producer is not None and (producer in inside or value in self._static):
                nodes.add(producer)
                frontier.extend(g.reads(producer))
            else:
                context.append(value)

        if only_read:
            inputs = [n for n in inputs if by_name[n] in reached] or list(inputs[:1])
        feeds = [by_name[n] for n in inputs] + graph_inputs + context
        view = ir.GraphView(
            feeds,
            [by_name[n] for n in outputs],
            nodes=sorted(nodes, key=self._order.__getitem__),
            initializers=list(initializers.values()),
            opset_imports=graph.opset_imports,
            name="qwt_submodel",
        )
        proto = ir.serde.serialize_model(
            ir.Model(view, ir_version=model.ir_version, functions=list(model.functions.values()))
        )
        _drop_io_shapes(proto)
        return SubModel(
            proto,
            tuple(inputs),
            tuple(v.name for v in graph_inputs),
            tuple(v.name for v in context),
            tuple(outputs),
        )


def context_model(model: ir.Model, values: Sequence[str]) -> SubModel:
    """A model computing ``values`` from the full model's inputs."""
    feeds = [v.name for v in g.fed_inputs(model.graph)]
    return extract(model, feeds, values)


def _drop_io_shapes(proto: onnx.ModelProto) -> None:
    # Shapes inferred inside a graph may be fixed where the sub-model is fed other batch sizes.
    # Cleared in the proto: the view shares its values with the full model, whose shapes stay.
    for info in (*proto.graph.input, *proto.graph.output):
        if info.type.HasField("tensor_type"):
            info.type.tensor_type.ClearField("shape")

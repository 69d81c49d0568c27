"""Half- and double-precision models computed in float32, as quantization starts from them."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwt_onnx.graph import query as g

# onnxruntime's QuantizeLinear and integer kernels take float32 (it runs float64 Convs not at all)
OTHER_FLOATS = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
_TYPE_ATTRIBUTES = ("to", "dtype")  # Cast's target; RandomNormal's, EyeLike's, ... output type


class ComputeInFloat32Pass(ir.passes.InPlacePass):
    """Every float16, bfloat16 and float64 weight, constant, Cast target and computed value made
    float32; such graph inputs and outputs keep their type through a Cast beside each, so the
    written model is fed and read as the original was. Ranges, folds and fits are then computed
    on float32 values, and onnxruntime's QDQ fusions, which take float32 scales, apply."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        interface = {value: value.dtype for value in [*graph.inputs, *graph.outputs] if value.dtype in OTHER_FLOATS}
        if not interface and not _other_float_weights(graph):  # a float32 model: a cast to float64 inside it stays
            return ir.passes.PassResult(model, False)
        for each in [graph, *_subgraphs(graph)]:
            for value in _other_float_weights(each):
                value.const_value, value.dtype = _float32(value.const_value), ir.DataType.FLOAT
            computed = [v for node in each for v in node.outputs]
            for value in [*computed, *(each.inputs if each is not graph else ())]:
                if value.dtype in OTHER_FLOATS:
                    value.dtype = ir.DataType.FLOAT
            for node in each:
                _upcast_attributes(node)
        for each in [graph, *_subgraphs(graph)]:
            _drop_float32_casts(each)
        for value, dtype in interface.items():
            if value.producer() is None and value in graph.inputs:
                _cast_input(graph, value)
            elif value.producer() is not None:
                _cast_output(graph, value, dtype)
        return ir.passes.PassResult(model, True)


def _subgraphs(graph: ir.Graph) -> list[ir.Graph]:
    """The If, Loop and Scan bodies in ``graph``, at any depth."""
    return [inner for node in ir.traversal.RecursiveGraphIterator(graph) for inner in g.subgraphs(node)]


def _float32(tensor: ir.TensorProtocol) -> ir.Tensor:
    return ir.tensor(tensor.numpy().astype(np.float32), name=tensor.name)


def _other_float_weights(graph: ir.Graph) -> list[ir.Value]:
    return [v for v in graph.initializers.values() if v.const_value is not None and v.const_value.dtype in OTHER_FLOATS]


def _upcast_attributes(node: ir.Node) -> None:
    for name, attribute in list(node.attributes.items()):
        if name in _TYPE_ATTRIBUTES and attribute.type == ir.AttributeType.INT and ir.DataType(attribute.value) in OTHER_FLOATS:
            node.attributes[name] = ir.AttrInt64(name, ir.DataType.FLOAT)
        elif attribute.type == ir.AttributeType.TENSOR and attribute.value.dtype in OTHER_FLOATS:  # ConstantOfShape's value
            node.attributes[name] = ir.AttrTensor(name, _float32(attribute.value))


def _drop_float32_casts(graph: ir.Graph) -> None:
    """Casts that now cast float32 to float32 (a mixed-precision model's casts to float16 around
    the ops it kept in float32), their readers reading their input."""
    dropped = [node for node in graph if node.op_type == "Cast" and node.attributes.get_int("to") == ir.DataType.FLOAT
               and node.inputs[0].dtype == ir.DataType.FLOAT and not node.outputs[0].is_graph_output()]
    for node in dropped:
        ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
        graph.remove(node, safe=True)


def _cast_input(graph: ir.Graph, value: ir.Value) -> None:
    """The readers of the graph input ``value`` (not float32) read it cast to float32."""
    readers = list(value.uses())
    cast = ir.node("Cast", [value], {"to": ir.DataType.FLOAT}, name=f"{value.name}/to_float32")
    cast.outputs[0].name, cast.outputs[0].dtype, cast.outputs[0].shape = f"{value.name}/float32", ir.DataType.FLOAT, value.shape
    for node, index in readers:
        node.replace_input_with(index, cast.outputs[0])
    graph.insert_before(graph[0], cast)


def _cast_output(graph: ir.Graph, value: ir.Value, dtype: ir.DataType) -> None:
    """The graph output ``value``, computed in float32 now, given back as ``dtype`` under its name."""
    name = value.name
    value.name = f"{name}/float32"
    cast = ir.node("Cast", [value], {"to": dtype}, name=f"{name}/to_{dtype.name.lower()}")
    cast.outputs[0].name, cast.outputs[0].dtype, cast.outputs[0].shape = name, dtype, value.shape
    graph.outputs[graph.outputs.index(value)] = cast.outputs[0]
    graph.append(cast)

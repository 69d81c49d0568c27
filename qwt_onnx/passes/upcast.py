"""Half-precision models computed in float32, as quantization starts from them."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwt_onnx.graph import query as g

HALF = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_TYPE_ATTRIBUTES = ("to", "dtype")  # Cast's target; RandomNormal's, EyeLike's, ... output type


class ComputeInFloat32Pass(ir.passes.InPlacePass):
    """Every float16 and bfloat16 weight, constant, Cast target and computed value made float32;
    half-precision graph inputs and outputs keep their type through a Cast beside each, so the
    written model is fed and read as the original was. Ranges, folds and fits are then computed
    on float32 values, and onnxruntime's QDQ fusions, which take float32 scales, apply."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        interface = {value: value.dtype for value in [*graph.inputs, *graph.outputs] if value.dtype in HALF}
        modified = False
        for each in [graph, *_subgraphs(graph)]:
            modified |= _upcast_weights(each)
            for value in each.inputs if each is not graph else ():
                modified |= _upcast_value(value)
            for node in each:
                modified |= _upcast_attributes(node)
                for value in node.outputs:
                    modified |= _upcast_value(value)
        for each in [graph, *_subgraphs(graph)]:
            modified |= _drop_float32_casts(each)
        for value, dtype in interface.items():
            if value.producer() is None and value in graph.inputs:
                _cast_input(graph, value)
            elif value.producer() is not None:
                _cast_output(graph, value, dtype)
        return ir.passes.PassResult(model, modified or bool(interface))


def _subgraphs(graph: ir.Graph) -> list[ir.Graph]:
    """The If, Loop and Scan bodies in ``graph``, at any depth."""
    return [inner for node in ir.traversal.RecursiveGraphIterator(graph) for inner in g.subgraphs(node)]


def _float32(tensor: ir.TensorProtocol) -> ir.Tensor:
    return ir.tensor(tensor.numpy().astype(np.float32), name=tensor.name)


def _upcast_weights(graph: ir.Graph) -> bool:
    half = [v for v in graph.initializers.values() if v.const_value is not None and v.const_value.dtype in HALF]
    for value in half:
        value.const_value = _float32(value.const_value)
        value.dtype = ir.DataType.FLOAT
    return bool(half)


def _upcast_value(value: ir.Value) -> bool:
    if value.dtype not in HALF:
        return False
    value.dtype = ir.DataType.FLOAT
    return True


def _upcast_attributes(node: ir.Node) -> bool:
    modified = False
    for name, attribute in list(node.attributes.items()):
        if name in _TYPE_ATTRIBUTES and attribute.type == ir.AttributeType.INT and ir.DataType(attribute.value) in HALF:
            node.attributes[name] = ir.AttrInt64(name, ir.DataType.FLOAT)
            modified = True
        elif attribute.type == ir.AttributeType.TENSOR and attribute.value.dtype in HALF:  # ConstantOfShape's value
            node.attributes[name] = ir.AttrTensor(name, _float32(attribute.value))
            modified = True
    return modified


def _drop_float32_casts(graph: ir.Graph) -> bool:
    """Casts that now cast float32 to float32 (a mixed-precision model's casts to float16 around
    the ops it kept in float32), their readers reading their input."""
    dropped = [node for node in graph if node.op_type == "Cast" and node.attributes.get_int("to") == ir.DataType.FLOAT
               and node.inputs[0].dtype == ir.DataType.FLOAT and not node.outputs[0].is_graph_output()]
    for node in dropped:
        ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
        graph.remove(node, safe=True)
    return bool(dropped)


def _cast_input(graph: ir.Graph, value: ir.Value) -> None:
    """The readers of the half-precision graph input ``value`` read it cast to float32."""
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

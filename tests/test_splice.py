"""Splicing a token branch: its bias taken into a constant the block output already adds."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from qwt_onnx.numerics.compensation import Layout
from qwt_onnx.passes import splice
from qwt_onnx.runtime import Runner
from tests.graphs import GraphBuilder

TOKENS, DIM = 5, 8


def _block(ending: str, shared_bias: bool = False) -> onnx.ModelProto:
    """x -> (x @ W + c) -> ``ending`` -> y: "layernorm" LN(x + h) (BERT), "layer_scale" x + λ ⊙ h
    (DINOv2's ViT), "relu" Relu(h), which holds no constant a bias could join. With
    ``shared_bias``, ``c`` is also read by a second output."""
    b = GraphBuilder(seed=1)
    h = b.op("MatMul", ["x", b.weight("W", [DIM, DIM])], "proj")
    c = b.const("c", b.rng.standard_normal(DIM).astype(np.float32))
    h = b.op("Add", [h, c], "proj_bias")
    if ending == "layernorm":
        summed = b.op("Add", ["x", h], "residual")
        gamma, beta = b.const("gamma", np.full(DIM, 1.5, np.float32)), b.const("beta", np.full(DIM, 0.25, np.float32))
        y = b.op("LayerNormalization", [summed, gamma, beta], "norm", axis=-1)
    elif ending == "layer_scale":
        scaled = b.op("Mul", [h, b.const("lambda", np.linspace(0.5, 2.0, DIM).astype(np.float32))], "layer_scale")
        y = b.op("Add", [scaled, "x"], "residual")
    else:
        y = b.op("Relu", [h], "act")
    outputs = [helper.make_tensor_value_info(y, TensorProto.FLOAT, [None, TOKENS, DIM])]
    if shared_bias:
        outputs.append(helper.make_tensor_value_info(b.op("Add", ["x", c], "other"), TensorProto.FLOAT, [None, TOKENS, DIM]))
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, TOKENS, DIM])], outputs)


def _spliced(model: onnx.ModelProto, output: str, rank: int | None) -> tuple[onnx.ModelProto, splice.Branch]:
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((DIM, rank or DIM)).astype(np.float32)
    up = rng.standard_normal((rank, DIM)).astype(np.float32) if rank else None
    branch = splice.Branch("block0", "x", output, weight, rng.standard_normal(DIM).astype(np.float32), Layout(False), up=up)
    written = ir.serde.deserialize_model(model)
    splice.SpliceCompensationPass([branch])(written)
    return ir.serde.serialize_model(written), branch


@pytest.mark.parametrize("rank", [None, 2], ids=["full", "low-rank"])
@pytest.mark.parametrize("ending, absorbed", [("layernorm", True), ("layer_scale", True), ("relu", False)])
def test_a_token_branch_adds_its_bias_in_a_constant_of_the_block_where_there_is_one(ending, absorbed, rank):
    model = _block(ending, shared_bias=True)
    output = model.graph.output[0].name
    written, branch = _spliced(model, output, rank)
    x = {"x": np.random.default_rng(3).standard_normal((4, TOKENS, DIM)).astype(np.float32)}
    before, after = Runner(model)(x), Runner(written)(x)
    projection = branch.weight if branch.up is None else branch.weight @ branch.up
    np.testing.assert_allclose(after[output], before[output] + x["x"] @ projection + branch.bias, rtol=1e-4, atol=1e-4)
    # the constant it joined is a copy: what else reads the original is unchanged
    other = model.graph.output[1].name
    np.testing.assert_array_equal(after[other], before[other])
    branch_ops = [n.op_type for n in written.graph.node if n.name.startswith(splice.name_prefix(branch))]
    assert branch_ops.count("Add") == (1 if absorbed else 2)
    read = {name for n in written.graph.node for name in n.input}
    assert [i.name for i in written.graph.initializer if i.name not in read] == []  # no constant left behind

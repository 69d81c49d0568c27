import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qwt_onnx.analysis import blocks
from qwt_onnx.errors import InputError
from qwt_onnx.graph import prepare
from tests import graphs


def _prepared(proto):
    return prepare.prepare(ir.serde.deserialize_model(proto))


def test_transformer_layers_are_the_blocks():
    model = _prepared(graphs.transformer(layers=3))
    found = blocks.find_blocks(model)
    assert [(b.input, b.output) for b in found] == [
        ("tokens", "/encoder/layer.0/Add_1_out"),
        ("/encoder/layer.0/Add_1_out", "/encoder/layer.1/Add_1_out"),
        ("/encoder/layer.1/Add_1_out", "features"),  # the last layer takes the final LayerNorm with it
    ]
    assert [b.name for b in found] == ["/encoder/layer.0", "/encoder/layer.1", "/encoder/layer.2"]
    assert not any(b.channels_first for b in found)


def test_residual_granularity_splits_attention_and_mlp():
    model = _prepared(graphs.transformer(layers=2))
    found = blocks.find_blocks(model, granularity="residual")
    assert [b.output for b in found] == [
        "/encoder/layer.0/Add_out",
        "/encoder/layer.0/Add_1_out",
        "/encoder/layer.1/Add_out",
        "features",
    ]


def test_residual_cnn_blocks_end_after_their_relu_and_the_head_is_left_out():
    model = _prepared(graphs.resnet())
    found = blocks.find_blocks(model)
    assert [(b.input, b.output) for b in found] == [
        ("image", "/stem/relu_out"),  # the stem: a chain block
        ("/stem/relu_out", "/layer1/relu_out"),
        ("/layer1/relu_out", "/layer2/relu_out"),
        ("/layer2/relu_out", "/layer3/relu_out"),
    ]
    assert all(b.channels_first for b in found)


def test_blocks_that_share_one_module_path_are_named_by_their_outputs():
    # a TensorFlow export puts every node under model_1/model; TFLite's fused tensor names join
    # the ops they stand for with ";"
    proto = graphs.resnet()
    renamed = {f"/{scope}/relu_out": f"model_1/model/{scope}/add;model_1/model/{scope}/Relu" for scope in ("layer1", "layer2")}
    for k, node in enumerate(proto.graph.node):
        node.name = f"model_1/model/{node.op_type.lower()}_{k}"
        if k == 0:  # TFLite names a fused op by all the ops it stands for, its own first
            node.name = "model_1/model/stem/Conv2D;model_1/model/stem/BiasAdd;model_1/model/conv_0"
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
    found = blocks.find_blocks(_prepared(proto))
    assert [b.name for b in found] == ["model_1/model/stem", "model_1/model/layer1/add", "model_1/model/layer2/add",
                                       "/layer3/relu_out"]


def test_repeating_layers_between_blocks_unlike_them_are_grouped_and_those_blocks_kept_whole():
    # a Keras encoder at opset 13 (tf2onnx): a first residual block unlike the layers after it,
    # which repeat attention, MLP, then a head: the blocks outside the whole periods had been
    # wrapped in one list too many (an AttributeError in the next step)
    from types import SimpleNamespace

    values = [object() for _ in range(7)]
    segments = [SimpleNamespace(start=values[k], end=values[k + 1]) for k in range(6)]
    kinds = ["stem", "attention", "mlp", "attention", "mlp", "head"]
    grouped = blocks._chunk([[s] for s in segments], kinds, 2)
    assert grouped == [[segments[0]], segments[1:3], segments[3:5], [segments[5]]]


def test_chains_between_residual_blocks_are_cut_after_each_dense_conv():
    model = _prepared(graphs.mobilenet())
    found = blocks.find_blocks(model)
    assert [(b.input, b.output) for b in found] == [
        ("image", "/stem/relu_out"),
        ("/stem/relu_out", "/block1/add_out"),
        ("/block1/add_out", "/block2/relu1_out"),  # the expansion conv and its activation
        ("/block2/relu1_out", "/block2/project_out"),  # strided depthwise conv, then the projection
        ("/block2/project_out", "/block3/add_out"),
    ]  # the head (pool, flatten, Gemm) changes rank: no block
    assert all(b.channels_first for b in found)


def test_a_neck_that_no_branch_maps_is_one_divisible_block_or_with_units_its_weighted_units():
    model = _prepared(graphs.detector_neck())
    stem, neck = blocks.find_blocks(model)
    assert (neck.input, neck.output, neck.divisible) == ("/stem/act_out", "output0", True) and not stem.divisible
    units = blocks.find_blocks(model, units=True)
    # each conv with its SiLU (Sigmoid and Mul), in graph order; a unit may read an earlier unit's
    # output (the coarse head reads the downsampling unit, not the neck before it)
    assert [(b.input, b.output) for b in units[1:]] == [
        ("/stem/act_out", "/down/act_out"),
        ("/neck/concat_out", "/neck/act_out"),
        ("/neck/act_out", "/head.0/conv_out"),
        ("/down/act_out", "/head.1/conv_out"),
    ]
    assert units[0] == stem and all(b.channels_first and not b.divisible for b in units)
    # a residual CNN's blocks are mappable: units change nothing there
    resnet = _prepared(graphs.resnet())
    assert blocks.find_blocks(resnet, units=True) == blocks.find_blocks(resnet)


def test_where_the_outputs_part_ways_each_path_gets_its_blocks_and_the_joins_none():
    model = _prepared(graphs.two_scale_detector())
    found = blocks.find_blocks(model)
    # the stem is the last value every output depends on; past it each head is a chain of its
    # own: the coarse one from the stem (its downsampling conv reads the stem alone, though its
    # Relu also feeds the neck), the fine one from where the upsampled coarse map joins the fine
    # map, which reads two paths and so opens no block
    assert [(b.input, b.output) for b in found] == [
        ("image", "/stem/relu_out"),
        ("/stem/relu_out", "/down/relu_out"),
        ("/neck/concat_out", "/neck/relu_out"),
        ("/neck/relu_out", "/head.fine/relu_out"),
        ("/head.fine/relu_out", "/head.fine/pred_out"),
        ("/down/relu_out", "/head.coarse/relu_out"),
        ("/head.coarse/relu_out", "/head.coarse/pred_out"),
    ]
    assert all(b.channels_first and not b.divisible for b in found)
    assert blocks.find_blocks(model, units=True) == found  # the joins hold no weighted op


def test_the_weighted_ops_that_join_paths_are_units_with_units():
    # with a PAN the downsampling convs feed both scales' paths: they lie on neither
    model = _prepared(graphs.two_scale_detector(pan=True))
    found = blocks.find_blocks(model)
    assert [(b.input, b.output) for b in found] == [
        ("image", "/stem/relu_out"),
        ("/neck/concat_out", "/neck/relu_out"),
        ("/neck/relu_out", "/head.fine/relu_out"),
        ("/head.fine/relu_out", "/head.fine/pred_out"),
        ("/pan/concat_out", "/head.coarse/relu_out"),
        ("/head.coarse/relu_out", "/head.coarse/pred_out"),
    ]
    units = blocks.find_blocks(model, units=True)
    assert [(b.input, b.output) for b in units if b not in found] == [
        ("/stem/relu_out", "/down/relu_out"), ("/neck/relu_out", "/pan/relu_out")
    ]
    assert [b.output for b in units] == sorted((b.output for b in units), key=[v.name for n in model.graph for v in n.outputs].index)


def test_a_head_after_an_if_opens_after_the_unsqueeze_that_gives_its_input_frames():
    # the If's output has no declared shape, so the ranks of the head's ends are unknown: the
    # Unsqueeze at its start is left outside all the same, and a 1x1 conv branch maps the rest
    found = blocks.find_blocks(_prepared(graphs.streaming_vad(conv_head=True)))
    assert [(b.input, b.output, b.channels_first) for b in found][-1] == ("/to_frames_out", "prob", True)


def test_nhwc_blocks_are_compensated_over_their_last_axis():
    model = _prepared(graphs.nhwc_resnet())
    found = blocks.find_blocks(model)
    assert [(b.input, b.output) for b in found] == [("image", "/block0/relu_out"), ("/block0/relu_out", "features")]
    assert not any(b.channels_first for b in found)


def test_layout_ops_at_the_ends_of_chain_blocks_are_left_outside():
    # keras2onnx's Transpose from NHWC opens the first block and the Transpose and Flatten before
    # the dense layers close the last conv one: outside them, each block maps one layout (and
    # past the dense layer, each output's head is a block of its own)
    model = _prepared(graphs.keras_cnn())
    found = blocks.find_blocks(model)
    assert [(b.input, b.output, b.channels_first) for b in found] == [
        ("/to_nchw_out", "/pool1_out", True),
        ("/pool1_out", "/prelu2_out", True),
        ("/flatten_out", "/dense/relu_out", False),
        ("/dense/relu_out", "boxes", False),
        ("/dense/relu_out", "faces", False),
    ]


def test_reshapes_that_keep_a_blocks_rank_stay_in_it():
    # tf2onnx's Tensordot: the Reshape to rows opens each dense block, whose input then has
    # samples on axis 0 and the rank of its output
    found = blocks.find_blocks(_prepared(graphs.tensordot_mlp()))
    assert [(b.input, b.output, b.channels_first) for b in found] == [
        ("tokens", "/dense0/relu_out", False),
        ("/dense0/relu_out", "features", False),
    ]


def test_an_if_ends_a_chain_block_and_belongs_to_none():
    # silero-vad: the last encoder conv's activation goes into If branches (its LSTM); the
    # branch maps the conv block, the control flow stays float outside it
    b = graphs.GraphBuilder()
    x = b.op("Relu", [b.op("Conv", ["audio", b.weight("/conv.weight", (8, 4, 3))], "/conv", pads=[1, 1])], "/relu")
    branch = lambda name: onnx.helper.make_graph(  # noqa: E731
        [onnx.helper.make_node("Identity", [x], [f"{name}_out"])], name, [],
        [onnx.helper.make_tensor_value_info(f"{name}_out", onnx.TensorProto.FLOAT, None)])
    flag = b.op("Greater", ["rate", b.const("/8k", np.array(8000, np.int64))], "/is_16k")
    b.op("If", [flag], "/rate", then_branch=branch("then"), else_branch=branch("else"))
    b.nodes[-1].output[0] = "features"
    model = b.model(
        [onnx.helper.make_tensor_value_info("audio", onnx.TensorProto.FLOAT, ["batch", 4, 16]),
         onnx.helper.make_tensor_value_info("rate", onnx.TensorProto.INT64, [])],
        [onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["batch", 8, 16])],
    )
    found = blocks.find_blocks(_prepared(model))
    assert [(b.input, b.output, b.channels_first) for b in found] == [("audio", "/relu_out", True)]


def test_post_ln_layers_end_after_their_layer_norm_and_take_side_inputs_as_context():
    model = _prepared(graphs.bert(layers=2))
    assert blocks.choose_primary_input(model.graph).name == "input_ids"
    found = blocks.find_blocks(model)
    assert [(b.input, b.output) for b in found] == [
        ("/embeddings/ln_out", "/encoder/layer.0/mlp/ln_out"),
        ("/encoder/layer.0/mlp/ln_out", "features"),  # both outputs (features, pooled) are past it
    ]
    residual = blocks.find_blocks(model, granularity="residual")
    assert [b.output for b in residual][:2] == ["/encoder/layer.0/attn/ln_out", "/encoder/layer.0/mlp/ln_out"]


def test_a_trailing_slice_of_the_tokens_is_not_absorbed_even_with_dynamic_dims():
    proto = graphs.transformer(layers=2)
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "sequence"  # dynamic token count
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "patches"
    starts, ends, axes = (onnx.numpy_helper.from_array(np.array([v]), n) for v, n in ((1, "s"), (2**31, "e"), (1, "a")))
    proto.graph.initializer.extend([starts, ends, axes])
    proto.graph.node.append(onnx.helper.make_node("Slice", ["features", "s", "e", "a"], ["patches"], name="/drop_cls"))
    proto.graph.output[0].name = "patches"  # the class token dropped, as ViT saliency and detection heads do
    found = blocks.find_blocks(_prepared(proto))
    assert found[-1].output == "features"


def test_boundaries_ignore_shape_subgraphs():
    model = _prepared(graphs.transformer(layers=1))
    path = blocks.DataPath.analyze(model.graph)
    names = [v.name for v in path.boundaries]
    assert names[0] == "tokens" and names[-1] == "features"
    assert not any("Shape" in n or "Concat" in n for n in names)


def test_user_blocks_as_a_chain_and_as_pairs():
    model = _prepared(graphs.resnet())
    chain = blocks.blocks_from_boundaries(model, ["/stem/relu_out", "/layer1/relu_out", "/layer3/relu_out"])
    assert [(b.input, b.output) for b in chain] == [("/stem/relu_out", "/layer1/relu_out"), ("/layer1/relu_out", "/layer3/relu_out")]
    pairs = blocks.blocks_from_boundaries(model, ["/layer2/relu_out:/layer3/relu_out"])
    assert [(b.input, b.output) for b in pairs] == [("/layer2/relu_out", "/layer3/relu_out")]


@pytest.mark.parametrize(
    "spec, message",
    [
        (["/stem/relu_out", "nope"], "not in the model"),
        (["/stem/relu_out", "/layer1/relu1_out"], "not a block boundary"),
        (["/layer2/relu_out:/layer1/relu_out"], "must come before"),
        (["/stem/relu_out"], "at least two"),
    ],
)
def test_user_blocks_are_validated(spec, message):
    with pytest.raises(InputError, match=message):
        blocks.blocks_from_boundaries(_prepared(graphs.resnet()), spec)


def test_an_attention_mask_is_a_side_input_not_the_data_path():
    model = _prepared(graphs.transformer(layers=2, mask=True))
    path = blocks.DataPath.analyze(model.graph)
    assert path.primary_input.name == "tokens"
    found = blocks.find_blocks(model)
    assert [(b.input, b.output) for b in found] == [("tokens", "/encoder/layer.0/Add_1_out"), ("/encoder/layer.0/Add_1_out", "features")]

"""Small synthetic models for the tests, built with onnx.helper and seeded weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# What tests that need QwT to have error to remove pass: these models' weights are random and
# their inputs Gaussian, so bias correction alone removes nearly all of the CNNs' systematic
# error (tests/test_pipeline.py measures by how much), and so, mostly, do GPTQ rounding and
# channel equalization: QwT would find nothing left to fit.
SYSTEMATIC_ERROR = {"bias_correction": "off", "rounding": "nearest", "equalization": "off"}
# What tests of QwT's branches under --compensation auto pass: on these small models a branch is
# a large share of onnxruntime's run, which the default --max-slowdown would not keep.
ANY_RUN_TIME = {"max_slowdown": 10.0}


class GraphBuilder:
    """Appends nodes and initializers; names values after the node that makes them."""

    def __init__(self, seed: int = 0):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def const(self, name: str, array) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        self.count += 1
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def weight(self, name: str, shape, scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 2 else shape[0]
        scale = scale if scale is not None else 1.0 / np.sqrt(fan_in)
        return self.const(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def model(self, inputs, outputs, opset: int = 17) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "synthetic", inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8 if opset <= 18 else 9 if opset <= 20 else 10  # the oldest IR each opset allows
        onnx.checker.check_model(model)
        return model


def _layer_norm(b: GraphBuilder, x: str, dim: int, name: str, outlier_gain: float) -> str:
    gamma = np.ones(dim, np.float32)
    gamma[: max(1, dim // 16)] = outlier_gain  # a few outlier channels, as in real transformers
    return b.op(
        "LayerNormalization",
        [x, b.const(f"{name}.gamma", gamma), b.const(f"{name}.beta", np.zeros(dim, np.float32))],
        name,
        axis=-1,
    )


def _linear(b: GraphBuilder, x: str, d_in: int, d_out: int, name: str) -> str:
    y = b.op("MatMul", [x, b.weight(f"{name}.weight", (d_in, d_out))], f"{name}/MatMul")
    return b.op("Add", [y, b.const(f"{name}.bias", np.zeros(d_out, np.float32) + 0.01)], f"{name}/Add")


def _split_heads(b: GraphBuilder, x: str, heads: int, dim: int, name: str) -> str:
    # The target shape is computed from Shape(x), as PyTorch's TorchScript exporter writes it.
    shape = b.op("Shape", [x], f"{name}/Shape")
    leading = b.op("Slice", [shape, b.const(f"{name}/s0", np.array([0])), b.const(f"{name}/s1", np.array([2]))], f"{name}/Slice")
    target = b.op("Concat", [leading, b.const(f"{name}/hd", np.array([heads, dim // heads]))], f"{name}/Concat", axis=0)
    split = b.op("Reshape", [x, target], f"{name}/Reshape")
    return b.op("Transpose", [split], f"{name}/Transpose", perm=[0, 2, 1, 3])


def _mask_bias(b: GraphBuilder) -> str:
    """An int64 ``attention_mask`` [batch, tokens] (1 keep, 0 drop) as an additive score bias, as BERT exports do."""
    keep = b.op("Cast", ["attention_mask"], "/mask/cast", to=TensorProto.FLOAT)
    dropped = b.op("Sub", [b.const("/mask/one", np.float32(1.0)), keep], "/mask/invert")
    bias = b.op("Mul", [dropped, b.const("/mask/large", np.float32(-1e4))], "/mask/scale")
    return b.op("Unsqueeze", [bias, b.const("/mask/axes", np.array([1, 2]))], "/mask/unsqueeze")


def _attention(b: GraphBuilder, h: str, dim: int, heads: int, scope: str, mask_bias: str | None) -> str:
    q = _split_heads(b, _linear(b, h, dim, dim, f"{scope}/q"), heads, dim, f"{scope}/q_heads")
    k = _split_heads(b, _linear(b, h, dim, dim, f"{scope}/k"), heads, dim, f"{scope}/k_heads")
    v = _split_heads(b, _linear(b, h, dim, dim, f"{scope}/v"), heads, dim, f"{scope}/v_heads")
    kt = b.op("Transpose", [k], f"{scope}/kT", perm=[0, 1, 3, 2])
    scores = b.op("MatMul", [q, kt], f"{scope}/scores")
    scaled = b.op("Mul", [scores, b.const(f"{scope}/scale", np.float32(1 / np.sqrt(dim // heads)))], f"{scope}/scaled")
    if mask_bias is not None:
        scaled = b.op("Add", [scaled, mask_bias], f"{scope}/masked")
    probs = b.op("Softmax", [scaled], f"{scope}/softmax", axis=-1)
    context = b.op("MatMul", [probs, v], f"{scope}/context")
    merged = b.op("Transpose", [context], f"{scope}/merge", perm=[0, 2, 1, 3])
    flat = b.op("Reshape", [merged, b.const(f"{scope}/flat_shape", np.array([0, 0, dim]))], f"{scope}/flat")
    return _linear(b, flat, dim, dim, f"{scope}/out")


def _mlp(b: GraphBuilder, h: str, dim: int, scope: str) -> str:
    act = b.op("Relu", [_linear(b, h, dim, 4 * dim, f"{scope}/fc1")], f"{scope}/act")
    return _linear(b, act, 4 * dim, dim, f"{scope}/fc2")


def transformer(
    layers: int = 3, dim: int = 32, heads: int = 4, tokens: int = 8, seed: int = 0, mask: bool = False
) -> onnx.ModelProto:
    """A pre-LN transformer encoder: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``, then a final LN.

    With ``mask``, an int64 ``attention_mask`` [batch, tokens] input masks the attention scores.
    """
    b = GraphBuilder(seed)
    x = "tokens"
    mask_bias = _mask_bias(b) if mask else None
    for i in range(layers):
        scope = f"/encoder/layer.{i}"
        h = _layer_norm(b, x, dim, f"{scope}/ln1", outlier_gain=8.0)
        x = b.op("Add", [x, _attention(b, h, dim, heads, f"{scope}/attn", mask_bias)], f"{scope}/Add")
        h = _layer_norm(b, x, dim, f"{scope}/ln2", outlier_gain=8.0)
        x = b.op("Add", [x, _mlp(b, h, dim, f"{scope}/mlp")], f"{scope}/Add_1")
    _layer_norm(b, x, dim, "/final_ln", outlier_gain=1.0)
    b.nodes[-1].output[0] = "features"
    inputs = [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", tokens, dim])]
    if mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", tokens]))
    return b.model(inputs, [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", tokens, dim])])


VOCABULARY = 50


def bert(layers: int = 2, dim: int = 32, heads: int = 4, tokens: int = 8, seed: int = 0) -> onnx.ModelProto:
    """A post-LN BERT encoder: ``LN(x + Attn(x))``, then ``LN(x + MLP(x))``.

    Int64 inputs ``input_ids`` (through a word embedding table), ``position_ids`` (through a
    position table: a side input) and ``attention_mask``; two outputs, the token features and
    their mean (a sentence embedding).
    """
    b = GraphBuilder(seed)
    words = b.op("Gather", [b.weight("/embeddings/word", (VOCABULARY, dim), scale=1.0), "input_ids"], "/embeddings/words")
    positions = b.op("Gather", [b.weight("/embeddings/position", (tokens, dim), scale=0.5), "position_ids"], "/embeddings/positions")
    x = _layer_norm(b, b.op("Add", [words, positions], "/embeddings/add"), dim, "/embeddings/ln", outlier_gain=1.0)
    mask_bias = _mask_bias(b)
    for i in range(layers):
        scope = f"/encoder/layer.{i}"
        x = b.op("Add", [x, _attention(b, x, dim, heads, f"{scope}/attn", mask_bias)], f"{scope}/attn/add")
        x = _layer_norm(b, x, dim, f"{scope}/attn/ln", outlier_gain=8.0)
        x = b.op("Add", [x, _mlp(b, x, dim, f"{scope}/mlp")], f"{scope}/mlp/add")
        x = _layer_norm(b, x, dim, f"{scope}/mlp/ln", outlier_gain=8.0)
    b.nodes[-1].output[0] = "features"
    b.op("ReduceMean", ["features"], "/pool", axes=[1], keepdims=0)
    b.nodes[-1].output[0] = "pooled"
    ids = ["batch", tokens]
    return b.model(
        [helper.make_tensor_value_info(name, TensorProto.INT64, ids) for name in ("input_ids", "position_ids", "attention_mask")],
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", tokens, dim]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", dim]),
        ],
    )


def _conv(b: GraphBuilder, x: str, c_in: int, c_out: int, name: str, kernel: int = 3, stride: int = 1, group: int = 1,
          pad: int | None = None, pad_width: int | None = None) -> str:
    """A square convolution; ``pad_width`` pads the last axis otherwise than ``pad`` the first."""
    pad = kernel // 2 if pad is None else pad
    pad_width = pad if pad_width is None else pad_width
    return b.op(
        "Conv",
        [x, b.weight(f"{name}.weight", (c_out, c_in // group, kernel, kernel)), b.const(f"{name}.bias", np.full(c_out, 0.05, np.float32))],
        name,
        kernel_shape=[kernel, kernel],
        pads=[pad, pad_width] * 2,
        strides=[stride, stride],
        group=group,
    )


def resnet(seed: int = 0, size: int = 16, classes: int = 10, opset: int = 17) -> onnx.ModelProto:
    """Stem, a basic block, a downsampling block (strided conv + 1×1 shortcut), a basic block, head."""
    b = GraphBuilder(seed)
    x = b.op("Relu", [_conv(b, "image", 3, 16, "/stem/conv")], "/stem/relu")

    def basic(x: str, c: int, name: str) -> str:
        h = b.op("Relu", [_conv(b, x, c, c, f"{name}/conv1")], f"{name}/relu1")
        return b.op("Relu", [b.op("Add", [_conv(b, h, c, c, f"{name}/conv2"), x], f"{name}/add")], f"{name}/relu")

    x = basic(x, 16, "/layer1")
    h = b.op("Relu", [_conv(b, x, 16, 32, "/layer2/conv1", stride=2)], "/layer2/relu1")
    shortcut = _conv(b, x, 16, 32, "/layer2/downsample", kernel=1, stride=2)
    x = b.op("Relu", [b.op("Add", [_conv(b, h, 32, 32, "/layer2/conv2"), shortcut], "/layer2/add")], "/layer2/relu")
    x = basic(x, 32, "/layer3")
    return _classifier(b, x, 32, size, classes, opset)


def _classifier(b: GraphBuilder, x: str, channels: int, size: int, classes: int, opset: int = 17) -> onnx.ModelProto:
    """Global average pool, flatten, Gemm: the head of an NCHW ``image`` model."""
    pooled = b.op("Flatten", [b.op("GlobalAveragePool", [x], "/pool")], "/flatten")
    weight, bias = b.weight("/fc.weight", (classes, channels)), b.const("/fc.bias", np.zeros(classes, np.float32))
    b.op("Gemm", [pooled, weight, bias], "/fc", transB=1)
    b.nodes[-1].output[0] = "logits"
    return b.model(
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        opset,
    )


def valid_cnn(seed: int = 0, size: int = 24, classes: int = 10, same_width: bool = False) -> onnx.ModelProto:
    """A plain CNN of unpadded ("valid") convolutions, as Keras and TensorFlow export them: every
    layer shrinks H and W by kernel - 1 (a 3×3 / 2 one to floor((S - 3) / 2) + 1); with
    ``same_width``, H only, W padded to keep its size (or halve it), as in a TensorFlow speech
    model valid in time and same in frequency."""
    b = GraphBuilder(seed)
    conv = lambda x, c_in, c_out, name, kernel=3, stride=1: _conv(  # noqa: E731
        b, x, c_in, c_out, name, kernel, stride, pad=0, pad_width=kernel // 2 if same_width else 0)
    x = b.op("Relu", [conv("image", 3, 16, "/conv1")], "/relu1")  # 24 -> 22
    x = b.op("Relu", [conv(x, 16, 32, "/conv2", stride=2)], "/relu2")  # 22 -> 10
    x = b.op("Relu", [conv(x, 32, 32, "/conv3", kernel=5)], "/relu3")  # 10 -> 6
    x = b.op("Relu", [conv(x, 32, 32, "/conv4")], "/relu4")  # 6 -> 4
    return _classifier(b, x, 32, size, classes)


def keras_cnn(seed: int = 0, size: int = 24) -> onnx.ModelProto:
    """A Keras export as keras2onnx writes it (MTCNN's ONet): an NHWC input transposed once to
    NCHW, unpadded convolutions with PReLU, a Transpose back and a Flatten before the dense
    layers, and two heads of different scales (box offsets, face probabilities)."""
    b = GraphBuilder(seed)
    prelu = lambda x, c, name: b.op("PRelu", [x, b.const(f"{name}.slope", np.full((c, 1, 1), 0.25, np.float32))], name)  # noqa: E731
    x = b.op("Transpose", ["image"], "/to_nchw", perm=[0, 3, 1, 2])
    x = prelu(_conv(b, x, 3, 16, "/conv1", pad=0), 16, "/prelu1")  # 24 -> 22
    x = b.op("MaxPool", [x], "/pool1", kernel_shape=[3, 3], strides=[2, 2])  # 22 -> 10
    x = prelu(_conv(b, x, 16, 32, "/conv2", pad=0), 32, "/prelu2")  # 10 -> 8
    x = b.op("Flatten", [b.op("Transpose", [x], "/to_nhwc", perm=[0, 2, 3, 1])], "/flatten")
    x = b.op("Relu", [_linear(b, x, 8 * 8 * 32, 64, "/dense")], "/dense/relu")
    b.op("MatMul", [x, b.weight("/boxes.weight", (64, 4))], "/boxes")
    b.nodes[-1].output[0] = "boxes"
    b.op("Softmax", [b.op("MatMul", [x, b.weight("/faces.weight", (64, 2))], "/faces")], "/faces/softmax", axis=-1)
    b.nodes[-1].output[0] = "faces"
    return b.model(
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", n]) for name, n in (("boxes", 4), ("faces", 2))],
    )


def tensordot_mlp(seed: int = 0, tokens: int = 6, dims: tuple[int, ...] = (8, 16, 8)) -> onnx.ModelProto:
    """Dense layers on tokens as tf2onnx writes Keras's Tensordot: each MatMul between a Reshape
    to [samples × tokens, D_in] and one back to [samples, tokens, D_out]."""
    b = GraphBuilder(seed)
    x = "tokens"
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        rows = b.op("Reshape", [x, b.const(f"/dense{i}/rows", np.array([-1, d_in], np.int64))], f"/dense{i}/to_rows")
        y = b.op("MatMul", [rows, b.weight(f"/dense{i}/weight", (d_in, d_out))], f"/dense{i}/MatMul")
        y = b.op("Reshape", [y, b.const(f"/dense{i}/tokens", np.array([-1, tokens, d_out], np.int64))], f"/dense{i}/to_tokens")
        x = b.op("Relu", [b.op("Add", [y, b.const(f"/dense{i}/bias", np.full(d_out, 0.05, np.float32))], f"/dense{i}/Add")], f"/dense{i}/relu")
    b.nodes[-1].output[0] = "features"
    return b.model(
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", tokens, dims[0]])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", tokens, dims[-1]])],
    )


def streaming_vad(seed: int = 0, frame: int = 32, channels: int = 8, conv_head: bool = False) -> onnx.ModelProto:
    """A streaming voice-activity model as silero-vad exports it: an audio frame, a recurrent
    state with the samples on axis 1 ([2, batch, C]) and a scalar sample rate as inputs; 1-D
    convolutions; the recurrent step's result passed through If branches on the sample rate,
    both an Identity of a value of the main graph; a speech probability and the next state out.
    With ``conv_head`` the probability comes from a 1×1 Conv1d on the If's output unsqueezed, as
    silero-vad 5's decoder computes it ([batch, 1, 1]), and the else branch reshapes to a shape
    known only when it runs, so that no shape of the If's output is inferred."""
    b = GraphBuilder(seed)
    x = b.op("Unsqueeze", ["audio", b.const("/axis1", np.array([1], np.int64))], "/to_channels")
    for i, c_in in enumerate((1, channels)):
        weight = b.weight(f"/conv{i}.weight", (channels, c_in, 3))
        x = b.op("Relu", [b.op("Conv", [x, weight], f"/conv{i}", pads=[1, 1])], f"/relu{i}")
    pooled = b.op("ReduceMean", [x], "/pool", axes=[2], keepdims=0)
    previous = b.op("Gather", ["state", b.const("/first", np.array(0, np.int64))], "/previous", axis=0)
    h = b.op("Tanh", [b.op("Add", [pooled, previous], "/step")], "/h")
    b.op("Add", [b.op("Mul", ["state", b.const("/decay", np.float32(0.5))], "/decayed"),
                 b.op("Unsqueeze", [h, b.const("/axis0", np.array([0], np.int64))], "/h_as_state")], "/next_state")
    b.nodes[-1].output[0] = "stateN"
    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("Identity", [h], [f"{name}_h"])], name, [], [helper.make_tensor_value_info(f"{name}_h", TensorProto.FLOAT, None)])
    is_16k = b.op("Equal", ["sr", b.const("/16k", np.array(16000, np.int64))], "/is_16k")
    else_branch = branch("else")
    if conv_head:  # Reshape(h, Shape(h)[0:n]) with n = 2 from the sample rate: of unknown rank until it runs
        one = b.op("Cast", [b.op("Equal", ["sr", "sr"], "/always")], "/one", to=TensorProto.INT64)
        n = b.op("Unsqueeze", [b.op("Add", [one, one], "/two"), b.const("/axis0_n", np.array([0], np.int64))], "/n")
        start = b.const("/start", np.array([0], np.int64))
        else_branch = helper.make_graph(
            [helper.make_node("Shape", [h], ["else_shape"]), helper.make_node("Slice", ["else_shape", start, n], ["else_dims"]),
             helper.make_node("Reshape", [h, "else_dims"], ["else_h"])],
            "else", [], [helper.make_tensor_value_info("else_h", TensorProto.FLOAT, None)],
        )
    chosen = b.op("If", [is_16k], "/rate", then_branch=branch("then"), else_branch=else_branch)
    if conv_head:
        x = b.op("Unsqueeze", [chosen, b.const("/axis2", np.array([2], np.int64))], "/to_frames")
        head = b.op("Conv", [x, b.weight("/head.weight", (1, channels, 1))], "/head")
    else:
        head = b.op("MatMul", [chosen, b.weight("/head.weight", (channels, 1))], "/head")
    b.op("Sigmoid", [head], "/prob")
    b.nodes[-1].output[0] = "prob"
    return b.model(
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", frame]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", channels]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1, 1] if conv_head else ["batch", 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", channels])],
    )


def framed_encoder(seed: int = 0, frame: int = 32, channels: int = 8) -> onnx.ModelProto:
    """A model fed one whole recording as frames, as Silero VAD's sequence export is
    ([frames, samples], no batch axis): its 1-D convolutions run the frames as their batch
    ([frames, C, L]), then a mean over each frame and a per-frame speech logit."""
    b = GraphBuilder(seed)
    x = b.op("Unsqueeze", ["frames", b.const("/axis1", np.array([1], np.int64))], "/to_channels")
    for i, c_in in enumerate((1, channels, channels)):
        weight = b.weight(f"/conv{i}.weight", (channels, c_in, 3))
        conv = b.op("Conv", [x, weight, b.const(f"/conv{i}.bias", np.full(channels, 0.1, np.float32))], f"/conv{i}", pads=[1, 1])
        x = b.op("Relu", [conv], f"/relu{i}")
    pooled = b.op("ReduceMean", [x], "/pool", axes=[2], keepdims=0)
    b.op("Gemm", [pooled, b.weight("/head.weight", (channels, 1)), b.const("/head.bias", np.zeros(1, np.float32))], "/head")
    b.nodes[-1].output[0] = "logit"
    return b.model([helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["count", frame])],
                   [helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["count", 1])])


def unbatched_tagger(seed: int = 0, features: int = 8, hidden: int = 16, classes: int = 4) -> onnx.ModelProto:
    """One whole sequence in, no batch (madmom's beat trackers, [T, F]): a residual MLP on the
    frames, per-frame scores [T, classes] and their mean over the sequence [classes]."""
    b = GraphBuilder(seed)
    h = b.op("Relu", [b.op("Add", [b.op("MatMul", ["frames", b.weight("/up/weight", (features, hidden))], "/up/MatMul"),
                                   b.const("/up/bias", np.full(hidden, 0.1, np.float32))], "/up/Add")], "/up/relu")
    down = b.op("Add", [b.op("MatMul", [h, b.weight("/down/weight", (hidden, features))], "/down/MatMul"),
                        b.const("/down/bias", np.full(features, -0.1, np.float32))], "/down/Add")
    mixed = b.op("Add", ["frames", down], "/residual")
    b.op("MatMul", [mixed, b.weight("/head/weight", (features, classes))], "/head/MatMul")
    b.nodes[-1].output[0] = "scores"
    b.op("ReduceMean", ["scores"], "/summary", axes=[0], keepdims=0)
    b.nodes[-1].output[0] = "summary"
    return b.model([helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["T", features])],
                   [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["T", classes]),
                    helper.make_tensor_value_info("summary", TensorProto.FLOAT, [classes])])


def time_major_tagger(seed: int = 0, steps: int = 12, features: int = 16, hidden: int = 16, classes: int = 10) -> onnx.ModelProto:
    """A recurrent tagger as PyTorch exports one without ``batch_first`` (a CRNN's head): the
    input [batch, T, C] transposed to time-major [T, batch, C], a float LSTM, then two dense
    layers on [T, batch, H] whose logits [T, batch, K] stay time-major."""
    b = GraphBuilder(seed)
    x = b.op("Relu", [_linear(b, "features", features, features, "/embed")], "/embed/relu")
    x = b.op("Transpose", [x], "/time_major", perm=[1, 0, 2])
    weights = [b.weight("/lstm.W", (1, 4 * hidden, features)), b.weight("/lstm.R", (1, 4 * hidden, hidden)),
               b.const("/lstm.B", np.zeros((1, 8 * hidden), np.float32))]
    node = helper.make_node("LSTM", [x, *weights], ["/lstm_Y"], name="/lstm", hidden_size=hidden)
    b.nodes.append(node)
    x = b.op("Squeeze", ["/lstm_Y", b.const("/directions", np.array([1], np.int64))], "/squeeze")
    x = b.op("Relu", [_linear(b, x, hidden, hidden, "/dense")], "/dense/relu")
    _linear(b, x, hidden, classes, "/classifier")
    b.nodes[-1].output[0] = "logits"
    return b.model(
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", steps, features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [steps, "batch", classes])],
    )


def with_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every initializer turned into a Constant node, as some exporters write weights."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    constants = [helper.make_node("Constant", [], [t.name], name=f"{t.name}/Constant", value=t) for t in copy.graph.initializer]
    del copy.graph.initializer[:]
    nodes = constants + list(copy.graph.node)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    onnx.checker.check_model(copy)
    return copy


def mobilenet(seed: int = 0, size: int = 16, classes: int = 10) -> onnx.ModelProto:
    """MobileNetV2-style: stem, an inverted residual, a downsampling inverted block *without*
    a skip (expand, strided depthwise, project), another inverted residual, head."""
    b = GraphBuilder(seed)

    def relu6(x: str, name: str) -> str:
        return b.op("Clip", [x, b.const(f"{name}.min", np.float32(0)), b.const(f"{name}.max", np.float32(6))], name)

    def inverted(x: str, c_in: int, c_out: int, stride: int, name: str) -> str:
        h = relu6(_conv(b, x, c_in, 4 * c_in, f"{name}/expand", kernel=1), f"{name}/relu1")
        h = relu6(_conv(b, h, 4 * c_in, 4 * c_in, f"{name}/dw", stride=stride, group=4 * c_in), f"{name}/relu2")
        h = _conv(b, h, 4 * c_in, c_out, f"{name}/project", kernel=1)
        return b.op("Add", [x, h], f"{name}/add") if stride == 1 and c_in == c_out else h

    x = relu6(_conv(b, "image", 3, 16, "/stem/conv"), "/stem/relu")
    x = inverted(x, 16, 16, 1, "/block1")
    x = inverted(x, 16, 32, 2, "/block2")
    x = inverted(x, 32, 32, 1, "/block3")
    return _classifier(b, x, 32, size, classes)


def detector_neck(seed: int = 0, size: int = 16) -> onnx.ModelProto:
    """A YOLO-style detector in miniature: a stem, a coarser scale, the coarse map upsampled and
    joined to the fine one in a neck, and one head conv per scale, flattened and concatenated
    along the anchors into ``[batch, 8, S² + (S/2)²]``; activations are SiLU written as Sigmoid
    and Mul. No linear branch maps the stem's output onto that: the span after it is divisible."""
    b = GraphBuilder(seed)

    def silu(x: str, name: str) -> str:
        return b.op("Mul", [x, b.op("Sigmoid", [x], f"{name}/sigmoid")], f"{name}/act")

    fine = silu(_conv(b, "image", 3, 8, "/stem/conv"), "/stem")
    coarse = silu(_conv(b, fine, 8, 16, "/down/conv", stride=2), "/down")
    up = b.op("Resize", [coarse, "", b.const("/up.scales", np.array([1, 1, 2, 2], np.float32))], "/up", mode="nearest")
    neck = silu(_conv(b, b.op("Concat", [up, fine], "/neck/concat", axis=1), 24, 8, "/neck/conv"), "/neck")
    heads = [
        b.op("Reshape", [_conv(b, x, c, 8, f"{name}/conv", kernel=1), b.const(f"{name}.shape", np.array([0, 8, -1], np.int64))],
             f"{name}/flatten")
        for name, x, c in (("/head.0", neck, 8), ("/head.1", coarse, 16))
    ]
    b.op("Concat", heads, "/detect", axis=2)
    b.nodes[-1].output[0] = "output0"
    return b.model(
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 8, size * size + (size // 2) ** 2])],
    )


def yolox_head(seed: int = 0, size: int = 16) -> onnx.ModelProto:
    """A YOLOX-style decoupled head in miniature: per scale a box regression conv (4 channels), an
    objectness conv and a class conv (2), each of the last two through a Sigmoid, concatenated
    along the channels and flattened, the scales concatenated along the anchors and transposed
    to ``[batch, anchors, 7]``. The objectness is mostly near 0 (its bias is -4), so it holds
    a small share of the output's energy beside the boxes."""
    b = GraphBuilder(seed)
    fine = b.op("Relu", [_conv(b, "image", 3, 8, "/stem/conv")], "/stem/relu")
    coarse = b.op("Relu", [_conv(b, fine, 8, 8, "/down/conv", stride=2)], "/down/relu")
    levels = []
    for name, x in (("/head.0", fine), ("/head.1", coarse)):
        box = _conv(b, x, 8, 4, f"{name}/box", kernel=1)
        logit = b.op("Conv", [x, b.weight(f"{name}/obj.weight", (1, 8, 1, 1)), b.const(f"{name}/obj.bias", np.full(1, -4, np.float32))],
                     f"{name}/obj")
        score = b.op("Sigmoid", [_conv(b, x, 8, 2, f"{name}/cls", kernel=1)], f"{name}/cls/sigmoid")
        joined = b.op("Concat", [box, b.op("Sigmoid", [logit], f"{name}/obj/sigmoid"), score], f"{name}/concat", axis=1)
        levels.append(b.op("Reshape", [joined, b.const(f"{name}.shape", np.array([0, 7, -1], np.int64))], f"{name}/flatten"))
    b.op("Transpose", [b.op("Concat", levels, "/levels", axis=2)], "/anchors_first", perm=[0, 2, 1])
    b.nodes[-1].output[0] = "output"
    anchors = size * size + (size // 2) ** 2
    return b.model(
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", anchors, 7])],
    )


def two_scale_detector(seed: int = 0, size: int = 16, pan: bool = False) -> onnx.ModelProto:
    """A detector with an output per scale, as PicoDet and the YOLOs before v8 export them: a stem,
    a coarser scale, a neck joining the upsampled coarse map to the fine one, and per scale a
    head (a 3×3 conv with its Relu, then a 1×1 conv) transposed to channels last into its own
    output. Every block boundary past the stem leads to one output only. With ``pan`` the coarse
    head reads the neck too, downsampled by a conv and joined to the coarse map (a PAN)."""
    b = GraphBuilder(seed)
    fine = b.op("Relu", [_conv(b, "image", 3, 8, "/stem/conv")], "/stem/relu")
    coarse = b.op("Relu", [_conv(b, fine, 8, 16, "/down/conv", stride=2)], "/down/relu")
    up = b.op("Resize", [coarse, "", b.const("/up.scales", np.array([1, 1, 2, 2], np.float32))], "/up", mode="nearest")
    neck = b.op("Relu", [_conv(b, b.op("Concat", [up, fine], "/neck/concat", axis=1), 24, 8, "/neck/conv")], "/neck/relu")
    coarse_channels = 16
    if pan:
        down = b.op("Relu", [_conv(b, neck, 8, 8, "/pan/conv", stride=2)], "/pan/relu")
        coarse, coarse_channels = b.op("Concat", [down, coarse], "/pan/concat", axis=1), 24
    outputs = []
    for name, x, c, s in (("fine", neck, 8, size), ("coarse", coarse, coarse_channels, size // 2)):
        h = b.op("Relu", [_conv(b, x, c, c, f"/head.{name}/conv")], f"/head.{name}/relu")
        b.op("Transpose", [_conv(b, h, c, 6, f"/head.{name}/pred", kernel=1)], f"/head.{name}/nhwc", perm=[0, 2, 3, 1])
        b.nodes[-1].output[0] = name
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", s, s, 6]))
    return b.model([helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])], outputs)


def nhwc_resnet(seed: int = 0, size: int = 8, channels: int = 16, classes: int = 0) -> onnx.ModelProto:
    """Residual blocks on NHWC tensors, each conv wrapped in transposes, as TensorFlow exports
    write them; with ``classes``, a pooled classifier head after them."""
    b = GraphBuilder(seed)
    x = "image"
    for i in range(2):
        name = f"/block{i}"
        h = b.op("Transpose", [x], f"{name}/to_nchw", perm=[0, 3, 1, 2])
        h = b.op("Relu", [_conv(b, h, channels, channels, f"{name}/conv1")], f"{name}/relu1")
        h = _conv(b, h, channels, channels, f"{name}/conv2")
        h = b.op("Transpose", [h], f"{name}/to_nhwc", perm=[0, 2, 3, 1])
        x = b.op("Relu", [b.op("Add", [x, h], f"{name}/add")], f"{name}/relu")
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", size, size, channels])]
    if not classes:
        b.nodes[-1].output[0] = "features"
        return b.model(inputs, [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", size, size, channels])])
    pooled = b.op("ReduceMean", [x], "/pool", axes=[1, 2], keepdims=0)
    b.op("Gemm", [pooled, b.weight("/fc.weight", (classes, channels)), b.const("/fc.bias", np.zeros(classes, np.float32))], "/fc", transB=1)
    b.nodes[-1].output[0] = "logits"
    return b.model(inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])])


def zipmap_classifier(seed: int = 0, features: int = 8, classes: int = 3) -> onnx.ModelProto:
    """A dense softmax classifier whose probabilities come out as skl2onnx writes them by default:
    a ZipMap's sequence of maps from class label to probability."""
    b = GraphBuilder(seed)
    probabilities = b.op("Softmax", [b.op("MatMul", ["x", b.weight("w", (features, classes))], "dense")], "softmax")
    b.nodes.append(helper.make_node("ZipMap", [probabilities], ["probabilities"], domain="ai.onnx.ml",
                                    classlabels_int64s=list(range(classes))))
    value = helper.make_tensor_type_proto(TensorProto.FLOAT, None)
    mapped = helper.make_sequence_type_proto(helper.make_map_type_proto(TensorProto.INT64, value))
    graph = helper.make_graph(b.nodes, "zipmap", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
                              [helper.make_value_info("probabilities", mapped)], b.initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    onnx.checker.check_model(model)
    return model


def samples(model: onnx.ModelProto, count: int, seed: int) -> dict[str, np.ndarray]:
    """``count`` samples for every input: standard-normal floats; int64 ``input_ids`` drawn from
    the vocabulary, ``position_ids`` counting up, masks that keep a random-length prefix."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]
        if value.name == "input_ids":
            feeds[value.name] = rng.integers(0, VOCABULARY, size=(count, *dims))
        elif value.name == "position_ids":
            feeds[value.name] = np.broadcast_to(np.arange(dims[-1]), (count, dims[-1])).copy()
        elif value.type.tensor_type.elem_type == TensorProto.INT64:
            lengths = rng.integers(1, dims[-1] + 1, size=count)
            feeds[value.name] = (np.arange(dims[-1]) < lengths[:, None]).astype(np.int64)
        else:
            feeds[value.name] = rng.standard_normal((count, *dims)).astype(np.float32)
    return feeds


def spectrogram_classifier(seed: int = 0, length: int = 512, bins: int = 32, mels: int = 12) -> onnx.ModelProto:
    """An audio classifier that computes its log-mel spectrogram in the graph, as audio models
    exported with their front end do: a short-time Fourier transform as two strided Conv1d
    (cosine and sine kernels), the power, a mel filterbank as a MatMul, a floor, a Log; then a
    Conv1d, a Relu, a mean over time and a Gemm to class logits."""
    b = GraphBuilder(seed)
    window, hop = 64, 32
    t = np.arange(window)
    frequencies = np.arange(1, bins + 1)[:, None] * np.pi / bins
    hann = np.hanning(window)
    x = b.op("Unsqueeze", ["audio", b.const("/axis1", np.array([1], np.int64))], "/to_channels")
    real = b.op("Conv", [x, b.const("/stft/cos", (np.cos(frequencies * t) * hann)[:, None].astype(np.float32))], "/stft/real", strides=[hop])
    imag = b.op("Conv", [x, b.const("/stft/sin", (np.sin(frequencies * t) * hann)[:, None].astype(np.float32))], "/stft/imag", strides=[hop])
    power = b.op("Add", [b.op("Mul", [real, real], "/real2"), b.op("Mul", [imag, imag], "/imag2")], "/power")
    frames = b.op("Transpose", [power], "/to_frames", perm=[0, 2, 1])
    filterbank = np.maximum(0, 1 - np.abs(np.linspace(0, mels - 1, bins)[:, None] - np.arange(mels)[None, :])).astype(np.float32)
    mel = b.op("MatMul", [frames, b.const("/mel/filterbank", filterbank)], "/mel")
    logmel = b.op("Log", [b.op("Max", [mel, b.const("/floor", np.array(1e-6, np.float32))], "/floored")], "/log")
    h = b.op("Transpose", [logmel], "/to_channels_again", perm=[0, 2, 1])
    h = b.op("Relu", [b.op("Conv", [h, b.weight("/conv.weight", (16, mels, 3)), b.const("/conv.bias", np.zeros(16, np.float32))], "/conv",
                           pads=[1, 1])], "/relu")
    pooled = b.op("ReduceMean", [h], "/pool", axes=[2], keepdims=0)
    b.op("Gemm", [pooled, b.weight("/head.weight", (16, 4)), b.const("/head.bias", np.zeros(4, np.float32))], "/head")
    b.nodes[-1].output[0] = "logits"
    return b.model([helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", length])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])])


def resampler(seed: int = 0, length: int | str = "N", taps: int = 9) -> onnx.ModelProto:
    """A waveform resampled to twice its rate, as speech toolkits ship it (onnx_asr's
    resample_8_16): [batch, N] samples through a Conv1d of two polyphase filters, interleaved to
    [batch, 2N]. Its tensors have no channel axis beside the samples; ``length`` a size exports
    it for one length only."""
    b = GraphBuilder(seed)
    x = b.op("Unsqueeze", ["waveform", b.const("/axis1", np.array([1], np.int64))], "/to_channels")
    phases = b.op("Conv", [x, b.weight("/filters", (2, 1, taps))], "/filters", pads=[taps // 2, taps // 2])
    interleaved = b.op("Transpose", [phases], "/interleave", perm=[0, 2, 1])
    b.op("Reshape", [interleaved, b.const("/flat", np.array([0, -1], np.int64))], "/flatten")
    b.nodes[-1].output[0] = "resampled"
    doubled = 2 * length if isinstance(length, int) else "M"
    return b.model([helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["batch", length])],
                   [helper.make_tensor_value_info("resampled", TensorProto.FLOAT, ["batch", doubled])])


def tones(count: int, length: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
    """Audio for :func:`spectrogram_classifier`: one to three tones of random pitch and loudness
    and faint noise, so that most of each spectrum is near zero, as a real one is."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    audio = np.zeros((count, length))
    for i in range(count):
        for _ in range(rng.integers(1, 4)):
            audio[i] += rng.uniform(0.05, 1.0) * np.sin(rng.uniform(0.05, 3.0) * t + rng.uniform(0, 2 * np.pi))
    audio += 1e-3 * rng.standard_normal(audio.shape)
    return {"audio": audio.astype(np.float32)}


def in_precision(model: onnx.ModelProto, dtype: type, keep_io_types: bool) -> onnx.ModelProto:
    """``model`` as precision converters write it (onnxconverter-common's float16): weights in
    ``dtype`` (float16, float64), and its inputs and outputs too, or kept float32 with a Cast
    after each input and before each output."""
    other = onnx.ModelProto()
    other.CopyFrom(model)
    graph, element = other.graph, helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(dtype), tensor.name))
    if keep_io_types:
        first, last = graph.input[0].name, graph.output[0].name
        for node in graph.node:
            node.input[:] = [f"{first}/cast" if name == first else name for name in node.input]
            node.output[:] = [f"{last}/cast" if name == last else name for name in node.output]
        graph.node.insert(0, helper.make_node("Cast", [first], [f"{first}/cast"], to=element))
        graph.node.append(helper.make_node("Cast", [f"{last}/cast"], [last], to=TensorProto.FLOAT))
    else:
        for value in (*graph.input, *graph.output):
            value.type.tensor_type.elem_type = element
    onnx.checker.check_model(other)
    return other

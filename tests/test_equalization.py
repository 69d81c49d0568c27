"""Channel equalization: where scales can move (analysis), moving them (pass), how far (numerics), and the option."""

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qwt_onnx import api, ptq
from qwt_onnx.analysis.equalization import channel_groups, consumer_weights
from qwt_onnx.analysis.placement import place
from qwt_onnx.calibration import CalibrationSet
from qwt_onnx.graph import prepare
from qwt_onnx.numerics import equalization as eqn
from qwt_onnx.numerics import quantization as qm
from qwt_onnx.numerics.ranges import compute_range
from qwt_onnx.options import CalibMethod, Options
from qwt_onnx.passes.equalize import EqualizeChannelsPass
from qwt_onnx.report import format_summary
from qwt_onnx.run import Run, Warnings
from qwt_onnx.runtime import session
from tests import graphs


def _conv_chains(seed: int = 0) -> onnx.ModelProto:
    """Conv → PReLU → MaxPool → Conv → Relu → depthwise Conv → Relu → Conv → pool → Flatten →
    Gemm → Relu → two Gemm heads: four groups (the Flatten ends the fourth chain)."""
    b = graphs.GraphBuilder(seed)
    slope = b.const("slope", np.full((8, 1, 1), 0.1, np.float32))
    x = b.op("Conv", ["image", b.weight("c1.w", (8, 3, 3, 3)), b.weight("c1.b", (8,), 0.1)], "c1", pads=[1, 1, 1, 1])
    x = b.op("MaxPool", [b.op("PRelu", [x, slope], "prelu")], "pool", kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("Relu", [b.op("Conv", [x, b.weight("c2.w", (8, 8, 3, 3))], "c2", pads=[1, 1, 1, 1])], "relu2")
    x = b.op("Relu", [b.op("Conv", [x, b.weight("dw.w", (8, 1, 3, 3))], "dw", group=8, pads=[1, 1, 1, 1])], "relu3")
    x = b.op("Conv", [x, b.weight("c4.w", (6, 8, 1, 1)), b.weight("c4.b", (6,), 0.1)], "c4")
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x], "gap")], "flat")
    x = b.op("Relu", [b.op("Gemm", [x, b.weight("fc.w", (16, 6)), b.weight("fc.b", (16,), 0.1)], "fc", transB=1)], "relu_fc")
    b.nodes.append(helper.make_node("Gemm", [x, b.weight("head_a.w", (16, 3))], ["boxes"], name="head_a"))
    b.nodes.append(helper.make_node("Gemm", [x, b.weight("head_b.w", (2, 16)), b.weight("head_b.b", (2,), 0.1)], ["scores"],
                                    name="head_b", transB=1))
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", k]) for name, k in (("boxes", 3), ("scores", 2))]
    return b.model(inputs, outputs)


def _decomposed_layer_norm(seed: int = 0, dim: int = 16) -> onnx.ModelProto:
    """A LayerNorm as tf2onnx writes it (…, Mul by γ, Add of β) before a MatMul."""
    b = graphs.GraphBuilder(seed)
    mean = b.op("ReduceMean", ["tokens"], "mean", axes=[-1])
    centred = b.op("Sub", ["tokens", mean], "centre")
    spread = b.op("Sqrt", [b.op("ReduceMean", [b.op("Mul", [centred, centred], "square")], "var", axes=[-1])], "std")
    normed = b.op("Div", [centred, spread], "normalize")
    gamma = np.ones(dim, np.float32)
    gamma[:2] = 20.0
    scaled = b.op("Mul", [normed, b.const("gamma", gamma)], "gamma_mul")
    shifted = b.op("Add", [scaled, b.const("beta", np.full(dim, 0.5, np.float32))], "beta_add")
    b.nodes.append(helper.make_node("MatMul", [shifted, b.weight("proj.w", (dim, 8))], ["features"], name="proj"))
    return b.model([helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", 4, dim])],
                   [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4, 8])], opset=17)


def _groups(model: onnx.ModelProto):
    fp = api.load_fp32(model)
    return fp, channel_groups(fp.graph)


def _outputs(model, feeds):
    return session(model).run(None, feeds)


def _equalized_at_random(fp, groups, seed=0):
    rng = np.random.default_rng(seed)
    scales = {group.tensor.name: np.exp(rng.uniform(-2.0, 2.0, group.channels)) for group in groups}
    equalized = fp.clone()
    EqualizeChannelsPass(scales)(equalized)
    return equalized


def test_groups_follow_chains_of_positively_homogeneous_ops_to_weighted_readers():
    _, groups = _groups(_conv_chains())
    found = {(g.producer.name, tuple(sorted(c.name for c in g.consumers))) for g in groups}
    assert found == {("c1", ("c2",)), ("c2", ("dw",)), ("dw", ("c4",)), ("fc", ("head_a", "head_b"))}
    prelu = next(g for g in groups if g.producer.name == "c1")
    assert [v.producer().op_type for v in prelu.chain] == ["Conv", "PRelu", "MaxPool"] and prelu.axis == -3


@pytest.mark.parametrize("build", [_conv_chains, lambda: graphs.transformer(layers=2, dim=16, tokens=4), _decomposed_layer_norm],
                         ids=["convolutions", "layer-norm", "decomposed-layer-norm"])
def test_moving_scales_keeps_what_the_model_computes_and_adds_no_node(build):
    model = build()
    fp, groups = _groups(model)
    assert groups
    equalized = _equalized_at_random(fp, groups)
    feeds = graphs.samples(model, 4, seed=1)
    before, after = _outputs(prepare.to_proto(fp), feeds), _outputs(prepare.to_proto(equalized), feeds)
    for b, a in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
    assert collections.Counter(n.op_type for n in equalized.graph) == collections.Counter(n.op_type for n in fp.graph)
    changed = [name for name, v in fp.graph.initializers.items()
               if not np.array_equal(v.const_value.numpy(), equalized.graph.initializers[name].const_value.numpy())]
    assert len(changed) >= len(groups) + 1  # every producer and consumer weight at least


def test_layer_norms_of_a_pre_ln_transformer_feed_their_projections():
    _, groups = _groups(graphs.transformer(layers=2, dim=16, tokens=4))
    kinds = collections.Counter((g.producer.op_type, len(g.consumers)) for g in groups)
    # Q, K, V; the first MLP layer; its output through the bias Add and the Relu to the second
    assert kinds == {("LayerNormalization", 3): 2, ("LayerNormalization", 1): 2, ("MatMul", 1): 2}


def test_decomposed_layer_norm_moves_scales_through_gamma_and_beta():
    _, groups = _groups(_decomposed_layer_norm())
    (group,) = groups
    assert group.producer.op_type == "Mul"
    assert {c.value.name for c in group.constants} == {"gamma", "beta", "proj.w"}


def _single_chain(middle: str, extra_reader: str | None = None, output_middle: bool = False) -> onnx.ModelProto:
    b = graphs.GraphBuilder(0)
    x = b.op(middle, [b.op("Conv", ["image", b.weight("c1.w", (4, 3, 1, 1))], "c1")], "mid")
    b.nodes.append(helper.make_node("Conv", [x, b.weight("c2.w", (4, 4, 1, 1))], ["y"], name="c2"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 4, 4])]
    if extra_reader:
        b.nodes.append(helper.make_node(extra_reader, [x, "y"], ["z"], name="reader"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4, 4, 4]))
    if output_middle:
        outputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", 4, 4, 4]))
    return b.model([helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 4, 4])], outputs)


@pytest.mark.parametrize("model", [
    _single_chain("Sigmoid"),  # not homogeneous
    _single_chain("Relu", extra_reader="Add"),  # a residual reads the scaled tensor
    _single_chain("Relu", output_middle=True),  # the user reads it
], ids=["sigmoid", "residual-reader", "graph-output"])
def test_no_group_where_something_else_would_see_the_scale(model):
    assert _groups(model)[1] == []
    assert _groups(_single_chain("Relu"))[1]  # the same chain with nothing else on it is one


def _outlier_activation(rng, rows=4096, channels=32, outliers=2, gain=30.0):
    x = rng.standard_normal((rows, channels)).astype(np.float32)
    x[:, :outliers] *= gain
    return x


def _activation(x: np.ndarray) -> eqn.QuantizedActivation:
    return eqn.QuantizedActivation(x.min(0), x.max(0), x)


def _power(x: np.ndarray) -> np.ndarray:
    return np.square(x, dtype=np.float64).mean(0)


def _dense(weight: np.ndarray) -> eqn.ConsumerWeight:
    """A [K, N] MatMul weight as the numerics take it."""
    return eqn.ConsumerWeight(weight.T[:, :, None], np.broadcast_to(np.arange(weight.shape[0]), weight.T.shape))


MINMAX = lambda observer: compute_range(observer, "minmax")  # noqa: E731


def _simulated_error(x, weight, scales, bits=8):
    """The output error of quantizing x / scales per tensor (min-max) and weight · scales per column."""
    scaled = x / scales
    xq = qm.fake_quantize(scaled, qm.activation_params(scaled.min(), scaled.max(), symmetric=False))
    w = (weight * scales[:, None]).astype(np.float32)
    wq = qm.fake_quantize(w, qm.symmetric_weight_params(w, 1, bits=bits), axis=1)
    return float(np.square(xq @ wq - x @ weight).sum(axis=1).mean())


@pytest.mark.parametrize("alpha", [None, 0.5, 0.8])
def test_output_error_is_the_error_quantizing_both_leaves_on_uncorrelated_inputs(alpha):
    rng = np.random.default_rng(0)
    x, weight = _outlier_activation(rng), rng.standard_normal((32, 24)).astype(np.float32) / 6
    activation, consumer = _activation(x), _dense(weight)
    scales = np.ones(32) if alpha is None else eqn.smoothing_scales([activation], [consumer], alpha)
    predicted = eqn.output_error(scales, [activation], _power(x), [consumer], MINMAX)
    assert predicted == pytest.approx(_simulated_error(x, weight, scales), rel=0.25)


def test_an_outlier_channel_is_moved_into_the_weights_and_the_error_falls():
    rng = np.random.default_rng(1)
    x, weight = _outlier_activation(rng), rng.standard_normal((32, 24)).astype(np.float32) / 6
    choice = eqn.equalize([_activation(x)], _power(x), [_dense(weight)], MINMAX)
    assert choice.scaled and choice.gain_db > 3.0
    assert choice.scales[:2].mean() > 5 * choice.scales[2:].mean()  # the outliers are divided the most
    assert _simulated_error(x, weight, choice.scales) < 0.5 * _simulated_error(x, weight, np.ones(32))


def test_channels_alike_are_left_as_they_are():
    """Every channel reaching as far and read by weights as large: SmoothQuant's scales are all 1."""
    rng = np.random.default_rng(2)
    x = np.stack([rng.permutation(rng.standard_normal(4096)) for _ in range(1)] * 32, axis=1).astype(np.float32)
    row = rng.standard_normal(24).astype(np.float32)
    weight = np.stack([rng.permutation(row) for _ in range(32)])
    choice = eqn.equalize([_activation(x)], _power(x), [_dense(weight)], MINMAX)
    assert not choice.scaled and np.all(choice.scales == 1.0)


def test_a_quantized_tensor_before_the_consumers_counts():
    """A chain whose first tensor is quantized too (a QLinearConv's output before a PReLU): its
    error adds to the consumers' input's."""
    rng = np.random.default_rng(3)
    x, weight = _outlier_activation(rng), rng.standard_normal((32, 24)).astype(np.float32) / 6
    weight_error = eqn.output_error(np.ones(32), [], _power(x), [_dense(weight)], MINMAX)
    alone = eqn.output_error(np.ones(32), [_activation(x)], _power(x), [_dense(weight)], MINMAX)
    twice = eqn.output_error(np.ones(32), [_activation(x), _activation(x)], _power(x), [_dense(weight)], MINMAX)
    assert twice - weight_error == pytest.approx(2 * (alone - weight_error))


def test_consumer_weights_of_a_depthwise_conv_read_one_channel_each():
    fp, groups = _groups(_conv_chains())
    (weight,) = consumer_weights(next(g for g in groups if g.producer.name == "c2"))
    assert weight.weight.shape == (8, 1, 9) and list(weight.channel[:, 0]) == list(range(8)) and not weight.paired


def test_equalization_lifts_a_transformer_whose_layer_norms_have_outlier_channels():
    model = graphs.transformer(layers=2, dim=32, tokens=8)
    calib = graphs.samples(model, 160, seed=0)
    common = dict(qwt=False, progress=False, rounding="nearest", bias_correction="off", calib_method="minmax")
    off = api.quantize_with_report(model, calib, equalization="off", **common)
    on = api.quantize_with_report(model, calib, equalization="on", **common)
    auto = api.quantize_with_report(model, calib, equalization="auto", **common)
    assert off[1].equalizable == 0 and on[1].equalizable == 6 and on[1].equalized
    assert on[1].sqnr_ptq_db > off[1].sqnr_ptq_db + 1.0
    assert auto[1].equalization_gain_db == pytest.approx(on[1].sqnr_ptq_db - off[1].sqnr_ptq_db, abs=1e-6)
    assert auto[1].equalized and "channel equalization: 6 activations" in format_summary(auto[1], "transformer")
    ops = [collections.Counter(n.op_type for n in m.graph.node) for m in (off[0], on[0])]
    assert ops[0] == ops[1]  # nothing added


def test_equalization_auto_computes_each_tensors_range_once_per_observation(monkeypatch):
    # the equalized model's builder takes the FP32 model's ranges of the tensors it did not observe again
    computed, alive = collections.Counter(), []  # the observers kept alive, so that no id is reused

    def counted(observer, method, *args, **kwargs):
        computed[id(observer), method] += 1
        alive.append(observer)
        return compute_range(observer, method, *args, **kwargs)

    monkeypatch.setattr(ptq, "compute_range", counted)
    model = graphs.transformer(layers=2, dim=32, tokens=8)
    _, report = api.quantize_with_report(model, graphs.samples(model, 160, seed=0), qwt=False, progress=False,
                                         rounding="nearest", bias_correction="off", calib_method="minmax", equalization="auto")
    assert report.equalized and computed and max(computed.values()) == 1


def test_the_equalized_models_statistics_are_the_models_rescaled_where_not_observed_again():
    """Only the quantized tensors that carry a scale are observed again; every other statistic
    (means, powers, the second moments GPTQ needs) is rescaled: as observing it would be."""
    model = _conv_chains()
    fp = api.load_fp32(model)
    options = Options()
    calib = CalibrationSet.load(graphs.samples(model, 48, seed=0), prepare.input_specs(fp), 48)
    run = Run(fp, calib, 16, options, Warnings())
    groups, placement = channel_groups(fp.graph), place(fp.graph, options.target, run.excluded)
    seen = ptq._observe(run, fp, placement, groups)
    equalized = ptq._equalized(run, groups, seen, CalibMethod.MINMAX)
    assert equalized is not None
    derived, observed = ptq._observe_equalized(run, equalized, seen, placement), ptq._observe(run, equalized.model, placement)
    assert set(derived.ranges) == set(observed.ranges)
    for name in observed.ranges:
        np.testing.assert_allclose(compute_range(derived.ranges[name], "mse"), compute_range(observed.ranges[name], "mse"), rtol=1e-4)
    for name in observed.means:
        np.testing.assert_allclose(derived.means[name], observed.means[name], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(derived.powers[name], observed.powers[name], rtol=1e-4)
    assert set(derived.second_moments) == set(observed.second_moments)
    for weight, moments in observed.second_moments.items():
        np.testing.assert_allclose(derived.second_moments[weight].hessian(True), moments.hessian(True), rtol=1e-3, atol=1e-5)

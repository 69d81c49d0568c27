"""Affine compensation (QwT-v2's CWAC): fitted per channel, folded into weight scales and biases."""

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from qwt_onnx import check
from qwt_onnx.api import quantize_with_report
from qwt_onnx.graph import query as g
from qwt_onnx.layer_folds import LayerFolds
from qwt_onnx.numerics.affine import ChannelStatistics, fit_channel_affine, fold_suffices, passed_share
from qwt_onnx.passes import affine as af
from qwt_onnx.runtime import session
from tests import graphs


def _statistics(z, r, axis, heldout_every=5):
    every, held = ChannelStatistics(z.shape[axis]), ChannelStatistics(z.shape[axis])
    every.update(z, r, axis)
    held.update(z[::heldout_every], r[::heldout_every], axis)
    return every.without(held), held


def test_the_fit_recovers_each_channels_scale_and_shift_and_keeps_only_channels_it_helps():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((400, 6, 5)).astype(np.float32) * 3 + 1
    slope, shift = np.array([0.05, -0.1, 0.0, 0.2, 0.0, 0.02]), np.array([0.3, 0.0, -0.2, 0.1, 0.0, 0.0])
    r = slope[None, :, None] * z + shift[None, :, None] + 0.01 * rng.standard_normal(z.shape)
    r[:, 4] = 0.2 * rng.standard_normal((400, 5))  # noise that no affine of z explains
    fit = fit_channel_affine(*_statistics(z, r.astype(np.float32), axis=1))
    kept = np.arange(6) != 4
    np.testing.assert_allclose(fit.scale[kept], 1 + slope[kept], atol=2e-3)
    np.testing.assert_allclose(fit.shift[kept], shift[kept], atol=6e-3)
    assert fit.scale[4] == 1.0 and fit.shift[4] == 0.0  # noise is not compensated
    assert fit.kept_targets == 5 and fit.error_ratio_heldout < 0.5 and fit.r2_heldout > 0.5


@pytest.mark.parametrize("shape, axis", [((7, 5, 3, 4), 1), ((7, 3, 4, 5), 3), ((7, 5), -1), ((0, 5, 2), 1)])
@pytest.mark.parametrize("weighted", [False, True])
def test_channel_statistics_sum_each_channel_in_any_layout(shape, axis, weighted, monkeypatch):
    monkeypatch.setattr("qwt_onnx.numerics.affine.UPDATE_CHUNK", 16)  # several chunks of rows
    rng = np.random.default_rng(2)
    z, r = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    w = rng.uniform(0, 1, shape).astype(np.float32) if weighted else None
    stats = ChannelStatistics(shape[axis])
    stats.update(z, r, axis, w)
    zc, rc, wc = (np.moveaxis(a, axis, 0).reshape(shape[axis], -1).astype(np.float64)
                  for a in (z, r, w if weighted else np.ones(shape)))
    expected = [wc.sum(1), (wc * zc).sum(1), (wc * rc).sum(1), (wc * zc * zc).sum(1), (wc * zc * rc).sum(1), (wc * rc * rc).sum(1)]
    np.testing.assert_allclose(stats.sums, np.stack(expected), rtol=1e-12, atol=1e-12)


def test_passed_share_is_the_squared_secant_slope_of_the_activation():
    relu = lambda x: np.maximum(x, 0)  # noqa: E731
    z = np.array([2.0, -3.0, 1.0, -1.0, 5.0], np.float32)
    reference = np.array([1.0, -1.0, -1.0, 3.0, 5.0], np.float32)  # passed, clipped, straddling twice, equal
    np.testing.assert_allclose(passed_share(z, reference, relu(z), relu(reference)), [1.0, 0.0, 0.25, 0.5625, 1.0])
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    z, reference = np.array([0.01, 6.0]), np.array([0.0, 6.01])
    np.testing.assert_allclose(passed_share(z, reference, sigmoid(z), sigmoid(reference)), [0.0625, 0.0025**2 / 1.0], rtol=0.05)


def test_a_fold_fitted_through_a_relu_mends_what_the_relu_passes_and_ignores_what_it_clips():
    # the quantized layer scales its positive outputs wrong and shifts its negative ones, which the
    # Relu after it zeroes anyway: fitted on every output the fold mends neither, through the Relu
    # it mends the first exactly
    rng = np.random.default_rng(3)
    reference = rng.standard_normal((600, 4, 6)).astype(np.float32)
    z = np.where(reference > 0, 0.9 * reference + 0.05, reference - 0.8).astype(np.float32)
    relu = lambda x: np.maximum(x, 0)  # noqa: E731
    weight = passed_share(z, reference, relu(z), relu(reference))
    errors = []
    for w in (None, weight):
        every, held = ChannelStatistics(4), ChannelStatistics(4)
        every.update(z, reference - z, 1, w)
        held.update(z[::5], (reference - z)[::5], 1, None if w is None else w[::5])
        fit = fit_channel_affine(every.without(held), held)
        folded = fit.scale[None, :, None] * z + fit.shift[None, :, None]
        errors.append(float(np.square(relu(folded) - relu(reference)).mean()))
    unweighted, through_relu = errors
    assert through_relu < 1e-6 < 0.01 < unweighted


def test_a_fit_that_would_flip_a_channels_sign_is_not_kept():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((500, 3)).astype(np.float32)
    r = (np.array([-1.5, 0.1, 0.1]) * z).astype(np.float32)  # channel 0 should become -0.5 z
    fit = fit_channel_affine(*_statistics(z, r, axis=1))
    assert fit.scale[0] == 1.0 and fit.kept_targets == 2
    assert np.all(fit.scale > 0)


def _residual_dense(op: str, bias: bool, rank: int, trans_b: int = 0, layer_scale: bool = False) -> onnx.ModelProto:
    """``out = x + dense(relu(dense(x)))``: the block ends in a Gemm or a MatMul (bias Add or
    none), or a MatMul and a layer scale (a constant per channel)."""
    b = graphs.GraphBuilder(3)
    x = "x"
    h = b.op("Relu", [b.op("MatMul", [x, b.weight("w1", (16, 16))], "fc1")], "act")
    if op == "Gemm":
        w = b.weight("w2", (16, 16))
        inputs = [h, w] + ([b.const("b2", np.full(16, 0.1, np.float32))] if bias else [])
        y = b.op("Gemm", inputs, "fc2", transB=trans_b, beta=0.5)
    else:
        y = b.op("MatMul", [h, b.weight("w2", (16, 16))], "fc2")
        if bias:
            y = b.op("Add", [y, b.const("b2", np.full(16, 0.1, np.float32))], "fc2_bias")
    if layer_scale:
        y = b.op("Mul", [b.const("gamma", np.linspace(0.1, 2.0, 16).astype(np.float32)), y], "layer_scale")
    b.op("Add", [x, y], "residual")
    b.nodes[-1].output[0] = "out"
    shape = ["batch", 16] if rank == 2 else ["batch", 5, 16]
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                   [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)])


def _ptq(model, **options) -> onnx.ModelProto:
    return quantize_with_report(model, graphs.samples(model, 64, 0), qwt=False, progress=False, **options)[0]


def _scaled_conv() -> onnx.ModelProto:
    """``out = x + gamma ⊙ conv(x)``, gamma [C, 1, 1] (ConvNeXt's layer scale)."""
    b = graphs.GraphBuilder(4)
    y = b.op("Conv", ["x", b.weight("w", (8, 8, 3, 3)), b.const("bias", np.zeros(8, np.float32))], "conv", pads=[1, 1, 1, 1])
    y = b.op("Mul", [y, b.const("gamma", np.linspace(0.5, 1.5, 8).reshape(8, 1, 1).astype(np.float32))], "layer_scale")
    b.op("Add", ["x", y], "residual")
    b.nodes[-1].output[0] = "out"
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 6, 6])],
                   [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 8, 6, 6])])


def _normalized_residual(op: str, axis: int = -1) -> onnx.ModelProto:
    """``out = norm(x + conv(x))``: a post-norm block ending in a LayerNormalization over the
    channels of an NHWC map (or over ``axis`` on), or in an InstanceNormalization of an NCHW one."""
    b = graphs.GraphBuilder(5)
    channels_last = op == "LayerNormalization"
    x = b.op("Transpose", ["x"], "to_nchw", perm=[0, 3, 1, 2]) if channels_last else "x"
    y = b.op("Conv", [x, b.weight("w", (8, 8, 3, 3)), b.const("bias", np.zeros(8, np.float32))], "conv", pads=[1, 1, 1, 1])
    if channels_last:
        y = b.op("Transpose", [y], "to_nhwc", perm=[0, 2, 3, 1])
    y = b.op("Add", ["x", y], "residual")
    shape = (8,) if axis == -1 else (6, 8)
    gamma = np.linspace(0.5, 1.5, np.prod(shape)).reshape(shape).astype(np.float32)
    b.op(op, [y, b.const("gamma", gamma), b.const("beta", np.full(shape, 0.1, np.float32))], "norm", **({"axis": axis} if channels_last else {}))
    b.nodes[-1].output[0] = "out"
    shape = ["batch", 6, 6, 8] if channels_last else ["batch", 8, 6, 6]
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                   [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)])


CASES = {
    "conv, float bias (ort)": (lambda: _ptq(graphs.resnet()), "/layer2/relu_out"),
    "conv, float bias (trt)": (lambda: _ptq(graphs.resnet(), target="trt"), "/layer2/relu_out"),
    "gemm, int32 bias": (lambda: _ptq(_residual_dense("Gemm", True, 2)), "out"),
    "gemm, transposed, no bias": (lambda: _ptq(_residual_dense("Gemm", False, 2, trans_b=1)), "out"),
    "matmul, bias add": (lambda: _ptq(_residual_dense("MatMul", True, 3)), "out"),
    "matmul, no bias": (lambda: _ptq(_residual_dense("MatMul", False, 3)), "out"),
    "matmul, layer scale": (lambda: _ptq(_residual_dense("MatMul", True, 3, layer_scale=True)), "out"),
    "conv, layer scale": (lambda: _ptq(_scaled_conv()), "out"),
    "transformer mlp": (lambda: _ptq(graphs.transformer(layers=1)), "/encoder/layer.0/Add_1_out"),
    "post-LN transformer, layer norm": (lambda: _ptq(graphs.bert(layers=1)), "features"),
    "layer norm over NHWC channels": (lambda: _ptq(_normalized_residual("LayerNormalization")), "out"),
    "instance norm": (lambda: _ptq(_normalized_residual("InstanceNormalization")), "out"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_fold_computes_the_fitted_affine_and_adds_no_op_but_a_missing_bias_and_keeps_the_fusions(case):
    build, block_output = CASES[case]
    proto = build()
    model = ir.serde.deserialize_model(proto)
    site = af.fold_site(g.values_by_name(model.graph)[block_output])
    assert isinstance(site, af.FoldSite), site
    rng = np.random.default_rng(2)
    scale = rng.uniform(0.8, 1.2, site.channels).astype(np.float32)
    shift = rng.uniform(-0.3, 0.3, site.channels).astype(np.float32)
    af.FoldAffinePass([af.ChannelAffine(site, scale, shift)])(model)
    folded = ir.serde.serialize_model(model)
    onnx.checker.check_model(folded)

    def site_output(m):
        m = onnx.ModelProto.FromString(m.SerializeToString())
        m.graph.output.append(helper.make_tensor_value_info(site.output, TensorProto.FLOAT, None))
        feeds = graphs.samples(m, 4, 1)
        return session(m).run([site.output], feeds)[0]

    z, z_folded = site_output(proto), site_output(folded)
    shape = [1] * z.ndim
    shape[site.axis] = -1
    expected = z * scale.reshape(shape) + shift.reshape(shape)
    np.testing.assert_allclose(z_folded, expected, rtol=1e-4, atol=1e-3 * np.abs(z).max())
    before = collections.Counter(n.op_type for n in proto.graph.node)
    after = collections.Counter(n.op_type for n in folded.graph.node)
    added = after - before
    # a MatMul's bias is an Add; a quantized Gemm's is int32 behind a DequantizeLinear, as QGemm needs
    missing = {"matmul, no bias": "Add", "gemm, transposed, no bias": "DequantizeLinear"}
    assert added == (collections.Counter([missing[case]]) if case in missing else collections.Counter())
    assert not (before - after)
    unfused = [{(f.op_type, f.node) for f in check.check(m).of("unfused")} for m in (proto, folded)]
    assert unfused[1] <= unfused[0]


def test_a_fold_at_a_matmuls_own_output_adds_its_shift_to_the_bias_after_it_unscaled():
    # fitted on z = h @ W, before the bias c that the Add after it adds: a ⊙ z + b + c, not a ⊙ (z + c) + b
    proto = _ptq(_residual_dense("MatMul", True, 3))
    model = ir.serde.deserialize_model(proto)
    site = af.fold_site(g.values_by_name(model.graph)["fc2_out"])
    assert isinstance(site, af.FoldSite) and site.output == "fc2_out" and not site.bias_inside
    scale, shift = np.linspace(0.5, 1.5, 16).astype(np.float32), np.linspace(-0.3, 0.3, 16).astype(np.float32)
    af.FoldAffinePass([af.ChannelAffine(site, scale, shift)])(model)

    def run(m):
        m = onnx.ModelProto.FromString(m.SerializeToString())
        m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("fc2_out", "fc2_bias_out"))
        return session(m).run(["fc2_out", "fc2_bias_out"], graphs.samples(m, 4, 1))

    (z, biased), (_, folded) = run(proto), run(ir.serde.serialize_model(model))
    np.testing.assert_allclose(folded, biased + (scale - 1) * z + shift, rtol=1e-4, atol=1e-4 * np.abs(biased).max())
    assert af.fold_site(g.values_by_name(ir.serde.deserialize_model(proto).graph)["fc2_bias_out"]).bias_inside


def test_a_per_tensor_weight_scale_from_onnxruntime_becomes_per_channel(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    fp = _residual_dense("MatMul", True, 3)
    path = tmp_path / "fp.onnx"
    onnx.save(fp, path)
    feeds = graphs.samples(fp, 16, 0)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": feeds["x"][i : i + 1]} for i in range(16)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(path), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=False)
    model = ir.load(tmp_path / "q.onnx")
    site = af.fold_site(g.values_by_name(model.graph)["out"])
    assert isinstance(site, af.FoldSite), site
    af.FoldAffinePass([af.ChannelAffine(site, np.linspace(0.9, 1.1, 16), np.zeros(16))])(model)
    fc2 = next(n for n in model.graph if n.name == site.node)
    assert fc2.inputs[1].producer().inputs[1].const_value.shape == (16,)


def _gated_residual() -> onnx.ModelProto:
    b = graphs.GraphBuilder(6)
    b.op("Sigmoid", [b.op("Add", ["x", b.op("MatMul", ["x", b.weight("w", (16, 16))], "fc")], "residual")], "gate")
    b.nodes[-1].output[0] = "out"
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                   [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 16])])


def _hard_swish_residual() -> onnx.ModelProto:
    b = graphs.GraphBuilder(6)
    total = b.op("Add", ["x", b.op("MatMul", ["x", b.weight("w", (16, 16))], "fc")], "residual")
    b.op("Mul", [total, b.op("HardSigmoid", [total], "gate", alpha=1 / 6)], "hard_swish")
    b.nodes[-1].output[0] = "out"
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                   [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 16])])


@pytest.mark.parametrize("build, why", [
    (lambda: _normalized_residual("LayerNormalization", axis=2), "normalizes over several axes"),
    (lambda: _gated_residual(), "the block ends in Sigmoid"),
    (lambda: _hard_swish_residual(), "the block ends in a SiLU, hard-swish or channel gate"),
])
def test_blocks_that_do_not_end_in_a_per_channel_scale_say_why(build, why):
    model = ir.serde.deserialize_model(_ptq(build()))
    reason = af.fold_site(model.graph.outputs[0])
    assert isinstance(reason, str) and why in reason, reason


def test_a_block_that_ends_in_a_float_weighted_op_says_so():
    # a float stem's conv (a recurrent seizure detector's first conv, kept float for its gain)
    b = graphs.GraphBuilder(6)
    b.op("MatMul", ["x", b.weight("w", (16, 16))], "fc")
    b.nodes[-1].output[0] = "out"
    model = ir.serde.deserialize_model(b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                                               [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 16])]))
    reason = af.fold_site(g.values_by_name(model.graph)["out"])
    assert reason == ("not folded: the block ends in MatMul fc, whose weight has no DequantizeLinear of its own "
                      "(left float, or shared)")


@pytest.mark.parametrize("fold_gain, branch_gain, replaces", [
    (0.50, 0.52, True),  # nearly as much as the branch, and free
    (0.50, 0.54, False),  # the branch removes more than a twentieth more
    (0.08, 0.0, False),  # a gain under --min-gain at the block did not carry to the outputs
    (0.12, 0.0, True),  # no branch pays, the fold does
])
def test_a_fold_replaces_the_branch_where_it_removes_nearly_as_much_and_at_least_min_gain(fold_gain, branch_gain, replaces):
    assert fold_suffices(fold_gain, branch_gain, min_gain=0.1, tolerance=0.05) is replaces


@pytest.mark.slow
def test_auto_compensation_writes_a_fold_where_it_suffices_and_a_branch_elsewhere(monkeypatch):
    from qwt_onnx.analysis import capture

    model = graphs.resnet(size=16)
    calib = graphs.samples(model, 320, 0)
    # the streams QwT's model keeps; each block's own error, whose folds and branches are measured here
    options = dict(progress=False, residuals="float", fit_error="own", **graphs.SYSTEMATIC_ERROR)
    ptq, _ = quantize_with_report(model, calib, qwt=False, **options)
    # the folds of this model remove about 10%, 19% and 27% of their blocks' errors, the
    # branches a little more: a looser rule folds the last two and keeps the first branch
    monkeypatch.setattr(capture, "fold_suffices", lambda fold_gain, *_: fold_gain >= 0.15)
    # each block's choice alone: auto's layer folds, fitted first, leave these blocks little to compensate
    monkeypatch.setattr("qwt_onnx.api.fold_layers", lambda run, model, *_, **__: LayerFolds(None, 0, 0, 0))
    written, report = quantize_with_report(model, calib, compensation="auto", **graphs.ANY_RUN_TIME, **options)
    assert report.qwt_applied and report.sqnr_qwt_db > report.sqnr_ptq_db, report.warnings
    kept = {b.name: b for b in report.blocks if b.kept}
    assert [name for name, b in kept.items() if b.fold_site] == ["/layer2", "/layer3"]
    assert kept["/layer1"].fold_site is None and kept["/layer1"].parameters > 0
    assert "the fold would remove about 10%" in kept["/layer1"].note
    assert all("a branch would remove" in kept[name].note for name in ("/layer2", "/layer3"))
    added = collections.Counter(n.op_type for n in written.graph.node) - collections.Counter(n.op_type for n in ptq.graph.node)
    branch_nodes = [n for n in written.graph.node if n.name.startswith("qwt/")]
    assert added == collections.Counter(n.op_type for n in branch_nodes) and added["Conv"] == 1

"""Low-bit precisions: int4 / 6-bit weights, 4 / 6 / 16-bit activations, in standard QDQ."""

import collections

import numpy as np
import onnx
import pytest

from qwt_onnx.api import quantize_with_report
from qwt_onnx.errors import InputError
from qwt_onnx.numerics import quantization as qm
from qwt_onnx.numerics.ranges import RangeObserver, mse_range
from qwt_onnx.options import Options
from qwt_onnx.runtime import session
from tests import graphs


def test_four_bit_weights_clip_each_channel_where_rounding_errs_least():
    rng = np.random.default_rng(0)
    weight = rng.laplace(size=(8, 256)).astype(np.float32)  # heavy tails: the largest would spend the 15 levels
    searched = qm.symmetric_weight_params(weight, axis=0, bits=4)
    plain = qm.QuantParams(np.abs(weight).max(axis=1) / 7, np.zeros(8, np.int8), 4)
    error = [np.square(weight - qm.fake_quantize(weight, p, axis=0)).sum() for p in (searched, plain)]
    assert error[0] < 0.8 * error[1]
    assert np.abs(qm.quantize(weight, searched, axis=0)).max() <= 7


def test_the_clipping_spares_weights_that_multiply_strong_inputs():
    rng = np.random.default_rng(2)
    weight = rng.laplace(size=(4, 128)).astype(np.float32)
    weight[:, 0] = 8.0  # the largest weight of each channel multiplies the strongest input
    power = np.ones(128, np.float32)
    power[0] = 1000.0
    plain = qm.symmetric_weight_params(weight.T.copy(), axis=1, bits=4)  # a MatMul's [K, N] weight
    weighted = qm.symmetric_weight_params(weight.T.copy(), axis=1, bits=4, importance=qm.input_importance((128, 4), 1, power))
    assert np.all(weighted.scale > plain.scale)  # clipped less: the strong input's weight keeps its value
    for params in (plain, weighted):
        assert qm.fake_quantize(weight.T, params, axis=1).shape == (128, 4)
    err = [np.square((weight.T - qm.fake_quantize(weight.T, p, axis=1))[0]).sum() for p in (plain, weighted)]
    assert err[1] < err[0]


def test_channel_moments_stream_the_mean_and_the_mean_square():
    from qwt_onnx.observe import ChannelMoments

    x = np.random.default_rng(3).standard_normal((10, 3, 4, 4)).astype(np.float32) + np.array([0, 1, 2], np.float32)[:, None, None]
    moments = ChannelMoments(axis=1)
    for part in np.split(x, 5):
        moments.update(part)
    np.testing.assert_allclose(moments.mean, x.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(moments.power, np.square(x).mean(axis=(0, 2, 3)), rtol=1e-5)


def test_input_importance_follows_each_weights_input_channel():
    power = np.arange(8, dtype=np.float32)
    conv = qm.input_importance((4, 4, 3, 3), 0, power, group=2)  # outputs 0-1 read inputs 0-3, 2-3 read 4-7
    assert conv.shape == (4, 4, 1, 1) and conv[0, :, 0, 0].tolist() == [0, 1, 2, 3] and conv[3, :, 0, 0].tolist() == [4, 5, 6, 7]
    assert qm.input_importance((8, 5), 1, power).shape == (8, 1)  # [K, N]
    assert qm.input_importance((5, 8), 0, power).shape == (1, 8)  # [N, K], a Gemm with transB


@pytest.mark.parametrize("bits, symmetric, limits", [(4, False, (0, 15)), (6, False, (0, 63)), (16, False, (0, 65535)),
                                                     (4, True, (-8, 7)), (16, True, (-32768, 32767))])
def test_activation_quantizers_saturate_at_their_own_width(bits, symmetric, limits):
    params = qm.activation_params(-1.0, 3.0, symmetric, bits)
    assert params.limits == limits
    q = qm.quantize(np.array([-100.0, 100.0], np.float32), params)
    assert (q.min(), q.max()) == limits if not symmetric else q.max() == limits[1]


def test_mse_clips_harder_at_four_bits_than_at_eight():
    observer = RangeObserver()
    observer.update(np.random.default_rng(1).standard_normal(200_000).astype(np.float32))
    assert mse_range(observer, bits=4)[1] < 0.8 * mse_range(observer, bits=8)[1]


def _ptq(model, **options):
    return quantize_with_report(model, graphs.samples(model, 64, 0), qwt=False, progress=False, **options)[0]


def _initializer_types(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer)


def test_held_out_samples_decide_per_method_whether_clipping_weighs_by_input_powers():
    from qwt_onnx.report import format_summary

    model = graphs.resnet()
    _, report = quantize_with_report(model, graphs.samples(model, 64, 0), qwt=False, weight_bits=4, progress=False)
    assert set(report.weighted_clipping_gain_db) == set(report.method_sqnr_db) == {"minmax", "percentile", "mse"}
    assert "weighed by input powers" in format_summary(report, "model.onnx")
    _, eight = quantize_with_report(model, graphs.samples(model, 64, 0), qwt=False, progress=False)
    assert eight.weighted_clipping_gain_db == {}  # 8-bit weights are not clipped


def test_the_clipping_held_out_samples_chose_is_the_one_bias_correction_and_rounding_are_tried_on(monkeypatch):
    # clipping weighed by the wrong inputs' power: every method's held-out samples prefer plain
    # clipping, and the choices made after it (bias correction, GPTQ) must build on it, and say so
    importance = qm.input_importance
    monkeypatch.setattr(qm, "input_importance", lambda *args: 1.0 / (importance(*args) + 1e-12))
    model = graphs.resnet()
    _, report = quantize_with_report(model, graphs.samples(model, 64, 0), qwt=False, weight_bits=4, progress=False)
    assert max(report.weighted_clipping_gain_db.values()) < 0
    assert report.weighted_clipping == {m: False for m in report.method_sqnr_db}
    # bias correction was tried both ways on the best method only: the others have no gain to show
    assert set(report.bias_correction_gain_db) == {report.ptq_method}


def test_int4_weights_are_stored_as_int4_at_opset_21_and_run():
    model = graphs.resnet()
    written = _ptq(model, weight_bits=4, float_stem=0)  # every weight quantized, the stem's too
    onnx.checker.check_model(written, full_check=True)
    assert next(o.version for o in written.opset_import if o.domain in ("", "ai.onnx")) == 21
    assert _initializer_types(written)["INT4"] == 2 * 9  # the int4 weights and their zero points: 8 Convs and the Gemm
    assert "INT8" not in _initializer_types(written)
    outputs = session(written).run(None, graphs.samples(model, 2, 1))
    assert np.isfinite(outputs[0]).all()


@pytest.mark.parametrize("bits, low, high", [(4, 0, 15), (6, 0, 63)])
def test_narrow_activations_are_clipped_between_quantize_and_dequantize(bits, low, high):
    written = _ptq(graphs.resnet(), activation_bits=bits)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in written.graph.initializer}
    clips = [n for n in written.graph.node if n.op_type == "Clip"]
    quantizers = [n for n in written.graph.node if n.op_type == "QuantizeLinear"]
    assert len(clips) == len(quantizers) > 0
    assert all((inits[c.input[1]], inits[c.input[2]]) == (low, high) for c in clips)
    session(written)  # onnxruntime's optimisations accept it (uint4 activations they do not)


def test_a_conv_bias_that_would_overflow_int32_at_16_bits_runs_as_written():
    import onnxruntime as ort

    b = graphs.GraphBuilder(5)
    y = b.op("Conv", ["x", b.weight("w", (4, 3, 3, 3), scale=1e-3), b.const("bias", np.full(4, 50.0, np.float32))], "conv", pads=[1] * 4)
    b.op("Relu", [y], "relu")
    b.nodes[-1].output[0] = "out"
    model = b.model([onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3, 8, 8])],
                    [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["batch", 4, 8, 8])])
    written = _ptq(model, activation_bits=16)
    feeds = graphs.samples(model, 2, 1)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unoptimized = ort.InferenceSession(written.SerializeToString(), plain, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    optimized = session(written).run(None, feeds)[0]  # onnxruntime's own bias quantization would wrap around
    np.testing.assert_allclose(optimized, unoptimized, rtol=1e-4, atol=1e-3)


def test_sixteen_bit_activations_are_uint16():
    written = _ptq(graphs.transformer(layers=1), activation_bits=16)
    zero_points = [t for t in written.graph.initializer if t.name.endswith("_zero_point") and not t.dims]
    assert zero_points and all(t.data_type == onnx.TensorProto.UINT16 for t in zero_points)
    session(written)


@pytest.mark.slow
@pytest.mark.parametrize("weight_bits, activation_bits", [(4, 8), (4, 4)])
def test_qwt_recovers_what_low_bit_ptq_loses(weight_bits, activation_bits):
    model = graphs.resnet()
    calib = graphs.samples(model, 256, 1)
    _, report = quantize_with_report(model, calib, weight_bits=weight_bits, activation_bits=activation_bits, progress=False,
                                     **graphs.SYSTEMATIC_ERROR)
    assert report.compensated and report.sqnr_written_db > report.sqnr_ptq_db + 2.0


def test_blocked_int4_matmul_weights_run_as_matmulnbits(tmp_path):
    model = graphs.transformer(layers=1)
    # equalization off: a scale per block is compared with one per channel, and nothing else
    written, report = quantize_with_report(model, graphs.samples(model, 64, 0), qwt=False, weight_bits=4, block_size=16,
                                           equalization="off", progress=False)
    blocked = [n for n in written.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute)]
    assert len(blocked) == 6  # the layer's q, k, v, output, fc1 and fc2 weights
    session(written, optimized_model=str(tmp_path / "optimized.onnx"))
    kernels = collections.Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)
    assert kernels["MatMulNBits"] == 6
    unblocked = quantize_with_report(model, graphs.samples(model, 64, 0), qwt=False, weight_bits=4, equalization="off",
                                     progress=False)[1]
    assert report.sqnr_ptq_db > unblocked.sqnr_ptq_db  # a scale per 16 weights fits them closer than one per channel


@pytest.mark.parametrize("changes, message", [
    ({"weight_bits": 3}, "--weight-bits must be one of 8, 6, 4"),
    ({"activation_bits": 12}, "--activation-bits must be one of"),
    ({"activation_bits": 16, "target": "trt"}, "has no TensorRT form"),
    ({"weight_bits": 4, "block_size": 24}, "a power of 2 from 16"),
    ({"block_size": 32}, "needs --weight-bits 4"),
])
def test_unsupported_precisions_are_refused_with_the_choices(changes, message):
    with pytest.raises(InputError, match=message):
        Options(**changes)

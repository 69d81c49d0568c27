"""python -m qwt_onnx check: saturation and unfused Q/DQ in any quantized model."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from qwt_onnx import check, quantize
from tests import graphs


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qwt_onnx", "check", *map(str, args)], capture_output=True, text=True)


class _Reader(CalibrationDataReader):
    def __init__(self, feeds):
        self.batches = iter([{k: v[i : i + 8] for k, v in feeds.items()} for i in range(0, len(next(iter(feeds.values()))), 8)])

    def get_next(self):
        return next(self.batches, None)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Quantized models of a small MobileNet (depthwise convolutions) and transformer, by qwt_onnx
    and by onnxruntime's quantize_static, with and without its reduce_range."""
    folder = tmp_path_factory.mktemp("check")
    paths = {}
    for name, build in (("mobilenet", graphs.mobilenet), ("transformer", graphs.transformer)):
        model = build()
        calib = graphs.samples(model, 32, seed=1)
        onnx.save(model, folder / f"{name}-fp32.onnx")
        for weight_range in ("portable", "full"):
            paths[f"{name}-{weight_range}"] = folder / f"{name}-{weight_range}.onnx"
            quantize(model, calib, paths[f"{name}-{weight_range}"], qwt=False, weight_range=weight_range, progress=False)
        for reduce_range in (False, True):
            key = f"{name}-ort" + ("-reduce-range" if reduce_range else "")
            paths[key] = folder / f"{key}.onnx"
            quantize_static(str(folder / f"{name}-fp32.onnx"), str(paths[key]), _Reader(calib), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet", "transformer"])
def test_full_range_int8_weights_saturate_and_pair_safe_or_reduced_ones_do_not(models, name):
    full = check.check(models[f"{name}-full"])
    assert full.integer_kernels and full.of("saturation")
    assert all("can overflow int16" in f.detail for f in full.of("saturation"))
    assert check.check(models[f"{name}-ort"]).of("saturation")  # quantize_static's default: full range
    for safe in (f"{name}-portable", f"{name}-ort-reduce-range"):
        report = check.check(models[safe])
        assert report.integer_kernels and not report.of("saturation"), safe


def test_depthwise_convolutions_are_never_flagged(models):
    report = check.check(models["mobilenet-full"])
    flagged = {f.node for f in report.of("saturation")}
    assert flagged and not any("/dw" in name for name in flagged)
    assert report.integer_kernels["QLinearConv"] > len(flagged)  # the depthwise ones run but pair nothing


def _qdq_model(nodes, inits, output_shape, name="m"):
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_float_ops_between_quantizers_and_dequantized_weights_are_unfused(tmp_path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z"),
             numpy_helper.from_array(rng.integers(-127, 128, (4, 8)).astype(np.int8), "w"),
             numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"), numpy_helper.from_array(np.zeros(4, np.int8), "wz")]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("Sin", ["xd"], ["h"], name="sine"),  # no integer kernel for it
        helper.make_node("QuantizeLinear", ["h", "s", "z"], ["hq"]),
        helper.make_node("DequantizeLinear", ["hq", "s", "z"], ["hd"]),
        helper.make_node("Sigmoid", ["hd"], ["g"], name="sigmoid"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Gemm", ["g", "wd"], ["y"], name="dense", transB=1),  # float input: stays float
    ]
    path = tmp_path / "unfused.onnx"
    onnx.save(_qdq_model(nodes, inits, ["n", 4]), path)
    found = {f.node: f.detail for f in check.check(path).of("unfused")}
    assert "between DequantizeLinear and QuantizeLinear" in found["sine"]
    assert "dequantized on every run" in found["dense"]
    assert "sigmoid" not in found  # float by design: nothing quantizes its output


def test_convolutions_whose_output_is_not_quantized_are_said_to_be_why(tmp_path):
    model = graphs.resnet()  # TensorRT's placement: a Conv's output is left to its fusions, QLinearConv needs it quantized
    path = tmp_path / "trt.onnx"
    quantize(model, graphs.samples(model, 16, seed=1), path, qwt=False, target="trt", progress=False)
    convs = [f for f in check.check(path).of("unfused") if f.op_type == "Conv"]
    assert convs and all("no QuantizeLinear reads its output, which onnxruntime's QLinearConv needs" in f.detail for f in convs)
    ort = tmp_path / "ort.onnx"
    quantize(model, graphs.samples(model, 16, seed=1), ort, qwt=False, progress=False)
    assert not [f for f in check.check(ort).of("unfused") if f.op_type == "Conv"]


def test_models_already_in_qoperator_form_are_checked(tmp_path):
    rng = np.random.default_rng(1)
    weight = rng.integers(-127, 128, (16, 8, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(v, dtype), n) for n, v, dtype in
             [("xs", 0.05, np.float32), ("xz", 128, np.uint8), ("ys", 0.1, np.float32), ("yz", 128, np.uint8)]]
    inits += [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.full(16, 0.01, np.float32), "ws"),
              numpy_helper.from_array(np.zeros(16, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["yq"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "qop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16, 6, 6])], inits)
    path = tmp_path / "qop.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    report = check.check(path)
    assert report.integer_kernels == {"QLinearConv": 1} and len(report.of("saturation")) == 1


@pytest.mark.slow
def test_the_command_line_gates_on_findings(models, tmp_path):
    risky = _cli(models["transformer-full"], "--json", tmp_path / "findings.json")
    assert risky.returncode == check.EXIT_RISKS
    assert "saturation:" in risky.stdout and "can overflow int16" in risky.stdout and "--weight-range portable" in risky.stdout
    listed = json.loads((tmp_path / "findings.json").read_text())
    assert len(listed["findings"]) == len(check.check(models["transformer-full"]).findings)
    clean = _cli(models["transformer-portable"], "-q")
    assert clean.returncode == 0 and clean.stdout == ""
    # the mobilenet keeps requantizations in float (a speed risk), but nothing saturates
    assert _cli(models["mobilenet-portable"], "--fail-on", "saturation", "-q").returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("content, message", [(None, "does not exist"), (b"not a model", "not a valid ONNX model"),
                                              (graphs.zipmap_classifier().SerializeToString(), "is a map or a sequence of maps")])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, content, message):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    result = _cli(path)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1

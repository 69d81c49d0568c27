"""tools/speed.py: the INT8 MAC share the benchmark reports comes from onnxruntime's profiler."""

import importlib.util
import os

import numpy as np
import onnx
import pytest

from qwt_onnx import quantize
from tests import graphs

_SPEC = importlib.util.spec_from_file_location(
    "speed", os.path.join(os.path.dirname(__file__), os.pardir, "tools", "speed.py")
)
speed = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(speed)


def test_convolution_and_matmul_macs_follow_from_shapes():
    # a 3x3 conv from 4 to 8 channels on a 6x6 output: 8*6*6 outputs, 4*3*3 MACs each
    assert speed.kernel_macs("QLinearConv", [[1, 6, 6, 4]], [[1, 6, 6, 8]], [8, 4, 3, 3]) == 8 * 36 * 36
    assert speed.kernel_macs("MatMulIntegerToFloat", [[2, 5, 16]], [[2, 5, 32]], None) == 2 * 5 * 32 * 16
    # a stride-2 2x2 transposed conv scatters each input pixel through C_out * 2 * 2 weights
    assert speed.kernel_macs("ConvTranspose", [[1, 4, 3, 3]], [[1, 2, 6, 6]], [4, 2, 2, 2]) == 36 * 8
    # an LSTM of 8 units on 5 inputs, 7 steps of 2 samples: 4 gates x 8 units x (5 + 8) per step
    assert speed.kernel_macs("LSTM", [[7, 2, 5]], [[7, 1, 2, 8]], [1, 32, 5]) == 7 * 2 * 32 * 13


@pytest.mark.parametrize("quantized, share", [(False, 0.0), (True, 1.0)])
def test_int8_share_of_a_model_is_read_from_its_profile(quantized, share, tmp_path):
    model = graphs.resnet()
    path = tmp_path / "model.onnx"
    feeds = graphs.samples(model, 4, seed=1)
    if quantized:
        quantize(model, feeds, path, qwt=False, progress=False)
    else:
        path.write_bytes(model.SerializeToString())
    kernels = speed.profile(str(path), feeds, batch=1, runs=1)
    # eight convolutions and a Gemm: all of them in integer kernels once quantized
    assert sum(k["macs"] for k in kernels) > 0
    assert speed.int8_share(kernels) == pytest.approx(share, abs=0.01)


def test_float_convolutions_count_the_models_channels_not_the_layouts_padding(tmp_path):
    # a 1-channel strided filter, as a spectrogram front end downsamples audio: onnxruntime runs it in
    # its NCHWc layout, 8 or 16 channels wide
    weight = onnx.numpy_helper.from_array(np.ones((1, 1, 1, 256), np.float32) / 256, "w")
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="filter", strides=[1, 16])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 1, 4096])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 1, 241])], [weight])
    path = tmp_path / "filter.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    kernels = speed.profile(str(path), {"x": np.random.default_rng(0).standard_normal((1, 1, 1, 4096), np.float32)}, runs=1)
    assert sum(k["macs"] for k in kernels) == 241 * 256

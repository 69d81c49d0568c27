"""Graphs exactly as PyTorch's two ONNX exporters write them (fixtures from models/export_fixtures.py)."""

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qwt_onnx import quantize_with_report
from qwt_onnx.analysis import blocks
from qwt_onnx.graph import prepare
from qwt_onnx.runtime import session

DATA = os.path.join(os.path.dirname(__file__), "data")
FIXTURES = {
    # the last block takes the final LayerNorm with it, whatever the exporter names its dims
    "tiny_vit_torchscript": ["/Add_output_0", "/blocks.0/Add_1_output_0", "/blocks.1/Add_1_output_0", "output"],
    "tiny_vit_dynamo": ["add_17", "add_95", "add_173", "output"],
    "tiny_resnet_torchscript": [
        "image",  # the stem is a chain block
        "/stem/stem.2/Relu_output_0",
        "/layers/layers.0/Relu_1_output_0",
        "/layers/layers.1/Relu_1_output_0",
        "/layers/layers.2/Relu_1_output_0",
    ],
    "tiny_resnet_dynamo": ["image", "relu", "relu_2", "relu_4", "relu_6"],
}


def _images(count, seed):
    return {"image": np.random.default_rng(seed).standard_normal((count, 3, 16, 16)).astype(np.float32)}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_blocks_of_exported_graphs(name):
    model = prepare.prepare(ir.load(os.path.join(DATA, f"{name}.onnx")))
    found = blocks.find_blocks(model)
    chain = [found[0].input] + [b.output for b in found]
    assert chain == FIXTURES[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_exported_graphs_quantize_end_to_end(name):
    path = os.path.join(DATA, f"{name}.onnx")
    # random weights: GPTQ rounding would leave QwT little to fit (see graphs.SYSTEMATIC_ERROR)
    quantized, report = quantize_with_report(path, _images(96, seed=1), calib_method="entropy", rounding="nearest",
                                             compensation="branch", progress=False)
    onnx.checker.check_model(quantized)
    assert report.qwt_applied
    test = _images(5, seed=2)
    reference = session(onnx.load(path)).run(None, test)[0]
    output = session(quantized).run(None, test)[0]
    assert output.shape == reference.shape
    assert np.mean((output - reference) ** 2) < 0.1 * np.mean(reference**2)

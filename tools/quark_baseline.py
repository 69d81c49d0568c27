"""AMD Quark's ONNX quantizer on a model, one of its recipes: the strongest ONNX baseline measured here.

    QUARK=/path/to/venv/bin/python
    $QUARK tools/quark_baseline.py in.onnx out.onnx --calib calib.npz --recipe adaround

Quark (`pip install amd-quark torch`) pins onnx<=1.22 and needs torch, so it runs in a venv of
its own; it reads the calibration data and converts old opsets as tools/ort_baseline.py does
(which needs no more of qwt_onnx than numpy, onnx and onnxruntime). Every recipe writes what
qwt_onnx's ``ort`` target writes: uint8 asymmetric per-tensor activations, int8 symmetric per-channel weights,
QDQ; they differ in how ranges and weights are chosen:

- ``percentile``: Quark's default activation calibration (per tensor, 99.999th percentile);
- ``layerwise-percentile``: the percentile chosen per layer for the least output error;
- ``adaround``: layer-wise percentile, then each layer's weight rounding learned (AdaRound,
  ``--iterations`` steps on ``--adaround-samples`` samples);
- ``smoothquant``: min-max with SmoothQuant (alpha 0.5) on the weighted ops.

Not Quark's GPTQConfig: it writes a weight-only model (no activation quantizers; MTCNN's ONet
came out with 8 DequantizeLinear nodes and no QuantizeLinear), another task than W8A8.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import onnx
from quark.onnx import ModelQuantizer
from quark.onnx.quantization.config.algorithm import AdaRoundConfig, SmoothQuantConfig
from quark.onnx.quantization.config.config import QConfig
from quark.onnx.quantization.config.spec import CalibMethod, Int8Spec, QLayerConfig, QuantGranularity, UInt8Spec

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ort_baseline import at_least_opset_13, calibration_reader  # noqa: E402  (as quantize_static gets them)

RECIPES = ("percentile", "layerwise-percentile", "adaround", "smoothquant")


def config(recipe: str, args: argparse.Namespace) -> QConfig:
    method = {"percentile": CalibMethod.Percentile, "smoothquant": CalibMethod.MinMax}.get(recipe, CalibMethod.LayerwisePercentile)
    activation = UInt8Spec(calibration_method=method)
    weight = Int8Spec(calibration_method=CalibMethod.MinMax, quant_granularity=QuantGranularity.Channel)
    algorithms = {
        "adaround": [AdaRoundConfig(batch_size=args.batch_size, num_batches=max(args.adaround_samples // args.batch_size, 1),
                                    num_iterations=args.iterations, learning_rate=0.1)],
        "smoothquant": [SmoothQuantConfig(alpha=0.5)],
    }.get(recipe, [])
    return QConfig(global_config=QLayerConfig(activation=activation, weight=weight), algo_config=algorithms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--recipe", choices=RECIPES, default="layerwise-percentile")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--adaround-samples", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args()
    output = os.path.abspath(args.output)
    model = at_least_opset_13(args.model, output)  # Quark's per-channel QDQ needs opset 13 too
    reader = calibration_reader(model, args.calib, args.samples, args.batch_size)
    os.chdir(os.path.dirname(output))  # Quark writes a quantized_info.csv into the working directory
    started = time.perf_counter()
    ModelQuantizer(config(args.recipe, args)).quantize_model(onnx.load(model), output, reader)
    print(f"quark {args.recipe}: {time.perf_counter() - started:.1f} s -> {output}")


if __name__ == "__main__":
    main()

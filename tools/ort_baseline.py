"""onnxruntime's own static quantizer, as its users run it: the benchmark's baseline.

    python tools/ort_baseline.py in.onnx out.onnx --calib calib.npz --method minmax

QDQ format, per-channel int8 weights, uint8 activations (onnxruntime's CPU
defaults; ``--weight-bits 4`` and ``--activation-bits 16`` or ``4`` for the
low-bit precisions it writes), every quantizable op. Calibration data is fed in batches (one
sample at a time to a model that does not batch samples, as its users feed it) and, with
onnxruntime's own ``CalibStridedMinMax`` option, collected one batch at a
time: without it the histogram calibrators (percentile, entropy) hold every
intermediate tensor of every sample at once and run out of memory on a ViT
with 512 samples. Models older than opset 13 are converted first.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnx.version_converter
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from qwt_onnx.runtime import Runner, batching_fault, count_samples, samples_axes, take

METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
BATCHES_PER_CHUNK = 1
WEIGHT_TYPES = {8: QuantType.QInt8, 4: QuantType.QInt4}
ACTIVATION_TYPES = {8: QuantType.QUInt8, 16: QuantType.QUInt16, 4: QuantType.QUInt4}


class NpzReader(CalibrationDataReader):
    """Batches of the first ``samples`` calibration samples; supports onnxruntime's strided collection."""

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, axes: dict[str, int | None]):
        starts = range(0, count_samples(arrays, axes), batch_size)
        self.batches = [take(arrays, axes, slice(i, i + batch_size)) for i in starts]
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.iterator = iter(self.batches[start_index:end_index])

    def get_next(self):
        return next(self.iterator, None)


def quantize(model: str, output: str, calib: str, method: str, samples: int = 512, batch_size: int = 16,
             weight_bits: int = 8, activation_bits: int = 8) -> None:
    model = at_least_opset_13(model, output)
    reader = calibration_reader(model, calib, samples, batch_size)
    stride = max(d for d in range(1, BATCHES_PER_CHUNK + 1) if len(reader) % d == 0)
    quantize_static(
        model,
        output,
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=ACTIVATION_TYPES[activation_bits],
        weight_type=WEIGHT_TYPES[weight_bits],
        calibrate_method=METHODS[method],
        extra_options={"CalibStridedMinMax": stride},
    )


def calibration_reader(model: str, calib: str, samples: int, batch_size: int) -> NpzReader:
    """The first ``samples`` of ``calib`` in batches that ``model`` runs (:func:`batch_size_for`)."""
    axes = samples_axes(model)[0]
    with np.load(calib) as data:
        arrays = take({k: data[k] for k in data.files}, axes, slice(None, samples))
    return NpzReader(arrays, batch_size_for(model, arrays, axes, batch_size), axes)


def batch_size_for(model: str, arrays: dict[str, np.ndarray], axes: dict[str, int | None], batch_size: int) -> int:
    """``batch_size``; the model's batch where it is fixed; 1 where two samples at once do not give
    the outputs of each alone (qwt_onnx.runtime.batching_fault: AECMOS's GRU state has a batch of
    one, PLCMOS squeezes its batch of one to a scalar), as a user of such a model feeds it."""
    fixed = fixed_batch(model)
    if fixed or batch_size == 1 or count_samples(arrays, axes) < 2:
        return fixed or batch_size
    runner = Runner(model, quiet=True)
    singles = [runner(take(arrays, axes, slice(i, i + 1))) for i in (0, 1)]
    return 1 if batching_fault(runner, singles, take(arrays, axes, slice(0, 2))) else batch_size


def fixed_batch(model: str) -> int | None:
    """The batch size a model's first fed input is exported with, where it is fixed (PicoDet: 1)."""
    graph = onnx.load(model, load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    fed = next(v for v in graph.input if v.name not in weights)
    dims = fed.type.tensor_type.shape.dim
    return (dims[0].dim_value or None) if dims else None


def at_least_opset_13(model: str, output: str) -> str:
    """Per-channel QDQ needs opset 13; quantize_static keeps an older opset and writes an invalid
    model, so convert first, as onnxruntime's documentation tells its users to."""
    proto = onnx.load(model)
    if next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 13:
        return model
    converted = output + ".opset13.onnx"
    onnx.save(onnx.version_converter.convert_version(proto, 13), converted)
    return converted


def main() -> None:
    parser = argparse.ArgumentParser(description="onnxruntime quantize_static, QDQ per-channel")
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--method", choices=sorted(METHODS), default="minmax")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16, help="samples per run, unless the model fixes its batch")
    parser.add_argument("--weight-bits", type=int, choices=sorted(WEIGHT_TYPES), default=8)
    parser.add_argument("--activation-bits", type=int, choices=sorted(ACTIVATION_TYPES), default=8)
    args = parser.parse_args()
    quantize(args.model, args.output, args.calib, args.method, args.samples, args.batch_size, args.weight_bits, args.activation_bits)


if __name__ == "__main__":
    main()

"""How fast one calibration sweep could be, against onnxruntime's quantize_static, per zoo model.

    python tools/sweep_floor.py                       # every zoo model, 512 samples (about 10 minutes)
    python tools/sweep_floor.py --models minilm,yolov8n --samples 256

A QwT run must at least observe every activation it quantizes on the FP32 model (in one pass
or block by block in a sweep: each observed tensor is an output of the run either way) and
run the quantized model once over the calibration samples (the capture). ``--no-qwt`` must at
least observe. This measures those passes over whole models, where onnxruntime fuses the most
and builds one session, so the figures are a lower bound on any sweep's time; next to them,
quantize_static's min-max run on the same samples in its own process, and the start of a
Python process that imports qwt_onnx (which every CLI run pays and quantize_static's time
includes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (tools/bench.py)

from qwt_onnx import observe, zoo  # noqa: E402
from qwt_onnx.analysis.placement import Exclusions, place  # noqa: E402
from qwt_onnx.calibration import CalibrationSet  # noqa: E402
from qwt_onnx.graph import prepare  # noqa: E402
from qwt_onnx.inputs import effective_batch_size, load_fp32  # noqa: E402
from qwt_onnx.numerics.ranges import compute_range  # noqa: E402
from qwt_onnx.options import Options, Target  # noqa: E402
from qwt_onnx.passes import qdq  # noqa: E402
from qwt_onnx.run import Warnings  # noqa: E402
from qwt_onnx.runtime import Runner  # noqa: E402


def timed(step) -> tuple[float, object]:
    started = time.perf_counter()
    result = step()
    return time.perf_counter() - started, result


def whole_pass(model, calib: CalibrationSet, batch_size: int) -> None:
    """Run ``model`` over every calibration sample, keeping nothing."""
    runner = Runner(prepare.to_proto(model))
    for batch in calib.batches(batch_size, description="one pass"):
        runner(batch.feeds)


def passes(name: str, samples: int) -> dict[str, float]:
    """Seconds of the whole-model passes a sweep cannot do without, in this process."""
    prepared = zoo.prepare(name)
    fp = load_fp32(prepared.model)
    calib = CalibrationSet.load(prepared.calibration, prepare.input_specs(fp), samples)
    batch_size = effective_batch_size(fp, Options().batch_size, calib, Warnings())
    placement = place(fp.graph, Target.ORT, Exclusions((), ()))
    fp32, _ = timed(lambda: whole_pass(fp, calib, batch_size))
    observed, seen = timed(lambda: observe.observe(
        prepare.to_proto(fp), placement.observed_names, calib, batch_size, placement.channel_axes()))
    ranges = {tensor: compute_range(obs, "minmax", False) for tensor, obs in seen.ranges.items()}
    ptq = fp.clone()
    qdq.InsertQdqPass(ranges, Target.ORT, Exclusions((), ()), Options().weights, seen.means)(ptq)
    quantized, _ = timed(lambda: whole_pass(ptq, calib, batch_size))
    return {"fp32": fp32, "observe": observed, "quantized": quantized}


def process_start() -> float:
    """Seconds for a Python process to start and import qwt_onnx (and with it onnxruntime)."""
    seconds, _ = timed(lambda: subprocess.run([sys.executable, "-c", "import qwt_onnx.__main__"], check=True))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(zoo.ENTRIES), help="comma-separated zoo names")
    parser.add_argument("--samples", type=int, default=512)
    args = parser.parse_args()
    start = process_start()
    print(f"process start and imports: {start:.1f} s; {args.samples} samples\n")
    print("| model | quantize_static min-max s | FP32 pass s | observation pass s | quantized pass s "
          "| `--no-qwt` floor × qs | QwT floor × qs |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            _row(name, args.samples, start, folder)


def _row(name: str, samples: int, start: float, folder: str) -> None:
    """Print one model's row: the passes, quantize_static's time, and the floors against it."""
    t = passes(name, samples)
    prepared = zoo.prepare(name)
    baseline = [sys.executable, os.path.join(bench.ROOT, "tools", "ort_baseline.py"), "--method", "minmax",
                prepared.model, os.path.join(folder, f"{name}.onnx"), "--calib", prepared.calibration,
                "--samples", str(samples)]
    qs, _ = bench.run_measured(baseline)
    no_qwt = start + t["observe"]
    qwt = no_qwt + t["quantized"]
    print(f"| {name} | {qs:.1f} | {t['fp32']:.1f} | {t['observe']:.1f} | {t['quantized']:.1f} "
          f"| {no_qwt / qs:.2f} | {qwt / qs:.2f} |", flush=True)


if __name__ == "__main__":
    main()

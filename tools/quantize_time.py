"""Quantization time and peak memory against onnxruntime's quantize_static, side by side.

    python tools/quantize_time.py                      # every zoo model, 512 samples (about 25 minutes)
    python tools/quantize_time.py --models minilm,orientation --samples 256 --out -

For each zoo model, in one run and on the same calibration samples, each in its own process
(tools/bench.py's ``run_measured``: its wall time and its own peak RSS): quantize_static with
min-max calibration (QDQ, per-channel), ``qwt_onnx --no-qwt`` and ``qwt_onnx``; then the
written models' SQNR to FP32 on the model's evaluation samples, so that a faster run can be
seen not to cost fidelity. Writes docs/QUANTIZE_TIME.md (``--out -``: prints it only). The full benchmark (tools/bench.py) reports the same columns among
many others; this is the quick loop for work on speed. Where the time goes inside one run:
tools/where_time_goes.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (tools/bench.py)

from qwt_onnx import zoo  # noqa: E402
from qwt_onnx.runtime import samples_axes, take  # noqa: E402

EVALUATION_SAMPLES = 64


def measure(name: str, samples: int, folder: str) -> list[tuple[str, float, float, float, str]]:
    """``(variant, seconds, peak RSS MiB, evaluation SQNR dB, what was written)`` per quantizer."""
    prepared = zoo.prepare(name)
    entry = zoo.get(name)
    feeds, _ = zoo.load_evaluation(prepared)
    feeds = take(feeds, samples_axes(prepared.model)[0], slice(None, EVALUATION_SAMPLES))  # a state's on axis 1
    python, rows = sys.executable, []
    runs = [
        ("quantize_static min-max", [python, os.path.join(bench.ROOT, "tools", "ort_baseline.py"), "--method", "minmax"], False),
        ("qwt_onnx --no-qwt", [python, "-m", "qwt_onnx", "-q", "--no-qwt"], True),
        ("qwt_onnx", [python, "-m", "qwt_onnx", "-q"], True),
    ]
    reference = list(bench.outputs_of(prepared.model, feeds))
    for label, program, ours in runs:
        out = os.path.join(folder, f"{name}-{len(rows)}.onnx")
        report = out + ".json"
        command = [*program, prepared.model, out, "--calib", prepared.calibration, "--samples", str(samples)]
        command += ["--report", report] if ours else []
        seconds, rss = bench.run_measured(command)
        written = ""
        if ours:
            with open(report) as f:
                r = json.load(f)
            written = f"QwT ({r['method']})" if r["qwt_applied"] else f"PTQ ({r['method']})"
        sqnr = bench.score(entry, reference, out, feeds, None)["sqnr_db"]
        rows.append((label, seconds, rss, sqnr, written))
        print(f"  {name} {label}: {seconds:.1f} s, {rss:.0f} MiB, {sqnr:.2f} dB {written}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(zoo.ENTRIES), help="comma-separated zoo names")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--out", default=os.path.join(bench.ROOT, "docs", "QUANTIZE_TIME.md"), help="markdown file, or - for none")
    args = parser.parse_args()
    started = time.perf_counter()
    table = ["| model | quantizer | time s | × quantize_static | peak RSS MiB | × quantize_static | SQNR dB | written |",
             "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            rows = measure(name, args.samples, folder)
            base_seconds, base_rss = rows[0][1], rows[0][2]
            for label, seconds, rss, sqnr, written in rows:
                table.append(f"| {name} | {label} | {seconds:.1f} | {seconds / base_seconds:.2f} | {rss:.0f} | "
                             f"{rss / base_rss:.2f} | {sqnr:.2f} | {written} |")
    minutes = (time.perf_counter() - started) / 60
    text = "\n".join([
        "# Quantization time and memory",
        "",
        f"From `python tools/quantize_time.py` on {datetime.date.today()}, {minutes:.0f} minutes: {bench.machine()}; "
        f"{args.samples} calibration samples, SQNR to FP32 on {EVALUATION_SAMPLES} evaluation samples. Each quantizer "
        "runs in its own process, one after the other; time is its wall time, memory its own peak RSS.",
        "",
        *table,
        "",
    ])
    print(text)
    if args.out != "-":
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

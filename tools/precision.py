"""Low-bit precisions on the zoo's real models: quantize_static, qwt_onnx PTQ and QwT, side by side.

    python tools/precision.py                                   # every zoo model but vit-s (about an hour)
    python tools/precision.py --models mtcnn-onet,ocr-rec --merge   # re-run two, keep the others' rows

For each model and each precision (W8A8, W6A6, W4A8, W4A4, W8A16, W4A16), on the same
calibration and evaluation data: onnxruntime's quantize_static with min-max calibration
(QDQ, per-channel; it writes int4 weights and uint16 / uint4 activations, not 6 bits),
qwt_onnx --no-qwt and qwt_onnx with QwT, each in its own process. Scored on evaluation
samples that calibration never sees: output SQNR to FP32 (the worst part where the model's
task needs parts) and the task metric. Writes docs/PRECISION.md and docs/precision.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

from qwt_onnx import zoo
from qwt_onnx.runtime import samples_axes, take

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (tools/bench.py: measured runs and scoring)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECISIONS = ((8, 8), (6, 6), (4, 8), (4, 4), (8, 16), (4, 16))  # (weight bits, activation bits)
ORT_WRITES = {(8, 8), (4, 8), (4, 4), (8, 16), (4, 16)}  # quantize_static has no 6-bit types
SLOW = {"vit-s"}  # a QwT run takes minutes at each precision on 2 cores
EVALUATION = 128  # evaluation samples per model at most
PAPER = """The published reference (QwT, arXiv 2411.13918, ImageNet top-1, from the paper's code
release, quoted in issue 16): ViT-S W4A4 65.8 → 70.8 with QwT (FP32 81.4), ViT-B W4A4 68.5 → 76.3
(84.5), ResNet-18 W4A4 with a percentile base 58.3 → 68.9 (71.0), ResNet-50 68.4 → 74.5; at
W6A6 the gains are 0.1-0.8 points. Those bases are PyTorch fake-quantized models (RepQ-ViT:
reparameterised post-LayerNorm scales and log2 quantizers after the Softmax); here every
precision is plain standard QDQ that onnxruntime runs: per-tensor activations, per-channel
weights."""


def label(precision: tuple[int, int]) -> str:
    return f"W{precision[0]}A{precision[1]}"


def bench_model(name: str, samples: int, folder: str, log, precisions=PRECISIONS) -> dict:
    entry, prepared = zoo.get(name), zoo.prepare(name)
    feeds, labels = zoo.load_evaluation(prepared)
    feeds = take(feeds, samples_axes(prepared.model)[0], slice(None, EVALUATION))
    labels = None if labels is None else labels[:EVALUATION]
    reference = list(bench.outputs_of(prepared.model, feeds))
    fp32 = bench.score(entry, reference, prepared.model, feeds, labels)
    rows = {}
    for precision in precisions:
        weight_bits, activation_bits = precision
        row, bits = {}, ["--weight-bits", str(weight_bits), "--activation-bits", str(activation_bits)]
        if precision in ORT_WRITES:
            out = os.path.join(folder, f"{name}-{label(precision)}-ort.onnx")
            command = [sys.executable, os.path.join(ROOT, "tools", "ort_baseline.py"), prepared.model, out, "--calib",
                       prepared.calibration, "--samples", str(samples), *bits]
            row["ort"] = bench.measured(command, out, entry, reference, feeds, labels)
        for key, extra in (("ptq", ["--no-qwt"]), ("qwt", [])):
            out, report = (os.path.join(folder, f"{name}-{label(precision)}-{key}.{ext}") for ext in ("onnx", "json"))
            command = bench.qwt_command(entry, prepared, out, report, samples, *bits, *extra)
            row[key] = bench.measured(command, out, entry, reference, feeds, labels)
            if "error" not in row[key]:
                with open(report) as f:
                    written = json.load(f)
                row[key].update(applied=written["qwt_applied"], folds=written.get("layer_folds_written", False))
        rows[label(precision)] = dict(row, measured=datetime.date.today().isoformat())
        log(f"  {label(precision)}: " + ", ".join(f"{k} {bench.cell(v)}" for k, v in row.items()))
    return {"name": name, "metric": entry.metric_name, "fp32": fp32, "samples": samples, "rows": rows,
            "run": f"{datetime.date.today().isoformat()}, {bench.machine()}"}


def markdown(results: list[dict]) -> str:
    lines = ["# Precisions", "", "From `python tools/precision.py`. " + __doc__.split("\n\n")[2].replace("\n", " "), "",
             "Cells: evaluation SQNR to FP32 and, where the model has one, its task metric (FP32's in the heading). "
             "\"QwT\" is what qwt_onnx writes by default (`--compensation auto`): the PTQ model with QwT-v2's "
             "layer folds where the samples past the 64 they are fitted on show them gaining, and QwT's branches "
             "on that where they beat it (marked QwT), else the PTQ model (marked PTQ) or the PTQ model with layer folds (marked "
             "so). \"fails\": the quantizer cannot write that precision, or onnxruntime cannot run what it wrote "
             "(the error is in docs/precision.json). Each row says when it was measured: the rows of one model "
             "come from several runs.", ""]
    for r in results:
        lines += [*bench.model_heading(r),
                  "| precision | quantize_static (min-max) | qwt_onnx PTQ | qwt_onnx QwT | QwT − PTQ | measured |",
                  "|---|---|---|---|---|---|"]
        for name, row in r["rows"].items():
            ort = bench.cell(row["ort"], True) if "ort" in row else "cannot write it"
            ptq, qwt = row["ptq"], row["qwt"]
            gain = f"{qwt['sqnr_db'] - ptq['sqnr_db']:+.2f} dB" if "error" not in ptq and "error" not in qwt else "—"
            lines.append(f"| {name} | {ort} | {bench.cell(ptq, True)} | {bench.cell(qwt, True)}{_written(qwt)} | {gain} | "
                         f"{row.get('measured', '')} |")
        lines.append("")
    return "\n".join(lines + [PAPER, ""])


def _written(qwt: dict) -> str:
    """What the default command wrote: QwT's branches, the PTQ model with layer folds, or the PTQ model."""
    if "error" in qwt:
        return ""
    return " (QwT)" if qwt.get("applied") else " (PTQ, layer folds)" if qwt.get("folds") else " (PTQ)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(n for n in zoo.ENTRIES if n not in SLOW))
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "PRECISION.md"))
    parser.add_argument("--merge", action="store_true", help="keep the other models' (and precisions') rows of an earlier run")
    parser.add_argument("--precisions", default=",".join(label(p) for p in PRECISIONS), help="comma-separated, e.g. W4A8,W8A16")
    args = parser.parse_args()
    data = os.path.join(os.path.dirname(args.out), "precision.json")
    results = bench.stored_results(data, args.merge)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qwt-precision-") as folder:
        chosen = [p for p in PRECISIONS if label(p) in args.precisions.split(",")]
        for name in args.models.split(","):
            print(f"{name}:", flush=True)
            fresh = bench_model(name, args.samples, folder, lambda line: print(line, flush=True), chosen)
            earlier = next((r for r in results if r["name"] == name), None)
            if earlier is not None:  # rows of precisions not re-run are kept, in their order
                fresh["rows"] = {key: fresh["rows"].get(key, row) for key, row in earlier["rows"].items()} | fresh["rows"]
            results = [r for r in results if r["name"] != name] + [fresh]
    bench.store_results(results, data, args.out, markdown(results), started)


if __name__ == "__main__":
    main()

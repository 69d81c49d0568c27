"""Preconditioning against the strongest ONNX quantizers: quantize_static, AMD Quark, qwt_onnx with and without it.

    python tools/preconditioning.py --models mtcnn-onet,minilm                    # ours and quantize_static
    python tools/preconditioning.py --quark /path/to/quark-venv/bin/python --merge # and Quark's recipes

Per zoo model, on the same calibration and evaluation data, each quantizer in its own process
(time and peak memory measured): onnxruntime's quantize_static (min-max, per-channel QDQ);
Quark's recipes (tools/quark_baseline.py, in the venv that ``--quark`` names, since Quark pins an
older onnx and needs torch); qwt_onnx PTQ without preconditioning (``--rounding nearest
--equalization off``) and with its default (``auto``: GPTQ rounding and channel equalization,
each where held-out samples prefer it), then QwT on top of each. All W8A8: uint8 per-tensor activations, int8 per-channel weights. Scored on
evaluation samples that calibration never sees: output SQNR to FP32 (the worst part where the
model's task needs parts) and the task metric. Writes docs/PRECONDITIONING.md and
docs/preconditioning.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from qwt_onnx import zoo
from qwt_onnx.runtime import samples_axes, take

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (tools/bench.py: measured runs and scoring)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATION = 128  # evaluation samples per model at most
QUARK_RECIPES = ("layerwise-percentile", "adaround", "smoothquant")
QUARK_TIMEOUT = 900  # seconds: AdaRound can take minutes per layer
PLAIN = ["--rounding", "nearest", "--equalization", "off"]
OURS = {  # key: qwt_onnx options
    "ptq-plain": ["--no-qwt", *PLAIN],
    "ptq": ["--no-qwt"],
    "qwt-plain": PLAIN,
    "qwt": [],
}
SLOW = {"vit-s"}


def bench_model(name: str, samples: int, folder: str, quark: str | None, recipes: list[str], log) -> dict:
    entry, prepared = zoo.get(name), zoo.prepare(name)
    feeds, labels = zoo.load_evaluation(prepared)
    feeds = take(feeds, samples_axes(prepared.model)[0], slice(None, EVALUATION))
    labels = None if labels is None else labels[:EVALUATION]
    reference = list(bench.outputs_of(prepared.model, feeds))
    variants = {}

    def measured(key: str, command: list[str], out: str, timeout: float | None = None) -> None:
        variants[key] = bench.measured(command, out, entry, reference, feeds, labels, timeout)
        log(f"  {key}: {bench.cell(variants[key], digits=2)}")

    out = os.path.join(folder, f"{name}-ort.onnx")
    measured("quantize_static", [sys.executable, os.path.join(ROOT, "tools", "ort_baseline.py"), prepared.model, out,
                                 "--calib", prepared.calibration, "--samples", str(samples)], out)
    for recipe in recipes if quark else []:
        out = os.path.join(folder, f"{name}-quark-{recipe}.onnx")
        measured(f"quark {recipe}", [quark, os.path.join(ROOT, "tools", "quark_baseline.py"), prepared.model, out,
                                     "--calib", prepared.calibration, "--samples", str(samples), "--recipe", recipe], out,
                 QUARK_TIMEOUT)
    for key, extra in OURS.items():
        out, report = (os.path.join(folder, f"{name}-{key}.{ext}") for ext in ("onnx", "json"))
        measured(key, bench.qwt_command(entry, prepared, out, report, samples, *extra), out)
        if "error" not in variants[key]:
            with open(report) as f:
                written = json.load(f)
            variants[key]["applied"] = written["qwt_applied"]
            variants[key]["gptq_gain_db"] = written["gptq_gain_db"].get(written["ptq_method"])
            variants[key]["equalization_gain_db"] = written.get("equalization_gain_db")
            variants[key]["equalizable"] = written.get("equalizable", 0)
    return {"name": name, "metric": entry.metric_name, "fp32": bench.score(entry, reference, prepared.model, feeds, labels),
            "samples": samples, "variants": variants, "run": f"{datetime.date.today().isoformat()}, {bench.machine()}"}


def markdown(results: list[dict]) -> str:
    lines = ["# Preconditioning and the strongest ONNX quantizers", "",
             "From `python tools/preconditioning.py`. " + __doc__.split("\n\n")[2].replace("\n", " "), "",
             "Cells: evaluation SQNR to FP32 and, where the model has one, its task metric (FP32's in the heading); "
             "quantization time and peak memory. \"QwT\" rows are what qwt_onnx writes: the QwT model where held-out "
             "calibration samples show it beats PTQ beyond noise, else the PTQ model (marked PTQ).", ""]
    for r in results:
        lines += [*bench.model_heading(r),
                  "| quantizer | SQNR, task | time | peak memory | note |", "|---|---|---|---|---|"]
        for key, v in r["variants"].items():
            if "error" in v:
                lines.append(f"| {key} | fails | | | {v['error']} |")
                continue
            notes = []
            if "applied" in v and key.startswith("qwt"):
                notes.append("QwT written" if v["applied"] else "PTQ written")
            if v.get("gptq_gain_db") is not None:
                notes.append(f"GPTQ held-out {v['gptq_gain_db']:+.2f} dB ({'kept' if v['gptq_gain_db'] > 0 else 'dropped'})")
            if v.get("equalization_gain_db") is not None:
                gain = v["equalization_gain_db"]
                notes.append(f"equalization held-out {gain:+.2f} dB ({'kept' if gain > 0 else 'dropped'})")
            elif v.get("equalizable"):
                notes.append(f"equalization: {v['equalizable']} activations could take it, none expected to gain")
            lines.append(f"| {key} | {bench.cell(v, True, 2)} | {v['seconds']:.0f} s | {v['rss_mib']:.0f} MiB | {'; '.join(notes)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(n for n in zoo.ENTRIES if n not in SLOW))
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--quark", help="the python of a venv with amd-quark and torch installed")
    parser.add_argument("--quark-recipes", default=",".join(QUARK_RECIPES))
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "PRECONDITIONING.md"))
    parser.add_argument("--merge", action="store_true", help="keep the other models' rows of an earlier run")
    args = parser.parse_args()
    recipes = args.quark_recipes.split(",")
    bench.side_by_side(args.models.split(","), os.path.join(os.path.dirname(args.out), "preconditioning.json"), args.out,
                       args.merge, "qwt-preconditioning-",
                       lambda name, folder, log: bench_model(name, args.samples, folder, args.quark, recipes, log), markdown)

if __name__ == "__main__":
    main()

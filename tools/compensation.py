"""Compensation with and without added kernels: QwT's branches, QwT-v2's folds, and auto.

    python tools/compensation.py                           # every zoo model (about an hour)
    python tools/compensation.py --models minilm --merge   # re-run one, keep the others' rows

Per zoo model, on the same calibration and evaluation data, each quantizer in its own process
(time and peak memory measured): onnxruntime's quantize_static (min-max, per-channel QDQ);
qwt_onnx PTQ (``--no-qwt``, its default search); then QwT on that same PTQ model (the
calibration method, bias correction, rounding, equalization and float stem its report chose, pinned, so
that the three differ in the compensation alone) with ``--compensation branch`` (QwT's
branches), ``affine`` (QwT-v2's folds into every quantized layer, fitted on the first 64 samples
and written where up to 256 samples past those show a gain: the PTQ graph's ops) and ``auto`` (the
default: the layer folds where they gain, then QwT's branches fitted to what they leave, per block
the fold where it removes nearly as much as the branch, the branches within ``--max-slowdown``,
written where they beat the folded model beyond noise; QwT fitted on the PTQ model alone
instead where it does better, or where no branch on the folds pays and their gain is within
noise). Scored on evaluation
samples that calibration never sees: output SQNR to FP32 (the worst part where the model's task
needs parts) and the task metric; latency of the qwt_onnx models at batch 1 and 16, timed in
interleaved rounds (tools/speed.py), a model written twice timed once; and, where a written model
has QwT's branches, the share they add to onnxruntime's run at batch 1 and 16, profiled
(qwt_onnx.latency: the same run's kernels, which resolves the few percent that timing two models
against each other here does not). Writes docs/COMPENSATION.md and docs/compensation.json.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys

import onnx

from qwt_onnx import latency, zoo
from qwt_onnx.passes.splice import PREFIX
from qwt_onnx.runtime import samples_axes, take

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (tools/bench.py: measured runs, scoring, timing)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATION = 128  # evaluation samples per model at most
COMPENSATIONS = ("branch", "affine", "auto")
TIMED = ("ptq", *COMPENSATIONS)


def pinned(report: dict) -> list[str]:
    """The options that rebuild the PTQ model a ``--no-qwt`` run's ``report`` describes."""
    method = report["method"]
    return ["--calib-method", method,
            "--bias-correction", "on" if report["bias_corrected"].get(method) else "off",
            "--rounding", "gptq" if report["gptq"].get(method) else "nearest",
            "--equalization", "on" if report["equalized"] else "off",
            "--float-stem", str(report.get("float_stem_depth", 0))]


def bench_model(name: str, samples: int, folder: str, log) -> dict:
    entry, prepared = zoo.get(name), zoo.prepare(name)
    feeds, labels = zoo.load_evaluation(prepared)
    feeds = take(feeds, samples_axes(prepared.model)[0], slice(None, EVALUATION))
    labels = None if labels is None else labels[:EVALUATION]
    reference = list(bench.outputs_of(prepared.model, feeds))
    variants, paths = {}, {}

    def measured(key: str, command: list[str], out: str) -> None:
        variants[key] = bench.measured(command, out, entry, reference, feeds, labels)
        paths[key] = out
        log(f"  {key}: {bench.cell(variants[key], digits=2)}")

    out = os.path.join(folder, f"{name}-ort.onnx")
    measured("quantize_static", [sys.executable, os.path.join(ROOT, "tools", "ort_baseline.py"), prepared.model, out,
                                 "--calib", prepared.calibration, "--samples", str(samples)], out)
    same_ptq: list[str] = []
    for key in TIMED:
        out, report = (os.path.join(folder, f"{name}-{key}.{ext}") for ext in ("onnx", "json"))
        extra = ["--no-qwt"] if key == "ptq" else ["--compensation", key, *same_ptq]
        measured(key, bench.qwt_command(entry, prepared, out, report, samples, *extra), out)
        with open(report) as f:
            written = json.load(f)
        if key == "ptq":
            same_ptq = pinned(written)
        layers = written.get("layer_folds_written", False)
        variants[key].update(applied=written["qwt_applied"], added_parameters=written["added_parameters"],
                             folds=sum(1 for b in written["blocks"] if b["kept"] and b["fold_site"]),
                             branches=sum(1 for b in written["blocks"] if b["kept"] and not b["fold_site"]),
                             layer_folds=written.get("layer_folds", 0) if layers else 0,
                             layer_folds_tried=written.get("layer_fold_layers", 0),
                             layer_folds_gain_db=written.get("layer_folds_gain_db"),
                             heldout_db=written["sqnr_qwt_db"] if written["qwt_applied"] else
                             written["sqnr_layer_folds_db"] if layers else written["sqnr_ptq_db"])
    timed = {key: bench.Variant(key, paths[key], scores=variants[key]) for key in TIMED if "error" not in variants[key]}
    bench.measure_speed(timed, feeds, quick=False)
    for key, variant in timed.items():
        variant.scores.update(branch_time(paths[key], feeds, samples_axes(prepared.model)[0]), ops=_op_counts(paths[key]))
    return {"name": name, "metric": entry.metric_name, "fp32": bench.score(entry, reference, prepared.model, feeds, labels),
            "samples": samples, "pinned": same_ptq, "variants": variants,
            "run": f"{datetime.date.today().isoformat()}, {bench.machine()}"}


def branch_time(path: str, feeds: dict, axes: dict) -> dict:
    """The share of onnxruntime's run at batch 1 and 16 that the written model's branches (its
    ``qwt/`` nodes) add, profiled; nothing where it has none."""
    model = onnx.load(path)
    scopes = sorted({"/".join(n.name.split("/")[:2]) + "/" for n in model.graph.node if n.name.startswith(PREFIX)})
    if not scopes:
        return {}
    return {f"branches_b{batch}": latency.run_times(model, take(feeds, axes, slice(None, batch)), scopes, cached=False).slowdown()
            for batch in (1, 16)}


def _op_counts(path: str) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node))


def _branch_time(v: dict) -> str:
    if "branches_b1" not in v:
        return "—"
    return ", ".join(f"+{100 * (v[f'branches_{b}'] - 1):.1f}%" for b in ("b1", "b16"))


def _latency(v: dict, base: dict) -> str:
    if "latency_b1_ms" not in v:
        return "—"
    return ", ".join(f"{v[f'latency_{b}_ms'] / base[f'latency_{b}_ms']:.2f}" for b in ("b1", "b16"))


def _targets(r: dict) -> str:
    v = r["variants"]
    if any("error" in v[key] for key in TIMED):
        return "not measured: a run failed"
    profiled = max(v["auto"].get("branches_b1", 1.0), v["auto"].get("branches_b16", 1.0))
    checks = [("auto ≤ 1.02× PTQ latency (its branches profiled)", profiled <= 1.02),
              ("folds: the PTQ graph's ops", v["affine"].get("ops") == v["ptq"].get("ops")),
              ("folds above PTQ", v["affine"]["sqnr_db"] > v["ptq"]["sqnr_db"])]
    if r["name"] in bench.TRANSFORMERS:
        checks.append(("auto within 0.2 dB of branches", v["auto"]["sqnr_db"] >= v["branch"]["sqnr_db"] - 0.2))
    return bench.verdicts(checks)


def markdown(results: list[dict]) -> str:
    lines = ["# Compensation: branches, folds, or auto", "",
             "From `python tools/compensation.py`. " + __doc__.split("\n\n")[2].replace("\n", " "), "",
             "Cells: evaluation SQNR to FP32 and, where the model has one, its task metric (FP32's in the heading); "
             "held-out SQNR as the run's summary gave it; what was written (QwT, or the PTQ model where held-out "
             "samples did not show QwT beating it beyond noise), with its folds and branches; latency relative to "
             "the PTQ model at batch 1 and 16, timed; what the written model's branches add to its run at batch 1 "
             "and 16, profiled.",
             "",
             "Targets (issue 15): `auto` at most 1.02× the PTQ model's latency at batch 1 and 16 (checked on the "
             "profiled share of its branches: a fold adds no node) and, on the transformers, within 0.2 dB of the "
             "branches-only model; folds only: the PTQ model's latency (checked as the PTQ graph's op types and "
             "counts) and fidelity above PTQ.", "",
             "`affine` is QwT-v2's folds into every quantized layer (README, How it works, step 7); `auto` fits them "
             "first and QwT's branches on what they leave, and writes the branches where they beat the folded model "
             "(README, step 6).", "",
             "How far to trust the latency columns: rows of one model written twice (QwT rejected: the PTQ model) are "
             "timed once and read 1.00 by construction. MiniLM's folds-only model has the PTQ model's ops and read "
             "0.96, 1.05 and then 1.02, 0.75 in two runs on 2026-12-04 (this project's shared 2-core machine); the "
             "same branches-only model of YOLOv8n read 1.47, 1.04 and then 1.04, 1.32 (and 1.14, 1.07 on 2026-12-06, when "
             "PP-OCRv6 rec's folds-only model read 0.86, 1.06 and MTCNN ONet's 0.99, 0.61). Differences of a few "
             "percent are not resolved here: the profiled column is what the targets are checked on.", ""]
    for r in results:
        v = r["variants"]
        lines += [*bench.model_heading(r), f"QwT rows on the PTQ model rebuilt with `{' '.join(r['pinned'])}`.", "",
                  "| quantizer | SQNR, task | held-out SQNR | written | added parameters | latency / PTQ (b1, b16) "
                  "| branches' run time, profiled (b1, b16) | time | peak memory |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for key, x in v.items():
            if "error" in x:
                lines.append(f"| {key} | fails: {x['error']} | | | | | | | |")
                continue
            written = ""
            if key in COMPENSATIONS:
                written = f"QwT: {x['folds']} block folds, {x['branches']} branches" if x["applied"] else "PTQ"
                if x.get("layer_folds"):
                    written += f", {x['layer_folds']} of {x['layer_folds_tried']} layers folded"
            held = f"{x['heldout_db']:.2f} dB" if x.get("heldout_db") is not None else ""
            params = f"{x['added_parameters']:,}" if "added_parameters" in x else ""
            latency, branches = (_latency(x, v["ptq"]), _branch_time(x)) if key in TIMED else ("", "")
            lines.append(f"| {key} | {bench.cell(x, True, 2)} | {held} | {written} | {params} | {latency} | {branches} | "
                         f"{x['seconds']:.0f} s | {x['rss_mib']:.0f} MiB |")
        lines += ["", f"- {_targets(r)}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(zoo.ENTRIES))
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "COMPENSATION.md"))
    parser.add_argument("--merge", action="store_true", help="keep the other models' rows of an earlier run")
    args = parser.parse_args()
    bench.side_by_side(args.models.split(","), os.path.join(os.path.dirname(args.out), "compensation.json"), args.out,
                       args.merge, "qwt-compensation-", lambda name, folder, log: bench_model(name, args.samples, folder, log),
                       markdown)

if __name__ == "__main__":
    main()

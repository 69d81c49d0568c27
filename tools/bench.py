"""Benchmark qwt_onnx against onnxruntime's quantize_static on the zoo's real models.

    python tools/bench.py                 # every zoo model, 512 calibration samples (hours on 2 cores)
    python tools/bench.py --quick         # 32 samples, 16 evaluation samples, min-max baseline only
    python tools/bench.py --granularity   # also one block per residual branch, where that differs
    python tools/bench.py --models yolov8n --merge   # re-run one model, keep the others' rows
    python tools/bench.py --headline --out docs/RESULTS.md   # the README's table: baseline, PTQ, QwT only

For each model, on the same calibration and evaluation data and in one run:
FP32; onnxruntime quantize_static (QDQ, per-channel) with min-max, percentile
and entropy calibration; qwt_onnx --no-qwt; qwt_onnx with QwT, with int8
branches (the default) and with float ones, and with a channel-wise affine folded
into each block's last weighted op instead (--compensation affine); both with full-range int8 weights
(--weight-range full) instead of the portable default; PTQ without bias
correction (--bias-correction off); and QwT on top of
onnxruntime's best QDQ model (--quantized). Every quantizer runs in its own
process so its wall time and peak memory (RSS) are its own. Latency, INT8 MAC
share and kernel profiles come from tools/speed.py. Where qemu-user is
installed, every quantized variant is also run on an emulated AVX2-only CPU
(qwt_onnx.emulation) on the first evaluation samples. Writes docs/BENCHMARKS.md
and docs/benchmarks.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

from qwt_onnx import emulation, zoo
from qwt_onnx.numerics.metrics import float_outputs, parts, sqnr_db, sqnr_db_over_batches
from qwt_onnx.runtime import Runner, count_samples, run_in_batches, samples_axes, take

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed  # noqa: E402  (tools/speed.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORT_METHODS = ("minmax", "percentile", "entropy")
HISTOGRAM_TIMEOUT = 40  # seconds for onnxruntime's percentile / entropy calibration
# onnxruntime's histogram calibrators took over 40 s on every model whose min-max run took
# over 20 s (over 10 minutes on vit-s); there they are not run, and the table says so.
HISTOGRAM_SKIP_AFTER = 20.0
QUICK_SAMPLES, QUICK_EVALUATION = 32, 16
FULL_EVALUATION = 192  # evaluation samples per model at most
EVALUATION_BATCH = 16  # samples per onnxruntime run when scoring
# Evaluation samples run on the emulated AVX2 CPU, which computes float ops in software: a ViT-S
# image with its float decoder takes over 3 minutes per model there, a PP-OCR sample 8 s.
EMULATED_EVALUATION = {"vit-s": 1, "ocr-det": 8, "ocr-rec": 8, "yolov8n": 8}
EMULATED_DEFAULT, QUICK_EMULATED = 32, 2
EMULATED = ("qwt-ptq", "qwt", "qwt-full")  # and onnxruntime's best
TRANSFORMERS = {"vit-s", "minilm"}  # the portable weight range may cost 1 dB on these, 0.5 dB on the rest
UNTIMED = ("qwt-ptq-full", "qwt-full", "qwt-ptq-no-bc")  # the same kernels as their twins: not timed again
PROFILED = ("fp32", "qwt-ptq", "qwt")  # variants whose kernel profile the report shows
LABELS = {
    "fp32": "FP32",
    "ort-minmax": "ORT quantize_static, min-max",
    "ort-percentile": "ORT quantize_static, percentile",
    "ort-entropy": "ORT quantize_static, entropy",
    "qwt-ptq": "qwt_onnx --no-qwt (PTQ)",
    "qwt": "qwt_onnx QwT (default, --compensation auto)",
    "qwt-ptq-full": "qwt_onnx PTQ, full-range weights",
    "qwt-ptq-no-bc": "qwt_onnx PTQ, no bias correction",
    "qwt-full": "qwt_onnx QwT, full-range weights",
    "qwt-branch": "qwt_onnx QwT, branches only (--compensation branch)",
    "qwt-float": "qwt_onnx QwT, float branches only",
    "qwt-affine": "qwt_onnx affine compensation, folded (--compensation affine)",
    "qwt-full-rank": "qwt_onnx QwT, full-rank token branches (--branch-rank full)",
    "qwt-on-ort": "QwT on ORT's best QDQ",
    "qwt-residual": "qwt_onnx QwT, one block per residual branch",
}


@dataclasses.dataclass
class Variant:
    key: str
    path: str
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    report: dict | None = None
    scores: dict = dataclasses.field(default_factory=dict)


class TimedOut(Exception):
    pass


def run_measured(command: list[str], timeout: float | None = None) -> tuple[float, float]:
    """Run ``command`` to completion: (wall seconds, peak RSS in MiB) of that process alone.

    The peak is the kernel's high-water mark of the process's own memory (VmHWM), polled
    while it runs: getrusage's maxrss would also count the benchmark's memory at fork time.
    """
    started = time.perf_counter()
    peak_kib = 0
    with tempfile.TemporaryFile(mode="w+") as errors:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, text=True)
        while process.poll() is None:
            peak_kib = max(peak_kib, _high_water_kib(process.pid))
            if timeout is not None and time.perf_counter() - started > timeout:
                process.kill()
                process.wait()
                raise TimedOut(f"did not finish: stopped after {timeout:.0f} s")
            time.sleep(0.1)
        seconds = time.perf_counter() - started
        if process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{errors.read()[-2000:]}")
    return seconds, peak_kib / 1024.0


def _high_water_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except OSError:  # the process has just exited
        return 0


def outputs_of(model: str, feeds: dict[str, np.ndarray], batch_size: int = EVALUATION_BATCH):
    """The model's outputs, batch by batch (each input cut on its samples axis)."""
    runner, axes = Runner(model), samples_axes(model)[0]
    for i in range(0, count_samples(feeds, axes), batch_size):
        yield runner(take(feeds, axes, slice(i, i + batch_size)))


def score(entry, reference: list[dict], model: str, feeds, labels) -> dict:
    """Fidelity to FP32 (SQNR, cosine, top-1 agreement), summed batch by batch, and the task metric.
    Where the entry names the parts of its outputs that its task needs, the SQNR is the worst
    part's, as it is for the quantizer's choices, and each part's is kept too."""
    signal = noise = dot = norm_test = agree = 0.0
    kept, part_batches = [], []
    for ref, out in zip(reference, outputs_of(model, feeds)):
        for name, y in float_outputs(ref):  # token ids or masks passed through carry no signal
            y32, t32 = y.astype(np.float32).ravel(), out[name].astype(np.float32).ravel()
            signal += float(np.dot(y32, y32))
            noise += float(np.dot(y32 - t32, y32 - t32))
            dot += float(np.dot(y32, t32))
            norm_test += float(np.dot(t32, t32))
        agree += float(np.sum(entry.metric_input(ref).argmax(-1) == entry.metric_input(out).argmax(-1)))
        if entry.task_metric is not None and labels is not None:
            kept.append(entry.metric_input(out))
        if entry.outputs:
            part_batches.append((parts(ref, entry.outputs), parts(out, entry.outputs)))
    count = sum(len(entry.metric_input(r)) for r in reference)
    result = {"sqnr_db": 10 * np.log10(signal / noise) if noise > 0 else float("inf"),
              "cosine": dot / np.sqrt(signal * norm_test)}
    if part_batches:
        result["parts_db"] = sqnr_db_over_batches(part_batches)
        result["pooled_sqnr_db"], result["sqnr_db"] = result["sqnr_db"], min(result["parts_db"].values())
    if entry.classifier:
        result["agreement"] = agree / count
    if kept:
        result["task"] = float(entry.task_metric(np.concatenate(kept), labels))
    return result


def qwt_command(entry, prepared, out: str, report: str, samples: int, *extra: str) -> list[str]:
    """The command line that quantizes a zoo model with qwt_onnx as ``zoo:NAME`` would (its task's outputs decide)."""
    command = [sys.executable, "-m", "qwt_onnx", prepared.model, out, "--calib", prepared.calibration,
               "--samples", str(samples), "--report", report, "-q", *extra]
    return command + (["--outputs", ",".join(entry.outputs)] if entry.outputs else [])


def measured(command: list[str], out: str, entry, reference: list[dict], feeds, labels, timeout: float | None = None) -> dict:
    """Run a quantizer's ``command`` (time, peak memory) and score the model it writes to ``out``;
    where it fails, the error's last line, for the table to say so."""
    try:
        seconds, rss = run_measured(command, timeout)
        return {"seconds": seconds, "rss_mib": rss, **score(entry, reference, out, feeds, labels)}
    except Exception as failed:  # a quantizer that cannot quantize this model or write this precision
        return {"error": str(failed).strip().splitlines()[-1][:160]}


def verdicts(checks: list[tuple[str, bool]]) -> str:
    """A model's targets as one line: each label, met or **missed**."""
    return "; ".join(f"{label} {'met' if ok else '**missed**'}" for label, ok in checks)


def cell(v: dict, metric: bool = False, digits: int = 1) -> str:
    """A scored variant as a table cell: its SQNR (and task metric), or "fails" where it has an error."""
    if "error" in v:
        return "fails"
    text = f"{v['sqnr_db']:.{digits}f} dB"
    return text + (f", {v['task']:.4f}" if metric and "task" in v else "")


def model_heading(r: dict) -> list[str]:
    """A zoo model's section heading in the side-by-side tables: FP32's task metric, samples, when measured."""
    metric = f"FP32's {r['metric']}: {r['fp32']['task']:.4f}; " if "task" in r["fp32"] else ""
    return [f"## {r['name']}", "", f"{metric}{r['samples']} calibration samples; measured {r['run']}.", ""]


def stored_results(path: str, merge: bool) -> list[dict]:
    """An earlier run's results (a JSON list, one entry per model) to merge into, or none."""
    if not merge or not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def store_results(results: list[dict], data: str, out: str, text: str, started: float) -> None:
    """Write a side-by-side run's results as JSON (``data``) and as the markdown ``text`` (``out``)."""
    with open(data, "w") as f:
        json.dump(results, f, indent=1, default=float)
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {out} in {(time.perf_counter() - started) / 60:.1f} minutes")


def side_by_side(models: list[str], data: str, out: str, merge: bool, prefix: str, measure, markdown) -> None:
    """Measure each of ``models`` with ``measure(name, folder, log)`` and write ``data`` (JSON) and
    ``out`` (``markdown(results)``) after each, so that a run that stops keeps what it measured;
    with ``merge``, the other models' rows of an earlier run stay, in their places."""
    results = stored_results(data, merge)
    started = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        for name in models:
            print(f"{name}:", flush=True)
            fresh = measure(name, folder, lambda line: print(line, flush=True))
            names = [r["name"] for r in results]
            results = [fresh if r["name"] == name else r for r in results] if name in names else [*results, fresh]
            store_results(results, data, out, markdown(results), started)


def measure_speed(variants: dict[str, Variant], feeds: dict[str, np.ndarray], quick: bool) -> None:
    """Latency at batch 1 and 16 (all variants interleaved), INT8 MAC share and kernel profile."""
    variants = {key: v for key, v in variants.items() if key not in UNTIMED}
    # a model written twice (QwT rejected: the PTQ model) is timed once, so that it reads 1.00× itself
    first_of = {}
    twin = {key: first_of.setdefault(_digest(v.path), key) for key, v in variants.items()}
    paths = {key: v.path for key, v in variants.items() if twin[key] == key}
    for batch, rounds, runs in ((1, 3, 3) if quick else (1, 7, 5), (16, 2, 1) if quick else (16, 3, 1)):
        measured = speed.latencies_ms(paths, feeds, batch, rounds, runs)
        for key, variant in variants.items():
            variant.scores[f"latency_b{batch}_ms"] = measured[twin[key]]
    for key, variant in variants.items():
        kernels = speed.profile(variant.path, feeds, batch=1)
        variant.scores["int8_mac_share"] = speed.int8_share(kernels)
        if key in PROFILED:
            variant.scores["kernels"] = speed.by_op(kernels)


def _variants(ours, variants: dict, prepared, granularity: bool, quick: bool) -> None:
    """The variants that differ from the written model in one option only: same calibration method
    and bias correction (QwT's where it was written, PTQ's where it was not)."""
    report = variants["qwt"].report
    chosen = report["qwt_method"] if report.get("qwt_applied") else report["method"]
    corrected = report["qwt_bias_corrected"] if report.get("qwt_applied") else report["bias_corrected"].get(chosen)
    correction = ("--bias-correction", "on" if corrected else "off") if corrected is not None else ()
    same_weights = ("--calib-method", chosen, *correction)
    ptq_method = variants["qwt-ptq"].report["method"]
    ours("qwt-ptq-full", "--no-qwt", "--weight-range", "full", "--calib-method", ptq_method)
    ours("qwt-ptq-no-bc", "--no-qwt", "--bias-correction", "off", "--calib-method", ptq_method)
    ours("qwt-full", "--weight-range", "full", *same_weights)
    ours("qwt-branch", "--compensation", "branch", *same_weights)
    if not quick:
        ours("qwt-float", "--compensation", "branch", "--branch-precision", "float", *same_weights)
    ours("qwt-affine", "--compensation", "affine", *same_weights)
    if any(block.get("rank") for block in report.get("blocks", [])):
        ours("qwt-full-rank", "--branch-rank", "full", *same_weights)
    if granularity and granularities_differ(prepared.model):
        ours("qwt-residual", "--granularity", "residual", *same_weights)


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def bench_model(name: str, samples: int, quick: bool, granularity: bool, folder: str, log, headline: bool = False) -> dict:
    entry = zoo.get(name)
    prepared = zoo.prepare(name)
    feeds, labels = zoo.load_evaluation(prepared)
    count = QUICK_EVALUATION if quick else FULL_EVALUATION
    input_axes = samples_axes(prepared.model)[0]
    feeds = take(feeds, input_axes, slice(None, count))
    labels = None if labels is None else labels[:count]
    python = sys.executable
    variants = {"fp32": Variant("fp32", prepared.model)}

    def ours(key: str, *extra: str) -> None:
        out, report = os.path.join(folder, f"{name}-{key}.onnx"), os.path.join(folder, f"{name}-{key}.json")
        seconds, rss = run_measured(qwt_command(entry, prepared, out, report, samples, *extra))
        with open(report) as f:
            variants[key] = Variant(key, out, seconds, rss, json.load(f))
        log(f"  {key}: {seconds:.0f} s, {rss:.0f} MiB")

    unfinished = {}
    for method in ORT_METHODS[:1] if quick else ORT_METHODS:
        key = f"ort-{method}"
        minmax = variants.get("ort-minmax")
        if method != "minmax" and minmax is not None and minmax.seconds > HISTOGRAM_SKIP_AFTER:
            unfinished[key] = f"not run: min-max alone took {minmax.seconds:.0f} s (see HISTOGRAM_SKIP_AFTER)"
            log(f"  {key}: {unfinished[key]}")
            continue
        out = os.path.join(folder, f"{name}-{key}.onnx")
        command = [python, os.path.join(ROOT, "tools", "ort_baseline.py"), prepared.model, out,
                   "--calib", prepared.calibration, "--method", method, "--samples", str(samples)]
        try:  # onnxruntime's histogram calibrators can take far longer than the rest together
            seconds, rss = run_measured(command, timeout=None if method == "minmax" else HISTOGRAM_TIMEOUT)
        except (TimedOut, RuntimeError) as failed:
            unfinished[key] = str(failed) if isinstance(failed, TimedOut) else "failed: " + str(failed).strip().splitlines()[-1]
            log(f"  {key}: {unfinished[key]}")
            continue
        variants[key] = Variant(key, out, seconds, rss)
        log(f"  {key}: {seconds:.0f} s, {rss:.0f} MiB")
    ours("qwt-ptq", "--no-qwt")
    ours("qwt")
    if not headline:
        _variants(ours, variants, prepared, granularity, quick)
    reference = list(outputs_of(prepared.model, feeds))
    for variant in variants.values():
        variant.scores = score(entry, reference, variant.path, feeds, labels)
    ort_keys = [k for k in variants if k.startswith("ort-")]
    best_ort = max(ort_keys, key=lambda k: variants[k].scores["sqnr_db"])
    if not headline:
        try:  # quantize_static can write models that onnx.checker rejects (silero-vad's If branches out of order)
            ours("qwt-on-ort", "--quantized", variants[best_ort].path)
            variants["qwt-on-ort"].scores = score(entry, reference, variants["qwt-on-ort"].path, feeds, labels)
        except RuntimeError as failed:
            unfinished["qwt-on-ort"] = "failed: " + str(failed).strip().splitlines()[-1]
            log(f"  qwt-on-ort: {unfinished['qwt-on-ort']}")

    measure_speed(variants, feeds, quick)
    log(f"  evaluated {len(variants)} variants on {count_samples(feeds, input_axes)} samples")
    emulated = QUICK_EMULATED if quick else EMULATED_EVALUATION.get(name, EMULATED_DEFAULT)
    if emulation.available() and not headline:
        started = time.perf_counter()
        keys = [best_ort, *EMULATED]
        score_emulated(prepared.model, {k: variants[k] for k in keys}, take(feeds, input_axes, slice(None, emulated)))
        log(f"  ran {len(keys)} variants on {emulated} samples on an emulated AVX2 CPU in {time.perf_counter() - started:.0f} s")
    return {
        "name": name,
        "run": run_label(quick),
        "description": entry.description,
        "metric": entry.metric_name,
        "classifier": entry.classifier,
        "calibration_samples": samples,
        "evaluation_samples": count_samples(feeds, input_axes),
        "best_ort": best_ort,
        "unfinished": unfinished,
        "variants": {k: dataclasses.asdict(v) for k, v in variants.items()},
    }


def score_emulated(fp32: str, variants: dict[str, Variant], feeds: dict[str, np.ndarray]) -> None:
    """SQNR to FP32 on ``feeds`` of each variant, run natively and on an emulated AVX2-only CPU
    (no VNNI: onnxruntime's uint8 × int8 kernels saturate there)."""
    reference = run_in_batches(fp32, feeds, EVALUATION_BATCH)
    emulated = emulation.run([v.path for v in variants.values()], feeds)
    for key, outputs in zip(variants, emulated):
        variants[key].scores["sqnr_db_native_subset"] = sqnr_db(reference, run_in_batches(variants[key].path, feeds, EVALUATION_BATCH))
        variants[key].scores["sqnr_db_avx2"] = sqnr_db(reference, outputs)
        variants[key].scores["avx2_samples"] = count_samples(feeds, samples_axes(fp32)[0])


def granularities_differ(path: str) -> bool:
    """Whether one block per residual branch differs from one per transformer layer on this model."""
    from qwt_onnx.analysis import blocks
    from qwt_onnx.graph import prepare

    model = prepare.prepare(prepare.load_model(path))
    return blocks.find_blocks(model, "layer") != blocks.find_blocks(model, "residual")


def gap_closed(fp32: float, ptq: float, qwt: float) -> float | None:
    """The share of the FP32-to-PTQ gap that QwT closes (None when PTQ lost nothing)."""
    gap = fp32 - ptq
    return None if gap <= 1e-9 else (qwt - ptq) / gap


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({vnni() or 'no VNNI'}), {os.cpu_count()} cores, Python {platform.python_version()}, onnxruntime {ort.__version__}"


def run_label(quick: bool) -> str:
    """When, how, at which commit and where a model was measured: its row's provenance once runs are merged."""
    return f"{'quick' if quick else 'full'} run, {datetime.date.today().isoformat()}{commit()}, on {machine()}"


def commit() -> str:
    """The checkout measured, as ", at COMMIT" (COMMIT+ where its package differs from it); "" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        head, changed = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--", "qwt_onnx")
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f", at {head}{'+' if changed else ''}"


def vnni() -> str:
    """The VNNI extensions this CPU has ("avx512_vnni, avx_vnni"), or "" where it has none."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ""
    return ", ".join(flag for flag in ("avx512_vnni", "avx_vnni") if flag in flags)


def markdown(results: list[dict], args, minutes: float) -> str:
    runs = {r["run"]: [x["name"] for x in results if x["run"] == r["run"]] for r in results}
    command = "python tools/bench.py" + (" --headline" if args.headline else "")
    if len(runs) == 1:
        provenance = [f"`{command}` ({next(iter(runs))}; {minutes:.0f} minutes)."]
    else:  # rows merged from several runs (--merge): each says where it was measured
        provenance = [f"`{command}`, rows from several runs:", ""]
        provenance += [f"- {', '.join(names)}: {run}" for run, names in runs.items()]
    lines = [
        "# Results" if args.headline else "# Benchmarks",
        "",
        *provenance,
        "",
        "Every variant is quantized from the same FP32 model with the same calibration samples and",
        "evaluated on the same evaluation samples, which calibration never sees. Fidelity is measured",
        "against the FP32 model's outputs: SQNR = 10·log10(‖y‖² / ‖y − ŷ‖²). Quantization time and",
        "peak memory (RSS) are those of the quantizer's own process. Latency is onnxruntime CPU",
        "(ORT_ENABLE_ALL, default threading) at batch 1 and 16, all variants of a model timed in",
        "interleaved rounds (tools/speed.py), the median over rounds; the INT8 MAC share is the part of",
        "the matrix multiply-accumulates that onnxruntime's profiler shows running in integer kernels",
        "(QLinearConv, MatMulIntegerToFloat, QGemm, ...). \"ORT best\" is the one of",
        "onnxruntime's three calibration methods with the highest SQNR on the evaluation set, the",
        "most favourable choice for the baseline.",
        "",
        "## Summary",
        "",
    ]
    one_option = any("qwt-branch" in r["variants"] for r in results)  # the variants --headline does not run
    columns = ["model", "task metric", "FP32", "ORT best", "qwt PTQ", "QwT", "SQNR: ORT best → qwt PTQ → QwT",
               *(["branches only", "folds only"] if one_option else []), "gap closed", "PTQ latency / FP32 (b1, b16)",
               "QwT latency / PTQ (b1, b16)", *(["branches only, folds only: latency / PTQ"] if one_option else []),
               "INT8 MACs: PTQ, QwT", "QwT time / ORT time"]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        v = r["variants"]
        best = v[r["best_ort"]]
        task = lambda key: f"{v[key]['scores']['task']:.4f}" if "task" in v[key]["scores"] else "—"  # noqa: E731
        sqnr = lambda key: f"{v[key]['scores']['sqnr_db']:.1f}" if key in v else "—"  # noqa: E731
        with_db = lambda cell: cell if cell == "—" else f"{cell} dB"  # noqa: E731
        closed = "—"
        if "task" in v["fp32"]["scores"]:
            share = gap_closed(v["fp32"]["scores"]["task"], v["qwt-ptq"]["scores"]["task"], v["qwt"]["scores"]["task"])
            closed = "no gap" if share is None else f"{100 * share:.0f}%"
        cells = [r["name"], r["metric"] or "fidelity only", task("fp32"), task(r["best_ort"]), task("qwt-ptq"), task("qwt"),
                 f"{best['scores']['sqnr_db']:.1f} → {sqnr('qwt-ptq')} → {sqnr('qwt')} dB"
                 f"{' (worst part)' if 'parts_db' in best['scores'] else ''}",
                 *([with_db(sqnr("qwt-branch")), with_db(sqnr("qwt-affine"))] if one_option else []),
                 closed, _latency_ratio(v, "qwt-ptq", "fp32"), _latency_ratio(v, "qwt", "qwt-ptq"),
                 *([f"{_latency_ratio(v, 'qwt-branch', 'qwt-ptq')}; {_latency_ratio(v, 'qwt-affine', 'qwt-ptq')}"]
                   if one_option else []),
                 f"{100 * v['qwt-ptq']['scores']['int8_mac_share']:.0f}%, {100 * v['qwt']['scores']['int8_mac_share']:.0f}%",
                 f"{v['qwt']['seconds'] / v['ort-minmax']['seconds']:.1f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Targets. Issue 3: QwT above ORT's best static INT8 on fidelity for every model; at least half",
              "of the FP32-to-PTQ task-metric gap closed where there is one; QwT quantization within 2× of",
              "quantize_static (min-max) time. Issue 6: the PTQ model at most 0.7× FP32 latency and the QwT",
              "model at most 1.05× the PTQ model's, at batch 1 and 16. Issue 15: the default QwT model (auto",
              "compensation) at most 1.02× the PTQ model's latency at batch 1 and 16, and on the transformers",
              "within 0.2 dB of the branches-only model; the folds-only model above PTQ on fidelity, its latency",
              "the PTQ model's (at most 1.02×, the noise of these timings).", ""]
    lines += _target_lines(results)
    lines += _portable_lines(results)
    lines += LATENCY_NOTES
    lines += _granularity_lines(results)
    lines += _memory_lines(os.path.join(os.path.dirname(args.out), "memory.json"))
    for r in results:
        lines += _model_section(r)
    lines += ["", f"![fidelity versus latency]({_plot_name(args.out)})", ""]
    return "\n".join(lines)


LATENCY_NOTES = """
### Where latency targets are missed: why, and what would fix it

The kernel tables in each model's section (one profiled batch-1 run per model) show three causes.

- **Activations that onnxruntime cannot run on uint8.** Its CPU provider fuses a QDQ Conv only
  into QLinearConv with a quantized output, absorbing at most a Relu. A GELU, and a SiLU or a
  hard-swish whose gate and product are left float, run between a DequantizeLinear and a
  QuantizeLinear: three or four element-wise passes over each feature map that the FP32 model
  fuses into its convolutions for free (its Conv rows have no such kernels). The INT8
  convolutions themselves take a third (batch 16) to two thirds (batch 1) of the FP32 ones'
  time, and the element-wise passes eat that up. With the gate and the product quantized
  (`--residuals auto`, where held-out samples allow) they run on uint8: YOLOv8n's 57 SiLUs as
  QLinearSigmoid and QLinearMul, PP-LCNet's hard-swishes (`orientation`) as QLinearAdd (the
  HardSigmoid written as an Add whose quantizer's saturation clips) and QLinearMul, still two
  passes over the uint8 map where FP32 fuses them into the convolution; a GELU has no such form.
  A uint8 lookup table via Gather measured 6× slower than DequantizeLinear → HardSwish →
  QuantizeLinear on a 16×32×112×112 map; the whole fix is a QLinearConv with fused activation
  in the runtime, as TensorRT builds them.
- **Float decoders.** `vit-s`'s ConvTranspose and Resize decoder (about 40% of its PTQ time) stays
  float: onnxruntime's CPU provider has no INT8 ConvTranspose kernel (Q/DQ around one measured
  2.5× slower than the float op), so nothing is gained by quantizing it.
- **Dense layers (fixed in 94cf37b).** onnxruntime turns a 2-D MatMul and the Add after it
  into a Gemm before its QDQ fusions, and fuses a QDQ Gemm into QGemm only with an int32 bias:
  MTCNN's four dense layers ran as float Gemms on weights dequantized on every call (its PTQ
  model's kernels took 2.27 ms at batch 1 against FP32's 0.67). Written as Gemms with int32
  biases, they and the dense heads' branches run as QGemm.
- **Branches on small CNN blocks.** An int8 feature-map branch adds a QLinearConv and, where the
  block output is quantized, a QLinearAdd (otherwise a DequantizeLinear and a float Add): two
  or three kernels beside blocks of a handful, each a pass over the feature map. A transformer
  layer's branch (one MatMulIntegerToFloat, two Adds) sits beside some thirty kernels. What
  would fix it: fewer, larger blocks on CNNs, or merging a branch into its block's last
  convolution where the block ends in one (one convolution over the block's input and its
  last input, concatenated); neither is done yet. The default `--compensation auto` folds a
  channel-wise affine into the block's last convolution or normalization instead (no kernel
  added) where the fold removes at least `--min-gain` (10%) of the block's held-out error and
  0.95 of what the branch would; the branches-only column shows what the branches alone cost.
""".splitlines()


def _portable_lines(results: list[dict]) -> list[str]:
    """Issue 11: the same models on an emulated AVX2-only CPU, and what the portable weight range costs."""
    if not all("qwt-full" in r["variants"] for r in results):  # --headline: no full-range or uncorrected variants
        return []
    lines = ["", "## Portable INT8: the same models on an AVX2-only CPU", "",
             "SQNR to FP32 (dB) of each model run natively (on its run's CPU, named above with its VNNI extensions) and on an",
             "emulated AVX2-only CPU (`qemu-x86_64 -cpu Haswell`: no VNNI, so onnxruntime's uint8 × int8 kernels",
             "add adjacent weight pairs in int16 with saturation), on the first evaluation samples; and what the",
             "portable weight range (the default) costs against full-range int8 weights, natively on the whole",
             "evaluation set; and bias correction on the PTQ model: its gain on held-out calibration samples, for",
             "which `--bias-correction auto` (the default) keeps or drops it, and the written model's difference",
             "to the uncorrected one on the evaluation set.", "",
             "| model | samples | ORT best: native → AVX2 | qwt PTQ: native → AVX2 | QwT: native → AVX2 | "
             "QwT, full-range weights: native → AVX2 | portable weights' cost natively: PTQ, QwT | bias correction: held-out gain; evaluation |",
             "|---|---|---|---|---|---|---|---|"]
    targets = []
    for r in results:
        v = r["variants"]
        cost = [v[f"{key}-full"]["scores"]["sqnr_db"] - v[key]["scores"]["sqnr_db"] for key in ("qwt-ptq", "qwt")]
        budget = 1.0 if r["name"] in TRANSFORMERS else 0.5
        checks = [(f"portable weights cost ≤ {budget} dB on QwT", cost[1] <= budget)]
        report = v["qwt-ptq"]["report"]
        method = report["method"]
        kept = "kept" if report["bias_corrected"].get(method) else "dropped"
        held = report["bias_correction_gain_db"].get(method)
        effect = v["qwt-ptq"]["scores"]["sqnr_db"] - v["qwt-ptq-no-bc"]["scores"]["sqnr_db"]
        gain = (f"{held:+.2f} dB, {kept}; " if held is not None else "") + f"{effect:+.2f} dB"
        if "sqnr_db_avx2" not in v["qwt"]["scores"]:
            lines.append(f"| {r['name']} | not run: qemu-user is not installed |" + " |" * 4 + f" {cost[0]:+.2f}, {cost[1]:+.2f} dB | {gain} |")
        else:
            pair = lambda key: "{sqnr_db_native_subset:.2f} → {sqnr_db_avx2:.2f}".format(**v[key]["scores"])  # noqa: E731
            lines.append(f"| {r['name']} | {v['qwt']['scores']['avx2_samples']} | {pair(r['best_ort'])} | {pair('qwt-ptq')} | "
                         f"{pair('qwt')} | {pair('qwt-full')} | {cost[0]:+.2f}, {cost[1]:+.2f} dB | {gain} |")
            drift = max(abs(v[k]["scores"]["sqnr_db_native_subset"] - v[k]["scores"]["sqnr_db_avx2"]) for k in ("qwt-ptq", "qwt"))
            checks.insert(0, ("PTQ and QwT within 0.3 dB on AVX2", drift <= 0.3))
        targets.append(f"- **{r['name']}**: " + verdicts(checks))
    return lines + ["", "Targets (issue 11): the written PTQ and QwT models score within 0.3 dB of their native score on",
                    "the AVX2-only CPU; the portable default costs at most 0.5 dB (CNNs) or 1 dB (transformers) on the",
                    "QwT model against full-range weights on a VNNI CPU.", ""] + targets


def _granularity_lines(results: list[dict]) -> list[str]:
    """One compensation per transformer layer (the default) against one per residual branch."""
    rows = [r for r in results if "qwt-residual" in r["variants"]]
    if not rows:
        return []
    lines = ["", "## Block granularity", "",
             "One compensation per transformer layer (`--granularity layer`, the default) against one per",
             "residual branch (attention, MLP: `--granularity residual`), on the models where they differ.", "",
             "| model | SQNR per layer | SQNR per residual branch | added params per layer | per residual branch |",
             "|---|---|---|---|---|"]
    for r in rows:
        v = r["variants"]
        fp32_params = v["qwt"]["report"]["fp32_parameters"]
        cells = []
        for key in ("qwt", "qwt-residual"):
            applied = v[key]["report"]["qwt_applied"]
            cells.append(f"{v[key]['scores']['sqnr_db']:.2f} dB" + ("" if applied else " (PTQ written)"))
        params = [f"{100 * v[k]['report']['added_parameters'] / fp32_params:.1f}%" for k in ("qwt", "qwt-residual")]
        lines.append(f"| {r['name']} | {cells[0]} | {cells[1]} | {params[0]} | {params[1]} |")
    return lines


def _memory_lines(path: str) -> list[str]:
    """Peak memory against calibration samples, from tools/memory.py's last run."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        m = json.load(f)
    lines = ["", "## Peak memory versus calibration samples", "",
             f"`python tools/memory.py` on {m['model']}, {m['date']}, on {m['machine']}: qwt_onnx (percentile, with",
             "QwT) and quantize_static (min-max), each in its own process, the same samples.", "",
             "| samples | calibration file MiB | qwt_onnx peak RSS MiB | qwt_onnx s | quantize_static peak RSS MiB | quantize_static s |",
             "|---|---|---|---|---|---|"]
    for row in m["rows"]:
        lines.append(f"| {row['samples']} | {row['calibration_file_mb']:.0f} | {row['qwt_peak_rss_mb']:.0f} | {row['qwt_seconds']:.0f} | "
                     f"{row['ort_peak_rss_mb']:.0f} | {row['ort_seconds']:.0f} |")
    return lines


def _target_lines(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        v = r["variants"]
        checks = []
        fidelity = v["qwt"]["scores"]["sqnr_db"] > v[r["best_ort"]]["scores"]["sqnr_db"]
        checks.append(("fidelity above ORT best", fidelity))
        if "task" in v["fp32"]["scores"]:
            share = gap_closed(v["fp32"]["scores"]["task"], v["qwt-ptq"]["scores"]["task"], v["qwt"]["scores"]["task"])
            checks.append(("half the task gap closed", share is None or share >= 0.5))
        checks.append(("time ≤ 2× quantize_static", v["qwt"]["seconds"] <= 2 * v["ort-minmax"]["seconds"]))
        checks.append(("PTQ ≤ 0.7× FP32 latency", max(_ratios(v, "qwt-ptq", "fp32")) <= 0.7))
        checks.append(("QwT ≤ 1.05× PTQ latency", max(_ratios(v, "qwt", "qwt-ptq")) <= 1.05))
        checks.append(("QwT ≤ 1.02× PTQ latency", max(_ratios(v, "qwt", "qwt-ptq")) <= 1.02))
        if r["name"] in TRANSFORMERS and "qwt-branch" in v:
            checks.append(("within 0.2 dB of branches only", v["qwt"]["scores"]["sqnr_db"] >= v["qwt-branch"]["scores"]["sqnr_db"] - 0.2))
        if "qwt-affine" in v:
            checks.append(("folds above PTQ", v["qwt-affine"]["scores"]["sqnr_db"] > v["qwt-ptq"]["scores"]["sqnr_db"]))
            checks.append(("folds ≤ 1.02× PTQ latency", max(_ratios(v, "qwt-affine", "qwt-ptq")) <= 1.02))
        out.append(f"- **{r['name']}**: " + verdicts(checks))
    return out


def _ratios(v: dict, key: str, base: str) -> tuple[float, float]:
    return tuple(v[key]["scores"][f"latency_{b}_ms"] / v[base]["scores"][f"latency_{b}_ms"] for b in ("b1", "b16"))


def _latency_ratio(v: dict, key: str, base: str) -> str:
    if key not in v or "latency_b1_ms" not in v[key]["scores"]:
        return "—"
    return ", ".join(f"{x:.2f}" for x in _ratios(v, key, base))


def _kernel_lines(r: dict) -> list[str]:
    """Where the time goes at batch 1: per onnxruntime kernel type, FP32 / PTQ / QwT."""
    v = r["variants"]
    profiles = {key: v[key]["scores"].get("kernels") for key in PROFILED}
    if not all(profiles.values()):
        return []
    ops = []
    for profile in profiles.values():
        ops += [op for op in list(profile)[:8] if op not in ops]
    lines = ["", "Kernels at batch 1 (one profiled run; time per kernel type, number of kernels):", "",
             "| kernel | " + " | ".join(LABELS[k] for k in PROFILED) + " |", "|---|" + "---|" * len(PROFILED)]
    for op in ops:
        cells = []
        for key in PROFILED:
            row = profiles[key].get(op)
            cells.append(f"{row['us'] / 1000:.2f} ms ({row['kernels']})" if row else "—")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    totals = [f"{sum(x['us'] for x in profiles[k].values()) / 1000:.2f} ms" for k in PROFILED]
    lines.append("| all kernels | " + " | ".join(totals) + " |")
    return lines + _diagnosis(profiles)


def _split(profile: dict[str, dict]) -> tuple[float, float, int]:
    """Milliseconds in matrix kernels (Conv, MatMul and their INT8 forms), in the rest, and kernel count."""
    matrix = sum(r["us"] for op, r in profile.items() if op in speed.SECOND_OPERAND) / 1000
    rest = sum(r["us"] for op, r in profile.items() if op not in speed.SECOND_OPERAND) / 1000
    return matrix, rest, sum(r["kernels"] for r in profile.values())


def _diagnosis(profiles: dict[str, dict]) -> list[str]:
    """Where PTQ and QwT gain and lose against the model before them, from the kernel profiles."""
    (fm, fr, fk), (pm, pr, pk), (qm, qr, qk) = (_split(profiles[k]) for k in PROFILED)
    return ["", f"Matrix kernels (Conv, MatMul, Gemm and their INT8 forms) against the rest, at batch 1: FP32 "
            f"{fm:.2f} + {fr:.2f} ms in {fk} kernels; PTQ {pm:.2f} + {pr:.2f} ms in {pk}; QwT {qm:.2f} + {qr:.2f} ms "
            f"in {qk}."]


def _model_section(r: dict) -> list[str]:
    v = r["variants"]
    fp32_params = next((x["report"]["fp32_parameters"] for x in v.values() if x["report"]), None)
    part_names = list(v["fp32"]["scores"].get("parts_db", {}))
    columns = ["variant"] + ([r["metric"]] if r["metric"] else []) + ["SQNR dB"] + [f"{p} dB" for p in part_names] + ["cosine"]
    columns += (["top-1 agreement"] if r["classifier"] else []) + [
        "quantize s", "peak RSS MiB", "latency b1 ms", "b16 ms", "b1, b16 vs FP32", "INT8 MACs", "added params"]
    decided = (f" Its task needs {' and '.join(part_names)}: the summary's SQNR is the worst of them, "
               "as it is for every choice qwt_onnx makes (--outputs); the SQNR column pools the whole output.") if part_names else ""
    lines = ["", f"## {r['name']}", "", f"{r['description']}. {r['calibration_samples']} calibration samples, "
             f"{r['evaluation_samples']} evaluation samples.{decided}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    fp = v["fp32"]["scores"]
    for key, x in v.items():
        s = x["scores"]
        row = [LABELS[key] + (" (best)" if key == r["best_ort"] else "")]
        if r["metric"]:
            row.append(f"{s['task']:.4f}")
        row += [f"{db:.2f}" if np.isfinite(db) else "∞" for db in (s.get("pooled_sqnr_db", s["sqnr_db"]), *s.get("parts_db", {}).values())]
        row.append(f"{s['cosine']:.5f}")
        if r["classifier"]:
            row.append(f"{s['agreement']:.3f}")
        added = x["report"]["added_parameters"] / fp32_params if x["report"] and fp32_params else 0.0
        row += [f"{x['seconds']:.0f}" if key != "fp32" else "—", f"{x['peak_rss_mb']:.0f}" if key != "fp32" else "—"]
        if "latency_b1_ms" in s:
            row += [f"{s['latency_b1_ms']:.1f}", f"{s['latency_b16_ms']:.1f}",
                    f"{s['latency_b1_ms'] / fp['latency_b1_ms']:.2f}, {s['latency_b16_ms'] / fp['latency_b16_ms']:.2f}",
                    f"{100 * s['int8_mac_share']:.0f}%"]
        else:  # the kernels of its twin: full-range weights, or other biases
            row += ["as qwt_onnx's"] * 4
        row.append(f"{100 * added:.1f}%" if x["report"] else "—")
        lines.append("| " + " | ".join(row) + " |")
    for key, why in r["unfinished"].items():
        lines.append(f"| {LABELS[key]} | {why} |" + " |" * (len(columns) - 2))
    qwt = v["qwt"]["report"]
    if qwt:
        without = "the PTQ model with layer folds" if qwt.get("layer_folds_written") else "the PTQ model"
        outcome = "" if qwt["qwt_applied"] else (f"; QwT did not beat {without} by what a written QwT needs on the held-out "
                                                 f"samples, so {without} was written")
        weights = ", bias-corrected weights" if qwt.get("qwt_bias_corrected") else ""
        fitted = f"fitted on {qwt.get('qwt_method') or qwt['method']} calibration{weights}, {qwt.get('fit_samples', qwt['samples'])} samples"
        gain = qwt.get("layer_folds_gain_db")
        folds = (f" Layer folds (QwT-v2, step 7): {qwt['layer_folds']} of {qwt['layer_fold_layers']} layers, written"
                 + (f" ({gain:+.2f} dB held out)." if gain is not None else ".") if qwt.get("layer_folds_written") else "")
        lines += ["", f"QwT: {len(qwt['blocks'])} blocks, {fitted}{outcome}.{folds}"]
    return lines + _kernel_lines(r)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8), squeeze=False)
    for ax, r in zip(axes[0], results):
        for key, x in r["variants"].items():
            s = x["scores"]
            if not np.isfinite(s["sqnr_db"]) or "latency_b1_ms" not in s:
                continue
            ax.scatter(s["latency_b1_ms"], s["sqnr_db"], label=LABELS[key], s=40)
        ax.set_title(r["name"])
        ax.set_xlabel("latency, batch 1 (ms)")
        ax.set_ylabel("SQNR to FP32 (dB)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 samples, 16 evaluation samples, min-max baseline only")
    parser.add_argument("--models", default=",".join(zoo.ENTRIES), help="comma-separated zoo names")
    parser.add_argument("--samples", type=int, help="calibration samples (default 512, or 32 with --quick)")
    parser.add_argument("--granularity", action="store_true",
                        help="also one block per residual branch (--granularity residual) where it differs")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "BENCHMARKS.md"))
    parser.add_argument("--headline", action="store_true",
                        help="only quantize_static, qwt_onnx --no-qwt and qwt_onnx, not emulated (the README's Results table)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of models not run from the existing results (each row names its run)")
    args = parser.parse_args()
    samples = args.samples or (QUICK_SAMPLES if args.quick else zoo.CALIBRATION_SAMPLES)
    started = time.perf_counter()
    results = earlier_results(args.out) if args.merge else []
    log = lambda m: print(m, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="qwt-bench-") as folder:
        for name in args.models.split(","):
            print(f"{name}:", flush=True)
            result = bench_model(name, samples, args.quick, args.granularity, folder, log, args.headline)
            names = [r["name"] for r in results]  # a re-run model keeps its row's place
            results = [result if r["name"] == name else r for r in results] if name in names else [*results, result]
            write(results, args, (time.perf_counter() - started) / 60)  # after each model: a crash keeps the rest
    minutes = (time.perf_counter() - started) / 60
    write(results, args, minutes)
    print(f"wrote {args.out} in {minutes:.1f} minutes")


def earlier_results(out: str) -> list[dict]:
    path = os.path.splitext(out)[0] + ".json"
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def write(results: list[dict], args, minutes: float) -> None:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(markdown(results, args, minutes))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(os.path.dirname(args.out), _plot_name(args.out)))


def _plot_name(out: str) -> str:
    """The plot beside ``out``: benchmarks.png beside BENCHMARKS.md."""
    return os.path.splitext(os.path.basename(out))[0].lower() + ".png"


if __name__ == "__main__":
    main()

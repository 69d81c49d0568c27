"""Benchmark qwt_onnx against onnxruntime's quantize_static on the zoo's real models.

    python tools/bench.py            # every zoo model, 512 calibration samples (under 30 minutes)
    python tools/bench.py --quick    # 32 samples, 16 evaluation samples, min-max baseline only

For each model, on the same calibration and evaluation data and in one run:
FP32; onnxruntime quantize_static (QDQ, per-channel) with min-max, percentile
and entropy calibration; qwt_onnx --no-qwt; qwt_onnx with QwT; and QwT on top
of onnxruntime's best QDQ model (--quantized). Every quantizer runs in its own
process so its wall time and peak memory (RSS) are its own. Writes
docs/BENCHMARKS.md and docs/benchmarks.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

from qwt_onnx import zoo
from qwt_onnx.metrics import float_outputs
from qwt_onnx.runtime import Runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORT_METHODS = ("minmax", "percentile", "entropy")
HISTOGRAM_TIMEOUT = 40  # seconds for onnxruntime's percentile / entropy calibration
# onnxruntime's histogram calibrators took over 40 s on every model whose min-max run took
# over 20 s (over 10 minutes on vit-s); there they are not run, and the table says so.
HISTOGRAM_SKIP_AFTER = 20.0
QUICK_SAMPLES, QUICK_EVALUATION = 32, 16
FULL_EVALUATION = 192  # evaluation samples per model at most
LABELS = {
    "fp32": "FP32",
    "ort-minmax": "ORT quantize_static, min-max",
    "ort-percentile": "ORT quantize_static, percentile",
    "ort-entropy": "ORT quantize_static, entropy",
    "qwt-ptq": "qwt_onnx --no-qwt (PTQ)",
    "qwt": "qwt_onnx QwT",
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


def outputs_of(model: str, feeds: dict[str, np.ndarray], batch_size: int = 16):
    """The model's outputs, batch by batch."""
    runner = Runner(model)
    count = len(next(iter(feeds.values())))
    for i in range(0, count, batch_size):
        yield runner({k: v[i : i + batch_size] for k, v in feeds.items()})


def score(entry, reference: list[dict], model: str, feeds, labels) -> dict:
    """Fidelity to FP32 (SQNR, cosine, top-1 agreement), summed batch by batch, and the task metric."""
    signal = noise = dot = norm_test = agree = 0.0
    first, kept = None, []
    for ref, out in zip(reference, outputs_of(model, feeds)):
        first = first or next(iter(ref))
        for name, y in float_outputs(ref):  # token ids or masks passed through carry no signal
            y32, t32 = y.astype(np.float32).ravel(), out[name].astype(np.float32).ravel()
            signal += float(np.dot(y32, y32))
            noise += float(np.dot(y32 - t32, y32 - t32))
            dot += float(np.dot(y32, t32))
            norm_test += float(np.dot(t32, t32))
        agree += float(np.sum(ref[first].argmax(-1) == out[first].argmax(-1)))
        if entry.task_metric is not None and labels is not None:
            kept.append(out[first])
    count = sum(len(r[first]) for r in reference)
    result = {"sqnr_db": 10 * np.log10(signal / noise) if noise > 0 else float("inf"),
              "cosine": dot / np.sqrt(signal * norm_test)}
    if entry.classifier:
        result["agreement"] = agree / count
    if kept:
        result["task"] = float(entry.task_metric(np.concatenate(kept), labels))
    return result


def latency_ms(model: str, feeds: dict[str, np.ndarray], batch: int, runs: int) -> float:
    """Median wall time of ``runs`` runs at ``batch`` samples: onnxruntime CPU, all optimizations,
    its default threading (as deployed, unlike the capture's sessions)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    inputs = {k: np.ascontiguousarray(np.resize(v, (batch, *v.shape[1:]))) for k, v in feeds.items()}
    sess.run(None, inputs)  # warm-up: memory arenas, lazy kernel setup
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, inputs)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def bench_model(name: str, samples: int, quick: bool, folder: str, log) -> dict:
    entry = zoo.get(name)
    prepared = zoo.prepare(name)
    feeds, labels = zoo.load_evaluation(prepared)
    count = QUICK_EVALUATION if quick else FULL_EVALUATION
    feeds = {k: v[:count] for k, v in feeds.items()}
    labels = None if labels is None else labels[:count]
    python = sys.executable
    variants = {"fp32": Variant("fp32", prepared.model)}

    def ours(key: str, *extra: str) -> None:
        out, report = os.path.join(folder, f"{name}-{key}.onnx"), os.path.join(folder, f"{name}-{key}.json")
        command = [python, "-m", "qwt_onnx", prepared.model, out, "--calib", prepared.calibration,
                   "--samples", str(samples), "--report", report, "-q", *extra]
        seconds, rss = run_measured(command)
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
    if not quick and granularities_differ(prepared.model):  # with the calibration QwT chose, so only granularity differs
        ours("qwt-residual", "--granularity", "residual", "--calib-method", variants["qwt"].report["method"])

    reference = list(outputs_of(prepared.model, feeds))
    for variant in variants.values():
        variant.scores = score(entry, reference, variant.path, feeds, labels)
    ort_keys = [k for k in variants if k.startswith("ort-")]
    best_ort = max(ort_keys, key=lambda k: variants[k].scores["sqnr_db"])
    ours("qwt-on-ort", "--quantized", variants[best_ort].path)
    variants["qwt-on-ort"].scores = score(entry, reference, variants["qwt-on-ort"].path, feeds, labels)

    for variant in variants.values():
        variant.scores["latency_b1_ms"] = latency_ms(variant.path, feeds, 1, 3 if quick else 12)
        variant.scores["latency_b16_ms"] = latency_ms(variant.path, feeds, 16, 3 if quick else 3)
    log(f"  evaluated {len(variants)} variants on {len(next(iter(feeds.values())))} samples")
    return {
        "name": name,
        "description": entry.description,
        "metric": entry.metric_name,
        "classifier": entry.classifier,
        "calibration_samples": samples,
        "evaluation_samples": len(next(iter(feeds.values()))),
        "best_ort": best_ort,
        "unfinished": unfinished,
        "variants": {k: dataclasses.asdict(v) for k, v in variants.items()},
    }


def granularities_differ(path: str) -> bool:
    """Whether one block per residual branch differs from one per transformer layer on this model."""
    from qwt_onnx.passes import blocks, prepare

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
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, onnxruntime {ort.__version__}"


def markdown(results: list[dict], args, minutes: float) -> str:
    today = datetime.date.today().isoformat()
    mode = "quick" if args.quick else "full"
    lines = [
        "# Benchmarks",
        "",
        f"`python tools/bench.py{' --quick' if args.quick else ''}` ({mode} run, {minutes:.0f} minutes), {today}, on {machine()}.",
        "",
        "Every variant is quantized from the same FP32 model with the same calibration samples and",
        "evaluated on the same evaluation samples, which calibration never sees. Fidelity is measured",
        "against the FP32 model's outputs: SQNR = 10·log10(‖y‖² / ‖y − ŷ‖²). Quantization time and",
        "peak memory (RSS) are those of the quantizer's own process; latency is the median of",
        "onnxruntime CPU runs (ORT_ENABLE_ALL) at batch 1 and 16. \"ORT best\" is the one of",
        "onnxruntime's three calibration methods with the highest SQNR on the evaluation set, the",
        "most favourable choice for the baseline.",
        "",
        "## Summary",
        "",
        "| model | task metric | FP32 | ORT best | qwt PTQ | QwT | QwT on ORT | SQNR: ORT best → QwT | gap closed | QwT time / ORT time | QwT latency / PTQ (b1, b16) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        v = r["variants"]
        best = v[r["best_ort"]]
        task = lambda key: f"{v[key]['scores']['task']:.4f}" if "task" in v[key]["scores"] else "—"  # noqa: E731
        closed = "—"
        if "task" in v["fp32"]["scores"]:
            share = gap_closed(v["fp32"]["scores"]["task"], v["qwt-ptq"]["scores"]["task"], v["qwt"]["scores"]["task"])
            closed = "no gap" if share is None else f"{100 * share:.0f}%"
        ort_time = v["ort-minmax"]["seconds"]
        lines.append(
            f"| {r['name']} | {r['metric'] or 'fidelity only'} | {task('fp32')} | {task(r['best_ort'])} | {task('qwt-ptq')} | "
            f"{task('qwt')} | {task('qwt-on-ort')} | {best['scores']['sqnr_db']:.1f} → {v['qwt']['scores']['sqnr_db']:.1f} dB | "
            f"{closed} | {v['qwt']['seconds'] / ort_time:.1f}× | "
            f"{v['qwt']['scores']['latency_b1_ms'] / v['qwt-ptq']['scores']['latency_b1_ms']:.2f}, "
            f"{v['qwt']['scores']['latency_b16_ms'] / v['qwt-ptq']['scores']['latency_b16_ms']:.2f} |"
        )
    lines += ["", "Targets (issue 3): QwT above ORT's best static INT8 on fidelity for every model; at least half of",
              "the FP32-to-PTQ task-metric gap closed where there is one; QwT quantization within 2× of",
              "quantize_static (min-max) time; QwT latency within 10% of the PTQ model's.", ""]
    lines += _target_lines(results)
    lines += _granularity_lines(results)
    lines += _memory_lines(os.path.join(os.path.dirname(args.out), "memory.json"))
    for r in results:
        lines += _model_section(r)
    lines += ["", "![fidelity versus latency](benchmarks.png)", ""]
    return "\n".join(lines)


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
        ratio = max(v["qwt"]["scores"][f"latency_{b}_ms"] / v["qwt-ptq"]["scores"][f"latency_{b}_ms"] for b in ("b1", "b16"))
        checks.append(("latency within 10% of PTQ", ratio <= 1.10))
        out.append(f"- **{r['name']}**: " + "; ".join(f"{label} {'met' if ok else '**missed**'}" for label, ok in checks))
    return out


def _model_section(r: dict) -> list[str]:
    v = r["variants"]
    fp32_params = next((x["report"]["fp32_parameters"] for x in v.values() if x["report"]), None)
    columns = ["variant"] + ([r["metric"]] if r["metric"] else []) + ["SQNR dB", "cosine"]
    columns += (["top-1 agreement"] if r["classifier"] else []) + [
        "quantize s", "peak RSS MiB", "latency b1 ms", "b16 ms", "b1, b16 vs FP32", "added params"]
    lines = ["", f"## {r['name']}", "", f"{r['description']}. {r['calibration_samples']} calibration samples, "
             f"{r['evaluation_samples']} evaluation samples.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    fp = v["fp32"]["scores"]
    for key, x in v.items():
        s = x["scores"]
        row = [LABELS[key] + (" (best)" if key == r["best_ort"] else "")]
        if r["metric"]:
            row.append(f"{s['task']:.4f}")
        row += [f"{s['sqnr_db']:.2f}" if np.isfinite(s["sqnr_db"]) else "∞", f"{s['cosine']:.5f}"]
        if r["classifier"]:
            row.append(f"{s['agreement']:.3f}")
        added = x["report"]["added_parameters"] / fp32_params if x["report"] and fp32_params else 0.0
        row += [f"{x['seconds']:.0f}" if key != "fp32" else "—", f"{x['peak_rss_mb']:.0f}" if key != "fp32" else "—",
                f"{s['latency_b1_ms']:.1f}", f"{s['latency_b16_ms']:.1f}",
                f"{s['latency_b1_ms'] / fp['latency_b1_ms']:.2f}, {s['latency_b16_ms'] / fp['latency_b16_ms']:.2f}",
                f"{100 * added:.1f}%" if x["report"] else "—"]
        lines.append("| " + " | ".join(row) + " |")
    for key, why in r["unfinished"].items():
        lines.append(f"| {LABELS[key]} | {why} |" + " |" * (len(columns) - 2))
    qwt = v["qwt"]["report"]
    if qwt:
        outcome = "" if qwt["qwt_applied"] else "; QwT did not beat PTQ on held-out samples, so the PTQ model was written"
        lines += ["", f"QwT: {len(qwt['blocks'])} blocks, calibration {qwt['method']}{outcome}."]
    return lines


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8), squeeze=False)
    for ax, r in zip(axes[0], results):
        for key, x in r["variants"].items():
            s = x["scores"]
            if not np.isfinite(s["sqnr_db"]):
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
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "BENCHMARKS.md"))
    args = parser.parse_args()
    samples = args.samples or (QUICK_SAMPLES if args.quick else zoo.CALIBRATION_SAMPLES)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="qwt-bench-") as folder:
        for name in args.models.split(","):
            print(f"{name}:", flush=True)
            results.append(bench_model(name, samples, args.quick, folder, lambda m: print(m, flush=True)))
            write(results, args, (time.perf_counter() - started) / 60)  # after each model: a crash keeps the rest
    minutes = (time.perf_counter() - started) / 60
    write(results, args, minutes)
    print(f"wrote {args.out} in {minutes:.1f} minutes")


def write(results: list[dict], args, minutes: float) -> None:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(markdown(results, args, minutes))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(os.path.dirname(args.out), "benchmarks.png"))


if __name__ == "__main__":
    main()

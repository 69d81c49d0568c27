"""Benchmark qwt_onnx against onnxruntime's quantize_static on the zoo's real models.

    python tools/bench.py            # every zoo model, 512 calibration samples (under 30 minutes)
    python tools/bench.py --quick    # 64 samples, small evaluation sets, min-max baseline only

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
from qwt_onnx.metrics import sqnr_db
from qwt_onnx.runtime import Runner, session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORT_METHODS = ("minmax", "percentile", "entropy")
LABELS = {
    "fp32": "FP32",
    "ort-minmax": "ORT quantize_static, min-max",
    "ort-percentile": "ORT quantize_static, percentile",
    "ort-entropy": "ORT quantize_static, entropy",
    "qwt-ptq": "qwt_onnx --no-qwt (PTQ)",
    "qwt": "qwt_onnx QwT",
    "qwt-on-ort": "QwT on ORT's best QDQ",
}


@dataclasses.dataclass
class Variant:
    key: str
    path: str
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    report: dict | None = None
    scores: dict = dataclasses.field(default_factory=dict)


def run_measured(command: list[str]) -> tuple[float, float]:
    """Run ``command`` to completion: (wall seconds, peak RSS in MiB) of that process alone."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    stderr = process.stderr.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-2000:]}")
    return seconds, usage.ru_maxrss / 1024.0


def outputs_of(model: str, feeds: dict[str, np.ndarray], batch_size: int = 16) -> dict[str, np.ndarray]:
    runner = Runner(model)
    count = len(next(iter(feeds.values())))
    parts = [runner({k: v[i : i + batch_size] for k, v in feeds.items()}) for i in range(0, count, batch_size)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def score(entry, reference, outputs, labels) -> dict:
    """Fidelity to FP32 (SQNR, cosine, top-1 agreement) and the task metric."""
    first = next(iter(reference))
    a = np.concatenate([v.astype(np.float64).ravel() for v in reference.values()])
    b = np.concatenate([outputs[k].astype(np.float64).ravel() for k in reference])
    result = {"sqnr_db": sqnr_db(reference, outputs), "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))}
    if entry.classifier:
        result["agreement"] = float(np.mean(reference[first].argmax(-1) == outputs[first].argmax(-1)))
    if entry.task_metric is not None and labels is not None:
        result["task"] = float(entry.task_metric(outputs[first], labels))
    return result


def latency_ms(model: str, feeds: dict[str, np.ndarray], batch: int, seconds: float) -> float:
    """Median wall time of one run at ``batch`` samples, onnxruntime CPU, all optimizations."""
    sess = session(model)
    inputs = {k: np.ascontiguousarray(v[:batch]) for k, v in feeds.items()}
    for _ in range(2):
        sess.run(None, inputs)
    times, deadline = [], time.perf_counter() + seconds
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 200):
        start = time.perf_counter()
        sess.run(None, inputs)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def bench_model(name: str, samples: int, quick: bool, folder: str, log) -> dict:
    entry = zoo.get(name)
    prepared = zoo.prepare(name)
    feeds, labels = zoo.load_evaluation(prepared)
    if quick:
        feeds = {k: v[:32] for k, v in feeds.items()}
        labels = None if labels is None else labels[:32]
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

    for method in ORT_METHODS[:1] if quick else ORT_METHODS:
        out = os.path.join(folder, f"{name}-ort-{method}.onnx")
        command = [python, os.path.join(ROOT, "tools", "ort_baseline.py"), prepared.model, out,
                   "--calib", prepared.calibration, "--method", method, "--samples", str(samples)]
        seconds, rss = run_measured(command)
        variants[f"ort-{method}"] = Variant(f"ort-{method}", out, seconds, rss)
        log(f"  ort-{method}: {seconds:.0f} s, {rss:.0f} MiB")
    ours("qwt-ptq", "--no-qwt")
    ours("qwt")

    reference = outputs_of(prepared.model, feeds)
    for variant in variants.values():
        variant.scores = score(entry, reference, outputs_of(variant.path, feeds), labels)
    ort_keys = [k for k in variants if k.startswith("ort-")]
    best_ort = max(ort_keys, key=lambda k: variants[k].scores["sqnr_db"])
    ours("qwt-on-ort", "--quantized", variants[best_ort].path)
    variants["qwt-on-ort"].scores = score(entry, reference, outputs_of(variants["qwt-on-ort"].path, feeds), labels)

    for variant in variants.values():
        budget = 1.0 if quick else 4.0
        variant.scores["latency_b1_ms"] = latency_ms(variant.path, feeds, 1, budget)
        variant.scores["latency_b16_ms"] = latency_ms(variant.path, feeds, 16, budget)
    log(f"  evaluated {len(variants)} variants on {len(next(iter(feeds.values())))} samples")
    return {
        "name": name,
        "description": entry.description,
        "metric": entry.metric_name,
        "classifier": entry.classifier,
        "calibration_samples": samples,
        "evaluation_samples": len(next(iter(feeds.values()))),
        "best_ort": best_ort,
        "variants": {k: dataclasses.asdict(v) for k, v in variants.items()},
    }


def gap_closed(fp32: float, ptq: float, qwt: float) -> float | None:
    """The share of the FP32-to-PTQ gap that QwT closes (None when there is no gap)."""
    gap = fp32 - ptq
    return None if abs(gap) < 1e-9 else (qwt - ptq) / gap


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
    for r in results:
        lines += _model_section(r)
    lines += ["", "![fidelity versus latency](benchmarks.png)", ""]
    return "\n".join(lines)


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
    header = "| variant | " + (f"{r['metric']} | " if r["metric"] else "") + "SQNR dB | cosine | " + (
        "top-1 agreement | " if r["classifier"] else "") + "quantize s | peak RSS MiB | latency b1 ms | b16 ms | b1, b16 vs FP32 | added params |"
    lines = ["", f"## {r['name']}", "", f"{r['description']}. {r['calibration_samples']} calibration samples, "
             f"{r['evaluation_samples']} evaluation samples.", "", header, "|" + "---|" * header.count("|")[:-1] if False else ""]
    lines[-1] = "|" + "---|" * (header.count("|") - 1)
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
    qwt = v["qwt"]["report"]
    if qwt:
        lines.append("")
        lines.append(f"QwT: {len(qwt['blocks'])} blocks, calibration {qwt['method']}"
                     + ("" if qwt["qwt_applied"] else " — QwT did not beat PTQ on held-out samples, so the PTQ model was written")
                     + ".")
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
    parser.add_argument("--quick", action="store_true", help="64 samples, 32 evaluation samples, min-max baseline only")
    parser.add_argument("--models", default=",".join(zoo.ENTRIES), help="comma-separated zoo names")
    parser.add_argument("--samples", type=int, help="calibration samples (default 512, or 64 with --quick)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "BENCHMARKS.md"))
    args = parser.parse_args()
    samples = args.samples or (64 if args.quick else zoo.CALIBRATION_SAMPLES)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="qwt-bench-") as folder:
        for name in args.models.split(","):
            print(f"{name}:", flush=True)
            results.append(bench_model(name, samples, args.quick, folder, lambda m: print(m, flush=True)))
    minutes = (time.perf_counter() - started) / 60
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(markdown(results, args, minutes))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(os.path.dirname(args.out), "benchmarks.png"))
    print(f"wrote {args.out} in {minutes:.1f} minutes")


if __name__ == "__main__":
    main()

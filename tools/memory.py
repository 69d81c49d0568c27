"""Peak memory against the number of calibration samples, qwt_onnx beside onnxruntime's quantize_static.

    python tools/memory.py                       # orientation at 256, 512 and 2048 samples
    python tools/memory.py --model vit-s --samples 256,512

Each quantizer runs in its own process; its peak RSS is the kernel's high-water
mark (VmHWM). qwt_onnx runs with one calibration method (percentile), as the
comparison of methods does not change what is held in memory. Writes
docs/memory.json, which tools/bench.py puts into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile

from bench import ROOT, machine, run_measured

from qwt_onnx import zoo


def measure(name: str, counts: list[int], log) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="qwt-memory-") as folder:
        for count in counts:
            prepared = zoo.prepare(name, count)
            size_mb = os.path.getsize(prepared.calibration) / 2**20
            out = os.path.join(folder, "out.onnx")
            ours = [sys.executable, "-m", "qwt_onnx", prepared.model, out, "--calib", prepared.calibration,
                    "--samples", str(count), "--calib-method", "percentile", "-q"]
            ort = [sys.executable, os.path.join(ROOT, "tools", "ort_baseline.py"), prepared.model, out,
                   "--calib", prepared.calibration, "--method", "minmax", "--samples", str(count)]
            seconds, peak = run_measured(ours)
            ort_seconds, ort_peak = run_measured(ort)
            rows.append({"samples": count, "calibration_file_mb": size_mb, "qwt_peak_rss_mb": peak, "qwt_seconds": seconds,
                         "ort_peak_rss_mb": ort_peak, "ort_seconds": ort_seconds})
            log(f"  {count} samples: qwt_onnx {peak:.0f} MiB in {seconds:.0f} s, quantize_static {ort_peak:.0f} MiB in {ort_seconds:.0f} s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="orientation")
    parser.add_argument("--samples", default="256,512,2048", help="comma-separated sample counts")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "memory.json"))
    args = parser.parse_args()
    print(f"{args.model}:", flush=True)
    rows = measure(args.model, [int(c) for c in args.samples.split(",")], lambda m: print(m, flush=True))
    result = {"model": args.model, "date": datetime.date.today().isoformat(), "machine": machine(), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

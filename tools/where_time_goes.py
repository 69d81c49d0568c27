"""Where a qwt_onnx run's time goes: onnxruntime runs, session builds, numpy, I/O.

    python tools/where_time_goes.py zoo:orientation [--samples 512] [--no-qwt] [--top 20]
    python tools/where_time_goes.py model.onnx --calib calib.npz

Runs ``qwt_onnx.quantize_with_report`` under cProfile and prints the wall time of the whole run,
the time inside each of the pipeline's steps, and the time inside each category of calls, so
that a change to the pipeline can be judged by where it moved the time.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

# (category, [(file ending, function name)]): each function's cumulative time counts once, in the
# first category that names it; the categories do not call one another.
CATEGORIES = [
    ("onnxruntime: run", [("onnxruntime_inference_collection.py", "run")]),
    ("onnxruntime: session build", [("onnxruntime_inference_collection.py", "__init__")]),
    ("serialise / copy models", [("serde.py", "serialize_model"), ("serde.py", "deserialize_model"),
                                 ("_core.py", "clone"), ("runtime.py", "with_outputs")]),
    ("spills and saves (file I/O)", [("capture.py", "save"), ("capture.py", "load"), ("prepare.py", "save_atomically")]),
    ("normal equations (numpy)", [("solver.py", "update"), ("solver.py", "update_columns")]),
    ("solver (numpy)", [("solver.py", "fit_grouped_compensation"), ("solver.py", "with_stored_weights")]),
    ("branch application (numpy)", [("compensation.py", "apply")]),
    ("range statistics (numpy)", [("ranges.py", "update"), ("observe.py", "update")]),
    ("range choice (numpy)", [("ranges.py", "compute_range")]),
    ("Q/DQ and splice passes", [("qdq.py", "call"), ("splice.py", "call")]),
    ("sub-model extraction", [("extract.py", "extract")]),
]
# The pipeline's steps (nested: an evaluation runs inside a step).
STEPS = [
    ("load and prepare", [("inputs.py", "load_fp32")]),
    ("observe ranges (FP32 pass)", [("observe.py", "observe")]),
    ("evaluate on held-out samples", [("observe.py", "heldout_outputs")]),
    ("PTQ candidates, evaluation included", [("ptq.py", "ptq_candidates")]),
    ("QwT trial on the first samples", [("qwt.py", "_select")]),
    ("capture and fit (all runs)", [("capture.py", "fit_blocks")]),
    ("write", [("prepare.py", "save_atomically")]),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an FP32 model, or zoo:NAME")
    parser.add_argument("--calib", help="calibration .npz (not needed for zoo:NAME)")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--top", type=int, default=0, help="also print the N functions with the most own time")
    parser.add_argument("--no-qwt", action="store_true")
    args = parser.parse_args(argv)

    from qwt_onnx import quantize_with_report
    from qwt_onnx.__main__ import resolve_inputs

    model, calib = resolve_inputs(argparse.Namespace(input=args.model, calib=args.calib, samples=args.samples))
    profiler = cProfile.Profile()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        profiler.enable()
        _, report = quantize_with_report(model, calib, os.path.join(folder, "out.onnx"), samples=args.samples,
                                         qwt=not args.no_qwt, progress=False)
        profiler.disable()
    wall = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    print(f"{args.model}: {wall:.1f} s wall, {args.samples} samples, QwT {'written' if report.qwt_applied else 'not written'}")
    print("steps:")
    for label, seconds in _by_category(stats, STEPS).items():
        print(f"  {label:<42} {seconds:7.1f} s  {100 * seconds / wall:4.0f}%")
    print("where the time goes:")
    for label, seconds in _by_category(stats, CATEGORIES).items():
        print(f"  {label:<42} {seconds:7.1f} s  {100 * seconds / wall:4.0f}%")
    if args.top:
        stats.sort_stats("tottime").print_stats(args.top)
    return 0


def _by_category(stats: pstats.Stats, categories) -> dict[str, float]:
    totals = {label: 0.0 for label, _ in categories}
    for (filename, _, function), (_, _, _, cumulative, _) in stats.stats.items():
        for label, patterns in categories:
            if any(filename.endswith(file) and function == name for file, name in patterns):
                totals[label] += cumulative
                break
    return totals


if __name__ == "__main__":
    sys.exit(main())

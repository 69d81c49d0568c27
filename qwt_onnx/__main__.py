"""Command line: ``python -m qwt_onnx in.onnx out.onnx --calib calib.npz``."""

from __future__ import annotations

import os

# The capture alternates onnxruntime runs with numpy's normal-equation updates on the same
# cores. OpenBLAS threads otherwise spin for ~0.1 s after each call and slow the next
# onnxruntime run by a third. It must be set before numpy loads; a user's value is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

from qwt_onnx import api  # noqa: E402
from qwt_onnx.errors import InputError  # noqa: E402
from qwt_onnx.passes.blocks import GRANULARITIES  # noqa: E402
from qwt_onnx.passes.qdq import TARGETS, WEIGHT_RANGES  # noqa: E402
from qwt_onnx.ranges import METHODS  # noqa: E402
from qwt_onnx.report import format_summary  # noqa: E402

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2
ZOO_PREFIX = "zoo:"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qwt_onnx",
        description="Quantize an ONNX model to INT8 QDQ and add closed-form QwT compensation branches. "
        "'python -m qwt_onnx check MODEL' checks any quantized model for int16 saturation and unfused Q/DQ.",
    )
    parser.add_argument("input", help="FP32 ONNX model, or zoo:NAME for a zoo model with its own calibration data")
    parser.add_argument("output", help="where to write the quantized model")
    parser.add_argument("--calib", help=".npz keyed by input name (or .npy for one input), samples on axis 0")
    parser.add_argument("--samples", type=int, default=512, help="calibration samples to use (default 512)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per onnxruntime run (default 16)")
    parser.add_argument("--no-qwt", action="store_true", help="write the plain post-training-quantized model")
    parser.add_argument("--quantized", metavar="Q.onnx", help="apply QwT on top of this QDQ model instead of our Q/DQ pass")
    parser.add_argument("--calib-method", default="auto", choices=("auto", *METHODS),
                        help="activation range calibration (default: the best on held-out samples)")
    parser.add_argument("--target", default="ort", choices=TARGETS,
                        help="ort: uint8 asymmetric activations; trt: int8 symmetric, zero point 0 (default ort)")
    parser.add_argument("--blocks", help="override block discovery: boundary tensors T1,T2,... or pairs in:out,...")
    parser.add_argument("--granularity", default="layer", choices=GRANULARITIES,
                        help="one compensation per transformer layer or per residual branch (default layer)")
    parser.add_argument("--groups-factor", type=int, default=64, metavar="C",
                        help="input channels per group of a feature-map branch; 0 for one group (default 64)")
    parser.add_argument("--kernel-size", type=int, default=1, metavar="K",
                        help="kernel size of a feature-map branch, odd (default 1: a 1x1 conv)")
    parser.add_argument("--branch-precision", choices=["int8", "float"], default="int8",
                        help="int8: branches run in integer kernels (QLinearConv, MatMulIntegerToFloat); "
                        "float: float MatMul/Conv (default int8)")
    parser.add_argument("--min-gain", type=float, default=api.MIN_GAIN, metavar="F",
                        help="keep a branch only if it removes at least this share of its block's "
                        f"held-out error (default {api.MIN_GAIN})")
    parser.add_argument("--exclude-nodes", metavar="NAMES", default="",
                        help="Conv/MatMul/Gemm nodes to leave in float: names or regular expressions "
                        "(whole-name match), comma-separated")
    parser.add_argument("--exclude-op-types", metavar="TYPES", default="",
                        help="op types to leave in float, e.g. Gemm (regular expressions, comma-separated)")
    parser.add_argument("--weight-range", choices=WEIGHT_RANGES,
                        help="portable: int8 weights scaled so that onnxruntime's x86 kernels without VNNI "
                        "(AVX2, AVX-512 without VNNI) cannot saturate (default with --target ort); "
                        "full: [-127, 127], exact only on VNNI x86, ARM and GPUs (default with --target trt)")
    parser.add_argument("--bias-correction", choices=api.BIAS_CORRECTION, default="auto",
                        help="subtract each weight's mean rounding error in its op's bias: auto (where it scores "
                        "better on held-out samples, the default), on or off")
    parser.add_argument("--report", metavar="FILE.json", help="write per-block figures as JSON")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="more detail, tracebacks on errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        from qwt_onnx import check

        return check.main(argv[1:])
    args = build_parser().parse_args(argv)
    level = logging.ERROR if args.quiet else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        model, calib = _resolve_inputs(args)
        _, report = api.quantize_with_report(
            model,
            calib,
            args.output,
            quantized=args.quantized,
            samples=args.samples,
            batch_size=args.batch_size,
            qwt=not args.no_qwt,
            calib_method=args.calib_method,
            target=args.target,
            blocks=args.blocks.split(",") if args.blocks else None,
            granularity=args.granularity,
            groups_factor=args.groups_factor,
            kernel_size=args.kernel_size,
            branch_precision=args.branch_precision,
            min_gain=args.min_gain,
            exclude_nodes=[p for p in args.exclude_nodes.split(",") if p],
            exclude_op_types=[p for p in args.exclude_op_types.split(",") if p],
            weight_range=args.weight_range,
            bias_correction=args.bias_correction,
            report=args.report,
            progress=not args.quiet,
        )
    except InputError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as exc:  # anything else is our bug: say so, briefly
        if args.verbose:
            traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {exc} (rerun with -v for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    if not args.quiet:
        print(format_summary(report, args.input))
    return EXIT_OK


def _resolve_inputs(args: argparse.Namespace) -> tuple[str, str]:
    """The model and calibration paths, preparing a zoo model's data when asked for one."""
    if args.input.startswith(ZOO_PREFIX):
        from qwt_onnx import zoo

        prepared = zoo.prepare(args.input[len(ZOO_PREFIX) :], max(zoo.CALIBRATION_SAMPLES, args.samples))
        return prepared.model, args.calib or prepared.calibration
    if not args.calib:
        raise InputError("--calib is required (a .npz keyed by input name), unless the input is zoo:NAME")
    return args.input, args.calib


if __name__ == "__main__":
    sys.exit(main())

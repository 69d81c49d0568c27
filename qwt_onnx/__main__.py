"""Command line: ``python -m qwt_onnx in.onnx out.onnx --calib calib.npz``."""

from __future__ import annotations

import os

# The capture alternates onnxruntime runs with numpy's normal-equation updates on the same
# cores. OpenBLAS threads otherwise spin for ~0.1 s after each call and slow the next
# onnxruntime run by a third. It must be set before numpy loads; a user's value is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import errno  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402

from qwt_onnx import api, options  # noqa: E402
from qwt_onnx.errors import InputError  # noqa: E402
from qwt_onnx.report import format_summary  # noqa: E402

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_OUT_OF_RESOURCES = 0, 1, 2, 4
ZOO_PREFIX = "zoo:"
OPTION_NAMES = {f.name for f in dataclasses.fields(options.Options)}


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's, ``timeout``'s), raised where the run is, so that it unwinds as
    from Ctrl-C: the capture's spill folder and the output's staging folder are removed."""


def _raise_terminated(signum, frame):
    raise _Terminated


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like the rest of the command's (no usage dump)."""

    def error(self, message: str):
        print(f"error: {message} ('{self.prog} -h' lists the options)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m qwt_onnx",
        description="Quantize an ONNX model to INT8 QDQ and add closed-form QwT compensation branches. "
        "'python -m qwt_onnx check MODEL' checks any quantized model for int16 saturation and unfused Q/DQ.",
    )
    parser.add_argument("input", help="FP32 ONNX model, or zoo:NAME for a zoo model with its own calibration data")
    parser.add_argument("output", help="where to write the quantized model")
    parser.add_argument("--calib", help=".npz keyed by input name (or .npy for one input), samples on axis 0 (for a model "
                        "whose inputs hold one sample and no batch axis, whole inputs stacked on a new axis 0)")
    parser.add_argument("--quantized", metavar="Q.onnx", help="apply QwT on top of this QDQ model instead of our Q/DQ pass")
    options.add_arguments(parser)
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
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        model, calib = resolve_inputs(args)
        settings = {k: v for k, v in vars(args).items() if k in OPTION_NAMES}
        _, report = api.quantize_with_report(
            model, calib, args.output, quantized=args.quantized, options=options.Options(**settings),
            report=args.report, progress=not args.quiet,
        )
    except InputError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Terminated)
        print(f"{'terminated' if terminated else 'interrupted'}; nothing was written", file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else EXIT_INTERNAL
    except Exception as exc:  # anything else is our bug (say so, briefly), or the machine's limits
        if args.verbose:
            traceback.print_exc()
        limit = out_of_resources(exc)
        if limit is not None:
            print(f"error: {limit}", file=sys.stderr)
            return EXIT_OUT_OF_RESOURCES
        print(f"internal error: {type(exc).__name__}: {exc} (rerun with -v for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    if not args.quiet:
        print(format_summary(report, args.input))
    return EXIT_OK


def out_of_resources(exc: Exception) -> str | None:
    """What to change where a run stopped for want of disk space or memory, not on a bug."""
    if isinstance(exc, MemoryError):
        return "out of memory; pass a smaller --batch-size (a batch's activations are held several times) or fewer --samples"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" ({exc.filename})" if exc.filename else ""
        return (f"no space left on device{where}: the capture keeps the block inputs of every sample that do not fit in "
                f"memory in {tempfile.gettempdir()}; point TMPDIR at a larger disk or pass fewer --samples, and leave room "
                "for the model in the output's folder")
    return None


def resolve_inputs(args: argparse.Namespace) -> tuple[str, str]:
    """The model and calibration paths, preparing a zoo model's data when asked for one."""
    if args.input.startswith(ZOO_PREFIX):
        from qwt_onnx import zoo

        name, samples = args.input[len(ZOO_PREFIX) :], getattr(args, "samples", zoo.CALIBRATION_SAMPLES)
        prepared, entry = zoo.prepare(name, max(zoo.CALIBRATION_SAMPLES, samples)), zoo.get(name)
        if entry.outputs and not hasattr(args, "outputs"):  # what its task needs, unless told otherwise
            args.outputs = ",".join(entry.outputs)
        return prepared.model, args.calib or prepared.calibration
    if not args.calib:
        raise InputError("--calib is required (a .npz keyed by input name), unless the input is zoo:NAME")
    return args.input, args.calib


if __name__ == "__main__":
    sys.exit(main())

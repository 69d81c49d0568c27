"""Deployment risks of any quantized model on onnxruntime's CPU provider.

    python -m qwt_onnx check model.onnx

Reads the graph onnxruntime really runs (its optimized graph, all
optimizations, built on this machine) and reports:

* saturation: integer kernels whose int8 weights can overflow int16 on x86
  CPUs without VNNI (see :mod:`qwt_onnx.numerics.saturation`); on those CPUs such a
  kernel's output is wrong wherever its inputs are large;
* unfused: float ops left between a DequantizeLinear and a QuantizeLinear
  (a dequantize, a float op and a requantize where an integer kernel was
  meant), weights stored as int8 but dequantized on every run for a float
  op, and a spelt-out GELU that reads a dequantized tensor (which onnxruntime
  cannot fuse into its Gelu kernel, :mod:`qwt_onnx.passes.gelu`).

The fusions are those of the installed onnxruntime on the machine that runs
the check; x86 machines all fuse alike (ARM fuses int8 activations too).
Exit codes: 0 no risk, 3 risks found, 2 bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qwt_onnx import runtime
from qwt_onnx.errors import InputError
from qwt_onnx.graph import query as g
from qwt_onnx.graph.prepare import check_file, read
from qwt_onnx.numerics import saturation

EXIT_RISKS = 3
CATEGORIES = ("saturation", "unfused")


@dataclasses.dataclass(frozen=True)
class IntegerKernel:
    """Where an integer kernel's operands are: the one fed as uint8 and the one whose adjacent
    int8 elements are added in pairs (a weight, for all but ConvInteger)."""

    unsigned: int  # operand index fed to the kernel's unsigned side
    unsigned_zero_point: int | None
    paired: int  # operand index whose adjacent elements are paired
    paired_zero_point: int | None
    layout: str  # "conv", "matmul" or "gemm": how ``paired`` is reduced


KERNELS = {
    "QLinearConv": IntegerKernel(0, 2, 3, 5, "conv"),
    "QLinearMatMul": IntegerKernel(0, 2, 3, 5, "matmul"),
    "QGemm": IntegerKernel(0, 2, 3, 5, "gemm"),
    "MatMulIntegerToFloat": IntegerKernel(0, 4, 1, 5, "matmul"),
    "MatMulInteger": IntegerKernel(0, 2, 1, 3, "matmul"),
    "DynamicQuantizeMatMul": IntegerKernel(0, None, 1, 3, "matmul"),  # its float input is quantized to uint8
    "ConvInteger": IntegerKernel(1, 3, 0, 2, "conv"),  # a GEMM of the weight (A) and the im2col input (B)
}


@dataclasses.dataclass
class Finding:
    category: str  # "saturation" or "unfused"
    op_type: str
    node: str
    detail: str


@dataclasses.dataclass
class CheckReport:
    model: str
    onnxruntime: str
    integer_kernels: dict[str, int] = dataclasses.field(default_factory=dict)  # by op type, in the optimized graph
    findings: list[Finding] = dataclasses.field(default_factory=list)

    def of(self, category: str) -> list[Finding]:
        return [f for f in self.findings if f.category == category]


def check(model: str | os.PathLike | onnx.ModelProto) -> CheckReport:
    """The saturation and fusion risks of ``model`` (a path or a checked ModelProto) on onnxruntime's CPU provider."""
    if isinstance(model, onnx.ModelProto):
        name, source = model.graph.name or "model", model.SerializeToString()
    else:
        name = source = check_file(model, "model")
    optimized = optimized_model(source, name)
    report = CheckReport(name, ort.__version__)
    integer = {*KERNELS, *g.integer_kernels(optimized.graph)}  # the matrix kernels, and QLinearAdd, QLinearSigmoid, ...
    for node in optimized.graph:
        if node.op_type in integer:
            report.integer_kernels[node.op_type] = report.integer_kernels.get(node.op_type, 0) + 1
        if node.op_type in KERNELS:
            finding = _saturation(node, KERNELS[node.op_type])
            if finding:
                report.findings.append(finding)
    report.findings += _unfused(optimized.graph)
    return report


def optimized_model(source: str | bytes, name: str) -> ir.Model:
    """The graph onnxruntime's CPU provider runs for a model (a path or serialized bytes; ORT_ENABLE_ALL)."""
    with tempfile.TemporaryDirectory(prefix="qwt-check-") as folder:
        path = os.path.join(folder, "optimized.onnx")
        # large weights go to a file beside it, so that models over 2 GiB can be written too
        config = {
            "session.optimized_model_external_initializers_file_name": "weights.data",
            "session.optimized_model_external_initializers_min_size_in_bytes": str(1 << 20),
        }
        try:
            runtime.session(source, path, **config)
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / NotImplemented
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"onnxruntime cannot load {name} ({first}); the model must run on onnxruntime's CPU provider") from None
        model = read(path, name)
        ir.external_data.load_to_model(model)
        return model


def _saturation(node: ir.Node, kernel: IntegerKernel) -> Finding | None:
    unsigned = _integer_dtype(node, kernel.unsigned, kernel.unsigned_zero_point)
    paired = _integer_dtype(node, kernel.paired, kernel.paired_zero_point)
    if node.op_type == "DynamicQuantizeMatMul":
        unsigned = np.dtype(np.uint8)
    if unsigned != np.uint8 or paired != np.int8:
        return None  # uint8 × uint8, int8 × int8 and int8 × uint8 kernels accumulate in int32
    operand = node.inputs[kernel.paired]
    if operand.const_value is None:
        return Finding("saturation", node.op_type, node.name, "its int8 operand is computed at run time, so its pairs "
                       "cannot be checked: it can saturate on x86 CPUs without VNNI")
    weight = operand.const_value.numpy()
    axis = {"conv": 0, "gemm": 0 if node.attributes.get_int("transB", 0) else 1, "matmul": weight.ndim - 1}[kernel.layout]
    if kernel.layout == "conv" and not saturation.kernel_pairs_products(weight.shape, node.attributes.get_int("group", 1)):
        return None  # depthwise: a kernel that never pairs products
    sums = saturation.pair_sums(weight, axis)
    over = int((sums > saturation.PAIR_LIMIT).sum())
    if not over:
        return None
    return Finding(
        "saturation", node.op_type, node.name,
        f"{over} of {sums.size} adjacent int8 weight pairs can overflow int16 on x86 CPUs without VNNI "
        f"(largest same-sign |a| + |b| = {sums.max():.0f}, at most {saturation.PAIR_LIMIT} is exact)",
    )


def _integer_dtype(node: ir.Node, index: int, zero_point: int | None) -> np.dtype | None:
    """The integer type of an operand: from itself, or from its zero point."""
    for position in (index, zero_point):
        value = node.inputs[position] if position is not None and position < len(node.inputs) else None
        if value is None:
            continue
        if value.const_value is not None:
            return value.const_value.dtype.numpy()
        if value.dtype is not None:
            return value.dtype.numpy()
    return None


def _unfused(graph: ir.Graph) -> list[Finding]:
    findings = []
    for node in graph:
        if node.op_type in g.QDQ_OPS or node.op_type in KERNELS:
            continue
        dequantized = [v for v in node.inputs if _is_dequantized_activation(v)]
        weights = [v for v in node.inputs if _is_dequantized_constant(v)]
        requantized = any(c.op_type == "QuantizeLinear" for out in node.outputs for c in out.consumers())
        if dequantized and requantized:
            findings.append(Finding("unfused", node.op_type, node.name, "runs in float between DequantizeLinear and "
                                    "QuantizeLinear: no integer kernel took it, so the pair costs time and precision"))
        elif weights:
            why = (": no QuantizeLinear reads its output, which onnxruntime's QLinearConv needs (TensorRT's placement, "
                   "qwt_onnx --target trt, leaves Conv outputs to its fusions; --target ort quantizes them)"
                   if node.op_type == "Conv" and dequantized and not requantized else "")
            findings.append(Finding("unfused", node.op_type, node.name, f"runs in float on {len(weights)} int8 "
                                    f"weight(s) dequantized on every run{why}"))
    for erf in graph:
        scaling = erf.inputs[0].producer() if erf.op_type == "Erf" and erf.inputs else None
        if scaling is not None and scaling.op_type in ("Div", "Mul") and any(map(_is_dequantized_activation, scaling.inputs)):
            findings.append(Finding("unfused", "Erf", erf.name, "a GELU spelt out in Div, Erf, Add and Muls reads a "
                                    "DequantizeLinear: onnxruntime gives each of its readers a copy and cannot fuse the "
                                    "five into one Gelu kernel; written as one Gelu node, it runs as one (qwt_onnx "
                                    "--target ort writes it so)"))
    for dq in graph:
        if dq.op_type == "DequantizeLinear" and _is_dequantized_activation(dq.outputs[0]):
            if any(c.op_type == "QuantizeLinear" for c in dq.outputs[0].consumers()):
                findings.append(Finding("unfused", "DequantizeLinear", dq.name, "feeds a QuantizeLinear directly: a "
                                        "requantization in float between two quantizers"))
    return findings


def _is_dequantized_activation(value: ir.Value | None) -> bool:
    dq = g.dequantizer(value)
    return dq is not None and not g.is_constant(dq.inputs[0])


def _is_dequantized_constant(value: ir.Value | None) -> bool:
    dq = g.dequantizer(value)
    return dq is not None and g.is_constant(dq.inputs[0])


def format_report(report: CheckReport, limit: int = 10) -> str:
    """The findings, at most ``limit`` of each category, for a terminal."""
    kernels = ", ".join(f"{op} {n}" for op, n in sorted(report.integer_kernels.items())) or "none"
    lines = [f"qwt_onnx check: {report.model} (onnxruntime {report.onnxruntime}, CPU provider, all optimizations)",
             f"integer kernels: {kernels}"]
    for category, title in (("saturation", "can saturate on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI)"),
                            ("unfused", "Q/DQ that onnxruntime does not fuse")):
        found = report.of(category)
        lines.append(f"{category}: {len(found)} {title}" if found else f"{category}: none")
        for f in found[:limit]:
            lines.append(f"  {f.op_type} {f.node}: {f.detail}")
        if len(found) > limit:
            lines.append(f"  ... and {len(found) - limit} more (--json FILE lists all)")
    if report.of("saturation"):
        lines.append("fix: quantize with pair-safe int8 weights (qwt_onnx --weight-range portable, the default), or "
                     "with 7-bit weights (onnxruntime's reduce_range=True)")
    return "\n".join(lines)


DESCRIPTION = ("Check a quantized ONNX model for int16 saturation on x86 CPUs without VNNI and for Q/DQ "
               "that onnxruntime does not fuse. Exit codes: 0 no risk, 3 risks found, 2 bad input.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qwt_onnx check", description=DESCRIPTION)
    parser.add_argument("model", help="a quantized ONNX model (QDQ or QOperator), from any tool")
    parser.add_argument("--fail-on", choices=("any", *CATEGORIES), default="any",
                        help="which findings make the exit code 3 (default any)")
    parser.add_argument("--json", metavar="FILE", help="write every finding as JSON")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing; the exit code tells")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = check(args.model)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dataclasses.asdict(report), f, indent=1)
    if not args.quiet:
        print(format_report(report))
    failing = report.findings if args.fail_on == "any" else report.of(args.fail_on)
    return EXIT_RISKS if failing else 0

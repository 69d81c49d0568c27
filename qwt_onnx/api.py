"""The QwT pipeline: Q/DQ, block discovery, capture and fit, splice."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from qwt_onnx import calibrate, check, metrics
from qwt_onnx.calibration import CalibrationSet
from qwt_onnx.errors import InputError
from qwt_onnx.passes import blocks as blk
from qwt_onnx.passes import capture, prepare, qdq, splice
from qwt_onnx.passes import graph as g
from qwt_onnx.ranges import METHODS, compute_range
from qwt_onnx.report import BlockReport, Report

logger = logging.getLogger("qwt_onnx")

BRANCH_PRECISIONS = ("int8", "float")
# Bias correction: both ways, kept where it scores better on held-out samples (auto), or forced.
BIAS_CORRECTION = {"auto": (True, False), "on": (True,), "off": (False,)}
MIN_GAIN = 0.1  # on ocr-rec (128 samples) dropping the branches under 10% raised SQNR 17.1 -> 17.7 dB and cut latency
SELECTION_SAMPLES = 64  # samples on which calibration methods are compared with QwT
# Methods whose plain PTQ is this far below the best are not tried with QwT: on the zoo models
# none that far behind (5.7 to 13.9 dB) came out best after compensation.
SELECTION_MARGIN_DB = 6.0
GIVEN = "given"  # the "method" of a QDQ model passed with --quantized

ModelLike = str | os.PathLike | onnx.ModelProto
CalibLike = str | os.PathLike | Mapping[str, np.ndarray]


def quantize(model: ModelLike, calib: CalibLike, output: str | os.PathLike | None = None, **options) -> onnx.ModelProto:
    """Quantize ``model`` to INT8 QDQ with QwT compensation; see :func:`quantize_with_report`."""
    return quantize_with_report(model, calib, output, **options)[0]


def quantize_with_report(
    model: ModelLike,
    calib: CalibLike,
    output: str | os.PathLike | None = None,
    *,
    quantized: ModelLike | None = None,
    samples: int = 512,
    batch_size: int = 16,
    qwt: bool = True,
    calib_method: str = "auto",
    target: str = "ort",
    blocks: Sequence[str] | None = None,
    granularity: str = "layer",
    groups_factor: int = 64,
    kernel_size: int = 1,
    branch_precision: str = "int8",
    min_gain: float = MIN_GAIN,
    exclude_nodes: Sequence[str] = (),
    exclude_op_types: Sequence[str] = (),
    weight_range: str | None = None,
    bias_correction: str = "auto",
    report: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[onnx.ModelProto, Report]:
    """Quantize ``model`` and, unless ``qwt=False``, add the fitted compensation branches.

    Args:
        model: FP32 model (path or ModelProto); never modified.
        calib: ``.npz`` / ``.npy`` path or a dict of arrays, samples on axis 0.
        output: where to write the result (atomically); None to only return it.
        quantized: a QDQ model of ``model`` to compensate instead of running our Q/DQ pass.
        samples: calibration samples to use (the first ones). batch_size: samples per run.
        qwt: False writes the plain post-training-quantized model (the baseline).
        calib_method: ``auto`` (the best on held-out samples), ``minmax``, ``percentile`` or ``entropy``.
        target: ``ort`` (uint8 asymmetric activations) or ``trt`` (int8 symmetric, zero point 0).
        blocks: boundary tensors overriding block discovery (``a:b`` pairs or a chain).
        granularity: ``layer`` (one block per transformer layer) or ``residual`` (per residual branch).
        groups_factor: input channels per group of a feature-map branch (0: one group, a full 1×1 conv).
        kernel_size: odd kernel size of a feature-map branch (1: pointwise).
        branch_precision: ``int8`` (branches run in the runtime's integer kernels) or ``float``.
        min_gain: the least share of its block's held-out error a branch must remove to be kept.
        exclude_nodes, exclude_op_types: weighted ops to leave in float, by node name or op type
            (regular expressions matching the whole name).
        weight_range: ``portable`` (int8 weights that no x86 CPU saturates; the default for
            ``ort``) or ``full`` ([-127, 127]: for VNNI x86, ARM and GPUs; the default for ``trt``).
        bias_correction: ``auto`` (subtract each weight's mean rounding error in its op's bias
            where that scores better on held-out samples), ``on`` or ``off``.
        report: path of a JSON report to write.
        progress: show progress bars.
    """
    started = time.perf_counter()
    _check_options(samples, batch_size, calib_method, target, granularity, model, output)
    if bias_correction not in BIAS_CORRECTION:
        raise InputError(f"unknown --bias-correction {bias_correction!r}; choose from {', '.join(BIAS_CORRECTION)}")
    weight_range = _weight_range(weight_range, target)
    branch_options = _branch_options(groups_factor, kernel_size, branch_precision, min_gain, weight_range)
    excluded = _exclusions(exclude_nodes, exclude_op_types)
    fp = prepare.prepare(_load(model, "input model"))
    if g.is_quantized(fp.graph):
        raise InputError(
            "the input model is already quantized; pass the FP32 model as input and this one with --quantized"
        )
    calib_set = CalibrationSet.load(calib, prepare.input_specs(fp), samples)
    rep = Report(target, calib_method, calib_set.num_samples, int(calib_set.heldout_mask.sum()), weight_range)
    rep.fp32_parameters = int(sum(v.const_value.size for v in fp.graph.initializers.values() if v.const_value is not None))
    run = _Run(fp, calib_set, _effective_batch_size(fp, batch_size), rep, progress, branch_options, excluded)
    for pattern in excluded.unmatched(fp.graph):
        rep.warn(f"exclusion {pattern!r} matches no Conv, MatMul or Gemm node of the model")
    found = _find_blocks(run, blocks, granularity) if qwt else []

    candidates = {
        method: _better_bias(run, method, variants)
        for method, variants in _ptq_candidates(run, quantized, calib_method, target, weight_range, bias_correction)
    }
    scores = rep.method_sqnr_db
    rep.ptq_method = rep.method = max(scores, key=scores.get) if scores else next(iter(candidates))
    rep.sqnr_ptq_db = scores.get(rep.ptq_method)
    result = candidates[rep.ptq_method]
    if found:
        result = _qwt(run, candidates, found) or result
    proto = prepare.to_proto(result)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:  # a bug of ours, not of the input
        raise RuntimeError(f"the written model fails onnx.checker: {exc}") from exc
    rep.seconds = time.perf_counter() - started
    if output is not None:
        prepare.save_atomically(result, output)
        rep.output = os.fspath(output)
    if report is not None:
        with open(report, "w") as f:
            f.write(rep.to_json())
    return proto, rep


@dataclasses.dataclass
class _Run:
    """What the stages of one run share."""

    fp: ir.Model
    calib: CalibrationSet
    batch_size: int
    report: Report
    progress: bool
    branch_options: capture.BranchOptions
    excluded: qdq.Exclusions
    reference: dict[str, np.ndarray] | None = None  # FP32 outputs on the scoring samples

    def heldout_sqnr(self, model: ir.Model, description: str, calib: CalibrationSet | None = None) -> float | None:
        """Output SQNR to FP32 on the scoring samples of ``calib`` (a prefix of the run's set)."""
        calib = calib or self.calib
        count = int(calib.scoring_mask.sum())
        if not count:
            return None
        if self.reference is None:
            self.reference = calibrate.heldout_outputs(prepare.to_proto(self.fp), self.calib, self.batch_size, "FP32 reference", self.progress)
        outputs = calibrate.heldout_outputs(prepare.to_proto(model), calib, self.batch_size, description, self.progress)
        return metrics.sqnr_db({k: v[:count] for k, v in self.reference.items()}, outputs)


def _check_options(samples, batch_size, calib_method, target, granularity, model, output) -> None:
    if samples < 1:
        raise InputError(f"--samples must be at least 1, got {samples}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if calib_method not in ("auto", *METHODS):
        raise InputError(f"unknown --calib-method {calib_method!r}; choose from auto, {', '.join(METHODS)}")
    if target not in qdq.TARGETS:
        raise InputError(f"unknown --target {target!r}; choose from {', '.join(qdq.TARGETS)}")
    if granularity not in blk.GRANULARITIES:
        raise InputError(f"unknown granularity {granularity!r}; choose from {', '.join(blk.GRANULARITIES)}")
    if output is None:
        return
    folder = os.path.dirname(os.path.abspath(os.fspath(output)))
    if not os.path.isdir(folder):
        raise InputError(f"output folder {folder} does not exist; create it or choose another output path")
    if not os.access(folder, os.W_OK):
        raise InputError(f"output folder {folder} is not writable; choose another output path")
    if isinstance(model, (str, os.PathLike)) and os.path.abspath(os.fspath(model)) == os.path.abspath(os.fspath(output)):
        raise InputError("the output path is the input model; choose another output path so the input is kept")


def _exclusions(nodes: Sequence[str], op_types: Sequence[str]) -> qdq.Exclusions:
    for option, patterns in (("--exclude-nodes", nodes), ("--exclude-op-types", op_types)):
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InputError(f"{option}: {pattern!r} is not a valid regular expression ({exc}); escape it or fix it") from None
    return qdq.Exclusions(tuple(nodes), tuple(op_types))


def _weight_range(weight_range: str | None, target: str) -> str:
    """The asked-for weight range, or the target's default: portable for onnxruntime, whose x86
    kernels without VNNI saturate on full-range weights; full for TensorRT, whose never do."""
    if weight_range is None:
        return "portable" if target == "ort" else "full"
    if weight_range not in qdq.WEIGHT_RANGES:
        raise InputError(f"unknown --weight-range {weight_range!r}; choose from {', '.join(qdq.WEIGHT_RANGES)}")
    return weight_range


def _branch_options(groups_factor: int, kernel_size: int, precision: str, min_gain: float, weight_range: str) -> capture.BranchOptions:
    if groups_factor < 0:
        raise InputError(f"--groups-factor must be 0 (one group) or more, got {groups_factor}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise InputError(f"--kernel-size must be a positive odd number, got {kernel_size}")
    if precision not in BRANCH_PRECISIONS:
        raise InputError(f"--branch-precision must be one of {', '.join(BRANCH_PRECISIONS)}, got {precision!r}")
    if not 0.0 <= min_gain < 1.0:
        raise InputError(f"--min-gain must be at least 0 and below 1 (a share of a block's error), got {min_gain}")
    return capture.BranchOptions(kernel_size, groups_factor, precision == "int8", min_gain, weight_range == "portable")


def _load(model: ModelLike, role: str) -> ir.Model:
    if isinstance(model, onnx.ModelProto):
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise InputError(f"{role} is not a valid ONNX model ({str(exc).splitlines()[0]}); re-export it") from None
        return ir.serde.deserialize_model(model)
    return prepare.load_model(model, role)


def _effective_batch_size(model: ir.Model, batch_size: int) -> int:
    """Models exported with a fixed batch dimension are fed that many samples at a time."""
    fixed = {v.shape[0] for v in model.graph.inputs if v.shape is not None and len(v.shape) and isinstance(v.shape[0], int)}
    if len(fixed) == 1:
        only = fixed.pop()
        if only != batch_size:
            logger.info("the model's batch dimension is fixed to %d; using batches of %d", only, only)
        return only
    return batch_size


def _ptq_candidates(run: _Run, quantized, calib_method: str, target: str, weight_range: str, bias_correction: str):
    """The post-training-quantized models to choose from, ``(method, {bias corrected: model})``
    one method at a time: the user's model, or ours per calibration method."""
    if quantized is not None:
        q = prepare.prepare(_load(quantized, "quantized model"))
        if not g.is_quantized(q.graph):
            raise InputError("the --quantized model has no QuantizeLinear/DequantizeLinear nodes; pass a QDQ model")
        saturating = check.check(prepare.to_proto(q)).of("saturation")
        if saturating:
            run.report.warn(
                f"{len(saturating)} integer kernels of the --quantized model can saturate on x86 CPUs without VNNI "
                "(its int8 weights are not pair-safe), and so can the written model; "
                "'python -m qwt_onnx check' lists them"
            )
        yield GIVEN, {False: q}
        return
    placement = qdq.place(run.fp.graph, target, run.excluded)
    corrections = BIAS_CORRECTION[bias_correction]
    seen = calibrate.observe(
        prepare.to_proto(run.fp), placement.observed_names, run.calib, run.batch_size, run.progress,
        placement.channel_axes() if True in corrections else None,
    )
    run.reference = seen.reference
    methods = METHODS if calib_method == "auto" else (calib_method,)
    if calib_method == "auto" and not run.report.heldout_samples:
        methods = ("percentile",)
        run.report.warn("one calibration sample leaves none to compare calibration methods; using percentile")
    for method in methods:
        ranges = {name: compute_range(obs, method) for name, obs in seen.ranges.items()}
        variants = {}
        for corrected in corrections:
            variants[corrected] = run.fp.clone()
            qdq.InsertQdqPass(ranges, target, run.excluded, weight_range, seen.means if corrected else None)(variants[corrected])
        yield method, variants


def _better_bias(run: _Run, method: str, variants: dict[bool, ir.Model]) -> ir.Model:
    """Of one method's PTQ models with and without bias correction, the one that scores better on
    held-out samples (the first where none are held out); its score goes into the report."""
    scores = {}
    for corrected, model in variants.items():
        score = run.heldout_sqnr(model, f"evaluating PTQ ({method}{', bias-corrected' if corrected else ''})")
        if score is not None:
            scores[corrected] = score
    chosen = max(scores, key=scores.get) if scores else next(iter(variants))
    if chosen in scores:
        run.report.method_sqnr_db[method] = scores[chosen]
    if len(scores) == 2:
        run.report.bias_correction_gain_db[method] = scores[True] - scores[False]
    run.report.bias_corrected[method] = chosen
    return variants[chosen]


def _find_blocks(run: _Run, boundaries, granularity) -> list[blk.Block]:
    if run.calib.num_samples < 2:
        run.report.warn("QwT needs at least 2 calibration samples (one to fit, one to validate); writing the PTQ model")
        return []
    found = blk.blocks_from_boundaries(run.fp, boundaries) if boundaries else blk.find_blocks(run.fp, granularity)
    if not found:
        run.report.warn("no residual or transformer blocks were found; writing the PTQ model (name them with --blocks)")
    return found


def _qwt(run: _Run, candidates: dict[str, ir.Model], found: list[blk.Block]) -> ir.Model | None:
    """The best compensated model, or None (with a warning) where QwT does not beat PTQ."""
    rep = run.report
    method = next(iter(candidates))
    if len(candidates) > 1:
        method = _choose_method_for_qwt(run, candidates, found)
    compensated, rep.blocks = _compensate(run, candidates[method], found, run.calib)
    if compensated is None:
        rep.warn("QwT lowered the error of no block on held-out samples; writing the PTQ model")
        return None
    rep.sqnr_qwt_db = run.heldout_sqnr(compensated, f"evaluating QwT ({method})")
    if rep.sqnr_qwt_db is not None and rep.sqnr_ptq_db is not None and rep.sqnr_qwt_db <= rep.sqnr_ptq_db:
        rep.warn(
            f"QwT ({method}) reaches {rep.sqnr_qwt_db:.2f} dB on held-out samples, no better than PTQ "
            f"({rep.ptq_method}) at {rep.sqnr_ptq_db:.2f} dB; writing the PTQ model"
        )
        return None
    rep.method, rep.qwt_applied = method, True
    rep.added_parameters = sum(b.parameters for b in rep.blocks)
    return compensated


def _choose_method_for_qwt(run: _Run, candidates: dict[str, ir.Model], found: list[blk.Block]) -> str:
    """The calibration method whose QwT model tracks FP32 best, tried on a prefix of the samples.

    QwT recovers clipping error far better than rounding noise, so the best
    method for PTQ is often not the best one to compensate.
    """
    subset = run.calib.take(SELECTION_SAMPLES)
    run.report.selection_samples = subset.num_samples
    best_ptq = max(run.report.method_sqnr_db.values(), default=None)
    for method, model in candidates.items():
        ptq = run.report.method_sqnr_db.get(method)
        if best_ptq is not None and ptq is not None and ptq < best_ptq - SELECTION_MARGIN_DB:
            continue
        compensated, _ = _compensate(run, model, found, subset)
        if compensated is not None:
            score = run.heldout_sqnr(compensated, f"evaluating QwT ({method})", subset)
            run.report.method_qwt_sqnr_db[method] = score
    scores = run.report.method_qwt_sqnr_db
    return max(scores, key=scores.get) if scores else run.report.ptq_method


def _compensate(run: _Run, q: ir.Model, found: list[blk.Block], calib: CalibrationSet):
    """``q`` with fitted branches spliced in (a copy; None if no block gained) and the per-block reports."""
    # Our own Q/DQ pass keeps the FP32 meaning of every boundary tensor; a given QDQ model may not.
    exact = run.report.ptq_method != GIVEN
    results = capture.fit_blocks(
        run.fp, q, found, calib, run.batch_size, run.progress, exact_boundaries=exact, branch_options=run.branch_options
    )
    branches, reports = [], []
    for k, res in enumerate(results):
        entry = BlockReport(res.block.name, res.block.input, res.block.output, kept=res.kept, note=res.skipped)
        if res.result is not None:
            fit = res.result
            entry.r2_train, entry.r2_heldout = fit.r2_train, fit.r2_heldout
            entry.error_ratio_heldout, entry.note = fit.error_ratio_heldout, res.skipped or fit.reason
            entry.channels, entry.channels_kept = fit.fit.bias.size, fit.kept_targets
            if fit.not_finite:
                run.report.warn(f"block {res.block.name}: NaN or Inf in its statistics or fit; its compensation is dropped")
        if res.kept:
            branch = splice.Branch(
                f"block{k}",
                res.branch_input,
                res.block.output,
                res.result.fit.weight,
                res.result.fit.bias,
                res.layout,
                int8_scale=res.int8_scale,
                target=run.report.target,
                input_range=res.input_range,
                output_range=res.output_range,
            )
            branches.append(branch)
            entry.parameters = branch.num_parameters
        reports.append(entry)
    if not branches:
        return None, reports
    compensated = q.clone()
    splice.SpliceCompensationPass(branches)(compensated)
    return compensated, reports

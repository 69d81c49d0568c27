"""The QwT pipeline, step by step.

1. load the FP32 model and the calibration samples;
2. observe the activation ranges (and the weighted ops' input means) in one FP32 pass;
3. build a post-training-quantized (PTQ) model per calibration method, with and without bias
   correction, and score each on held-out samples (or take the user's QDQ model);
4. find the residual / transformer blocks;
5. fit one compensation branch per block on the best PTQ model's quantized stream and splice
   the branches in: first on the first samples (with bias correction either way), then on
   all of them where that trial says it can pay;
6. write the QwT model where it beats the best PTQ model on held-out samples, else that one,
   its residual streams quantized for every reader unless held-out samples show that costing
   fidelity (``--residuals auto``).

Each step returns plain data (models, scores, fits); the :class:`Report` is built from them at
the end.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from qwt_onnx import check, observe
from qwt_onnx.analysis import blocks as blk
from qwt_onnx.analysis import capture, parts
from qwt_onnx.analysis.equalization import ChannelGroup, channel_groups, consumer_weights
from qwt_onnx.analysis.placement import Exclusions, Placement, left_float, log_front_end, place
from qwt_onnx.calibration import HELDOUT_EVERY, CalibrationSet
from qwt_onnx.errors import InputError
from qwt_onnx.graph import prepare
from qwt_onnx.graph import query as g
from qwt_onnx.numerics import equalization as eqn
from qwt_onnx.numerics import metrics, rounding
from qwt_onnx.numerics.affine import AffineFit
from qwt_onnx.numerics.metrics import Score
from qwt_onnx.numerics.ranges import compute_range
from qwt_onnx.options import (
    MAX_FLOAT_STEM_MACS,
    MIN_FLOAT_STEM_GAIN_DB,
    BiasCorrection,
    BranchPrecision,
    CalibMethod,
    Options,
    Residuals,
    Rounding,
    Target,
    WeightRange,
)
from qwt_onnx.options import Compensation as CompensationKind
from qwt_onnx.options import Equalization as EqualizationChoice
from qwt_onnx.passes import affine, qdq, splice
from qwt_onnx.passes.equalize import EqualizeChannelsPass
from qwt_onnx.progress import shown as progress_shown
from qwt_onnx.report import FLOAT_REASONS, BlockReport, Report
from qwt_onnx.runtime import Runner, batching_fault, samples_axes, with_outputs

logger = logging.getLogger("qwt_onnx")

SELECTION_SAMPLES = 64  # samples of QwT's trial (bias correction either way, whether it pays)
# QwT is fitted on all samples only where its trial on the first ones already gains what a written
# QwT needs (MIN_QWT_GAIN_DB) on the held-out samples, and the lower end of the gain's 95% interval
# is within this much of zero. From trial to full fit the held-out gain moved by -0.15 to +0.48 dB
# on the zoo (+1.05 on an unseen emotion classifier, 4x the samples) and never lifted a trial below
# MIN_QWT_GAIN_DB to a written QwT (Silero VAD -0.48 to 0.00, PP-LCNet -0.07 to -0.15, MTCNN ONet
# -0.01 to 0.00, the emotion classifier -0.74 to +0.31 within noise); the lower end rose by at most 0.3 dB.
PAYS_MARGIN_DB = 1.0
# QwT on the weights with bias correction the other way came within this much of QwT on PTQ's best
# or below it (PP-LCNet +0.45, ViT-S, Silero VAD and SLANet-plus +0.3 to +0.4 dB): it is not tried
# where the first trial falls short of MIN_QWT_GAIN_DB by more.
OTHER_CORRECTION_REACH_DB = 0.5
GIVEN = "given"  # the "method" of a QDQ model passed with --quantized
# Below this many held-out samples a choice between models made on them may be noise.
MIN_HELDOUT_SAMPLES = 32
# The least held-out gain that pays for QwT's branches (a tenth of a dB is 2.3% of the error
# energy): openWakeWord's mel spectrogram gained 0.004 dB, beyond noise, for 8,256 parameters.
MIN_QWT_GAIN_DB = 0.1
# With --residuals auto, the PTQ model's residual streams are quantized for every reader unless
# that loses at least this much held out, beyond noise (an eighth of the error energy): their Adds
# then run in integer kernels (mediapipe's BlazeFace, 15 streams: 1.59x -> 0.84x FP32's latency
# for -0.12 dB held out, its faces as found); the losses measured were 0.01-0.24 dB (YOLOv8n,
# PP-OCRv6 det, BlazeFace, the tests' small ResNets), captcha-whisperer's CRNN's 0.9 dB.
MAX_INT8_RESIDUALS_LOSS_DB = 0.5

ModelLike = str | os.PathLike | onnx.ModelProto
CalibLike = str | os.PathLike | Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A post-training-quantized model, its calibration method and its held-out score."""

    method: str
    model: ir.Model
    score: Score | None
    _: dataclasses.KW_ONLY  # the choices below are many and alike: named, never by position
    bias_corrected: bool = False
    bias_correction_gain_db: float | None = None  # held-out, where both were built
    weighted_clipping: bool = True  # below 8 weight bits: clipping weighed by input powers, or plain (see ptq_candidates)
    weighted_clipping_gain_db: float | None = None  # held-out, where both were built
    gptq: bool = False  # weights rounded with error feedback, or to nearest
    gptq_gain_db: float | None = None  # held-out, where both were built
    equalized: dict[str, float] = dataclasses.field(default_factory=dict)  # α per tensor whose channels were equalized (float_model)
    equalization_gain_db: float | None = None  # held-out, where both were built
    float_stem: int = 0  # the depth of the weighted ops nearest the inputs left in float (Placement.stem)
    # per depth tried: held-out gain over the model before, its 95% interval, and the share of MACs left float
    float_stem_gains_db: dict[int, tuple[float, float, float, float]] = dataclasses.field(default_factory=dict)
    float_model: ir.Model | None = None  # the FP32 model its Q/DQ went into, where not the run's
    int8_residuals: bool = False  # residual streams quantized for every reader (see --residuals)
    # With --residuals auto, the same PTQ with its residual streams quantized for every reader, and its held-out gain
    int8_residuals_variant: Candidate | None = None
    int8_residuals_gain_db: float | None = None
    # The same ranges with bias correction the other way, where both were built: which of the
    # two QwT compensates better is tried apart from which PTQ prefers.
    other_correction: Candidate | None = None

    @property
    def sqnr_db(self) -> float | None:
        return self.score.db if self.score is not None else None


@dataclasses.dataclass(frozen=True)
class Compensation:
    """The compensated model of one calibration method (None where no block gained), per block."""

    method: str
    model: ir.Model | None
    blocks: list[BlockReport]
    samples: int  # the fits were made on the first this many
    score: Score | None = None
    bias_corrected: bool = False

    @property
    def sqnr_db(self) -> float | None:
        return self.score.db if self.score is not None else None


@dataclasses.dataclass(frozen=True)
class Selection:
    """QwT's held-out SQNR per trial (bias correction either way), tried on the first samples."""

    samples: int = 0  # QwT was fitted on the first this many (and scored on every scoring sample)
    scores: dict[str, Score] = dataclasses.field(default_factory=dict)  # by trial label (see _trial_labels)
    chosen: str | None = None  # the label of the PTQ model QwT is fitted on
    candidate: Candidate | None = None  # ... and that model
    without_branch: list[str] = dataclasses.field(default_factory=list)  # trial labels where no block kept a branch
    # The chosen trial's compensation, scored; where no trial kept a branch, the PTQ model's (no model)
    compensation: Compensation | None = None
    cannot_pay: str | None = None  # why the chosen trial says QwT on all samples would not be written

    @property
    def sqnr_db(self) -> dict[str, float]:
        return {method: score.db for method, score in self.scores.items()}

    @property
    def blocks(self) -> list[BlockReport]:
        return self.compensation.blocks if self.compensation is not None else []


class Warnings(list):
    """The run's warnings, logged as they come, each once."""

    def warn(self, message: str) -> None:
        if message not in self:
            self.append(message)
            logger.warning(message)


def quantize(model: ModelLike, calib: CalibLike, output: str | os.PathLike | None = None, **options) -> onnx.ModelProto:
    """Quantize ``model`` to INT8 QDQ with QwT compensation; see :func:`quantize_with_report`."""
    return quantize_with_report(model, calib, output, **options)[0]


def quantize_with_report(
    model: ModelLike,
    calib: CalibLike,
    output: str | os.PathLike | None = None,
    *,
    quantized: ModelLike | None = None,
    options: Options | None = None,
    report: str | os.PathLike | None = None,
    progress: bool = True,
    **changes,
) -> tuple[onnx.ModelProto, Report]:
    """Quantize ``model`` and, unless ``qwt=False``, add the fitted compensation branches.

    Args:
        model: FP32 model (path or ModelProto); never modified.
        calib: ``.npz`` / ``.npy`` path or a dict of arrays, samples on axis 0.
        output: where to write the result (atomically); None to only return it.
        quantized: a QDQ model of ``model`` to compensate instead of running our Q/DQ pass.
        options: an :class:`~qwt_onnx.options.Options`; keyword arguments named like its fields
            (``samples=256``, ``target="trt"``, ``qwt=False``, ...) change it.
        report: path of a JSON report to write.
        progress: show progress bars.
    """
    options = (options or Options()).replace(**changes)
    with progress_shown(progress):
        return _quantize(model, calib, output, quantized, options, report)


def _quantize(model, calib, output, quantized, options: Options, report) -> tuple[onnx.ModelProto, Report]:
    started = time.perf_counter()
    _check_output(model, output)
    warnings = Warnings()
    fp = load_fp32(model)
    given = load_quantized(quantized) if quantized is not None else None
    if quantized is None and (options.weight_bits == 4 or options.activation_bits == 16):
        fp = prepare.upgrade_opset(fp, prepare.LOW_BIT_OPSET, " (int4 weights and 16-bit activations need it)")
    _check_outputs(fp, options.outputs)
    exposed, selected = ([], []) if quantized is not None or options.outputs else _expose_what_selections_read(fp)
    output_parts = () if options.outputs else parts.output_parts(fp.graph)
    options = options.replace(outputs=options.outputs or _unselected(fp, output_parts, selected) or output_parts)
    if selected:
        warnings.warn(f"outputs computed from NonMaxSuppression's selections ({', '.join(selected)}) are not scored, as "
                      f"which boxes it keeps flips with a step in a score: what it reads is ({', '.join(options.outputs)})")
    calib_set = CalibrationSet.load(calib, prepare.input_specs(fp), options.samples)
    for name in calib_set.unscaled:
        warnings.warn(f"calibration array {name!r} holds {calib_set.arrays[name].dtype} values for a float input: they are fed "
                      "unscaled; if the model expects them scaled (to 0..1, or by a mean and deviation), scale the samples first")
    run = _Run(fp, calib_set, _effective_batch_size(fp, options.batch_size, calib_set, warnings), options, warnings, output_parts)
    for pattern in run.excluded.unmatched(fp.graph):
        warnings.warn(f"exclusion {pattern!r} matches no Conv, MatMul or Gemm node of the model")
    if quantized is None and not run.placement.weights and not run.placement.activations:
        raise InputError(_nothing_to_quantize(run))
    found = find_blocks(run) if options.qwt else []
    _warn_of_few_heldout_samples(run, quantized is not None)

    candidates = given_candidate(run, given) if given is not None else ptq_candidates(run)
    scored = [c for c in candidates if c.sqnr_db is not None]
    ptq = max(scored, key=lambda c: c.sqnr_db) if scored else candidates[0]
    candidates = [c if c is ptq else dataclasses.replace(c, other_correction=None) for c in candidates]  # only PTQ's is tried
    selection, compensation = Selection(), None
    if found:
        selection, compensation = compensate(run, ptq, found)
    gain_interval = _qwt_gain_interval(compensation, ptq)
    applied = compensation is not None and compensation.model is not None and _beats(run, compensation, ptq, gain_interval)
    on_int8_streams, qwt_int8_residuals_gain = (_qwt_on_int8_streams(run, selection, compensation, found) if applied
                                                else (None, None))
    if on_int8_streams is not None or (not applied and _int8_residuals_pay(ptq)):
        candidates = [ptq.int8_residuals_variant if c is ptq else c for c in candidates]
        ptq = ptq.int8_residuals_variant
    if on_int8_streams is not None:
        compensation, gain_interval = on_int8_streams, _qwt_gain_interval(on_int8_streams, ptq)
    written = compensation.model if applied else ptq.model
    for name in exposed:  # scored, not the user's
        written.graph.outputs.pop(next(i for i, v in enumerate(written.graph.outputs) if v.name == name))
    if fp.meta.get("fixed_batch"):  # the user's interface: fed that many samples at a time
        prepare.fix_batch(written, fp.meta["fixed_batch"])

    proto = prepare.to_proto(written)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:  # a bug of ours, not of the input
        raise RuntimeError(f"the written model fails onnx.checker: {exc}") from exc
    if output is not None:
        prepare.save_atomically(written, output)
    result = _report(run, candidates, ptq, selection, compensation, applied, gain_interval, output, started,
                     qwt_int8_residuals_gain)
    if report is not None:
        with open(report, "w") as f:
            f.write(result.to_json())
    return proto, result


@dataclasses.dataclass
class _Run:
    """What the steps of one run share: its inputs, its options and the FP32 reference outputs."""

    fp: ir.Model
    calib: CalibrationSet
    batch_size: int
    options: Options
    warnings: Warnings
    output_parts: tuple[str, ...] = ()  # where --outputs is not given, the parts the outputs are scored in (analysis.parts)
    _reference: dict[str, np.ndarray] | None = None  # FP32 outputs on the scoring samples, computed once
    _batch_axes: dict[str, int] | None = None

    @functools.cached_property
    def log_front_end(self) -> list[str]:
        """The weighted ops kept in float because a Log reads what they compute (a spectrogram)."""
        return [n.name for n in log_front_end(self.fp.graph)]

    @functools.cached_property
    def placement(self) -> Placement:
        """Where the FP32 model's Q/DQ pairs go."""
        return place(self.fp.graph, self.options.target, self.excluded, self.int8_residuals)

    @functools.cached_property
    def compute_macs(self) -> dict[ir.Node, int]:
        """Per compute op of the FP32 graph (Conv, ConvTranspose, MatMul, Gemm, LSTM, GRU, RNN), its
        multiply-accumulates on the first calibration sample (from the shapes the model computes there)."""
        nodes = [n for n in self.fp.graph if n.op_type in g.COMPUTE_OPS and g.is_default_domain(n)]
        batch = next(self.calib.batches(1))  # every count grows in proportion to the batch: one sample tells the shares
        values = [v for n in nodes for v in (n.inputs[0], n.outputs[0])]
        computed = [v.name for v in values if v is not None and v.name and not g.is_constant(v)]
        shapes = {name: a.shape for name, a in {**Runner(with_outputs(prepare.to_proto(self.fp), computed))(batch.feeds),
                                                  **batch.feeds}.items()}

        def shape(value: ir.Value) -> tuple[int, ...] | None:  # None: an output left out (an LSTM's Y)
            return tuple(value.const_value.shape) if value.const_value is not None else shapes.get(value.name)

        return {node: g.multiply_accumulates(node, shape(node.inputs[0]), shape(node.outputs[0])) for node in nodes}

    @functools.cached_property
    def weighted_macs(self) -> dict[str, int]:
        """Per quantized weighted op, its multiply-accumulates on the first calibration sample."""
        return {node.name: self.compute_macs[node] for site in self.placement.weights for node, _ in site.readers}

    def mac_share(self, names: list[str]) -> float:
        """The share of the quantized weighted ops' multiply-accumulates that ``names`` hold."""
        total = sum(self.weighted_macs.values())
        return sum(self.weighted_macs.get(name, 0) for name in names) / total if total else 0.0

    @functools.cached_property
    def stem_observed(self) -> list[str]:
        """The tensors that a float stem's placements quantize and :attr:`placement` does not (what
        the first ops after the stem read)."""
        depth = self.options.stem_depth
        depths = (1, 2) if depth is None else (depth,)
        names = {n for d in depths
                 for n in place(self.fp.graph, self.options.target, self.stem_excluded(d), self.int8_residuals).observed_names}
        return sorted(names - set(self.placement.observed_names))

    @functools.cached_property
    def readable(self) -> dict[str, tuple[float, float]]:
        """The quantized tensors whose readers all saturate, and the values they tell apart."""
        return self.placement.readable_intervals(self.options.activation_bits)

    @property
    def int8_residuals(self) -> bool:
        return self.options.residuals == Residuals.INT8

    @functools.cached_property
    def residual_streams(self) -> int:
        """The residual streams that ``--residuals float`` leaves float for some readers, which
        ``int8`` quantizes for all."""
        other = place(self.fp.graph, self.options.target, self.excluded, not self.int8_residuals)
        floating, quantized = (other, self.placement) if self.int8_residuals else (self.placement, other)
        readers = {site.value: len(site.readers) for site in floating.activations}
        streams = quantized.activations
        own = [site for site in streams if site.value is site.observed or site.absorbed is not None]  # not a shortcut's pool
        return sum(site.observed in readers and len(site.readers) > readers[site.observed] for site in own)

    @property
    def excluded(self) -> Exclusions:
        return Exclusions(self.options.exclude_nodes, self.options.exclude_op_types, frozenset(self.log_front_end))

    def stem_excluded(self, depth: int) -> Exclusions:
        """:attr:`excluded`, and the weighted ops nearest the inputs up to ``depth`` (see ``--float-stem``)."""
        return dataclasses.replace(self.excluded, kept_float=self.excluded.kept_float | set(self.placement.stem(self.fp.graph, depth)))

    @property
    def branch_options(self) -> capture.BranchOptions:
        o = self.options
        return capture.BranchOptions(
            o.kernel_size, o.groups_factor, o.branch_precision == BranchPrecision.INT8, o.min_gain,
            o.weights == WeightRange.PORTABLE, o.target == Target.TRT, o.compensation != CompensationKind.BRANCH,
            o.compensation != CompensationKind.AFFINE, o.activation_bits, o.rank,
        )

    def reference(self, given: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The FP32 outputs on the scoring samples: ``given`` (from a pass that already ran), or run once."""
        if self._reference is None:
            self._reference = given if given is not None else observe.heldout_outputs(
                prepare.to_proto(self.fp), self.calib, self.batch_size, "FP32 reference"
            )
        return self._reference

    def output_check(self, calib: CalibrationSet) -> capture.OutputCheck | None:
        """With ``--check-outputs``, what each branch fitted on ``calib`` (a prefix of the run's set)
        is checked against at the outputs."""
        if not self.options.check_outputs or not calib.scoring_mask.any():
            return None
        if self._batch_axes is None:
            self._batch_axes = samples_axes(prepare.to_proto(self.fp))[1]
        return capture.OutputCheck(self._scoring_reference(calib), calib.scoring_mask, self._batch_axes, self.options.outputs)

    def _scoring_reference(self, calib: CalibrationSet) -> dict[str, np.ndarray]:
        """The FP32 outputs on the scoring samples of ``calib``, a prefix of the run's set (whose
        scoring samples are the first of the run's)."""
        count = int(calib.scoring_mask.sum())
        return {k: v[:count] for k, v in self.reference().items()}

    def heldout_score(self, model: ir.Model, description: str, calib: CalibrationSet | None = None) -> Score | None:
        """SQNR to FP32 per output on the scoring samples of ``calib`` (a prefix of the run's set)."""
        calib = calib or self.calib
        if not calib.scoring_mask.any():
            return None
        reference = self._scoring_reference(calib)
        outputs = observe.heldout_outputs(prepare.to_proto(model), calib, self.batch_size, description)
        return metrics.score(reference, outputs, self.options.outputs)


def _warn_of_few_heldout_samples(run: _Run, given: bool) -> None:
    o, held = run.options, len(np.unique(run.calib.repeats[run.calib.heldout_mask]))  # repeats add no evidence
    choices = [name for name, made in (
        ("calibration method", o.calib_method == CalibMethod.AUTO and not given),
        ("bias correction", o.bias_correction == BiasCorrection.AUTO and not given),
        ("QwT or PTQ", o.qwt),
    ) if made]
    if choices and 0 < held < MIN_HELDOUT_SAMPLES:
        run.warnings.warn(
            f"only {held} distinct held-out calibration samples decide the {', '.join(choices)}: below {MIN_HELDOUT_SAMPLES} "
            f"the choice may be noise; give at least {MIN_HELDOUT_SAMPLES * HELDOUT_EVERY} calibration samples "
            "that do not repeat one another (mirror images and duplicates count once)"
        )


def load_fp32(model: ModelLike) -> ir.Model:
    """The FP32 model, prepared for the passes (see :func:`prepare.prepare`); a batch dimension
    fixed over 1 made dynamic, its size kept in ``meta["fixed_batch"]`` (:func:`prepare.free_fixed_batch`)."""
    loaded = _load(model, "input model")
    fixed_batch = prepare.free_fixed_batch(loaded)
    fp = prepare.prepare(loaded)
    fp.meta["fixed_batch"] = fixed_batch
    kernels = g.integer_kernels(fp.graph)
    if kernels:  # quantize_dynamic's or quantize_static's QOperator output: --quantized cannot take it either
        raise InputError(f"the input model is already quantized, in onnxruntime's QOperator format ({', '.join(kernels[:3])}); "
                         "pass the FP32 model it was made from")
    if g.is_quantized(fp.graph):
        raise InputError("the input model is already quantized; pass the FP32 model as input and this one with --quantized")
    return fp


def _nothing_to_quantize(run: _Run) -> str:
    """Why the Q/DQ pass would place no pair: each compute op's reason to stay float, or none there."""
    graph = run.fp.graph
    left = collections.Counter(left_float(graph, run.placement, run.excluded, []).values())
    if not left:
        ops = collections.Counter(node.op_type for node in graph)
        return (f"nothing to quantize: the model has no Conv, ConvTranspose, MatMul, Gemm or recurrent op (its ops: "
                f"{', '.join(op for op, _ in ops.most_common(4))}); the FP32 model is what to deploy")
    reasons = "; ".join(f"{count}: {FLOAT_REASONS[why]}" for why, count in left.most_common())
    fix = "exclude fewer" if "excluded" in left else "the FP32 model is what to deploy"
    return f"nothing to quantize: every compute op of the model stays float ({reasons}); {fix}"


def find_blocks(run: _Run) -> list[blk.Block]:
    """The blocks to compensate: named by ``--blocks``, or found in the graph."""
    if run.calib.num_samples < 2:
        run.warnings.warn("QwT needs at least 2 calibration samples (one to fit, one to validate); writing the PTQ model")
        return []
    if run.options.blocks:
        found = blk.blocks_from_boundaries(run.fp, run.options.blocks)
    else:
        found = blk.find_blocks(run.fp, run.options.granularity, run.options.units)
    if not found:
        run.warnings.warn("no residual or transformer blocks were found; writing the PTQ model (name them with --blocks)")
    return found


def load_quantized(quantized: ModelLike) -> ir.Model:
    """The user's QDQ model (``--quantized``), prepared for the passes, a batch fixed over 1 freed as the FP32 model's."""
    loaded = _load(quantized, "quantized model")
    prepare.free_fixed_batch(loaded)
    q = prepare.prepare(loaded)
    if not g.is_quantized(q.graph):
        raise InputError("the --quantized model has no QuantizeLinear/DequantizeLinear nodes; pass a QDQ model")
    kernels = g.integer_kernels(q.graph)
    if kernels:
        raise InputError(f"the --quantized model is in onnxruntime's QOperator format ({', '.join(kernels[:3])}); pass a "
                         "QDQ model of the same FP32 model (quantize_static with quant_format=QuantFormat.QDQ)")
    return q


def given_candidate(run: _Run, q: ir.Model) -> list[Candidate]:
    """The user's QDQ model as the only PTQ candidate."""
    saturating = check.check(prepare.to_proto(q)).of("saturation")
    if saturating:
        run.warnings.warn(
            f"{len(saturating)} integer kernels of the --quantized model can saturate on x86 CPUs without VNNI "
            "(its int8 weights are not pair-safe), and so can the written model; "
            "'python -m qwt_onnx check' lists them"
        )
    return [Candidate(GIVEN, q, run.heldout_score(q, f"evaluating PTQ ({GIVEN})"))]


def ptq_candidates(run: _Run) -> list[Candidate]:
    """Our PTQ model per calibration method; with ``--bias-correction auto``, the best method's
    with and without bias correction, whichever scores better on held-out samples; with
    ``--rounding auto``, that model's weights rounded with error feedback or to nearest, likewise;
    with ``--equalization auto``, that model's made again on the model with its channels
    equalized, likewise (``on``: every candidate on that model).

    The correction is decided once, on the best method: it adds to each bias the mean error of
    its op's rounded weights on the FP32 inputs, which no activation range changes, so every
    method gets the same one (the methods are ranked with it, as most models keep it). Whether
    it helps can depend on the ranges, though: on ddddocr's YOLOX detector it gives percentile
    +5.9 dB and costs MSE 5.9; ranking all six models would cost two more evaluations. The
    rounding and the equalization are decided last, on the chosen model, for the same reason."""
    o = run.options
    placement = run.placement
    groups = channel_groups(run.fp.graph) if o.equalization != EqualizationChoice.OFF else []
    seen = _observe(run, run.fp, placement, groups)
    run.reference(seen.reference)
    methods = CalibMethod.methods() if o.calib_method == CalibMethod.AUTO else (o.calib_method,)
    if o.calib_method == CalibMethod.AUTO and not run.calib.heldout_mask.any():
        methods = (CalibMethod.PERCENTILE,)
        run.warnings.warn("one calibration sample leaves none to compare calibration methods; using percentile")
    if o.equalization == EqualizationChoice.ON and groups:
        # the ranges are the method's where one is given; auto's choice among them is to come
        method = o.calib_method if o.calib_method != CalibMethod.AUTO else CalibMethod.MSE
        equalized = _equalized(run, groups, seen, method)
        if equalized is not None:
            builder = _Builder(run, methods, equalized.model, _observe_equalized(run, equalized, seen, placement), equalized)
            return _with_int8_residuals_variant(builder, _search(builder))
    plain = _Builder(run, methods, run.fp, seen)
    candidates = _search(plain)
    if o.equalization == EqualizationChoice.AUTO and groups:
        best = _best(candidates)
        equalized = _equalized(run, groups, seen, CalibMethod(best.method))
        if equalized is not None:
            seen = _observe_equalized(run, equalized, seen, placement)
            builder = _Builder(run, (CalibMethod(best.method),), equalized.model, seen, equalized)
            chosen = _better_equalization(builder, best)
            candidates = [chosen if c is best else c for c in candidates]
            if chosen.equalized:
                return _with_int8_residuals_variant(builder, candidates)
    return _with_int8_residuals_variant(plain, candidates)


def _with_int8_residuals_variant(builder: _Builder, candidates: list[Candidate]) -> list[Candidate]:
    """``candidates``, the best with its residual streams quantized for every reader attached
    (:attr:`Candidate.int8_residuals_variant`), where ``--residuals auto`` has such streams to
    decide: whether it is written is decided once QwT is (:func:`_int8_residuals_pay`)."""
    if builder.run.options.residuals != Residuals.AUTO or not builder.run.residual_streams:
        return candidates
    best = _best(candidates)
    if best.score is None:  # no held-out samples to tell a loss
        return candidates
    built = builder.like(best, int8_residuals=True)
    gain = metrics.db_gain(built.sqnr_db, best.sqnr_db)
    variant = dataclasses.replace(best, model=built.model, score=built.score, int8_residuals=True, int8_residuals_gain_db=gain)
    attached = dataclasses.replace(best, int8_residuals_variant=variant, int8_residuals_gain_db=gain)
    return [attached if c is best else c for c in candidates]


@dataclasses.dataclass
class _Equalized:
    """The FP32 model with channel groups equalized, the choice per group's tensor and the
    scales each tensor of their chains now carries."""

    model: ir.Model
    choices: dict[str, eqn.Equalization]
    scaled: dict[str, np.ndarray]


def _equalized(run: _Run, groups: list[ChannelGroup], seen: observe.Observation, method: CalibMethod) -> _Equalized | None:
    """``run.fp`` with each channel group's scales moved into its weights where that lowers its
    consumers' output error with ``method``'s activation ranges; None where it lowers it nowhere."""
    o, choices = run.options, {}
    symmetric = o.target == Target.TRT
    range_of = functools.partial(compute_range, method=method.value, symmetric=symmetric, bits=o.activation_bits)
    for group in groups:
        quantized = [eqn.QuantizedActivation(*seen.extremes[v.name], seen.samples[v.name]) for v in group.chain if v.name in seen.samples]
        if not quantized:  # the consumers are left in float
            continue
        choice = eqn.equalize(quantized, seen.powers[group.tensor.name], consumer_weights(group), range_of, o.weight_bits,
                              o.activation_bits, symmetric, o.weights == WeightRange.PORTABLE)
        if choice.scaled:
            choices[group.tensor.name] = choice
    if not choices:
        return None
    model = run.fp.clone()
    EqualizeChannelsPass({name: choice.scales for name, choice in choices.items()})(model)
    scaled = {value.name: choices[group.tensor.name].scales for group in groups if group.tensor.name in choices for value in group.chain}
    return _Equalized(model, choices, scaled)


def _observe_equalized(run: _Run, equalized: _Equalized, seen: observe.Observation, placement: Placement) -> observe.Observation:
    """What a pass of the equalized model would see, from ``seen`` (the FP32 model's): only the
    quantized tensors that carry a scale are observed again (a histogram does not rescale per
    channel); their per-channel statistics and the second moments of the ops that read them
    are ``seen``'s, rescaled, and every other tensor's are as they were."""
    scaled = equalized.scaled
    again = observe.observe(prepare.to_proto(equalized.model), [n for n in placement.observed_names if n in scaled], run.calib,
                            run.batch_size, readable=run.readable)
    inputs = placement.hessian_inputs(observe.HESSIAN_INPUTS)

    def rescaled(statistics: dict, power: int = 1) -> dict:
        return {name: value / scaled[name] ** power if name in scaled else value for name, value in statistics.items()}

    moments = {weight: m.rescaled(scaled[inputs[weight][0]]) if inputs[weight][0] in scaled else m
               for weight, m in seen.second_moments.items()}
    return observe.Observation({**seen.ranges, **again.ranges}, rescaled(seen.means), rescaled(seen.powers, 2), seen.reference,
                               moments)


def _observe(run: _Run, fp: ir.Model, placement: Placement, groups: list[ChannelGroup] = ()) -> observe.Observation:
    """One pass of ``fp`` over the calibration data: the ranges of the tensors to quantize, the
    per-channel statistics of the weighted ops' inputs where bias correction or low-bit clipping
    needs them and of the channel groups' tensors, and the weights' input moments for GPTQ."""
    o = run.options
    axes = placement.channel_axes() if o.bias_correction != BiasCorrection.OFF or o.weight_bits < 8 else {}
    # of each chain, the tensors quantized (their samples and extremes) and the consumers' input (its power)
    observed = set(placement.observed_names)
    sampled = {value.name: group.axis for group in groups for value in group.chain if value.name in observed}
    axes.update({group.tensor.name: group.axis for group in groups})
    return observe.observe(
        prepare.to_proto(fp), [*placement.observed_names, *run.stem_observed], run.calib, run.batch_size, axes,
        placement.hessian_inputs(observe.HESSIAN_INPUTS) if o.rounding != Rounding.NEAREST else None, sampled,
        run.readable,
    )


@dataclasses.dataclass
class _Builder:
    """Builds and scores PTQ models of one FP32 model (``run.fp`` or its equalized copy) from one
    observation of it, for the calibration ``methods``."""

    run: _Run
    methods: tuple[CalibMethod, ...]
    fp: ir.Model
    seen: observe.Observation
    equalized: _Equalized | None = None
    _feedback: dict[bool, dict[str, rounding.Feedback]] = dataclasses.field(default_factory=dict)  # by whether bias correction centres the moments

    def __post_init__(self) -> None:
        o = self.run.options
        symmetric = o.target == Target.TRT
        self.ranges = {method: {name: compute_range(obs, method.value, symmetric, o.activation_bits) for name, obs in self.seen.ranges.items()}
                       for method in self.methods}

    def candidate(self, method: CalibMethod, corrected: bool, weighted: bool = True, gptq: bool | None = None,
                  scored: bool = True, stem: int | None = None, int8_residuals: bool | None = None) -> Candidate:
        o, seen = self.run.options, self.seen
        gptq = o.rounding == Rounding.GPTQ if gptq is None else gptq
        int8_residuals = o.residuals == Residuals.INT8 if int8_residuals is None else int8_residuals
        stem = (o.stem_depth or 0) if stem is None else stem  # auto decides it later, on the chosen model
        model = self.fp.clone()
        if gptq and corrected not in self._feedback:
            # bias correction removes the rounding's mean error: what is left to minimise is its variance
            self._feedback[corrected] = {w: rounding.feedback(m.hessian(centered=corrected)) for w, m in seen.second_moments.items()}
        qdq.InsertQdqPass(self.ranges[method], o.target, self.run.stem_excluded(stem), o.weights, seen.means if corrected else None,
                          o.weight_bits, o.activation_bits, seen.powers if weighted else None, o.block_size,
                          self._feedback[corrected] if gptq else None, int8_residuals)(model)
        label = (f"{method}{', bias-corrected' if corrected else ''}{'' if weighted else ', plain clipping'}{', GPTQ' if gptq else ''}"
                 f"{', equalized' if self.equalized else ''}{f', float stem {stem}' if stem else ''}"
                 f"{', int8 residual streams' if int8_residuals and o.residuals == Residuals.AUTO else ''}")
        score = self.run.heldout_score(model, f"evaluating PTQ ({label})") if scored else None
        return Candidate(method.value, model, score, bias_corrected=corrected, weighted_clipping=weighted, gptq=gptq, float_stem=stem,
                         float_model=self.fp if self.equalized else None, int8_residuals=int8_residuals,
                         equalized={name: choice.alpha for name, choice in self.equalized.choices.items()} if self.equalized else {})

    def like(self, other: Candidate, stem: int | None = None, scored: bool = True,
             int8_residuals: bool | None = None) -> Candidate:
        """``other``'s PTQ (method, bias correction, clipping, rounding, residual streams) built on
        this builder's model, with ``other``'s float stem or ``stem``."""
        return self.candidate(CalibMethod(other.method), other.bias_corrected, other.weighted_clipping, other.gptq, scored,
                              other.float_stem if stem is None else stem,
                              other.int8_residuals if int8_residuals is None else int8_residuals)

    def corrected_or_not(self, method: CalibMethod, weighted: bool, gptq: bool, first: Candidate | None = None) -> Candidate:
        """The better of the method's models with and without bias correction."""
        first = first or self.candidate(method, True, weighted, gptq)
        return _better_of([first, self.candidate(method, not first.bias_corrected, weighted, gptq)])


def _search(builder: _Builder) -> list[Candidate]:
    """The PTQ model per calibration method, then the best one's bias correction and rounding."""
    o = builder.run.options
    corrected = o.bias_correction != BiasCorrection.OFF
    candidates = [builder.candidate(method, corrected) for method in builder.methods]
    if o.weight_bits < 8 and builder.seen.powers:
        # Weighing each weight's rounding error by its input's mean square is the output's error
        # where inputs are uncorrelated; where they are not it can do worse (Silero VAD at W4A4 with
        # percentile ranges: 1.8 dB lower held out, with min-max and MSE 2.5 and 2.8 dB higher), so
        # held-out samples decide, per method.
        candidates = [_better_clipping(c, builder.candidate(CalibMethod(c.method), corrected, weighted=False)) for c in candidates]
    if o.bias_correction == BiasCorrection.AUTO:
        best = _best(candidates)
        pair = builder.corrected_or_not(CalibMethod(best.method), best.weighted_clipping, best.gptq, best)
        pair = dataclasses.replace(pair, weighted_clipping_gain_db=best.weighted_clipping_gain_db)
        candidates = [pair if c is best else c for c in candidates]
    if o.rounding == Rounding.AUTO and builder.seen.second_moments:
        best = _best(candidates)
        method = CalibMethod(best.method)
        if o.bias_correction == BiasCorrection.AUTO:
            gptq = builder.corrected_or_not(method, best.weighted_clipping, True)
        else:
            gptq = builder.candidate(method, best.bias_corrected, best.weighted_clipping, True)
        chosen = _better_rounding(best, gptq)
        candidates = [chosen if c is best else c for c in candidates]
    if o.stem_depth is None:
        best = _best(candidates)
        candidates = [_float_stem(builder, best) if c is best else c for c in candidates]
    return candidates


def _float_stem(builder: _Builder, chosen: Candidate) -> Candidate:
    """``chosen``, or the same PTQ with the weighted ops nearest the inputs left in float, to depth
    1 or 2: a depth is kept only where held-out samples show it beating the model so far by at
    least :data:`MIN_FLOAT_STEM_GAIN_DB` and beyond noise (the lower end of the gain's 95% interval
    above 0), its float ops holding at most :data:`MAX_FLOAT_STEM_MACS` of the multiply-accumulates:
    a float op costs latency. What the first ops' quantizers round off, the rest of the network
    carries and can amplify (PP-LCNet's first depthwise convolution turns its input's 38 dB into
    19: tools/error_sources.py), and no branch after them predicts it."""
    run, gains = builder.run, {}
    shallower: list[str] = []
    for depth in (1, 2):
        stem = run.placement.stem(run.fp.graph, depth)
        if not stem or stem == shallower or chosen.score is None:
            continue
        shallower = stem
        deeper = builder.like(chosen, stem=depth)
        interval = metrics.gain_interval(deeper.score, chosen.score) if deeper.score is not None else None
        if interval is None:
            continue
        gain, share = metrics.db_gain(deeper.sqnr_db, chosen.sqnr_db), run.mac_share(stem)
        gains[depth] = (gain, *interval, share)
        if interval[0] > 0 and gain >= MIN_FLOAT_STEM_GAIN_DB and share <= MAX_FLOAT_STEM_MACS:
            other = chosen.other_correction
            if other is not None:
                other = builder.like(other, stem=depth, scored=False)
            chosen = dataclasses.replace(
                deeper, other_correction=other, bias_correction_gain_db=chosen.bias_correction_gain_db,
                weighted_clipping_gain_db=chosen.weighted_clipping_gain_db, gptq_gain_db=chosen.gptq_gain_db,
            )
    return dataclasses.replace(chosen, float_stem_gains_db=gains)


def _better_equalization(builder: _Builder, plain: Candidate) -> Candidate:
    """Of ``plain`` and the same PTQ on the equalized model, the better on held-out samples
    (``plain`` where either is unscored), with the gain of equalizing; the equalized one keeps
    the bias correction the other way for QwT's trial, as ``plain`` does."""
    equalized = builder.like(plain)
    if plain.sqnr_db is None or equalized.sqnr_db is None:
        return plain
    gain = metrics.db_gain(equalized.sqnr_db, plain.sqnr_db)
    if gain <= 0:
        return dataclasses.replace(plain, equalization_gain_db=gain)
    other = plain.other_correction
    if other is not None:
        other = builder.like(other, stem=plain.float_stem, scored=False)
    return dataclasses.replace(
        equalized, equalization_gain_db=gain, other_correction=other, bias_correction_gain_db=plain.bias_correction_gain_db,
        weighted_clipping_gain_db=plain.weighted_clipping_gain_db, gptq_gain_db=plain.gptq_gain_db,
        float_stem_gains_db=plain.float_stem_gains_db,
    )


def _better_rounding(nearest: Candidate, gptq: Candidate) -> Candidate:
    """Of one method's models with weights rounded to nearest and with error feedback, the better
    on held-out samples (nearest where either is unscored), with the gain of error feedback."""
    if nearest.sqnr_db is None or gptq.sqnr_db is None:
        return nearest
    gain = metrics.db_gain(gptq.sqnr_db, nearest.sqnr_db)
    chosen = gptq if gain > 0 else nearest
    return dataclasses.replace(chosen, gptq_gain_db=gain, weighted_clipping_gain_db=nearest.weighted_clipping_gain_db)


def _better_clipping(weighted: Candidate, plain: Candidate) -> Candidate:
    """Of one method's models with weight clipping weighed by input powers and plain, the better
    on held-out samples (the weighted where either is unscored), with the gain of weighing."""
    if weighted.sqnr_db is None or plain.sqnr_db is None:
        return weighted
    gain = metrics.db_gain(weighted.sqnr_db, plain.sqnr_db)
    return dataclasses.replace(weighted if gain >= 0 else plain, weighted_clipping_gain_db=gain)


def _best(candidates: list[Candidate]) -> Candidate:
    """The candidate with the best held-out score (the first where none is scored)."""
    scored = [c for c in candidates if c.sqnr_db is not None]
    return max(scored, key=lambda c: c.sqnr_db) if scored else candidates[0]


def _better_of(variants: list[Candidate]) -> Candidate:
    """Of one method's models with and without bias correction, the better on held-out samples
    (the first where none are held out), with the gain of the correction and the other model."""
    scored = [v for v in variants if v.sqnr_db is not None]
    chosen = max(scored, key=lambda v: v.sqnr_db) if scored else variants[0]
    gain = None
    if len(scored) == 2:
        by_correction = {v.bias_corrected: v.sqnr_db for v in scored}
        gain = metrics.db_gain(by_correction[True], by_correction[False])
    other = next((v for v in variants if v is not chosen), None)
    return dataclasses.replace(chosen, bias_correction_gain_db=gain, other_correction=other)


def compensate(run: _Run, ptq: Candidate, found: list[blk.Block]) -> tuple[Selection, Compensation]:
    """QwT on the best PTQ model: tried on the first samples (with bias correction either way,
    where that is to be chosen), then fitted on every calibration sample where the trial says
    it can pay."""
    selection = _select(run, ptq, found)
    if not selection.sqnr_db:
        run.warnings.warn(
            f"QwT kept no branch on the held-out samples of the first {selection.samples}; "
            "not fitting it on all samples, writing the PTQ model"
        )
        return selection, selection.compensation
    if selection.compensation.samples == run.calib.num_samples:  # the trial saw every sample: it is the fit
        return selection, selection.compensation
    chosen = selection.candidate
    if selection.cannot_pay:
        untried = [label for label in _trial_labels(ptq) if label not in selection.scores and label not in selection.without_branch]
        run.warnings.warn(
            f"QwT fitted on the first {selection.samples} samples {selection.cannot_pay}; not fitting it on all samples, "
            "writing the PTQ model"
            + "".join(f" (not tried: QwT on {label})" for label in untried)
        )
        return selection, dataclasses.replace(selection.compensation, model=None, score=None)
    compensation = _compensate(run, chosen, found, run.calib)
    if compensation.model is None:
        run.warnings.warn("QwT lowered the error of no block on held-out samples; writing the PTQ model")
        return selection, compensation
    score = run.heldout_score(compensation.model, f"evaluating QwT ({chosen.method})")
    return selection, dataclasses.replace(compensation, score=score)


def _why_the_trial_cannot_pay(trial: Score, ptq: Candidate) -> str | None:
    """Why QwT fitted on every sample would not be written, judged from its trial on the first
    ones: its held-out gain over PTQ under :data:`MIN_QWT_GAIN_DB`, or the lower end of the
    gain's 95% interval :data:`PAYS_MARGIN_DB` or more below zero. None where it may pay."""
    shortfall = _trial_shortfall(trial, ptq)
    if shortfall is None:
        return None
    gain, interval = shortfall
    if gain < MIN_QWT_GAIN_DB:
        return (
            f"gains {gain:+.2f} dB over PTQ ({ptq.method}) on held-out samples, under the {MIN_QWT_GAIN_DB} dB a written "
            "QwT needs (from trial to full fit a gain moved by -0.15 to +1.05 dB on the models measured)"
        )
    return (
        f"gains {gain:+.2f} dB over PTQ ({ptq.method}) on held-out samples, 95% interval {interval[0]:+.2f} to "
        f"{interval[1]:+.2f} dB: all samples would not lift it clear of the noise"
    )


def _trial_shortfall(trial: Score, ptq: Candidate) -> tuple[float, tuple[float, float] | None] | None:
    """The trial's held-out gain over PTQ and its 95% interval, where they say QwT cannot pay."""
    if ptq.score is None:
        return None
    trial, ptq_score = metrics.where_they_differ(trial, ptq.score)
    gain = metrics.db_gain(trial.db, ptq_score.db)
    interval = metrics.gain_interval(trial, ptq_score)
    if gain < MIN_QWT_GAIN_DB or (interval is not None and interval[0] <= -PAYS_MARGIN_DB):
        return gain, interval
    return None


def _select(run: _Run, ptq: Candidate, found: list[blk.Block]) -> Selection:
    """QwT on the best PTQ model, and on its weights with bias correction the other way, on the
    first samples.

    A branch's bias absorbs its block's mean error itself, so whether bias correction still
    helps is a question for the compensated model. Other calibration methods are not tried:
    QwT on one of them has never beaten QwT on PTQ's best beyond the noise of the held-out
    samples since MSE joined ``auto`` (eight zoo models), and each trial is a capture. Nor is
    the other correction where QwT on PTQ's best falls short of paying by more than it has
    ever gained over it (:func:`_other_correction_may_pay`).
    """
    subset = run.calib.take(SELECTION_SAMPLES)
    trials = _trial_labels(ptq)
    compensations, cannot_pay = {}, {}
    for label, candidate in trials.items():
        compensation = _compensate(run, candidate, found, subset)
        if compensation.model is not None:
            # Scored on every scoring sample, not only the subset's dozen held-out ones (no fit saw
            # any of them): output errors are heavy-tailed, and a dozen samples decide by noise.
            compensation = dataclasses.replace(compensation, score=run.heldout_score(compensation.model, f"evaluating QwT ({label})"))
            cannot_pay[label] = _why_the_trial_cannot_pay(compensation.score, ptq) if compensation.score is not None else None
        compensations[label] = compensation
        if candidate is ptq and not _other_correction_may_pay(compensation.score, ptq):
            break
    scores = {label: c.score for label, c in compensations.items() if c.model is not None}
    without_branch = [label for label in compensations if label not in scores]
    if not scores:  # the PTQ model's fits say why
        return Selection(subset.num_samples, without_branch=without_branch, compensation=compensations[ptq.method])
    best = _trial_choice(scores, ptq.method, paying=[label for label in scores if not cannot_pay[label]])
    return Selection(subset.num_samples, scores, best, trials[best], without_branch, compensations[best], cannot_pay[best])


def _trial_labels(ptq: Candidate) -> dict[str, Candidate]:
    """The PTQ models QwT is tried on, by label: the best PTQ model (labelled by its method) and
    its method's with bias correction the other way, where there is one."""
    trials = {ptq.method: ptq}
    other = ptq.other_correction
    if other is not None:
        trials[f"{other.method} {'with' if other.bias_corrected else 'without'} bias correction"] = other
    return trials


def _other_correction_may_pay(first: Score | None, ptq: Candidate) -> bool:
    """Whether QwT on bias correction the other way is worth a trial after QwT on PTQ's best
    scored ``first``: where that trial may pay (the other may still beat it) or falls short of
    it by no more than :data:`OTHER_CORRECTION_REACH_DB`."""
    shortfall = _trial_shortfall(first, ptq) if first is not None else None
    return shortfall is None or shortfall[0] > MIN_QWT_GAIN_DB - OTHER_CORRECTION_REACH_DB


def _trial_choice(scores: dict[str, Score], ptq_method: str, paying: list[str]) -> str:
    """The trial to fit QwT on: of those that may pay (all where none may), the best PTQ
    model's, unless QwT on the other beats QwT on it beyond the noise of the scoring samples
    (the lower end of the 95% interval of its gain is above zero)."""
    labels = paying or list(scores)
    best = max(labels, key=lambda label: scores[label].db)
    if best == ptq_method or ptq_method not in labels:
        return best
    interval = metrics.gain_interval(scores[best], scores[ptq_method])
    return best if interval is None or interval[0] > 0.0 else ptq_method


def _beats(run: _Run, compensation: Compensation, ptq: Candidate, interval: tuple[float, float] | None) -> bool:
    """The QwT model is written only where held-out samples show that it tracks FP32 better than
    the best PTQ model: its gain at least :data:`MIN_QWT_GAIN_DB`, beyond noise (the lower end
    of the gain's 95% interval above zero) where it can be told, or else on some chosen output
    of several, and no chosen output worse beyond noise. Branches cost latency and parameters,
    and a gain within the noise of the scoring samples did not pay for them on unseen models (a
    byte classifier's +0.9 dB held-out gain was -0.1 dB on its evaluation files). Of several
    outputs the worst may be one QwT cannot move (a hand landmarker's handedness, a sigmoid of
    one logit) while it lifts the others far beyond noise."""
    if compensation.score is None or ptq.score is None:
        return True
    qwt_score, ptq_score = metrics.where_they_differ(compensation.score, ptq.score)
    gain = metrics.db_gain(qwt_score.db, ptq_score.db)
    if gain <= 0.0:
        run.warnings.warn(
            f"QwT ({compensation.method}) reaches {qwt_score.db:.2f} dB on held-out samples, no better than "
            f"PTQ ({ptq.method}) at {ptq_score.db:.2f} dB; writing the PTQ model"
        )
        return False
    if interval is not None and interval[0] <= 0.0 and not _outputs_gaining(compensation, ptq):
        run.warnings.warn(
            f"QwT's held-out gain over PTQ, {gain:+.2f} dB, is within the noise of its {int(run.calib.scoring_mask.sum())} "
            f"scoring samples (95% interval {interval[0]:+.2f} to {interval[1]:+.2f} dB); writing the PTQ model, which "
            "needs no branches: more calibration samples would settle it"
        )
        return False
    if gain < MIN_QWT_GAIN_DB:
        run.warnings.warn(
            f"QwT's held-out gain over PTQ, {gain:+.3f} dB, is under {MIN_QWT_GAIN_DB} dB, too little to pay for its "
            "branches; writing the PTQ model"
        )
        return False
    worse = {name: (low, high) for name, (low, high) in metrics.output_gain_intervals(compensation.score, ptq.score).items()
             if high < 0.0}
    if worse:  # the worst output gained, another lost beyond noise: a detector's boxes for its objectness
        name, (low, high) = min(worse.items(), key=lambda item: item[1][1])
        run.warnings.warn(
            f"QwT lifts the worst output but makes {name} worse on held-out samples: "
            f"{ptq.score.outputs_db[name]:.2f} -> {compensation.score.outputs_db[name]:.2f} dB (95% interval {low:+.2f} "
            f"to {high:+.2f} dB); writing the PTQ model"
        )
        return False
    return True


def _outputs_gaining(compensation: Compensation | None, ptq: Candidate) -> list[str]:
    """The chosen outputs, of several, on which QwT's held-out gain over PTQ is beyond noise (the
    lower end of its own 95% interval above zero)."""
    if compensation is None or compensation.score is None or ptq.score is None:
        return []
    intervals = metrics.output_gain_intervals(*metrics.where_they_differ(compensation.score, ptq.score))
    return sorted(name for name, (low, _) in intervals.items() if low > 0.0) if len(intervals) > 1 else []


def _int8_residuals_pay(ptq: Candidate) -> bool:
    """Whether the PTQ model, written without QwT, is written with its residual streams quantized
    for every reader (``--residuals auto`` built that variant; :func:`_int8_streams_keep`). Where
    QwT is written, :func:`_qwt_on_int8_streams` decides its streams."""
    variant, gain = ptq.int8_residuals_variant, ptq.int8_residuals_gain_db
    if variant is None or gain is None:
        return False
    return _int8_streams_keep(gain, variant.score, ptq.score)


def _int8_streams_keep(gain: float, quantized: Score, floating: Score) -> bool:
    """Whether a model whose residual streams are quantized for every reader is kept over the same
    model with float streams, ``gain`` its held-out gain over it: unless held-out samples show it
    losing at least :data:`MAX_INT8_RESIDUALS_LOSS_DB` and beyond noise (the upper end of the 95%
    interval of the gain below zero)."""
    if gain > -MAX_INT8_RESIDUALS_LOSS_DB:
        return True
    interval = metrics.gain_interval(quantized, floating)
    return interval is not None and interval[1] >= 0.0


def _qwt_on_int8_streams(run: _Run, selection: Selection, compensation: Compensation,
                         found: list[blk.Block]) -> tuple[Compensation | None, float | None]:
    """QwT fitted again on the PTQ model with its residual streams quantized for every reader
    (``--residuals auto`` built it), where that keeps QwT's gain: kept against QwT on float
    streams as the PTQ model's streams are (:func:`_int8_streams_keep`), and still gaining at
    least :data:`MIN_QWT_GAIN_DB` over the PTQ model it is fitted on. On YOLOv8n it kept
    the gain (class scores 13.69 against 13.78 dB on the evaluation photos), its latency within
    this machine's noise of QwT on float streams (its two Adds are little of its time); on a small
    ResNet the quantized sums rounded the corrections off (2.6 -> 1.6 dB). Also its held-out gain
    over QwT on float streams, where tried."""
    variant = selection.candidate.int8_residuals_variant if selection.candidate is not None else None
    if variant is None or compensation.score is None:
        return None, None
    fitted = _compensate(run, variant, found, run.calib)
    if fitted.model is None:
        return None, None
    fitted = dataclasses.replace(fitted, score=run.heldout_score(fitted.model, "evaluating QwT on int8 residual streams"))
    gain = metrics.db_gain(fitted.sqnr_db, compensation.sqnr_db)
    keeps = _int8_streams_keep(gain, fitted.score, compensation.score)
    return (fitted if keeps and metrics.db_gain(fitted.sqnr_db, variant.sqnr_db) >= MIN_QWT_GAIN_DB else None), gain


def _decided_on(compensation: Compensation | None, ptq: Candidate) -> list[str]:
    """The outputs QwT against PTQ was decided on, where fewer than the chosen ones (the others the same in both)."""
    if compensation is None or compensation.score is None or ptq.score is None:
        return []
    qwt_score, _ = metrics.where_they_differ(compensation.score, ptq.score)
    return [] if qwt_score is compensation.score else list(qwt_score.chosen)


def _qwt_gain_interval(compensation: Compensation | None, ptq: Candidate) -> tuple[float, float] | None:
    """The 95% interval of QwT's held-out gain over PTQ (on the outputs it changes), where both have per-sample scores."""
    if compensation is None or compensation.score is None or ptq.score is None:
        return None
    return metrics.gain_interval(*metrics.where_they_differ(compensation.score, ptq.score))


def _compensate(run: _Run, candidate: Candidate, found: list[blk.Block], calib: CalibrationSet) -> Compensation:
    """``candidate``'s model with fitted branches spliced in (a copy; None if no block gained) and the per-block reports."""
    # Our own Q/DQ pass keeps the FP32 meaning of every boundary tensor; a given QDQ model may not.
    exact = candidate.method != GIVEN
    results = capture.fit_blocks(
        candidate.float_model or run.fp, candidate.model, found, calib, run.batch_size, exact_boundaries=exact,
        branch_options=run.branch_options, check=run.output_check(calib),
    )
    branches, folds, reports = [], [], []
    for k, res in enumerate(results):
        entry = _block_report(res)
        if res.result is not None and res.result.not_finite:
            run.warnings.warn(f"block {res.block.name}: NaN or Inf in its statistics or fit; its compensation is dropped")
        if res.kept and res.affine is not None:
            folds.append(res.affine)
        elif res.kept:
            low = res.low_rank
            branch = splice.Branch(
                f"block{k}", res.branch_input, res.block.output, res.result.fit.weight if low is None else low.down,
                res.result.fit.bias, res.layout, int8_scale=res.int8_scale, target=run.options.target,
                input_range=res.input_range, output_range=res.output_range, activation_bits=run.options.activation_bits,
                up=None if low is None else low.up,
            )
            branches.append(branch)
            entry = dataclasses.replace(entry, parameters=branch.num_parameters)
        reports.append(entry)
    if not branches and not folds:
        return Compensation(candidate.method, None, reports, calib.num_samples, bias_corrected=candidate.bias_corrected)
    compensated = candidate.model.clone()
    passes = ([affine.FoldAffinePass(folds)] if folds else []) + ([splice.SpliceCompensationPass(branches)] if branches else [])
    ir.passes.PassManager([*passes, TopologicalSortPass()])(compensated)
    return Compensation(candidate.method, compensated, reports, calib.num_samples, bias_corrected=candidate.bias_corrected)


def _block_report(res: capture.BlockResult) -> BlockReport:
    note = res.skipped
    if res.skipped.startswith("no linear branch maps") and res.block.divisible:
        note += " (--units gives its weighted units branches)"
    site, fit = res.plan.fold_site, res.result
    folding = isinstance(fit, AffineFit)
    entry = BlockReport(res.block.name, res.block.input, res.block.output, kept=res.kept, note=note,
                        fold_site=site.node if folding and isinstance(site, affine.FoldSite) else None)
    if fit is None:
        return entry
    return dataclasses.replace(
        entry, r2_train=fit.r2_train, r2_heldout=fit.r2_heldout, error_ratio_heldout=fit.error_ratio_heldout,
        error_ratio_train=fit.error_ratio_train,
        note=res.skipped or fit.reason, channels=fit.scale.size if folding else fit.fit.bias.size,
        channels_kept=fit.kept_targets, output_gain_db=res.output_gain_db, rank=res.low_rank.rank if res.low_rank else None,
    )


def _float_compute(run: _Run, stem: list[str]) -> dict:
    """The report's share of the multiply-accumulates in quantized ops, and per reason the compute
    ops left in float: how many, and their share (None inside control flow, whose work is not counted)."""
    total = sum(run.compute_macs.values())
    if not total:
        return {}
    left: dict[str, list] = {}
    for node, why in left_float(run.fp.graph, run.placement, run.excluded, stem).items():
        count, share = left.get(why, (0, 0.0))
        macs = run.compute_macs.get(node)  # None inside control flow: no shapes there
        left[why] = [count + 1, share + macs / total if macs is not None and share is not None else None]
    return {"quantized_mac_share": 1.0 - sum(share for _, share in left.values() if share is not None), "float_ops": left}


def _lead_interval(candidates: list[Candidate], ptq: Candidate) -> list[float] | None:
    """The 95% interval of the best PTQ model's held-out lead over the next best method's: where
    it holds zero, which of the two is closer to FP32 on other data is a toss-up."""
    others = [c for c in candidates if c.method != ptq.method and c.score is not None]
    if ptq.score is None or not others:
        return None
    interval = metrics.gain_interval(ptq.score, max(others, key=lambda c: c.sqnr_db).score)
    return list(interval) if interval is not None else None


def _report(run: _Run, candidates, ptq: Candidate, selection: Selection, compensation: Compensation | None,
            applied: bool, gain_interval: tuple[float, float] | None, output, started: float,
            qwt_int8_residuals_gain: float | None = None) -> Report:
    """The run's report, from what its steps returned."""
    fp32_parameters = sum(v.const_value.size for v in run.fp.graph.initializers.values() if v.const_value is not None)
    blocks = compensation.blocks if compensation is not None else []
    stem = run.placement.stem(run.fp.graph, ptq.float_stem)
    return Report(
        target=run.options.target.value,
        method=compensation.method if applied else ptq.method,
        qwt_method=compensation.method if compensation is not None else None,
        qwt_bias_corrected=compensation.bias_corrected if compensation is not None else None,
        fit_samples=compensation.samples if compensation is not None else 0,
        samples=run.calib.num_samples,
        heldout_samples=int(run.calib.heldout_mask.sum()),
        repeated_samples=run.calib.num_samples - len(np.unique(run.calib.repeats)),
        weight_range=run.options.weights.value,
        method_sqnr_db={c.method: c.sqnr_db for c in candidates if c.sqnr_db is not None},
        method_lead_interval_db=_lead_interval(candidates, ptq),
        method_qwt_sqnr_db=dict(selection.sqnr_db),
        qwt_trial=selection.chosen,
        qwt_trials_without_branch=list(selection.without_branch),
        bias_corrected={c.method: c.bias_corrected for c in candidates},
        bias_correction_gain_db={c.method: c.bias_correction_gain_db for c in candidates if c.bias_correction_gain_db is not None},
        weighted_clipping={c.method: c.weighted_clipping for c in candidates} if run.options.weight_bits < 8 else {},
        weighted_clipping_gain_db={c.method: c.weighted_clipping_gain_db for c in candidates if c.weighted_clipping_gain_db is not None},
        gptq={c.method: c.gptq for c in candidates},
        gptq_gain_db={c.method: c.gptq_gain_db for c in candidates if c.gptq_gain_db is not None},
        log_front_end=run.log_front_end if ptq.method != GIVEN else [],
        float_stem=stem,
        **(_float_compute(run, stem) if ptq.method != GIVEN else {}),
        float_stem_depth=ptq.float_stem,
        float_stem_gains_db={str(depth): list(gains) for depth, gains in ptq.float_stem_gains_db.items()},
        readable_ranges=len(run.readable) if ptq.method != GIVEN else 0,
        float_residual_streams=run.residual_streams if ptq.method != GIVEN and not ptq.int8_residuals else 0,
        int8_residual_streams=run.residual_streams if ptq.int8_residuals else 0,
        int8_residuals_gain_db=ptq.int8_residuals_gain_db,
        equalizable=len(channel_groups(run.fp.graph)) if run.options.equalization != EqualizationChoice.OFF and ptq.method != GIVEN else 0,
        equalized=dict(ptq.equalized),
        equalization_gain_db=ptq.equalization_gain_db,
        selection_samples=selection.samples,
        blocks=blocks,
        ptq_method=ptq.method,
        sqnr_ptq_db=ptq.sqnr_db,
        sqnr_qwt_db=compensation.sqnr_db if compensation is not None else None,
        outputs=list(run.options.outputs),
        output_parts=list(run.output_parts),
        output_sqnr_ptq_db=dict(ptq.score.outputs_db) if ptq.score is not None else {},
        output_sqnr_qwt_db=dict(compensation.score.outputs_db) if compensation is not None and compensation.score else {},
        qwt_gain_interval_db=list(gain_interval) if gain_interval is not None else None,
        qwt_decided_on=_decided_on(compensation, ptq),
        qwt_outputs_gaining=_outputs_gaining(compensation, ptq),
        qwt_int8_residuals_gain_db=qwt_int8_residuals_gain,
        qwt_applied=applied,
        fp32_parameters=int(fp32_parameters),
        added_parameters=sum(b.parameters for b in blocks) if applied else 0,
        seconds=time.perf_counter() - started,
        output=os.fspath(output) if output is not None else None,
        warnings=list(run.warnings),
        options=dataclasses.asdict(run.options),
    )


def _expose_what_selections_read(fp: ir.Model) -> tuple[list[str], list[str]]:
    """A detector's outputs after its NonMaxSuppression hold the boxes it kept, which a step in a
    score flips in or out: the tensors it reads (boxes, scores) are made outputs of ``fp`` to be
    scored instead, and taken out of the written model. Their names, and the selections'."""
    read, selected = g.selections(fp.graph)
    present = {v.name for v in fp.graph.outputs}
    exposed = [v for v in dict.fromkeys(read) if v.name not in present]
    fp.graph.outputs.extend(exposed)
    return [v.name for v in exposed], selected


def _unselected(fp: ir.Model, output_parts: tuple[str, ...], selected: list[str]) -> tuple[str, ...]:
    """The labels to score where some outputs are NonMaxSuppression's selections: every float
    output or part but those; () where there are none."""
    if not selected:
        return ()
    labels = output_parts or tuple(v.name for v in fp.graph.outputs if v.dtype is not None and v.dtype.is_floating_point())
    return tuple(label for label in labels if metrics.part_of(label)[0] not in selected)


def _check_outputs(fp: ir.Model, chosen: tuple[str, ...]) -> None:
    floats = {v.name: v for v in fp.graph.outputs if v.dtype is not None and v.dtype.is_floating_point()}
    for label in chosen:
        try:
            name, index = metrics.part_of(label)
        except ValueError as exc:
            raise InputError(f"--outputs: {exc}; write a part of an output as NAME[:, START:STOP]") from None
        if name not in floats:
            looks_like_part = "[" in name and name.endswith("]")  # but its index did not parse
            hint = " (a part's index takes integers and slices: NAME[:, 4:])" if looks_like_part else ""
            raise InputError(f"--outputs: the model has no float output {name!r}{hint}; choose from {', '.join(floats)}")
        shape = floats[name].shape
        if index is None or shape is None:
            continue
        if len(index) > len(shape):
            raise InputError(f"--outputs: {label!r} indexes {len(index)} axes of {name}, which has {len(shape)}; index fewer")
        for axis, (item, dim) in enumerate(zip(index, shape)):
            if isinstance(dim, int) and (not -dim <= item < dim if isinstance(item, int) else not range(dim)[item]):
                raise InputError(f"--outputs: {label!r} selects nothing of axis {axis} of {name}, which has {dim}; fix the index")


def _check_output(model: ModelLike, output: str | os.PathLike | None) -> None:
    if output is None:
        return
    folder = os.path.dirname(os.path.abspath(os.fspath(output)))
    if not os.path.isdir(folder):
        raise InputError(f"output folder {folder} does not exist; create it or choose another output path")
    if not os.access(folder, os.W_OK):
        raise InputError(f"output folder {folder} is not writable; choose another output path")
    if isinstance(model, (str, os.PathLike)) and os.path.abspath(os.fspath(model)) == os.path.abspath(os.fspath(output)):
        raise InputError("the output path is the input model; choose another output path so the input is kept")


def _load(model: ModelLike, role: str) -> ir.Model:
    if isinstance(model, onnx.ModelProto):
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise InputError(f"{role} is not a valid ONNX model ({str(exc).splitlines()[0]}); re-export it") from None
        return prepare.deserialize(model, role)
    return prepare.load_model(model, role)


def _effective_batch_size(model: ir.Model, batch_size: int, calib: CalibrationSet, warnings: Warnings) -> int:
    """Models exported with a fixed batch dimension of 1 are fed one sample at a time (a fixed
    batch over 1 was freed by :func:`load_fp32`); models whose outputs do not hold one row per
    sample of a batch (:func:`batching_fault`), one. A model that onnxruntime cannot load, or run
    on the first calibration samples, is refused."""
    specs = [spec for spec in prepare.input_specs(model) if spec.samples_axis is not None]
    fixed = {spec.shape[spec.samples_axis] for spec in specs if spec.shape[spec.samples_axis] is not None}
    only = fixed.pop() if len(fixed) == 1 else None
    try:
        runner = Runner(prepare.to_proto(model), quiet=True)
    except Exception as exc:  # onnxruntime's own exception types
        raise InputError(f"onnxruntime cannot load the model ({_first_line(exc)}); quantize a model that onnxruntime's CPU "
                         "provider runs") from None
    first = next(calib.batches(min(only or 1, calib.num_samples))).feeds
    try:
        outputs = runner(first)
    except Exception as exc:
        freed = model.meta.get("fixed_batch")
        if freed:  # run one sample at a time, the model runs none: its graph holds the size
            raise InputError(f"the model's batch dimension is fixed to {freed} and its graph computes with that size "
                             f"({_first_line(exc)}); export it with a dynamic batch dimension (torch.onnx.export's "
                             "dynamic_axes) to quantize it") from None
        raise InputError(f"onnxruntime cannot run the model on the first calibration samples ({_first_line(exc)}); "
                         "check that the calibration data matches the model's inputs") from None
    if only is not None:
        if only != batch_size:
            logger.info("the model's batch dimension is fixed to %d; using batches of %d", only, only)
        return only
    if batch_size == 1 or calib.num_samples < 2:
        return batch_size
    fault = batching_fault(runner, outputs, next(calib.batches(2)).feeds)
    if fault is not None:
        warnings.warn(f"the model declares a dynamic batch but does not batch samples ({fault}); running one sample at a time")
        return 1
    return batch_size


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__

"""The QwT pipeline, step by step.

1. load the FP32 model and the calibration samples (:mod:`qwt_onnx.inputs`);
2. observe the activation ranges (and the weighted ops' input statistics) in one FP32 pass;
3. build a post-training-quantized (PTQ) model per calibration method and score each on
   held-out samples, then decide bias correction, rounding, equalization and a float stem on
   the best one the same way (:mod:`qwt_onnx.ptq`); or take the user's QDQ model;
4. find the residual / transformer blocks;
5. fold a channel-wise affine into each quantized weighted op of the best PTQ model, layer by
   layer, where held-out samples show the model gaining by them (QwT-v2, :mod:`qwt_onnx.layer_folds`;
   ``--compensation auto`` and ``affine``);
6. fit one compensation per block on that model's quantized stream and splice it in: first on
   the first samples (with bias correction either way, where no layer is folded), then on all
   of them where that trial says it can pay (:mod:`qwt_onnx.qwt`); where layers are folded and
   its branches beat them, or none does and the folds' gain is within noise, fit it on the PTQ
   model alone too, to replace both where it does better;
7. write the QwT model where it beats the model without it on held-out samples, else that one,
   its residual streams, SiLUs and hard-swishes quantized for every reader unless held-out
   samples show that costing fidelity (``--residuals auto``).

Each step returns plain data (models, scores, fits); the :class:`Report` is built from them at
the end.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir

from qwt_onnx.analysis import blocks as blk
from qwt_onnx.analysis import parts
from qwt_onnx.analysis.equalization import channel_groups
from qwt_onnx.analysis.placement import left_float
from qwt_onnx.calibration import HELDOUT_EVERY, CalibrationSet, read_arrays, stacks_whole_inputs
from qwt_onnx.errors import InputError
from qwt_onnx.graph import prepare
from qwt_onnx.inputs import (
    ModelLike,
    check_output,
    check_outputs,
    dispatched_branch,
    effective_batch_size,
    expose_what_selections_read,
    load_fp32,
    load_quantized,
    specialized,
    unselected,
)
from qwt_onnx.layer_folds import LayerFolds, fold_layers
from qwt_onnx.numerics import metrics
from qwt_onnx.options import BiasCorrection, CalibMethod, Options, Target
from qwt_onnx.options import Compensation as CompensationKind
from qwt_onnx.options import Equalization as EqualizationChoice
from qwt_onnx.passes import dispatch, samples_axis
from qwt_onnx.passes.gelu import FuseDequantizedGeluPass
from qwt_onnx.passes.hardsigmoid import FuseDequantizedHardSwishPass, IntegerHardSigmoidPass
from qwt_onnx.progress import shown as progress_shown
from qwt_onnx.ptq import GIVEN, Candidate, best_candidate, given_candidate, int8_residuals_pay, ptq_candidates
from qwt_onnx.qwt import (
    BranchBudget,
    Compensation,
    Selection,
    beats,
    compensate,
    compensate_instead_of_folds,
    compensate_without_folds,
    decided_on,
    outputs_gaining,
    qwt_gain_interval,
    qwt_on_int8_streams,
)
from qwt_onnx.report import FLOAT_REASONS, Report
from qwt_onnx.run import Run, Warnings

__all__ = ["load_fp32", "load_quantized", "quantize", "quantize_with_report"]

# Below this many held-out samples a choice between models made on them may be noise.
MIN_HELDOUT_SAMPLES = 32

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
    clock = Stopwatch()
    check_output(model, output)
    warnings = Warnings()
    fp = load_fp32(model)
    given = load_quantized(quantized) if quantized is not None else None
    if quantized is None and (options.weight_bits == 4 or options.activation_bits == 16):
        fp = prepare.upgrade_opset(fp, prepare.LOW_BIT_OPSET, " (int4 weights and 16-bit activations need it)")
    check_outputs(fp, options.outputs)
    specs = prepare.input_specs(fp)
    arrays = read_arrays(calib, specs)
    dispatcher, taken = fp, dispatched_branch(fp, arrays, specs) if quantized is None else None
    if taken is not None:  # the model is one If on its inputs: quantized in the branch the samples take
        fp = specialized(fp, taken)
        warnings.warn(_dispatched(dispatcher, taken))
    one_sample = None  # the input shapes of a model fed whole inputs, given a samples axis while the passes run
    if stacks_whole_inputs(arrays, specs):
        one_sample = samples_axis.shapes(fp)
        for each in filter(None, (fp, given)):
            samples_axis.AddSamplesAxisPass()(each)
    exposed, selected = ([], []) if quantized is not None or options.outputs else expose_what_selections_read(fp)
    output_parts = () if options.outputs else parts.output_parts(fp.graph)
    options = options.replace(outputs=options.outputs or unselected(fp, output_parts, selected) or output_parts)
    if selected:
        warnings.warn(f"outputs computed from selections ({', '.join(selected)}: a NonMaxSuppression, or a comparison or "
                      f"Sign after the last weighted op) are not scored, as what they keep flips with a step in what they "
                      f"read: what is scored is ({', '.join(options.outputs)})")
    calib_set = CalibrationSet.load(arrays, prepare.input_specs(fp), options.samples)
    for name in calib_set.unscaled:
        warnings.warn(f"calibration array {name!r} holds {calib_set.arrays[name].dtype} values for a float input: they are fed "
                      "unscaled; if the model expects them scaled (to 0..1, or by a mean and deviation), scale the samples first")
    run = Run(fp, calib_set, effective_batch_size(fp, options.batch_size, calib_set, warnings), options, warnings, output_parts)
    for pattern in run.excluded.unmatched(fp.graph):
        warnings.warn(f"exclusion {pattern!r} matches no Conv, MatMul or Gemm node of the model")
    if quantized is None and not run.placement.weights and not run.placement.activations:
        raise InputError(_nothing_to_quantize(run))
    found = find_blocks(run) if options.qwt and options.compensation != CompensationKind.AFFINE else []
    _warn_of_few_heldout_samples(run, quantized is not None)

    clock.lap("loading")
    candidates = given_candidate(run, given) if given is not None else ptq_candidates(run)
    ptq = best_candidate(candidates)
    clock.lap("PTQ")
    candidates = [c if c is ptq else dataclasses.replace(c, other_correction=None) for c in candidates]  # only PTQ's is tried
    folds, base = None, ptq  # base: the model QwT's branches are fitted on and measured against
    if options.qwt and options.compensation != CompensationKind.BRANCH:
        folds, streams = _fold_layers(run, ptq)
        clock.lap("layer folds")
        if folds.written:
            candidates, ptq = [streams if c is ptq else c for c in candidates], streams
            base = dataclasses.replace(streams, model=folds.model, score=folds.score, layer_folds=folds.folded,
                                       other_correction=None, int8_residuals_variant=None)
    selection, compensation = Selection(), None
    if found:
        selection, compensation = compensate(run, base, found)
    gain_interval = qwt_gain_interval(compensation, base)
    applied = compensation is not None and compensation.model is not None and beats(run, compensation, base, gain_interval)
    alone = _instead_of_folds(run, ptq, found, folds, compensation if applied else None) if base is not ptq else None
    if alone is not None:
        (selection, compensation), why = alone
        folds = dataclasses.replace(folds, written=False, superseded=f"QwT's branches on the PTQ model alone {why}")
        base, applied, gain_interval = ptq, True, qwt_gain_interval(compensation, ptq)
    on_int8_streams, qwt_int8_residuals_gain = (qwt_on_int8_streams(run, selection, compensation, found) if applied
                                                else (None, None))
    if on_int8_streams is not None or (not applied and int8_residuals_pay(ptq)):  # only where base is ptq
        candidates = [ptq.int8_residuals_variant if c is ptq else c for c in candidates]
        ptq = base = ptq.int8_residuals_variant
    if on_int8_streams is not None:
        compensation, gain_interval = on_int8_streams, qwt_gain_interval(on_int8_streams, ptq)
    clock.lap("QwT")
    written = compensation.model if applied else base.model
    for name in exposed:  # scored, not the user's
        written.graph.outputs.pop(next(i for i, v in enumerate(written.graph.outputs) if v.name == name))
    if fp.meta.get("fixed_batch"):  # the user's interface: fed that many samples at a time
        prepare.fix_batch(written, fp.meta["fixed_batch"])
    if one_sample is not None:  # ... or one whole input
        samples_axis.RemoveSamplesAxisPass(one_sample)(written)
    if options.target == Target.ORT:
        FuseDequantizedGeluPass()(written)
        IntegerHardSigmoidPass()(written)
        FuseDequantizedHardSwishPass()(written)  # the float ones
    if taken is not None:
        dispatch.redispatch(written, dispatcher, taken)

    proto = prepare.to_proto(written)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:  # a bug of ours, not of the input
        raise RuntimeError(f"the written model fails onnx.checker: {exc}") from exc
    if output is not None:
        prepare.save_atomically(written, output)
    clock.lap("writing")
    result = _report(run, candidates, ptq, selection, compensation, applied, gain_interval, output, clock,
                     qwt_int8_residuals_gain, folds)
    if report is not None:
        with open(report, "w") as f:
            f.write(result.to_json())
    return proto, result


class Stopwatch:
    """Wall time of the run and of each of its steps."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, step: str) -> None:
        """Count the time since the last lap to ``step``."""
        now = time.perf_counter()
        self.laps[step] = self.laps.get(step, 0.0) + now - self.last
        self.last = now

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def _fold_layers(run: Run, ptq: Candidate) -> tuple[LayerFolds, Candidate]:
    """The layer folds fitted on the PTQ model as it would be written without QwT (its residual
    streams decided), and that model. They are fitted before QwT's branches, which are then
    fitted to what the folds leave: the other way round each layer's correction counts twice,
    the branches having been fitted to what the layers inside their blocks left (ViT-S -2.74 dB
    held out, an unseen PicoDet layout detector -1.52)."""
    streams = ptq.int8_residuals_variant if int8_residuals_pay(ptq) else ptq
    folds = fold_layers(run, streams.model, streams.float_model or run.fp, streams.score, exact=ptq.method != GIVEN)
    return folds, streams


def _dispatched(dispatcher: ir.Model, taken: bool) -> str:
    on = ", ".join(dispatch.condition_inputs(dispatch.dispatch_if(dispatcher.graph)))
    return (f"the model is one If on its inputs ({on}) and every calibration sample takes its {dispatch.branch_name(taken)}: "
            "that branch is quantized, the other kept float (calibrate on samples that take it to quantize that one instead)")


def _instead_of_folds(run: Run, ptq: Candidate, found: list[blk.Block], folds: LayerFolds,
                      on_folds: Compensation | None) -> tuple[tuple[Selection, Compensation], str] | None:
    """QwT fitted on the PTQ model alone where it replaces the layer folds written (and QwT's
    branches on them, ``on_folds``, where those are written), and why; else None."""
    if on_folds is not None:
        alone = compensate_without_folds(run, ptq, found, on_folds)
        return alone and (alone, f"reach {alone[1].sqnr_db:.2f} dB held out, those on the folds {on_folds.sqnr_db:.2f}")
    if not found or folds.interval_db is None or folds.interval_db[0] > 0.0:  # no blocks, or the folds gain beyond noise
        return None
    alone = compensate_instead_of_folds(run, ptq, found, folds.gain_db)
    return alone and (alone, f"reach {alone[1].sqnr_db:.2f} dB held out against its {ptq.score.db:.2f}, beyond noise; "
                             f"the folds gained {folds.gain_db:+.2f} dB, within noise")


def _warn_of_few_heldout_samples(run: Run, given: bool) -> None:
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


def _nothing_to_quantize(run: Run) -> str:
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


def find_blocks(run: Run) -> list[blk.Block]:
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


def _gated_counts(run: Run, ptq: Candidate) -> dict:
    """The report's counts of SiLUs and channel gates, and of hard-swishes, run on uint8 or in float."""
    hard_swishes, others = run.hard_swishes, run.silu_gates - run.hard_swishes
    int8_hard_swishes = hard_swishes if ptq.int8_silus and not ptq.float_hard_swishes else 0
    int8_others = (run.gates_beside_float_hard_swishes if ptq.float_hard_swishes else others) if ptq.int8_silus else 0
    told = ptq.method != GIVEN  # a given QDQ model's are its own
    return dict(int8_silu_gates=int8_others, float_silu_gates=others - int8_others if told else 0,
                int8_hard_swishes=int8_hard_swishes, float_hard_swishes=hard_swishes - int8_hard_swishes if told else 0)


def _float_compute(run: Run, stem: list[str]) -> dict:
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


def _layer_folds(folds: LayerFolds) -> dict:
    """The report's figures of the layer folds tried."""
    return dict(
        layer_fold_layers=folds.layers, layer_folds=folds.folded, layer_fold_samples=folds.samples,
        layer_folds_gained=folds.gained, layer_folds_together_gain_db=folds.together_gain_db, layer_fold_trials=folds.trials,
        layer_fold_judged_samples=folds.judged_samples,
        layer_folds_gain_db=folds.gain_db, layer_folds_interval_db=list(folds.interval_db) if folds.interval_db else None,
        layer_folds_worse=folds.worse, layer_folds_written=folds.written, layer_folds_superseded=folds.superseded,
        sqnr_layer_folds_db=folds.score.db if folds.score is not None else None,
        output_sqnr_layer_folds_db=dict(folds.score.outputs_db) if folds.score is not None else {},
    )


def _branch_budget(budget: BranchBudget | None) -> dict:
    if budget is None:
        return {}
    return dict(branches_slowdown={str(size): x for size, x in budget.slowdown.items()},
                kept_branches_slowdown={str(size): x for size, x in budget.kept_slowdown.items()},
                branches_left_out=dict(budget.left_out), branches_timed_samples=budget.samples)


def _lead_interval(candidates: list[Candidate], ptq: Candidate) -> list[float] | None:
    """The 95% interval of the best PTQ model's held-out lead over the next best method's: where
    it holds zero, which of the two is closer to FP32 on other data is a toss-up."""
    others = [c for c in candidates if c.method != ptq.method and c.score is not None]
    if ptq.score is None or not others:
        return None
    interval = metrics.gain_interval(ptq.score, max(others, key=lambda c: c.sqnr_db).score)
    return list(interval) if interval is not None else None


def _report(run: Run, candidates, ptq: Candidate, selection: Selection, compensation: Compensation | None,
            applied: bool, gain_interval: tuple[float, float] | None, output, clock: Stopwatch,
            qwt_int8_residuals_gain: float | None = None, folds: LayerFolds | None = None) -> Report:
    """The run's report, from what its steps returned."""
    fp32_parameters = sum(v.const_value.size for v in run.fp.graph.initializers.values() if v.const_value is not None)
    blocks = compensation.blocks if compensation is not None else []
    stem = run.placement.stem(run.fp.graph, ptq.float_stem)
    return Report(
        target=run.options.target.value,
        method=compensation.method if applied else ptq.method,
        qwt_method=compensation.method if compensation is not None else None,
        qwt_bias_corrected=compensation.bias_corrected if compensation is not None else None,
        qwt_whole_error=compensation.whole_error if compensation is not None else None,
        fit_samples=compensation.samples if compensation is not None else 0,
        samples=run.calib.num_samples,
        heldout_samples=int(run.calib.heldout_mask.sum()),
        batch_size=run.batch_size,
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
        **_gated_counts(run, ptq),
        int8_residuals_gain_db=ptq.int8_residuals_gain_db,
        int8_silus_gain_db=ptq.int8_silus_gain_db,
        int8_hard_swishes_gain_db=ptq.int8_hard_swishes_gain_db,
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
        qwt_decided_on=decided_on(compensation, ptq),
        qwt_outputs_gaining=outputs_gaining(compensation, ptq),
        qwt_int8_residuals_gain_db=qwt_int8_residuals_gain,
        qwt_applied=applied,
        **(_layer_folds(folds) if folds is not None else {}),
        qwt_on_layer_folds=compensation is not None and folds is not None and folds.written,
        **_branch_budget(compensation.budget if compensation is not None else None),
        fp32_parameters=int(fp32_parameters),
        added_parameters=sum(b.parameters for b in blocks) if applied else 0,
        seconds=clock.elapsed(),
        step_seconds=dict(clock.laps),
        output=os.fspath(output) if output is not None else None,
        warnings=list(run.warnings),
        options=dataclasses.asdict(run.options),
    )

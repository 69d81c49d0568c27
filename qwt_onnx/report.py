"""What a run did and measured: the JSON report and the command line's summary."""

from __future__ import annotations

import dataclasses
import json
import math

from qwt_onnx.errors import some_names
from qwt_onnx.options import MAX_FLOAT_STEM_MACS, MIN_FLOAT_STEM_GAIN_DB


@dataclasses.dataclass
class BlockReport:
    name: str
    input: str
    output: str
    kept: bool
    r2_train: float | None = None
    r2_heldout: float | None = None
    error_ratio_heldout: float | None = None  # ‖R − c(X)‖² / ‖R‖² on held-out samples
    error_ratio_train: float | None = None  # ... on the samples it was fitted on
    channels: int = 0
    channels_kept: int = 0  # output channels whose compensation lowers the held-out error
    parameters: int = 0
    output_gain_db: float | None = None  # of the worst model output it reaches, held-out, where checked
    fold_site: str | None = None  # affine compensation: the weighted op it folds into, kept or not
    rank: int | None = None  # a low-rank branch's; None: full
    note: str = ""


@dataclasses.dataclass
class Report:
    """What a run did and measured; ``to_json`` writes it for ``--report``."""

    target: str
    method: str  # the calibration method of the written model
    samples: int
    heldout_samples: int
    repeated_samples: int = 0  # calibration samples whose values repeat an earlier one's, rearranged or not: held out with it
    batch_size: int = 0  # samples per onnxruntime run: --batch-size, or fewer where the model or its activations' size asks
    qwt_method: str | None = None  # the one the compensation was fitted on (written or not)
    qwt_bias_corrected: bool | None = None  # whether the weights it was fitted on are bias-corrected
    qwt_whole_error: bool | None = None  # whether it fitted the whole error at each block output, not the block's own
    qwt_trial: str | None = None  # the label, in method_qwt_sqnr_db, of the PTQ model QwT was fitted on
    weight_range: str = "portable"
    method_sqnr_db: dict[str, float] = dataclasses.field(default_factory=dict)  # PTQ, per method
    # 95% paired-bootstrap interval of the chosen method's held-out lead over the next best
    method_lead_interval_db: list[float] | None = None
    # QwT trials: PTQ's method (and bias correction the other way), fitted to each block's own error or the whole one
    method_qwt_sqnr_db: dict[str, float] = dataclasses.field(default_factory=dict)
    qwt_trials_without_branch: list[str] = dataclasses.field(default_factory=list)  # tried, but no block kept one
    bias_corrected: dict[str, bool] = dataclasses.field(default_factory=dict)  # per method, as written
    bias_correction_gain_db: dict[str, float] = dataclasses.field(default_factory=dict)  # held-out, per method
    # below 8 weight bits, per method as written: whether clipping weighs by input powers, and its held-out gain over plain
    weighted_clipping: dict[str, bool] = dataclasses.field(default_factory=dict)
    weighted_clipping_gain_db: dict[str, float] = dataclasses.field(default_factory=dict)
    gptq: dict[str, bool] = dataclasses.field(default_factory=dict)  # per method, as written: weights rounded with error feedback
    gptq_gain_db: dict[str, float] = dataclasses.field(default_factory=dict)  # held-out gain of error feedback over nearest
    log_front_end: list[str] = dataclasses.field(default_factory=list)  # weighted ops kept float: a Log reads what they compute
    float_stem: list[str] = dataclasses.field(default_factory=list)  # weighted ops nearest the inputs kept float (--float-stem)
    float_stem_depth: int = 0  # ... to this depth
    # per depth tried (auto), each against the model before it: held-out gain, its 95% interval, the share of MACs left float
    float_stem_gains_db: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    quantized_mac_share: float | None = None  # of the compute ops' multiply-accumulates, what the quantized ones hold
    float_ops: dict[str, list] = dataclasses.field(default_factory=dict)  # why left float: [ops, share of the MACs or None]
    readable_ranges: int = 0  # quantized tensors whose range stops where all their readers saturate (a hard-swish's -3)
    float_residual_streams: int = 0  # residual streams a shortcut reads in float (--residuals int8 would quantize them)
    int8_residual_streams: int = 0  # residual streams quantized for every reader: their Adds run in integer kernels
    float_silu_gates: int = 0  # SiLUs and channel gates in float between quantized tensors (--residuals int8 would not)
    int8_silu_gates: int = 0  # SiLUs and channel gates whose gate and product are quantized: they run in integer kernels
    float_hard_swishes: int = 0  # hard-swishes likewise
    int8_hard_swishes: int = 0
    int8_residuals_gain_db: float | None = None  # held-out, of the PTQ model with them quantized over the same without (auto)
    int8_silus_gain_db: float | None = None  # held-out, of the PTQ model with its SiLUs quantized too over it without (auto)
    int8_hard_swishes_gain_db: float | None = None  # ... with its hard-swishes too, where auto tried them apart and left them
    equalizable: int = 0  # activations whose channels the model lets move into the weights that read them
    equalized: dict[str, float] = dataclasses.field(default_factory=dict)  # of those, the ones moved in the PTQ model written on, α each
    equalization_gain_db: float | None = None  # held-out, of the equalized PTQ model over the same without, where both were built
    selection_samples: int = 0  # QwT's trial was fitted on the first this many samples
    blocks: list[BlockReport] = dataclasses.field(default_factory=list)
    fit_samples: int = 0  # samples the blocks' fits were made on
    ptq_method: str | None = None  # what --no-qwt writes
    sqnr_ptq_db: float | None = None  # ... and its held-out SQNR (of the worst chosen output)
    sqnr_qwt_db: float | None = None
    outputs: list[str] = dataclasses.field(default_factory=list)  # the chosen outputs; empty: all
    # where --outputs is not given: the parts the outputs that a Concat of different ops makes are scored in
    output_parts: list[str] = dataclasses.field(default_factory=list)
    output_sqnr_ptq_db: dict[str, float] = dataclasses.field(default_factory=dict)  # held-out, per output
    output_sqnr_qwt_db: dict[str, float] = dataclasses.field(default_factory=dict)
    qwt_gain_interval_db: list[float] | None = None  # 95% paired-bootstrap interval of QwT's held-out gain (on PTQ or its folds)
    qwt_outputs_gaining: list[str] = dataclasses.field(default_factory=list)  # of several, those gaining beyond noise
    qwt_int8_residuals_gain_db: float | None = None  # QwT refitted on int8 residual streams, against float ones, held out
    # where QwT leaves some chosen outputs as PTQ has them: the others, which QwT against PTQ was decided on
    qwt_decided_on: list[str] = dataclasses.field(default_factory=list)
    qwt_applied: bool = False
    # QwT-v2's layer folds, where tried (--compensation affine or auto, before QwT's branches): the
    # quantized weighted ops a fold could compensate, those it brings closer to FP32, the samples they
    # were fitted on, the folded model's held-out SQNR (and per output), its gain over the PTQ model with
    # the gain's 95% interval on the samples past the fitted ones (how many; 0: on the held-out ones),
    # chosen outputs of several that they make worse beyond noise there, whether written, and whether
    # QwT's branches were fitted on the folded model (and its gain is over that)
    layer_fold_layers: int = 0
    layer_folds: int = 0  # written, where they are
    layer_folds_gained: int = 0  # layers whose fold brought their next reads closer to FP32
    layer_folds_together_gain_db: float | None = None  # those folds' gain together, where a part of them was chosen
    layer_fold_trials: int = 0  # models judged at the output to choose that part
    layer_fold_samples: int = 0
    layer_fold_judged_samples: int = 0
    sqnr_layer_folds_db: float | None = None
    layer_folds_gain_db: float | None = None
    layer_folds_interval_db: list[float] | None = None
    layer_folds_worse: str = ""
    layer_folds_written: bool = False
    layer_folds_superseded: str = ""
    output_sqnr_layer_folds_db: dict[str, float] = dataclasses.field(default_factory=dict)
    qwt_on_layer_folds: bool = False
    # auto: onnxruntime's run of the fitted model with all of QwT's branches over that without them, on this CPU,
    # per batch size profiled (str), and with those within --max-slowdown; the blocks whose branch it leaves out,
    # with what each would add; the samples the timed branches were fitted on (QwT's trial's, or all)
    branches_slowdown: dict[str, float] = dataclasses.field(default_factory=dict)
    kept_branches_slowdown: dict[str, float] = dataclasses.field(default_factory=dict)
    branches_left_out: dict[str, float] = dataclasses.field(default_factory=dict)
    branches_timed_samples: int = 0
    fp32_parameters: int = 0
    added_parameters: int = 0
    seconds: float = 0.0
    step_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # loading, PTQ, layer folds, QwT, writing
    output: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    options: dict = dataclasses.field(default_factory=dict)  # every option of the run, defaults resolved

    @property
    def compensated(self) -> bool:
        """Whether the written model is compensated: QwT's branches or folds, or the layer folds."""
        return self.qwt_applied or self.layer_folds_written

    @property
    def sqnr_written_db(self) -> float | None:
        """The written model's held-out SQNR."""
        if self.qwt_applied:
            return self.sqnr_qwt_db
        return self.sqnr_layer_folds_db if self.layer_folds_written else self.sqnr_ptq_db

    def to_json(self) -> str:
        """Strict JSON: a figure that is not finite (the SQNR of an exact output) is ``null``."""
        return json.dumps(_finite(dataclasses.asdict(self)), indent=2, allow_nan=False)


def _batches(report: Report) -> str:
    """The batch size where it is under the one asked for (a fixed batch, large activations)."""
    asked = report.options.get("batch_size", 0)
    return f", {report.batch_size} a batch" if 0 < report.batch_size < asked else ""


def format_summary(report: Report, source: str) -> str:
    """A short human summary of a run."""
    lines = [
        f"qwt_onnx: {source} -> {report.output} (target {report.target}, {_precision(report)}, "
        f"{report.samples} samples, {report.heldout_samples} held out{_batches(report)})"
    ]
    if report.repeated_samples:
        lines.append(f"{report.repeated_samples} calibration samples repeat the values of others (duplicates, mirror images, "
                     "rotations): each is held out or fitted with those it repeats")
    if report.log_front_end:
        lines.append(f"kept in float: {len(report.log_front_end)} Conv/MatMul/Gemm computing what a Log reads (a spectrogram "
                     "front end; quantized, its error near zero grows without bound through the log)")
    if report.quantized_mac_share is not None:
        lines.append(_coverage(report))
    lines.extend(_residual_streams(report))
    if report.readable_ranges:
        count = report.readable_ranges
        lines.append(f"ranges stop where the readers saturate: {count} tensor{'s' if count > 1 else ''} read only through a "
                     "hard-swish, HardSigmoid, Clip or Relu, or a Sigmoid or Tanh past where its output is within half a "
                     "level of its limit")
    if report.output_parts:
        lines.append("outputs scored part by part, as a Concat of different ops makes them (--outputs NAME scores one "
                     "whole): " + ", ".join(report.output_parts))
    if report.method_sqnr_db:
        line = "PTQ held-out SQNR by calibration: " + _scores(report.method_sqnr_db, report.ptq_method)
        if report.method_lead_interval_db is not None:
            low, high = report.method_lead_interval_db
            line += f" (lead over the next, 95% interval {low:+.2f} to {high:+.2f} dB{': within noise' if low <= 0 else ''})"
        lines.append(line)
    if report.bias_correction_gain_db:
        gains = ", ".join(
            f"{m} {g:+.2f} dB ({'kept' if report.bias_corrected[m] else 'dropped'})" for m, g in report.bias_correction_gain_db.items()
        )
        lines.append(f"bias correction, held-out gain: {gains}")
    if report.weighted_clipping_gain_db:
        gains = ", ".join(f"{m} {g:+.2f} dB ({'kept' if report.weighted_clipping[m] else 'dropped'})"
                          for m, g in report.weighted_clipping_gain_db.items())
        lines.append(f"weight clipping weighed by input powers, held-out gain over plain clipping: {gains}")
    if report.gptq_gain_db:
        gains = ", ".join(f"{m} {g:+.2f} dB ({'kept' if report.gptq[m] else 'dropped'})" for m, g in report.gptq_gain_db.items())
        lines.append(f"GPTQ weight rounding, held-out gain over rounding to nearest: {gains}")
    if report.float_stem or report.float_stem_gains_db:
        lines.append(_float_stem(report))
    if report.equalizable:
        lines.append(_equalization(report))
    trials = [_scores(report.method_qwt_sqnr_db, report.qwt_trial)] if report.method_qwt_sqnr_db else []
    trials += [f"{m} no branch kept" for m in report.qwt_trials_without_branch]
    if trials:
        lines.append(f"QwT trial, fitted on the first {report.selection_samples} samples, held-out SQNR: " + ", ".join(trials))
    if report.blocks:
        lines.append(
            f"{len(report.blocks)} blocks found; {report.options.get('compensation', 'branch')} compensation fitted on {report.qwt_method} calibration"
            f"{', bias-corrected weights' if report.qwt_bias_corrected else ''}, {report.fit_samples} samples, "
            f"{'the whole error at each block output' if report.qwt_whole_error else 'each block its own error'}"
        )
        lines.append(f"  {'#':>2}  {'block':<40} {'R² fit':>7} {'R² held':>8} {'error':>7} {'outputs':>8}  channels kept")
        for k, b in enumerate(report.blocks):
            r2 = f"{b.r2_train:7.3f} {b.r2_heldout:8.3f}" if b.r2_train is not None else f"{'-':>7} {'-':>8}"
            change = f"{(b.error_ratio_heldout - 1) * 100:+6.1f}%" if b.error_ratio_heldout is not None else f"{'-':>7}"
            gain = f"{b.output_gain_db:+6.2f}dB" if b.output_gain_db is not None else f"{'-':>8}"
            name = b.name if len(b.name) <= 40 else "…" + b.name[-39:]
            kept = f"{b.channels_kept}/{b.channels}" if b.channels else "none"
            kept += f" folded into {b.fold_site}" if b.kept and b.fold_site else ""
            kept += f", rank {b.rank}" if b.kept and b.rank else ""
            lines.append(f"  {k:>2}  {name:<40} {r2} {change} {gain}  {kept} {b.note}".rstrip())
    if report.sqnr_ptq_db is not None:
        line = f"held-out output SQNR: PTQ ({report.ptq_method}) {report.sqnr_ptq_db:.2f} dB"
        before, before_outputs, over = report.sqnr_ptq_db, report.output_sqnr_ptq_db, ""
        if report.qwt_on_layer_folds:  # QwT's branches were fitted on the folded model, and measured against it
            line += f" -> with layer folds {report.sqnr_layer_folds_db:.2f} dB"
            before, before_outputs, over = report.sqnr_layer_folds_db, report.output_sqnr_layer_folds_db, " over the layer folds"
        if report.qwt_applied and report.sqnr_qwt_db is not None:
            line += f" -> QwT ({report.method}) {report.sqnr_qwt_db:.2f} dB ({report.sqnr_qwt_db - before:+.2f} dB{over}"
            if report.qwt_decided_on:  # the worst output is the same in both: the gain is that of the outputs QwT changes
                decided = report.qwt_decided_on
                gain = min(report.output_sqnr_qwt_db[n] for n in decided) - min(before_outputs[n] for n in decided)
                line += f"; {gain:+.2f} dB on {', '.join(decided)}, the outputs it changes"
            if report.qwt_gain_interval_db is not None:
                line += ", 95% interval {:+.2f} to {:+.2f} dB".format(*report.qwt_gain_interval_db)
            if report.qwt_outputs_gaining:
                line += f"; beyond noise on {', '.join(report.qwt_outputs_gaining)}"
            line += ")"
        lines.append(line)
    if report.layer_fold_layers:
        lines.append(_layer_folds(report))
    if len(report.output_sqnr_ptq_db) > 1:
        chosen = f"the worst of {', '.join(report.outputs)}" if report.outputs else "the worst"
        folds = report.output_sqnr_layer_folds_db if report.layer_folds_written else {}
        listed = {"PTQ": report.output_sqnr_ptq_db, "with layer folds": folds, "QwT": report.output_sqnr_qwt_db}
        # outputs that no quantized op reaches (a float LSTM's final states), or none that changes them on these
        # samples (DeepFilterNet3's deep-filter coefficients: their one quantized path ends in a Relu that is 0 on
        # every sample), are exact in every model: named once
        exact = [name for name in report.output_sqnr_ptq_db if all(s.get(name, math.inf) == math.inf for s in listed.values())]
        measured = [f"{label} " + _scores({n: db for n, db in scores.items() if n not in exact}, None)
                    for label, scores in listed.items() if scores]
        line = f"held-out SQNR per output ({chosen} decides): " + "; ".join(measured)
        if exact:
            line += f"; exact in every model, no quantized op changing them: {some_names(exact, 2)}"
        lines.append(line)
    if report.branches_slowdown:
        lines.append(_branch_time(report))
    if report.added_parameters:
        share = 100.0 * report.added_parameters / max(report.fp32_parameters, 1)
        lines.append(f"added parameters: {report.added_parameters:,} ({share:.1f}% of the FP32 model)")
    folded = "PTQ model with layer folds" if report.layer_folds_written else "PTQ model"
    on_folds = f" (its branches on the {folded})" if report.qwt_on_layer_folds else ""
    written = f"QwT model{on_folds}" if report.qwt_applied else folded
    steps = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in report.step_seconds.items())
    lines.append(f"done in {report.seconds:.1f} s{f' ({steps})' if steps else ''}; wrote the {written} to {report.output}")
    return "\n".join(lines)


def _branch_time(report: Report) -> str:
    """What QwT's branches add to onnxruntime's run time, and what --max-slowdown made of it."""
    def added(slowdown: dict[str, float]) -> str:
        return " and ".join(f"+{100 * (factor - 1):.1f}% at batch {size}" for size, factor in slowdown.items())

    fitted = (f"as fitted on the first {report.branches_timed_samples} samples" if report.branches_timed_samples < report.samples
              else "all fitted")
    line = f"QwT's branches, {fitted}: {added(report.branches_slowdown)} to onnxruntime's run time on this CPU (profiled)"
    budget, left_out = report.options.get("max_slowdown"), report.branches_left_out
    if not left_out:
        return line + f", within --max-slowdown {budget:g}"
    line += f"; over --max-slowdown {budget:g}: "
    if all(factor == 1.0 for factor in report.kept_branches_slowdown.values()):
        return line + f"all {len(left_out)} left out (--compensation branch keeps them)"
    return line + f"{len(left_out)} left out, the others {added(report.kept_branches_slowdown)}"


# Why a compute op stays float, by the key :func:`qwt_onnx.analysis.placement.left_float` gives.
FLOAT_REASONS = {
    "control flow": "inside If, Loop or Scan bodies, where Q/DQ is not placed (their work is not counted)",
    "recurrent": "LSTM/GRU/RNN have no QDQ form (onnxruntime's quantize_dynamic runs an LSTM as DynamicQuantizeLSTM)",
    "ConvTranspose": "onnxruntime's CPU provider has no INT8 ConvTranspose kernel",
    "two activations": "MatMuls of two computed operands (attention scores) stay float by design",
    "float stem": "--float-stem",
    "excluded": "--exclude-nodes / --exclude-op-types",
    "spectrogram": "what a Log reads",
    "computed weight": "weights computed in the graph",
    "weight layout": "weights of rank 1, or shared along another axis",
}


def _residual_streams(report: Report) -> list[str]:
    """What the written model does with its residual streams, SiLUs, channel gates and hard-swishes, and why (``--residuals``)."""
    refit = report.qwt_int8_residuals_gain_db
    if report.options.get("activation_bits", 8) > 8:  # onnxruntime has QLinearAdd for 8-bit tensors only
        adds, faster = "their Adds on 16-bit tensors (in float on onnxruntime's CPU)", "quantizes them, as integer-only NPUs need"
    else:
        adds, faster = "their Adds in integer kernels", "runs them in integer kernels, faster between integer convolutions"
    kinds = [  # counts quantized and float, held-out gain, what the line says of each, why auto left them float
        (report.int8_residual_streams, report.float_residual_streams, report.int8_residuals_gain_db,
         f"residual streams quantized for every reader, {adds}",
         "residual streams read in float by their shortcuts, {why}: {count} (their Adds run in float; --residuals int8 "
         f"{faster})",
         "beyond noise"),
        # tried on top of the streams kept, and kept only where the model stays within auto's rule of float streams
        (report.int8_silu_gates, report.float_silu_gates, report.int8_silus_gain_db,
         "SiLUs and channel gates with their gates and products quantized, in integer kernels",
         "SiLUs and channel gates in float between integer convolutions, {why}: {count} (--residuals int8 runs them in integer "
         "kernels, faster)",
         "more than --residuals auto allows"),
        # decided with the SiLUs and gates, and apart from them where all together lost too much
        (report.int8_hard_swishes, report.float_hard_swishes,
         report.int8_silus_gain_db if report.int8_hard_swishes_gain_db is None else report.int8_hard_swishes_gain_db,
         "hard-swishes with their gates and products quantized, in integer kernels",
         "hard-swishes in float between integer convolutions, {why}: {count} (--residuals int8 runs them in integer kernels, "
         "faster)",
         "more than --residuals auto allows" + (" (with the SiLUs and gates, which are kept without them)"
                                                  if report.int8_hard_swishes_gain_db is not None else "")),
    ]
    lines = []
    for int8, floating, gain, quantized, left_float, beyond in kinds:
        gain = "" if gain is None else f"{gain:+.2f} dB"
        if int8:
            measured = f" (held-out change of the PTQ model by them: {gain})" if gain else ""
            if report.qwt_applied and refit is not None:
                measured = f" (QwT fitted on them against float streams: {refit:+.2f} dB held out)"
            lines.append(f"{quantized}: {int8}{measured}")
        elif floating:
            if report.qwt_applied:
                why = "so that QwT's corrections are not rounded away"
                why += f" (fitted on them quantized it changed by {refit:+.2f} dB held out)" if refit is not None else ""
            elif gain:
                why = f"as quantized for every reader they change the PTQ model by {gain} held out, {beyond}"
            elif report.options.get("residuals") == "float":
                why = "as --residuals float asks"
            else:
                why = "with no held-out samples to measure what quantizing them costs"
            lines.append(left_float.format(why=why, count=floating))
    return lines


def _coverage(report: Report) -> str:
    outside = " outside control flow" if "control flow" in report.float_ops else ""
    line = f"quantized: {_percent(report.quantized_mac_share)} of the multiply-accumulates{outside}"
    if report.float_ops:
        left = sorted(report.float_ops.items(), key=lambda item: -(item[1][1] or 0.0))
        line += "; float: " + "; ".join(
            f"{int(count)} op{'s' if count > 1 else ''}{'' if share is None else ', ' + _percent(share)}: {FLOAT_REASONS[why]}"
            for why, (count, share) in left)
    return line


def _percent(share: float) -> str:
    """A share as a percentage, where a share near but not at 0 or 1 reads neither 0% nor 100%."""
    if 0 < share < 0.001 or 0.999 < share < 1:
        return "under 0.1%" if share < 0.5 else "over 99.9%"
    return f"{100 * share:.{1 if 0 < share < 0.01 or 0.99 < share < 1 else 0}f}%"


def _layer_folds(report: Report) -> str:
    line = (f"layer folds (QwT-v2: each quantized Conv/Gemm/MatMul's output scaled and shifted per channel, in its weight "
            f"scales and bias), fitted on the first {report.layer_fold_samples} samples: {report.layer_folds_gained} of "
            f"{report.layer_fold_layers} layers")
    if not report.layer_folds_gained:
        return f"{line} (none brought its output closer to FP32 on held-out samples)"
    if report.layer_folds_gain_db is None:
        return f"{line}: written (no held-out samples to judge the model by)"
    interval = (" (95% interval {:+.2f} to {:+.2f} dB)".format(*report.layer_folds_interval_db)
                if report.layer_folds_interval_db is not None else "")
    where = f"on the {report.layer_fold_judged_samples} samples past those" if report.layer_fold_judged_samples else "held out"
    if report.layer_folds_together_gain_db is not None:  # a part of them chosen at the output
        line += (f"; together {report.layer_folds_together_gain_db:+.2f} dB over the PTQ model {where}; {report.layer_folds} of "
                 f"them, chosen there in {report.layer_fold_trials} models judged, {report.layer_folds_gain_db:+.2f} dB{interval}")
    else:
        line += f"; {where} {report.layer_folds_gain_db:+.2f} dB over the PTQ model{interval}"
        if report.layer_fold_trials:
            line += f", and no part of them gained there in {report.layer_fold_trials} models judged"
    if report.layer_fold_judged_samples:  # the held-out samples chose the PTQ model: they flatter it
        line += f"; held out, where the PTQ model was chosen, {report.sqnr_layer_folds_db:.2f} dB against {report.sqnr_ptq_db:.2f}"
    else:
        line += f" (held-out SQNR {report.sqnr_layer_folds_db:.2f} dB)"
    if report.layer_folds_worse:
        return f"{line}; not written: {report.layer_folds_worse} worse beyond noise"
    if report.layer_folds_superseded:
        return f"{line}: not written, {report.layer_folds_superseded}"
    return f"{line}: {'written' if report.layer_folds_written else 'not written'}"


def _float_stem(report: Report) -> str:
    line = "weighted ops nearest the inputs left in float: " + (", ".join(report.float_stem) or "none")
    tried = []
    for depth, (gain, low, high, share) in report.float_stem_gains_db.items():
        if high < 0:
            verdict = "a loss"
        elif low <= 0:
            verdict = "within noise"
        elif int(depth) <= report.float_stem_depth:
            verdict = "kept"
        else:
            why = f"under {MIN_FLOAT_STEM_GAIN_DB:g} dB" if gain < MIN_FLOAT_STEM_GAIN_DB else f"over {100 * MAX_FLOAT_STEM_MACS:.0f}% of the MACs"
            verdict = f"{why} for auto; --float-stem {depth} takes it"
        tried.append(f"depth {depth} {gain:+.2f} dB (95% interval {low:+.2f} to {high:+.2f}, {100 * share:.0f}% of the MACs; {verdict})")
    if tried:
        line += "; held-out gain over the model before: " + ", ".join(tried)
    return line


def _equalization(report: Report) -> str:
    line = f"channel equalization: {report.equalizable} activations can move channel scales into the weights that read them"
    if report.equalized:
        alphas = sorted(set(report.equalized.values()))
        line += f"; {len(report.equalized)} moved (α {alphas[0]:g}-{alphas[-1]:g})"
    elif report.equalization_gain_db is None:
        return f"{line}; none expected to gain"
    if report.equalization_gain_db is not None:
        kept = "kept" if report.equalized else "dropped"
        line += f", held-out gain over the same PTQ without: {report.equalization_gain_db:+.2f} dB ({kept})"
    return line


def _precision(report: Report) -> str:
    """The precision written, as W·A· with what its int8 weights are (the branches' where the model's are narrower)."""
    o = report.options
    weight_bits, activation_bits, block = o.get("weight_bits", 8), o.get("activation_bits", 8), o.get("block_size", 0)
    if weight_bits == 8:
        return f"W8A{activation_bits}, {report.weight_range} int8 weights"
    blocks = f" in blocks of {block}" if block else ""
    return f"W{weight_bits}A{activation_bits}, int{weight_bits} weights{blocks} and {report.weight_range} int8 branches"


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _scores(scores: dict[str, float], chosen: str | None) -> str:
    return ", ".join(f"{m} {s:.1f} dB" + ("*" if m == chosen else "") for m, s in scores.items())

"""Steps 6 and 7: QwT fitted on the quantized stream of the best PTQ model (with its layer folds,
where written), tried on the first samples, fitted on all where the trial says it can pay, and
written where it beats that model on held-out samples."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from qwt_onnx import latency
from qwt_onnx.analysis import blocks as blk
from qwt_onnx.analysis import capture
from qwt_onnx.calibration import CalibrationSet
from qwt_onnx.graph import prepare
from qwt_onnx.numerics import metrics
from qwt_onnx.numerics.affine import AffineFit
from qwt_onnx.numerics.metrics import Score
from qwt_onnx.options import Compensation as CompensationKind
from qwt_onnx.options import FitError, Target
from qwt_onnx.passes import affine, splice
from qwt_onnx.ptq import GIVEN, Candidate, int8_streams_keep
from qwt_onnx.report import BlockReport
from qwt_onnx.run import Run, Warnings

SELECTION_SAMPLES = 64  # samples of QwT's trial (bias correction either way, whether it pays)
# QwT is fitted on all samples only where its trial on the first ones already gains what a written
# QwT needs (MIN_QWT_GAIN_DB) on the held-out samples, and the lower end of the gain's 95% interval
# is within this much of zero. From trial to full fit the held-out gain moved by -0.15 to +0.48 dB
# on the zoo (+1.05 on an unseen emotion classifier, 4x the samples) and never lifted a trial below
# MIN_QWT_GAIN_DB to a written QwT (Silero VAD -0.48 to 0.00, PP-LCNet -0.07 to -0.15, MTCNN ONet
# -0.01 to 0.00, the emotion classifier -0.74 to +0.31 within noise); the lower end rose by at most 0.3 dB.
# The other way, a trial can promise what the full fit does not keep (DNSMOS P.808's whole-error
# trial +1.96, its full fit -0.34 dB, 32 held-out clips): the full fit is judged again before it is written.
PAYS_MARGIN_DB = 1.0
# QwT on the weights with bias correction the other way came within this much of QwT on PTQ's best
# or below it (PP-LCNet +0.45, ViT-S, Silero VAD and SLANet-plus +0.3 to +0.4 dB): it is not tried
# where the first trial falls short of MIN_QWT_GAIN_DB by more.
OTHER_CORRECTION_REACH_DB = 0.5
# The least held-out gain that pays for QwT's branches (a tenth of a dB is 2.3% of the error
# energy): openWakeWord's mel spectrogram gained 0.004 dB, beyond noise, for 8,256 parameters.
MIN_QWT_GAIN_DB = 0.1


@dataclasses.dataclass(frozen=True)
class Bar:
    """What QwT's trial on the first samples must show on the held-out samples for QwT to be
    fitted on all of them: a gain over the PTQ model of at least ``gain_db``, the lower end of
    its 95% interval above ``-margin_db``. The full fit must then gain ``gain_db`` itself."""

    gain_db: float
    margin_db: float


@dataclasses.dataclass(frozen=True)
class BranchBudget:
    """What QwT's branches add to onnxruntime's run of the model on this CPU, per batch size
    weighed (:attr:`Run.latency_batches`): all of them, and those that fit within
    ``--max-slowdown``; the blocks whose branch does (by name), and those whose branch does not,
    with what it adds; the samples the timed branches were fitted on (QwT's trial's, or all)."""

    slowdown: dict[int, float]
    kept_slowdown: dict[int, float]
    kept: frozenset[str] = frozenset()
    left_out: dict[str, float] = dataclasses.field(default_factory=dict)
    samples: int = 0


@dataclasses.dataclass(frozen=True)
class Compensation:
    """The compensated model of one calibration method (None where no block gained), per block."""

    method: str
    model: ir.Model | None
    blocks: list[BlockReport]
    samples: int  # the fits were made on the first this many
    score: Score | None = None
    bias_corrected: bool = False
    whole_error: bool = False  # fitted to the whole error at each block output, not the block's own
    branches: tuple[splice.Branch, ...] = ()
    budget: BranchBudget | None = None  # what --max-slowdown made of the fitted branches (auto)

    @property
    def sqnr_db(self) -> float | None:
        return self.score.db if self.score is not None else None


@dataclasses.dataclass(frozen=True)
class Selection:
    """QwT's held-out SQNR per trial (bias correction either way, each block's own error or the
    whole error fitted), tried on the first samples."""

    samples: int = 0  # QwT was fitted on the first this many (and scored on every scoring sample)
    scores: dict[str, Score] = dataclasses.field(default_factory=dict)  # by trial label (see _trial_label)
    chosen: str | None = None  # the label of the trial QwT is fitted as
    candidate: Candidate | None = None  # ... its PTQ model
    without_branch: list[str] = dataclasses.field(default_factory=list)  # trial labels where no block kept a branch
    untried: list[str] = dataclasses.field(default_factory=list)  # trial labels not tried (see _other_correction_may_pay)
    # The chosen trial's compensation, scored; where no trial kept a branch, the PTQ model's (no model)
    compensation: Compensation | None = None
    cannot_pay: str | None = None  # why the chosen trial says QwT on all samples would not be written

    @property
    def sqnr_db(self) -> dict[str, float]:
        return {method: score.db for method, score in self.scores.items()}

    @property
    def whole_error(self) -> bool:
        """Whether the chosen trial fits the whole error at each block output, not each block's own."""
        return self.compensation is not None and self.compensation.whole_error

    @property
    def blocks(self) -> list[BlockReport]:
        return self.compensation.blocks if self.compensation is not None else []


def compensate(run: Run, ptq: Candidate, found: list[blk.Block], bar: Bar | None = None) -> tuple[Selection, Compensation]:
    """QwT on the best PTQ model: tried on the first samples (with bias correction either way
    and fitted to either error, where those are to be chosen), then fitted on every calibration
    sample where the trial clears ``bar`` (by default: gains :data:`MIN_QWT_GAIN_DB`, within
    :data:`PAYS_MARGIN_DB` of clearing the noise): the blocks the trial compensated, on which it
    was judged; the others keep its report and are not captured again."""
    bar = bar or Bar(MIN_QWT_GAIN_DB, PAYS_MARGIN_DB)
    selection = _select(run, ptq, found, bar)
    if not selection.sqnr_db:
        run.warnings.warn(
            f"QwT kept no branch on the held-out samples of the first {selection.samples}; "
            f"not fitting it on all samples, writing {_without_branches(ptq)}"
        )
        return selection, selection.compensation
    chosen = selection.candidate
    if selection.compensation.samples == run.calib.num_samples:  # the trial saw every sample: it is the fit
        return selection, _within_budget(run, selection.compensation, chosen, found, ptq, bar)
    if selection.cannot_pay:
        run.warnings.warn(
            f"QwT fitted on the first {selection.samples} samples {selection.cannot_pay}; not fitting it on all samples, "
            f"writing {_without_branches(ptq)}"
            + "".join(f" (not tried: QwT on {label})" for label in selection.untried)
        )
        return selection, dataclasses.replace(selection.compensation, model=None, score=None)
    # --max-slowdown is judged on the trial's branches: a fit on all samples left to drop some of them would
    # be made twice (ViT-S's ten, MiniLM's three)
    budget = branch_budget(run, selection.compensation, then="fitting QwT on all samples")
    compensation = _fit(run, chosen, found, run.calib, selection.whole_error, budget, chosen_by=selection.compensation)
    if compensation.model is None:
        run.warnings.warn(f"QwT lowered the error of no block on held-out samples; writing {_without_branches(ptq)}")
        return selection, compensation
    score = run.heldout_score(compensation.model, f"evaluating QwT ({chosen.method})")
    compensation = dataclasses.replace(compensation, score=score)
    if _timed_by(compensation, selection.compensation.branches):
        return selection, compensation
    return selection, _within_budget(run, compensation, chosen, found, ptq, bar)


def compensate_without_folds(run: Run, ptq: Candidate, found: list[blk.Block],
                             on_folds: Compensation) -> tuple[Selection, Compensation] | None:
    """QwT's branches fitted on the PTQ model alone, where on held-out samples they beat those
    fitted on its layer folds (``on_folds``); else None. The folds change what the branches
    find to fit and which of them fit within --max-slowdown: on MiniLM the folds gained 0.10 dB
    and the branches on them reached 25.72 dB held out, those on the PTQ model alone 26.77. Its
    warnings are the run's only where it is chosen."""
    with _heard_apart(run) as heard:
        selection, alone = compensate(run, ptq, found)
    if alone.model is None or alone.score is None or on_folds.score is None or alone.sqnr_db <= on_folds.sqnr_db:
        return None
    _repeat(run, heard)
    return selection, alone


def compensate_instead_of_folds(run: Run, ptq: Candidate, found: list[blk.Block],
                                folds_gain_db: float) -> tuple[Selection, Compensation] | None:
    """QwT's branches fitted on the PTQ model alone, where its layer folds gained ``folds_gain_db``
    over it within noise and no branch fitted on them paid: written instead of the folds where
    they beat the PTQ model as :func:`beats` asks, by more than the folds gained; else None. On
    MiniLM at W4A8 the folds gained +0.07 dB and left the branches fitted on them 6-9% of each
    block's error to remove, under --min-gain; the branches on the PTQ model alone gained +0.95 dB
    on its evaluation sentences. The folds cost nothing at run time, so the branches must show
    their gain beyond noise from their trial on: at W8A8 YOLOv8n's trial (+0.41 dB, interval
    -0.09 to +1.23) had been fitted on all samples for 58 s and lost; PP-OCRv6 rec's (+1.34,
    +0.05 to +2.81) still is, for 93 s, and loses within noise (+0.79, -0.55 to +2.23). Their
    gain is measured on the held-out samples, where the PTQ model was chosen and looks better
    than it is, so the comparison errs towards the folds. Its warnings are the run's only where
    it is chosen."""
    with _heard_apart(run) as heard:
        selection, alone = compensate(run, ptq, found, Bar(max(MIN_QWT_GAIN_DB, folds_gain_db), margin_db=0.0))
        pays = alone.model is not None and beats(run, alone, ptq, qwt_gain_interval(alone, ptq))
    if not pays or _gain_db(alone, ptq) <= folds_gain_db:
        return None
    _repeat(run, heard)
    return selection, alone


@contextlib.contextmanager
def _heard_apart(run: Run) -> Iterator[Warnings]:
    """The run's warnings while inside, kept apart from those before."""
    before, run.warnings = run.warnings, _Unlogged()
    try:
        yield run.warnings
    finally:
        run.warnings = before


def _repeat(run: Run, heard: Warnings) -> None:
    for message in heard:
        run.warnings.warn(message)


class _Unlogged(Warnings):
    def warn(self, message: str) -> None:
        if message not in self:
            self.append(message)


def _gain_db(compensation: Compensation, ptq: Candidate) -> float:
    """The held-out gain of ``compensation`` over ``ptq`` on the worst chosen output where they differ."""
    new, old = metrics.where_they_differ(compensation.score, ptq.score)
    return metrics.db_gain(new.db, old.db)


def _within_budget(run: Run, compensation: Compensation, candidate: Candidate, found: list[blk.Block],
                   base: Candidate, bar: Bar) -> Compensation:
    """``compensation``, or where its branches make the model run longer than ``--max-slowdown``
    allows (:func:`branch_budget`), QwT fitted again with branches on the blocks that fit only:
    each branch was fitted on the stream the others compensate, and without them it no longer
    matches (a test ResNet's last branch alone: -0.8 dB against PTQ where all four gained +2.8).
    Not where the compensation does not gain ``bar``'s gain over ``base`` anyway."""
    if compensation.score is not None and base.score is not None and compensation.sqnr_db - base.sqnr_db < bar.gain_db:
        return compensation
    timed = branch_budget(run, compensation)
    budget = _timed_again(compensation.budget, timed)
    if timed is None or not timed.left_out:
        return dataclasses.replace(compensation, budget=budget)
    fitted = _fit(run, candidate, found, run.calib, compensation.whole_error, budget, chosen_by=compensation)
    if fitted.model is None:
        return fitted
    score = run.heldout_score(fitted.model, f"evaluating QwT within --max-slowdown ({candidate.method})")
    return dataclasses.replace(fitted, score=score)


def _timed_again(earlier: BranchBudget | None, budget: BranchBudget | None) -> BranchBudget | None:
    """``budget``, a fit's branches timed, stated after ``earlier``'s timing of its trial's branches
    left some out: all the trial's branches' time, those left out by either, the others' time now."""
    if earlier is None or budget is None or not earlier.left_out:
        return budget
    return dataclasses.replace(budget, slowdown=earlier.slowdown, left_out={**earlier.left_out, **budget.left_out},
                               samples=earlier.samples)


def _timed_by(fitted: Compensation, trial_branches: Sequence[splice.Branch]) -> bool:
    """Whether the trial's branches, timed against --max-slowdown (``fitted.budget``), hold ``fitted``'s:
    each of its branches is on a block where the trial had one as large or larger, so it adds no more time."""
    timed = {b.name: b.num_parameters for b in trial_branches}
    return fitted.budget is not None and all(b.num_parameters <= timed.get(b.name, -1) for b in fitted.branches)


def _why_the_trial_cannot_pay(trial: Score, ptq: Candidate, bar: Bar) -> str | None:
    """Why QwT fitted on every sample would not be written, judged from its trial on the first
    ones: its held-out gain over PTQ short of ``bar``. None where it may pay."""
    shortfall = _trial_shortfall(trial, ptq, bar)
    if shortfall is None:
        return None
    gain, interval = shortfall
    if gain < bar.gain_db:
        return (
            f"gains {gain:+.2f} dB over {_without_branches(ptq)} ({ptq.method}) on held-out samples, under the "
            f"{bar.gain_db:.2g} dB a trial needs to be fitted on all samples "
            "(from trial to full fit a gain moved by -2.29 to +1.05 dB on the models measured)"
        )
    return (
        f"gains {gain:+.2f} dB over {_without_branches(ptq)} ({ptq.method}) on held-out samples, 95% interval "
        f"{interval[0]:+.2f} to {interval[1]:+.2f} dB: all samples would not lift it clear of the noise"
    )


def _trial_shortfall(trial: Score, ptq: Candidate, bar: Bar) -> tuple[float, tuple[float, float] | None] | None:
    """The trial's held-out gain over PTQ and its 95% interval, where they say QwT cannot pay."""
    if ptq.score is None:
        return None
    trial, ptq_score = metrics.where_they_differ(trial, ptq.score)
    gain = metrics.db_gain(trial.db, ptq_score.db)
    interval = metrics.gain_interval(trial, ptq_score)
    if gain < bar.gain_db or (interval is not None and interval[0] <= -bar.margin_db):
        return gain, interval
    return None


def _select(run: Run, ptq: Candidate, found: list[blk.Block], bar: Bar) -> Selection:
    """QwT on the best PTQ model, fitted to each block's own error and to the whole error at its
    output (as ``--fit-error`` asks), and on its weights with bias correction the other way, on
    the first samples.

    A branch's bias absorbs its block's mean error itself, so whether bias correction still
    helps is a question for the compensated model. Other calibration methods are not tried:
    QwT on one of them has never beaten QwT on PTQ's best beyond the noise of the held-out
    samples since MSE joined ``auto`` (eight zoo models), and each trial is a capture. Nor is
    the other correction where QwT on PTQ's best falls short of paying by more than it has
    ever gained over it (:func:`_other_correction_may_pay`); where it is tried, it fits the
    error that QwT on PTQ's best fitted better.
    """
    subset = run.calib.take(SELECTION_SAMPLES)
    compensations, cannot_pay, candidates = {}, {}, {}

    def attempt(candidate: Candidate, whole_error: bool) -> None:
        label = _trial_label(candidate, candidate is not ptq, whole_error)
        compensation = _fit(run, candidate, found, subset, whole_error)
        if compensation.model is not None:
            # Scored on every scoring sample, not only the subset's dozen held-out ones (no fit saw
            # any of them): output errors are heavy-tailed, and a dozen samples decide by noise.
            score = run.heldout_score(compensation.model, f"evaluating QwT ({label})")
            compensation = dataclasses.replace(compensation, score=score)
            cannot_pay[label] = (_why_the_trial_cannot_pay(compensation.score, ptq, bar) if compensation.score is not None
                                 else None)
        compensations[label], candidates[label] = compensation, candidate

    for whole_error in _fit_errors(run.options.fit_error):
        attempt(ptq, whole_error)
    first = max(compensations.values(), key=lambda c: c.sqnr_db if c.sqnr_db is not None else -np.inf)
    other, untried = ptq.other_correction, []
    if other is not None and _other_correction_may_pay(first.score, ptq, bar):
        attempt(other, first.whole_error)
    elif other is not None:
        untried = [_trial_label(other, True, first.whole_error)]
    scores = {label: c.score for label, c in compensations.items() if c.model is not None}
    without_branch = [label for label in compensations if label not in scores]
    if not scores:  # the PTQ model's fits say why
        return Selection(subset.num_samples, without_branch=without_branch, untried=untried, compensation=first)
    on_ptq = [label for label in scores if candidates[label] is ptq]
    best = _trial_choice(scores, on_ptq, paying=[label for label in scores if not cannot_pay[label]])
    return Selection(subset.num_samples, scores, best, candidates[best], without_branch, untried, compensations[best],
                     cannot_pay[best])


def _fit_errors(fit_error: FitError) -> tuple[bool, ...]:
    """What QwT's trial fits, as ``whole_error`` flags: each block's own error, the whole error, or both."""
    return {FitError.OWN: (False,), FitError.WHOLE: (True,), FitError.AUTO: (False, True)}[fit_error]


def _trial_label(candidate: Candidate, other_correction: bool, whole_error: bool) -> str:
    """A trial's label: the PTQ model's method (with its bias correction where that is the
    other one), and the whole error where that is fitted."""
    label = candidate.method
    if other_correction:
        label += f" {'with' if candidate.bias_corrected else 'without'} bias correction"
    return label + (", whole error" if whole_error else "")


def _other_correction_may_pay(first: Score | None, ptq: Candidate, bar: Bar) -> bool:
    """Whether QwT on bias correction the other way is worth a trial after QwT on PTQ's best
    scored ``first``: where that trial may pay (the other may still beat it) or falls short of
    ``bar``'s gain by no more than :data:`OTHER_CORRECTION_REACH_DB`."""
    shortfall = _trial_shortfall(first, ptq, bar) if first is not None else None
    return shortfall is None or shortfall[0] > bar.gain_db - OTHER_CORRECTION_REACH_DB


def _trial_choice(scores: dict[str, Score], on_ptq: list[str], paying: list[str]) -> str:
    """The trial to fit QwT as: of those that may pay (all where none may), the best of QwT on
    the best PTQ model (``on_ptq``, fitted to either error), unless QwT on the other correction
    beats it beyond the noise of the scoring samples (the lower end of the 95% interval of its
    gain is above zero)."""
    labels = paying or list(scores)
    best = max(labels, key=lambda label: scores[label].db)
    preferred = [label for label in labels if label in on_ptq]
    if best in preferred or not preferred:
        return best
    ptq_best = max(preferred, key=lambda label: scores[label].db)
    interval = metrics.gain_interval(scores[best], scores[ptq_best])
    return best if interval is None or interval[0] > 0.0 else ptq_best


def beats(run: Run, compensation: Compensation, ptq: Candidate, interval: tuple[float, float] | None) -> bool:
    """The QwT model is written only where held-out samples show that it tracks FP32 better than
    the best PTQ model (``ptq``, with layer folds where auto wrote them): its gain at least
    :data:`MIN_QWT_GAIN_DB`, beyond noise (the lower end
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
            f"{_without_branches(ptq)} ({ptq.method}) at {ptq_score.db:.2f} dB; writing {_without_branches(ptq)}"
        )
        return False
    if interval is not None and interval[0] <= 0.0 and not outputs_gaining(compensation, ptq):
        run.warnings.warn(
            f"QwT's held-out gain over {_without_branches(ptq)}, {gain:+.2f} dB, is within the noise of its "
            f"{int(run.calib.scoring_mask.sum())} scoring samples (95% interval {interval[0]:+.2f} to {interval[1]:+.2f} dB); "
            f"writing {_without_branches(ptq)}, which "
            "needs no branches: more calibration samples would settle it"
        )
        return False
    if gain < MIN_QWT_GAIN_DB:
        run.warnings.warn(
            f"QwT's held-out gain over {_without_branches(ptq)}, {gain:+.3f} dB, is under {MIN_QWT_GAIN_DB} dB, too little "
            f"to pay for its branches; writing {_without_branches(ptq)}"
        )
        return False
    worse = metrics.outputs_worse(compensation.score, ptq.score)
    if worse:  # the worst output gained, another lost beyond noise: a detector's boxes for its objectness
        name, (low, high) = min(worse.items(), key=lambda item: item[1][1])
        run.warnings.warn(
            f"QwT lifts the worst output but makes {name} worse on held-out samples: "
            f"{ptq.score.outputs_db[name]:.2f} -> {compensation.score.outputs_db[name]:.2f} dB (95% interval {low:+.2f} "
            f"to {high:+.2f} dB); writing {_without_branches(ptq)}"
        )
        return False
    return True


def _without_branches(ptq: Candidate) -> str:
    """What is written where QwT's branches are not: the PTQ model, with its layer folds where auto wrote them."""
    return "the PTQ model with layer folds" if ptq.layer_folds else "the PTQ model"


def outputs_gaining(compensation: Compensation | None, ptq: Candidate) -> list[str]:
    """The chosen outputs, of several, on which QwT's held-out gain over PTQ is beyond noise (the
    lower end of its own 95% interval above zero)."""
    if compensation is None or compensation.score is None or ptq.score is None:
        return []
    intervals = metrics.output_gain_intervals(*metrics.where_they_differ(compensation.score, ptq.score))
    return sorted(name for name, (low, _) in intervals.items() if low > 0.0) if len(intervals) > 1 else []


def qwt_on_int8_streams(run: Run, selection: Selection, compensation: Compensation,
                        found: list[blk.Block]) -> tuple[Compensation | None, float | None]:
    """QwT fitted again on the PTQ model with its residual streams quantized for every reader
    (``--residuals auto`` built it), where that keeps QwT's gain: kept against QwT on float
    streams as the PTQ model's streams are (:func:`int8_streams_keep`), and still gaining at
    least :data:`MIN_QWT_GAIN_DB` over the PTQ model it is fitted on. On YOLOv8n it kept
    the gain (class scores 13.69 against 13.78 dB on the evaluation photos), its latency within
    this machine's noise of QwT on float streams (its two Adds are little of its time); on a small
    ResNet the quantized sums rounded the corrections off (2.6 -> 1.6 dB). Also its held-out gain
    over QwT on float streams, where tried."""
    variant = selection.candidate.int8_residuals_variant if selection.candidate is not None else None
    if variant is None or compensation.score is None:
        return None, None
    fitted = _fit(run, variant, found, run.calib, selection.whole_error, compensation.budget,  # the branches that fit
                  chosen_by=compensation)
    if fitted.model is None:
        return None, None
    fitted = dataclasses.replace(fitted, score=run.heldout_score(fitted.model, "evaluating QwT on int8 residual streams"))
    gain = metrics.db_gain(fitted.sqnr_db, compensation.sqnr_db)
    keeps = int8_streams_keep(gain, fitted.score, compensation.score)
    return (fitted if keeps and metrics.db_gain(fitted.sqnr_db, variant.sqnr_db) >= MIN_QWT_GAIN_DB else None), gain


def decided_on(compensation: Compensation | None, ptq: Candidate) -> list[str]:
    """The outputs QwT against PTQ was decided on, where fewer than the chosen ones (the others the same in both)."""
    if compensation is None or compensation.score is None or ptq.score is None:
        return []
    qwt_score, _ = metrics.where_they_differ(compensation.score, ptq.score)
    return [] if qwt_score is compensation.score else list(qwt_score.chosen)


def qwt_gain_interval(compensation: Compensation | None, ptq: Candidate) -> tuple[float, float] | None:
    """The 95% interval of QwT's held-out gain over PTQ (on the outputs it changes), where both have per-sample scores."""
    if compensation is None or compensation.score is None or ptq.score is None:
        return None
    return metrics.gain_interval(*metrics.where_they_differ(compensation.score, ptq.score))


def _fit(run: Run, candidate: Candidate, found: list[blk.Block], calib: CalibrationSet, whole_error: bool,
         budget: BranchBudget | None = None, chosen_by: Compensation | None = None) -> Compensation:
    """``candidate``'s model with fitted compensations spliced in (a copy; None if no block gained)
    and the per-block reports; each fitted to the whole error at its block output, or to the block's
    own; where ``budget`` leaves branches out, only the blocks whose branch it keeps get one. Where
    ``chosen_by`` is given (a fit on fewer samples, its reports one per block of ``found``), only the
    blocks it compensated are fitted: the others are reported as it found them."""
    # Our own Q/DQ pass keeps the FP32 meaning of every boundary tensor; a given QDQ model may not.
    exact = candidate.method != GIVEN
    chosen = {r.name for r in chosen_by.blocks if r.kept} if chosen_by is not None else {b.name for b in found}
    fitted = [b for b in found if b.name in chosen]
    left_out = budget.left_out if budget is not None else {}
    fold_only = frozenset(b.name for b in fitted if b.name not in budget.kept) if left_out else frozenset()
    results = iter(capture.fit_blocks(
        candidate.float_model or run.fp, candidate.model, fitted, calib, run.batch_size, exact_boundaries=exact,
        branch_options=dataclasses.replace(run.branch_options(whole_error), fold_only=fold_only), check=run.output_check(calib),
    ) if fitted else ())
    branches, folds, reports = [], [], []
    for k, block in enumerate(found):
        if block.name not in chosen:
            reports.append(_as_chosen_by(chosen_by, k, calib.num_samples))
            continue
        res = next(results)
        entry = _block_report(res)
        if res.block.name in left_out:
            note = f"no branch: it would add {100 * (left_out[res.block.name] - 1):.1f}% to the run, over --max-slowdown"
            entry = _noted(entry, note, entry.note)
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
    compensation = Compensation(candidate.method, None, reports, calib.num_samples, bias_corrected=candidate.bias_corrected,
                                whole_error=whole_error, branches=tuple(branches), budget=budget)
    if not branches and not folds:
        return compensation
    compensated = candidate.model.clone()
    passes = [affine.FoldAffinePass(folds, int32_biases=run.options.target == Target.ORT)] if folds else []
    passes += [splice.SpliceCompensationPass(branches)] if branches else []
    ir.passes.PassManager([*passes, TopologicalSortPass()])(compensated)
    return dataclasses.replace(compensation, model=compensated)


def _as_chosen_by(fit: Compensation, k: int, samples: int) -> BlockReport:
    """Block ``k``'s report in ``fit``, where it is left uncompensated and not fitted again on ``samples``."""
    entry = fit.blocks[k]
    if fit.samples == samples:
        return entry
    return _noted(entry, entry.note, f"as fitted on the first {fit.samples} samples")


def _noted(entry: BlockReport, *notes: str) -> BlockReport:
    """``entry`` with ``notes`` for its note, the empty ones left out."""
    return dataclasses.replace(entry, note="; ".join(n for n in notes if n))


def branch_budget(run: Run, fitted: Compensation, then: str = "fitting QwT again") -> BranchBudget | None:
    """With ``--compensation auto``, what the fitted branches add to onnxruntime's run of the
    model on this CPU (:mod:`qwt_onnx.latency`), at each batch size weighed, and the blocks
    whose branch is left out so that the rest fit within ``--max-slowdown``: those that remove
    the least of their block's held-out error per time they add first. Only where that run is
    the deployment: ``--target ort`` at 8 bits, which onnxruntime's CPU runs in its integer
    kernels (at other precisions it dequantizes to float ops, a stand-in for an NPU's run)."""
    o = run.options
    timed = o.target == Target.ORT and o.weight_bits == 8 and o.activation_bits == 8
    if o.compensation != CompensationKind.AUTO or not timed or fitted.model is None or not fitted.branches \
            or not run.latency_batches:  # a fixed batch larger than the calibration set: nothing to time it on
        return None
    scopes = {b.name: splice.name_prefix(b) for b in fitted.branches}
    proto = prepare.to_proto(fitted.model)
    times = [latency.run_times(proto, next(run.calib.batches(size)).feeds, list(scopes.values())) for size in run.latency_batches]

    def slowdown(branches: Sequence[splice.Branch]) -> float:  # at the batch size where they cost the most
        return max(t.slowdown([scopes[b.name] for b in branches]) for t in times)

    removed = {r.output: 1.0 - r.error_ratio_heldout for r in fitted.blocks if r.kept}

    def worth(branch: splice.Branch) -> float:  # its block's held-out error removed per share of run time added
        return removed.get(branch.output, 0.0) / max(slowdown([branch]) - 1.0, 1e-9)

    kept: list[splice.Branch] = []
    for branch in sorted(fitted.branches, key=worth, reverse=True):
        if slowdown([*kept, branch]) <= run.options.max_slowdown:
            kept.append(branch)
    names, kept_names = {r.output: r.name for r in fitted.blocks}, {b.name for b in kept}
    left_out = {names[b.output]: slowdown([b]) for b in fitted.branches if b.name not in kept_names}
    budget = BranchBudget({size: t.slowdown() for size, t in zip(run.latency_batches, times)},
                          {size: t.slowdown([scopes[b.name] for b in kept]) for size, t in zip(run.latency_batches, times)},
                          frozenset(names[b.output] for b in kept), left_out, fitted.samples)
    if left_out:
        run.warnings.warn(
            f"QwT's {len(fitted.branches)} branches make onnxruntime's run on this CPU {_slowdowns(budget.slowdown)} as long, "
            f"over --max-slowdown {run.options.max_slowdown:g}: {then} with "
            + (f"the {len(kept)} that fit ({_slowdowns(budget.kept_slowdown)})" if kept else "no branch")
            + ", those that remove the least of their block's error per time left out first "
            "(--compensation branch keeps them all)"
        )
    return budget


def _slowdowns(slowdown: dict[int, float]) -> str:
    """``{1: 1.094, 16: 1.11}`` as "1.094x at batch 1 and 1.110x at batch 16"."""
    return " and ".join(f"{factor:.3f}x at batch {size}" for size, factor in slowdown.items())


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

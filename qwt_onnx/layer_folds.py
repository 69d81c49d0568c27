"""Step 5: QwT-v2's channel-wise affine at every quantized layer, folded into its weights.

QwT-v2 (arXiv 2505.20932) compensates a quantized model layer by layer: each quantized
Conv, Gemm or MatMul's output ``z`` becomes ``a ⊙ z + b``, one scale and one shift per
output channel, fitted in closed form to the FP32 model's own tensor at that point, and
folded into the weight's DequantizeLinear scale and the bias (:mod:`qwt_onnx.passes.affine`):
the written graph keeps its ops and its fusions, and runs as fast.

The layers are fitted in graph order on the stream that the layers before them already
compensate (:func:`qwt_onnx.analysis.capture.fit_blocks`), each on its output before the
quantizer that may follow it, through the activation that the next ops read of it (each
element weighed by the share of its error the activation passes on: what a Relu zeroes in
both models needs no mending; fitted on every element, MiniLM's FFN input projections
gained before their GELU and lost after it), and each kept where it brings closer to FP32 on held-out samples
what the next ops read of that output: after that quantizer, the activation and the
normalization between (a MatMul's output after its bias Add). Judged on its own output, every
fold of MiniLM's 18 layers lowered it, and together they cost its sentence embeddings 7.6 dB:
the fold of the first FFN's output projection restored an outlier channel that its quantized
input had clipped (2.4 -> 13.0 dB at the layer, on evaluation sentences), and the LayerNorm
after it, which had removed most of that error anyway, came out 25.3 -> 16.6 dB.

The folded model is written where its outputs get closer to FP32 on the samples past those the
folds were fitted on, and no chosen output of several gets worse beyond noise (where the folds
lose together, the part of them that gains there, found by halving): it costs nothing
at run time, so a gain within noise is the better bet, as for bias correction and rounding. Not on the held-out samples alone: they chose the PTQ model among
several, so its score there is the best of several draws, and a model that departs from it
looks worse there than it is. PP-LCNet's PTQ model scored 24.9 dB on its held-out samples and
17.8 dB on the other calibration samples; its folds lost 4.3 dB on the first, and gained 2.0 dB
on the second and 2.1 dB on its evaluation images. Where QwT's branches follow and beat it,
branches fitted on the PTQ model alone replace both where they do better on the held-out
samples (:func:`qwt_onnx.qwt.compensate_without_folds`); where none follow and the folds' gain
is within noise, where those branches gain more (:func:`qwt_onnx.qwt.compensate_instead_of_folds`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir

from qwt_onnx import observe
from qwt_onnx.analysis import blocks as blk
from qwt_onnx.analysis import capture
from qwt_onnx.calibration import SCORING_SAMPLES
from qwt_onnx.graph import prepare
from qwt_onnx.graph import query as g
from qwt_onnx.numerics import metrics
from qwt_onnx.numerics.metrics import Score
from qwt_onnx.options import Target
from qwt_onnx.passes import affine
from qwt_onnx.run import Run

# The first samples fit the folds (two numbers per channel, from every position of every sample):
# on PP-LCNet the folds fitted on 64 gained +2.29 dB on its evaluation images, those fitted on
# all 512 +1.75 dB, in an eighth of the time.
LAYER_FOLD_SAMPLES = 64


# Where the folds that each gain at their next reads lose together at the model output, groups of
# them are judged there instead, halved where they lose: finding one fold of 128 that loses takes
# about 2 · 7 model runs on the judging samples.
MAX_FOLD_TRIALS = 16
# ... and the FP32 outputs on those samples kept for them where they take at most this, so that each
# model judged runs alone (NudeNet's YOLOv8n detector: 47 MB for 256 images, half of a judgement's
# time; PP-OCRv6 rec's would take 2.3 GB, and are computed again for each).
MAX_KEPT_REFERENCE_BYTES = 512 << 20


@dataclasses.dataclass(frozen=True)
class LayerFolds:
    """The folded model (None where no layer gained), and what was measured against the model before."""

    model: ir.Model | None
    layers: int  # quantized weighted ops whose output a fold could compensate
    folded: int  # ... and those folded in ``model``
    samples: int
    score: Score | None = None
    gain_db: float | None = None  # held-out, of the worst chosen output over the model before
    interval_db: tuple[float, float] | None = None
    worse: str = ""  # a chosen output of several that the folds make worse beyond noise
    written: bool = False
    judged_samples: int = 0  # the samples past the fitted ones that judged them; 0: the held-out ones did
    superseded: str = ""  # why folds that gained are not written after all
    gained: int = 0  # layers whose fold brings what their next ops read closer to FP32 on held-out samples
    together_gain_db: float | None = None  # all those folds' gain, where a part of them was chosen at the model output
    trials: int = 0  # models with a part of them judged at the output


def fold_layers(run: Run, model: ir.Model, float_model: ir.Model, before: Score | None, exact: bool) -> LayerFolds:
    """``model`` with a fitted channel-wise affine folded into each quantized weighted op that
    gains by one, judged against ``model`` on the samples the folds were not fitted on (or, where
    there are fewer of them than held out, on the held-out ones: ``before`` is ``model``'s score
    there); where they lose together, those of them that gain at the model output. ``float_model``
    is the FP32 model that ``model`` quantizes (equalized where it is); ``exact``: ``model`` keeps
    the FP32 meaning of every tensor it shares with it (our own Q/DQ pass)."""
    layers = _foldable_layers(float_model, model)
    calib = run.calib.take(LAYER_FOLD_SAMPLES)
    if not layers:
        return LayerFolds(None, 0, 0, calib.num_samples)
    options = capture.BranchOptions(affine=True, branches=False, whole_error=True)
    results = capture.fit_blocks(float_model, model, layers, calib, run.batch_size, exact_boundaries=exact,
                                 branch_options=options)
    folds = [r.affine for r in results if r.kept and r.affine is not None]
    if not folds:
        return LayerFolds(None, len(layers), 0, calib.num_samples)
    folded = _folded(run, model, folds)
    score = run.heldout_score(folded, "evaluating the layer folds")
    found = LayerFolds(folded, len(layers), len(folds), calib.num_samples, score, gained=len(folds))
    if score is None or before is None:  # nothing held out to judge by: the folds' own held-out errors decided
        return dataclasses.replace(found, written=True)
    unseen = np.arange(calib.num_samples, min(run.calib.num_samples, calib.num_samples + SCORING_SAMPLES))
    judged = len(unseen) >= int(run.calib.scoring_mask.sum())
    fp = prepare.to_proto(run.fp)
    new, old = (observe.scores_on(fp, [prepare.to_proto(m) for m in (folded, model)], run.calib, unseen, run.batch_size,
                                  run.options.outputs, "judging the layer folds") if judged else (score, before))
    gain, interval, worse = _verdict(new, old)
    found = dataclasses.replace(found, gain_db=gain, interval_db=interval, worse=", ".join(worse),
                                judged_samples=len(unseen) if judged else 0)
    if (gain > 0.0 and not worse) or len(folds) == 1:
        return dataclasses.replace(found, written=gain > 0.0 and not worse)
    chosen, chosen_score, trials = _chosen_at_the_output(folds, _judge(run, fp, model, unseen if judged else None), old, new)
    if not chosen:
        return dataclasses.replace(found, trials=trials)
    gain, interval, _ = _verdict(chosen_score, old)
    folded = _folded(run, model, chosen)
    score = run.heldout_score(folded, "evaluating the folds kept")
    return dataclasses.replace(found, model=folded, folded=len(chosen), score=score, together_gain_db=found.gain_db,
                               gain_db=gain, interval_db=interval, worse="", trials=trials, written=True)


def _folded(run: Run, model: ir.Model, folds: list[affine.ChannelAffine]) -> ir.Model:
    folded = model.clone()
    affine.FoldAffinePass(folds, int32_biases=run.options.target == Target.ORT)(folded)
    return folded


def _judge(run: Run, fp: onnx.ModelProto, model: ir.Model, samples: np.ndarray | None):
    """``judge(folds, description)``: the :class:`Score` of ``model`` with ``folds`` folded against
    ``fp`` (``run.fp``'s proto), on the calibration ``samples`` (on the held-out ones where None)."""
    if samples is None:
        return lambda folds, description: run.heldout_score(_folded(run, model, folds), description)
    reference = _kept_reference(run, fp, samples)

    def judge(folds: list[affine.ChannelAffine], description: str) -> Score:
        candidate = prepare.to_proto(_folded(run, model, folds))
        if reference is None:
            return observe.scores_on(fp, [candidate], run.calib, samples, run.batch_size, run.options.outputs, description)[0]
        return observe.score_on(candidate, run.calib, samples, run.batch_size, reference, run.options.outputs, description)

    return judge


def _kept_reference(run: Run, fp: onnx.ModelProto, samples: np.ndarray) -> dict[str, np.ndarray] | None:
    """The FP32 outputs on ``samples``, where they take at most :data:`MAX_KEPT_REFERENCE_BYTES`
    (judged by the held-out ones, already kept); None where they would take more."""
    held = run.reference()
    per_sample = sum(v.nbytes for v in held.values()) / max(1, int(run.calib.scoring_mask.sum()))
    if per_sample * len(samples) > MAX_KEPT_REFERENCE_BYTES:
        return None
    return observe.outputs_on(fp, run.calib, samples, run.batch_size, "FP32 outputs to judge the layer folds by")


def _verdict(new: Score, old: Score) -> tuple[float, tuple[float, float] | None, list[str]]:
    """``new``'s gain over ``old`` on the worst chosen output where they differ, its 95% interval,
    and the chosen outputs it makes worse beyond noise."""
    worse = list(metrics.outputs_worse(new, old))
    new, old = metrics.where_they_differ(new, old)
    return metrics.db_gain(new.db, old.db), metrics.gain_interval(new, old), worse


def _gains(new: Score, old: Score) -> bool:
    gain, _, worse = _verdict(new, old)
    return gain > 0.0 and not worse


def _chosen_at_the_output(folds: list, judge, before: Score, together: Score) -> tuple[list, Score, int]:
    """The folds to keep where those that each gain at their next reads lose together at the model
    output (``together``) against ``before``, the model without them: in graph order, each half is
    kept where it gains at the output over what is kept before it, and halved again where it does
    not, within :data:`MAX_FOLD_TRIALS` models judged (all of them together the first). A local judgement
    cannot see what the ops downstream make of a change: Silero VAD's first encoder convolution's
    fold brings its own Relu output closer to FP32 on held-out samples, and alone costs the LSTM
    state the model outputs 4.3 dB. Returns the kept folds, their score and the models judged."""
    everything = tuple(range(len(folds)))
    scores = {everything: together}  # by the folds judged together, as their places in ``folds``

    def score_of(chosen: tuple[int, ...]) -> Score:
        if chosen not in scores:
            scores[chosen] = judge([folds[i] for i in chosen], f"judging {len(chosen)} of the layer folds")
        return scores[chosen]

    kept, kept_score = (), before
    pending = [everything[: len(folds) // 2], everything[len(folds) // 2 :]]
    while pending and len(scores) < MAX_FOLD_TRIALS:
        group = pending.pop(0)
        score = score_of(kept + group)
        if _gains(score, kept_score):
            kept, kept_score = kept + group, score
        elif len(group) > 1:
            pending[:0] = [group[: len(group) // 2], group[len(group) // 2 :]]
    return [folds[i] for i in kept], kept_score, len(scores)


def _foldable_layers(float_model: ir.Model, model: ir.Model) -> list[blk.Block]:
    """The FP32 model's weighted ops that ``model`` quantizes with a weight of their own, by
    their tensors' names (a given QDQ model may name its inputs otherwise: those are left out)."""
    values = g.values_by_name(model.graph)
    return [layer for layer in blk.weighted_layers(float_model)
            if layer.input in values and layer.output in values
            and isinstance(affine.fold_site(values[layer.output]), affine.FoldSite)]

"""Step 3: the post-training-quantized (PTQ) models, one per calibration method, and the search
over what else held-out samples decide (bias correction, weight clipping and rounding, channel
equalization, a float stem, quantized residual streams); or the user's QDQ model instead."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import onnx_ir as ir

from qwt_onnx import check, observe
from qwt_onnx.analysis.equalization import ChannelGroup, channel_groups, consumer_weights
from qwt_onnx.analysis.placement import Placement
from qwt_onnx.graph import extract as ex
from qwt_onnx.graph import prepare
from qwt_onnx.numerics import equalization as eqn
from qwt_onnx.numerics import metrics, rounding
from qwt_onnx.numerics.metrics import Score
from qwt_onnx.numerics.ranges import RangeObserver, compute_range
from qwt_onnx.options import (
    MAX_FLOAT_STEM_MACS,
    MIN_FLOAT_STEM_GAIN_DB,
    BiasCorrection,
    CalibMethod,
    Residuals,
    Rounding,
    Target,
    WeightRange,
)
from qwt_onnx.options import Equalization as EqualizationChoice
from qwt_onnx.passes import qdq
from qwt_onnx.passes.equalize import EqualizeChannelsPass
from qwt_onnx.run import Run

GIVEN = "given"  # the "method" of a QDQ model passed with --quantized
# With --residuals auto, the PTQ model's residual streams are quantized for every reader unless
# that loses at least this much held out, beyond noise (an eighth of the error energy): their Adds
# then run in integer kernels (mediapipe's BlazeFace, 15 streams: 1.59x -> 0.84x FP32's latency
# for -0.12 dB held out, its faces as found); the losses measured were 0.01-0.24 dB (YOLOv8n,
# PP-OCRv6 det, BlazeFace, the tests' small ResNets), captcha-whisperer's CRNN's 0.9 dB.
MAX_INT8_RESIDUALS_LOSS_DB = 0.5


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
    # α per tensor whose channels were equalized (in float_model)
    equalized: dict[str, float] = dataclasses.field(default_factory=dict)
    equalization_gain_db: float | None = None  # held-out, where both were built
    float_stem: int = 0  # the depth of the weighted ops nearest the inputs left in float (Placement.stem)
    # per depth tried: held-out gain over the model before, its 95% interval, and the share of MACs left float
    float_stem_gains_db: dict[int, tuple[float, float, float, float]] = dataclasses.field(default_factory=dict)
    float_model: ir.Model | None = None  # the FP32 model its Q/DQ went into, where not the run's
    int8_residuals: bool = False  # residual streams quantized for every reader (see --residuals)
    int8_silus: bool = False  # the gates and products of SiLUs, hard-swishes, channel gates quantized too (--residuals)
    int8_silus_gain_db: float | None = None  # held-out, with --residuals auto: of those over the same without
    float_hard_swishes: bool = False  # ... but the hard-swishes', left float (auto kept the others alone)
    int8_hard_swishes_gain_db: float | None = None  # held-out, of all of them over the same without, where not kept
    # With --residuals auto, the same PTQ with its residual streams quantized for every reader, and its held-out gain
    int8_residuals_variant: Candidate | None = None
    int8_residuals_gain_db: float | None = None
    # The same ranges with bias correction the other way, where both were built: which of the
    # two QwT compensates better is tried apart from which PTQ prefers.
    other_correction: Candidate | None = None
    layer_folds: int = 0  # quantized weighted ops with a channel-wise affine folded in (qwt_onnx.layer_folds)

    @property
    def sqnr_db(self) -> float | None:
        return self.score.db if self.score is not None else None


def given_candidate(run: Run, q: ir.Model) -> list[Candidate]:
    """The user's QDQ model as the only PTQ candidate."""
    saturating = check.check(prepare.to_proto(q)).of("saturation")
    if saturating:
        run.warnings.warn(
            f"{len(saturating)} integer kernels of the --quantized model can saturate on x86 CPUs without VNNI "
            "(its int8 weights are not pair-safe), and so can the written model; "
            "'python -m qwt_onnx check' lists them"
        )
    return [Candidate(GIVEN, q, run.heldout_score(q, f"evaluating PTQ ({GIVEN})"))]


def ptq_candidates(run: Run) -> list[Candidate]:
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
        best = best_candidate(candidates)
        equalized = _equalized(run, groups, seen, CalibMethod(best.method))
        if equalized is not None:
            seen = _observe_equalized(run, equalized, seen, placement)
            builder = _Builder(run, (CalibMethod(best.method),), equalized.model, seen, equalized, plain)
            chosen = _better_equalization(builder, best)
            candidates = [chosen if c is best else c for c in candidates]
            if chosen.equalized:
                return _with_int8_residuals_variant(builder, candidates)
    return _with_int8_residuals_variant(plain, candidates)


def _with_int8_residuals_variant(builder: _Builder, candidates: list[Candidate]) -> list[Candidate]:
    """``candidates``, the best with its residual streams quantized for every reader attached
    (:attr:`Candidate.int8_residuals_variant`), where ``--residuals auto`` has such streams to
    decide, and its SiLUs too where held-out samples keep them on top of what streams were kept
    (they cost more on some models: ddddocr's YOLOX detector lost 0.4 dB by its streams and 2.1
    more by its SiLUs). Whether the variant is written is decided once QwT is (:func:`int8_residuals_pay`)."""
    run = builder.run
    if run.options.residuals != Residuals.AUTO or not (run.residual_streams or run.silu_gates):
        return candidates
    best = best_candidate(candidates)
    if best.score is None:  # no held-out samples to tell a loss
        return candidates

    def quantized(base: Candidate, **streams: bool) -> Candidate:  # ``base`` with more streams quantized, its findings kept
        built = builder.like(base, **streams)
        return dataclasses.replace(base, model=built.model, score=built.score, **streams)

    variant, gains = None, {}
    if run.residual_streams:
        variant = quantized(best, int8_residuals=True)
        gains["int8_residuals_gain_db"] = metrics.db_gain(variant.sqnr_db, best.sqnr_db)
    if run.silu_gates:
        base = variant if variant is not None and _keeps(variant, best) else best
        silus = quantized(base, int8_silus=True)
        gains["int8_silus_gain_db"] = metrics.db_gain(silus.sqnr_db, base.sqnr_db)
        if not (_keeps(silus, base) and _keeps(silus, best)) and run.hard_swishes and run.gates_beside_float_hard_swishes:
            # PP-OCRv5's recogniser lost 4.9 dB by its hard-swishes, and its squeeze-excitation gates nothing
            gains["int8_hard_swishes_gain_db"] = gains["int8_silus_gain_db"]
            silus = quantized(base, int8_silus=True, float_hard_swishes=True)
            gains["int8_silus_gain_db"] = metrics.db_gain(silus.sqnr_db, base.sqnr_db)
        variant = silus if _keeps(silus, base) and _keeps(silus, best) else variant  # the latter is what writes it
    variant = dataclasses.replace(variant, **gains) if variant is not None else None
    attached = dataclasses.replace(best, int8_residuals_variant=variant, **gains)
    return [attached if c is best else c for c in candidates]


@dataclasses.dataclass
class _Equalized:
    """The FP32 model with channel groups equalized, the choice per group's tensor and the
    scales each tensor of their chains now carries."""

    model: ir.Model
    choices: dict[str, eqn.Equalization]
    scaled: dict[str, np.ndarray]


def _equalized(run: Run, groups: list[ChannelGroup], seen: observe.Observation, method: CalibMethod) -> _Equalized | None:
    """``run.fp`` with each channel group's scales moved into its weights where that lowers its
    consumers' output error with ``method``'s activation ranges; None where it lowers it nowhere."""
    o, choices = run.options, {}
    symmetric = o.target == Target.TRT
    range_of = functools.partial(compute_range, method=method.value, symmetric=symmetric, bits=o.activation_bits)
    for group in groups:
        quantized = [eqn.QuantizedActivation(*seen.extremes[v.name], seen.samples[v.name])
                     for v in group.chain if v.name in seen.samples]
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
    scaled = {value.name: choices[group.tensor.name].scales
              for group in groups if group.tensor.name in choices for value in group.chain}
    return _Equalized(model, choices, scaled)


def _observe_equalized(run: Run, equalized: _Equalized, seen: observe.Observation, placement: Placement) -> observe.Observation:
    """What a pass of the equalized model would see, from ``seen`` (the FP32 model's): only the
    quantized tensors that carry a scale are observed again (a histogram does not rescale per
    channel); their per-channel statistics and the second moments of the ops that read them
    are ``seen``'s, rescaled, and every other tensor's are as they were."""
    scaled = equalized.scaled
    names = [n for n in placement.observed_names if n in scaled]
    # only the part of the model that computes them runs (the outputs are ``seen``'s): what lies
    # past the last of them is left out (PP-OCRv6 rec: its last 28 of 288 nodes, a tenth of its pass)
    again = observe.observe(ex.context_model(equalized.model, names).proto, names, run.calib, run.batch_size,
                            readable=run.readable, keep_outputs=False)
    inputs = placement.hessian_inputs(observe.HESSIAN_INPUTS)

    def rescaled(statistics: dict, power: int = 1) -> dict:
        return {name: value / scaled[name] ** power if name in scaled else value for name, value in statistics.items()}

    moments = {weight: m.rescaled(scaled[inputs[weight][0]]) if inputs[weight][0] in scaled else m
               for weight, m in seen.second_moments.items()}
    return observe.Observation({**seen.ranges, **again.ranges}, rescaled(seen.means), rescaled(seen.powers, 2), seen.reference,
                               moments)


def _observe(run: Run, fp: ir.Model, placement: Placement, groups: list[ChannelGroup] = ()) -> observe.Observation:
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
        prepare.to_proto(fp), [*placement.observed_names, *run.variants_observed], run.calib, run.batch_size, axes,
        placement.hessian_inputs(observe.HESSIAN_INPUTS) if o.rounding != Rounding.NEAREST else None, sampled,
        run.readable,
    )


@dataclasses.dataclass
class _Builder:
    """Builds and scores PTQ models of one FP32 model (``run.fp`` or its equalized copy) from one
    observation of it, for the calibration ``methods``."""

    run: Run
    methods: tuple[CalibMethod, ...]
    fp: ir.Model
    seen: observe.Observation
    equalized: _Equalized | None = None
    plain: _Builder | None = None  # the FP32 model's, whose ranges of the tensors observed alike are reused
    _feedback: dict[bool, dict[str, rounding.Feedback]] = dataclasses.field(default_factory=dict)  # by whether bias correction centres the moments

    def __post_init__(self) -> None:
        o = self.run.options
        symmetric = o.target == Target.TRT

        def range_of(method: CalibMethod, name: str, observed: RangeObserver) -> tuple[float, float]:
            if self.plain is not None and self.plain.seen.ranges.get(name) is observed and method in self.plain.ranges:
                return self.plain.ranges[method][name]
            return compute_range(observed, method.value, symmetric, o.activation_bits)

        self.ranges = {method: {name: range_of(method, name, observed) for name, observed in self.seen.ranges.items()}
                       for method in self.methods}

    def candidate(self, method: CalibMethod, corrected: bool, weighted: bool = True, gptq: bool | None = None,
                  scored: bool = True, stem: int | None = None, int8_residuals: bool | None = None,
                  int8_silus: bool | None = None, float_hard_swishes: bool = False) -> Candidate:
        o, seen = self.run.options, self.seen
        gptq = o.rounding == Rounding.GPTQ if gptq is None else gptq
        int8_residuals = self.run.int8_residuals if int8_residuals is None else int8_residuals
        int8_silus = self.run.int8_silus if int8_silus is None else int8_silus
        stem = (o.stem_depth or 0) if stem is None else stem  # auto decides it later, on the chosen model
        model = self.fp.clone()
        if gptq and corrected not in self._feedback:
            # bias correction removes the rounding's mean error: what is left to minimise is its variance
            self._feedback[corrected] = {w: rounding.feedback(m.hessian(centered=corrected)) for w, m in seen.second_moments.items()}
        qdq.InsertQdqPass(self.ranges[method], o.target, self.run.stem_excluded(stem), o.weights, seen.means if corrected else None,
                          o.weight_bits, o.activation_bits, seen.powers if weighted else None, o.block_size,
                          self._feedback[corrected] if gptq else None, int8_residuals, int8_silus, float_hard_swishes)(model)
        label = (f"{method}{', bias-corrected' if corrected else ''}{'' if weighted else ', plain clipping'}{', GPTQ' if gptq else ''}"
                 f"{', equalized' if self.equalized else ''}{f', float stem {stem}' if stem else ''}"
                 f"{', int8 residual streams' if int8_residuals and o.residuals == Residuals.AUTO else ''}"
                 f"{', int8 SiLUs, hard-swishes and gates' if int8_silus and o.residuals == Residuals.AUTO else ''}"
                 f"{' but the hard-swishes' if int8_silus and float_hard_swishes else ''}")
        score = self.run.heldout_score(model, f"evaluating PTQ ({label})") if scored else None
        return Candidate(method.value, model, score, bias_corrected=corrected, weighted_clipping=weighted, gptq=gptq, float_stem=stem,
                         float_model=self.fp if self.equalized else None, int8_residuals=int8_residuals, int8_silus=int8_silus,
                         float_hard_swishes=int8_silus and float_hard_swishes,
                         equalized={name: choice.alpha for name, choice in self.equalized.choices.items()} if self.equalized else {})

    def like(self, other: Candidate, stem: int | None = None, scored: bool = True,
             int8_residuals: bool | None = None, int8_silus: bool | None = None,
             float_hard_swishes: bool | None = None) -> Candidate:
        """``other``'s PTQ (method, bias correction, clipping, rounding, residual streams, SiLUs)
        built on this builder's model, with ``other``'s float stem or ``stem``."""
        return self.candidate(CalibMethod(other.method), other.bias_corrected, other.weighted_clipping, other.gptq, scored,
                              other.float_stem if stem is None else stem,
                              other.int8_residuals if int8_residuals is None else int8_residuals,
                              other.int8_silus if int8_silus is None else int8_silus,
                              other.float_hard_swishes if float_hard_swishes is None else float_hard_swishes)

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
        best = best_candidate(candidates)
        pair = builder.corrected_or_not(CalibMethod(best.method), best.weighted_clipping, best.gptq, best)
        pair = dataclasses.replace(pair, weighted_clipping_gain_db=best.weighted_clipping_gain_db)
        candidates = [pair if c is best else c for c in candidates]
    if o.rounding == Rounding.AUTO and builder.seen.second_moments:
        best = best_candidate(candidates)
        method = CalibMethod(best.method)
        if o.bias_correction == BiasCorrection.AUTO:
            gptq = builder.corrected_or_not(method, best.weighted_clipping, True)
        else:
            gptq = builder.candidate(method, best.bias_corrected, best.weighted_clipping, True)
        chosen = _better_rounding(best, gptq)
        candidates = [chosen if c is best else c for c in candidates]
    if o.stem_depth is None:
        best = best_candidate(candidates)
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


def best_candidate(candidates: list[Candidate]) -> Candidate:
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


def int8_residuals_pay(ptq: Candidate) -> bool:
    """Whether the PTQ model, written without QwT, is written with its residual streams (and
    SiLUs) quantized for every reader (``--residuals auto`` built that variant). Where QwT is
    written, :func:`qwt_on_int8_streams` decides its streams."""
    variant = ptq.int8_residuals_variant
    return variant is not None and variant.score is not None and ptq.score is not None and _keeps(variant, ptq)


def _keeps(quantized: Candidate, floating: Candidate) -> bool:
    """Whether ``quantized``, ``floating`` with more of its streams quantized, is kept over it (:func:`int8_streams_keep`)."""
    return int8_streams_keep(metrics.db_gain(quantized.sqnr_db, floating.sqnr_db), quantized.score, floating.score)


def int8_streams_keep(gain: float, quantized: Score, floating: Score) -> bool:
    """Whether a model whose residual streams are quantized for every reader is kept over the same
    model with float streams, ``gain`` its held-out gain over it: unless held-out samples show it
    losing at least :data:`MAX_INT8_RESIDUALS_LOSS_DB` and beyond noise (the upper end of the 95%
    interval of the gain below zero)."""
    if gain > -MAX_INT8_RESIDUALS_LOSS_DB:
        return True
    interval = metrics.gain_interval(quantized, floating)
    return interval is not None and interval[1] >= 0.0

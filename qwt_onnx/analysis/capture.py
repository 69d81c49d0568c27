"""Capture and fit, block by block, on the quantized stream.

Each block gets a parallel branch or a channel-wise affine folded into its last
weighted op or normalization (:mod:`qwt_onnx.passes.affine`), or, where both are
asked for, the one that pays: the fold, which costs nothing at run time, where it
removes at least ``min_gain`` of the block's held-out error and nearly as much as
the branch would; else the branch. The stream carries the block's output as the
chosen compensation leaves it.

For block k with input ``a`` and output ``b``, every calibration batch goes
through the FP32 block and the quantized block on the *same* input: the
compensated output of block k-1, carried through the quantized graph. The
residual ``R = f(a) - f_q(a)`` (the block's own error, which QwT fits) or, where
the whole error is asked for, ``R = b_fp - f_q(a)`` against the FP32 model's own
activation ``b_fp`` (carried alongside, block by block through the FP32 graph:
the error inherited from earlier blocks included), and the branch input ``X``
(``a`` after its DequantizeLinear where the quantized graph has one) are folded into normal
equations in float64, so memory does not grow with the number of samples;
the per-batch tensors that the next block needs are spilled to a temporary
folder. The ranges an int8 branch's quantizers need, of its input (where that
has no quantizer yet) and of its output, are recorded on the way.

A branch that lowers its block's held-out error can still raise the model's (the
rest of the network amplifies what the branch gets wrong), so each one is also
checked at the model outputs: the held-out samples are led from the compensated
block output through the rest of the quantized graph, and the branch is kept only
where the worst output it reaches gets closer to FP32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import tempfile

import numpy as np
import onnx_ir as ir

from qwt_onnx import memory
from qwt_onnx.analysis.blocks import Block
from qwt_onnx.calibration import CalibrationSet
from qwt_onnx.errors import InputError
from qwt_onnx.graph import extract as ex
from qwt_onnx.graph import prepare
from qwt_onnx.graph import query as g
from qwt_onnx.numerics import metrics, rank
from qwt_onnx.numerics import quantization as qm
from qwt_onnx.numerics.affine import AffineFit, ChannelStatistics, fit_channel_affine, fold_suffices, passed_share
from qwt_onnx.numerics.compensation import Layout, infer_layout
from qwt_onnx.numerics.ranges import value_range
from qwt_onnx.numerics.solver import CompensationFit, NormalEquations, fit_grouped_compensation, with_stored_weights
from qwt_onnx.passes import affine as af
from qwt_onnx.runtime import Runner, move_samples

# Captured batches held in memory before the rest is spilled to files, at least: 1 GiB doubled
# PP-LCNet's peak RSS (2.74 against 1.36 GB at 512 samples) for 3% less time.
DEFAULT_MEMORY_BUDGET = 1 << 28
# Beyond that, batches are held while the process stays this far below the peak it had reached
# when the capture began (the FP32 pass that observes every activation): holding them then
# costs no peak memory, and spilled to disk PP-OCRv6 rec's stream cost a fifth of its run (250
# against 198 s, both at 4.3 GB). The margin is for what the capture allocates after a batch is
# held: a fixed share of the peak overshot it by 0.8 GB on YOLOv8n.
PEAK_MARGIN = 1 << 28


@dataclasses.dataclass(frozen=True)
class BranchOptions:
    """The branches asked for: on feature maps their kernel size and input channels per group
    (0: one group); int8 weights (``int8``, rounded as they are fitted, so that later blocks
    see each branch as it will run; ``pair_safe`` as the portable weight range rounds them) or
    float ones; and the least share of its block's held-out error a branch must remove to be
    kept (each one costs latency). ``symmetric``: activations are quantized symmetrically
    (TensorRT), where an int8 branch's output stays float and a bias a fold adds to a Gemm too
    (onnxruntime's QGemm takes one on int32, TensorRT a float one). ``affine``: a channel-wise affine
    folded into each block's last weighted op is tried; ``branches``: branches are tried; with
    both, each block gets the one that pays (the fold where it removes at least ``min_gain``
    of the block's held-out error and nearly as much as the branch, else the branch)."""

    kernel: int = 1
    groups_factor: int = 64
    int8: bool = True
    min_gain: float = 0.0
    pair_safe: bool = True
    symmetric: bool = False
    affine: bool = False
    branches: bool = True
    activation_bits: int = 8  # of the quantizers a branch gets, as the Q/DQ pass quantizes activations
    # a token branch's rank: None full; 0 the lowest that holds nearly all of the full branch's
    # held-out gain at most half its cost (or full); else that rank, where it is below full
    rank: int | None = None
    # fitted to the block output's whole error against the FP32 model's own activation (error
    # inherited from earlier blocks included), not to the block's own error on its quantized input
    whole_error: bool = False
    fold_only: frozenset[str] = frozenset()  # blocks (by name) where no branch is tried, a fold only where affine
    # the most multiply-accumulates per sample a branch may cost (the whole model's: a branch that
    # doubles the model's compute mixes what its block does not, time steps taken for features)
    max_macs: int | None = None


@dataclasses.dataclass(frozen=True)
class OutputCheck:
    """The FP32 model's outputs on the scoring samples, against which each branch is checked."""

    reference: dict[str, np.ndarray]  # samples on axis 0, in the order of their indices
    scoring: np.ndarray  # mask of the calibration samples that ``reference`` holds
    batch_axes: dict[str, int]  # where each model output holds its samples
    chosen: tuple[str, ...] = ()  # the outputs (or parts of them) that decide; every float one where empty

    def decisive(self, names: list[str]) -> tuple[str, ...]:
        """Of the output ``names``, those that decide: float, and chosen or holding a chosen part."""
        floats = {name for name, _ in metrics.float_outputs(self.reference)}
        wanted = {metrics.part_of(label)[0] for label in self.chosen}
        return tuple(n for n in names if n in floats and (not self.chosen or n in wanted))

    def labels(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """What is scored of the decisive outputs ``names``: each whole, or its chosen parts."""
        return tuple(label for label in self.chosen if metrics.part_of(label)[0] in names) if self.chosen else names

    def rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Of a batch's sample ``indices``: which ones are scored, and their rows in ``reference``."""
        scored = self.scoring[indices]
        return scored, np.searchsorted(np.flatnonzero(self.scoring), indices[scored])


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Where one block is read and compared in the quantized graph."""

    block: Block
    branch_input: str  # the block input, after its DequantizeLinear where the quantized graph has one
    quantized_output: str | None = None  # the block's output is only ever read through this DQ
    quantized_input: bool = False  # likewise its input: the FP32 block then reads the DQ view too
    # Where the block output is a DequantizeLinear output, the written graph quantizes the
    # compensated output again with the same quantizer (the splice does): so does the stream.
    requantized: qm.QuantParams | None = None
    dequantized_input: bool = False  # the branch reads a DequantizeLinear output
    outputs_reached: tuple[str, ...] = ()  # the deciding model outputs computed from the block output
    # Where the rest of the graph is fed the block output for the check: before the quantizer
    # whose DequantizeLinear gives the block output, so that onnxruntime fuses the cut graph's
    # first ops as it fuses the whole model's (fed after it, PP-OCR's text-direction classifier
    # scored 4 dB lower cut than whole)
    tail_input: str = ""
    fold_site: af.FoldSite | str | None = None  # with affine compensation: where it folds, or why nowhere
    # the block input's and output's sizes as the FP32 graph declares them, a dynamic one by its name
    declared: tuple[tuple[int | str | None, ...], ...] = ()

    @property
    def output_in_q(self) -> str:
        """The quantized graph's tensor that matches the FP32 block output."""
        return self.quantized_output or self.block.output


@dataclasses.dataclass(frozen=True)
class BlockResult:
    """What capture found for one block."""

    plan: BlockPlan
    layout: Layout | None = None
    result: CompensationFit | AffineFit | None = None
    skipped: str = ""
    input_range: tuple[float, float] | None = None  # of the branch input, for a quantizer where it has none
    output_range: tuple[float, float] | None = None  # of the branch output on the calibration samples
    int8_scale: np.ndarray | None = None  # an int8 branch's per-output-channel weight scales
    # the quantizers the written graph gives a kept int8 branch's input and output, where it does
    input_quantizer: qm.QuantParams | None = None
    output_quantizer: qm.QuantParams | None = None
    output_gain_db: float | None = None  # of the worst output it reaches, on held-out samples, where checked
    kept_at_outputs: bool = True
    affine: af.ChannelAffine | None = None  # a folded compensation, in place of a branch
    low_rank: rank.LowRankFit | None = None  # a branch of lower rank, ``result``'s map its factors' product

    @property
    def kept(self) -> bool:
        return self.result is not None and self.result.kept and self.kept_at_outputs

    @property
    def block(self) -> Block:
        return self.plan.block

    @property
    def branch_input(self) -> str:
        return self.plan.branch_input


@dataclasses.dataclass
class _BlockModels:
    fp: ex.SubModel
    q: ex.SubModel
    lead_in: ex.SubModel | None  # quantized graph from earlier stream values to this block's input
    tail: ex.SubModel | None = None  # quantized graph from this block's output to the outputs it reaches
    # the block outputs so far that the stream keeps after this block, besides the next block's
    # input, because a later lead-in, input or tail reads them (a block of a span cut into units
    # need not read the output of the one before it)
    kept_after: tuple[str, ...] = ()
    fold_site: ex.SubModel | None = None  # quantized graph from the block input to the output an affine folds into
    fp_lead_in: ex.SubModel | None = None  # FP32 graph from the FP32 stream's values to the block input (whole error)
    # a layer's fold is judged where the next ops read its output (:func:`_judges`): the
    # quantized graph from the stream to there, and the FP32 graph from the FP32 stream
    judge: ex.SubModel | None = None
    fp_judge: ex.SubModel | None = None
    # the FP32 graph from a layer's output to the activation the next ops read of it, element by
    # element (:func:`_activation`), through which the layer's fold is fitted
    activation: ex.SubModel | None = None


class _SpillFiles:
    """Arrays spilled to disk: one file per slot, opened once and rewritten in place (on some
    file systems creating a file costs more than writing it), raw bytes with their shapes kept
    here (tensor names may hold characters a file name should not)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.files: dict[tuple[str, int], io.BufferedRandom] = {}
        self.contents: dict[tuple[str, int], list[tuple[str, np.dtype, tuple[int, ...]]]] = {}

    def write(self, slot: tuple[str, int], arrays: dict[str, np.ndarray]) -> None:
        file = self.files.get(slot)
        if file is None:
            file = self.files[slot] = open(os.path.join(self.folder, f"{slot[0]}-{slot[1]}.bin"), "w+b")
        file.seek(0)
        for array in arrays.values():  # not ndarray.tofile: it reports a full device with no errno
            file.write(np.ascontiguousarray(array).data)
        file.truncate()
        self.contents[slot] = [(name, a.dtype, a.shape) for name, a in arrays.items()]

    def read(self, slot: tuple[str, int]) -> dict[str, np.ndarray]:
        file = self.files[slot]
        file.seek(0)
        return {name: np.fromfile(file, dtype, math.prod(shape)).reshape(shape) for name, dtype, shape in self.contents[slot]}

    def discard(self, slot: tuple[str, int]) -> None:
        self.contents.pop(slot, None)

    def close(self) -> None:
        for file in self.files.values():
            file.close()


def stream_order(calib: CalibrationSet, checked: bool) -> np.ndarray:
    """The order in which the stream takes the samples: where branches are ``checked`` at the
    outputs or layer folds where the next ops read, held-out ones last, so that what runs on
    them alone runs on whole batches."""
    if not checked:
        return np.arange(calib.num_samples)
    held = calib.heldout_mask
    return np.concatenate([np.flatnonzero(~held), np.flatnonzero(held)])


def _samples_axis(x_shape: tuple[int, ...], y_shape: tuple[int, ...], count: int, layout: Layout) -> int | None:
    """The axis of a block's input and output that holds the batch's ``count`` samples: the
    first, or for a branch on tokens any but the features (a recurrent layer's time-major
    [T, batch, C]); None where no such axis is common to both. Feature maps of a batch of one
    sample may stack that sample's frames on their first axis (Silero VAD's sequence model,
    [frames, C, L]): all of them are its rows."""
    candidates = range(len(x_shape) - 1) if not layout.channels_first else range(1)
    axis = next((a for a in candidates if x_shape[a] == y_shape[a] == count), None)
    if axis is None and count == 1 and layout.channels_first and x_shape[0] == y_shape[0]:
        return 0
    return axis


def _varying_features(plan: BlockPlan, layout: Layout, rank: int) -> str | None:
    """The name of the dynamic dimension that holds the features of the block's input or output
    (a waveform's samples, [batch, N]), where the graph declares one there; else None."""
    axis = layout.feature_axis if layout.feature_axis < 0 else layout.feature_axis - rank  # as counted from the end
    names = [dims[axis] for dims in plan.declared if len(dims) >= -axis]
    return next((name for name in names if isinstance(name, str)), None)


def _without_samples_axis(x_shape: tuple[int, ...], y_shape: tuple[int, ...], count: int, channels_first: bool) -> bool:
    """Whether a block's input and output are one sample's tokens with no axis for it (a model fed
    whole inputs, [T, C]): they are then fitted as [1, T, C]. Not feature maps, whose branch, a
    convolution, needs the batch axis that its graph tensors lack."""
    common = range(min(len(x_shape), len(y_shape)) - 1)
    return count == 1 and not channels_first and not any(x_shape[a] == y_shape[a] == 1 for a in common)


class _Stream:
    """The quantized stream, batch by batch.

    Per-batch tensors stay in memory up to ``memory_budget`` bytes, and beyond
    that while the process's resident set stays :data:`PEAK_MARGIN` below
    ``ceiling`` (where given); the rest is spilled to files in ``folder``, so one
    batch at a time is the most that a large calibration set needs in memory.
    """

    def __init__(self, folder: str, calib: CalibrationSet, batch_size: int, contexts: _ContextSource, memory_budget: int,
                 ceiling: int | None = None, checked: bool = False, whole_error: bool = False):
        self.calib, self.batch_size, self.whole_error = calib, batch_size, whole_error
        self.order = stream_order(calib, checked)
        self.contexts = contexts
        self.memory_budget, self.ceiling = memory_budget, ceiling
        self.in_memory: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        self.held_bytes = 0
        self.spilled = _SpillFiles(folder)
        self.ranges: dict[str, tuple[float, float]] = {}  # of each block input, over all batches

    def _enter(self, index: int, value: str, live: dict[str, np.ndarray]) -> None:
        """Batch ``index``'s stream values from here on: ``live``, which holds the next block's input ``value``."""
        self.save("stream", index, live)
        self.ranges[value] = value_range(live[value], self.ranges.get(value))

    def save(self, key: str, index: int, arrays: dict[str, np.ndarray]) -> None:
        previous = self.in_memory.pop((key, index), None)
        if previous is not None:
            self.held_bytes -= sum(a.nbytes for a in previous.values())
        self.spilled.discard((key, index))
        size = sum(a.nbytes for a in arrays.values())
        if self.held_bytes + size <= self.memory_budget or self._below_ceiling():
            self.in_memory[(key, index)] = arrays
            self.held_bytes += size
        else:
            self.spilled.write((key, index), arrays)

    def _below_ceiling(self) -> bool:
        resident = memory.resident() if self.ceiling is not None else None
        return resident is not None and resident + PEAK_MARGIN <= self.ceiling

    def load(self, key: str, index: int) -> dict[str, np.ndarray]:
        if (key, index) in self.in_memory:
            return self.in_memory[(key, index)]
        return self.spilled.read((key, index))

    def forget(self, key: str) -> None:
        """Drop every batch's ``key`` arrays."""
        for slot in [slot for slot in self.in_memory if slot[0] == key]:
            self.held_bytes -= sum(a.nbytes for a in self.in_memory.pop(slot).values())
        for slot in [slot for slot in self.spilled.contents if slot[0] == key]:
            self.spilled.discard(slot)

    def close(self) -> None:
        self.spilled.close()

    def batches(self, description: str, only: np.ndarray | None = None):
        """``(index, batch, pool)``: the pool holds the feeds, the context and the stream value;
        ``only``: the batches holding one of the samples of this mask."""
        for i, batch in enumerate(self._calibration_batches(description)):
            if only is None or only[batch.indices].any():
                yield i, batch, {**batch.feeds, **self.load("context", i), **self.load("stream", i)}

    def _calibration_batches(self, description: str):
        return self.calib.batches(self.batch_size, self.order, description)

    def start(self, first: _BlockModels, value: str) -> None:
        """Compute the context and the first block's input (``value``) on the quantized graph, and
        its FP32 stream where the whole error is fitted."""
        runner = Runner(first.lead_in.proto) if first.lead_in else None
        fp32 = self._fp32_follower(first, value)
        for i, batch in enumerate(self._calibration_batches("entering the stream")):
            context = self.contexts(batch.feeds)
            self.save("context", i, context)
            pool = {**batch.feeds, **context}
            self._enter(i, value, {value: runner(pool)[value] if runner else pool[value]})
            if fp32:
                fp32(i, pool, ())

    def _fp32_follower(self, block: _BlockModels, value: str):
        """Where the whole error is fitted, ``(i, pool, kept) -> None``: batch ``i``'s FP32 stream at
        ``block``, its input ``value`` led through the FP32 graph from ``pool`` (the feeds, the
        context and the FP32 stream's values) and its FP32 output, kept with the values ``kept``; else None."""
        if not self.whole_error:
            return None
        lead_in = Runner(block.fp_lead_in.proto) if block.fp_lead_in else None
        run = Runner(block.fp.proto)
        output, = block.fp.outputs

        def follow(i: int, pool: dict[str, np.ndarray], kept: tuple[str, ...]) -> None:
            if lead_in:
                pool[value] = lead_in(pool)[value]
            pool[output] = run(pool)[output]
            self.save("fp32", i, {name: pool[name] for name in {*kept, output}})

        return follow

    def fp32_outputs(self, models: _BlockModels, block: Block):
        """``(i, pool, x) -> array``: batch ``i``'s FP32 block output that the quantized one is
        compared with: the FP32 model's own, where the whole error is fitted (the FP32 stream
        holds it); else the FP32 block's on the stream's input (``x``, its DequantizeLinear view,
        where the FP32 block reads that)."""
        if self.whole_error:
            return lambda i, pool, x: self.load("fp32", i)[block.output]
        run = Runner(models.fp.proto)
        return lambda i, pool, x: run(pool if x is None else {**pool, block.input: x})[block.output]

    def advance(self, result: BlockResult, following: _BlockModels, value: str, kept: tuple[str, ...]) -> None:
        """The next block's input (``value``), led from this block's compensated output and the
        other stream values through any gap (``following``'s lead-in); of the stream values, those
        ``kept`` stay. The FP32 stream, where there is one, advances alike."""
        runner = Runner(following.lead_in.proto) if following.lead_in else None
        fp32 = self._fp32_follower(following, value)
        for i, batch, pool in self.batches("advancing the stream"):
            pool[result.block.output] = self.block_output(result, i, pool, result.kept)
            if runner:
                pool[value] = runner(pool)[value]
            self._enter(i, value, {name: pool[name] for name in {*kept, value}})
            if fp32:
                fp32(i, {**batch.feeds, **self.load("context", i), **self.load("fp32", i)}, kept)

    def branch_range(self, result: BlockResult) -> tuple[float, float]:
        """The range of the branch output over all batches (before any output quantizer)."""
        output_range = None
        for i, _, pool in self.batches(f"measuring {result.block.name}'s branch"):
            output_range = value_range(self.branch_output(result, i, pool, quantized=False), output_range)
        return output_range

    def branch_output(self, result: BlockResult, i: int, pool: dict[str, np.ndarray], quantized: bool = True) -> np.ndarray:
        """Batch ``i``'s branch output as the written graph computes it: through the quantizers of
        an int8 branch (``quantized``), its weights as stored."""
        saved = self.load("block", i)
        x = saved["x"] if "x" in saved else pool[result.block.input]
        if result.input_quantizer is not None:
            x = qm.fake_quantize(x, result.input_quantizer)
        branch = result.layout.apply(result.result.fit, x)
        if quantized and result.output_quantizer is not None:
            branch = qm.fake_quantize(branch, result.output_quantizer)
        return branch

    def block_output(self, result: BlockResult, i: int, pool: dict[str, np.ndarray], compensated: bool,
                     requantize: bool = True) -> np.ndarray:
        """Batch ``i``'s quantized block output, with the branch's output added where
        ``compensated`` (and, with ``requantize``, quantized again where the written graph does)."""
        saved = self.load("block", i)
        if not compensated:
            return saved["y"]
        if result.affine is not None:  # the folded block's own output, requantized where it is
            return self.load("fold", i)["folded"]
        y = saved["y"] + self.branch_output(result, i, pool)
        requantized = result.plan.requantized
        return qm.fake_quantize(y, requantized) if requantize and requantized is not None else y

    def output_sqnr(self, result: BlockResult, tail: ex.SubModel | None, check: OutputCheck, compensated: bool) -> dict[str, float]:
        """Held-out SQNR of the outputs the block reaches, its branch added or not, the stream as it is."""
        runner = Runner(tail.proto) if tail else None
        block, reached = result.block, result.plan.outputs_reached
        labels = check.labels(reached)

        def batches():
            description = f"checking {block.name} at the outputs" if compensated else "scoring the outputs so far"
            fed = result.plan.tail_input if runner else block.output
            for i, batch, pool in self.batches(description, only=check.scoring):
                y = self.block_output(result, i, pool, compensated, requantize=fed == block.output)
                values = runner({**pool, fed: y}) if runner else {fed: y}
                scored, rows = check.rows(batch.indices)
                yield (metrics.parts({name: check.reference[name][rows] for name in reached}, labels),
                       metrics.parts({name: move_samples(values[name], check.batch_axes[name], batch.size)[scored] for name in reached}, labels))

        return metrics.sqnr_db_over_batches(batches())


def fit_blocks(
    fp: ir.Model,
    q: ir.Model,
    blocks: list[Block],
    calib: CalibrationSet,
    batch_size: int,
    memory_budget: int | None = None,
    exact_boundaries: bool = False,
    branch_options: BranchOptions = BranchOptions(),
    check: OutputCheck | None = None,
) -> list[BlockResult]:
    """Fit one compensation per block, sequentially on the compensated quantized stream.

    ``memory_budget`` bounds the bytes of captured tensors kept in memory; the
    rest goes to a temporary folder. By default (None) it is
    :data:`DEFAULT_MEMORY_BUDGET`, and more is held while the process stays
    below the peak it had reached when the capture began. A block output read
    only through Q/DQ is compared and compensated after its DequantizeLinear.
    ``exact_boundaries`` says that ``q`` keeps the FP32 meaning of every block
    boundary tensor (true of our own Q/DQ pass); otherwise the FP32 block too
    reads an input that ``q`` reads only through Q/DQ after its
    DequantizeLinear. With a ``check``, a branch is kept only where it also
    brings the model outputs closer to FP32.
    """
    whole = branch_options.whole_error
    plans, models = _plan(fp, q, blocks, [s.name for s in calib.specs], exact_boundaries, check, branch_options.affine, whole)
    results = []
    budget, ceiling = (DEFAULT_MEMORY_BUDGET, memory.peak()) if memory_budget is None else (memory_budget, None)
    with tempfile.TemporaryDirectory(prefix="qwt-capture-") as folder, contextlib.closing(
        _Stream(folder, calib, batch_size, _ContextSource(fp, q, models), budget, ceiling,
                checked=check is not None or any(m.judge for m in models),
                whole_error=whole)
    ) as stream:
        stream.start(models[0], blocks[0].input)
        so_far: dict[str, float] = {}  # each output's held-out SQNR with the branches kept so far
        for k, plan in enumerate(plans):
            result = _fit(stream, models[k], plan, calib.heldout_mask, branch_options)
            if result.kept and result.affine is None:
                result = _with_quantizers(stream, result, branch_options, modelled=check is not None)
            if check is not None and result.kept:
                result = _checked_at_outputs(stream, result, models[k].tail, check, so_far)
            if k + 1 < len(blocks):
                stream.advance(result, models[k + 1], blocks[k + 1].input, models[k].kept_after)
            stream.forget("fold")
            results.append(result)
    return results


def _with_quantizers(stream: _Stream, result: BlockResult, options: BranchOptions, modelled: bool) -> BlockResult:
    """``result`` with the range of its int8 feature-map branch's output, for the quantizer the
    splice gives it where activations are asymmetric 8-bit (onnxruntime fuses QLinearConv only
    with it; at other widths it would fuse one it cannot run); and where ``modelled``, with the quantizers that the splice gives the branch, its input's
    too where that is not a DequantizeLinear output, so that the stream runs them.

    They are modelled only where branches are checked at the outputs, whose judgement needs the
    exact output: fitted on a stream with them, PP-OCRv6 rec's QwT model came out 0.6 dB lower on
    its evaluation images (16.84 against 17.43 dB), not understood yet."""
    if not options.int8:
        return result
    if modelled and not result.plan.dequantized_input:
        result = dataclasses.replace(result, input_quantizer=qm.activation_params(*result.input_range, options.symmetric, options.activation_bits))
    if not result.layout.channels_first or options.symmetric or options.activation_bits != 8:
        return result
    output_range = stream.branch_range(result)
    quantizer = qm.activation_params(*output_range, False, options.activation_bits) if modelled else None
    return dataclasses.replace(result, output_range=output_range, output_quantizer=quantizer)


def _checked_at_outputs(
    stream: _Stream, result: BlockResult, tail: ex.SubModel | None, check: OutputCheck, so_far: dict[str, float]
) -> BlockResult:
    """``result``, its branch dropped unless it raises the held-out SQNR of the worst output it
    reaches; ``so_far`` (each output's SQNR with the branches kept so far) is brought up to date."""
    reached = check.labels(result.plan.outputs_reached)
    if not reached:
        return dataclasses.replace(result, kept_at_outputs=False, skipped="dropped: reaches none of the chosen outputs")
    if any(name not in so_far for name in reached):
        so_far.update(stream.output_sqnr(result, tail, check, compensated=False))
    compensated = stream.output_sqnr(result, tail, check, compensated=True)
    gain = metrics.Score(compensated, reached).db - metrics.Score(so_far, reached).db
    if gain > 0:
        so_far.update(compensated)
        return dataclasses.replace(result, output_gain_db=gain)
    return dataclasses.replace(result, output_gain_db=gain, kept_at_outputs=False,
                               skipped=f"dropped: {gain:+.2f} dB at the outputs on held-out samples")


def _plan(fp: ir.Model, q: ir.Model, blocks: list[Block], feeds: list[str], exact_boundaries: bool, check: OutputCheck | None,
          affine: bool = False, whole_error: bool = False):
    q_cut, fp_cut = ex.Extractor(q), ex.Extractor(fp)
    q_values, fp_values = q_cut.values, fp_cut.values
    missing = [name for b in blocks for name in (b.input, b.output) if name not in q_values]
    if missing:
        raise InputError(
            f"the quantized model has no tensor {missing[0]!r} (a block boundary of the FP32 model); "
            "pass a QDQ model made from the same FP32 model, without renaming its tensors"
        )
    plans, models, produced = [], [], []  # produced: the block outputs so far, the stream's values
    for block in blocks:
        branch = g.dequantized_view(q_values[block.input])
        branch_input = branch if branch is not None else q_values[block.input]
        lead_in = fp_lead_in = None
        if block.input not in produced and block.input not in feeds:
            lead_in = q_cut(produced or feeds, [block.input], only_read=True)
            fp_lead_in = fp_cut(produced or feeds, [block.input], only_read=True) if whole_error else None
        # An output read only through Q/DQ is compensated after its DequantizeLinear (the
        # splice adds the branch there, so that the quantized op keeps its fusion), so the
        # block is judged there too; a layer's fold is fitted before the quantizer, which rounds
        # what any fold leaves and clips what none can mend, and judged where the next ops read
        # the layer output (:func:`_judges`).
        output_view = None if block.layer else g.quantized_only_view(q_values[block.output])
        plan = BlockPlan(
            block,
            branch_input.name,
            quantized_output=output_view.name if output_view is not None else None,
            # onnxruntime's quantizer folds a Relu into the quantizer after it and gives its
            # input the Relu's name: where a tensor is only ever read through Q/DQ, only the
            # dequantized tensor means what the FP32 tensor of that name means
            quantized_input=not exact_boundaries and g.quantized_only_view(q_values[block.input]) is not None,
            requantized=g.quantizer_params(g.requantizer(q_values[block.output])),
            dequantized_input=g.dequantizer(branch_input) is not None,
            outputs_reached=check.decisive(g.outputs_reached(q.graph, q_values[block.output])) if check else (),
            tail_input=_before_quantizer(q_values[block.output]).name,
            fold_site=af.fold_site(output_view if output_view is not None else q_values[block.output]) if affine else None,
            declared=tuple(tuple(prepare.dims(fp_values[name])) for name in (block.input, block.output) if name in fp_values),
        )
        reads = _next_reads(fp_values, q_values[block.output]) if block.layer and affine else []
        outputs = [plan.output_in_q] + ([plan.branch_input] if plan.branch_input != block.input else [])
        after = [name for name in plan.outputs_reached if name != block.output]
        earlier = [name for name in produced if name != block.output]
        models.append(
            _BlockModels(
                fp=fp_cut([block.input], [block.output]),
                q=q_cut([block.input], outputs),
                lead_in=lead_in,
                tail=q_cut([plan.tail_input, *earlier], after, only_read=True) if after else None,
                # apart from the block: read as an output, the fold site's op would not be fused with its quantizers
                fold_site=q_cut([block.input], [plan.fold_site.output]) if isinstance(plan.fold_site, af.FoldSite) else None,
                fp_lead_in=fp_lead_in,
                **(_judges(fp_cut, q_cut, block, earlier, reads) if whole_error else {}),
                activation=_activation(fp_cut, fp_values[block.output], reads) if reads else None,
            )
        )
        plans.append(plan)
        produced.append(block.output)
    _mark_kept_values(blocks, models)
    return plans, models


def _judges(fp: ex.Extractor, q: ex.Extractor, block: Block, earlier: list[str],
            reads: list[tuple[ir.Value, ir.Value | None]]) -> dict[str, ex.SubModel]:
    """Where a layer's fold is judged: the tensors the next ops read of its output (``reads``,
    :func:`_next_reads`), as they read
    them (after a quantizer: a fold that a quantizer's clipping undoes gains nothing; after a
    normalization: what it removes of an error the normalization would have removed anyway
    gains nothing either), the quantized graph from the stream to them and the FP32 graph from
    the FP32 stream to the tensors they view. Neither where they are the layer output itself,
    or the FP32 graph lacks one (a given QDQ model named otherwise)."""
    if not reads or all(view.name == block.output for view, _ in reads) or any(meant is None for _, meant in reads):
        return {}
    cut = [block.output, *earlier]
    return {"judge": q(cut, [view.name for view, _ in reads], only_read=True),
            "fp_judge": fp(cut, [meant.name for _, meant in reads], only_read=True)}


def _next_reads(fp_values: dict[str, ir.Value], output: ir.Value) -> list[tuple[ir.Value, ir.Value | None]]:
    """Where the next ops read a layer's ``output`` in the quantized graph (:func:`g.next_reads`),
    each with the FP32 tensor it means: the one of its name (onnxruntime's quantizer, and ours,
    fold a Relu into the quantizer after it, whose view takes the Relu's name), or else the one
    that it views (None where the FP32 graph has neither)."""
    return [(view, fp_values.get(view.name) or fp_values.get(viewed.name)) for view, viewed in g.next_reads(output)]


def _activation(fp: ex.Extractor, output: ir.Value, reads: list[tuple[ir.Value, ir.Value | None]]) -> ex.SubModel | None:
    """The FP32 graph from a layer's ``output`` to what the next ops read of it (``reads``), where
    they read one tensor computed from it element by element (a Relu, a SiLU; not a residual
    sum, nor a normalization over several elements)."""
    if len(reads) != 1 or reads[0][1] is None:
        return None
    read = reads[0][1]
    return fp([output.name], [read.name]) if g.is_elementwise_of(output, read) else None


def _mark_kept_values(blocks: list[Block], models: list[_BlockModels]) -> None:
    """Each block's ``kept_after``: the block outputs so far that are read later. Block ``j``'s
    lead-in (or its input, where that is a block output) runs as the stream advances past block
    ``j - 1``, whose fresh output is at hand; its tail runs while block ``j`` is checked."""
    produced_at = {b.output: k for k, b in enumerate(blocks)}
    last_needed: dict[str, int] = {}

    def needed(name: str, until: int) -> None:
        if name in produced_at and until >= produced_at[name]:
            last_needed[name] = max(last_needed.get(name, until), until)

    for j, (block, m) in enumerate(zip(blocks, models)):
        for name in m.lead_in.inputs if m.lead_in else (block.input,):
            if j == 0 or name != blocks[j - 1].output:
                needed(name, j - 2)
        for name in m.tail.inputs[1:] if m.tail else ():
            needed(name, j - 1)
        for judge in (m.judge, m.fp_judge) if m.judge else ():
            for name in judge.inputs:
                if name != block.output:
                    needed(name, j - 1)
    for k, m in enumerate(models):
        m.kept_after = tuple(name for name, until in last_needed.items() if produced_at[name] <= k <= until)


def _before_quantizer(value: ir.Value) -> ir.Value:
    """The input of the quantizer whose DequantizeLinear gives ``value``, where that quantizer is
    its only reader; else ``value``."""
    quantizer = g.requantizer(value)
    before = quantizer.inputs[0] if quantizer is not None else None
    if before is None or not before.name or before.is_graph_output() or len(list(before.uses())) != 1:
        return value
    return before


def _fit(stream: _Stream, models: _BlockModels, plan: BlockPlan, heldout: np.ndarray, options: BranchOptions) -> BlockResult:
    """The block's compensation: a branch, a fold, or where both are asked for the one that pays."""
    if not options.affine:
        return _fit_block(stream, models, plan, heldout, options)
    if not options.branches or plan.block.name in options.fold_only:
        return _fit_affine(stream, models, plan, heldout, options)
    fold = _FoldCapture(models, plan, heldout) if models.fold_site is not None else None
    branch = _fit_block(stream, models, plan, heldout, options, fold)
    return _paying(stream, models, branch, fold, options)


def _paying(stream: _Stream, models: _BlockModels, branch: BlockResult, fold: _FoldCapture | None,
            options: BranchOptions) -> BlockResult:
    """The fold, free at run time, where it removes at least ``options.min_gain`` of the block's held-out
    error and nearly as much as the branch would (all but :data:`rank.TOLERANCE` of it, as a
    low-rank branch must); else the branch, where it is kept. A fold is judged on its statistics
    first, and exactly as it runs only where those say it may be chosen."""
    fit = branch.result
    branch_gain = 1.0 - fit.error_ratio_heldout if fit is not None and not fit.not_finite else 0.0

    def suffices(fit: AffineFit) -> bool:
        return fold_suffices(1.0 - fit.error_ratio_heldout, branch_gain, options.min_gain, rank.TOLERANCE)

    affine, judged = fold.fit() if fold is not None else None, False
    if affine is not None and affine.kept and suffices(affine):
        folded = _judge_fold(stream, models, branch.plan, fold, affine, BlockResult(branch.plan, input_range=branch.input_range),
                             options)
        if folded.affine is not None and suffices(folded.result):
            return dataclasses.replace(folded, skipped=f"a branch would remove {100 * branch_gain:.0f}%")
        affine = folded.result
        judged = True
    if fold is None:
        why = branch.plan.fold_site
    elif affine is None or not affine.kept:
        why = fold.skipped or f"not folded: {affine.reason if affine else 'nothing to fit'}"
    else:
        why = f"the fold would remove {'' if judged else 'about '}{100 * (1.0 - affine.error_ratio_heldout):.0f}%"
    return dataclasses.replace(branch, skipped="; ".join(note for note in (branch.skipped, why) if note))


def _fit_block(stream: _Stream, models: _BlockModels, plan: BlockPlan, heldout: np.ndarray, options: BranchOptions,
               fold: _FoldCapture | None = None) -> BlockResult:
    """Capture the block on every calibration batch of the stream and fit its branch; ``fold``
    gathers what the block's fold is fitted on in the same pass."""
    block = plan.block
    fp32, q_run = stream.fp32_outputs(models, block), Runner(models.q.proto)
    result = BlockResult(plan, input_range=stream.ranges[block.input])
    layout = groups = slices = samples = None
    one_sample = False  # the block's tensors are one sample's, with no axis for it: given one
    for i, batch, pool in stream.batches(f"capturing {block.name}"):
        out = q_run(pool)
        y_q, x = out[plan.output_in_q], out.get(plan.branch_input, pool[block.input])
        stream.save("block", i, {"y": y_q} if plan.branch_input == block.input else {"y": y_q, "x": x})
        if i == 0:
            one_sample = _without_samples_axis(x.shape, y_q.shape, batch.size, block.channels_first)
        if one_sample:
            x, y_q = x[np.newaxis], y_q[np.newaxis]
        if i == 0:
            layout = infer_layout(x.shape, y_q.shape, block.channels_first, options.kernel, options.groups_factor)
            samples = _samples_axis(x.shape, y_q.shape, batch.size, layout) if layout is not None else None
            varying = _varying_features(plan, layout, x.ndim) if layout is not None else None
            if layout is None:
                result = dataclasses.replace(result, skipped=f"no linear branch maps {list(x.shape)} to {list(y_q.shape)}")
            elif varying is not None:
                layout = None
                result = dataclasses.replace(result, skipped=f"its features are on dynamic axis {varying!r}, which a branch's "
                                             "weights would fix to the calibration data's size")
            elif samples is None:
                layout = None
                result = dataclasses.replace(result, skipped=f"the samples are on no common axis of {list(x.shape)} and {list(y_q.shape)}")
        if layout is None and (fold is None or fold.skipped):  # nothing to fit: the stream needs only the quantized output
            continue
        y_fp = fp32(i, pool, (x[0] if one_sample else x) if plan.quantized_input else None)
        if fold is not None:
            fold.add(stream, i, batch, pool, y_q[0] if one_sample else y_q, y_fp)
        if one_sample:
            y_fp = y_fp[np.newaxis]
        if layout is None:
            continue
        # the fit takes rows and holds samples out along axis 0; a token branch maps each row alike
        x, residual = np.moveaxis(x, samples, 0), np.moveaxis(y_fp - y_q, samples, 0)
        frames = x.shape[0] // batch.size  # entries of axis 0 per sample: more than one where it stacks a sample's frames
        if groups is None:  # all rows and the held-out ones share a shift, so one can be taken from the other
            rows = layout.rows(x[:1])
            slices = layout.group_slices(rows.shape[1], residual.shape[layout.feature_axis])
            macs = frames * rows.shape[0] * sum((f.stop - f.start) * (t.stop - t.start) for f, t in slices)
            if options.max_macs is not None and macs > options.max_macs:
                layout = None
                result = dataclasses.replace(result, skipped=f"a branch would cost {macs:,} multiply-accumulates per sample, "
                                             f"more than the whole model's {options.max_macs:,}")
                continue
            shift = rows.mean(axis=0, dtype=np.float64).astype(np.float32)
            groups = [
                tuple(NormalEquations(f.stop - f.start, t.stop - t.start, shift[f]) for _ in range(2))
                for f, t in slices
            ]
        # every row, and the held-out ones again (a fifth): the training rows are the difference,
        # which spares copying the other four fifths out of the batch
        layout.accumulate([every for every, _ in groups], x, residual)
        is_held = np.repeat(heldout[batch.indices], frames)  # a sample's frames share its lot
        if is_held.any():
            layout.accumulate([held for _, held in groups], x[is_held], residual[is_held])
    if groups is None:
        return result
    groups = [(every.without(held), held) for every, held in groups]
    fit, int8_scale, skipped = fit_grouped_compensation(groups, slices), None, result.skipped
    if options.int8 and fit.kept:  # judged and written as stored
        validated, _ = layout.int8_rounded(fit.validated.weight, options.pair_safe)
        final, int8_scale = layout.int8_rounded(fit.fit.weight, options.pair_safe)
        fit = with_stored_weights(fit, groups, slices, validated, final)
    low_rank = _low_rank(fit, groups, layout, options) if fit.kept else None
    if low_rank is not None:
        fit, int8_scale = low_rank.fit, low_rank.down_scale
    if fit.kept and 1.0 - fit.error_ratio_heldout < options.min_gain:
        fit = dataclasses.replace(fit, kept_targets=0)
        skipped = f"removes {100 * (1 - fit.error_ratio_heldout):.0f}% of its held-out error, under --min-gain"
    return dataclasses.replace(result, layout=layout, result=fit, skipped=skipped, int8_scale=int8_scale, low_rank=low_rank)


def _low_rank(full: CompensationFit, groups: list[tuple[NormalEquations, NormalEquations]], layout: Layout,
              options: BranchOptions) -> rank.LowRankFit | None:
    """A token branch's compensation of lower rank than ``full``, as ``options.rank`` asks, where
    there is one; its down projection stored as the full branch's weight would be."""
    if options.rank is None or layout.channels_first or len(groups) != 1:
        return None
    (train, held), = groups
    store = (lambda down: layout.int8_rounded(down, options.pair_safe)) if options.int8 else None
    if options.rank == 0:
        return rank.lowest_sufficient_rank(train, held, full, store)
    if not rank.pays(options.rank, train.n_features, train.n_targets):
        return None
    return rank.fit_low_rank(train, held, full.validated, options.rank, store)


class _FoldCapture:
    """What a block's fold is fitted and judged on, gathered batch by batch as the block is
    captured: per-channel statistics of the fold site's output against the block's residual
    (every row, and the held-out ones again), and the FP32 block output on the held-out rows."""

    def __init__(self, models: _BlockModels, plan: BlockPlan, heldout: np.ndarray):
        self.site, self.heldout = plan.fold_site, heldout
        self.run = Runner(models.fold_site.proto)
        self.activation = Runner(models.activation.proto) if models.activation is not None else None
        self.every = self.held = self.samples = None
        self.skipped = ""

    def add(self, stream: _Stream, i: int, batch, pool: dict[str, np.ndarray], y_q: np.ndarray, y_fp: np.ndarray) -> None:
        if self.skipped:
            return
        z = self.run(pool)[self.site.output]
        if self.every is None:
            self.samples = next((a for a in range(z.ndim) if z.shape[a] == batch.size and a != self.site.axis % z.ndim), None)
            one_sample = batch.size == 1  # one sample's tokens, or its frames stacked on the first axis (see _held)
            if (self.samples is None and not one_sample) or z.shape != y_q.shape:
                self.skipped = f"not folded: {self.site.output} is shaped {list(z.shape)}, the block output {list(y_q.shape)}"
                return
            self.every, self.held = ChannelStatistics(self.site.channels), ChannelStatistics(self.site.channels)
        residual, rows = y_fp - y_q, np.flatnonzero(self.heldout[batch.indices])
        stream.save("fold", i, {"fp_held": _held(y_fp, rows, self.samples)})
        weight = self._passed(y_q, y_fp)
        self.every.update(z, residual, self.site.axis, weight)
        held_weight = _held(weight, rows, self.samples) if weight is not None else None
        self.held.update(_held(z, rows, self.samples), _held(residual, rows, self.samples), self.site.axis, held_weight)

    def _passed(self, y_q: np.ndarray, y_fp: np.ndarray) -> np.ndarray | None:
        """How much of each element's error the activation after the layer passes on (None: all)."""
        if self.activation is None:
            return None
        (z,), (a,) = self.activation.input_names, self.activation.output_names
        a_q, a_fp = self.activation({z: y_q})[a], self.activation({z: y_fp})[a]
        return passed_share(y_q, y_fp, a_q, a_fp) if a_q.shape == y_q.shape else None

    def fit(self) -> AffineFit | None:
        """The fold fitted on the training rows and scored on the held-out ones, by its statistics."""
        return fit_channel_affine(self.every.without(self.held), self.held) if self.every is not None else None


def _fit_affine(stream: _Stream, models: _BlockModels, plan: BlockPlan, heldout: np.ndarray,
                options: BranchOptions) -> BlockResult:
    """Capture the block, fit the channel-wise affine of its fold site's output, and judge the
    folded block on its exact held-out output."""
    block, site = plan.block, plan.fold_site
    result = BlockResult(plan, input_range=stream.ranges[block.input], skipped=site if isinstance(site, str) else "")
    fp32, q_run = stream.fp32_outputs(models, block), Runner(models.q.proto)
    fold = _FoldCapture(models, plan, heldout) if models.fold_site is not None else None
    for i, batch, pool in stream.batches(f"capturing {block.name}"):
        out = q_run(pool)
        y_q = out[plan.output_in_q]
        stream.save("block", i, {"y": y_q})
        if fold is None or fold.skipped:  # nothing to fold: the stream needs only the quantized output
            continue
        x = out.get(plan.branch_input, pool[block.input]) if plan.quantized_input else None
        y_fp = fp32(i, pool, x)
        fold.add(stream, i, batch, pool, y_q, y_fp)
    fit = fold.fit() if fold is not None else None
    if fit is None:
        return dataclasses.replace(result, skipped=fold.skipped) if fold is not None else result
    if not fit.kept:
        return dataclasses.replace(result, result=fit, skipped=f"not folded: {fit.reason}")
    return _judge_fold(stream, models, plan, fold, fit, result, options)


def _judge_fold(stream: _Stream, models: _BlockModels, plan: BlockPlan, fold: _FoldCapture, fit: AffineFit,
                result: BlockResult, options: BranchOptions) -> BlockResult:
    """``result`` with the fold ``fit`` where the folded block, run exactly as written, gets
    closer to FP32 on held-out samples; its error ratio is that run's. The stream keeps the
    folded block's output."""
    affine = af.ChannelAffine(fold.site, fit.scale, fit.shift)
    folded = ir.serde.deserialize_model(models.q.proto)
    af.FoldAffinePass([affine], int32_biases=not options.symmetric)(folded)
    folded_run = Runner(ir.serde.serialize_model(folded))
    judge = _NextReads(models) if models.judge is not None else None
    error, before = 0.0, 0.0  # of the folded and the unfolded block, exactly as they run, held out
    for i, batch, pool in stream.batches(f"folding into {plan.block.name}"):
        y_q, y_fp = stream.load("block", i)["y"], stream.load("fold", i)["fp_held"]
        y_folded = folded_run(pool)[plan.output_in_q]
        stream.save("fold", i, {"folded": y_folded})
        rows = np.flatnonzero(fold.heldout[batch.indices])
        if judge is not None:
            judge.add(stream, i, batch.size, rows, pool, plan.output_in_q, y_q, y_folded)
            continue
        error += float(np.square(y_fp - _held(y_folded, rows, fold.samples), dtype=np.float64).sum())
        before += float(np.square(y_fp - _held(y_q, rows, fold.samples), dtype=np.float64).sum())
    ratio = judge.ratio() if judge is not None else error / before if before > 0 else 1.0
    fit = dataclasses.replace(fit, error_ratio_heldout=ratio)
    if ratio >= 1.0:
        return dataclasses.replace(result, result=dataclasses.replace(fit, kept_targets=0),
                                   skipped="folded, it gains nothing on held-out samples")
    return dataclasses.replace(result, result=fit, affine=affine)


def _held(array: np.ndarray, rows: np.ndarray, axis: int | None) -> np.ndarray:
    """The held-out ``rows`` of a batch's ``array``, whose samples are on ``axis``; None: a batch
    of one sample whose tensors have no axis for it (a model fed whole inputs), all of it held
    out or none (its first axis emptied: the others, its channels among them, keep their place)."""
    if axis is not None:
        return np.take(array, rows, axis=axis)
    return array if rows.size else array[:0]


class _NextReads:
    """A layer fold's held-out error where the next ops read the layer output (``models.judge``),
    folded and not, each tensor's relative to its FP32 energy, gathered batch by batch."""

    def __init__(self, models: _BlockModels):
        self.q, self.fp = Runner(models.judge.proto), Runner(models.fp_judge.proto)
        self.pairs = list(zip(models.judge.outputs, models.fp_judge.outputs))
        self.sums = np.zeros((3, len(self.pairs)))  # per tensor: folded error, unfolded error, FP32 energy

    def add(self, stream: _Stream, i: int, size: int, rows: np.ndarray, pool: dict[str, np.ndarray], output: str,
            unfolded: np.ndarray, folded: np.ndarray) -> None:
        if not rows.size:
            return
        reference = self.fp({**pool, **stream.load("fp32", i)})
        runs = self.q({**pool, output: folded}), self.q({**pool, output: unfolded})
        for t, (name, fp_name) in enumerate(self.pairs):
            axis = next((a for a, n in enumerate(reference[fp_name].shape) if n == size), None)
            if axis is None and size != 1:  # no samples axis to take the held-out rows from: not judged there
                continue
            ref = _held(reference[fp_name], rows, axis).astype(np.float64)
            errors = [np.square(ref - _held(run[name], rows, axis)).sum() for run in runs]
            self.sums[:, t] += [*errors, np.square(ref).sum()]

    def ratio(self) -> float:
        folded, unfolded, energy = self.sums
        judged = energy > 0
        before = float((unfolded[judged] / energy[judged]).sum())
        return float((folded[judged] / energy[judged]).sum()) / before if before > 0 else 1.0


class _ContextSource:
    """Values the sub-models need from outside themselves, computed once per batch."""

    def __init__(self, fp: ir.Model, q: ir.Model, models: list[_BlockModels]):
        subs = [sub for m in models for sub in (m.fp, m.q, m.lead_in, m.tail, m.fold_site, m.fp_lead_in, m.judge, m.fp_judge)
                if sub]
        needed = {name for sub in subs for name in sub.context}
        fp_names = g.values_by_name(fp.graph)
        from_fp = sorted(n for n in needed if n in fp_names)
        from_q = sorted(needed - set(from_fp))
        self.runners = [Runner(ex.context_model(model, names).proto) for model, names in ((fp, from_fp), (q, from_q)) if names]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values: dict[str, np.ndarray] = {}
        for runner in self.runners:
            values.update(runner(feeds))
        return values


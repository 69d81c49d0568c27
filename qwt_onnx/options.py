"""The options of a run: typed, validated once, shared by the command line, the API and the report."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import re
import typing

from qwt_onnx.errors import InputError


class Choice(str, enum.Enum):
    """An option's named values; each compares equal to its string."""

    def __str__(self) -> str:
        return self.value


class Target(Choice):
    ORT = "ort"  # onnxruntime: uint8 asymmetric activations
    TRT = "trt"  # TensorRT: int8 symmetric activations, zero point 0


class CalibMethod(Choice):
    AUTO = "auto"  # min-max, percentile and MSE, the best on held-out samples
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"  # per tensor, the clipping with the least squared quantization error
    ENTROPY = "entropy"  # TensorRT's KL threshold

    @classmethod
    def methods(cls) -> tuple[CalibMethod, ...]:
        """The methods ``auto`` chooses from. Not entropy: its PTQ was the furthest from FP32 of
        the four on every zoo model (3.5 dB against 17.6 for MSE on PP-OCRv6 rec), and it never
        gave the best QwT either; MSE, which aims at the error that SQNR measures, took its place."""
        return (cls.MINMAX, cls.PERCENTILE, cls.MSE)


class Granularity(Choice):
    LAYER = "layer"  # one block per transformer layer or residual stage
    RESIDUAL = "residual"  # one block per residual branch


class Residuals(Choice):
    AUTO = "auto"  # int8 where held-out samples show no loss by it beyond noise (QwT fitted again on them), else float
    FLOAT = "float"  # a residual stream quantized only for the weighted ops that read it
    INT8 = "int8"  # ... for every reader: the residual Adds run in integer kernels


class Compensation(Choice):
    # the layer folds of AFFINE where they gain, then per block the fold where it removes --min-gain and nearly all a
    # branch would, else the branch, within --max-slowdown
    AUTO = "auto"
    BRANCH = "branch"  # QwT: a linear branch in parallel to each block
    AFFINE = "affine"  # QwT-v2's channel-wise affine, folded into every quantized weighted op: no new nodes


class FitError(Choice):
    AUTO = "auto"  # the better on QwT's trial
    OWN = "own"  # each block's own error: the FP32 block on the quantized block's input (QwT)
    WHOLE = "whole"  # the block output's error against the FP32 model's own activation, inherited error included


class BranchPrecision(Choice):
    INT8 = "int8"
    FLOAT = "float"


class WeightRange(Choice):
    PORTABLE = "portable"  # no x86 CPU's int16 pair sums can saturate
    FULL = "full"  # [-127, 127]


class BiasCorrection(Choice):
    AUTO = "auto"  # with and without, the better on held-out samples
    ON = "on"
    OFF = "off"


class Rounding(Choice):
    AUTO = "auto"  # with and without error feedback, the better on held-out samples
    NEAREST = "nearest"
    GPTQ = "gptq"  # error feedback from each rounded input column to the rest (Frantar et al., 2023)


class Equalization(Choice):
    AUTO = "auto"  # with and without, the better on held-out samples
    ON = "on"
    OFF = "off"


WEIGHT_BITS = (8, 6, 4)
ACTIVATION_BITS = (8, 16, 6, 4)
# --float-stem auto leaves no more than this share of the quantized ops' multiply-accumulates in
# float: MTCNN's ONet gained 2.9 dB held out with its first two convolutions in float, which hold
# 77% of its MACs, and ran 1.28x slower than FP32 instead of 1.02x at batch 1.
MAX_FLOAT_STEM_MACS = 0.1
# ... and only for a held-out gain of at least this much (a fifth less error energy): MiniLM's first
# layer's Q/K/V in float gained 0.14 dB, beyond noise, for 8% of its MACs.
MIN_FLOAT_STEM_GAIN_DB = 1.0


def _option(default, help: str, flag: str | None = None, metavar: str | None = None):
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "metavar": metavar})


@dataclasses.dataclass(frozen=True)
class Options:
    """What to quantize and how; every field is also a command-line option (``--samples``, ...).

    Strings are accepted where a field is a :class:`Choice` and comma-separated strings where it
    is a tuple; a bad value raises :class:`InputError` naming the option and its valid values.
    """

    samples: int = _option(512, "calibration samples to use")
    batch_size: int = _option(16, "samples per onnxruntime run")
    qwt: bool = _option(True, "write the plain post-training-quantized model", flag="--no-qwt")
    calib_method: CalibMethod = _option(CalibMethod.AUTO, "activation range calibration; auto: the best on held-out samples")
    target: Target = _option(Target.ORT, "ort: uint8 asymmetric activations; trt: int8 symmetric, zero point 0")
    weight_bits: int = _option(
        8, "bits of the per-channel symmetric weights: 8 (int8), 6 (int8 holding -31..31) or 4 (int4, opset 21)", metavar="B",
    )
    block_size: int = _option(
        0, "with --weight-bits 4: a MatMul's [K, N] weight gets one scale per block of this many rows of K (a power "
        "of 2 from 16; onnxruntime runs it as MatMulNBits); 0: one scale per output channel", metavar="N",
    )
    activation_bits: int = _option(
        8, "bits of the per-tensor activations: 8, 16 (uint16/int16, opset 21, as NPU toolchains write them), 6 or 4 "
        "(uint8/int8 narrowed by a Clip between QuantizeLinear and DequantizeLinear); onnxruntime's CPU runs only 8 "
        "bits in integer kernels", metavar="B",
    )
    blocks: tuple[str, ...] = _option((), "override block discovery: boundary tensors T1,T2,... or pairs in:out,...")
    granularity: Granularity = _option(Granularity.LAYER, "one compensation per transformer layer or per residual branch")
    units: bool = _option(
        False, "experimental: cut a block that no linear branch maps (a detector's neck flattened into its head, an "
        "upsampling head) into its weighted units, one branch per weighted op with its activation",
    )
    groups_factor: int = _option(64, "input channels per group of a feature-map branch; 0 for one group", metavar="C")
    kernel_size: int = _option(1, "kernel size of a feature-map branch, odd (1: a 1x1 conv)", metavar="K")
    compensation: Compensation = _option(
        Compensation.AUTO,
        "branch: a linear branch beside each block (QwT); affine: a per-channel scale and shift of every quantized "
        "Conv/Gemm/MatMul's output, fitted layer by layer to the FP32 model's and folded into its weight scales and bias "
        "(QwT-v2), no added nodes or latency, written where held-out samples show a gain; auto: per block, a fold "
        "into the block's last weighted op or normalization where it removes at least --min-gain of the block's held-out "
        "error and 0.95 of what a branch would, else the branch (within --max-slowdown), fitted on the layer folds of "
        "affine where those gain",
    )
    fit_error: FitError = _option(
        FitError.AUTO,
        "what each compensation is fitted to remove: own, its block's own error (the FP32 block run on the "
        "quantized block's input, as QwT fits it); whole, the block output's whole error against the FP32 model's "
        "own activation, the error inherited from earlier blocks included; auto: the better on QwT's trial",
    )
    branch_precision: BranchPrecision = _option(
        BranchPrecision.INT8,
        "int8: branches run in integer kernels (QLinearConv, MatMulIntegerToFloat); float: float MatMul/Conv",
    )
    branch_rank: str = _option(
        "auto", "rank of a token branch (MatMul/Gemm): auto (the lowest of 4, 8, 16, ... that keeps 0.95 of the full "
        "branch's held-out error reduction and costs at most half as much; else full), full, or a number", metavar="R",
    )
    max_slowdown: float = _option(
        1.02, "with --compensation auto, --target ort and 8-bit weights and activations, give QwT's branches only to "
        "blocks whose branches keep onnxruntime's run of the model on this CPU within this many times its run without "
        "them (profiled at batch 1 and 16; those that remove the least of their block's error per time left out "
        "first); --compensation branch keeps them all", metavar="X",
    )
    # on ocr-rec (128 samples) dropping the branches under 10% raised SQNR 17.1 -> 17.7 dB and cut latency
    min_gain: float = _option(
        0.1, "keep a branch only if it removes at least this share of its block's held-out error (with --compensation "
        "auto, a fold too)", metavar="F")
    residuals: Residuals = _option(
        Residuals.AUTO,
        "float: a residual stream (the output of an Add of two computed tensors, or of its Relu) is quantized only "
        "for the weighted ops that read it, and its Adds run in float (as do the SiLUs, x * Sigmoid(x), hard-swishes, "
        "x * HardSigmoid(x), and channel gates, x * HardSigmoid(s) of one value per channel, after convolutions), "
        "which keeps QwT's corrections; "
        "int8: for every reader too (the shortcut, through a MaxPool or channel Pad), a Relu after the Add taken into "
        "the quantizer, and with --target ort (activations of 8 bits or fewer) a SiLU's, hard-swish's or gate's "
        "Sigmoid (HardSigmoid) and product quantized, so that onnxruntime runs the Adds (and a HardSigmoid, written "
        "as an Add) as QLinearAdd and the products as QLinearMul "
        "(faster); auto: int8 unless held-out samples "
        "show the model losing 0.5 dB or more by them beyond noise (where QwT is written, QwT fitted again on the "
        "quantized streams against QwT on float ones), else float",
    )
    exclude_nodes: tuple[str, ...] = _option(
        (), "Conv/MatMul/Gemm nodes to leave in float: names or regular expressions (whole-name match), comma-separated",
        metavar="NAMES",
    )
    exclude_op_types: tuple[str, ...] = _option(
        (), "op types to leave in float, e.g. Gemm (regular expressions, comma-separated)", metavar="TYPES"
    )
    weight_range: WeightRange | None = _option(
        None,
        "portable: int8 weights scaled so that onnxruntime's x86 kernels without VNNI (AVX2, AVX-512 without VNNI) "
        "cannot saturate (the default with --target ort); full: [-127, 127], exact only on VNNI x86, ARM and GPUs "
        "(the default with --target trt)",
    )
    outputs: tuple[str, ...] = _option(
        (), "graph outputs whose held-out SQNR to FP32 decides (the worst of them), comma-separated; a part of "
        "one as NAME[INDEX], numpy-style with the samples' axis first (a detector's class scores: output0[:, 4:]); "
        "default: every float output, one that a Concat of different ops builds scored part by part, and in place "
        "of those computed from selections what the selecting ops read (a NonMaxSuppression's boxes and scores; "
        "a max-pool NMS's heat map, an atan2's operands: comparisons and Sign after the last weighted op)", metavar="NAMES",
    )
    check_outputs: bool = _option(
        False, "experimental: keep a branch only where it also brings the held-out outputs closer to FP32 (each "
        "block's check runs the rest of the network on the held-out samples)",
    )
    bias_correction: BiasCorrection = _option(
        BiasCorrection.AUTO,
        "subtract each weight's mean rounding error in its op's bias: auto (where it scores better on held-out "
        "samples, decided apart for PTQ and for QwT), on or off",
    )
    rounding: Rounding = _option(
        Rounding.AUTO,
        "weight rounding: nearest, or gptq (each weight's rounding error fed forward to the weights of its output "
        "channel not yet rounded, by its op's input statistics; same grid, same graph), or auto (the better on "
        "held-out samples)",
    )
    equalization: Equalization = _option(
        Equalization.AUTO,
        "channel equalization: per-channel scales moved from activations into the weights that read them where "
        "the op before can take the inverse (SmoothQuant after a LayerNorm or dense layer, cross-layer equalization "
        "between convolutions; no node added), by how much chosen per activation; auto (where it scores better on "
        "held-out samples), on or off",
    )
    float_stem: str = _option(
        "auto",
        "the quantized weighted ops nearest the inputs that stay in float, by depth: 1 the first on each path from "
        "an input (a stem convolution, the Q/K/V of a first layer), 2 those and the next ones; auto: 0, 1 or 2, a "
        "deeper one only where held-out samples show it beats the shallower by 1 dB and beyond noise, its ops holding "
        "at most 10%% of the MACs (float ops cost latency)",
        metavar="D",
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(Options)
        for field in dataclasses.fields(self):
            value = _coerce(getattr(self, field.name), hints[field.name], _flag(field))
            object.__setattr__(self, field.name, value)
        _check(self.samples >= 1, f"--samples must be at least 1, got {self.samples}")
        _check(self.weight_bits in WEIGHT_BITS, f"--weight-bits must be one of {', '.join(map(str, WEIGHT_BITS))}, got {self.weight_bits}")
        _check(self.block_size == 0 or (self.block_size >= 16 and self.block_size & (self.block_size - 1) == 0),
               f"--block-size must be 0 or a power of 2 from 16, got {self.block_size}")
        _check(self.block_size == 0 or self.weight_bits == 4, "--block-size needs --weight-bits 4 (blocked int8 weights have no fused kernel)")
        _check(self.activation_bits in ACTIVATION_BITS,
               f"--activation-bits must be one of {', '.join(map(str, ACTIVATION_BITS))}, got {self.activation_bits}")
        _check(not (self.target == Target.TRT and self.activation_bits == 16),
               "--activation-bits 16 has no TensorRT form (it takes 8-bit activations); use --target ort for NPU toolchains")
        _check(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        _check(self.groups_factor >= 0, f"--groups-factor must be 0 (one group) or more, got {self.groups_factor}")
        _check(self.kernel_size >= 1 and self.kernel_size % 2 == 1, f"--kernel-size must be a positive odd number, got {self.kernel_size}")
        _check(self.branch_rank in ("auto", "full") or (self.branch_rank.isdigit() and int(self.branch_rank) >= 1),
               f"--branch-rank must be auto, full or a positive integer, got {self.branch_rank!r}")
        _check(self.float_stem == "auto" or self.float_stem.isdigit(),
               f"--float-stem must be auto or a depth 0, 1, 2, ..., got {self.float_stem!r}")
        _check(self.max_slowdown >= 1.0, f"--max-slowdown must be at least 1 (a factor of the run time), got {self.max_slowdown}")
        _check(0.0 <= self.min_gain < 1.0, f"--min-gain must be at least 0 and below 1 (a share of a block's error), got {self.min_gain}")
        for flag, patterns in (("--exclude-nodes", self.exclude_nodes), ("--exclude-op-types", self.exclude_op_types)):
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise InputError(f"{flag}: {pattern!r} is not a valid regular expression ({exc}); escape it or fix it") from None

    @property
    def weights(self) -> WeightRange:
        """The weight range asked for, or the target's default: portable for onnxruntime, whose
        x86 kernels without VNNI saturate on full-range weights; full for TensorRT."""
        if self.weight_range is not None:
            return self.weight_range
        return WeightRange.PORTABLE if self.target == Target.ORT else WeightRange.FULL

    @property
    def rank(self) -> int | None:
        """``--branch-rank`` as capture takes it: None full, 0 auto, else the rank."""
        if self.branch_rank.isdigit():
            return int(self.branch_rank)
        return 0 if self.branch_rank == "auto" else None

    @property
    def stem_depth(self) -> int | None:
        """``--float-stem`` as the search takes it: None auto, else the depth."""
        return None if self.float_stem == "auto" else int(self.float_stem)

    def replace(self, **changes) -> Options:
        """These options with ``changes`` (field names), validated."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One command-line option per field of :class:`Options`; only those given are set
    (``argparse.SUPPRESS``), so that :class:`Options` keeps its defaults for the rest."""
    hints = typing.get_type_hints(Options)
    for field in dataclasses.fields(Options):
        kind, flag, meta = hints[field.name], _flag(field), field.metadata
        default = field.default.value if isinstance(field.default, Choice) else field.default
        help_text = meta["help"] + ("" if kind is bool or default in (None, ()) else f" (default {default})")
        common = {"dest": field.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            parser.add_argument(flag, action="store_false" if field.default else "store_true", **common)
            continue
        choices = _choice_type(kind)
        if choices is not None:
            parser.add_argument(flag, choices=[c.value for c in choices], **common)
        else:
            parser.add_argument(flag, metavar=meta["metavar"], type=str if _is_tuple(kind) else kind, **common)


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _coerce(value, kind, flag: str):
    choices = _choice_type(kind)
    if value is None and type(None) in typing.get_args(kind):
        return None
    if choices is not None:
        try:
            return choices(value)
        except ValueError:
            raise InputError(f"unknown {flag} {value!r}; choose from {', '.join(c.value for c in choices)}") from None
    if _is_tuple(kind):
        # commas inside brackets belong to an item (an output part's index, a character class)
        items = re.split(r",(?![^\[]*\])", value) if isinstance(value, str) else (value or ())
        return tuple(str(item) for item in items if item)
    if kind is bool:
        return bool(value)
    if kind in (float, str) and isinstance(value, int) and not isinstance(value, bool):
        return kind(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InputError(f"{flag} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    return value


def _choice_type(kind) -> type[Choice] | None:
    for candidate in (kind, *typing.get_args(kind)):
        if isinstance(candidate, type) and issubclass(candidate, Choice):
            return candidate
    return None


def _is_tuple(kind) -> bool:
    return typing.get_origin(kind) is tuple


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)

"""What the steps of one run share: the FP32 model, the calibration set, the options, where
Q/DQ pairs go and the FP32 reference outputs the held-out scores are taken against."""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np
import onnx_ir as ir

from qwt_onnx import observe
from qwt_onnx.analysis import capture
from qwt_onnx.analysis.placement import Exclusions, Placement, log_front_end, place
from qwt_onnx.calibration import CalibrationSet
from qwt_onnx.graph import prepare
from qwt_onnx.graph import query as g
from qwt_onnx.numerics.metrics import Score
from qwt_onnx.options import BranchPrecision, Options, Residuals, Target, WeightRange
from qwt_onnx.options import Compensation as CompensationKind
from qwt_onnx.runtime import Runner, samples_axes, with_outputs

logger = logging.getLogger("qwt_onnx")
LATENCY_BATCH = 16  # the larger batch a written model's run time is weighed at, besides 1


class Warnings(list):
    """The run's warnings, logged as they come, each once."""

    def warn(self, message: str) -> None:
        if message not in self:
            self.append(message)
            logger.warning(message)


@dataclasses.dataclass
class Run:
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
        return place(self.fp.graph, self.options.target, self.excluded, self.int8_residuals, self.int8_silus)

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
    def variants_observed(self) -> list[str]:
        """The tensors that the placements of the variants tried quantize and :attr:`placement` does
        not: what the first ops after a float stem read, and with ``--residuals auto`` a SiLU's Sigmoid."""
        depth = self.options.stem_depth
        depths = (0, 1, 2) if depth is None else (0, depth)
        streams = {self.int8_residuals, self.options.residuals == Residuals.AUTO}
        placements = [place(self.fp.graph, self.options.target, self.stem_excluded(d), int8, int8 and self.silus_fuse)
                      for d in depths for int8 in streams]
        names = {n for placement in placements for n in placement.observed_names}
        return sorted(names - set(self.placement.observed_names))

    @functools.cached_property
    def readable(self) -> dict[str, tuple[float, float]]:
        """The quantized tensors whose readers all saturate, and the values they tell apart."""
        return self.placement.readable_intervals(self.options.activation_bits)

    @property
    def int8_residuals(self) -> bool:
        return self.options.residuals == Residuals.INT8

    @property
    def silus_fuse(self) -> bool:
        """Whether quantized SiLUs and hard-swishes would run in integer kernels: onnxruntime has
        QLinearSigmoid, QLinearAdd and QLinearMul for 8-bit tensors (also where a Clip narrows them to 4
        or 6 bits), not 16-bit ones."""
        return self.options.activation_bits <= 8

    @property
    def int8_silus(self) -> bool:
        return self.int8_residuals and self.silus_fuse

    @functools.cached_property
    def _float_streams(self) -> Placement:
        """The placement of ``--residuals float``, which the counts below compare against."""
        return place(self.fp.graph, self.options.target, self.excluded)

    @functools.cached_property
    def residual_streams(self) -> int:
        """The residual streams that ``--residuals float`` leaves float for some readers, which
        ``int8`` quantizes for all."""
        quantized = place(self.fp.graph, self.options.target, self.excluded, int8_residuals=True)
        readers = {site.value: len(site.readers) for site in self._float_streams.activations}
        own = [site for site in quantized.activations if site.value is site.observed or site.absorbed is not None]  # not a pool's
        return sum(site.observed in readers and len(site.readers) > readers[site.observed] for site in own)

    @functools.cached_property
    def silu_gates(self) -> int:
        """The SiLUs, hard-swishes and channel gates that ``--residuals float`` leaves in float, which ``int8`` runs on uint8."""
        return len(self._gates())

    @functools.cached_property
    def hard_swishes(self) -> int:
        """Of :attr:`silu_gates`, the hard-swishes."""
        return sum(map(g.is_hard_swish_gate, self._gates()))

    @functools.cached_property
    def gates_beside_float_hard_swishes(self) -> int:
        """The SiLUs and channel gates that run on uint8 where the hard-swishes stay float (not those
        that scale a hard-swish's product, as MobileNetV3's squeeze-excitations do)."""
        return len(self._gates(float_hard_swishes=True))

    def _gates(self, float_hard_swishes: bool = False) -> list[ir.Value]:
        quantized = place(self.fp.graph, self.options.target, self.excluded, int8_silus=self.silus_fuse,
                          float_hard_swishes=float_hard_swishes)
        added = {site.value for site in quantized.activations} - {site.value for site in self._float_streams.activations}
        return [value for value in added if value.producer() is not None and value.producer().op_type in g.GATE_OPS]

    @property
    def excluded(self) -> Exclusions:
        return Exclusions(self.options.exclude_nodes, self.options.exclude_op_types, frozenset(self.log_front_end))

    def stem_excluded(self, depth: int) -> Exclusions:
        """:attr:`excluded`, and the weighted ops nearest the inputs up to ``depth`` (see ``--float-stem``)."""
        stem = set(self.placement.stem(self.fp.graph, depth))
        return dataclasses.replace(self.excluded, kept_float=self.excluded.kept_float | stem)

    @property
    def latency_batches(self) -> list[int]:
        """The batch sizes a written model's run time is weighed at: the one its batch dimension
        is fixed to, else 1 and 16 (as many as the model and the calibration set allow)."""
        fixed = self.fp.meta.get("fixed_batch")
        if fixed:
            return [fixed] if fixed <= self.calib.num_samples else []
        return sorted({1, min(LATENCY_BATCH, self.batch_size, self.calib.num_samples)})

    def branch_options(self, whole_error: bool = False) -> capture.BranchOptions:
        """The compensations asked for, fitted to the whole error or to each block's own."""
        o = self.options
        return capture.BranchOptions(
            o.kernel_size, o.groups_factor, o.branch_precision == BranchPrecision.INT8, o.min_gain,
            o.weights == WeightRange.PORTABLE, o.target == Target.TRT, o.compensation != CompensationKind.BRANCH,
            o.compensation != CompensationKind.AFFINE, o.activation_bits, o.rank, whole_error,
            max_macs=sum(self.compute_macs.values()) or None,
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
        return observe.heldout_score(prepare.to_proto(model), calib, self.batch_size, self._scoring_reference(calib),
                                     self.options.outputs, description)

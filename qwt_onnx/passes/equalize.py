"""Move per-channel scales from activations into the weights that read them: the model
computes the same function, its activations quantize with less error (see
:mod:`qwt_onnx.analysis.equalization` for where, :mod:`qwt_onnx.numerics.equalization` for how
far). Only constants change: no node is added, so latency is that of the model before."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qwt_onnx.analysis.equalization import channel_groups


class EqualizeChannelsPass(ir.passes.InPlacePass):
    """For each channel group whose tensor is named in ``scales``: the producer's and the
    chain's constants divided by s per channel, the consumers' weights multiplied by s (a
    constant in two groups, a Conv between two others, takes both)."""

    def __init__(self, scales: Mapping[str, np.ndarray]):
        super().__init__()
        self.scales = scales

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        factors: dict[ir.Value, np.ndarray] = {}
        for group in channel_groups(model.graph):
            scales = self.scales.get(group.tensor.name)
            if scales is None:
                continue
            for constant in group.constants:
                factor = np.asarray(scales, dtype=np.float64)[constant.channel_of_entries()] ** constant.power
                factors[constant.value] = factors.get(constant.value, 1.0) * factor
        for value, factor in factors.items():
            array = value.const_value.numpy()
            value.const_value = ir.tensor((array * factor).astype(array.dtype), name=value.name)
        return ir.passes.PassResult(model, modified=bool(factors))

"""onnxruntime sessions, as deployment runs them (CPU, all graph optimizations)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort


def session(model: onnx.ModelProto | bytes | str, optimized_model: str | None = None, **config: str) -> ort.InferenceSession:
    """A CPU session with ORT_ENABLE_ALL, so quantized ops run in onnxruntime's INT8 kernels;
    ``optimized_model``: where to write the graph it runs; ``config``: session config entries."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Between runs numpy does the solver's work on the same cores; spinning ORT threads would
    # starve it (and it them): measured 1.7x slower block runs with spinning on 2 cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    if optimized_model is not None:
        options.optimized_model_filepath = optimized_model
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class Runner:
    """A session that takes its feeds from a pool of named arrays."""

    def __init__(self, model: onnx.ModelProto | bytes | str):
        self.session = session(model)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, pool: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: pool[name] for name in self.input_names}
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))


def run_in_batches(model: onnx.ModelProto | bytes | str, feeds: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """``model``'s outputs on ``feeds`` (samples on axis 0), run ``batch_size`` samples at a time
    and concatenated on axis 0."""
    runner = Runner(model)
    count = len(next(iter(feeds.values())))
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, count, batch_size):
        for name, value in runner({k: v[start : start + batch_size] for k, v in feeds.items()}).items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the intermediate values ``names``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output} | {i.name for i in copy.graph.input}
    for name in names:
        if name not in present:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return copy

"""Latency and INT8 coverage of ONNX models on onnxruntime's CPU provider.

    python tools/speed.py a.onnx b.onnx ... --calib eval.npz

Latency: every model gets its own session (all graph optimizations, default threading, as
deployed); the models are then timed in interleaved rounds, so that a slow spell of a shared
machine hits all of them alike, and each model's figure is the median over rounds of the
round's median run.

INT8 share: one profiled run lists every kernel onnxruntime executed with its input shapes;
the multiply-accumulates of each matrix kernel follow from those shapes, and the share is
the part that ran in integer kernels (QLinearConv, QLinearMatMul, MatMulIntegerToFloat,
QGemm, ConvInteger, MatMulInteger, DynamicQuantizeMatMul).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

from qwt_onnx.graph.query import RECURRENT_GATES  # gates per hidden unit; a weight W is [directions, gates x hidden, inputs]
from qwt_onnx.runtime import count_samples, samples_axes, take

INTEGER_KERNELS = {"QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "ConvInteger",
                   "MatMulInteger", "DynamicQuantizeMatMul"}
# Where each matrix kernel's weight (or second operand) sits among its inputs.
SECOND_OPERAND = {"Conv": 1, "FusedConv": 1, "NhwcFusedConv": 1, "ConvInteger": 1, "QLinearConv": 3,
                  "MatMul": 1, "FusedMatMul": 1, "MatMulInteger": 1, "MatMulIntegerToFloat": 1,
                  "DynamicQuantizeMatMul": 1, "QLinearMatMul": 3, "Gemm": 1, "QGemm": 3, "ConvTranspose": 1,
                  "LSTM": 1, "GRU": 1, "RNN": 1}
CONVOLUTIONS = {"Conv", "FusedConv", "NhwcFusedConv", "ConvInteger", "QLinearConv", "ConvTranspose"}
# onnxruntime runs float convolutions in its NCHWc layout (the node named after the output it computes and
# this) with the channels padded to the vector width: basic-pitch's 1-channel downsampling filters profile
# as 16 channels, and its float front end's MACs as 5.5 times what the model computes
NCHWC_SUFFIX = "_nchwc"


def session(model: str, profile_in: str | None = None) -> ort.InferenceSession:
    """A deployment session; with ``profile_in``, profiled and its optimized graph saved there."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if profile_in is not None:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_in, "profile")
        options.optimized_model_filepath = os.path.join(profile_in, "optimized.onnx")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def batch_of(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], batch: int, axes: dict[str, int | None]) -> dict[str, np.ndarray]:
    """The session's inputs, ``batch`` samples each on their samples axis (``axes``), repeating
    the given ones if fewer."""
    wanted = {i.name: feeds[i.name] for i in sess.get_inputs()}
    repeated = take(wanted, axes, np.arange(batch) % count_samples(wanted, axes))
    return {k: np.ascontiguousarray(v) if v.ndim else v for k, v in repeated.items()}


def latencies_ms(models: dict[str, str], feeds: dict[str, np.ndarray], batch: int, rounds: int,
                 runs: int) -> dict[str, float]:
    """Median latency per model: ``rounds`` interleaved rounds of ``runs`` runs each."""
    sessions = {key: session(path) for key, path in models.items()}
    inputs = {key: batch_of(sess, feeds, batch, samples_axes(models[key])[0]) for key, sess in sessions.items()}
    for key, sess in sessions.items():
        sess.run(None, inputs[key])  # warm-up: memory arenas, lazy kernel set-up
    per_round = collections.defaultdict(list)
    keys = list(sessions)
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:  # rotate who goes first
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                sessions[key].run(None, inputs[key])
                times.append(time.perf_counter() - start)
            per_round[key].append(np.median(times))
    return {key: 1000.0 * float(np.median(values)) for key, values in per_round.items()}


def kernel_macs(op: str, inputs: list[list[int]], outputs: list[list[int]], weight: list[int] | None) -> int:
    """Multiply-accumulates of one executed matrix kernel, from its shapes.

    A prepacked weight is missing from the profiler's input shapes, so a convolution's
    ``weight`` shape comes from the optimized graph; a matrix product's inner dimension is
    its first operand's last axis.
    """
    if op in RECURRENT_GATES:  # time-major X [T, batch, inputs]: per step and direction, gates x hidden x (inputs + hidden)
        if not weight:
            return 0
        steps, batch = inputs[0][:2]
        directions, rows, width = weight
        return steps * batch * directions * rows * (width + rows // RECURRENT_GATES[op])
    out = int(np.prod(outputs[0], dtype=np.int64))
    if op == "ConvTranspose":  # every input pixel scatters through the weight's [C_out / groups, k...]
        return int(np.prod(inputs[0], dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64)) if weight else 0
    if op in CONVOLUTIONS:
        return out * int(np.prod(weight[1:], dtype=np.int64)) if weight else 0
    return out * inputs[0][-1]


def _weight_shapes(model: str, by_output: bool = False) -> dict[str, list[int]]:
    """Node name (or with ``by_output`` its first output's) -> shape of its constant second operand,
    in a model's graph (the one given, or onnxruntime's optimized one) and the If, Loop and Scan
    bodies in it (an LSTM inside an If's branches runs there too)."""
    graphs = [onnx.load(model, load_external_data=False).graph]
    shapes, found = {}, {}
    while graphs:
        graph = graphs.pop()
        shapes.update((i.name, list(i.dims)) for i in graph.initializer)
        constants = [(n.output[0], a.t) for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
        shapes.update((name, list(tensor.dims)) for name, tensor in constants)
        for node in graph.node:
            graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
            graphs += [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]
            if node.op_type in SECOND_OPERAND and len(node.input) > SECOND_OPERAND[node.op_type]:
                found[node.output[0] if by_output else node.name] = node.input[SECOND_OPERAND[node.op_type]]
    return {name: shapes.get(weight) for name, weight in found.items()}


def profile(model: str, feeds: dict[str, np.ndarray], batch: int = 1, runs: int = 3) -> list[dict]:
    """The kernels a run executes: op type, node name, MACs of matrix kernels, and microseconds
    (the least of ``runs`` runs after a warm-up one, so that a busy moment does not count)."""
    with tempfile.TemporaryDirectory() as folder:
        sess = session(model, folder)
        inputs = batch_of(sess, feeds, batch, samples_axes(model)[0])
        for _ in range(1 + runs):
            sess.run(None, inputs)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
        weights = _weight_shapes(os.path.join(folder, "optimized.onnx"))
    own_weights = _weight_shapes(model, by_output=True)
    kernels, seen = {}, collections.Counter()
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        seen[event["name"]] += 1
        if seen[event["name"]] == 1:  # the warm-up run
            continue
        args = event["args"]
        op = args["op_name"]
        shapes = lambda key: [next(iter(d.values())) for d in args.get(key, [])]  # noqa: E731
        name = event["name"][: -len("_kernel_time")]
        macs = 0
        if op in SECOND_OPERAND:
            outputs, weight = shapes("output_type_shape"), weights.get(name)
            own = own_weights.get(name.removesuffix(NCHWC_SUFFIX)) if name.endswith(NCHWC_SUFFIX) else None
            if own and outputs:  # the model's own channels, not the padded ones
                outputs, weight = [[outputs[0][0], own[0], *outputs[0][2:]]], own
            macs = kernel_macs(op, shapes("input_type_shape"), outputs, weight)
        previous = kernels.get(name)
        kernels[name] = {"op": op, "macs": macs, "us": min(event["dur"], previous["us"]) if previous else event["dur"]}
    return [{"node": name, **k} for name, k in kernels.items()]


def int8_share(kernels: list[dict]) -> float:
    """The share of the matrix multiply-accumulates that ran in integer kernels."""
    total = sum(k["macs"] for k in kernels)
    integer = sum(k["macs"] for k in kernels if k["op"] in INTEGER_KERNELS)
    return integer / total if total else 0.0


def by_op(kernels: list[dict]) -> dict[str, dict]:
    """Per op type: kernel count, MACs and microseconds, the most time first."""
    totals = collections.defaultdict(lambda: {"kernels": 0, "macs": 0, "us": 0})
    for k in kernels:
        row = totals[k["op"]]
        row["kernels"] += 1
        row["macs"] += k["macs"]
        row["us"] += k["us"]
    return dict(sorted(totals.items(), key=lambda item: -item[1]["us"]))


def summary(kernels: list[dict]) -> str:
    """``by_op`` as a text table."""
    rows = by_op(kernels)
    total_us = sum(r["us"] for r in rows.values()) or 1
    lines = [f"{'op':<24}{'kernels':>8}{'GMAC':>10}{'ms':>9}{'time %':>8}"]
    for op, r in rows.items():
        lines.append(f"{op:<24}{r['kernels']:>8}{r['macs'] / 1e9:>10.3f}{r['us'] / 1000:>9.2f}{100 * r['us'] / total_us:>8.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--calib", required=True, help=".npz of model inputs (samples on each input's samples axis)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kernels", action="store_true", help="print each model's kernel summary")
    args = parser.parse_args()
    with np.load(args.calib) as data:
        feeds = take({k: data[k] for k in data.files}, samples_axes(args.models[0])[0], slice(None, 16))
    times = latencies_ms({m: m for m in args.models}, feeds, args.batch, args.rounds, args.runs)
    base = times[args.models[0]]
    for model in args.models:
        kernels = profile(model, feeds, args.batch)
        print(f"{model}: {times[model]:.2f} ms ({times[model] / base:.2f}x), INT8 MAC share {int8_share(kernels):.1%}, "
              f"{len(kernels)} kernels")
        if args.kernels:
            print(summary(kernels))


if __name__ == "__main__":
    main()

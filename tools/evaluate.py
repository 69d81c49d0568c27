"""Fidelity of quantized models to FP32 on a zoo model's evaluation images.

    python tools/evaluate.py vit-s out-ptq.onnx out-qwt.onnx

prints, per model, the output SQNR (dB), cosine similarity to the FP32
model (and of each part of an output the entry's task needs) and its task metric on the zoo entry's evaluation set, which no calibration ever sees, and
for every model after the first its SQNR gain over the first with a 95%
paired-bootstrap interval (how much the gain depends on which samples were
drawn: output errors are heavy-tailed, so a few tenths of a dB can be noise).
"""

from __future__ import annotations

import argparse

import numpy as np

from qwt_onnx import zoo
from qwt_onnx.numerics import metrics
from qwt_onnx.runtime import run_in_batches, samples_axes


def cosine(reference: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> float:
    a = np.concatenate([v.astype(np.float64).ravel() for v in reference.values()])
    b = np.concatenate([test[k].astype(np.float64).ravel() for k in reference])
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo_name", choices=sorted(zoo.ENTRIES))
    parser.add_argument("models", nargs="+", help="quantized models of that zoo entry")
    args = parser.parse_args()
    entry, prepared = zoo.get(args.zoo_name), zoo.prepare(args.zoo_name)
    feeds, labels = zoo.load_evaluation(prepared)
    axes = samples_axes(prepared.model)[1]

    def outputs_of(model: str) -> dict[str, np.ndarray]:  # samples on axis 0, as metrics.score takes them
        return {name: np.moveaxis(value, axes[name], 0) for name, value in run_in_batches(model, feeds, 16).items()}

    reference = outputs_of(prepared.model)
    print(f"{args.zoo_name}: {len(next(iter(reference.values())))} evaluation samples")
    if entry.task_metric is not None and labels is not None:
        print(f"  FP32: {entry.metric_name} {entry.task_metric(entry.metric_input(reference), labels):.4f}")
    first = None
    for path in args.models:
        test = outputs_of(path)
        score = metrics.score(reference, test, entry.outputs)
        line = f"  {path}: SQNR {metrics.sqnr_db(reference, test):.2f} dB, cosine {cosine(reference, test):.5f}"
        if entry.outputs:
            line += "".join(f", {label} {score.outputs_db[label]:.2f} dB" for label in entry.outputs)
        if entry.task_metric is not None and labels is not None:
            line += f", {entry.metric_name} {entry.task_metric(entry.metric_input(test), labels):.4f}"
        if first is None:
            first = score
        else:
            interval = metrics.gain_interval(score, first)
            line += f", {score.db - first.db:+.2f} dB over the first{' (worst part)' if entry.outputs else ''}"
            if interval is not None:
                line += " (95% interval {:+.2f} to {:+.2f})".format(*interval)
        print(line)


if __name__ == "__main__":
    main()

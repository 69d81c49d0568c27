"""Fidelity of quantized models to FP32 on a zoo model's evaluation images.

    python tools/evaluate.py vit-s out-ptq.onnx out-qwt.onnx

prints, per model, the output SQNR (dB) and cosine similarity to the FP32
model on the zoo entry's evaluation set, which no calibration ever sees.
"""

from __future__ import annotations

import argparse

import numpy as np

from qwt_onnx import zoo
from qwt_onnx.numerics.metrics import sqnr_db
from qwt_onnx.runtime import Runner


def outputs(model: str, feeds: dict[str, np.ndarray], batch_size: int = 16) -> dict[str, np.ndarray]:
    runner = Runner(model)
    count = len(next(iter(feeds.values())))
    parts = [runner({k: v[i : i + batch_size] for k, v in feeds.items()}) for i in range(0, count, batch_size)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def cosine(reference: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> float:
    a = np.concatenate([v.astype(np.float64).ravel() for v in reference.values()])
    b = np.concatenate([test[k].astype(np.float64).ravel() for k in reference])
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo_name", choices=sorted(zoo.ENTRIES))
    parser.add_argument("models", nargs="+", help="quantized models of that zoo entry")
    args = parser.parse_args()
    prepared = zoo.prepare(args.zoo_name)
    with np.load(prepared.evaluation) as data:
        feeds = {k: data[k] for k in data.files}
    reference = outputs(prepared.model, feeds)
    print(f"{args.zoo_name}: {len(next(iter(feeds.values())))} evaluation samples")
    for path in args.models:
        test = outputs(path, feeds)
        print(f"  {path}: SQNR {sqnr_db(reference, test):.2f} dB, cosine {cosine(reference, test):.5f}")


if __name__ == "__main__":
    main()

"""Run models as an x86 CPU without VNNI would: onnxruntime under ``qemu-x86_64 -cpu Haswell``.

QEMU's user-mode emulation of a Haswell CPU (AVX2, no AVX-512, no VNNI) makes
onnxruntime pick the kernels such a CPU runs, with exact outputs, 10-50× slower
than native: right for checking what a model computes there, meaningless for
timing it. Debian/Ubuntu: ``apt-get install qemu-user``.

This file runs as a script inside the emulator too, so it imports nothing but
numpy and onnxruntime there (importing qwt_onnx would cost emulated seconds, and
as a script it would find the installed package, not necessarily this one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np

QEMU = "qemu-x86_64"
CPU = "Haswell"  # AVX2 and FMA, no AVX-512, no VNNI


def available() -> bool:
    """Whether this machine can emulate an AVX2-only x86 CPU (x86-64 with qemu-user installed)."""
    return shutil.which(QEMU) is not None and os.uname().machine == "x86_64"


def run(
    models: Sequence[str], feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]], batch_size: int = 16
) -> list[dict[str, np.ndarray]]:
    """Each model's outputs (all optimizations, CPU provider) computed on an emulated Haswell, on
    ``feeds``: one set for all models, or one per model. One emulator process runs them all."""
    if not available():
        raise RuntimeError(f"{QEMU} is not installed (Debian/Ubuntu: apt-get install qemu-user)")
    per_model = [feeds] * len(models) if isinstance(feeds, Mapping) else list(feeds)
    with tempfile.TemporaryDirectory(prefix="qwt-emulated-") as folder:
        command = [QEMU, "-cpu", CPU, sys.executable, os.path.abspath(__file__), str(batch_size)]
        outputs = []
        for k, (model, model_feeds) in enumerate(zip(models, per_model, strict=True)):
            inputs, out = os.path.join(folder, f"feeds-{k}.npz"), os.path.join(folder, f"outputs-{k}.npz")
            np.savez(inputs, **model_feeds)
            command += [os.path.abspath(model), inputs, out]
            outputs.append(out)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the emulated run failed:\n{done.stderr[-2000:]}")
        results = []
        for out in outputs:
            with np.load(out) as data:
                results.append({name: data[name] for name in data.files})
        return results


def _run_here(batch_size: int, jobs: list[tuple[str, str, str]]) -> None:
    import onnxruntime as ort  # not qwt_onnx.runtime: see the module docstring

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    for model, inputs, out in jobs:
        with np.load(inputs) as data:
            feeds = {name: data[name] for name in data.files}
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        wanted = {i.name for i in session.get_inputs()}
        count = len(next(iter(feeds.values())))
        parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for start in range(0, count, batch_size):
            batch = {k: v[start : start + batch_size] for k, v in feeds.items() if k in wanted}
            for name, value in zip(names, session.run(names, batch)):
                parts[name].append(value)
        np.savez(out, **{name: np.concatenate(chunks) for name, chunks in parts.items()})

if __name__ == "__main__":  # inside the emulator: batch_size (model.onnx feeds.npz outputs.npz)...
    arguments = sys.argv[1:]
    _run_here(int(arguments[0]), list(zip(arguments[1::3], arguments[2::3], arguments[3::3])))

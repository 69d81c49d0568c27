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
    ``feeds``: one set for all models, or one per model. One emulator process runs them all; the
    batches are cut here, each input on its samples axis, and the outputs joined here on theirs."""
    from qwt_onnx.runtime import concatenate_samples, count_samples, samples_axes, take

    if not available():
        raise RuntimeError(f"{QEMU} is not installed (Debian/Ubuntu: apt-get install qemu-user)")
    per_model = [feeds] * len(models) if isinstance(feeds, Mapping) else list(feeds)
    with tempfile.TemporaryDirectory(prefix="qwt-emulated-") as folder:
        command = [QEMU, "-cpu", CPU, sys.executable, os.path.abspath(__file__)]
        outputs = []
        for k, (model, model_feeds) in enumerate(zip(models, per_model, strict=True)):
            inputs, out = os.path.join(folder, f"feeds-{k}.npz"), os.path.join(folder, f"outputs-{k}.npz")
            input_axes, output_axes = samples_axes(model)
            starts = range(0, count_samples(model_feeds, input_axes), batch_size)
            batches = [take(model_feeds, input_axes, slice(start, start + batch_size)) for start in starts]
            np.savez(inputs, **{f"{b}/{name}": array for b, batch in enumerate(batches) for name, array in batch.items()})
            command += [os.path.abspath(model), inputs, out]
            outputs.append((out, len(batches), output_axes))
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the emulated run failed:\n{done.stderr[-2000:]}")
        results = []
        for out, count, axes in outputs:
            with np.load(out) as data:
                results.append({name: concatenate_samples([data[f"{b}/{name}"] for b in range(count)], axis) for name, axis in axes.items()})
        return results


def _run_here(jobs: list[tuple[str, str, str]]) -> None:
    """Run each model on the batches in its feeds file (keys ``BATCH/INPUT``) and save its
    outputs under ``BATCH/OUTPUT``."""
    import onnxruntime as ort  # not qwt_onnx.runtime: see the module docstring

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    for model, inputs, out in jobs:
        batches: dict[str, dict[str, np.ndarray]] = {}
        with np.load(inputs) as data:
            for key in data.files:
                batch, name = key.split("/", 1)
                batches.setdefault(batch, {})[name] = data[key]
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        wanted = {i.name for i in session.get_inputs()}
        results = {}
        for batch, feeds in batches.items():
            values = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
            results.update({f"{batch}/{name}": value for name, value in zip(names, values)})
        np.savez(out, **results)


if __name__ == "__main__":  # inside the emulator: (model.onnx feeds.npz outputs.npz)...
    arguments = sys.argv[1:]
    _run_here(list(zip(arguments[0::3], arguments[1::3], arguments[2::3])))

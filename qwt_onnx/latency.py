"""What added nodes cost at run time, measured: their share of a profiled onnxruntime run.

Two models timed against each other on a shared CPU differ by more than the few percent that
matter here: on this project's 2-core machine MiniLM's INT8 model, timed against a copy of
itself, read 1.00-1.02 times its own latency in interleaved rounds of ten runs and 0.78-0.88
times run for run in turn, and the same model with QwT's two branches 1.02-1.08 times. The
kernels of one run share its conditions, so the share of that run that some of them take is
steady: those two branches 1.7-1.9% of the kernel time at batch 16 in three profiles, Silero
VAD's four 8.8-9.0% at batch 1.

Measured times still differ from run to run, and a branch whose cost is within their noise of
``--max-slowdown`` would be kept by one run and dropped by the next. So, as TensorRT keeps a
timing cache for its kernel choices, the times are kept in the cache (:mod:`qwt_onnx.cache`),
under the model, its feeds, the CPU and onnxruntime's version: the same inputs on the same
machine give the same model.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from qwt_onnx import runtime
from qwt_onnx.cache import cache_dir

PROFILED_RUNS = 10  # after a warm-up one (memory arenas, prepacked weights)


@dataclasses.dataclass(frozen=True)
class RunTimes:
    """Microseconds of each profiled run (its whole ``model_run``), and of the kernels of each scope in it."""

    runs_us: np.ndarray  # [runs]
    scopes_us: dict[str, np.ndarray]  # scope -> [runs]

    def slowdown(self, scopes: Sequence[str] | None = None) -> float:
        """How many times as long a run would take with the kernels of ``scopes`` (all of them
        where None) as without the kernels of any: the median over runs."""
        def spent(names) -> np.ndarray:
            return sum((self.scopes_us[s] for s in names), np.zeros_like(self.runs_us))

        without = np.maximum(self.runs_us - spent(self.scopes_us), 1e-9)
        return float(np.median((without + spent(self.scopes_us if scopes is None else scopes)) / without))


def run_times(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], scopes: Sequence[str],
              runs: int = PROFILED_RUNS, cached: bool = True) -> RunTimes:
    """``model`` profiled on ``feeds`` as deployed (all graph optimizations, onnxruntime's own
    threading): per run, its time and that of the kernels whose node names start with each
    of ``scopes`` (onnxruntime names a fused kernel after a node it fused). ``cached``: measured
    once per model, feeds, CPU and onnxruntime version, after that read from the cache."""
    if not cached:
        return _profiled(model, feeds, scopes, runs)
    key = hashlib.sha256(model.SerializeToString())
    for name in sorted(feeds):
        key.update(f"{name}{feeds[name].dtype}{feeds[name].shape}".encode())
        key.update(np.ascontiguousarray(feeds[name]).tobytes())
    key.update(f"{scopes}{runs}{_cpu()}{ort.__version__}".encode())
    path = os.path.join(cache_dir("run-times"), key.hexdigest() + ".json")
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        return RunTimes(np.array(stored["runs_us"]), {s: np.array(us) for s, us in stored["scopes_us"].items()})
    measured = _profiled(model, feeds, scopes, runs)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), suffix=".tmp", delete=False) as f:
        json.dump({"runs_us": measured.runs_us.tolist(), "scopes_us": {s: t.tolist() for s, t in measured.scopes_us.items()}}, f)
    os.replace(f.name, path)  # whole or not at all, where two runs measure at once
    return measured


def _cpu() -> str:
    """The CPU's model name and the cores onnxruntime may use."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or platform.machine()} x{os.cpu_count()}"


def _profiled(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], scopes: Sequence[str], runs: int) -> RunTimes:
    with tempfile.TemporaryDirectory() as folder:
        # spinning as deployed: no solver shares the cores while it runs
        session = runtime.session(model, profile_prefix=os.path.join(folder, "profile"),
                                  **{"session.intra_op.allow_spinning": "1"})
        for _ in range(1 + runs):
            session.run(None, dict(feeds))
        with open(session.end_profiling()) as f:
            events = json.load(f)
    model_runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    model_runs = model_runs[1:]  # not the warm-up
    spent = collections.defaultdict(lambda: np.zeros(len(model_runs)))
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        run = next((i for i, (start, end) in enumerate(model_runs) if start <= event["ts"] <= end), None)
        scope = next((s for s in scopes if event["name"].startswith(s)), None)
        if run is not None and scope is not None:
            spent[scope][run] += event["dur"]
    return RunTimes(np.array([end - start for start, end in model_runs], dtype=np.float64),
                    {s: spent[s] for s in scopes})

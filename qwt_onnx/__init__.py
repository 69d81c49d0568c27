"""qwt_onnx: Quantization without Tears as an ONNX graph-rewriting pass."""

import os

# Capture alternates onnxruntime runs with numpy's normal-equation updates on the same cores.
# OpenBLAS threads otherwise spin for ~0.1 s after each call and slow the next onnxruntime run
# by a third; a short spin fixes it. Takes effect only if numpy is not imported yet, and never
# overrides a value the user set.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from qwt_onnx.api import quantize, quantize_with_report  # noqa: E402
from qwt_onnx.errors import InputError  # noqa: E402
from qwt_onnx.report import Report  # noqa: E402

__version__ = "0.1.0"
__all__ = ["InputError", "Report", "quantize", "quantize_with_report", "__version__"]

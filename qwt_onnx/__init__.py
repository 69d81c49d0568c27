"""qwt_onnx: Quantization without Tears as an ONNX graph-rewriting pass."""

import importlib

__version__ = "0.1.0"
__all__ = ["InputError", "Options", "Report", "quantize", "quantize_with_report", "__version__"]
_EXPORTS = {"InputError": "qwt_onnx.errors", "Options": "qwt_onnx.options", "Report": "qwt_onnx.report",
            "quantize": "qwt_onnx.api", "quantize_with_report": "qwt_onnx.api"}


def __getattr__(name: str):
    # Loaded on first use, so that importing the package imports nothing else and
    # ``python -m qwt_onnx`` can set up its process before numpy loads.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwt_onnx' has no attribute {name!r}")

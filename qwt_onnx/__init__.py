"""qwt_onnx: Quantization without Tears as an ONNX graph-rewriting pass."""

from qwt_onnx.api import quantize, quantize_with_report
from qwt_onnx.report import Report
from qwt_onnx.errors import InputError

__version__ = "0.1.0"
__all__ = ["InputError", "Report", "quantize", "quantize_with_report", "__version__"]

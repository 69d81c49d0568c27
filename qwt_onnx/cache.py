"""Where qwt_onnx keeps what it prepares or measures once: ``$QWT_ONNX_CACHE``, else
``$XDG_CACHE_HOME/qwt_onnx`` (``~/.cache/qwt_onnx``)."""

from __future__ import annotations

import os


def cache_dir(*parts: str) -> str:
    """The cache folder, or the folder ``parts`` below it, made where missing."""
    base = os.environ.get("QWT_ONNX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qwt_onnx"
    )
    folder = os.path.join(base, *parts)
    os.makedirs(folder, exist_ok=True)
    return folder

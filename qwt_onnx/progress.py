"""Progress bars for the long steps, shown or hidden for a whole run."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

_shown = contextvars.ContextVar("qwt_onnx_progress_shown", default=True)


@contextlib.contextmanager
def shown(enabled: bool) -> Iterator[None]:
    """Show (or hide) the progress bars of everything run inside the ``with`` block."""
    token = _shown.set(enabled)
    try:
        yield
    finally:
        _shown.reset(token)


def bar(iterable: Iterable, description: str, total: int | None = None) -> Iterable:
    """``iterable`` with a transient progress bar, where bars are shown."""
    return tqdm(iterable, desc=description, total=total, disable=not _shown.get(), leave=False, dynamic_ncols=True)

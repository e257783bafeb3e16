"""Error types of gmr_fast: one per layer, each message saying what failed and what to do."""

from __future__ import annotations


class GmrError(Exception):
    """Base class of every error gmr_fast raises on purpose."""


class ImageError(GmrError, ValueError):
    """An image could not be used. ``index`` is its position in the call, ``source`` its path
    (when it came from a file), ``cause`` a short reason."""

    def __init__(self, index: int | None, cause: str, source: str | None = None, label: str | None = None):
        self.index = index
        self.source = source
        self.cause = cause
        where = label or ("image" if index is None else f"image {index}")
        if source is not None:
            where += f" ({source!r})"
        super().__init__(f"{where}: {cause}")

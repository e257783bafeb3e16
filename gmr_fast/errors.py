"""Error types of gmr_fast: one per layer, each message saying what failed and what to do next.

Every error the library raises on purpose is a :class:`GmrError`. The ones that are about bad
input values also derive from ``ValueError`` so that ``except ValueError`` keeps working for
callers who treat them that way. Shells (the CLIs, the server) translate them once, at their
boundary, into exit codes or HTTP statuses.
"""

from __future__ import annotations


class GmrError(Exception):
    """Base class of every error gmr_fast raises on purpose."""


class CoreError(GmrError, ValueError):
    """The native core (C++) refused its arguments; raised by ``gmr_fast._core`` and ``gmr_fast._dnnl``."""


class ConfigError(GmrError, ValueError):
    """A configuration value is invalid: gmr.json, an options object, a CLI flag."""


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


class PromptError(GmrError, ValueError):
    """A pair cannot be turned into a prompt (bad shape, or too long even without document text)."""


class EngineError(GmrError):
    """An engine directory is missing, incomplete, or not one this runtime can run."""


class BackendError(GmrError):
    """A backend or execution provider is unavailable, or cannot run the requested precision."""


class CheckpointError(GmrError, ValueError):
    """A checkpoint directory is missing something or is not a supported GMR checkpoint."""


class ExportError(GmrError):
    """The export could not produce a valid engine (validation failed, disk full, ...)."""

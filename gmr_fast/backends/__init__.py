"""Backends: what runs the two graphs of an engine. The whole contract:

    encode_images(feeds) -> float32 [merged patches, hidden]   (vision graph inputs by name)
    score(feeds) -> float32 [batch]                            (decoder graph inputs by name)

Adding a backend means adding one file here and a line in `create_backend`.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

import numpy as np


class Backend(Protocol):
    name: str

    def encode_images(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...

    def score(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...


BACKENDS = ("onnxruntime", "torch")


def create_backend(name: str, engine_dir: os.PathLike, manifest: dict, providers: Sequence[str] | None,
                   num_threads: int, **options) -> Backend:
    """`options` go to the backend: torch takes `checkpoint` (default: the manifest's source)
    and `device`."""
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(engine_dir, manifest, providers, num_threads)
    if name == "torch":
        from .torch import TorchBackend

        return TorchBackend(engine_dir, manifest, num_threads=num_threads, **options)
    raise ValueError(f"backend {name!r} is not available; supported: {', '.join(repr(b) for b in BACKENDS)}")

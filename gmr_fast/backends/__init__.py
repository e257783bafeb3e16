"""Backends: what runs an engine's two graphs. The whole contract:

    encode_images(VisionBatch) -> [embeddings of each image]        (backend arrays, [tokens, H])
    prefill(DecoderBatch, images) -> [keys/values of each row]       (backend arrays, real tokens only)
    score(DecoderBatch, images) -> float32 [B]                       (suffix batches attend to batch.past)

``images`` are the embeddings of ``batch.image_keys`` in order. Adding a backend means adding one
file here and a line in ``create_backend``.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from ..errors import BackendError
from ..manifest import Manifest
from ..schedule import DecoderBatch, VisionBatch

BACKENDS = ("onnxruntime", "torch")


class Backend(Protocol):
    name: str
    precision: str
    device: str

    def encode_images(self, batch: VisionBatch) -> list[Any]: ...

    def prefill(self, batch: DecoderBatch, images: list[Any]) -> list[Any]: ...

    def score(self, batch: DecoderBatch, images: list[Any]) -> np.ndarray: ...


def create_backend(name: str, engine_dir: str, manifest: Manifest, precision: str, num_threads: int,
                   providers: Sequence[str] | None = None, device: str = "cpu", **options) -> Backend:
    """``options`` are backend-specific (the ``backend_options`` escape hatch)."""
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(engine_dir, manifest, precision, num_threads, providers, **options)
    if name == "torch":
        from .torch import TorchBackend

        return TorchBackend(engine_dir, manifest, precision, num_threads, device=device, **options)
    raise BackendError(f"backend {name!r} is not available; supported: {', '.join(repr(b) for b in BACKENDS)}")


def past_tensors(batch: DecoderBatch, layers: int, kv_heads: int, head_dim: int, zeros, copy):
    """Shapes of the decoder's past inputs for ``batch`` (shared by the backends): returns
    (past_kv [layers, 2, NP, kv_heads, P, d], past_mask [NP, P], past_index [B]) built with the
    backend's ``zeros(shape, dtype_kind)`` and ``copy(dst_view, src)``."""
    b = batch.input_ids.shape[0]
    if not batch.past:
        return (zeros((layers, 2, 1, kv_heads, 1, head_dim), "float"), zeros((1, 1), "int"),
                zeros((b,), "int"))
    lengths = [int(n) for n in batch.past_lengths]
    width = max(lengths)
    kv = zeros((layers, 2, len(lengths), kv_heads, width, head_dim), "float")
    mask = np.zeros((len(lengths), width), np.int64)
    for k, (past, n) in enumerate(zip(batch.past, lengths)):
        copy(kv, k, past, n)
        mask[k, :n] = 1
    return kv, mask, batch.past_index

"""Shared fixtures. HuggingFace's PIL image processor is the oracle for pixels; it is built from
its class (no hub access) with the min/max pixels under test."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@functools.lru_cache(maxsize=None)
def hf_processor(min_pixels: int, max_pixels: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def hf_preprocess(pil_images, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
    out = hf_processor(min_pixels, max_pixels)(images=list(pil_images), return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


def assert_bit_exact(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    if not np.array_equal(ours, ref):
        diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
        raise AssertionError(
            f"{what}: not bit-exact, max |diff| = {diff.max():.3g} at {np.unravel_index(diff.argmax(), diff.shape)}, "
            f"{int((diff > 0).sum())} of {diff.size} values differ"
        )


@pytest.fixture
def rng(request):
    # A fresh but reproducible stream per test.
    return np.random.default_rng(abs(hash(request.node.nodeid)) % (2**32))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """Tiny checkpoints and the converted tokenizer are generated once per test session."""
    return tmp_path_factory.mktemp("gmr_cache")


@pytest.fixture(scope="session")
def tiny_checkpoints(model_cache):
    pytest.importorskip("torch")
    from export.factory import cached_checkpoint

    return {family: cached_checkpoint(family, cache_dir=model_cache) for family in ("qwen2_vl", "qwen2_5_vl")}


@pytest.fixture(scope="session")
def exported_engines(tiny_checkpoints, tmp_path_factory):
    """fp32 engines of both tiny checkpoints, exported (and validated) once per session."""
    from export.engine_export import ExportOptions, export_engine

    root = tmp_path_factory.mktemp("engines")
    return {family: (export_engine(ckpt, root / family, ExportOptions()), root / family)
            for family, ckpt in tiny_checkpoints.items()}

"""Qwen2-VL image preprocessing: images -> vision patches, bit-exact with HuggingFace.

The public entry points are :func:`preprocess_images`, :func:`smart_resize` and
:func:`vision_indices`. Decoding runs in Python threads (Pillow releases the GIL while it
decodes); resize, rescale, normalise and patchify run in the native core in one pass per image,
straight into the output buffer, spread over threads with the GIL released.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import PIL
from PIL import Image

from . import _core
from .errors import ImageError
from .images import DEFAULT_MAX_IMAGE_PIXELS, DecodedImage, ImageInput, decode_image
from .manifest import PreprocessSpec

# HuggingFace Qwen2VLImageProcessor class defaults (released GMR checkpoints override them).
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255


def default_spec(min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreprocessSpec:
    """Qwen2-VL's processor defaults (what HF's Qwen2VLImageProcessor does unless configured)."""
    return PreprocessSpec(PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE, CLIP_MEAN, CLIP_STD, RESCALE_FACTOR,
                          int(min_pixels), int(max_pixels), None)


@dataclass
class ImageBatch:
    """Vision-encoder input for a batch of images, concatenated in input order.

    With ``on_error="collect"`` the images that failed are absent from ``pixel_values`` and
    ``image_grid_thw``; ``input_index`` maps each grid row back to its position in the call and
    ``errors`` holds the failures by position.
    """

    pixel_values: np.ndarray  # float32 [N, 3 * temporal_patch * patch * patch] (N = sum t*h*w)
    image_grid_thw: np.ndarray  # int64 [n, 3]: (t=1, grid_h, grid_w) in patches
    input_index: np.ndarray  # int64 [n]: input position of each grid row
    errors: dict[int, ImageError] = field(default_factory=dict)

    @property
    def patch_offsets(self) -> np.ndarray:
        """int64 [n + 1]: rows of ``pixel_values`` that belong to each image."""
        counts = np.prod(self.image_grid_thw, axis=1) if len(self.image_grid_thw) else np.zeros(0, np.int64)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def smart_resize(
    height: int,
    width: int,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    factor: int = PATCH_SIZE * MERGE_SIZE,
) -> tuple[int, int]:
    """Target (height, width) for an image, as HuggingFace's ``smart_resize``: both multiples of
    ``factor``, pixel count within [min_pixels, max_pixels], aspect ratio kept as far as possible.
    Raises ValueError when the aspect ratio exceeds 200."""
    return tuple(_core.smart_resize(int(height), int(width), int(factor), int(min_pixels), int(max_pixels)))


def vision_indices(
    image_grid_thw: np.ndarray,
    spatial_merge_size: int = MERGE_SIZE,
    window_size: int | None = None,
    patch_size: int = PATCH_SIZE,
) -> dict[str, np.ndarray]:
    """Grid-derived index tensors of the vision tower, equal to transformers'
    ``vision_utils`` helpers: ``rot_pos_ids`` int64[N, 2] and ``cu_seqlens`` int64[frames + 1];
    with ``window_size`` (Qwen2.5-VL, pixels) also ``window_index`` int64[N / merge^2] and
    ``cu_window_seqlens`` int64[windows + 1]."""
    grid = np.asarray(image_grid_thw, dtype=np.int64)
    if grid.shape == (3,):  # a single image's (t, h, w)
        grid = grid[None]
    return _core.vision_indices(grid, int(spatial_merge_size), int(window_size or 0), int(patch_size))


@functools.lru_cache(maxsize=None)
def pillow_vertical_first() -> bool:
    """Whether the installed Pillow resamples vertically first when the height shrinks much more
    than the width (Pillow 13 does, older releases always go horizontal first). Decided once by
    resizing a small probe image both ways and comparing with Pillow itself."""
    probe = np.random.default_rng(0).integers(0, 256, (120, 30, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(probe).resize((28, 112), Image.Resampling.BICUBIC))
    for rule in (True, False):
        if np.array_equal(_core.resize_rgb(probe, 112, 28, rule), expected):
            return rule
    raise RuntimeError(
        f"the installed Pillow {PIL.__version__} resizes in a way gmr_fast does not reproduce; "
        "pin pillow to a tested release (10.1 - 13.x)"
    )


def patchify(decoded: Sequence[DecodedImage], sizes: np.ndarray, spec: PreprocessSpec,
             num_threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize, rescale, normalise and patchify decoded images in the native core, straight into
    one buffer: ``(pixel_values float32 [N, patch_dim], image_grid_thw int64 [n, 3])``. The one
    place every caller (``preprocess_images``, the Reranker, training) turns pixels into patches."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    grid = np.empty((len(sizes), 3), dtype=np.int64)
    grid[:, 0] = 1
    grid[:, 1:] = sizes // spec.patch_size
    rows = int(np.prod(grid, axis=1).sum()) if len(sizes) else 0
    pixel_values = np.empty((rows, spec.patch_dim), dtype=np.float32)
    if len(sizes):
        _core.preprocess_into([d.pixels for d in decoded], sizes, pixel_values, spec.rescale_factor, spec.image_mean,
                              spec.image_std, spec.patch_size, spec.merge_size, spec.temporal_patch_size,
                              pillow_vertical_first(), num_threads)
    return pixel_values, grid


def hardware_threads() -> int:
    """Threads used when num_threads is None: the machine's hardware threads."""
    return _core.hardware_threads()


def _resolve_threads(num_threads: int | None) -> int:
    if num_threads is None:
        return hardware_threads()
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return int(num_threads)


def preprocess_images(
    images: Sequence[ImageInput] | ImageInput,
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    num_threads: int | None = None,
    on_error: Literal["raise", "collect"] = "raise",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> ImageBatch:
    """Turns images into Qwen2-VL patches, identical to ``Qwen2VLImageProcessorPil``.

    ``images``: PIL images, HxWx3 uint8 RGB arrays, paths, or encoded bytes (one or a list).
    ``num_threads``: threads for decoding and the native pass (default: all cores); the result
    never depends on it. ``on_error="raise"`` raises the first :class:`ImageError` (it names the
    image's index and path); ``"collect"`` records failures in ``ImageBatch.errors`` and returns
    the good images. ``max_image_pixels`` refuses larger images before decoding.
    """
    if on_error not in ("raise", "collect"):
        raise ValueError(f"on_error must be 'raise' or 'collect', got {on_error!r}")
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray)) or hasattr(images, "getbands"):
        images = [images]
    images = list(images)
    threads = _resolve_threads(num_threads)
    factor = PATCH_SIZE * MERGE_SIZE

    def prepare(i: int) -> tuple[DecodedImage, tuple[int, int]]:
        decoded = decode_image(images[i], i, max_image_pixels)
        try:
            size = smart_resize(decoded.height, decoded.width, min_pixels, max_pixels, factor=factor)
        except ValueError as e:
            raise ImageError(i, str(e), images[i] if isinstance(images[i], (str, os.PathLike)) else None) from None
        return decoded, size

    def prepare_or_error(i: int):
        try:
            return prepare(i)
        except ImageError as e:
            if on_error == "raise":
                raise
            return e

    # Decoding files and bytes is real work and releases the GIL: spread it over threads. Images
    # already in memory only need a cheap hand-off, where a pool would cost more than it saves.
    needs_decoding = any(isinstance(im, (str, os.PathLike, bytes, bytearray, memoryview)) for im in images)
    if threads > 1 and len(images) > 1 and needs_decoding:
        with ThreadPoolExecutor(max_workers=min(threads, len(images))) as pool:
            prepared = list(pool.map(prepare_or_error, range(len(images))))
    else:
        prepared = [prepare_or_error(i) for i in range(len(images))]

    errors = {i: p for i, p in enumerate(prepared) if isinstance(p, ImageError)}
    good = [i for i, p in enumerate(prepared) if not isinstance(p, ImageError)]
    sizes = np.array([prepared[i][1] for i in good], dtype=np.int64).reshape(-1, 2)
    pixel_values, grid = patchify([prepared[i][0] for i in good], sizes, default_spec(min_pixels, max_pixels), threads)
    return ImageBatch(pixel_values, grid, np.array(good, dtype=np.int64), errors)

"""Slow, readable restatement of the Qwen2-VL image preprocessing, for tests only.

Every step is written out in numpy from its definition (Pillow's bicubic resampling with its
fixed-point arithmetic, HuggingFace's rescale / normalise / patchify), so the native core can be
checked against something that shares none of its code. Not used by the fast path.
"""

from __future__ import annotations

import math

import numpy as np

from .preprocess import CLIP_MEAN, CLIP_STD, MERGE_SIZE, PATCH_SIZE, RESCALE_FACTOR, TEMPORAL_PATCH_SIZE

PRECISION_BITS = 22  # Pillow: 32 bits - 8 bits of result - 2 bits of headroom


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _cubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's filter taps for one axis: (first input index [out], int weights [out, taps])."""
    scale = float(np.float32(in_size)) / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    starts = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, ksize), np.int64)
    for o in range(out_size):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        n = min(int(center + support + 0.5), in_size) - lo
        w = [_cubic((x + lo - center + 0.5) * (1.0 / filterscale)) for x in range(n)]
        total = sum(w)
        for x in range(n):
            v = w[x] / total if total != 0.0 else w[x]
            weights[o, x] = int(-0.5 + v * (1 << PRECISION_BITS)) if v < 0 else int(0.5 + v * (1 << PRECISION_BITS))
        starts[o] = lo
    return starts, weights


def _resample_axis(pixels: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One separable pass along `axis` of a uint8 HxWxC image, rounded and clipped to uint8."""
    in_size = pixels.shape[axis]
    if in_size == out_size:
        return pixels
    starts, weights = bicubic_taps(in_size, out_size)
    src = np.moveaxis(pixels, axis, 0).astype(np.int64)
    acc = np.full((out_size,) + src.shape[1:], 1 << (PRECISION_BITS - 1), np.int64)
    for t in range(weights.shape[1]):
        index = np.minimum(starts + t, in_size - 1)  # taps past the edge carry weight 0
        acc += weights[:, t].reshape(-1, *([1] * (src.ndim - 1))) * src[index]
    out = np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize_bicubic(pixels: np.ndarray, height: int, width: int, vertical_first_rule: bool = True) -> np.ndarray:
    """Pillow's ``Image.resize((width, height), BICUBIC)`` on an HxWx3 uint8 array. Pillow >= 13
    runs the vertical pass first when the height shrinks by more than twice as many pixels as
    the width does (``vertical_first_rule``); earlier releases always go horizontal first."""
    dh, dw = pixels.shape[0] - height, pixels.shape[1] - width
    if vertical_first_rule and dh > 0 and dh > 2 * dw:
        return _resample_axis(_resample_axis(pixels, height, 0), width, 1)
    return _resample_axis(_resample_axis(pixels, width, 1), height, 0)


def preprocess_reference(
    pixels: np.ndarray, min_pixels: int, max_pixels: int, vertical_first_rule: bool = True
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """HxWx3 uint8 RGB -> (patches float32 [gh*gw, 1176], (1, gh, gw))."""
    h, w = smart_resize(pixels.shape[0], pixels.shape[1], min_pixels, max_pixels, PATCH_SIZE * MERGE_SIZE)
    resized = resize_bicubic(pixels, h, w, vertical_first_rule)
    scaled = (resized.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
    normed = (scaled - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    chw = normed.transpose(2, 0, 1)
    gh, gw, m, p = h // PATCH_SIZE, w // PATCH_SIZE, MERGE_SIZE, PATCH_SIZE
    patches = chw.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.repeat(patches[:, :, :, :, :, None], TEMPORAL_PATCH_SIZE, axis=5)
    return patches.reshape(gh * gw, 3 * TEMPORAL_PATCH_SIZE * p * p), (1, gh, gw)

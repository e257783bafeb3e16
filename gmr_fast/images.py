"""Image sources -> decoded RGB pixels, exactly as HuggingFace's Qwen2-VL processor sees them.

Decoding and mode conversion go through Pillow with the same operations HuggingFace's
``convert_to_rgb`` uses (alpha composited onto opaque white, everything else ``convert("RGB")``),
so palette, greyscale, CMYK and 16-bit images give the same RGB bytes. What leaves this module
is a plain pixel buffer for the native core: an HxWx3 uint8 array, or Pillow's zero-copy Arrow
export of an RGB image.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError

ImageInput = Union[Image.Image, np.ndarray, str, os.PathLike, bytes, bytearray, memoryview]

# Pillow's own default (about 89.5 megapixels): larger images are refused before decoding.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


@dataclass
class DecodedImage:
    """An RGB image ready for the native core. ``pixels`` is what the core reads: an HxWx3 uint8
    array or an Arrow (schema, array, height, width) tuple; ``keepalive`` owns its memory."""

    height: int
    width: int
    pixels: Any
    keepalive: Any = None


def to_rgb(image: Image.Image) -> Image.Image:
    """HuggingFace's ``convert_to_rgb`` for PIL images: transparency is composited on white."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _pixels_of(rgb: Image.Image) -> tuple[Any, Any]:
    # Pillow stores RGB as 4 bytes per pixel; its Arrow export hands that memory over without a
    # copy when the image lies in one block. Larger images fall back to a packed copy.
    try:
        schema, array = rgb.__arrow_c_array__()
        return (schema, array, rgb.height, rgb.width), rgb
    except (AttributeError, ValueError):
        packed = np.frombuffer(rgb.tobytes(), dtype=np.uint8).reshape(rgb.height, rgb.width, 3)
        return packed, packed


def _open(source: Any, index: int, path: str | None = None) -> tuple[Image.Image, str | None]:
    if isinstance(source, Image.Image):
        return source, None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            with open(path, "rb") as f:  # read whole: no file handle outlives the call
                data = f.read()
        except FileNotFoundError:
            raise ImageError(index, "file not found", path) from None
        except IsADirectoryError:
            raise ImageError(index, "is a directory, not an image file", path) from None
        except OSError as e:
            raise ImageError(index, f"cannot read file: {e.strerror or e}", path) from None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        raise ImageError(
            index,
            f"unsupported image type {type(source).__name__}; pass a PIL image, an HxWx3 uint8 array, "
            "a path or encoded bytes",
        )
    if not data:
        raise ImageError(index, "zero bytes" + (" in file" if path else " given"), path)
    try:
        return Image.open(io.BytesIO(data)), path
    except UnidentifiedImageError:
        raise ImageError(index, f"{len(data)} bytes are not a recognised image format", path) from None
    except Image.DecompressionBombError as e:
        raise ImageError(index, f"decompression bomb refused: {e}", path) from None
    except OSError as e:
        raise ImageError(index, f"truncated or corrupt image data (header: {e})", path) from None


def decode_image(source: ImageInput, index: int, max_image_pixels: int, path: str | None = None) -> DecodedImage:
    """Decodes one image source to RGB. Raises ImageError naming ``index`` (and the path).
    ``path`` names encoded bytes that were read from that file (for messages only)."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise ImageError(index, f"array images must be HxWx3 uint8 RGB, got {source.dtype} {source.shape}")
        h, w = int(source.shape[0]), int(source.shape[1])
        if h == 0 or w == 0:
            raise ImageError(index, f"empty image {h}x{w}")
        _check_pixels(h, w, max_image_pixels, index, None)
        arr = np.ascontiguousarray(source)
        return DecodedImage(h, w, arr, arr)

    image, path = _open(source, index, path)
    w, h = image.size
    _check_pixels(h, w, max_image_pixels, index, path)
    try:
        image.load()
        rgb = to_rgb(image)
    except Image.DecompressionBombError as e:
        raise ImageError(index, f"decompression bomb refused: {e}", path) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(index, f"truncated or corrupt image data ({e})", path) from None
    pixels, keepalive = _pixels_of(rgb)
    return DecodedImage(h, w, pixels, keepalive)


def _check_pixels(h: int, w: int, limit: int, index: int, path: str | None) -> None:
    if h * w > limit:
        raise ImageError(
            index,
            f"{w}x{h} = {w * h} pixels exceeds the decompression-bomb limit of {limit} "
            "(raise max_image_pixels if the image is trusted)",
            path,
        )

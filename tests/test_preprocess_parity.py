"""Pixel parity: gmr_fast.preprocess_images against HuggingFace's Qwen2VLImageProcessorPil,
bit for bit, on real photos, every Pillow mode HF converts, and hundreds of random sizes."""

from __future__ import annotations

import io
import pathlib

import numpy as np
import pytest
from PIL import Image

import gmr_fast
from gmr_fast import preprocess_reference
from gmr_fast.preprocess import pillow_vertical_first

from conftest import assert_bit_exact, hf_preprocess

# (min_pixels, max_pixels) of released checkpoints and the processor class defaults.
PIXEL_SETTINGS = [
    (4 * 28 * 28, 1280 * 28 * 28),  # lychee-rerank-mm / GMR
    (56 * 56, 28 * 28 * 1280),  # Qwen2VLImageProcessor class defaults
    (56 * 56, 12845056),  # Qwen2-VL / Qwen2.5-VL preprocessor_config.json
    (256 * 28 * 28, 512 * 28 * 28),  # a narrow band that forces both up- and down-scaling
]


def skimage_photos() -> list[pathlib.Path]:
    import skimage

    data = pathlib.Path(skimage.__file__).parent / "data"
    paths = []
    for p in sorted(data.iterdir()):
        if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".gif", ".tif", ".tiff", ".bmp"}:
            try:
                with Image.open(p) as im:
                    im.size
            except Exception:
                continue
            paths.append(p)
    return paths


PHOTOS = skimage_photos()


def test_skimage_ships_colour_grey_and_alpha_photos():
    modes = set()
    for p in PHOTOS:
        with Image.open(p) as im:
            modes.add(im.mode)
    assert len(PHOTOS) >= 10
    assert "RGB" in modes and "L" in modes and ("RGBA" in modes or "LA" in modes or "P" in modes), modes


@pytest.mark.model
@pytest.mark.parametrize("path", PHOTOS, ids=[p.name for p in PHOTOS])
@pytest.mark.parametrize("pixels", PIXEL_SETTINGS[:2], ids=["gmr", "class-default"])
def test_real_photos_bit_exact(path, pixels):
    with Image.open(path) as im:
        im.load()
        ref_pixels, ref_grid = hf_preprocess([im], *pixels)
    ours = gmr_fast.preprocess_images([path], min_pixels=pixels[0], max_pixels=pixels[1])
    np.testing.assert_array_equal(ours.image_grid_thw, ref_grid)
    assert_bit_exact(ours.pixel_values, ref_pixels, path.name)


def _sizes(rng, n):
    edge = [(1, 1), (13, 2000), (2000, 13), (1, 200), (200, 1), (28, 28), (14, 14), (27, 29)]
    # h/28 exactly between two multiples: Python's round() goes to the even one (70 -> 56, 98 -> 112).
    halves = [(28 * k + 14, 28 * j + 14) for k, j in [(2, 3), (3, 2), (4, 5), (1, 1), (10, 7)]]
    tall_thin = [(int(rng.integers(300, 3000)), int(rng.integers(2, 40))) for _ in range(10)]
    random = [tuple(int(v) for v in rng.integers(1, 700, 2)) for _ in range(n)]
    return edge + halves + tall_thin + random


@pytest.mark.model
def test_random_sizes_bit_exact(rng):
    sizes = _sizes(rng, 300)
    assert len(sizes) >= 300
    checked = 0
    for i, (h, w) in enumerate(sizes):
        if max(h, w) / min(h, w) > 200:
            continue
        min_pixels, max_pixels = PIXEL_SETTINGS[i % len(PIXEL_SETTINGS)]
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref_pixels, ref_grid = hf_preprocess([Image.fromarray(pixels)], min_pixels, max_pixels)
        ours = gmr_fast.preprocess_images([pixels], min_pixels=min_pixels, max_pixels=max_pixels)
        np.testing.assert_array_equal(ours.image_grid_thw, ref_grid, err_msg=f"{h}x{w}")
        assert_bit_exact(ours.pixel_values, ref_pixels, f"{h}x{w} pixels {min_pixels}..{max_pixels}")
        checked += 1
    assert checked >= 300


@pytest.mark.model
@pytest.mark.parametrize("size", [(512, 512), (1536, 2048), (3000, 4000), (1080, 1920)])
def test_large_images_bit_exact(size, rng):
    pixels = rng.integers(0, 256, size + (3,), dtype=np.uint8)
    ref_pixels, ref_grid = hf_preprocess([Image.fromarray(pixels)])
    ours = gmr_fast.preprocess_images([Image.fromarray(pixels)])
    np.testing.assert_array_equal(ours.image_grid_thw, ref_grid)
    assert_bit_exact(ours.pixel_values, ref_pixels, f"{size}")


def test_documented_grids():
    assert gmr_fast.smart_resize(512, 512) == (504, 504)
    assert gmr_fast.preprocess_images([np.zeros((512, 512, 3), np.uint8)]).image_grid_thw.tolist() == [[1, 36, 36]]
    assert gmr_fast.preprocess_images([np.zeros((1536, 2048, 3), np.uint8)]).image_grid_thw.tolist() == [[1, 60, 82]]


def _mode_images(rng):
    rgb = Image.fromarray(rng.integers(0, 256, (57, 83, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (61, 45, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (90, 70), dtype=np.uint8), "L")
    la = Image.fromarray(rng.integers(0, 256, (40, 90, 2), dtype=np.uint8), "LA")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=37)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 3
    cmyk = rgb.convert("CMYK")
    i16 = Image.fromarray(rng.integers(0, 65536, (50, 66), dtype=np.uint16))
    bilevel = grey.convert("1")
    ycbcr = rgb.convert("YCbCr")
    return {"RGB": rgb, "RGBA": rgba, "L": grey, "LA": la, "P": palette, "P+transparency": palette_t,
            "CMYK": cmyk, "I;16": i16, "1": bilevel, "YCbCr": ycbcr}


@pytest.mark.model
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "P+transparency", "CMYK", "I;16", "1", "YCbCr"])
def test_every_mode_converts_like_hf(mode, rng):
    image = _mode_images(rng)[mode]
    ref_pixels, ref_grid = hf_preprocess([image])
    ours = gmr_fast.preprocess_images([image])
    np.testing.assert_array_equal(ours.image_grid_thw, ref_grid)
    assert_bit_exact(ours.pixel_values, ref_pixels, mode)


@pytest.mark.model
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP"])
def test_encoded_bytes_and_paths_equal_pil(fmt, rng, tmp_path):
    image = Image.fromarray(rng.integers(0, 256, (77, 101, 3), dtype=np.uint8))
    if fmt == "GIF":
        image = image.convert("P")
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(data)
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    ref_pixels, _ = hf_preprocess([decoded])
    for source in (data, path, str(path), decoded):
        assert_bit_exact(gmr_fast.preprocess_images([source]).pixel_values, ref_pixels, f"{fmt} {type(source).__name__}")


def test_numpy_reference_matches_native(rng):
    """The readable reference and the native core agree, in both of Pillow's pass orders."""
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(1, 500, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref, grid = preprocess_reference.preprocess_reference(pixels, 56 * 56, 28 * 28 * 1280, pillow_vertical_first())
        ours = gmr_fast.preprocess_images([pixels])
        assert tuple(ours.image_grid_thw[0]) == grid
        assert_bit_exact(ours.pixel_values, ref, f"{h}x{w}")
    from gmr_fast import _core

    for _ in range(40):
        h, w, oh, ow = (int(v) for v in rng.integers(1, 300, 4))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for rule in (True, False):
            assert_bit_exact(
                _core.resize_rgb(pixels, oh, ow, rule),
                preprocess_reference.resize_bicubic(pixels, oh, ow, rule),
                f"resize {h}x{w}->{oh}x{ow} vertical_first_rule={rule}",
            )


@pytest.mark.model
def test_smart_resize_matches_hf(rng):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    cases = [(h, w) for h in (1, 13, 14, 27, 28, 70, 98, 126, 154, 1000, 4000) for w in (1, 28, 70, 98, 1999, 5000)]
    cases += [tuple(int(v) for v in rng.integers(1, 20000, 2)) for _ in range(2000)]
    for i, (h, w) in enumerate(cases):
        mn, mx = PIXEL_SETTINGS[i % len(PIXEL_SETTINGS)]
        try:
            expected = hf_smart_resize(h, w, factor=28, min_pixels=mn, max_pixels=mx)
        except ValueError:
            with pytest.raises(ValueError, match="aspect ratio"):
                gmr_fast.smart_resize(h, w, mn, mx)
            continue
        assert gmr_fast.smart_resize(h, w, mn, mx) == expected, (h, w, mn, mx)

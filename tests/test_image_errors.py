"""Bad images fail with gmr_fast.ImageError naming the item and the cause; on_error="collect"
keeps the good ones."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import gmr_fast
from gmr_fast import ImageError

from conftest import assert_bit_exact


def _png(rng, h=64, w=48):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(rng, h=64, w=48):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _bad_cases(rng, tmp_path):
    truncated_png = tmp_path / "truncated.png"
    truncated_png.write_bytes(_png(rng)[:200])
    empty_file = tmp_path / "empty.jpg"
    empty_file.write_bytes(b"")
    text_file = tmp_path / "notes.png"
    text_file.write_text("this is not an image")
    return {
        "missing path": (str(tmp_path / "nope.png"), "file not found", str(tmp_path / "nope.png")),
        "zero bytes": (b"", "zero bytes", None),
        "empty file": (empty_file, "zero bytes", str(empty_file)),
        "non-image bytes": (b"just some text, not an image" * 3, "not a recognised image format", None),
        "non-image file": (text_file, "not a recognised image format", str(text_file)),
        "truncated jpeg": (_jpeg(rng)[:300], "truncated or corrupt", None),
        "truncated png": (truncated_png, "truncated or corrupt", str(truncated_png)),
        "aspect ratio": (np.zeros((2, 500, 3), np.uint8), "aspect ratio must be smaller than 200", None),
        "directory": (tmp_path, "directory", str(tmp_path)),
        "wrong array": (np.zeros((10, 10), np.uint8), "HxWx3 uint8", None),
        "wrong type": (12345, "unsupported image type int", None),
    }


CASES = ["missing path", "zero bytes", "empty file", "non-image bytes", "non-image file", "truncated jpeg",
         "truncated png", "aspect ratio", "directory", "wrong array", "wrong type"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises_image_error_naming_the_item(case, rng, tmp_path):
    source, cause, path = _bad_cases(rng, tmp_path)[case]
    good = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    with pytest.raises(ImageError) as info:
        gmr_fast.preprocess_images([good, good, source])
    err = info.value
    assert err.index == 2
    assert cause in str(err), str(err)
    assert str(err).startswith("image 2")
    if path is not None:
        assert err.source == path and path in str(err)
    assert isinstance(err, ValueError) and isinstance(err, gmr_fast.GmrError)


def test_decompression_bomb_limit_is_configurable(rng):
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    with pytest.raises(ImageError, match="exceeds the decompression-bomb limit of 100000"):
        gmr_fast.preprocess_images([image], max_image_pixels=100_000)
    png = _png(rng, 300, 400)
    with pytest.raises(ImageError, match=r"image 0: 400x300 = 120000 pixels exceeds"):
        gmr_fast.preprocess_images([png], max_image_pixels=100_000)
    assert gmr_fast.preprocess_images([png], max_image_pixels=120_000).image_grid_thw.shape == (1, 3)


def test_collect_keeps_good_images_exact(rng, tmp_path):
    cases = _bad_cases(rng, tmp_path)
    goods = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8) for h, w in rng.integers(30, 300, (5, 2))]
    inputs, expected_errors = [], {}
    for i, name in enumerate(CASES):
        inputs.append(goods[i % len(goods)])
        inputs.append(cases[name][0])
        expected_errors[len(inputs) - 1] = cases[name][1]
    batch = gmr_fast.preprocess_images(inputs, on_error="collect")
    assert set(batch.errors) == set(expected_errors)
    for index, cause in expected_errors.items():
        assert batch.errors[index].index == index and cause in str(batch.errors[index])
    good_positions = [i for i in range(len(inputs)) if i not in expected_errors]
    np.testing.assert_array_equal(batch.input_index, good_positions)
    clean = gmr_fast.preprocess_images([inputs[i] for i in good_positions])
    np.testing.assert_array_equal(batch.image_grid_thw, clean.image_grid_thw)
    assert_bit_exact(batch.pixel_values, clean.pixel_values, "good images of a collected batch")


def test_all_bad_collect_returns_empty_batch():
    batch = gmr_fast.preprocess_images([b"", b"junk"], on_error="collect")
    assert batch.pixel_values.shape == (0, 1176) and set(batch.errors) == {0, 1}

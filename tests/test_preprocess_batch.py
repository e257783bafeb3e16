"""Batches: concatenation order, grids and shapes; results independent of the thread count."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.model
from PIL import Image

import gmr_fast

from conftest import assert_bit_exact, hf_preprocess


def _images(rng, n):
    sizes = [(int(h), int(w)) for h, w in rng.integers(20, 900, (n, 2))]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_batch_concatenates_in_input_order(rng):
    arrays = _images(rng, 9)
    batch = gmr_fast.preprocess_images(arrays)
    ref_pixels, ref_grid = hf_preprocess([Image.fromarray(a) for a in arrays])
    np.testing.assert_array_equal(batch.image_grid_thw, ref_grid)
    assert batch.image_grid_thw.dtype == np.int64 and batch.image_grid_thw.shape == (9, 3)
    assert batch.pixel_values.dtype == np.float32 and batch.pixel_values.shape == (int(np.prod(ref_grid, 1).sum()), 1176)
    assert_bit_exact(batch.pixel_values, ref_pixels, "batch")
    offsets = batch.patch_offsets
    for i, a in enumerate(arrays):
        single = gmr_fast.preprocess_images([a])
        assert_bit_exact(batch.pixel_values[offsets[i]:offsets[i + 1]], single.pixel_values, f"image {i}")
    np.testing.assert_array_equal(batch.input_index, np.arange(9))
    assert batch.errors == {}


@pytest.mark.parametrize("n_images", [1, 3, 16])
def test_thread_count_does_not_change_bytes(n_images, rng):
    arrays = _images(rng, n_images) + [rng.integers(0, 256, (1536, 2048, 3), dtype=np.uint8)]
    one = gmr_fast.preprocess_images(arrays, num_threads=1)
    for threads in (2, 3, 8):
        many = gmr_fast.preprocess_images(arrays, num_threads=threads)
        np.testing.assert_array_equal(many.image_grid_thw, one.image_grid_thw)
        assert_bit_exact(many.pixel_values, one.pixel_values, f"{threads} threads")


def test_mixed_input_types_in_one_batch(rng, tmp_path):
    a = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(a).save(path)
    batch = gmr_fast.preprocess_images([a, Image.fromarray(a), path, path.read_bytes()])
    rows = batch.patch_offsets
    for i in range(1, 4):
        assert_bit_exact(batch.pixel_values[rows[i]:rows[i + 1]], batch.pixel_values[rows[0]:rows[1]], f"input {i}")


def test_single_image_and_empty_batch():
    one = gmr_fast.preprocess_images(np.zeros((56, 56, 3), np.uint8))
    assert one.image_grid_thw.tolist() == [[1, 4, 4]]
    empty = gmr_fast.preprocess_images([])
    assert empty.pixel_values.shape == (0, 1176) and empty.image_grid_thw.shape == (0, 3)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_threads"):
        gmr_fast.preprocess_images([np.zeros((28, 28, 3), np.uint8)], num_threads=0)
    with pytest.raises(ValueError, match="on_error"):
        gmr_fast.preprocess_images([np.zeros((28, 28, 3), np.uint8)], on_error="ignore")

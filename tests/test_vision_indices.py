"""gmr_fast.vision_indices equals transformers' vision_utils helpers."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.model
import torch
from transformers import vision_utils

import gmr_fast


def _grids(rng, n):
    g = np.ones((n, 3), np.int64)
    g[:, 1:] = rng.integers(1, 60, (n, 2)) * 2
    return g


@pytest.mark.parametrize("n_images", [1, 2, 5, 12])
def test_qwen2_vl_indices(n_images, rng):
    for _ in range(10):
        grid = _grids(rng, n_images)
        ours = gmr_fast.vision_indices(grid, spatial_merge_size=2)
        t = torch.from_numpy(grid)
        np.testing.assert_array_equal(ours["rot_pos_ids"], vision_utils.get_vision_position_ids(t, 2).numpy())
        np.testing.assert_array_equal(ours["cu_seqlens"], vision_utils.get_vision_cu_seqlens(t).numpy())
        assert set(ours) == {"rot_pos_ids", "cu_seqlens"}
        assert all(v.dtype == np.int64 for v in ours.values())


@pytest.mark.parametrize("window_size", [112, 56, 224])
@pytest.mark.parametrize("n_images", [1, 3, 8])
def test_qwen2_5_vl_window_indices(window_size, n_images, rng):
    for _ in range(10):
        grid = _grids(rng, n_images)
        # include grids that are exact multiples of the window (HF pads a whole empty window then)
        grid[0, 1:] = [8, 16]
        ours = gmr_fast.vision_indices(grid, spatial_merge_size=2, window_size=window_size, patch_size=14)
        idx, cu = vision_utils.get_vision_window_index(torch.from_numpy(grid), 2, window_size, 14)
        np.testing.assert_array_equal(ours["window_index"], idx.numpy())
        np.testing.assert_array_equal(ours["cu_window_seqlens"], cu.numpy())


def test_video_style_temporal_grids(rng):
    grid = np.array([[2, 4, 6], [3, 2, 2]], np.int64)
    t = torch.from_numpy(grid)
    ours = gmr_fast.vision_indices(grid, 2, window_size=112)
    np.testing.assert_array_equal(ours["rot_pos_ids"], vision_utils.get_vision_position_ids(t, 2).numpy())
    np.testing.assert_array_equal(ours["cu_seqlens"], vision_utils.get_vision_cu_seqlens(t).numpy())
    idx, cu = vision_utils.get_vision_window_index(t, 2, 112, 14)
    np.testing.assert_array_equal(ours["window_index"], idx.numpy())
    np.testing.assert_array_equal(ours["cu_window_seqlens"], cu.numpy())


def test_indices_follow_preprocessed_grids(rng):
    images = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8) for h, w in rng.integers(30, 600, (4, 2))]
    batch = gmr_fast.preprocess_images(images)
    ind = gmr_fast.vision_indices(batch.image_grid_thw, window_size=112)
    assert ind["rot_pos_ids"].shape == (batch.pixel_values.shape[0], 2)
    assert ind["cu_seqlens"][-1] == batch.pixel_values.shape[0]
    assert ind["window_index"].shape == (batch.pixel_values.shape[0] // 4,)


def test_bad_grid_is_a_clear_error():
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        gmr_fast.vision_indices(np.array([[1, 3, 4]]))
    with pytest.raises(ValueError, match=r"shape \[n, 3\]"):
        gmr_fast.vision_indices(np.array([[1, 4, 4, 4]]))

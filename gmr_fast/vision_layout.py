"""Index tensors that let the vision graph attend per image and per window.

The vision tower attends within segments of its token sequence (one per image; for most
Qwen2.5-VL layers one per window). The exported graph does that on a padded layout
[segments, longest segment]: `gather` picks each segment's tokens (padding points at token 0
and is masked by `valid`), `inverse` maps every token back to its slot. Attention then costs
segments x longest^2 (windows are at most 64 patches), never a dense N x N over the batch.
Everything here depends only on the image grids, so it is computed before the graph runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .preprocess import vision_indices

# the vision graph's index inputs (a versioned contract with the engine manifest)
COMMON_INPUTS = ["pixel_values", "rot_pos_ids", "full_gather", "full_valid", "full_inverse"]
WINDOW_INPUTS = ["window_index", "window_reverse", "window_gather", "window_valid", "window_inverse"]


@dataclass
class SegmentLayout:
    gather: np.ndarray  # int64 [S, Lmax]: token index of slot (s, l); 0 where padding
    valid: np.ndarray  # bool [S, Lmax]: slot holds a token
    inverse: np.ndarray  # int64 [N]: flat slot s * Lmax + l of token n


def segment_layout(cu_seqlens: np.ndarray) -> SegmentLayout:
    """Padded layout of the contiguous segments [cu[s], cu[s+1])."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    lengths = np.diff(cu)
    segments = len(lengths)
    longest = int(lengths.max()) if segments else 0
    slot = np.arange(longest, dtype=np.int64)
    valid = slot[None, :] < lengths[:, None]
    gather = np.where(valid, cu[:-1, None] + slot[None, :], 0)
    total = int(cu[-1]) if len(cu) else 0
    inverse = np.empty(total, dtype=np.int64)
    inverse[gather[valid]] = (np.arange(segments, dtype=np.int64)[:, None] * longest + slot[None, :])[valid]
    return SegmentLayout(gather, valid, inverse)


def vision_graph_inputs(image_grid_thw: np.ndarray, window_size: int | None, spatial_merge_size: int = 2,
                        patch_size: int = 14) -> dict[str, np.ndarray]:
    """Every grid-derived input of the vision graph (besides the patches themselves)."""
    ind = vision_indices(image_grid_thw, spatial_merge_size, window_size, patch_size)
    full = segment_layout(ind["cu_seqlens"])
    out = {"rot_pos_ids": ind["rot_pos_ids"], "full_gather": full.gather, "full_valid": full.valid,
           "full_inverse": full.inverse}
    if window_size:
        win = segment_layout(ind["cu_window_seqlens"])
        window_index = ind["window_index"]
        out.update(window_index=window_index, window_reverse=np.argsort(window_index, kind="stable"),
                   window_gather=win.gather, window_valid=win.valid, window_inverse=win.inverse)
    return out

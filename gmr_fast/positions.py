"""M-RoPE position ids, as HuggingFace's Qwen2-VL `get_rope_index` builds them for images.

Text tokens advance one position on all three axes. An image's merged patches (grid
h/2 x w/2) take temporal = start, height = start + row, width = start + column, and the next
token starts at start + max(h, w) / 2. Padding slots get 1 on every axis (as HF leaves them);
they are masked and never influence real tokens.
"""

from __future__ import annotations

import numpy as np


def rope_positions(length: int, image_spans: list[tuple[int, int]], merged_grids: list[tuple[int, int]]) -> np.ndarray:
    """int64 [3, length] for one unpadded prompt. image_spans[i] = [start, end) of image i's
    pad run; merged_grids[i] = (grid_h / 2, grid_w / 2)."""
    out = np.empty((3, length), np.int64)
    pos, cursor = 0, 0
    for (start, end), (gh, gw) in zip(image_spans, merged_grids):
        if end - start != gh * gw:
            raise ValueError(f"image span of {end - start} tokens does not match a {gh}x{gw} merged grid")
        n_text = start - cursor
        out[:, cursor:start] = pos + np.arange(n_text)
        pos += n_text
        out[0, start:end] = pos
        out[1, start:end] = pos + np.repeat(np.arange(gh), gw)
        out[2, start:end] = pos + np.tile(np.arange(gw), gh)
        pos += max(gh, gw)
        cursor = end
    out[:, cursor:] = pos + np.arange(length - cursor)
    return out

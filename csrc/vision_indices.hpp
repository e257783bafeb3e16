// Index tensors of the Qwen2-VL / Qwen2.5-VL vision tower that depend only on the image grids.
// Equal to transformers.vision_utils.get_vision_{position_ids,cu_seqlens,window_index}.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

namespace gmr {

using GridThw = std::array<int64_t, 3>;  // (t, h, w) in patches

// (h, w) rotary position of every patch, spatial-merge blocks first: flattened [N, 2].
std::vector<int64_t> vision_rot_pos_ids(const std::vector<GridThw>& grids, int64_t merge_size);

// Attention segment boundaries, one segment per frame: [sum(t) + 1].
std::vector<int64_t> vision_cu_seqlens(const std::vector<GridThw>& grids);

struct WindowIndex {
    std::vector<int64_t> window_index;       // [N / merge^2] merged-patch order, window by window
    std::vector<int64_t> cu_window_seqlens;  // [windows + 1] boundaries in patches (empty windows dropped)
};

// Qwen2.5-VL window attention layout; window_size in pixels (112 in released checkpoints).
WindowIndex vision_window_index(const std::vector<GridThw>& grids, int64_t merge_size,
                                int64_t window_size, int64_t patch_size);

}  // namespace gmr

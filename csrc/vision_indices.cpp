#include "vision_indices.hpp"

#include <algorithm>
#include <sstream>

#include "errors.hpp"

namespace gmr {
namespace {

void check_grids(const std::vector<GridThw>& grids, int64_t merge_size) {
    if (merge_size <= 0) throw Error("spatial_merge_size must be positive");
    for (size_t i = 0; i < grids.size(); ++i) {
        const auto& g = grids[i];
        if (g[0] <= 0 || g[1] <= 0 || g[2] <= 0 || g[1] % merge_size != 0 || g[2] % merge_size != 0) {
            std::ostringstream msg;
            msg << "image_grid_thw row " << i << " = [" << g[0] << ", " << g[1] << ", " << g[2]
                << "] must be positive with h and w multiples of spatial_merge_size " << merge_size;
            throw Error(msg.str());
        }
    }
}

}  // namespace

std::vector<int64_t> vision_rot_pos_ids(const std::vector<GridThw>& grids, int64_t m) {
    check_grids(grids, m);
    std::vector<int64_t> out;
    for (const auto& [t, h, w] : grids) {
        for (int64_t frame = 0; frame < t; ++frame)
            for (int64_t bh = 0; bh < h / m; ++bh)
                for (int64_t bw = 0; bw < w / m; ++bw)
                    for (int64_t mh = 0; mh < m; ++mh)
                        for (int64_t mw = 0; mw < m; ++mw) {
                            out.push_back(bh * m + mh);
                            out.push_back(bw * m + mw);
                        }
    }
    return out;
}

std::vector<int64_t> vision_cu_seqlens(const std::vector<GridThw>& grids) {
    check_grids(grids, 1);
    std::vector<int64_t> out{0};
    for (const auto& [t, h, w] : grids)
        for (int64_t frame = 0; frame < t; ++frame) out.push_back(out.back() + h * w);
    return out;
}

WindowIndex vision_window_index(const std::vector<GridThw>& grids, int64_t m, int64_t window_size,
                                int64_t patch_size) {
    check_grids(grids, m);
    if (patch_size <= 0) throw Error("patch_size must be positive");
    const int64_t win = window_size / m / patch_size;  // window side in merged patches
    if (win <= 0) {
        std::ostringstream msg;
        msg << "window_size " << window_size << " is smaller than one merged patch ("
            << m * patch_size << " pixels)";
        throw Error(msg.str());
    }
    WindowIndex out;
    out.cu_window_seqlens.push_back(0);
    int64_t base = 0;
    for (const auto& [t, h, w] : grids) {
        const int64_t lh = h / m, lw = w / m;
        // HF pads every axis by (win - size % win), so a full extra window row/column can
        // appear; it is empty and its boundary repeats, which unique_consecutive drops.
        const int64_t nwh = (lh + win - lh % win) / win, nww = (lw + win - lw % win) / win;
        for (int64_t frame = 0; frame < t; ++frame)
            for (int64_t wh = 0; wh < nwh; ++wh)
                for (int64_t ww = 0; ww < nww; ++ww) {
                    int64_t count = 0;
                    for (int64_t r = wh * win; r < std::min(lh, (wh + 1) * win); ++r)
                        for (int64_t c = ww * win; c < std::min(lw, (ww + 1) * win); ++c) {
                            out.window_index.push_back(base + (frame * lh + r) * lw + c);
                            ++count;
                        }
                    if (count > 0) out.cu_window_seqlens.push_back(out.cu_window_seqlens.back() + count * m * m);
                }
        base += t * lh * lw;
    }
    return out;
}

}  // namespace gmr

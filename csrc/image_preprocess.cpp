#include "image_preprocess.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "errors.hpp"
#include "parallel.hpp"

namespace gmr {

std::pair<int64_t, int64_t> smart_resize(int64_t height, int64_t width, int64_t factor,
                                         int64_t min_pixels, int64_t max_pixels) {
    if (height <= 0 || width <= 0) {
        std::ostringstream msg;
        msg << "image size must be positive, got " << height << "x" << width;
        throw Error(msg.str());
    }
    if (factor <= 0) throw Error("factor must be positive");
    // Every step below is the double arithmetic Python performs in HuggingFace's version;
    // Python's round() is round-half-to-even, which nearbyint gives in the default mode.
    const double hd = static_cast<double>(height), wd = static_cast<double>(width);
    const double ratio = std::max(hd, wd) / std::min(hd, wd);
    if (ratio > 200) {
        std::ostringstream msg;
        msg.precision(17);
        msg << "absolute aspect ratio must be smaller than 200, got " << ratio << " (" << height
            << "x" << width << ")";
        throw Error(msg.str());
    }
    const double f = static_cast<double>(factor);
    int64_t h_bar = static_cast<int64_t>(std::nearbyint(hd / f)) * factor;
    int64_t w_bar = static_cast<int64_t>(std::nearbyint(wd / f)) * factor;
    if (h_bar * w_bar > max_pixels) {
        const double beta = std::sqrt(static_cast<double>(height * width) / static_cast<double>(max_pixels));
        h_bar = std::max(factor, static_cast<int64_t>(std::floor(hd / beta / f)) * factor);
        w_bar = std::max(factor, static_cast<int64_t>(std::floor(wd / beta / f)) * factor);
    } else if (h_bar * w_bar < min_pixels) {
        const double beta = std::sqrt(static_cast<double>(min_pixels) / static_cast<double>(height * width));
        h_bar = static_cast<int64_t>(std::ceil(hd * beta / f)) * factor;
        w_bar = static_cast<int64_t>(std::ceil(wd * beta / f)) * factor;
    }
    return {h_bar, w_bar};
}

int64_t patch_count(int64_t resized_height, int64_t resized_width, const PatchParams& p) {
    return (resized_height / p.patch_size) * (resized_width / p.patch_size);
}

namespace {

// value[c][v] = float32((float32(v * rescale_factor) - mean[c]) / std[c]): numpy's
// `astype(float64) * scale -> astype(float32)`, then float32 subtract and divide.
struct NormalizeTable {
    float value[3][256];
    explicit NormalizeTable(const PatchParams& p) {
        for (int c = 0; c < 3; ++c) {
            for (int v = 0; v < 256; ++v) {
                const float x = static_cast<float>(static_cast<double>(v) * p.rescale_factor);
                value[c][v] = (x - p.mean[c]) / p.std[c];
            }
        }
    }
};

// Writes one band of patch_size resized RGB rows (packed uint8, starting at pixel row y0) into
// the image's patch rows. The band is normalised into planar floats first; then every patch
// of the band is written front to back, so the output is filled sequentially. PS > 0 fixes
// the patch size at compile time for the common case.
template <int PS>
void write_patch_band_impl(const uint8_t* rows, int64_t row_stride, int64_t y0, int64_t width,
                           const PatchParams& p, const NormalizeTable& table, float* image_out) {
    const int64_t ps = PS > 0 ? PS : p.patch_size;
    const int64_t m = p.merge_size, tps = p.temporal_patch_size;
    const int64_t dim = p.patch_dim();
    std::vector<float> plane(static_cast<size_t>(3 * ps * width));  // [c][row in band][x]
    for (int64_t r = 0; r < ps; ++r) {
        const uint8_t* row = rows + r * row_stride;
        for (int c = 0; c < 3; ++c) {
            const float* lut = table.value[c];
            float* pl = plane.data() + (c * ps + r) * width;
            for (int64_t x = 0; x < width; ++x) pl[x] = lut[row[x * 3 + c]];
        }
    }
    const int64_t grid_w = width / ps, blocks_w = grid_w / m;
    const int64_t gy = y0 / ps, bh = gy / m, mh = gy % m;
    for (int64_t gx = 0; gx < grid_w; ++gx) {
        const int64_t bw = gx / m, mw = gx % m;
        float* dst = image_out + (((bh * blocks_w + bw) * m + mh) * m + mw) * dim;
        for (int c = 0; c < 3; ++c) {
            const float* src = plane.data() + c * ps * width + gx * ps;
            for (int64_t t = 0; t < tps; ++t)
                for (int64_t iy = 0; iy < ps; ++iy, dst += ps) std::memcpy(dst, src + iy * width, sizeof(float) * ps);
        }
    }
}

void write_patch_band(const uint8_t* rows, int64_t row_stride, int64_t y0, int64_t width,
                      const PatchParams& p, const NormalizeTable& table, float* image_out) {
    if (p.patch_size == 14)
        write_patch_band_impl<14>(rows, row_stride, y0, width, p, table, image_out);
    else
        write_patch_band_impl<0>(rows, row_stride, y0, width, p, table, image_out);
}

bool vertical_pass_first(const ImageView& img, int64_t out_h, int64_t out_w, bool rule) {
    const int64_t dh = img.height - out_h, dw = img.width - out_w;
    return rule && dh > 0 && dh > dw * 2;
}

// Produces packed RGB output rows [y0, y1) of the resized image into dst (row stride
// out_w * 3), in either of Pillow's pass orders. `horizontal` is the horizontal-first
// intermediate (rows [first_row, ...) of the input, resampled horizontally) or null when the
// vertical pass runs first.
void resized_rows(const ImageView& img, int64_t out_w, const AxisCoeffs& hcoeffs,
                  const AxisCoeffs* vcoeffs, const uint8_t* horizontal, int64_t first_row,
                  int64_t y0, int64_t y1, uint8_t* dst) {
    const int64_t row_elems = out_w * 3;
    if (vcoeffs == nullptr) {  // height unchanged: horizontal pass only
        resample_rows_horizontal(img, y0, y1, hcoeffs, out_w, dst, row_elems);
        return;
    }
    if (horizontal != nullptr) {
        for (int64_t y = y0; y < y1; ++y)
            resample_row_vertical(horizontal, row_elems, row_elems, &vcoeffs->kk[static_cast<size_t>(y) * vcoeffs->ksize],
                                  vcoeffs->start[y] - first_row, vcoeffs->count[y], dst + (y - y0) * row_elems);
        return;
    }
    // Vertical first, on the input's own pixel layout (an RGBX fourth byte is carried along
    // and dropped by the horizontal pass).
    const int64_t in_elems = img.width * img.pixel_stride;
    std::vector<uint8_t> vertical(static_cast<size_t>((y1 - y0) * in_elems));
    for (int64_t y = y0; y < y1; ++y)
        resample_row_vertical(img.data, img.row_stride, in_elems, &vcoeffs->kk[static_cast<size_t>(y) * vcoeffs->ksize],
                              vcoeffs->start[y], vcoeffs->count[y], vertical.data() + (y - y0) * in_elems);
    const ImageView band{vertical.data(), y1 - y0, img.width, img.pixel_stride, in_elems};
    resample_rows_horizontal(band, 0, y1 - y0, hcoeffs, out_w, dst, row_elems);
}

// Runs fn(y0, y1, rows) over bands of `band` output rows of the resized image, bands in
// parallel on num_threads threads; rows holds the band's packed RGB pixels.
template <typename Fn>
void for_each_resized_band(const ImageView& img, int64_t out_h, int64_t out_w, bool rule,
                           int64_t band, int num_threads, Fn&& fn) {
    const int64_t row_elems = out_w * 3;
    const AxisCoeffs hcoeffs = bicubic_axis_coeffs(img.width, out_w);
    AxisCoeffs vcoeffs;
    const bool need_vertical = out_h != img.height;
    if (need_vertical) vcoeffs = bicubic_axis_coeffs(img.height, out_h);
    std::vector<uint8_t> horizontal;
    int64_t first_row = 0;
    if (need_vertical && !vertical_pass_first(img, out_h, out_w, rule)) {
        // Horizontal first, over the input rows the vertical pass reads (as Pillow does).
        first_row = vcoeffs.start[0];
        const int64_t last_row = vcoeffs.start[out_h - 1] + vcoeffs.count[out_h - 1];
        horizontal.resize(static_cast<size_t>((last_row - first_row) * row_elems));
        const int64_t chunk = 64;
        parallel_for((last_row - first_row + chunk - 1) / chunk, num_threads, [&](int64_t i) {
            const int64_t r0 = first_row + i * chunk, r1 = std::min(last_row, r0 + chunk);
            resample_rows_horizontal(img, r0, r1, hcoeffs, out_w, horizontal.data() + (r0 - first_row) * row_elems, row_elems);
        });
    }
    const AxisCoeffs* v = need_vertical ? &vcoeffs : nullptr;
    const uint8_t* h = horizontal.empty() ? nullptr : horizontal.data();
    parallel_for((out_h + band - 1) / band, num_threads, [&](int64_t b) {
        const int64_t y0 = b * band, y1 = std::min(out_h, y0 + band);
        std::vector<uint8_t> rows(static_cast<size_t>((y1 - y0) * row_elems));
        resized_rows(img, out_w, hcoeffs, v, h, first_row, y0, y1, rows.data());
        fn(y0, y1, rows.data());
    });
}

void preprocess_one(const ImageView& img, int64_t out_h, int64_t out_w, const PatchParams& p,
                    const NormalizeTable& table, float* out, int num_threads) {
    // One band = one row of patches: the unit of parallel work inside an image.
    for_each_resized_band(img, out_h, out_w, p.vertical_first_rule, p.patch_size, num_threads,
                          [&](int64_t y0, int64_t, const uint8_t* rows) {
                              write_patch_band(rows, out_w * 3, y0, out_w, p, table, out);
                          });
}

}  // namespace

void preprocess_batch(const std::vector<ImageView>& images,
                      const std::vector<std::pair<int64_t, int64_t>>& resized,
                      const PatchParams& p, float* out, int num_threads) {
    if (images.size() != resized.size()) throw Error("images and resized sizes differ in length");
    const int64_t factor = p.patch_size * p.merge_size;
    std::vector<int64_t> offsets(images.size() + 1, 0);
    for (size_t i = 0; i < images.size(); ++i) {
        const auto [h, w] = resized[i];
        if (h <= 0 || w <= 0 || h % factor != 0 || w % factor != 0) {
            std::ostringstream msg;
            msg << "image " << i << ": resized size " << h << "x" << w
                << " is not a positive multiple of " << factor;
            throw Error(msg.str());
        }
        const ImageView& v = images[i];
        if (v.data == nullptr || v.height <= 0 || v.width <= 0 || (v.pixel_stride != 3 && v.pixel_stride != 4)) {
            std::ostringstream msg;
            msg << "image " << i << ": invalid pixel buffer";
            throw Error(msg.str());
        }
        offsets[i + 1] = offsets[i] + patch_count(h, w, p) * p.patch_dim();
    }
    if (num_threads <= 0) num_threads = hardware_threads();
    const NormalizeTable table(p);
    const int64_t n = static_cast<int64_t>(images.size());
    if (n >= num_threads) {
        // Enough images to keep every thread busy: one image per task.
        parallel_for(n, num_threads, [&](int64_t i) {
            preprocess_one(images[i], resized[i].first, resized[i].second, p, table, out + offsets[i], 1);
        });
    } else {
        for (int64_t i = 0; i < n; ++i)
            preprocess_one(images[i], resized[i].first, resized[i].second, p, table, out + offsets[i], num_threads);
    }
}

void resize_rgb(const ImageView& img, int64_t out_height, int64_t out_width,
                bool vertical_first_rule, uint8_t* out) {
    if (out_height <= 0 || out_width <= 0) throw Error("resize target must be positive");
    const int64_t row_elems = out_width * 3;
    for_each_resized_band(img, out_height, out_width, vertical_first_rule, 64, 1,
                          [&](int64_t y0, int64_t y1, const uint8_t* rows) {
                              std::memcpy(out + y0 * row_elems, rows, static_cast<size_t>((y1 - y0) * row_elems));
                          });
}

}  // namespace gmr

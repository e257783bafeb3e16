// Bicubic resampling that reproduces Pillow's Image.resize(..., BICUBIC) on 8-bit RGB bit for bit:
// separable two-pass convolution (horizontal first, rounded to uint8, then vertical), cubic
// kernel with a = -0.5 whose support widens with the downscale factor, coefficients normalised
// in double and then quantised to 22 fractional bits, integer accumulation with rounding bias.
#pragma once

#include <cstdint>
#include <vector>

namespace gmr {

// Pixels of an 8-bit RGB image in memory: channel c of pixel (y, x) is
// data[y * row_stride + x * pixel_stride + c]. pixel_stride is 3 (packed RGB) or 4 (RGBX).
struct ImageView {
    const uint8_t* data = nullptr;
    int64_t height = 0;
    int64_t width = 0;
    int64_t pixel_stride = 3;
    int64_t row_stride = 0;
};

// Filter taps for one axis: output position i reads `count[i]` input samples starting at
// `start[i]` with fixed-point weights kk[i * ksize + t].
struct AxisCoeffs {
    int ksize = 0;
    std::vector<int32_t> start;
    std::vector<int32_t> count;
    std::vector<int32_t> kk;
};

AxisCoeffs bicubic_axis_coeffs(int64_t in_size, int64_t out_size);

// Horizontal pass over input rows [row_begin, row_end): writes packed RGB rows of
// out_width pixels to dst (row r goes to dst + (r - row_begin) * dst_stride).
// When the width does not change this is an exact copy (Pillow skips the pass).
void resample_rows_horizontal(const ImageView& src, int64_t row_begin, int64_t row_end,
                              const AxisCoeffs& coeffs, int64_t out_width, uint8_t* dst,
                              int64_t dst_stride);

// Vertical pass for one output row: dst[j] = clip8(sum_t src[(start + t) * src_stride + j] * k[t]).
void resample_row_vertical(const uint8_t* src, int64_t src_stride, int64_t row_elems,
                           const int32_t* k, int64_t start, int count, uint8_t* dst);

}  // namespace gmr

#include "resample.hpp"

#include <emmintrin.h>  // SSE2: part of the x86-64 baseline

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define GMR_HAVE_AVX2_KERNELS 1
#endif

namespace gmr {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // as Pillow: 8 bits result, 2 bits headroom
constexpr int32_t kRoundBias = 1 << (kPrecisionBits - 1);
constexpr double kSupport = 2.0;             // bicubic
constexpr int kLanes = 16;                   // rows per horizontal block = bytes per SSE vector

inline double cubic(double x) {
    constexpr double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

inline uint8_t clip8(int32_t acc) {
    const int32_t v = acc >> kPrecisionBits;  // arithmetic shift, as Pillow's table lookup
    return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// out[j] = column j of the 16x16 byte matrix whose rows are in[0..15].
inline void transpose16x16(const __m128i in[16], __m128i out[16]) {
    __m128i t[16], u[16], v[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm_unpacklo_epi8(in[2 * i], in[2 * i + 1]);
        t[2 * i + 1] = _mm_unpackhi_epi8(in[2 * i], in[2 * i + 1]);
    }
    for (int g = 0; g < 4; ++g) {  // rows 4g..4g+3
        const __m128i* q = t + 4 * g;
        u[4 * g + 0] = _mm_unpacklo_epi16(q[0], q[2]);
        u[4 * g + 1] = _mm_unpackhi_epi16(q[0], q[2]);
        u[4 * g + 2] = _mm_unpacklo_epi16(q[1], q[3]);
        u[4 * g + 3] = _mm_unpackhi_epi16(q[1], q[3]);
    }
    for (int g = 0; g < 2; ++g) {  // rows 8g..8g+7
        const __m128i* q = u + 8 * g;
        for (int k = 0; k < 4; ++k) {
            v[8 * g + 2 * k] = _mm_unpacklo_epi32(q[k], q[k + 4]);
            v[8 * g + 2 * k + 1] = _mm_unpackhi_epi32(q[k], q[k + 4]);
        }
    }
    for (int k = 0; k < 8; ++k) {
        out[2 * k] = _mm_unpacklo_epi64(v[k], v[k + 8]);
        out[2 * k + 1] = _mm_unpackhi_epi64(v[k], v[k + 8]);
    }
}

// Bytes [0, len) of 16 rows -> dst[j * 16 + r] = rows[r][j].
void rows_to_columns(const uint8_t* const rows[kLanes], int64_t len, uint8_t* dst) {
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) {
        __m128i in[16], out[16];
        for (int r = 0; r < 16; ++r) in[r] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + j));
        transpose16x16(in, out);
        for (int c = 0; c < 16; ++c) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (j + c) * 16), out[c]);
    }
    for (; j < len; ++j)
        for (int r = 0; r < 16; ++r) dst[j * 16 + r] = rows[r][j];
}

// The inverse, storing only the first nrows rows.
void columns_to_rows(const uint8_t* src, int64_t len, int nrows, uint8_t* const rows[kLanes]) {
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) {
        __m128i in[16], out[16];
        for (int c = 0; c < 16; ++c) in[c] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + (j + c) * 16));
        transpose16x16(in, out);
        for (int r = 0; r < nrows; ++r) _mm_storeu_si128(reinterpret_cast<__m128i*>(rows[r] + j), out[r]);
    }
    for (; j < len; ++j)
        for (int r = 0; r < nrows; ++r) rows[r][j] = src[j * 16 + r];
}

// Horizontal taps on column-major data: in = [width * pixel_stride][16 rows],
// out = [out_width * 3][16 rows]. Portable version; the AVX2 one below computes the same sums.
void horizontal_columns_scalar(const uint8_t* in, int64_t pixel_stride, const AxisCoeffs& cf,
                               int64_t out_width, uint8_t* out) {
    const int64_t tap_step = pixel_stride * kLanes;
    for (int64_t xx = 0; xx < out_width; ++xx) {
        const int32_t* k = &cf.kk[static_cast<size_t>(xx) * cf.ksize];
        const uint8_t* base = in + cf.start[xx] * tap_step;
        for (int j = 0; j < 3 * kLanes; ++j) {
            int32_t acc = kRoundBias;
            for (int t = 0; t < cf.count[xx]; ++t) acc += static_cast<int32_t>(base[t * tap_step + j]) * k[t];
            out[xx * 3 * kLanes + j] = clip8(acc);
        }
    }
}

// dst[j] = clip8(sum_t src[t * src_stride + j] * k[t]) for j in [0, len).
void vertical_scalar(const uint8_t* src, int64_t src_stride, const int32_t* k, int count,
                     int64_t len, uint8_t* dst) {
    for (int64_t j = 0; j < len; ++j) {
        int32_t acc = kRoundBias;
        for (int t = 0; t < count; ++t) acc += static_cast<int32_t>(src[t * src_stride + j]) * k[t];
        dst[j] = clip8(acc);
    }
}

#ifdef GMR_HAVE_AVX2_KERNELS
#define GMR_AVX2 __attribute__((target("avx2")))

GMR_AVX2 inline __m256i widen8(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

GMR_AVX2 inline __m256i madd(__m256i acc, const uint8_t* p, __m256i k) {
    return _mm256_add_epi32(acc, _mm256_mullo_epi32(widen8(p), k));
}

// 4 x 8 accumulators -> 32 bytes in order, each clip8(acc >> 22): the shift leaves values in
// [-512, 511], which the saturating packs clamp to [0, 255] exactly like Pillow's table.
GMR_AVX2 inline __m256i pack32(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i ab = _mm256_packs_epi32(_mm256_srai_epi32(a, kPrecisionBits), _mm256_srai_epi32(b, kPrecisionBits));
    const __m256i cd = _mm256_packs_epi32(_mm256_srai_epi32(c, kPrecisionBits), _mm256_srai_epi32(d, kPrecisionBits));
    return _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

GMR_AVX2 void horizontal_columns_avx2(const uint8_t* in, int64_t pixel_stride, const AxisCoeffs& cf,
                                      int64_t out_width, uint8_t* out) {
    const int64_t tap_step = pixel_stride * kLanes;
    const __m256i bias = _mm256_set1_epi32(kRoundBias);
    for (int64_t xx = 0; xx < out_width; ++xx) {
        const int32_t* k = &cf.kk[static_cast<size_t>(xx) * cf.ksize];
        const int count = cf.count[xx];
        const uint8_t* base = in + cf.start[xx] * tap_step;
        // 3 channels x 16 rows = 6 vectors of 8 lanes.
        __m256i a0 = bias, a1 = bias, a2 = bias, a3 = bias, a4 = bias, a5 = bias;
        for (int t = 0; t < count; ++t) {
            const __m256i kv = _mm256_set1_epi32(k[t]);
            const uint8_t* s = base + t * tap_step;
            a0 = madd(a0, s, kv);
            a1 = madd(a1, s + 8, kv);
            a2 = madd(a2, s + 16, kv);
            a3 = madd(a3, s + 24, kv);
            a4 = madd(a4, s + 32, kv);
            a5 = madd(a5, s + 40, kv);
        }
        uint8_t* o = out + xx * 3 * kLanes;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), pack32(a0, a1, a2, a3));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 32), _mm256_castsi256_si128(pack32(a4, a5, a4, a5)));
    }
}

GMR_AVX2 void vertical_avx2(const uint8_t* src, int64_t src_stride, const int32_t* k, int count,
                            int64_t len, uint8_t* dst) {
    const __m256i bias = _mm256_set1_epi32(kRoundBias);
    int64_t j = 0;
    for (; j + 32 <= len; j += 32) {
        __m256i a0 = bias, a1 = bias, a2 = bias, a3 = bias;
        for (int t = 0; t < count; ++t) {
            const uint8_t* s = src + t * src_stride + j;
            const __m256i kv = _mm256_set1_epi32(k[t]);
            a0 = madd(a0, s, kv);
            a1 = madd(a1, s + 8, kv);
            a2 = madd(a2, s + 16, kv);
            a3 = madd(a3, s + 24, kv);
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), pack32(a0, a1, a2, a3));
    }
    vertical_scalar(src + j, src_stride, k, count, len - j, dst + j);
}
#endif

using HorizontalFn = void (*)(const uint8_t*, int64_t, const AxisCoeffs&, int64_t, uint8_t*);
using VerticalFn = void (*)(const uint8_t*, int64_t, const int32_t*, int, int64_t, uint8_t*);

struct Kernels {
    HorizontalFn horizontal = horizontal_columns_scalar;
    VerticalFn vertical = vertical_scalar;
    Kernels() {
#ifdef GMR_HAVE_AVX2_KERNELS
        if (__builtin_cpu_supports("avx2")) {
            horizontal = horizontal_columns_avx2;
            vertical = vertical_avx2;
        }
#endif
    }
};

const Kernels& kernels() {
    static const Kernels k;
    return k;
}

}  // namespace

AxisCoeffs bicubic_axis_coeffs(int64_t in_size, int64_t out_size) {
    // Mirrors Pillow's precompute_coeffs + normalize_coeffs_8bpc for box (0, in_size):
    // the box edges are floats there, the arithmetic double.
    AxisCoeffs cf;
    const double scale = static_cast<double>(static_cast<float>(in_size) - 0.0f) / out_size;
    const double filterscale = scale < 1.0 ? 1.0 : scale;
    const double support = kSupport * filterscale;
    cf.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
    cf.start.resize(out_size);
    cf.count.resize(out_size);
    cf.kk.assign(static_cast<size_t>(out_size) * cf.ksize, 0);
    std::vector<double> w(cf.ksize);
    const double ss = 1.0 / filterscale;
    for (int64_t xx = 0; xx < out_size; ++xx) {
        const double center = 0.0 + (xx + 0.5) * scale;
        int xmin = static_cast<int>(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = static_cast<int>(center + support + 0.5);
        if (xmax > in_size) xmax = static_cast<int>(in_size);
        xmax -= xmin;
        double ww = 0.0;
        for (int x = 0; x < xmax; ++x) {
            w[x] = cubic((x + xmin - center + 0.5) * ss);
            ww += w[x];
        }
        int32_t* k = &cf.kk[static_cast<size_t>(xx) * cf.ksize];
        for (int x = 0; x < xmax; ++x) {
            const double v = ww != 0.0 ? w[x] / ww : w[x];
            k[x] = v < 0 ? static_cast<int32_t>(-0.5 + v * (1 << kPrecisionBits))
                         : static_cast<int32_t>(0.5 + v * (1 << kPrecisionBits));
        }
        cf.start[xx] = xmin;
        cf.count[xx] = xmax;
    }
    return cf;
}

void resample_rows_horizontal(const ImageView& src, int64_t row_begin, int64_t row_end,
                              const AxisCoeffs& cf, int64_t out_width, uint8_t* dst,
                              int64_t dst_stride) {
    const int64_t ps = src.pixel_stride;
    if (out_width == src.width) {  // no horizontal pass in Pillow: pack the rows as they are
        for (int64_t y = row_begin; y < row_end; ++y) {
            const uint8_t* s = src.data + y * src.row_stride;
            uint8_t* d = dst + (y - row_begin) * dst_stride;
            if (ps == 3) {
                std::memcpy(d, s, static_cast<size_t>(out_width) * 3);
            } else {
                for (int64_t x = 0; x < out_width; ++x) {
                    d[3 * x] = s[ps * x];
                    d[3 * x + 1] = s[ps * x + 1];
                    d[3 * x + 2] = s[ps * x + 2];
                }
            }
        }
        return;
    }
    // 16 rows at a time: transpose to column-major so each filter tap is one 16-lane vector
    // operation over the rows, then transpose the result back.
    std::vector<uint8_t> in_cols(static_cast<size_t>(src.width * ps * kLanes));
    std::vector<uint8_t> out_cols(static_cast<size_t>(out_width * 3 * kLanes));
    for (int64_t y0 = row_begin; y0 < row_end; y0 += kLanes) {
        const int nrows = static_cast<int>(std::min<int64_t>(kLanes, row_end - y0));
        const uint8_t* in_rows[kLanes];
        uint8_t* out_rows[kLanes];
        for (int r = 0; r < kLanes; ++r) {
            // Missing rows of a short block repeat the last real row; they are never stored.
            in_rows[r] = src.data + (y0 + std::min(r, nrows - 1)) * src.row_stride;
            out_rows[r] = dst + (y0 - row_begin + std::min(r, nrows - 1)) * dst_stride;
        }
        rows_to_columns(in_rows, src.width * ps, in_cols.data());
        kernels().horizontal(in_cols.data(), ps, cf, out_width, out_cols.data());
        columns_to_rows(out_cols.data(), out_width * 3, nrows, out_rows);
    }
}

void resample_row_vertical(const uint8_t* src, int64_t src_stride, int64_t row_elems,
                           const int32_t* k, int64_t start, int count, uint8_t* dst) {
    kernels().vertical(src + start * src_stride, src_stride, k, count, row_elems, dst);
}

}  // namespace gmr

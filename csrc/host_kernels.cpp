#include "host_kernels.hpp"

#include <cmath>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// one build for every x86-64 CPU; the loader picks the widest clone the CPU runs
#define GMR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GMR_CLONES
#endif

namespace gmr {
namespace {

inline float widen(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// c10::BFloat16's round to nearest even (NaN -> 0x7FC0)
inline uint16_t round_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t nan = (u & 0x7fffffffu) > 0x7f800000u;
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return uint16_t(nan ? 0x7fc0u : rounded);
}

GMR_CLONES void rope_row(uint16_t* t, int64_t blocks, int64_t d, const float* c, const float* s, bool signed_sin) {
    const int64_t half = d / 2;
    const float flip = signed_sin ? 1.0f : -1.0f;  // exact: (-a) * b == a * (-b) == -(a * b)
    float buf[512];
    for (int64_t h = 0; h < blocks; ++h, t += d) {
        for (int64_t i = 0; i < half; ++i) {
            float a = widen(t[i]) * c[i];
            float b = (flip * widen(t[i + half])) * s[i];
            buf[i] = a + b;
        }
        for (int64_t i = half; i < d; ++i) {
            float a = widen(t[i]) * c[i];
            float b = widen(t[i - half]) * s[i];
            buf[i] = a + b;
        }
        for (int64_t i = 0; i < d; ++i) t[i] = round_bf16(buf[i]);
    }
}

GMR_CLONES void rms_norm_row(const uint16_t* x, const uint16_t* res, uint16_t* sum_out, uint16_t* out,
                             const uint16_t* w, int64_t cols, float eps) {
    if (res != nullptr) {
        for (int64_t i = 0; i < cols; ++i) sum_out[i] = round_bf16(widen(x[i]) + widen(res[i]));
        x = sum_out;
    }
    // 16 running sums (vectorizable without reassociating one sum)
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= cols; i += 16)
        for (int j = 0; j < 16; ++j) {
            float h = widen(x[i + j]);
            acc[j] += h * h;
        }
    float total = 0.0f;
    for (int j = 0; j < 16; ++j) total += acc[j];
    for (; i < cols; ++i) {
        float h = widen(x[i]);
        total += h * h;
    }
    float r = 1.0f / std::sqrt(total / float(cols) + eps);
    for (int64_t k = 0; k < cols; ++k) out[k] = round_bf16(widen(w[k]) * widen(round_bf16(widen(x[k]) * r)));
}

GMR_CLONES void rms_norm_row_f32(const float* x, const uint16_t* res, float* sum_out, uint16_t* out, const float* w,
                                 int64_t cols, float eps) {
    if (res != nullptr) {
        for (int64_t i = 0; i < cols; ++i) sum_out[i] = x[i] + widen(res[i]);
        x = sum_out;
    }
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= cols; i += 16)
        for (int j = 0; j < 16; ++j) acc[j] += x[i + j] * x[i + j];
    float total = 0.0f;
    for (int j = 0; j < 16; ++j) total += acc[j];
    for (; i < cols; ++i) total += x[i] * x[i];
    float r = 1.0f / std::sqrt(total / float(cols) + eps);
    for (int64_t k = 0; k < cols; ++k) out[k] = round_bf16((x[k] * r) * w[k]);
}

}  // namespace

void rope_bf16(uint16_t* t, int64_t rows, int64_t row_stride, int64_t blocks, int64_t head_dim, const float* cos,
               const float* sin, bool signed_sin) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
        rope_row(t + r * row_stride, blocks, head_dim, cos + r * head_dim, sin + r * head_dim, signed_sin);
}

void rms_norm_bf16(const uint16_t* x, const uint16_t* residual, uint16_t* sum_out, uint16_t* out,
                   const uint16_t* weight, int64_t rows, int64_t cols, float eps) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
        rms_norm_row(x + r * cols, residual ? residual + r * cols : nullptr, sum_out ? sum_out + r * cols : nullptr,
                     out + r * cols, weight, cols, eps);
}

void rms_norm_f32_bf16(const float* x, const uint16_t* residual, float* sum_out, uint16_t* out, const float* weight,
                       int64_t rows, int64_t cols, float eps) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
        rms_norm_row_f32(x + r * cols, residual ? residual + r * cols : nullptr, sum_out ? sum_out + r * cols : nullptr,
                         out + r * cols, weight, cols, eps);
}

}  // namespace gmr

// Fused elementwise passes of the torch backend's CPU runs (gmr_fast._kernels; Python side:
// gmr_fast.backends.host_kernels). Eager torch makes a pass over memory per operation: a vision
// block's RMSNorm takes eight (widen, square, sum, scale, round, multiply, ...) and its RoPE seven
// per projection. Profiled on an Intel Xeon with AMX (GMR-3B vision tower, bf16, one thread): RoPE
// took 15% of a 624-token image's time, the norms and residual additions 11%, the GEMMs 50%.
// Each function here is one pass with the same arithmetic as the torch operations it replaces:
// fp32 arithmetic on values widened from bf16, each operation rounded to fp32 as torch rounds it
// (the file builds with -ffp-contract=off: no fused multiply-adds), bf16 results rounded to
// nearest even as c10::BFloat16 rounds. RoPE is torch's bit for bit; the norm's sum of squares
// runs in another order than torch's, so its scale may differ in the last fp32 bit and an output
// round to the other bf16 neighbour (tests/test_host_kernels.py states the bound). SwiGLU's
// silu(gate) * up, fused the same way (with a vectorized exp), ran no faster than torch's two
// passes there (division- and exp-bound in bf16, memory-bound in fp32), so it is not here.
//
// Rows run in parallel on OpenMP threads: the extension links libgomp by its soname, and torch's
// wheel loads its own libgomp.so.1 first, so both share one runtime and the calling thread's
// thread count (set per lane by the torch backend) governs both.
#pragma once

#include <cstdint>

namespace gmr {

// In place, the first ``blocks`` blocks of head_dim values of each of ``rows`` rows of ``t`` (bf16
// words, ``row_stride`` words apart; a vision qkv product's queries and keys, a decoder's queries,
// or the keys of its key/value product): t -> t * cos + rotate_half(t) * sin, rotate_half(t) =
// (-t[half:], t[:half]), cos and sin fp32 [rows, head_dim], rounded to bf16 once. With
// ``signed_sin`` sin arrives with its first half negated (graphs.decoder.eager_rope), which gives
// the same values.
void rope_bf16(uint16_t* t, int64_t rows, int64_t row_stride, int64_t blocks, int64_t head_dim, const float* cos,
               const float* sin, bool signed_sin);

// HF's Qwen2 RMSNorm of a bf16 [rows, cols] input: h = float(x); h * (1 / sqrt(mean(h^2) + eps))
// rounded to bf16, times the bf16 weight, rounded to bf16. With ``residual`` the input is first
// x + residual rounded to bf16 (torch's bf16 addition), written to ``sum_out``.
void rms_norm_bf16(const uint16_t* x, const uint16_t* residual, uint16_t* sum_out, uint16_t* out,
                   const uint16_t* weight, int64_t rows, int64_t cols, float eps);

// torch's F.rms_norm of an fp32 [rows, cols] input, (x * (1 / sqrt(mean(x^2) + eps))) * weight in
// fp32, rounded to bf16 for the projection that follows (the bf16 decoder's fp32 stream,
// graphs.decoder). With ``residual`` (bf16) the input is first x + residual in fp32, written to
// ``sum_out``.
void rms_norm_f32_bf16(const float* x, const uint16_t* residual, float* sum_out, uint16_t* out, const float* weight,
                       int64_t rows, int64_t cols, float eps);

}  // namespace gmr

// A bf16 x bf16 matrix product with an fp32 (or bf16) result, on oneDNN's own kernels, over a
// weight packed once. torch 2.13 on a CPU rounds a bf16 GEMM's output to bf16 and offers no fp32
// output (aten::mm.dtype has no CPU kernel), so its fp32-output products took two bf16 GEMMs
// (graphs.common.Proj "split"); oneDNN computes bf16 inputs into an fp32 destination directly.
// Built only where oneDNN's headers and library were found (CMakeLists.txt: gmr_fast._dnnl).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include <oneapi/dnnl/dnnl.hpp>

namespace gmr {

class PackedBf16Weight {
public:
    // weight: n x k bf16 words, row-major ([out, in], as nn.Linear stores it). Packed into the
    // layout oneDNN's kernel picks for it (kept; the caller may free its copy).
    PackedBf16Weight(const uint16_t* weight, int64_t n, int64_t k);

    // y[m, n] = x[m, k] . weight^T (+ bias[n]) (+ y when accumulate), fp32 accumulation;
    // x bf16 row-major, y fp32 or (y_bf16) bf16 row-major, bias fp32 or null. Thread-safe.
    void multiply(const uint16_t* x, int64_t m, void* y, bool y_bf16, const float* bias, bool accumulate);

    int64_t n() const { return n_; }
    int64_t k() const { return k_; }
    size_t bytes() const { return packed_md_.get_size(); }
    // oneDNN's name for the kernel a product of m rows runs (e.g. "brg:avx512_core_bf16")
    std::string kernel(int64_t m);

private:
    using Key = std::tuple<int64_t, bool, bool, bool>;  // rows, bf16 out, bias, accumulate
    struct Prim {
        dnnl::matmul matmul;
        dnnl::memory::desc scratch;
    };
    // by value (handles): another thread's call may clear the cache once the lock is released
    Prim primitive(int64_t m, bool y_bf16, bool bias, bool accumulate);

    int64_t n_, k_;
    dnnl::memory::desc packed_md_;
    dnnl::memory packed_;
    std::mutex mu_;
    std::map<Key, Prim> cache_;
};

}  // namespace gmr

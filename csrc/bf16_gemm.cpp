#include "bf16_gemm.hpp"

#include <unordered_map>
#include <vector>

#include "errors.hpp"

namespace gmr {

namespace {

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

dnnl::engine& cpu() {
    static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
    return engine;
}

// Rows the weight's layout is chosen for. oneDNN's blocked bf16 layouts do not depend on the row
// count, but the choice is made once, for a typical batch, and every other row count must take it.
constexpr int64_t kPackRows = 512;
// Row counts vary with every batch: a weight keeps this many primitives, then starts again. Few:
// a primitive held here outlives oneDNN's own cache of them (bounded by gmr_fast.memory), ~1.6 MB
// each at GMR-3B's widths, and the model's layers share their shapes' primitives through that
// cache, so what a layer keeps here saves only the descriptor's lookup. At 256 an image workload's
// new row counts held up to 256 per weight, 30 weights at 6 layers.
constexpr size_t kMaxPrimitives = 16;

// Kernels oneDNN falls back to when its bf16 hardware kernels do not apply: correct, but far
// slower than two bf16 GEMMs in torch, so a product that would run one is refused.
bool slow_kernel(const std::string& impl) {
    return impl.find("ref") != std::string::npos || impl.find("gemm:") != std::string::npos;
}

dnnl::matmul::primitive_desc describe(int64_t m, int64_t n, int64_t k, const dnnl::memory::desc& weights,
                                      bool y_bf16, bool bias, bool accumulate) {
    dnnl::memory::desc x_md({m, k}, dt::bf16, tag::ab);
    dnnl::memory::desc y_md({m, n}, y_bf16 ? dt::bf16 : dt::f32, tag::ab);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // one scratchpad per call: concurrent calls
    if (accumulate) {
        dnnl::post_ops ops;
        ops.append_sum(1.f);
        attr.set_post_ops(ops);
    }
    if (bias) {
        dnnl::memory::desc b_md({1, n}, dt::f32, tag::ab);
        return dnnl::matmul::primitive_desc(cpu(), x_md, weights, b_md, y_md, attr);
    }
    return dnnl::matmul::primitive_desc(cpu(), x_md, weights, y_md, attr);
}

}  // namespace

PackedBf16Weight::PackedBf16Weight(const uint16_t* weight, int64_t n, int64_t k) : n_(n), k_(k) {
    if (n <= 0 || k <= 0) throw Error("bf16 GEMM: empty weight");
    try {
        dnnl::memory::desc any({k, n}, dt::bf16, tag::any);
        auto pd = describe(kPackRows, n, k, any, false, false, false);
        std::string impl = pd.impl_info_str();
        if (slow_kernel(impl)) throw Error("bf16 GEMM: oneDNN has no bf16 hardware kernel here (" + impl + ")");
        packed_md_ = pd.weights_desc();
        // [k, n] read column-major is the [n, k] row-major weight as given
        dnnl::memory plain({{k, n}, dt::bf16, tag::ba}, cpu(), const_cast<uint16_t*>(weight));
        packed_ = dnnl::memory(packed_md_, cpu());
        dnnl::stream stream(cpu());
        dnnl::reorder(plain, packed_).execute(stream, plain, packed_);
        stream.wait();
    } catch (const dnnl::error& e) {
        throw Error(std::string("bf16 GEMM: oneDNN: ") + e.what());
    }
}

PackedBf16Weight::Prim PackedBf16Weight::primitive(int64_t m, bool y_bf16, bool bias, bool accumulate) {
    Key key{m, y_bf16, bias, accumulate};
    std::lock_guard<std::mutex> lock(mu_);
    auto it = cache_.find(key);
    if (it != cache_.end()) return it->second;
    if (cache_.size() >= kMaxPrimitives) cache_.clear();
    auto pd = describe(m, n_, k_, packed_md_, y_bf16, bias, accumulate);
    std::string impl = pd.impl_info_str();
    if (slow_kernel(impl)) throw Error("bf16 GEMM: oneDNN would run " + impl + " for " + std::to_string(m) + " rows");
    return cache_.emplace(key, Prim{dnnl::matmul(pd), pd.scratchpad_desc()}).first->second;
}

void PackedBf16Weight::multiply(const uint16_t* x, int64_t m, void* y, bool y_bf16, const float* bias,
                                bool accumulate) {
    if (m <= 0) return;
    try {
        Prim prim = primitive(m, y_bf16, bias != nullptr, accumulate);
        dnnl::memory x_mem({{m, k_}, dt::bf16, tag::ab}, cpu(), const_cast<uint16_t*>(x));
        dnnl::memory y_mem({{m, n_}, y_bf16 ? dt::bf16 : dt::f32, tag::ab}, cpu(), y);
        std::vector<uint8_t> scratch(prim.scratch.get_size());
        dnnl::memory scratch_mem(prim.scratch, cpu(), scratch.data());
        std::unordered_map<int, dnnl::memory> args{
            {DNNL_ARG_SRC, x_mem}, {DNNL_ARG_WEIGHTS, packed_}, {DNNL_ARG_DST, y_mem}, {DNNL_ARG_SCRATCHPAD, scratch_mem}};
        if (bias != nullptr) args.emplace(DNNL_ARG_BIAS, dnnl::memory({{1, n_}, dt::f32, tag::ab}, cpu(), const_cast<float*>(bias)));
        dnnl::stream stream(cpu());
        prim.matmul.execute(stream, args);
        stream.wait();
    } catch (const dnnl::error& e) {
        throw Error(std::string("bf16 GEMM: oneDNN: ") + e.what());
    }
}

std::string PackedBf16Weight::kernel(int64_t m) {
    try {
        return describe(m, n_, k_, packed_md_, false, false, false).impl_info_str();
    } catch (const dnnl::error& e) {
        throw Error(std::string("bf16 GEMM: oneDNN: ") + e.what());
    }
}

}  // namespace gmr

// gmr_fast._kernels: the fused elementwise passes of host_kernels.hpp over numpy views of torch's
// tensors (bf16 as int16 words), a module of its own because it links OpenMP, which must be the
// runtime torch already loaded (gmr_fast.backends.host_kernels imports torch first). Shapes are
// checked here; the GIL is released around every pass.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "host_kernels.hpp"
#include "module_support.hpp"

namespace py = pybind11;

namespace {

const char* const kContext = "host kernels";

void need(const py::array& a, int64_t ndim, int64_t itemsize, const char* what) {
    gmr::need_array(a, ndim, itemsize, -1, kContext, what);
}

void need_writeable(const py::array& a, const char* what) { gmr::need_writeable(a, kContext, what); }

void rope(py::array& t, const py::array& cos, const py::array& sin, int64_t blocks, int64_t head_dim,
          bool signed_sin) {
    need(t, 2, 2, "t (bf16 words)");
    need(cos, 2, 4, "cos (float32)");
    need(sin, 2, 4, "sin (float32)");
    need_writeable(t, "t");
    int64_t rows = t.shape(0);
    if (head_dim <= 0 || head_dim % 2 || head_dim > 512 || blocks <= 0)
        throw gmr::Error("host kernels: RoPE needs an even head_dim of at most 512 and at least one head");
    if (t.shape(1) < blocks * head_dim) throw gmr::Error("host kernels: t has fewer than blocks x head_dim columns");
    for (const py::array* a : {&cos, &sin})
        if (a->shape(0) != rows || a->shape(1) != head_dim)
            throw gmr::Error("host kernels: cos and sin must be [rows of t, head_dim]");
    auto* tp = static_cast<uint16_t*>(t.mutable_data());
    const auto* c = static_cast<const float*>(cos.data());
    const auto* s = static_cast<const float*>(sin.data());
    int64_t stride = t.shape(1);
    py::gil_scoped_release release;
    gmr::rope_bf16(tp, rows, stride, blocks, head_dim, c, s, signed_sin);
}

// The RMSNorm passes, both with a bf16 result (and a bf16 residual): over bf16 rows
// (``In`` uint16_t: x, sum_out and weight bf16 words) or over the fp32 stream (``In`` float).
template <typename In>
void rms_norm_of(const py::array& x, const py::object& residual, const py::object& sum_out, py::array& out,
                 const py::array& weight, float eps,
                 void (*pass)(const In*, const uint16_t*, In*, uint16_t*, const In*, int64_t, int64_t, float)) {
    const std::string kind = sizeof(In) == 2 ? " (bf16 words)" : " (float32)";
    need(x, 2, sizeof(In), ("x" + kind).c_str());
    need(out, 2, 2, "out (bf16 words)");
    need(weight, 1, sizeof(In), ("weight" + kind).c_str());
    need_writeable(out, "out");
    int64_t rows = x.shape(0), cols = x.shape(1);
    if (out.shape(0) != rows || out.shape(1) != cols || weight.shape(0) != cols)
        throw gmr::Error("host kernels: x, out and weight of RMSNorm disagree in shape");
    const uint16_t* r = nullptr;
    In* s = nullptr;
    py::array res, sum;
    if (!residual.is_none()) {
        res = residual.cast<py::array>();
        sum = sum_out.cast<py::array>();
        need(res, 2, 2, "residual (bf16 words)");
        need(sum, 2, sizeof(In), ("sum_out" + kind).c_str());
        need_writeable(sum, "sum_out");
        if (res.shape(0) != rows || res.shape(1) != cols || sum.shape(0) != rows || sum.shape(1) != cols)
            throw gmr::Error("host kernels: residual and sum_out must have x's shape");
        r = static_cast<const uint16_t*>(res.data());
        s = static_cast<In*>(sum.mutable_data());
    }
    const auto* xp = static_cast<const In*>(x.data());
    auto* op = static_cast<uint16_t*>(out.mutable_data());
    const auto* wp = static_cast<const In*>(weight.data());
    py::gil_scoped_release release;
    pass(xp, r, s, op, wp, rows, cols, eps);
}

void rms_norm(const py::array& x, const py::object& residual, const py::object& sum_out, py::array& out,
              const py::array& weight, float eps) {
    rms_norm_of<uint16_t>(x, residual, sum_out, out, weight, eps, gmr::rms_norm_bf16);
}

void rms_norm_f32(const py::array& x, const py::object& residual, const py::object& sum_out, py::array& out,
                  const py::array& weight, float eps) {
    rms_norm_of<float>(x, residual, sum_out, out, weight, eps, gmr::rms_norm_f32_bf16);
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
    m.doc() = "fused elementwise passes of the torch backend's CPU runs (gmr_fast.backends.host_kernels wraps them)";
    gmr::translate_core_errors(/*local=*/true);
    m.def("rope", &rope, py::arg("t"), py::arg("cos"), py::arg("sin"), py::arg("blocks"), py::arg("head_dim"),
          py::arg("signed_sin") = false, "RoPE in place on the first blocks heads of each bf16 row (host_kernels.hpp)");
    m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("residual"), py::arg("sum_out"), py::arg("out"),
          py::arg("weight"), py::arg("eps"), "bf16 RMSNorm, optionally of x + residual (host_kernels.hpp)");
    m.def("rms_norm_f32", &rms_norm_f32, py::arg("x"), py::arg("residual"), py::arg("sum_out"), py::arg("out"),
          py::arg("weight"), py::arg("eps"), "fp32 RMSNorm rounded to bf16, optionally of x + residual (host_kernels.hpp)");
}

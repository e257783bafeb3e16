// gmr_fast._dnnl: the oneDNN bf16 GEMM (bf16_gemm.hpp), a module of its own because it links
// oneDNN, which only the torch backend's CPU path needs (gmr_fast._core stays free of it). Takes
// numpy views of torch's tensors (bf16 as int16 words), checks their shapes, releases the GIL
// around every product, and turns gmr::Error into gmr_fast.errors.CoreError as _core does
// (module_support.hpp; a translator local to this module).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "bf16_gemm.hpp"
#include "module_support.hpp"

namespace py = pybind11;

namespace {

template <typename T>
void need_matrix(const py::array& a, int64_t cols, const char* what) {
    gmr::need_array(a, 2, sizeof(T), cols, "bf16 GEMM", what);
}

void multiply(gmr::PackedBf16Weight& w, const py::array& x, py::array& y, const py::object& bias, bool accumulate) {
    need_matrix<uint16_t>(x, w.k(), "x (bf16 words)");
    bool y_bf16 = y.itemsize() == 2;
    if (y_bf16) need_matrix<uint16_t>(y, w.n(), "y");
    else need_matrix<float>(y, w.n(), "y");
    if (y.shape(0) != x.shape(0)) throw gmr::Error("bf16 GEMM: x and y have different row counts");
    gmr::need_writeable(y, "bf16 GEMM", "y");
    const float* b = nullptr;
    py::array_t<float> bias_array;
    if (!bias.is_none()) {
        bias_array = py::array_t<float, py::array::c_style>::ensure(bias);
        if (!bias_array || bias_array.ndim() != 1 || bias_array.shape(0) != w.n())
            throw gmr::Error("bf16 GEMM: bias must be float32 of " + std::to_string(w.n()) + " values");
        b = bias_array.data();
    }
    const auto* xp = static_cast<const uint16_t*>(x.data());
    void* yp = y.mutable_data();
    int64_t m = x.shape(0);
    py::gil_scoped_release release;
    w.multiply(xp, m, yp, y_bf16, b, accumulate);
}

}  // namespace

PYBIND11_MODULE(_dnnl, m) {
    m.doc() = "oneDNN bf16 x bf16 -> fp32 products over packed weights (gmr_fast.backends.bf16_gemm wraps it)";
    gmr::translate_core_errors(/*local=*/true);
    py::class_<gmr::PackedBf16Weight>(m, "PackedBf16Weight")
        .def(py::init([](const py::array& weight) {
                 if (weight.ndim() != 2 || weight.itemsize() != 2 || !(weight.flags() & py::array::c_style))
                     throw gmr::Error("bf16 GEMM: the weight must be a C-contiguous [out, in] array of bf16 words");
                 const auto* data = static_cast<const uint16_t*>(weight.data());
                 int64_t n = weight.shape(0), k = weight.shape(1);
                 py::gil_scoped_release release;
                 return new gmr::PackedBf16Weight(data, n, k);
             }),
             py::arg("weight"), "Packs an [out, in] bf16 weight (given as int16 words) once.")
        .def("multiply", &multiply, py::arg("x"), py::arg("y"), py::arg("bias") = py::none(),
             py::arg("accumulate") = false,
             "y = x . weight^T (+ bias) (+ y when accumulate): x bf16 words [m, in], y float32 or bf16 words [m, out].")
        .def_property_readonly("out_features", &gmr::PackedBf16Weight::n)
        .def_property_readonly("in_features", &gmr::PackedBf16Weight::k)
        .def_property_readonly("nbytes", &gmr::PackedBf16Weight::bytes)
        .def("kernel", &gmr::PackedBf16Weight::kernel, py::arg("rows"), "oneDNN's kernel for a product of that many rows");
}

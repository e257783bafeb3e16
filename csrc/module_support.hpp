// What the pybind11 modules of gmr_fast share: gmr::Error raised in Python as
// gmr_fast.errors.CoreError, and the checks of the numpy views they take of torch's tensors.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "errors.hpp"

namespace gmr {

// Registers the translation of gmr::Error into gmr_fast.errors.CoreError and returns that class.
// ``local``: for this module's functions only (the modules that link a library of their own, so
// that each keeps working whichever is imported first); else for every module (gmr_fast._core).
inline pybind11::object translate_core_errors(bool local) {
    static pybind11::object* core_error =
        new pybind11::object(pybind11::module_::import("gmr_fast.errors").attr("CoreError"));
    auto translate = [](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const Error& e) {
            PyErr_SetString(core_error->ptr(), e.what());
        }
    };
    if (local) pybind11::register_local_exception_translator(translate);
    else pybind11::register_exception_translator(translate);
    return *core_error;
}

// ``a`` is a C-contiguous array of ``ndim`` dimensions of ``itemsize``-byte items (``cols``
// columns in the last one unless negative), or a gmr::Error starting with ``context``.
inline void need_array(const pybind11::array& a, int64_t ndim, int64_t itemsize, int64_t cols, const std::string& context,
                       const std::string& what) {
    if (a.ndim() != ndim || a.itemsize() != itemsize || (cols >= 0 && a.shape(ndim - 1) != cols))
        throw Error(context + ": " + what + " must be " + std::to_string(ndim) + "-D with " +
                    (cols >= 0 ? std::to_string(cols) + " columns of " : std::string()) + std::to_string(itemsize) +
                    "-byte items");
    if (!(a.flags() & pybind11::array::c_style)) throw Error(context + ": " + what + " must be C-contiguous");
}

inline void need_writeable(const pybind11::array& a, const std::string& context, const std::string& what) {
    if (!a.writeable()) throw Error(context + ": " + what + " is read-only");
}

}  // namespace gmr

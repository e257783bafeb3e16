// The one error type of the native core. bindings.cpp turns it into gmr_fast._core.CoreError.
#pragma once

#include <stdexcept>
#include <string>

namespace gmr {

struct Error : std::runtime_error {
    explicit Error(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace gmr

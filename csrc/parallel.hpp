// Minimal fork-join helper: no pool to keep alive, no Python anywhere near it.
#pragma once

#include <cstdint>
#include <functional>

namespace gmr {

// Number of hardware threads (at least 1).
int hardware_threads();

// Runs fn(i) for every i in [0, n) on up to num_threads threads, the calling thread included.
// Items are pulled from a shared counter, so uneven items balance. Each item runs exactly once;
// the first exception thrown by any item is rethrown on the caller after all threads joined.
// num_threads <= 0 means hardware_threads().
void parallel_for(int64_t n, int num_threads, const std::function<void(int64_t)>& fn);

}  // namespace gmr

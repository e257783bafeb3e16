"""Keeping freed memory in the process (glibc), for the torch backend on the CPU.

Eager PyTorch allocates every intermediate tensor anew. glibc serves large blocks (over its
mmap threshold, 128 KiB to 32 MiB) with ``mmap`` and returns them with ``munmap`` on free, so
each such tensor is faulted in page by page again: measured at GMR-3B widths, one
``rank(query, 50 documents)`` took 1.4 million minor page faults (5.6 GB of pages zeroed by the
kernel) and spent ~15% of its time on them; the vision tower lost 15-25%. On VMs whose freed
memory is reported to the host (virtio-balloon free page reporting, the AMX Xeon's), touching
memory again a few seconds after it was given back costs 30x a plain fault (5-6 ms per MiB):
HF bf16 ran it2it's pairs at 0.11-0.12 pairs/s with glibc's default against 0.22-0.23 with this
setting (benchmarks/README.md, "HF with the kept heap"). The onnxruntime backend does not set it:
onnxruntime plans a run's buffers itself, and with this setting its GMR-3B-width text runs took a
third of the faults but ran within this VM's noise of the default (fp32 0.79-0.82 against
0.73-0.80 pairs/s, int8 1.58-1.65 against 1.57-1.59; AMX Xeon, 5 Dec).

This is what jemalloc or tcmalloc preloaded would do; we ask glibc itself: one arena, no mmap for
large blocks, and no trimming below 1 GiB of free heap top.
Freed memory stays with the process (peak RSS is kept, not grown) and is reused.

Process-wide by nature; turned off with ``GMR_FAST_MALLOC=default``.

Not while weights load (``weights_loading``): a weight read from the engine file and then packed
or converted leaves its first copy freed in the middle of the heap, which a heap that keeps
freed memory cannot give back, so a load held ~4 GB of such holes beyond GMR-7B's 15.5 GB of
bf16 weights (19.75 GB RSS after loading, against 15.74 GB with large blocks mapped as glibc
does by default; AMX Xeon, one lane, 2 Dec). During a load large blocks are mapped and unmapped
again; afterwards the setting is back.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters
TRIM_THRESHOLD = 1 << 30
DEFAULT_MMAP_MAX = 65536  # glibc's own M_MMAP_MAX

_lock = threading.Lock()
_state: dict = {}


def keep_freed_memory() -> str:
    """Sets glibc's allocator to keep freed memory (once per process). Returns what was done,
    for the run's stats: "kept" or why not."""
    with _lock:
        if "result" not in _state:
            _state["result"] = _apply()
        return _state["result"]


def _apply() -> str:
    if os.environ.get("GMR_FAST_MALLOC", "keep") == "default":
        return "default (GMR_FAST_MALLOC=default)"
    if not sys.platform.startswith("linux"):
        return "default (not Linux)"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default (not glibc)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = [mallopt(p, v) for p, v in ((M_ARENA_MAX, 1), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))]
    if not all(done):
        return "default (mallopt refused)"
    _state["mallopt"] = mallopt
    if not _state.get("loading"):
        mallopt(M_MMAP_MAX, 0)
    return "kept"


@contextlib.contextmanager
def weights_loading():
    """Large blocks mapped and unmapped as glibc does by default while the block runs (weights
    loading, see above), then kept again; nested and concurrent loads are counted. A run on
    another thread meanwhile is served as by the default allocator, slower, never wrong."""
    with _lock:
        _state["loading"] = _state.get("loading", 0) + 1
        if "mallopt" in _state:
            _state["mallopt"](M_MMAP_MAX, DEFAULT_MMAP_MAX)
    try:
        yield
    finally:
        with _lock:
            _state["loading"] -= 1
            if not _state["loading"] and "mallopt" in _state:
                _state["mallopt"](M_MMAP_MAX, 0)


# oneDNN (torch's own, and gmr_fast._dnnl's) builds a kernel for each GEMM shape it meets and keeps it
# in a process-wide cache of ONEDNN_PRIMITIVE_CACHE_CAPACITY entries (1,024 by default); torch's
# ideep layer keeps its own of LRU_CACHE_CAPACITY (1,024). An unpadded batch of T tokens is a new row
# count for every projection, so the caches fill with kernels that are rarely met again: at GMR-3B's
# widths ~1.6 MB each for a [T, 2,048] x [2,048, 2,048] bf16 product, 0.65 GB after 400 row counts
# of that one shape (one thread, AMX Xeon; 0.7 MB in all with both caches at one entry). Kept to
# ONEDNN_KERNELS entries each, a long job's or a server's resident memory stops growing with the
# shapes it has seen (benchmarks/long_run_memory.py). What a kernel build costs (3-20 ms a shape,
# measured) is paid either way, as row counts rarely repeat.
ONEDNN_KERNELS = 64
KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_kernel_caches() -> str:
    """Sets oneDNN's and ideep's kernel cache capacities to ONEDNN_KERNELS (once per process), each
    unless already in the environment (the user's value wins). The libraries read them when the
    process builds its first oneDNN kernel, so this must come before that: the torch backend calls
    it before it loads or packs any weight, and so do the probes that may run before the backend
    (hardware's bf16 GEMM measurements, gmr_fast._dnnl's check). Returns what was done, for the
    run's stats."""
    with _lock:
        if "kernel_caches" not in _state:
            given = {k: os.environ[k] for k in KERNEL_CACHES if os.environ.get(k)}
            notes = []
            # torch 2.13's ideep crashes (SIGSEGV) at its first kernel on an LRU_CACHE_CAPACITY that is
            # not a whole number >= 1 ("0", "", "off"); oneDNN's own takes 0 (no cache)
            lru = given.get("LRU_CACHE_CAPACITY")
            if lru is not None and not (lru.strip().isdigit() and int(lru) >= 1):
                notes.append(f"LRU_CACHE_CAPACITY={lru!r} replaced: torch's ideep crashes on it")
                del given["LRU_CACHE_CAPACITY"]
            for k in KERNEL_CACHES:
                if k not in given:
                    os.environ[k] = str(ONEDNN_KERNELS)
            _state["kernel_caches"] = "; ".join([f"{ONEDNN_KERNELS} kernels" if not given else
                                                 ", ".join(f"{k}={os.environ[k]}" for k in KERNEL_CACHES), *notes])
        return _state["kernel_caches"]


def available_memory() -> int:
    """Bytes the kernel reports available now (``MemAvailable``); unbounded where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62

"""oneDNN's bf16 GEMM with fp32 results, for the torch backend's split products (graphs.common.Proj).

torch 2.13 rounds a CPU bf16 GEMM's output to bf16 and has no CPU kernel for an fp32 output
(``aten::mm.dtype``), so an fp32-accurate product over bf16 weights took two bf16 GEMMs (Proj
"split": the rounded sum, then the rest). oneDNN itself computes bf16 inputs into an fp32
destination in one pass; ``gmr_fast._dnnl`` (csrc/bf16_gemm.hpp) runs its matmul over weights
packed once, from Intel's ``onednn-cpu-gomp`` wheel (oneDNN 3.2, OpenMP threads: the library binds
to the libgomp torch already loaded, so both share one thread pool and torch's per-thread thread
count). Measured on an AMD EPYC Zen 4 (AVX512-BF16), 2 threads, GMR-3B decoder shapes at 64-1,024
rows: 430-455 GFLOP/s against 166-170 for the two torch GEMMs and 400-420 for one torch bf16 GEMM
rounded to bf16 (benchmarks/README.md, "Split products").

``load()`` returns the module, or None with the reason in ``unavailable``: not built (no oneDNN
at build time), library missing, or no bf16 hardware kernel here.
"""

from __future__ import annotations

import ctypes
import threading

from ..errors import CoreError

_lock = threading.Lock()
_state: dict = {}


def _library_path() -> str | None:
    import importlib.metadata as md

    try:
        files = md.distribution("onednn-cpu-gomp").files or []
    except md.PackageNotFoundError:
        return None
    return next((str(f.locate()) for f in files if str(f).endswith("libdnnl.so.3")), None)


def load():
    """gmr_fast._dnnl ready to use, or None (``unavailable()`` says why). torch is imported first
    where installed, so that the library binds to torch's OpenMP runtime."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        try:
            import torch  # noqa: F401  (its libgomp first)
        except ImportError:
            pass
        module, why = None, None
        path = _library_path()
        if path is None:
            why = "oneDNN's library is not installed (pip install onednn-cpu-gomp==2023.2.0)"
        else:
            try:
                # the extension names libdnnl.so.3 without a path: loaded globally first, it is found
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                from .. import _dnnl as module
            except (OSError, ImportError) as e:
                module, why = None, f"gmr_fast._dnnl could not be loaded ({e}); reinstall gmr_fast with oneDNN present"
        if module is not None:
            from ..memory import bound_kernel_caches

            bound_kernel_caches()  # before the library's first kernel, which sizes its caches
            why = _probe(module)
            if why is not None:
                module = None
        _state.update(module=module, why=why)
        return module


def unavailable() -> str | None:
    load()
    return _state["why"]


def _probe(module) -> str | None:
    """None where a small product runs on a bf16 hardware kernel and matches fp32 arithmetic on
    the same bf16 values, else why not."""
    import numpy as np

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    to_bf16 = lambda a: (a.view(np.uint32) >> 16).astype(np.uint16)  # noqa: E731  (truncation: exact bf16 values)
    wb, xb = to_bf16(w), to_bf16(x)
    back = lambda a: (a.astype(np.uint32) << 16).view(np.float32)  # noqa: E731
    try:
        packed = module.PackedBf16Weight(wb.view(np.int16))
        y = np.empty((5, 64), np.float32)
        packed.multiply(xb.view(np.int16), y)
    except (RuntimeError, CoreError) as e:  # CoreError: no bf16 matmul kernel here (an AVX2-only CPU)
        return f"oneDNN runs no bf16 GEMM on this CPU ({e})"
    want = back(xb).astype(np.float64) @ back(wb).astype(np.float64).T
    if not np.allclose(y, want, rtol=1e-5, atol=1e-5):
        return "oneDNN's bf16 GEMM does not give fp32-accurate sums here"
    return None

"""What the processor can do, read once at run time: the model name and the instruction-set
extensions that decide which precision runs fastest (and that every benchmark records)."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

# the extensions that matter for the precision choice, from /proc/cpuinfo's flags
FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
            "avx512_fp16")


@functools.lru_cache(maxsize=None)
def cpu_info() -> dict:
    """{"model", "vendor" (vendor_id: GenuineIntel, AuthenticAMD), "flags" (all of them), "features"
    (the ones above), "cores", "machine"}."""
    model, flags, vendor = platform.processor() or "unknown", [], ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("unknown", "", platform.machine()):
                    model = value.strip()
                elif key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    return {"model": model, "vendor": vendor, "machine": platform.machine(), "cores": os.cpu_count() or 1,
            "flags": flags, "features": [f for f in FEATURES if f in flags],
            "amx_usable": "amx_tile" in flags and amx_usable()}


ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA, SYS_ARCH_PRCTL = 0x1023, 18, 158  # Linux x86-64


@functools.lru_cache(maxsize=None)
def amx_usable() -> bool:
    """Whether this process may use AMX tiles. The CPU flag is not enough: Linux (>= 5.16) hands
    out tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM), which older kernels, some
    hypervisors and seccomp policies refuse; oneDNN and onnxruntime ask the same way and fall
    back to AVX-512 kernels when refused, so the precision choice must not count on AMX then.
    Asking here grants the permission these libraries would ask for anyway."""
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_long(ARCH_REQ_XCOMP_PERM),
                            ctypes.c_long(XFEATURE_XTILEDATA)) == 0
    except (OSError, AttributeError):
        return False


def has(feature: str) -> bool:
    """The processor has ``feature`` and this process can use it (AMX: ``amx_usable``)."""
    if feature.startswith("amx") and not amx_usable():
        return False
    return feature in cpu_info()["flags"]


def int8_kernel() -> str | None:
    """The widest int8 matrix-multiply path onnxruntime's QGEMM dispatches to here."""
    for feature, name in (("amx_int8", "AMX"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"), ("avx2", "AVX2")):
        if has(feature):
            return name
    return None


# oneDNN's instruction-set levels, lowest first (its ONEDNN_MAX_CPU_ISA values): a cap below a
# level takes that level's kernels away from torch, whatever the processor has
ONEDNN_ISA_ORDER = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                    "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
                    "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "ALL")


def onednn_allows(level: str) -> bool:
    """Whether ONEDNN_MAX_CPU_ISA (or its old name DNNL_MAX_CPU_ISA), if set, permits ``level``."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if cap not in ONEDNN_ISA_ORDER:
        return True
    return ONEDNN_ISA_ORDER.index(cap) >= ONEDNN_ISA_ORDER.index(level)


def bf16_kernel() -> str | None:
    """The bf16 matrix-multiply path oneDNN (torch's CPU kernels) has here, if any."""
    for feature, name, level in (("amx_bf16", "AMX", "AVX512_CORE_AMX"), ("avx512_bf16", "AVX512-BF16", "AVX512_CORE_BF16")):
        if has(feature) and onednn_allows(level):
            return name
    return None


# The shape of the bf16 probe: a GMR-3B projection (hidden 2,048 -> 2,048) over 512 tokens,
# 4.3 GFLOP, ~20 ms in fp32 on two cores; small enough to run once per process at start-up.
BF16_PROBE_SHAPE = (512, 2048, 2048)


@functools.lru_cache(maxsize=None)
def torch_bf16_speedup() -> float | None:
    """How many times faster torch multiplies matrices in bf16 than in fp32 on this CPU (best of
    three ``F.linear`` calls each at BF16_PROBE_SHAPE, after a warm-up), or None without torch.
    The instruction flag does not tell: oneDNN's AVX512-BF16 kernels ran a GMR-3B MLP GEMM at
    683-820 GOP/s on an AMD EPYC (Zen 5), 3.2-3.8x torch fp32 there, but at 123-141 GOP/s, half
    of fp32, on an AMX Xeon with its tiles refused (benchmarks/results/int8_kernels_*.json).
    Measured once per process, on torch's current thread count."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    import time

    from .memory import bound_kernel_caches

    bound_kernel_caches()  # before this process's first oneDNN kernel, which sizes its caches

    m, k, n = BF16_PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5

    def best(a, b) -> float:
        F.linear(a, b)  # first call: kernel selection and its buffers
        times = []
        for _ in range(3):
            start = time.perf_counter()
            F.linear(a, b)
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.inference_mode():
        fp32 = best(x, w)
        bf16 = best(x.bfloat16(), w.bfloat16())
    return fp32 / max(bf16, 1e-9)


# The fpmath check's shape: a GMR-3B projection's reduction over a few rows (~4 MFLOP).
FPMATH_PROBE_SHAPE = (16, 2048, 64)


@functools.lru_cache(maxsize=None)
def onednn_fpmath_bf16_is_exact() -> bool:
    """Whether oneDNN's bf16 "fpmath" mode (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``)
    computes an fp32 product as its definition reads: both inputs rounded to bf16, every product
    summed in fp32. Checked once per process on one product at FPMATH_PROBE_SHAPE of fixed-seed fp32
    inputs against the float64 product of their bf16-rounded values, in relative norm within
    2^-16 + 4 sqrt(K) 2^-24 (two fp32 sums' worth of rounding over K = 2,048: ~2e-5). An AMX
    Xeon holds it (~1e-6); an AMD EPYC (Zen 4) does not: there oneDNN 3.12 runs the mode in its
    avx512_core fp32 kernel (``brg_matmul:avx512_core``, attr-fpmath:bf16) and its products lie
    1.1-1.7e-3 from the rounded inputs' product, a plain bf16 product's error, at fp32's speed.
    False without torch or where oneDNN has no bf16 kernel."""
    if bf16_kernel() is None:
        return False
    try:
        import torch
    except ImportError:
        return False
    from .memory import bound_kernel_caches

    bound_kernel_caches()  # before this process's first oneDNN kernel, which sizes its caches
    m, k, n = FPMATH_PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g), (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16().float()
    flags = torch.backends.mkldnn.matmul
    saved = flags.fp32_precision
    try:
        flags.fp32_precision = "bf16"
        with torch.inference_mode():
            y = torch.nn.functional.linear(x, w).double()
    finally:
        flags.fp32_precision = saved
    exact = x.bfloat16().double() @ w.double().t()
    return float((y - exact).norm() / exact.norm()) <= 2 ** -16 + 4 * k ** 0.5 * 2 ** -24


# The int8 probe's shape: the bf16 probe's (a GMR-3B projection over 512 tokens, 4.3 GOP).
INT8_PROBE_SHAPE = BF16_PROBE_SHAPE


@functools.lru_cache(maxsize=None)
def onnxruntime_int8_speedup() -> float | None:
    """How many times faster onnxruntime multiplies matrices in int8 than in fp32 on this CPU:
    best of five runs of ``DynamicQuantizeMatMul`` (int8 weights per column, activations
    quantized per call: the int8 engines' operator) against ``MatMul`` in fp32 at
    INT8_PROBE_SHAPE, interleaved, after a warm-up, on ``hardware_threads()`` threads; None without the onnx
    package. The instruction flag does not tell: QGEMM's AVX2 kernels ran GMR-3B's MLP GEMMs at
    1.1-1.3x fp32 on an AMD EPYC of family 23 (AVX2 only) and 1.72x on an AMD EPYC Zen 3 (AVX2
    only too), against 2.1-3.1x on AVX512-VNNI and 9-11x on AMX (benchmarks/results/int8_kernels_*.json,
    real_size_epyc_zen3.json). Measured once per process."""
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    import time

    import numpy as np
    import onnxruntime as ort

    from .preprocess import hardware_threads

    m, k, n = INT8_PROBE_SHAPE
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32) / k ** 0.5
    scale = np.maximum(np.abs(w).max(0), 1e-12) / 127.0
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)

    def session(node, inits):
        graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(a, name) for name, a in inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = min(model.ir_version, 9)  # what onnxruntime >= 1.18 reads
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = hardware_threads()
        opts.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    sessions = (session(helper.make_node("MatMul", ["x", "w"], ["y"]), {"w": w}),
                session(helper.make_node("DynamicQuantizeMatMul", ["x", "q", "s", "z"], ["y"], domain="com.microsoft"),
                        {"q": q, "s": scale.astype(np.float32), "z": np.zeros(n, np.int8)}))
    times = [[], []]
    for rep in range(6):  # interleaved, so that a load elsewhere slows both alike; the first is a warm-up
        for s, t in zip(sessions, times):
            start = time.perf_counter()
            s.run(None, {"x": x})
            if rep:
                t.append(time.perf_counter() - start)
    fp32, int8 = min(times[0]), min(times[1])
    return fp32 / max(int8, 1e-9)


def torch_fp32_gemm_is_avx2_only() -> bool:
    """torch's fp32 matrix multiply is MKL's (the CPU wheel's BLAS), and MKL runs its AVX2 code on
    AMD processors whatever they have: on an AMD EPYC (Zen 5) with AVX-512 it ran a GMR-3B MLP GEMM
    at 211-218 GOP/s against onnxruntime's (MLAS, AVX-512) 437-464
    (benchmarks/results/int8_kernels_epyc_zen5.json) and oneDNN's 431-500. On AVX2-only processors
    all run AVX2. Where this holds the torch backend multiplies fp32 with oneDNN (backends.torch)."""
    info = cpu_info()
    return info["vendor"] == "AuthenticAMD" and "avx512f" in info["flags"]

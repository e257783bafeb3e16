"""What the processor can do, read once at run time: the model name and the instruction-set
extensions that decide which precision runs fastest (and that every benchmark records)."""

from __future__ import annotations

import functools
import os
import platform

# the extensions that matter for the precision choice, from /proc/cpuinfo's flags
FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
            "avx512_fp16")


@functools.lru_cache(maxsize=None)
def cpu_info() -> dict:
    """{"model", "flags" (all of them), "features" (the ones above), "cores", "machine"}."""
    model, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("unknown", "", platform.machine()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    return {"model": model, "machine": platform.machine(), "cores": os.cpu_count() or 1, "flags": flags,
            "features": [f for f in FEATURES if f in flags]}


def has(feature: str) -> bool:
    return feature in cpu_info()["flags"]


def int8_kernel() -> str | None:
    """The widest int8 matrix-multiply path onnxruntime's QGEMM dispatches to here."""
    for feature, name in (("amx_int8", "AMX"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"), ("avx2", "AVX2")):
        if has(feature):
            return name
    return None


def bf16_kernel() -> str | None:
    """The bf16 matrix-multiply path oneDNN (torch's CPU kernels) has here, if any."""
    for feature, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")):
        if has(feature):
            return name
    return None

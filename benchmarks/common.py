"""Shared by the benchmark programs: the machine's description (CPU model and flags, versions)
and running one measurement in a fresh child process, so that its peak RSS is its own."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> dict:
    sys.path.insert(0, ROOT)
    from gmr_fast import hardware

    info = hardware.cpu_info()
    versions = {}
    for dist in ("gmr_fast", "onnxruntime", "torch", "transformers", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {"cpu": info["model"], "vendor": info["vendor"], "cores": info["cores"], "features": info["features"],
            "flags": info["flags"], "amx_usable": info["amx_usable"],
            "isa_limit": {k: os.environ[k] for k in ("GMR_BENCH_DENY_AMX", "ONEDNN_MAX_CPU_ISA")
                                                             if k in os.environ},
            "int8_kernel": hardware.int8_kernel(), "bf16_kernel": hardware.bf16_kernel(),
            "int8_gemm_speedup": hardware.onnxruntime_int8_speedup(), "memory_bytes": mem,
            "python": platform.python_version(), "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


# --isa avx512-vnni: run every measurement as on a processor without AMX or AVX512-BF16 (an
# AVX512-VNNI Xeon of the Cascade Lake / Ice Lake kind) on an AMX machine. onnxruntime's MLAS and
# oneDNN use AMX only after asking Linux for tile state (arch_prctl ARCH_REQ_XCOMP_PERM); a seccomp
# filter installed before they load refuses that request, so both fall back to their AVX512-VNNI
# kernels, exactly as on a processor without AMX. oneDNN's bf16 kernels are capped at AVX512-VNNI
# too (ONEDNN_MAX_CPU_ISA), which leaves bf16 without hardware support, as on such a processor.
# Cores, caches and memory stay this machine's: a real Cascade Lake differs in those.
# --isa avx512-bf16 refuses AMX only: oneDNN keeps its AVX512-BF16 kernels (a Cooper Lake Xeon or
# an AMD Zen 4 has those without AMX). It is not a faithful stand-in for every such CPU: a real AMD
# EPYC (Zen 5) ran oneDNN's bf16 GEMM at 683-820 GOP/s where this emulation gave 123-141
# (results/int8_kernels_epyc_zen5.json), which is why the precision choice measures bf16 itself.
ISA_LIMITS = {"native": {}, "avx512-vnni": {"GMR_BENCH_DENY_AMX": "1", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
              "avx512-bf16": {"GMR_BENCH_DENY_AMX": "1"}}


def apply_isa(isa: str) -> dict:
    """Puts this process (before torch or onnxruntime load) and its children under an ISA_LIMITS entry."""
    limit = isa_env(isa)
    os.environ.update(limit)
    if limit:
        deny_amx()
    return limit


def deny_amx() -> None:
    """Installs a seccomp filter on this process (and every thread and child it starts later)
    that fails arch_prctl(ARCH_REQ_XCOMP_PERM, ...) with EPERM and allows everything else."""
    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Insn))]

    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    allow, eperm = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    code = [(ld, 0, 0, 4), (jeq, 0, 5, 0xC000003E),  # seccomp_data.arch == AUDIT_ARCH_X86_64, else allow
            (ld, 0, 0, 0), (jeq, 0, 3, 158),  # nr == arch_prctl, else allow
            (ld, 0, 0, 16), (jeq, 0, 1, 0x1023),  # args[0] (low half) == ARCH_REQ_XCOMP_PERM, else allow
            (ret, 0, 0, eperm), (ret, 0, 0, allow)]
    insns = (Insn * len(code))(*[Insn(*c) for c in code])
    prog = Prog(len(code), insns)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # NO_NEW_PRIVS; SECCOMP filter
        raise OSError(ctypes.get_errno(), "could not install the seccomp filter that denies AMX")


def isa_env(isa: str) -> dict:
    if isa not in ISA_LIMITS:
        raise ValueError(f"--isa must be one of {sorted(ISA_LIMITS)}")
    return ISA_LIMITS[isa]


def in_child(function: str, *args, timeout: float = 3600, threads: int | None = None, **kwargs) -> dict:
    """Runs ``module:function(*args, **kwargs)`` in a new interpreter and returns its JSON result
    with ``peak_rss_bytes`` (the child's own maximum resident set) and ``wall_seconds`` added.
    Arguments travel as JSON; ``timeout`` and ``threads`` are this function's own, not the child's."""
    code = ("import json, os, resource, sys, time, importlib\n"
            f"sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r})\n"
            "if os.environ.get('GMR_BENCH_DENY_AMX'): __import__('common').deny_amx()\n"
            "module, name = sys.argv[1].split(':')\n"
            "start = time.perf_counter()\n"
            "args, kwargs = json.loads(sys.argv[2])\n"
            "out = getattr(importlib.import_module(module), name)(*args, **kwargs)\n"
            "out['wall_seconds'] = time.perf_counter() - start\n"
            "out['peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
            "print('@@RESULT@@' + json.dumps(out))\n")
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", code, function, json.dumps([list(args), kwargs])],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    raise RuntimeError(f"{function}{args}{kwargs or ''} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def write(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)

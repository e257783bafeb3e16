"""Shared by the benchmark programs: the machine's description (CPU model and flags, versions)
and running one measurement in a fresh child process, so that its peak RSS is its own."""

from __future__ import annotations

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
    return {"cpu": info["model"], "cores": info["cores"], "features": info["features"], "flags": info["flags"],
            "int8_kernel": hardware.int8_kernel(), "bf16_kernel": hardware.bf16_kernel(), "memory_bytes": mem,
            "python": platform.python_version(), "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def in_child(function: str, *args, timeout: float = 3600, threads: int | None = None) -> dict:
    """Runs ``module:function(*args)`` in a new interpreter and returns its JSON result with
    ``peak_rss_bytes`` (the child's own maximum resident set) and ``wall_seconds`` added."""
    code = ("import json, resource, sys, time, importlib\n"
            f"sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r})\n"
            "module, name = sys.argv[1].split(':')\n"
            "start = time.perf_counter()\n"
            "out = getattr(importlib.import_module(module), name)(*json.loads(sys.argv[2]))\n"
            "out['wall_seconds'] = time.perf_counter() - start\n"
            "out['peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
            "print('@@RESULT@@' + json.dumps(out))\n")
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", code, function, json.dumps(list(args))], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    raise RuntimeError(f"{function}{args} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def write(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)

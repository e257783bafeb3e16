"""Resident memory of one long-lived ``Reranker`` over many calls of shapes it has not seen, as a
server or a batch job sees them: with oneDNN's kernel caches at the libraries' own capacity
(1,024 kernels each in oneDNN and in torch's ideep layer) and at gmr_fast's bound
(``gmr_fast.memory.ONEDNN_KERNELS``, which the torch backend sets unless the environment does).

Every unpadded batch of T tokens is a new row count for each projection, and oneDNN builds and
keeps a kernel per shape (~1.4 MB each at GMR-3B's widths), so with the libraries' capacity the
process grows with the shapes it has met. Each configuration runs in its own process on the same
calls (``rank`` of a text query against 4-40 text documents of 10-400 words, of a text query
against 2-5 document images, of an image query against 2-5 texts; random sizes, fixed seed), and
records the resident set after every call and the seconds each call took.

    python benchmarks/long_run_memory.py --calls 80 --out benchmarks/results/long_run_memory_cpu.json

Uses ``mrb_workload.py``'s engine under ``--work`` (run that first). The engine's default
precision runs (on an AMX CPU the torch backend in bf16; onnxruntime engines take neither cache).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import in_child, machine, write  # noqa: E402

CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
CONFIGS = {"libraries' capacity (1,024)": {k: "1024" for k in CACHES}, "gmr_fast's bound": {k: None for k in CACHES}}


def _set_env(values: dict) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def run_calls(engine: str, calls: int, seed: int) -> dict:
    """In a child: one Reranker, ``calls`` rank calls of new shapes, the RSS after each."""
    import numpy as np
    from PIL import Image

    from gmr_fast import Reranker
    from mrb_workload import WORDS

    rng = np.random.default_rng(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))

    def image():
        w, h = (int(x) for x in rng.integers(200, 900, 2))
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    r = Reranker(engine)
    loaded = _rss_bytes()
    log = []
    for i in range(calls):
        kind = str(rng.choice(["text", "text", "t2i", "i2t"]))
        n = int(rng.integers(4, 40)) if kind == "text" else int(rng.integers(2, 6))
        if kind == "text":
            query, docs = text(3, 20), [text(10, 400) for _ in range(n)]
        elif kind == "t2i":
            query, docs = text(3, 20), [{"image": image()} for _ in range(n)]
        else:
            query, docs = {"image": image(), "text": text(2, 8)}, [text(10, 200) for _ in range(n)]
        start = time.perf_counter()
        r.rank(query, docs)
        log.append({"kind": kind, "documents": n, "seconds": round(time.perf_counter() - start, 3),
                    "decoder_tokens": r.last_stats["decoder_tokens"], "rss_bytes": _rss_bytes()})
    return {"kernel_caches": r.choice.get("kernel_caches"), "backend": r.choice["backend"],
            "precision": r.choice["precision"], "rss_after_load_bytes": loaded, "calls": log}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="gmr-3b:6:8")
    p.add_argument("--work", default="/tmp/gmr_bench")
    p.add_argument("--calls", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/long_run_memory_cpu.json")
    a = p.parse_args()
    shape, layers, vlayers = a.shape.split(":")
    engine = pathlib.Path(a.work) / f"{shape}-L{layers}-V{vlayers}-engine"
    if not (engine / "manifest.json").exists():
        sys.exit(f"no engine at {engine}: run benchmarks/mrb_workload.py first")
    doc = {"machine": machine(), "engine": str(engine), "calls": a.calls, "seed": a.seed, "configs": {}}
    saved = {k: os.environ.get(k) for k in CACHES}
    try:
        for name, env in CONFIGS.items():
            _set_env(env)  # the child inherits this process's environment
            got = in_child("long_run_memory:run_calls", str(engine), a.calls, a.seed, timeout=7200)
            doc["configs"][name] = got
            rss = [c["rss_bytes"] for c in got["calls"]]
            marks = [m for m in (10, 20, 40, 80, 160) if m <= len(rss)]
            print(f"{name}: after load {got['rss_after_load_bytes'] / 1e9:.2f} GB; "
                  + ", ".join(f"after {m} calls {rss[m - 1] / 1e9:.2f} GB" for m in marks)
                  + f"; peak {got['peak_rss_bytes'] / 1e9:.2f} GB; calls {sum(c['seconds'] for c in got['calls']):.0f} s",
                  flush=True)
    finally:
        _set_env(saved)
    write(a.out, doc)


if __name__ == "__main__":
    main()

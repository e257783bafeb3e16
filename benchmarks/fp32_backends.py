"""fp32 on onnxruntime against fp32 on torch, the same engine and weights, in the same run: the
measurement behind running fp32 on torch by default when torch is importable
(gmr_fast.reranker.FP32_ON_TORCH).

    python benchmarks/fp32_backends.py --tiny ENGINE --real ENGINE --out benchmarks/results/fp32_backends_cpu.json
    python benchmarks/fp32_backends.py --real ENGINE --over-bf16 BF16_ENGINE --contenders torch,torch_bf16_weights
    python benchmarks/fp32_backends.py --real ENGINE --over-bf16 BF16_ENGINE \
        --contenders torch,torch_bf16_weights,torch_bf16_weights_whole,bf16_images_fp32

- ``--tiny``: a small engine (the server benchmark's), Cohere-shaped requests of 20-50 text
  documents (benchmarks/serve.py), scored one request per call and sixteen per call;
- ``--real``: a GMR-width engine (benchmarks/real_size.py builds one), its text and image
  workloads.

Contenders: onnxruntime, torch as it chooses its fp32 GEMM (oneDNN on AMD processors with
AVX-512, where MKL runs AVX2 code; MKL elsewhere), torch held to MKL (``gemm=blas``), and with
``--over-bf16`` torch's fp32 over the bf16 weight files of an engine exported from the same bf16
checkpoint with ``--dtype bf16`` (each weight widened per call, graphs.common.Proj.upcast), the
same with each weight widened whole instead of UPCAST_CHUNK_BYTES at a time
(``torch_bf16_weights_whole``, the code before chunking), and on the image workload a bf16
Reranker that runs image pairs in fp32 over its bf16 weights (``bf16_images_fp32``:
``image_precision="fp32"``, so every pair of that workload is fp32 arithmetic). Each
measurement runs in its own process (peak RSS its own); the contenders alternate over
``--rounds`` because this VM's speed drifts over minutes, and the median is reported. Every
contender's scores are compared with the first contender's (they must agree to fp32 noise).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import in_child, machine, write  # noqa: E402

# contender -> (backend, backend options): torch with its default fp32 GEMM choice (oneDNN where MKL
# runs AVX2 code on an AVX-512 CPU) and torch held to MKL's (F.linear), to show that choice
CONTENDERS = {"onnxruntime": ("onnxruntime", {}), "torch": ("torch", {}), "torch_mkl": ("torch", {"gemm": "blas"}),
              "torch_bf16_weights": ("torch", {}), "torch_bf16_weights_whole": ("torch", {}),
              "bf16_images_fp32": ("torch", {})}
OVER_BF16 = ("torch_bf16_weights", "torch_bf16_weights_whole", "bf16_images_fp32")  # run on --over-bf16's engine


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def calls(kind: str) -> list[list]:
    """The workload as a list of calls, each a list of pairs."""
    if kind.startswith("requests"):
        from serve import requests

        per_call = int(kind.split("x")[1])
        reqs = requests(48)
        return [[(q["query"], d) for q in reqs[i:i + per_call] for d in q["documents"]]
                for i in range(0, len(reqs), per_call)]
    from real_size import workload

    return [workload(kind)[0]]


def child(engine: str, contender: str, kind: str, over_gemm: str = "auto") -> dict:
    from gmr_fast import Reranker

    backend, options = CONTENDERS[contender]
    if contender in OVER_BF16 and over_gemm != "auto":
        options = {**options, "gemm": over_gemm}
    if contender == "torch_bf16_weights_whole":
        from gmr_fast.graphs import common

        common.UPCAST_CHUNK_BYTES = 1 << 62
    if contender == "bf16_images_fp32":
        r = Reranker(engine, precision="bf16", image_precision="fp32", backend=backend, backend_options=options)
    else:
        r = Reranker(engine, precision="fp32", backend=backend, backend_options=options)
    loaded = rss_bytes()
    work = calls(kind)
    if contender == "bf16_images_fp32":
        assert all(isinstance(q, dict) and "image" in q for c in work for q, _ in c), "an image workload only"
    r.score(work[0][:2])  # warm-up
    start = time.perf_counter()
    scores = [r.score(c) for c in work]
    t = time.perf_counter() - start
    n = sum(len(c) for c in work)
    return {"pairs": n, "calls": len(work), "seconds": t, "pairs_per_s": n / t, "gemm": r.choice.get("gemm"),
            "loaded_rss_bytes": loaded, "scores": np.concatenate(scores).tolist()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", help="a small engine (requests of 20-50 documents)")
    p.add_argument("--real", help="a GMR-width engine (text and image workloads)")
    p.add_argument("--over-bf16", help="a bf16-only engine of --real's checkpoint (its fp32 runs over bf16 files)")
    p.add_argument("--contenders", default="onnxruntime,torch,torch_mkl,torch_bf16_weights")
    p.add_argument("--over-bf16-gemm", default="auto", choices=["auto", "onednn", "blas"],
                   help="the GEMM of the --over-bf16 contenders (onednn: as on an AMD CPU with AVX-512)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/fp32_backends_cpu.json")
    a = p.parse_args(argv)
    cases = ([(a.tiny, "requests_x1"), (a.tiny, "requests_x16")] if a.tiny else []) + \
            ([(a.real, "text"), (a.real, "image")] if a.real else [])
    rows = []
    for engine, kind in cases:
        contenders = [b for b in a.contenders.split(",")
                      if b not in OVER_BF16 or (a.over_bf16 and engine == a.real)]
        contenders = [b for b in contenders if b != "bf16_images_fp32" or kind == "image"]
        runs = {b: [] for b in contenders}
        for _ in range(a.rounds):
            for b in contenders:
                runs[b].append(in_child("fp32_backends:child", a.over_bf16 if b in OVER_BF16 else engine, b, kind,
                                        a.over_bf16_gemm))
        first = runs[contenders[0]][0]
        row = {"engine": engine, "workload": kind, "pairs": first["pairs"], "calls": first["calls"],
               "reference": contenders[0]}
        ref = np.array(first["scores"])
        for b in contenders:
            row[b] = {"pairs_per_s": float(np.median([r["pairs_per_s"] for r in runs[b]])),
                      "pairs_per_s_rounds": [r["pairs_per_s"] for r in runs[b]],
                      "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs[b]), "gemm": runs[b][0]["gemm"],
                      "loaded_rss_bytes": max(r["loaded_rss_bytes"] for r in runs[b]),
                      "max_abs_score_difference": float(np.abs(ref - np.array(runs[b][0]["scores"])).max())}
        row["score_std"] = float(ref.std())
        for b in contenders[1:]:
            row[f"{b}_vs_{contenders[0]}"] = row[b]["pairs_per_s"] / row[contenders[0]]["pairs_per_s"]
        print(row, flush=True)
        rows.append(row)
    write(a.out, {"machine": machine(), "command": " ".join(sys.argv), "rows": rows})
    print("| engine | workload | contender (GEMM) | pairs/s | vs the first | max abs score diff | peak RSS GB "
          "(loaded) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for b in (k for k in CONTENDERS if k in r):
            ratio = r[b]["pairs_per_s"] / r[r["reference"]]["pairs_per_s"]
            print(f"| {pathlib.Path(r['engine']).name} | {r['workload']} | {b} ({r[b]['gemm']}) | "
                  f"{r[b]['pairs_per_s']:.2f} | {ratio:.2f}x | {r[b]['max_abs_score_difference']:.2g} | "
                  f"{r[b]['peak_rss_bytes'] / 2**30:.1f} ({r[b]['loaded_rss_bytes'] / 2**30:.1f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

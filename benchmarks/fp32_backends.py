"""fp32 on onnxruntime against fp32 on torch, the same engine and weights, in the same run: the
measurement behind running fp32 on torch by default when torch is importable
(gmr_fast.reranker.FP32_ON_TORCH).

    python benchmarks/fp32_backends.py --tiny ENGINE --real ENGINE --out benchmarks/results/fp32_backends_cpu.json

- ``--tiny``: a small engine (the server benchmark's), Cohere-shaped requests of 20-50 text
  documents (benchmarks/serve.py), scored one request per call and sixteen per call;
- ``--real``: a GMR-width engine (benchmarks/real_size.py builds one), its text and image
  workloads.

Contenders: onnxruntime, torch as it chooses its fp32 GEMM (oneDNN on AMD processors with
AVX-512, where MKL runs AVX2 code; MKL elsewhere), and torch held to MKL (``gemm=blas``). Each
measurement runs in its own process (peak RSS its own); the contenders alternate over
``--rounds`` because this VM's speed drifts over minutes, and the median is reported. Every
contender's scores are compared with onnxruntime's (they must agree to fp32 noise).
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
CONTENDERS = {"onnxruntime": ("onnxruntime", {}), "torch": ("torch", {}), "torch_mkl": ("torch", {"gemm": "blas"})}


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


def child(engine: str, contender: str, kind: str) -> dict:
    from gmr_fast import Reranker

    backend, options = CONTENDERS[contender]
    r = Reranker(engine, precision="fp32", backend=backend, backend_options=options)
    work = calls(kind)
    r.score(work[0][:2])  # warm-up
    start = time.perf_counter()
    scores = [r.score(c) for c in work]
    t = time.perf_counter() - start
    n = sum(len(c) for c in work)
    return {"pairs": n, "calls": len(work), "seconds": t, "pairs_per_s": n / t, "gemm": r.choice.get("gemm"),
            "scores": np.concatenate(scores).tolist()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", help="a small engine (requests of 20-50 documents)")
    p.add_argument("--real", help="a GMR-width engine (text and image workloads)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/fp32_backends_cpu.json")
    a = p.parse_args(argv)
    cases = ([(a.tiny, "requests_x1"), (a.tiny, "requests_x16")] if a.tiny else []) + \
            ([(a.real, "text"), (a.real, "image")] if a.real else [])
    rows = []
    for engine, kind in cases:
        runs = {b: [] for b in CONTENDERS}
        for _ in range(a.rounds):
            for b in CONTENDERS:
                runs[b].append(in_child("fp32_backends:child", engine, b, kind))
        row = {"engine": engine, "workload": kind, "pairs": runs["torch"][0]["pairs"],
               "calls": runs["torch"][0]["calls"]}
        ref = np.array(runs["onnxruntime"][0]["scores"])
        for b in CONTENDERS:
            row[b] = {"pairs_per_s": float(np.median([r["pairs_per_s"] for r in runs[b]])),
                      "pairs_per_s_rounds": [r["pairs_per_s"] for r in runs[b]],
                      "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs[b]), "gemm": runs[b][0]["gemm"],
                      "max_abs_score_difference": float(np.abs(ref - np.array(runs[b][0]["scores"])).max())}
        row["max_abs_score_difference"] = row["torch"]["max_abs_score_difference"]
        row["score_std"] = float(ref.std())
        row["torch_vs_onnxruntime"] = row["torch"]["pairs_per_s"] / row["onnxruntime"]["pairs_per_s"]
        row["torch_mkl_vs_onnxruntime"] = row["torch_mkl"]["pairs_per_s"] / row["onnxruntime"]["pairs_per_s"]
        print(row, flush=True)
        rows.append(row)
    write(a.out, {"machine": machine(), "command": " ".join(sys.argv), "rows": rows})
    print("| engine | workload | onnxruntime pairs/s | torch pairs/s (GEMM) | torch / onnxruntime "
          "| torch on MKL pairs/s | torch on MKL / onnxruntime | peak RSS ort / torch GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {pathlib.Path(r['engine']).name} | {r['workload']} | {r['onnxruntime']['pairs_per_s']:.2f} | "
              f"{r['torch']['pairs_per_s']:.2f} ({r['torch']['gemm']}) | {r['torch_vs_onnxruntime']:.2f}x | "
              f"{r['torch_mkl']['pairs_per_s']:.2f} | {r['torch_mkl_vs_onnxruntime']:.2f}x | "
              f"{r['onnxruntime']['peak_rss_bytes'] / 2**30:.1f} / {r['torch']['peak_rss_bytes'] / 2**30:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

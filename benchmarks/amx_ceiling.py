"""How much of one core's AMX bf16 unit the decoder's GEMMs get, and whether a plain kernel gets more.

The text targets of the MRB workload need gmr_fast's bf16 GEMMs to run faster per FLOP than HF's
(both run torch's oneDNN on AMX). This measures, on one thread (the lanes' case):

- ``peak``: TDPBF16PS on tiles already in registers (random data: zeros run faster);
- ``fed``: the 2x2-tile step of a GEMM (2 A + 2 B tiles loaded, 4 products) cycling through
  a span that sits in L1, in L2 or beyond it;
- ``gemm``: a plain packed 2x2-tile GEMM (amx_ceiling.c) at GMR-3B's decoder shapes, against
  torch's bf16 GEMM as the backend runs it (oneDNN, packed weight) on the same shapes, alternated shape by shape in the same run.

    python benchmarks/amx_ceiling.py --out benchmarks/results/amx_ceiling_amx.json

Needs gcc 11 or later and a CPU with AMX (else it says so and exits 2).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import machine, write  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
# GMR-3B decoder projections (hidden 2048, 16 query and 2 key/value heads of 128, MLP 11008):
# (name, K, N) of x[M, K] @ W[N, K]^T
SHAPES = [("qkv", 2048, 2560), ("o", 2048, 2048), ("gate_up", 2048, 22016), ("down", 11008, 2048)]


def torch_rate(m: int, k: int, n: int, seconds: float = 0.3) -> dict:
    """torch's bf16 GEMM as the backend runs it: oneDNN on a weight packed once into its layout."""
    import torch

    x = torch.randn(m, k).bfloat16()
    w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k).bfloat16(), None)  # [out, in]
    run = lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # noqa: E731
    run()
    best = float("inf")
    for _ in range(3):
        calls, start = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - start < seconds:
            run()
            calls += 1
        best = min(best, (time.perf_counter() - start) / calls)
    return {"ms": 1e3 * best, "gflops": 2 * m * k * n / best / 1e9}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="32,512,2048", help="row counts M of the GEMMs")
    p.add_argument("--spans-kb", default="32,256,1024,8192", help="spans of the fed step, in KiB")
    p.add_argument("--out", default="benchmarks/results/amx_ceiling.json")
    args = p.parse_args()
    info = machine()
    if not info["amx_usable"]:
        print("this CPU (or kernel) offers no AMX tile state: nothing to measure", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        exe = pathlib.Path(tmp) / "amx_ceiling"
        subprocess.run(["gcc", "-O3", "-mamx-tile", "-mamx-bf16", str(HERE / "amx_ceiling.c"), "-o", str(exe), "-lm"],
                       check=True)

        def c(*argv) -> dict:
            return json.loads(subprocess.run([str(exe), *map(str, argv)], check=True, capture_output=True,
                                             text=True).stdout)

        doc = {"machine": info, "threads": 1, "peak": c("peak"),
               "fed": [c("fed", s) for s in map(int, args.spans_kb.split(","))], "gemm": []}
        for m in map(int, args.rows.split(",")):
            for name, k, n in SHAPES:
                plain, ours = torch_rate(m, k, n), c("gemm", m, k, n)
                doc["gemm"].append({"shape": name, "m": m, "k": k, "n": n, "torch_bf16": plain, "plain_amx": ours,
                                    "plain_over_torch": ours["gflops"] / plain["gflops"]})
    # A plain kernel that multiplies the wrong tiles is fast for nothing: its outputs must be the
    # fp32 sums of the bf16 products. fp32 accumulation over K terms errs by about sqrt(K) * 2^-24
    # of sum |terms| (6e-6 at K = 11,008, measured 1e-8); a wrong layout errs by order 1.
    wrong = [g for g in doc["gemm"] if not g["plain_amx"]["rel_error"] < 1e-4]
    doc["plain_amx_correct"] = not wrong
    write(args.out, doc)
    peak = doc["peak"]["gflops"]
    print(f"{info['cpu']}: peak {peak:.0f} GFLOP/s on one core; fed step: "
          + ", ".join(f"{f['span_kb']} KiB {f['gflops']:.0f}" for f in doc["fed"]))
    print("| shape | rows | torch bf16 GFLOP/s (of peak) | plain AMX kernel GFLOP/s (of peak) | plain / torch |")
    print("|---|---|---|---|---|")
    for g in doc["gemm"]:
        t, o = g["torch_bf16"]["gflops"], g["plain_amx"]["gflops"]
        print(f"| {g['shape']} | {g['m']} | {t:.0f} ({t / peak:.0%}) | {o:.0f} ({o / peak:.0%}) | "
              f"{g['plain_over_torch']:.2f}x |")
    for g in wrong:
        print(f"plain kernel WRONG at {g['shape']}, {g['m']} rows: relative error {g['plain_amx']['rel_error']:.2e}",
              file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())

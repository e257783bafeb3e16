"""The gated MLPs' row blocks (backend option ``mlp_rows``, graphs.common.gated_mlp) on the CPU at hand.

``mlp_rows`` (default 512 on every CPU) was chosen from GEMM rates measured on the AMX Xeon with
torch's oneDNN (benchmarks/README.md "Row blocks for gate_up"). Elsewhere the torch backend may
multiply on another GEMM (``gmr_fast._dnnl`` where bf16 results take it, as on AVX512-BF16 CPUs
without AMX), whose rate by row count need not fall the same way. This times one decoder layer's
and one vision block's gated MLP, as the backend set them up for ``precision="bf16"`` on an engine
(packed weights, the GEMM ``auto`` picks here), on random bf16 rows: all rows at once (``0``, the
baseline) against blocks of 256, 512 and 1,024 rows, medians of alternated repetitions.

    python benchmarks/mlp_rows.py --engine /tmp/gmr_bench/gmr-3b-L6-V8-engine --out benchmarks/results/mlp_rows_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine, write  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True, help="an engine directory with a bf16 variant")
    p.add_argument("--rows", default="256,512,1024,2048,3072", help="row counts of the input")
    p.add_argument("--blocks", default="0,256,512,1024", help="mlp_rows settings (0: all rows at once)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/mlp_rows_cpu.json")
    a = p.parse_args(argv)

    import torch

    from gmr_fast import Reranker
    from gmr_fast.graphs.common import gated_mlp

    reranker = Reranker(a.engine, precision="bf16", lanes=1)
    backend = reranker.backend
    m = reranker.manifest
    doc = {"machine": machine(), "engine": a.engine, "threads": torch.get_num_threads(), "gemm": backend.gemm,
           "default_mlp_rows": backend.mlp_rows, "repeats": a.repeats, "unit": "ms, median", "products": {}}
    blocks_of = {"decoder": (backend.decoder.layers[0], m.decoder.hidden_size),
                 "vision": (backend.vision.blocks[0], m.vision["hidden_size"])}
    with torch.inference_mode():
        for name, (block, hidden) in blocks_of.items():
            for n in (int(r) for r in a.rows.split(",")):
                x = torch.randn(n, hidden).to(torch.bfloat16)
                settings = [b for b in (int(s) for s in a.blocks.split(",")) if b == 0 or b < n]
                times = {b: [] for b in settings}
                for b in settings:  # warm-up: each setting's kernels built before timing
                    gated_mlp(block.gate_up, block.down, x, b or None)
                for _ in range(a.repeats):  # alternated, so that drift falls on every setting alike
                    for b in settings:
                        start = time.perf_counter()
                        gated_mlp(block.gate_up, block.down, x, b or None)
                        times[b].append(time.perf_counter() - start)
                row = {str(b): round(statistics.median(t) * 1e3, 2) for b, t in times.items()}
                row["vs_all_rows"] = {str(b): round(statistics.median(times[0]) / statistics.median(t), 3)
                                      for b, t in times.items() if b}
                doc["products"][f"{name} {n} rows"] = row
                print(name, n, row, flush=True)
    write(a.out, doc)
    return doc


if __name__ == "__main__":
    main()

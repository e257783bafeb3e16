"""Where bf16's error on image pairs comes from: the vision tower or the decoder.

On the MRB workload's t2i and it2it pairs (benchmarks/mrb_workload.py: documents with images of
256-768 visual tokens), the default engine scores every pair in fp32 (the reference), then with
image pairs computed four ways beside bf16 text pairs:

- ``all bf16``: ``image_precision="same"``;
- ``bf16-gemm``: the fp32 vision tower and decoder, every product on the bf16 hardware;
- ``bf16-vision``: the vision tower in bf16, the decoder as bf16-gemm's;
- ``bf16-vision (query bf16-gemm)``: bf16-vision with the query's images through bf16-gemm's
  tower (the backend option ``query_vision=bf16-gemm``);
- ``bf16x3``: the fp32 vision tower and decoder, fp32-accurate, each projection three bf16
  GEMMs (graphs.common.Proj "split3"), attention fp32;
- ``decoder bf16``: the vision tower as bf16-gemm's, the decoder in bf16 (not a mode of the
  Reranker: a bf16 reranker fed bf16-gemm's vision outputs, measured to split the error);
- ``MODE+text``: MODE with text pairs on the route too (``text_precision="as-images"``), which
  the t2t task measures (every other contender scores t2t pairs in bf16).

For each: the mean per-query Kendall tau against fp32, the mean distance to fp32 of
per-query-centred scores (a reranker only orders one query's candidates, so a shift common to a
query is harmless; this distance is far less noisy than tau on random weights, whose scores crowd
together), and pairs/s in one process, one after another (rough: this VM drifts).

    python benchmarks/image_precision_split.py --queries 3 --candidates 16 \\
        --out benchmarks/results/image_precision_split_amx.json

Needs an engine of a bf16 checkpoint with fp32 and bf16 (mrb_workload.py makes it) and a CPU whose
oneDNN runs bf16.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import machine, write  # noqa: E402
from mrb_workload import kendall, task_pairs  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", default="/tmp/gmr_bench/gmr-3b-L6-V8-engine")
    p.add_argument("--queries", type=int, default=3)
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--tasks", default="t2i,it2it")
    p.add_argument("--contenders", default="all bf16,bf16-gemm,bf16-vision,decoder bf16,bf16x3")
    p.add_argument("--out", default="benchmarks/results/image_precision_split_cpu.json")
    a = p.parse_args(argv)
    from gmr_fast import Reranker

    tasks = a.tasks.split(",")
    pairs = {t: task_pairs(t, a.queries, a.candidates, seed=7) for t in tasks}

    def run(r) -> dict:
        out = {}
        for t in tasks:
            r.score(task_pairs(t, 1, 2, seed=99))  # warm-up on other pairs
            start = time.perf_counter()
            scores = np.asarray(r.score(pairs[t]), np.float64)
            out[t] = (scores, time.perf_counter() - start)
        return out

    reference = run(Reranker(a.engine, precision="fp32"))
    doc = {"machine": machine(), "engine": a.engine, "queries": a.queries, "candidates": a.candidates, "rows": {}}

    def make(name: str):  # one reranker at a time (memory): "decoder bf16" is a bf16 one fed bf16-gemm's tower
        name, _, text = name.partition("+")  # "MODE+text": text pairs on the route too (text_precision)
        mode = {"all bf16": "same", "decoder bf16": "same", "bf16-vision (query bf16-gemm)": "bf16-vision"}.get(name, name)
        r = Reranker(a.engine, precision="bf16", image_precision=mode,
                     text_precision="as-images" if text else "same",
                     backend_options={"query_vision": "bf16-gemm"} if name == "bf16-vision (query bf16-gemm)" else {})
        if name == "decoder bf16":
            gemm_encode = Reranker(a.engine, precision="bf16", image_precision="bf16-gemm").backend.encode_images
            r.backend.encode_images = lambda batch: [e.bfloat16() for e in gemm_encode(batch)]
        return r

    for name in a.contenders.split(","):
        got, row = run(make(name)), {}
        for t in tasks:
            ref, theirs = reference[t][0], got[t][0]
            cut = [slice(q * a.candidates, (q + 1) * a.candidates) for q in range(a.queries)]
            row[t] = {"pairs_per_s": round(len(ref) / got[t][1], 3),
                      "query_kendall_tau_mean": round(float(np.mean([kendall(ref[s], theirs[s]) for s in cut])), 4),
                      "centred_mean_abs_diff": round(float(np.mean(
                          [np.abs((ref[s] - ref[s].mean()) - (theirs[s] - theirs[s].mean())).mean() for s in cut])), 5),
                      "reference_std": round(float(ref.std()), 4)}
            print(name, t, row[t], flush=True)
        doc["rows"][name] = row
    doc["fp32_pairs_per_s"] = {t: round(len(reference[t][0]) / reference[t][1], 3) for t in tasks}
    write(a.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

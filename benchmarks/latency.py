"""Search latency: rank(query, 50 text documents) and one query with one image document,
gmr_fast.Reranker against HuggingFace transformers (sdpa, logits_to_keep=1, length-sorted
batches) in the same run, p50/p95 over repeated requests. JSON + table.

    python benchmarks/latency.py --out benchmarks/results/latency_cpu.json [--model tiny|180m]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import gmr_fast  # noqa: E402
from throughput import MODELS, HFScorer  # noqa: E402


def percentiles(fn, requests: int) -> dict:
    fn()
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"p50_ms": 1e3 * float(np.percentile(times, 50)), "p95_ms": 1e3 * float(np.percentile(times, 95))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/latency_cpu.json")
    parser.add_argument("--model", default="180m", choices=sorted(MODELS))
    parser.add_argument("--requests", type=int, default=10)
    args = parser.parse_args()

    from export.engine_export import ExportOptions, export_engine
    from export.factory import build_checkpoint

    work = pathlib.Path(tempfile.mkdtemp(prefix="gmr-latency-"))
    ckpt = build_checkpoint(work / "ckpt", "qwen2_5_vl", **MODELS[args.model])
    export_engine(ckpt, work / "engine", ExportOptions(validation_pairs=8))
    reranker = gmr_fast.Reranker(work / "engine", max_batch_tokens=16384, max_batch_size=64)
    hf = HFScorer(ckpt, strong=True, batch_size=16)

    rng = np.random.default_rng(0)
    words = "the of and a to in is for on that with as by this are from at be an or".split()
    docs = [" ".join(rng.choice(words, int(n))) for n in np.clip(rng.lognormal(np.log(120), 0.6, 50), 20, 400)]
    query = "what is the best way to rank documents"
    image = rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)
    cases = {
        "rank_50_text_docs": (lambda: reranker.rank(query, docs), lambda: hf.score([(query, d) for d in docs])),
        "one_query_one_image_doc": (lambda: reranker.score([(query, {"image": image})]),
                                    lambda: hf.score([(query, {"image": image})])),
    }
    rows = []
    for name, (ours, theirs) in cases.items():
        row = {"case": name, "ours": percentiles(ours, args.requests), "hf_strong": percentiles(theirs, args.requests)}
        row["p50_speedup"] = row["hf_strong"]["p50_ms"] / row["ours"]["p50_ms"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    result = {"benchmark": "latency", "model": args.model, "machine": {"cpu": cpu, "cores": os.cpu_count()}, "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("| case | ours p50 ms | ours p95 ms | HF p50 ms | HF p95 ms | p50 speed-up |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ours']['p50_ms']:.1f} | {r['ours']['p95_ms']:.1f} | {r['hf_strong']['p50_ms']:.1f} | "
              f"{r['hf_strong']['p95_ms']:.1f} | {r['p50_speedup']:.2f}x |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Where an it2it pair's time goes, and the speedup over HF that exact scoring can reach there.

    python benchmarks/it2it_bound.py --shape gmr-3b:6:8 --out benchmarks/results/it2it_bound_cpu.json

MRB's it2it pairs each carry a document image. A shared prefix removes the query's image and
text from every pair but the first; the document's image still runs through the vision tower
once per pair (nothing else needs it, so nothing can share it) and its tokens through the
decoder. HF runs per pair the query's tower, the document's tower and the whole prompt's decoder.
This times, on the MRB workload's it2it pairs (``mrb_workload.task_pairs``; every candidate a new
document), gmr_fast's default engine with the vision tower's runs timed apart (the query's and the
documents'), and HF bf16 with the kept heap with its tower timed by hooks, each in its own process.
Then, per pair: ``bound_vision`` = HF's time over our document tower's alone, the most any exact
scorer can reach that runs each document's tower at our rate (which the GEMMs' rate sets: the
table's GFLOP/s); ``bound_pair`` = HF's time over our document tower plus our decoder's share.
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
from mrb_workload import bench_engine, sample_indices, task_pairs  # noqa: E402


def _patches(pairs: list, which: str) -> int:
    """Vision patches (14 x 14 pixels) of the documents' or queries' images (their sides are multiples of 28)."""
    side = 0 if which == "query" else 1
    return sum(p[side]["image"].shape[0] * p[side]["image"].shape[1] // 196 for p in pairs)


def gemm_peak() -> dict:
    """The best bf16 GEMM rate on this CPU at the decoder MLP's shape (1,024 rows), on torch and on
    oneDNN's own GEMM (gmr_fast._dnnl, where it loads): best of five each."""
    import torch

    from gmr_fast.backends import bf16_gemm

    m, k, n = 1024, 2048, 11008
    x, w = torch.randn(m, k).to(torch.bfloat16), torch.randn(n, k).to(torch.bfloat16)
    runs = {"torch": lambda: torch.nn.functional.linear(x, w)}
    dnnl = bf16_gemm.load()
    if dnnl is not None:
        packed, y = dnnl.PackedBf16Weight(w.view(torch.int16).numpy()), np.empty((m, n), np.float32)
        xw = x.view(torch.int16).numpy()
        runs["onednn"] = lambda: packed.multiply(xw, y)
    rates = {}
    for name, f in runs.items():
        f()
        best = min(_timed(f) for _ in range(5))
        rates[name] = 2.0 * m * k * n / best / 1e9
    return rates


def _timed(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def child_gmr(engine: str, queries: int, candidates: int) -> dict:
    from gmr_fast import Reranker

    pairs = task_pairs("it2it", queries, candidates)
    r = Reranker(engine)
    seconds = {"query": 0.0, "document": 0.0}
    query_keys: set = set()  # the queries' images (the plan names each pair's query image first)
    encode = r.backend.encode_images

    def timed(batch):  # the vision runs, on the worker thread while the decoder waits for them
        start = time.perf_counter()
        try:
            return encode(batch)
        finally:
            side = "query" if batch.query or any(k in query_keys for k in batch.keys) else "document"
            seconds[side] += time.perf_counter() - start

    r.backend.encode_images = timed
    r.score(task_pairs("it2it", queries, max(2, candidates // 4), seed=99))  # warm-up on other pairs
    seconds.update(query=0.0, document=0.0)
    plan = r.plan(pairs)
    query_keys.update(keys[0] for keys in plan.image_keys)
    suffix_tokens = sum(len(seq) for _, seq in plan.suffixes.values()) + sum(len(seq) for seq in plan.whole.values())
    start = time.perf_counter()
    r.score(pairs)
    total = time.perf_counter() - start
    s = r.last_stats
    return {"pairs": len(pairs), "seconds": total, "query_vision_seconds": seconds["query"],
            "document_vision_seconds": seconds["document"], "images_encoded": s["images_encoded"],
            "decoder_tokens": s["decoder_tokens"], "prompt_tokens": s["prompt_tokens"], "suffix_tokens": suffix_tokens,
            "document_patches": _patches(pairs, "document"), "query_patches": _patches(pairs[:1], "query") * queries,
            "precision": s["precision"], "image_precision": s["image_precision"], "gemm": s.get("gemm"),
            "gemm_peak_gflop_per_s": gemm_peak()}


def child_hf(checkpoint: str, queries: int, candidates: int, sample: int) -> dict:
    from hf_baseline import HFStrong

    pairs = task_pairs("it2it", queries, candidates)
    subset = [pairs[i] for i in sample_indices(len(pairs), sample)]
    hf = HFStrong(checkpoint, "bf16", keep_heap=True)
    model = hf.ref.model
    visual = model.model.visual if hasattr(getattr(model, "model", None), "visual") else model.visual
    vision, began = [0.0], [0.0]
    visual.register_forward_pre_hook(lambda *_: began.__setitem__(0, time.perf_counter()))
    visual.register_forward_hook(lambda *_: vision.__setitem__(0, vision[0] + time.perf_counter() - began[0]))
    warm = task_pairs("it2it", queries, candidates, seed=99)
    hf.score([warm[i] for i in sample_indices(len(warm), sample)])
    vision[0] = 0.0
    start = time.perf_counter()
    _, padded = hf.score(subset)
    total = time.perf_counter() - start
    return {"pairs": len(subset), "seconds": total, "vision_seconds": vision[0], "decoder_tokens": padded,
            "patches": _patches(subset, "query") + _patches(subset, "document")}


def vision_gflop(patches: int, dims: dict) -> float:
    """The vision tower's GEMM work for ``patches`` patches run one image at a time (qkv, proj, MLP;
    windowed attention is small, a full-attention block's is quadratic and counted apart)."""
    h, i = dims["hidden_size"], dims["intermediate_size"]
    per_row = 3 * h * h + h * h + (3 if dims.get("mlp") == "swiglu" else 2) * h * i
    return 2.0 * patches * per_row * dims["depth"] / 1e9


def decoder_gflop_per_token(d: dict) -> float:
    """The decoder's GEMM work per token (projections and MLP of every layer; the head is one row)."""
    h, kv = d["hidden_size"], d["num_kv_heads"] * d["head_dim"]
    return 2.0 * (h * h + 2 * h * kv + h * h + 3 * h * d["intermediate_size"]) * d["num_layers"] / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="gmr-3b:6:8", help="shape:decoder_layers:vision_layers of the checkpoint")
    p.add_argument("--work", default="/tmp/gmr_bench", help="where the benchmark checkpoint and engine are kept")
    p.add_argument("--queries", type=int, default=1)
    p.add_argument("--candidates", type=int, default=24)
    p.add_argument("--hf-sample", type=int, default=6)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    ckpt, engine = bench_engine(a.work, a.shape)
    import json

    manifest = json.load(open(engine / "manifest.json"))
    dims = manifest["vision"]
    doc = {"machine": machine(), "shape": a.shape, "queries": a.queries, "candidates": a.candidates,
           "command": " ".join(["benchmarks/it2it_bound.py", *(argv if argv is not None else sys.argv[1:])])}
    g = in_child("it2it_bound:child_gmr", str(engine), a.queries, a.candidates)
    h = in_child("it2it_bound:child_hf", str(ckpt), a.queries, a.candidates, a.hf_sample)
    n = g["pairs"]
    ours = g["seconds"] / n
    doc_vision = g["document_vision_seconds"] / n
    rest = (g["seconds"] - g["document_vision_seconds"] - g["query_vision_seconds"]) / n
    hf = h["seconds"] / h["pairs"]
    flop = vision_gflop(g["document_patches"], dims)
    # the GEMM work no exact scorer avoids: each document's tower and the decoder rows of its own tokens
    # (the prefix's rows, computed once per query, left out: what is left with many candidates per query)
    work = (flop + decoder_gflop_per_token(manifest["decoder"]) * g["suffix_tokens"]) / n
    peak = max(g["gemm_peak_gflop_per_s"].values())
    doc.update(gmr=g, hf_bf16_kept_heap=h, per_pair={
        "gmr_seconds": ours, "gmr_document_vision_seconds": doc_vision,
        "gmr_query_vision_seconds": g["query_vision_seconds"] / n, "gmr_rest_seconds": rest,
        "hf_seconds": hf, "hf_vision_seconds": h["vision_seconds"] / h["pairs"],
        "hf_rest_seconds": (h["seconds"] - h["vision_seconds"]) / h["pairs"],
        "speedup": hf / ours, "bound_vision": hf / doc_vision, "bound_pair": hf / (doc_vision + rest),
        "document_tower_gemm_gflop_per_s": flop / g["document_vision_seconds"],
        "gemm_gflop_per_pair": work, "gemm_peak_gflop_per_s": peak, "bound_gemm": hf / (work / peak)})
    write(a.out, doc)
    print(table(doc))
    return 0


def table(doc: dict) -> str:
    p = doc["per_pair"]
    return "\n".join([
        "| per it2it pair | gmr_fast (default) | HF bf16 (kept heap) |", "|---|---|---|",
        f"| all | {p['gmr_seconds']:.2f} s | {p['hf_seconds']:.2f} s |",
        f"| vision tower | document {p['gmr_document_vision_seconds']:.2f} s + query "
        f"{p['gmr_query_vision_seconds']:.2f} s (once per query) | {p['hf_vision_seconds']:.2f} s (query and document) |",
        f"| the rest (decoder, prompt, pixels) | {p['gmr_rest_seconds']:.2f} s | {p['hf_rest_seconds']:.2f} s |",
        f"| speedup | **{p['speedup']:.2f}x** | |",
        f"| bound: HF over our document tower alone | {p['bound_vision']:.2f}x | |",
        f"| bound: HF over our document tower + our rest | {p['bound_pair']:.2f}x | |",
        f"| document tower GEMM rate | {p['document_tower_gemm_gflop_per_s']:.0f} GFLOP/s | |",
        f"| bound: HF over the pair's GEMM work ({p['gemm_gflop_per_pair']:.0f} GFLOP) at the peak bf16 GEMM "
        f"rate ({p['gemm_peak_gflop_per_s']:.0f} GFLOP/s) | {p['bound_gemm']:.2f}x | |"])


if __name__ == "__main__":
    sys.exit(main())

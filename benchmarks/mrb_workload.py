"""The MRB workload at real width: queries x 50-100 candidates per task (t2t, i2t, t2i, it2it),
the default engine with shared prefixes on and off, against HuggingFace's strong form in fp32 and
bf16, in the same run; then search latency (rank 50 text documents; one query with one image
document).

    python benchmarks/mrb_workload.py --shape gmr-3b:6:8 --out benchmarks/results/mrb_workload_cpu.json

The checkpoint is generated with GMR-3B's widths and layout (random weights) at reduced depth
(``shape:decoder_layers:vision_layers``; at least 6 decoder layers so that savings confined to
the last layer do not dominate). Lengths are MRB-like: query images of 256-1,280 visual tokens,
documents of 30-400 words or images of 256-768 tokens. HF scores a sample of each image task's pairs
(it recomputes everything per pair, one image encode per pair; on i2t and it2it its rate on the
sample matched its rate on every pair of a query's 50, but on t2i's mixed-size document images
the sample pads more and reads its rate 13-21% low: ``hf_sample.py``) and every t2t pair (on a
small sample of text documents its length-sorted batches pad more, which would read its rate
low); gmr_fast scores all of them. Ranking agreement is measured on
the sample against HF fp32. Every measurement runs in its own process (its own peak RSS).
``--pool N`` draws the candidates of all queries from one corpus of N documents (overlapping
lists, as top-k lists over a shared corpus are); gmr_fast scores all pairs in one call, so each
distinct image is encoded once, as the score CLI does within a chunk of ``--chunk-pairs``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import in_child, machine, write  # noqa: E402

WORDS = ("the of and a to in is for on that with as by this are from at be an or which image document query river "
         "mountain chart table photo report market city science history bridge station garden").split()
TASKS = ("t2t", "i2t", "t2i", "it2it")
TARGETS = {"t2t": 2.0, "i2t": 5.0, "t2i": 1.3, "it2it": 5.0}


def _image(rng, lo_tokens: int, hi_tokens: int) -> np.ndarray:
    """A random image whose resized grid has between lo and hi visual tokens (sides multiple of 28)."""
    while True:
        h, w = (int(x) for x in rng.integers(8, 48, 2))
        if lo_tokens <= h * w <= hi_tokens:
            return rng.integers(0, 256, (h * 28, w * 28, 3), dtype=np.uint8)


def task_pairs(task: str, queries: int, candidates: int, seed: int = 0, pool: int = 0) -> list:
    """``queries`` x ``candidates`` pairs of ``task``. With ``pool`` > 0 every query's candidates
    are drawn (distinct within the query) from one corpus of ``max(pool, candidates)`` documents,
    so the lists overlap as top-k lists over a shared corpus do; 0: every candidate is new."""
    rng = np.random.default_rng(seed + TASKS.index(task))
    text = lambda lo, hi: " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))  # noqa: E731

    def document():
        if task in ("t2t", "i2t"):
            return text(30, 400)
        if task == "t2i":
            return {"image": _image(rng, 256, 768)}
        return {"text": text(10, 60), "image": _image(rng, 256, 768)}

    corpus = [document() for _ in range(max(pool, candidates))] if pool else None
    pairs = []
    for _ in range(queries):
        if task in ("t2t", "t2i"):
            query = text(4, 16)
        elif task == "i2t":
            query = {"image": _image(rng, 256, 1280)}
        else:
            query = {"text": text(3, 10), "image": _image(rng, 256, 1280)}
        if corpus is None:
            pairs += [(query, document()) for _ in range(candidates)]
        else:
            pairs += [(query, corpus[int(i)]) for i in rng.choice(len(corpus), candidates, replace=False)]
    return pairs


def distinct_documents(pairs: list) -> int:
    """How many different documents ``pairs`` hold (by content: what the Reranker encodes once per call)."""
    return len({repr(d) if isinstance(d, str) else (d.get("text"), d["image"].tobytes()) for _, d in pairs})


def sample_indices(n: int, k: int) -> list[int]:
    return sorted(set(np.linspace(0, n - 1, min(k, n)).astype(int).tolist()))


def child_gmr(engine: str, task: str, queries: int, candidates: int, share: bool, sample: int,
              lanes: int | None = None, image_precision: str = "auto", backend_options: dict | None = None,
              pool: int = 0, per_query_cache_mb: int | None = None) -> dict:
    """``per_query_cache_mb``: score one query's candidates per call (as a server's requests or a
    job's chunks come), with an image cache of that many MiB, instead of all pairs in one call."""
    from gmr_fast import Reranker

    pairs = task_pairs(task, queries, candidates, pool=pool)
    r = Reranker(engine, share_prefix=share, lanes=lanes, image_precision=image_precision,
                 backend_options=backend_options or {}, image_cache_mb=per_query_cache_mb or 0)
    # Warm-up on other pairs, as many as are timed: the timed call then runs in memory the process
    # has touched before. On a VM whose freed memory is reported to the host, memory touched for the
    # first time costs 30x a plain page fault (hf_baseline.py), which a two-pair warm-up left to the
    # timed call (t2t on the AMX Xeon: 4.2 pairs/s after two pairs, 6.2 after fifty).
    r.score(task_pairs(task, queries, candidates, seed=99, pool=pool))
    start = time.perf_counter()
    if per_query_cache_mb is None:
        scores = r.score(pairs)
        stats = dict(r.last_stats)
    else:
        parts, stats = [], {}
        for q in range(queries):
            parts.append(r.score(pairs[q * candidates:(q + 1) * candidates]))
            for k, v in r.last_stats.items():
                stats[k] = stats.get(k, 0) + v if k in ("decoder_tokens", "prompt_tokens", "shared_pairs", "prefixes",
                                                        "boundary_fallbacks", "exact_pairs", "images_encoded",
                                                        "image_cache_hits") else v
        scores = np.concatenate(parts)
    t = time.perf_counter() - start
    idx = sample_indices(len(pairs), sample)
    return {"pairs": len(pairs), "seconds": t, "pairs_per_s": len(pairs) / t, "sample_scores": scores[idx].tolist(),
            "decoder_tokens_per_pair": stats["decoder_tokens"] / len(pairs),
            "prompt_tokens_per_pair": stats["prompt_tokens"] / len(pairs), "precision": stats["precision"],
            "image_precision": r.choice["image_precision"], "exact_pairs": stats.get("exact_pairs"),
            "backend": stats["backend"], "shared_pairs": stats["shared_pairs"], "prefixes": stats["prefixes"],
            "boundary_fallbacks": stats["boundary_fallbacks"], "padding_efficiency": stats["padding_efficiency"],
            "images_encoded": stats.get("images_encoded"), "image_cache_hits": stats.get("image_cache_hits"),
            "malloc": r.choice.get("malloc"), "lanes": r.choice["lanes"], "threads_per_lane": r.choice["threads_per_lane"]}


def child_hf(checkpoint: str, dtype: str, task: str, queries: int, candidates: int, sample: int,
             pool: int = 0, keep_heap: bool = False) -> dict:
    from hf_baseline import HFStrong

    pairs = task_pairs(task, queries, candidates, pool=pool)
    subset = [pairs[i] for i in sample_indices(len(pairs), sample)]
    hf = HFStrong(checkpoint, dtype, keep_heap=keep_heap)
    warm = task_pairs(task, queries, candidates, seed=99, pool=pool)
    hf.score([warm[i] for i in sample_indices(len(warm), sample)])  # as many as are timed, as child_gmr's
    start = time.perf_counter()
    scores, padded = hf.score(subset)
    t = time.perf_counter() - start
    return {"pairs": len(subset), "seconds": t, "pairs_per_s": len(subset) / t, "sample_scores": scores.tolist(),
            "decoder_tokens_per_pair": padded / len(subset), "malloc": hf.heap}


def child_latency(kind: str, path: str, what: str, requests: int, keep_heap: bool = False) -> dict:
    """p50/p95 of ``what`` (rank50: rank 50 text documents of 30-400 words | rank10: rank 10
    passages of 200 words each, a RAG query's chunks | one_image_pair) for gmr_fast (kind=gmr,
    path=engine) or HF (kind=hf_fp32/hf_bf16, path=checkpoint). ``keep_heap`` gives HF the
    allocator setting gmr_fast's torch backend makes (gmr_fast.memory) once its weights are
    loaded (hf_baseline.HFStrong)."""
    rng = np.random.default_rng(7)
    text = lambda lo, hi: " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))  # noqa: E731
    if what in ("rank50", "rank10"):
        n, lo, hi = (50, 30, 400) if what == "rank50" else (10, 200, 201)
        calls = [[(text(4, 12), text(lo, hi)) for _ in range(n)] for _ in range(requests + 1)]
        for c in calls:
            q = c[0][0]
            c[:] = [(q, d) for _, d in c]
    elif what == "one_image_pair":
        calls = [[(text(4, 12), {"image": _image(rng, 256, 768)})] for _ in range(requests + 1)]
    else:
        raise ValueError(f"unknown latency call {what!r}: rank50, rank10 or one_image_pair")
    vision = [0.0]  # seconds in the vision tower during the current call: where a call's time goes
    if kind.startswith("gmr"):  # gmr, gmr_bf16_gemm_<setting> (--bf16-gemms), gmr_host_kernels_off, gmr_route_attention_fp32,
        # gmr_mlp_rows_off
        from gmr_fast import Reranker

        setting = kind[len("gmr_bf16_gemm_"):] if kind.startswith("gmr_bf16_gemm_") else None
        options = {"bf16_gemm": setting} if setting else {}
        if kind == "gmr_host_kernels_off":
            options = {"host_kernels": "off"}
        if kind == "gmr_mlp_rows_off":
            options = {"mlp_rows": 0}
        if kind == "gmr_route_attention_fp32":
            options = {"route_attention": "fp32"}
        r = Reranker(path, backend_options=options)
        lanes = r.choice["lanes"]
        encode = r.backend.encode_images

        def timed_encode(batch):  # the worker thread's vision run; the decoder waits for it
            start = time.perf_counter()
            try:
                return encode(batch)
            finally:
                vision[0] += time.perf_counter() - start

        r.backend.encode_images = timed_encode
        run = lambda pairs: r.rank(pairs[0][0], [d for _, d in pairs])  # noqa: E731
    else:
        from hf_baseline import HFStrong

        hf = HFStrong(path, kind.split("_")[1], keep_heap=keep_heap)
        lanes = None
        model = hf.ref.model
        visual = model.model.visual if hasattr(getattr(model, "model", None), "visual") else model.visual
        began = [0.0]
        visual.register_forward_pre_hook(lambda *_: began.__setitem__(0, time.perf_counter()))
        visual.register_forward_hook(lambda *_: vision.__setitem__(0, vision[0] + time.perf_counter() - began[0]))
        run = lambda pairs: hf.score(pairs)  # noqa: E731
    run(calls[0])
    times, vision_times = [], []
    for c in calls[1:]:
        vision[0] = 0.0
        start = time.perf_counter()
        run(c)
        times.append(time.perf_counter() - start)
        vision_times.append(vision[0])
    return {"p50_ms": 1e3 * float(np.percentile(times, 50)), "p95_ms": 1e3 * float(np.percentile(times, 95)),
            "requests": requests, "times_ms": [1e3 * t for t in times], "lanes": lanes,
            "vision_ms": [1e3 * t for t in vision_times]}


def interleaved(runs: dict, rounds: int) -> dict:
    """Runs each ``name: (args...)`` latency child ``rounds`` times, alternating between them,
    and pools their calls: this VM's speed drifts by up to 2x over minutes (measured), so
    measuring one contender after the other would compare different machines."""
    pooled: dict = {name: {"times_ms": [], "vision_ms": [], "wall_seconds": 0.0, "peak_rss_bytes": 0} for name in runs}
    for _ in range(rounds):
        for name, args in runs.items():
            row = in_child("mrb_workload:child_latency", *args)
            p = pooled[name]
            p["times_ms"] += row["times_ms"]
            p["vision_ms"] += row["vision_ms"]
            p["wall_seconds"] += row["wall_seconds"]
            p["peak_rss_bytes"] = max(p["peak_rss_bytes"], row["peak_rss_bytes"])
            p["lanes"] = row.get("lanes")
    for p in pooled.values():
        p.update(requests=len(p["times_ms"]), p50_ms=float(np.percentile(p["times_ms"], 50)),
                 p95_ms=float(np.percentile(p["times_ms"], 95)),
                 # the rest of each call: prompt, preprocessing and the decoder (the decoder dominates)
                 vision_p50_ms=float(np.percentile(p["vision_ms"], 50)),
                 rest_p50_ms=float(np.percentile(np.subtract(p["times_ms"], p["vision_ms"]), 50)))
    return pooled


def kendall(a, b) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


def bench_engine(work: str, spec: str) -> tuple[pathlib.Path, pathlib.Path]:
    """The benchmark checkpoint of ``shape:decoder_layers:vision_layers`` under ``work`` and its
    engine (fp32, int8, bf16), each made the first time it is asked for."""
    from export.factory import build_shape_checkpoint

    shape, layers, vlayers = spec.split(":")
    ckpt = pathlib.Path(work) / f"{shape}-L{layers}-V{vlayers}"
    if not (ckpt / "model.safetensors.index.json").exists():
        build_shape_checkpoint(ckpt, shape, int(layers), int(vlayers))
    engine = ckpt.parent / f"{ckpt.name}-engine"
    if not (engine / "manifest.json").exists():
        in_child("real_size:child_export", str(ckpt), str(engine), ["fp32", "int8", "bf16"], timeout=7200)
    return ckpt, engine


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="gmr-3b:6:8")
    p.add_argument("--queries", type=int, default=2)
    p.add_argument("--candidates", type=int, default=50)
    p.add_argument("--hf-sample", type=int, default=16,
                   help="pairs per image task HF scores (t2t: every pair, see main)")
    p.add_argument("--pool", type=int, default=0,
                   help="draw every query's candidates from one corpus of this many documents, so that the lists "
                        "overlap (as top-k lists over a shared corpus do); gmr_fast encodes each distinct image "
                        "once per call, HF once per pair. 0 (default): every candidate is a new document")
    p.add_argument("--shared-only", action="store_true", help="leave out the row with shared prefixes off")
    p.add_argument("--per-query-cache-mb", default="",
                   help="comma-separated MiB: also run gmr (prefixes shared) one query per call with an image cache "
                        "of each size (0: none, so that each call encodes its own images)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--hf-dtypes", default="fp32,bf16",
                   help="HF dtypes timed on the tasks; fp32 always runs (the ranking reference). Leave bf16 out "
                        "only on a CPU without bf16 hardware, where torch's bf16 GEMM runs at about a tenth of "
                        "fp32's (benchmarks/int8_kernels.py) and HF bf16 cannot be its fastest dtype")
    p.add_argument("--latency-requests", type=int, default=5)
    p.add_argument("--latency-hf", default="fp32,bf16", help="HF dtypes timed in the latency part")
    p.add_argument("--latency-calls", default="rank50,one_image_pair",
                   help="which calls the latency part times: rank50, rank10 (10 passages of 200 words), one_image_pair")
    p.add_argument("--latency-rounds", type=int, default=1,
                   help="alternate the contenders this many times (each round runs --latency-requests calls)")
    p.add_argument("--hf-kept-heap", action="store_true",
                   help="also time HF with gmr_fast's allocator setting (gmr_fast.memory; hf_baseline.py says why): "
                        "each HF dtype on the tasks, HF bf16 in the latency part; speed-ups are then against the "
                        "fastest HF row, kept heap or not")
    p.add_argument("--one-lane", action="store_true",
                   help="also run gmr shared with lanes=1, to separate the gain of running batches side by side")
    p.add_argument("--lanes-rows", default="",
                   help="also run gmr shared with each of these lane counts (comma-separated; 1 is --one-lane's "
                        "row), e.g. 2 on a CPU whose default is one lane")
    p.add_argument("--image-precisions", default="",
                   help="more gmr rows (prefixes shared): the default engine with each image_precision named "
                        "(fp32, bf16x3, bf16-gemm, bf16-vision, same), beside auto's")
    p.add_argument("--bf16-gemms", default="",
                   help="comma-separated settings of the torch backend option bf16_gemm (onednn, fp32-results, "
                        "torch): also run gmr (prefixes shared, and in the latency part) with each, in the same run")
    p.add_argument("--torch-gemm", action="store_true",
                   help="--bf16-gemms torch: also run gmr (prefixes shared) on torch's own bf16 GEMMs (backend option bf16_gemm=torch: "
                        "two per fp32 product) beside gmr_fast._dnnl's, in the same run")
    p.add_argument("--host-kernels-off", action="store_true",
                   help="also run gmr (prefixes shared, and in the latency part) with the torch backend option "
                        "host_kernels=off (torch's operations for the bf16 vision tower's RoPE and norms), in the same run")
    p.add_argument("--mlp-rows-off", action="store_true",
                   help="also run gmr (prefixes shared, and in the latency part) with the torch backend option "
                        "mlp_rows=0 (gate_up's product over all rows at once, as before 6 Dec), in the same run")
    p.add_argument("--route-attention-fp32", action="store_true",
                   help="also run gmr (prefixes shared, and in the latency part) with the torch backend option "
                        "route_attention=fp32 (image routes' decoder attention in fp32, as before 5 Dec), in the same run")
    p.add_argument("--work", default="/tmp/gmr_bench")
    p.add_argument("--out", default="benchmarks/results/mrb_workload_cpu.json")
    a = p.parse_args(argv)
    gemms = [g for g in a.bf16_gemms.split(",") if g] + (["torch"] if a.torch_gemm and "torch" not in a.bf16_gemms else [])
    ckpt, engine = bench_engine(a.work, a.shape)
    shape, layers, vlayers = a.shape.split(":")
    hf_dtypes = ["fp32"] + [d for d in a.hf_dtypes.split(",") if d and d != "fp32"]
    doc = {"machine": machine(), "shape": shape, "decoder_layers": int(layers), "vision_layers": int(vlayers),
           "queries": a.queries, "candidates": a.candidates, "pool": a.pool, "hf_sample": a.hf_sample,
           "hf_sample_t2t": a.queries * a.candidates,
           "hf_dtypes": hf_dtypes, "tasks": {}}
    for task in ([] if a.tasks == "none" else a.tasks.split(",")):  # "none": the latency part alone
        # t2t: HF on every pair. HF pads a batch to its longest pair, and on a small sample of 30-400-word
        # documents that is a third more per pair than on the full list (6 Dec: 477 against 364 decoder
        # tokens a pair, 2.83 against 3.88 pairs/s), which reads gmr_fast's speed-up high; the image
        # tasks keep the sample (HF fp32 on every it2it pair takes 10-20 minutes); t2i's reads HF 13-21% low
        # (hf_sample.py)
        sample = a.queries * a.candidates if task == "t2t" else a.hf_sample
        rows = {f"hf_{d}": in_child("mrb_workload:child_hf", str(ckpt), d, task, a.queries, a.candidates, sample,
                                    a.pool) for d in hf_dtypes}
        if a.hf_kept_heap:
            rows.update({f"hf_{d}_kept_heap": in_child("mrb_workload:child_hf", str(ckpt), d, task, a.queries,
                                                       a.candidates, sample, a.pool, True) for d in hf_dtypes})
        for name, share in (("gmr_shared", True), ("gmr_not_shared", False))[:1 if a.shared_only else 2]:
            rows[name] = in_child("mrb_workload:child_gmr", str(engine), task, a.queries, a.candidates, share,
                                  sample, None, "auto", None, a.pool)
        for ip in filter(None, a.image_precisions.split(",")):
            rows[f"gmr_shared_{ip}"] = in_child("mrb_workload:child_gmr", str(engine), task, a.queries, a.candidates,
                                                True, sample, None, ip, None, a.pool)
        for g in gemms:  # rows named as before for torch ("gmr_shared_torch_gemm")
            name = "gmr_shared_torch_gemm" if g == "torch" else f"gmr_shared_bf16_gemm_{g}"
            rows[name] = in_child("mrb_workload:child_gmr", str(engine), task, a.queries, a.candidates, True,
                                  sample, None, "auto", {"bf16_gemm": g}, a.pool)
        if a.host_kernels_off:
            rows["gmr_shared_host_kernels_off"] = in_child("mrb_workload:child_gmr", str(engine), task, a.queries,
                                                           a.candidates, True, sample, None, "auto",
                                                           {"host_kernels": "off"}, a.pool)
        if a.mlp_rows_off:
            rows["gmr_shared_mlp_rows_off"] = in_child("mrb_workload:child_gmr", str(engine), task, a.queries,
                                                       a.candidates, True, sample, None, "auto",
                                                       {"mlp_rows": 0}, a.pool)
        if a.route_attention_fp32:
            rows["gmr_shared_route_attention_fp32"] = in_child("mrb_workload:child_gmr", str(engine), task, a.queries,
                                                               a.candidates, True, sample, None, "auto",
                                                               {"route_attention": "fp32"}, a.pool)
        for mb in filter(None, a.per_query_cache_mb.split(",")):
            rows[f"gmr_shared_per_query_cache_{mb}mb"] = in_child(
                "mrb_workload:child_gmr", str(engine), task, a.queries, a.candidates, True, sample, None, "auto",
                None, a.pool, int(mb))  # in_child passes positional arguments only
        for n in sorted({int(n) for n in filter(None, a.lanes_rows.split(","))} | ({1} if a.one_lane else set())):
            rows["gmr_shared_one_lane" if n == 1 else f"gmr_shared_{n}_lanes"] = in_child(
                "mrb_workload:child_gmr", str(engine), task, a.queries, a.candidates, True, sample, n, "auto", None,
                a.pool)
        ref = rows["hf_fp32"]["sample_scores"]
        best_hf = max(row["pairs_per_s"] for name, row in rows.items() if name.startswith("hf_"))
        for name, row in rows.items():
            row["kendall_tau_vs_hf_fp32"] = kendall(ref, row.pop("sample_scores"))
            row["speedup_vs_hf_fastest"] = row["pairs_per_s"] / best_hf
        pairs = task_pairs(task, a.queries, a.candidates, pool=a.pool)
        rows["distinct_documents"] = distinct_documents(pairs)
        rows["pairs_per_distinct_document"] = len(pairs) / rows["distinct_documents"]
        rows["target"] = TARGETS[task]
        rows["met"] = rows["gmr_shared"]["speedup_vs_hf_fastest"] >= TARGETS[task]
        doc["tasks"][task] = rows
        print(json.dumps({"task": task, **{k: (round(v["pairs_per_s"], 3), round(v["speedup_vs_hf_fastest"], 2),
                                               round(v["kendall_tau_vs_hf_fp32"], 3))
                                           for k, v in rows.items() if isinstance(v, dict)}}), flush=True)
    if a.latency_requests:
        lat = {}
        for what in a.latency_calls.split(","):
            runs = {"gmr": ("gmr", str(engine), what, a.latency_requests)}
            for g in gemms:
                runs[f"gmr_bf16_gemm_{g}"] = (f"gmr_bf16_gemm_{g}", str(engine), what, a.latency_requests)
            if a.host_kernels_off:
                runs["gmr_host_kernels_off"] = ("gmr_host_kernels_off", str(engine), what, a.latency_requests)
            if a.mlp_rows_off:
                runs["gmr_mlp_rows_off"] = ("gmr_mlp_rows_off", str(engine), what, a.latency_requests)
            if a.route_attention_fp32:
                runs["gmr_route_attention_fp32"] = ("gmr_route_attention_fp32", str(engine), what, a.latency_requests)
            runs.update({f"hf_{d}": (f"hf_{d}", str(ckpt), what, a.latency_requests) for d in a.latency_hf.split(",")})
            if a.hf_kept_heap:
                runs["hf_bf16_kept_heap"] = ("hf_bf16", str(ckpt), what, a.latency_requests, True)
            lat[what] = interleaved(runs, a.latency_rounds)
            best = min(lat[what][name]["p50_ms"] for name in runs if name.startswith("hf_"))
            lat[what]["p50_speedup_vs_hf_fastest"] = best / lat[what]["gmr"]["p50_ms"]
            if a.hf_kept_heap:
                lat[what]["p50_speedup_vs_hf_bf16_kept_heap"] = lat[what]["hf_bf16_kept_heap"]["p50_ms"] / lat[what]["gmr"]["p50_ms"]
            print(json.dumps({what: lat[what]}), flush=True)
        doc["latency"] = lat
    write(a.out, doc)
    print(table(doc))
    return 0


def table(doc: dict) -> str:
    lines = ["| task | HF fp32 pairs/s | HF bf16 pairs/s | gmr shared pairs/s | gmr not shared | speed-up vs HF fastest "
             "(target) | decoder tokens/pair gmr (HF) | tau vs HF fp32 |", "|---|---|---|---|---|---|---|---|"]
    for task, r in doc["tasks"].items():
        g = r["gmr_shared"]
        hf = {d: (f"{r[f'hf_{d}']['pairs_per_s']:.2f}" if f"hf_{d}" in r else "not run")
              + (f" / {r[f'hf_{d}_kept_heap']['pairs_per_s']:.2f} kept" if f"hf_{d}_kept_heap" in r else "")
              for d in ("fp32", "bf16")}
        lines.append(f"| {task} | {hf['fp32']} | {hf['bf16']} | "
                     f"{g['pairs_per_s']:.2f} | "
                     f"{r['gmr_not_shared']['pairs_per_s'] if 'gmr_not_shared' in r else float('nan'):.2f} | "
                     f"{g['speedup_vs_hf_fastest']:.2f}x ({r['target']}x) | {g['decoder_tokens_per_pair']:.0f} "
                     f"({r['hf_fp32']['decoder_tokens_per_pair']:.0f}) | {g['kendall_tau_vs_hf_fp32']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

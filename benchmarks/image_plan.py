"""The score CLI's plan for the image cache (``gmr_fast.jobs.ImagePlan``) on MRB-shaped jobs
whose candidate lists overlap, as top-k lists over one corpus do: the same suite scored by
``python -m gmr_fast.score`` with the plan (the default), without any cache (the CLI before the
plan, and ``--no-image-cache-plan`` now), and optionally, within a budget too small for the
corpus, the plan against an LRU cache of the same size; HF bf16 on a sample of the pairs in the
same run (it encodes every pair's images, so overlap does not change its rate).

    python benchmarks/image_plan.py --tasks t2i,it2it --queries 4 --candidates 40 --pool 64 \\
        --chunk-pairs 40 --tight-mb 64 --out benchmarks/results/image_plan_cpu.json

The suite is ``mrb_workload.task_pairs(..., pool=N)``'s pairs written as files (images as PNG,
lossless, so the pixels are the arrays'); ``--chunk-pairs`` at one query's candidates stands for
a dataset of many queries, whose chunks (512 pairs by default, 5 queries of 100) are few against
its queries: within a chunk each distinct image is encoded once anyway, so only images shared
across chunks show the plan. Every run is its own process (its own peak RSS), warmed up on a
small job of other pairs first; the scores of every gmr_fast run are compared bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import in_child, machine, write  # noqa: E402
from mrb_workload import bench_engine, distinct_documents, task_pairs  # noqa: E402

def write_suite(root: str, task: str, queries: int, candidates: int, pool: int, seed: int = 0) -> dict:
    """``task_pairs``' pairs as a one-dataset suite; returns what it holds."""
    from PIL import Image

    pairs = task_pairs(task, queries, candidates, seed=seed, pool=pool)
    path = os.path.join(root, task)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(os.path.join(path, "img"))
    docs: dict[int, str] = {}  # id(document object) -> its corpus id (task_pairs reuses a pool's objects)
    corpus, query_rows, trec, qrels = [], [], [], []

    def row(value, rid: str) -> dict:
        if isinstance(value, str):
            return {"id": rid, "text": value}
        out = {"id": rid}
        if value.get("text"):
            out["text"] = value["text"]
        name = f"img/{rid}.png"
        Image.fromarray(value["image"]).save(os.path.join(path, name))
        out["image"] = name
        return out

    for q in range(queries):
        qid = f"q{q}"
        query_rows.append(row(pairs[q * candidates][0], qid))
        for rank, (_, d) in enumerate(pairs[q * candidates:(q + 1) * candidates], 1):
            if id(d) not in docs:
                docs[id(d)] = f"d{len(docs)}"
                corpus.append(row(d, docs[id(d)]))
            trec.append(f"{qid} Q0 {docs[id(d)]} {rank} {candidates - rank + 1}.0 first\n")
            if rank % 7 == 1:  # a judgement or two per query: the report needs them, the timing does not
                qrels.append(f"{qid}\t{docs[id(d)]}\t1\n")
    for name, lines in (("queries.jsonl", [json.dumps(r) + "\n" for r in query_rows]),
                        ("corpus.jsonl", [json.dumps(r) + "\n" for r in corpus]),
                        ("candidates.trec", trec), ("qrels.tsv", qrels)):
        with open(os.path.join(path, name), "w") as f:
            f.writelines(lines)
    with open(os.path.join(path, "dataset.json"), "w") as f:
        json.dump({"name": task, "task": task}, f)
    return {"pairs": len(pairs), "distinct_documents": distinct_documents(pairs), "corpus_rows": len(corpus)}

def child_cli(engine: str, suite: str, warm_suite: str, out: str, args: list) -> dict:
    """The score CLI on ``suite`` in this process, after a run on ``warm_suite`` (other pairs)."""
    from gmr_fast.score import main

    common = ["--engine", engine, "--top-k", "1000", "--quiet", *args]
    shutil.rmtree(out + "-warm", ignore_errors=True)
    assert main(common + ["--data", warm_suite, "--out", out + "-warm"]) == 0
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    assert main(common + ["--data", suite, "--out", out]) == 0
    seconds = time.perf_counter() - start
    return {"seconds_cli": seconds, **_summary(out)}

def run_ray(engine: str, suite: str, out: str, workers: int, args: list) -> dict:
    """The score CLI on ``suite`` with ``--ray local --workers N`` (the cores shared among them), in
    a network namespace with only loopback (as the tests run Ray). No warm-up: each run starts
    its own cluster and actors, so the Ray rows compare with each other, not with the rows above."""
    import subprocess

    from ray_scaleout import in_namespace

    shutil.rmtree(out, ignore_errors=True)
    cpus = str(max(1, (os.cpu_count() or 2) // workers))
    cmd = [sys.executable, "-m", "gmr_fast.score", "--engine", engine, "--top-k", "1000", "--quiet", "--data", suite,
           "--out", out, "--ray", "local", "--workers", str(workers), "--worker-cpus", cpus, *args]
    start = time.perf_counter()
    proc = subprocess.run(in_namespace(cmd), capture_output=True, text=True, timeout=7200,
                          cwd=str(pathlib.Path(__file__).resolve().parents[1]))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"ray run {args} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"wall_seconds": wall, "workers": workers, "worker_cpus": int(cpus), "peak_rss_bytes": 0,
            **_summary(out)}


def _summary(out: str) -> dict:
    run = json.load(open(os.path.join(out, "run.json")))
    session = run["sessions"][-1]
    (name, stats), = session["datasets"].items()
    rows = [json.loads(line) for line in open(os.path.join(out, name, "scores.jsonl"))]
    digest = hashlib.sha256(json.dumps(sorted((r["qid"], r["docid"], r["score"]) for r in rows)).encode()).hexdigest()
    return {**{k: stats.get(k) for k in ("scored_this_session", "seconds", "pairs_per_s", "images_encoded",
                                         "image_cache_hits", "image_cache_budget_mb", "recurring_images",
                                         "images_shared")},
            "precision": session.get("precision"), "image_precision": session.get("image_precision"),
            "scores_sha256": digest}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="gmr-3b:6:8")
    p.add_argument("--tasks", default="t2i,it2it")
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--candidates", type=int, default=40)
    p.add_argument("--pool", type=int, default=64, help="corpus every query's candidates are drawn from")
    p.add_argument("--chunk-pairs", type=int, default=40)
    p.add_argument("--tight-mb", type=int, default=0,
                   help="also run the plan and an LRU cache (--no-image-cache-plan) within this many MiB (first task)")
    p.add_argument("--hf-sample", type=int, default=8, help="pairs HF bf16 scores (0: no HF row)")
    p.add_argument("--ray-workers", type=int, default=0,
                   help="also run the CLI on a local Ray cluster of this many actors, with the plan and without any "
                        "cache (first task)")
    p.add_argument("--only-ray", action="store_true", help="only the Ray rows (with --ray-workers)")
    p.add_argument("--work", default="/tmp/gmr_bench")
    p.add_argument("--out", default="benchmarks/results/image_plan_cpu.json")
    a = p.parse_args(argv)
    work = pathlib.Path(a.work)
    ckpt, engine = bench_engine(a.work, a.shape)
    shape, layers, vlayers = a.shape.split(":")
    doc = {"machine": machine(), "shape": shape, "decoder_layers": int(layers), "vision_layers": int(vlayers),
           "queries": a.queries, "candidates": a.candidates, "pool": a.pool, "chunk_pairs": a.chunk_pairs,
           "tight_mb": a.tight_mb, "tasks": {}}
    chunk = ["--chunk-pairs", str(a.chunk_pairs)]
    for n, task in enumerate(a.tasks.split(",")):
        suite, warm = str(work / "image_plan" / "suite"), str(work / "image_plan" / "warm")
        held = write_suite(suite, task, a.queries, a.candidates, a.pool)
        shutil.rmtree(warm, ignore_errors=True)
        write_suite(warm, task, 1, 10, 0, seed=99)
        runs = {"no_cache": ["--no-image-cache-plan"], "plan": []}
        if a.tight_mb and n == 0:
            runs.update(plan_tight=["--image-cache-mb", str(a.tight_mb)],
                        lru_tight=["--no-image-cache-plan", "--image-cache-mb", str(a.tight_mb)])
        if a.only_ray:
            runs = {}
        rows = {}
        if a.ray_workers and n == 0:
            for name, extra in (("ray_no_cache", ["--no-image-cache-plan"]), ("ray_plan", [])):
                rows[name] = run_ray(str(engine), os.path.join(suite, task), str(work / "image_plan" / f"out-{name}"),
                                     a.ray_workers, extra + chunk)
                print(task, name, json.dumps(rows[name]), flush=True)
        for name, extra in runs.items():
            rows[name] = in_child("image_plan:child_cli", str(engine), os.path.join(suite, task),
                                  os.path.join(warm, task), str(work / "image_plan" / f"out-{name}"), extra + chunk)
            print(task, name, json.dumps(rows[name]), flush=True)
        if a.hf_sample:
            rows["hf_bf16_kept_heap"] = in_child("mrb_workload:child_hf", str(ckpt), "bf16", task, a.queries,
                                                 a.candidates, a.hf_sample, a.pool, True)
            rows["hf_bf16_kept_heap"].pop("sample_scores", None)
            print(task, "hf", json.dumps(rows["hf_bf16_kept_heap"]), flush=True)
        hf = rows.get("hf_bf16_kept_heap", {}).get("pairs_per_s")
        for name, r in rows.items():  # Ray rows against Ray without a cache, the others against the CLI without one
            base = rows.get("ray_no_cache" if name.startswith("ray") else "no_cache")
            if base is not None:
                r["vs_no_cache"] = r["pairs_per_s"] / base["pairs_per_s"]
            if hf:
                r["vs_hf_bf16"] = r["pairs_per_s"] / hf
        gmr = [r["scores_sha256"] for k, r in rows.items() if not k.startswith("hf")]
        doc["tasks"][task] = {**held, "rows": rows, "scores_identical": len(set(gmr)) == 1}
        write(a.out, doc)
    print(table(doc))
    return 0

def table(doc: dict) -> str:
    lines = ["| task | run | pairs/s | vs no cache | vs HF bf16 (sample) | images encoded (cache hits) | peak RSS GB |",
             "|---|---|---|---|---|---|---|"]
    for task, t in doc["tasks"].items():
        for name, r in t["rows"].items():
            enc = "" if name.startswith("hf") else f"{r['images_encoded']} ({r['image_cache_hits']})"
            rss = f"{r['peak_rss_bytes'] / 1e9:.1f}" if r.get("peak_rss_bytes") else "(actors apart)"
            lines.append(f"| {task} | {name} | {r['pairs_per_s']:.3f} | {r.get('vs_no_cache', float('nan')):.2f}x | "
                         f"{r.get('vs_hf_bf16', float('nan')):.2f}x | {enc} | {rss} |")
    return "\n".join(lines)

if __name__ == "__main__":
    sys.exit(main())

"""How the bf16 image routes rank against fp32 on more image pairs than real_size.py's 32.

    python benchmarks/image_tau.py --engine ENGINE --seeds 0,1,2,3,4,5,6,7 --out benchmarks/results/image_tau_amx.json

The pairs are real_size.py's ``image`` workload (a 1,116-token and a 324-token query image, 16
short text documents each, every query text different) drawn with each seed in ``--seeds``, 32
pairs a seed. Each of ``--modes`` (``image_precision`` under bf16) scores all of them in one
call; the reference is the same engine's fp32 (``precision="fp32"``), which equals HF
transformers' fp32 within the export's criterion (tests/test_real_width.py and the export's
validation); HF fp32 itself takes ~4 s an image pair at GMR-3B width, 6 + 8 layers, on 2 cores,
about 20 minutes for 256 pairs. Reported per mode: Kendall tau pooled over every pair (the figure
real_size.py reports over its 32), pooled per seed (32 pairs, as real_size.py's), per query
image (16 pairs), and the mean |score - fp32|.

``--workload t2i`` (or i2t, it2it) draws benchmarks/mrb_workload.py's pairs of that task instead:
``--queries`` queries a seed, each with ``--candidates`` documents (t2i: a 4-16-word text query and
document images of 256-768 visual tokens), so a route's ranking can be read per query kind: the
image workload above is all image queries. Reported beside the pooled tau: each query's tau and
their mean, the figure the export's criterion and ``auto`` judge by.

Where the routes' error comes from: a mode may name decoder products to compute exactly, as
bf16x3 does (``bf16-gemm:x3=down/gate_up``: those projections of the image batches' fp32 decoder
take one more bf16 GEMM, on their input's rounding residual, graphs.common.Proj "split3"; names
are a layer's ``q``, ``kv``, ``o``, ``gate_up``, ``down``), and the attention's inputs
(``bf16-gemm:attention=fp32``, the backend option ``route_attention``). Both are measurement
devices here, not settings an engine records. ``--reference-cache`` keeps the fp32 scores (about
10 minutes for 256 pairs) for later runs over the same engine and seeds.
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

from common import machine, write  # noqa: E402
from mrb_workload import task_pairs  # noqa: E402
from real_size import workload  # noqa: E402


def main(argv=None) -> int:
    from scipy.stats import kendalltau

    from gmr_fast import Reranker

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True, help="an engine with fp32 and bf16 variants")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--workload", default="image", choices=("image", "t2i", "i2t", "it2it"),
                   help="real_size.py's image workload, or mrb_workload.py's pairs of a task")
    p.add_argument("--queries", type=int, default=2, help="queries a seed (mrb_workload tasks)")
    p.add_argument("--candidates", type=int, default=25, help="documents a query (mrb_workload tasks)")
    p.add_argument("--modes", default="bf16-vision,bf16-gemm", help="image_precision values under bf16")
    p.add_argument("--out", default="benchmarks/results/image_tau.json")
    p.add_argument("--reference-cache", help="an .npz of the fp32 scores: read where it matches the engine and "
                   "seeds, else written")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    pairs, per_seed, groups = [], [], []
    size = 16 if a.workload == "image" else a.candidates
    for seed in seeds:
        drawn = (workload("image", seed=seed)[0] if a.workload == "image" else
                 task_pairs(a.workload, a.queries, a.candidates, seed=seed))
        per_seed.append(range(len(pairs), len(pairs) + len(drawn)))
        groups += [range(len(pairs) + i, len(pairs) + i + size) for i in range(0, len(drawn), size)]
        pairs += drawn
    doc = {"machine": machine(), "engine": str(pathlib.Path(a.engine).resolve()), "seeds": seeds,
           "workload": a.workload, **({} if a.workload == "image" else {"queries": a.queries,
                                                                     "candidates": a.candidates}),
           "pairs": len(pairs), "reference": "fp32", "modes": {}}
    scores = {}
    cache = pathlib.Path(a.reference_cache) if a.reference_cache else None
    cached = np.load(cache) if cache is not None and cache.exists() else None
    if cached is not None and (str(cached["engine"]) != doc["engine"] or list(cached["seeds"]) != seeds
                               or str(cached.get("workload", "image")) != a.workload
                               or len(cached["scores"]) != len(pairs)):
        cached = None
    modes = a.modes.split(",")
    if cached is not None:
        scores["fp32"] = cached["scores"]
        doc["modes"]["fp32"] = {"cached": str(cache), **json.loads(str(cached["row"]))}
    else:
        modes = ["fp32"] + modes
    for mode in modes:
        route, x3, attention = parse_mode(mode)
        options = ({"precision": "fp32"} if mode == "fp32" else
                   {"precision": "bf16", "image_precision": route,
                    **({"backend_options": {"route_attention": attention}} if attention else {})})
        reranker = Reranker(a.engine, **options)
        exact = exact_products(reranker, x3) if x3 else []
        start = time.perf_counter()
        scores[mode] = np.asarray(reranker.score(pairs), np.float64)
        seconds = time.perf_counter() - start
        row = {"seconds": seconds, "pairs_per_s": len(pairs) / seconds,
               "choice": {k: reranker.choice.get(k) for k in ("precision", "image_precision", "backend")},
               **({"split3": exact} if exact else {}),
               **({"route_attention": reranker.backend.route_attention} if attention else {})}
        if mode == "fp32" and cache is not None:
            np.savez(cache, scores=scores[mode], engine=doc["engine"], seeds=np.array(seeds), row=json.dumps(row),
                     workload=a.workload)
        if mode != "fp32":
            ref, got = scores["fp32"], scores[mode]
            tau = lambda rows: float(kendalltau(ref[list(rows)], got[list(rows)])[0])  # noqa: E731
            per_query = [tau(g) for g in groups]
            row.update(pooled_tau=tau(range(len(pairs))), per_seed_tau=[tau(r) for r in per_seed],
                       per_query_tau=per_query, query_tau_mean=float(np.mean(per_query)),
                       mean_abs_diff=float(np.abs(ref - got).mean()), max_abs_diff=float(np.abs(ref - got).max()))
        doc["modes"][mode] = row
        print(mode, {k: v for k, v in row.items() if k != "per_query_tau"}, flush=True)
        del reranker
        write(a.out, doc)
    print(f"| mode | pairs | pooled tau | per seed ({len(per_seed[0])} pairs) | per query ({size}): mean, min-max "
          "| mean abs diff |")
    print("|---|---|---|---|---|---|")
    for mode, row in doc["modes"].items():
        if mode != "fp32":
            print(f"| {mode} | {len(pairs)} | {row['pooled_tau']:.3f} | "
                  f"{', '.join(f'{t:.3f}' for t in row['per_seed_tau'])} | "
                  f"{row['query_tau_mean']:.3f}, {min(row['per_query_tau']):.3f}-{max(row['per_query_tau']):.3f} | "
                  f"{row['mean_abs_diff']:.4f} |")
    return 0


def parse_mode(mode: str) -> tuple[str, list[str], str | None]:
    """``ROUTE[:x3=a/b][:attention=fp32|bf16]`` -> (route, products, attention)."""
    route, *parts = mode.split(":")
    x3, attention = [], None
    for part in parts:
        key, _, value = part.partition("=")
        if key == "x3" and value:
            x3 = value.split("/")
        elif key == "attention" and value in ("fp32", "bf16"):
            attention = value
        else:
            raise SystemExit(f"mode {mode!r}: expected ROUTE[:x3=q/kv/o/gate_up/down][:attention=fp32|bf16]")
    return route, x3, attention


def exact_products(reranker, names: list[str]) -> list[str]:
    """Turns the named projections of the image batches' fp32 decoder from "split" (inputs rounded
    to bf16) to "split3" (their rounding residual multiplied too: fp32-accurate); returns them."""
    from gmr_fast.graphs.common import Proj

    decoder = getattr(reranker.backend, "exact_decoder", None)
    done = []
    for name, module in [] if decoder is None else decoder.named_modules():
        if isinstance(module, Proj) and name.rsplit(".", 1)[-1] in names:
            if module.upcast != "split":
                raise SystemExit(f"{name} computes {module.upcast!r}, not a split product: x3 takes bf16-gemm "
                                 "or bf16-vision on a CPU with bf16 GEMMs")
            module.upcast = "split3"
            done.append(name)
    if not done:
        raise SystemExit(f"no projection named {'/'.join(names)} in the image batches' decoder")
    return done


if __name__ == "__main__":
    sys.exit(main())

"""Real GMR widths: export time and memory, engine bytes, run-time memory and speed of every
precision against HuggingFace fp32 and bf16, measured in the same run on this CPU.

    python benchmarks/real_size.py --shapes gmr-3b:6:8,gmr-7b:3:4 --out benchmarks/results/real_size_cpu.json
    python benchmarks/real_size.py --full-export gmr-3b --out benchmarks/results/real_size_full_export.json
    python benchmarks/real_size.py --isa avx512-vnni --reuse --workloads text --precisions auto,fp32,int8,bf16
    python benchmarks/real_size.py --isa avx512-vnni --reuse --workloads image --hf-dtypes fp32 --precisions auto,fp32,int8

The last two ran as on an AVX512-VNNI processor without AMX (``--isa``, benchmarks/common.py);
results/real_size_vnni.json holds both (HF bf16 and gmr bf16 skipped on images: no bf16 hardware).

Checkpoints are generated with the released widths and layout (export.factory; random weights;
reduced depth ``shape:decoder_layers:vision_layers`` so a run fits in minutes). Every
measurement runs in its own process, so its peak RSS is its own. Workloads (fixed seeds):

- ``text``: 4 queries x 8 documents of 30-400 words;
- ``image``: 32 image-query pairs, a 1,116-token and a 324-token query image with 16 short text
  documents each; every pair's query text differs, so no prompt prefix is shared (gmr_fast still
  encodes each distinct image once per call, HF once per pair).

Reported per workload: pairs/s, speed-up against HF fp32 and HF bf16, peak RSS, ranking agreement
(Kendall tau) with HF fp32, and the Reranker's activation budget. ``--full-export`` builds a
full-depth checkpoint and records the export (time, peak RSS, engine bytes; a refusal is recorded
as the result); ``--score`` then scores the text workload with the engine and with HF in each of
``--hf-dtypes`` that fits (GMR-7B: ``--hf-dtypes bf16``), ranking against the first.
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

from common import apply_isa, in_child, machine, write  # noqa: E402

WORDS = ("the of and a to in is for on that with as by this are from at be an or which image document query river "
         "mountain chart table photo report market city science history").split()


def workload(kind: str, seed: int = 0, per_group: int | None = None) -> tuple[list, str]:
    """The workload's pairs; ``per_group`` keeps only the first that many pairs of each query (text)
    or query image (image), the same pairs the whole workload starts its groups with."""
    rng = np.random.default_rng(seed)
    text = lambda k: " ".join(rng.choice(WORDS, int(k)))  # noqa: E731
    if kind == "text":
        queries = [text(rng.integers(4, 12)) for _ in range(4)]
        groups = [[(q, text(rng.integers(30, 400))) for _ in range(8)] for q in queries]
    else:
        big = rng.integers(0, 256, (1008, 868, 3), dtype=np.uint8)  # 36 x 31 merged patches = 1,116 tokens
        small = rng.integers(0, 256, (504, 504, 3), dtype=np.uint8)  # 18 x 18 = 324 tokens
        groups = [[({"text": text(5), "image": im}, text(rng.integers(10, 30))) for _ in range(16)]
                  for im in (big, small)]
    return [pair for group in groups for pair in group[:per_group]], kind


def child_export(checkpoint: str, engine: str, dtypes: list, reference: str = "auto", int8_kept: str = "fp32",
                 int8_keep: list | None = None, int8_smooth: float | None = None,
                 int8_activations: str | None = None, fp32_over_bf16: bool | None = None,
                 validation: tuple | None = None) -> dict:
    import logging

    from export.engine_export import ExportOptions, export_engine

    logging.basicConfig(level=logging.INFO)
    start = time.perf_counter()
    sizes = dict(zip(("validation_queries", "validation_documents", "validation_long_documents"), validation or ()))
    m = export_engine(checkpoint, engine, ExportOptions(dtypes=tuple(dtypes), force=True, reference=reference,
                                                        int8_kept=int8_kept, int8_smooth=int8_smooth,
                                                        int8_activations=int8_activations,
                                                        int8_keep=None if int8_keep is None else tuple(int8_keep),
                                                        fp32_over_bf16=fp32_over_bf16, **sizes))
    return {"export_seconds": time.perf_counter() - start,
            "variants": {p: {"weight_bytes": v.details.get("weight_bytes"),
                             "validation": {k: v.validation.get(k) for k in ("max_rel_error", "kendall_tau",
                                                                              "query_kendall_tau_mean",
                                                                              "top10_overlap_mean", "seconds", "long")},
                             "details": {k: v.details.get(k) for k in ("kept_fp32_patterns", "build_seconds",
                                                                       "activations", "smooth_alpha", "smoothed")}}
                         for p, v in m.variants.items()},
            "refused": m.validation.get("refused", {}), "int8_kept": int8_kept,
            "reference": m.validation.get("reference"), "reference_seconds": m.validation.get("reference_seconds"),
            "calibration_seconds": m.validation.get("calibration_seconds"),
            "validation_pairs": m.validation.get("pairs"), "fp32_over_bf16": fp32_over_bf16,
            "engine_bytes": sum(f.stat().st_size for f in pathlib.Path(engine).iterdir())}


def child_reranker(engine: str, precision: str, kind: str, share: bool = True, repeat: int = 1,
                   per_group: int | None = None, image_precision: str = "auto") -> dict:
    from gmr_fast import Reranker

    pairs, _ = workload(kind, per_group=per_group)
    t = time.perf_counter()
    r = Reranker(engine, precision=precision, share_prefix=share, image_precision=image_precision)
    load_seconds = time.perf_counter() - t
    # warm-up on as many other pairs of the same kind: the timed run then uses memory touched before
    # (first touch costs 30x a page fault on a VM that reports freed memory, hf_baseline.py)
    r.score(workload(kind, seed=1, per_group=per_group)[0])
    best, scores = None, None
    for _ in range(repeat):
        start = time.perf_counter()
        scores = r.score(pairs)
        t = time.perf_counter() - start
        best = t if best is None else min(best, t)
    return {"pairs": len(pairs), "seconds": best, "pairs_per_s": len(pairs) / best, "scores": scores.tolist(),
            "stats": {k: v for k, v in r.last_stats.items() if not isinstance(v, list)},
            "activation_budget_mb": r.options.activation_budget_mb, "load_seconds": load_seconds,
            "choice": {k: r.choice[k] for k in ("precision", "image_precision", "text_precision", "backend")}}


def child_hf(checkpoint: str, dtype: str, kind: str, per_group: int | None = None, keep_heap: bool = False) -> dict:
    from hf_baseline import HFStrong

    pairs, _ = workload(kind, per_group=per_group)
    hf = HFStrong(checkpoint, dtype, keep_heap=keep_heap)
    hf.score(workload(kind, seed=1, per_group=per_group)[0])  # as child_reranker's warm-up
    start = time.perf_counter()
    scores, padded = hf.score(pairs)
    t = time.perf_counter() - start
    return {"pairs": len(pairs), "seconds": t, "pairs_per_s": len(pairs) / t, "scores": scores.tolist(),
            "padded_tokens": padded, "malloc": hf.heap}


def kendall(a, b) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


def query_kendall(a, b, groups: int) -> float:
    """Mean Kendall tau over ``groups`` equal consecutive groups (one query's candidates each)."""
    a, b = np.array_split(np.asarray(a), groups), np.array_split(np.asarray(b), groups)
    return float(np.mean([kendall(x, y) for x, y in zip(a, b)]))


def reused_export(engine: pathlib.Path, dtypes: list[str]) -> dict | None:
    """The figures an earlier export of ``engine`` recorded in its manifest, when it holds every variant asked for."""
    try:
        m = json.loads((engine / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    refused = m.get("validation", {}).get("refused", {})
    if not set(dtypes) <= set(m.get("variants", {})) | set(refused):  # a refused variant was tried: no need to again
        return None
    return {"reused": True, "created": m.get("created"),
            "export_seconds": m.get("validation", {}).get("export_seconds"),
            "variants": {p: {"validation": {k: v.get("validation", {}).get(k)
                                            for k in ("max_rel_error", "kendall_tau", "query_kendall_tau_mean",
                                                      "top10_overlap_mean", "seconds")},
                             "details": {k: v.get("details", {}).get(k) for k in ("kept_fp32_patterns",)},
                             **({"routes": {k: r.get("query_kendall_tau_mean")
                                            for k, r in v["validation"].items() if k.endswith("_images")}}
                                if any(k.endswith("_images") for k in v.get("validation", {})) else {})}
                         for p, v in m["variants"].items()},
            "refused": refused, "engine_bytes": sum(f.stat().st_size for f in engine.iterdir())}


def run_shape(spec: str, work: pathlib.Path, precisions: list[str], kinds: list[str], reuse: bool = False,
              hf_dtypes: tuple = ("fp32", "bf16"), dtypes: list[str] | None = None, int8: tuple = (),
              hf_kept_heap: bool = False, image_precisions: tuple = ()) -> dict:
    from export.factory import build_shape_checkpoint

    shape, layers, vision_layers = spec.split(":")
    ckpt = work / f"{shape}-L{layers}-V{vision_layers}"
    if not (ckpt / "model.safetensors.index.json").exists():
        build_shape_checkpoint(ckpt, shape, int(layers), int(vision_layers))
    engine = work / f"{ckpt.name}-engine"
    dtypes = sorted({p.split("-")[0] for p in precisions if p != "auto"} | set(dtypes or ("fp32", "int8", "bf16")))
    export = reused_export(engine, dtypes) if reuse else None
    if export is None:  # int8: (--int8-kept, --int8-keep, --int8-smooth, --int8-activations)
        export = in_child("real_size:child_export", str(ckpt), str(engine), dtypes, "auto", *int8, timeout=6 * 3600)
    print(json.dumps({"shape": spec, "export": {k: v for k, v in export.items()}}), flush=True)
    out = {"shape": shape, "decoder_layers": int(layers), "vision_layers": int(vision_layers), "export": export,
           "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")), "workloads": {}}
    for kind in kinds:
        rows = {}
        for dtype in hf_dtypes:
            rows[f"hf_{dtype}"] = in_child("real_size:child_hf", str(ckpt), dtype, kind, timeout=6 * 3600)
            if hf_kept_heap:  # hf_baseline.py: HF with gmr_fast's allocator setting, which can be 2x faster
                rows[f"hf_{dtype}_kept_heap"] = in_child("real_size:child_hf", str(ckpt), dtype, kind, None, True,
                                                         timeout=6 * 3600)
        have = set(json.loads((engine / "manifest.json").read_text())["variants"])
        for precision in precisions:  # "bf16-whole": that precision with shared prefixes off
            base, _, whole = precision.partition("-")
            if base != "auto" and base not in have:  # the export refused it (its reason is in export.refused)
                print(json.dumps({"shape": spec, "workload": kind, "method": f"gmr_{precision}",
                                  "skipped": "not in the engine: the export refused it"}), flush=True)
                continue
            rows[f"gmr_{precision}"] = in_child("real_size:child_reranker", str(engine), base, kind, not whole,
                                               timeout=6 * 3600)
        for mode in image_precisions if kind == "image" else ():  # bf16 with pairs with an image under MODE
            rows[f"gmr_bf16_images_{mode}"] = in_child("real_size:child_reranker", str(engine), "bf16", kind, True, 1,
                                                      None, mode, timeout=6 * 3600)
        ref = rows["hf_fp32"]["scores"]
        fastest_hf = max(row["pairs_per_s"] for name, row in rows.items() if name.startswith("hf_"))
        for name, row in rows.items():
            row["kendall_tau_vs_hf_fp32"] = kendall(ref, row.pop("scores"))
            row["speedup_vs_hf_fp32"] = row["pairs_per_s"] / rows["hf_fp32"]["pairs_per_s"]
            row["speedup_vs_hf_fastest"] = row["pairs_per_s"] / fastest_hf
            print(json.dumps({"shape": spec, "workload": kind, "method": name,
                              **{k: row[k] for k in ("pairs_per_s", "peak_rss_bytes", "kendall_tau_vs_hf_fp32",
                                                     "speedup_vs_hf_fastest")}}), flush=True)
        out["workloads"][kind] = rows
    return out


def table(doc: dict) -> str:
    lines = ["| shape (layers) | workload | method | pairs/s | vs HF fp32 | vs HF fastest | tau vs HF fp32 | peak RSS GB |",
             "|---|---|---|---|---|---|---|---|"]
    for s in doc.get("shapes", []):
        for kind, rows in s["workloads"].items():
            for name, r in rows.items():
                lines.append(f"| {s['shape']} ({s['decoder_layers']}) | {kind} | {name} | {r['pairs_per_s']:.2f} | "
                             f"{r['speedup_vs_hf_fp32']:.2f}x | {r['speedup_vs_hf_fastest']:.2f}x | "
                             f"{r['kendall_tau_vs_hf_fp32']:.3f} | {r['peak_rss_bytes'] / 1e9:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="gmr-3b:6:8")
    p.add_argument("--precisions", default="auto,fp32,int8,bf16,bf16-whole",
                   help="Reranker precisions to run; a -whole suffix turns shared prefixes off")
    p.add_argument("--workloads", default="text,image")
    p.add_argument("--image-precisions", default="",
                   help="more rows on the image workload: bf16 with pairs with an image under each image_precision "
                        "named (e.g. bf16-vision,bf16-vision-x3-gate-up), beside --precisions' rows")
    p.add_argument("--hf-dtypes", default="fp32,bf16",
                   help="HF baselines (fp32 always: it is the reference); 'vs HF fastest' is over these")
    p.add_argument("--hf-kept-heap", action="store_true",
                   help="also time each HF dtype with gmr_fast's allocator setting (hf_baseline.py says why); "
                        "'vs HF fastest' is then over both")
    p.add_argument("--full-export", help="a shape to build at full depth and export (--dtypes), recording the export")
    p.add_argument("--dtypes", help="variants to export: of the full-depth export (default fp32), or of --shapes' "
                                    "engines besides the --precisions named (default fp32,int8,bf16; on a CPU "
                                    "without bf16 hardware bf16's validation runs at a tenth of fp32's speed)")
    p.add_argument("--reference", default="auto", help="the full-depth export's reference (auto | hf | streamed)")
    p.add_argument("--int8-kept", default="fp32", help="the full-depth export's --int8-kept (fp32 | int8-weights)")
    p.add_argument("--int8-keep", help="the full-depth export's --int8-keep, comma-separated globs (default: the "
                                       "export escalates through its fallback lists, one export attempt each)")
    p.add_argument("--int8-smooth", type=float, help="the full-depth export's --int8-smooth (alpha)")
    p.add_argument("--int8-activations", choices=["tensor", "row"], help="the full-depth export's --int8-activations")
    p.add_argument("--fp32-over-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="the full-depth export's --fp32-over-bf16 (fp32 over bf16 weight files; with --dtypes fp32 "
                        "alone, no bf16 variant); default: the export's rule")
    p.add_argument("--validation", help="the full-depth export's validation set as QUERIES,DOCUMENTS,LONG_DOCUMENTS "
                                        "(default the export's 4,20,12)")
    p.add_argument("--score", action="store_true",
                   help="after the full-depth export, score the text workload with it and with HF in --hf-dtypes "
                        "(list only those that fit: GMR-7B in fp32 needs 33 GB), ranking compared with the first")
    p.add_argument("--reuse", action="store_true",
                   help="score with an engine an earlier run exported (its manifest's figures are recorded)")
    p.add_argument("--isa", default="native",
                   help="native, avx512-vnni or avx512-bf16: run as on a processor without AMX (common.ISA_LIMITS)")
    p.add_argument("--score-workload", default="text", choices=["text", "image"],
                   help="the workload --score runs on the full-depth engine and HF")
    p.add_argument("--score-per-group", type=int,
                   help="--score on the first N pairs of each query (text) or query image (image) only, for "
                        "engines too slow for the whole workload in one session (both sides score the same pairs)")
    p.add_argument("--engine", help="the full-depth export's engine directory (default: WORK/SHAPE-full-engine)")
    p.add_argument("--score-precision", help="the precisions --score runs, comma-separated, each in its own process "
                                             "(default: the first of int8, bf16, fp32 among --dtypes); with fp32 "
                                             "among them every row's ranking is measured against it too")
    p.add_argument("--work", default="/tmp/gmr_bench")
    p.add_argument("--out", default="benchmarks/results/real_size_cpu.json")
    a = p.parse_args(argv)
    apply_isa(a.isa)  # the children inherit the environment and the filter
    work = pathlib.Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine(), "command": " ".join(sys.argv)}
    if a.full_export:
        a.dtypes = a.dtypes or "fp32"
        from export.factory import build_shape_checkpoint

        ckpt = work / f"{a.full_export}-full"
        if not (ckpt / "model.safetensors.index.json").exists():
            t = time.perf_counter()
            build_shape_checkpoint(ckpt, a.full_export)
            doc["checkpoint_build_seconds"] = time.perf_counter() - t
        doc["checkpoint_bytes"] = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        engine = pathlib.Path(a.engine) if a.engine else work / f"{a.full_export}-full-engine"
        try:
            reused = reused_export(engine, a.dtypes.split(",")) if a.reuse else None
            doc["full_export"] = reused or in_child(
                "real_size:child_export", str(ckpt), str(engine), a.dtypes.split(","), a.reference, a.int8_kept,
                a.int8_keep.split(",") if a.int8_keep else None, a.int8_smooth, a.int8_activations, a.fp32_over_bf16,
                [int(n) for n in a.validation.split(",")] if a.validation else None, timeout=6 * 3600)
        except RuntimeError as e:  # e.g. the only variant asked for was refused: the reason is the result
            doc["full_export"] = {"error": str(e)[-2000:]}
            write(a.out, doc)
            print(json.dumps(doc, indent=1))
            return 1
        w = doc["full_export"]
        weights = max(v.get("weight_bytes") or 0 for v in w["variants"].values())
        if "peak_rss_bytes" in w:  # not for a reused engine: its export was recorded by the run that made it
            doc["bar"] = {"peak_rss_bytes": w["peak_rss_bytes"], "largest_variant_weight_bytes": weights,
                          "limit_bytes": 1.5 * weights + 2e9, "within": w["peak_rss_bytes"] <= 1.5 * weights + 2e9}
        if a.score:
            precisions = (a.score_precision or next(p for p in ("int8", "bf16", "fp32")
                                                    if p in a.dtypes.split(","))).split(",")
            rows = {p: in_child("real_size:child_reranker", str(engine), p, a.score_workload,
                                per_group=a.score_per_group, timeout=6 * 3600) for p in precisions}
            doc["scoring"] = rows[precisions[0]]
            if "fp32" in rows:  # the fp32 engine is the fp32 model (validated at export): ranking against it
                groups = 4 if a.score_workload == "text" else 2
                for row in rows.values():
                    row["kendall_tau_vs_gmr_fp32"] = kendall(rows["fp32"]["scores"], row["scores"])
                    row["query_kendall_tau_vs_gmr_fp32"] = query_kendall(rows["fp32"]["scores"], row["scores"], groups)
            hf, doc["hf"] = {}, {}
            for dtype in filter(None, a.hf_dtypes.split(",")):
                try:
                    hf[dtype] = in_child("real_size:child_hf", str(ckpt), dtype, a.score_workload,
                                         per_group=a.score_per_group, timeout=6 * 3600)
                except RuntimeError as e:  # e.g. killed for memory: recorded, the export's figures are kept
                    doc["hf"][dtype] = {"error": str(e)[-2000:]}
            if hf:  # the first HF dtype that ran is the ranking reference (HF fp32 where it fits)
                ref = next(iter(hf))
                for row in [*hf.values(), *rows.values()]:
                    row[f"kendall_tau_vs_hf_{ref}"] = kendall(hf[ref]["scores"], row["scores"])
                for row in rows.values():
                    row["speedup_vs_hf_fastest"] = row["pairs_per_s"] / max(r["pairs_per_s"] for r in hf.values())
                doc["hf"].update({name: {k: v for k, v in row.items() if k != "scores"} for name, row in hf.items()})
            for row in rows.values():
                row.pop("scores", None)
            if len(rows) > 1:
                doc["also_scored"] = {p: rows[p] for p in precisions[1:]}
        print(json.dumps(doc, indent=1))
    else:
        int8 = (a.int8_kept, a.int8_keep.split(",") if a.int8_keep else None, a.int8_smooth, a.int8_activations)
        doc["shapes"] = [run_shape(s, work, a.precisions.split(","), a.workloads.split(","), a.reuse,
                                   tuple(dict.fromkeys(["fp32"] + a.hf_dtypes.split(","))),
                                   a.dtypes.split(",") if a.dtypes else None, int8, a.hf_kept_heap,
                                   tuple(filter(None, a.image_precisions.split(","))))
                         for s in a.shapes.split(",")]
        print(table(doc))
    write(a.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Validate a variant of an existing engine on the export's validation set, against the fp32
reference, without writing the engine again.

    python benchmarks/revalidate.py --checkpoint /tmp/gmr_bench/gmr-7b-full \
        --engine /tmp/gmr_bench/gmr-7b-full-engine --precision bf16 --image-modes bf16-vision \
        --out benchmarks/results/revalidate_7b_bf16_full92_epyc_zen4.json

For engines too large to export twice in one sitting: GMR-7B at full depth takes 74 minutes on a
2-core CPU with fp32 alone, and an export with bf16 beside fp32 validates bf16 and three image
routes on top. An engine whose fp32 variant runs over bf16 weight files (``--fp32-over-bf16``)
holds everything a bf16 variant needs; this program adds that variant to a copy of the manifest
(in a directory of links to the engine's files: nothing is written into the engine) and runs it
exactly as the export's validation does (``export.validate.run_candidate`` on the same groups,
judged by ``export.validate.verdict`` and against ``auto``'s 0.98). The fp32 reference comes from
the export's reference cache (``export/reference_cache.py``; computed and kept there if absent),
checked against the checkpoint's weights hash in the engine's manifest. The reference and each
candidate run in their own process, so each peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import in_child, machine, write  # noqa: E402


def _groups(queries: int, documents: int, long_documents: int, seed: int):
    from export.engine_export import validation_set

    return validation_set(queries, documents, long_documents, seed)


def child_reference(checkpoint: str, engine: str, queries: int, documents: int, long_documents: int,
                    seed: int) -> dict:
    """The fp32 reference's scores of the validation set, from the cache where it has them."""
    import logging

    from export.engine_export import reference_scores, weights_sha256
    from gmr_fast.gmr_config import GmrConfig
    from gmr_fast.manifest import load_manifest

    logging.basicConfig(level=logging.INFO)
    ckpt = pathlib.Path(checkpoint)
    digest = weights_sha256(ckpt)
    if digest != load_manifest(engine).source["weights_sha256"]:
        raise SystemExit(f"{engine} was not exported from {checkpoint}: the weights' sha256 differs")
    pairs = [(q, d) for q, docs in _groups(queries, documents, long_documents, seed) for d in docs]
    start = time.perf_counter()
    scores, cached, mode, path = reference_scores(ckpt, GmrConfig.load(ckpt), pairs, digest)
    return {"pairs": len(pairs), "cached": cached, "mode": mode, "seconds": time.perf_counter() - start,
            "cache_file": str(path), "scores": scores.tolist()}


def child_candidate(engine: str, precision: str, image_mode: str | None, queries: int, documents: int,
                    long_documents: int, seed: int, query_vision: str = "bf16") -> dict:
    """``precision`` run on the validation set as the export runs it; a bf16 variant the engine
    lacks is added over its fp32 variant's bf16 files, in a directory of links. Under bf16-vision
    the query's images are encoded as ``query_vision`` says (the backend option, whatever the
    engine's figures recorded; by default the route's definition, bf16)."""
    import dataclasses

    from export import validate
    from gmr_fast.manifest import Variant, load_manifest

    engine = pathlib.Path(engine)
    manifest = load_manifest(engine)
    added = precision not in manifest.variants
    with tempfile.TemporaryDirectory(prefix=".revalidate-", dir=engine.parent) as tmp:
        where = engine
        if added:
            fp32 = manifest.variants.get("fp32")
            if precision != "bf16" or fp32 is None or not fp32.details.get("over_bf16"):
                raise SystemExit(f"{engine} has no {precision} variant, and only bf16 can be added (over an fp32 "
                                 "variant that runs over bf16 weight files)")
            variants = {**manifest.variants, "bf16": Variant("bf16", "torch", {}, dict(fp32.weights), {}, {
                "weights": "the fp32 variant's bf16 files", "added_by": "benchmarks/revalidate.py"})}
            for f in engine.iterdir():
                if f.name != "manifest.json":
                    os.symlink(f, pathlib.Path(tmp) / f.name)
            dataclasses.replace(manifest, variants=variants).save(tmp)
            where = pathlib.Path(tmp)
        groups = _groups(queries, documents, long_documents, seed)
        settings = {"image_precision": image_mode} if image_mode else {}
        if image_mode in ("bf16-vision", "bf16-vision-x3-gate-up", "bf16-vision-x3-gate-up-image-queries"):
            settings["backend_options"] = {"query_vision": query_vision}
        start = time.perf_counter()
        got, modes = validate.run_candidate(where, precision, groups, manifest.gmr.default_instruction,
                                            long=1 if long_documents > 0 else 0, **settings)
    from gmr_fast.reranker import plain_image_refusal

    # an engine whose export refused plain bf16 for pairs with an image runs them under auto's route
    refused = plain_image_refusal(manifest) if precision == "bf16" and not image_mode else None
    return {"precision": precision, "image_precision": image_mode or ("auto's route" if refused else None),
            **({"plain_image_pairs_refused": refused} if refused else {}), "added_variant": added,
            "seconds": time.perf_counter() - start, "modes": modes, "scores": got.tolist()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="the checkpoint the engine was exported from")
    p.add_argument("--engine", required=True)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--image-modes", default="", help="comma-separated image_precision routes to validate too "
                                                     "(bf16-vision, bf16-vision-x3-gate-up, "
                                                     "bf16-vision-x3-gate-up-image-queries, bf16-gemm, bf16x3), as the export "
                                                     "records them")
    p.add_argument("--query-vision", default="bf16", choices=["bf16", "bf16-gemm"],
                   help="how bf16-vision encodes the query's images (the backend option query_vision)")
    p.add_argument("--validation", default="4,20,12", help="QUERIES,DOCUMENTS,LONG_DOCUMENTS (the export's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/revalidate.json")
    a = p.parse_args(argv)
    import numpy as np

    from export.engine_export import _figures
    from export.validate import Criterion, verdict
    from gmr_fast.reranker import AUTO_MIN_TAU

    sizes3 = [int(n) for n in a.validation.split(",")]
    doc = {"machine": machine(), "command": " ".join(sys.argv), "checkpoint": a.checkpoint, "engine": a.engine,
           "validation": dict(zip(("queries", "documents", "long_documents"), sizes3)), "seed": a.seed,
           "criterion": Criterion().to_dict(), "auto_min_tau": AUTO_MIN_TAU}
    ref = in_child("revalidate:child_reference", a.checkpoint, a.engine, *sizes3, a.seed, timeout=6 * 3600)
    expected = np.array(ref.pop("scores"))
    doc["reference"] = ref
    print(json.dumps({"reference": ref}), flush=True)
    groups_sizes = [sizes3[1]] * sizes3[0] + ([sizes3[2]] if sizes3[2] > 0 else [])
    long = 1 if sizes3[2] > 0 else 0
    doc["candidates"] = {}
    for mode in [None, *filter(None, a.image_modes.split(","))]:
        name = a.precision if mode is None else f"{a.precision}, image pairs {mode}"
        try:
            run = in_child("revalidate:child_candidate", a.engine, a.precision, mode, *sizes3, a.seed,
                           a.query_vision, timeout=6 * 3600)
        except RuntimeError as e:
            doc["candidates"][name] = {"error": str(e)[-2000:]}
            continue
        got = np.array(run.pop("scores"))
        figures = _figures(a.precision, expected, got, groups_sizes, long)
        reason = verdict(a.precision, figures, Criterion())
        run.update(figures=figures, accepted_by_export=reason is None, **({"reason": reason} if reason else {}),
                   auto_qualifies=reason is None and figures["query_kendall_tau_mean"] >= AUTO_MIN_TAU)
        doc["candidates"][name] = run
        print(json.dumps({name: {k: run[k] for k in ("seconds", "peak_rss_bytes", "accepted_by_export",
                                                     "auto_qualifies")}
                          | {k: figures[k] for k in ("query_kendall_tau_mean", "kendall_tau", "top10_overlap_mean")}}),
              flush=True)
        write(a.out, doc)
    write(a.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

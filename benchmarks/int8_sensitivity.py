"""Which weights does int8 hurt? Ranking agreement of int8 engines that keep one group of weights
in fp32 at a time, at real width (random weights), against the fp32 reference.

    python benchmarks/int8_sensitivity.py --shape gmr-3b --layers 4 --out benchmarks/results/int8_sensitivity.json

The checkpoint is generated (export.factory, released layout); the fp32 engine is exported and
validated once; then for each group an int8 variant is built beside it and scored on the
validation set (queries x documents of every modality) through the Reranker. The groups are the
candidates of "outlier-sensitive layers": the token embedding, the first and last decoder
layers, each projection kind across all layers, the vision tower and its merger.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import machine, write  # noqa: E402

GROUPS = {
    "none (all int8)": (),
    "embedding": ("embed",),
    "first layer": ("layers.0.*",),
    "last layer": ("layers.{last}.*",),
    "q/k/v": ("*.q.weight", "*.kv.weight"),
    "o": ("*.o.weight",),
    "gate/up": ("*.gate_up.weight",),
    "down": ("*.down.weight",),
    "vision tower": ("blocks.*", "patch_embed.*"),
    "vision merger": ("merger.*",),
    "down + first layer + merger": ("*.down.weight", "layers.0.*", "merger.*"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="gmr-3b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--work", default="/tmp/gmr_bench")
    p.add_argument("--queries", type=int, default=6)
    p.add_argument("--out", default="benchmarks/results/int8_sensitivity.json")
    a = p.parse_args(argv)
    from export import validate
    from export.engine_export import ExportOptions, _Builder, export_engine
    from export.factory import build_shape_checkpoint
    from export.reference import family_of
    from gmr_fast.manifest import load_manifest
    from gmr_fast.reranker import Reranker  # noqa: F401

    work = pathlib.Path(a.work)
    ckpt = work / f"{a.shape}-L{a.layers}-V{a.vision_layers}"
    if not (ckpt / "model.safetensors.index.json").exists():
        build_shape_checkpoint(ckpt, a.shape, a.layers, a.vision_layers)
    engine = work / f"{ckpt.name}-fp32"
    if not (engine / "manifest.json").exists():
        export_engine(ckpt, engine, ExportOptions(dtypes=("fp32",), validation_queries=a.queries, force=True))
    manifest = load_manifest(engine)
    groups = validate.validation_groups(a.queries, 20, 0)
    pairs = [(q, d) for q, docs in groups for d in docs]
    fp32 = Reranker(engine, precision="fp32")
    reference = np.concatenate([fp32.score([(q, d) for d in docs]) for q, docs in groups])
    del fp32
    family = family_of(ckpt)
    config = family.hf_config(ckpt)
    results = []
    for name, patterns in GROUPS.items():
        patterns = tuple(x.replace("{last}", str(a.layers - 1)) for x in patterns)
        scratch = work / "int8-scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(engine, scratch)
        builder = _Builder(ckpt, family, manifest.decoder, manifest.vision, manifest.tokens.yes, manifest.tokens.no, scratch)
        builder._fp32_index = {g: w.tensors for g, w in manifest.variants["fp32"].weights.items()}
        t = time.perf_counter()
        variant = builder.build("int8", patterns)
        m = dataclasses.replace(manifest, variants={"fp32": manifest.variants["fp32"], "int8": variant})
        m.save(scratch)
        got = np.concatenate([Reranker(scratch, precision="int8").score([(q, d) for d in docs]) for q, docs in groups])
        fig = validate.compare(reference, got, [len(d) for _, d in groups])
        row = {"kept_fp32": name, "patterns": list(patterns), "kendall_tau": round(fig["kendall_tau"], 4),
               "query_kendall_tau_mean": round(fig["query_kendall_tau_mean"], 4),
               "top10_overlap_mean": round(fig["top10_overlap_mean"], 3), "max_rel_error": round(fig["max_rel_error"], 4),
               "int8_weight_bytes": variant.details["weight_bytes"], "seconds": round(time.perf_counter() - t, 1)}
        print(json.dumps(row), flush=True)
        results.append(row)
    config_summary = {"shape": a.shape, "layers": a.layers, "vision_layers": a.vision_layers, "pairs": len(pairs),
                      "score_spread": float(np.std(reference)), "hidden_size": config.text_config.hidden_size}
    write(a.out, {"machine": machine(), "config": config_summary, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

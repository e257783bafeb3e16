"""Ranking agreement of an existing engine's variants on the export's long validation group
(``export.validate.long_group``: a ~900-token image query with 12 documents of 60-250 words),
against the fp32 reference of the checkpoint it came from, scored the way validation scores it
(whole prompts, default batches) and with shared prefixes. Engines exported before the long group
existed are checked with it here; an engine exported since carries the figures in its manifest.

    python benchmarks/long_group.py --checkpoint CKPT --engine ENGINE --out benchmarks/results/long_group_7b_L3.json
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--engine", required=True)
    p.add_argument("--precisions", default=None, help="variants to check (default: every variant of the engine)")
    p.add_argument("--reference", default="auto", choices=["auto", "hf", "streamed"])
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    from export import validate
    from export.reference import ReferenceScorer, fp32_memory
    from gmr_fast import Reranker, load_manifest

    manifest = load_manifest(a.engine)
    query, documents = validate.long_group()
    pairs = [(query, d) for d in documents]
    instruction = manifest.gmr.default_instruction
    mode = a.reference
    if mode == "auto":
        need, have = fp32_memory(pathlib.Path(a.checkpoint))
        mode = "hf" if need < have else "streamed"
    t = time.perf_counter()
    reference = ReferenceScorer(a.checkpoint, mode=mode, gmr=manifest.gmr, attn_implementation="sdpa")
    expected = np.asarray(reference.score(pairs, instruction=instruction, batch_size=4))
    del reference
    doc = {"machine": machine(), "command": " ".join(sys.argv), "engine": a.engine, "reference": mode,
           "reference_seconds": time.perf_counter() - t, "pairs": len(pairs),
           "criterion_min_long_tau": validate.Criterion().min_long_tau, "runs": []}
    for precision in (a.precisions.split(",") if a.precisions else manifest.precisions):
        for share in (False, True):
            r = Reranker(a.engine, precision=precision, share_prefix=share)
            t = time.perf_counter()
            got = r.score(pairs, instruction=instruction)
            figures = validate.compare(expected, got, [len(pairs)])
            row = {"precision": precision, "share_prefix": share, "seconds": time.perf_counter() - t,
                   "kendall_tau": figures["kendall_tau"], "max_rel_error": figures["max_rel_error"],
                   "top10_overlap": figures["top10_overlap_mean"],
                   "accepted": figures["kendall_tau"] >= validate.Criterion().min_long_tau}
            doc["runs"].append(row)
            print(row, flush=True)
            del r
    write(a.out, doc)
    print("| precision | prefix shared | Kendall tau | max error / spread | passes the long-group bar |")
    print("|---|---|---|---|---|")
    for row in doc["runs"]:
        print(f"| {row['precision']} | {'yes' if row['share_prefix'] else 'no (as validation runs it)'} | "
              f"{row['kendall_tau']:.3f} | {row['max_rel_error']:.3g} | {'yes' if row['accepted'] else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

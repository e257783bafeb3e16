"""What the int8 variant's kept layers cost: fp32 weights against 8-bit MatMulNBits weights with
fp32 activations (``export --int8-kept``), on a real-width checkpoint (``real_size.py`` builds it).

    python benchmarks/int8_kept.py --checkpoint /tmp/gmr_bench/gmr-3b-L6-V8 \\
        --out benchmarks/results/int8_kept_cpu.json

The same int8 export twice, with the same kept layers (``--keep``, default every ``down``, the
first decoder layer and the vision merger: the fallback the GMR-7B engine needed), each in its
own process: int8 weight bytes, the validation figures (the ranking bars are lowered so that
both variants are written and their figures recorded, whatever they are), then pairs/s and
peak RSS of each engine's int8 variant on ``real_size.py``'s text and image workloads, the two
engines alternating.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import in_child, machine, write  # noqa: E402

KEPT = ("fp32", "int8-weights")


def child_export(checkpoint: str, engine: str, keep: list, kept: str) -> dict:
    from export.engine_export import ExportOptions, export_engine
    from export.validate import Criterion

    low = Criterion()
    low.min_query_tau = low.min_long_tau = low.min_mean_top10 = low.min_top10 = -1.0
    m = export_engine(checkpoint, engine, ExportOptions(dtypes=("fp32", "int8"), int8_keep=tuple(keep), int8_kept=kept,
                                                        criterion=low, force=True))
    v = m.variants["int8"]
    return {"int8_weight_bytes": v.details["weight_bytes"], "fp32_weight_bytes": m.variants["fp32"].details["weight_bytes"],
            "kept_as": v.details["kept_as"], "kept": v.details["kept_fp32"],
            "validation": {k: v.validation.get(k) for k in ("kendall_tau", "query_kendall_tau_mean", "top10_overlap_mean",
                                                            "max_rel_error", "long")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--keep", default="*.down.weight,merger.*,layers.0.*")
    p.add_argument("--work", default="/tmp/gmr_bench/int8_kept")
    p.add_argument("--repeat", type=int, default=2, help="timed scorings per engine and workload (best counts)")
    p.add_argument("--out", default="benchmarks/results/int8_kept_cpu.json")
    a = p.parse_args(argv)
    keep = a.keep.split(",")
    engines = {kept: str(pathlib.Path(a.work) / f"engine-{kept}") for kept in KEPT}
    doc = {"machine": machine(), "checkpoint": a.checkpoint, "keep": keep, "exports": {}, "scoring": {}}
    for kept, engine in engines.items():
        doc["exports"][kept] = in_child("int8_kept:child_export", a.checkpoint, engine, keep, kept, timeout=4 * 3600)
        print(kept, {k: v for k, v in doc["exports"][kept].items() if k != "kept"}, flush=True)
    for kind in ("text", "image"):
        for kept, engine in engines.items():  # alternating: this VM's speed drifts
            row = in_child("real_size:child_reranker", engine, "int8", kind, True, a.repeat)
            row.pop("scores", None)
            doc["scoring"][f"{kind}_{kept}"] = row
            print(kind, kept, f"{row['pairs_per_s']:.3f} pairs/s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    write(a.out, doc)
    print("| kept layers | int8 weights GB | per-query tau | long tau | top-10 | text pairs/s | image pairs/s "
          "| peak RSS GB text / image |")
    print("|---|---|---|---|---|---|---|---|")
    for kept in KEPT:
        e, v = doc["exports"][kept], doc["exports"][kept]["validation"]
        t, i = doc["scoring"][f"text_{kept}"], doc["scoring"][f"image_{kept}"]
        print(f"| {kept} | {e['int8_weight_bytes'] / 1e9:.2f} | {v['query_kendall_tau_mean']:.3f} | {v['long']['kendall_tau']:.3f} "
              f"| {v['top10_overlap_mean']:.3f} | {t['pairs_per_s']:.2f} | {i['pairs_per_s']:.3f} "
              f"| {t['peak_rss_bytes'] / 1e9:.2f} / {i['peak_rss_bytes'] / 1e9:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

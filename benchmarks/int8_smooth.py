"""What SmoothQuant-style scale migration (``export --int8-smooth``) does to the int8 variant, on a
real-width checkpoint (``real_size.py`` builds it) and on a copy of it with activation outlier
channels (``export.outliers``: the same function, bit for bit, with 8 channels per width carrying
64x larger values, as trained checkpoints have and random ones do not).

    python benchmarks/int8_smooth.py --checkpoint /tmp/gmr_bench/gmr-3b-L6-V8 \\
        --out benchmarks/results/int8_smooth_cpu.json

For each checkpoint and alpha (0 = off), one int8 export with the same kept layers (``--keep``,
default none) in its own process, the ranking bars lowered so that every variant is written
and its figures recorded: the validation figures against the fp32 reference (per-query Kendall
tau, the long group's, top-10 overlap, largest error), the calibration's seconds, the int8
weight bytes; then pairs/s of each engine on ``real_size.py``'s text workload (the migration
adds one elementwise Mul before each int8 MatMul), the engines alternating.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import in_child, machine, write  # noqa: E402


def child_export(checkpoint: str, engine: str, keep: list, alpha: float, activations: str = "tensor") -> dict:
    from export.engine_export import ExportOptions, export_engine
    from export.validate import Criterion

    low = Criterion()
    low.min_query_tau = low.min_long_tau = low.min_mean_top10 = low.min_top10 = -1.0
    m = export_engine(checkpoint, engine, ExportOptions(dtypes=("int8",), int8_keep=tuple(keep), int8_smooth=alpha,
                                                        int8_activations=activations, criterion=low, force=True))
    v = m.variants["int8"]
    return {"int8_weight_bytes": v.details["weight_bytes"], "smoothed": v.details.get("smoothed"),
            "calibration_seconds": m.validation.get("calibration_seconds"),
            "reference_seconds": m.validation.get("reference_seconds"),
            "export_seconds": m.validation.get("export_seconds"),
            "validation": {k: v.validation.get(k) for k in ("kendall_tau", "query_kendall_tau_mean",
                                                            "top10_overlap_mean", "top10_overlap_min", "max_abs_diff",
                                                            "max_rel_error", "long")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--keep", default="", help="comma-separated glob patterns kept fp32 (default: none)")
    p.add_argument("--alphas", default="0,0.5")
    p.add_argument("--work", default="/tmp/gmr_bench/int8_smooth")
    p.add_argument("--no-outliers", action="store_true", help="only the checkpoint as given")
    p.add_argument("--kinds", default="plain,outliers", help="which checkpoints: plain (as given), outliers (its copy)")
    p.add_argument("--activations", default="tensor",
                   help="comma-separated int8 activation scales to export with: tensor, row (--int8-activations)")
    p.add_argument("--no-speed", action="store_true", help="skip the pairs/s runs")
    p.add_argument("--repeat", type=int, default=2, help="timed scorings per engine (best counts)")
    p.add_argument("--out", default="benchmarks/results/int8_smooth_cpu.json")
    a = p.parse_args(argv)
    keep = [k for k in a.keep.split(",") if k]
    alphas = [float(x) for x in a.alphas.split(",")]
    work = pathlib.Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    kinds = ["plain"] if a.no_outliers else a.kinds.split(",")
    checkpoints = {"plain": a.checkpoint} if "plain" in kinds else {}
    if "outliers" in kinds:
        outliers = work / "checkpoint-outliers"
        if not (outliers / "outliers.json").exists():
            from export.outliers import add_outlier_channels

            shutil.rmtree(outliers, ignore_errors=True)
            add_outlier_channels(a.checkpoint, outliers)
        checkpoints["outliers"] = str(outliers)
    doc = {"machine": machine(), "checkpoint": a.checkpoint, "keep": keep, "alphas": alphas, "exports": {},
           "scoring": {}}
    engines = {}
    for kind, checkpoint in checkpoints.items():
        for alpha in alphas:
            for act in a.activations.split(","):
                key = f"{kind}_alpha{alpha:g}" + ("" if act == "tensor" else f"_{act}")
                engines[key] = str(work / f"engine-{key}")
                doc["exports"][key] = in_child("int8_smooth:child_export", checkpoint, engines[key], keep, alpha, act,
                                               timeout=4 * 3600)
                print(key, doc["exports"][key], flush=True)
                write(a.out, doc)
    if not a.no_speed:
        for key, engine in engines.items():
            row = in_child("real_size:child_reranker", engine, "int8", "text", True, a.repeat)
            row.pop("scores", None)
            doc["scoring"][key] = row
            print(key, f"{row['pairs_per_s']:.3f} pairs/s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB",
                  flush=True)
    write(a.out, doc)
    print("| checkpoint | alpha | per-query tau | long tau | top-10 mean / min | max abs diff | calibration s "
          "| text pairs/s |")
    print("|---|---|---|---|---|---|---|---|")
    for key, e in doc["exports"].items():
        v, kind = e["validation"], key.split("_alpha")[0]
        speed = doc["scoring"].get(key, {}).get("pairs_per_s")
        print(f"| {kind} | {key.split('_alpha')[1].replace('_', ', ')} | {v['query_kendall_tau_mean']:.3f} "
              f"| {v['long']['kendall_tau']:.3f} "
              f"| {v['top10_overlap_mean']:.3f} / {v['top10_overlap_min']:.2f} | {v['max_abs_diff']:.3g} "
              f"| {e['calibration_seconds'] or 0:.0f} | {'' if speed is None else f'{speed:.2f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

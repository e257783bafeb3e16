"""fp32 projections over bf16 weights on the bf16 hardware: widened per call, or split in two or three.

Image batches under ``image_precision="bf16-gemm"`` or ``"bf16-vision"`` compute fp32 tensors
whose matrix products round their inputs to bf16 and sum in fp32 (backends.torch.Bf16Gemm).
Two ways to do that over the bf16 weights, timed here on the real ``graphs.common.Proj``:

- ``widened``: each call widens the weight to fp32 and multiplies under oneDNN's bf16 "fpmath"
  mode, which reorders the fp32 weight back to bf16 inside the GEMM (what the backend did
  before the split; it also needs the plain bf16 weights in memory beside the packed ones);
- ``split``: two bf16 GEMMs on the packed weight the bf16 decoder already holds, the second
  subtracting the first's rounded output on the fp32 accumulator (Proj "split");
- ``bf16``: one bf16 GEMM on the packed weight, its output rounded to bf16 (what the bf16
  decoder runs: the cost floor, not the same arithmetic).

And two fp32-accurate ones (no input rounded to bf16), for ``image_precision="fp32"`` and
``"bf16x3"``:

- ``fp32``: the weight widened per call, an fp32 GEMM (oneDNN's bf16 mode off);
- ``split3``: ``split`` plus a third bf16 GEMM on x's own rounding residual (Proj "split3").

Where gmr_fast._dnnl loads (backends.bf16_gemm: oneDNN's own bf16 GEMM, which writes fp32
results), the same two products on its packed weight, as the backend now runs them:
``onednn_split`` (one bf16 GEMM with fp32 results) and ``onednn_split3`` (two: x's rest too), and
``onednn_bf16``: its GEMM with the output rounded to bf16, which is what the bf16 decoder's own
projections run wherever the module loads (against ``bf16``, torch's oneDNN on its packed weight).

For each GMR-3B projection shape (decoder and vision tower) and row count: the median time of
``--rounds`` calls, all alternated call by call (this VM drifts), and each one's relative
error against float64 products of the same bf16-rounded inputs (``rel_error``) and of the fp32
inputs themselves (``rel_error_fp32``).

    python benchmarks/split_products.py --out benchmarks/results/split_products_amx.json

Needs a CPU whose oneDNN runs bf16 (AMX or AVX512-BF16).
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

# GMR-3B (Qwen2.5-VL-3B) projections: name -> (in, out, bias)
SHAPES = {
    "decoder q": (2048, 2048, True), "decoder kv": (2048, 512, True), "decoder o": (2048, 2048, False),
    "decoder gate_up": (2048, 22016, False), "decoder down": (11008, 2048, False),
    "vision qkv": (1280, 3840, True), "vision proj": (1280, 1280, True),
    "vision gate_up": (1280, 6840, True), "vision down": (3420, 1280, True),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="24,512,2048")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/split_products_cpu.json")
    a = p.parse_args(argv)
    import torch

    from gmr_fast.backends import bf16_gemm
    from gmr_fast.backends.torch import Bf16Gemm, _onednn_linear_runs
    from gmr_fast.graphs.common import Proj
    from gmr_fast.memory import keep_freed_memory

    if not _onednn_linear_runs(torch, torch.bfloat16):
        raise SystemExit("this CPU's oneDNN does not run bf16: nothing to compare")
    keep_freed_memory()  # as the backend runs (a widened weight is a fresh allocation per call)
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    rows_list = [int(r) for r in a.rows.split(",")]
    dnnl = bf16_gemm.load()
    hows = ("widened", "split", "bf16", "fp32", "split3") + (("onednn_split", "onednn_split3", "onednn_bf16") if dnnl else ())
    doc = {"machine": machine(), "threads": a.threads, "rounds": a.rounds, "results": [],
           "onednn_gemm": "gmr_fast._dnnl" if dnnl else f"not measured: {bf16_gemm.unavailable()}"}
    with torch.inference_mode():
        for name, (fan_in, fan_out, bias) in SHAPES.items():
            w = (torch.randn(fan_out, fan_in, generator=gen) * fan_in ** -0.5).bfloat16()  # [out, in]
            b = torch.randn(fan_out, generator=gen) * 0.1 if bias else None
            packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            own = dnnl.PackedBf16Weight(w.view(torch.int16).numpy()) if dnnl else None
            projs = {}
            for how in hows:
                proj = Proj(fan_in, fan_out, bias)
                proj.fused = True
                proj.weight.data = w.t()  # a transposed view of [out, in] storage, as the backend keeps it
                if bias:
                    proj.bias.data = b if how != "bf16" else b.bfloat16()
                if how in ("widened", "fp32"):
                    proj.upcast = "onednn"
                elif how.startswith("onednn_"):
                    proj.upcast, proj.dnnl = (None if how == "onednn_bf16" else how[len("onednn_"):]), own
                    proj.dnnl_bias = None if b is None else b.numpy()
                else:
                    proj.upcast = how if how in ("split", "split3") else None
                    proj.packed = packed
                projs[how] = proj
            for rows in rows_list:
                x = torch.randn(rows, fan_in, generator=gen)
                exact = x.bfloat16().double() @ w.double().t() + (0 if b is None else b.double())
                exact32 = x.double() @ w.double().t() + (0 if b is None else b.double())
                times = {how: [] for how in projs}
                errors, errors32 = {}, {}
                for r in range(a.rounds + 1):
                    for how, proj in projs.items():
                        start = time.perf_counter()
                        if how == "widened":
                            with Bf16Gemm.held(torch):
                                y = proj(x)
                        else:
                            y = proj(x)
                        elapsed = time.perf_counter() - start
                        if r:  # round 0 warms up
                            times[how].append(elapsed)
                        errors[how] = float((y.double() - exact).norm() / exact.norm())
                        errors32[how] = float((y.double() - exact32).norm() / exact32.norm())
                row = {"projection": name, "in": fan_in, "out": fan_out, "rows": rows,
                       **{f"{how}_ms": 1e3 * float(np.median(t)) for how, t in times.items()},
                       **{f"{how}_rel_error": e for how, e in errors.items()},
                       **{f"{how}_rel_error_fp32": e for how, e in errors32.items()}}
                row["split_speedup_vs_widened"] = row["widened_ms"] / row["split_ms"]
                row["split3_speedup_vs_fp32"] = row["fp32_ms"] / row["split3_ms"]
                if dnnl:
                    row["onednn_split_speedup_vs_split"] = row["split_ms"] / row["onednn_split_ms"]
                    row["onednn_split3_speedup_vs_split3"] = row["split3_ms"] / row["onednn_split3_ms"]
                    row["onednn_bf16_speedup_vs_bf16"] = row["bf16_ms"] / row["onednn_bf16_ms"]
                doc["results"].append(row)
                print(f"{name:16s} rows {rows:5d}: widened {row['widened_ms']:7.1f} ms, split {row['split_ms']:7.1f} "
                      f"({row['split_speedup_vs_widened']:.2f}x), bf16 {row['bf16_ms']:6.1f}; rel. error "
                      f"{errors['widened']:.1e} / {errors['split']:.1e} / {errors['bf16']:.1e}; fp32 "
                      f"{row['fp32_ms']:7.1f}, split3 {row['split3_ms']:7.1f} ({row['split3_speedup_vs_fp32']:.2f}x), "
                      f"rel. error to fp32 {errors32['fp32']:.1e} / {errors32['split3']:.1e}"
                      + (f"; oneDNN's own: split {row['onednn_split_ms']:7.1f} ms ({row['onednn_split_speedup_vs_split']:.2f}x "
                         f"torch's, rel. error {errors['onednn_split']:.1e}), split3 {row['onednn_split3_ms']:7.1f} "
                         f"({row['onednn_split3_speedup_vs_split3']:.2f}x, {errors32['onednn_split3']:.1e}), bf16 "
                         f"{row['onednn_bf16_ms']:6.1f} ({row['onednn_bf16_speedup_vs_bf16']:.2f}x torch's)"
                         if dnnl else ""), flush=True)
    for rows in rows_list:  # one decoder layer's projections, and one vision block's
        for part in ("decoder", "vision"):
            sel = [r for r in doc["results"] if r["rows"] == rows and r["projection"].startswith(part)]
            total = {how: sum(r[f"{how}_ms"] for r in sel) for how in hows}
            layer = {"part": part, "rows": rows, **{f"{h}_ms": v for h, v in total.items()},
                     "split_speedup_vs_widened": total["widened"] / total["split"],
                     "split3_speedup_vs_fp32": total["fp32"] / total["split3"]}
            if dnnl:
                layer["onednn_split_speedup_vs_split"] = total["split"] / total["onednn_split"]
                layer["onednn_split3_speedup_vs_split3"] = total["split3"] / total["onednn_split3"]
                layer["onednn_bf16_speedup_vs_bf16"] = total["bf16"] / total["onednn_bf16"]
            doc.setdefault("per_layer", []).append(layer)
    write(a.out, doc)
    print(table(doc))
    return 0


def table(doc: dict) -> str:
    own = "onednn_split_ms" in doc["per_layer"][0]
    lines = ["| one layer's projections | rows | widened + fpmath ms | split ms | speed-up | fp32 widened ms | "
             "split3 ms | speed-up | bf16 (floor) ms |" + (" oneDNN's own split ms | vs split | split3 ms | vs split3 | "
                                                          "bf16 ms | vs bf16 |" if own else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|---|---|" if own else "")]
    for r in doc["per_layer"]:
        lines.append(f"| {r['part']} | {r['rows']} | {r['widened_ms']:.1f} | {r['split_ms']:.1f} | "
                     f"{r['split_speedup_vs_widened']:.2f}x | {r['fp32_ms']:.1f} | {r['split3_ms']:.1f} | "
                     f"{r['split3_speedup_vs_fp32']:.2f}x | {r['bf16_ms']:.1f} |"
                     + (f" {r['onednn_split_ms']:.1f} | {r['onednn_split_speedup_vs_split']:.2f}x | "
                        f"{r['onednn_split3_ms']:.1f} | {r['onednn_split3_speedup_vs_split3']:.2f}x | "
                        f"{r.get('onednn_bf16_ms', float('nan')):.1f} | "
                        f"{r.get('onednn_bf16_speedup_vs_bf16', float('nan')):.2f}x |" if own else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

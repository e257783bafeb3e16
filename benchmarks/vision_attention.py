"""Vision tower cost on one 1280-token image (the most GMR allows): does the exported graph's
attention cost what the windows cost?

Qwen2.5-VL attends within 112-pixel windows (64 patches) in most blocks and over the whole
image only in a few. The exported graph attends on a padded [segments, longest] layout; this
program times it against HuggingFace's own vision tower (eager and sdpa) and against the same
graph fed one segment per image in every block (what a dense per-image mask would cost).
Vision tower: Qwen2.5-VL proportions (head dim 80, 2 of 8 blocks full-attention), random
weights; the text model is tiny and not timed. Writes JSON and prints a table.

    python benchmarks/vision_attention.py --out benchmarks/results/vision_attention_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import gmr_fast  # noqa: E402
from gmr_fast.vision_layout import vision_graph_inputs  # noqa: E402


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/vision_attention_cpu.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from export.factory import build_checkpoint
    from export.reference import load_model
    from gmr_fast.graphs.vision import VisionEncoder

    torch.set_num_threads(args.threads)
    work = pathlib.Path(tempfile.mkdtemp(prefix="gmr-vision-bench-"))
    ckpt = build_checkpoint(work / "ckpt", "qwen2_5_vl", vision_hidden=320, vision_heads=4, vision_depth=8,
                            fullatt_block_indexes=[3, 7])
    models = {impl: load_model(ckpt, attn_implementation=impl) for impl in ("eager", "sdpa")}
    encoder = VisionEncoder(models["eager"]).eval()

    image = np.random.default_rng(0).integers(0, 256, (896, 1120, 3), dtype=np.uint8)
    batch = gmr_fast.preprocess_images([image], max_pixels=1280 * 28 * 28)
    tokens = int(batch.pixel_values.shape[0]) // 4
    inputs = vision_graph_inputs(batch.image_grid_thw, 112)
    dense = dict(inputs, window_gather=inputs["full_gather"], window_valid=inputs["full_valid"],
                 window_inverse=inputs["full_inverse"])

    shapes = {}
    d = torch.export.Dim
    n, s, lf, m, w, lw = d("patches"), d("images"), d("image_len"), d("merged"), d("windows"), d("window_len")
    shapes = {"pixel_values": {0: n}, "rot_pos_ids": {0: n}, "full_gather": {0: s, 1: lf}, "full_valid": {0: s, 1: lf},
              "full_inverse": {0: n}, "window_index": {0: m}, "window_reverse": {0: m}, "window_gather": {0: w, 1: lw},
              "window_valid": {0: w, 1: lw}, "window_inverse": {0: n}}
    small = gmr_fast.preprocess_images([image[:200, :300]])
    feeds = {"pixel_values": torch.from_numpy(small.pixel_values),
             **{k: torch.from_numpy(v) for k, v in vision_graph_inputs(small.image_grid_thw, 112).items()}}
    with torch.no_grad():
        torch.onnx.export(encoder, (), str(work / "vision.onnx"), kwargs=feeds, input_names=encoder.input_names,
                          output_names=["image_embeds"], dynamo=True, dynamic_shapes=shapes, verbose=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(work / "vision.onnx"), opts, providers=["CPUExecutionProvider"])

    pixels = torch.from_numpy(batch.pixel_values)
    grid = torch.from_numpy(batch.image_grid_thw)
    feed = lambda x: {i.name: x[i.name] for i in session.get_inputs()}  # noqa: E731
    windowed = feed({"pixel_values": batch.pixel_values, **inputs})
    dense_feed = feed({"pixel_values": batch.pixel_values, **dense})
    with torch.no_grad():
        reference = models["eager"].model.visual(pixels, grid_thw=grid).pooler_output.numpy()
        timings = {name: median_time(lambda m=mod: m.model.visual(pixels, grid_thw=grid), args.repeats)
                   for name, mod in (("hf_eager", models["eager"]), ("hf_sdpa", models["sdpa"]))}
    timings["ours_onnx_windowed"] = median_time(lambda: session.run(None, windowed), args.repeats)
    timings["ours_onnx_dense_per_image"] = median_time(lambda: session.run(None, dense_feed), args.repeats)
    max_diff = float(np.abs(session.run(None, windowed)[0] - reference).max())

    windows = inputs["window_gather"].shape[0]
    result = {
        "benchmark": "vision_attention", "image": "896x1120", "visual_tokens": tokens,
        "patches": int(batch.pixel_values.shape[0]), "windows": int(windows),
        "window_len": int(inputs["window_gather"].shape[1]), "threads": args.threads,
        "vision_tower": {"hidden": 320, "heads": 4, "depth": 8, "full_attention_blocks": [3, 7]},
        "max_abs_diff_vs_hf": max_diff, "ms": {k: 1e3 * v for k, v in timings.items()},
        "attention_score_elements_per_windowed_block": int(windows * inputs["window_gather"].shape[1] ** 2),
        "attention_score_elements_per_full_block": int(inputs["full_gather"].shape[1] ** 2),
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"one {tokens}-token image ({result['patches']} patches, {windows} windows of <= {result['window_len']}), "
          f"{args.threads} threads, max |diff| vs HF {max_diff:.2g}")
    print("| vision tower | ms | vs HF eager |\n|---|---|---|")
    for name, t in timings.items():
        print(f"| {name} | {1e3 * t:.1f} | {timings['hf_eager'] / t:.2f}x |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

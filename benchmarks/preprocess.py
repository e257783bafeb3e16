"""Image preprocessing throughput: gmr_fast's native core against HuggingFace's Qwen2-VL
processors, measured in the same run.

Inputs are decoded PIL images (real photos from scikit-image, resized to the benchmark sizes),
so decoding is outside every timing. Each case is warmed up, then timed `--repeats` times; the
median is reported. Writes JSON (with the machine description) and prints a table.

    python benchmarks/preprocess.py --out benchmarks/results/preprocess_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import numpy as np
from PIL import Image

import gmr_fast
from gmr_fast import _core


def photo(size: tuple[int, int]) -> Image.Image:
    from skimage import data

    base = Image.fromarray(data.astronaut() if size[0] <= 512 else data.coffee())
    return base.resize((size[1], size[0]), Image.Resampling.LANCZOS).convert("RGB")


def timed(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """(median, min) seconds of each callable. The callables are run interleaved, round after round, in
    a fresh random order each round, so that the machine's noise (and the cache and page-fault
    state one contender leaves to the next) falls on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    order = random.Random(0)
    for _ in range(repeats):
        names = list(fns)
        order.shuffle(names)
        for name in names:
            fn = fns[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def hf_processors():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    procs = {"hf_pil": Qwen2VLImageProcessorPil()}
    try:  # only where torchvision imports
        import torchvision  # noqa: F401
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        procs["hf_torchvision"] = Qwen2VLImageProcessor()
    except Exception:
        pass
    return procs


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/cpuinfo") as f:
            flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
        simd = [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "fma") if f in flags]
    except OSError:
        simd = []
    return {"cpu": cpu, "simd": simd, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "gmr_fast": gmr_fast.__version__,
            "pillow": Image.__version__, "numpy": np.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/preprocess_cpu.json")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    import transformers

    procs = hf_processors()
    all_threads = _core.hardware_threads()
    rows = []
    for size in [(512, 512), (1536, 2048)]:
        image = photo(size)
        for n in (1, args.batch):
            images = [image] * n
            repeats = max(5, args.repeats // (3 if n > 1 else 1))
            row = {"size": f"{size[1]}x{size[0]}", "images": n, "patches_per_image": int(
                gmr_fast.preprocess_images([image]).pixel_values.shape[0])}
            # Baselines and our variants are timed as two groups of the same run, each interleaved
            # within itself: HF's large allocations then do not land between our thread variants.
            baselines = {f"{name}_ms": (lambda proc=proc: proc(images=images, return_tensors="np")) for name, proc in procs.items()}
            ours = {f"ours_{t}t_ms": (lambda t=t: gmr_fast.preprocess_images(images, num_threads=t))
                    for t in sorted({1, all_threads})}
            for name, (median, best) in {**timed(baselines, repeats), **timed(ours, repeats)}.items():
                row[name] = 1e3 * median
                row[name.replace("_ms", "_best_ms")] = 1e3 * best
            base = row["hf_pil_ms"]
            for key in [k for k in row if k.endswith("_ms") and not k.endswith("_best_ms") and k != "hf_pil_ms"]:
                row[key.replace("_ms", "_speedup_vs_hf_pil")] = base / row[key]
            if all_threads > 1:
                row["ours_thread_scaling"] = row["ours_1t_ms"] / row[f"ours_{all_threads}t_ms"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)

    result = {"benchmark": "preprocess", "machine": machine(), "transformers": transformers.__version__,
              "baselines": list(procs), "threads_all": all_threads, "repeats": args.repeats, "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    cols = ["size", "images", "hf_pil_ms"] + [k for k in rows[0] if k.startswith("hf_torchvision") and k.endswith("_ms")]
    cols += [f"ours_{t}t_ms" for t in sorted({1, all_threads})]
    cols += [f"ours_{t}t_speedup_vs_hf_pil" for t in sorted({1, all_threads})]
    if all_threads > 1:
        cols.append("ours_thread_scaling")
    print(f"machine: {result['machine']['cpu']} ({result['machine']['cores']} cores, {','.join(result['machine']['simd'])})")
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Image preprocessing on real photos (the main job is ``python -m train.demo``): preprocess every
photo that ships with scikit-image, as GMR would see it, and report grids, visual tokens and
timings against HuggingFace's processor on the same decoded images, with a bit-for-bit check.

    python -m gmr_fast.demo [--min-pixels N] [--max-pixels N]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
from PIL import Image

import gmr_fast

GMR_MIN_PIXELS = 4 * 28 * 28
GMR_MAX_PIXELS = 1280 * 28 * 28


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-pixels", type=int, default=GMR_MIN_PIXELS)
    parser.add_argument("--max-pixels", type=int, default=GMR_MAX_PIXELS)
    args = parser.parse_args(argv)
    try:
        import skimage
    except ImportError:
        print("the demo reads scikit-image's bundled photos: pip install 'gmr_fast[test]'", file=sys.stderr)
        return 2

    data = pathlib.Path(skimage.__file__).parent / "data"
    paths = sorted(p for p in data.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    decoded = []
    for p in paths:
        with Image.open(p) as im:
            im.load()
            decoded.append(im.copy())

    def best_of(fn, runs=3):
        # The first touch of a large fresh array costs the OS far more than later ones; report
        # warm timings, the same way for every contender.
        times, result = [], None
        for _ in range(runs):
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
        return min(times), result

    kwargs = dict(min_pixels=args.min_pixels, max_pixels=args.max_pixels, on_error="collect")
    from_files, batch = best_of(lambda: gmr_fast.preprocess_images(paths, **kwargs))
    ours_s, ours = best_of(lambda: gmr_fast.preprocess_images(decoded, **kwargs))

    print(f"{'photo':<28} {'mode':<5} {'size':>11} {'grid':>9} {'patches':>8} {'tokens':>7}")
    grids = iter(batch.image_grid_thw)
    for i, (p, im) in enumerate(zip(paths, decoded)):
        if i in batch.errors:
            print(f"{p.name:<28} {im.mode:<5} {'':>11} error: {batch.errors[i].cause}")
            continue
        t, h, w = next(grids)
        tokens = t * h * w // gmr_fast.preprocess.MERGE_SIZE ** 2
        print(f"{p.name:<28} {im.mode:<5} {f'{im.width}x{im.height}':>11} {f'{h}x{w}':>9} {t * h * w:>8} {tokens:>7}")
    print(f"\n{len(paths) - len(batch.errors)} photos -> pixel_values {batch.pixel_values.shape} float32, "
          f"{int(batch.pixel_values.shape[0]) // gmr_fast.preprocess.MERGE_SIZE ** 2} visual tokens")
    print(f"gmr_fast: {1e3 * from_files:.1f} ms from files (decode included), {1e3 * ours_s:.1f} ms from decoded images "
          f"(best of 3, {gmr_fast.preprocess.hardware_threads()} threads)")

    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:
        print("(install transformers to compare with HuggingFace's processor)")
        return 0
    hf = Qwen2VLImageProcessorPil(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    good = [im for i, im in enumerate(decoded) if i not in ours.errors]
    hf_s, ref = best_of(lambda: hf(images=good, return_tensors="np"))
    same = np.array_equal(ref["pixel_values"], ours.pixel_values) and np.array_equal(ref["image_grid_thw"], ours.image_grid_thw)
    print(f"HuggingFace Qwen2VLImageProcessorPil: {1e3 * hf_s:.1f} ms -> gmr_fast is {hf_s / ours_s:.1f}x faster; "
          f"outputs bit-identical: {same}")
    if not same:
        print("parity check failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

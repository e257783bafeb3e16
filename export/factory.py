"""Random-weight GMR checkpoints, for tests, demos and benchmarks (never committed).

Two kinds:

- **tiny** (``build_checkpoint``, ``--family``): built with transformers from the family's tiny
  config and saved by it, with gmr.json; seconds to make, for wiring and parity tests.
- **real-shaped** (``build_shape_checkpoint``, ``--shape gmr-3b|gmr-7b``): the released GMR widths
  (optionally fewer layers) written exactly as a released lychee-rerank-mm download is laid out:
  bf16 safetensors shards with ``model.safetensors.index.json``, the pre-transformers-5 key names
  (``model.layers.*``, ``visual.*``, ``lm_head.*`` unless tied), a transformers-4.x style
  config.json, the released preprocessor_config.json (max_pixels 12,845,056) and no gmr.json.
  Tensors are generated and written one at a time, so even GMR-7B at full depth (16.6 GB) needs
  about one tensor of memory.

Both have the real Qwen2 tokenizer (rebuilt from qwen.tiktoken) and vocabulary.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
import tempfile

import numpy as np

from gmr_fast.families import FAMILIES, get_family
from gmr_fast.gmr_config import GmrConfig

from . import qwen_tokenizer

SHARD_BYTES = 4 << 30  # the released checkpoints use ~4 GB shards
INIT_STD = 0.02  # transformers' initializer_range for Qwen2(.5)-VL


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("GMR_FAST_CACHE", pathlib.Path.home() / ".cache" / "gmr_fast"))


def tokenizer_json(cache_dir: os.PathLike | None = None) -> str:
    """The converted Qwen2 tokenizer.json text, cached (conversion takes a few seconds)."""
    path = pathlib.Path(cache_dir or default_cache_dir()) / "qwen2_tokenizer.json"
    if path.exists():
        return path.read_text(encoding="utf-8")
    text = qwen_tokenizer.build_tokenizer_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return text


def tiny_config(family: str, **kwargs):
    """The family's tiny HF config (see each family's ``tiny_config`` for the knobs)."""
    return get_family(family).tiny_config(**kwargs)


def _preprocessor(min_pixels: int, max_pixels: int) -> dict:
    return {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": min_pixels, "max_pixels": max_pixels,
            "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "do_rescale": True, "do_normalize": True, "do_resize": True, "do_convert_rgb": True,
            "rescale_factor": 1 / 255, "resample": 3}


def build_checkpoint(out_dir: os.PathLike, family: str = "qwen2_5_vl", seed: int = 0,
                     gmr: GmrConfig | None = None, cache_dir: os.PathLike | None = None, init_std: float | None = 0.08,
                     dtype: str = "float32", **config_kwargs) -> pathlib.Path:
    """Writes a tiny random-weight GMR checkpoint (safetensors, tokenizer, preprocessor_config.json,
    gmr.json) to out_dir and returns it. ``init_std`` widens the matrices' random init so that
    untrained scores spread like a real model's (what parity tests want); ``None`` keeps
    transformers' own initialisation (what training from scratch wants). ``dtype``: how the
    weights are stored (bfloat16 as released checkpoints are)."""
    import torch

    out = pathlib.Path(out_dir)
    fam = get_family(family)
    config = fam.tiny_config(**config_kwargs)
    torch.manual_seed(seed)
    model = fam.hf_class()(config).eval()
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, init_std)
    gmr = gmr or GmrConfig()
    out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    qwen_tokenizer.save_hf_tokenizer(out, tokenizer_json(cache_dir))
    (out / "preprocessor_config.json").write_text(json.dumps(_preprocessor(gmr.min_pixels, gmr.max_pixels), indent=2))
    gmr.save(out)
    return out


def cached_checkpoint(family: str = "qwen2_5_vl", seed: int = 0, cache_dir: os.PathLike | None = None) -> pathlib.Path:
    """A tiny checkpoint in the cache directory, built on first use."""
    root = pathlib.Path(cache_dir or default_cache_dir())
    path = root / f"tiny-{family}-seed{seed}"
    if (path / "gmr.json").exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    try:
        build_checkpoint(tmp, family, seed, cache_dir=root)
        try:
            os.replace(tmp, path)
        except OSError:  # built concurrently by someone else
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------- real shapes
def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    return (rounded >> 16).astype(np.uint16)


def _write_shards(out: pathlib.Path, tensors, rng: np.random.Generator, std: float) -> None:
    shards, current, size = [], [], 0
    for name, shape, kind in tensors:
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, kind))
        size += nbytes
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, _ in shard:
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * ((-len(blob)) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape, kind in shard:
                total = int(np.prod(shape))
                for start in range(0, total, 1 << 24):  # 16M values at a time: memory stays small
                    count = min(1 << 24, total - start)
                    if kind == "norm":
                        values = np.ones(count, np.float32)
                    else:
                        values = rng.standard_normal(count, dtype=np.float32)
                        values *= std if kind == "matrix" else std / 4
                    f.write(to_bf16(values).tobytes())
        total += offset
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))


def family_for_shape(shape: str):
    from gmr_fast.errors import CheckpointError

    for name in FAMILIES:
        family = get_family(name)
        if shape in family.shapes:
            return family
    raise CheckpointError(f"unknown shape {shape!r}; known: {', '.join(all_shapes())}")


def all_shapes() -> list[str]:
    return sorted(s for name in FAMILIES for s in get_family(name).shapes)


def build_shape_checkpoint(out_dir: os.PathLike, shape: str, layers: int | None = None, vision_layers: int | None = None,
                           seed: int = 0, cache_dir: os.PathLike | None = None, init_std: float = INIT_STD) -> pathlib.Path:
    """A random checkpoint with a released GMR shape, laid out as the release is (module docstring)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family = family_for_shape(shape)
    config = family.shape_config(shape, layers, vision_layers)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": [151645, 151643],
                                                            "pad_token_id": 151643, "transformers_version": "4.49.0"}))
    # the released file says HF's class default max_pixels; GMR's usage code passes 1280*28*28
    (out / "preprocessor_config.json").write_text(json.dumps({**_preprocessor(3136, 12845056),
                                                              "processor_class": "Qwen2_5_VLProcessor"}, indent=2))
    qwen_tokenizer.save_hf_tokenizer(out, tokenizer_json(cache_dir))
    _write_shards(out, family.released_tensors(config), np.random.default_rng(seed), init_std)
    return out


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m export.factory",
                                     description="Write a random-weight GMR checkpoint (real Qwen2 tokenizer): a tiny "
                                                 "one (--family), or the released GMR widths in the released layout "
                                                 "(--shape).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--family", default="qwen2_5_vl", choices=FAMILIES, help="tiny checkpoint of this family")
    parser.add_argument("--shape", choices=all_shapes(),
                        help="real widths, released layout (bf16 shards, no gmr.json)")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's full depth)")
    parser.add_argument("--vision-layers", type=int, help="vision blocks (default: the shape's full depth)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.shape:
        print(build_shape_checkpoint(args.out, args.shape, args.layers, args.vision_layers, args.seed))
    else:
        if args.layers or args.vision_layers:
            parser.error("--layers / --vision-layers go with --shape")
        print(build_checkpoint(args.out, args.family, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
